//! End-to-end: the confinement of the QEMUs strata starts (real QEMU, real
//! guests). Every thread of every QEMU, forked by the fork server or
//! exec'd, runs as a uid of its own with no capabilities, under QEMU's
//! seccomp filter, and can never gain privileges; a call the filter forbids
//! ends that QEMU only; files of the host and of other sessions are not
//! its to open; its guest reaches the outside world and nothing of this
//! host's.

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

/// The thread ids of process `pid`.
fn threads(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .map(|t| t.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Asserts that every thread of process `pid` is filtered (seccomp mode 2).
fn assert_filtered_threads(pid: u32) {
    let tids = threads(pid);
    assert!(!tids.is_empty(), "process {pid} has no threads");
    for tid in &tids {
        assert_eq!(status_field(pid, tid, "Seccomp"), "2", "thread {tid} of process {pid} is not filtered");
    }
}

/// Asserts that every thread of QEMU `pid` is filtered (seccomp mode 2)
/// and has no_new_privs set; returns how many threads it has.
fn assert_filtered(pid: u32) -> usize {
    assert_filtered_threads(pid);
    let tids = threads(pid);
    for tid in &tids {
        assert_eq!(status_field(pid, tid, "NoNewPrivs"), "1", "thread {tid} of QEMU {pid} may gain privileges");
    }
    tids.len()
}

/// Asserts that every thread of QEMU `pid` runs as a uid and gid that are
/// not root, with no capabilities; returns its uid.
fn assert_unprivileged(pid: u32) -> u32 {
    let mut uids = std::collections::BTreeSet::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let tid = t.file_name().to_string_lossy().into_owned();
        for (field, what) in [("Uid", "uid"), ("Gid", "gid")] {
            let ids: Vec<u32> = status_field(pid, &tid, field).split_whitespace().map(|v| v.parse().unwrap()).collect();
            assert_eq!(ids.len(), 4, "thread {tid} of QEMU {pid}: {field}");
            assert!(ids.iter().all(|v| *v >= 1000), "thread {tid} of QEMU {pid} has {what}s {ids:?}");
            if field == "Uid" {
                uids.extend(ids);
            }
        }
        assert_eq!(status_field(pid, &tid, "CapEff"), "0000000000000000", "thread {tid} of QEMU {pid}");
        assert_eq!(status_field(pid, &tid, "CapPrm"), "0000000000000000", "thread {tid} of QEMU {pid}");
    }
    assert_eq!(uids.len(), 1, "QEMU {pid}'s threads run as several uids: {uids:?}");
    // Its open files are bounded.
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let open_files = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    assert_eq!(open_files.split_whitespace().nth(3), Some("4096"), "{open_files}");
    uids.into_iter().next().unwrap()
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
    let server = forking.fork_server_pid().expect("the fork server did not start");
    // The fork server runs no guest, but keeps only the capabilities that
    // making its children takes.
    let kept = format!("{:016x}", strata_vmm::SERVER_CAPABILITIES.iter().fold(0u64, |m, c| m | 1 << c));
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(status_field(server, &server.to_string(), set), kept, "the fork server's {set}");
    }
    // And it (with every QEMU it forks) is filtered: root's dangerous calls
    // (modules, ptrace, open by handle, ...) are refused on every thread.
    assert_filtered_threads(server);
    let pkg = forking.package("bc").unwrap();
    let mut victim = forking.launch(&pkg, &settings(), &LogProgress).await.unwrap();
    let mut neighbour = forking.launch(&pkg, &settings(), &LogProgress).await.unwrap();
    let mut uids = std::collections::BTreeSet::new();
    for s in [&mut victim, &mut neighbour] {
        s.expect_after(b"6*7\n", "42", ANSWER).await.unwrap();
        // QEMU's threads (vCPU, RCU, I/O) exist by now: each is checked.
        assert!(assert_filtered(s.vm_pid()) >= 2);
        uids.insert(assert_unprivileged(s.vm_pid()));
    }
    // Exec'd, as the CLI starts a session.
    let execing = engine_with(|c| c.fork_server = None);
    let mut execd = execing.launch(&pkg, &settings(), &LogProgress).await.unwrap();
    execd.expect_after(b"6*7\n", "42", ANSWER).await.unwrap();
    assert!(assert_filtered(execd.vm_pid()) >= 2);
    uids.insert(assert_unprivileged(execd.vm_pid()));
    assert_eq!(uids.len(), 3, "sessions share a uid: {uids:?}");
    // Each QEMU is PID 1 of a pid namespace of its own and sees no other
    // process; outside it stands its monitor, as confined as QEMU and
    // holding nothing open.
    let me = std::process::id();
    for pid in [victim.vm_pid(), neighbour.vm_pid(), execd.vm_pid()] {
        let nspid = status_field(pid, &pid.to_string(), "NSpid");
        assert_eq!(nspid, format!("{pid}\t1"), "QEMU {pid} is not PID 1 of a namespace of its own");
        let seen: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root/proc"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            .collect();
        assert_eq!(seen, ["1"], "QEMU {pid} sees processes {seen:?}");
        let monitor = strata_vmm::monitor_of(pid).unwrap_or_else(|| panic!("QEMU {pid} has no monitor"));
        assert_filtered(monitor);
        assert_eq!(assert_unprivileged(monitor), assert_unprivileged(pid), "monitor {monitor} of QEMU {pid}");
        // Only the console's: the pipe QEMU writes into, and the log.
        let mut open: Vec<String> = std::fs::read_dir(format!("/proc/{monitor}/fd"))
            .unwrap()
            .flatten()
            .map(|f| std::fs::read_link(f.path()).unwrap().to_string_lossy().into_owned())
            .collect();
        open.sort();
        assert_eq!(open.len(), 2, "monitor {monitor} of QEMU {pid} holds {open:?}");
        assert!(open[0].ends_with("/console.log") && open[1].starts_with("pipe:"), "monitor {monitor}: {open:?}");
        assert_eq!(namespace(monitor, "pid"), namespace(me, "pid"));
    }
    let pid_namespaces: std::collections::BTreeSet<String> =
        [me, victim.vm_pid(), neighbour.vm_pid(), execd.vm_pid()].iter().map(|p| namespace(*p, "pid")).collect();
    assert_eq!(pid_namespaces.len(), 4, "pid namespaces shared: {pid_namespaces:?}");
    // Its session's files are its own, and no other uid's.
    let overlay = env().state.join("sessions").join(&neighbour.id).join("disk0.qcow2");
    let meta = std::fs::metadata(&overlay).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        meta.uid(),
        status_field(neighbour.vm_pid(), &neighbour.vm_pid().to_string(), "Uid")
            .split_whitespace()
            .next()
            .unwrap()
            .parse::<u32>()
            .unwrap()
    );
    assert_eq!(meta.mode() & 0o077, 0, "{} is open to other uids", overlay.display());
    // Each sees only its own files: a mount namespace of its own whose
    // root holds QEMU, its session and its images, not the host's /etc,
    // the catalog or another session.
    for s in [&victim, &neighbour] {
        let pid = s.vm_pid();
        assert_ne!(namespace(pid, "mnt"), namespace(std::process::id(), "mnt"), "QEMU {pid} sees the host's mounts");
        let root = std::path::PathBuf::from(format!("/proc/{pid}/root"));
        let etc: std::collections::BTreeSet<String> = std::fs::read_dir(root.join("etc"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(etc.iter().all(|f| f == "ld.so.cache" || f == "resolv.conf"), "QEMU {pid} sees /etc: {etc:?}");
        let state = root.join(env().state.strip_prefix("/").unwrap());
        assert!(state.join("sessions").join(&s.id).join("console.log").exists(), "QEMU {pid} does not see its session");
        assert!(!state.join("catalog.db").exists(), "QEMU {pid} sees the catalog");
        let others = if s.id == victim.id { &neighbour.id } else { &victim.id };
        assert!(!state.join("sessions").join(others).exists(), "QEMU {pid} sees another session");
    }
    // IPC and UTS namespaces of their own: not this process's, not each other's.
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
    // Told over its monitor to open the host's secrets or its neighbour's
    // disk, QEMU cannot: they are not its uid's.
    for file in [std::path::Path::new("/etc/shadow"), overlay.as_path()] {
        let command = format!(
            "{{\"execute\":\"blockdev-add\",\"arguments\":{{\"driver\":\"file\",\"node-name\":\"stolen\",\
             \"filename\":\"{}\",\"read-only\":true}}}}\n",
            file.display()
        );
        let answered = qmp_once(&sock, &command, Duration::from_secs(30));
        // Not in its view at all (or, were it, not its uid's to read).
        assert!(
            answered.contains("\"error\"")
                && (answered.contains("No such file or directory") || answered.contains("Permission denied")),
            "{}: {answered}",
            file.display()
        );
    }
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
    // Killing a monitor ends its QEMU.
    let (qemu, monitor) = (neighbour.vm_pid(), strata_vmm::monitor_of(neighbour.vm_pid()).unwrap());
    // SAFETY: sending a signal has no memory effects.
    unsafe { libc::kill(monitor as i32, libc::SIGKILL) };
    let gone = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        !std::path::Path::new(&format!("/proc/{qemu}")).exists()
            || status_field(qemu, &qemu.to_string(), "State").starts_with('Z')
    });
    assert!(gone, "QEMU {qemu} outlived its monitor {monitor}");
    neighbour.close().await;
    let _ = strata(&["kill", &id]).output();
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
    let procs: std::collections::BTreeSet<u32> =
        read(pids.join("cgroup.procs")).lines().map(|l| l.parse().unwrap()).collect();
    let monitor = strata_vmm::monitor_of(pid).expect("a confined QEMU has a monitor");
    assert_eq!(procs, [pid, monitor].into(), "the cgroup holds more or less than QEMU and its monitor");
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

/// A network namespace standing for the outside world: a veth pair, this
/// host's end 198.51.100.1 (an address of this host, like any other), the
/// far end 198.51.100.2, and a TCP server there that answers "outside".
struct Outside {
    netns: String,
    server: std::process::Child,
}

const OUTSIDE_HOST_END: &str = "198.51.100.1";
const OUTSIDE_FAR_END: &str = "198.51.100.2";

impl Outside {
    fn start(port: u16) -> Outside {
        let tag = std::process::id() % 100_000;
        let netns = format!("strata-outside-{tag}");
        let (host_if, far_if) = (format!("so{tag}h"), format!("so{tag}f"));
        let sh = |cmd: &str| {
            let st = std::process::Command::new("sh").args(["-c", cmd]).status().unwrap();
            assert!(st.success(), "{cmd}");
        };
        // One left by an earlier run that was killed.
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &netns])
            .stderr(std::process::Stdio::null())
            .status();
        sh(&format!("ip netns add {netns}"));
        sh(&format!("ip link add {host_if} type veth peer name {far_if} netns {netns}"));
        sh(&format!("ip addr add {OUTSIDE_HOST_END}/30 dev {host_if} && ip link set {host_if} up"));
        sh(&format!(
            "ip -n {netns} addr add {OUTSIDE_FAR_END}/30 dev {far_if} && ip -n {netns} link set {far_if} up \
             && ip -n {netns} link set lo up"
        ));
        let server = std::process::Command::new("ip")
            .args(["netns", "exec", &netns, "/usr/bin/python3", "-c"])
            .arg(format!(
                "import socket\ns=socket.create_server(('{OUTSIDE_FAR_END}',{port}))\n\
                 while True:\n  c,_=s.accept(); c.sendall(b'outside'); c.close()"
            ))
            .spawn()
            .unwrap();
        let up = wait_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect_timeout(
                &format!("{OUTSIDE_FAR_END}:{port}").parse().unwrap(),
                Duration::from_millis(500),
            )
            .is_ok()
        });
        assert!(up, "the outside server did not come up");
        Outside { netns, server }
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        // Deleting the namespace deletes the veth pair.
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.netns]).status();
    }
}

/// Whether a TCP listener on this host saw a connection within `limit`.
fn accepted(listener: &std::net::TcpListener, limit: Duration) -> bool {
    listener.set_nonblocking(true).unwrap();
    wait_until(limit, || listener.accept().is_ok())
}

#[tokio::test]
async fn a_guest_reaches_the_outside_world_but_no_address_of_this_host_nor_a_neighbour() {
    if !e2e() {
        return;
    }
    let eng = engine();
    assert!(eng.guest_firewall().is_ok(), "{:?}", eng.guest_firewall());
    let free_port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let outside_port = free_port();
    let _outside = Outside::start(outside_port);
    // This host's services: one on loopback, one on an address of its own.
    let loopback = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let own = std::net::TcpListener::bind(format!("{OUTSIDE_HOST_END}:0")).unwrap();
    // A neighbour session with a forwarded port (lighttpd serves at once).
    let neighbour_port = free_port();
    let mut with_port = settings();
    with_port.network.ports = vec![strata_engine::context::PortForward { host: neighbour_port, guest: 80 }];
    let neighbour = eng.launch(&eng.package("lighttpd").unwrap(), &with_port, &LogProgress).await.unwrap();

    // The guest: outbound access, and a forwarded port of its own.
    let own_port = free_port();
    let mut guest = settings();
    guest.network.outbound = true;
    guest.network.ports = vec![strata_engine::context::PortForward { host: own_port, guest: 8000 }];
    let mut s = eng.launch(&eng.package("python3").unwrap(), &guest, &LogProgress).await.unwrap();
    // Typed into the guest's Python prompt: blocks end with a blank line.
    let probe = format!(
        "import socket, http.server, threading\n\
         def reach(a, p):\n\
         \x20 try:\n\
         \x20   c = socket.create_connection((a, p), timeout=4)\n\
         \x20 except Exception as e:\n\
         \x20   return 'REFUSED ' + type(e).__name__\n\
         \x20 c.settimeout(4)\n\
         \x20 try:\n\
         \x20   return 'REACHED ' + c.recv(16).decode(errors='replace')\n\
         \x20 except Exception:\n\
         \x20   return 'REACHED'\n\
         \n\
         srv = http.server.ThreadingHTTPServer(('', 8000), http.server.SimpleHTTPRequestHandler)\n\
         t = threading.Thread(target=srv.serve_forever, daemon=True); t.start()\n\
         for name, a, p in [('outside', '{OUTSIDE_FAR_END}', {outside_port}), ('loopback', '10.0.2.2', {lo}), \
         ('own', '{OUTSIDE_HOST_END}', {own_p}), ('metadata', '169.254.169.254', 80), \
         ('neighbour', '10.0.2.2', {neighbour_port})]:\n\
         \x20 print('PROBE', name, reach(a, p))\n\
         \n\
         print('PROBES', 'DONE')\n",
        lo = loopback.local_addr().unwrap().port(),
        own_p = own.local_addr().unwrap().port(),
    );
    let out = s.expect_after(probe.as_bytes(), "PROBES DONE", Duration::from_secs(120)).await.unwrap();
    let result = |name: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(&format!("PROBE {name} ")).map(str::to_string))
            .unwrap_or_else(|| panic!("no probe of {name}: {out:?}"))
    };
    assert_eq!(result("outside"), "REACHED outside", "{out}");
    for name in ["loopback", "own", "metadata", "neighbour"] {
        assert!(result(name).starts_with("REFUSED"), "the guest reached {name}: {out}");
    }
    assert!(!accepted(&loopback, Duration::from_millis(200)), "the host's loopback service saw the guest");
    assert!(!accepted(&own, Duration::from_millis(200)), "the host's own address saw the guest");
    // Its own forwarded port still answers from this host.
    let page = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut c = std::net::TcpStream::connect(("127.0.0.1", own_port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        c.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut body = String::new();
        let _ = c.read_to_string(&mut body);
        body
    })
    .await
    .unwrap();
    assert!(page.starts_with("HTTP/1.0 200"), "{page:?}");
    s.close().await;
    neighbour.close().await;
}

/// Python that writes `mib` MiB of zeros to `path` (synced every 32 MiB)
/// and says how many it wrote and why it stopped.
const FILL: &str = "import os\n\
                    def fill(path, mib):\n\
                    \x20 n, err = 0, 'none'\n\
                    \x20 try:\n\
                    \x20   f = open(path, 'wb')\n\
                    \x20   while n < mib:\n\
                    \x20     f.write(bytes(1 << 20)); n += 1\n\
                    \x20     if n % 32 == 0: f.flush(); os.fsync(f.fileno())\n\
                    \x20   f.flush(); os.fsync(f.fileno())\n\
                    \x20 except OSError as e:\n\
                    \x20   err = e.strerror\n\
                    \x20 return 'WROTE %d ERR %s' % (n, err)\n\
                    \n";

#[tokio::test]
async fn a_guest_filling_its_disk_is_stopped_at_its_bound_and_runs_on_beside_a_neighbour_that_can_write() {
    if !e2e() {
        return;
    }
    // A server whose bound is below what the package may write refuses it
    // before any VM starts, naming both figures.
    let small = engine_with(|c| c.vm_limits.disk_mib = 16);
    let refused = small.launch(&small.package("python3").unwrap(), &settings(), &LogProgress).await;
    let why = refused.err().expect("a package beyond the server's disk bound was launched").to_string();
    assert!(why.contains("STRATA_DISK_MIB") && why.contains("2048") && why.contains("2304"), "{why}");
    // At the bound itself (python3's 2048 MiB plus the slack), a guest that
    // deletes its reserve and writes on meets the bound and runs on.
    let eng = engine_with(|c| c.vm_limits.disk_mib = 2048 + 256);
    let pkg = eng.package("python3").unwrap();
    let bound: u64 = (2048 + 256) << 20;
    let mut s = eng.launch(&pkg, &settings(), &LogProgress).await.unwrap();
    let mut neighbour = eng.launch(&pkg, &settings(), &LogProgress).await.unwrap();
    let fill = FILL;
    s.expect_after(fill.as_bytes(), ">>> ", ANSWER).await.unwrap();
    s.expect_after(b"os.remove('/.strata-disk-reserve')\n", ">>> ", ANSWER).await.unwrap();
    let out = s
        .expect_after(b"print('FILL', fill('/root/fill', 3000))\n", "\nFILL WROTE", Duration::from_secs(900))
        .await
        .unwrap();
    let rest = s.expect_after(b"", "\n>>> ", ANSWER).await.unwrap_or_default();
    eprintln!(
        "the guest filling its disk: {}",
        (out.clone() + &rest).lines().rev().take(3).collect::<Vec<_>>().join(" | ")
    );
    assert!(!rest.contains("ERR none"), "3000 MiB were written past a bound of 2304 MiB: {rest:?}");
    // The guest runs on and answers.
    s.expect_after(b"print(6*7)\n", "\n42", ANSWER).await.unwrap();
    // What it wrote to the host stayed within the bound, file by file.
    let dir = env().state.join("sessions").join(&s.id);
    for f in std::fs::read_dir(&dir).unwrap().flatten() {
        let len = f.metadata().unwrap().len();
        assert!(len <= bound, "{} is {len} bytes, beyond {bound}", f.path().display());
    }
    // The neighbour writes as before.
    neighbour.expect_after(fill.as_bytes(), ">>> ", ANSWER).await.unwrap();
    let out = neighbour
        .expect_after(b"print('FILL', fill('/root/small', 64))\n", "ERR none", Duration::from_secs(300))
        .await
        .unwrap();
    assert!(out.contains("FILL WROTE 64 ERR none"), "{out:?}");
    s.close().await;
    neighbour.close().await;
}

#[tokio::test]
async fn a_vm_beyond_its_memory_limit_ends_alone_and_is_reported_as_such() {
    if !e2e() {
        return;
    }
    let eng = engine();
    let mut s = eng.launch(&eng.package("python3").unwrap(), &settings(), &LogProgress).await.unwrap();
    let mut neighbour = eng.launch(&eng.package("bc").unwrap(), &settings(), &LogProgress).await.unwrap();
    // A guest cannot outgrow guest RAM + the allowance by itself (its own
    // kernel stops it first): its limit is lowered here to 256 MiB, below
    // what the guest is about to use, as a QEMU growing would meet it.
    let memory = cgroup_dir(s.vm_pid(), "memory");
    let claim = std::path::Path::new("/run/strata/vm-ids").join(assert_unprivileged(s.vm_pid()).to_string());
    assert!(claim.exists(), "{} is not claimed", claim.display());
    let limit = if memory.join("memory.max").exists() { "memory.max" } else { "memory.limit_in_bytes" };
    std::fs::write(memory.join(limit), (256u64 << 20).to_string()).unwrap();
    s.expect_after(b"x = []\n", ">>> ", ANSWER).await.unwrap();
    s.input(b"for i in range(400): x.append(b'\\x01' * (1 << 20))\n\nprint('FILLED', len(x))\n").await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(300), async {
        loop {
            match s.next_event().await {
                strata_engine::SessionEvent::Lost(why) => return Ok(why),
                strata_engine::SessionEvent::Exited(code) => return Err(format!("the program exited with {code}")),
                strata_engine::SessionEvent::Output(d) if text(&d).contains("FILLED 400") => {
                    return Err(format!("the guest filled its RAM within its limit: {}", text(&d)))
                }
                _ => {}
            }
        }
    })
    .await
    .expect("the session neither ended nor filled its memory in 300 s");
    let why = end.unwrap();
    assert!(why.contains("ended by its memory limit"), "{why}");
    // It leaves nothing behind: its cgroup, its ids, its directory.
    let dir = env().state.join("sessions").join(&s.id);
    s.close().await;
    for gone in [&memory, &claim, &dir] {
        assert!(wait_until(Duration::from_secs(10), || !gone.exists()), "{} outlived its VM", gone.display());
    }
    // Only that VM: its neighbour answers.
    neighbour.expect_after(b"6*7\n", "42", ANSWER).await.unwrap();
    neighbour.close().await;
}

/// The median time `s` takes to answer `6*7` (bc), in milliseconds.
async fn answer_ms(s: &mut strata_engine::Session, n: usize) -> f64 {
    let mut times = Vec::new();
    for _ in 0..n {
        let t0 = std::time::Instant::now();
        s.expect_after(b"6*7\n", "42", ANSWER).await.unwrap();
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    times[n / 2]
}

/// Processes on this host.
fn host_processes() -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .count()
}

#[tokio::test]
async fn a_fork_bomb_in_a_guest_changes_nothing_on_the_host_and_its_neighbour_answers() {
    if !e2e() {
        return;
    }
    let eng = engine();
    let mut neighbour = eng.launch(&eng.package("bc").unwrap(), &settings(), &LogProgress).await.unwrap();
    let idle = answer_ms(&mut neighbour, 7).await;
    let mut bomb = eng.launch(&eng.package("python3").unwrap(), &settings(), &LogProgress).await.unwrap();
    let pid = bomb.vm_pid();
    let threads = || std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.count()).unwrap_or(0);
    let (processes_before, threads_before) = (host_processes(), threads());
    bomb.input(b"import os; os.system('f(){ f | f & }; f')\n").await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (t0, c0) = (std::time::Instant::now(), cpu_seconds(pid));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let load = (cpu_seconds(pid) - c0) / t0.elapsed().as_secs_f64();
    assert!(load >= 0.3, "the bomb's guest used {:.0}% of a CPU: it did not go off", load * 100.0);
    let busy = answer_ms(&mut neighbour, 7).await;
    let (processes_during, threads_during) = (host_processes(), threads());
    eprintln!(
        "neighbour's answer: {idle:.1} ms idle, {busy:.1} ms beside a fork bomb (its QEMU at {:.0}% of a CPU); host \
         processes {processes_before} -> {processes_during}; the bomb's QEMU threads {threads_before} -> {threads_during}",
        load * 100.0
    );
    // The guest's processes are the guest's: the host's do not multiply,
    // and its QEMU stays within its task limit.
    assert!(processes_during <= processes_before + 10, "host processes {processes_before} -> {processes_during}");
    assert!(threads_during <= 256, "QEMU has {threads_during} threads");
    // Its CPU quota holds the bomb to one CPU: the neighbour answers about
    // as fast (generous, for a loaded host; the figure is printed).
    assert!(busy <= 2.0 * idle + 50.0, "the neighbour answered in {busy:.1} ms beside a fork bomb, {idle:.1} ms idle");
    bomb.close().await;
    neighbour.close().await;
}

#[tokio::test]
async fn a_guest_flooding_its_console_leaves_a_bounded_log_with_its_newest_lines() {
    if !e2e() {
        return;
    }
    let eng = engine();
    let mut s = eng.launch(&eng.package("python3").unwrap(), &settings(), &LogProgress).await.unwrap();
    let log = env().state.join("sessions").join(&s.id).join("console.log");
    let bound = strata_vmm::CONSOLE_LOG_MAX;
    // One and a half times the bound, through the guest's serial console,
    // then a last line to find.
    let flood = "def flood(n):\n\
                 \x20 f = open('/dev/ttyS0', 'wb', 0)\n\
                 \x20 for i in range(n): _ = f.write(b'flood %06d ' % i + b'x' * 1011 + b'\\n')\n\
                 \x20 _ = f.write(b'FLOOD-END\\n'); f.close()\n\
                 \x20 return 'FLOODED %d' % n\n\
                 \n";
    s.expect_after(flood.as_bytes(), ">>> ", ANSWER).await.unwrap();
    let t0 = std::time::Instant::now();
    s.expect_after(b"print(flood(1536))\n", "\nFLOODED 1536", Duration::from_secs(600)).await.unwrap();
    let size = std::fs::metadata(&log).unwrap().len();
    eprintln!("1.5 MiB through the console in {:.1} s left a log of {size} bytes", t0.elapsed().as_secs_f64());
    assert!(size <= bound, "the console log is {size} bytes, beyond {bound}");
    // Its newest part is kept.
    let ends_with_marker = wait_until(Duration::from_secs(10), || {
        std::fs::read(&log).is_ok_and(|t| String::from_utf8_lossy(&t).contains("FLOOD-END"))
    });
    assert!(ends_with_marker, "the newest line is not in the log");
    let text = String::from_utf8_lossy(&std::fs::read(&log).unwrap()).into_owned();
    assert!(text.contains("flood 001535 "), "the last flood line is not kept");
    assert!(!text.contains("flood 000000 "), "the oldest line was kept");
    // QEMU's own log did not take the flood instead.
    let qemu_log = env().state.join("sessions").join(&s.id).join("qemu.log");
    assert!(std::fs::metadata(&qemu_log).unwrap().len() < 64 * 1024);
    // The guest answers on.
    s.expect_after(b"print(7*6)\n", "\n42", ANSWER).await.unwrap();
    s.close().await;
}

#[tokio::test]
async fn a_guest_filling_its_disk_is_told_no_space_left_near_its_packages_disk_mib() {
    if !e2e() {
        return;
    }
    let eng = engine();
    let pkg = eng.package("python3").unwrap();
    let want = u64::from(pkg.def.disk_mib);
    let mut s = eng.launch(&pkg, &settings(), &LogProgress).await.unwrap();
    s.expect_after(FILL.as_bytes(), ">>> ", ANSWER).await.unwrap();
    let asked = want + 512;
    let t0 = std::time::Instant::now();
    let line = format!("print('FILL', fill('/root/fill', {asked}))\n");
    let out = s.expect_after(line.as_bytes(), "\nFILL WROTE", Duration::from_secs(1200)).await.unwrap();
    let rest = s.expect_after(b"", "\n>>> ", ANSWER).await.unwrap_or_default();
    let both = out + &rest;
    let said = both.rsplit("FILL WROTE").next().and_then(|r| r.lines().next()).unwrap_or_default().trim().to_string();
    eprintln!("the guest filling a disk of {want} MiB: wrote {said} in {:.0} s", t0.elapsed().as_secs_f64());
    let wrote: u64 = said.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(said.ends_with("ERR No space left on device"), "{said:?}");
    assert!(wrote + 128 >= want && wrote <= want, "it wrote {wrote} MiB of its {want}");
    // The guest runs on, and may free what it wrote.
    s.expect_after(b"os.remove('/root/fill'); print(6*7)\n", "\n42", ANSWER).await.unwrap();
    // The host kept its writes within the package's disk and the slack.
    let bound = (want + u64::from(strata_engine::launch::DISK_SLACK_MIB)) << 20;
    let dir = env().state.join("sessions").join(&s.id);
    for f in std::fs::read_dir(&dir).unwrap().flatten() {
        let len = f.metadata().unwrap().len();
        assert!(len <= bound, "{} is {len} bytes, beyond {bound}", f.path().display());
    }
    s.close().await;
}
