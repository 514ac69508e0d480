//! End-to-end: the confinement of the QEMUs strata starts (real QEMU, real
//! guests). Every thread of every QEMU, forked by the fork server or
//! exec'd, runs under QEMU's seccomp filter and can never gain privileges;
//! a call the filter forbids ends that QEMU only.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::time::Duration;

use common::*;
use strata_engine::context::ContextSettings;
use strata_engine::LogProgress;

const ANSWER: Duration = Duration::from_secs(60);

fn settings() -> ContextSettings {
    ContextSettings { rows: 24, cols: 80, env: BTreeMap::new(), ..ContextSettings::from_terminal(None) }
}

/// One field of a thread's /proc status (`Seccomp`, `NoNewPrivs`, ...).
fn status_field(pid: u32, tid: &str, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap_or_default();
    let prefix = format!("{name}:");
    status.lines().find_map(|l| l.strip_prefix(&prefix)).map(|v| v.trim().to_string()).unwrap_or_default()
}

/// The namespace `kind` (ipc, uts, ...) process `pid` is in.
fn namespace(pid: u32, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap().to_string_lossy().into_owned()
}

/// Asserts that every thread of QEMU `pid` is filtered (seccomp mode 2)
/// and has no_new_privs set; returns how many threads it has.
fn assert_filtered(pid: u32) -> usize {
    let tids: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .map(|t| t.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!tids.is_empty(), "QEMU {pid} has no threads");
    for tid in &tids {
        assert_eq!(status_field(pid, tid, "Seccomp"), "2", "thread {tid} of QEMU {pid} is not filtered");
        assert_eq!(status_field(pid, tid, "NoNewPrivs"), "1", "thread {tid} of QEMU {pid} may gain privileges");
    }
    tids.len()
}

/// Sends one QMP command to a detached session's QEMU (nobody else holds
/// its monitor) and returns its answer, or what came before the channel
/// closed or `limit` passed.
fn qmp_once(sock: &std::path::Path, command: &str, limit: Duration) -> String {
    let stream = std::os::unix::net::UnixStream::connect(sock).unwrap();
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut out = stream.try_clone().unwrap();
    let mut lines = BufReader::new(stream);
    let mut seen = String::new();
    let mut line = String::new();
    lines.read_line(&mut line).unwrap();
    seen.push_str(&line);
    out.write_all(b"{\"execute\":\"qmp_capabilities\"}\n").unwrap();
    line.clear();
    lines.read_line(&mut line).unwrap();
    out.write_all(command.as_bytes()).unwrap();
    loop {
        line.clear();
        match lines.read_line(&mut line) {
            Ok(0) | Err(_) => return seen,
            // Events may come first; the answer is a return or an error.
            Ok(_) if line.contains("\"return\"") || line.contains("\"error\"") => return line.clone(),
            Ok(_) => seen.push_str(&line),
        }
    }
}

#[tokio::test]
async fn every_qemu_is_filtered_and_a_forbidden_call_ends_only_that_one() {
    if !e2e() {
        return;
    }
    let preload = env().strata.parent().unwrap().join("libstrata_qemu_preload.so");
    let forking = engine_with(|c| c.fork_server = Some(preload));
    assert!(forking.fork_server_pid().is_some(), "the fork server did not start");
    let pkg = forking.package("bc").unwrap();
    let mut victim = forking.launch(&pkg, &settings(), &LogProgress).await.unwrap();
    let mut neighbour = forking.launch(&pkg, &settings(), &LogProgress).await.unwrap();
    for s in [&mut victim, &mut neighbour] {
        s.expect_after(b"6*7\n", "42", ANSWER).await.unwrap();
        // QEMU's threads (vCPU, RCU, I/O) exist by now: each is checked.
        assert!(assert_filtered(s.vm_pid()) >= 2);
    }
    // Exec'd, as the CLI starts a session.
    let execing = engine_with(|c| c.fork_server = None);
    let mut execd = execing.launch(&pkg, &settings(), &LogProgress).await.unwrap();
    execd.expect_after(b"6*7\n", "42", ANSWER).await.unwrap();
    assert!(assert_filtered(execd.vm_pid()) >= 2);
    // IPC and UTS namespaces of their own: not this process's, not each other's.
    let me = std::process::id();
    for kind in ["ipc", "uts"] {
        let seen: std::collections::BTreeSet<String> =
            [me, victim.vm_pid(), neighbour.vm_pid(), execd.vm_pid()].iter().map(|p| namespace(*p, kind)).collect();
        assert_eq!(seen.len(), 4, "{kind} namespaces shared: {seen:?}");
    }
    execd.close().await;

    // A monitor command that makes QEMU start a program (a migration to an
    // `exec:` URI) is a call the filter forbids: refused (QEMU 10 answers
    // EPERM) or the end of that QEMU; either way nothing runs.
    let pid = victim.vm_pid();
    let marker = env().state.join(format!("confine-marker-{pid}"));
    let id = victim.detach().await.unwrap();
    let sock = env().state.join("sessions").join(&id).join("qmp.sock");
    let command =
        format!("{{\"execute\":\"migrate\",\"arguments\":{{\"uri\":\"exec:touch {}\"}}}}\n", marker.display());
    let answered = qmp_once(&sock, &command, Duration::from_secs(30));
    let alive = std::path::Path::new(&format!("/proc/{pid}/status")).exists()
        && status_field(pid, &pid.to_string(), "State").starts_with(['S', 'R']);
    assert!(
        answered.contains("Operation not permitted") || !alive,
        "QEMU {pid} neither refused nor died on a forbidden call: {answered:?}"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(!marker.exists(), "the forbidden program ran");
    // Its neighbour, from the same fork server, runs on.
    neighbour.expect_after(b"7*6\n", "42", ANSWER).await.unwrap();
    neighbour.close().await;
    let _ = strata(&["kill", &id]).output();
}

/// The directory of QEMU `pid`'s cgroup for `controller` (v1), or of its
/// one cgroup (v2), from /proc/PID/cgroup.
fn cgroup_dir(pid: u32, controller: &str) -> std::path::PathBuf {
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

/// CPU time process `pid` used so far, in seconds (user + system).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

#[tokio::test]
async fn a_vm_runs_in_a_cgroup_of_its_own_within_its_limits_and_the_cgroup_goes_with_it() {
    if !e2e() {
        return;
    }
    let eng = engine_with(|c| c.vm_limits.cpu_percent = 30);
    assert!(eng.cgroups().is_ok(), "{:?}", eng.cgroups());
    let pkg = eng.package("bc").unwrap();
    let mut s = eng.launch(&pkg, &settings(), &LogProgress).await.unwrap();
    s.expect_after(b"6*7\n", "42", ANSWER).await.unwrap();
    let pid = s.vm_pid();
    let (cpu, memory, pids) = (cgroup_dir(pid, "cpu"), cgroup_dir(pid, "memory"), cgroup_dir(pid, "pids"));
    for d in [&cpu, &memory, &pids] {
        let name = d.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("strata-") && name.ends_with(&s.id), "QEMU {pid} is in {}", d.display());
    }
    let read = |p: std::path::PathBuf| std::fs::read_to_string(&p).unwrap_or_default().trim().to_string();
    let v2 = cpu == memory;
    if v2 {
        assert_eq!(read(cpu.join("cpu.max")), "30000 100000");
        assert_eq!(read(memory.join("memory.max")), ((512u64 + 384) << 20).to_string());
    } else {
        assert_eq!(read(cpu.join("cpu.cfs_quota_us")), "30000");
        assert_eq!(read(memory.join("memory.limit_in_bytes")), ((512u64 + 384) << 20).to_string());
    }
    assert_eq!(read(pids.join("pids.max")), "256");
    // Every thread of QEMU is in it.
    let tasks: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .map(|t| t.file_name().to_string_lossy().into_owned())
        .collect();
    let procs = read(pids.join("cgroup.procs"));
    assert_eq!(procs, pid.to_string(), "the cgroup holds more or less than QEMU");
    assert!(!tasks.is_empty());

    // The guest spins its vCPU: QEMU gets about its 30% of a CPU, not more.
    s.input(b"while(1){}\n").await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (t0, c0) = (std::time::Instant::now(), cpu_seconds(pid));
    tokio::time::sleep(Duration::from_secs(6)).await;
    let share = (cpu_seconds(pid) - c0) / t0.elapsed().as_secs_f64();
    eprintln!("QEMU of a spinning guest with a 30% quota used {:.0}% of a CPU", share * 100.0);
    assert!(share <= 0.40, "a spinning guest used {:.0}% of a CPU with a 30% quota", share * 100.0);
    assert!(share >= 0.10, "the guest did not spin ({:.0}%): the check proves nothing", share * 100.0);

    // The session ends: its cgroup goes with it.
    s.close().await;
    for d in [&cpu, &memory, &pids] {
        assert!(wait_until(Duration::from_secs(10), || !d.exists()), "{} outlived its VM", d.display());
    }
}

#[tokio::test]
async fn a_server_below_a_floor_refuses_a_launch_before_any_vm_starts() {
    if !e2e() {
        return;
    }
    for (floor, setting) in [("disk", "STRATA_DISK_FLOOR_MIB"), ("memory", "STRATA_MEMORY_FLOOR_MIB")] {
        let eng = engine_with(|c| match floor {
            "disk" => c.floors.disk_mib = 1 << 40,
            _ => c.floors.memory_mib = 1 << 40,
        });
        let pkg = eng.package("bc").unwrap();
        let err = match eng.launch(&pkg, &settings(), &LogProgress).await {
            Ok(s) => {
                s.close().await;
                panic!("a launch below the {floor} floor started");
            }
            Err(e) => e,
        };
        assert!(matches!(err, strata_engine::Error::Refused(_)), "{err}");
        let msg = err.to_string();
        // Refused by the check that comes before a restore slot is taken.
        assert!(msg.contains(setting) && msg.contains("below its floor"), "{msg}");
    }
}
