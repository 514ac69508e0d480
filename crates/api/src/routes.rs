//! HTTP routes: each handler turns a request into an engine command or a
//! session actor message, and its result into JSON.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use strata_engine::context::{ContextSettings, NetworkSettings, PortForward, Share};
use strata_engine::GuestCommand;
use strata_proto::{ProcId, WinSize};
use tokio::sync::{mpsc, oneshot};
use utoipa::{OpenApi, ToSchema};

use crate::auth::{self, Caller};
use crate::error::{error_chain, ApiError, ErrorBody};
use crate::live::{Cmd, CommandOut, Live, Out, SessionOptions, State as SessionState};
use crate::AppState;

type St = State<Arc<AppState>>;

#[derive(OpenApi)]
#[openapi(
    info(title = "strata", description = "Run software on demand, already running, each in its own VM"),
    paths(
        list_packages,
        search_packages,
        list_servers,
        list_images,
        build_images,
        start_build,
        list_builds,
        get_build,
        build_events,
        delete_image,
        gc_images,
        prune_images,
        create_session,
        list_sessions,
        session_events,
        get_session,
        kill_session,
        session_logs,
        pause_session,
        resume_session,
        fork_session,
        snapshot_session,
        set_timeout,
        set_screen,
        attach_session,
        exec_session,
        list_session_commands,
        signal_command,
        attach_ticket,
        import_session,
        session_display,
        get_clipboard,
        set_clipboard,
        read_file,
        write_file
    ),
    components(schemas(
        PackageInfo,
        FoundPackage,
        ServerInfo,
        ImageInfo,
        BuildRequest,
        BuildInfo,
        GcReport,
        PruneReport,
        CreateSession,
        ContextBody,
        PortBody,
        ShareBody,
        SessionInfo,
        CreatedSession,
        ForkRequest,
        Forked,
        ForkOutcome,
        SnapshotRequest,
        SnapshotInfo,
        TimeoutBody,
        ScreenBody,
        CommandEntry,
        SignalBody,
        AttachTicket,
        ImportSession,
        ErrorBody,
        crate::error::ErrorDetail,
        SessionState
    ))
)]
struct ApiDoc;

pub fn openapi_json() -> String {
    ApiDoc::openapi().to_pretty_json().expect("the OpenAPI document serializes")
}

pub fn router(state: Arc<AppState>) -> Router {
    let max_body = state.limits.max_body;
    Router::new()
        .route("/", get(crate::web::index))
        .route("/app.js", get(crate::web::app))
        .route("/style.css", get(crate::web::style))
        .route("/vendor/{name}", get(crate::web::vendor))
        .route("/healthz", get(|| async { "ok" }))
        .route("/openapi.json", get(|| async { ([("content-type", "application/json")], openapi_json()) }))
        .route("/metrics", get(metrics))
        .route("/v1/packages", get(list_packages))
        .route("/v1/packages/search", get(search_packages))
        .route("/v1/images", get(list_images).post(build_images))
        .route("/v1/images/gc", post(gc_images))
        .route("/v1/images/prune", post(prune_images))
        .route("/v1/images/{digest}", axum::routing::delete(delete_image))
        .route("/v1/builds", get(list_builds).post(start_build))
        .route("/v1/builds/{id}", get(get_build))
        .route("/v1/builds/{id}/events", get(build_events))
        .route("/v1/servers", get(list_servers))
        .route("/v1/sessions", get(list_sessions).post(create_session))
        .route("/v1/sessions/events", get(session_events))
        .route("/v1/sessions/{id}", get(get_session).delete(kill_session))
        .route("/v1/sessions/{id}/logs", get(session_logs))
        .route("/v1/sessions/{id}/pause", post(pause_session))
        .route("/v1/sessions/{id}/resume", post(resume_session))
        .route("/v1/sessions/{id}/fork", post(fork_session))
        .route("/v1/sessions/{id}/move", post(crate::moves::move_session))
        .route("/v1/moves/{id}", post(crate::moves::begin).delete(crate::moves::call_off))
        // A guest's memory and disk writes: as large as they are.
        .route("/v1/moves/{id}/state", post(crate::moves::state).layer(axum::extract::DefaultBodyLimit::disable()))
        .route("/v1/moves/{id}/disk", put(crate::moves::disk).layer(axum::extract::DefaultBodyLimit::disable()))
        .route("/v1/sessions/{id}/snapshot", post(snapshot_session))
        .route("/v1/sessions/{id}/timeout", put(set_timeout))
        .route("/v1/sessions/{id}/screen", put(set_screen))
        .route("/v1/sessions/{id}/attach", get(attach_session))
        .route("/v1/sessions/{id}/exec", get(exec_session))
        .route("/v1/sessions/{id}/commands", get(list_session_commands))
        .route("/v1/sessions/{id}/commands/{command}/signal", post(signal_command))
        .route("/v1/sessions/{id}/attach-ticket", post(attach_ticket))
        .route("/v1/sessions/import", post(import_session))
        .route("/v1/sessions/{id}/display", get(session_display))
        .route(
            "/v1/sessions/{id}/clipboard",
            get(get_clipboard).put(set_clipboard).layer(axum::extract::DefaultBodyLimit::max(MAX_CLIPBOARD)),
        )
        .route("/vendor/novnc/{*path}", get(crate::web::novnc))
        .route(
            "/v1/sessions/{id}/files",
            get(read_file).put(write_file).layer(axum::extract::DefaultBodyLimit::max(MAX_FILE)),
        )
        .nest("/e2b", crate::e2b::router())
        // E2B's SDKs make signed upload and download URLs at the root.
        .route("/files", crate::e2b::envd::files_route())
        .fallback(|| async { ApiError::not_found("no such endpoint; see /openapi.json") })
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn(request_id))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// The header carrying a request's id, both ways.
const REQUEST_ID: &str = "x-request-id";

/// Gives every request an id (the caller's `x-request-id` if it is a plain
/// one, else a new one), logs under it, hands it to the engine (and from
/// there to the guest agent's log), and returns it in the response.
async fn request_id(req: Request, next: axum::middleware::Next) -> Response {
    use tracing::Instrument;
    let given = req.headers().get(REQUEST_ID).and_then(|v| v.to_str().ok()).filter(|v| {
        !v.is_empty() && v.len() <= 64 && v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    });
    let id = match given {
        Some(v) => v.to_string(),
        None => auth::new_token().map(|t| t[..16].to_string()).unwrap_or_else(|_| "unknown".into()),
    };
    let span = tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.uri().path());
    let mut resp = strata_engine::with_request_id(id.clone(), next.run(req)).instrument(span).await;
    if let Ok(v) = axum::http::HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp
}

/// Query parameters whose rejections use the API's error body.
pub struct Params<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(Params(v)),
            Err(rej) => Err(ApiError::bad_request(format!("query parameters: {}", rej.body_text()))),
        }
    }
}

/// A JSON body whose rejections use the API's error body.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<serde_json::Value>::from_request(req, state).await {
            // Only an object: serde would also read a struct from an array
            // (`["python3"]`), which no client means.
            Ok(Json(v)) if !v.is_object() => Err(ApiError::bad_request("the request body must be a JSON object")),
            Ok(Json(v)) => serde_json::from_value(v).map(Body).map_err(|e| ApiError::bad_request(e.to_string())),
            Err(rej) => {
                // A body that parses but does not fit is as bad a request as
                // one that does not parse; only size and media type differ.
                let status = match rej.status() {
                    s @ (StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNSUPPORTED_MEDIA_TYPE) => s,
                    _ => StatusCode::BAD_REQUEST,
                };
                let code = if status == StatusCode::PAYLOAD_TOO_LARGE { "payload_too_large" } else { "bad_request" };
                let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
                    "request body too large (the limit is 64 KiB)".to_string()
                } else {
                    rej.body_text()
                };
                Err(ApiError::new(status, code, message))
            }
        }
    }
}

async fn metrics(State(st): St) -> impl IntoResponse {
    let mut counts: BTreeMap<String, i64> = BTreeMap::from([("running".into(), 0), ("paused".into(), 0)]);
    for l in st.sessions.all() {
        let s = *l.state.lock().unwrap_or_else(|e| e.into_inner());
        let key = if s == SessionState::Paused { "paused" } else { "running" };
        // (Ended sessions have no actor.)
        *counts.entry(key.into()).or_default() += 1;
    }
    let states: Vec<(String, i64)> = counts.into_iter().collect();
    let pool: Vec<(String, i64)> = st.pool_targets.keys().map(|p| (p.clone(), st.pool.len(p) as i64)).collect();
    (
        [("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        st.metrics.render(&st.engine, &states, &pool),
    )
}

#[derive(Serialize, ToSchema)]
pub struct PackageInfo {
    name: String,
    description: String,
    debs: Vec<String>,
    command: Vec<String>,
    /// The environment its program runs with.
    env: BTreeMap<String, String>,
    /// It shows a display (`/v1/sessions/{id}/display`) rather than a terminal.
    graphical: bool,
    /// The operating systems it is made for.
    os: Vec<String>,
}

/// Packages defined on this server (any Debian package whose program has its
/// name can be launched too).
#[utoipa::path(get, path = "/v1/packages", responses((status = 200, body = [PackageInfo]), (status = 401, body = ErrorBody)))]
async fn list_packages(State(st): St, _c: Caller) -> Json<Vec<PackageInfo>> {
    Json(
        st.engine
            .registry
            .packages
            .values()
            .map(|p| PackageInfo {
                name: p.name.clone(),
                description: p.def.description.clone(),
                debs: p.def.debs.clone(),
                command: p.def.command.clone(),
                env: p.def.env.clone(),
                graphical: p.def.graphical,
                os: p.def.oses(),
            })
            .collect(),
    )
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct SearchQuery {
    /// Words the package's name or description holds.
    q: String,
    /// Whose package lists (default: the server's default OS).
    os: Option<String>,
}

/// A Debian package found by a search.
#[derive(Serialize, ToSchema)]
pub struct FoundPackage {
    name: String,
    description: String,
    /// A definition of this server's names it.
    defined: bool,
}

/// Debian packages whose name or description holds every word of `q`
/// (this server's package lists), names matching first; at most 50. Any of
/// them can be launched.
#[utoipa::path(get, path = "/v1/packages/search", params(SearchQuery),
    responses((status = 200, body = [FoundPackage]), (status = 400, body = ErrorBody)))]
async fn search_packages(
    State(st): St,
    _c: Caller,
    Params(q): Params<SearchQuery>,
) -> Result<Json<Vec<FoundPackage>>, ApiError> {
    let os = os_of(&st, q.os.as_deref(), None)?;
    let found = st.engine.search_packages(&q.q, os).await?;
    let defined = |n: &str| st.engine.registry.packages.contains_key(n);
    Ok(Json(
        found
            .into_iter()
            .map(|(name, description)| FoundPackage { defined: defined(&name), name, description })
            .collect(),
    ))
}

/// A server that runs sessions and the load placement weighs.
#[derive(Serialize, ToSchema)]
pub struct ServerInfo {
    name: String,
    cpus: usize,
    load1: f64,
    memory_total_mib: u64,
    memory_available_mib: u64,
    guest_memory_committed_mib: u64,
    sessions: usize,
    images: usize,
    blobs_bytes: u64,
}

/// The servers running sessions (in single-machine mode: this one).
#[utoipa::path(get, path = "/v1/servers", responses((status = 200, body = [ServerInfo]), (status = 401, body = ErrorBody)))]
async fn list_servers(State(st): St, _c: Caller) -> Result<Json<Vec<ServerInfo>>, ApiError> {
    let h = st.engine.server_status()?;
    Ok(Json(vec![ServerInfo {
        name: h.name,
        cpus: h.cpus,
        load1: h.load1,
        memory_total_mib: h.memory_total_mib,
        memory_available_mib: h.memory_available_mib,
        guest_memory_committed_mib: h.guest_memory_committed_mib,
        sessions: h.sessions,
        images: h.images,
        blobs_bytes: h.blobs_bytes,
    }]))
}

#[derive(Serialize, ToSchema)]
pub struct ImageInfo {
    digest: String,
    /// base, install, launch or context.
    kind: String,
    package: Option<String>,
    os: String,
    arch: String,
    parent: Option<String>,
    size: u64,
    /// Unix seconds.
    created: i64,
    /// A snapshot's name ("" for a fork's own); absent for other images.
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshot: Option<String>,
}

impl From<&strata_store::ImageRecord> for ImageInfo {
    fn from(r: &strata_store::ImageRecord) -> Self {
        ImageInfo {
            digest: r.digest.clone(),
            kind: r.kind.to_string(),
            package: r.package.clone(),
            os: r.os.clone(),
            arch: r.arch.clone(),
            parent: r.parent.clone(),
            size: r.size,
            created: r.created,
            snapshot: strata_engine::fork::snapshot_name(r).map(str::to_string),
        }
    }
}

fn store_err(e: strata_store::Error) -> ApiError {
    ApiError::internal(error_chain(&e))
}

/// Every image in the catalog.
#[utoipa::path(get, path = "/v1/images", responses((status = 200, body = [ImageInfo]), (status = 401, body = ErrorBody)))]
async fn list_images(State(st): St, _c: Caller) -> Result<Json<Vec<ImageInfo>>, ApiError> {
    Ok(Json(st.engine.store.list_images().map_err(store_err)?.iter().map(ImageInfo::from).collect()))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BuildRequest {
    package: String,
    /// The OS to build for (default: the server's).
    os: Option<String>,
}

/// The OS a request asks for: its own `os`, else its context's, else the
/// server's default.
pub(crate) fn os_of(
    st: &AppState,
    asked: Option<&str>,
    settings: Option<&ContextSettings>,
) -> Result<strata_engine::Os, ApiError> {
    let asked = asked.map(strata_engine::Os::named).transpose().map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(st.engine.os_for(asked, settings))
}

/// Builds what is missing of a package's base, install and launch images,
/// and answers once they are there (the build goes on if the caller leaves;
/// `POST /v1/builds` answers at once instead).
#[utoipa::path(post, path = "/v1/images", request_body = BuildRequest,
    responses((status = 200, body = [ImageInfo]), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn build_images(
    State(st): St,
    _c: Caller,
    Body(req): Body<BuildRequest>,
) -> Result<Json<Vec<ImageInfo>>, ApiError> {
    let pkg = st.engine.package_on(&req.package, os_of(&st, req.os.as_deref(), None)?)?;
    let set = st.builds.start(&st.engine, &pkg).wait().await?;
    Ok(Json([&set.base, &set.install, &set.launch].into_iter().map(ImageInfo::from).collect()))
}

/// An image build: what it builds, where it is, how far, its log.
#[derive(Serialize, ToSchema)]
pub struct BuildInfo {
    id: String,
    package: String,
    /// `running`, `done`, `failed`, or `interrupted` (its server died).
    state: String,
    /// The image being built: `base`, `install` or `launch`.
    stage: String,
    /// What it does now.
    step: String,
    /// How far the whole build is, 0 to 1.
    progress: f64,
    /// Unix seconds.
    started: i64,
    ended: Option<i64>,
    error: Option<String>,
    /// The last lines of its log.
    log: Vec<String>,
}

impl From<strata_engine::builds::BuildStatus> for BuildInfo {
    fn from(s: strata_engine::builds::BuildStatus) -> BuildInfo {
        BuildInfo {
            id: s.id,
            package: s.package,
            state: s.state.to_string(),
            stage: s.stage,
            step: s.step,
            progress: s.progress,
            started: s.started,
            ended: s.ended,
            error: s.error,
            log: s.log,
        }
    }
}

/// How long `POST /v1/builds` waits for a build that may have nothing to do.
const BUILD_GLANCE: Duration = Duration::from_millis(300);

/// Starts a build of what is missing of a package's images, or joins the
/// one running; answers at once: 200 when every image is there already,
/// 202 with the running build (follow `/v1/builds/{id}/events`).
#[utoipa::path(post, path = "/v1/builds", request_body = BuildRequest,
    responses((status = 200, body = BuildInfo), (status = 202, body = BuildInfo), (status = 404, body = ErrorBody),
              (status = 422, body = ErrorBody)))]
async fn start_build(State(st): St, _c: Caller, Body(req): Body<BuildRequest>) -> Result<Response, ApiError> {
    let pkg = st.engine.package_on(&req.package, os_of(&st, req.os.as_deref(), None)?)?;
    st.engine.check_disk_cap(&pkg.name, pkg.def.disk_mib)?;
    let run = st.builds.start(&st.engine, &pkg);
    let status = match tokio::time::timeout(BUILD_GLANCE, run.wait()).await {
        Ok(Err(e)) => return Err(e),
        Ok(Ok(_)) => StatusCode::OK,
        Err(_) => StatusCode::ACCEPTED,
    };
    Ok((status, Json(BuildInfo::from(run.job.status()))).into_response())
}

/// The builds of this server's store that did work, newest first: running
/// ones, and the last finished ones with their logs.
#[utoipa::path(get, path = "/v1/builds", responses((status = 200, body = [BuildInfo]), (status = 401, body = ErrorBody)))]
async fn list_builds(State(st): St, _c: Caller) -> Json<Vec<BuildInfo>> {
    Json(st.engine.builds().into_iter().map(BuildInfo::from).collect())
}

fn build_by_id(
    st: &AppState,
    id: &str,
) -> Result<(Option<Arc<crate::builds::Running>>, strata_engine::builds::BuildStatus), ApiError> {
    if let Some(run) = st.builds.get(id) {
        let status = run.job.status();
        return Ok((Some(run), status));
    }
    let status = st
        .engine
        .build_status(id)
        .ok_or_else(|| ApiError::not_found(format!("no build {id}; `GET /v1/builds` lists them")))?;
    Ok((None, status))
}

/// One build.
#[utoipa::path(get, path = "/v1/builds/{id}", params(("id" = String, Path)),
    responses((status = 200, body = BuildInfo), (status = 404, body = ErrorBody)))]
async fn get_build(State(st): St, _c: Caller, Path(id): Path<String>) -> Result<Json<BuildInfo>, ApiError> {
    Ok(Json(BuildInfo::from(build_by_id(&st, &id)?.1)))
}

/// A build's progress as server-sent events: a `status` event (the whole
/// build, as `GET /v1/builds/{id}`) at each change, until it ends.
#[utoipa::path(get, path = "/v1/builds/{id}/events", params(("id" = String, Path)),
    responses((status = 200, description = "text/event-stream of `status` events"), (status = 404, body = ErrorBody)))]
async fn build_events(State(st): St, _c: Caller, Path(id): Path<String>) -> Result<Response, ApiError> {
    let (run, status) = build_by_id(&st, &id)?;
    Ok(crate::builds::events(run, status).into_response())
}

fn check_digest(d: &str) -> Result<(), ApiError> {
    strata_store::check_digest(d)
        .map_err(|_| ApiError::bad_request(format!("{d:?} is not an image digest (64 hex digits)")))
}

/// Removes an image from the catalog (its blobs go at the next garbage collection).
#[utoipa::path(delete, path = "/v1/images/{digest}", params(("digest" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn delete_image(State(st): St, _c: Caller, Path(digest): Path<String>) -> Result<StatusCode, ApiError> {
    check_digest(&digest)?;
    if st.engine.store.image(&digest).map_err(store_err)?.is_none() {
        return Err(ApiError::not_found(format!("no image {digest}")));
    }
    if st.engine.list_sessions().iter().any(|s| s.launch_image == digest) {
        return Err(ApiError::conflict(format!("image {digest} is in use by a running session")));
    }
    st.engine.store.remove_image(&digest).map_err(store_err)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, ToSchema)]
pub struct GcReport {
    removed_blobs: u64,
    freed_bytes: u64,
}

/// Removes blobs no image references.
#[utoipa::path(post, path = "/v1/images/gc", responses((status = 200, body = GcReport)))]
async fn gc_images(State(st): St, _c: Caller) -> Result<Json<GcReport>, ApiError> {
    let (removed_blobs, freed_bytes) = st.engine.gc().map_err(ApiError::from)?;
    Ok(Json(GcReport { removed_blobs, freed_bytes }))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PruneQuery {
    /// Only report what would be removed.
    #[serde(default)]
    dry_run: bool,
}

#[derive(Serialize, ToSchema)]
pub struct PruneReport {
    /// The superseded images removed (or, in a dry run, that would be).
    images: Vec<ImageInfo>,
    removed_blobs: u64,
    freed_bytes: u64,
}

/// Removes superseded images: of each package's base, install and launch
/// images the one used last stays, with what sessions stand on; then the
/// blobs no image references.
#[utoipa::path(post, path = "/v1/images/prune", params(PruneQuery), responses((status = 200, body = PruneReport)))]
async fn prune_images(State(st): St, _c: Caller, Params(q): Params<PruneQuery>) -> Result<Json<PruneReport>, ApiError> {
    let r = st.engine.prune_images(q.dry_run).map_err(ApiError::from)?;
    Ok(Json(PruneReport {
        images: r.images.iter().map(ImageInfo::from).collect(),
        removed_blobs: r.removed_blobs,
        freed_bytes: r.freed_bytes,
    }))
}

/// A terminal's settings for a session.
#[derive(Deserialize, Serialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct ContextBody {
    term: Option<String>,
    rows: Option<u16>,
    cols: Option<u16>,
    timezone: Option<String>,
    locale: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// The guest may open connections out (user-mode NAT). Off by default:
    /// no network device at all.
    #[serde(default)]
    outbound: bool,
    /// Ports of the server (on 127.0.0.1) forwarded into the guest.
    #[serde(default)]
    ports: Vec<PortBody>,
    /// Folders of the server shared into the guest; each must lie inside
    /// one of the folders the server allows (`--share-root`).
    #[serde(default)]
    shares: Vec<ShareBody>,
    /// Mount this terminal's persistent home at /root.
    #[serde(default)]
    home: bool,
    /// Screen size of a graphical session, `WIDTHxHEIGHT`.
    screen: Option<String>,
    /// Keyboard layout of a graphical session (XKB name, e.g. `de`).
    keyboard: Option<String>,
    /// The OS of launches that name none (`debian-12`, `debian-13`; unset:
    /// the server's default).
    os: Option<String>,
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortBody {
    host: u16,
    guest: u16,
}

#[derive(Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShareBody {
    host: String,
    guest: String,
    #[serde(default)]
    readonly: bool,
}

impl ContextBody {
    fn settings(self, terminal: &str) -> Result<ContextSettings, ApiError> {
        let s = ContextSettings {
            term: self.term.unwrap_or_else(|| "xterm-256color".into()),
            rows: self.rows.unwrap_or(24),
            cols: self.cols.unwrap_or(80),
            timezone: self.timezone,
            locale: Some(self.locale.unwrap_or_else(|| "C.UTF-8".into())),
            env: self.env,
            network: NetworkSettings {
                outbound: self.outbound,
                ports: self.ports.iter().map(|p| PortForward { host: p.host, guest: p.guest }).collect(),
            },
            shares: self
                .shares
                .into_iter()
                .map(|sh| Share { host: sh.host.into(), guest: sh.guest, readonly: sh.readonly })
                .collect(),
            home: self.home.then(|| terminal.to_string()),
            screen: self.screen.as_deref().map(str::parse).transpose().map_err(ApiError::bad_request)?,
            keyboard: self.keyboard,
            os: self.os,
        };
        s.validate().map_err(|e| ApiError::bad_request(e.to_string()))?;
        Ok(s)
    }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSession {
    /// The package to launch (from its launch image); empty with `snapshot`.
    #[serde(default)]
    package: String,
    /// Start the session from this snapshot (its name or digest) instead:
    /// the saved session's whole state, with its context.
    snapshot: Option<String>,
    context: Option<ContextBody>,
    /// Stop the session after this long with no terminal attached.
    idle_timeout_s: Option<u64>,
    /// The OS to run it on (`debian-12`, `debian-13`); default: the
    /// context's, else the server's.
    os: Option<String>,
    /// Another program of the package to launch instead of its own (e.g.
    /// `["xcalc"]` of `x11-apps`): from a launch image of its own, built
    /// once like any other.
    command: Option<Vec<String>>,
}

#[derive(Serialize, ToSchema)]
pub struct SessionInfo {
    id: String,
    package: String,
    state: SessionState,
    attached: bool,
    /// Unix seconds.
    created: u64,
    idle_timeout_s: Option<u64>,
    /// Its display is at `/v1/sessions/{id}/display` (a graphical package).
    graphical: bool,
    /// Why it ended (exited or lost): what happened, then the last lines of
    /// QEMU's log and the guest's console; why it is paused or detached.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// The terminal it belongs to (none: this machine's CLI started it).
    #[serde(skip_serializing_if = "Option::is_none")]
    terminal: Option<String>,
    /// The guest's operating system.
    os: String,
    /// CPU its VM used since the session was last listed, in percent of
    /// one core (while it runs, from the second listing on).
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_percent: Option<f64>,
    /// Host memory its VM uses, in MiB, shared pages counted once between
    /// the sessions sharing them (while it runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    memory_mib: Option<f64>,
}

impl SessionInfo {
    /// A session that ended unseen, from its kept record.
    fn ended(rec: &strata_engine::sessions::SessionRecord) -> Option<SessionInfo> {
        let e = rec.ended.as_ref()?;
        Some(SessionInfo {
            id: rec.id.clone(),
            package: rec.package.clone(),
            state: match e.state {
                strata_engine::sessions::EndState::Exited => SessionState::Exited,
                strata_engine::sessions::EndState::Lost => SessionState::Lost,
            },
            attached: false,
            created: rec.created.max(0) as u64,
            idle_timeout_s: None,
            graphical: false,
            reason: Some(e.reason.clone()),
            terminal: rec.labels.get("terminal").cloned(),
            os: rec.os.clone(),
            cpu_percent: None,
            memory_mib: None,
        })
    }

    /// A session of this machine's store that this server does not hold
    /// (the CLI's), from its record: what an operator also sees.
    fn unheld(rec: &strata_engine::sessions::SessionRecord) -> SessionInfo {
        SessionInfo {
            id: rec.id.clone(),
            package: rec.package.clone(),
            state: if rec.paused_image.is_some() { SessionState::Paused } else { SessionState::Running },
            attached: !rec.detached,
            created: rec.created.max(0) as u64,
            idle_timeout_s: rec.idle_timeout_s,
            graphical: false,
            reason: rec.why.clone(),
            terminal: rec.labels.get("terminal").cloned(),
            os: rec.os.clone(),
            cpu_percent: None,
            // Read for the sessions this server holds (and spaces those
            // reads); not for the others, listed to operators each second.
            memory_mib: None,
        }
    }
}

/// Whether `caller` sees the sessions of terminal `owner`: its own, or any
/// for an operator.
fn sees(st: &AppState, caller: &str, owner: Option<&str>) -> bool {
    owner == Some(caller) || st.operators.contains(caller)
}

/// The sessions that ended unseen that `caller` sees.
fn ended_of(st: &AppState, caller: &str) -> Vec<strata_engine::sessions::SessionRecord> {
    st.engine
        .ended_sessions()
        .into_iter()
        .filter(|r| sees(st, caller, r.labels.get("terminal").map(String::as_str)))
        .collect()
}

impl From<&Live> for SessionInfo {
    fn from(l: &Live) -> Self {
        let usage = l.usage();
        SessionInfo {
            id: l.id.clone(),
            package: l.package.clone(),
            state: *l.state.lock().unwrap_or_else(|e| e.into_inner()),
            attached: *l.attached.lock().unwrap_or_else(|e| e.into_inner()),
            created: l.created.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            idle_timeout_s: l.idle_timeout.lock().unwrap_or_else(|e| e.into_inner()).map(|d| d.as_secs()),
            graphical: l.vnc.is_some(),
            reason: l.why.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            terminal: Some(l.owner.clone()),
            os: l.os.clone(),
            cpu_percent: usage.0,
            memory_mib: usage.1,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct CreatedSession {
    session: SessionInfo,
    /// Secret for attaching this session's terminal; shown once.
    attach_token: String,
    /// WebSocket path: binary frames carry terminal bytes both ways; text
    /// frames carry `{"type":"resize","rows":R,"cols":C}` and `{"type":"eof"}`
    /// from the terminal, `{"type":"exit","status":N}` to it.
    attach_path: String,
}

const MAX_IDLE: u64 = 7 * 24 * 3600;

fn idle(seconds: Option<u64>, default: Duration) -> Result<Option<Duration>, ApiError> {
    match seconds {
        None => Ok(Some(default)),
        Some(0) => Ok(None),
        Some(s) if s <= MAX_IDLE => Ok(Some(Duration::from_secs(s))),
        Some(s) => {
            Err(ApiError::bad_request(format!("idle time-out {s} s is over the limit of {MAX_IDLE} s (0 means none)")))
        }
    }
}

/// Launches a package: the launch request of the method.
#[utoipa::path(post, path = "/v1/sessions", request_body = CreateSession,
    responses((status = 201, body = CreatedSession), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 422, body = ErrorBody), (status = 429, body = ErrorBody)))]
async fn create_session(
    State(st): St,
    Caller(owner): Caller,
    Body(req): Body<CreateSession>,
) -> Result<Response, ApiError> {
    let idle = idle(req.idle_timeout_s, st.limits.idle_timeout)?;
    let options = SessionOptions { idle, ..SessionOptions::default() };
    if let Some(name) = &req.snapshot {
        if req.context.is_some() || req.os.is_some() || req.command.is_some() {
            return Err(ApiError::bad_request(
                "a session from a snapshot has the snapshot's context, OS and program: leave out context, os and command",
            ));
        }
        let image = st.engine.resolve_snapshot(name).await?.ok_or_else(|| {
            ApiError::not_found(format!(
                "no snapshot {name}; GET /v1/images lists them (kind paused, with a snapshot name)"
            ))
        })?;
        // A package named too (a control plane places by it) must be the snapshot's.
        if !req.package.is_empty() && image.package.as_deref() != Some(req.package.as_str()) {
            return Err(ApiError::bad_request(format!(
                "snapshot {name} is of package {}, not {}",
                image.package.as_deref().unwrap_or("-"),
                req.package
            )));
        }
        let memory_mib = image.meta.get("memory_mib").and_then(|m| m.parse().ok()).unwrap_or(0);
        room_for(&st, &owner, 1, memory_mib)?;
        let session = st.engine.start_from_snapshot(&image, None).await?;
        let settings = st.engine.session_settings(&session.id);
        let created = register(&st, session, &owner, settings, options)?;
        return Ok((StatusCode::CREATED, Json(created)).into_response());
    }
    let settings = req.context.unwrap_or_default().settings(&owner)?;
    let os = os_of(&st, req.os.as_deref(), Some(&settings))?;
    let (live, token) = launch_for(&st, &owner, &req.package, os, req.command, false, settings, options).await?;
    Ok((StatusCode::CREATED, Json(created_session(&live, token))).into_response())
}

fn created_session(live: &Live, token: String) -> CreatedSession {
    CreatedSession {
        session: SessionInfo::from(live),
        attach_path: format!("/v1/sessions/{}/attach", live.id),
        attach_token: token,
    }
}

/// Hands a session this server started to an actor, for terminal `owner`.
fn register(
    st: &Arc<AppState>,
    session: strata_engine::Session,
    owner: &str,
    settings: ContextSettings,
    options: SessionOptions,
) -> Result<CreatedSession, ApiError> {
    let (live, token) = register_live(st, session, owner, settings, options)?;
    Ok(created_session(&live, token))
}

/// Gives a session started from a snapshot (a fork's copy) an actor and an
/// attach token, as terminal `owner`'s: the live session and its token.
pub(crate) fn register_live(
    st: &Arc<AppState>,
    session: strata_engine::Session,
    owner: &str,
    settings: ContextSettings,
    options: SessionOptions,
) -> Result<(Arc<Live>, String), ApiError> {
    let token = auth::new_token().map_err(|e| ApiError::internal(e.to_string()))?;
    let live = st.sessions.start(session, owner, auth::token_hash(&token), st.engine.clone(), settings, options);
    tracing::info!(session = %live.id, package = %live.package, terminal = %owner, "session started from a snapshot");
    Ok((live, token))
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct ForkRequest {
    /// How many copies (1 to 32; default 1).
    count: Option<usize>,
}

#[derive(Serialize, ToSchema)]
pub struct ForkOutcome {
    /// The new session, with its attach token; absent if it failed.
    #[serde(skip_serializing_if = "Option::is_none", flatten)]
    created: Option<CreatedSession>,
    /// Why this copy failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct Forked {
    /// The session forked: it runs on.
    parent: SessionInfo,
    /// The snapshot the copies started from (kept while one of them needs it).
    snapshot: String,
    /// How long the parent's guest was stopped, in ms.
    parent_stopped_ms: f64,
    /// Each copy's outcome, in order.
    forks: Vec<ForkOutcome>,
}

/// Forks a running session: its whole state (memory, disk, the program's
/// screen and processes) is saved while it runs on, then `count` new
/// sessions start from it, each independent from then on. The parent keeps
/// its id, time-out and terminal.
#[utoipa::path(post, path = "/v1/sessions/{id}/fork", params(("id" = String, Path)), request_body = ForkRequest,
    responses((status = 201, body = Forked), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody), (status = 429, body = ErrorBody)))]
async fn fork_session(
    State(st): St,
    Caller(owner): Caller,
    Path(id): Path<String>,
    Body(req): Body<ForkRequest>,
) -> Result<Response, ApiError> {
    let count = req.count.unwrap_or(1);
    if !(1..=strata_engine::fork::MAX_FORKS).contains(&count) {
        return Err(ApiError::bad_request(format!(
            "count {count} is out of range: a fork makes 1 to {} copies",
            strata_engine::fork::MAX_FORKS
        )));
    }
    let live = managed(&st, &owner, &id)?;
    if *live.state.lock().unwrap_or_else(|e| e.into_inner()) == crate::live::State::Paused {
        return Err(ApiError::conflict(format!(
            "session {id} is paused; resume it first (POST /v1/sessions/{id}/resume)"
        )));
    }
    // The copies are the parent terminal's, within its limits.
    room_for(&st, &live.owner, count, live.memory_mib)?;
    // The actor saves the state; the rest is done here, the session free.
    let captured = ask(&live, |reply| Cmd::Snapshot { name: None, reply }).await?;
    let (snap, started) = st.engine.fork_captured(captured, count, None).await?;
    let idle = *live.idle_timeout.lock().unwrap_or_else(|e| e.into_inner());
    let mut forks = Vec::new();
    for started in started {
        let outcome = started.map_err(ApiError::from).and_then(|session| {
            let settings = st.engine.session_settings(&session.id);
            let options = SessionOptions { idle, ..SessionOptions::default() };
            register(&st, session, &live.owner, settings, options)
        });
        forks.push(match outcome {
            Ok(created) => ForkOutcome { created: Some(created), error: None },
            Err(e) => ForkOutcome { created: None, error: Some(e.message.clone()) },
        });
    }
    if forks.iter().all(|f| f.created.is_none()) {
        let why = forks.first().and_then(|f| f.error.clone()).unwrap_or_default();
        return Err(ApiError::internal(format!("no copy of session {id} started: {why}")));
    }
    tracing::info!(session = %id, copies = forks.iter().filter(|f| f.created.is_some()).count(), stopped_ms = snap.stopped.as_secs_f64() * 1e3, "session forked");
    let body = Forked {
        parent: SessionInfo::from(&*live),
        snapshot: snap.image.digest.clone(),
        parent_stopped_ms: snap.stopped.as_secs_f64() * 1e3,
        forks,
    };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// The snapshot's name: 1 to 63 lower-case letters, digits, '.', '_' or '-'.
    name: String,
}

#[derive(Serialize, ToSchema)]
pub struct SnapshotInfo {
    name: String,
    /// Its image's digest.
    image: String,
    /// How long the session's guest was stopped, in ms.
    stopped_ms: f64,
}

/// Saves a running session as a named snapshot while it runs on; new
/// sessions start from it (`POST /v1/sessions` with `snapshot`). Kept until
/// its image is removed.
#[utoipa::path(post, path = "/v1/sessions/{id}/snapshot", params(("id" = String, Path)), request_body = SnapshotRequest,
    responses((status = 201, body = SnapshotInfo), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody)))]
async fn snapshot_session(
    State(st): St,
    Caller(owner): Caller,
    Path(id): Path<String>,
    Body(req): Body<SnapshotRequest>,
) -> Result<Response, ApiError> {
    strata_engine::fork::check_snapshot_name(&req.name)?;
    let live = managed(&st, &owner, &id)?;
    let captured = ask(&live, |reply| Cmd::Snapshot { name: Some(req.name.clone()), reply }).await?;
    let snap = st.engine.finish_snapshot(captured).await?;
    st.engine.share_snapshot(&snap.image).await;
    let body = SnapshotInfo { name: req.name, image: snap.image.digest, stopped_ms: snap.stopped.as_secs_f64() * 1e3 };
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// A context with every default, and outbound access if asked.
pub(crate) fn default_settings(terminal: &str, outbound: bool) -> Result<ContextSettings, ApiError> {
    ContextBody { outbound, ..ContextBody::default() }.settings(terminal)
}

/// Launches `package` on `os` for terminal `owner` (from its pool, or its
/// pool of sessions made for E2B's API if `e2b`, by
/// default the package's, if one waits), within the server's and the
/// terminal's limits; the live session and its attach token.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn launch_for(
    st: &Arc<AppState>,
    owner: &str,
    package: &str,
    os: strata_engine::Os,
    command: Option<Vec<String>>,
    e2b: bool,
    settings: ContextSettings,
    options: SessionOptions,
) -> Result<(Arc<Live>, String), ApiError> {
    let mut pkg = st.engine.package_on(package, os)?;
    // Pools hold sessions of the package's own program.
    let pooled = command.is_none();
    if let Some(argv) = command {
        pkg = pkg.with_command(&argv).map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    room_for(st, owner, 1, pkg.def.memory_mib)?;
    let started = Instant::now();
    let pool = strata_engine::pool::PoolKey::of(&pkg, e2b, st.engine.cfg.default_os).name();
    let taken = if pooled {
        // Someone waits for this launch: pool refills stop meanwhile (not
        // during a restore, if the pool is empty: it would starve them).
        let _foreground = strata_engine::background::foreground();
        st.pool.take(&pool, &settings).await
    } else {
        Ok(None)
    };
    let (session, path) = match taken {
        Ok(Some(s)) => (s, "pool"),
        other => {
            if let Err(e) = other {
                tracing::warn!(error = %e, "a pooled session failed to resume; launching anew");
            }
            // What is missing is built as a job of its own: a caller that
            // leaves does not abandon it, and the next one joins it.
            st.engine.check_launch(&pkg, &settings)?;
            let images = st.builds.start(&st.engine, &pkg).wait().await?;
            (st.engine.launch_from(&pkg, &images.launch, &settings).await?, "launch_image")
        }
    };
    if pooled {
        st.refill(&pool);
    }
    st.metrics
        .launch_seconds
        .get_or_create(&crate::metrics::LaunchLabels { package: pkg.name.clone(), path: path.into() })
        .observe(started.elapsed().as_secs_f64());
    let token = auth::new_token().map_err(|e| ApiError::internal(e.to_string()))?;
    let live = st.sessions.start(session, owner, auth::token_hash(&token), st.engine.clone(), settings, options);
    tracing::info!(session = %live.id, package = %pkg.name, terminal = %owner, "session launched");
    Ok((live, token))
}

/// Refuses `count` more sessions of `memory_mib` each for terminal `owner`
/// beyond the server's or the terminal's limits, naming the limit.
pub(crate) fn room_for(st: &AppState, owner: &str, count: usize, memory_mib: u32) -> Result<(), ApiError> {
    let limits = &st.limits;
    let running = st.sessions.len();
    let more = if count == 1 { String::new() } else { format!(" and {count} more were asked for") };
    if running + count > limits.max_sessions {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_sessions",
            format!(
                "this server runs at most {} sessions at once (--max-sessions) and runs {running}{more}; end one first",
                limits.max_sessions
            ),
        ));
    }
    let held = st.sessions.count_of(owner);
    if held + count > limits.max_sessions_per_terminal {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_sessions",
            format!(
                "a terminal may hold at most {} sessions at once (--max-sessions-per-terminal) and terminal \
                 {owner:?} holds {held}{more}; end one first",
                limits.max_sessions_per_terminal
            ),
        ));
    }
    memory_quota(st, owner, memory_mib.saturating_mul(count as u32))
}

/// The caller's sessions; an operator's are every session of the server
/// and of its store (the CLI's too).
#[utoipa::path(get, path = "/v1/sessions", responses((status = 200, body = [SessionInfo])))]
async fn list_sessions(State(st): St, Caller(owner): Caller) -> Json<Vec<SessionInfo>> {
    Json(sessions_of(&st, &owner))
}

/// How often the session list's events look for changes.
const SESSION_EVENTS_EVERY: Duration = Duration::from_secs(1);

/// The caller's sessions as server-sent events: a `sessions` event (the
/// list, as `GET /v1/sessions`) at once and whenever it changes (a state, a
/// session more or less, what they use), looked at every second.
#[utoipa::path(get, path = "/v1/sessions/events",
    responses((status = 200, description = "text/event-stream of `sessions` events"), (status = 401, body = ErrorBody)))]
async fn session_events(State(st): St, Caller(owner): Caller) -> Response {
    let stream = futures_util::stream::unfold((st, owner, None::<String>), |(st, owner, last)| async move {
        loop {
            // The first look at once, then one a second (CPU use is measured
            // between looks).
            if last.is_some() {
                tokio::time::sleep(SESSION_EVENTS_EVERY).await;
            }
            let now = serde_json::to_string(&sessions_of(&st, &owner)).unwrap_or_default();
            if last.as_ref() != Some(&now) {
                let event = axum::response::sse::Event::default().event("sessions").data(now.clone());
                return Some((Ok::<_, std::convert::Infallible>(event), (st, owner, Some(now))));
            }
        }
    });
    axum::response::sse::Sse::new(stream).keep_alive(axum::response::sse::KeepAlive::default()).into_response()
}

/// The sessions `owner` sees, oldest first.
fn sessions_of(st: &AppState, owner: &str) -> Vec<SessionInfo> {
    let held = st.sessions.all();
    let mut all: Vec<SessionInfo> =
        held.iter().filter(|l| sees(st, owner, Some(&l.owner))).map(|l| SessionInfo::from(&**l)).collect();
    all.extend(ended_of(st, owner).iter().filter_map(SessionInfo::ended));
    if st.operators.contains(owner) {
        let others = st.engine.list_sessions().into_iter().filter(|r| st.sessions.get(&r.id).is_none() && !r.pooled);
        all.extend(others.map(|r| SessionInfo::unheld(&r)));
    }
    all.sort_by_key(|s| s.created);
    all
}

/// A session of the caller's; another terminal's is "not found".
fn mine(st: &AppState, owner: &str, id: &str) -> Result<Arc<Live>, ApiError> {
    st.sessions.get(id).filter(|l| l.owner == owner).ok_or_else(|| ApiError::not_found(format!("no session {id}")))
}

/// A session the caller may list, stop, pause and resume: its own, or
/// any for an operator.
fn managed(st: &AppState, caller: &str, id: &str) -> Result<Arc<Live>, ApiError> {
    st.sessions
        .get(id)
        .filter(|l| sees(st, caller, Some(&l.owner)))
        .ok_or_else(|| ApiError::not_found(format!("no session {id}")))
}

#[utoipa::path(get, path = "/v1/sessions/{id}", params(("id" = String, Path)),
    responses((status = 200, body = SessionInfo), (status = 404, body = ErrorBody)))]
async fn get_session(
    State(st): St,
    Caller(owner): Caller,
    Path(id): Path<String>,
) -> Result<Json<SessionInfo>, ApiError> {
    match managed(&st, &owner, &id) {
        Ok(live) => Ok(Json(SessionInfo::from(&*live))),
        Err(e) => ended_of(&st, &owner).iter().find(|r| r.id == id).and_then(SessionInfo::ended).map(Json).ok_or(e),
    }
}

pub(crate) async fn ask<T>(
    live: &Live,
    make: impl FnOnce(oneshot::Sender<Result<T, String>>) -> Cmd,
) -> Result<T, ApiError> {
    let (tx, rx) = oneshot::channel();
    live.cmd.send(make(tx)).await.map_err(|_| ApiError::not_found(format!("session {} has ended", live.id)))?;
    rx.await.map_err(|_| ApiError::not_found(format!("session {} has ended", live.id)))?.map_err(ApiError::conflict)
}

/// Stops a session now.
#[utoipa::path(delete, path = "/v1/sessions/{id}", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody)))]
async fn kill_session(State(st): St, Caller(owner): Caller, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    let live = match managed(&st, &owner, &id) {
        Ok(live) => live,
        // An ended session's record goes.
        Err(_) if ended_of(&st, &owner).iter().any(|r| r.id == id) => {
            st.engine.remove_ended(&id)?;
            return Ok(StatusCode::NO_CONTENT);
        }
        // An operator stops the store's other sessions (the CLI's) too.
        Err(_) if st.operators.contains(&owner) && st.engine.list_sessions().iter().any(|r| r.id == id) => {
            st.engine.kill_session(&id).await?;
            tracing::info!(session = %id, operator = %owner, "an operator stopped a session of the store");
            return Ok(StatusCode::NO_CONTENT);
        }
        Err(e) => return Err(e),
    };
    let (tx, rx) = oneshot::channel();
    if live.cmd.send(Cmd::Kill(tx)).await.is_ok() {
        let _ = rx.await;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// The program's recent output (up to 64 KiB, as a terminal attaching now would see it).
#[utoipa::path(get, path = "/v1/sessions/{id}/logs", params(("id" = String, Path)),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn session_logs(State(st): St, Caller(owner): Caller, Path(id): Path<String>) -> Result<Response, ApiError> {
    let live = mine(&st, &owner, &id)?;
    let screen = ask(&live, Cmd::Screen).await?;
    Ok(([(axum::http::header::CONTENT_TYPE, "application/octet-stream")], screen).into_response())
}

/// Largest text `PUT /v1/sessions/{id}/clipboard` takes.
const MAX_CLIPBOARD: usize = 1 << 20;

/// The text on a graphical session's clipboard.
#[utoipa::path(get, path = "/v1/sessions/{id}/clipboard", params(("id" = String, Path)),
    responses((status = 200, content_type = "text/plain", body = String), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn get_clipboard(State(st): St, Caller(owner): Caller, Path(id): Path<String>) -> Result<Response, ApiError> {
    let live = mine(&st, &owner, &id)?;
    let text = ask(&live, |reply| Cmd::Clipboard { set: None, reply }).await?;
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

/// Puts text on a graphical session's clipboard (as if copied in the VM).
#[utoipa::path(put, path = "/v1/sessions/{id}/clipboard", params(("id" = String, Path)),
    request_body(content = String, content_type = "text/plain"),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody)))]
async fn set_clipboard(
    State(st): St,
    Caller(owner): Caller,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<StatusCode, ApiError> {
    let live = mine(&st, &owner, &id)?;
    let text = String::from_utf8(body.to_vec()).map_err(|_| ApiError::bad_request("clipboard text must be UTF-8"))?;
    ask(&live, |reply| Cmd::Clipboard { set: Some(text), reply }).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Largest file `PUT /v1/sessions/{id}/files` takes.
const MAX_FILE: usize = 256 << 20;

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct FileQuery {
    /// Absolute path of the file in the guest.
    path: String,
}

fn guest_path(q: &FileQuery) -> Result<String, ApiError> {
    if !q.path.starts_with('/') || q.path.len() > 4096 || q.path.contains('\0') {
        return Err(ApiError::bad_request(format!("path {:?} must be an absolute guest path", q.path)));
    }
    Ok(q.path.clone())
}

/// Copies a file through a scratch file on this server: `upload` into the
/// session's guest, or (without it) the guest file out, returned.
async fn copy_through_scratch(
    st: &AppState,
    owner: &str,
    id: &str,
    q: &FileQuery,
    upload: Option<&[u8]>,
) -> Result<Vec<u8>, ApiError> {
    let live = mine(st, owner, id)?;
    let guest = guest_path(q)?;
    let work = st.engine.store.work_dir("copy").map_err(|e| ApiError::internal(e.to_string()))?;
    let host = work.path().join("file");
    if let Some(data) = upload {
        tokio::fs::write(&host, data).await.map_err(|e| ApiError::internal(e.to_string()))?;
    }
    let into_guest = upload.is_some();
    ask(&live, |reply| Cmd::Copy { host: host.clone(), guest, into_guest, reply }).await?;
    if into_guest {
        return Ok(Vec::new());
    }
    tokio::fs::read(&host).await.map_err(|e| ApiError::internal(e.to_string()))
}

/// Copies a file out of a running session.
#[utoipa::path(get, path = "/v1/sessions/{id}/files", params(("id" = String, Path), FileQuery),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn read_file(
    State(st): St,
    Caller(owner): Caller,
    Path(id): Path<String>,
    Params(q): Params<FileQuery>,
) -> Result<Response, ApiError> {
    let data = copy_through_scratch(&st, &owner, &id, &q, None).await?;
    Ok(([(axum::http::header::CONTENT_TYPE, "application/octet-stream")], data).into_response())
}

/// Copies a file into a running session (replacing it atomically there).
#[utoipa::path(put, path = "/v1/sessions/{id}/files", params(("id" = String, Path), FileQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody)))]
async fn write_file(
    State(st): St,
    Caller(owner): Caller,
    Path(id): Path<String>,
    Params(q): Params<FileQuery>,
    body: axum::body::Bytes,
) -> Result<StatusCode, ApiError> {
    copy_through_scratch(&st, &owner, &id, &q, Some(&body)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScreenBody {
    width: u16,
    height: u16,
}

/// Sets a graphical session's screen size now (xrandr in the guest, a mode
/// made from CVT timings if the display lacks it), e.g. to fit the window
/// of whoever watches it.
#[utoipa::path(put, path = "/v1/sessions/{id}/screen", params(("id" = String, Path)), request_body = ScreenBody,
    responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn set_screen(
    State(st): St,
    Caller(owner): Caller,
    Path(id): Path<String>,
    Body(size): Body<ScreenBody>,
) -> Result<StatusCode, ApiError> {
    let live = mine(&st, &owner, &id)?;
    let asked = strata_engine::context::Resolution { width: size.width, height: size.height };
    asked.check().map_err(ApiError::bad_request)?;
    let (w, h) = asked.for_display();
    if live.vnc.is_none() {
        return Err(ApiError::conflict(format!("session {id} has no display: its package is not graphical")));
    }
    let script = format!("export DISPLAY=:0; {}", strata_proto::screen_size_script(w, h));
    let done = crate::e2b::envd::run(&live, &["/bin/sh", "-c", &script], None)
        .await
        .map_err(|e| ApiError::conflict(format!("the screen size could not be set: {}", e.1)))?;
    if done.status != 0 {
        return Err(ApiError::conflict(format!("the screen size could not be set: {}", done.stderr.trim())));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Pauses a session to an image: its memory, devices and disk are saved,
/// chained on the image it ran from, and its VM stops. It survives a restart
/// of the server; resuming or attaching brings it back where it was.
#[utoipa::path(post, path = "/v1/sessions/{id}/pause", params(("id" = String, Path)),
    responses((status = 200, body = SessionInfo), (status = 404, body = ErrorBody)))]
async fn pause_session(
    State(st): St,
    Caller(owner): Caller,
    Path(id): Path<String>,
) -> Result<Json<SessionInfo>, ApiError> {
    let live = managed(&st, &owner, &id)?;
    let why = if live.owner == owner { "paused by its terminal".into() } else { format!("paused by operator {owner}") };
    ask(&live, |r| Cmd::Pause(why, r)).await?;
    Ok(Json(SessionInfo::from(&*live)))
}

/// Resumes a paused session from its image.
#[utoipa::path(post, path = "/v1/sessions/{id}/resume", params(("id" = String, Path)),
    responses((status = 200, body = SessionInfo), (status = 404, body = ErrorBody)))]
async fn resume_session(
    State(st): St,
    Caller(owner): Caller,
    Path(id): Path<String>,
) -> Result<Json<SessionInfo>, ApiError> {
    let live = managed(&st, &owner, &id)?;
    if *live.state.lock().unwrap_or_else(|e| e.into_inner()) == crate::live::State::Paused {
        memory_quota(&st, &live.owner, live.memory_mib)?;
    }
    ask(&live, Cmd::Resume).await?;
    Ok(Json(SessionInfo::from(&*live)))
}

/// Refuses a session of `more` MiB of guest memory that would take the
/// terminal's running sessions beyond its quota, naming quota and use.
fn memory_quota(st: &AppState, owner: &str, more: u32) -> Result<(), ApiError> {
    let quota = st.limits.max_memory_mib_per_terminal;
    let used = st.sessions.memory_of(owner);
    if used + more > quota {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "memory_quota",
            format!(
                "terminal {owner:?} runs sessions with {used} MiB of guest memory, and this one needs {more} MiB \
                 more: beyond its quota of {quota} MiB (--max-memory-per-terminal-mib); pause or end one first"
            ),
        ));
    }
    Ok(())
}

/// Where to attach a session's terminal.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct AttachTicket {
    /// WebSocket URL to attach at; `null` means this server's own
    /// `/v1/sessions/{id}/attach`, with the caller's token.
    pub url: Option<String>,
}

/// Where to attach. A single server answers "here"; a control plane answers
/// with the URL of the server running the session and a short-lived ticket.
#[utoipa::path(post, path = "/v1/sessions/{id}/attach-ticket", params(("id" = String, Path)),
    responses((status = 200, body = AttachTicket), (status = 404, body = ErrorBody)))]
async fn attach_ticket(
    State(st): St,
    Caller(owner): Caller,
    Path(id): Path<String>,
) -> Result<Json<AttachTicket>, ApiError> {
    mine(&st, &owner, &id)?;
    Ok(Json(AttachTicket { url: None }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportSession {
    /// The paused session's record, as the cluster keeps it.
    #[schema(value_type = Object)]
    record: serde_json::Value,
}

/// Takes in a session paused on another server of the cluster (a control
/// plane's order): it is listed here, paused, and resumes from the shared
/// store.
#[utoipa::path(post, path = "/v1/sessions/import", request_body = ImportSession,
    responses((status = 201, body = SessionInfo), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn import_session(
    State(st): St,
    Caller(owner): Caller,
    Body(req): Body<ImportSession>,
) -> Result<Response, ApiError> {
    if st.cluster.is_none() {
        return Err(ApiError::bad_request("only a server in a cluster (serve --etcd) takes in sessions"));
    }
    let rec: strata_engine::sessions::SessionRecord = serde_json::from_value(req.record)
        .map_err(|e| ApiError::bad_request(format!("the session record is malformed: {e}")))?;
    if rec.labels.get("terminal") != Some(&owner) {
        return Err(ApiError::not_found(format!("no session {} of this terminal", rec.id)));
    }
    st.engine.import_paused(&rec)?;
    let Some(live) = st.sessions.adopt_one(&rec, &st.engine, Some(st.limits.idle_timeout)) else {
        return Err(ApiError::bad_request("the session record lacks its terminal or attach labels"));
    };
    Ok((StatusCode::CREATED, Json(SessionInfo::from(&*live))).into_response())
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TimeoutBody {
    /// Seconds with no terminal attached before the session stops; 0 for never.
    seconds: u64,
}

/// Sets a session's idle time-out.
#[utoipa::path(put, path = "/v1/sessions/{id}/timeout", params(("id" = String, Path)), request_body = TimeoutBody,
    responses((status = 200, body = SessionInfo), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn set_timeout(
    State(st): St,
    Caller(owner): Caller,
    Path(id): Path<String>,
    Body(b): Body<TimeoutBody>,
) -> Result<Json<SessionInfo>, ApiError> {
    let live = mine(&st, &owner, &id)?;
    let t = idle(Some(b.seconds), st.limits.idle_timeout)?;
    live.cmd.send(Cmd::SetTimeout(t)).await.map_err(|_| ApiError::not_found(format!("session {id} has ended")))?;
    *live.idle_timeout.lock().unwrap_or_else(|e| e.into_inner()) = t;
    Ok(Json(SessionInfo::from(&*live)))
}

#[derive(Deserialize)]
struct AttachQuery {
    token: Option<String>,
    /// A control plane's ticket (cluster mode).
    ticket: Option<String>,
    rows: Option<u16>,
    cols: Option<u16>,
    term: Option<String>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Control {
    Resize { rows: u16, cols: u16 },
    Eof,
}

/// The session a WebSocket may reach: by the owner's bearer token, or by the
/// session's attach token (`?token=`, since browsers cannot set headers on
/// a WebSocket). Someone else's session is "not found".
fn authorize_stream(
    st: &AppState,
    id: &str,
    headers: &axum::http::HeaderMap,
    token: Option<&str>,
    ticket: Option<&str>,
) -> Result<Arc<Live>, ApiError> {
    let live = st.sessions.get(id);
    // In a cluster, a control plane's ticket opens the session it names.
    if let (Some(link), Some(ticket)) = (&st.cluster, ticket) {
        return live.filter(|l| link.ticket_opens(id, &l.owner, ticket)).ok_or_else(|| {
            ApiError::not_found(format!("no session {id} (or the ticket has expired; ask for a new one)"))
        });
    }
    let by_owner = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .and_then(|t| st.tokens.read().unwrap_or_else(|e| e.into_inner()).terminal_of(t.trim()));
    let allowed = match (&live, by_owner, token) {
        (Some(l), Some(owner), _) => l.owner == owner,
        (Some(l), None, Some(t)) => auth::matches(t, &l.attach_hash),
        (None, Some(_), _) => false,
        _ => return Err(ApiError::unauthorized()),
    };
    live.filter(|_| allowed).ok_or_else(|| ApiError::not_found(format!("no session {id}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DisplayQuery {
    token: Option<String>,
    ticket: Option<String>,
}

/// The display of a graphical session over WebSocket: binary frames carry
/// the RFB (VNC) protocol both ways, for a viewer such as noVNC. The bytes
/// go between this socket and QEMU's VNC socket of the session.
#[utoipa::path(get, path = "/v1/sessions/{id}/display", params(("id" = String, Path), ("token" = Option<String>, Query)),
    responses((status = 101, description = "WebSocket carrying RFB"), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn session_display(
    State(st): St,
    Path(id): Path<String>,
    Params(q): Params<DisplayQuery>,
    headers: axum::http::HeaderMap,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let live = authorize_stream(&st, &id, &headers, q.token.as_deref(), q.ticket.as_deref())?;
    let vnc =
        live.vnc.clone().ok_or_else(|| ApiError::conflict(format!("{} is not a graphical package", live.package)))?;
    let stream = tokio::net::UnixStream::connect(&vnc)
        .await
        .map_err(|e| ApiError::conflict(format!("the display of session {id} is not available: {e}")))?;
    Ok(ws.on_upgrade(move |socket| relay_display(socket, stream)))
}

pub(crate) async fn relay_display(mut socket: WebSocket, stream: tokio::net::UnixStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut rd, mut wr) = stream.into_split();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        tokio::select! {
            n = rd.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => if socket.send(Message::Binary(buf[..n].to_vec().into())).await.is_err() { break },
            },
            msg = socket.recv() => match msg {
                Some(Ok(Message::Binary(b))) => if wr.write_all(&b).await.is_err() { break },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
        }
    }
    let _ = socket.send(Message::Close(None)).await;
}

/// Attaches a terminal over WebSocket. Authenticated by the owner's bearer
/// token or by the session's attach token (`?token=`, for browsers).
#[utoipa::path(get, path = "/v1/sessions/{id}/attach", params(("id" = String, Path), ("token" = Option<String>, Query)),
    responses((status = 101, description = "WebSocket"), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn attach_session(
    State(st): St,
    Path(id): Path<String>,
    Params(q): Params<AttachQuery>,
    headers: axum::http::HeaderMap,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let live = authorize_stream(&st, &id, &headers, q.token.as_deref(), q.ticket.as_deref())?;
    let settings =
        ContextBody { term: q.term, rows: q.rows, cols: q.cols, ..Default::default() }.settings(&live.owner)?;
    // Made here, in the request's scope, so it carries the request id to the guest.
    let ctx = settings.to_terminal_context();
    Ok(ws.on_upgrade(move |socket| pump(socket, live, ctx)))
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
enum ExecStart {
    /// The command: the first frame.
    Exec {
        argv: Vec<String>,
        #[serde(default)]
        env: BTreeMap<String, String>,
        cwd: Option<String>,
        user: Option<String>,
        /// Input follows (binary frames, then `{"type":"eof"}`); else it is
        /// ended at once.
        #[serde(default)]
        stdin: bool,
        /// Run it on a PTY of this size (`{"rows":R,"cols":C}`), resized by
        /// `{"type":"resize","rows":R,"cols":C}`; its output is all stdout.
        tty: Option<WinSize>,
    },
    /// A command that runs already (`GET /v1/sessions/{id}/commands` lists
    /// them), reconnected to: its output from now on, and input if `stdin`.
    Attach {
        id: ProcId,
        #[serde(default)]
        stdin: bool,
    },
}

/// Runs a command in a session with pipes, over WebSocket (what `strata
/// exec` and `run PACKAGE -- CMD` use through a server). The first frame is
/// `{"type":"exec","argv":[...],"env":{},"cwd":null,"user":null,"stdin":bool}`
/// (or `{"type":"attach","id":N,"stdin":bool}` for one that runs);
/// then binary frames carry input, `{"type":"eof"}` ends it; the server
/// sends `{"type":"started","id":N}`, binary frames whose first byte says
/// the stream (1 stdout, 2 stderr), then `{"type":"exit","status":N}`; or
/// `{"type":"moved","server":S,"id":N}` if the session moved to another
/// server, where what the command printed meanwhile is kept for a minute
/// for the client that attaches to it there. Authenticated like attach.
/// A client that goes away leaves the command running.
#[utoipa::path(get, path = "/v1/sessions/{id}/exec", params(("id" = String, Path), ("token" = Option<String>, Query)),
    responses((status = 101, description = "WebSocket"), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn exec_session(
    State(st): St,
    Path(id): Path<String>,
    Params(q): Params<AttachQuery>,
    headers: axum::http::HeaderMap,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let live = authorize_stream(&st, &id, &headers, q.token.as_deref(), q.ticket.as_deref())?;
    Ok(ws.on_upgrade(move |socket| exec_pump(socket, live)))
}

/// The `moved` frame of a command socket (naming command `id`, if it
/// runs), if `live`'s session has moved to another server.
fn moved_frame(live: &Live, id: Option<ProcId>) -> Option<serde_json::Value> {
    let server = live.moved_to.lock().unwrap_or_else(|e| e.into_inner()).clone()?;
    let mut m = serde_json::json!({"type": "moved", "server": server});
    if let Some(id) = id {
        m["id"] = id.into();
    }
    Some(m)
}

async fn exec_pump(mut socket: WebSocket, live: Arc<Live>) {
    let send_text = |v: serde_json::Value| Message::Text(v.to_string().into());
    let error = |m: String| send_text(serde_json::json!({"type": "error", "message": m}));
    let first = match tokio::time::timeout(Duration::from_secs(30), socket.recv()).await {
        Ok(Some(Ok(Message::Text(t)))) => serde_json::from_str::<ExecStart>(&t).map_err(|e| e.to_string()),
        _ => Err("the first frame must be the command, as text".to_string()),
    };
    let size_ok = |s: &WinSize| (1..=1000).contains(&s.rows) && (1..=1000).contains(&s.cols);
    let (out_tx, mut out_rx) = mpsc::channel(16);
    let asked_for = match &first {
        Ok(ExecStart::Attach { id, .. }) => Some(*id),
        _ => None,
    };
    let started = match first {
        Err(e) => Err(format!("not a command: {e}")),
        Ok(ExecStart::Exec { argv, env, cwd, user, stdin, tty }) => {
            let command = GuestCommand { argv, env: env.into_iter().collect(), cwd, user };
            let checked = command.check().and_then(|()| match &tty {
                Some(s) if !size_ok(s) => Err(format!("terminal size {}x{} is out of range 1..1000", s.cols, s.rows)),
                _ => Ok(()),
            });
            match checked {
                Ok(()) => ask(&live, |reply| Cmd::Exec { command, tag: None, stdin, pty: tty, out: out_tx, reply })
                    .await
                    .map(|id| (id, stdin, tty))
                    .map_err(|e| e.message),
                Err(e) => Err(e),
            }
        }
        Ok(ExecStart::Attach { id, stdin }) => {
            let watch = |out| ask(&live, move |reply| Cmd::Watch { id, out, reply });
            match watch(out_tx.clone()).await {
                Ok(_) => Ok((id, stdin, None)),
                // The agent's list makes a command another process started known.
                Err(_) => match crate::live::list_commands(&live).await {
                    Ok(listed) if listed.iter().any(|c| c.id == id) => {
                        watch(out_tx).await.map(|_| (id, stdin, None)).map_err(|e| e.message)
                    }
                    Ok(_) => Err(format!("no running command {id} in session {}", live.id)),
                    Err(e) => Err(e),
                },
            }
        }
    };
    let (id, stdin, tty) = match started {
        Ok(x) => x,
        Err(e) => {
            // Asked while the session moved: the request goes where it
            // went (a new command is started there, never here).
            match moved_frame(&live, asked_for) {
                Some(m) => hand_back_input(&mut socket, m, Vec::new(), false).await,
                None => {
                    let _ = socket.send(error(e)).await;
                }
            }
            return;
        }
    };
    // Its id, to watch it again (`{"type":"attach","id":N}`), here or
    // where the session moves.
    if socket.send(send_text(serde_json::json!({"type": "started", "id": id}))).await.is_err() {
        return;
    }
    let input = |data: Option<Vec<u8>>| {
        let live = live.clone();
        async move {
            let (tx, rx) = oneshot::channel();
            if live.cmd.send(Cmd::CommandInput { id, data, reply: tx }).await.is_err() {
                return Err("the session has ended".to_string());
            }
            rx.await.unwrap_or_else(|_| Err("the session has ended".into()))
        }
    };
    // The session moved to another server: the client attaches to the
    // command there (`{"type":"attach","id":N}`) and sends again what did
    // not reach it here.
    let moved = |live: &Live| moved_frame(live, Some(id));
    let mut reading = stdin;
    loop {
        tokio::select! {
            msg = socket.recv(), if reading => match msg {
                Some(Ok(Message::Binary(d))) => {
                    if let Err(e) = input(Some(d.to_vec())).await {
                        match moved(&live) {
                            Some(m) => hand_back_input(&mut socket, m, d.to_vec(), false).await,
                            None => { let _ = socket.send(error(e)).await; }
                        }
                        return;
                    }
                }
                Some(Ok(Message::Text(t))) if t.as_str() == r#"{"type":"eof"}"# => {
                    reading = false;
                    if input(None).await.is_err() {
                        if let Some(m) = moved(&live) {
                            hand_back_input(&mut socket, m, Vec::new(), true).await;
                            return;
                        }
                    }
                }
                Some(Ok(Message::Text(t))) if tty.is_some() && t.contains(r#""resize""#) => {
                    match serde_json::from_str::<Control>(&t) {
                        Ok(Control::Resize { rows, cols }) if size_ok(&WinSize { rows, cols }) => {
                            let (tx, rx) = oneshot::channel();
                            let size = WinSize { rows, cols };
                            if live.cmd.send(Cmd::CommandResize { id, size, reply: tx }).await.is_ok() {
                                let _ = rx.await;
                            }
                        }
                        _ => { let _ = socket.send(error("a resize needs rows and cols in 1..1000".into())).await; }
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                // The client went: the command runs on.
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {
                    let _ = socket.send(error("unknown frame: send input as binary, or {\"type\":\"eof\"}".into())).await;
                }
            },
            out = out_rx.recv() => {
                let frame = match out {
                    Some(CommandOut::Stdout(d)) => Message::Binary([&[1u8][..], &d].concat().into()),
                    Some(CommandOut::Stderr(d)) => Message::Binary([&[2u8][..], &d].concat().into()),
                    Some(CommandOut::Exit(status)) => {
                        let _ = socket.send(send_text(serde_json::json!({"type": "exit", "status": status}))).await;
                        let _ = socket.send(Message::Close(None)).await;
                        return;
                    }
                    None => {
                        match moved(&live) {
                            Some(m) => hand_back_input(&mut socket, m, Vec::new(), false).await,
                            None => {
                                let lost = serde_json::json!({"type": "lost", "reason": "the session has ended"});
                                let _ = socket.send(send_text(lost)).await;
                            }
                        }
                        return;
                    }
                };
                if socket.send(frame).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct CommandEntry {
    /// The command's id in the session (what `exec` printed).
    id: u32,
    argv: Vec<String>,
    /// It runs on a pseudo-terminal.
    pty: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    tag: Option<String>,
}

/// The commands that run in a session (started with pipes or on a PTY, by
/// this server or any strata process).
#[utoipa::path(get, path = "/v1/sessions/{id}/commands", params(("id" = String, Path)),
    responses((status = 200, body = [CommandEntry]), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn list_session_commands(
    State(st): St,
    Caller(owner): Caller,
    Path(id): Path<String>,
) -> Result<Json<Vec<CommandEntry>>, ApiError> {
    let live = mine(&st, &owner, &id)?;
    let listed = crate::live::list_commands(&live).await.map_err(ApiError::conflict)?;
    Ok(Json(
        listed.into_iter().map(|c| CommandEntry { id: c.id, argv: c.command.argv, pty: c.pty, tag: c.tag }).collect(),
    ))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalBody {
    /// A signal number (1 to 64), e.g. 15 (TERM) or 9 (KILL).
    signal: i32,
}

/// Sends a signal to a running command and its process group.
#[utoipa::path(post, path = "/v1/sessions/{id}/commands/{command}/signal", params(("id" = String, Path), ("command" = u32, Path)),
    request_body = SignalBody, responses((status = 204), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn signal_command(
    State(st): St,
    Caller(owner): Caller,
    Path((id, command)): Path<(String, ProcId)>,
    Body(body): Body<SignalBody>,
) -> Result<StatusCode, ApiError> {
    if !(1..=64).contains(&body.signal) {
        return Err(ApiError::bad_request(format!("signal {} is not a signal number (1 to 64)", body.signal)));
    }
    let live = mine(&st, &owner, &id)?;
    let listed = crate::live::list_commands(&live).await.map_err(ApiError::conflict)?;
    if !listed.iter().any(|c| c.id == command) {
        return Err(ApiError::not_found(format!("no running command {command} in session {id}")));
    }
    ask(&live, |reply| Cmd::Signal { id: command, signal: body.signal, reply }).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// How long a terminal told that its session moved has to close its side.
const HAND_BACK_PATIENCE: Duration = Duration::from_secs(10);

/// Tells a client that its session moved (`moved`: the `moved` frame),
/// with the input it sent that did not reach the guest here (`unsent`, and
/// `eof` if its end of input did not); then, until the client closes its
/// side, hands back whatever else it sends (`unsent` frames): it sends all
/// of it again where the session went, in order.
async fn hand_back_input(socket: &mut WebSocket, mut moved: serde_json::Value, unsent: Vec<u8>, eof: bool) {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    moved["unsent"] = b64.encode(&unsent).into();
    if eof {
        moved["eof"] = true.into();
    }
    if socket.send(Message::Text(moved.to_string().into())).await.is_err() {
        return;
    }
    let end = tokio::time::Instant::now() + HAND_BACK_PATIENCE;
    while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(end, socket.recv()).await {
        let more = match msg {
            Message::Binary(d) => serde_json::json!({"type": "unsent", "unsent": b64.encode(&d)}),
            Message::Text(t) if t.as_str() == r#"{"type":"eof"}"# => {
                serde_json::json!({"type": "unsent", "unsent": "", "eof": true})
            }
            Message::Close(_) => break,
            _ => continue,
        };
        if socket.send(Message::Text(more.to_string().into())).await.is_err() {
            return;
        }
    }
    let _ = socket.send(Message::Close(None)).await;
}

async fn pump(mut socket: WebSocket, live: Arc<Live>, ctx: strata_proto::TerminalContext) {
    let (out_tx, mut out_rx) = mpsc::channel(256);
    let (reply_tx, reply_rx) = oneshot::channel();
    let attach = Cmd::Attach { ctx, out: out_tx, reply: reply_tx };
    if live.cmd.send(attach).await.is_err() {
        let _ = socket.send(Message::Text(r#"{"type":"lost","reason":"the session has ended"}"#.into())).await;
        return;
    }
    let screen = match reply_rx.await {
        Ok(Ok(screen)) => screen,
        Ok(Err(reason)) => {
            let _ = socket
                .send(Message::Text(serde_json::json!({"type": "error", "message": reason}).to_string().into()))
                .await;
            return;
        }
        Err(_) => {
            let _ = socket.send(Message::Text(r#"{"type":"lost","reason":"the session has ended"}"#.into())).await;
            return;
        }
    };
    if socket.send(Message::Binary(screen.into())).await.is_err() {
        let _ = live.cmd.send(Cmd::Detach).await;
        return;
    }
    let mut unsent = Vec::new();
    loop {
        tokio::select! {
            msg = socket.recv() => match msg {
                Some(Ok(Message::Binary(d))) => {
                    // The actor ended (the session moved): kept, to go back.
                    if let Err(mpsc::error::SendError(Cmd::Input(d))) = live.cmd.send(Cmd::Input(d.to_vec())).await {
                        unsent.extend_from_slice(&d);
                    }
                }
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<Control>(&t) {
                    Ok(Control::Resize { rows, cols }) if (1..=1000).contains(&rows) && (1..=1000).contains(&cols) => {
                        let _ = live.cmd.send(Cmd::Resize(WinSize { rows, cols })).await;
                    }
                    Ok(Control::Eof) => { let _ = live.cmd.send(Cmd::Eof).await; }
                    _ => {
                        let _ = socket.send(Message::Text(r#"{"type":"error","message":"unknown control message"}"#.into())).await;
                    }
                },
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                    let _ = live.cmd.send(Cmd::Detach).await;
                    return;
                }
            },
            out = out_rx.recv() => match out {
                Some(Out::Data(d)) => {
                    if socket.send(Message::Binary(d.into())).await.is_err() {
                        let _ = live.cmd.send(Cmd::Detach).await;
                        return;
                    }
                }
                Some(Out::Exit(status)) => {
                    let _ = socket.send(Message::Text(serde_json::json!({"type": "exit", "status": status}).to_string().into())).await;
                    let _ = socket.send(Message::Close(None)).await;
                    return;
                }
                Some(Out::Lost(reason)) => {
                    let _ = socket.send(Message::Text(serde_json::json!({"type": "lost", "reason": reason}).to_string().into())).await;
                    return;
                }
                // The terminal follows: it asks its plane where to attach now.
                Some(Out::Moved { server, unsent: mut queued }) => {
                    queued.extend_from_slice(&unsent);
                    let moved = serde_json::json!({"type": "moved", "server": server});
                    hand_back_input(&mut socket, moved, queued, false).await;
                    return;
                }
                None => return,
            }
        }
    }
}
