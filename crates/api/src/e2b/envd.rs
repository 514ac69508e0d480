//! E2B's data plane, as its in-guest daemon (envd) serves it: Connect RPC
//! with the JSON codec (`process.Process`, `filesystem.Filesystem`), file
//! transfer on `/files`, and `/health`. The SDK sends every request to one
//! address with the sandbox in `E2b-Sandbox-Id` and its token in
//! `X-Access-Token`; each call becomes a message to the session's actor,
//! and from there a command with pipes in the guest (strata's agent).
//!
//! Connect's framing: a unary call is a JSON body each way; a server
//! stream answers `application/connect+json` envelopes (a flags byte, a
//! big-endian length, the message), the last flagged 0x02 and carrying the
//! error if there is one. Process ids are the ids of strata's commands.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::Digest;
use strata_engine::GuestCommand;
use strata_proto::ProcId;
use tokio::sync::mpsc;

use super::{access_token, E2bError};
use crate::live::{Cmd, CommandOut, Live};
use crate::AppState;

type St = State<Arc<AppState>>;

/// Largest file `/files` reads (uploads stream into the guest, bounded by
/// its disk).
pub const MAX_FILE: usize = 256 << 20;
/// Largest body of the other calls (JSON messages, input for a command).
pub const MAX_MESSAGE: usize = 16 << 20;
/// Keep-alive events on an idle stream, unless the client asks otherwise.
const KEEPALIVE: Duration = Duration::from_secs(50);

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/health", get(|| async { StatusCode::NO_CONTENT }))
        .route("/files", files_route())
        .route("/files/holder", get(file_holder))
        .route("/process.Process/Start", post(start))
        .route("/process.Process/Connect", post(connect))
        .route("/process.Process/List", post(list))
        .route("/process.Process/SendInput", post(send_input))
        .route("/process.Process/CloseStdin", post(close_stdin))
        .route("/process.Process/SendSignal", post(send_signal))
        .route("/process.Process/Update", post(update))
        .route("/process.Process/StreamInput", post(stream_input))
        .route("/filesystem.Filesystem/Stat", post(stat))
        .route("/filesystem.Filesystem/ListDir", post(list_dir))
        .route("/filesystem.Filesystem/MakeDir", post(make_dir))
        .route("/filesystem.Filesystem/Remove", post(remove))
        .route("/filesystem.Filesystem/Move", post(move_entry))
        .route("/filesystem.Filesystem/WatchDir", post(watch_dir))
        .route("/filesystem.Filesystem/CreateWatcher", post(create_watcher))
        .route("/filesystem.Filesystem/GetWatcherEvents", post(watcher_events))
        .route("/filesystem.Filesystem/RemoveWatcher", post(remove_watcher))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_MESSAGE))
}

/// `/files`: uploads stream into the guest, so no body limit of the
/// server's applies (the guest's disk bounds them).
pub(crate) fn files_route() -> axum::routing::MethodRouter<Arc<AppState>> {
    get(read_file).post(write_file).layer(axum::extract::DefaultBodyLimit::disable())
}

/// A Connect error: its code (`not_found`, `invalid_argument`, ...) and message.
#[derive(Debug)]
pub struct RpcError(pub(crate) &'static str, pub(crate) String);

impl RpcError {
    fn status(&self) -> StatusCode {
        match self.0 {
            "invalid_argument" | "failed_precondition" | "out_of_range" => StatusCode::BAD_REQUEST,
            "unauthenticated" => StatusCode::UNAUTHORIZED,
            "permission_denied" => StatusCode::FORBIDDEN,
            "not_found" => StatusCode::NOT_FOUND,
            "already_exists" | "aborted" => StatusCode::CONFLICT,
            "resource_exhausted" => StatusCode::TOO_MANY_REQUESTS,
            "unimplemented" => StatusCode::NOT_IMPLEMENTED,
            "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
            "deadline_exceeded" => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn body(&self) -> Value {
        json!({ "code": self.0, "message": self.1 })
    }
}

impl IntoResponse for RpcError {
    fn into_response(self) -> Response {
        (self.status(), axum::Json(self.body())).into_response()
    }
}

impl From<E2bError> for RpcError {
    fn from(e: E2bError) -> RpcError {
        let code = match e.0 {
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::UNAUTHORIZED => "unauthenticated",
            StatusCode::BAD_REQUEST => "invalid_argument",
            StatusCode::CONFLICT => "failed_precondition",
            _ => "internal",
        };
        RpcError(code, e.1)
    }
}

fn invalid(m: impl Into<String>) -> RpcError {
    RpcError("invalid_argument", m.into())
}

/// The sandbox a data-plane request is for, checked against its token.
fn sandbox(st: &AppState, headers: &HeaderMap) -> Result<Arc<Live>, RpcError> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let id = header("e2b-sandbox-id")
        .ok_or_else(|| invalid("E2b-Sandbox-Id is missing: set E2B_SANDBOX_URL to this server's /e2b"))?;
    let live = st.sessions.get(id).ok_or_else(|| RpcError("not_found", format!("sandbox {id:?} not found")))?;
    let given = header("x-access-token").unwrap_or("");
    let want = access_token(&live);
    let same: bool = subtle::ConstantTimeEq::ct_eq(given.as_bytes(), want.as_bytes()).into();
    if !same {
        return Err(RpcError("unauthenticated", format!("the access token of sandbox {id:?} is missing or wrong")));
    }
    Ok(live)
}

/// The user of a request (`Authorization: Basic base64(user:)`), if named.
fn user(headers: &HeaderMap) -> Result<Option<String>, RpcError> {
    let Some(v) = headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let Some(b64) = v.strip_prefix("Basic ") else { return Ok(None) };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()
        .and_then(|d| String::from_utf8(d).ok())
        .ok_or_else(|| invalid("the Authorization header is not base64 of USER:"))?;
    let name = decoded.split(':').next().unwrap_or("").to_string();
    check_user(&name)?;
    Ok(Some(name).filter(|n| !n.is_empty()))
}

fn check_user(name: &str) -> Result<(), RpcError> {
    if name.len() > 32 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) {
        return Err(invalid(format!("user {name:?} is not a user name")));
    }
    Ok(())
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn unb64(s: &str) -> Result<Vec<u8>, RpcError> {
    base64::engine::general_purpose::STANDARD.decode(s).map_err(|e| invalid(format!("input is not base64: {e}")))
}

/// A unary request's message (JSON).
fn unary<T: serde::de::DeserializeOwned>(headers: &HeaderMap, body: &[u8]) -> Result<T, RpcError> {
    let ct = headers.get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if ct.starts_with("application/proto") {
        return Err(RpcError("unimplemented", "only the JSON codec is served (application/json)".into()));
    }
    let body = if body.is_empty() { b"{}".as_slice() } else { body };
    serde_json::from_slice(body).map_err(|e| invalid(format!("the request is not the expected JSON message: {e}")))
}

/// The one message of a server-streaming request (its envelope opened).
fn stream_request<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, RpcError> {
    let (head, rest) = body.split_at_checked(5).ok_or_else(|| invalid("the stream request has no envelope"))?;
    if head[0] & 0x01 != 0 {
        return Err(RpcError("unimplemented", "compressed messages are not served".into()));
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let msg = rest.get(..len).ok_or_else(|| invalid("the stream request's envelope is cut short"))?;
    serde_json::from_slice(msg).map_err(|e| invalid(format!("the request is not the expected JSON message: {e}")))
}

fn envelope(flags: u8, msg: &Value) -> Bytes {
    let json = msg.to_string();
    let mut b = Vec::with_capacity(5 + json.len());
    b.push(flags);
    b.extend_from_slice(&(json.len() as u32).to_be_bytes());
    b.extend_from_slice(json.as_bytes());
    Bytes::from(b)
}

/// A stream answer: the envelopes `rx` yields.
fn stream_response(rx: mpsc::Receiver<Bytes>) -> Response {
    let body =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx)) });
    Response::builder()
        .status(StatusCode::OK)
        .header(axum::http::header::CONTENT_TYPE, "application/connect+json")
        .body(axum::body::Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// A stream that ends at once with `e`.
fn stream_error(e: RpcError) -> Response {
    let (tx, rx) = mpsc::channel(1);
    let _ = tx.try_send(envelope(0x02, &json!({ "error": e.body() })));
    stream_response(rx)
}

fn json_response(v: Value) -> Response {
    axum::Json(v).into_response()
}

async fn ask<T>(
    live: &Live,
    make: impl FnOnce(tokio::sync::oneshot::Sender<Result<T, String>>) -> Cmd,
) -> Result<T, RpcError> {
    let gone = || RpcError("not_found", format!("sandbox {:?} has ended", live.id));
    let (tx, rx) = tokio::sync::oneshot::channel();
    live.cmd.send(make(tx)).await.map_err(|_| gone())?;
    rx.await.map_err(|_| gone())?.map_err(|e| RpcError("failed_precondition", e))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ProcessConfig {
    cmd: String,
    args: Vec<String>,
    envs: BTreeMap<String, String>,
    cwd: Option<String>,
}

#[derive(Deserialize)]
struct StartRequest {
    process: Option<ProcessConfig>,
    pty: Option<PtyBody>,
    tag: Option<String>,
    stdin: Option<bool>,
}

#[derive(Deserialize)]
struct PtyBody {
    size: Option<PtySize>,
}

#[derive(Deserialize)]
struct PtySize {
    cols: u16,
    rows: u16,
}

/// A PTY's size, checked (1..=1000 each way; 80x24 if none is given).
fn pty_size(p: &PtyBody) -> Result<strata_proto::WinSize, RpcError> {
    let (cols, rows) = p.size.as_ref().map_or((80, 24), |s| (s.cols, s.rows));
    if !(1..=1000).contains(&cols) || !(1..=1000).contains(&rows) {
        return Err(invalid(format!("PTY size {cols}x{rows} is out of range 1..1000")));
    }
    Ok(strata_proto::WinSize { rows, cols })
}

#[derive(Deserialize, Default)]
struct Selector {
    pid: Option<ProcId>,
    tag: Option<String>,
}

/// How long a stream may last (`Connect-Timeout-Ms`), if bounded.
fn deadline(headers: &HeaderMap) -> Option<Duration> {
    let ms: u64 = headers.get("connect-timeout-ms")?.to_str().ok()?.parse().ok()?;
    Some(Duration::from_millis(ms))
}

fn keepalive(headers: &HeaderMap) -> Duration {
    headers
        .get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(KEEPALIVE, |s| Duration::from_secs(s.clamp(1, 3600)))
}

fn event(e: Value) -> Value {
    json!({ "event": e })
}

/// Forwards a command's output as process events (as `pty` data for one on
/// a PTY) until it exits, the client goes, or the deadline passes.
fn pump(pid: ProcId, pty: bool, mut out: mpsc::Receiver<CommandOut>, headers: &HeaderMap) -> Response {
    let (tx, rx) = mpsc::channel(16);
    let (limit, ping) = (deadline(headers), keepalive(headers));
    // A command's first moments are work someone waits for (a sandbox's
    // first command, say): pool refills stop until it ends, briefly.
    let mut foreground = Some(strata_engine::background::foreground());
    let foreground_until = tokio::time::Instant::now() + strata_engine::background::MAX_STOP;
    tokio::spawn(async move {
        let send = |v: Value| tx.send(envelope(0, &v));
        if send(event(json!({ "start": { "pid": pid } }))).await.is_err() {
            return;
        }
        let until = limit.map(|d| tokio::time::Instant::now() + d);
        loop {
            let next = tokio::select! {
                _ = tokio::time::sleep_until(foreground_until), if foreground.is_some() => {
                    foreground = None;
                    continue;
                }
                o = out.recv() => o,
                _ = tokio::time::sleep(ping) => {
                    if send(event(json!({ "keepalive": {} }))).await.is_err() { return; }
                    continue;
                }
                _ = async { match until { Some(u) => tokio::time::sleep_until(u).await, None => std::future::pending().await } } => {
                    let e = RpcError("deadline_exceeded", format!("command {pid} outlasted the request's time-out"));
                    let _ = tx.send(envelope(0x02, &json!({ "error": e.body() }))).await;
                    return;
                }
            };
            let msg = match next {
                Some(CommandOut::Stdout(d)) if pty => event(json!({ "data": { "pty": b64(&d) } })),
                Some(CommandOut::Stdout(d)) => event(json!({ "data": { "stdout": b64(&d) } })),
                Some(CommandOut::Stderr(d)) => event(json!({ "data": { "stderr": b64(&d) } })),
                Some(CommandOut::Exit(code)) => {
                    let end = json!({ "exitCode": code, "exited": true, "status": format!("exit status {code}") });
                    let _ = send(event(json!({ "end": end }))).await;
                    let _ = tx.send(envelope(0x02, &json!({}))).await;
                    return;
                }
                None => {
                    let e = RpcError(
                        "unavailable",
                        format!(
                            "command {pid} is no longer watched here (the sandbox ended or another client connected)"
                        ),
                    );
                    let _ = tx.send(envelope(0x02, &json!({ "error": e.body() }))).await;
                    return;
                }
            };
            if send(msg).await.is_err() {
                return;
            }
        }
    });
    stream_response(rx)
}

/// `process.Process/Start`: a command with pipes, or on a PTY.
async fn start(State(st): St, headers: HeaderMap, body: Bytes) -> Response {
    match start_command(&st, &headers, &body).await {
        Ok((pid, pty, out)) => pump(pid, pty, out, &headers),
        Err(e) => stream_error(e),
    }
}

async fn start_command(
    st: &AppState,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(ProcId, bool, mpsc::Receiver<CommandOut>), RpcError> {
    let req: StartRequest = stream_request(body)?;
    let live = sandbox(st, headers)?;
    let pty = req.pty.as_ref().map(pty_size).transpose()?;
    let p = req.process.ok_or_else(|| invalid("process is missing"))?;
    if p.cmd.is_empty() {
        return Err(invalid("process.cmd is empty"));
    }
    let mut env = super::env_of(&live);
    env.extend(p.envs);
    for (k, v) in &env {
        strata_engine::context::check_env(k, v).map_err(invalid)?;
    }
    let mut argv = vec![p.cmd];
    argv.extend(p.args);
    if argv.iter().any(|a| a.contains('\0')) {
        return Err(invalid("a command's arguments must not contain NUL"));
    }
    let command = GuestCommand {
        argv,
        env: env.into_iter().collect(),
        cwd: p.cwd.filter(|c| !c.is_empty()),
        user: user(headers)?,
    };
    let (out_tx, out_rx) = mpsc::channel(16);
    let stdin = req.stdin.unwrap_or(false);
    let pid = ask(&live, |reply| Cmd::Exec { command, tag: req.tag, stdin, pty, out: out_tx, reply }).await?;
    Ok((pid, pty.is_some(), out_rx))
}

/// The command a selector names.
async fn selected(live: &Live, sel: Option<Selector>) -> Result<ProcId, RpcError> {
    let sel = sel.unwrap_or_default();
    if let Some(pid) = sel.pid {
        return Ok(pid);
    }
    let tag = sel.tag.ok_or_else(|| invalid("process selector names neither pid nor tag"))?;
    let all = crate::live::list_commands(live).await.map_err(|e| RpcError("unavailable", e))?;
    all.iter()
        .find(|c| c.tag.as_deref() == Some(tag.as_str()))
        .map(|c| c.id)
        .ok_or_else(|| RpcError("not_found", format!("no running command tagged {tag:?}")))
}

#[derive(Deserialize)]
struct ProcessRequest {
    process: Option<Selector>,
}

/// `process.Process/Connect`: a running command's output from now on.
async fn connect(State(st): St, headers: HeaderMap, body: Bytes) -> Response {
    let r = async {
        let req: ProcessRequest = stream_request(&body)?;
        let live = sandbox(&st, &headers)?;
        let pid = selected(&live, req.process).await?;
        let (out_tx, out_rx) = mpsc::channel(16);
        let pty = ask(&live, |reply| Cmd::Watch { id: pid, out: out_tx, reply })
            .await
            .map_err(|e| RpcError("not_found", e.1))?;
        Ok::<_, RpcError>((pid, pty, out_rx))
    };
    match r.await {
        Ok((pid, pty, out)) => pump(pid, pty, out, &headers),
        Err(e) => stream_error(e),
    }
}

async fn list(State(st): St, headers: HeaderMap, body: Bytes) -> Result<Response, RpcError> {
    let _: Value = unary(&headers, &body)?;
    let live = sandbox(&st, &headers)?;
    let all = crate::live::list_commands(&live).await.map_err(|e| RpcError("unavailable", e))?;
    let processes: Vec<Value> = all
        .iter()
        .map(|c| {
            let (cmd, args) = c.command.argv.split_first().map(|(c, a)| (c.clone(), a.to_vec())).unwrap_or_default();
            let envs: BTreeMap<_, _> = c.command.env.iter().cloned().collect();
            let mut config = json!({ "cmd": cmd, "args": args, "envs": envs });
            if let Some(cwd) = &c.command.cwd {
                config["cwd"] = json!(cwd);
            }
            let mut p = json!({ "config": config, "pid": c.id });
            if let Some(tag) = &c.tag {
                p["tag"] = json!(tag);
            }
            p
        })
        .collect();
    Ok(json_response(json!({ "processes": processes })))
}

#[derive(Deserialize)]
struct SendInputRequest {
    process: Option<Selector>,
    input: Option<InputBody>,
}

#[derive(Deserialize)]
struct InputBody {
    stdin: Option<String>,
    pty: Option<String>,
}

async fn send_input(State(st): St, headers: HeaderMap, body: Bytes) -> Result<Response, RpcError> {
    let req: SendInputRequest = unary(&headers, &body)?;
    let live = sandbox(&st, &headers)?;
    let pid = selected(&live, req.process).await?;
    let input = req.input.ok_or_else(|| invalid("input is missing"))?;
    let data = unb64(input.stdin.as_deref().or(input.pty.as_deref()).unwrap_or(""))?;
    ask(&live, |reply| Cmd::CommandInput { id: pid, data: Some(data), reply }).await?;
    Ok(json_response(json!({})))
}

async fn close_stdin(State(st): St, headers: HeaderMap, body: Bytes) -> Result<Response, RpcError> {
    let req: ProcessRequest = unary(&headers, &body)?;
    let live = sandbox(&st, &headers)?;
    let pid = selected(&live, req.process).await?;
    ask(&live, |reply| Cmd::CommandInput { id: pid, data: None, reply }).await?;
    Ok(json_response(json!({})))
}

#[derive(Deserialize)]
struct SignalRequest {
    process: Option<Selector>,
    signal: Option<Value>,
}

/// E2B's signals, by name or number: SIGTERM and SIGKILL.
fn signal_number(v: Option<&Value>) -> Result<i32, RpcError> {
    let number = match v {
        Some(Value::String(s)) if s == "SIGNAL_SIGKILL" => Some(9),
        Some(Value::String(s)) if s == "SIGNAL_SIGTERM" => Some(15),
        Some(Value::Number(n)) => n.as_i64().filter(|n| [9, 15].contains(n)).map(|n| n as i32),
        _ => None,
    };
    number.ok_or_else(|| invalid(format!("signal {v:?} is not SIGNAL_SIGKILL or SIGNAL_SIGTERM")))
}

async fn send_signal(State(st): St, headers: HeaderMap, body: Bytes) -> Result<Response, RpcError> {
    let req: SignalRequest = unary(&headers, &body)?;
    let live = sandbox(&st, &headers)?;
    let pid = selected(&live, req.process).await?;
    let signal = signal_number(req.signal.as_ref())?;
    ask(&live, |reply| Cmd::Signal { id: pid, signal, reply }).await.map_err(|e| RpcError("not_found", e.1))?;
    Ok(json_response(json!({})))
}

/// The envelopes of a client stream, each read as it arrives.
struct Envelopes {
    body: axum::body::BodyDataStream,
    pending: Vec<u8>,
}

impl Envelopes {
    /// The next message (its flags and bytes), or `None` at the body's end.
    async fn next(&mut self) -> Result<Option<(u8, Vec<u8>)>, RpcError> {
        use futures_util::StreamExt;
        loop {
            if self.pending.len() >= 5 {
                let len =
                    u32::from_be_bytes([self.pending[1], self.pending[2], self.pending[3], self.pending[4]]) as usize;
                if len > MAX_MESSAGE {
                    return Err(RpcError(
                        "resource_exhausted",
                        format!("a message of {len} bytes is over {MAX_MESSAGE}"),
                    ));
                }
                if self.pending.len() >= 5 + len {
                    let flags = self.pending[0];
                    if flags & 0x01 != 0 {
                        return Err(RpcError("unimplemented", "compressed messages are not served".into()));
                    }
                    let msg = self.pending[5..5 + len].to_vec();
                    self.pending.drain(..5 + len);
                    return Ok(Some((flags, msg)));
                }
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.pending.extend_from_slice(&chunk),
                Some(Err(e)) => return Err(RpcError("aborted", format!("the input stream broke off: {e}"))),
                None if self.pending.is_empty() => return Ok(None),
                None => return Err(invalid("the input stream ended inside a message")),
            }
        }
    }
}

#[derive(Deserialize)]
struct StreamInputRequest {
    start: Option<StartEvent>,
    data: Option<DataEvent>,
}

#[derive(Deserialize)]
struct StartEvent {
    process: Option<Selector>,
}

#[derive(Deserialize)]
struct DataEvent {
    input: Option<InputBody>,
}

/// A client stream of input for one command: a `start` naming it, then
/// `data` (and `keepalive`) messages, each passed on as it arrives; the
/// command's input stays open when the stream ends (`CloseStdin` ends it).
async fn stream_input(State(st): St, headers: HeaderMap, body: axum::body::Body) -> Response {
    let live = match sandbox(&st, &headers) {
        Ok(live) => live,
        Err(e) => return stream_error(e),
    };
    let mut messages = Envelopes { body: body.into_data_stream(), pending: Vec::new() };
    let fed = async {
        let mut pid = None;
        while let Some((flags, msg)) = messages.next().await? {
            if flags & 0x02 != 0 {
                break;
            }
            let req: StreamInputRequest = serde_json::from_slice(&msg)
                .map_err(|e| invalid(format!("the message is not a StreamInputRequest: {e}")))?;
            if let Some(start) = req.start {
                pid = Some(selected(&live, start.process).await?);
            }
            if let Some(data) = req.data {
                let id = pid.ok_or_else(|| invalid("the stream's first message must be start, naming the process"))?;
                let input = data.input.ok_or_else(|| invalid("input is missing"))?;
                let bytes = unb64(input.stdin.as_deref().or(input.pty.as_deref()).unwrap_or(""))?;
                ask(&live, |reply| Cmd::CommandInput { id, data: Some(bytes), reply }).await?;
            }
        }
        Ok::<_, RpcError>(())
    };
    match fed.await {
        Ok(()) => {
            let (tx, rx) = mpsc::channel(2);
            let _ = tx.try_send(envelope(0, &json!({})));
            let _ = tx.try_send(envelope(0x02, &json!({})));
            stream_response(rx)
        }
        Err(e) => stream_error(e),
    }
}

#[derive(Deserialize)]
struct UpdateRequest {
    process: Option<Selector>,
    pty: Option<PtyBody>,
}

/// `process.Process/Update`: a new size for a command's PTY.
async fn update(State(st): St, headers: HeaderMap, body: Bytes) -> Result<Response, RpcError> {
    let req: UpdateRequest = unary(&headers, &body)?;
    let live = sandbox(&st, &headers)?;
    let pid = selected(&live, req.process).await?;
    let size = pty_size(&req.pty.ok_or_else(|| invalid("pty is missing"))?)?;
    ask(&live, |reply| Cmd::CommandResize { id: pid, size, reply }).await?;
    Ok(json_response(json!({})))
}

/// What a command run to its end gave.
pub(crate) struct Finished {
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

/// A command run to its end, its input fed as it comes.
struct Feeding {
    id: ProcId,
    out: mpsc::Receiver<CommandOut>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    status: Option<i32>,
}

impl Feeding {
    /// Starts `argv` in the sandbox (as `user`), its input open if `stdin`.
    async fn start(live: &Live, argv: &[&str], user: Option<String>, stdin: bool) -> Result<Feeding, RpcError> {
        let command =
            GuestCommand { argv: argv.iter().map(|a| a.to_string()).collect(), env: Vec::new(), cwd: None, user };
        let (out_tx, out) = mpsc::channel(16);
        let id = ask(live, |reply| Cmd::Exec { command, tag: None, stdin, pty: None, out: out_tx, reply }).await?;
        Ok(Feeding { id, out, stdout: Vec::new(), stderr: Vec::new(), status: None })
    }

    fn take(&mut self, o: CommandOut) {
        match o {
            CommandOut::Stdout(d) => self.stdout.extend_from_slice(&d),
            CommandOut::Stderr(d) if self.stderr.len() < 64 << 10 => self.stderr.extend_from_slice(&d),
            CommandOut::Stderr(_) => {}
            CommandOut::Exit(status) => self.status = Some(status),
        }
    }

    /// Takes what it said so far, without waiting: a command that speaks
    /// while it is fed never holds its session's actor up.
    fn drain(&mut self) {
        while let Ok(o) = self.out.try_recv() {
            self.take(o);
        }
    }

    /// More input (none once it has exited).
    async fn feed(&mut self, live: &Live, data: Vec<u8>) -> Result<(), RpcError> {
        self.drain();
        if self.status.is_some() {
            return Ok(());
        }
        let id = self.id;
        let fed = ask(live, |reply| Cmd::CommandInput { id, data: Some(data), reply }).await;
        self.drain();
        match fed {
            Err(_) if self.status.is_some() => Ok(()),
            other => other,
        }
    }

    /// Ends its input (if open) and waits for its end; its output is
    /// bounded by [`MAX_FILE`].
    async fn finish(mut self, live: &Live, stdin: bool) -> Result<Finished, RpcError> {
        let id = self.id;
        self.drain();
        if stdin && self.status.is_none() {
            let ended = ask(live, |reply| Cmd::CommandInput { id, data: None, reply }).await;
            self.drain();
            if self.status.is_none() {
                ended?;
            }
        }
        while self.status.is_none() {
            let Some(o) = self.out.recv().await else {
                return Err(RpcError("unavailable", "the sandbox ended while the command ran".into()));
            };
            self.take(o);
            if self.stdout.len() > MAX_FILE {
                let _ = ask(live, |reply| Cmd::Signal { id, signal: 9, reply }).await;
                return Err(RpcError("resource_exhausted", format!("more than {MAX_FILE} bytes")));
            }
        }
        let stderr = String::from_utf8_lossy(&self.stderr).trim().to_string();
        Ok(Finished { status: self.status.unwrap_or(-1), stdout: self.stdout, stderr })
    }
}

/// Runs `argv` in the sandbox (as `user`), reading nothing, to its end;
/// its output is bounded by [`MAX_FILE`].
pub(crate) async fn run(live: &Live, argv: &[&str], user: Option<String>) -> Result<Finished, RpcError> {
    Feeding::start(live, argv, user, false).await?.finish(live, false).await
}

/// The error a file command's failure stands for.
fn file_error(path: &str, f: &Finished) -> RpcError {
    let m =
        format!("{path}: {}", if f.stderr.is_empty() { format!("exit status {}", f.status) } else { f.stderr.clone() });
    if m.contains("No such file") || m.contains("not found") {
        RpcError("not_found", m)
    } else if m.contains("Permission denied") {
        RpcError("permission_denied", m)
    } else if m.contains("Is a directory") || m.contains("Not a directory") {
        RpcError("invalid_argument", m)
    } else if m.contains("File exists") {
        RpcError("already_exists", m)
    } else if m.contains("No space left") {
        RpcError("resource_exhausted", m)
    } else {
        RpcError("internal", m)
    }
}

fn check_path(path: &str) -> Result<(), RpcError> {
    if path.is_empty() || path.contains('\0') || path.len() > 4096 {
        return Err(invalid(format!("path {path:?} is empty, too long or holds NUL")));
    }
    Ok(())
}

#[derive(Deserialize)]
pub(crate) struct FileQuery {
    path: Option<String>,
    username: Option<String>,
    signature: Option<String>,
    signature_expiration: Option<u64>,
}

/// E2B's signature of a file URL: `v1_` and the unpadded base64 of
/// sha256(`path:operation:user:token[:expiration]`).
fn file_signature(path: &str, operation: &str, user: &str, token: &str, expiration: Option<u64>) -> String {
    let raw = match expiration {
        Some(e) => format!("{path}:{operation}:{user}:{token}:{e}"),
        None => format!("{path}:{operation}:{user}:{token}"),
    };
    let digest = sha2::Sha256::digest(raw.as_bytes());
    format!("v1_{}", base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest))
}

/// The sandbox of a `/files` request: by its headers, or for a signed URL
/// (which carries none: the SDK's upload and download URLs) the one whose
/// token signs it, before its expiry.
fn file_sandbox(st: &AppState, headers: &HeaderMap, q: &FileQuery, operation: &str) -> Result<Arc<Live>, RpcError> {
    let Some(signature) = q.signature.as_deref().filter(|_| !headers.contains_key("e2b-sandbox-id")) else {
        return sandbox(st, headers);
    };
    if let Some(e) = q.signature_expiration {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        if e < now {
            return Err(RpcError("unauthenticated", "this file URL has expired".into()));
        }
    }
    let path = q.path.as_deref().unwrap_or("");
    let user = q.username.as_deref().unwrap_or("");
    st.sessions
        .all()
        .into_iter()
        .find(|live| {
            let want = file_signature(path, operation, user, &access_token(live), q.signature_expiration);
            subtle::ConstantTimeEq::ct_eq(want.as_bytes(), signature.as_bytes()).into()
        })
        .ok_or_else(|| RpcError("unauthenticated", "this file URL's signature matches no sandbox".into()))
}

#[derive(Deserialize)]
pub(crate) struct HolderQuery {
    /// `read` or `write`, as the signed URL was made for.
    operation: String,
}

/// `GET /files/holder?path=&username=&signature=&signature_expiration=&operation=`
/// (a control plane only: the cluster's secret): 204 if a sandbox here
/// signs this file URL, else 404. A signed URL names no sandbox; this is
/// how a plane finds the server to send it to.
pub(crate) async fn file_holder(
    State(st): St,
    headers: HeaderMap,
    Query(q): Query<FileQuery>,
    Query(op): Query<HolderQuery>,
) -> StatusCode {
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim);
    if !st.cluster.as_ref().is_some_and(|l| token.is_some_and(|t| l.is_secret(t))) {
        return StatusCode::UNAUTHORIZED;
    }
    if q.signature.is_none() || !["read", "write"].contains(&op.operation.as_str()) {
        return StatusCode::BAD_REQUEST;
    }
    match file_sandbox(&st, &HeaderMap::new(), &q, &op.operation) {
        Ok(_) => StatusCode::NO_CONTENT,
        Err(_) => StatusCode::NOT_FOUND,
    }
}

impl FileQuery {
    fn user(&self, headers: &HeaderMap) -> Result<Option<String>, RpcError> {
        match self.username.as_deref().filter(|u| !u.is_empty()) {
            Some(u) => check_user(u).map(|()| Some(u.to_string())),
            None => user(headers),
        }
    }
}

/// `GET /files?path=`: a file's bytes.
pub(crate) async fn read_file(
    State(st): St,
    headers: HeaderMap,
    Query(q): Query<FileQuery>,
) -> Result<Response, RpcError> {
    let live = file_sandbox(&st, &headers, &q, "read")?;
    let path = q.path.clone().ok_or_else(|| invalid("path is missing"))?;
    check_path(&path)?;
    let f = run(&live, &["cat", "--", &path], q.user(&headers)?).await?;
    if f.status != 0 {
        return Err(file_error(&path, &f));
    }
    Ok(([(axum::http::header::CONTENT_TYPE, "application/octet-stream")], f.stdout).into_response())
}

/// Where an upload's bytes come from, as they arrive.
enum Upload<'a> {
    Body(axum::body::BodyDataStream),
    Part(Box<axum::extract::multipart::Field<'a>>),
}

impl Upload<'_> {
    async fn next(&mut self) -> Result<Option<Bytes>, RpcError> {
        let cut = |e: String| invalid(format!("the upload is cut: {e}"));
        match self {
            Upload::Body(b) => futures_util::StreamExt::next(b).await.transpose().map_err(|e| cut(e.to_string())),
            Upload::Part(f) => f.chunk().await.map_err(|e| cut(e.to_string())),
        }
    }
}

/// Writes what `data` brings to `path` (its directories made) as `user`,
/// streamed into the guest as it arrives: bounded by the guest's disk,
/// not by the server's memory. What E2B answers for a written file.
async fn write_one(live: &Live, path: &str, mut data: Upload<'_>, user: Option<String>) -> Result<Value, RpcError> {
    check_path(path)?;
    const WRITE: &str = "mkdir -p -- \"$(dirname -- \"$1\")\" && cat > \"$1\" && readlink -f -- \"$1\"";
    let mut f = Feeding::start(live, &["sh", "-c", WRITE, "sh", path], user, true).await?;
    while let Some(chunk) = data.next().await? {
        for piece in chunk.chunks(64 << 10) {
            f.feed(live, piece.to_vec()).await?;
        }
    }
    let f = f.finish(live, true).await?;
    if f.status != 0 {
        return Err(file_error(path, &f));
    }
    let full = String::from_utf8_lossy(&f.stdout).trim().to_string();
    let name = full.rsplit('/').next().unwrap_or("").to_string();
    Ok(json!({ "name": name, "type": "file", "path": full }))
}

/// `POST /files?path=`: one file as the body (octet stream), or files as
/// multipart parts (each named by `path`, or by its file name).
pub(crate) async fn write_file(
    State(st): St,
    headers: HeaderMap,
    Query(q): Query<FileQuery>,
    request: axum::extract::Request,
) -> Result<Response, RpcError> {
    let live = file_sandbox(&st, &headers, &q, "write")?;
    let user = q.user(&headers)?;
    let ct = headers.get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    if headers.get(axum::http::header::CONTENT_ENCODING).is_some() {
        return Err(RpcError("unimplemented", "compressed uploads are not served; send the file uncompressed".into()));
    }
    let mut written = Vec::new();
    if ct.starts_with("multipart/form-data") {
        let mut form = <axum::extract::Multipart as axum::extract::FromRequest<()>>::from_request(request, &())
            .await
            .map_err(|e| invalid(format!("the upload is not multipart form data: {e}")))?;
        let mut parts = 0;
        while let Some(field) = form.next_field().await.map_err(|e| invalid(format!("the upload is cut: {e}")))? {
            parts += 1;
            let path = match (&q.path, field.file_name()) {
                (Some(p), _) if parts == 1 => p.clone(),
                (_, Some(n)) => n.to_string(),
                _ => return Err(invalid("an uploaded part names no path")),
            };
            written.push(write_one(&live, &path, Upload::Part(Box::new(field)), user.clone()).await?);
        }
    } else {
        let path = q.path.clone().ok_or_else(|| invalid("path is missing"))?;
        let body = Upload::Body(request.into_body().into_data_stream());
        written.push(write_one(&live, &path, body, user).await?);
    }
    Ok(json_response(Value::Array(written)))
}

#[derive(Deserialize)]
struct PathRequest {
    path: Option<String>,
    depth: Option<u32>,
}

/// What `find -printf` gives for each entry: type, size, mode, owner,
/// group, modification time, path, link target.
const ENTRY_FORMAT: &str = "%y\\t%s\\t%m\\t%u\\t%g\\t%T@\\t%p\\t%l\\n";

fn entry(line: &str) -> Option<Value> {
    let f: Vec<&str> = line.split('\t').collect();
    let [kind, size, mode, owner, group, mtime, path, target] = f.as_slice() else { return None };
    let kind = match *kind {
        "d" => "FILE_TYPE_DIRECTORY",
        _ => "FILE_TYPE_FILE",
    };
    let mode = u32::from_str_radix(mode, 8).ok()?;
    let secs = mtime.split('.').next()?.parse::<u64>().ok()?;
    let modified = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(secs)).to_string();
    let mut e = json!({
        "name": path.rsplit('/').next().unwrap_or(path),
        "type": kind,
        "path": path,
        "size": size,
        "mode": mode,
        "permissions": permissions(mode, kind == "FILE_TYPE_DIRECTORY"),
        "owner": owner,
        "group": group,
        "modifiedTime": modified,
    });
    if !target.is_empty() {
        e["symlinkTarget"] = json!(target);
    }
    Some(e)
}

fn permissions(mode: u32, dir: bool) -> String {
    let mut s = String::from(if dir { "d" } else { "-" });
    for shift in [6, 3, 0] {
        let m = (mode >> shift) & 7;
        s.push(if m & 4 != 0 { 'r' } else { '-' });
        s.push(if m & 2 != 0 { 'w' } else { '-' });
        s.push(if m & 1 != 0 { 'x' } else { '-' });
    }
    s
}

/// Entries under `path` (itself at depth 0), as `user`.
async fn entries(live: &Live, path: &str, depth: (u32, u32), user: Option<String>) -> Result<Vec<Value>, RpcError> {
    check_path(path)?;
    let (min, max) = (depth.0.to_string(), depth.1.to_string());
    let argv = ["find", path, "-mindepth", &min, "-maxdepth", &max, "-printf", ENTRY_FORMAT];
    let f = run(live, &argv, user).await?;
    if f.status != 0 {
        return Err(file_error(path, &f));
    }
    Ok(String::from_utf8_lossy(&f.stdout).lines().filter_map(entry).collect())
}

async fn stat(State(st): St, headers: HeaderMap, body: Bytes) -> Result<Response, RpcError> {
    let req: PathRequest = unary(&headers, &body)?;
    let live = sandbox(&st, &headers)?;
    let path = req.path.ok_or_else(|| invalid("path is missing"))?;
    let e = entries(&live, &path, (0, 0), user(&headers)?).await?;
    let e = e.into_iter().next().ok_or_else(|| RpcError("not_found", format!("{path}: not found")))?;
    Ok(json_response(json!({ "entry": e })))
}

async fn list_dir(State(st): St, headers: HeaderMap, body: Bytes) -> Result<Response, RpcError> {
    let req: PathRequest = unary(&headers, &body)?;
    let live = sandbox(&st, &headers)?;
    let path = req.path.ok_or_else(|| invalid("path is missing"))?;
    let depth = req.depth.unwrap_or(1).clamp(1, 64);
    let e = entries(&live, &path, (1, depth), user(&headers)?).await?;
    Ok(json_response(json!({ "entries": e })))
}

async fn make_dir(State(st): St, headers: HeaderMap, body: Bytes) -> Result<Response, RpcError> {
    let req: PathRequest = unary(&headers, &body)?;
    let live = sandbox(&st, &headers)?;
    let path = req.path.ok_or_else(|| invalid("path is missing"))?;
    check_path(&path)?;
    let user = user(&headers)?;
    // E2B answers "already exists" for a directory that is there.
    const MAKE: &str = "if [ -e \"$1\" ]; then echo \"$1: File exists\" >&2; exit 1; fi; mkdir -p -- \"$1\"";
    let f = run(&live, &["sh", "-c", MAKE, "sh", &path], user.clone()).await?;
    if f.status != 0 {
        return Err(file_error(&path, &f));
    }
    let e = entries(&live, &path, (0, 0), user).await?;
    Ok(json_response(json!({ "entry": e.into_iter().next() })))
}

async fn remove(State(st): St, headers: HeaderMap, body: Bytes) -> Result<Response, RpcError> {
    let req: PathRequest = unary(&headers, &body)?;
    let live = sandbox(&st, &headers)?;
    let path = req.path.ok_or_else(|| invalid("path is missing"))?;
    check_path(&path)?;
    let f = run(&live, &["rm", "-rf", "--", &path], user(&headers)?).await?;
    if f.status != 0 {
        return Err(file_error(&path, &f));
    }
    Ok(json_response(json!({})))
}

#[derive(Deserialize)]
struct MoveRequest {
    source: Option<String>,
    destination: Option<String>,
}

async fn move_entry(State(st): St, headers: HeaderMap, body: Bytes) -> Result<Response, RpcError> {
    let req: MoveRequest = unary(&headers, &body)?;
    let live = sandbox(&st, &headers)?;
    let (from, to) = (req.source.unwrap_or_default(), req.destination.unwrap_or_default());
    check_path(&from)?;
    check_path(&to)?;
    let user = user(&headers)?;
    let f = run(&live, &["mv", "--", &from, &to], user.clone()).await?;
    if f.status != 0 {
        return Err(file_error(&from, &f));
    }
    let e = entries(&live, &to, (0, 0), user).await?;
    Ok(json_response(json!({ "entry": e.into_iter().next() })))
}

/// A watched folder: its sandbox, and what was in it at the last look
/// (path -> type, size, mode and modification time).
struct Watcher {
    sandbox: String,
    path: String,
    recursive: bool,
    seen: BTreeMap<String, String>,
}

/// The folders being watched, by watcher id. Watching polls: each
/// `GetWatcherEvents` lists the folder in the guest and compares (an entry
/// made and removed between two looks is not seen).
#[derive(Default)]
pub struct Watchers(std::sync::Mutex<BTreeMap<String, Watcher>>);

impl Watchers {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Watcher>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Watchers one server keeps at most.
const MAX_WATCHERS: usize = 1024;

/// What is under `path` (one level, or every level with `recursive`).
async fn listing(
    live: &Live,
    path: &str,
    recursive: bool,
    user: Option<String>,
) -> Result<BTreeMap<String, String>, RpcError> {
    check_path(path)?;
    let depth = if recursive { "64" } else { "1" };
    let argv = ["find", path, "-mindepth", "1", "-maxdepth", depth, "-printf", "%P\\t%y %s %m %T@\\n"];
    let f = run(live, &argv, user).await?;
    if f.status != 0 {
        return Err(file_error(path, &f));
    }
    Ok(String::from_utf8_lossy(&f.stdout)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(p, sig)| (p.to_string(), sig.to_string()))
        .collect())
}

/// E2B's events between two listings: made, removed, written (size or
/// time changed) or changed mode.
fn changes(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> Vec<Value> {
    let mut events = Vec::new();
    for (name, sig) in after {
        let kind = match before.get(name) {
            None => "EVENT_TYPE_CREATE",
            Some(old) if old == sig => continue,
            Some(old) => {
                // "TYPE SIZE MODE TIME": only the mode changed, or more.
                let (o, n): (Vec<&str>, Vec<&str>) = (old.split(' ').collect(), sig.split(' ').collect());
                let only_mode = o.len() == 4 && n.len() == 4 && (o[0], o[1], o[3]) == (n[0], n[1], n[3]);
                if only_mode {
                    "EVENT_TYPE_CHMOD"
                } else {
                    "EVENT_TYPE_WRITE"
                }
            }
        };
        events.push(json!({ "name": name, "type": kind }));
    }
    for name in before.keys().filter(|n| !after.contains_key(*n)) {
        events.push(json!({ "name": name, "type": "EVENT_TYPE_REMOVE" }));
    }
    events
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateWatcherRequest {
    path: Option<String>,
    #[serde(default)]
    recursive: bool,
}

async fn create_watcher(State(st): St, headers: HeaderMap, body: Bytes) -> Result<Response, RpcError> {
    let req: CreateWatcherRequest = unary(&headers, &body)?;
    let live = sandbox(&st, &headers)?;
    let path = req.path.ok_or_else(|| invalid("path is missing"))?;
    let seen = listing(&live, &path, req.recursive, user(&headers)?).await?;
    let id = crate::auth::new_token().map_err(|e| RpcError("internal", e.to_string()))?[..16].to_string();
    let mut all = st.e2b_watchers.lock();
    // Watchers of sandboxes that ended go first.
    all.retain(|_, w| st.sessions.get(&w.sandbox).is_some());
    if all.len() >= MAX_WATCHERS {
        return Err(RpcError("resource_exhausted", format!("this server watches {MAX_WATCHERS} folders already")));
    }
    all.insert(id.clone(), Watcher { sandbox: live.id.clone(), path, recursive: req.recursive, seen });
    Ok(json_response(json!({ "watcherId": id })))
}

/// How often a streamed watch looks at its folder.
const WATCH_POLL: Duration = Duration::from_millis(500);

/// `filesystem.Filesystem/WatchDir`: a folder's changes as a stream, seen
/// by comparing its listing every [`WATCH_POLL`] (as [`Watchers`] do),
/// until the client goes, the deadline passes or the sandbox ends.
async fn watch_dir(State(st): St, headers: HeaderMap, body: Bytes) -> Response {
    let first = async {
        let req: CreateWatcherRequest = stream_request(&body)?;
        let live = sandbox(&st, &headers)?;
        let path = req.path.ok_or_else(|| invalid("path is missing"))?;
        let user = user(&headers)?;
        let seen = listing(&live, &path, req.recursive, user.clone()).await?;
        Ok::<_, RpcError>((live, path, req.recursive, user, seen))
    };
    let (live, path, recursive, user, mut seen) = match first.await {
        Ok(x) => x,
        Err(e) => return stream_error(e),
    };
    let (tx, rx) = mpsc::channel(16);
    let (limit, ping) = (deadline(&headers), keepalive(&headers));
    tokio::spawn(async move {
        let end = |e: RpcError| envelope(0x02, &json!({ "error": e.body() }));
        if tx.send(envelope(0, &json!({ "start": {} }))).await.is_err() {
            return;
        }
        let until = limit.map(|d| tokio::time::Instant::now() + d);
        let mut last_sent = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(WATCH_POLL).await;
            if tx.is_closed() {
                return;
            }
            if until.is_some_and(|u| tokio::time::Instant::now() >= u) {
                let _ = tx
                    .send(end(RpcError("deadline_exceeded", "the watch outlasted the request's time-out".into())))
                    .await;
                return;
            }
            let now = match listing(&live, &path, recursive, user.clone()).await {
                Ok(now) => now,
                Err(e) => {
                    let _ = tx.send(end(e)).await;
                    return;
                }
            };
            for e in changes(&seen, &now) {
                if tx.send(envelope(0, &json!({ "filesystem": e }))).await.is_err() {
                    return;
                }
                last_sent = tokio::time::Instant::now();
            }
            seen = now;
            if last_sent.elapsed() >= ping {
                if tx.send(envelope(0, &json!({ "keepalive": {} }))).await.is_err() {
                    return;
                }
                last_sent = tokio::time::Instant::now();
            }
        }
    });
    stream_response(rx)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WatcherRequest {
    watcher_id: Option<String>,
}

async fn watcher_events(State(st): St, headers: HeaderMap, body: Bytes) -> Result<Response, RpcError> {
    let req: WatcherRequest = unary(&headers, &body)?;
    let live = sandbox(&st, &headers)?;
    let id = req.watcher_id.unwrap_or_default();
    let (path, recursive) = match st.e2b_watchers.lock().get(&id) {
        Some(w) if w.sandbox == live.id => (w.path.clone(), w.recursive),
        _ => return Err(RpcError("not_found", format!("no watcher {id:?} in this sandbox"))),
    };
    let now = listing(&live, &path, recursive, user(&headers)?).await?;
    let mut all = st.e2b_watchers.lock();
    let w = all.get_mut(&id).ok_or_else(|| RpcError("not_found", format!("watcher {id:?} was removed")))?;
    let events = changes(&w.seen, &now);
    w.seen = now;
    Ok(json_response(json!({ "events": events })))
}

async fn remove_watcher(State(st): St, headers: HeaderMap, body: Bytes) -> Result<Response, RpcError> {
    let req: WatcherRequest = unary(&headers, &body)?;
    let live = sandbox(&st, &headers)?;
    let id = req.watcher_id.unwrap_or_default();
    let mut all = st.e2b_watchers.lock();
    match all.get(&id) {
        Some(w) if w.sandbox == live.id => drop(all.remove(&id)),
        _ => return Err(RpcError("not_found", format!("no watcher {id:?} in this sandbox"))),
    }
    Ok(json_response(json!({})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_bad_ones_are_refused() {
        let e = envelope(0, &json!({ "process": { "cmd": "echo" } }));
        let req: StartRequest = stream_request(&e).unwrap();
        assert_eq!(req.process.unwrap().cmd, "echo");
        assert!(stream_request::<StartRequest>(&e[..4]).is_err());
        assert!(stream_request::<StartRequest>(&e[..e.len() - 1]).is_err());
        let mut compressed = e.to_vec();
        compressed[0] = 1;
        assert!(matches!(stream_request::<StartRequest>(&compressed), Err(RpcError("unimplemented", _))));
        assert_eq!(envelope(2, &json!({}))[..], [2, 0, 0, 0, 2, b'{', b'}']);
    }

    #[test]
    fn a_watchers_events_are_the_differences_between_two_looks() {
        let map =
            |v: &[(&str, &str)]| v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<BTreeMap<_, _>>();
        let before = map(&[("a", "f 1 644 10.0"), ("b", "f 2 644 10.0"), ("c", "f 3 644 10.0")]);
        let after =
            map(&[("a", "f 1 644 10.0"), ("b", "f 9 644 11.5"), ("c", "f 3 600 10.0"), ("d", "d 4096 755 12.0")]);
        let events = changes(&before, &after);
        let kinds: Vec<(String, String)> =
            events.iter().map(|e| (e["name"].as_str().unwrap().into(), e["type"].as_str().unwrap().into())).collect();
        assert_eq!(
            kinds,
            [("b", "EVENT_TYPE_WRITE"), ("c", "EVENT_TYPE_CHMOD"), ("d", "EVENT_TYPE_CREATE")]
                .map(|(a, b)| (a.to_string(), b.to_string()))
        );
        let gone = changes(&after, &map(&[]));
        assert_eq!(gone.len(), 4);
        assert!(gone.iter().all(|e| e["type"] == "EVENT_TYPE_REMOVE"));
    }

    #[test]
    fn file_url_signatures_are_e2bs() {
        // As E2B's SDK computes it (sandbox/signature.py), by hand:
        // sha256("/a:read::tok") in base64 without padding.
        let s = file_signature("/a", "read", "", "tok", None);
        assert!(s.starts_with("v1_") && !s.ends_with('='), "{s}");
        assert_eq!(s.len(), 3 + 43);
        assert_ne!(s, file_signature("/a", "write", "", "tok", None));
        assert_ne!(s, file_signature("/a", "read", "", "tok", Some(1)));
    }

    #[test]
    fn entries_signals_and_users_are_read_as_e2b_means_them() {
        let e = entry("d\t4096\t755\troot\troot\t1700000000.5\t/root/x\t").unwrap();
        assert_eq!(e["type"], "FILE_TYPE_DIRECTORY");
        assert_eq!(e["name"], "x");
        assert_eq!(e["permissions"], "drwxr-xr-x");
        assert_eq!(e["modifiedTime"], "2023-11-14T22:13:20Z");
        assert!(e.get("symlinkTarget").is_none());
        assert!(entry("garbage").is_none());
        assert_eq!(signal_number(Some(&json!("SIGNAL_SIGKILL"))).unwrap(), 9);
        assert_eq!(signal_number(Some(&json!(15))).unwrap(), 15);
        assert!(signal_number(Some(&json!(2))).is_err());
        assert!(check_user("root").is_ok());
        assert!(check_user("a b").is_err());
        let mut h = HeaderMap::new();
        h.insert(axum::http::header::AUTHORIZATION, format!("Basic {}", b64(b"user:")).parse().unwrap());
        assert_eq!(user(&h).unwrap().as_deref(), Some("user"));
    }
}
