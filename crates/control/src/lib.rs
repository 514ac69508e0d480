//! The control plane (`strata control`): the cluster's front door. It takes
//! a terminal's launch request, picks a server by the placement rule over
//! the load the servers report in etcd, orders the launch from that server
//! (HTTP, authenticated with the cluster's secret, acting for the
//! terminal), records the session in etcd and answers where to attach.
//! Terminal bytes never pass through it: a terminal attaches to the server
//! running its session, with a short-lived ticket signed here.
//!
//! A control plane keeps nothing of its own: tokens, servers and sessions
//! are in etcd, so any number can run; one is elected leader and watches
//! over the running sessions of servers that went silent: such a server is
//! only suspect at first (placement leaves it out, its sessions stay
//! `running`), and its sessions are marked `lost` once it has been silent
//! for the grace period. A server that comes back reports its sessions
//! `running` again; its report wins over the plane's guess.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{FromRequestParts, Path as UrlPath, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use strata_api::ApiError;
use strata_cluster::{Cluster, ServerLoad, SessionEntry};
use strata_placement::{Placer, Policy, Request};

mod e2b;

pub mod metrics;

/// What can stop a control plane from starting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Cluster(#[from] strata_cluster::Error),
    #[error("package definitions: {0}")]
    Packages(#[from] strata_package::Error),
    #[error(
        "the cluster token (STRATA_CLUSTER_TOKEN) must be at least 16 characters; `strata token secret` makes one"
    )]
    WeakSecret,
    #[error("HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

/// How many servers a launch is tried on before it fails.
const LAUNCH_ATTEMPTS: usize = 3;
/// A launch may build or fetch images first: minutes under TCG.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Other orders (kill, pause, resume, list) take seconds.
const ORDER_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// The leader's housekeeping period.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(2);
/// How long a server may be silent before its running sessions are marked
/// lost, unless the operator says otherwise (`strata control --lost-after`).
pub const DEFAULT_LOST_AFTER: Duration = Duration::from_secs(30);

/// A control plane.
pub struct ControlPlane {
    cluster: Cluster,
    secret: String,
    /// This plane's name in the election.
    pub name: String,
    placer: Mutex<Placer>,
    http: reqwest::Client,
    packages: strata_package::Registry,
    metrics: metrics::Metrics,
    /// Sessions one terminal may hold across the cluster (running or paused).
    pub max_sessions_per_terminal: usize,
    /// Guest memory one terminal's running sessions may have across the
    /// cluster, in MiB.
    pub max_memory_mib_per_terminal: u64,
    /// How long a server may be silent (its lease lapsed) before its running
    /// sessions are marked lost: until then it is only suspect.
    pub lost_after: Duration,
    /// Terminals that see every session of the cluster and may stop, pause
    /// and resume any (`control --operator`).
    pub operators: BTreeSet<String>,
}

impl ControlPlane {
    /// A control plane over `cluster`, placing by `policy`, with package
    /// definitions (for their memory sizes) from `packages_dir`, trusting
    /// servers' HTTPS certificates signed by `ca_pem`.
    ///
    /// # Errors
    /// If the secret is weak or the definitions do not load.
    pub fn new(
        cluster: Cluster,
        secret: String,
        name: String,
        policy: Policy,
        packages_dir: &Path,
        ca_pem: Option<&[u8]>,
    ) -> Result<ControlPlane, Error> {
        if secret.len() < 16 {
            return Err(Error::WeakSecret);
        }
        let seed =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        // Servers that serve HTTPS are trusted through the given CA only.
        let mut http = reqwest::Client::builder().connect_timeout(Duration::from_secs(3));
        if let Some(pem) = ca_pem {
            http = http.add_root_certificate(reqwest::Certificate::from_pem(pem)?);
        }
        let http = http.build()?;
        let packages = strata_package::Registry::load(packages_dir)?;
        let metrics = metrics::Metrics::new(&name);
        Ok(ControlPlane {
            cluster,
            secret,
            name,
            placer: Mutex::new(Placer::new(policy, seed)),
            http,
            packages,
            metrics,
            max_sessions_per_terminal: 16,
            max_memory_mib_per_terminal: 8192,
            lost_after: DEFAULT_LOST_AFTER,
            operators: BTreeSet::new(),
        })
    }

    /// Campaigns for leadership and, once elected, keeps the session
    /// records honest: the running sessions of a server gone silent are
    /// noted as such at once and marked lost once the grace period
    /// (`lost_after`) has passed. Runs until the process ends; another
    /// plane takes over then. A leadership whose lease lapsed (this process
    /// was stopped or cut off) is campaigned for again.
    pub async fn lead(self: Arc<Self>) {
        loop {
            let leadership = loop {
                match self.cluster.campaign(&self.name, Duration::from_secs(3)).await {
                    Ok(l) => break l,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not campaign for leadership; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            };
            tracing::info!(plane = %self.name, "this control plane leads");
            let mut tick = tokio::time::interval(HOUSEKEEPING_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while leadership.is_held() {
                tick.tick().await;
                if let Err(e) = self.watch_silent_servers().await {
                    tracing::warn!(error = %e, "housekeeping failed; retrying");
                }
            }
            tracing::warn!(plane = %self.name, "this control plane lost its leadership; campaigning again");
        }
    }

    /// One round of the leader's watch over silent servers.
    async fn watch_silent_servers(&self) -> Result<(), strata_cluster::Error> {
        let alive: BTreeSet<String> = self.cluster.servers().await?.into_iter().map(|s| s.id).collect();
        let now = unix_now();
        for (e, revision) in self.cluster.sessions_with_revisions().await? {
            let Some(judged) = judge_silence(&e, &alive, now, self.lost_after) else { continue };
            // Written only if nobody changed the record since it was read:
            // a server that came back meanwhile has the last word.
            if !self.cluster.put_session_if_unchanged(&judged, revision).await? {
                continue;
            }
            if judged.state == "lost" {
                tracing::warn!(session = %e.id, server = %e.server, silent_s = self.lost_after.as_secs(), "the session's server stayed silent past the grace period; marking it lost");
            } else {
                tracing::warn!(session = %e.id, server = %e.server, "the session's server went silent; it is suspect until it comes back or the grace period passes");
            }
        }
        Ok(())
    }

    fn request_for(&self, package: &str) -> Result<Request, ApiError> {
        let pkg = match self.packages.packages.get(package) {
            Some(p) => p.clone(),
            // The plane reads no package lists: a derived package is sized
            // as one without a display (its server sizes it exactly).
            None => strata_package::Package::derived(package, strata_package::DEFAULT_OS, &[])
                .map_err(|e| ApiError::bad_request(e.to_string()))?,
        };
        Ok(Request { memory_mib: u64::from(pkg.def.memory_mib), images: vec![format!("package/{package}")] })
    }

    /// A server for `req`, among those not in `exclude`.
    async fn place(&self, req: &Request, exclude: &[String]) -> Result<ServerLoad, ApiError> {
        // A draining server takes nothing new.
        let draining = self.cluster.draining().await.map_err(unavailable)?;
        let servers: Vec<ServerLoad> = self
            .cluster
            .servers()
            .await
            .map_err(unavailable)?
            .into_iter()
            .filter(|s| !exclude.contains(&s.id) && !draining.contains(&s.id))
            .collect();
        let i = self.placer.lock().unwrap_or_else(|e| e.into_inner()).choose(&servers, req).map_err(|e| {
            let tried = if exclude.is_empty() { String::new() } else { format!(" (tried: {})", exclude.join(", ")) };
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_server", format!("{e}{tried}"))
        })?;
        Ok(servers[i].clone())
    }

    /// A request to a server, authenticated as this plane acting for `terminal`.
    fn request(
        &self,
        server: &ServerLoad,
        terminal: &str,
        method: Method,
        path: &str,
        timeout: Duration,
    ) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", server.address))
            .bearer_auth(&self.secret)
            .header(strata_api::cluster::TERMINAL_HEADER, terminal)
            .timeout(timeout)
    }

    /// Sends an order to a server, acting for `terminal`.
    async fn order(
        &self,
        server: &ServerLoad,
        terminal: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
        timeout: Duration,
    ) -> Result<(StatusCode, Value), reqwest::Error> {
        let mut req = self.request(server, terminal, method, path, timeout);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        let value =
            serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        Ok((status, value))
    }

    /// Whether `caller` sees the sessions of terminal `owner`: its own, or
    /// any for an operator.
    fn sees(&self, caller: &str, owner: &str) -> bool {
        owner == caller || self.operators.contains(caller)
    }

    /// The caller's session record, and its server if that is alive.
    async fn session_of(&self, terminal: &str, id: &str) -> Result<(SessionEntry, Option<ServerLoad>), ApiError> {
        self.find_session(id, |owner| owner == terminal).await
    }

    /// A session the caller may list, stop, pause and resume (its own, or
    /// any for an operator), and its server if that is alive. Orders about
    /// it go to its server in its owner's name.
    async fn managed(&self, caller: &str, id: &str) -> Result<(SessionEntry, Option<ServerLoad>), ApiError> {
        self.find_session(id, |owner| self.sees(caller, owner)).await
    }

    async fn find_session(
        &self,
        id: &str,
        visible: impl Fn(&str) -> bool,
    ) -> Result<(SessionEntry, Option<ServerLoad>), ApiError> {
        let entry = self
            .cluster
            .sessions()
            .await
            .map_err(unavailable)?
            .into_iter()
            .find(|e| e.id == id && visible(&e.owner))
            .ok_or_else(|| ApiError::not_found(format!("no session {id}")))?;
        let server = self.cluster.servers().await.map_err(unavailable)?.into_iter().find(|s| s.id == entry.server);
        Ok((entry, server))
    }

    /// The server that can run the caller's session now: its own, or, for
    /// a paused session whose server is gone, another one that takes it in
    /// from the shared store.
    async fn server_for(&self, terminal: &str, id: &str) -> Result<(SessionEntry, ServerLoad), ApiError> {
        let (mut entry, server) = self.session_of(terminal, id).await?;
        if let Some(s) = server {
            return Ok((entry, s));
        }
        let Some(record) = entry.record.clone().filter(|_| entry.state == "paused") else {
            return Err(unavailable_session(&entry, self.lost_after));
        };
        let req = self.request_for(&entry.package)?;
        let mut tried = vec![entry.server.clone()];
        for _ in 0..LAUNCH_ATTEMPTS {
            let target = self.place(&req, &tried).await?;
            let body = json!({ "record": record });
            match self.order(&target, terminal, Method::POST, "/v1/sessions/import", Some(body), ORDER_TIMEOUT).await {
                Ok((status, _)) if status.is_success() => {
                    tracing::info!(session = %id, from = %entry.server, to = %target.id, "moved a paused session to another server");
                    entry.server = target.id.clone();
                    self.cluster.put_session(&entry).await.map_err(unavailable)?;
                    return Ok((entry, target));
                }
                Ok((status, body)) => return Err(passed_on(status, body)),
                Err(e) => {
                    tracing::warn!(server = %target.id, error = %e, "server unreachable while taking in a session");
                    tried.push(target.id);
                }
            }
        }
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_server",
            format!("no server could take in session {id}"),
        ))
    }
}

/// A running session whose server went silent: 410, and what to do.
fn lost(entry: &SessionEntry) -> ApiError {
    ApiError::new(
        StatusCode::GONE,
        "lost",
        format!("session {} was lost with its server {}; `kill` forgets it", entry.id, entry.server),
    )
}

/// A running session whose server is silent but within its grace period:
/// 503, and that it may come back.
fn suspect(entry: &SessionEntry, now: u64, lost_after: Duration) -> ApiError {
    let silent = entry.unreachable_since.map_or(String::new(), |t| format!(" for {} s", now.saturating_sub(t)));
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_unreachable",
        format!(
            "session {}'s server {} has not answered{silent}; the session is kept for up to {} s for it to come back: try again shortly",
            entry.id,
            entry.server,
            lost_after.as_secs()
        ),
    )
}

/// The error for a session whose server is not registered: lost, or only
/// suspect while in its grace period.
fn unavailable_session(entry: &SessionEntry, lost_after: Duration) -> ApiError {
    if entry.state == "lost" {
        lost(entry)
    } else {
        suspect(entry, unix_now(), lost_after)
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// What the leader writes about a session, given the servers alive now,
/// or `None` to leave it as it is. A running session of a silent server
/// is noted suspect (since when) at once, and marked lost once the server
/// has been silent for `lost_after`. A record its server has already
/// reported again is left alone (the server clears the note itself).
fn judge_silence(e: &SessionEntry, alive: &BTreeSet<String>, now: u64, lost_after: Duration) -> Option<SessionEntry> {
    if e.state != "running" || alive.contains(&e.server) {
        return None;
    }
    let mut out = e.clone();
    match e.unreachable_since {
        None => out.unreachable_since = Some(now),
        Some(since) if now.saturating_sub(since) >= lost_after.as_secs() => out.state = "lost".into(),
        Some(_) => return None,
    }
    Some(out)
}

/// etcd out of reach: a clear 503.
fn unavailable(e: strata_cluster::Error) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "cluster_unavailable", e.to_string())
}

/// A server's own answer, passed on as it is.
fn passed_on(status: StatusCode, body: Value) -> ApiError {
    let code = body["error"]["code"].as_str().unwrap_or("server_error");
    let message = body["error"]["message"].as_str().map_or_else(|| body.to_string(), str::to_string);
    // The code must be 'static: keep the known ones, else a generic one.
    let code: &'static str = match code {
        "bad_request" => "bad_request",
        "not_found" => "not_found",
        "conflict" => "conflict",
        "too_many_sessions" => "too_many_sessions",
        "payload_too_large" => "payload_too_large",
        "launch_failed" => "launch_failed",
        _ => "server_error",
    };
    ApiError::new(status, code, message)
}

fn unreachable(server: &ServerLoad, e: &reqwest::Error) -> ApiError {
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "server_unreachable",
        format!("server {} at {} did not answer: {e}", server.id, server.address),
    )
}

type St = State<Arc<ControlPlane>>;

/// The caller: the terminal its API token (kept hashed in etcd) names.
pub struct User(pub String);

impl FromRequestParts<Arc<ControlPlane>> for User {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, cp: &Arc<ControlPlane>) -> Result<User, ApiError> {
        let token = strata_api::auth::bearer(parts).ok_or_else(ApiError::unauthorized)?;
        cp.terminal_of(token).await.map(User)
    }
}

impl ControlPlane {
    /// The terminal an API token (from etcd) names.
    ///
    /// # Errors
    /// If it names none, has expired, or etcd fails.
    async fn terminal_of(&self, token: &str) -> Result<String, ApiError> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut found = None;
        // Every entry is compared, each in constant time.
        for t in self.cluster.tokens().await.map_err(unavailable)? {
            let hash = hex::decode(&t.hash).ok().and_then(|h| <[u8; 32]>::try_from(h).ok());
            if hash.is_some_and(|h| strata_api::auth::matches(token, &h)) {
                found = Some(t);
            }
        }
        match found {
            None => Err(ApiError::unauthorized()),
            Some(t) if t.expires.is_some_and(|e| e <= now) => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "token_expired",
                "this API token has expired; create a new one with `strata token create TERMINAL --etcd ...`",
            )),
            Some(t) => Ok(t.terminal),
        }
    }
}

/// The control plane's API: the session verbs of a single server's API,
/// placed on the cluster's servers.
pub fn router(cp: Arc<ControlPlane>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/cluster", get(cluster_info))
        .route("/metrics", get(render_metrics))
        .route("/v1/servers", get(list_servers))
        .route("/v1/servers/{id}/drain", post(drain_server).delete(undrain_server))
        .route("/v1/packages", get(list_packages))
        .route("/v1/sessions", get(list_sessions).post(create_session))
        .route("/v1/sessions/{id}", get(get_session).delete(kill_session))
        .route("/v1/sessions/{id}/pause", post(pause_session))
        .route("/v1/sessions/{id}/resume", post(resume_session))
        .route("/v1/sessions/{id}/fork", post(fork_session))
        .route("/v1/sessions/{id}/move", post(move_session))
        .route("/v1/sessions/{id}/snapshot", post(snapshot_session))
        .route("/v1/sessions/{id}/logs", get(session_logs))
        .route("/v1/sessions/{id}/attach-ticket", post(attach_ticket))
        .route("/e2b/{*rest}", axum::routing::any(e2b::forward))
        .route("/files", axum::routing::any(e2b::forward))
        .with_state(cp)
}

async fn cluster_info(State(cp): St) -> Result<Json<Value>, ApiError> {
    let leader = cp.cluster.leader().await.map_err(unavailable)?;
    let servers = cp.cluster.servers().await.map_err(unavailable)?.len();
    Ok(Json(json!({ "plane": cp.name, "leader": leader, "servers": servers, "etcd": cp.cluster.endpoints() })))
}

async fn render_metrics(State(cp): St) -> Result<Response, ApiError> {
    let servers = cp.cluster.servers().await.map_err(unavailable)?.len() as i64;
    let mut states: std::collections::BTreeMap<String, i64> =
        ["running", "paused", "lost"].iter().map(|s| (s.to_string(), 0)).collect();
    // A record's state is what it lists as (suspect sessions stay running).
    for e in cp.cluster.sessions().await.map_err(unavailable)? {
        *states.entry(e.state).or_default() += 1;
    }
    let leader = cp.cluster.leader().await.map_err(unavailable)?.as_deref() == Some(cp.name.as_str());
    let states: Vec<(String, i64)> = states.into_iter().collect();
    Ok((
        [("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        cp.metrics.render(servers, &states, leader),
    )
        .into_response())
}

async fn list_servers(State(cp): St, _u: User) -> Result<Json<Vec<Value>>, ApiError> {
    let servers = cp.cluster.servers().await.map_err(unavailable)?;
    let draining = cp.cluster.draining().await.map_err(unavailable)?;
    let sessions = cp.cluster.sessions().await.map_err(unavailable)?;
    Ok(Json(
        servers
            .into_iter()
            .map(|s| {
                // The same fields a single server reports about itself.
                json!({
                    "name": s.id,
                    "address": s.address,
                    "cpus": s.cpus,
                    "load1": s.load1,
                    "memory_total_mib": s.memory_total_mib,
                    "memory_available_mib": s.memory_free_mib,
                    "guest_memory_committed_mib": s.memory_committed_mib,
                    "sessions": sessions.iter().filter(|e| e.server == s.id).count(),
                    "images": s.cached_images.len(),
                    "blobs_bytes": 0,
                    "cached_packages": s.cached_images.iter().filter_map(|c| c.strip_prefix("package/")).collect::<Vec<_>>(),
                    "draining": draining.contains(&s.id),
                })
            })
            .collect(),
    ))
}

async fn list_packages(State(cp): St, User(terminal): User) -> Result<Response, ApiError> {
    let servers = cp.cluster.servers().await.map_err(unavailable)?;
    let server = servers
        .first()
        .ok_or_else(|| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_server", "no server is registered"))?;
    let (status, body) = cp
        .order(server, &terminal, Method::GET, "/v1/packages", None, ORDER_TIMEOUT)
        .await
        .map_err(|e| unreachable(server, &e))?;
    Ok((status, Json(body)).into_response())
}

/// Whether a session was lost: its server stayed silent past the grace
/// period and the leader marked it so. (A running session of a server that
/// is silent for less is only suspect; a paused one keeps its record and
/// can move.)
fn is_lost(e: &SessionEntry) -> bool {
    e.state == "lost"
}

/// The guest memory `terminal`'s running sessions have across the cluster,
/// in MiB, each package's from `memory_of` (paused and lost sessions hold
/// none).
fn memory_held(entries: &[SessionEntry], terminal: &str, memory_of: impl Fn(&str) -> u64) -> u64 {
    entries.iter().filter(|e| e.owner == terminal && e.state == "running").map(|e| memory_of(&e.package)).sum()
}

/// A session as the cluster lists it (a single server's fields, plus where,
/// and what its server's silences did to it).
fn session_json(e: &SessionEntry, alive: &BTreeSet<String>, now: u64) -> Value {
    let reachable = alive.contains(&e.server);
    // Silent now: for how long, as far as anyone noted (the leader notes it
    // within seconds; before that the silence is known, its start not yet).
    let unreachable_s =
        (!reachable && e.state != "paused").then(|| e.unreachable_since.map(|t| now.saturating_sub(t))).flatten();
    let note = if e.state == "lost" {
        format!("server {} stayed unreachable", e.server)
    } else if !reachable && e.state == "running" {
        match unreachable_s {
            Some(s) => format!("server unreachable for {s} s"),
            None => "server unreachable".to_string(),
        }
    } else {
        e.last_outage_s
            .filter(|_| e.state == "running")
            .map_or(String::new(), |s| format!("server was unreachable {s} s"))
    };
    json!({
        "id": e.id,
        "package": e.package,
        "os": e.os,
        "state": e.state,
        "server": e.server,
        "terminal": e.owner,
        "server_reachable": reachable,
        "unreachable_s": unreachable_s,
        "last_outage_s": e.last_outage_s,
        "note": note,
        "created": e.created,
        "attached": false,
        "idle_timeout_s": null,
        "graphical": false,
        // Paused with its record in etcd: it can resume on another server.
        "movable": e.state == "paused" && e.record.is_some(),
    })
}

async fn alive(cp: &ControlPlane) -> Result<BTreeSet<String>, ApiError> {
    Ok(cp.cluster.servers().await.map_err(unavailable)?.into_iter().map(|s| s.id).collect())
}

async fn list_sessions(State(cp): St, User(terminal): User) -> Result<Json<Vec<Value>>, ApiError> {
    let alive = alive(&cp).await?;
    let mut mine: Vec<SessionEntry> = cp
        .cluster
        .sessions()
        .await
        .map_err(unavailable)?
        .into_iter()
        .filter(|e| cp.sees(&terminal, &e.owner))
        .collect();
    mine.sort_by_key(|e| e.created);
    let now = unix_now();
    Ok(Json(mine.iter().map(|e| session_json(e, &alive, now)).collect()))
}

async fn get_session(
    State(cp): St,
    User(terminal): User,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    let (entry, _) = cp.managed(&terminal, &id).await?;
    Ok(Json(session_json(&entry, &alive(&cp).await?, unix_now())))
}

/// Places a launch and orders it; a server that dies or cannot be reached
/// mid-launch is left out and the launch tried on another.
async fn create_session(State(cp): St, User(terminal): User, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let body = json_body(&body, false)?;
    let package = body["package"]
        .as_str()
        .ok_or_else(|| ApiError::bad_request("the body must name a `package` (a string)"))?
        .to_string();
    strata_package::check_name(&package).map_err(|e| ApiError::bad_request(e.to_string()))?;
    // Each server limits what it runs; the limit per terminal is the cluster's.
    // Lost sessions hold nothing any more; they do not count.
    let entries = cp.cluster.sessions().await.map_err(unavailable)?;
    room_in_cluster(&cp, &entries, &terminal, 1)?;
    memory_room(&cp, &entries, &terminal, &package, 1)?;
    let created = launch_placed(&cp, &terminal, &package, &body).await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

/// Refuses `count` more sessions of `package` for `terminal` beyond its
/// quota of guest memory in the cluster.
fn memory_room(
    cp: &ControlPlane,
    entries: &[SessionEntry],
    terminal: &str,
    package: &str,
    count: usize,
) -> Result<(), ApiError> {
    let req = cp.request_for(package)?;
    let used = memory_held(entries, terminal, |p| cp.request_for(p).map_or(512, |r| r.memory_mib));
    let more = req.memory_mib * count as u64;
    if used + more <= cp.max_memory_mib_per_terminal {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "memory_quota",
        format!(
            "terminal {terminal:?} runs sessions with {used} MiB of guest memory in this cluster, and this needs \
             {more} MiB more: beyond its quota of {} MiB (--max-memory-per-terminal-mib); pause or end one first",
            cp.max_memory_mib_per_terminal
        ),
    ))
}

/// Launches `body` (naming `package`) on a server placement picks, trying
/// another if one fails mid-way; lists the session at once. What the
/// server answered, with its id in `session.server`.
async fn launch_placed(cp: &ControlPlane, terminal: &str, package: &str, body: &Value) -> Result<Value, ApiError> {
    let req = cp.request_for(package)?;
    let started = std::time::Instant::now();
    let (server, _, mut created) = order_placed(cp, terminal, &req, package, "/v1/sessions", body).await?;
    let id = created["session"]["id"].as_str().unwrap_or_default().to_string();
    let created_at = created["session"]["created"].as_u64().unwrap_or(0);
    let os = created["session"]["os"].as_str().map(str::to_string);
    let entry = SessionEntry { os, ..SessionEntry::running(&id, &server.id, package, terminal, created_at) };
    // The server records it too, within seconds; this makes it listed at once.
    if let Err(e) = cp.cluster.put_session(&entry).await {
        tracing::warn!(session = %entry.id, error = %e, "could not record the session yet; its server will");
    }
    created["session"]["server"] = json!(server.id);
    let labels = metrics::PackageLabels { package: package.to_string() };
    cp.metrics.launch_seconds.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
    Ok(created)
}

/// Orders `POST path` with `body` (a launch of `package`, sized by `req`)
/// from a server placement picks, trying another if one fails midway: the
/// server, and its answer.
async fn order_placed(
    cp: &ControlPlane,
    terminal: &str,
    req: &Request,
    package: &str,
    path: &str,
    body: &Value,
) -> Result<(ServerLoad, StatusCode, Value), ApiError> {
    let mut tried: Vec<String> = Vec::new();
    for _ in 0..LAUNCH_ATTEMPTS {
        let server = cp.place(req, &tried).await?;
        tracing::info!(package, server = %server.id, "launch placed");
        match cp.order(&server, terminal, Method::POST, path, Some(body.clone()), LAUNCH_TIMEOUT).await {
            Ok((status, created)) if status.is_success() => {
                cp.metrics.count(&server.id, "launched");
                return Ok((server, status, created));
            }
            Ok((status, answer)) => {
                cp.metrics.count(&server.id, "refused");
                return Err(passed_on(status, answer));
            }
            Err(e) => {
                tracing::warn!(server = %server.id, error = %e, "server failed mid-launch; trying another");
                cp.metrics.count(&server.id, "unreachable");
                tried.push(server.id);
            }
        }
    }
    Err(ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "launch_failed",
        format!(
            "the launch of {package} failed on {} servers in turn ({}); see `strata servers ls`",
            tried.len(),
            tried.join(", ")
        ),
    ))
}

async fn kill_session(State(cp): St, User(terminal): User, UrlPath(id): UrlPath<String>) -> Result<Response, ApiError> {
    let (entry, server) = cp.managed(&terminal, &id).await?;
    if let Some(server) = server {
        let path = format!("/v1/sessions/{id}");
        let (status, body) = cp
            .order(&server, &entry.owner, Method::DELETE, &path, None, ORDER_TIMEOUT)
            .await
            .map_err(|e| unreachable(&server, &e))?;
        if !status.is_success() && status != StatusCode::NOT_FOUND {
            return Err(passed_on(status, body));
        }
    }
    // A lost session (or one its server no longer knows) is only forgotten.
    cp.cluster.remove_session(&entry.id).await.map_err(unavailable)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Refuses `count` more sessions for `terminal` beyond its limit in the
/// cluster. Lost sessions hold nothing any more; they do not count.
fn room_in_cluster(cp: &ControlPlane, entries: &[SessionEntry], terminal: &str, count: usize) -> Result<(), ApiError> {
    let held = entries.iter().filter(|e| e.owner == terminal && !is_lost(e)).count();
    if held + count <= cp.max_sessions_per_terminal {
        return Ok(());
    }
    let more = if count == 1 { String::new() } else { format!(" and {count} more were asked for") };
    Err(ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_sessions",
        format!(
            "a terminal may hold at most {} sessions in this cluster (running or paused; \
             --max-sessions-per-terminal) and terminal {terminal:?} holds {held}{more}; end one first (`strata ps`, \
             `strata kill`)",
            cp.max_sessions_per_terminal
        ),
    ))
}

/// A request's JSON body, at most 64 KiB; an empty one is `{}` if
/// `empty_ok`.
fn json_body(body: &[u8], empty_ok: bool) -> Result<Value, ApiError> {
    if body.len() > 64 << 10 {
        return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", "the body is over 64 KiB"));
    }
    if empty_ok && body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))
}

/// Passes an order on to the server of a session the caller manages, in
/// its owner's name.
async fn pass(cp: &ControlPlane, terminal: &str, id: &str, method: Method, what: &str) -> Result<Response, ApiError> {
    pass_with(cp, terminal, id, method, what, None).await
}

/// [`pass`], with a JSON body.
async fn pass_with(
    cp: &ControlPlane,
    terminal: &str,
    id: &str,
    method: Method,
    what: &str,
    order: Option<Value>,
) -> Result<Response, ApiError> {
    let (entry, server) = cp.managed(terminal, id).await?;
    let server = server.ok_or_else(|| unavailable_session(&entry, cp.lost_after))?;
    let path = format!("/v1/sessions/{id}/{what}");
    let (status, mut body) = cp
        .order(&server, &entry.owner, method, &path, order, ORDER_TIMEOUT)
        .await
        .map_err(|e| unreachable(&server, &e))?;
    if !status.is_success() {
        return Err(passed_on(status, body));
    }
    // Listed in its new state at once; its server records the rest.
    if let Some(state) = body["state"].as_str().filter(|s| *s != entry.state) {
        let mut updated = entry.clone();
        updated.state = state.to_string();
        if let Err(e) = cp.cluster.put_session(&updated).await {
            tracing::warn!(session = %id, error = %e, "could not record the session's state yet; its server will");
        }
    }
    if body.is_object() {
        body["server"] = json!(server.id);
    }
    Ok((status, Json(body)).into_response())
}

/// Forks a session on its server: the copies start there, beside it (the
/// snapshot's memory is shared by them there), within the terminal's limit
/// of sessions in the cluster; each is listed at once. With `"spread":
/// true` they are placed like launches instead (see [`fork_spread`]).
async fn fork_session(
    State(cp): St,
    User(terminal): User,
    UrlPath(id): UrlPath<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let mut body = json_body(&body, true)?;
    let spread = match body.as_object_mut().and_then(|o| o.remove("spread")) {
        None | Some(Value::Bool(false)) => false,
        Some(Value::Bool(true)) => true,
        Some(other) => return Err(ApiError::bad_request(format!("`spread` must be true or false, not {other}"))),
    };
    let count = match &body["count"] {
        Value::Null => 1,
        v => v.as_u64().filter(|n| (1..=MAX_FORKS as u64).contains(n)).ok_or_else(|| {
            ApiError::bad_request(format!("`count` must be a number of copies from 1 to {MAX_FORKS}, not {v}"))
        })? as usize,
    };
    if spread {
        return fork_spread(&cp, &terminal, &id, count).await;
    }
    let (entry, server) = cp.managed(&terminal, &id).await?;
    let server = server.ok_or_else(|| unavailable_session(&entry, cp.lost_after))?;
    let entries = cp.cluster.sessions().await.map_err(unavailable)?;
    room_in_cluster(&cp, &entries, &entry.owner, count)?;
    let path = format!("/v1/sessions/{id}/fork");
    let (status, mut forked) = cp
        .order(&server, &entry.owner, Method::POST, &path, Some(body), ORDER_TIMEOUT)
        .await
        .map_err(|e| unreachable(&server, &e))?;
    if !status.is_success() {
        return Err(passed_on(status, forked));
    }
    for copy in forked["forks"].as_array_mut().into_iter().flatten() {
        let Some(copy_id) = copy["session"]["id"].as_str().map(str::to_string) else { continue };
        let created_at = copy["session"]["created"].as_u64().unwrap_or(0);
        let recorded = SessionEntry {
            os: entry.os.clone(),
            ..SessionEntry::running(&copy_id, &server.id, &entry.package, &entry.owner, created_at)
        };
        // Its server records it too, within seconds; this lists it at once.
        if let Err(e) = cp.cluster.put_session(&recorded).await {
            tracing::warn!(session = %copy_id, error = %e, "could not record the copy yet; its server will");
        }
        copy["session"]["server"] = json!(server.id);
    }
    Ok((status, Json(forked)).into_response())
}

/// The most copies one fork makes (as a server takes them).
const MAX_FORKS: usize = 32;

/// Forks a session into `count` copies placed like launches, on any
/// server: the session is saved as a named snapshot while it runs on
/// (`fork-ID-MILLIS`, shared through the object store like any image, kept
/// until `images rm`), then each copy is launched from it where placement
/// puts it (the copies on one server share its memory there). Each copy's
/// outcome is answered, in order.
async fn fork_spread(cp: &ControlPlane, terminal: &str, id: &str, count: usize) -> Result<Response, ApiError> {
    let (entry, server) = cp.managed(terminal, id).await?;
    let server = server.ok_or_else(|| unavailable_session(&entry, cp.lost_after))?;
    let entries = cp.cluster.sessions().await.map_err(unavailable)?;
    room_in_cluster(cp, &entries, &entry.owner, count)?;
    memory_room(cp, &entries, &entry.owner, &entry.package, count)?;
    let millis = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    let name = format!("fork-{id}-{millis}");
    let path = format!("/v1/sessions/{id}/snapshot");
    let (status, snap) = cp
        .order(&server, &entry.owner, Method::POST, &path, Some(json!({ "name": name })), ORDER_TIMEOUT)
        .await
        .map_err(|e| unreachable(&server, &e))?;
    if !status.is_success() {
        return Err(passed_on(status, snap));
    }
    let launch = json!({ "package": entry.package, "snapshot": name });
    let mut forks = Vec::new();
    for _ in 0..count {
        forks.push(match launch_placed(cp, &entry.owner, &entry.package, &launch).await {
            Ok(created) => created,
            Err(e) => json!({ "error": e.message }),
        });
    }
    tracing::info!(session = %id, copies = count, snapshot = %name, "forked a session across servers");
    let answer = json!({
        "parent": { "id": id, "server": server.id },
        "snapshot": name,
        "parent_stopped_ms": snap["stopped_ms"],
        "forks": forks,
    });
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

/// Moves a running session to another server by live migration: the one
/// named in `server`, else one placement picks among the others. Its
/// server drives the move with the other one; the record names the new
/// server once the session runs there.
async fn move_session(
    State(cp): St,
    User(terminal): User,
    UrlPath(id): UrlPath<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let order = json_body(&body, true)?;
    if let Some(extra) = order.as_object().and_then(|o| o.keys().find(|k| *k != "server")) {
        return Err(ApiError::bad_request(format!("unknown field `{extra}`; a move takes only `server`")));
    }
    let (entry, source) = cp.managed(&terminal, &id).await?;
    let source = source.ok_or_else(|| unavailable_session(&entry, cp.lost_after))?;
    if entry.state != "running" {
        return Err(ApiError::bad_request(format!(
            "session {id} is {}; only a running session moves live (a paused one resumes on any server)",
            entry.state
        )));
    }
    let target = match order.get("server") {
        None | Some(Value::Null) => None,
        Some(Value::String(name)) => {
            if *name == source.id {
                return Err(ApiError::bad_request(format!("session {id} already runs on server {name}")));
            }
            let servers = cp.cluster.servers().await.map_err(unavailable)?;
            Some(servers.into_iter().find(|s| s.id == *name).ok_or_else(|| {
                ApiError::not_found(format!("no server {name} in the cluster; `strata servers` lists them"))
            })?)
        }
        Some(_) => return Err(ApiError::bad_request("`server` must be a server's id")),
    };
    let moved = move_running(&cp, entry, &source, target).await?;
    Ok((StatusCode::OK, Json(moved)).into_response())
}

/// Moves running session `entry` from `source` to `target` (else where
/// placement puts it, among the others); what the source answered, with
/// `from`.
async fn move_running(
    cp: &ControlPlane,
    mut entry: SessionEntry,
    source: &ServerLoad,
    target: Option<ServerLoad>,
) -> Result<Value, ApiError> {
    let target = match target {
        Some(t) => t,
        None => cp.place(&cp.request_for(&entry.package)?, std::slice::from_ref(&source.id)).await?,
    };
    let id = entry.id.clone();
    let path = format!("/v1/sessions/{id}/move");
    let order = json!({ "to": target.address, "server": target.id });
    let (status, mut moved) = cp
        .order(source, &entry.owner, Method::POST, &path, Some(order), ORDER_TIMEOUT)
        .await
        .map_err(|e| unreachable(source, &e))?;
    if !status.is_success() {
        return Err(passed_on(status, moved));
    }
    tracing::info!(session = %id, from = %source.id, to = %target.id, "moved a running session");
    // The receiving server records it too; this lists it there at once.
    entry.server = target.id.clone();
    entry.state = "running".into();
    if let Err(e) = cp.cluster.put_session(&entry).await {
        tracing::warn!(session = %id, error = %e, "could not record the move yet; the receiving server will");
    }
    moved["from"] = json!(source.id);
    Ok(moved)
}

/// Drains a server (an operator's order): it takes no new launches, its
/// running sessions move live to the others and its paused ones are taken
/// in by them; each session's outcome is answered. It stays draining until
/// `DELETE` (after its maintenance).
async fn drain_server(
    State(cp): St,
    User(caller): User,
    UrlPath(server): UrlPath<String>,
) -> Result<Response, ApiError> {
    operator_only(&cp, &caller)?;
    let servers = cp.cluster.servers().await.map_err(unavailable)?;
    let source = servers.iter().find(|s| s.id == server).cloned().ok_or_else(|| {
        ApiError::not_found(format!("no server {server} in the cluster; `strata servers` lists them"))
    })?;
    cp.cluster.set_draining(&server, true).await.map_err(unavailable)?;
    tracing::info!(%server, "draining a server");
    let entries = cp.cluster.sessions().await.map_err(unavailable)?;
    let mut outcomes = Vec::new();
    for entry in entries.into_iter().filter(|e| e.server == server) {
        let id = entry.id.clone();
        let outcome = match entry.state.as_str() {
            "running" => move_running(&cp, entry, &source, None).await.map(|m| m["server"].clone()),
            "paused" => take_in_paused(&cp, entry, &server).await.map(|to| json!(to)),
            other => Err(ApiError::bad_request(format!("{other}: nothing runs to move; `kill` removes it"))),
        };
        outcomes.push(match outcome {
            Ok(to) => json!({ "id": id, "moved_to": to }),
            Err(e) => json!({ "id": id, "error": e.message }),
        });
    }
    let left = cp.cluster.sessions().await.map_err(unavailable)?.iter().filter(|e| e.server == server).count();
    Ok(Json(json!({ "server": server, "draining": true, "sessions_left": left, "sessions": outcomes })).into_response())
}

/// Lets a drained server take launches again.
async fn undrain_server(
    State(cp): St,
    User(caller): User,
    UrlPath(server): UrlPath<String>,
) -> Result<Response, ApiError> {
    operator_only(&cp, &caller)?;
    cp.cluster.set_draining(&server, false).await.map_err(unavailable)?;
    Ok(Json(json!({ "server": server, "draining": false })).into_response())
}

/// Refuses a caller that is not one of the plane's operators.
fn operator_only(cp: &ControlPlane, caller: &str) -> Result<(), ApiError> {
    if cp.operators.contains(caller) {
        return Ok(());
    }
    Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "only an operator (control --operator) drains servers"))
}

/// Has another server take in paused session `entry` of server `from`
/// (from the shared store); the server that took it.
async fn take_in_paused(cp: &ControlPlane, mut entry: SessionEntry, from: &str) -> Result<String, ApiError> {
    let record = entry.record.clone().ok_or_else(|| {
        ApiError::bad_request("its record has not reached the cluster yet; try the drain again in a few seconds")
    })?;
    let target = cp.place(&cp.request_for(&entry.package)?, &[from.to_string()]).await?;
    let (status, body) = cp
        .order(
            &target,
            &entry.owner,
            Method::POST,
            "/v1/sessions/import",
            Some(json!({ "record": record })),
            ORDER_TIMEOUT,
        )
        .await
        .map_err(|e| unreachable(&target, &e))?;
    if !status.is_success() {
        return Err(passed_on(status, body));
    }
    // Its old server forgets its copy once the record names another.
    entry.server = target.id.clone();
    cp.cluster.put_session(&entry).await.map_err(unavailable)?;
    Ok(target.id)
}

/// Saves a session as a named snapshot on its server, which shares it
/// through the object store: a launch with `snapshot` (and its package, to
/// place it) starts from it on any server.
async fn snapshot_session(
    State(cp): St,
    User(terminal): User,
    UrlPath(id): UrlPath<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let order = json_body(&body, false)?;
    pass_with(&cp, &terminal, &id, Method::POST, "snapshot", Some(order)).await
}

async fn pause_session(
    State(cp): St,
    User(terminal): User,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    pass(&cp, &terminal, &id, Method::POST, "pause").await
}

async fn session_logs(State(cp): St, User(terminal): User, UrlPath(id): UrlPath<String>) -> Result<Response, ApiError> {
    let (entry, server) = cp.session_of(&terminal, &id).await?;
    let server = server.ok_or_else(|| unavailable_session(&entry, cp.lost_after))?;
    // The logs are bytes, not JSON: the request as `order` makes it, read raw.
    let resp = cp
        .request(&server, &terminal, Method::GET, &format!("/v1/sessions/{id}/logs"), ORDER_TIMEOUT)
        .send()
        .await
        .map_err(|e| unreachable(&server, &e))?;
    let status = resp.status();
    let bytes = resp.bytes().await.map_err(|e| unreachable(&server, &e))?;
    Ok((status, bytes).into_response())
}

/// Resumes a paused session: on its server, or, if that is gone, on
/// another one, from the shared store.
async fn resume_session(
    State(cp): St,
    User(terminal): User,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let (entry, _) = cp.managed(&terminal, &id).await?;
    cp.server_for(&entry.owner, &id).await?;
    pass(&cp, &terminal, &id, Method::POST, "resume").await
}

/// Where the caller attaches: the session's server, with a ticket good for
/// a minute. A paused session whose server is gone moves first.
async fn attach_ticket(
    State(cp): St,
    User(terminal): User,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    let (_, server) = cp.server_for(&terminal, &id).await?;
    let ticket = strata_cluster::ticket::sign(&cp.secret, &id, &terminal);
    let base = server.address.replacen("http", "ws", 1);
    Ok(Json(json!({ "url": format!("{base}/v1/sessions/{id}/attach?ticket={ticket}"), "server": server.id })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_terminals_memory_counts_its_running_sessions_only() {
        let mut paused = entry("paused", "a", true);
        paused.package = "big".into();
        let mut other = entry("running", "a", false);
        other.owner = "bob".into();
        let entries =
            [entry("running", "a", false), entry("running", "b", false), paused, other, entry("lost", "c", false)];
        let memory = |p: &str| if p == "big" { 4096 } else { 512 };
        assert_eq!(memory_held(&entries, "alice", memory), 1024);
        assert_eq!(memory_held(&entries, "bob", memory), 512);
        assert_eq!(memory_held(&entries, "carol", memory), 0);
    }

    fn entry(state: &str, server: &str, record: bool) -> SessionEntry {
        let mut e = SessionEntry::running("s1", server, "bc", "alice", 1);
        e.state = state.into();
        e.record = record.then(|| json!({"id": "s1"}));
        e
    }

    #[test]
    fn sessions_of_silent_servers_are_suspect_then_lost_and_paused_ones_can_move() {
        let alive: BTreeSet<String> = ["a".to_string()].into();
        let mut silent_4s = entry("running", "gone", false);
        silent_4s.unreachable_since = Some(96);
        let mut back = entry("running", "a", false);
        back.last_outage_s = Some(4);
        let cases = [
            (entry("running", "a", false), "running", false, ""),
            (entry("running", "gone", false), "running", false, "server unreachable"),
            (silent_4s, "running", false, "server unreachable for 4 s"),
            (back, "running", false, "server was unreachable 4 s"),
            (entry("paused", "gone", true), "paused", true, ""),
            (entry("paused", "a", false), "paused", false, ""),
            (entry("lost", "gone", false), "lost", false, "server gone stayed unreachable"),
        ];
        for (e, state, movable, note) in cases {
            let j = session_json(&e, &alive, 100);
            assert_eq!(j["state"], state, "{e:?}");
            assert_eq!(j["movable"], movable, "{e:?}");
            assert_eq!(j["note"], note, "{e:?}");
            assert_eq!(j["server"], e.server);
        }
    }

    #[test]
    fn a_silent_server_is_suspect_first_and_lost_only_after_the_grace_period() {
        let alive: BTreeSet<String> = ["a".to_string()].into();
        let grace = Duration::from_secs(30);
        // Its server answers: nothing to write.
        assert_eq!(judge_silence(&entry("running", "a", false), &alive, 100, grace), None);
        // Silent: noted since now, still running.
        let noted = judge_silence(&entry("running", "gone", false), &alive, 100, grace).unwrap();
        assert_eq!((noted.state.as_str(), noted.unreachable_since), ("running", Some(100)));
        // Within the grace period: left as it is.
        assert_eq!(judge_silence(&noted, &alive, 129, grace), None);
        // Past it: lost, the start of the silence kept.
        let lost = judge_silence(&noted, &alive, 130, grace).unwrap();
        assert_eq!((lost.state.as_str(), lost.unreachable_since), ("lost", Some(100)));
        // Lost, paused and moved sessions are not judged again.
        assert_eq!(judge_silence(&lost, &alive, 500, grace), None);
        assert_eq!(judge_silence(&entry("paused", "gone", true), &alive, 500, grace), None);
    }

    #[test]
    fn a_servers_error_is_passed_on_with_its_status_and_a_known_code() {
        let e = passed_on(StatusCode::NOT_FOUND, json!({"error": {"code": "not_found", "message": "no package x"}}));
        assert_eq!((e.status, e.code, e.message.as_str()), (StatusCode::NOT_FOUND, "not_found", "no package x"));
        let e = passed_on(StatusCode::BAD_GATEWAY, json!("proxy said no"));
        assert_eq!((e.status, e.code), (StatusCode::BAD_GATEWAY, "server_error"));
        assert!(e.message.contains("proxy said no"));
        let e = passed_on(StatusCode::IM_A_TEAPOT, json!({"error": {"code": "teapot", "message": "m"}}));
        assert_eq!(e.code, "server_error", "unknown codes are not invented");
    }
}
