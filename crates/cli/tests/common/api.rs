//! A real `strata serve` for the end-to-end tests, its REST API and its
//! WebSocket terminals.

use std::io::BufRead;
use std::process::{Child, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use super::*;

pub struct Server {
    pub child: Child,
    pub base: String,
    pub a: String,
    pub b: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM: the server (`--on-stop stop`, unless a test chose)
        // stops its sessions and removes their files.
        self.stop();
    }
}

extern "C" {
    #[link_name = "kill"]
    pub fn libc_kill(pid: i32, sig: i32) -> i32;
}

impl Server {
    /// Kills the server with SIGKILL, as a crash would: nothing of it runs.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the server with SIGTERM and waits for it.
    pub fn stop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe {
            libc_kill(self.child.id() as i32, 15);
        }
        let _ = self.child.wait();
    }
}

pub fn token(name: &str) -> String {
    let out = strata(&["token", "create", name]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).trim().to_string()
}

/// A server with two terminals' tokens (`tag` keeps tests' tokens apart).
pub fn serve(tag: &str) -> Server {
    serve_with(tag, &[])
}

pub fn serve_with(tag: &str, extra: &[&str]) -> Server {
    let (a, b) = (token(&format!("{tag}-a")), token(&format!("{tag}-b")));
    serve_as(a, b, extra)
}

/// A server for the terminals of tokens `a` and `b`, on a port of its own
/// and with at most 3 sessions per terminal; its sessions stop with it.
/// `extra` may say otherwise (`--listen`, `--max-sessions-per-terminal`,
/// `--on-stop`, `--pause-on-stop`).
pub fn serve_as(a: String, b: String, extra: &[&str]) -> Server {
    serve_with_env(a, b, extra, &[])
}

/// [`serve_as`], with these environment variables set for the server.
pub fn serve_with_env(a: String, b: String, extra: &[&str], vars: &[(&str, &str)]) -> Server {
    serve_by(env().strata.parent().unwrap(), a, b, extra, vars)
}

/// [`serve_with_env`], with the build whose binaries are in `bin_dir`.
pub fn serve_by(bin_dir: &Path, a: String, b: String, extra: &[&str], vars: &[(&str, &str)]) -> Server {
    let mut args = vec!["serve"];
    // Defaults, unless `extra` sets them.
    for (flag, value) in [("--listen", "127.0.0.1:0"), ("--max-sessions-per-terminal", "3"), ("--on-stop", "stop")] {
        if !extra.iter().any(|x| x.ends_with(&flag[2..])) {
            args.extend_from_slice(&[flag, value]);
        }
    }
    args.extend_from_slice(extra);
    let mut child = strata_of(bin_dir, &args)
        .envs(vars.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let base = line.trim().rsplit(' ').next().unwrap().to_string();
    assert!(base.starts_with("http://127.0.0.1:") || base.starts_with("https://127.0.0.1:"), "{line}");
    Server { child, base, a, b }
}

pub struct Api<'a> {
    pub http: reqwest::Client,
    pub s: &'a Server,
}

impl Api<'_> {
    pub async fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> (u16, Value) {
        let mut rq = self.http.request(method.parse().unwrap(), format!("{}{path}", self.s.base));
        if let Some(t) = token {
            rq = rq.bearer_auth(t);
        }
        if let Some(b) = body {
            rq = rq.json(&b);
        }
        let resp = rq.send().await.unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }
}

pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub async fn ws(s: &Server, id: &str, token: &str) -> Result<Ws, String> {
    let url = format!("{}/v1/sessions/{id}/attach?token={token}&rows=30&cols=100", s.base.replace("http", "ws"));
    tokio_tungstenite::connect_async(url).await.map(|(w, _)| w).map_err(|e| e.to_string())
}

/// Reads from the socket until `want` appears in the terminal bytes.
pub async fn read_until(w: &mut Ws, want: &str) -> String {
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !seen.contains(want) {
        let msg =
            tokio::time::timeout_at(deadline, w.next()).await.unwrap_or_else(|_| panic!("no {want:?} in {seen:?}"));
        match msg {
            Some(Ok(Message::Binary(b))) => seen.push_str(&String::from_utf8_lossy(&b)),
            Some(Ok(Message::Text(t))) => seen.push_str(&t),
            Some(Ok(_)) => {}
            other => panic!("socket ended ({other:?}) before {want:?}; saw {seen:?}"),
        }
    }
    seen
}

pub async fn type_line(w: &mut Ws, line: &str) {
    w.send(Message::Binary(line.as_bytes().to_vec().into())).await.unwrap();
}

/// QEMU processes of session `id`.
pub fn qemu_of(id: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|c| c.starts_with(b"qemu-system") && String::from_utf8_lossy(c).contains(&format!("sessions/{id}")))
        .count()
}
