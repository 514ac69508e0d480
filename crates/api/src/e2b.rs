//! E2B's API, so that programs written against E2B's SDKs (`e2b` on PyPI
//! and npm) drive strata unchanged. Point the SDK at the server with
//! `E2B_API_URL=http://SERVER/e2b` and `E2B_SANDBOX_URL=http://SERVER/e2b`,
//! and give it a strata API token as `E2B_API_KEY`.
//!
//! A sandbox is a session; a template is a package (E2B's default
//! template, `base`, is [`BASE_TEMPLATE`]). The control plane is E2B's REST
//! API (sandboxes created, listed, paused, connected to, given time-outs,
//! killed); the data plane ([`envd`]) is what E2B's in-guest daemon serves,
//! answered here by the session's actor and the strata guest agent.
//! Sandboxes are sessions of the caller's terminal like any other: `strata
//! ps` lists them, they survive a server restart, and they are confined.

pub mod envd;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::live::{Cmd, EndAction, Live, SessionOptions, State as SessionState};
use crate::AppState;

type St = State<Arc<AppState>>;

/// The envd version strata answers as: the SDKs switch features on by it
/// (0.5.7: closing a command's input, uploads as octet streams).
pub const ENVD_VERSION: &str = "0.5.7";
/// The package E2B's default template, `base`, stands for.
pub const BASE_TEMPLATE: &str = "python3";
/// E2B's default sandbox time-out, in seconds.
const DEFAULT_TIMEOUT_S: u64 = 15;
/// The time-out of a sandbox resumed without one (the SDKs' default).
const RESUME_TIMEOUT_S: u64 = 300;
/// The longest time-out a sandbox may be given, in seconds (a day).
const MAX_TIMEOUT_S: u64 = 86_400;
/// Record labels: the sandbox's metadata and environment (JSON objects).
const METADATA_LABEL: &str = "e2b_metadata";
const ENV_LABEL: &str = "e2b_env";
/// The template name it was created with.
const TEMPLATE_LABEL: &str = "e2b_template";

/// E2B's routes, to be nested under `/e2b`.
pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/sandboxes", get(list_v1).post(create))
        .route("/v2/sandboxes", get(list_v2).post(create))
        .route("/sandboxes/{id}", get(detail).delete(kill))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/refreshes", post(set_timeout))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/metrics", get(metrics))
        .route("/sandboxes/{id}/resume", post(resume))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/v2/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/fork", post(fork))
        .route("/sandboxes/{id}/snapshots", post(snapshot))
        .route("/snapshots", get(list_snapshots))
        .route("/templates/{id}", axum::routing::delete(delete_snapshot))
        .merge(envd::router())
}

/// An error as E2B's API gives it: `{"code": STATUS, "message": "..."}`.
#[derive(Debug)]
pub struct E2bError(pub StatusCode, pub String);

impl From<ApiError> for E2bError {
    fn from(e: ApiError) -> E2bError {
        E2bError(e.status, e.message)
    }
}

impl From<strata_engine::Error> for E2bError {
    fn from(e: strata_engine::Error) -> E2bError {
        ApiError::from(e).into()
    }
}

impl IntoResponse for E2bError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "code": self.0.as_u16(), "message": self.1 });
        (self.0, Json(body)).into_response()
    }
}

fn not_found(id: &str) -> E2bError {
    E2bError(StatusCode::NOT_FOUND, format!("sandbox {id:?} not found"))
}

fn bad_request(m: impl Into<String>) -> E2bError {
    E2bError(StatusCode::BAD_REQUEST, m.into())
}

/// The terminal an API key (a strata API token, in `X-API-KEY` or as a
/// bearer token) names.
pub struct Owner(pub String);

impl FromRequestParts<Arc<AppState>> for Owner {
    type Rejection = E2bError;

    async fn from_request_parts(parts: &mut Parts, state: &Arc<AppState>) -> Result<Owner, E2bError> {
        // A control plane passing a terminal's request on (the cluster's
        // secret, the terminal named).
        if let (Some(link), Some(token)) = (&state.cluster, crate::auth::bearer(parts)) {
            if link.is_secret(token) {
                return parts
                    .headers
                    .get(crate::cluster::TERMINAL_HEADER)
                    .and_then(|h| h.to_str().ok())
                    .filter(|n| crate::auth::valid_terminal(n))
                    .map(|n| Owner(n.to_string()))
                    .ok_or_else(|| {
                        bad_request(format!(
                            "a control plane's request must name its terminal in {}",
                            crate::cluster::TERMINAL_HEADER
                        ))
                    });
            }
        }
        let key = parts
            .headers
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .or_else(|| crate::auth::bearer(parts))
            .ok_or_else(|| {
                E2bError(
                    StatusCode::UNAUTHORIZED,
                    "an API key is required: set E2B_API_KEY to a strata API token (`strata token create TERMINAL`)"
                        .into(),
                )
            })?;
        let tokens = state.tokens.read().unwrap_or_else(|e| e.into_inner());
        match tokens.check(key) {
            Ok(name) => Ok(Owner(name)),
            Err(_) => Err(E2bError(
                StatusCode::UNAUTHORIZED,
                "this API key is not a valid strata API token (unknown or expired)".into(),
            )),
        }
    }
}

/// The token a sandbox's data plane asks for (`X-Access-Token`): derived
/// from the session's attach token (whose hash only the server keeps), so
/// a connect can hand it out again.
pub fn access_token(live: &Live) -> String {
    let mut h = Sha256::new();
    h.update(b"strata e2b envd access\0");
    h.update(live.attach_hash);
    hex::encode(h.finalize())
}

/// The body of `POST /sandboxes` (E2B's `NewSandbox`); other fields E2B
/// defines (network rules, MCP, volumes) are not taken.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewSandbox {
    #[serde(rename = "templateID")]
    template_id: String,
    timeout: Option<u64>,
    #[serde(default)]
    auto_pause: bool,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    #[serde(default)]
    env_vars: BTreeMap<String, String>,
    #[serde(rename = "allow_internet_access")]
    allow_internet_access: Option<bool>,
}

/// E2B's `Sandbox`: what a create, resume or connect answers.
#[derive(Serialize)]
struct SandboxBody {
    #[serde(rename = "templateID")]
    template_id: String,
    #[serde(rename = "sandboxID")]
    sandbox_id: String,
    alias: String,
    #[serde(rename = "clientID")]
    client_id: String,
    #[serde(rename = "envdVersion")]
    envd_version: &'static str,
    #[serde(rename = "envdAccessToken")]
    envd_access_token: String,
    domain: Option<String>,
}

/// E2B's `SandboxDetail` and `ListedSandbox` (the same fields here).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DetailBody {
    #[serde(rename = "templateID")]
    template_id: String,
    #[serde(rename = "sandboxID")]
    sandbox_id: String,
    alias: String,
    #[serde(rename = "clientID")]
    client_id: String,
    started_at: String,
    end_at: String,
    envd_version: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    envd_access_token: Option<String>,
    cpu_count: u32,
    #[serde(rename = "memoryMB")]
    memory_mb: u32,
    #[serde(rename = "diskSizeMB")]
    disk_size_mb: u32,
    metadata: BTreeMap<String, String>,
    state: &'static str,
}

/// The package a template names.
fn package_of(template: &str) -> Result<&str, E2bError> {
    match template.trim() {
        "" => Err(bad_request("templateID is empty: name a strata package (e.g. python3)")),
        "base" => Ok(BASE_TEMPLATE),
        t => Ok(t),
    }
}

/// A time-out in seconds, checked.
fn timeout_of(seconds: Option<u64>) -> Result<Duration, E2bError> {
    let s = seconds.unwrap_or(DEFAULT_TIMEOUT_S);
    if s > MAX_TIMEOUT_S {
        return Err(bad_request(format!("timeout {s} s is above the most allowed, {MAX_TIMEOUT_S} s (a day)")));
    }
    Ok(Duration::from_secs(s))
}

/// This server's name, read once.
fn client_id() -> String {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
    })
    .clone()
}

/// What a sandbox of `package` may write to its disk, in MiB (0 if the
/// package cannot be read).
fn disk_of(st: &AppState, package: &str) -> u32 {
    st.engine.package(package).map(|p| p.def.disk_mib).unwrap_or(0)
}

fn label_json(live: &Live, key: &str) -> BTreeMap<String, String> {
    live.labels.get(key).and_then(|v| serde_json::from_str(v).ok()).unwrap_or_default()
}

/// The environment a sandbox was created with (given to its commands).
pub fn env_of(live: &Live) -> BTreeMap<String, String> {
    label_json(live, ENV_LABEL)
}

fn template_of(live: &Live) -> String {
    live.labels.get(TEMPLATE_LABEL).cloned().unwrap_or_else(|| live.package.clone())
}

fn sandbox_body(live: &Live) -> SandboxBody {
    SandboxBody {
        template_id: template_of(live),
        sandbox_id: live.id.clone(),
        alias: live.package.clone(),
        client_id: client_id(),
        envd_version: ENVD_VERSION,
        envd_access_token: access_token(live),
        domain: None,
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A sandbox's details; `disk` is [`disk_of`] its package.
fn detail_body(live: &Live, disk: u32, with_token: bool) -> DetailBody {
    let state = match *live.state.lock().unwrap_or_else(|e| e.into_inner()) {
        SessionState::Running => "running",
        _ => "paused",
    };
    let end = live.end.lock().unwrap_or_else(|e| e.into_inner()).map(|(at, _)| at);
    DetailBody {
        template_id: template_of(live),
        sandbox_id: live.id.clone(),
        alias: live.package.clone(),
        client_id: client_id(),
        started_at: rfc3339(live.created),
        end_at: rfc3339(end.unwrap_or(SystemTime::now() + Duration::from_secs(MAX_TIMEOUT_S))),
        envd_version: ENVD_VERSION,
        envd_access_token: with_token.then(|| access_token(live)),
        cpu_count: 1,
        memory_mb: live.memory_mib,
        disk_size_mb: disk,
        metadata: label_json(live, METADATA_LABEL),
        state,
    }
}

/// One of the caller's sandboxes.
fn mine(st: &AppState, owner: &str, id: &str) -> Result<Arc<Live>, E2bError> {
    st.sessions.get(id).filter(|l| l.owner == owner).ok_or_else(|| not_found(id))
}

async fn ask<T>(
    live: &Live,
    make: impl FnOnce(tokio::sync::oneshot::Sender<Result<T, String>>) -> Cmd,
) -> Result<T, E2bError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    live.cmd.send(make(tx)).await.map_err(|_| not_found(&live.id))?;
    rx.await.map_err(|_| not_found(&live.id))?.map_err(|e| E2bError(StatusCode::CONFLICT, e))
}

fn end_of(timeout: Duration, auto_pause: bool) -> Option<(SystemTime, EndAction)> {
    Some((SystemTime::now() + timeout, if auto_pause { EndAction::Pause } else { EndAction::Kill }))
}

async fn create(State(st): St, Owner(owner): Owner, body: axum::body::Bytes) -> Result<Response, E2bError> {
    let req: NewSandbox = serde_json::from_slice(&body)
        .map_err(|e| bad_request(format!("the sandbox request is not valid JSON of E2B's NewSandbox: {e}")))?;
    let package = package_of(&req.template_id)?;
    let timeout = timeout_of(req.timeout)?;
    for (k, v) in &req.env_vars {
        strata_engine::context::check_env(k, v).map_err(bad_request)?;
    }
    // A template that names one of the terminal's snapshots: a sandbox of
    // its whole state (`Sandbox.create(snapshot_id)`).
    if let Some(image) = own_snapshot(&st, &owner, package)? {
        let memory_mib = image.meta.get("memory_mib").and_then(|m| m.parse().ok()).unwrap_or(0);
        crate::routes::room_for(&st, &owner, 1, memory_mib)?;
        let session = st.engine.start_from_snapshot(&image, None).await?;
        let live = start_sandbox(&st, session, &owner, sandbox_labels(&req), end_of(timeout, req.auto_pause))?;
        tracing::info!(session = %live.id, snapshot = %package, "E2B sandbox created from a snapshot");
        return Ok((StatusCode::CREATED, Json(sandbox_body(&live))).into_response());
    }
    let outbound = req.allow_internet_access.unwrap_or(true);
    let settings = crate::routes::default_settings(&owner, outbound)?;
    // No idle time-out: E2B's time-out ends (or pauses) it.
    let options = SessionOptions { idle: None, labels: sandbox_labels(&req), end: end_of(timeout, req.auto_pause) };
    // From the server's pool of sessions made for E2B's API, if it keeps one.
    let os = crate::routes::os_of(&st, None, Some(&settings))?;
    let (live, _attach) = crate::routes::launch_for(&st, &owner, package, os, None, true, settings, options).await?;
    tracing::info!(session = %live.id, template = %req.template_id, "E2B sandbox created");
    Ok((StatusCode::CREATED, Json(sandbox_body(&live))).into_response())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListQuery {
    /// `key=value&key2=value2`, URL-encoded as a whole.
    metadata: Option<String>,
    /// `running`, `paused`, or both, comma-separated.
    state: Option<String>,
    limit: Option<usize>,
    next_token: Option<String>,
}

fn listed(st: &AppState, owner: &str, q: &ListQuery) -> Result<Vec<DetailBody>, E2bError> {
    // The SDKs URL-encode `key=value&...` once more as the parameter's value.
    let want: BTreeMap<String, String> = match q.metadata.as_deref().filter(|m| !m.is_empty()) {
        Some(m) => serde_urlencoded::from_str(m)
            .map_err(|e| bad_request(format!("metadata filter {m:?} is not key=value&...: {e}")))?,
        None => BTreeMap::new(),
    };
    let states: Vec<&str> = q.state.as_deref().map(|s| s.split(',').map(str::trim).collect()).unwrap_or_default();
    if let Some(bad) = states.iter().find(|s| !["running", "paused"].contains(s)) {
        return Err(bad_request(format!("state {bad:?} is neither running nor paused")));
    }
    let mut disks = BTreeMap::new();
    Ok(st
        .sessions
        .all()
        .iter()
        .filter(|l| l.owner == owner)
        // Each package's definition is read once per listing.
        .map(|l| {
            let disk = *disks.entry(l.package.clone()).or_insert_with(|| disk_of(st, &l.package));
            detail_body(l, disk, false)
        })
        .filter(|d| states.is_empty() || states.contains(&d.state))
        .filter(|d| want.iter().all(|(k, v)| d.metadata.get(k) == Some(v)))
        .collect())
}

async fn list_v1(State(st): St, Owner(owner): Owner, Query(q): Query<ListQuery>) -> Result<Response, E2bError> {
    Ok(Json(listed(&st, &owner, &q)?).into_response())
}

/// Pages of `limit` (default 100), the next one's token (an offset) in
/// `x-next-token`.
async fn list_v2(State(st): St, Owner(owner): Owner, Query(q): Query<ListQuery>) -> Result<Response, E2bError> {
    page_of(listed(&st, &owner, &q)?, q.limit, q.next_token.as_deref())
}

/// One page of `all`: `limit` items (default 100) from the offset in
/// `next_token`, the next page's token in `x-next-token`.
fn page_of<T: Serialize>(all: Vec<T>, limit: Option<usize>, next_token: Option<&str>) -> Result<Response, E2bError> {
    let limit = limit.unwrap_or(100).clamp(1, 1000);
    let from = match next_token.filter(|t| !t.is_empty()) {
        Some(t) => {
            t.parse::<usize>().map_err(|_| bad_request(format!("nextToken {t:?} is not one this server gave")))?
        }
        None => 0,
    };
    let page: Vec<_> = all.into_iter().skip(from).collect();
    let more = page.len() > limit;
    let page: Vec<_> = page.into_iter().take(limit).collect();
    let mut resp = Json(page).into_response();
    if more {
        if let Ok(v) = (from + limit).to_string().parse() {
            resp.headers_mut().insert("x-next-token", v);
        }
    }
    Ok(resp)
}

async fn detail(State(st): St, Owner(owner): Owner, Path(id): Path<String>) -> Result<Response, E2bError> {
    let live = mine(&st, &owner, &id)?;
    Ok(Json(detail_body(&live, disk_of(&st, &live.package), true)).into_response())
}

async fn kill(State(st): St, Owner(owner): Owner, Path(id): Path<String>) -> Result<StatusCode, E2bError> {
    let live = mine(&st, &owner, &id)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    if live.cmd.send(Cmd::Kill(tx)).await.is_ok() {
        let _ = rx.await;
    }
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, Default)]
struct TimeoutBody {
    #[serde(alias = "duration")]
    timeout: Option<u64>,
}

/// A small JSON body; an empty one is the default (`shape` says what is
/// expected, for the error).
fn body_of<T: serde::de::DeserializeOwned + Default>(body: &[u8], shape: &str) -> Result<T, E2bError> {
    if body.is_empty() {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| bad_request(format!("expected {shape}: {e}")))
}

/// Whether the sandbox pauses (rather than ends) at its time-out.
fn pauses_at_end(live: &Live) -> bool {
    live.end.lock().unwrap_or_else(|e| e.into_inner()).is_some_and(|(_, a)| a == EndAction::Pause)
}

/// `POST .../timeout` (`{"timeout": SECONDS}`) and `.../refreshes`
/// (`{"duration": SECONDS}`, or nothing for the default): the sandbox
/// ends (or pauses) that long from now.
async fn set_timeout(
    State(st): St,
    Owner(owner): Owner,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<StatusCode, E2bError> {
    let live = mine(&st, &owner, &id)?;
    let req: TimeoutBody = body_of(&body, "{\"timeout\": SECONDS}")?;
    let timeout = timeout_of(req.timeout)?;
    let _ = live.cmd.send(Cmd::SetEnd(end_of(timeout, pauses_at_end(&live)))).await;
    Ok(StatusCode::NO_CONTENT)
}

fn is_paused(live: &Live) -> bool {
    *live.state.lock().unwrap_or_else(|e| e.into_inner()) == SessionState::Paused
}

async fn pause(State(st): St, Owner(owner): Owner, Path(id): Path<String>) -> Result<StatusCode, E2bError> {
    let live = mine(&st, &owner, &id)?;
    if is_paused(&live) {
        return Err(E2bError(StatusCode::CONFLICT, format!("sandbox {id:?} is already paused")));
    }
    ask(&live, |r| Cmd::Pause("paused by its terminal (E2B pause)".into(), r)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ConnectBody {
    timeout: Option<u64>,
    #[serde(default)]
    auto_pause: Option<bool>,
}

/// Resumes a paused sandbox (201) or finds it running (200). A time-out
/// given to a running sandbox only ever lengthens its life; a resumed one
/// gets it from now (by default, [`RESUME_TIMEOUT_S`]).
async fn connect(
    State(st): St,
    Owner(owner): Owner,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, E2bError> {
    let live = mine(&st, &owner, &id)?;
    let req: ConnectBody = body_of(&body, "{\"timeout\": SECONDS}")?;
    let resumed = is_paused(&live);
    let auto_pause = req.auto_pause.unwrap_or_else(|| pauses_at_end(&live));
    let current = *live.end.lock().unwrap_or_else(|e| e.into_inner());
    let end = match (resumed, req.timeout) {
        (true, t) => end_of(timeout_of(Some(t.unwrap_or(RESUME_TIMEOUT_S)))?, auto_pause),
        (false, Some(t)) => match (current, end_of(timeout_of(Some(t))?, auto_pause)) {
            (Some((at, _)), Some((new, action))) => Some((at.max(new), action)),
            (_, asked) => asked,
        },
        (false, None) => current,
    };
    if resumed {
        ask(&live, Cmd::Resume).await?;
    }
    // The record is written only when the end time changes.
    if end != current {
        let _ = live.cmd.send(Cmd::SetEnd(end)).await;
    }
    let status = if resumed { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(sandbox_body(&live))).into_response())
}

/// The older resume call: 409 if it runs.
async fn resume(
    State(st): St,
    Owner(owner): Owner,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, E2bError> {
    let live = mine(&st, &owner, &id)?;
    if !is_paused(&live) {
        return Err(E2bError(StatusCode::CONFLICT, format!("sandbox {id:?} is already running")));
    }
    connect(State(st), Owner(owner), Path(id), body).await
}

/// What the guest reports of its CPU (two samples of /proc/stat 0.2 s
/// apart), memory (/proc/meminfo) and root file system (df).
const SAMPLE: &str = "head -1 /proc/stat; sleep 0.2; head -1 /proc/stat; cat /proc/meminfo; df -P -B1 / | tail -1";

/// One of E2B's metric samples from [`SAMPLE`]'s output.
fn metric_of(out: &str, at: SystemTime) -> Option<serde_json::Value> {
    let lines: Vec<&str> = out.lines().collect();
    let cpu = |l: &str| -> Option<(u64, u64)> {
        let v: Vec<u64> = l.strip_prefix("cpu ")?.split_whitespace().filter_map(|n| n.parse().ok()).collect();
        let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
        Some((v.iter().sum(), idle))
    };
    let ((t0, i0), (t1, i1)) = (cpu(lines.first()?)?, cpu(lines.get(1)?)?);
    let busy = match t1.saturating_sub(t0) {
        0 => 0.0,
        dt => 100.0 * (1.0 - i1.saturating_sub(i0) as f64 / dt as f64),
    };
    let kib = |key: &str| -> Option<u64> {
        let l = lines.iter().find(|l| l.starts_with(key))?;
        l[key.len()..].split_whitespace().next()?.parse::<u64>().ok().map(|k| k * 1024)
    };
    let (total, available, cached) = (kib("MemTotal:")?, kib("MemAvailable:")?, kib("Cached:").unwrap_or(0));
    let df: Vec<u64> = lines.last()?.split_whitespace().skip(1).take(2).filter_map(|n| n.parse().ok()).collect();
    let unix = at.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    Some(serde_json::json!({
        "timestamp": rfc3339(at),
        "timestampUnix": unix,
        "cpuCount": 1,
        "cpuUsedPct": (busy * 100.0).round() / 100.0,
        "memUsed": total.saturating_sub(available),
        "memTotal": total,
        "memCache": cached,
        "diskUsed": df.get(1)?,
        "diskTotal": df.first()?,
    }))
}

/// The sandbox's use of CPU, memory and disk now, as its guest sees it
/// (none while paused).
async fn metrics(State(st): St, Owner(owner): Owner, Path(id): Path<String>) -> Result<Response, E2bError> {
    let live = mine(&st, &owner, &id)?;
    if is_paused(&live) {
        return Ok(Json(Vec::<serde_json::Value>::new()).into_response());
    }
    let f = envd::run(&live, &["sh", "-c", SAMPLE], None).await.map_err(|e| E2bError(StatusCode::CONFLICT, e.1))?;
    let sample = metric_of(&String::from_utf8_lossy(&f.stdout), SystemTime::now()).ok_or_else(|| {
        E2bError(StatusCode::INTERNAL_SERVER_ERROR, format!("the guest's figures could not be read: {}", f.stderr))
    })?;
    Ok(Json(vec![sample]).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_time_outs_and_errors_are_checked() {
        assert_eq!(package_of("base").unwrap(), BASE_TEMPLATE);
        assert_eq!(package_of(" bc ").unwrap(), "bc");
        assert!(package_of("  ").is_err());
        assert_eq!(timeout_of(None).unwrap(), Duration::from_secs(DEFAULT_TIMEOUT_S));
        assert!(timeout_of(Some(MAX_TIMEOUT_S + 1)).unwrap_err().1.contains("a day"));
        let r = E2bError(StatusCode::NOT_FOUND, "gone".into()).into_response();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn metrics_are_read_from_the_guests_figures() {
        let out = "cpu  100 0 100 800 0 0 0 0 0 0\ncpu  150 0 150 900 0 0 0 0 0 0\n\
                   MemTotal:  500000 kB\nMemFree: 1 kB\nMemAvailable:  300000 kB\nCached:  1000 kB\n\
                   /dev/vda 8000000000 2000000000 6000000000 25% /\n";
        let m = metric_of(out, SystemTime::UNIX_EPOCH).unwrap();
        assert_eq!(m["cpuUsedPct"], 50.0);
        assert_eq!(m["memUsed"], 200_000 * 1024);
        assert_eq!(m["memCache"], 1000 * 1024);
        assert_eq!(m["diskTotal"], 8_000_000_000u64);
        assert_eq!(m["diskUsed"], 2_000_000_000u64);
        assert!(metric_of("nonsense", SystemTime::UNIX_EPOCH).is_none());
    }

    #[test]
    fn a_sandbox_detail_has_the_fields_the_sdks_require() {
        let d = DetailBody {
            template_id: "python3".into(),
            sandbox_id: "abc".into(),
            alias: "python3".into(),
            client_id: "h".into(),
            started_at: rfc3339(SystemTime::UNIX_EPOCH),
            end_at: rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(60)),
            envd_version: ENVD_VERSION,
            envd_access_token: None,
            cpu_count: 1,
            memory_mb: 512,
            disk_size_mb: 2048,
            metadata: BTreeMap::new(),
            state: "running",
        };
        let v = serde_json::to_value(&d).unwrap();
        for k in [
            "templateID",
            "sandboxID",
            "clientID",
            "startedAt",
            "endAt",
            "envdVersion",
            "cpuCount",
            "memoryMB",
            "diskSizeMB",
            "state",
        ] {
            assert!(v.get(k).is_some(), "{k} missing from {v}");
        }
        assert_eq!(v["endAt"], "1970-01-01T00:01:00Z");
        assert!(v.get("envdAccessToken").is_none());
    }
}

/// The record labels of a sandbox made by `req`: its metadata, environment
/// and template.
fn sandbox_labels(req: &NewSandbox) -> BTreeMap<String, String> {
    let json = |m: &BTreeMap<String, String>| serde_json::to_string(m).unwrap_or_default();
    BTreeMap::from([
        (METADATA_LABEL.to_string(), json(&req.metadata)),
        (ENV_LABEL.to_string(), json(&req.env_vars)),
        (TEMPLATE_LABEL.to_string(), req.template_id.clone()),
    ])
}

/// Gives a session started from a snapshot an actor, as an E2B sandbox of
/// terminal `owner` with `labels` and its end.
fn start_sandbox(
    st: &Arc<AppState>,
    session: strata_engine::Session,
    owner: &str,
    labels: BTreeMap<String, String>,
    end: Option<(SystemTime, EndAction)>,
) -> Result<Arc<Live>, E2bError> {
    let settings = st.engine.session_settings(&session.id);
    // No idle time-out: E2B's time-out ends (or pauses) it.
    let options = SessionOptions { idle: None, labels, end };
    Ok(crate::routes::register_live(st, session, owner, settings, options)?.0)
}

/// Whether snapshot `image` was taken of a session of terminal `owner`.
fn taken_by(image: &strata_store::ImageRecord, owner: &str) -> bool {
    image.meta.get(strata_engine::fork::TERMINAL_META).map(String::as_str) == Some(owner)
}

/// Terminal `owner`'s named snapshots, newest first.
fn terminal_snapshots(st: &AppState, owner: &str) -> Result<Vec<strata_store::ImageRecord>, E2bError> {
    Ok(st.engine.named_snapshots()?.into_iter().filter(|i| taken_by(i, owner)).collect())
}

/// The snapshot named `name` if it is terminal `owner`'s (found by its
/// name: every create asks).
fn own_snapshot(st: &AppState, owner: &str, name: &str) -> Result<Option<strata_store::ImageRecord>, E2bError> {
    Ok(st.engine.named_snapshot(name)?.filter(|i| taken_by(i, owner)))
}

/// The body of `POST /sandboxes/{id}/fork`.
#[derive(Deserialize, Default)]
struct ForkBody {
    timeout: Option<u64>,
    count: Option<usize>,
}

/// The most copies one E2B fork makes (as E2B's API).
const MAX_E2B_FORKS: usize = 20;

/// E2B's fork: the sandbox's whole state is saved while it runs on (its id
/// and end time untouched), then `count` sandboxes start from it, each
/// with the parent's metadata and environment and an end time of its own.
/// Each copy's outcome is listed.
async fn fork(
    State(st): St,
    Owner(owner): Owner,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, E2bError> {
    let req: ForkBody = body_of(&body, "{\"count\": N, \"timeout\": SECONDS}")?;
    let count = req.count.unwrap_or(1);
    if !(1..=MAX_E2B_FORKS).contains(&count) {
        return Err(bad_request(format!("count {count} is out of range: a fork makes 1 to {MAX_E2B_FORKS} sandboxes")));
    }
    let timeout = timeout_of(req.timeout)?;
    let live = mine(&st, &owner, &id)?;
    if is_paused(&live) {
        return Err(E2bError(StatusCode::CONFLICT, format!("sandbox {id} is paused; connect to it first")));
    }
    crate::routes::room_for(&st, &owner, count, live.memory_mib)?;
    let captured = ask(&live, |reply| Cmd::Snapshot { name: None, reply }).await?;
    let (snap, started) = st.engine.fork_captured(captured, count, None).await?;
    let labels: BTreeMap<String, String> = [METADATA_LABEL, ENV_LABEL, TEMPLATE_LABEL]
        .iter()
        .filter_map(|k| live.labels.get(*k).map(|v| (k.to_string(), v.clone())))
        .collect();
    let mut results = Vec::new();
    for started in started {
        let sandbox = started
            .map_err(E2bError::from)
            .and_then(|session| start_sandbox(&st, session, &owner, labels.clone(), end_of(timeout, false)));
        results.push(match sandbox {
            Ok(copy) => serde_json::json!({ "sandbox": sandbox_body(&copy) }),
            Err(E2bError(code, message)) => {
                serde_json::json!({ "error": { "code": code.as_u16(), "message": message } })
            }
        });
    }
    tracing::info!(session = %id, copies = count, stopped_ms = snap.stopped.as_secs_f64() * 1e3, "E2B sandbox forked");
    Ok((StatusCode::CREATED, Json(results)).into_response())
}

/// The body of `POST /sandboxes/{id}/snapshots`.
#[derive(Deserialize, Default)]
struct SnapshotBody {
    name: Option<String>,
    /// `false` asks for the file system only, which strata does not make.
    memory: Option<bool>,
}

/// E2B's snapshot: a named snapshot of the sandbox's whole state, taken
/// while it runs on; `Sandbox.create(snapshot_id)` starts sandboxes from it.
async fn snapshot(
    State(st): St,
    Owner(owner): Owner,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, E2bError> {
    let req: SnapshotBody = body_of(&body, "{\"name\": NAME}")?;
    if req.memory == Some(false) {
        return Err(bad_request(
            "file-system-only snapshots are not made here: every snapshot holds the sandbox's memory too; leave out mode",
        ));
    }
    let live = mine(&st, &owner, &id)?;
    if is_paused(&live) {
        return Err(E2bError(StatusCode::CONFLICT, format!("sandbox {id} is paused; connect to it first")));
    }
    let name = match req.name {
        Some(n) => n,
        None => format!(
            "snapshot-{id}-{}",
            &crate::auth::new_token().map_err(|e| E2bError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?[..8]
        ),
    };
    strata_engine::fork::check_snapshot_name(&name).map_err(|e| bad_request(e.to_string()))?;
    let captured = ask(&live, |reply| Cmd::Snapshot { name: Some(name.clone()), reply }).await?;
    let snap = st.engine.finish_snapshot(captured).await?;
    st.engine.share_snapshot(&snap.image).await;
    tracing::info!(session = %id, snapshot = %name, "E2B snapshot made");
    Ok((StatusCode::CREATED, Json(serde_json::json!({ "snapshotID": name, "names": [name] }))).into_response())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SnapshotQuery {
    #[serde(rename = "sandboxID")]
    sandbox_id: Option<String>,
    name: Option<String>,
    limit: Option<usize>,
    next_token: Option<String>,
}

/// The terminal's snapshots, newest first (of one sandbox, or by name, if
/// asked), in pages.
async fn list_snapshots(
    State(st): St,
    Owner(owner): Owner,
    Query(q): Query<SnapshotQuery>,
) -> Result<Response, E2bError> {
    let source = |i: &strata_store::ImageRecord| i.meta.get(strata_engine::fork::SOURCE_META).cloned();
    let all: Vec<serde_json::Value> = terminal_snapshots(&st, &owner)?
        .into_iter()
        .filter(|i| q.sandbox_id.as_ref().is_none_or(|s| source(i).as_ref() == Some(s)))
        .filter_map(|i| strata_engine::fork::snapshot_name(&i).map(str::to_string))
        .filter(|n| q.name.as_ref().is_none_or(|want| want == n))
        .map(|n| serde_json::json!({ "snapshotID": n, "names": [n] }))
        .collect();
    page_of(all, q.limit, q.next_token.as_deref())
}

/// Deletes one of the terminal's snapshots (`Sandbox.delete_snapshot`).
async fn delete_snapshot(State(st): St, Owner(owner): Owner, Path(id): Path<String>) -> Result<StatusCode, E2bError> {
    let image = own_snapshot(&st, &owner, &id)?
        .ok_or_else(|| E2bError(StatusCode::NOT_FOUND, format!("snapshot {id:?} not found")))?;
    st.engine.store.remove_image(&image.digest).map_err(|e| E2bError(StatusCode::CONFLICT, e.to_string()))?;
    tracing::info!(snapshot = %id, "E2B snapshot deleted");
    Ok(StatusCode::NO_CONTENT)
}
