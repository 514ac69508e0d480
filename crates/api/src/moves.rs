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
use std::sync::atomic::{AtomicU64, Ordering};
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

/// How long preparing the receiver may take (it may fetch the image).
const BEGIN_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the disk's writes may take to go: the guest is stopped then.
const DISK_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the receiver has to hear that a move is off (it drops its part
/// by itself if it never hears).
const CALL_OFF_TIMEOUT: Duration = Duration::from_secs(10);
/// A stream that moves no byte for this long is given up: the network
/// between the servers is cut, or the other side hangs.
const STALL: Duration = Duration::from_secs(20);
/// A receiving QEMU that hears nothing of its move for this long is dropped
/// (its sender died, or cannot reach this server any more).
const INCOMING_PATIENCE: Duration = Duration::from_secs(30);

/// A session this server is receiving.
struct Arrival {
    inc: Incoming,
    /// The revision of its record in the cluster when the move began: it is
    /// started here only if this server writes that record first.
    fence: i64,
    /// When its sender was last heard from.
    heard: tokio::time::Instant,
}

/// Sessions this server is receiving, by id.
#[derive(Default)]
pub struct Receiving(Mutex<HashMap<String, Arrival>>);

impl Receiving {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arrival>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(&self, id: &str) -> Option<Arrival> {
        self.lock().remove(id)
    }

    fn put(&self, inc: Incoming, fence: i64) {
        let heard = tokio::time::Instant::now();
        self.lock().insert(inc.id().to_string(), Arrival { inc, fence, heard });
    }

    fn socket_of(&self, id: &str) -> Option<std::path::PathBuf> {
        self.lock().get(id).map(|a| a.inc.socket())
    }

    /// Notes that the sender of `id` was heard from.
    fn heard(&self, id: &str) {
        if let Some(a) = self.lock().get_mut(id) {
            a.heard = tokio::time::Instant::now();
        }
    }

    /// Takes `id` if its sender was not heard from for [`INCOMING_PATIENCE`].
    fn take_if_silent(&self, id: &str) -> Option<Option<Arrival>> {
        let mut map = self.lock();
        let silent = map.get(id)?.heard.elapsed() > INCOMING_PATIENCE;
        Some(if silent { map.remove(id) } else { None })
    }

    /// Drops the move of `id`, if it is still here, after `why`.
    async fn drop_move(&self, id: &str, why: &str) {
        if let Some(a) = self.take(id) {
            tracing::warn!(session = %id, why, "a move here failed; its QEMU is dropped");
            a.inc.abandon().await;
        }
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
    /// The revision of the session's record when the move began (see
    /// [`crate::cluster::move_fence`]).
    fence: i64,
    /// This server's state, for its link to the cluster.
    st: Arc<AppState>,
}

impl Destination {
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.address))
            .bearer_auth(&self.secret)
            .header(crate::cluster::TERMINAL_HEADER, &self.terminal)
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
        let req = self.request(reqwest::Method::DELETE, &format!("/v1/moves/{id}")).timeout(CALL_OFF_TIMEOUT);
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
    engine.share_for_move(&rec).await.map_err(|e| format!("sharing the session's image for the move: {e}"))?;
    let id = s.id.clone();
    let begin = to
        .request(reqwest::Method::POST, &format!("/v1/moves/{id}"))
        .timeout(BEGIN_TIMEOUT)
        .json(&serde_json::json!({ "record": rec, "fence": to.fence }));
    to.send("preparing the receiving server", begin).await?;
    let moved = async {
        let (listener, socket) = engine.outgoing_socket(s).map_err(|e| e.to_string())?;
        // The stream goes out as the body of one request, as QEMU writes it.
        let relay = {
            let to = to.clone();
            let id = id.clone();
            tokio::spawn(async move {
                let (conn, _) = tokio::time::timeout(STALL, listener.accept())
                    .await
                    .map_err(|_| "QEMU did not start sending the guest".to_string())?
                    .map_err(|e| format!("accepting QEMU's migration: {e}"))?;
                let moved = Arc::new(AtomicU64::new(0));
                let body = reqwest::Body::wrap_stream(chunks_of(conn, Some(moved.clone())));
                let req = to.request(reqwest::Method::POST, &format!("/v1/moves/{id}/state")).body(body);
                until_stalled(to.send("sending the guest's memory", req), &moved, &to.server).await
            })
        };
        let sent = engine.send_session(s, &socket).await;
        let _ = std::fs::remove_file(&socket);
        let (overlay, downtime) = match sent {
            Ok(done) => done,
            Err(e) => {
                relay.abort();
                // What the relay saw says more than QEMU's error.
                return Err(match relay.await {
                    Ok(Err(why)) => format!("{why} ({e})"),
                    _ => e.to_string(),
                });
            }
        };
        // The guest stays stopped until the receiver runs it.
        let stopped_at = std::time::Instant::now();
        let relayed = relay.await.map_err(|e| format!("the relay of the guest's memory failed: {e}")).and_then(|r| r);
        let placed = match relayed {
            Ok(()) => {
                let file =
                    tokio::fs::File::open(&overlay).await.map_err(|e| format!("reading the disk's writes: {e}"))?;
                let body = reqwest::Body::wrap_stream(chunks_of(file, None));
                let req =
                    to.request(reqwest::Method::PUT, &format!("/v1/moves/{id}/disk")).timeout(DISK_TIMEOUT).body(body);
                to.send("sending the disk's writes", req).await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = placed {
            // The memory went: the receiver may have started the guest
            // although its answer did not come back. The cluster says.
            let Some(link) = to.st.cluster.as_ref() else { return Err(e) };
            let live = to.st.sessions.get(&id).ok_or_else(|| format!("{e}; and session {id} is gone here"))?;
            match crate::cluster::settle_failed_move(link, &live, &to.server, to.fence).await {
                Ok(crate::cluster::Settled::There) => {
                    tracing::info!(session = %id, to = %to.server, error = %e, "the receiver took the session although its answer was lost");
                    return Ok(downtime + stopped_at.elapsed());
                }
                Ok(crate::cluster::Settled::Here) => {
                    if let Err(r) = engine.resume_after_failed_move(s).await {
                        tracing::error!(session = %id, error = %r, "could not run the guest again after a failed move");
                    }
                    return Err(e);
                }
                Err(unknown) => {
                    tracing::error!(session = %id, error = %unknown, "a failed move cannot be settled; the guest stays stopped here");
                    return Err(format!("{e}; {unknown}: the guest stays stopped here"));
                }
            }
        }
        Ok(downtime + stopped_at.elapsed())
    };
    let r = moved.await;
    if r.is_err() {
        to.call_off(&id).await;
    }
    r
}

/// Runs `sending` (a request whose body counts its bytes in `moved`) until
/// it ends or no byte went for [`STALL`].
async fn until_stalled(
    sending: impl std::future::Future<Output = Result<(), String>>,
    moved: &AtomicU64,
    server: &str,
) -> Result<(), String> {
    tokio::pin!(sending);
    let mut seen = 0;
    let mut since = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            r = &mut sending => return r,
            _ = tick.tick() => {
                let now = moved.load(Ordering::Relaxed);
                if now != seen {
                    (seen, since) = (now, tokio::time::Instant::now());
                } else if since.elapsed() > STALL {
                    return Err(format!(
                        "sending the guest's memory: nothing went to server {server} for {} s after {} MiB (is the network between the servers cut?)",
                        STALL.as_secs(),
                        seen >> 20
                    ));
                }
            }
        }
    }
}

/// The bytes of `r` as a stream of chunks (for a request's body), counted
/// in `moved` as they are taken.
fn chunks_of<R: tokio::io::AsyncRead + Unpin + Send + 'static>(
    r: R,
    moved: Option<Arc<AtomicU64>>,
) -> impl futures_util::Stream<Item = std::io::Result<Vec<u8>>> + Send + 'static {
    futures_util::stream::try_unfold((r, moved), |(mut r, moved)| async move {
        let mut buf = vec![0u8; 256 << 10];
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.truncate(n);
        if let Some(m) = &moved {
            m.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(Some((buf, (r, moved))))
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
    // One move of a session at a time; the flag is lowered however this ends.
    if live.moving.swap(true, Ordering::SeqCst) {
        return Err(ApiError::conflict(format!("session {id} is moving already; wait for that move to end")));
    }
    struct Lower<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for Lower<'_> {
        fn drop(&mut self) {
            self.0.store(false, Ordering::SeqCst);
        }
    }
    let _lower = Lower(&live.moving);
    let fence = crate::cluster::move_fence(link, &live).await.map_err(ApiError::conflict)?;
    let to = Destination {
        address: order.to.trim_end_matches('/').to_string(),
        server: order.server,
        secret: link.secret().to_string(),
        terminal,
        http: reqwest::Client::new(),
        fence,
        st: st.clone(),
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
    /// The revision of the session's record in the cluster when the move
    /// began: the guest starts here only if that record is still so.
    fence: i64,
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
    st.receiving.put(inc, b.fence);
    // One whose sender falls silent is dropped.
    let st2 = st.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            match st2.receiving.take_if_silent(&id) {
                None => return,
                Some(None) => {}
                Some(Some(a)) => {
                    tracing::warn!(session = %id, "the sending server fell silent; the move is dropped");
                    a.inc.abandon().await;
                    return;
                }
            }
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
    tracing::info!(session = %id, "a moving session's memory is arriving");
    let bytes = match pump(body, &mut qemu, "the receiving QEMU", || st.receiving.heard(&id)).await {
        Ok(bytes) => bytes,
        Err(e) => {
            st.receiving.drop_move(&id, "its memory stopped coming").await;
            return Err(e);
        }
    };
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
    let terminal = check_cluster_caller(&st, &headers)?;
    let link = st.cluster.as_ref().expect("checked");
    let Arrival { mut inc, fence, .. } =
        st.receiving.take(&id).ok_or_else(|| ApiError::not_found(format!("no move of {id} here")))?;
    let placed = async {
        let scratch = st.engine.store.work_dir("move").map_err(|e| ApiError::internal(e.to_string()))?;
        let overlay = scratch.path().join("overlay.qcow2");
        receive_file(body, &overlay).await?;
        st.engine.place_received(&mut inc, &overlay).await?;
        // The guest starts here only if this server takes its record first
        // (the sender, giving up, would have rewritten it).
        match crate::cluster::claim_moved(link, inc.record(), &terminal, fence).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(ApiError::conflict(format!(
                "session {id} was kept by its sending server (its record changed); the move is off"
            ))),
            Err(e) => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "cluster_unavailable",
                format!("the cluster cannot record session {id} here: {e}"),
            )),
        }
    };
    if let Err(e) = placed.await {
        tracing::warn!(session = %id, error = %e.to_string(), "a move here failed; its QEMU is dropped");
        inc.abandon().await;
        return Err(e);
    }
    let rec = inc.record().clone();
    let session = st.engine.start_received(inc).await?;
    let live = st
        .sessions
        .adopt_moved(&rec, session, &st.engine, Some(st.limits.idle_timeout))
        .ok_or_else(|| ApiError::internal("the moved session lacks its terminal or attach labels"))?;
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
        Some(a) => {
            a.inc.abandon().await;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        None => Err(ApiError::not_found(format!("no move of {id} here"))),
    }
}

/// Writes a request's body to `path`.
async fn receive_file(body: axum::body::Body, path: &std::path::Path) -> Result<(), ApiError> {
    let mut f = tokio::fs::File::create(path).await.map_err(|e| ApiError::internal(e.to_string()))?;
    pump(body, &mut f, "the disk's writes", || {}).await?;
    f.sync_all().await.map_err(|e| ApiError::internal(e.to_string()))
}

/// Copies a request's body into `to` (`what`, for errors) as it comes,
/// calling `heard` on each piece; the bytes copied. A body that brings
/// nothing for [`STALL`] is given up.
async fn pump(
    body: axum::body::Body,
    to: &mut (impl tokio::io::AsyncWrite + Unpin),
    what: &str,
    heard: impl Fn(),
) -> Result<u64, ApiError> {
    let mut stream = body.into_data_stream();
    let mut bytes = 0u64;
    loop {
        let next = tokio::time::timeout(STALL, stream.next()).await.map_err(|_| {
            ApiError::bad_request(format!("the stream brought nothing for {} s after {bytes} bytes", STALL.as_secs()))
        })?;
        let Some(chunk) = next else { break };
        heard();
        let chunk = chunk.map_err(|e| ApiError::bad_request(format!("the stream broke after {bytes} bytes: {e}")))?;
        to.write_all(&chunk)
            .await
            .map_err(|e| ApiError::internal(format!("{what} stopped taking bytes after {bytes}: {e}")))?;
        bytes += chunk.len() as u64;
    }
    Ok(bytes)
}
