//! The cluster state against a real etcd (Debian's etcd-server), started by
//! this test binary (and restarted by one test) and killed with it.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use strata_cluster::{Cluster, Error, ServerLoad, SessionEntry};

#[path = "../../remote/tests/support/tied.rs"]
mod tied;

fn e2e() -> bool {
    if std::env::var_os("STRATA_E2E").is_some() {
        return true;
    }
    eprintln!("STRATA_E2E is not set: this test runs a real etcd and runs only under ./test.sh");
    false
}

/// One etcd for this binary: its client URL, and the process (replaceable).
struct Etcd {
    url: String,
    dir: PathBuf,
    port: u16,
    child: Mutex<Option<Child>>,
}

fn free_port_pair(mut base: u16) -> u16 {
    for _ in 0..200 {
        if [0, 1].iter().all(|o| std::net::TcpListener::bind(("127.0.0.1", base + o)).is_ok()) {
            return base;
        }
        base += 10;
    }
    panic!("no free ports for etcd");
}

fn spawn_etcd(dir: &std::path::Path, port: u16) -> Child {
    let client = format!("http://127.0.0.1:{port}");
    let peer = format!("http://127.0.0.1:{}", port + 1);
    let mut cmd = Command::new("etcd");
    cmd.args(["--name", "t", "--data-dir"])
        .arg(dir)
        .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
        .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
        .args(["--initial-cluster", &format!("t={peer}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = tied::spawn_tied(cmd).expect("etcd is installed by scripts/deps.sh (etcd-server)");
    let end = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < end, "etcd did not listen within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// A new etcd with a data directory of its own.
fn start_etcd(name: &str, base_port: u16) -> Etcd {
    let dir = std::env::temp_dir().join(format!("strata-etcd-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let port = free_port_pair(base_port);
    let child = spawn_etcd(&dir, port);
    Etcd { url: format!("http://127.0.0.1:{port}"), dir, port, child: Mutex::new(Some(child)) }
}

/// The etcd the tests that leave it running share.
fn etcd() -> &'static Etcd {
    static E: OnceLock<Etcd> = OnceLock::new();
    E.get_or_init(|| start_etcd("shared", 39_300))
}

/// A connection under a prefix of its own, so tests do not see each other.
async fn cluster(test: &str) -> Cluster {
    Cluster::connect(&[etcd().url.clone()], &format!("/strata-test/{test}/")).await.unwrap()
}

fn load(id: &str, sessions: u32) -> ServerLoad {
    ServerLoad {
        id: id.into(),
        healthy: true,
        sessions,
        cpus: 2,
        load1: 0.5,
        memory_total_mib: 24 << 10,
        memory_free_mib: 20 << 10,
        memory_committed_mib: 512,
        cached_images: BTreeSet::new(),
        address: format!("http://127.0.0.1:7{sessions:03}"),
    }
}

/// Polls `cond` until it holds or `limit` passes; how long it took.
async fn within<F: std::future::Future<Output = bool>>(
    limit: Duration,
    mut cond: impl FnMut() -> F,
) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if cond().await {
            return Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

#[tokio::test]
async fn servers_register_with_leases_and_a_silent_one_drops_out_within_seconds() {
    if !e2e() {
        return;
    }
    let c = cluster("servers").await;
    let a = c.register(Duration::from_secs(2), || load("server-a", 1)).await.unwrap();
    let b = c.register(Duration::from_secs(2), || load("server-b", 3)).await.unwrap();
    let names = |v: Vec<ServerLoad>| v.into_iter().map(|s| s.id).collect::<Vec<_>>();
    assert_eq!(names(c.servers().await.unwrap()), ["server-a", "server-b"]);
    // Registered servers stay while they report, past their lease's length.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(c.servers().await.unwrap().len(), 2, "a reporting server dropped out");
    // One goes silent, as a crashed agent would: gone once its lease expires.
    b.go_silent();
    let gone = within(Duration::from_secs(8), || async { names(c.servers().await.unwrap()) == ["server-a"] }).await;
    assert!(gone.is_some(), "a silent server is still registered after 8 s");
    // One leaves: gone at once.
    a.leave().await.unwrap();
    assert!(c.servers().await.unwrap().is_empty());
    // A bad server id is refused before anything is written.
    let err = c.register(Duration::from_secs(2), || load("a/b", 0)).await.err().unwrap().to_string();
    assert!(err.contains("server id"), "{err}");
}

#[tokio::test]
async fn session_records_outlive_a_control_plane_and_an_etcd_restart() {
    if !e2e() {
        return;
    }
    // An etcd of its own: this test stops and restarts it.
    let e = start_etcd("restart", 39_500);
    let connect = || Cluster::connect(std::slice::from_ref(&e.url), "/strata-test/sessions/");
    let c = connect().await.unwrap();
    let entry = |id: &str| SessionEntry {
        id: id.into(),
        server: "server-a".into(),
        package: "python3".into(),
        state: "running".into(),
        owner: "alice".into(),
        image: None,
        record: None,
        created: 1_700_000_000,
    };
    c.put_session(&entry("aaaaaaaaaaaa")).await.unwrap();
    c.put_session(&entry("bbbbbbbbbbbb")).await.unwrap();
    let mut paused = entry("bbbbbbbbbbbb");
    paused.state = "paused".into();
    paused.image = Some("f".repeat(64));
    paused.record = Some(serde_json::json!({"id": "bbbbbbbbbbbb", "paused_image": "f".repeat(64)}));
    c.put_session(&paused).await.unwrap();
    let token = strata_cluster::TokenEntry { terminal: "alice".into(), hash: "ab".repeat(32), expires: Some(1) };
    c.put_token(&token).await.unwrap();
    drop(c);
    // A new control plane sees them.
    let c = connect().await.unwrap();
    assert_eq!(c.sessions().await.unwrap(), vec![entry("aaaaaaaaaaaa"), paused.clone()]);

    // etcd goes away: clear errors, quickly, never a hang.
    let mut child = e.child.lock().unwrap().take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let t0 = Instant::now();
    let err = c.sessions().await.unwrap_err();
    assert!(matches!(err, Error::Etcd { .. }), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(15), "an unreachable etcd took {:?} to fail", t0.elapsed());
    let err = Cluster::connect(std::slice::from_ref(&e.url), "/strata-test/sessions/").await.err().unwrap();
    assert!(matches!(err, Error::Unreachable { .. }) && err.to_string().contains(&e.url), "{err}");

    // Back: nothing was lost.
    *e.child.lock().unwrap() = Some(spawn_etcd(&e.dir, e.port));
    let c = connect().await.unwrap();
    assert_eq!(c.sessions().await.unwrap(), vec![entry("aaaaaaaaaaaa"), paused]);
    assert_eq!(c.tokens().await.unwrap(), vec![token]);
    c.remove_session("aaaaaaaaaaaa").await.unwrap();
    assert_eq!(c.sessions().await.unwrap().len(), 1);
    if let Some(mut child) = e.child.lock().unwrap().take() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = std::fs::remove_dir_all(&e.dir);
}

#[tokio::test]
async fn one_control_plane_leads_and_another_takes_over_when_it_dies() {
    if !e2e() {
        return;
    }
    let c = cluster("election").await;
    assert_eq!(c.leader().await.unwrap(), None);
    let first = c.campaign("plane-1", Duration::from_secs(2)).await.unwrap();
    assert_eq!(c.leader().await.unwrap().as_deref(), Some("plane-1"));
    // The second waits while the first leads.
    let c2 = cluster("election").await;
    let second = tokio::spawn(async move { c2.campaign("plane-2", Duration::from_secs(2)).await });
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!second.is_finished(), "two leaders at once");
    // The first dies (its lease is no longer kept): the second takes over.
    first.go_silent();
    let won = tokio::time::timeout(Duration::from_secs(10), second).await.expect("no takeover within 10 s");
    let leadership = won.unwrap().unwrap();
    assert_eq!(c.leader().await.unwrap().as_deref(), Some("plane-2"));
    leadership.resign().await.unwrap();
    assert_eq!(c.leader().await.unwrap(), None);
}
