//! Forks and snapshots: a running session copied, whole, into new sessions
//! while it runs on, through a server and on this machine. Real QEMU, real
//! guests.

mod common;

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use common::api::*;
use common::*;
use serde_json::{json, Value};

/// Proportional and resident memory of process `pid`, in KiB.
fn pss_rss(pid: u64) -> (u64, u64) {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| {
        rollup
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("Pss:"), field("Rss:"))
}

fn record(id: &str) -> Value {
    let out = strata(&["ps", "--json"]).output().unwrap();
    let all: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    all.into_iter().find(|s| s["id"] == id).unwrap_or(Value::Null)
}

/// Removes snapshot `name` if an earlier run left it.
fn remove_snapshot(name: &str) {
    let out = strata(&["images", "ls", "--json"]).output().unwrap();
    let images: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    for i in images.iter().filter(|i| i["snapshot"] == name || i["meta"]["snapshot"] == name) {
        let rm = strata(&["images", "rm", i["digest"].as_str().unwrap()]).output().unwrap();
        assert!(rm.status.success(), "{}", text(&rm.stderr));
    }
}

async fn launch(api: &Api<'_>, token: &str) -> (String, String) {
    let (st, created) = api.call("POST", "/v1/sessions", Some(token), Some(json!({"package": "python3"}))).await;
    assert_eq!(st, 201, "{created}");
    (created["session"]["id"].as_str().unwrap().to_string(), created["attach_token"].as_str().unwrap().to_string())
}

#[tokio::test]
async fn a_session_forked_through_a_server_gives_copies_with_its_state_that_diverge_and_share_memory() {
    if !e2e() {
        return;
    }
    remove_snapshot("fork-test-snap");
    let s = serve_with("fork", &["--max-sessions-per-terminal", "8"]);
    let api = Api { http: reqwest::Client::new(), s: &s };
    let a = s.a.clone();
    // What an earlier run left (a paused copy) goes first.
    let (_, left) = api.call("GET", "/v1/sessions", Some(&a), None).await;
    for old in left.as_array().into_iter().flatten() {
        api.call("DELETE", &format!("/v1/sessions/{}", old["id"].as_str().unwrap()), Some(&a), None).await;
    }
    let (parent, parent_token) = launch(&api, &a).await;
    let mut w = ws(&s, &parent, &parent_token).await.unwrap();
    read_until(&mut w, ">>> ").await;
    type_line(&mut w, "x = 6*7; fh = open('/root/notes', 'w'); fh.write('parent'); fh.flush(); print('set', x)\r")
        .await;
    read_until(&mut w, "set 42").await;

    // Bad requests first: nothing is copied.
    for (body, status) in [(json!({"count": 0}), 400), (json!({"count": 33}), 400), (json!({"copies": 2}), 400)] {
        let (st, v) = api.call("POST", &format!("/v1/sessions/{parent}/fork"), Some(&a), Some(body)).await;
        assert_eq!(st, status, "{v}");
    }
    // Beyond the terminal's quota of 8: refused whole, naming the quota.
    let (st, v) = api.call("POST", &format!("/v1/sessions/{parent}/fork"), Some(&a), Some(json!({"count": 8}))).await;
    assert_eq!(st, 429, "{v}");
    assert!(v["error"]["message"].as_str().unwrap_or_default().contains("--max-sessions-per-terminal"), "{v}");
    // Another terminal's session is not found.
    let (st, _) = api.call("POST", &format!("/v1/sessions/{parent}/fork"), Some(&s.b), Some(json!({}))).await;
    assert_eq!(st, 404);

    // Four copies, while the parent's terminal stays attached.
    let (st, forked) =
        api.call("POST", &format!("/v1/sessions/{parent}/fork"), Some(&a), Some(json!({"count": 4}))).await;
    assert_eq!(st, 201, "{forked}");
    let forks: Vec<(String, String)> = forked["forks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["session"]["id"].as_str().unwrap().to_string(), f["attach_token"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(forks.len(), 4, "{forked}");
    assert!(forked["parent_stopped_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{forked}");

    // The parent runs on with its terminal.
    type_line(&mut w, "x += 1; fh.write('-p'); fh.flush(); print('parent now', x)\r").await;
    read_until(&mut w, "parent now 43").await;

    // Each copy has the variable and the open file, and goes its own way.
    for (i, (id, token)) in forks.iter().enumerate() {
        let mut f = ws(&s, id, token).await.unwrap();
        type_line(&mut f, &format!("x += {}; fh.write('-{i}'); fh.flush(); print('fork', x)\r", 100 * (i + 1))).await;
        read_until(&mut f, &format!("fork {}", 42 + 100 * (i + 1))).await;
        type_line(&mut f, "print(open('/root/notes').read())\r").await;
        read_until(&mut f, &format!("parent-{i}")).await;
        drop(f);
        let info = api.call("GET", &format!("/v1/sessions/{id}"), Some(&a), None).await.1;
        assert_eq!(info["state"], "running", "{info}");
    }
    type_line(&mut w, "print(open('/root/notes').read())\r").await;
    read_until(&mut w, "parent-p").await;

    // The copies share the snapshot's memory: each one's proportional
    // share is well below what it has resident.
    for (id, _) in &forks {
        let pid = record(id)["qemu_pid"].as_u64().unwrap();
        let (pss, rss) = pss_rss(pid);
        assert!(pss * 10 < rss * 7, "fork {id}: Pss {pss} KiB of Rss {rss} KiB: its memory is not shared");
    }

    // A fork's snapshot gave its memory to its copies: no session starts
    // from it later, and the answer says so.
    let snapshot = forked["snapshot"].as_str().unwrap();
    let (st, v) = api.call("POST", "/v1/sessions", Some(&a), Some(json!({"snapshot": &snapshot[..16]}))).await;
    assert_eq!(st, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap_or_default().contains("is a fork's"), "{v}");

    // A fork of a fork has the state of both.
    let (first, first_token) = &forks[0];
    let (st, again) = api.call("POST", &format!("/v1/sessions/{first}/fork"), Some(&a), Some(json!({}))).await;
    assert_eq!(st, 201, "{again}");
    let f2 = &again["forks"][0];
    let mut g = ws(&s, f2["session"]["id"].as_str().unwrap(), f2["attach_token"].as_str().unwrap()).await.unwrap();
    type_line(&mut g, "print('grandchild', x, open('/root/notes').read())\r").await;
    read_until(&mut g, "grandchild 142 parent-0").await;
    drop(g);
    let _ = first_token;

    // A paused session is not forked: it is resumed first.
    let (st, _) = api.call("POST", &format!("/v1/sessions/{}/pause", forks[1].0), Some(&a), None).await;
    assert_eq!(st, 200);
    let (st, v) = api.call("POST", &format!("/v1/sessions/{}/fork", forks[1].0), Some(&a), Some(json!({}))).await;
    assert_eq!(st, 409, "{v}");
    assert!(v["error"]["message"].as_str().unwrap_or_default().contains("resume it first"), "{v}");

    // A named snapshot starts sessions of its own, later.
    let (st, snap) = api
        .call("POST", &format!("/v1/sessions/{parent}/snapshot"), Some(&a), Some(json!({"name": "fork-test-snap"})))
        .await;
    assert_eq!(st, 201, "{snap}");
    let (st, v) = api
        .call("POST", &format!("/v1/sessions/{parent}/snapshot"), Some(&a), Some(json!({"name": "fork-test-snap"})))
        .await;
    assert_eq!(st, 409, "the name is taken: {v}");
    let (st, v) =
        api.call("POST", &format!("/v1/sessions/{parent}/snapshot"), Some(&a), Some(json!({"name": "Bad Name"}))).await;
    assert_eq!(st, 400, "{v}");
    drop(w);
    let (st, from) = api.call("POST", "/v1/sessions", Some(&a), Some(json!({"snapshot": "fork-test-snap"}))).await;
    assert_eq!(st, 201, "{from}");
    let mut h = ws(&s, from["session"]["id"].as_str().unwrap(), from["attach_token"].as_str().unwrap()).await.unwrap();
    type_line(&mut h, "print('from the snapshot', x)\r").await;
    read_until(&mut h, "from the snapshot 43").await;
    drop(h);
    let (st, v) = api.call("POST", "/v1/sessions", Some(&a), Some(json!({"snapshot": "no-such-snapshot"}))).await;
    assert_eq!(st, 404, "{v}");
    let image = snap["image"].as_str().unwrap().to_string();
    let (_, all) = api.call("GET", "/v1/sessions", Some(&a), None).await;
    for id in all.as_array().into_iter().flatten().filter_map(|v| v["id"].as_str()) {
        let (st, _) = api.call("DELETE", &format!("/v1/sessions/{id}"), Some(&a), None).await;
        assert_eq!(st, 204, "{id}");
    }
    drop(api);
    drop(s);
    let rm = strata(&["images", "rm", &image]).output().unwrap();
    assert!(rm.status.success(), "{}", text(&rm.stderr));
}

/// `strata run -d python3`, a line typed into its program, then detached
/// (its terminal's process killed): the session's id.
fn detached_python_with(line: &str, answer: &str) -> String {
    let out = strata(&["run", "-d", "python3"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_string();
    let mut child =
        strata(&["attach", &id]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(line.as_bytes()).unwrap();
    stdin.flush().unwrap();
    let logs = || text(&strata(&["logs", &id]).output().unwrap().stdout);
    assert!(wait_until(Duration::from_secs(60), || record(&id)["detached"] == false), "never attached");
    std::thread::sleep(Duration::from_secs(2));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(wait_until(Duration::from_secs(30), || logs().contains(answer)), "no {answer:?} in {:?}", logs());
    id
}

#[test]
fn the_cli_forks_a_detached_session_and_starts_one_from_a_named_snapshot() {
    if !e2e() {
        return;
    }
    remove_snapshot("cli-fork-snap");
    let id = detached_python_with("y = 'kept'; print('ok', y)\n", "ok kept");
    let out = strata(&["fork", &id, "-n", "2"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let copies: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
    assert_eq!(copies.len(), 2, "{}", text(&out.stdout));
    assert!(text(&out.stderr).contains("runs on"), "{}", text(&out.stderr));
    for c in copies.iter().chain([&id]) {
        assert_eq!(record(c)["state"], "detached", "{c}: {}", record(c));
    }
    let out = strata_with_input(&["attach", &copies[0]], "print(y.upper())\n");
    assert!(text(&out.stdout).contains("KEPT"), "{}{}", text(&out.stdout), text(&out.stderr));

    // Named: refused when the name is bad or taken, listed, started from.
    let bad = strata(&["snapshot", &id, "../x"]).output().unwrap();
    assert!(!bad.status.success() && text(&bad.stderr).contains("not valid"), "{}", text(&bad.stderr));
    let out = strata(&["snapshot", &id, "cli-fork-snap"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let again = strata(&["snapshot", &id, "cli-fork-snap"]).output().unwrap();
    assert!(!again.status.success() && text(&again.stderr).contains("exists already"), "{}", text(&again.stderr));
    let images = text(&strata(&["images", "ls"]).output().unwrap().stdout);
    assert!(images.contains("cli-fork-snap"), "{images}");
    let out = strata(&["run", "-d", "--from", "cli-fork-snap"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let from = text(&out.stdout).trim().to_string();
    let out = strata_with_input(&["attach", &from], "print(y * 2)\n");
    assert!(text(&out.stdout).contains("keptkept"), "{}{}", text(&out.stdout), text(&out.stderr));
    let none = strata(&["run", "--from", "no-such-snapshot"]).output().unwrap();
    assert!(!none.status.success() && text(&none.stderr).contains("no snapshot"), "{}", text(&none.stderr));

    for s in copies.iter().chain([&id]) {
        let _ = strata(&["rm", s]).output();
    }
    let digest =
        images.lines().find(|l| l.contains("cli-fork-snap")).and_then(|l| l.split_whitespace().nth(1)).unwrap();
    let rm = strata(&["images", "rm", digest]).output().unwrap();
    assert!(rm.status.success(), "{}", text(&rm.stderr));
}

/// `strata bench move`: a bc session moved live to a new QEMU answers its
/// probe (the benchmark checks it); the figures of both ways come out, and
/// the live move stops the guest for less than a pause and resume takes.
#[test]
fn bench_move_reports_live_moves_against_pause_and_resume() {
    if !e2e() {
        return;
    }
    let out = strata(&["bench", "move", "bc", "--rounds", "1", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let first = |k: &str| v[k][0].as_f64().unwrap_or_else(|| panic!("no {k} in {v}"));
    let (downtime, moved, paused) =
        (first("downtime_ms"), first("move_answering_ms"), first("pause_resume_answering_ms"));
    assert!(downtime > 0.0 && downtime < moved, "{v}");
    assert!(downtime < paused, "a live move stopped the guest longer than a pause and resume took: {v}");
    let bad = strata(&["bench", "move", "bc", "--rounds", "0"]).output().unwrap();
    assert!(text(&bad.stderr).contains("--rounds must be between 1 and 100"), "{}", text(&bad.stderr));
}

/// A move whose receiver dies midway (after some of the memory went): the
/// migration fails, the session runs on where it was with its state, and
/// the receiver leaves nothing behind.
#[tokio::test]
async fn a_move_whose_receiver_dies_midway_leaves_the_session_running_where_it_was() {
    if !e2e() {
        return;
    }
    let eng = engine();
    let pkg = eng.package("bc").unwrap();
    let images = eng.ensure_images(&pkg, &strata_engine::LogProgress).await.unwrap();
    let settings = strata_engine::context::ContextSettings::from_terminal(None);
    let mut s = eng.launch_from(&pkg, &images.launch, &settings).await.unwrap();
    s.expect_after(b"x=6*7\nx\n", "42", Duration::from_secs(60)).await.unwrap();
    s.quiet().await.unwrap();
    let mut rec = eng.movable_record(&s.id).unwrap();
    rec.id = format!("{:012x}", std::process::id() as u64 * 7919 + 1);
    let incoming = eng.receive_session(&rec).await.unwrap();
    let receiver = incoming.socket().parent().unwrap().parent().unwrap().to_path_buf();
    assert!(receiver.ends_with(&rec.id), "{}", receiver.display());
    let (listener, socket) = eng.outgoing_socket(&s).unwrap();
    let target = incoming.socket();
    // Four MiB go, then the receiver's end is cut and its QEMU killed,
    // while the sender's QEMU is sending.
    let relay = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut from, _) = listener.accept().await.unwrap();
        let mut to = tokio::net::UnixStream::connect(&target).await.unwrap();
        let mut buf = vec![0u8; 64 << 10];
        let mut sent = 0;
        while sent < 4 << 20 {
            let n = from.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            to.write_all(&buf[..n]).await.unwrap();
            sent += n;
        }
        drop((from, to));
        incoming.abandon().await;
        sent
    });
    let moved = eng.send_session(&mut s, &socket).await;
    let sent = relay.await.unwrap();
    assert!(sent >= 4 << 20, "the migration ended before 4 MiB went: {sent} bytes");
    assert!(moved.is_err(), "a move to a receiver that died succeeded");
    // It runs on here, with its state.
    s.reattach(&settings.to_terminal_context()).await.unwrap();
    let seen = s.expect_after(b"x+1\n", "43", Duration::from_secs(60)).await.unwrap();
    assert!(seen.contains("43"), "{seen}");
    assert!(!receiver.exists(), "the receiver left {}", receiver.display());
    s.close().await;
}
