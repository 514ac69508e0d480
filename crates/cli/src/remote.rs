//! Talking to a strata server by address (`--addr`): the same verbs, over
//! the REST API, with the terminal attached over WebSocket.

use std::io::Write;

use anyhow::{bail, Context as _};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::signal::unix::{signal, SignalKind};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::terminal::{self, CrlfToLf, RawMode};
use crate::verbs::{Backend, Built, CommandRow, ImageRow, RunHow, ServerRow, SessionRow};
use strata_engine::builds::{BuildState, BuildStatus};

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A strata server and the token this terminal uses with it.
pub struct Remote {
    http: reqwest::Client,
    base: String,
    token: String,
    /// For https:// addresses: the roots this terminal trusts.
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// The OS `--os` chose: sent with launches and builds.
    pub os: Option<strata_engine::Os>,
}

/// A TLS client configuration trusting the system's roots and `ca_cert`.
fn client_tls(ca_cert: Option<&std::path::Path>) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    // Unreadable system certificates are skipped, not fatal: --ca-cert may be all that is needed.
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_cert {
        let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .with_context(|| format!("reading --ca-cert {}", path.display()))?;
        if certs.is_empty() {
            bail!("--ca-cert {} holds no PEM certificate", path.display());
        }
        for c in certs {
            roots.add(c).with_context(|| format!("--ca-cert {}", path.display()))?;
        }
    }
    Ok(rustls::ClientConfig::builder_with_provider(strata_api::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

impl Remote {
    /// A launch's or build's body, with the OS `--os` chose.
    fn with_os(&self, mut body: Value) -> Value {
        if let Some(os) = self.os {
            body["os"] = os.name.into();
        }
        body
    }

    /// Checks the address and token (nothing is sent yet).
    ///
    /// # Errors
    /// If the address is not an http(s) URL, the token is missing, or the
    /// certificate to trust cannot be read.
    pub fn new(addr: &str, token: Option<String>, ca_cert: Option<&std::path::Path>) -> anyhow::Result<Remote> {
        let base = addr.trim_end_matches('/').to_string();
        let https = base.starts_with("https://");
        if !https && !base.starts_with("http://") {
            bail!("--addr must be an http:// or https:// URL, like https://127.0.0.1:7070");
        }
        let token = token.filter(|t| !t.is_empty()).context("--addr needs a token: --token or STRATA_TOKEN")?;
        // Also with a plain-HTTP control plane: the servers it sends
        // terminals to may serve HTTPS (wss://).
        let tls = if https || ca_cert.is_some() { Some(std::sync::Arc::new(client_tls(ca_cert)?)) } else { None };
        let mut http = reqwest::Client::builder();
        if let Some(cfg) = &tls {
            http = http.use_preconfigured_tls((**cfg).clone());
        }
        Ok(Remote { http: http.build()?, base, token, tls, os: None })
    }

    /// Why the server could not be reached, with the underlying cause (a
    /// certificate this terminal does not trust shows up here).
    fn unreachable(&self, e: reqwest::Error) -> anyhow::Error {
        let mut why = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            why = format!("{why}: {s}");
            source = s.source();
        }
        let hint = if why.contains("certificate") { " (trust its certificate with --ca-cert FILE)" } else { "" };
        anyhow::anyhow!("cannot reach the strata server at {}: {why}{hint}", self.base)
    }

    /// One API call; an error body becomes an error with its message.
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let mut rq = self.http.request(method.parse()?, format!("{}{path}", self.base)).bearer_auth(&self.token);
        if let Some(b) = body {
            rq = rq.json(&b);
        }
        let resp = rq.send().await.map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if !status.is_success() {
            let msg = v["error"]["message"].as_str().unwrap_or("no error message");
            bail!("{msg} ({status})");
        }
        Ok(v)
    }

    /// One API call answering raw bytes, with an optional raw body.
    pub async fn raw(&self, method: &str, path: &str, body: Option<Vec<u8>>) -> anyhow::Result<Vec<u8>> {
        let mut rq = self.http.request(method.parse()?, format!("{}{path}", self.base)).bearer_auth(&self.token);
        if let Some(b) = body {
            rq = rq.header("content-type", "application/octet-stream").body(b);
        }
        let resp = rq.send().await.map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        let bytes = resp.bytes().await?.to_vec();
        if !status.is_success() {
            let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            bail!("{} ({status})", v["error"]["message"].as_str().unwrap_or("no error message"));
        }
        Ok(bytes)
    }

    /// Launches a package on the server and attaches this terminal.
    /// `devices` holds the context's network, shares and home, as the API names them.
    async fn launch_attached(&self, package: &str, devices: Value, how: RunHow) -> anyhow::Result<u8> {
        let RunHow { tty, detach, idle_timeout, command, .. } = how;
        let size = terminal::terminal_size().unwrap_or_default();
        let mut ctx = json!({
            "rows": size.rows,
            "cols": size.cols,
            "term": std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".into()),
        });
        if let (Some(c), Value::Object(d)) = (ctx.as_object_mut(), devices) {
            c.extend(d);
        }
        let mut body = self.with_os(json!({"package": package, "context": ctx}));
        if !command.is_empty() {
            body["command"] = json!(command);
        }
        if let Some(secs) = idle_timeout {
            body["idle_timeout_s"] = secs.into();
        }
        let created = self.call("POST", "/v1/sessions", Some(body)).await?;
        let id = created["session"]["id"].as_str().context("the server sent no session id")?.to_string();
        if created["session"]["graphical"].as_bool() == Some(true) {
            let attach = created["attach_token"].as_str().unwrap_or_default();
            let viewer = format!("{}/#session={id}&attach={attach}&package={package}", self.base);
            eprintln!("strata: {package} shows its display at {viewer}");
            open_in_browser(&viewer);
        }
        if detach {
            println!("{id}");
            return Ok(0);
        }
        self.attach_terminal(&id, tty).await
    }

    /// Opens session `id`'s WebSocket `what` (`attach` or `exec`) with
    /// `query`. A control plane answers with the server running the session
    /// (the bytes go there, not through the plane) and a ticket; a single
    /// server answers "here".
    async fn open_stream(&self, id: &str, what: &str, query: &str) -> anyhow::Result<Ws> {
        let ticket = self.call("POST", &format!("/v1/sessions/{id}/attach-ticket"), None).await?;
        let (url, bearer) = match ticket["url"].as_str() {
            Some(at) => (format!("{}&{query}", at.replacen("/attach?", &format!("/{what}?"), 1)), false),
            None => (format!("{}/v1/sessions/{id}/{what}?{query}", self.base.replacen("http", "ws", 1)), true),
        };
        tracing::debug!(url = %url.split("ticket=").next().unwrap_or_default(), "connecting");
        let mut request = url.into_client_request()?;
        if bearer {
            request.headers_mut().insert("authorization", format!("Bearer {}", self.token).parse()?);
        }
        let connector = self.tls.clone().map(tokio_tungstenite::Connector::Rustls);
        let (ws, _) =
            tokio_tungstenite::connect_async_tls_with_config(request, None, false, connector).await.map_err(|e| {
                let hint = if e.to_string().contains("certificate") {
                    "; to trust a server's own certificate, pass it with --ca-cert (STRATA_CA_CERT)"
                } else {
                    ""
                };
                anyhow::anyhow!("cannot reach session {id}: {e}{hint}")
            })?;
        Ok(ws)
    }

    /// Attaches again to session `id` after it moved: the plane may name
    /// the old server for a moment, so this tries for up to 30 s.
    async fn follow(&self, id: &str, stream: &str, query: &str) -> anyhow::Result<Ws> {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            match self.open_stream(id, stream, query).await {
                Ok(ws) => return Ok(ws),
                Err(e) if std::time::Instant::now() > end => {
                    bail!("session {id} moved, and could not be reached where it went: {e}")
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(250)).await,
            }
        }
    }

    /// Runs `command` in session `id` with pipes, this process's input
    /// passed on with `stdin`, its output and errors copied to ours byte
    /// for byte; or, with `tty`, on a PTY of this terminal's size that
    /// follows it, this terminal in raw mode. Its exit status.
    async fn exec_command(
        &self,
        id: &str,
        command: &strata_engine::GuestCommand,
        stdin: bool,
        tty: bool,
    ) -> anyhow::Result<u8> {
        command.check().map_err(anyhow::Error::msg)?;
        let env: serde_json::Map<String, Value> =
            command.env.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
        let mut start = json!({"type": "exec", "argv": command.argv, "env": env, "cwd": command.cwd, "user": command.user, "stdin": stdin || tty});
        if tty {
            let size = terminal::terminal_size().unwrap_or(strata_proto::WinSize { rows: 24, cols: 80 });
            start["tty"] = json!({"rows": size.rows, "cols": size.cols});
        }
        self.command_stream(id, start, stdin, tty).await
    }

    /// A command over session `id`'s exec socket, begun by the frame
    /// `start` (a new command, or one that runs already): its output to
    /// ours, this process's input to it (with `stdin`, or `tty`: this
    /// terminal raw and followed); its status.
    async fn command_stream(&self, id: &str, start: Value, stdin: bool, tty: bool) -> anyhow::Result<u8> {
        let mut ws = self.open_stream(id, "exec", "").await?;
        let start = start.to_string();
        ws.send(Message::Text(start.clone().into())).await?;
        let _raw = if tty { Some(RawMode::enter()?) } else { None };
        let mut winch = signal(SignalKind::window_change())?;
        let mut input = if stdin || tty { Some(terminal::stdin_channel()) } else { None };
        // Its id in the session, to watch it again where the session moves.
        let mut command: Option<u64> = None;
        loop {
            tokio::select! {
                _ = winch.recv(), if tty => if let Some(s) = terminal::terminal_size() {
                    ws.send(Message::Text(json!({"type": "resize", "rows": s.rows, "cols": s.cols}).to_string().into())).await?;
                },
                msg = ws.next() => match msg {
                    Some(Ok(Message::Binary(d))) => {
                        let (stream, data) = d.split_first().map_or((0, &[][..]), |(s, rest)| (*s, rest));
                        let written = if stream == 2 {
                            std::io::stderr().write_all(data).and_then(|()| std::io::stderr().flush())
                        } else {
                            std::io::stdout().write_all(data).and_then(|()| std::io::stdout().flush())
                        };
                        // A reader that went away (`| head`) ends the copy, not the command.
                        if written.is_err() {
                            return Ok(141);
                        }
                    }
                    Some(Ok(Message::Text(t))) => {
                        let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
                        match v["type"].as_str() {
                            Some("exit") => return Ok(v["status"].as_i64().unwrap_or(0).clamp(0, 255) as u8),
                            Some("lost") | Some("error") => {
                                bail!("session {id}: {}", v["reason"].as_str().or(v["message"].as_str()).unwrap_or("ended"))
                            }
                            Some("started") => command = v["id"].as_u64(),
                            // Moved live to another server: the command
                            // runs on there, and what it printed meanwhile
                            // waits there for its watcher.
                            Some("moved") => {
                                // Asked while it moved, the command was not
                                // started: it is asked for again there.
                                command = command.or(v["id"].as_u64());
                                tracing::info!(session = %id, server = v["server"].as_str().unwrap_or("?"), ?command, "the session moved; following its command");
                                let (unsent, eof) = typed_back(&mut ws, &v).await;
                                ws = self.follow(id, "exec", "").await?;
                                let again = match command {
                                    Some(command) => json!({"type": "attach", "id": command, "stdin": input.is_some() || eof}).to_string(),
                                    None => start.clone(),
                                };
                                ws.send(Message::Text(again.into())).await?;
                                if !unsent.is_empty() {
                                    ws.send(Message::Binary(unsent.into())).await?;
                                }
                                if eof {
                                    ws.send(Message::Text(r#"{"type":"eof"}"#.into())).await?;
                                }
                            }
                            _ => {}
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => bail!("session {id}: {e}"),
                    None => bail!("session {id}: the server closed the connection before the command ended"),
                },
                data = async { input.as_mut()?.recv().await }, if input.is_some() => match data.flatten() {
                    Some(d) => ws.send(Message::Binary(d.into())).await?,
                    None => {
                        input = None;
                        ws.send(Message::Text(r#"{"type":"eof"}"#.into())).await?;
                    }
                },
            }
        }
    }

    /// Attaches this terminal to a session on the server.
    async fn attach_terminal(&self, id: &str, tty: bool) -> anyhow::Result<u8> {
        let size = terminal::terminal_size().unwrap_or_default();
        let mut ws = self.open_stream(id, "attach", &format!("rows={}&cols={}", size.rows, size.cols)).await?;
        let _raw = if tty { Some(RawMode::enter()?) } else { None };
        let mut input = terminal::stdin_channel();
        let mut input_open = true;
        let mut winch = signal(SignalKind::window_change())?;
        let mut crlf = CrlfToLf::default();
        let mut last_key: Option<u8> = None;
        // The first frame repaints the program's screen: for a terminal, not a pipe.
        let mut repaint = true;
        // Where this terminal is on the program's output, and whether the
        // next first frame is the screen where a moved session went: only
        // what follows that place is new.
        let mut sent = strata_proto::SentTail::default();
        let mut followed = false;
        let out = |d: &[u8]| {
            let mut o = std::io::stdout().lock();
            let _ = o.write_all(d);
            let _ = o.flush();
        };
        loop {
            tokio::select! {
                msg = ws.next() => match msg {
                    Some(Ok(Message::Binary(d))) => {
                        let first = std::mem::replace(&mut repaint, false);
                        let after_move = std::mem::replace(&mut followed, false);
                        let d = if after_move { sent.after(&d).to_vec() } else { d.to_vec() };
                        // A pipe is given no repaint, but its place is kept.
                        sent.keep(&d);
                        if tty {
                            out(&d);
                        } else if !first || after_move {
                            out(&crlf.push(&d));
                        }
                    }
                    Some(Ok(Message::Text(t))) => {
                        let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
                        match v["type"].as_str() {
                            Some("exit") => return Ok(v["status"].as_i64().unwrap_or(0).clamp(0, 255) as u8),
                            Some("lost") | Some("error") => {
                                drop(_raw);
                                bail!("session {id}: {}", v["reason"].as_str().or(v["message"].as_str()).unwrap_or("ended"));
                            }
                            // Moved live to another server: attach there, as
                            // the plane now says; its first frame repaints.
                            Some("moved") => {
                                tracing::info!(session = %id, server = v["server"].as_str().unwrap_or("?"), "the session moved; following it");
                                let (unsent, _) = typed_back(&mut ws, &v).await;
                                let size = terminal::terminal_size().unwrap_or_default();
                                ws = self.follow(id, "attach", &format!("rows={}&cols={}", size.rows, size.cols)).await?;
                                if !unsent.is_empty() {
                                    ws.send(Message::Binary(unsent.into())).await?;
                                }
                                repaint = true;
                                followed = true;
                            }
                            _ => {}
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => bail!("session {id}: {e}"),
                    None => bail!("session {id}: the server closed the connection"),
                },
                data = input.recv(), if input_open => match data.flatten() {
                    Some(d) => {
                        if tty {
                            if let Some(pos) = terminal::find_detach(last_key, &d) {
                                if pos > 0 {
                                    ws.send(Message::Binary(d[..pos - 1].to_vec().into())).await?;
                                }
                                let _ = ws.close(None).await;
                                drop(_raw);
                                eprintln!("\r\nstrata: detached from session {id}; `strata --addr {} attach {id}` returns to it", self.base);
                                return Ok(0);
                            }
                            last_key = d.last().copied();
                        }
                        ws.send(Message::Binary(d.into())).await?;
                    }
                    None => {
                        input_open = false;
                        if !tty {
                            ws.send(Message::Text(r#"{"type":"eof"}"#.into())).await?;
                        }
                    }
                },
                _ = winch.recv() => if let Some(s) = terminal::terminal_size() {
                    ws.send(Message::Text(json!({"type": "resize", "rows": s.rows, "cols": s.cols}).to_string().into())).await?;
                },
            }
        }
    }
}

/// The input a client sent that its session's old server did not pass on
/// (`moved` names the first of it; `unsent` frames follow until that
/// server closes), and whether its end of input was among it: to be sent
/// again where the session went, in order.
async fn typed_back(ws: &mut Ws, moved: &Value) -> (Vec<u8>, bool) {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut unsent = b64.decode(moved["unsent"].as_str().unwrap_or_default()).unwrap_or_default();
    let mut eof = moved["eof"] == true;
    if ws.send(Message::Close(None)).await.is_ok() {
        let end = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(end, ws.next()).await {
            match msg {
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
                    if v["type"] == "unsent" {
                        unsent.extend(b64.decode(v["unsent"].as_str().unwrap_or_default()).unwrap_or_default());
                        eof |= v["eof"] == true;
                    }
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
    }
    (unsent, eof)
}

/// Opens `url` in the desktop's browser, where there is a desktop.
pub(crate) fn open_in_browser(url: &str) {
    let desktop = std::env::var_os("DISPLAY").is_some() || std::env::var_os("WAYLAND_DISPLAY").is_some();
    if !desktop {
        return;
    }
    let opened = std::process::Command::new("xdg-open")
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    if opened.is_err() {
        eprintln!("strata: no xdg-open here; open the address above in a browser");
    }
}

/// A session's path on the server.
fn session_path(id: &str, suffix: &str) -> String {
    format!("/v1/sessions/{id}{suffix}")
}

fn image_row(i: &Value) -> ImageRow {
    ImageRow {
        kind: i["kind"].as_str().unwrap_or("").into(),
        digest: i["digest"].as_str().unwrap_or("").into(),
        package: i["package"].as_str().map(str::to_string),
        os: i["os"].as_str().unwrap_or("-").into(),
        size: i["size"].as_u64().unwrap_or(0),
        created: i["created"].as_i64().unwrap_or(0),
        snapshot: i["snapshot"].as_str().map(str::to_string),
    }
}

fn list(v: &Value) -> impl Iterator<Item = &Value> {
    v.as_array().into_iter().flatten()
}

impl Backend for Remote {
    async fn sessions(&self) -> anyhow::Result<(Vec<SessionRow>, Value)> {
        let v = self.call("GET", "/v1/sessions", None).await?;
        let text = |s: &Value, k: &str| s[k].as_str().filter(|t| !t.is_empty()).map(str::to_string);
        let rows = list(&v)
            .map(|s| SessionRow {
                id: text(s, "id").unwrap_or_default(),
                package: text(s, "package").unwrap_or_default(),
                os: text(s, "os").unwrap_or_else(|| "-".into()),
                state: text(s, "state").unwrap_or_default(),
                attached: s["attached"] == true,
                server: text(s, "server"),
                note: text(s, "note"),
                why: text(s, "reason").and_then(|r| r.lines().next().map(str::to_string)),
                created: s["created"].as_i64().unwrap_or(0),
            })
            .collect();
        Ok((rows, v))
    }

    async fn kill(&self, id: &str) -> anyhow::Result<()> {
        self.call("DELETE", &session_path(id, ""), None).await.map(drop)
    }

    async fn pause(&self, id: &str) -> anyhow::Result<String> {
        self.call("POST", &session_path(id, "/pause"), None).await.map(|_| id.to_string())
    }

    async fn resume(&self, id: &str) -> anyhow::Result<()> {
        self.call("POST", &session_path(id, "/resume"), None).await.map(drop)
    }

    async fn fork(&self, id: &str, count: usize, spread: bool) -> anyhow::Result<(Vec<Result<String, String>>, f64)> {
        let mut body = json!({ "count": count });
        if spread {
            body["spread"] = json!(true);
        }
        let v = self.call("POST", &session_path(id, "/fork"), Some(body)).await?;
        let forks = list(&v["forks"])
            .map(|f| match f["session"]["id"].as_str() {
                Some(id) => Ok(id.to_string()),
                None => Err(f["error"].as_str().unwrap_or("the server gave no reason").to_string()),
            })
            .collect();
        Ok((forks, v["parent_stopped_ms"].as_f64().unwrap_or(0.0)))
    }

    async fn snapshot(&self, id: &str, name: &str) -> anyhow::Result<String> {
        let v = self.call("POST", &session_path(id, "/snapshot"), Some(json!({ "name": name }))).await?;
        let image = v["image"].as_str().unwrap_or_default();
        Ok(format!(
            "{id} saved as snapshot {name} (image {}); it was stopped {:.0} ms and runs on",
            &image[..image.len().min(12)],
            v["stopped_ms"].as_f64().unwrap_or(0.0)
        ))
    }

    async fn drain(&self, server: &str, on: bool) -> anyhow::Result<Value> {
        if server.is_empty() || !server.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            bail!("{server:?} is not a server's id; `strata servers ls` lists them");
        }
        let path = format!("/v1/servers/{server}/drain");
        self.call(if on { "POST" } else { "DELETE" }, &path, None).await
    }

    async fn move_session(&self, id: &str, to: Option<&str>) -> anyhow::Result<String> {
        let body = match to {
            Some(server) => json!({ "server": server }),
            None => json!({}),
        };
        let v = self.call("POST", &session_path(id, "/move"), Some(body)).await?;
        Ok(format!(
            "{id} moved from server {} to server {}; it was stopped {} ms",
            v["from"].as_str().unwrap_or("?"),
            v["server"].as_str().unwrap_or("?"),
            v["downtime_ms"].as_u64().unwrap_or(0)
        ))
    }

    async fn run_snapshot(&self, name: &str, how: RunHow) -> anyhow::Result<u8> {
        let mut body = json!({ "snapshot": name });
        if let Some(secs) = how.idle_timeout {
            body["idle_timeout_s"] = secs.into();
        }
        let created = self.call("POST", "/v1/sessions", Some(body)).await?;
        let id = created["session"]["id"].as_str().context("the server sent no session id")?.to_string();
        if how.detach {
            println!("{id}");
            return Ok(0);
        }
        self.attach_terminal(&id, how.tty).await
    }

    async fn logs(&self, id: &str) -> anyhow::Result<Vec<u8>> {
        self.raw("GET", &session_path(id, "/logs"), None).await
    }

    async fn copy(&self, id: &str, guest: &str, host: &std::path::Path, into_guest: bool) -> anyhow::Result<u64> {
        let path = format!("/v1/sessions/{id}/files?path={}", crate::urlencode(guest));
        if into_guest {
            let data = std::fs::read(host).with_context(|| format!("reading {}", host.display()))?;
            let n = data.len() as u64;
            self.raw("PUT", &path, Some(data)).await?;
            Ok(n)
        } else {
            let data = self.raw("GET", &path, None).await?;
            // Written whole or not at all.
            let tmp = host.with_file_name(format!(
                ".{}.strata-part",
                host.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
            ));
            std::fs::write(&tmp, &data).with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, host).with_context(|| format!("writing {}", host.display()))?;
            Ok(data.len() as u64)
        }
    }

    async fn run(&self, package: &str, devices: &crate::DeviceArgs, how: RunHow) -> anyhow::Result<u8> {
        if how.cold {
            bail!("--cold runs on this machine only; leave out --addr");
        }
        self.launch_attached(package, devices.to_json("remote")?, how).await
    }

    async fn attach(&self, id: &str, tty: bool) -> anyhow::Result<u8> {
        self.attach_terminal(id, tty).await
    }

    async fn piped_program(&self, package: &str) -> anyhow::Result<Option<strata_engine::GuestCommand>> {
        // The server's definition of it; one it does not list (or a server
        // that says nothing of programs) is attached to as before.
        let Ok(v) = self.call("GET", "/v1/packages", None).await else { return Ok(None) };
        let Some(p) = list(&v).find(|p| p["name"] == package) else { return Ok(None) };
        let argv: Vec<String> = list(&p["command"]).filter_map(|a| a.as_str().map(str::to_string)).collect();
        if p["graphical"] == true || argv.is_empty() {
            return Ok(None);
        }
        let env = p["env"].as_object().into_iter().flatten();
        let env = env.filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect();
        Ok(Some(strata_engine::GuestCommand { argv, env, ..Default::default() }))
    }

    async fn run_command(
        &self,
        package: &str,
        devices: &crate::DeviceArgs,
        command: strata_engine::GuestCommand,
    ) -> anyhow::Result<u8> {
        command.check().map_err(anyhow::Error::msg)?;
        let body = self.with_os(json!({"package": package, "context": devices.to_json("remote")?}));
        let created = self.call("POST", "/v1/sessions", Some(body)).await?;
        let id = created["session"]["id"].as_str().context("the server sent no session id")?.to_string();
        let status = self.exec_command(&id, &command, true, false).await;
        // The session ends with its command, as on this machine.
        if let Err(e) = self.call("DELETE", &session_path(&id, ""), None).await {
            eprintln!("strata: could not stop session {id}: {e:#}");
        }
        status
    }

    async fn exec(&self, id: &str, command: strata_engine::GuestCommand, stdin: bool, tty: bool) -> anyhow::Result<u8> {
        self.exec_command(id, &command, stdin, tty).await
    }

    async fn commands(&self, id: &str) -> anyhow::Result<(Vec<CommandRow>, Value)> {
        let v = self.call("GET", &session_path(id, "/commands"), None).await?;
        let rows = list(&v)
            .map(|c| CommandRow {
                id: c["id"].as_u64().unwrap_or(0) as u32,
                argv: list(&c["argv"]).filter_map(|a| a.as_str().map(str::to_string)).collect(),
                pty: c["pty"].as_bool().unwrap_or(false),
            })
            .collect();
        Ok((rows, v))
    }

    async fn signal_command(&self, id: &str, command: u32, signal: i32) -> anyhow::Result<()> {
        let path = session_path(id, &format!("/commands/{command}/signal"));
        self.call("POST", &path, Some(json!({ "signal": signal }))).await.map(drop)
    }

    async fn attach_command(&self, id: &str, command: u32, stdin: bool) -> anyhow::Result<u8> {
        self.command_stream(id, json!({"type": "attach", "id": command, "stdin": stdin}), stdin, false).await
    }

    async fn build(
        &self,
        package: &str,
        detach: bool,
        seen: &mut (dyn FnMut(&BuildStatus) + Send),
    ) -> anyhow::Result<Built> {
        let started: BuildStatus = serde_json::from_value(
            self.call("POST", "/v1/builds", Some(self.with_os(json!({ "package": package })))).await?,
        )?;
        if started.state == BuildState::Running {
            if detach {
                return Ok(Built::Started(Some(started.id)));
            }
            let end = self.follow_build(&started.id, true, seen).await?;
            if end.state != BuildState::Done {
                bail!("the build of {package} {}: {}", end.state, end.error.unwrap_or_default());
            }
        }
        // Every image is there now: this answers at once.
        let v = self.call("POST", "/v1/images", Some(self.with_os(json!({ "package": package })))).await?;
        Ok(Built::Images(list(&v).map(image_row).collect()))
    }

    async fn builds(&self) -> anyhow::Result<(Vec<BuildStatus>, Value)> {
        let v = self.call("GET", "/v1/builds", None).await?;
        Ok((serde_json::from_value(v.clone())?, v))
    }

    async fn follow_build(
        &self,
        id: &str,
        follow: bool,
        seen: &mut (dyn FnMut(&BuildStatus) + Send),
    ) -> anyhow::Result<BuildStatus> {
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            bail!("{id:?} is not a build id; `strata builds ls` lists them");
        }
        let path = format!("/v1/builds/{id}");
        let mut status: BuildStatus = serde_json::from_value(self.call("GET", &path, None).await?)?;
        if !follow || status.state != BuildState::Running {
            return Ok(status);
        }
        // Server-sent events: a `status` event's data is the whole build.
        let url = format!("{}{path}/events", self.base);
        let mut resp = self.http.get(url).bearer_auth(&self.token).send().await.map_err(|e| self.unreachable(e))?;
        if !resp.status().is_success() {
            bail!("following build {id}: {}", resp.status());
        }
        let mut pending = String::new();
        while let Some(chunk) = resp.chunk().await? {
            pending.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = pending.find("\n\n") {
                let event: String = pending.drain(..end + 2).collect();
                let data: String = event.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim_start).collect();
                if let Ok(s) = serde_json::from_str::<BuildStatus>(&data) {
                    seen(&s);
                    status = s;
                }
            }
        }
        Ok(status)
    }

    async fn images(&self) -> anyhow::Result<(Vec<ImageRow>, Value)> {
        let v = self.call("GET", "/v1/images", None).await?;
        Ok((list(&v).map(image_row).collect(), v))
    }

    async fn remove_image(&self, digest: &str) -> anyhow::Result<()> {
        self.call("DELETE", &format!("/v1/images/{digest}"), None).await.map(drop)
    }

    async fn gc(&self) -> anyhow::Result<(u64, u64)> {
        let v = self.call("POST", "/v1/images/gc", None).await?;
        Ok((v["removed_blobs"].as_u64().unwrap_or(0), v["freed_bytes"].as_u64().unwrap_or(0)))
    }

    async fn prune(&self, dry_run: bool) -> anyhow::Result<Value> {
        self.call("POST", &format!("/v1/images/prune?dry_run={dry_run}"), None).await
    }

    async fn packages(&self) -> anyhow::Result<(Vec<(String, String, String)>, Value)> {
        let v = self.call("GET", "/v1/packages", None).await?;
        let field = |p: &Value, k: &str| p[k].as_str().unwrap_or("").to_string();
        let oses = |p: &Value| list(&p["os"]).filter_map(Value::as_str).collect::<Vec<_>>().join(",");
        Ok((list(&v).map(|p| (field(p, "name"), oses(p), field(p, "description"))).collect(), v))
    }

    async fn servers(&self) -> anyhow::Result<(Vec<ServerRow>, Value)> {
        let v = self.call("GET", "/v1/servers", None).await?;
        let rows = list(&v)
            .map(|s| ServerRow {
                name: s["name"].as_str().unwrap_or("").into(),
                address: s["address"].as_str().map(str::to_string),
                sessions: s["sessions"].as_u64().unwrap_or(0),
                memory_available_mib: s["memory_available_mib"].as_u64().unwrap_or(0),
                guest_memory_committed_mib: s["guest_memory_committed_mib"].as_u64().unwrap_or(0),
                load1: s["load1"].as_f64().unwrap_or(0.0),
                cached: list(&s["cached_packages"]).filter_map(|p| p.as_str().map(str::to_string)).collect(),
            })
            .collect();
        Ok((rows, v))
    }
}
