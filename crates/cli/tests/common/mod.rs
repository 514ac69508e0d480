//! Shared harness of the end-to-end tests: one test store per run, shared by
//! every test (images are built once, by whichever test needs them first;
//! the store's recipe locks make the others wait and reuse them).

#![allow(dead_code)]

pub mod api;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use strata_engine::{Config, Engine};

/// Whether the slow tests run. `./test.sh` (and so CI) sets STRATA_E2E=1.
pub fn e2e() -> bool {
    if std::env::var_os("STRATA_E2E").is_some() {
        watchdog();
        return true;
    }
    eprintln!("STRATA_E2E is not set: this end-to-end test boots real VMs and runs only under ./test.sh");
    false
}

/// How long one test binary may run before the watchdog ends it.
const BINARY_LIMIT: Duration = Duration::from_secs(30 * 60);

/// Bounds the whole test binary: a test that hangs (a child that never
/// ends, a socket never answered) would otherwise hold the run until CI's
/// own limit, with no word of which test it was. Past `BINARY_LIMIT` every
/// process this binary started is killed and it exits failing, naming the
/// limit.
fn watchdog() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        std::thread::spawn(|| {
            std::thread::sleep(BINARY_LIMIT);
            eprintln!("watchdog: this test binary ran longer than {BINARY_LIMIT:?}; a test hangs; ending it");
            for p in descendants(std::process::id()) {
                let _ = Command::new("kill").args(["-KILL", &p.to_string()]).status();
            }
            std::process::exit(101);
        });
    });
}

pub struct TestEnv {
    pub state: PathBuf,
    pub packages: PathBuf,
    pub agent: PathBuf,
    pub strata: PathBuf,
}

/// Package definitions only the tests use.
const TEST_PACKAGES: &[(&str, &str)] = &[
    (
        "never-ready",
        "debs = ['bc']\ncommand = ['bc', '-q']\n[ready]\ntext = 'THIS TEXT NEVER APPEARS'\ntimeout_ms = 2000\n",
    ),
    ("no-such-program", "debs = ['bc']\ncommand = ['strata-no-such-program']\n[ready]\nalive_ms = 100\n"),
    ("no-such-deb", "debs = ['strata-no-such-deb']\ncommand = ['x']\n[ready]\nalive_ms = 100\n"),
    (
        "bc-corrupt",
        "debs = ['bc']\ncommand = ['bc', '-q']\n[ready]\nalive_ms = 501\n[probe]\ninput = \"6*7\\n\"\nexpect = '42'\n",
    ),
];

pub fn env() -> &'static TestEnv {
    static ENV: OnceLock<TestEnv> = OnceLock::new();
    ENV.get_or_init(|| {
        let strata = PathBuf::from(env!("CARGO_BIN_EXE_strata"));
        let bin_dir = strata.parent().unwrap().to_path_buf();
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(2).unwrap().to_path_buf();
        let state =
            std::env::var_os("STRATA_STATE").map(PathBuf::from).unwrap_or_else(|| "/var/lib/strata-test".into());
        let packages = state.join("test-packages");
        std::fs::create_dir_all(&packages).unwrap();
        for e in std::fs::read_dir(repo.join("packages")).unwrap().flatten() {
            std::fs::copy(e.path(), packages.join(e.file_name())).unwrap();
        }
        for (name, text) in TEST_PACKAGES {
            std::fs::write(packages.join(format!("{name}.toml")), text).unwrap();
        }
        TestEnv { state, packages, agent: bin_dir.join("strata-agent"), strata }
    })
}

/// `strata` with the test store and packages.
pub fn strata(args: &[&str]) -> Command {
    strata_of(env().strata.parent().unwrap(), args)
}

/// `strata ARGS` of the build whose binaries are in `bin_dir` (this one,
/// or an earlier one), with the test store and packages and that build's
/// agent.
pub fn strata_of(bin_dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(bin_dir.join("strata"));
    c.args(args);
    with_test_store(&mut c, bin_dir);
    c
}

/// Points `c` at the test store and packages, with the agent of the build in `bin_dir`.
pub fn with_test_store(c: &mut Command, bin_dir: &Path) {
    let e = env();
    c.env("STRATA_STATE", &e.state)
        .env("STRATA_PACKAGES", &e.packages)
        .env("STRATA_AGENT", bin_dir.join("strata-agent"))
        .env_remove("STRATA_KEEP_WORK");
}

/// `strata ARGS` on a terminal of its own (util-linux's `script` makes
/// one, 80x24 by default), with `input` typed at it: what the terminal
/// showed, and strata's status.
pub fn strata_on_a_terminal(args: &[&str], input: &str) -> Output {
    let quote = |a: &str| format!("'{}'", a.replace('\'', r"'\''"));
    let strata = env().strata.to_string_lossy().into_owned();
    let line: Vec<String> = std::iter::once(strata.as_str()).chain(args.iter().copied()).map(quote).collect();
    let mut c = Command::new("script");
    c.args(["-qec", &line.join(" "), "/dev/null"]);
    with_test_store(&mut c, env().strata.parent().unwrap());
    let mut child = c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), input.as_bytes()).unwrap();
    drop(child.stdin.take());
    let read_all = |mut from: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut all = Vec::new();
            let _ = from.read_to_end(&mut all);
            all
        })
    };
    let stdout = read_all(Box::new(child.stdout.take().unwrap()));
    let stderr = read_all(Box::new(child.stderr.take().unwrap()));
    let status = wait_bounded(&mut child, Duration::from_secs(600), &format!("strata {args:?} on a terminal"));
    Output { status, stdout: stdout.join().unwrap(), stderr: stderr.join().unwrap() }
}

/// Runs `strata` with `input` on its standard input, then checks that it
/// left no scratch directory and no QEMU process behind.
pub fn strata_with_input(args: &[&str], input: &str) -> Output {
    use std::io::Write;
    let mut child = strata(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    // Bounded: a run that hangs is killed and fails the test.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            let end = Instant::now() + Duration::from_secs(600);
            while Instant::now() < end {
                if done.load(std::sync::atomic::Ordering::Acquire) {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
            true
        })
    };
    let out = child.wait_with_output().unwrap();
    done.store(true, std::sync::atomic::Ordering::Release);
    assert!(!watchdog.join().unwrap(), "strata {args:?} hung; stdout so far: {:?}", text(&out.stdout));
    assert_no_leftovers_of(pid);
    out
}

/// The engine, configured like the CLI in these tests.
pub fn engine() -> Engine {
    engine_with(|_| {})
}

/// [`engine`], with changes to its configuration.
pub fn engine_with(change: impl FnOnce(&mut Config)) -> Engine {
    let e = env();
    let mut cfg = Config::from_env();
    cfg.state_dir = e.state.clone();
    cfg.packages_dir = e.packages.clone();
    cfg.agent_binary = e.agent.clone();
    change(&mut cfg);
    Engine::open(cfg).unwrap()
}

/// Every QEMU process and its command line (arguments joined by NULs).
fn qemu_cmdlines() -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).into_owned();
        if cmd.starts_with("qemu-system") {
            found.push((pid, cmd));
        }
    }
    found
}

/// QEMU processes whose command line mentions `needle`.
pub fn qemu_processes_with(needle: &str) -> Vec<u32> {
    qemu_cmdlines().into_iter().filter(|(_, cmd)| cmd.replace('\0', " ").contains(needle)).map(|(pid, _)| pid).collect()
}

/// QEMU processes whose VM directory (where its console log goes) is gone:
/// VMs nobody can reach any more. A VM is killed before its directory is
/// removed, so none is ever listed in passing.
pub fn orphaned_qemus() -> Vec<u32> {
    let console_dir = |cmd: &str| {
        cmd.split('\0')
            .find_map(|a| a.strip_prefix("file,id=console,path="))
            .and_then(|p| std::path::Path::new(p).parent().map(std::path::Path::to_path_buf))
    };
    qemu_cmdlines()
        .into_iter()
        .filter(|(_, cmd)| console_dir(cmd).is_some_and(|d| !d.exists()))
        .map(|(pid, _)| pid)
        .collect()
}

/// Scratch directories in the store left by process `pid`.
pub fn scratch_of(pid: u32) -> Vec<PathBuf> {
    let prefix = format!("{pid}.");
    std::fs::read_dir(env().state.join("tmp"))
        .map(|d| {
            d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(&prefix)).map(|e| e.path()).collect()
        })
        .unwrap_or_default()
}

/// Asserts that process `pid` (ended) left no scratch directory and no QEMU.
pub fn assert_no_leftovers_of(pid: u32) {
    let dir = format!("/tmp/{pid}.");
    let state_dir = format!("{}{dir}", env().state.display());
    assert!(
        wait_until(Duration::from_secs(10), || qemu_processes_with(&state_dir).is_empty()),
        "QEMU of {pid} still running"
    );
    assert!(scratch_of(pid).is_empty(), "scratch left by {pid}: {:?}", scratch_of(pid));
}

/// Polls `cond` every 100 ms until it holds or `limit` passes.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    cond()
}

/// Every process below `pid` (children, their children, ...), read from
/// /proc/*/stat, so it works where /proc/PID/task/PID/children is missing
/// and whether or not a shell in between exec'd its command.
pub fn descendants(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let p: u32 = e.file_name().to_str()?.parse().ok()?;
                    let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
                    let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
                    Some((p, ppid))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(parents.iter().filter(|(_, pp)| *pp == parent).map(|(p, _)| *p));
        i += 1;
    }
    found.remove(0);
    found
}

/// The name (comm) of process `pid`.
pub fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_string()
}

/// Kills `child` and every process below it, and reaps it.
pub fn kill_tree(child: &mut std::process::Child) {
    for p in descendants(child.id()) {
        let _ = Command::new("kill").args(["-KILL", &p.to_string()]).status();
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits at most `limit` for `child`; past it, kills it and everything it
/// started and panics naming `what`, so a hang fails the test instead of
/// holding the whole run.
pub fn wait_bounded(child: &mut std::process::Child, limit: Duration, what: &str) -> std::process::ExitStatus {
    if wait_until(limit, || child.try_wait().ok().flatten().is_some()) {
        return child.wait().unwrap();
    }
    kill_tree(child);
    panic!("{what} did not end within {limit:?}; it and its processes were killed");
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The directory of QEMU `pid`'s cgroup for `controller` (v1), or of its
/// one cgroup (v2), from /proc/PID/cgroup.
pub fn cgroup_dir(pid: u32, controller: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let v1 = text.lines().find_map(|l| {
        let mut p = l.splitn(3, ':');
        let (_, ctrls, path) = (p.next()?, p.next()?, p.next()?);
        ctrls.split(',').any(|c| c == controller).then(|| path.to_string())
    });
    match v1 {
        Some(path) => {
            let mount = if controller == "cpu" && !std::path::Path::new("/sys/fs/cgroup/cpu").exists() {
                "cpu,cpuacct"
            } else {
                controller
            };
            std::path::Path::new("/sys/fs/cgroup").join(mount).join(path.trim_start_matches('/'))
        }
        None => {
            let path = text.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
            std::path::Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'))
        }
    }
}
