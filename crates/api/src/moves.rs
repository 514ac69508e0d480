//! Live moves between the servers of a cluster (see the engine's moves.rs).
//! A control plane orders the session's server to move it to another one
//! (`POST /v1/sessions/{id}/move`); that server's actor for the session
//! drives the move, talking to the receiving server as the plane does (the
//! cluster's secret, the session's terminal):
//!
//! 1. `POST /v1/moves/{id}` with the session's record: the receiver starts a
//!    QEMU that waits for the guest;
//! 2. `POST /v1/moves/{id}/state`: the migration stream, relayed from the
//!    sending QEMU's socket as the request's body while the guest runs;
//! 3. `PUT /v1/moves/{id}/disk`: the guest's disk writes; the receiver puts
//!    them in place, starts the guest, takes the session as its own and
//!    records it in the cluster as running there;
//! 4. on any failure, `DELETE /v1/moves/{id}`: the receiver drops its QEMU,
//!    and the guest runs on where it was.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde::Deserialize;
use strata_engine::moves::Incoming;
use strata_engine::sessions::SessionRecord;
use strata_engine::{Engine, Session};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::ApiError;
use crate::routes::SessionInfo;
use crate::AppState;

/// How long one step of a move may take (the memory, under TCG).
const STEP_TIMEOUT: Duration = Duration::from_secs(300);
/// A receiving QEMU nobody sends a guest to within this is dropped.
const INCOMING_PATIENCE: Duration = Duration::from_secs(600);

/// Sessions this server is receiving, by id.
#[derive(Default)]
pub struct Receiving(Mutex<HashMap<String, Incoming>>);

impl Receiving {
    fn take(&self, id: &str) -> Option<Incoming> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(id)
    }

    fn put(&self, inc: Incoming) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(inc.id().to_string(), inc);
    }

    fn socket_of(&self, id: &str) -> Option<std::path::PathBuf> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).get(id).map(Incoming::socket)
    }
}

/// Where a session goes, and how to speak to that server.
#[derive(Clone)]
pub struct Destination {
    /// The receiving server's API, e.g. `http://10.0.0.2:7070`.
    pub address: String,
    /// The receiving server's id.
    pub server: String,
    secret: String,
    terminal: String,
    http: reqwest::Client,
}

impl Destination {
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.address))
            .bearer_auth(&self.secret)
            .header(crate::cluster::TERMINAL_HEADER, &self.terminal)
            .timeout(STEP_TIMEOUT)
    }

    /// Sends a request; an answer that is not a success is an error naming it.
    async fn send(&self, what: &str, req: reqwest::RequestBuilder) -> Result<(), String> {
        let resp = req.send().await.map_err(|e| format!("{what}: server {} did not answer: {e}", self.server))?;
        if resp.status().is_success() {
            return Ok(());
        }
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or(body);
        Err(format!("{what}: server {} answered {status}: {message}", self.server))
    }

    /// Tells the receiver to drop what it holds of the move.
    async fn call_off(&self, id: &str) {
        let req = self.request(reqwest::Method::DELETE, &format!("/v1/moves/{id}"));
        if let Err(e) = self.send("calling the move off", req).await {
            tracing::warn!(session = %id, error = %e, "the receiving server did not drop its part of a failed move");
        }
    }
}

/// Moves running session `s` to `to`: the guest runs on there under the
/// same id. On an error the guest runs on here, and `s` is still this
/// server's. On success, how long the guest was stopped: QEMU's downtime,
/// then until the receiver ran it.
pub async fn send(engine: &Engine, s: &mut Session, to: &Destination) -> Result<Duration, String> {
    let rec = engine.movable_record(&s.id).map_err(|e| e.to_string())?;
    let id = s.id.clone();
    let begin =
        to.request(reqwest::Method::POST, &format!("/v1/moves/{id}")).json(&serde_json::json!({ "record": rec }));
    to.send("preparing the receiving server", begin).await?;
    let moved = async {
        let (listener, socket) = engine.outgoing_socket(s).map_err(|e| e.to_string())?;
        // The stream goes out as the body of one request, as QEMU writes it.
        let relay = {
            let to = to.clone();
            let id = id.clone();
            tokio::spawn(async move {
                let (conn, _) = tokio::time::timeout(STEP_TIMEOUT, listener.accept())
                    .await
                    .map_err(|_| "QEMU did not start sending the guest".to_string())?
                    .map_err(|e| format!("accepting QEMU's migration: {e}"))?;
                let body = reqwest::Body::wrap_stream(chunks_of(conn));
                let req = to.request(reqwest::Method::POST, &format!("/v1/moves/{id}/state")).body(body);
                to.send("sending the guest's memory", req).await
            })
        };
        let sent = engine.send_session(s, &socket).await;
        let _ = std::fs::remove_file(&socket);
        let (overlay, downtime) = match sent {
            Ok(done) => done,
            Err(e) => {
                relay.abort();
                return Err(e.to_string());
            }
        };
        // The guest stays stopped until the receiver runs it.
        let stopped_at = std::time::Instant::now();
        let relayed = relay.await.map_err(|e| format!("the relay of the guest's memory failed: {e}")).and_then(|r| r);
        let placed = match relayed {
            Ok(()) => {
                let file =
                    tokio::fs::File::open(&overlay).await.map_err(|e| format!("reading the disk's writes: {e}"))?;
                let body = reqwest::Body::wrap_stream(chunks_of(file));
                let req = to.request(reqwest::Method::PUT, &format!("/v1/moves/{id}/disk")).body(body);
                to.send("sending the disk's writes", req).await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = placed {
            // The memory went, but the guest did not start there: it runs on here.
            if let Err(r) = engine.resume_after_failed_move(s).await {
                tracing::error!(session = %id, error = %r, "could not run the guest again after a failed move");
            }
            return Err(e);
        }
        Ok(downtime + stopped_at.elapsed())
    };
    let r = moved.await;
    if r.is_err() {
        to.call_off(&id).await;
    }
    r
}

/// The bytes of `r` as a stream of chunks (for a request's body).
fn chunks_of<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
    r: R,
) -> impl futures_util::Stream<Item = std::io::Result<Vec<u8>>> + Send + 'static {
    futures_util::stream::try_unfold(r, |mut r| async move {
        let mut buf = vec![0u8; 256 << 10];
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.truncate(n);
        Ok(Some((buf, r)))
    })
}

/// Only the cluster's own servers and planes (its secret) take part in moves.
fn check_cluster_caller(st: &AppState, headers: &HeaderMap) -> Result<String, ApiError> {
    let link = st.cluster.as_ref().ok_or_else(|| ApiError::bad_request("only a server in a cluster moves sessions"))?;
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .ok_or_else(ApiError::unauthorized)?;
    if !link.is_secret(token.trim()) {
        return Err(ApiError::unauthorized());
    }
    headers.get(crate::cluster::TERMINAL_HEADER).and_then(|h| h.to_str().ok()).map(str::to_string).ok_or_else(|| {
        ApiError::bad_request(format!("a move names its terminal in {}", crate::cluster::TERMINAL_HEADER))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveOrder {
    /// The receiving server's API address.
    to: String,
    /// The receiving server's id.
    server: String,
}

/// `POST /v1/sessions/{id}/move` (from a control plane): moves the session
/// to the server the plane chose; answers once it runs there.
pub async fn move_session(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    crate::routes::Body(order): crate::routes::Body<MoveOrder>,
) -> Result<Response, ApiError> {
    let terminal = check_cluster_caller(&st, &headers)?;
    let link = st.cluster.as_ref().expect("checked");
    let live = st
        .sessions
        .get(&id)
        .filter(|l| l.owner == terminal)
        .ok_or_else(|| ApiError::not_found(format!("no session {id}")))?;
    if order.server == link.server_id {
        return Err(ApiError::bad_request(format!("session {id} already runs on server {}", order.server)));
    }
    if !(order.to.starts_with("http://") || order.to.starts_with("https://")) {
        return Err(ApiError::bad_request("`to` must be the receiving server's http(s) address"));
    }
    let to = Destination {
        address: order.to.trim_end_matches('/').to_string(),
        server: order.server,
        secret: link.secret().to_string(),
        terminal,
        http: reqwest::Client::new(),
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    live.cmd
        .send(crate::live::Cmd::Move { to: Box::new(to.clone()), reply: tx })
        .await
        .map_err(|_| ApiError::not_found(format!("session {id} has ended")))?;
    let downtime = rx.await.map_err(|_| ApiError::not_found(format!("session {id} has ended")))?.map_err(|e| {
        ApiError::new(StatusCode::BAD_GATEWAY, "move_failed", format!("{e}; the session runs on where it was"))
    })?;
    Ok(Json(serde_json::json!({ "id": id, "server": to.server, "downtime_ms": downtime.as_millis() as u64 }))
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Begin {
    record: serde_json::Value,
}

/// `POST /v1/moves/{id}`: a QEMU for the session waits for its guest.
pub async fn begin(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    crate::routes::Body(b): crate::routes::Body<Begin>,
) -> Result<Response, ApiError> {
    let terminal = check_cluster_caller(&st, &headers)?;
    let rec: SessionRecord = serde_json::from_value(b.record)
        .map_err(|e| ApiError::bad_request(format!("the session record is malformed: {e}")))?;
    if rec.id != id || rec.labels.get("terminal") != Some(&terminal) {
        return Err(ApiError::bad_request("the record is not that session's, or not its terminal's"));
    }
    if st.sessions.get(&id).is_some() || st.receiving.socket_of(&id).is_some() {
        return Err(ApiError::new(StatusCode::CONFLICT, "conflict", format!("session {id} is here already")));
    }
    let inc = st.engine.receive_session(&rec).await?;
    st.receiving.put(inc);
    // One that nothing comes to is dropped.
    let st2 = st.clone();
    tokio::spawn(async move {
        tokio::time::sleep(INCOMING_PATIENCE).await;
        if let Some(inc) = st2.receiving.take(&id) {
            tracing::warn!(session = %id, "a move that never came is dropped");
            inc.abandon().await;
        }
    });
    Ok(StatusCode::CREATED.into_response())
}

/// `POST /v1/moves/{id}/state`: the migration stream, into the waiting QEMU.
pub async fn state(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    check_cluster_caller(&st, &headers)?;
    let socket = st.receiving.socket_of(&id).ok_or_else(|| ApiError::not_found(format!("no move of {id} here")))?;
    let mut qemu = tokio::net::UnixStream::connect(&socket)
        .await
        .map_err(|e| ApiError::internal(format!("the receiving QEMU does not listen: {e}")))?;
    let bytes = pump(body, &mut qemu, "the receiving QEMU").await?;
    let _ = qemu.shutdown().await;
    tracing::info!(session = %id, mib = bytes >> 20, "a moving session's memory arrived");
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `PUT /v1/moves/{id}/disk`: the guest's disk writes; the guest starts
/// here and the session is this server's.
pub async fn disk(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    check_cluster_caller(&st, &headers)?;
    let inc = st.receiving.take(&id).ok_or_else(|| ApiError::not_found(format!("no move of {id} here")))?;
    let scratch = match st.engine.store.work_dir("move") {
        Ok(d) => d,
        Err(e) => {
            inc.abandon().await;
            return Err(ApiError::internal(e.to_string()));
        }
    };
    let overlay = scratch.path().join("overlay.qcow2");
    if let Err(e) = receive_file(body, &overlay).await {
        inc.abandon().await;
        return Err(e);
    }
    let rec = inc.record().clone();
    let session = st.engine.finish_receive(inc, &overlay).await?;
    drop(scratch);
    let live = st
        .sessions
        .adopt_moved(&rec, session, &st.engine, Some(st.limits.idle_timeout))
        .ok_or_else(|| ApiError::internal("the moved session lacks its terminal or attach labels"))?;
    if let Some(link) = &st.cluster {
        if let Err(e) = crate::cluster::record_running(link, &live).await {
            tracing::warn!(session = %id, error = %e, "could not record the moved session in the cluster yet");
        }
    }
    Ok(Json(SessionInfo::from(&*live)).into_response())
}

/// `DELETE /v1/moves/{id}`: the move is called off; the waiting QEMU goes.
pub async fn call_off(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_cluster_caller(&st, &headers)?;
    match st.receiving.take(&id) {
        Some(inc) => {
            inc.abandon().await;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        None => Err(ApiError::not_found(format!("no move of {id} here"))),
    }
}

/// Writes a request's body to `path`.
async fn receive_file(body: axum::body::Body, path: &std::path::Path) -> Result<(), ApiError> {
    let mut f = tokio::fs::File::create(path).await.map_err(|e| ApiError::internal(e.to_string()))?;
    pump(body, &mut f, "the disk's writes").await?;
    f.sync_all().await.map_err(|e| ApiError::internal(e.to_string()))
}

/// Copies a request's body into `to` (`what`, for errors) as it comes; the
/// bytes copied.
async fn pump(
    body: axum::body::Body,
    to: &mut (impl tokio::io::AsyncWrite + Unpin),
    what: &str,
) -> Result<u64, ApiError> {
    let mut stream = body.into_data_stream();
    let mut bytes = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request(format!("the stream broke after {bytes} bytes: {e}")))?;
        to.write_all(&chunk)
            .await
            .map_err(|e| ApiError::internal(format!("{what} stopped taking bytes after {bytes}: {e}")))?;
        bytes += chunk.len() as u64;
    }
    Ok(bytes)
}
