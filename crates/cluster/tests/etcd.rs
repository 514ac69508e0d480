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
    let child = tied::spawn_tied(cmd).expect("etcd is installed by scripts/deps-cluster.sh (etcd-server)");
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

/// A server's load, as a registration reads it.
fn report(id: &str, sessions: u32) -> tokio::sync::watch::Receiver<ServerLoad> {
    tokio::sync::watch::channel(load(id, sessions)).1
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
    let a = c.register(Duration::from_secs(2), report("server-a", 1)).await.unwrap();
    let b = c.register(Duration::from_secs(2), report("server-b", 3)).await.unwrap();
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
    let err = c.register(Duration::from_secs(2), report("a/b", 0)).await.err().unwrap().to_string();
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
    let entry = |id: &str| SessionEntry::running(id, "server-a", "python3", "alice", 1_700_000_000);
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

/// The cause of sessions marked lost on a busy machine (issue 18): a
/// server's runtime is one thread, and the lease was kept by a task on it,
/// so anything that held the thread for longer than the lease (hashing and
/// syncing a fetched image) let the server drop out. The lease is kept from
/// a thread of its own now: this test blocks the runtime that registered
/// for twice the lease and watches, from another thread, that the server
/// never left.
#[tokio::test]
async fn a_server_whose_runtime_is_blocked_stays_registered() {
    if !e2e() {
        return;
    }
    let c = cluster("blocked").await;
    let (tx, rx) = tokio::sync::watch::channel(load("server-busy", 1));
    let reg = c.register(Duration::from_secs(2), rx).await.unwrap();
    let url = etcd().url.clone();
    let watcher = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let c = Cluster::connect(&[url], "/strata-test/blocked/").await.unwrap();
            let (mut looks, mut absent, mut sessions_seen) = (0, 0, BTreeSet::new());
            let end = Instant::now() + Duration::from_secs(5);
            while Instant::now() < end {
                let servers = c.servers().await.unwrap();
                looks += 1;
                match servers.iter().find(|s| s.id == "server-busy") {
                    Some(s) => {
                        sessions_seen.insert(s.sessions);
                    }
                    None => absent += 1,
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (looks, absent, sessions_seen)
        })
    });
    // The load is published before the runtime blocks, then the runtime
    // does nothing else for 5 s (2.5 leases).
    tx.send_replace(load("server-busy", 7));
    std::thread::sleep(Duration::from_secs(5));
    let (looks, absent, seen) = watcher.join().unwrap();
    assert!(looks >= 10, "the watcher looked only {looks} times");
    assert_eq!(absent, 0, "the server dropped out in {absent} of {looks} looks while its runtime was blocked");
    assert!(seen.contains(&7), "the load sent before the block was not published: {seen:?}");
    reg.leave().await.unwrap();
    assert!(c.servers().await.unwrap().is_empty(), "a server that left is still registered");
}

#[tokio::test]
async fn a_guess_from_an_older_state_never_overwrites_a_newer_report() {
    if !e2e() {
        return;
    }
    let c = cluster("cas").await;
    let entry = SessionEntry::running("cccccccccccc", "server-a", "bc", "alice", 1_700_000_000);
    c.put_session(&entry).await.unwrap();
    let (read, rev) = c.sessions_with_revisions().await.unwrap().remove(0);
    assert_eq!(read, entry);
    // The server reports in between: the plane's guess from the old read loses.
    let mut report = entry.clone();
    report.last_outage_s = Some(4);
    c.put_session(&report).await.unwrap();
    let mut guess = entry.clone();
    guess.state = "lost".into();
    assert!(!c.put_session_if_unchanged(&guess, rev).await.unwrap(), "a stale guess was written");
    assert_eq!(c.sessions().await.unwrap(), vec![report.clone()]);
    // From a fresh read it is written.
    let (_, rev) = c.sessions_with_revisions().await.unwrap().remove(0);
    assert!(c.put_session_if_unchanged(&guess, rev).await.unwrap());
    assert_eq!(c.sessions().await.unwrap()[0].state, "lost");
    c.remove_session("cccccccccccc").await.unwrap();
}

/// A server whose lease is gone by the time it can reach etcd again (etcd
/// restarted and the lease revoked meanwhile, as an expiry would) takes a
/// new lease and registers again: opening a keep-alive stream for a lease
/// etcd no longer has is that news, not a failure to retry for ever.
#[tokio::test]
async fn a_server_whose_lease_vanished_while_etcd_was_away_registers_again() {
    if !e2e() {
        return;
    }
    let e = start_etcd("relapse", 39_550);
    let c = Cluster::connect(std::slice::from_ref(&e.url), "/strata-test/relapse/").await.unwrap();
    let reg = c.register(Duration::from_secs(2), report("server-r", 1)).await.unwrap();
    assert_eq!(c.servers().await.unwrap().len(), 1);
    let mut child = e.child.lock().unwrap().take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    *e.child.lock().unwrap() = Some(spawn_etcd(&e.dir, e.port));
    // etcd renews every lease when it comes back; revoke the server's, as
    // its expiry would have removed it.
    let mut raw = etcd_client::Client::connect([e.url.as_str()], None).await.unwrap();
    let key = "/strata-test/relapse/servers/server-r";
    let lease = raw.get(key, None).await.unwrap().kvs().first().map(|kv| kv.lease()).unwrap_or(0);
    if lease != 0 {
        raw.lease_revoke(lease).await.unwrap();
    }
    let c = Cluster::connect(std::slice::from_ref(&e.url), "/strata-test/relapse/").await.unwrap();
    let back = within(Duration::from_secs(15), || async { c.servers().await.is_ok_and(|s| s.len() == 1) }).await;
    assert!(back.is_some(), "the server did not register again after its lease vanished");
    let new_lease = raw.get(key, None).await.unwrap().kvs().first().map(|kv| kv.lease()).unwrap();
    assert_ne!(new_lease, lease, "registered again under the revoked lease");
    reg.go_silent();
    if let Some(mut child) = e.child.lock().unwrap().take() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = std::fs::remove_dir_all(&e.dir);
}

/// Turns authentication on in the etcd at `url`: a root user, and a user
/// `strata` whose role may read and write only beneath `prefix`.
fn secure_etcd(url: &str, prefix: &str, root_password: &str, password: &str) {
    let ctl = |args: &[&str]| {
        let out =
            Command::new("etcdctl").arg("--endpoints").arg(url).args(args).output().expect("etcdctl (etcd-client)");
        assert!(out.status.success(), "etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    ctl(&["user", "add", &format!("root:{root_password}")]);
    ctl(&["role", "add", "root"]);
    ctl(&["user", "grant-role", "root", "root"]);
    ctl(&["user", "add", &format!("strata:{password}")]);
    ctl(&["role", "add", "strata"]);
    ctl(&["role", "grant-permission", "strata", "--prefix=true", "readwrite", prefix]);
    ctl(&["user", "grant-role", "strata", "strata"]);
    ctl(&["auth", "enable"]);
}

#[tokio::test]
async fn with_authentication_on_a_client_without_credentials_can_neither_read_nor_write() {
    if !e2e() {
        return;
    }
    let e = start_etcd("auth", 39_600);
    let prefix = "/strata-test/auth/";
    secure_etcd(&e.url, prefix, "root-secret", "strata-secret");
    let endpoints = std::slice::from_ref(&e.url);
    let entry = SessionEntry::running("s1", "server-a", "python3", "alice", 1);

    // No credentials: every read and write is refused.
    if let Ok(anonymous) = Cluster::connect_as(endpoints, prefix, None).await {
        assert!(anonymous.put_session(&entry).await.is_err(), "an anonymous client wrote");
        assert!(anonymous.sessions().await.is_err(), "an anonymous client read");
        assert!(anonymous.servers().await.is_err(), "an anonymous client read the servers");
    }
    // A wrong password: refused at connect.
    let wrong = strata_cluster::EtcdAuth { user: "strata".into(), password: "guess".into() };
    assert!(Cluster::connect_as(endpoints, prefix, Some(wrong)).await.is_err(), "a wrong password was let in");
    // The right credentials: reads, writes, a registration with its lease.
    let auth = strata_cluster::EtcdAuth { user: "strata".into(), password: "strata-secret".into() };
    let c = Cluster::connect_as(endpoints, prefix, Some(auth.clone())).await.unwrap();
    c.put_session(&entry).await.unwrap();
    assert_eq!(c.sessions().await.unwrap().len(), 1);
    let (_tx, rx) = tokio::sync::watch::channel(load("server-a", 0));
    let reg = c.register(Duration::from_secs(3), rx).await.unwrap();
    assert_eq!(c.servers().await.unwrap().len(), 1);
    reg.leave().await.unwrap();
    // Outside its prefix, the same user is refused.
    let elsewhere = Cluster::connect_as(endpoints, "/elsewhere/", Some(auth)).await.unwrap();
    assert!(elsewhere.sessions().await.is_err(), "the user read beyond its prefix");
}
