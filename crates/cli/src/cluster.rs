//! The cluster side of the CLI: joining `serve` to a cluster, running a
//! control plane, keeping terminals' tokens in etcd.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;

/// The prefix of strata's keys in etcd.
const PREFIX: &str = "/strata/";

/// The cluster's shared secret, from the environment only (never argv,
/// where `ps` shows it).
fn secret() -> anyhow::Result<String> {
    let s = std::env::var("STRATA_CLUSTER_TOKEN").map_err(|_| {
        anyhow::anyhow!("a cluster needs its secret in STRATA_CLUSTER_TOKEN (`strata token secret` makes one)")
    })?;
    if s.len() < 16 {
        anyhow::bail!("STRATA_CLUSTER_TOKEN must be at least 16 characters (`strata token secret` makes one)");
    }
    Ok(s)
}

fn check_endpoints(etcd: &[String]) -> anyhow::Result<()> {
    for e in etcd {
        if !(e.starts_with("http://") || e.starts_with("https://")) {
            anyhow::bail!("etcd endpoint {e:?} must be a URL: http://HOST:PORT");
        }
    }
    Ok(())
}

/// This server's link to the cluster, for `serve --etcd`.
pub async fn link(
    etcd: &[String],
    advertise: Option<String>,
    server_id: Option<String>,
    bound: SocketAddr,
    scheme: &str,
) -> anyhow::Result<Arc<strata_api::cluster::ClusterLink>> {
    check_endpoints(etcd)?;
    let secret = secret()?;
    let address = advertise.unwrap_or_else(|| format!("{scheme}://{bound}"));
    if !(address.starts_with("http://") || address.starts_with("https://")) {
        anyhow::bail!("--advertise {address:?} must be a URL: http://HOST:PORT");
    }
    let address = address.trim_end_matches('/').to_string();
    let id = server_id.unwrap_or_else(|| format!("{}-{}", strata_engine::host::host_name(), bound.port()));
    let cluster = strata_cluster::Cluster::connect(etcd, PREFIX).await?;
    let link = strata_api::cluster::ClusterLink::new(cluster, id, address, secret).map_err(anyhow::Error::msg)?;
    Ok(Arc::new(link))
}

/// How `strata control` was asked to run.
pub struct Plane<'a> {
    pub listen: SocketAddr,
    pub etcd: &'a [String],
    pub rule: &'a str,
    pub overcommit: f64,
    pub name: Option<String>,
    pub packages: std::path::PathBuf,
    /// Certificate chain and key to serve HTTPS with.
    pub tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// A CA to trust for servers that serve HTTPS (`serve --tls`).
    pub ca_cert: Option<std::path::PathBuf>,
    pub max_sessions_per_terminal: usize,
    pub max_memory_per_terminal_mib: u32,
    /// Seconds a silent server's sessions stay running before they are lost.
    pub lost_after: u64,
    /// Terminals that see and manage every session of the cluster.
    pub operators: &'a [String],
}

/// `strata control`: a control plane until interrupted.
pub async fn control(p: Plane<'_>) -> anyhow::Result<u8> {
    check_endpoints(p.etcd)?;
    let policy = strata_placement::Policy::new(p.rule.parse()?, p.overcommit)?;
    let secret = secret()?;
    let tls = p
        .tls
        .as_ref()
        .map(|(cert, key)| strata_api::tls::server_config(cert, key))
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let ca = match &p.ca_cert {
        Some(path) => Some(std::fs::read(path).with_context(|| format!("cannot read --ca-cert {}", path.display()))?),
        None => None,
    };
    let cluster = strata_cluster::Cluster::connect(p.etcd, PREFIX).await?;
    let name = p.name.unwrap_or_else(|| format!("{}-{}", strata_engine::host::host_name(), p.listen.port()));
    let packages_dir = if p.packages.is_dir() {
        p.packages.clone()
    } else {
        let empty = std::env::temp_dir().join("strata-no-packages");
        std::fs::create_dir_all(&empty)?;
        empty
    };
    if p.max_sessions_per_terminal == 0 {
        anyhow::bail!("--max-sessions-per-terminal must be at least 1");
    }
    let mut plane = strata_control::ControlPlane::new(cluster, secret, name, policy, &packages_dir, ca.as_deref())?;
    if p.max_memory_per_terminal_mib < 128 {
        anyhow::bail!("--max-memory-per-terminal-mib must be at least 128 (the smallest guest)");
    }
    plane.max_sessions_per_terminal = p.max_sessions_per_terminal;
    plane.max_memory_mib_per_terminal = u64::from(p.max_memory_per_terminal_mib);
    if p.lost_after == 0 || p.lost_after > 86_400 {
        anyhow::bail!("--lost-after must be between 1 and 86400 seconds (a server silent that long has its running sessions marked lost)");
    }
    plane.lost_after = std::time::Duration::from_secs(p.lost_after);
    if let Some(bad) = p.operators.iter().find(|t| !strata_api::auth::valid_terminal(t)) {
        anyhow::bail!("--operator {bad:?} is not a terminal name (letters, digits, - _ ., up to 64)");
    }
    plane.operators = p.operators.iter().cloned().collect();
    let cp = Arc::new(plane);
    tokio::spawn(cp.clone().lead());
    let listener = std::net::TcpListener::bind(p.listen).with_context(|| format!("cannot listen on {}", p.listen))?;
    listener.set_nonblocking(true)?;
    let app = strata_control::router(cp.clone());
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!("strata: control plane {} on {scheme}://{}", cp.name, listener.local_addr()?);
    crate::listen::serve(listener, app, tls).await?;
    Ok(0)
}

/// `strata token create NAME --etcd ...`: a token the control planes know.
pub async fn create_token(
    etcd: &[String],
    terminal: &str,
    valid_for: Option<std::time::Duration>,
) -> anyhow::Result<u8> {
    check_endpoints(etcd)?;
    if !strata_api::auth::valid_terminal(terminal) {
        anyhow::bail!("{terminal:?} is not a valid terminal name (letters, digits, - _ ., up to 64)");
    }
    let cluster = strata_cluster::Cluster::connect(etcd, PREFIX).await?;
    let token = strata_api::auth::new_token()?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let entry = strata_cluster::TokenEntry {
        terminal: terminal.to_string(),
        hash: hex::encode(strata_api::auth::token_hash(&token)),
        expires: valid_for.map(|d| now.saturating_add(d.as_secs())),
    };
    cluster.put_token(&entry).await?;
    println!("{token}");
    Ok(0)
}
