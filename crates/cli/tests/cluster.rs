//! A cluster on one machine: a real etcd, a real S3 server (Garage), two
//! control planes and three server agents, each agent in a network
//! namespace of its own with its own address on a bridge. Launches spread
//! by the placement rule, images travel through the object store, terminals
//! attach to the agents directly, and the faults of a fleet are played out:
//! a control plane killed, an agent killed with sessions, an agent killed
//! mid-launch, etcd down and back. Traffic stays on the bridge and loopback.

mod common;
#[path = "../../remote/tests/garage/mod.rs"]
mod garage;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use garage::tied;
use serde_json::Value;
use strata_engine::{Config, Engine, LogProgress};
use tokio_tungstenite::tungstenite::Message;

const BRIDGE: &str = "strtbr0";
const NET: &str = "10.231.7";
const HOST_IP: &str = "10.231.7.1";
const AGENTS: usize = 3;
const SECRET: &str = "cluster-test-secret-0123456789";
/// The planes' grace period for silent servers (`--lost-after`).
const LOST_AFTER_S: u64 = 20;

fn ns(i: usize) -> String {
    format!("strata-t{i}")
}

fn agent_ip(i: usize) -> String {
    format!("{NET}.{}", 10 + i)
}

fn sh(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Kills what runs in an agent's namespace (the agent and its QEMUs).
fn kill_namespace(name: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() else { return };
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        let _ = Command::new("kill").args(["-KILL", pid]).status();
    }
}

/// The bridge and the agents' namespaces; removed on drop (and before
/// setting up, in case an earlier run was killed).
struct Network;

impl Network {
    fn up() -> Network {
        Network::down();
        assert!(sh(&["ip", "link", "add", BRIDGE, "type", "bridge"]), "cannot create bridge {BRIDGE}");
        assert!(sh(&["ip", "addr", "add", &format!("{HOST_IP}/24"), "dev", BRIDGE]));
        assert!(sh(&["ip", "link", "set", BRIDGE, "up"]));
        for i in 1..=AGENTS {
            let (n, veth, peer) = (ns(i), format!("stv{i}"), format!("stv{i}p"));
            assert!(sh(&["ip", "netns", "add", &n]), "cannot create namespace {n}");
            assert!(sh(&["ip", "link", "add", &veth, "type", "veth", "peer", "name", &peer]));
            assert!(sh(&["ip", "link", "set", &peer, "netns", &n]));
            assert!(sh(&["ip", "link", "set", &veth, "master", BRIDGE, "up"]));
            assert!(sh(&["ip", "-n", &n, "addr", "add", &format!("{}/24", agent_ip(i)), "dev", &peer]));
            assert!(sh(&["ip", "-n", &n, "link", "set", &peer, "up"]));
            assert!(sh(&["ip", "-n", &n, "link", "set", "lo", "up"]));
        }
        Network
    }

    fn down() {
        for i in 1..=AGENTS {
            kill_namespace(&ns(i));
            sh(&["ip", "netns", "del", &ns(i)]);
        }
        sh(&["ip", "link", "del", BRIDGE]);
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        Network::down();
    }
}

/// A process killed on drop.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(mut cmd: Command, log: &Path) -> Proc {
    let f = std::fs::File::create(log).unwrap();
    cmd.stdout(Stdio::null()).stderr(f);
    Proc { child: tied::spawn_tied(cmd).unwrap(), log: log.to_path_buf() }
}

fn free_port(ip: &str, mut port: u16) -> u16 {
    for _ in 0..200 {
        if [0, 1].iter().all(|o| std::net::TcpListener::bind((ip, port + o)).is_ok()) {
            return port;
        }
        port += 10;
    }
    panic!("no free port on {ip}");
}

fn etcd(dir: &Path, port: u16, log: &Path) -> Proc {
    let client = format!("http://{HOST_IP}:{port}");
    let peer = format!("http://{HOST_IP}:{}", port + 1);
    let mut cmd = Command::new("etcd");
    cmd.args(["--name", "c", "--data-dir"])
        .arg(dir)
        .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
        .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
        .args(["--initial-cluster", &format!("c={peer}")]);
    let p = spawn(cmd, log);
    assert!(
        wait_until(Duration::from_secs(30), || std::net::TcpStream::connect((HOST_IP, port)).is_ok()),
        "etcd did not listen"
    );
    p
}

struct Cluster {
    etcd_url: String,
    cps: Vec<String>,
    http: reqwest::Client,
}

impl Cluster {
    async fn api(&self, cp: usize, method: &str, path: &str, token: &str) -> (u16, Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = self
            .http
            .request(m, format!("{}{path}", self.cps[cp]))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .timeout(Duration::from_secs(300));
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.bytes().await.unwrap();
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    async fn launch(&self, cp: usize, token: &str, package: &str) -> (u16, Value) {
        self.post(cp, token, "/v1/sessions", serde_json::json!({ "package": package })).await
    }

    async fn post(&self, cp: usize, token: &str, path: &str, body: Value) -> (u16, Value) {
        let resp = self
            .http
            .post(format!("{}{path}", self.cps[cp]))
            .bearer_auth(token)
            .json(&body)
            .timeout(Duration::from_secs(600))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn sessions(&self, cp: usize, token: &str) -> Vec<Value> {
        let (status, body) = self.api(cp, "GET", "/v1/sessions", token).await;
        assert_eq!(status, 200, "{body}");
        body.as_array().unwrap().clone()
    }

    /// Attaches through a ticket (to the agent directly), types `input`,
    /// waits for `expect`, and goes away without a word, as a vanishing
    /// client would: the session lives on.
    async fn exchange(&self, cp: usize, token: &str, id: &str, input: &str, expect: &str) -> String {
        let (status, t) = self.api(cp, "POST", &format!("/v1/sessions/{id}/attach-ticket"), token).await;
        assert_eq!(status, 200, "{t}");
        let url = t["url"].as_str().unwrap().to_string();
        assert!(url.starts_with(&format!("ws://{NET}.1")), "the terminal attaches to an agent, not the plane: {url}");
        let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        ws.send(Message::Binary(input.as_bytes().to_vec().into())).await.unwrap();
        let mut seen = String::new();
        let end = Instant::now() + Duration::from_secs(60);
        while !seen.contains(expect) {
            let left = end.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, ws.next()).await {
                Ok(Some(Ok(Message::Binary(b)))) => seen.push_str(&String::from_utf8_lossy(&b)),
                Ok(Some(Ok(_))) => {}
                other => panic!("no {expect:?} from session {id} (saw {seen:?}): {other:?}"),
            }
        }
        seen
    }
}

/// Polls an async condition every 200 ms until it holds or `limit` passes.
async fn eventually<F: std::future::Future<Output = bool>>(limit: Duration, mut cond: impl FnMut() -> F) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cond().await
}

/// The names of the cgroups beneath this process's own, in the pids
/// hierarchy (v1) or the unified one (v2): where agents make their VMs'.
fn cgroup_names() -> Vec<String> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let path = own
        .lines()
        .find_map(|l| l.split_once(":pids:").map(|(_, p)| format!("/sys/fs/cgroup/pids{p}")))
        .or_else(|| own.lines().find_map(|l| l.strip_prefix("0::").map(|p| format!("/sys/fs/cgroup{p}"))))
        .unwrap_or_default();
    std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Stops or continues a process (`STOP`, `CONT`), as a machine that hangs
/// and recovers would.
fn signal(pid: u32, sig: &str) {
    assert!(sh(&["kill", &format!("-{sig}"), &pid.to_string()]), "kill -{sig} {pid} failed");
}

fn field(sessions: &[Value], id: &str, name: &str) -> Value {
    sessions.iter().find(|s| s["id"] == id).map(|s| s[name].clone()).unwrap_or(Value::Null)
}

fn server_of(sessions: &[Value], id: &str) -> String {
    sessions.iter().find(|s| s["id"] == id).map(|s| s["server"].as_str().unwrap().to_string()).unwrap_or_default()
}

fn state_of(sessions: &[Value], id: &str) -> String {
    sessions.iter().find(|s| s["id"] == id).map(|s| s["state"].as_str().unwrap().to_string()).unwrap_or_default()
}

/// `strata attach` through a plane, its input and output piped: a terminal
/// that follows its session.
struct Follower {
    child: Child,
    typed: std::process::ChildStdin,
    shown: std::sync::mpsc::Receiver<Vec<u8>>,
    screen: String,
}

impl Follower {
    fn attach(plane: &str, token: &str, id: &str) -> Follower {
        let mut child = strata(&["--addr", plane, "--token", token, "attach", id])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let typed = child.stdin.take().unwrap();
        let (tx, shown) = std::sync::mpsc::channel::<Vec<u8>>();
        let mut from = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = std::io::Read::read(&mut from, &mut buf) {
                let _ = tx.send(buf[..n].to_vec());
            }
        });
        Follower { child, typed, shown, screen: String::new() }
    }

    fn type_in(&mut self, text: &str) {
        std::io::Write::write_all(&mut self.typed, text.as_bytes()).unwrap();
    }

    /// Whether the output shows `want` within `limit`.
    fn shows_within(&mut self, want: &str, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        while !self.screen.contains(want) && Instant::now() < end {
            if let Ok(b) = self.shown.recv_timeout(Duration::from_millis(200)) {
                self.screen.push_str(&String::from_utf8_lossy(&b));
            }
        }
        self.screen.contains(want)
    }

    /// Takes in what it showed so far.
    fn catch_up(&mut self) {
        while let Ok(b) = self.shown.try_recv() {
            self.screen.push_str(&String::from_utf8_lossy(&b));
        }
    }

    fn shows(&mut self, want: &str) -> bool {
        self.shows_within(want, Duration::from_secs(60))
    }

    /// Its output's lines, without carriage returns.
    fn lines(&self) -> Vec<&str> {
        self.screen.lines().map(|l| l.trim_end_matches('\r')).collect()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        kill_tree(&mut self.child);
    }
}

/// How `child` ended, if it did within `limit` (else it is killed).
fn ends_within(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let until = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = child.try_wait().unwrap();
    if status.is_none() {
        let _ = child.kill();
    }
    status
}

/// The QEMUs in agent `i`'s namespace that run session `id`.
fn qemus_of(i: usize, id: &str) -> usize {
    let Ok(out) = Command::new("ip").args(["netns", "pids", &ns(i)]).output() else { return 0 };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            comm.starts_with("qemu") && String::from_utf8_lossy(&cmdline).contains(id)
        })
        .count()
}

#[tokio::test]
async fn a_cluster_of_three_agents_places_shares_and_survives_its_faults() {
    if !e2e() {
        return;
    }
    let _net = Network::up();
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    // The processes' logs outlive the test (the last run's), for a failure
    // to be read afterwards.
    let logs = PathBuf::from("/var/tmp/strata-cluster-test-logs");
    let _ = std::fs::remove_dir_all(&logs);
    std::fs::create_dir_all(&logs).unwrap();
    let g = garage::start_garage(HOST_IP, 39_600);

    // The images of bc, python3 and htop, built by the test run, go to the object
    // store; the agents start empty and fetch them.
    let e = env();
    let seed = {
        let mut cfg = Config::from_env();
        cfg.state_dir = e.state.clone();
        cfg.packages_dir = e.packages.clone();
        cfg.agent_binary = e.agent.clone();
        cfg.remote = Some(g.cfg.clone());
        Engine::open(cfg).unwrap()
    };
    let mut accel = String::new();
    for name in ["bc", "python3", "htop"] {
        let pkg = seed.package(name).unwrap();
        seed.publish_package(&pkg, &LogProgress).await.unwrap();
        accel = seed.ensure_images(&pkg, &LogProgress).await.unwrap().launch.meta["accel"].clone();
    }

    let etcd_port = free_port(HOST_IP, 39_700);
    let etcd_dir = dir.path().join("etcd");
    let mut etcd_proc = etcd(&etcd_dir, etcd_port, &logs.join("etcd.log"));
    let etcd_url = format!("http://{HOST_IP}:{etcd_port}");
    // Authentication on, as scripts/cluster.sh sets it up: everything below
    // connects as `strata`; a client without credentials gets nothing.
    let password_file = dir.path().join("etcd-password");
    std::fs::write(&password_file, "test-password\n").unwrap();
    let etcdctl =
        |args: &[&str]| Command::new("etcdctl").arg("--endpoints").arg(&etcd_url).args(args).output().unwrap();
    for args in [
        &["user", "add", "root:root-password"][..],
        &["role", "add", "root"],
        &["user", "grant-role", "root", "root"],
        &["user", "add", "strata:test-password"],
        &["role", "add", "strata"],
        &["role", "grant-permission", "strata", "--prefix=true", "readwrite", "/strata/"],
        &["user", "grant-role", "strata", "strata"],
        &["auth", "enable"],
    ] {
        let out = etcdctl(args);
        assert!(out.status.success(), "etcdctl {args:?}: {}", text(&out.stderr));
    }
    for args in [&["get", "/strata/", "--prefix"][..], &["put", "/strata/intruder", "x"]] {
        let out = etcdctl(args);
        assert!(!out.status.success(), "an unauthenticated etcdctl {args:?} succeeded: {}", text(&out.stdout));
    }
    let auth = [
        ("STRATA_ETCD_USER", std::ffi::OsStr::new("strata")),
        ("STRATA_ETCD_PASSWORD_FILE", password_file.as_os_str()),
    ];

    let s3 = &g.cfg;
    let agent_cmd = |i: usize| {
        let state = dir.path().join(format!("agent{i}"));
        let listen = format!("{}:7070", agent_ip(i));
        // Only the network namespace is entered: `ip netns exec` would
        // also mount the namespace's own sysfs over /sys, hiding the
        // cgroup hierarchies beneath which the agent confines its VMs.
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", ns(i)))
            .arg("--")
            .arg(&e.strata)
            .args(["--accel", &accel, "serve", "--listen", &listen, "--server-id", &format!("agent{i}")])
            .args(["--etcd", &etcd_url])
            .envs(auth)
            .env("STRATA_STATE", &state)
            .env("STRATA_PACKAGES", &e.packages)
            .env("STRATA_AGENT", &e.agent)
            .env("STRATA_CLUSTER_TOKEN", SECRET)
            .env("STRATA_LOG", "info")
            .env("STRATA_S3_ENDPOINT", &s3.endpoint)
            .env("STRATA_S3_BUCKET", &s3.bucket)
            .env("STRATA_S3_REGION", &s3.region)
            .env("AWS_ACCESS_KEY_ID", &s3.access_key_id)
            .env("AWS_SECRET_ACCESS_KEY", &s3.secret_access_key);
        cmd
    };
    let mut agents: Vec<Proc> =
        (1..=AGENTS).map(|i| spawn(agent_cmd(i), &logs.join(format!("agent{i}.log")))).collect();

    // Two control planes on loopback, placing round-robin.
    let mut cps: Vec<Proc> = Vec::new();
    let mut cp_urls = Vec::new();
    for i in 0..2 {
        let port = free_port("127.0.0.1", 39_740 + 10 * i);
        let mut cmd = Command::new(&e.strata);
        cmd.args(["control", "--listen", &format!("127.0.0.1:{port}"), "--rule", "round-robin"])
            // The second plane has an operator.
            .args(if i == 1 { &["--operator", "carol"][..] } else { &[] })
            .args(["--max-sessions-per-terminal", "6", "--lost-after", &LOST_AFTER_S.to_string()])
            // Six of bc's 512 MiB guests fill it exactly: the count refuses
            // the seventh first, and the sixth is not refused by memory.
            .args(["--max-memory-per-terminal-mib", "3072"])
            .args(["--etcd", &etcd_url, "--name", &format!("plane{i}")])
            .envs(auth)
            .env("STRATA_PACKAGES", &e.packages)
            .env("STRATA_CLUSTER_TOKEN", SECRET)
            .env("STRATA_LOG", "info");
        cps.push(spawn(cmd, &logs.join(format!("plane{i}.log"))));
        cp_urls.push(format!("http://127.0.0.1:{port}"));
        assert!(
            wait_until(Duration::from_secs(20), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()),
            "control plane {i} did not listen: {}",
            cps[i as usize].log()
        );
    }
    let c = Cluster { etcd_url: etcd_url.clone(), cps: cp_urls, http: reqwest::Client::new() };

    let token = |name: &str| {
        let out = strata(&["token", "create", name, "--etcd", &c.etcd_url]).envs(auth).output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout).trim().to_string()
    };
    let (alice, bob, carol) = (token("alice"), token("bob"), token("carol"));
    let servers = |cp: usize| {
        let c = &c;
        let alice = alice.clone();
        async move {
            let (status, body) = c.api(cp, "GET", "/v1/servers", &alice).await;
            if status != 200 {
                return Vec::new();
            }
            let mut ids: Vec<String> =
                body.as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap().to_string()).collect();
            ids.sort();
            ids
        }
    };
    assert!(
        eventually(Duration::from_secs(60), || async { servers(0).await.len() == AGENTS }).await,
        "the agents did not register: {:?}\n{}",
        servers(0).await,
        agents[0].log()
    );
    // Authentication: no token, a wrong one.
    assert_eq!(c.api(0, "GET", "/v1/sessions", "wrong").await.0, 401);

    // Round-robin over the three agents: four launches, 1-2-3-1. Each agent
    // started empty: it fetched bc's images from the object store.
    let mut ids = Vec::new();
    for _ in 0..4 {
        let (status, created) = c.launch(0, &alice, "bc").await;
        assert_eq!(status, 201, "{created}");
        ids.push(created["session"]["id"].as_str().unwrap().to_string());
    }
    let listed = c.sessions(0, &alice).await;
    let placed: Vec<String> = ids.iter().map(|id| server_of(&listed, id)).collect();
    assert_eq!(placed, ["agent1", "agent2", "agent3", "agent1"], "{listed:?}");
    for i in 1..=AGENTS {
        let log = agents[i - 1].log();
        assert!(log.contains("fetched from the object store"), "agent{i} did not fetch bc's images:\n{log}");
    }
    // The plane counts where launches went.
    let metrics = c.http.get(format!("{}/metrics", c.cps[0])).send().await.unwrap().text().await.unwrap();
    let placed = metrics
        .lines()
        .find(|l| l.starts_with("strata_control_placements_total{") && l.contains("server=\"agent1\""))
        .unwrap_or_else(|| panic!("no placements of agent1 in:\n{metrics}"));
    assert!(placed.contains("outcome=\"launched\"") && placed.ends_with(" 2"), "{placed}");
    assert!(metrics.contains("strata_control_servers{plane=\"plane0\"} 3"), "{metrics}");
    // Another terminal sees none of them.
    assert!(c.sessions(0, &bob).await.is_empty());
    assert_eq!(c.api(0, "GET", &format!("/v1/sessions/{}", ids[0]), &bob).await.0, 404);
    assert_eq!(c.api(0, "POST", &format!("/v1/sessions/{}/attach-ticket", ids[0]), &bob).await.0, 404);
    // A ticket opens its own session only.
    let (_, t) = c.api(0, "POST", &format!("/v1/sessions/{}/attach-ticket", ids[0]), &alice).await;
    let forged = t["url"].as_str().unwrap().replace(&ids[0], &ids[3]);
    assert!(tokio_tungstenite::connect_async(&forged).await.is_err(), "a ticket opened another session");

    // An agent that hangs for longer than its lease (3 s) but less than the
    // grace period is only suspect: its session stays running, new launches
    // go elsewhere meanwhile, and when it continues its session is running
    // with a note of the outage. Hung past the grace period, its session is
    // lost, and running again when it continues: the server's report wins.
    let hung = agents[2].child.id();
    let on_hung = ids[2].clone();
    assert_eq!(server_of(&listed, &on_hung), "agent3");
    assert_eq!(std::fs::read_to_string(format!("/proc/{hung}/comm")).unwrap().trim(), "strata");
    signal(hung, "STOP");
    let mut seen_states = std::collections::BTreeSet::new();
    let mut suspect_noted = false;
    let stopped_at = Instant::now();
    let mut dropped_out = false;
    while stopped_at.elapsed() < Duration::from_secs(9) {
        let now = c.sessions(0, &alice).await;
        seen_states.insert(state_of(&now, &on_hung));
        suspect_noted |= field(&now, &on_hung, "unreachable_s").is_u64();
        dropped_out |= !servers(0).await.contains(&"agent3".to_string());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(dropped_out, "agent3 stayed registered while stopped for 9 s");
    assert!(suspect_noted, "the leader did not note agent3's silence within 9 s");
    let (status, created) = c.launch(0, &alice, "bc").await;
    assert_eq!(status, 201, "{created}");
    assert_ne!(created["session"]["server"], "agent3", "a launch went to a silent server: {created}");
    let extra = created["session"]["id"].as_str().unwrap().to_string();
    seen_states.insert(state_of(&c.sessions(0, &alice).await, &on_hung));
    signal(hung, "CONT");
    assert_eq!(seen_states, ["running".to_string()].into(), "a suspect server's session was not kept running");
    assert!(
        eventually(Duration::from_secs(30), || async {
            let now = c.sessions(0, &alice).await;
            field(&now, &on_hung, "server_reachable") == true && field(&now, &on_hung, "last_outage_s").is_u64()
        })
        .await,
        "agent3's session did not come back with its outage noted: {:?}",
        c.sessions(0, &alice).await
    );
    let out = strata(&["--addr", &c.cps[0], "--token", &alice, "ps"]).output().unwrap();
    let ps = text(&out.stdout);
    assert!(ps.lines().any(|l| l.starts_with(&on_hung) && l.contains("running, server was unreachable")), "{ps}");
    // The plane lists each session's OS, as its server recorded it.
    assert!(ps.lines().any(|l| l.starts_with(&on_hung) && l.contains("debian-12")), "{ps}");
    assert_eq!(c.api(0, "DELETE", &format!("/v1/sessions/{extra}"), &alice).await.0, 204);
    // Past the grace period: lost, then running again.
    signal(hung, "STOP");
    let lost_in = Duration::from_secs(LOST_AFTER_S + 30);
    let was_lost = eventually(lost_in, || async { state_of(&c.sessions(0, &alice).await, &on_hung) == "lost" }).await;
    signal(hung, "CONT");
    assert!(was_lost, "a session of an agent silent for {lost_in:?} was not marked lost");
    assert!(
        eventually(Duration::from_secs(30), || async {
            let now = c.sessions(0, &alice).await;
            state_of(&now, &on_hung) == "running"
                && field(&now, &on_hung, "last_outage_s").as_u64().is_some_and(|s| s >= LOST_AFTER_S)
        })
        .await,
        "the lost session did not come back running when its agent did: {:?}",
        c.sessions(0, &alice).await
    );
    assert!(
        eventually(Duration::from_secs(30), || async { servers(0).await.len() == AGENTS }).await,
        "not every agent is registered again: {:?} (logs in {})",
        servers(0).await,
        logs.display()
    );
    c.exchange(0, &alice, &on_hung, "7*6\n", "42").await;

    // The agent's process (not its namespace) killed outright, then
    // started again: its session ran on meanwhile, and is registered again,
    // running and answering with its state.
    let before = c.sessions(0, &alice).await;
    assert_eq!(state_of(&before, &on_hung), "running");
    agents[2].kill();
    agents[2] = spawn(agent_cmd(3), &logs.join("agent3-again.log"));
    assert!(
        eventually(Duration::from_secs(60), || async { agents[2].log().contains("running session(s) from before") })
            .await,
        "the restarted agent took back no session: {}",
        agents[2].log()
    );
    assert!(
        eventually(Duration::from_secs(30), || async {
            servers(0).await.len() == AGENTS && state_of(&c.sessions(0, &alice).await, &on_hung) == "running"
        })
        .await,
        "agent3's session was not registered again after a restart: {:?} (logs in {})",
        c.sessions(0, &alice).await,
        logs.display()
    );
    c.exchange(0, &alice, &on_hung, "x=6*7\nx\n", "42").await;

    // The CLI through a control plane: run, and attach to the agent.
    let out = strata_with_input(&["--addr", &c.cps[0], "--token", &alice, "attach", &ids[1]], "x=6*7\nx\n");
    assert!(text(&out.stdout).contains("42"), "{}{}", text(&out.stdout), text(&out.stderr));
    // A command through the plane runs on the agent, its output straight from there.
    let exec = ["--addr", &c.cps[0], "--token", &alice, "exec", &ids[0], "sh", "-c", "echo via-$((6*7)) $(hostname)"];
    let out = strata(&exec).output().unwrap();
    assert!(text(&out.stdout).starts_with("via-42 "), "{}{}", text(&out.stdout), text(&out.stderr));

    // A control plane dies: the other lists the sessions, leads, and
    // attaches go on.
    cps[0].kill();
    let leader = || async {
        let (status, body) = c.api(1, "GET", "/v1/cluster", &alice).await;
        if status == 200 {
            body["leader"].as_str().unwrap_or_default().to_string()
        } else {
            String::new()
        }
    };
    assert!(eventually(Duration::from_secs(20), || async { leader().await == "plane1" }).await, "plane1 did not lead");
    let listed = c.sessions(1, &alice).await;
    assert!(ids.iter().filter(|id| *id != &ids[1]).all(|id| state_of(&listed, id) == "running"), "{listed:?}");
    c.exchange(1, &alice, &ids[0], "x=41\n", "x=41").await;
    c.exchange(1, &alice, &ids[0], "x+1\n", "42").await;

    // A fork through the plane: the copy starts on the session's server,
    // is listed at once with it, and has its state.
    let (status, forked) = c.api(1, "POST", &format!("/v1/sessions/{}/fork", ids[0]), &alice).await;
    assert_eq!(status, 201, "{forked}");
    let copy = forked["forks"][0]["session"]["id"].as_str().unwrap().to_string();
    let listed = c.sessions(1, &alice).await;
    assert_eq!(server_of(&listed, &copy), server_of(&listed, &ids[0]), "{listed:?}");
    c.exchange(1, &alice, &copy, "x+2\n", "43").await;
    // A copy moves like any session: its fork's snapshot (on its server
    // only) is shared for the receiver first.
    let (status, body) = c.post(1, &alice, &format!("/v1/sessions/{copy}/move"), serde_json::json!({})).await;
    assert_eq!(status, 200, "a fork's copy did not move: {body}");
    assert_ne!(server_of(&c.sessions(1, &alice).await, &copy), server_of(&listed, &copy), "the copy did not move");
    c.exchange(1, &alice, &copy, "x+3\n", "44").await;
    assert_eq!(c.api(1, "DELETE", &format!("/v1/sessions/{copy}"), &alice).await.0, 204);
    // Spread: three copies placed like launches (round-robin here), from a
    // named snapshot fetched through the object store, each with the state.
    let out =
        strata(&["--addr", &c.cps[1], "--token", &alice, "fork", &ids[0], "-n", "3", "--spread"]).output().unwrap();
    assert!(out.status.success(), "fork --spread: {}{}", text(&out.stdout), text(&out.stderr));
    let copies: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
    assert_eq!(copies.len(), 3, "{}", text(&out.stdout));
    let listed = c.sessions(1, &alice).await;
    let spread_over: std::collections::BTreeSet<String> = copies.iter().map(|id| server_of(&listed, id)).collect();
    assert!(spread_over.len() >= 2, "the spread copies all went to {spread_over:?}");
    for copy in &copies {
        c.exchange(1, &alice, copy, "x+2\n", "43").await;
        assert_eq!(c.api(1, "DELETE", &format!("/v1/sessions/{copy}"), &alice).await.0, 204);
    }
    let (status, body) =
        c.post(1, &alice, &format!("/v1/sessions/{}/fork", ids[0]), serde_json::json!({"spread": 1})).await;
    assert_eq!(status, 400, "{body}");

    // A named snapshot is shared: sessions start from it on other servers
    // (fetched from the object store), placed by its package.
    let snap_path = format!("/v1/sessions/{}/snapshot", ids[0]);
    let (status, snap) = c.post(1, &alice, &snap_path, serde_json::json!({"name": "cluster-snap"})).await;
    assert_eq!(status, 201, "{snap}");
    let origin = server_of(&c.sessions(1, &alice).await, &ids[0]);
    let mut elsewhere = None;
    for _ in 0..3 {
        let body = serde_json::json!({"package": "bc", "snapshot": "cluster-snap"});
        let (status, created) = c.post(1, &alice, "/v1/sessions", body).await;
        assert_eq!(status, 201, "{created}");
        let id = created["session"]["id"].as_str().unwrap().to_string();
        let on = created["session"]["server"].as_str().unwrap_or_default().to_string();
        c.exchange(1, &alice, &id, "x+3\n", "44").await;
        assert_eq!(c.api(1, "DELETE", &format!("/v1/sessions/{id}"), &alice).await.0, 204);
        if on != origin {
            elsewhere = Some(on);
            break;
        }
    }
    assert!(elsewhere.is_some(), "no session from the snapshot ran on a server other than {origin}");

    // A live move: a bc session (x=42, and a file on its disk) goes to
    // another server while it runs; it keeps its id, its memory and
    // its disk there, and the record names agent3. Then again, to a server
    // placement picks. Bad orders are refused, naming what was wrong.
    let (status, created) = c.launch(1, &alice, "bc").await;
    assert_eq!(status, 201, "{created}");
    let mover = created["session"]["id"].as_str().unwrap().to_string();
    c.exchange(1, &alice, &mover, "x=6*7\nx\n", "42").await;
    let on_plane = |args: &[&str]| {
        let mut all = vec!["--addr", c.cps[1].as_str(), "--token", alice.as_str()];
        all.extend_from_slice(args);
        strata(&all).output().unwrap()
    };
    let out = on_plane(&["exec", &mover, "sh", "-c", "echo disk-$((6*7)) > /var/tmp/moved && sync"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let from = server_of(&c.sessions(1, &alice).await, &mover);
    let to = if from == "agent3" { "agent2" } else { "agent3" };
    // A terminal attached through the plane follows the session.
    let mut follower = Follower::attach(&c.cps[1], &alice, &mover);
    follower.type_in("y=100\ny\n");
    assert!(follower.shows("100"), "the attached terminal did not answer before the move: {:?}", follower.screen);
    let out = on_plane(&["move", &mover, "--to", to]);
    assert!(out.status.success(), "move: {}{}", text(&out.stdout), text(&out.stderr));
    follower.type_in("y+5\n");
    assert!(follower.shows("105"), "the attached terminal did not follow the session to {to}: {:?}", follower.screen);
    drop(follower);
    assert!(text(&out.stdout).contains(&format!("moved from server {from} to server {to}")), "{}", text(&out.stdout));
    let listed = c.sessions(1, &alice).await;
    assert_eq!((server_of(&listed, &mover), state_of(&listed, &mover)), (to.to_string(), "running".to_string()));
    c.exchange(1, &alice, &mover, "x+1\n", "43").await;
    let out = on_plane(&["exec", &mover, "cat", "/var/tmp/moved"]);
    assert_eq!(text(&out.stdout).trim(), "disk-42", "{}", text(&out.stderr));
    let source_log = agents[from[5..].parse::<usize>().unwrap() - 1].log();
    assert!(source_log.contains("the session moved to another server"), "{source_log}");
    let (status, body) = c.post(1, &alice, &format!("/v1/sessions/{}/move", mover), serde_json::json!({})).await;
    assert_eq!(status, 200, "{body}");
    let again = body["server"].as_str().unwrap().to_string();
    assert_ne!(again, to, "{body}");
    c.exchange(1, &alice, &mover, "x+2\n", "44").await;
    let move_to = |server: &str| serde_json::json!({ "server": server });
    let (status, body) = c.post(1, &alice, &format!("/v1/sessions/{}/move", mover), move_to(&again)).await;
    assert_eq!(status, 400, "a move to its own server: {body}");
    let (status, body) = c.post(1, &alice, &format!("/v1/sessions/{}/move", mover), move_to("agent9")).await;
    assert_eq!(status, 404, "a move to no server: {body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("no server agent9"), "{body}");
    let (status, _) = c.post(1, &bob, &format!("/v1/sessions/{}/move", mover), serde_json::json!({})).await;
    assert_eq!(status, 404, "another terminal moved alice's session");
    assert_eq!(c.api(1, "DELETE", &format!("/v1/sessions/{mover}"), &alice).await.0, 204);

    // A python3 session, attached through the plane, prints a counter while
    // it moves: the terminal follows it and shows every number once, in
    // order; what was typed while it moved reaches the program there.
    let (status, created) = c.launch(1, &alice, "python3").await;
    assert_eq!(status, 201, "{created}");
    let counting = created["session"]["id"].as_str().unwrap().to_string();
    let from = server_of(&c.sessions(1, &alice).await, &counting);
    let mut follower = Follower::attach(&c.cps[1], &alice, &counting);
    follower.type_in("import time\nfor i in range(1, 2001): print(f'n{i}', flush=True); time.sleep(0.02)\n\n");
    assert!(follower.shows("\nn50"), "the counter did not start: {:?}", follower.screen);
    // A command run through the plane counts too: its stream follows the
    // session and its output has no gap or repeat either.
    let script = "i=0; while [ $i -lt 1500 ]; do i=$((i+1)); echo e$i; sleep 0.01; done";
    let mut exec = strata(&["--addr", &c.cps[1], "--token", &alice, "exec", &counting, "sh", "-c", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let exec_out = {
        let mut from = exec.stdout.take().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = std::io::Read::read(&mut from, &mut buf) {
                kept.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        seen
    };
    let exec_shows = |want: &str| String::from_utf8_lossy(&exec_out.lock().unwrap()).contains(want);
    let until = Instant::now() + Duration::from_secs(60);
    while !exec_shows("e20\n") && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(exec_shows("e20\n"), "the command did not start: {:?}", String::from_utf8_lossy(&exec_out.lock().unwrap()));
    // And one fed through its standard input across the move: every line
    // reaches it once, in order, and so does the end of its input.
    let mut fed = strata(&[
        "--addr",
        &c.cps[1],
        "--token",
        &alice,
        "exec",
        "-i",
        &counting,
        "sh",
        "-c",
        "while read l; do echo got-$l; done; echo fed-to-the-end",
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let feeding = {
        let mut to = fed.stdin.take().unwrap();
        std::thread::spawn(move || {
            for i in 1..=80 {
                if std::io::Write::write_all(&mut to, format!("a{i}\n").as_bytes()).is_err() {
                    return i;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            81
        })
    };
    let moving = {
        let (plane, alice, id) = (c.cps[1].clone(), alice.clone(), counting.clone());
        std::thread::spawn(move || strata(&["--addr", &plane, "--token", &alice, "move", &id]).output().unwrap())
    };
    let mut markers = Vec::new();
    while !moving.is_finished() && markers.len() < 20 {
        markers.push(1001 + markers.len());
        follower.type_in(&format!("print(1000+{})\n", markers.len()));
        std::thread::sleep(Duration::from_millis(300));
    }
    let out = moving.join().unwrap();
    assert!(out.status.success(), "move: {}{}", text(&out.stdout), text(&out.stderr));
    assert!(exec.try_wait().unwrap().is_none(), "the command ended before the move did; make it longer");
    // The terminal echoes a typed line as it comes, which may be between a
    // number and its line's end (python writes `n337`, then the line end
    // the terminal turns into `\r\n`): `n337print(1000+3)` counts as 337.
    let counted = |f: &Follower| -> Vec<u32> {
        f.lines()
            .iter()
            .filter_map(|l| {
                let digits = l.strip_prefix('n')?;
                let end = digits.find(|c: char| !c.is_ascii_digit()).unwrap_or(digits.len());
                digits[..end].parse().ok()
            })
            .collect()
    };
    follower.catch_up();
    let at_move = counted(&follower).last().copied().unwrap_or(0);
    assert!(at_move < 2000, "the counter ended before the move did; make it longer");
    assert!(at_move > 50, "the terminal was given no output while the session's memory went");
    let last_marker = format!("\n{}", markers.last().unwrap());
    assert!(follower.shows_within(&last_marker, Duration::from_secs(240)), "{:?}", follower.screen);
    let numbers = counted(&follower);
    let gaps: Vec<(u32, u32)> = numbers.windows(2).filter(|w| w[1] != w[0] + 1).map(|w| (w[0], w[1])).collect();
    assert!(gaps.is_empty(), "the counter skipped or repeated across the move (pairs {gaps:?})");
    assert_eq!((numbers.first(), numbers.last()), (Some(&1), Some(&2000)), "{:?}", follower.screen);
    let status = ends_within(&mut exec, Duration::from_secs(240));
    let mut exec_err = String::new();
    if let Some(mut e) = exec.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut exec_err);
    }
    assert!(status.is_some_and(|s| s.success()), "the command across the move: {status:?} {exec_err}");
    let exec_text = String::from_utf8_lossy(&exec_out.lock().unwrap()).into_owned();
    let counted: Vec<u32> = exec_text.lines().filter_map(|l| l.strip_prefix('e')?.parse().ok()).collect();
    assert_eq!(
        counted,
        (1..=1500).collect::<Vec<u32>>(),
        "the command's output across the move: {exec_text:?} {exec_err}"
    );
    assert_eq!(feeding.join().unwrap(), 81, "the fed command stopped taking input");
    ends_within(&mut fed, Duration::from_secs(120));
    let fed = fed.wait_with_output().unwrap();
    let fed_out = text(&fed.stdout);
    let want: String = (1..=80).map(|i| format!("got-a{i}\n")).collect::<String>() + "fed-to-the-end\n";
    assert!(
        fed.status.success() && fed_out == want,
        "the fed command across the move: {fed_out:?} {}",
        text(&fed.stderr)
    );
    let lines = follower.lines();
    for m in &markers {
        assert!(
            lines.contains(&m.to_string().as_str()),
            "input typed during the move was lost ({m}): {:?}",
            follower.screen
        );
    }
    drop(follower);
    let to = server_of(&c.sessions(1, &alice).await, &counting);
    assert_ne!(to, from, "the counting session did not move");
    let ps = text(&on_plane(&["ps"]).stdout);
    assert!(ps.lines().any(|l| l.starts_with(&counting) && l.contains(&to)), "ps does not name {to}: {ps}");
    eprintln!(
        "counted to 2000 across a move from {from} to {to} (the terminal showed n{at_move} when the move ended), {} typed lines kept",
        markers.len()
    );
    assert_eq!(c.api(1, "DELETE", &format!("/v1/sessions/{counting}"), &alice).await.0, 204);

    // Three sessions on agent3 (two moved there, one by two orders at once:
    // one is refused); the operator drains agent3: they move live to other
    // servers and answer there; agent3 takes no launch until it is let go
    // again. A terminal that is no operator may not drain.
    assert_eq!(server_of(&c.sessions(1, &alice).await, &on_hung), "agent3");
    let mut on_agent3 = vec![on_hung.clone()];
    for n in 0..2 {
        let (status, created) = c.launch(1, &alice, "bc").await;
        assert_eq!(status, 201, "{created}");
        let id = created["session"]["id"].as_str().unwrap().to_string();
        c.exchange(1, &alice, &id, &format!("x={n}+10\n"), &format!("x={n}+10")).await;
        let path = format!("/v1/sessions/{id}/move");
        let order = |to: &'static str| c.post(1, &alice, &path, serde_json::json!({ "server": to }));
        let mut at = created["session"]["server"].as_str().unwrap().to_string();
        if n == 0 {
            let to = if at == "agent3" { "agent1" } else { "agent3" };
            let (a, b) = tokio::join!(order(to), order(to));
            let mut statuses = [a.0, b.0];
            statuses.sort();
            assert_eq!(statuses, [200, 409], "two moves of one session at once: {} / {}", a.1, b.1);
            at = to.to_string();
        }
        if at != "agent3" {
            let (status, body) = order("agent3").await;
            assert_eq!(status, 200, "{body}");
        }
        on_agent3.push(id);
    }
    let listed = c.sessions(1, &alice).await;
    assert!(on_agent3.iter().all(|id| server_of(&listed, id) == "agent3"), "{listed:?}");
    let (status, _) = c.post(1, &alice, "/v1/servers/agent3/drain", serde_json::json!({})).await;
    assert_eq!(status, 403, "a terminal that is no operator drained a server");
    let out = strata(&["--addr", &c.cps[1], "--token", &carol, "servers", "drain", "agent3"]).output().unwrap();
    assert!(out.status.success(), "drain: {}{}", text(&out.stdout), text(&out.stderr));
    for id in &on_agent3 {
        assert!(text(&out.stdout).contains(&format!("{id} moved to agent")), "{}", text(&out.stdout));
    }
    assert!(text(&out.stdout).contains("0 session(s) left on it"), "{}", text(&out.stdout));
    let (_, listed) = c.api(1, "GET", "/v1/servers", &alice).await;
    let agent3 = listed.as_array().unwrap().iter().find(|s| s["name"] == "agent3").unwrap().clone();
    assert_eq!(agent3["draining"], true, "{agent3}");
    let listed = c.sessions(1, &alice).await;
    assert!(
        on_agent3.iter().all(|id| server_of(&listed, id) != "agent3" && state_of(&listed, id) == "running"),
        "{listed:?}"
    );
    assert_eq!(qemus_of(3, &on_hung), 0, "agent3 still runs a drained session");
    c.exchange(1, &alice, &on_hung, "x+3\n", "45").await;
    for (n, id) in on_agent3[1..].iter().enumerate() {
        c.exchange(1, &alice, id, "x*2\n", &format!("{}", (n + 10) * 2)).await;
        assert_eq!(c.api(1, "DELETE", &format!("/v1/sessions/{id}"), &alice).await.0, 204);
    }
    for _ in 0..2 {
        let (status, created) = c.launch(1, &alice, "bc").await;
        assert_eq!(status, 201, "{created}");
        assert_ne!(created["session"]["server"], "agent3", "a draining server took a launch: {created}");
        let id = created["session"]["id"].as_str().unwrap();
        assert_eq!(c.api(1, "DELETE", &format!("/v1/sessions/{id}"), &alice).await.0, 204);
    }
    let out = strata(&["--addr", &c.cps[1], "--token", &carol, "servers", "undrain", "agent3"]).output().unwrap();
    assert!(out.status.success(), "undrain: {}", text(&out.stderr));

    // E2B's Python SDK through the plane: sandboxes placed on the agents
    // (recorded at once), commands and files through their servers, a
    // listing gathered from all of them, another terminal's sandbox not
    // found, a kill.
    let python = std::env::var("STRATA_E2B_PYTHON")
        .expect("STRATA_E2B_PYTHON must name the python of E2B's SDK (./test.sh; source scripts/e2b-sdk.sh)");
    let e2b = |token: &str, script: &str| {
        let out = Command::new(&python)
            .args(["-c", &format!("import json\nfrom e2b import *\ndef say(step, value): print(json.dumps({{'step': step, 'value': value}}), flush=True)\n{script}")])
            .env("E2B_API_URL", format!("{}/e2b", c.cps[1]))
            .env("E2B_SANDBOX_URL", format!("{}/e2b", c.cps[1]))
            .env("E2B_API_KEY", token)
            .output()
            .unwrap();
        assert!(out.status.success(), "the SDK script failed:\n{}\n{}", text(&out.stdout), text(&out.stderr));
        let lines: Vec<Value> = text(&out.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        move |name: &str| lines.iter().find(|l| l["step"] == name).map(|l| l["value"].clone()).unwrap_or(Value::Null)
    };
    let said = e2b(
        &alice,
        &[
            "a = Sandbox.create(template='bc', timeout=600, metadata={'via': 'plane'})",
            "b = Sandbox.create(template='bc', timeout=600)",
            "say('ids', [a.sandbox_id, b.sandbox_id])",
            "r = a.commands.run('echo $((6*7)); echo err >&2')",
            "say('run', [r.stdout, r.stderr, r.exit_code])",
            "a.files.write('/root/via-plane.txt', 'through the plane')",
            "say('read', a.files.read('/root/via-plane.txt'))",
            "import urllib.request, urllib.error",
            "up = urllib.request.Request(a.upload_url('/root/up.txt'), data=b'signed', method='POST', headers={'content-type': 'application/octet-stream'})",
            "urllib.request.urlopen(up).read()",
            "say('signed', [a.files.read('/root/up.txt'), urllib.request.urlopen(a.download_url('/root/up.txt')).read().decode()])",
            "try:",
            "    urllib.request.urlopen(a.download_url('/root/up.txt').replace('signature=v1_', 'signature=v1_x'))",
            "    say('forged', 'served')",
            "except urllib.error.HTTPError as e:",
            "    say('forged', e.code)",
            "say('listed', sorted(s.sandbox_id for s in Sandbox.list(query=SandboxQuery(metadata={'via': 'plane'})).next_items()))",
            "say('all', len(Sandbox.list().next_items()))",
            "b.kill()",
        ]
        .join("\n"),
    );
    let sandboxes: Vec<String> =
        said("ids").as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    assert_eq!(said("run"), serde_json::json!(["42\n", "err\n", 0]));
    assert_eq!(said("read"), "through the plane");
    assert_eq!(said("signed"), serde_json::json!(["signed", "signed"]), "signed file URLs through the plane");
    assert_eq!(said("forged"), 401, "a forged file URL through the plane");
    assert_eq!(said("listed"), serde_json::json!([sandboxes[0]]));
    assert!(said("all").as_u64().unwrap() >= 2, "the listing through the plane: {}", said("all"));
    let listed = c.sessions(1, &alice).await;
    let on = server_of(&listed, &sandboxes[0]);
    assert!(on.starts_with("agent"), "the sandbox is not on an agent: {listed:?}");
    assert_eq!(state_of(&listed, &sandboxes[1]), "", "a killed sandbox is still listed");
    let said = e2b(
        &bob,
        &format!(
            "try:\n    Sandbox.connect('{}')\n    say('other', 'connected')\nexcept NotFoundException:\n    say('other', 'not found')\n",
            sandboxes[0]
        ),
    );
    assert_eq!(said("other"), "not found", "bob reached alice's sandbox through the plane");
    assert_eq!(c.api(1, "DELETE", &format!("/v1/sessions/{}", sandboxes[0]), &alice).await.0, 204);

    // A move's faults. The sending server dies mid-move (its process killed
    // while the guest's memory goes), then starts again: the session runs on
    // exactly one server, with its state, and nothing of it is left on the
    // other. Then the network between two servers is cut mid-move: the
    // move fails within its stall limit, the session runs on where it was,
    // and the receiver drops what it had.
    let (status, created) = c.launch(1, &alice, "bc").await;
    assert_eq!(status, 201, "{created}");
    let faulty = created["session"]["id"].as_str().unwrap().to_string();
    c.exchange(1, &alice, &faulty, "x=7\n", "x=7").await;
    let order_move = |to: usize| {
        let (http, url, alice) = (c.http.clone(), format!("{}/v1/sessions/{faulty}/move", c.cps[1]), alice.clone());
        tokio::spawn(async move {
            let resp = http
                .post(url)
                .bearer_auth(alice)
                .json(&serde_json::json!({ "server": format!("agent{to}") }))
                .timeout(Duration::from_secs(600))
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap_or(Value::Null))
        })
    };
    let log_lines = |p: &Proc, what: &str| p.log().lines().filter(|l| l.contains(what) && l.contains(&faulty)).count();
    // Polled without blocking: the move runs on this (single) thread too.
    let until_logged = |p: &Proc, what: &'static str, before: usize| {
        let end = Instant::now() + Duration::from_secs(120);
        let log = p.log.clone();
        let faulty = faulty.clone();
        async move {
            let lines = || {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                text.lines().filter(|l| l.contains(what) && l.contains(&faulty)).count()
            };
            while lines() <= before && Instant::now() < end {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            lines() > before
        }
    };
    let fi: usize = server_of(&c.sessions(1, &alice).await, &faulty)[5..].parse().unwrap();
    let ti = if fi == 2 { 3 } else { 2 };
    let moving = order_move(ti);
    assert!(
        until_logged(&agents[ti - 1], "memory is arriving", 0).await,
        "agent{ti} got no memory: {}",
        agents[ti - 1].log()
    );
    agents[fi - 1].kill();
    let (status, body) = moving.await.unwrap();
    agents[fi - 1] = spawn(agent_cmd(fi), &logs.join(format!("agent{fi}-after-move.log")));
    assert!(
        eventually(Duration::from_secs(60), || async { agents[fi - 1].log().contains("joined the cluster") }).await,
        "agent{fi} did not start again: {}",
        agents[fi - 1].log()
    );
    let once = || async {
        let listed = c.sessions(1, &alice).await;
        state_of(&listed, &faulty) == "running" && qemus_of(fi, &faulty) + qemus_of(ti, &faulty) == 1
    };
    assert!(
        eventually(Duration::from_secs(90), once).await,
        "a session whose sender died mid-move does not run on exactly one server (move: {status} {body}; on agent{fi}: {}, on agent{ti}: {}): {:?}",
        qemus_of(fi, &faulty),
        qemus_of(ti, &faulty),
        c.sessions(1, &alice).await
    );
    let runs_on = server_of(&c.sessions(1, &alice).await, &faulty);
    assert_eq!(qemus_of(runs_on[5..].parse().unwrap(), &faulty), 1, "listed on {runs_on}, running elsewhere");
    c.exchange(1, &alice, &faulty, "x+1\n", "8").await;
    eprintln!("the sender died mid-move (answer {status}): the session runs on {runs_on} alone");
    assert!(
        eventually(Duration::from_secs(30), || async { servers(1).await.len() == AGENTS }).await,
        "agent{fi} did not register again: {:?}",
        servers(1).await
    );

    let fi: usize = runs_on[5..].parse().unwrap();
    let ti = if fi == 2 { 3 } else { 2 };
    let waiting = log_lines(&agents[ti - 1], "waiting for a session moving here");
    let moving = order_move(ti);
    assert!(
        until_logged(&agents[ti - 1], "waiting for a session moving here", waiting).await,
        "agent{ti} did not prepare"
    );
    let blackhole = ["-n", &ns(ti), "route", "add", "blackhole", &format!("{}/32", agent_ip(fi))];
    assert!(sh(&[&["ip"][..], &blackhole].concat()), "cannot cut agent{ti} from agent{fi}");
    let cut_at = Instant::now();
    let (status, body) = tokio::time::timeout(Duration::from_secs(180), moving).await.unwrap().unwrap();
    let failed_in = cut_at.elapsed();
    let mut mend = blackhole.to_vec();
    mend[3] = "del";
    assert!(sh(&[&["ip"][..], &mend].concat()));
    assert_eq!(status, 502, "a move over a cut network: {body}");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("runs on where it was"), "{body}");
    assert_eq!(server_of(&c.sessions(1, &alice).await, &faulty), format!("agent{fi}"));
    c.exchange(1, &alice, &faulty, "x+2\n", "9").await;
    assert!(
        eventually(Duration::from_secs(60), || async { qemus_of(ti, &faulty) == 0 }).await,
        "agent{ti} kept the QEMU of a move that was cut off"
    );
    eprintln!("a move over a cut network failed after {failed_in:?}: {body}");
    assert_eq!(c.api(1, "DELETE", &format!("/v1/sessions/{faulty}"), &alice).await.0, 204);

    // Pause ids[0] on agent1, then agent1 dies with it and ids[3] on it.
    let (status, body) = c.api(1, "POST", &format!("/v1/sessions/{}/pause", ids[0]), &alice).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        eventually(Duration::from_secs(20), || async {
            c.sessions(1, &alice).await.iter().any(|s| s["id"] == ids[0] && s["movable"] == true)
        })
        .await,
        "the paused session's record did not reach etcd"
    );
    agents[0].kill();
    kill_namespace(&ns(1));
    assert!(
        eventually(Duration::from_secs(15), || async { servers(1).await == ["agent2", "agent3"] }).await,
        "agent1 did not drop out: {:?}",
        servers(1).await
    );
    // Lost once the grace period has passed (the leader notes the silence
    // within a round or two, then waits LOST_AFTER_S).
    assert!(
        eventually(Duration::from_secs(LOST_AFTER_S + 30), || async {
            state_of(&c.sessions(1, &alice).await, &ids[3]) == "lost"
        })
        .await,
        "a session of the dead agent is not reported lost"
    );
    let (status, body) = c.api(1, "POST", &format!("/v1/sessions/{}/resume", ids[3]), &alice).await;
    assert_eq!(status, 410, "{body}");
    // The paused one resumes elsewhere, from the object store, state intact.
    let (status, body) = c.api(1, "POST", &format!("/v1/sessions/{}/resume", ids[0]), &alice).await;
    assert_eq!(status, 200, "{body}");
    let moved_to = body["server"].as_str().unwrap().to_string();
    assert_ne!(moved_to, "agent1");
    c.exchange(1, &alice, &ids[0], "x+1\n", "42").await;
    // New launches go to the living.
    let (status, created) = c.launch(1, &alice, "bc").await;
    assert_eq!(status, 201, "{created}");
    assert_ne!(created["session"]["server"], "agent1");
    // The lost session is forgotten by kill.
    assert_eq!(c.api(1, "DELETE", &format!("/v1/sessions/{}", ids[3]), &alice).await.0, 204);

    // An agent killed mid-launch (htop's images are still to fetch):
    // the plane tries the other agent.
    let launch = {
        let http = c.http.clone();
        let url = format!("{}/v1/sessions", c.cps[1]);
        let alice = alice.clone();
        tokio::spawn(async move {
            let resp = http
                .post(url)
                .bearer_auth(alice)
                .json(&serde_json::json!({"package": "htop"}))
                .timeout(Duration::from_secs(600))
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap_or(Value::Null))
        })
    };
    // A single-threaded runtime: the launch proceeds while this polls.
    let placed_on = || {
        cps[1]
            .log()
            .lines()
            .filter(|l| l.contains("launch placed") && l.contains("htop"))
            .find_map(|l| ["agent2", "agent3"].into_iter().find(|a| l.contains(a)))
    };
    assert!(
        eventually(Duration::from_secs(60), || async { placed_on().is_some() }).await,
        "the htop launch was not placed"
    );
    let victim = placed_on().unwrap();
    let vi: usize = victim[5..].parse().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    agents[vi - 1].kill();
    kill_namespace(&ns(vi));
    let (status, created) = tokio::time::timeout(Duration::from_secs(600), launch).await.unwrap().unwrap();
    assert_eq!(status, 201, "{created}");
    let survivor = created["session"]["server"].as_str().unwrap().to_string();
    assert!(survivor != victim && survivor != "agent1", "{created}");
    let htop = created["session"]["id"].as_str().unwrap().to_string();

    // etcd goes down: clear errors, sessions keep running; back, nothing lost.
    let running_before: Vec<String> = c
        .sessions(1, &alice)
        .await
        .iter()
        .filter(|s| s["state"] == "running")
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    assert!(running_before.contains(&htop), "{running_before:?}");
    etcd_proc.kill();
    let (status, body) = c.api(1, "GET", "/v1/sessions", &alice).await;
    assert_eq!(status, 503, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains(&etcd_url), "{body}");
    let (status, body) = c.launch(1, &alice, "bc").await;
    assert_eq!(status, 503, "{body}");
    etcd_proc = etcd(&etcd_dir, etcd_port, &logs.join("etcd2.log"));
    assert!(
        eventually(Duration::from_secs(30), || async {
            let (status, body) = c.api(1, "GET", "/v1/sessions", &alice).await;
            status == 200
                && running_before
                    .iter()
                    .all(|id| body.as_array().unwrap().iter().any(|s| s["id"] == *id && s["state"] == "running"))
        })
        .await,
        "sessions were lost with etcd: {:?}",
        c.api(1, "GET", "/v1/sessions", &alice).await
    );
    assert!(eventually(Duration::from_secs(30), || async { servers(1).await == [survivor.clone()] }).await);
    let (status, body) = c.launch(1, &alice, "bc").await;
    assert_eq!(status, 201, "{body}");
    // The limit per terminal holds across servers: bob's seventh is refused.
    let mut of_bob = Vec::new();
    for _ in 0..6 {
        let (status, body) = c.launch(1, &bob, "bc").await;
        assert_eq!(status, 201, "{body}");
        of_bob.push(body["session"]["id"].as_str().unwrap().to_string());
    }
    let (status, body) = c.launch(1, &bob, "bc").await;
    assert_eq!((status, body["error"]["code"].as_str()), (429, Some("too_many_sessions")), "{body}");
    // The operator of plane 1 sees every terminal's sessions and pauses
    // and resumes one of bob's, ordered in bob's name, but cannot read it.
    let everyone = c.sessions(1, &carol).await;
    let terminals: std::collections::BTreeSet<&str> = everyone.iter().filter_map(|s| s["terminal"].as_str()).collect();
    assert_eq!(terminals, ["alice", "bob"].into(), "{everyone:?}");
    let (status, v) = c.api(1, "POST", &format!("/v1/sessions/{}/pause", of_bob[0]), &carol).await;
    assert_eq!((status, v["state"].as_str()), (200, Some("paused")), "{v}");
    let (status, v) = c.api(1, "POST", &format!("/v1/sessions/{}/resume", of_bob[0]), &carol).await;
    assert_eq!((status, v["state"].as_str()), (200, Some("running")), "{v}");
    assert_eq!(c.api(1, "GET", &format!("/v1/sessions/{}/logs", of_bob[0]), &carol).await.0, 404);
    drop(etcd_proc);

    // The agents die; their VMs go with their namespaces. An engine opened
    // on each agent's store, as a restarted agent would be, removes what
    // they left: session directories and the VMs' cgroups.
    for a in &mut agents {
        a.kill();
    }
    Network::down();
    for i in 1..=AGENTS {
        let mut cfg = Config::from_env();
        cfg.state_dir = dir.path().join(format!("agent{i}"));
        cfg.packages_dir = e.packages.clone();
        cfg.agent_binary = e.agent.clone();
        cfg.remote = Some(g.cfg.clone());
        drop(Engine::open(cfg).unwrap());
    }
    let prefixes: Vec<String> = (1..=AGENTS)
        .map(|i| format!("strata-{}-", strata_engine::cgroup_owner(&dir.path().join(format!("agent{i}")))))
        .collect();
    let left: Vec<String> = cgroup_names().into_iter().filter(|n| prefixes.iter().any(|p| n.starts_with(p))).collect();
    assert!(left.is_empty(), "cgroups left by the agents: {left:?}");
}
