//! The REST API against a real running `strata serve` and real VMs.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::api::*;
use common::*;
use proptest::prelude::*;
use serde_json::{json, Value};

/// Whether the metrics text has a series `name` (labelled with its server)
/// with all of `labels`, and (if given) this value.
fn has_series(metrics: &str, name: &str, labels: &[&str], value: Option<&str>) -> bool {
    metrics.lines().any(|l| {
        l.starts_with(&format!("{name}{{"))
            && l.contains("server=\"")
            && labels.iter().all(|x| l.contains(x))
            && value.is_none_or(|v| l.rsplit(' ').next() == Some(v))
    })
}

fn assert_error(v: &Value, code: &str) {
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
}

#[tokio::test]
async fn the_api_launches_attaches_and_keeps_terminals_apart() {
    if !e2e() {
        return;
    }
    let s = serve("api-main");
    let api = Api { http: reqwest::Client::new(), s: &s };

    // Authentication.
    let (st, v) = api.call("GET", "/v1/packages", None, None).await;
    assert_eq!(st, 401);
    assert_error(&v, "unauthorized");
    let (st, _) = api.call("GET", "/v1/packages", Some("not-a-token"), None).await;
    assert_eq!(st, 401);
    let (st, v) = api.call("GET", "/v1/packages", Some(&s.a), None).await;
    assert_eq!(st, 200);
    assert!(v.as_array().unwrap().iter().any(|p| p["name"] == "python3"), "{v}");

    // Bad input.
    let (st, v) = api.call("POST", "/v1/sessions", Some(&s.a), Some(json!({"package": "pyhton3"}))).await;
    assert_eq!(st, 404);
    assert!(v["error"]["message"].as_str().unwrap().contains("python3"), "{v}");
    let (st, v) = api.call("POST", "/v1/sessions", Some(&s.a), Some(json!({"package": "python3", "bogus": 1}))).await;
    assert_eq!(st, 400);
    assert_error(&v, "bad_request");
    let (st, v) =
        api.call("POST", "/v1/sessions", Some(&s.a), Some(json!({"package": "python3", "context": {"rows": 0}}))).await;
    assert_eq!(st, 400, "{v}");
    let big = "x".repeat(100 << 10);
    let (st, v) = api.call("POST", "/v1/sessions", Some(&s.a), Some(json!({"package": big}))).await;
    assert_eq!(st, 413);
    assert_error(&v, "payload_too_large");

    // Launch, attach, type, read the answer.
    let (st, created) = api
        .call(
            "POST",
            "/v1/sessions",
            Some(&s.a),
            Some(json!({"package": "python3", "context": {"rows": 30, "cols": 100}})),
        )
        .await;
    assert_eq!(st, 201, "{created}");
    let id = created["session"]["id"].as_str().unwrap().to_string();
    let attach = created["attach_token"].as_str().unwrap().to_string();
    let mut w = ws(&s, &id, &attach).await.unwrap();
    read_until(&mut w, ">>> ").await;
    type_line(&mut w, "x = 6*7; print('answer', x)\r").await;
    read_until(&mut w, "answer 42").await;

    // Another terminal can neither see, attach to, nor kill it.
    let (st, v) = api.call("GET", "/v1/sessions", Some(&s.b), None).await;
    assert_eq!((st, v.as_array().unwrap().len()), (200, 0));
    for (m, p) in [
        ("GET", format!("/v1/sessions/{id}")),
        ("DELETE", format!("/v1/sessions/{id}")),
        ("POST", format!("/v1/sessions/{id}/pause")),
    ] {
        let (st, v) = api.call(m, &p, Some(&s.b), None).await;
        assert_eq!(st, 404, "{m} {p}: {v}");
    }
    assert!(ws(&s, &id, "wrong-token").await.is_err());

    // A terminal that vanishes mid-stream: the session lives on, re-attachable.
    drop(w);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (st, v) = api.call("GET", &format!("/v1/sessions/{id}"), Some(&s.a), None).await;
    assert_eq!(st, 200);
    assert_eq!(v["attached"], false, "{v}");
    let mut w = ws(&s, &id, &attach).await.unwrap();
    read_until(&mut w, "answer 42").await; // the screen is repainted
    type_line(&mut w, "print('still', x)\r").await;
    read_until(&mut w, "still 42").await;

    // Pause and resume.
    let (st, v) = api.call("POST", &format!("/v1/sessions/{id}/pause"), Some(&s.a), None).await;
    assert_eq!((st, v["state"].as_str()), (200, Some("paused")), "{v}");
    let (st, v) = api.call("POST", &format!("/v1/sessions/{id}/resume"), Some(&s.a), None).await;
    assert_eq!((st, v["state"].as_str()), (200, Some("running")), "{v}");
    type_line(&mut w, "print('resumed', x)\r").await;
    read_until(&mut w, "resumed 42").await;
    let (st, v) =
        api.call("PUT", &format!("/v1/sessions/{id}/timeout"), Some(&s.a), Some(json!({"seconds": 99999999}))).await;
    assert_eq!(st, 400, "{v}");

    // The program's exit ends the session and reaches the terminal.
    type_line(&mut w, "exit(3)\r").await;
    let end = read_until(&mut w, "\"exit\"").await;
    assert!(end.contains("\"status\":3"), "{end}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (st, _) = api.call("GET", &format!("/v1/sessions/{id}"), Some(&s.a), None).await;
    assert_eq!(st, 404);

    // Limits: at most 3 sessions per terminal here.
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (st, v) = api.call("POST", "/v1/sessions", Some(&s.b), Some(json!({"package": "bc"}))).await;
        assert_eq!(st, 201, "{v}");
        ids.push(v["session"]["id"].as_str().unwrap().to_string());
    }
    let (st, v) = api.call("POST", "/v1/sessions", Some(&s.b), Some(json!({"package": "bc"}))).await;
    assert_eq!(st, 429);
    assert_error(&v, "too_many_sessions");
    assert!(v["error"]["message"].as_str().unwrap().contains('3'), "{v}");
    for id in &ids {
        let (st, _) = api.call("DELETE", &format!("/v1/sessions/{id}"), Some(&s.b), None).await;
        assert_eq!(st, 204);
    }

    // This server and its load.
    let (st, servers) = api.call("GET", "/v1/servers", Some(&s.a), None).await;
    assert_eq!(st, 200);
    let me = &servers[0];
    assert!(me["cpus"].as_u64().unwrap() >= 1 && me["memory_total_mib"].as_u64().unwrap() > 0, "{servers}");
    assert!(me["images"].as_u64().unwrap() >= 3, "{servers}");

    // The OpenAPI document and the metrics.
    let (st, doc) = api.call("GET", "/openapi.json", None, None).await;
    assert_eq!(st, 200);
    for p in ["/v1/sessions", "/v1/sessions/{id}/attach", "/v1/images", "/v1/packages", "/v1/servers"] {
        assert!(doc["paths"][p].is_object(), "{p} missing from the OpenAPI document");
    }
    let metrics = api.http.get(format!("{}/metrics", s.base)).send().await.unwrap().text().await.unwrap();
    let series = |name: &str, labels: &[&str]| has_series(&metrics, name, labels, None);
    assert!(series("strata_launch_seconds_count", &["package=\"python3\"", "path=\"launch_image\""]), "{metrics}");
    assert!(series("strata_sessions", &["state=\"running\""]), "{metrics}");
    assert!(series("strata_sessions", &["state=\"paused\""]), "{metrics}");
    assert!(series("strata_image_cache_misses", &["kind=\"launch\""]), "{metrics}");
    assert!(!metrics.contains(&s.a), "a token leaked into the metrics");
}

#[tokio::test]
async fn an_idle_session_is_paused_to_an_image_and_survives_a_restart_of_strata() {
    if !e2e() {
        return;
    }
    let s = serve("api-pause");
    let (a, b) = (s.a.clone(), s.b.clone());
    let api = Api { http: reqwest::Client::new(), s: &s };
    let (st, created) =
        api.call("POST", "/v1/sessions", Some(&a), Some(json!({"package": "python3", "idle_timeout_s": 1}))).await;
    assert_eq!(st, 201, "{created}");
    let id = created["session"]["id"].as_str().unwrap().to_string();
    let attach = created["attach_token"].as_str().unwrap().to_string();
    let mut w = ws(&s, &id, &attach).await.unwrap();
    read_until(&mut w, ">>> ").await;
    type_line(&mut w, "x = 41; n = open('/root/note', 'w').write('kept on disk'); print('set', x)\r").await;
    read_until(&mut w, "set 41").await;
    // The terminal goes away; a second later the idle time-out pauses the
    // session to an image and its VM stops.
    drop(w);
    let mut state = Value::Null;
    for _ in 0..120 {
        state = api.call("GET", &format!("/v1/sessions/{id}"), Some(&a), None).await.1;
        if state["state"] == "paused" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(state["state"], "paused", "{state}");
    assert_eq!(qemu_of(&id), 0, "a paused session has no VM");
    drop(api);

    // strata restarts: the paused session is listed again, to its terminal only.
    drop(s);
    let s = serve("api-pause-again");
    let api = Api { http: reqwest::Client::new(), s: &s };
    let (st, list) = api.call("GET", "/v1/sessions", Some(&a), None).await;
    assert_eq!(st, 200);
    let mine: Vec<&Value> = list.as_array().unwrap().iter().filter(|v| v["id"] == id.as_str()).collect();
    assert_eq!(mine.len(), 1, "{list}");
    assert_eq!(mine[0]["state"], "paused", "{list}");
    let (st, _) = api.call("GET", &format!("/v1/sessions/{id}"), Some(&b), None).await;
    assert_eq!(st, 404, "another terminal sees the paused session");
    assert!(ws(&s, &id, "wrong-token").await.is_err());

    // Attaching resumes it: the screen, the program's state and the file are
    // there; the attach's request id reaches the guest's log.
    let url = format!("{}/v1/sessions/{id}/attach?token={attach}&rows=30&cols=100", s.base.replace("http", "ws"));
    let mut rq = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url).unwrap();
    rq.headers_mut().insert("x-request-id", "strata-test-resume-1".parse().unwrap());
    let (mut w, _) = tokio_tungstenite::connect_async(rq).await.unwrap();
    read_until(&mut w, "set 41").await;
    type_line(&mut w, "print('again', x + 1, open('/root/note').read())\r").await;
    read_until(&mut w, "again 42 kept on disk").await;
    let (_, v) = api.call("GET", &format!("/v1/sessions/{id}"), Some(&a), None).await;
    assert_eq!((v["state"].as_str(), v["attached"].as_bool()), (Some("running"), Some(true)), "{v}");
    assert_eq!(qemu_of(&id), 1);
    let console = env().state.join("sessions").join(&id).join("console.log");
    assert!(
        wait_until(Duration::from_secs(20), || std::fs::read_to_string(&console)
            .is_ok_and(|c| c.contains("attach for request strata-test-resume-1"))),
        "the attach's request id is not in the guest's log {}",
        console.display()
    );

    // Paused again by hand, then killed while paused: nothing is left.
    let (st, v) = api.call("POST", &format!("/v1/sessions/{id}/pause"), Some(&a), None).await;
    assert_eq!((st, v["state"].as_str()), (200, Some("paused")), "{v}");
    let (st, v) = api.call("GET", &format!("/v1/sessions/{id}/logs"), Some(&a), None).await;
    assert_eq!(st, 409, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("paused"), "{v}");
    let (st, _) = api.call("DELETE", &format!("/v1/sessions/{id}"), Some(&a), None).await;
    assert_eq!(st, 204);
    let (st, _) = api.call("GET", &format!("/v1/sessions/{id}"), Some(&a), None).await;
    assert_eq!(st, 404);
    assert!(!env().state.join(format!("paused/{id}.json")).exists());
    assert_eq!(qemu_of(&id), 0);
}

/// Arbitrary JSON, biased towards the API's own field names and nasty strings.
fn json_value() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("package".to_string()),
        Just("context".to_string()),
        Just("rows".to_string()),
        Just("cols".to_string()),
        Just("term".to_string()),
        Just("timezone".to_string()),
        Just("idle_timeout_s".to_string()),
        Just("seconds".to_string()),
        Just("env".to_string()),
        Just("ports".to_string()),
        Just("shares".to_string()),
        Just("home".to_string()),
        Just("outbound".to_string()),
        Just("screen".to_string()),
        Just("keyboard".to_string()),
        "[a-z_]{1,8}",
    ];
    let text = prop_oneof![
        Just("python3".to_string()),
        Just("../../etc".to_string()),
        Just("\u{0}".to_string()),
        Just("htop; rm -rf /".to_string()),
        Just("/etc".to_string()),
        Just("99999x1".to_string()),
        any::<String>(),
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        text.prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Query strings: the API's parameter names with arbitrary values.
fn query() -> impl Strategy<Value = String> {
    let name = prop_oneof![Just("path"), Just("token"), Just("rows"), Just("cols"), Just("term"), Just("x")];
    prop::collection::vec((name, any::<String>()), 0..4).prop_map(|pairs| {
        pairs
            .into_iter()
            .map(|(k, v)| format!("{k}={}", v.bytes().map(|b| format!("%{b:02X}")).collect::<String>()))
            .collect::<Vec<_>>()
            .join("&")
    })
}

#[test]
fn arbitrary_bodies_and_query_parameters_get_4xx_with_the_error_body_never_5xx() {
    if !e2e() {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let s = serve("api-fuzz");
    let api = Api { http: reqwest::Client::new(), s: &s };
    let routes = [
        ("POST", "/v1/sessions"),
        ("PUT", "/v1/sessions/000000000000/timeout"),
        ("POST", "/v1/images"),
        ("DELETE", "/v1/images/zz"),
    ];
    let config = ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() };
    // A fixed seed: every run (and CI) tries the same cases, and a failure
    // reproduces. Set PROPTEST_SEED_RANDOM=1 to explore new ones.
    let runner_for = |config: ProptestConfig| {
        if std::env::var_os("PROPTEST_SEED_RANDOM").is_some() {
            proptest::test_runner::TestRunner::new(config)
        } else {
            let rng = proptest::test_runner::TestRng::deterministic_rng(proptest::test_runner::RngAlgorithm::ChaCha);
            proptest::test_runner::TestRunner::new_with_rng(config, rng)
        }
    };
    let mut runner = runner_for(config.clone());
    runner
        .run(&(0..routes.len(), json_value()), |(r, mut body)| {
            let (m, p) = routes[r];
            // Keep launches out of it: a valid package name would start a VM.
            if let Some(o) = body.as_object_mut() {
                if o.get("package").is_some_and(|v| v.is_string()) {
                    o.insert("package".into(), json!("Not A Package"));
                }
            }
            let (st, v) = rt.block_on(api.call(m, p, Some(&s.a), Some(body.clone())));
            prop_assert!((400..500).contains(&st), "{} {} {} -> {} {}", m, p, body, st, v);
            prop_assert!(v["error"]["code"].is_string(), "{} {} {} -> {} {}", m, p, body, st, v);
            Ok(())
        })
        .unwrap();
    let mut runner = runner_for(config);
    let paths =
        ["/v1/sessions/000000000000/files", "/v1/sessions/000000000000/clipboard", "/v1/sessions", "/v1/images"];
    runner
        .run(&(0..paths.len(), query()), |(p, q)| {
            let path = format!("{}?{q}", paths[p]);
            let (st, v) = rt.block_on(api.call("GET", &path, Some(&s.a), None));
            prop_assert!(st < 500, "GET {} -> {} {}", path, st, v);
            if st >= 400 {
                prop_assert!(v["error"]["code"].is_string(), "GET {} -> {} {}", path, st, v);
            }
            Ok(())
        })
        .unwrap();
    let (st, v) = rt.block_on(api.call("GET", "/v1/nothing/here", Some(&s.a), None));
    assert_eq!(st, 404);
    assert_error(&v, "not_found");
    // Pruning takes one switch, and refuses anything else before touching the store.
    for q in ["dry_run=perhaps", "dry_run=true&all=1"] {
        let (st, v) = rt.block_on(api.call("POST", &format!("/v1/images/prune?{q}"), Some(&s.a), None));
        assert_eq!(st, 400, "{q}: {v}");
        assert_error(&v, "bad_request");
    }
    let (st, v) = rt.block_on(api.call("POST", "/v1/images/prune?dry_run=true", Some(&s.a), None));
    assert_eq!(st, 200, "{v}");
    assert!(v["images"].is_array() && v["removed_blobs"] == 0, "{v}");
}

#[tokio::test]
async fn launches_come_from_the_warm_pool_when_one_waits() {
    if !e2e() {
        return;
    }
    let s = serve_with("api-pool", &["--pool", "bc=1"]);
    let api = Api { http: reqwest::Client::new(), s: &s };
    let metrics = || async { api.http.get(format!("{}/metrics", s.base)).send().await.unwrap().text().await.unwrap() };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    let pooled = |m: &str| has_series(m, "strata_pool_sessions", &["package=\"bc\""], Some("1"));
    while !pooled(&metrics().await) {
        assert!(tokio::time::Instant::now() < deadline, "the pool never filled: {}", metrics().await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (st, created) = api
        .call("POST", "/v1/sessions", Some(&s.a), Some(json!({"package": "bc", "context": {"rows": 20, "cols": 60}})))
        .await;
    assert_eq!(st, 201, "{created}");
    let m = metrics().await;
    assert!(has_series(&m, "strata_launch_seconds_count", &["package=\"bc\"", "path=\"pool\""], Some("1")), "{m}");
    let id = created["session"]["id"].as_str().unwrap();
    let mut w = ws(&s, id, created["attach_token"].as_str().unwrap()).await.unwrap();
    type_line(&mut w, "6*7\r").await;
    read_until(&mut w, "42").await;
    // The pool refills itself in the background.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while !pooled(&metrics().await) {
        assert!(tokio::time::Instant::now() < deadline, "the pool did not refill");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // This machine's CLI takes its session from the same pool.
    let waiting = || -> Vec<String> {
        let out = strata(&["ps", "--json"]).output().unwrap();
        let all: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        all.iter()
            .filter(|r| r["pooled"] == true && r["package"] == "bc")
            .map(|r| r["id"].as_str().unwrap().into())
            .collect()
    };
    let before = waiting();
    assert_eq!(before.len(), 1, "{before:?}");
    let out = strata(&["run", "-d", "bc"]).output().unwrap();
    assert_eq!(text(&out.stdout).trim(), before[0], "not the pool's session: {}", text(&out.stderr));
    let out = strata_with_input(&["attach", &before[0]], "6*7\n");
    assert!(text(&out.stdout).contains("42"), "{}{}", text(&out.stdout), text(&out.stderr));
}

#[test]
fn the_cli_talks_to_a_server_by_address() {
    if !e2e() {
        return;
    }
    let s = serve("api-cli");
    let remote = |args: &[&str]| {
        let mut c = strata(args);
        c.env("STRATA_ADDR", &s.base).env("STRATA_TOKEN", &s.a);
        c
    };
    let run = {
        use std::io::Write;
        let mut c = remote(&["run", "python3"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
        c.stdin.take().unwrap().write_all(b"print(6*7)\n").unwrap();
        c.wait_with_output().unwrap()
    };
    assert!(run.status.success());
    assert!(text(&run.stdout).lines().any(|l| l.trim() == "42"), "{}", text(&run.stdout));
    let id = text(&remote(&["run", "-d", "bc"]).output().unwrap().stdout).trim().to_string();
    assert_eq!(id.len(), 12, "{id}");
    let ps = |c: &dyn Fn(&[&str]) -> std::process::Command| -> Value {
        serde_json::from_slice(&c(&["ps", "--json"]).output().unwrap().stdout).unwrap()
    };
    assert!(ps(&remote).as_array().unwrap().iter().any(|x| x["id"] == id.as_str()));
    let py = text(&remote(&["run", "-d", "python3"]).output().unwrap().stdout).trim().to_string();
    let logs = remote(&["logs", &py]).output().unwrap();
    assert!(text(&logs.stdout).contains("Python 3"), "{:?} {}", text(&logs.stdout), text(&logs.stderr));
    // Commands through the server: output and errors apart, the status,
    // input to its end without a final newline, env, cwd and user.
    let script =
        "import sys, os; print(6*7, os.environ['K'], os.getcwd()); print('oops', file=sys.stderr); sys.exit(3)";
    let out = remote(&["exec", "-e", "K=v", "-w", "/tmp", &py, "python3", "-c", script]).output().unwrap();
    assert_eq!((out.status.code(), text(&out.stdout).as_str()), (Some(3), "42 v /tmp\n"), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "oops\n");
    let piped = |args: &[&str], input: &[u8]| {
        use std::io::Write;
        let mut c = remote(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        c.stdin.take().unwrap().write_all(input).unwrap();
        c.wait_with_output().unwrap()
    };
    let out = piped(&["exec", "-i", "-u", "nobody", &py, "sh", "-c", "whoami; wc -c"], b"abc");
    assert_eq!(text(&out.stdout), "nobody\n3\n", "{}", text(&out.stderr));
    let out = remote(&["exec", &py, "no-such-command"]).output().unwrap();
    assert_eq!(out.status.code(), Some(127), "{}", text(&out.stderr));
    let addr = ["--addr", &s.base, "--token", &s.a];
    let on_tty = [&addr[..], &["exec", "-t", &py, "sh", "-c", "stty size; read x; echo got-$x; exit 5"]].concat();
    let out = strata_on_a_terminal(&on_tty, "hi\n");
    let shown = text(&out.stdout);
    assert_eq!(out.status.code(), Some(5), "{shown}{}", text(&out.stderr));
    assert!(shown.contains("24 80") && shown.contains("got-hi"), "{shown}");
    let bad = remote(&["exec", "-w", "relative", &py, "true"]).output().unwrap();
    assert!(text(&bad.stderr).contains("not an absolute path"), "{}", text(&bad.stderr));
    // A run with a command, and a piped run of the package's own program,
    // as `docker run -i` would: only the answer, the session gone after.
    let out = remote(&["run", "bc", "--", "sh", "-c", "echo $((6*7)); exit 4"]).output().unwrap();
    assert_eq!((out.status.code(), text(&out.stdout).as_str()), (Some(4), "42\n"), "{}", text(&out.stderr));
    let out = piped(&["run", "bc"], b"2+3\n");
    assert_eq!((out.status.code(), text(&out.stdout).as_str()), (Some(0), "5\n"), "{}", text(&out.stderr));
    assert!(remote(&["kill", &py]).status().unwrap().success());
    assert!(remote(&["pause", &id]).status().unwrap().success());
    assert!(ps(&remote).as_array().unwrap().iter().any(|x| x["id"] == id.as_str() && x["state"] == "paused"));
    assert!(remote(&["resume", &id]).status().unwrap().success());
    assert!(remote(&["kill", &id]).status().unwrap().success());
    assert!(!ps(&remote).as_array().unwrap().iter().any(|x| x["id"] == id.as_str()));
    let other = remote(&["kill", &id]).output().unwrap();
    assert!(!other.status.success() && text(&other.stderr).contains("no session"), "{}", text(&other.stderr));
    let bad = strata(&["ps"]).env("STRATA_ADDR", &s.base).env("STRATA_TOKEN", "nope").output().unwrap();
    assert!(text(&bad.stderr).contains("valid API token"), "{}", text(&bad.stderr));
}

/// An operator's token (`serve --operator`) lists every session of the
/// server and of its store, the CLI's too, and stops, pauses and resumes
/// any; what runs inside stays each terminal's own.
#[tokio::test]
async fn an_operator_sees_and_manages_every_session_of_the_server_and_its_store() {
    if !e2e() {
        return;
    }
    let op = token("opview-op");
    let s = serve_with("opview", &["--operator", "opview-op"]);
    let api = Api { http: reqwest::Client::new(), s: &s };
    let launch = |token: String| {
        let api = &api;
        async move {
            let (st, v) = api.call("POST", "/v1/sessions", Some(&token), Some(json!({"package": "bc"}))).await;
            assert_eq!(st, 201, "{v}");
            v["session"]["id"].as_str().unwrap().to_string()
        }
    };
    let (of_a, of_b) = (launch(s.a.clone()).await, launch(s.b.clone()).await);
    // python3: bc's pool, in the test beside, is not this test's.
    let out = strata(&["run", "-d", "python3"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let of_cli = text(&out.stdout).trim().to_string();
    let ids = |v: &Value| -> Vec<String> {
        v.as_array().unwrap().iter().map(|x| x["id"].as_str().unwrap().to_string()).collect()
    };
    // A terminal sees its own; the operator sees all three, each with its terminal.
    let (_, of_terminal_a) = api.call("GET", "/v1/sessions", Some(&s.a), None).await;
    assert!(ids(&of_terminal_a).contains(&of_a) && !ids(&of_terminal_a).contains(&of_b));
    assert!(!ids(&of_terminal_a).contains(&of_cli));
    let (_, all) = api.call("GET", "/v1/sessions", Some(&op), None).await;
    for id in [&of_a, &of_b, &of_cli] {
        assert!(ids(&all).contains(id), "{id} missing from {all}");
    }
    let terminal_of = |id: &str| all.as_array().unwrap().iter().find(|x| x["id"] == id).unwrap()["terminal"].clone();
    assert_eq!((terminal_of(&of_a), terminal_of(&of_cli)), (json!("opview-a"), Value::Null));
    // `strata ps` through the server lists the same, with the local columns.
    let ps = strata(&["ps"]).env("STRATA_ADDR", &s.base).env("STRATA_TOKEN", &op).output().unwrap();
    let listed = text(&ps.stdout);
    assert!(listed.starts_with("SESSION "), "{listed}{}", text(&ps.stderr));
    assert!([&of_a, &of_b, &of_cli].iter().all(|id| listed.contains(id.as_str())), "{listed}");
    // It manages them, but reads nothing of theirs.
    assert_eq!(api.call("GET", &format!("/v1/sessions/{of_b}"), Some(&op), None).await.0, 200);
    assert_eq!(api.call("GET", &format!("/v1/sessions/{of_b}/logs"), Some(&op), None).await.0, 404);
    let (st, v) = api.call("POST", &format!("/v1/sessions/{of_b}/pause"), Some(&op), None).await;
    assert_eq!(
        (st, v["state"].as_str(), v["reason"].as_str()),
        (200, Some("paused"), Some("paused by operator opview-op")),
        "{v}"
    );
    let (st, v) = api.call("POST", &format!("/v1/sessions/{of_b}/resume"), Some(&op), None).await;
    assert_eq!((st, v["state"].as_str()), (200, Some("running")), "{v}");
    // Terminals still cannot touch each other's sessions.
    assert_eq!(api.call("DELETE", &format!("/v1/sessions/{of_b}"), Some(&s.a), None).await.0, 404);
    for id in [&of_a, &of_b, &of_cli] {
        assert_eq!(api.call("DELETE", &format!("/v1/sessions/{id}"), Some(&op), None).await.0, 204, "{id}");
    }
    // Gone, not kept as ended.
    let (_, left) = api.call("GET", "/v1/sessions", Some(&op), None).await;
    assert!([&of_a, &of_b, &of_cli].iter().all(|id| !ids(&left).contains(id)), "{left}");
    let bad = strata(&["serve", "--operator", "not a name"]).output().unwrap();
    assert!(text(&bad.stderr).contains("not a terminal name"), "{}", text(&bad.stderr));
}

#[test]
fn the_cli_talks_https_to_a_server_with_a_certificate_it_trusts() {
    if !e2e() {
        return;
    }
    let s = serve_with("api-tls", &["--tls"]);
    assert!(s.base.starts_with("https://"), "{}", s.base);
    let cert = env().state.join("tls/cert.pem");
    let remote = |args: &[&str], ca: Option<&std::path::Path>| {
        let mut c = strata(args);
        c.env("STRATA_ADDR", &s.base).env("STRATA_TOKEN", &s.a).env_remove("STRATA_CA_CERT");
        if let Some(ca) = ca {
            c.env("STRATA_CA_CERT", ca);
        }
        c
    };
    // Trusting the server's certificate: the API and the terminal's WebSocket over TLS.
    let ps = remote(&["ps", "--json"], Some(&cert)).output().unwrap();
    assert!(ps.status.success(), "{}", text(&ps.stderr));
    let run = {
        use std::io::Write;
        let mut c =
            remote(&["run", "python3"], Some(&cert)).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
        c.stdin.take().unwrap().write_all(b"print(6*7)\n").unwrap();
        c.wait_with_output().unwrap()
    };
    assert!(run.status.success());
    assert!(text(&run.stdout).lines().any(|l| l.trim() == "42"), "{}", text(&run.stdout));
    // Not trusting it: refused, with what to do.
    let untrusted = remote(&["ps"], None).output().unwrap();
    assert!(!untrusted.status.success());
    assert!(text(&untrusted.stderr).contains("--ca-cert"), "{}", text(&untrusted.stderr));
    // Plain HTTP to it gets nowhere; a certificate file that is not one is refused.
    let plain = strata(&["ps"]).env("STRATA_ADDR", s.base.replace("https", "http")).env("STRATA_TOKEN", &s.a).output();
    assert!(!plain.unwrap().status.success());
    let junk = remote(&["ps"], Some(std::path::Path::new("/etc/hostname"))).output().unwrap();
    assert!(text(&junk.stderr).contains("no PEM certificate"), "{}", text(&junk.stderr));
}

#[tokio::test]
async fn the_api_forwards_ports_shares_folders_and_copies_files() {
    if !e2e() {
        return;
    }
    let shared = std::path::PathBuf::from(format!("/tmp/strata-api-share-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&shared);
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::write(shared.join("index.html"), "served from the host's folder").unwrap();
    let root = shared.display().to_string();
    let short = strata(&["token", "create", "ctx-short", "--expires-in", "1s"]).output().unwrap();
    assert!(short.status.success(), "{}", text(&short.stderr));
    let short = text(&short.stdout).trim().to_string();
    let s = serve_with("ctx", &["--share-root", &root]);
    let api = Api { http: reqwest::Client::new(), s: &s };
    // An expired token is refused, and told apart from an unknown one.
    std::thread::sleep(Duration::from_millis(1100));
    let (status, body) = api.call("GET", "/v1/sessions", Some(&short), None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("token_expired")), "{body}");
    let (status, body) = api.call("GET", "/v1/sessions", Some("0123abcd"), None).await;
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("unauthorized")), "{body}");
    // A folder outside the server's share roots is refused, and nothing runs.
    let (status, body) = api
        .call(
            "POST",
            "/v1/sessions",
            Some(&s.a),
            Some(json!({"package": "lighttpd", "context": {"shares": [{"host": "/srv", "guest": "/var/www/html"}]}})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("outside the folders"), "{body}");
    // lighttpd serves the shared folder through the forwarded port.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let ctx = json!({"ports": [{"host": port, "guest": 80}], "shares": [{"host": root, "guest": "/var/www/html", "readonly": true}]});
    // With a request id: it comes back, and reaches the guest agent's log.
    let resp = api
        .http
        .post(format!("{}/v1/sessions", s.base))
        .bearer_auth(&s.a)
        .header("x-request-id", "strata-test-req-1")
        .json(&json!({"package": "lighttpd", "context": ctx}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    assert_eq!(resp.headers()["x-request-id"], "strata-test-req-1");
    let body: Value = resp.json().await.unwrap();
    let id = body["session"]["id"].as_str().unwrap().to_string();
    let console = env().state.join("sessions").join(&id).join("console.log");
    assert!(
        wait_until(Duration::from_secs(20), || std::fs::read_to_string(&console)
            .is_ok_and(|c| c.contains("attach for request strata-test-req-1"))),
        "the request id is not in the guest's log {}",
        console.display()
    );
    // Once seen closed before the answer on a busy CI host (QEMU took the
    // connection before the guest's side was up): tried again for a few
    // seconds, and how long it took is said.
    let asked = std::time::Instant::now();
    let mut page = Err(String::new());
    while asked.elapsed() < Duration::from_secs(10) {
        page = match reqwest::get(format!("http://127.0.0.1:{port}/index.html")).await {
            Ok(r) => r.text().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if page.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if asked.elapsed() > Duration::from_secs(1) {
        eprintln!("the forwarded port answered after {:?}", asked.elapsed());
    }
    assert_eq!(page.as_deref(), Ok("served from the host's folder"));
    // The guest's clock jumping hours ahead (as it does once when a session
    // is restored from an image saved long ago) neither stops nor restarts
    // the server: lighttpd restarted on a jump over 30 minutes, and its
    // restart failed.
    let jump =
        strata(&["exec", &id, "sh", "-c", "pidof lighttpd; date -s '+2 hours' > /dev/null; sleep 3; pidof lighttpd"])
            .env("STRATA_ADDR", &s.base)
            .env("STRATA_TOKEN", &s.a)
            .output()
            .unwrap();
    let pids: Vec<&str> = std::str::from_utf8(&jump.stdout).unwrap().lines().collect();
    assert!(jump.status.success() && pids.len() == 2 && pids[0] == pids[1], "{pids:?} {}", text(&jump.stderr));
    let again = reqwest::get(format!("http://127.0.0.1:{port}/index.html")).await.unwrap().text().await.unwrap();
    assert_eq!(again, "served from the host's folder");
    // Files in and out of the session.
    let files = format!("{}/v1/sessions/{id}/files?path=/tmp/up.txt", s.base);
    let put = api.http.put(&files).bearer_auth(&s.a).body("uploaded").send().await.unwrap();
    assert_eq!(put.status().as_u16(), 204);
    let got = api.http.get(&files).bearer_auth(&s.a).send().await.unwrap();
    assert_eq!(got.status().as_u16(), 200);
    assert_eq!(got.text().await.unwrap(), "uploaded");
    // Another terminal cannot reach them.
    let other = api.http.get(&files).bearer_auth(&s.b).send().await.unwrap();
    assert_eq!(other.status().as_u16(), 404);
    let missing = api
        .http
        .get(format!("{}/v1/sessions/{id}/files?path=/no/such", s.base))
        .bearer_auth(&s.a)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status().as_u16(), 409);
    let (status, _) = api.call("DELETE", &format!("/v1/sessions/{id}"), Some(&s.a), None).await;
    assert_eq!(status, 204);
    let _ = std::fs::remove_dir_all(&shared);
}

#[tokio::test]
async fn a_terminal_beyond_its_memory_quota_is_refused_naming_quota_and_use_and_pausing_frees_it() {
    if !e2e() {
        return;
    }
    // bc's guest has 512 MiB: two fit in a quota of 1024 MiB.
    let s = serve_with("memquota", &["--max-memory-per-terminal-mib", "1024"]);
    let api = Api { http: reqwest::Client::new(), s: &s };
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (st, v) = api.call("POST", "/v1/sessions", Some(&s.a), Some(json!({"package": "bc"}))).await;
        assert_eq!(st, 201, "{v}");
        ids.push(v["session"]["id"].as_str().unwrap().to_string());
    }
    let (st, v) = api.call("POST", "/v1/sessions", Some(&s.a), Some(json!({"package": "bc"}))).await;
    assert_eq!(st, 429, "{v}");
    assert_error(&v, "memory_quota");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("1024 MiB of guest memory") && msg.contains("quota of 1024 MiB"), "{msg}");
    // Another terminal is not held by the first one's quota.
    let (st, v) = api.call("POST", "/v1/sessions", Some(&s.b), Some(json!({"package": "bc"}))).await;
    assert_eq!(st, 201, "{v}");
    let other = v["session"]["id"].as_str().unwrap().to_string();
    // A paused session holds no memory: a new one fits, and the paused one
    // cannot come back while the quota is full.
    let (st, v) = api.call("POST", &format!("/v1/sessions/{}/pause", ids[0]), Some(&s.a), None).await;
    assert_eq!((st, v["state"].as_str()), (200, Some("paused")), "{v}");
    let (st, v) = api.call("POST", "/v1/sessions", Some(&s.a), Some(json!({"package": "bc"}))).await;
    assert_eq!(st, 201, "{v}");
    ids.push(v["session"]["id"].as_str().unwrap().to_string());
    let (st, v) = api.call("POST", &format!("/v1/sessions/{}/resume", ids[0]), Some(&s.a), None).await;
    assert_eq!(st, 429, "{v}");
    assert_error(&v, "memory_quota");
    for (id, token) in ids.iter().map(|i| (i, &s.a)).chain([(&other, &s.b)]) {
        let (st, _) = api.call("DELETE", &format!("/v1/sessions/{id}"), Some(token), None).await;
        assert_eq!(st, 204);
    }
}
