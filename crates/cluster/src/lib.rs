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

use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions, PutOptions};
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
}

/// A server's registration: its lease is kept alive and its load
/// refreshed until [`Registration::leave`] (or the process dies).
pub struct Registration {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    lease: i64,
    cluster: Cluster,
}

/// Leadership won in an election; kept while its lease is kept alive.
pub struct Leadership {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    lease: i64,
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
        if endpoints.is_empty() {
            return Err(Error::Config("no etcd endpoints given".into()));
        }
        if !prefix.starts_with('/') || !prefix.ends_with('/') {
            return Err(Error::Config(format!("prefix {prefix:?} must start and end with '/'")));
        }
        let joined = endpoints.join(",");
        let opts = ConnectOptions::new().with_connect_timeout(CONNECT_TIMEOUT).with_timeout(REQUEST_TIMEOUT);
        let unreachable = |cause| Error::Unreachable { endpoints: joined.clone(), cause };
        let mut client = Client::connect(endpoints, Some(opts)).await.map_err(unreachable)?;
        client.status().await.map_err(unreachable)?;
        Ok(Cluster { client, prefix: prefix.to_string(), endpoints: joined, endpoint_list: endpoints.to_vec() })
    }

    fn err(&self, what: &'static str) -> impl FnOnce(etcd_client::Error) -> Error + '_ {
        move |cause| Error::Etcd { endpoints: self.endpoints.clone(), what, cause }
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    async fn put_json<T: Serialize>(&self, key: &str, value: &T, lease: Option<i64>) -> Result<(), Error> {
        let json =
            serde_json::to_vec(value).map_err(|e| Error::BadRecord { key: key.into(), message: e.to_string() })?;
        let opts = lease.map(|l| PutOptions::new().with_lease(l));
        self.client.clone().put(key, json, opts).await.map_err(self.err("a write"))?;
        Ok(())
    }

    async fn list_json<T: for<'de> Deserialize<'de>>(&self, dir: &str) -> Result<Vec<T>, Error> {
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
                serde_json::from_slice(kv.value()).map_err(|e| Error::BadRecord {
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    message: e.to_string(),
                })
            })
            .collect()
    }

    /// Registers a server under a lease of `ttl`, then keeps the lease alive
    /// and its load fresh (`report`, every third of `ttl`) in the background.
    /// A server that goes silent drops out when the lease expires.
    ///
    /// # Errors
    /// If etcd refuses the lease or the write.
    pub async fn register(
        &self,
        ttl: Duration,
        report: impl Fn() -> ServerLoad + Send + Sync + 'static,
    ) -> Result<Registration, Error> {
        let load = report();
        check_id("server", &load.id)?;
        let secs = ttl.as_secs().clamp(1, 3600) as i64;
        let lease = self.client.clone().lease_grant(secs, None).await.map_err(self.err("granting a lease"))?.id();
        let key = self.key(&format!("servers/{}", load.id));
        self.put_json(&key, &load, Some(lease)).await?;
        let (stop, mut stopped) = watch::channel(false);
        let me = self.clone();
        let every = Duration::from_millis((secs as u64 * 1000 / 3).max(200));
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            let mut lease = lease;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => return,
                }
                let kept = async {
                    let (mut keeper, mut stream) =
                        me.client.clone().lease_keep_alive(lease).await.map_err(me.err("keeping a lease"))?;
                    keeper.keep_alive().await.map_err(me.err("keeping a lease"))?;
                    let answer = stream.message().await.map_err(me.err("keeping a lease"))?;
                    // A lease that expired while etcd was out of reach is
                    // gone for good (its TTL comes back as 0): take a new one.
                    if answer.is_none_or(|a| a.ttl() <= 0) {
                        lease =
                            me.client.clone().lease_grant(secs, None).await.map_err(me.err("granting a lease"))?.id();
                        tracing::info!("this server's lease had expired; registered again");
                    }
                    me.put_json(&key, &report(), Some(lease)).await
                };
                if let Err(e) = kept.await {
                    tracing::warn!(error = %e, "could not refresh this server's registration; retrying");
                }
            }
        });
        Ok(Registration { stop, task, lease, cluster: self.clone() })
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
        // Kept alive from the start: waiting to be elected may take longer than the lease.
        let (stop, mut stopped) = watch::channel(false);
        let me = self.clone();
        let every = Duration::from_millis((secs as u64 * 1000 / 3).max(200));
        let task = tokio::spawn(async move {
            let Ok((mut keeper, mut stream)) = me.client.clone().lease_keep_alive(lease).await else { return };
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => return,
                }
                if keeper.keep_alive().await.is_err() || stream.message().await.is_err() {
                    tracing::warn!("could not keep the leadership lease alive; retrying");
                }
            }
        });
        // A campaign waits as long as another leads, so it goes over a
        // connection without the request time-out: etcd withdraws a
        // cancelled campaign's key, which would race with a retry. HTTP/2
        // keep-alives still notice an etcd that went away.
        let opts = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        let campaigned = async {
            let mut waiting = Client::connect(&self.endpoint_list, Some(opts)).await?;
            waiting.campaign(self.key("leader"), candidate, lease).await
        };
        let won = match campaigned.await {
            Ok(won) => won,
            Err(e) => {
                let _ = stop.send(true);
                task.abort();
                return Err(self.err("campaigning")(e));
            }
        };
        let key = won.leader().cloned().ok_or_else(|| Error::BadRecord {
            key: self.key("leader"),
            message: "campaign won without a key".into(),
        })?;
        tracing::info!(candidate, "elected leader");
        Ok(Leadership { stop, task, lease, key, cluster: self.clone() })
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
        self.task.abort();
        self.cluster.client.clone().lease_revoke(self.lease).await.map_err(self.cluster.err("revoking a lease"))?;
        Ok(())
    }

    /// Stops refreshing without leaving, as a crashed server would: its
    /// record drops out when the lease expires.
    pub fn go_silent(self) {
        let _ = self.stop.send(true);
        self.task.abort();
    }
}

impl Leadership {
    /// Gives the leadership up now; another candidate is elected.
    ///
    /// # Errors
    /// If etcd fails (the lease then expires by itself).
    pub async fn resign(self) -> Result<(), Error> {
        let _ = self.stop.send(true);
        self.task.abort();
        let opts = etcd_client::ResignOptions::new().with_leader(self.key);
        self.cluster.client.clone().resign(Some(opts)).await.map_err(self.cluster.err("resigning"))?;
        let _ = self.cluster.client.clone().lease_revoke(self.lease).await;
        Ok(())
    }

    /// Stops keeping the lease alive, as a crashed leader would.
    pub fn go_silent(self) {
        let _ = self.stop.send(true);
        self.task.abort();
    }
}
