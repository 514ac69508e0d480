//! `strata bench e2b`: what E2B's SDK costs over strata's own API, in one
//! run. A `strata serve` with two pools (the package's, and its sessions
//! for E2B's API) is started on this store; launches
//! arrive at a steady rate through the native API (`POST /v1/sessions`,
//! the answer timed), then through E2B's Python SDK (`Sandbox.create()`
//! then `commands.run("echo hi")`, timed to the answer). Each session is
//! killed once measured.

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use strata_engine::bench::percentile;

#[derive(Serialize)]
pub struct Report {
    pub package: String,
    pub rate: f64,
    pub seconds: u64,
    pub pool: usize,
    pub native_p50_ms: f64,
    pub native_p99_ms: f64,
    pub native_failed: usize,
    pub e2b_p50_ms: f64,
    pub e2b_p99_ms: f64,
    pub e2b_failed: usize,
    /// Its parts: `Sandbox.create()` alone, and `commands.run` alone.
    pub create_p50_ms: f64,
    pub create_p99_ms: f64,
    pub run_p50_ms: f64,
    pub run_p99_ms: f64,
    /// The fewest sessions each pool held while its launches came (a pool
    /// that ran dry makes launches restore while someone waits).
    pub native_pool_low: usize,
    pub e2b_pool_low: usize,
    /// E2B's p50 over the native p50.
    pub ratio_p50: f64,
}

/// The SDK's side: `Sandbox.create()` and `commands.run("echo hi")` at
/// `rate` per second for `seconds`, each timed; one untimed round first.
const DRIVER: &str = r#"
import json, sys, threading, time
from e2b import Sandbox
pkg, rate, seconds = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
lat, failed, lock = [], [0], threading.Lock()
def one(timed):
    try:
        t = time.monotonic()
        s = Sandbox.create(template=pkg, timeout=120)
        created = time.monotonic()
        r = s.commands.run('echo hi')
        done = time.monotonic()
        if r.stdout != 'hi\n':
            raise Exception('answer %r' % r.stdout)
        if timed:
            with lock: lat.append([(done - t) * 1000, (created - t) * 1000, (done - created) * 1000])
        s.kill()
    except Exception as e:
        with lock: failed[0] += 1
        print(repr(e), file=sys.stderr)
one(False)
threads, start = [], time.monotonic()
for i in range(int(rate * seconds)):
    d = start + i / rate - time.monotonic()
    if d > 0: time.sleep(d)
    th = threading.Thread(target=one, args=(True,)); th.start(); threads.append(th)
for th in threads: th.join(timeout=300)
print(json.dumps({'latencies_ms': lat, 'failed': failed[0]}))
"#;

/// A `strata serve` child, stopped when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: signalling our own child with SIGTERM.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn strata() -> anyhow::Result<Command> {
    Ok(Command::new(std::env::current_exe().context("where is this strata binary")?))
}

pub async fn run(
    package: &str,
    rate: f64,
    seconds: u64,
    pool: usize,
    python: &str,
    server_log: Option<&std::path::Path>,
) -> anyhow::Result<Report> {
    let sdk = Command::new(python).args(["-c", "import e2b"]).output();
    if !sdk.as_ref().is_ok_and(|o| o.status.success()) {
        anyhow::bail!(
            "{python} cannot import E2B's SDK: give --python a venv's python with it \
             (`source scripts/e2b-sdk.sh` makes one and sets STRATA_E2B_PYTHON)"
        );
    }
    let out = strata()?.args(["token", "create", &format!("bench-e2b-{}", std::process::id())]).output()?;
    anyhow::ensure!(out.status.success(), "could not make a token: {}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // A pool each way: the package's, and its sessions made for E2B's API.
    let (native_pool, e2b_pool) = (format!("{package}={pool}-{pool}"), format!("e2b:{package}={pool}-{pool}"));
    let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--on-stop", "stop", "--max-sessions-per-terminal", "256"];
    args.extend(["--max-memory-per-terminal-mib", "1000000"]);
    if pool > 0 {
        args.extend(["--pool", &native_pool, "--pool", &e2b_pool]);
    }
    let log = match server_log {
        Some(p) => Stdio::from(std::fs::File::create(p).with_context(|| format!("cannot write {}", p.display()))?),
        None => Stdio::null(),
    };
    let mut child = strata()?.args(&args).stdout(Stdio::piped()).stderr(log).spawn()?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().context("the server's output")?).read_line(&mut line)?;
    let server = Server(child);
    let base = line.trim().rsplit(' ').next().unwrap_or("").to_string();
    anyhow::ensure!(base.starts_with("http://"), "the server did not say where it listens: {line:?}");
    let http = reqwest::Client::new();
    let e2b_name = format!("e2b:{package}");
    wait_for_pool(&http, &base, package, pool).await?;
    wait_for_pool(&http, &base, &e2b_name, pool).await?;

    // The native API.
    let native = Arc::new(Mutex::new((Vec::new(), 0usize)));
    let launch = |timed: bool| {
        let (http, base, token, package, native) =
            (http.clone(), base.clone(), token.clone(), package.to_string(), native.clone());
        async move {
            let t = Instant::now();
            let r = http
                .post(format!("{base}/v1/sessions"))
                .bearer_auth(&token)
                .json(&serde_json::json!({ "package": package }))
                .send()
                .await;
            let dt = t.elapsed().as_secs_f64() * 1000.0;
            let id = match r {
                Ok(r) if r.status().as_u16() == 201 => {
                    r.json::<serde_json::Value>().await.ok().and_then(|v| v["session"]["id"].as_str().map(String::from))
                }
                _ => None,
            };
            {
                let mut n = native.lock().unwrap_or_else(|e| e.into_inner());
                match &id {
                    Some(_) if timed => n.0.push(dt),
                    Some(_) => {}
                    None => n.1 += 1,
                }
            }
            if let Some(id) = id {
                let _ = http.delete(format!("{base}/v1/sessions/{id}")).bearer_auth(&token).send().await;
            }
        }
    };
    launch(false).await;
    let watching = PoolWatch::start(&http, &base, package);
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..(rate * seconds as f64) as usize {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
        tasks.push(tokio::spawn(launch(true)));
    }
    for t in tasks {
        let _ = t.await;
    }
    let native_pool_low = watching.stop().await;
    let (native_lat, native_failed) = std::mem::take(&mut *native.lock().unwrap_or_else(|e| e.into_inner()));
    wait_for_pool(&http, &base, &e2b_name, pool).await?;
    let watching = PoolWatch::start(&http, &base, &e2b_name);

    // E2B's SDK.
    let e2b = tokio::task::spawn_blocking({
        let (python, base, token, package) = (python.to_string(), base.clone(), token.clone(), package.to_string());
        move || {
            Command::new(python)
                .args(["-c", DRIVER, &package, &rate.to_string(), &seconds.to_string()])
                .env("E2B_API_URL", format!("{base}/e2b"))
                .env("E2B_SANDBOX_URL", format!("{base}/e2b"))
                .env("E2B_API_KEY", token)
                .stderr(Stdio::inherit())
                .output()
        }
    })
    .await??;
    let e2b_pool_low = watching.stop().await;
    drop(server);
    anyhow::ensure!(e2b.status.success(), "the SDK's driver failed");
    let v: serde_json::Value = serde_json::from_slice(&e2b.stdout).context("the SDK driver's answer")?;
    // Each run's whole time, its create's, and its command's.
    let part = |i: usize| -> Vec<f64> {
        v["latencies_ms"].as_array().map(|a| a.iter().filter_map(|x| x[i].as_f64()).collect()).unwrap_or_default()
    };
    let (e2b_lat, create_lat, run_lat) = (part(0), part(1), part(2));
    let e2b_failed = v["failed"].as_u64().unwrap_or(0) as usize;
    anyhow::ensure!(!native_lat.is_empty() && !e2b_lat.is_empty(), "no launch succeeded one way or the other");
    let (n50, e50) = (percentile(&native_lat, 50.0), percentile(&e2b_lat, 50.0));
    Ok(Report {
        package: package.to_string(),
        rate,
        seconds,
        pool,
        native_p50_ms: n50,
        native_p99_ms: percentile(&native_lat, 99.0),
        native_failed,
        e2b_p50_ms: e50,
        e2b_p99_ms: percentile(&e2b_lat, 99.0),
        e2b_failed,
        create_p50_ms: percentile(&create_lat, 50.0),
        create_p99_ms: percentile(&create_lat, 99.0),
        run_p50_ms: percentile(&run_lat, 50.0),
        run_p99_ms: percentile(&run_lat, 99.0),
        native_pool_low,
        e2b_pool_low,
        ratio_p50: e50 / n50,
    })
}

/// Waits (two minutes at most) until the server's pool of `package` holds
/// `pool` sessions.
async fn wait_for_pool(http: &reqwest::Client, base: &str, package: &str, pool: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    if pool == 0 {
        return Ok(());
    }
    loop {
        let n = pool_level(http, base, package).await?;
        if n >= pool {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "the pool of {package} held {n} of {pool} after two minutes");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// How many sessions the server's pool of `package` holds now.
async fn pool_level(http: &reqwest::Client, base: &str, package: &str) -> anyhow::Result<usize> {
    let label = format!("package=\"{package}\"");
    let text = http.get(format!("{base}/metrics")).send().await?.text().await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("strata_pool_sessions{") && l.contains(&label))
        .find_map(|l| l.rsplit(' ').next()?.parse::<usize>().ok())
        .unwrap_or(0))
}

/// The fewest sessions a pool held, looked at four times a second until
/// stopped.
struct PoolWatch {
    stop: tokio::sync::oneshot::Sender<()>,
    low: tokio::task::JoinHandle<usize>,
}

impl PoolWatch {
    fn start(http: &reqwest::Client, base: &str, package: &str) -> PoolWatch {
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let (http, base, package) = (http.clone(), base.to_string(), package.to_string());
        let low = tokio::spawn(async move {
            let mut low = usize::MAX;
            loop {
                if let Ok(n) = pool_level(&http, &base, &package).await {
                    low = low.min(n);
                }
                tokio::select! {
                    _ = &mut stopped => return if low == usize::MAX { 0 } else { low },
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
        });
        PoolWatch { stop, low }
    }

    async fn stop(self) -> usize {
        let _ = self.stop.send(());
        self.low.await.unwrap_or(0)
    }
}
