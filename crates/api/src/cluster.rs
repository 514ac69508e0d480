//! A server in a cluster: `strata serve --etcd` registers this server in
//! etcd with its address and load (under a lease it keeps alive), keeps the
//! records of its sessions there, and takes orders from control planes,
//! which authenticate with the cluster's shared secret and act for a
//! terminal named in `x-strata-terminal`. Terminals attach here directly,
//! with a ticket a control plane signed (see `strata_cluster::ticket`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use strata_cluster::{Cluster, Registration, ServerLoad, SessionEntry};
use subtle::ConstantTimeEq;

use crate::live::State;
use crate::AppState;

/// The header naming the terminal a control plane acts for.
pub const TERMINAL_HEADER: &str = "x-strata-terminal";

/// How long this server's registration outlives its last refresh.
const LEASE: Duration = Duration::from_secs(3);
/// How often this server's session records are brought up to date.
const RECONCILE_EVERY: Duration = Duration::from_secs(2);
/// How often the load this server reports is read.
const LOAD_EVERY: Duration = Duration::from_secs(1);

/// This server's place in a cluster.
pub struct ClusterLink {
    pub cluster: Cluster,
    /// Its id among the cluster's servers.
    pub server_id: String,
    /// Where its API answers, as other machines reach it.
    pub address: String,
    secret: String,
}

impl ClusterLink {
    /// # Errors
    /// If the secret is too short to be one.
    pub fn new(cluster: Cluster, server_id: String, address: String, secret: String) -> Result<ClusterLink, String> {
        if secret.len() < 16 {
            return Err("the cluster token (STRATA_CLUSTER_TOKEN) must be at least 16 characters; \
                        `strata token secret` makes one"
                .into());
        }
        Ok(ClusterLink { cluster, server_id, address, secret })
    }

    /// Whether `token` is the cluster's secret (constant time).
    /// The cluster's secret, for this server's own orders to another (a move).
    pub fn secret(&self) -> &str {
        &self.secret
    }

    pub fn is_secret(&self, token: &str) -> bool {
        crate::auth::matches(token, &crate::auth::token_hash(&self.secret))
            && token.len().ct_eq(&self.secret.len()).into()
    }

    /// Whether `ticket` lets `terminal` attach to `session`.
    pub fn ticket_opens(&self, session: &str, terminal: &str, ticket: &str) -> bool {
        strata_cluster::ticket::verify(&self.secret, session, terminal, ticket)
    }
}

/// This server's load as placement reads it. If its status cannot be read,
/// it reports no free memory, so placement leaves it alone.
fn load(st: &AppState, link: &ClusterLink) -> ServerLoad {
    let s = st.engine.server_status().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot read this server's status; reporting it full");
        strata_engine::host::ServerStatus {
            name: link.server_id.clone(),
            cpus: 1,
            load1: 0.0,
            memory_total_mib: 0,
            memory_available_mib: 0,
            guest_memory_committed_mib: 0,
            sessions: 0,
            images: 0,
            blobs_bytes: 0,
        }
    });
    let cached = st.engine.cached_packages().unwrap_or_default();
    ServerLoad {
        id: link.server_id.clone(),
        healthy: true,
        sessions: s.sessions as u32,
        cpus: s.cpus as u32,
        load1: s.load1,
        memory_total_mib: s.memory_total_mib,
        memory_free_mib: s.memory_available_mib,
        memory_committed_mib: s.guest_memory_committed_mib,
        cached_images: cached.into_iter().map(|p| format!("package/{p}")).collect(),
        address: link.address.clone(),
    }
}

/// Registers this server and keeps its session records in etcd until the
/// process ends.
///
/// The lease is kept from a thread of its own (`strata_cluster`); this
/// runtime only publishes the load it reads, once a second, for that
/// thread to send. A runtime held up by other work makes the load a little
/// stale, never the registration late.
///
/// # Errors
/// If etcd cannot be reached now.
pub async fn join(st: Arc<AppState>) -> Result<Registration, strata_cluster::Error> {
    let link = st.cluster.clone().expect("join is called in cluster mode");
    let (report, reported) = tokio::sync::watch::channel(load(&st, &link));
    let registration = link.cluster.register(LEASE, reported).await?;
    tracing::info!(server = %link.server_id, address = %link.address, etcd = %link.cluster.endpoints(), "joined the cluster");
    let (st2, link2) = (st.clone(), link.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(LOAD_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if report.send(load(&st2, &link2)).is_err() {
                return;
            }
        }
    });
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(RECONCILE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = reconcile(&st, &link).await {
                tracing::warn!(error = %e, "could not bring this server's session records up to date; retrying");
            }
        }
    });
    Ok(registration)
}

/// Makes etcd's records of this server's sessions match what it runs: a
/// record for each live session (with a paused one's record, so another
/// server can resume it), none for ended ones. A paused session whose record
/// names another server has moved there: it is forgotten here.
///
/// This server's report wins over a control plane's guess: a session the
/// plane marked `lost` (or suspect) while this server was silent, and that
/// still runs here, is `running` again, its record saying how long the
/// server was unreachable.
pub async fn reconcile(st: &AppState, link: &ClusterLink) -> Result<(), strata_cluster::Error> {
    let now = std::time::SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let entries = link.cluster.sessions().await?;
    let by_id: HashMap<&str, &SessionEntry> = entries.iter().map(|e| (e.id.as_str(), e)).collect();
    let live = st.sessions.all();
    for l in &live {
        if l.moving.load(std::sync::atomic::Ordering::SeqCst) {
            continue;
        }
        let state = *l.state.lock().unwrap_or_else(|e| e.into_inner());
        let known = by_id.get(l.id.as_str());
        if let Some(e) = known.filter(|e| e.server != link.server_id) {
            if state == State::Paused {
                tracing::info!(session = %l.id, server = %e.server, "a paused session moved to another server; forgetting it here");
                let (tx, rx) = tokio::sync::oneshot::channel();
                if l.cmd.send(crate::live::Cmd::Kill(tx)).await.is_ok() {
                    let _ = rx.await;
                }
            }
            continue;
        }
        // Only a paused session has a record file to carry (a read each).
        let record = (state == State::Paused).then(|| st.engine.paused_record(&l.id)).flatten();
        let entry = SessionEntry {
            id: l.id.clone(),
            server: link.server_id.clone(),
            package: l.package.clone(),
            os: Some(l.os.clone()),
            state: match state {
                State::Running => "running".into(),
                State::Paused => "paused".into(),
                State::Exited => "exited".into(),
                State::Lost => "lost".into(),
            },
            owner: l.owner.clone(),
            image: record.as_ref().and_then(|r| r.paused_image.clone()),
            record: record.and_then(|r| serde_json::to_value(r).ok()),
            created: l.created.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            unreachable_since: None,
            last_outage_s: known.and_then(|k| outage_ended(k, now)),
        };
        if let Some(k) = known.filter(|k| k.state == "lost" || k.unreachable_since.is_some()) {
            tracing::info!(session = %l.id, was = %k.state, unreachable_s = ?entry.last_outage_s, "this server is back; its session is reported running again");
        }
        if known.is_none_or(|k| **k != entry) {
            link.cluster.put_session(&entry).await?;
        }
    }
    for e in entries.iter().filter(|e| e.server == link.server_id) {
        if !live.iter().any(|l| l.id == e.id) {
            link.cluster.remove_session(&e.id).await?;
        }
    }
    Ok(())
}

/// Records `live` in the cluster as running on this server (a session
/// that moved here), whatever the record said before.
///
/// # Errors
/// If etcd cannot be written.
pub async fn record_running(link: &ClusterLink, live: &crate::live::Live) -> Result<(), strata_cluster::Error> {
    link.cluster.put_session(&running_here(link, live)).await
}

/// The record of `live` running on this server.
fn running_here(link: &ClusterLink, live: &crate::live::Live) -> SessionEntry {
    let created = live.created.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    SessionEntry {
        os: Some(live.os.clone()),
        ..SessionEntry::running(&live.id, &link.server_id, &live.package, &live.owner, created)
    }
}

/// Where a session that was moving runs, once settled.
#[derive(Debug, PartialEq, Eq)]
pub enum Settled {
    Here,
    There,
}

/// How long a server that sent a session tries to settle a failed move in
/// etcd before it leaves the guest stopped.
const SETTLE_PATIENCE: Duration = Duration::from_secs(60);

/// The fence of a move of session `id` from this server: the revision of
/// its record in etcd (written first if missing). The side of the move
/// that first writes the record while it still has that revision runs the
/// guest (the receiver before it starts it, this server when the move
/// fails after the memory went), so it never runs on both or on neither.
///
/// # Errors
/// If etcd fails, or names another server for it.
pub async fn move_fence(link: &ClusterLink, live: &crate::live::Live) -> Result<i64, String> {
    for _ in 0..3 {
        match link.cluster.session_with_revision(&live.id).await.map_err(|e| e.to_string())? {
            Some((e, _)) if e.server != link.server_id => {
                return Err(format!("the cluster records session {} on server {}, not this one", live.id, e.server))
            }
            Some((_, revision)) => return Ok(revision),
            None => record_running(link, live).await.map_err(|e| e.to_string())?,
        }
    }
    Err(format!("the record of session {} changed while a move began", live.id))
}

/// Records session `rec` (moving here) as running on this server, if its
/// record is as it was when the move began (`fence`): whether it was.
///
/// # Errors
/// If etcd fails.
pub async fn claim_moved(
    link: &ClusterLink,
    rec: &strata_engine::sessions::SessionRecord,
    owner: &str,
    fence: i64,
) -> Result<bool, strata_cluster::Error> {
    let entry = SessionEntry {
        os: Some(rec.os.clone()),
        ..SessionEntry::running(&rec.id, &link.server_id, &rec.package, owner, u64::try_from(rec.created).unwrap_or(0))
    };
    link.cluster.put_session_if_unchanged(&entry, fence).await
}

/// After a move of `live` to server `to` failed once the guest's memory
/// had gone: whether the receiver took the session anyway (its answer was
/// lost), or this server keeps it (its record rewritten, so the receiver
/// can no longer take it). Retries etcd for a while.
///
/// # Errors
/// If etcd could not be reached: then nobody knows yet.
pub async fn settle_failed_move(
    link: &ClusterLink,
    live: &crate::live::Live,
    to: &str,
    fence: i64,
) -> Result<Settled, String> {
    let entry = running_here(link, live);
    let end = tokio::time::Instant::now() + SETTLE_PATIENCE;
    loop {
        let settled = async {
            if link.cluster.put_session_if_unchanged(&entry, fence).await? {
                return Ok(Settled::Here);
            }
            // Changed since: by the receiver (it runs there), or by
            // someone else, and then the receiver cannot take it either.
            Ok(match link.cluster.session_with_revision(&live.id).await? {
                Some((e, _)) if e.server == to => Settled::There,
                _ => Settled::Here,
            })
        };
        match settled.await {
            Ok(s) => return Ok(s),
            Err(e) if tokio::time::Instant::now() >= end => {
                let e: strata_cluster::Error = e;
                return Err(format!(
                    "the cluster could not be asked who runs session {} after a failed move: {e}",
                    live.id
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

/// Whether this server, just started, keeps running session `live` it
/// found from before: not if the cluster records it running elsewhere (it
/// moved meanwhile). Kept, its record is rewritten, so that a move this
/// server's end cut short cannot start it elsewhere too.
///
/// # Errors
/// If etcd fails.
pub async fn keep_after_restart(link: &ClusterLink, live: &crate::live::Live) -> Result<bool, strata_cluster::Error> {
    for _ in 0..3 {
        let Some((e, revision)) = link.cluster.session_with_revision(&live.id).await? else {
            record_running(link, live).await?;
            return Ok(true);
        };
        if e.server != link.server_id && e.state == "running" {
            return Ok(false);
        }
        // The same record again: only its revision changes (the
        // reconciliation makes the rest right).
        if link.cluster.put_session_if_unchanged(&e, revision).await? {
            return Ok(true);
        }
    }
    // Changed under us three times: whoever changed it last decides next round.
    Ok(true)
}

/// How long this server was unreachable, as a session's record tells it:
/// the outage that is ending now (the plane noted since when), else the
/// one before, kept.
fn outage_ended(known: &SessionEntry, now: u64) -> Option<u64> {
    match known.unreachable_since {
        Some(since) => Some(now.saturating_sub(since)),
        None => known.last_outage_s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outage_a_record_reports_is_the_one_ending_or_else_the_last() {
        let mut e = SessionEntry::running("s1", "a", "bc", "alice", 1);
        assert_eq!(outage_ended(&e, 100), None);
        e.unreachable_since = Some(96);
        assert_eq!(outage_ended(&e, 100), Some(4));
        e.last_outage_s = Some(30);
        assert_eq!(outage_ended(&e, 100), Some(4), "the outage ending now wins over the one before");
        e.unreachable_since = None;
        assert_eq!(outage_ended(&e, 100), Some(30), "kept once the outage is over");
        e.unreachable_since = Some(200);
        assert_eq!(outage_ended(&e, 100), Some(0), "a clock behind the plane's never goes negative");
    }
}
