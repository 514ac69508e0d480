//! No session is lost when a strata process dies or stops: a killed
//! terminal leaves its session detached, a killed or stopped server's
//! sessions are taken back by the next one, and a VM that ends unseen is
//! reported, not hidden. Real QEMU, real guests.

mod common;

use std::io::{Read, Write};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::api::*;
use common::*;
use serde_json::{json, Value};

fn sessions_json() -> Vec<Value> {
    let out = strata(&["ps", "--json"]).output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

fn session(id: &str) -> Option<Value> {
    sessions_json().into_iter().find(|s| s["id"] == id)
}

/// `strata ARGS` with piped input, its output gathered as it comes.
fn spawn_reading(args: &[&str]) -> (std::process::Child, Arc<Mutex<String>>) {
    spawn_reading_cmd(strata(args))
}

/// `cmd` with piped input, its output gathered as it comes.
fn spawn_reading_cmd(mut cmd: std::process::Command) -> (std::process::Child, Arc<Mutex<String>>) {
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let seen = Arc::new(Mutex::new(String::new()));
    let mut stdout = child.stdout.take().unwrap();
    let gathered = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            gathered.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    (child, seen)
}

/// The session the strata process `pid` holds.
fn mine_of(pid: u32) -> Option<Value> {
    sessions_json().into_iter().find(|s| s["owner_pid"] == pid)
}

/// `strata run python3` with `line` typed in; once `answer` shows, its
/// process is killed outright (nothing of it runs). The session's record.
fn run_python_then_kill_its_terminal(line: &[u8], answer: &str) -> Value {
    run_then_kill_its_terminal(&[], line, answer)
}

/// As [`run_python_then_kill_its_terminal`], with `flags` for `run`.
fn run_then_kill_its_terminal(flags: &[&str], line: &[u8], answer: &str) -> Value {
    let args: Vec<&str> = ["run", "-i"].into_iter().chain(flags.iter().copied()).chain(["python3"]).collect();
    let (mut child, seen) = spawn_reading(&args);
    let pid = child.id();
    assert!(wait_until(Duration::from_secs(120), || mine_of(pid).is_some()), "the session never started");
    let rec = mine_of(pid).unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(line).unwrap();
    stdin.flush().unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || seen.lock().unwrap().contains(answer)),
        "no {answer:?}: {:?}",
        seen.lock().unwrap()
    );
    child.kill().unwrap();
    child.wait().unwrap();
    rec
}

fn alive(pid: u64) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
}

#[test]
fn a_killed_terminal_leaves_its_session_detached_with_its_state_and_an_unseen_end_is_reported() {
    if !e2e() {
        return;
    }
    let rec = run_python_then_kill_its_terminal(b"x = 6*7; print('set', x)\n", "set 42");
    let (id, qemu) = (rec["id"].as_str().unwrap().to_string(), rec["qemu_pid"].as_u64().unwrap());
    assert!(
        wait_until(Duration::from_secs(20), || session(&id).is_some_and(|s| s["state"] == "detached")),
        "the session is not listed detached: {:?}",
        session(&id)
    );
    assert!(alive(qemu), "QEMU {qemu} ended with its terminal");
    let logs = strata(&["logs", &id]).output().unwrap();
    assert!(text(&logs.stdout).contains("set 42"), "logs: {:?} {}", text(&logs.stdout), text(&logs.stderr));
    // Attached again, the program and its state are there; that terminal
    // is killed too, and the session is detached again.
    let (mut again, seen) = spawn_reading(&["attach", &id]);
    let mut stdin = again.stdin.take().unwrap();
    stdin.write_all(b"print('x is', x)\n").unwrap();
    stdin.flush().unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || seen.lock().unwrap().contains("x is 42")),
        "{:?}",
        seen.lock().unwrap()
    );
    assert_eq!(session(&id).unwrap()["state"], "attached");
    again.kill().unwrap();
    again.wait().unwrap();
    assert!(wait_until(Duration::from_secs(20), || session(&id).is_some_and(|s| s["state"] == "detached")));
    // SAFETY: signalling a QEMU this test started.
    unsafe {
        libc_kill(qemu as i32, 9);
    }
    assert!(
        wait_until(Duration::from_secs(20), || session(&id).is_some_and(|s| s["state"] == "lost")),
        "{:?}",
        session(&id)
    );
    let lost = session(&id).unwrap();
    let reason = lost["ended"]["reason"].as_str().unwrap_or_default().to_string();
    assert!(reason.contains("ended while no terminal was attached"), "{lost}");
    let ps = text(&strata(&["ps"]).output().unwrap().stdout);
    assert!(ps.lines().any(|l| l.starts_with(&id) && l.contains("lost")), "{ps}");
    let refused = strata(&["attach", &id]).output().unwrap();
    assert!(text(&refused.stderr).contains("has ended (lost)"), "{}", text(&refused.stderr));
    let rm = strata(&["rm", &id]).output().unwrap();
    assert!(rm.status.success(), "{}", text(&rm.stderr));
    assert!(session(&id).is_none(), "still listed after rm");
    assert!(!env().state.join("sessions").join(&id).exists());

    // No server needed: the store's keeper, started by the CLI, pauses a
    // session whose terminal was killed once its idle time-out passes;
    // `ps` says why, and attaching resumes it with its state.
    let rec = run_then_kill_its_terminal(&["--idle-timeout", "3s"], b"y = 'kept'; print(y)\n", "kept");
    let id = rec["id"].as_str().unwrap().to_string();
    let keeper: u64 = std::fs::read_to_string(env().state.join("keeper.lock")).unwrap().trim().parse().unwrap();
    let cmdline = std::fs::read(format!("/proc/{keeper}/cmdline")).unwrap_or_default();
    assert!(text(&cmdline).ends_with("keep\0"), "no keeper runs: {:?}", text(&cmdline));
    assert!(
        wait_until(Duration::from_secs(60), || session(&id).is_some_and(|s| s["state"] == "paused")),
        "{:?}",
        session(&id)
    );
    let why = session(&id).unwrap()["why"].as_str().unwrap_or_default().to_string();
    assert_eq!(why, "paused: detached longer than its idle time-out (3s)");
    let ps = text(&strata(&["ps"]).output().unwrap().stdout);
    assert!(ps.lines().any(|l| l.starts_with(&id) && l.contains("paused") && l.ends_with(&why)), "{ps}");
    let out = strata_with_input(&["attach", &id], "print(y.upper())\n");
    assert!(text(&out.stdout).contains("KEPT"), "{}{}", text(&out.stdout), text(&out.stderr));

    // A guest that powers off while nobody is attached: listed exited.
    let line = b"import os; os.system('(sleep 3; echo o > /proc/sysrq-trigger) &'); print('armed')\n";
    let id = run_python_then_kill_its_terminal(line, "armed")["id"].as_str().unwrap().to_string();
    assert!(
        wait_until(Duration::from_secs(60), || session(&id).is_some_and(|s| s["state"] == "exited")),
        "{:?}",
        session(&id)
    );
    let reason = session(&id).unwrap()["ended"]["reason"].as_str().unwrap_or_default().to_string();
    assert!(reason.contains("its guest powered off"), "{reason}");
    assert!(strata(&["rm", &id]).output().unwrap().status.success());
}

/// Launches `package` for terminal `token`: (id, attach token).
async fn launch(api: &Api<'_>, token: &str, body: Value) -> (String, String) {
    let (st, created) = api.call("POST", "/v1/sessions", Some(token), Some(body)).await;
    assert_eq!(st, 201, "{created}");
    (created["session"]["id"].as_str().unwrap().to_string(), created["attach_token"].as_str().unwrap().to_string())
}

async fn state_of(api: &Api<'_>, token: &str, id: &str) -> Value {
    api.call("GET", &format!("/v1/sessions/{id}"), Some(token), None).await.1
}

/// The QEMU fork server of the `strata serve` with pid `server`.
fn fork_server_of(server: u32) -> Option<u32> {
    let children = std::fs::read_to_string(format!("/proc/{server}/task/{server}/children")).ok()?;
    children
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .find(|p: &u32| std::fs::read(format!("/proc/{p}/comm")).is_ok_and(|c| c.starts_with(b"qemu-system")))
}

#[tokio::test]
async fn a_killed_or_stopped_server_loses_no_session_the_next_one_takes_them_back_and_pauses_idle_cli_sessions() {
    if !e2e() {
        return;
    }
    let (a, b) = (token("survive-a"), token("survive-b"));
    let mut s = serve_as(a.clone(), b.clone(), &["--on-stop", "keep"]);
    let api = Api { http: reqwest::Client::new(), s: &s };
    let (one, one_token) = launch(&api, &a, json!({"package": "python3"})).await;
    let (two, _) = launch(&api, &a, json!({"package": "bc", "idle_timeout_s": 777})).await;
    let mut w = ws(&s, &one, &one_token).await.unwrap();
    read_until(&mut w, ">>> ").await;
    type_line(&mut w, "x = 6*7; print('set', x)\r").await;
    read_until(&mut w, "set 42").await;
    drop(api);

    // kill -9 while a terminal is attached: both VMs run on.
    let qemus: Vec<u64> = [&one, &two].iter().map(|id| session(id).unwrap()["qemu_pid"].as_u64().unwrap()).collect();
    s.kill9();
    drop(w);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(qemus.iter().all(|p| alive(*p)), "a VM died with its server");

    // The next server lists both running, with their time-outs, and the
    // first one answers with its state through its own attach token.
    let s = serve_as(a.clone(), b.clone(), &["--on-stop", "keep"]);
    let api = Api { http: reqwest::Client::new(), s: &s };
    let v = state_of(&api, &a, &one).await;
    assert_eq!((v["state"].as_str(), v["attached"].as_bool()), (Some("running"), Some(false)), "{v}");
    let v = state_of(&api, &a, &two).await;
    assert_eq!((v["state"].as_str(), v["idle_timeout_s"].as_u64()), (Some("running"), Some(777)), "{v}");
    assert_eq!(api.call("GET", &format!("/v1/sessions/{one}"), Some(&b), None).await.0, 404);
    let mut w = ws(&s, &one, &one_token).await.unwrap();
    read_until(&mut w, "set 42").await;
    type_line(&mut w, "print('still', x)\r").await;
    read_until(&mut w, "still 42").await;
    drop(w);
    assert_eq!(session(&one).unwrap()["owner_pid"].as_u64(), Some(u64::from(s.child.id())));

    // Its fork server killed: sessions run on, and launches still work
    // (QEMU is exec'd without it).
    let fork = fork_server_of(s.child.id()).expect("the server has a fork server");
    // SAFETY: signalling a process this test started.
    unsafe {
        libc_kill(fork as i32, 9);
    }
    let (three, _) = launch(&api, &a, json!({"package": "bc"})).await;
    assert!(qemus.iter().all(|p| alive(*p)), "a VM died with the fork server");
    assert_eq!(state_of(&api, &a, &three).await["state"], "running");
    drop(api);

    // A planned stop with --on-stop keep leaves them running; the next
    // server, with --pause-on-stop, takes them back, and its stop pauses
    // them to images, to be resumed by the server after it.
    let mut s = s;
    s.stop();
    assert!(qemus.iter().all(|p| alive(*p)), "a VM died with a planned stop");
    let mut s = serve_as(a.clone(), b.clone(), &["--pause-on-stop"]);
    let api = Api { http: reqwest::Client::new(), s: &s };
    for id in [&one, &two, &three] {
        assert_eq!(state_of(&api, &a, id).await["state"], "running", "{id}");
    }
    drop(api);
    s.stop();
    for id in [&one, &two, &three] {
        let rec = session(id).unwrap();
        assert!(rec["paused_image"].is_string(), "{rec}");
        assert_eq!(qemu_of(id), 0, "{id} still has a VM");
    }
    let s = serve_as(a.clone(), b.clone(), &[]);
    let api = Api { http: reqwest::Client::new(), s: &s };
    for id in [&one, &two, &three] {
        assert_eq!(state_of(&api, &a, id).await["state"], "running", "{id} was not resumed");
    }
    let mut w = ws(&s, &one, &one_token).await.unwrap();
    type_line(&mut w, "print('resumed', x)\r").await;
    read_until(&mut w, "resumed 42").await;
    drop(w);

    // A VM that dies while nobody watches is listed lost with why, until
    // removed.
    let pid = session(&two).unwrap()["qemu_pid"].as_u64().unwrap();
    // SAFETY: signalling a QEMU this test started.
    unsafe {
        libc_kill(pid as i32, 9);
    }
    let mut v = Value::Null;
    for _ in 0..100 {
        v = state_of(&api, &a, &two).await;
        if v["state"] == "lost" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(v["state"], "lost", "{v}");
    assert!(v["reason"].as_str().is_some_and(|r| !r.is_empty()), "{v}");
    for id in [&one, &two, &three] {
        assert_eq!(api.call("DELETE", &format!("/v1/sessions/{id}"), Some(&a), None).await.0, 204, "{id}");
    }
    assert_eq!(api.call("GET", &format!("/v1/sessions/{two}"), Some(&a), None).await.0, 404);
    assert!(qemus.iter().all(|p| !alive(*p)), "a VM outlived its removal");

    // A session whose agent does not answer the next server (here: its
    // QEMU stopped, as an agent of another protocol would not answer) is
    // not taken, and is left running, detached; a later server takes it.
    let (four, _) = launch(&api, &a, json!({"package": "bc"})).await;
    let stopped = session(&four).unwrap()["qemu_pid"].as_u64().unwrap();
    drop(api);
    // SAFETY: signalling a QEMU this test started.
    unsafe {
        libc_kill(stopped as i32, 19);
    }
    let mut s = s;
    s.kill9();
    let mut s = serve_as(a.clone(), b.clone(), &[]);
    let api = Api { http: reqwest::Client::new(), s: &s };
    assert_eq!(api.call("GET", &format!("/v1/sessions/{four}"), Some(&a), None).await.0, 404);
    assert_eq!(session(&four).unwrap()["state"], "detached");
    assert!(alive(stopped), "a session that did not answer was stopped");
    // SAFETY: as above.
    unsafe {
        libc_kill(stopped as i32, 18);
    }
    drop(api);
    s.kill9();
    let s = serve_as(a.clone(), b.clone(), &[]);
    let api = Api { http: reqwest::Client::new(), s: &s };
    assert_eq!(state_of(&api, &a, &four).await["state"], "running");
    assert_eq!(api.call("DELETE", &format!("/v1/sessions/{four}"), Some(&a), None).await.0, 204);
    drop(api);

    // A session detached from the CLI follows the same idle time-out,
    // applied by the server of its store.
    let bad = strata(&["run", "-d", "--idle-timeout", "soon", "bc"]).output().unwrap();
    assert!(text(&bad.stderr).contains("not a duration like 90s"), "{}", text(&bad.stderr));
    let out = strata(&["run", "-d", "--idle-timeout", "2s", "bc"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_string();
    let rec = session(&id).unwrap();
    assert_eq!((rec["state"].as_str(), rec["idle_timeout_s"].as_u64()), (Some("detached"), Some(2)), "{rec}");
    // The server's housekeeping (every 5 s) pauses it once it has been
    // detached for 2 s; its VM stops. (Another test's server on this store
    // may have begun that pause and stopped mid-way: the next one resumes
    // the guest it left stopped and pauses it.)
    assert!(
        wait_until(Duration::from_secs(90), || session(&id).is_some_and(|s| s["state"] == "paused")),
        "{:?}",
        session(&id)
    );
    assert_eq!(qemu_of(&id), 0);
    let ps = text(&strata(&["ps"]).output().unwrap().stdout);
    assert!(ps.lines().any(|l| l.starts_with(&id) && l.contains("paused")), "{ps}");
    // Attaching resumes it where it was.
    let out = strata_with_input(&["attach", &id], "6*7\n");
    assert!(text(&out.stdout).contains("42"), "{}{}", text(&out.stdout), text(&out.stderr));

    // A server that keeps paused sessions for 1 s removes one paused longer.
    drop(s);
    let out = strata(&["run", "-d", "--idle-timeout", "never", "bc"]).output().unwrap();
    let id = text(&out.stdout).trim().to_string();
    assert_eq!(session(&id).unwrap()["idle_timeout_s"], 0);
    let paused = strata(&["pause", &id]).output().unwrap();
    assert!(paused.status.success(), "{}", text(&paused.stderr));
    std::thread::sleep(Duration::from_secs(2));
    let _s = serve_with_env(a.clone(), b.clone(), &[], &[("STRATA_PAUSED_RETENTION_SECS", "1")]);
    assert!(wait_until(Duration::from_secs(30), || session(&id).is_none()), "{:?}", session(&id));
    assert!(!env().state.join(format!("paused/{id}.json")).exists());
}

/// A VM ended by its memory limit while no terminal is attached is listed
/// `lost`, naming the limit, until removed.
#[test]
fn a_detached_session_ended_by_its_memory_limit_is_listed_lost_naming_the_limit() {
    if !e2e() {
        return;
    }
    let (mut child, seen) = spawn_reading(&["run", "-i", "python3"]);
    let pid = child.id();
    assert!(wait_until(Duration::from_secs(120), || mine_of(pid).is_some()), "the session never started");
    let rec = mine_of(pid).unwrap();
    let (id, qemu) = (rec["id"].as_str().unwrap().to_string(), rec["qemu_pid"].as_u64().unwrap() as u32);
    // A guest cannot outgrow guest RAM + the allowance by itself: its
    // limit is lowered to 256 MiB, below what it is about to use, as a
    // QEMU growing would meet it.
    let memory = cgroup_dir(qemu, "memory");
    let limit = if memory.join("memory.max").exists() { "memory.max" } else { "memory.limit_in_bytes" };
    std::fs::write(memory.join(limit), (256u64 << 20).to_string()).unwrap();
    // The guest fills its memory 3 s on, after its terminal is gone.
    let mut stdin = child.stdin.take().unwrap();
    let fill = b"import threading, time; x = []; threading.Thread(target=lambda: (time.sleep(3), \
        [x.append(b'\\x01' * (1 << 20)) for i in range(400)])).start(); print('ar' + 'med')\n";
    stdin.write_all(fill).unwrap();
    stdin.flush().unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || seen.lock().unwrap().contains("armed")),
        "{:?}",
        seen.lock().unwrap()
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        wait_until(Duration::from_secs(300), || session(&id).is_some_and(|s| s["state"] == "lost")),
        "{:?}",
        session(&id)
    );
    let reason = session(&id).unwrap()["ended"]["reason"].as_str().unwrap_or_default().to_string();
    assert!(reason.starts_with("its VM was ended by its memory limit"), "{reason}");
    let ps = text(&strata(&["ps"]).output().unwrap().stdout);
    assert!(ps.lines().any(|l| l.starts_with(&id) && l.contains("lost") && l.contains("memory limit")), "{ps}");
    assert!(strata(&["rm", &id]).output().unwrap().status.success());
    assert!(session(&id).is_none());
}

#[test]
fn a_keeper_keeps_a_store_alone_and_ends_once_nothing_runs_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().to_str().unwrap();
    let mut first = strata(&["--state", state, "keep"]).stderr(Stdio::null()).spawn().unwrap();
    let lock = dir.path().join("keeper.lock");
    assert!(
        wait_until(Duration::from_secs(10), || std::fs::read_to_string(&lock)
            .is_ok_and(|p| p.trim() == first.id().to_string())),
        "the first keeper did not take the store"
    );
    // A second one finds the store kept and ends at once.
    let t0 = std::time::Instant::now();
    let second = strata(&["--state", state, "keep"]).output().unwrap();
    assert!(second.status.success() && t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert!(first.try_wait().unwrap().is_none(), "the first keeper ended early");
    // Nothing runs in an empty store: it ends after three quiet rounds.
    assert!(wait_until(Duration::from_secs(40), || first.try_wait().unwrap().is_some()), "the keeper did not end");
    assert!(first.wait().unwrap().success());
}

/// An upgrade: sessions an earlier build of strata started (one from its
/// CLI, one through its server), with state typed in, are taken back by
/// this build: listed, attached with their state, through the same attach
/// token.
#[tokio::test]
async fn sessions_an_earlier_build_started_are_taken_back_by_this_one() {
    if !e2e() {
        return;
    }
    let earlier = std::path::PathBuf::from(std::env::var("STRATA_EARLIER_BUILD").expect(
        "STRATA_EARLIER_BUILD must name the binaries of an earlier strata build: ./test.sh builds one \
         (scripts/earlier-build.sh)",
    ));
    let built = strata_of(&earlier, &["build", "bc"]).output().unwrap();
    assert!(built.status.success(), "the earlier build could not build bc: {}", text(&built.stderr));

    // Its CLI: a session with a variable set, whose terminal is killed.
    let (mut child, seen) = spawn_reading_cmd(strata_of(&earlier, &["run", "-i", "bc"]));
    let pid = child.id();
    assert!(wait_until(Duration::from_secs(120), || mine_of(pid).is_some()), "the earlier CLI's session never started");
    let cli_id = mine_of(pid).unwrap()["id"].as_str().unwrap().to_string();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"x = 6*7\nx\n").unwrap();
    stdin.flush().unwrap();
    assert!(wait_until(Duration::from_secs(60), || seen.lock().unwrap().contains("42")), "{:?}", seen.lock().unwrap());
    child.kill().unwrap();
    child.wait().unwrap();

    // Its server: a session with a variable set; the server is killed.
    let (a, b) = (token("upgrade-a"), token("upgrade-b"));
    let mut old = serve_by(&earlier, a.clone(), b.clone(), &["--on-stop", "keep"], &[]);
    let api = Api { http: reqwest::Client::new(), s: &old };
    let (api_id, attach) = launch(&api, &a, json!({"package": "bc"})).await;
    let mut w = ws(&old, &api_id, &attach).await.unwrap();
    type_line(&mut w, "y = 7*6\ry\r").await;
    read_until(&mut w, "42").await;
    drop((api, w));
    old.kill9();
    let started_by = session(&api_id).unwrap()["strata_version"].as_str().unwrap_or_default().to_string();

    // This build: the CLI's session is listed detached and attaches with its state.
    let v = session(&cli_id).unwrap();
    assert_eq!(v["state"], "detached", "{v}");
    let out = strata_with_input(&["attach", &cli_id], "x + 1\n");
    assert!(text(&out.stdout).contains("43"), "{}{}", text(&out.stdout), text(&out.stderr));

    // This build's server takes the API session back: running, the same
    // attach token, its state.
    let s = serve_as(a.clone(), b, &["--on-stop", "stop"]);
    let api = Api { http: reqwest::Client::new(), s: &s };
    let v = state_of(&api, &a, &api_id).await;
    assert_eq!(v["state"], "running", "{v}");
    let mut w = ws(&s, &api_id, &attach).await.unwrap();
    type_line(&mut w, "y + 2\r").await;
    read_until(&mut w, "44").await;
    drop(w);
    // Held by this build now; the record still names the build that started it.
    let rec = session(&api_id).unwrap();
    assert_eq!(rec["owner_pid"].as_u64(), Some(u64::from(s.child.id())), "{rec}");
    assert_eq!(rec["strata_version"], started_by.as_str());
    assert_eq!(api.call("DELETE", &format!("/v1/sessions/{api_id}"), Some(&a), None).await.0, 204);
    // This build's images are the ones used last again (the test store's
    // prune keeps those).
    assert!(strata(&["build", "bc"]).output().unwrap().status.success());
}
