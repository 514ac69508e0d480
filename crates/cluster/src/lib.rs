//! Cluster state in etcd: which servers are alive and how loaded (each
//! registered under a lease it keeps alive, so a silent server drops out
//! when its lease expires), the records of sessions (so a restarted or
//! replacement control plane still lists them), and the election of one
//! leading control plane among several.
//!
//! Keys, under a prefix (default `/strata/`): `servers/ID` (a
//! [`ServerLoad`] as JSON, leased), `sessions/ID` (a [`SessionEntry`]),
//! `leader` (the election), `tokens/TERMINAL` (a [`TokenEntry`]).

pub mod ticket;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp,
};
use serde::{Deserialize, Serialize};
pub use strata_placement::ServerLoad;
use tokio::sync::watch;

/// What can go wrong with the cluster state.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The cause is in the message, not a `source`: printed as a chain it
    // would appear twice.
    #[error("cannot reach etcd at {endpoints}: {cause}; is it running? (`scripts/cluster.sh up N` starts a cluster on this machine)")]
    Unreachable { endpoints: String, cause: etcd_client::Error },
    #[error("etcd at {endpoints} failed during {what}: {cause}")]
    Etcd { endpoints: String, what: &'static str, cause: etcd_client::Error },
    #[error("a record under {key} in etcd is damaged: {message}")]
    BadRecord { key: String, message: String },
    #[error("cluster settings: {0}")]
    Config(String),
}

/// A session as the cluster knows it: where it runs and in what state.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SessionEntry {
    pub id: String,
    /// The server that runs it (or ran it, if it is paused).
    pub server: String,
    pub package: String,
    /// The OS its guest runs, where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    /// `running`, `paused` or `lost`.
    pub state: String,
    /// The terminal that owns it.
    pub owner: String,
    /// The image it is paused to, if paused.
    #[serde(default)]
    pub image: Option<String>,
    /// A paused session's record as its server keeps it (opaque here): what
    /// another server needs to resume it when its own is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<serde_json::Value>,
    /// Unix seconds.
    #[serde(default)]
    pub created: u64,
    /// While its server is silent (its lease lapsed): since when, in unix
    /// seconds, as the leading control plane first saw it. The session is
    /// kept `running` (its server is only suspect) until the grace period
    /// has passed, then marked `lost`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreachable_since: Option<u64>,
    /// How long its server was unreachable the last time it went silent
    /// and came back with the session still running, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_outage_s: Option<u64>,
}

impl SessionEntry {
    /// A record of a session that runs on `server` now.
    pub fn running(id: &str, server: &str, package: &str, owner: &str, created: u64) -> SessionEntry {
        SessionEntry {
            id: id.into(),
            server: server.into(),
            package: package.into(),
            os: None,
            state: "running".into(),
            owner: owner.into(),
            image: None,
            record: None,
            created,
            unreachable_since: None,
            last_outage_s: None,
        }
    }
}

/// A terminal's API token as the cluster keeps it: only its sha256.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TokenEntry {
    pub terminal: String,
    /// sha256 of the token, hex.
    pub hash: String,
    /// Unix seconds; `None` never expires.
    #[serde(default)]
    pub expires: Option<u64>,
}

/// A connection to the cluster's etcd.
#[derive(Clone)]
pub struct Cluster {
    client: Client,
    prefix: String,
    endpoints: String,
    endpoint_list: Vec<String>,
    auth: Option<EtcdAuth>,
}

/// The etcd user strata connects as, where etcd has authentication on
/// (`scripts/cluster.sh` turns it on): without credentials a client can
/// neither read nor write the cluster's state.
#[derive(Clone)]
pub struct EtcdAuth {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for EtcdAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdAuth").field("user", &self.user).finish_non_exhaustive()
    }
}

/// The environment variables naming the etcd user and its password's file.
pub const ETCD_USER_ENV: &str = "STRATA_ETCD_USER";
pub const ETCD_PASSWORD_FILE_ENV: &str = "STRATA_ETCD_PASSWORD_FILE";

impl EtcdAuth {
    /// From `STRATA_ETCD_USER` and `STRATA_ETCD_PASSWORD_FILE` (a file
    /// holding the password, so it is in no process's environment or
    /// command line): both or neither.
    ///
    /// # Errors
    /// [`Error::Config`] naming what is missing or unreadable.
    pub fn from_env() -> Result<Option<EtcdAuth>, Error> {
        let user = std::env::var(ETCD_USER_ENV).ok().filter(|u| !u.is_empty());
        let file = std::env::var(ETCD_PASSWORD_FILE_ENV).ok().filter(|f| !f.is_empty());
        match (user, file) {
            (None, None) => Ok(None),
            (Some(user), Some(file)) => {
                let password = std::fs::read_to_string(&file)
                    .map_err(|e| Error::Config(format!("{ETCD_PASSWORD_FILE_ENV}={file}: {e}")))?
                    .trim()
                    .to_string();
                if password.is_empty() {
                    return Err(Error::Config(format!("{ETCD_PASSWORD_FILE_ENV}={file} is empty")));
                }
                Ok(Some(EtcdAuth { user, password }))
            }
            _ => Err(Error::Config(format!(
                "set both {ETCD_USER_ENV} and {ETCD_PASSWORD_FILE_ENV} (etcd's user and a file with its password), or neither"
            ))),
        }
    }

    fn apply(&self, opts: ConnectOptions) -> ConnectOptions {
        opts.with_user(self.user.clone(), self.password.clone()).with_auto_token_refresh(true)
    }
}

/// A server's registration: its lease is kept alive and its load
/// refreshed until [`Registration::leave`] (or the process dies).
///
/// Both happen on a thread of their own, with a runtime and an etcd
/// connection of their own: a process whose runtime is busy or blocked (a
/// server hashing a fetched image, a slow disk) still keeps its lease.
pub struct Registration {
    stop: watch::Sender<bool>,
    lease: Arc<AtomicI64>,
    cluster: Cluster,
}

/// Leadership won in an election; kept while its lease is kept alive (from
/// a thread of its own, like a server's registration).
pub struct Leadership {
    stop: watch::Sender<bool>,
    lease: i64,
    held: Arc<AtomicBool>,
    key: etcd_client::LeaderKey,
    cluster: Cluster,
}

/// How long a connection attempt or one request may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

fn check_id(kind: &str, id: &str) -> Result<(), Error> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!("{kind} id {id:?} must be 1-128 of A-Z, a-z, 0-9, '-', '_', '.'")))
    }
}

impl Cluster {
    /// Connects to etcd and checks that it answers.
    ///
    /// # Errors
    /// [`Error::Unreachable`] within a few seconds if no endpoint answers.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Cluster, Error> {
        Cluster::connect_as(endpoints, prefix, EtcdAuth::from_env()?).await
    }

    /// Connects as [`Cluster::connect`] does, as etcd user `auth` (or with
    /// no credentials).
    ///
    /// # Errors
    /// [`Error::Unreachable`] within a few seconds if no endpoint answers
    /// or etcd refuses the credentials.
    pub async fn connect_as(endpoints: &[String], prefix: &str, auth: Option<EtcdAuth>) -> Result<Cluster, Error> {
        if endpoints.is_empty() {
            return Err(Error::Config("no etcd endpoints given".into()));
        }
        if !prefix.starts_with('/') || !prefix.ends_with('/') {
            return Err(Error::Config(format!("prefix {prefix:?} must start and end with '/'")));
        }
        let joined = endpoints.join(",");
        let unreachable = |cause| Error::Unreachable { endpoints: joined.clone(), cause };
        let mut client = Client::connect(endpoints, Some(request_options(auth.as_ref()))).await.map_err(unreachable)?;
        client.status().await.map_err(unreachable)?;
        Ok(Cluster { client, prefix: prefix.to_string(), endpoints: joined, endpoint_list: endpoints.to_vec(), auth })
    }

    fn err(&self, what: &'static str) -> impl FnOnce(etcd_client::Error) -> Error + '_ {
        move |cause| Error::Etcd { endpoints: self.endpoints.clone(), what, cause }
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    async fn put_json<T: Serialize>(&self, key: &str, value: &T, lease: Option<i64>) -> Result<(), Error> {
        self.put_json_with(&mut self.client.clone(), key, value, lease).await
    }

    async fn list_json<T: for<'de> Deserialize<'de>>(&self, dir: &str) -> Result<Vec<T>, Error> {
        Ok(self.list_json_revisions(dir).await?.into_iter().map(|(v, _)| v).collect())
    }

    /// Every record under `dir`, each with the revision of its last change.
    async fn list_json_revisions<T: for<'de> Deserialize<'de>>(&self, dir: &str) -> Result<Vec<(T, i64)>, Error> {
        let key = self.key(dir);
        let resp = self
            .client
            .clone()
            .get(key.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(self.err("a read"))?;
        resp.kvs()
            .iter()
            .map(|kv| {
                let value = serde_json::from_slice(kv.value()).map_err(|e| Error::BadRecord {
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    message: e.to_string(),
                })?;
                Ok((value, kv.mod_revision()))
            })
            .collect()
    }

    /// Registers a server under a lease of `ttl`, then keeps the lease
    /// alive and its record fresh (every third of `ttl`, with the latest
    /// load sent on `load`) from a thread of its own, so that nothing else
    /// the process does can delay it. A server that goes silent drops out
    /// when the lease expires; one whose lease expired while it was stopped
    /// or cut off registers again when it can.
    ///
    /// # Errors
    /// If the id is malformed, or etcd refuses the lease or the write.
    pub async fn register(&self, ttl: Duration, load: watch::Receiver<ServerLoad>) -> Result<Registration, Error> {
        let id = load.borrow().id.clone();
        check_id("server", &id)?;
        let secs = ttl.as_secs().clamp(1, 3600) as i64;
        let key = self.key(&format!("servers/{id}"));
        let (stop, mut stopped) = watch::channel(false);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let lease_now = Arc::new(AtomicI64::new(0));
        let me = self.clone();
        let lease_shared = lease_now.clone();
        on_own_thread("strata-lease", async move {
            let mut client = match me.own_client().await {
                Ok(c) => c,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let registered = async {
                let lease = client.lease_grant(secs, None).await.map_err(me.err("granting a lease"))?.id();
                let first = load.borrow().clone();
                me.put_json_with(&mut client, &key, &first, Some(lease)).await?;
                Ok::<_, Error>(lease)
            };
            let mut lease = match registered.await {
                Ok(l) => l,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            lease_shared.store(lease, Ordering::Relaxed);
            let _ = ready_tx.send(Ok(()));
            let mut keeper = None;
            let mut tick = tokio::time::interval(refresh_period(secs));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => return,
                }
                let kept = async {
                    if !keep_alive(&me, &mut client, &mut keeper, lease).await? {
                        // A lease that expired while this process was stopped
                        // or etcd out of reach is gone for good: take a new one.
                        lease = client.lease_grant(secs, None).await.map_err(me.err("granting a lease"))?.id();
                        lease_shared.store(lease, Ordering::Relaxed);
                        keeper = None;
                        tracing::warn!("this server's lease had expired; registered again");
                    }
                    let now = load.borrow().clone();
                    me.put_json_with(&mut client, &key, &now, Some(lease)).await
                };
                if let Err(e) = kept.await {
                    keeper = None;
                    tracing::warn!(error = %e, "could not refresh this server's registration; retrying");
                }
            }
        })?;
        match ready_rx.await {
            Ok(Ok(())) => Ok(Registration { stop, lease: lease_now, cluster: self.clone() }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::Config("the lease thread ended before registering".into())),
        }
    }

    /// A connection of its own to the same etcd, for a thread of its own
    /// (a connection serves requests from the runtime that made it).
    async fn own_client(&self) -> Result<Client, Error> {
        Client::connect(&self.endpoint_list, Some(request_options(self.auth.as_ref())))
            .await
            .map_err(|cause| Error::Unreachable { endpoints: self.endpoints.clone(), cause })
    }

    async fn put_json_with<T: Serialize>(
        &self,
        client: &mut Client,
        key: &str,
        value: &T,
        lease: Option<i64>,
    ) -> Result<(), Error> {
        let json =
            serde_json::to_vec(value).map_err(|e| Error::BadRecord { key: key.into(), message: e.to_string() })?;
        let opts = lease.map(|l| PutOptions::new().with_lease(l));
        client.put(key, json, opts).await.map_err(self.err("a write"))?;
        Ok(())
    }

    /// The servers registered now (those whose lease is alive).
    ///
    /// # Errors
    /// If etcd fails or a record is damaged.
    pub async fn servers(&self) -> Result<Vec<ServerLoad>, Error> {
        let mut out: Vec<ServerLoad> = self.list_json("servers/").await?;
        for s in &mut out {
            s.healthy = true;
        }
        Ok(out)
    }

    /// Records (or updates) a session.
    ///
    /// # Errors
    /// If the id is malformed or etcd fails.
    pub async fn put_session(&self, entry: &SessionEntry) -> Result<(), Error> {
        check_id("session", &entry.id)?;
        self.put_json(&self.key(&format!("sessions/{}", entry.id)), entry, None).await
    }

    /// Every recorded session.
    ///
    /// # Errors
    /// If etcd fails or a record is damaged.
    pub async fn sessions(&self) -> Result<Vec<SessionEntry>, Error> {
        self.list_json("sessions/").await
    }

    /// Every recorded session, each with the revision of its last change
    /// (for [`Cluster::put_session_if_unchanged`]).
    ///
    /// # Errors
    /// If etcd fails or a record is damaged.
    pub async fn sessions_with_revisions(&self) -> Result<Vec<(SessionEntry, i64)>, Error> {
        self.list_json_revisions("sessions/").await
    }

    /// One session's record, with the revision of its last change; `None`
    /// if there is none.
    ///
    /// # Errors
    /// If the id is malformed, etcd fails or the record is damaged.
    pub async fn session_with_revision(&self, id: &str) -> Result<Option<(SessionEntry, i64)>, Error> {
        check_id("session", id)?;
        let key = self.key(&format!("sessions/{id}"));
        let resp = self.client.clone().get(key.as_str(), None).await.map_err(self.err("a read"))?;
        resp.kvs()
            .first()
            .map(|kv| {
                let value = serde_json::from_slice(kv.value())
                    .map_err(|e| Error::BadRecord { key: key.clone(), message: e.to_string() })?;
                Ok((value, kv.mod_revision()))
            })
            .transpose()
    }

    /// Writes a session's record only if nobody changed it since
    /// `revision` (as [`Cluster::sessions_with_revisions`] read it): a
    /// guess made from an older state never overwrites a newer report.
    /// Whether it was written.
    ///
    /// # Errors
    /// If the id is malformed or etcd fails.
    pub async fn put_session_if_unchanged(&self, entry: &SessionEntry, revision: i64) -> Result<bool, Error> {
        check_id("session", &entry.id)?;
        let key = self.key(&format!("sessions/{}", entry.id));
        let json =
            serde_json::to_vec(entry).map_err(|e| Error::BadRecord { key: key.clone(), message: e.to_string() })?;
        let txn = Txn::new()
            .when(vec![Compare::mod_revision(key.as_str(), CompareOp::Equal, revision)])
            .and_then(vec![TxnOp::put(key.as_str(), json, None)]);
        let resp = self.client.clone().txn(txn).await.map_err(self.err("a conditional write"))?;
        Ok(resp.succeeded())
    }

    /// Forgets a session.
    ///
    /// # Errors
    /// If etcd fails.
    pub async fn remove_session(&self, id: &str) -> Result<(), Error> {
        check_id("session", id)?;
        let key = self.key(&format!("sessions/{id}"));
        self.client.clone().delete(key, None).await.map_err(self.err("a delete"))?;
        Ok(())
    }

    /// Marks server `server` draining (`on`): placement sends it nothing
    /// new until it is marked back.
    ///
    /// # Errors
    /// If the id is malformed or etcd fails.
    pub async fn set_draining(&self, server: &str, on: bool) -> Result<(), Error> {
        check_id("server", server)?;
        let key = self.key(&format!("draining/{server}"));
        if on {
            self.put_json(&key, &server, None).await
        } else {
            self.client.clone().delete(key, None).await.map_err(self.err("a delete"))?;
            Ok(())
        }
    }

    /// The servers marked draining.
    ///
    /// # Errors
    /// If etcd fails or a record is damaged.
    pub async fn draining(&self) -> Result<std::collections::BTreeSet<String>, Error> {
        Ok(self.list_json::<String>("draining/").await?.into_iter().collect())
    }

    /// Stores a terminal's token (its hash), replacing any earlier one.
    ///
    /// # Errors
    /// If the terminal name is malformed or etcd fails.
    pub async fn put_token(&self, entry: &TokenEntry) -> Result<(), Error> {
        check_id("terminal", &entry.terminal)?;
        self.put_json(&self.key(&format!("tokens/{}", entry.terminal)), entry, None).await
    }

    /// Every terminal's token entry.
    ///
    /// # Errors
    /// If etcd fails or a record is damaged.
    pub async fn tokens(&self) -> Result<Vec<TokenEntry>, Error> {
        self.list_json("tokens/").await
    }

    /// The etcd endpoints, as given.
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// Campaigns to lead as `candidate`, waiting until elected. The
    /// leadership lasts while this process keeps its lease alive (`ttl`).
    ///
    /// # Errors
    /// If etcd fails.
    pub async fn campaign(&self, candidate: &str, ttl: Duration) -> Result<Leadership, Error> {
        check_id("candidate", candidate)?;
        let secs = ttl.as_secs().clamp(1, 3600) as i64;
        let mut client = self.client.clone();
        let lease = client.lease_grant(secs, None).await.map_err(self.err("granting a lease"))?.id();
        // Kept alive from the start (waiting to be elected may take longer
        // than the lease), from a thread of its own.
        let (stop, mut stopped) = watch::channel(false);
        let held = Arc::new(AtomicBool::new(true));
        let (me, held_shared) = (self.clone(), held.clone());
        on_own_thread("strata-leader-lease", async move {
            let mut client = loop {
                match me.own_client().await {
                    Ok(c) => break c,
                    Err(e) => tracing::warn!(error = %e, "cannot reach etcd to keep the leadership lease; retrying"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = stopped.changed() => return,
                }
            };
            let mut keeper = None;
            let mut tick = tokio::time::interval(refresh_period(secs));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => return,
                }
                match keep_alive(&me, &mut client, &mut keeper, lease).await {
                    Ok(true) => {}
                    Ok(false) => {
                        // The election's key went with the lease: whoever
                        // holds this leadership must campaign again.
                        held_shared.store(false, Ordering::Relaxed);
                        tracing::error!("the leadership lease expired; this control plane no longer leads");
                        return;
                    }
                    Err(e) => {
                        keeper = None;
                        tracing::warn!(error = %e, "could not keep the leadership lease alive; retrying");
                    }
                }
            }
        })?;
        // A campaign waits as long as another leads, so it goes over a
        // connection without the request time-out: etcd withdraws a
        // cancelled campaign's key, which would race with a retry. HTTP/2
        // keep-alives still notice an etcd that went away.
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        if let Some(auth) = &self.auth {
            opts = auth.apply(opts);
        }
        let campaigned = async {
            let mut waiting = Client::connect(&self.endpoint_list, Some(opts)).await?;
            waiting.campaign(self.key("leader"), candidate, lease).await
        };
        let won = match campaigned.await {
            Ok(won) => won,
            Err(e) => {
                let _ = stop.send(true);
                return Err(self.err("campaigning")(e));
            }
        };
        let key = won.leader().cloned().ok_or_else(|| Error::BadRecord {
            key: self.key("leader"),
            message: "campaign won without a key".into(),
        })?;
        tracing::info!(candidate, "elected leader");
        Ok(Leadership { stop, lease, held, key, cluster: self.clone() })
    }

    /// The current leader's name, if any.
    ///
    /// # Errors
    /// If etcd fails.
    pub async fn leader(&self) -> Result<Option<String>, Error> {
        match self.client.clone().leader(self.key("leader")).await {
            Ok(r) => Ok(r.kv().map(|kv| String::from_utf8_lossy(kv.value()).into_owned())),
            // etcd answers "no leader" as an error.
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("no leader") => Ok(None),
            Err(e) => Err(self.err("reading the leader")(e)),
        }
    }
}

impl Registration {
    /// Leaves the cluster now: the server's record goes with its lease.
    ///
    /// # Errors
    /// If etcd fails (the lease then expires by itself).
    pub async fn leave(self) -> Result<(), Error> {
        let _ = self.stop.send(true);
        let lease = self.lease.load(Ordering::Relaxed);
        self.cluster.client.clone().lease_revoke(lease).await.map_err(self.cluster.err("revoking a lease"))?;
        Ok(())
    }

    /// Stops refreshing without leaving, as a crashed server would: its
    /// record drops out when the lease expires.
    pub fn go_silent(self) {
        let _ = self.stop.send(true);
    }
}

impl Leadership {
    /// Gives the leadership up now; another candidate is elected.
    ///
    /// # Errors
    /// If etcd fails (the lease then expires by itself).
    pub async fn resign(self) -> Result<(), Error> {
        let _ = self.stop.send(true);
        let opts = etcd_client::ResignOptions::new().with_leader(self.key);
        self.cluster.client.clone().resign(Some(opts)).await.map_err(self.cluster.err("resigning"))?;
        let _ = self.cluster.client.clone().lease_revoke(self.lease).await;
        Ok(())
    }

    /// Stops keeping the lease alive, as a crashed leader would.
    pub fn go_silent(self) {
        let _ = self.stop.send(true);
    }

    /// Whether this leadership still holds: false once its lease expired
    /// (the process was stopped or cut off from etcd for longer than it).
    pub fn is_held(&self) -> bool {
        self.held.load(Ordering::Relaxed)
    }
}

/// How a connection for requests is made: a bounded connect and a bounded
/// wait for each answer.
fn request_options(auth: Option<&EtcdAuth>) -> ConnectOptions {
    let opts = ConnectOptions::new().with_connect_timeout(CONNECT_TIMEOUT).with_timeout(REQUEST_TIMEOUT);
    match auth {
        Some(a) => a.apply(opts),
        None => opts,
    }
}

/// How often a lease of `secs` seconds is refreshed: three times per lease.
fn refresh_period(secs: i64) -> Duration {
    Duration::from_millis((secs as u64 * 1000 / 3).max(200))
}

/// Runs `work` on a new thread with a single-threaded runtime of its own.
/// Leases are kept from such threads: the process's own runtime may be
/// single-threaded (a server starts every QEMU from its one thread) and
/// busy, and a lease must not wait behind anything.
fn on_own_thread(name: &str, work: impl std::future::Future<Output = ()> + Send + 'static) -> Result<(), Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Config(format!("cannot start a runtime for {name}: {e}")))?;
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || runtime.block_on(work))
        .map_err(|e| Error::Config(format!("cannot start thread {name}: {e}")))?;
    Ok(())
}

/// Refreshes `lease` once over `client`, opening the keep-alive stream if
/// there is none. False if the lease has expired (etcd answers a TTL of 0).
async fn keep_alive(
    cluster: &Cluster,
    client: &mut Client,
    keeper: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    lease: i64,
) -> Result<bool, Error> {
    if keeper.is_none() {
        match client.lease_keep_alive(lease).await {
            Ok(k) => *keeper = Some(k),
            // Opening a stream refreshes the lease once, and etcd-client
            // reports a lease etcd no longer has (TTL 0) as this error.
            Err(etcd_client::Error::LeaseKeepAliveError(m)) if m.contains("not found") => return Ok(false),
            Err(e) => return Err(cluster.err("keeping a lease")(e)),
        }
    }
    let (k, stream) = keeper.as_mut().expect("opened above");
    k.keep_alive().await.map_err(cluster.err("keeping a lease"))?;
    match stream.message().await.map_err(cluster.err("keeping a lease"))? {
        Some(answer) => Ok(answer.ttl() > 0),
        // The stream ended (etcd restarted, the connection dropped): not an
        // answer about the lease; the caller opens a new stream and retries.
        None => Err(cluster.err("keeping a lease")(etcd_client::Error::LeaseKeepAliveError(
            "the keep-alive stream ended".into(),
        ))),
    }
}
