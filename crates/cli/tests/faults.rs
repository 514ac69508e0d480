//! Load with faults: launches at concurrency 32 against `strata serve`,
//! with the server killed and restarted twice meanwhile. Every launch
//! either succeeds or gets a clear error, and afterwards the sessions
//! listed match the QEMU processes exactly. Real QEMU, real guests.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::api::*;
use common::*;
use serde_json::{json, Value};

const LAUNCHES: usize = 1000;
const CONCURRENCY: usize = 32;

/// How one launch (and the kill of what it launched) ended.
enum Outcome {
    Launched,
    /// The server answered with an error body naming what went wrong.
    Refused(String),
    /// The server went away with the request (killed mid-way), or stayed
    /// away for 30 s.
    Unreachable(String),
}

async fn launch_and_kill(http: &reqwest::Client, base: &str, token: &str) -> Outcome {
    // A client tries again while nothing listens (the server is starting
    // again), for 30 s at most; a request cut mid-way is not sent twice.
    let mut tries = 0;
    let resp = loop {
        let sent = http
            .post(format!("{base}/v1/sessions"))
            .bearer_auth(token)
            .json(&json!({"package": "bc"}))
            .timeout(Duration::from_secs(120))
            .send()
            .await;
        match sent {
            Ok(r) => break r,
            Err(e) if e.is_connect() && tries < 300 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Outcome::Unreachable(e.to_string()),
        }
    };
    let status = resp.status().as_u16();
    let body: Value = match resp.bytes().await {
        Ok(b) => serde_json::from_slice(&b).unwrap_or(Value::Null),
        Err(e) => return Outcome::Unreachable(format!("the answer was cut: {e}")),
    };
    if status != 201 {
        return match body["error"]["message"].as_str() {
            Some(m) if !m.is_empty() => Outcome::Refused(format!("{status}: {m}")),
            _ => panic!("a launch failed with {status} and no error message: {body}"),
        };
    }
    let id = body["session"]["id"].as_str().unwrap().to_string();
    // Killing it may meet a server that is gone; it is then taken back by
    // the next one and listed, and the count below still holds.
    let _ = http
        .delete(format!("{base}/v1/sessions/{id}"))
        .bearer_auth(token)
        .timeout(Duration::from_secs(60))
        .send()
        .await;
    Outcome::Launched
}

/// Running sessions of this store by `ps`, and the sessions whose QEMU runs.
fn listed_and_running() -> (BTreeSet<String>, BTreeSet<String>) {
    let out = strata(&["ps", "--json"]).output().unwrap();
    let all: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let listed = all
        .iter()
        .filter(|s| s["state"] == "attached" || s["state"] == "detached")
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    let marker = format!("{}/sessions/", env().state.display());
    let running = qemu_processes_with(&marker)
        .into_iter()
        .filter_map(|pid| {
            let cmd = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).ok()?).replace('\0', " ");
            let rest = &cmd[cmd.find(&marker)? + marker.len()..];
            Some(rest.chars().take(12).collect::<String>())
        })
        .collect();
    (listed, running)
}

#[tokio::test]
async fn launches_under_load_survive_two_kills_of_the_server_and_leave_no_stray_vm() {
    if !e2e() {
        return;
    }
    let (a, b) = (token("faults-a"), token("faults-b"));
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let listen = format!("127.0.0.1:{port}");
    let args = ["--on-stop", "keep", "--listen", &listen, "--max-sessions", "64", "--max-sessions-per-terminal", "64"];
    let mut server = serve_as(a.clone(), b.clone(), &args);
    let base = server.base.clone();
    let http = reqwest::Client::new();
    let done = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(900);
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..CONCURRENCY {
        let (http, base, a, done, next) = (http.clone(), base.clone(), a.clone(), done.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            while next.fetch_add(1, Ordering::SeqCst) < LAUNCHES && Instant::now() < deadline {
                outcomes.push(launch_and_kill(&http, &base, &a).await);
                done.fetch_add(1, Ordering::SeqCst);
            }
            outcomes
        }));
    }
    // Killed outright twice, a third and two thirds of the way through,
    // and started again on the same address.
    for at in [LAUNCHES / 3, 2 * LAUNCHES / 3] {
        while done.load(Ordering::SeqCst) < at && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server.kill9();
        tokio::time::sleep(Duration::from_millis(500)).await;
        server = serve_as(a.clone(), b.clone(), &args);
        assert_eq!(server.base, base);
    }
    let mut outcomes = Vec::new();
    for w in workers {
        outcomes.extend(w.await.unwrap());
    }
    assert_eq!(outcomes.len(), LAUNCHES, "the run did not finish within its time");
    let launched = outcomes.iter().filter(|o| matches!(o, Outcome::Launched)).count();
    let refused: Vec<&String> =
        outcomes.iter().filter_map(|o| if let Outcome::Refused(m) = o { Some(m) } else { None }).collect();
    let cut: Vec<&String> =
        outcomes.iter().filter_map(|o| if let Outcome::Unreachable(m) = o { Some(m) } else { None }).collect();
    eprintln!(
        "faults: {launched} launched, {} refused, {} cut off by a kill (e.g. {:?})",
        refused.len(),
        cut.len(),
        cut.first()
    );
    // Launches fail only around the kills.
    assert!(launched >= LAUNCHES / 2, "{launched} of {LAUNCHES} launched; refusals: {refused:?}");

    // Afterwards `ps` and the QEMU processes agree exactly (the reaper and
    // the restarted server settle what the kills left mid-way).
    let mut last = (BTreeSet::new(), BTreeSet::new());
    let settled = wait_until(Duration::from_secs(90), || {
        last = listed_and_running();
        last.0 == last.1
    });
    assert!(settled, "ps lists {:?} but QEMU runs {:?}", last.0, last.1);

    // What the kills interrupted is this terminal's, listed by the server,
    // and goes with it.
    let api = Api { http: http.clone(), s: &server };
    let (st, list) = api.call("GET", "/v1/sessions", Some(&a), None).await;
    assert_eq!(st, 200);
    for s in list.as_array().unwrap() {
        let id = s["id"].as_str().unwrap();
        assert_eq!(api.call("DELETE", &format!("/v1/sessions/{id}"), Some(&a), None).await.0, 204);
    }
    let mine = || -> usize {
        let out = strata(&["ps", "--json"]).output().unwrap();
        let all: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        all.iter().filter(|s| s["labels"]["terminal"] == "faults-a").count()
    };
    let mut left = (BTreeSet::new(), BTreeSet::new());
    let clean = wait_until(Duration::from_secs(60), || {
        left = listed_and_running();
        mine() == 0 && left.0 == left.1
    });
    assert!(clean, "left behind: {} of this test's sessions; listed {:?}, running {:?}", mine(), left.0, left.1);
}
