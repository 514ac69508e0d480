//! strata's REST API.
//!
//! Handlers only translate requests into the engine's commands and the
//! session actors' messages ([`live`]); the engine does the work. The
//! OpenAPI document is generated from these handlers and served at
//! `/openapi.json`. Every error has one body shape ([`error::ErrorBody`]).

pub mod auth;
pub mod builds;
pub mod cluster;
pub mod e2b;
pub mod error;
pub mod handover;
pub mod live;
pub mod metrics;
pub mod moves;
mod routes;
pub mod tls;
pub mod viewer;
mod web;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::Router;
use strata_engine::Engine;

pub use error::ApiError;

/// Limits the server enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body, in bytes.
    pub max_body: usize,
    /// Sessions one terminal may hold at once.
    pub max_sessions_per_terminal: usize,
    /// Guest memory one terminal's running sessions may have together, in
    /// MiB (each has one vCPU, and its disk writes are bounded per session,
    /// so this and the number of sessions bound its CPUs and disk too).
    pub max_memory_mib_per_terminal: u32,
    /// Sessions the server runs at once.
    pub max_sessions: usize,
    /// Default idle time-out of a session nobody is attached to.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body: 64 << 10,
            max_sessions_per_terminal: 16,
            max_memory_mib_per_terminal: 8192,
            max_sessions: 64,
            idle_timeout: strata_engine::sessions::IDLE_TIMEOUT,
        }
    }
}

/// What every handler shares.
pub struct AppState {
    pub engine: Arc<Engine>,
    pub tokens: RwLock<auth::TokenStore>,
    pub sessions: Arc<live::Registry>,
    pub metrics: metrics::Metrics,
    pub limits: Limits,
    /// Sessions restored ahead of demand, and the most kept per package
    /// (the pool's size follows demand up to that).
    pub pool: Arc<strata_engine::pool::Pool>,
    pub pool_targets: std::collections::BTreeMap<String, usize>,
    /// The `web/` directory (its `node_modules` holds xterm.js), if found.
    pub web_dir: Option<PathBuf>,
    /// This server's place in a cluster (`serve --etcd`), if it has one.
    pub cluster: Option<Arc<cluster::ClusterLink>>,
    /// Folders E2B's SDKs watch in sandboxes.
    pub e2b_watchers: e2b::envd::Watchers,
    /// Terminals that see every session of the server (`serve --operator`)
    /// and may stop, pause and resume any; what runs inside stays each
    /// terminal's own.
    pub operators: std::collections::BTreeSet<String>,
    /// Image builds running here, by package.
    pub builds: builds::Builds,
    /// Sessions moving here from another server of the cluster.
    pub receiving: moves::Receiving,
}

impl AppState {
    /// State for a server over `engine`, with tokens from `tokens_file`.
    ///
    /// # Errors
    /// If the token file cannot be read.
    pub fn new(engine: Arc<Engine>, tokens_file: PathBuf, limits: Limits) -> Result<AppState, String> {
        Ok(AppState {
            engine,
            tokens: RwLock::new(auth::TokenStore::load(&tokens_file)?),
            sessions: Arc::new(live::Registry::default()),
            metrics: metrics::Metrics::new(),
            limits,
            pool: Arc::default(),
            pool_targets: Default::default(),
            web_dir: None,
            cluster: None,
            e2b_watchers: Default::default(),
            operators: Default::default(),
            builds: Default::default(),
            receiving: Default::default(),
        })
    }

    /// Refills the pool named `name` (a package, or `e2b:PACKAGE`: see
    /// [`strata_engine::pool::PoolKey`]) up to its target, in the background.
    pub fn refill(self: &Arc<Self>, name: &str) {
        if !self.pool_targets.contains_key(name) {
            return;
        }
        // The size its demand calls for now (between its floor and cap).
        let target = self.pool.target(name);
        let st = self.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            let r = async {
                let pkg = strata_engine::pool::PoolKey::parse(&name).resolve(&st.engine)?;
                st.pool.fill(&st.engine, &name, &pkg, target, &strata_engine::LogProgress).await
            };
            if let Err(e) = r.await {
                tracing::warn!(package = %name, error = %error::error_chain(&e), "could not fill the pool");
            }
        });
    }
}

/// The router of the whole API.
pub fn router(state: Arc<AppState>) -> Router {
    routes::router(state)
}

/// The OpenAPI document (JSON).
pub fn openapi_json() -> String {
    routes::openapi_json()
}
