//! End-to-end: real images, real QEMU, real packages.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use strata_engine::context::ContextSettings;
use strata_engine::LogProgress;

const ANSWER: Duration = Duration::from_secs(60);

fn settings() -> ContextSettings {
    ContextSettings {
        term: "xterm-256color".into(),
        rows: 33,
        cols: 99,
        timezone: Some("Asia/Tokyo".into()),
        locale: Some("C.UTF-8".into()),
        env: BTreeMap::new(),
        ..ContextSettings::from_terminal(None)
    }
}

#[test]
fn piped_input_reaches_python_and_its_answer_comes_back() {
    if !e2e() {
        return;
    }
    let out = strata_with_input(&["run", "python3"], "print(6*7)\n");
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stdout).lines().any(|l| l.trim() == "42"), "stdout: {:?}", text(&out.stdout));
}

#[test]
fn a_piped_run_is_like_docker_run_i_only_the_programs_output_errors_apart_end_of_input_and_its_status() {
    if !e2e() {
        return;
    }
    // The REPL's program with pipes (its launch image's standby): no
    // echo, no prompt, no terminal codes; the last line has no newline.
    let out =
        strata_with_input(&["run", "python3"], "import sys\nprint(6*7)\nsys.stderr.write('oops\\n')\nsys.exit(3)");
    assert_eq!(text(&out.stdout), "42\n", "stderr: {}", text(&out.stderr));
    assert!(text(&out.stderr).contains("oops\n"), "{}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(3));
    let out = strata_with_input(&["run", "bc"], "2+3\n");
    assert_eq!(text(&out.stdout), "5\n", "stderr: {}", text(&out.stderr));
    // `-i` types the input at the program's terminal instead: its prompt
    // and echo come back.
    let out = strata_with_input(&["run", "-i", "python3"], "print(6*7)\n");
    assert!(text(&out.stdout).contains(">>> "), "{:?}", text(&out.stdout));
}

#[test]
fn exit_status_of_the_program_is_strata_exit_status() {
    if !e2e() {
        return;
    }
    let out = strata_with_input(&["run", "python3"], "import sys; sys.exit(7)\n");
    assert_eq!(out.status.code(), Some(7), "stderr: {}", text(&out.stderr));
}

#[test]
fn bc_answers_from_its_launch_image() {
    if !e2e() {
        return;
    }
    let out = strata_with_input(&["run", "bc"], "6*7\nquit\n");
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains("42"), "stdout: {:?}", text(&out.stdout));
}

#[tokio::test]
async fn htop_is_already_running_when_the_session_appears() {
    if !e2e() {
        return;
    }
    let eng = engine();
    let pkg = eng.package("htop").unwrap();
    let mut s = eng.launch(&pkg, &settings(), &LogProgress).await.unwrap();
    // The screen captured in the launch image already shows htop's header.
    let screen = text(&s.screen);
    assert!(screen.contains("Tasks"), "htop screen: {screen:?}");
    // It redraws for the new terminal size, and quits on 'q'.
    s.input(b"q").await.unwrap();
    let code = loop {
        match tokio::time::timeout(ANSWER, s.next_event()).await.expect("htop answers") {
            strata_engine::SessionEvent::Exited(c) => break c,
            strata_engine::SessionEvent::Lost(w) => panic!("lost: {w}"),
            _ => {}
        }
    };
    assert_eq!(code, 0);
    s.close().await;
}

/// The parent of process `pid`, from /proc.
fn parent_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("PPid:")).and_then(|v| v.trim().parse().ok())
}

#[tokio::test]
async fn a_fork_server_starts_the_vms_and_ends_with_its_engine() {
    if !e2e() {
        return;
    }
    let preload = env().strata.parent().unwrap().join("libstrata_qemu_preload.so");
    let eng = engine_with(|c| c.fork_server = Some(preload));
    let server = eng.fork_server_pid().expect("the fork server started");
    assert_eq!(parent_of(server), Some(std::process::id()));
    // It prepared QEMU's machine classes once for all its VMs (the PC
    // machine alone has dozens of versions).
    let prepared = eng.fork_server_prepared_types().unwrap();
    assert!(prepared.as_ref().is_ok_and(|n| *n >= 20), "{prepared:?}");
    let pkg = eng.package("bc").unwrap();
    // A busy server hands QEMU descriptors with high numbers (hundreds of
    // sessions' sockets): the child must still get each at its number,
    // even around 256, where a fixed floor for its temporary copies was.
    let mut ballast = Vec::new();
    while ballast.last().map_or(0, |f: &std::fs::File| std::os::fd::AsRawFd::as_raw_fd(f)) < 255 {
        ballast.push(std::fs::File::open("/dev/null").unwrap());
    }
    let mut s = eng.launch(&pkg, &settings(), &LogProgress).await.unwrap();
    drop(ballast);
    let vm = s.vm_pid();
    // Through its monitor, which stands outside QEMU's pid namespace.
    let monitor = strata_vmm::monitor_of(vm).unwrap_or_else(|| panic!("QEMU {vm} has no monitor"));
    assert_eq!(parent_of(monitor), Some(server), "QEMU {vm} was not forked by the fork server");
    // Its command line is its own (strata finds a session's QEMU by it).
    let cmdline = text(&std::fs::read(format!("/proc/{vm}/cmdline")).unwrap()).replace('\0', " ");
    assert!(cmdline.starts_with("qemu-system-x86_64 ") && cmdline.contains("-incoming defer"), "{cmdline}");
    assert!(cmdline.contains(&format!("sessions/{}", s.id)), "{cmdline}");
    s.expect_after(b"6*7\n", "42", ANSWER).await.unwrap();
    s.close().await;
    assert!(wait_until(Duration::from_secs(10), || parent_of(vm).is_none()), "QEMU {vm} outlived its session");

    // A fork server that ends (killed here) is replaced by the next launch.
    // SAFETY: signalling the fork server this engine started.
    unsafe { libc::kill(server as i32, libc::SIGKILL) };
    let dead = || std::fs::read_to_string(format!("/proc/{server}/stat")).map_or(true, |st| st.contains(") Z "));
    assert!(wait_until(Duration::from_secs(10), dead), "the killed fork server did not end");
    let mut s = eng.launch(&pkg, &settings(), &LogProgress).await.unwrap();
    let replaced = eng.fork_server_pid().expect("another fork server started");
    assert_ne!(replaced, server);
    let monitor = strata_vmm::monitor_of(s.vm_pid()).expect("a forked QEMU has a monitor");
    assert_eq!(parent_of(monitor), Some(replaced), "the launch after was not forked by the new server");
    s.expect_after(b"6*7\n", "42", ANSWER).await.unwrap();
    s.close().await;
    drop(eng);
    assert!(parent_of(replaced).is_none(), "the fork server outlived its engine");

    // Without a usable preload library, QEMU starts by exec, as before.
    let eng = engine_with(|c| c.fork_server = Some("/nonexistent/libstrata_qemu_preload.so".into()));
    assert_eq!(eng.fork_server_pid(), None);
    let mut s = eng.launch(&pkg, &settings(), &LogProgress).await.unwrap();
    let monitor = strata_vmm::monitor_of(s.vm_pid()).expect("an exec'd QEMU has a monitor");
    assert_eq!(parent_of(monitor), Some(std::process::id()));
    s.expect_after(b"6*7\n", "42", ANSWER).await.unwrap();
    s.close().await;
}

#[tokio::test]
async fn two_sessions_run_at_once_and_never_see_each_others_writes() {
    if !e2e() {
        return;
    }
    let eng = engine();
    let pkg = eng.package("python3").unwrap();
    let ctx = settings();
    let (a, b) = tokio::join!(eng.launch(&pkg, &ctx, &LogProgress), eng.launch(&pkg, &ctx, &LogProgress));
    let (mut a, mut b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.vm_pid(), b.vm_pid());
    a.expect_after(b"open('/root/mark','w').write('a'); print('wrote', 6*7)\n", "wrote 42", ANSWER).await.unwrap();
    // 42 ends each answer: it is not in the echo of the line typed (6*7 is).
    let seen =
        b.expect_after(b"import os; print('mark', os.path.exists('/root/mark'), 6*7)\n", "42", ANSWER).await.unwrap();
    assert!(seen.contains("mark False"), "{seen:?}");
    // A new session starts from the launch image, not from A's disk.
    let pid_a = a.vm_pid();
    a.close().await;
    b.close().await;
    assert!(
        !std::path::Path::new(&format!("/proc/{pid_a}")).exists(),
        "QEMU {pid_a} still alive: {:?}",
        std::fs::read_to_string(format!("/proc/{pid_a}/status")).map(|s| s
            .lines()
            .take(8)
            .collect::<Vec<_>>()
            .join(" / "))
    );
    let mut c = eng.launch(&pkg, &settings(), &LogProgress).await.unwrap();
    let seen =
        c.expect_after(b"import os; print('again', os.path.exists('/root/mark'))\n", "again F", ANSWER).await.unwrap();
    assert!(seen.contains("again False"), "{seen:?}");
    c.close().await;
}

#[tokio::test]
async fn typing_ahead_of_a_program_that_does_not_read_stalls_nothing_and_keeps_order() {
    if !e2e() {
        return;
    }
    let eng = engine();
    let pkg = eng.package("python3").unwrap();
    let mut s = eng.launch(&pkg, &settings(), &LogProgress).await.unwrap();
    // Python sleeps, then reads everything typed meanwhile in one go.
    let lines = 195;
    let total = lines * 1024 + "tail-marker\n".len();
    let cmd = format!("import sys,time; time.sleep(8); d=sys.stdin.read({total}); print('got', len(d), d[-12:-1])\n");
    s.expect_after(cmd.as_bytes(), "time.sleep(8)", ANSWER).await.unwrap();
    // ~200 KiB: far more than the terminal holds (~68 KiB) while nobody
    // reads, so most of it waits in the agent.
    let line = format!("#{}\n", "x".repeat(1022));
    for _ in 0..lines {
        s.input(line.as_bytes()).await.unwrap();
    }
    s.input(b"tail-marker\n").await.unwrap();
    // The agent still answers the host at once.
    let screen = tokio::time::timeout(Duration::from_secs(5), s.screen()).await;
    assert!(screen.is_ok_and(|r| r.is_ok()), "the agent stalled behind a program that does not read");
    // And the program gets every byte, in order, once it reads.
    let seen = s.expect_after(b"", &format!("got {total} tail-marker"), ANSWER).await.unwrap();
    assert!(!seen.is_empty());
    s.close().await;
}

#[tokio::test]
async fn context_is_applied_on_resume_without_reboot() {
    if !e2e() {
        return;
    }
    let eng = engine();
    let pkg = eng.package("python3").unwrap();
    let mut s = eng.launch(&pkg, &settings(), &LogProgress).await.unwrap();
    let seen =
        s.expect_after(b"import os,time; print('ctx', os.get_terminal_size(), 6*7)\n", "42", ANSWER).await.unwrap();
    assert!(seen.contains("columns=99, lines=33"), "{seen:?}");
    // The zone is the guest's: new processes see it, and a running one does
    // as soon as it re-reads it (tzset), with nothing restarted.
    let seen = s
        .expect_after(
            b"time.tzset(); print('zone', time.strftime('%Z'), os.popen('date +%Z').read().strip(), 6*7)\n",
            "42",
            ANSWER,
        )
        .await
        .unwrap();
    assert!(seen.contains("zone JST JST"), "{seen:?}");
    // Another attach in another zone moves it, and one back in the first
    // zone moves it back (the agent skips only a zone it already set).
    for (zone, abbrev) in [("America/Sao_Paulo", "-03"), ("Asia/Tokyo", "JST")] {
        let mut other = settings();
        other.timezone = Some(zone.into());
        s.reattach(&other.to_terminal_context()).await.unwrap();
        let seen =
            s.expect_after(b"time.tzset(); print('zone', time.strftime('%Z'), 6*7)\n", "42", ANSWER).await.unwrap();
        assert!(seen.contains(&format!("zone {abbrev} 42")), "{zone}: {seen:?}");
    }
    // The guest was booted with the kernel's periodic housekeeping quieted
    // (a restored guest would otherwise run it in every launch's first moments).
    let seen = s
        .expect_after(
            b"import glob; print('housekeeping', open('/proc/sys/vm/stat_interval').read().strip(), open('/proc/sys/vm/compaction_proactiveness').read().strip(), sorted(set(open(p).read().strip() for p in glob.glob('/sys/block/*/queue/wbt_lat_usec'))), 6*7)\n",
            "42",
            ANSWER,
        )
        .await
        .unwrap();
    assert!(seen.contains("housekeeping 60 0 ['0'] 42"), "{seen:?}");
    // The clock was set from the host on attach.
    let host_year =
        1970 + std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() / 31_557_600;
    let seen = s.expect_after(b"print('year', time.gmtime().tm_year, 6*7)\n", "42", ANSWER).await.unwrap();
    assert!(
        seen.contains(&format!("year {host_year}")) || seen.contains(&format!("year {}", host_year + 1)),
        "{seen:?}"
    );
    s.close().await;
}

#[test]
fn context_images_are_content_addressed_and_reused() {
    if !e2e() {
        return;
    }
    let eng = engine();
    let a = eng.context_image(&settings()).unwrap();
    let b = eng.context_image(&settings()).unwrap();
    assert_eq!(a.digest, b.digest);
    let mut other = settings();
    other.rows = 40;
    assert_ne!(eng.context_image(&other).unwrap().digest, a.digest);
    let mut bad = settings();
    bad.timezone = Some("../../etc/passwd".into());
    assert!(eng.context_image(&bad).unwrap_err().to_string().contains("time zone"));
}

#[test]
fn unknown_package_is_refused_with_close_names() {
    if !e2e() {
        return;
    }
    let out = strata_with_input(&["run", "pyhton3"], "");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("no package \"pyhton3\"") && err.contains("python3"), "{err}");
    let out = strata_with_input(&["run", "Bad/Name"], "");
    assert!(text(&out.stderr).contains("not a valid package name"), "{}", text(&out.stderr));
}

#[test]
fn a_debian_package_that_cannot_be_installed_is_a_clear_error() {
    if !e2e() {
        return;
    }
    let out = strata_with_input(&["build", "no-such-deb"], "");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("installing no-such-deb failed") && err.contains("strata-no-such-deb"), "{err}");
    let out = strata_with_input(&["build", "no-such-program"], "");
    let err = text(&out.stderr);
    // Caught by the install step when it builds the install image, else
    // (the image is shared with `bc`) when the launch image starts it.
    assert!(
        err.contains("installed no program called 'strata-no-such-program'")
            || err.contains("cannot start \"strata-no-such-program\""),
        "{err}"
    );
    let images = text(&strata(&["images", "ls", "--json"]).output().unwrap().stdout);
    assert!(!images.contains("no-such-program") && !images.contains("no-such-deb"), "{images}");
}

#[test]
fn a_program_that_never_becomes_ready_times_out_and_is_cleaned_up() {
    if !e2e() {
        return;
    }
    let out = strata_with_input(&["build", "never-ready"], "");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("never-ready did not become ready") && err.contains("not ready after 2000 ms"), "{err}");
}

#[test]
fn a_corrupt_blob_is_detected_and_the_image_rebuilt() {
    if !e2e() {
        return;
    }
    let build = strata_with_input(&["build", "bc-corrupt"], "");
    assert!(build.status.success(), "{}", text(&build.stderr));
    let eng = engine();
    let launch = eng
        .store
        .list_images()
        .unwrap()
        .into_iter()
        .find(|r| r.package.as_deref() == Some("bc-corrupt") && r.kind == strata_store::ImageKind::Launch)
        .unwrap();
    let state = eng.store.blob_path(&launch.files["state"]);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = std::fs::read(&state).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&state, &bytes).unwrap();
    let out = strata_with_input(&["run", "bc-corrupt"], "6*7\nquit\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("42"));
    let images = eng.store.list_images().unwrap();
    assert!(!images.iter().any(|r| r.digest == launch.digest), "the damaged image is still listed");
    assert!(images
        .iter()
        .any(|r| r.package.as_deref() == Some("bc-corrupt") && r.kind == strata_store::ImageKind::Launch));
}

#[test]
fn kill_9_during_a_build_leaves_the_catalog_as_it_was_and_the_next_run_builds() {
    if !e2e() {
        return;
    }
    let e = env();
    // A fresh definition each run, so its launch image is built (and killed) now.
    let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let def = format!("debs = ['bc']\ncommand = ['bc', '-q']\n[env]\nRUN = '{nonce}'\n[ready]\nalive_ms = 502\n");
    let tmp_def = e.packages.join(".bc-killed.toml.tmp");
    std::fs::write(&tmp_def, def).unwrap();
    std::fs::rename(&tmp_def, e.packages.join("bc-killed.toml")).unwrap();
    let launch_images = || {
        engine().store.list_images().unwrap().into_iter().filter(|r| r.package.as_deref() == Some("bc-killed")).count()
    };
    let before = launch_images();
    let mut child = strata(&["build", "bc-killed", "-q"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let tmp = e.state.join("tmp");
    let vm_dir_prefix = format!("{pid}.");
    let in_vm = wait_until(Duration::from_secs(600), || {
        std::fs::read_dir(&tmp)
            .map(|d| {
                d.flatten().any(|x| {
                    let n = x.file_name().to_string_lossy().to_string();
                    n.starts_with(&vm_dir_prefix) && n.ends_with("launch-vm")
                })
            })
            .unwrap_or(false)
    });
    assert!(in_vm, "the build never reached its launch VM");
    std::thread::sleep(Duration::from_millis(500));
    child.kill().unwrap();
    child.wait().unwrap();
    let needle = format!("{}/tmp/{pid}.", e.state.display());
    assert!(wait_until(Duration::from_secs(10), || qemu_processes_with(&needle).is_empty()), "QEMU outlived strata");
    assert_eq!(launch_images(), before, "a half-built image was recorded");
    let again = strata_with_input(&["build", "bc-killed"], "");
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert_eq!(launch_images(), before + 1);
    assert!(scratch_of(pid).is_empty(), "scratch of the killed build remains: {:?}", scratch_of(pid));
}

#[test]
fn prune_lists_superseded_images_and_never_the_current_ones() {
    if !e2e() {
        return;
    }
    // The current images of bc, as a build reports them: "KIND DIGEST12 SIZE".
    let build = strata_with_input(&["build", "bc"], "");
    assert!(build.status.success(), "{}", text(&build.stderr));
    let current: Vec<String> =
        text(&build.stdout).lines().filter_map(|l| l.split_whitespace().nth(1).map(String::from)).collect();
    assert_eq!(current.len(), 3, "{}", text(&build.stdout));
    let count = || engine().store.list_images().unwrap().len();
    let before = count();
    let out = strata(&["images", "prune", "--dry-run", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed = report["images"].as_array().unwrap();
    for i in listed {
        let (digest, kind) = (i["digest"].as_str().unwrap(), i["kind"].as_str().unwrap());
        assert!(["base", "install", "launch"].contains(&kind), "{kind} images are never pruned");
        assert!(!current.iter().any(|c| digest.starts_with(c.as_str())), "the current image {digest} would go");
    }
    assert_eq!(report["removed_blobs"], 0);
    // A dry run removes nothing (other tests may add images meanwhile).
    assert!(count() >= before);
    let out = strata(&["images", "prune", "--dry-run"]).output().unwrap();
    assert!(text(&out.stdout).contains("nothing removed (dry run)"), "{}", text(&out.stdout));
}

#[test]
fn a_full_disk_during_a_build_fails_clearly_and_records_nothing() {
    if !e2e() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path();
    let ok =
        std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "size=96M", "tmpfs"]).arg(mnt).status().unwrap();
    assert!(ok.success());
    let out = strata(&["build", "bc", "-q"]).env("STRATA_STATE", mnt).output().unwrap();
    let listed = strata(&["images", "ls", "--json"]).env("STRATA_STATE", mnt).output().unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(mnt.join("tmp")).unwrap().flatten().map(|e| e.path()).collect();
    std::process::Command::new("umount").arg(mnt).status().unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("No space left on device") || err.contains("ENOSPC") || err.contains("no space"), "{err}");
    assert_eq!(text(&listed.stdout).trim(), "[]");
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn accelerator_is_probed_once_and_can_be_forced() {
    if !e2e() {
        return;
    }
    let out = strata(&["accel", "-q"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let chosen = text(&out.stdout).trim().to_string();
    let cached = std::fs::read_to_string(env().state.join("accel.json")).unwrap();
    assert!(cached.contains(&format!("\"{chosen}\"")), "{cached} vs {chosen}");
    let forced = strata(&["accel", "-q", "--accel", "tcg"]).output().unwrap();
    assert_eq!(text(&forced.stdout).trim(), "tcg");
    let bad = strata(&["accel", "--accel", "hvf"]).output().unwrap();
    assert!(text(&bad.stderr).contains("unknown accelerator"));
}

#[test]
fn bench_launch_prints_both_paths_and_their_ratio() {
    if !e2e() {
        return;
    }
    let out = strata(&["bench", "launch", "bc", "-n", "1", "--json", "-q"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for k in ["cold_p50_ms", "cold_p99_ms", "launch_p50_ms", "launch_p99_ms", "ratio_p50"] {
        assert!(v[k].as_f64().is_some_and(|x| x > 0.0), "{k} in {v}");
    }
    // Same run, same machine: restoring a running program beats booting one.
    assert!(v["ratio_p50"].as_f64().unwrap() > 1.0, "{v}");
    let bad = strata(&["bench", "launch", "htop", "-n", "1"]).output().unwrap();
    assert!(text(&bad.stderr).contains("has no [probe]"), "{}", text(&bad.stderr));
}

#[test]
fn bench_load_reports_latency_throughput_and_cpu_per_launch() {
    if !e2e() {
        return;
    }
    let out = strata(&["bench", "load", "bc", "--rate", "2", "--seconds", "2", "--pool", "1", "--json", "-q"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["requests"], 4, "{v}");
    assert_eq!(v["failed"], 0, "{v}");
    for k in ["latency_p50_ms", "latency_p99_ms", "throughput", "cpu_ms_per_launch", "page_faults_per_launch"] {
        assert!(v[k].as_f64().is_some_and(|x| x > 0.0), "{k} in {v}");
    }
    // A launch is at least one QEMU process started and stopped (the
    // benchmark's VMs come from a fork server: their CPU counts too).
    assert!(v["cpu_ms_per_launch"].as_f64().unwrap() > 5.0, "{v}");
    // None of its VMs outlives it, not even one whose start was cancelled.
    assert!(wait_until(Duration::from_secs(10), || orphaned_qemus().is_empty()), "{:?}", orphaned_qemus());
    let bad = strata(&["bench", "load", "bc", "--rate", "0"]).output().unwrap();
    assert!(text(&bad.stderr).contains("--rate must be"), "{}", text(&bad.stderr));
}

#[test]
fn bench_density_reports_memory_and_cpu_of_idle_sessions() {
    if !e2e() {
        return;
    }
    let out = strata(&["bench", "density", "bc", "-n", "2", "--idle", "2", "--json", "-q"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["sessions"], 2, "{v}");
    assert_eq!(v["private_mib"].as_array().map(Vec::len), Some(2), "{v}");
    // A restored session's private memory is QEMU's own plus the guest pages
    // it wrote: well under its 512 MiB of guest memory, which is shared.
    let private = v["private_max_mib"].as_f64().unwrap();
    assert!(private > 1.0 && private < 128.0, "{v}");
    assert!(v["idle_cpu_percent_mean"].as_f64().is_some_and(|c| (0.0..100.0).contains(&c)), "{v}");
    // Each session was read 5 s after its launch (the idle time is shorter):
    // some CPU (its timers, at least), and far less than 5 s of it.
    assert!(v["settle_cpu_ms_mean"].as_f64().is_some_and(|c| c > 0.0 && c < 5000.0), "{v}");
    let bad = strata(&["bench", "density", "bc", "--idle", "99999"]).output().unwrap();
    assert!(text(&bad.stderr).contains("--idle must be at most"), "{}", text(&bad.stderr));
}

/// Runs `strata ARGS` on a pseudo-terminal (util-linux `script`), typing
/// `keys` in steps; returns its exit code and output.
fn strata_on_pty(args: &str, keys: &[&[u8]]) -> (Option<i32>, String) {
    use std::io::{Read, Write};
    let e = env();
    let cmd = format!("{} {args}", e.strata.display());
    let mut child = std::process::Command::new("script")
        .args(["-q", "-e", "-c", &cmd, "/dev/null"])
        .env("STRATA_STATE", &e.state)
        .env("STRATA_PACKAGES", &e.packages)
        .env("STRATA_AGENT", &e.agent)
        .env("TERM", "xterm")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stdout.read_to_end(&mut s);
        text(&s)
    });
    std::thread::sleep(Duration::from_secs(3));
    for k in keys {
        stdin.write_all(k).unwrap();
        stdin.flush().unwrap();
        std::thread::sleep(Duration::from_millis(1500));
    }
    let done = wait_until(Duration::from_secs(60), || child.try_wait().unwrap().is_some());
    if !done {
        kill_tree(&mut child);
    }
    let code = child.wait().unwrap().code();
    drop(stdin);
    (code, reader.join().unwrap())
}

fn detached_sessions() -> Vec<serde_json::Value> {
    let out = strata(&["ps", "--json"]).output().unwrap();
    let all: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    all.into_iter().filter(|s| s["detached"] == true).collect()
}

#[test]
fn detach_and_attach_keep_the_program_and_its_state() {
    if !e2e() {
        return;
    }
    let before: Vec<_> = detached_sessions().iter().map(|s| s["id"].clone()).collect();
    let (code, out) = strata_on_pty("run python3", &[b"x = 6*7\r", b"\x10\x11"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("detached from session"), "{out}");
    let new: Vec<_> = detached_sessions().into_iter().filter(|s| !before.contains(&s["id"])).collect();
    assert_eq!(new.len(), 1, "{new:?}");
    let id = new[0]["id"].as_str().unwrap().to_string();
    let logs = strata(&["logs", &id]).output().unwrap();
    assert!(text(&logs.stdout).contains("x = 6*7"), "logs: {:?} {}", text(&logs.stdout), text(&logs.stderr));
    let (code, out) = strata_on_pty(&format!("attach {id}"), &[b"print('x is', x)\r", b"exit(5)\r"]);
    assert!(out.contains("x is 42"), "{out}");
    assert_eq!(code, Some(5), "{out}");
    assert!(!detached_sessions().iter().any(|s| s["id"] == id.as_str()), "session still listed");
    let missing = strata(&["attach", &id]).output().unwrap();
    assert!(text(&missing.stderr).contains("no session"), "{}", text(&missing.stderr));
    let bad = strata(&["kill", "../etc"]).output().unwrap();
    assert!(text(&bad.stderr).contains("not a session id"), "{}", text(&bad.stderr));
}

#[test]
fn a_debian_package_without_a_definition_launches_by_its_name() {
    if !e2e() {
        return;
    }
    // nano: no file in packages/, its program has the package's name.
    let listed = text(&strata(&["packages", "ls"]).output().unwrap().stdout);
    assert!(!listed.contains("nano"), "{listed}");
    let out = strata_with_input(&["run", "-i", "nano"], "\x18");
    // Ctrl-X, typed at its terminal, quits the running editor, and its
    // status is strata's.
    assert!(out.status.success(), "{}", text(&out.stderr));
    let images = engine().store.list_images().unwrap();
    for kind in [strata_store::ImageKind::Install, strata_store::ImageKind::Launch] {
        assert!(images.iter().any(|r| r.kind == kind && r.package.as_deref() == Some("nano")), "no {kind} image");
    }
}

#[test]
fn exec_runs_commands_beside_the_program_with_pipes_exit_status_env_cwd_and_user() {
    if !e2e() {
        return;
    }
    let out = strata(&["run", "-d", "python3"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_string();
    let exec = |args: &[&str]| {
        let mut all = vec!["exec"];
        all.extend_from_slice(args);
        strata(&all).output().unwrap()
    };
    // Output only, byte for byte; stderr apart; the command's status.
    let out = exec(&[&id, "echo", "hi"]);
    assert_eq!((out.status.code(), out.stdout.as_slice()), (Some(0), &b"hi\n"[..]), "{}", text(&out.stderr));
    let out = exec(&[&id, "sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!((out.status.code(), text(&out.stdout), text(&out.stderr)), (Some(3), "out\n".into(), "err\n".into()));
    // Input without a final newline reaches its end; binary data passes unchanged.
    let out = strata_with_input(&["exec", "-i", &id, "cat"], "no newline");
    assert_eq!(out.stdout, b"no newline");
    let data: Vec<u8> = (0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let file = env().state.join("exec-input.bin");
    std::fs::write(&file, &data).unwrap();
    let out = strata(&["exec", "-i", &id, "sh", "-c", "gzip -c | gzip -dc"])
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(out.stdout == data, "{} bytes came back, {} went in", out.stdout.len(), data.len());
    // A command that does not exist exits 127, as from a shell.
    let out = exec(&[&id, "strata-no-such-command"]);
    assert_eq!(out.status.code(), Some(127));
    assert!(text(&out.stderr).contains("command not found"), "{}", text(&out.stderr));
    // Environment, working directory, user.
    let out = exec(&[
        "-e",
        "GREETING=hello there",
        "-w",
        "/tmp",
        "-u",
        "nobody",
        &id,
        "sh",
        "-c",
        "echo $GREETING; pwd; id -un",
    ]);
    assert_eq!(text(&out.stdout), "hello there\n/tmp\nnobody\n", "{}", text(&out.stderr));
    let out = exec(&["-u", "nosuchuser", &id, "true"]);
    assert_eq!(out.status.code(), Some(126), "{}", text(&out.stderr));
    let out = exec(&["-e", "9LIVES=1", &id, "true"]);
    assert!(text(&out.stderr).contains("not a variable name"), "{}", text(&out.stderr));
    // On a terminal: a PTY of its size, input passed on, the status.
    let out =
        strata_on_a_terminal(&["exec", "-t", &id, "sh", "-c", "stty size; tty; read x; echo got-$x; exit 7"], "hi\n");
    let shown = text(&out.stdout);
    assert_eq!(out.status.code(), Some(7), "{shown}{}", text(&out.stderr));
    assert!(shown.contains("24 80") && shown.contains("/dev/pts/") && shown.contains("got-hi"), "{shown}");
    let refused = exec(&["-t", &id, "true"]);
    assert!(text(&refused.stderr).contains("needs standard input to be a terminal"), "{}", text(&refused.stderr));
    // In the background: its pid at once; it runs on until stopped.
    let out = exec(&["-d", &id, "sleep", "300"]);
    let pid = text(&out.stdout).trim().to_string();
    assert!(out.status.success() && pid.parse::<u32>().is_ok(), "{pid:?} {}", text(&out.stderr));
    let out = exec(&[&id, "cat", &format!("/proc/{pid}/cmdline")]);
    assert_eq!(out.stdout, b"sleep\x00300\x00");
    assert!(exec(&[&id, "sh", "-c", &format!("kill {pid}")]).status.success());
    let out = exec(&[&id, "sh", "-c", &format!("sleep 0.5; test -e /proc/{pid}/cmdline && cat /proc/{pid}/stat")]);
    assert!(!text(&out.stdout).contains("sleep") || text(&out.stdout).contains(") Z "), "{}", text(&out.stdout));
    // The program beside it runs on, detached, untouched.
    let ps = strata(&["ps", "--json"]).output().unwrap();
    let all: Vec<serde_json::Value> = serde_json::from_slice(&ps.stdout).unwrap();
    assert!(all.iter().any(|s| s["id"] == id.as_str() && s["state"] == "detached"), "{all:?}");
    let out = strata_with_input(&["attach", &id], "print(6*7)\n");
    assert!(text(&out.stdout).contains("42"), "{}", text(&out.stdout));
    let missing = exec(&["0123456789ab", "true"]);
    assert!(text(&missing.stderr).contains("no session"), "{}", text(&missing.stderr));
}

#[test]
fn run_with_a_command_after_two_dashes_runs_it_with_pipes_in_the_restored_vm() {
    if !e2e() {
        return;
    }
    // Only the command's output, its status, input to its end without a
    // final newline.
    let out = strata_with_input(&["run", "python3", "--", "python3"], "import sys; print(6*7); sys.exit(4)");
    assert_eq!((out.status.code(), text(&out.stdout)), (Some(4), "42\n".to_string()), "{}", text(&out.stderr));
    let out = strata_with_input(&["run", "bc", "--", "sh", "-c", "cat; echo err >&2"], "piped");
    assert_eq!((text(&out.stdout), text(&out.stderr)), ("piped".to_string(), "err\n".to_string()));
    let refused = strata(&["run", "-d", "bc", "--", "true"]).output().unwrap();
    assert!(text(&refused.stderr).contains("leave out --detach"), "{}", text(&refused.stderr));
}

/// Starts `strata ARGS` (a command in a session) and kills it with SIGKILL
/// once it runs, as a terminal that vanishes would: the command goes on in
/// the guest.
fn exec_then_vanish(args: &[&str]) {
    let mut child = strata(args).stdin(std::process::Stdio::piped()).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn commands_that_run_in_a_session_are_listed_reconnected_to_and_signalled_here_and_through_a_server() {
    if !e2e() {
        return;
    }
    let server = common::api::serve("commands");
    let here: Vec<&str> = Vec::new();
    let through: Vec<&str> = vec!["--addr", &server.base, "--token", &server.a];
    for via in [here, through] {
        let cli = |args: &[&str]| {
            let mut all = via.clone();
            all.extend_from_slice(args);
            all.iter().map(|s| s.to_string()).collect::<Vec<String>>()
        };
        let run = |args: &[&str]| {
            let all = cli(args);
            strata(&all.iter().map(String::as_str).collect::<Vec<_>>()).output().unwrap()
        };
        let out = run(&["run", "-d", "bc"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let id = text(&out.stdout).trim().to_string();
        // Stopped however the test ends.
        let _session = KilledOnDrop(cli(&["kill", &id]));
        // Two commands whose terminals vanish: they run on in the guest.
        exec_then_vanish(
            &cli(&["exec", "-i", &id, "sh", "-c", "read x; echo got-$x; exit 4"])
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        );
        exec_then_vanish(&cli(&["exec", &id, "sleep", "300"]).iter().map(String::as_str).collect::<Vec<_>>());
        let listed = run(&["commands", "ls", "--json", &id]);
        assert!(listed.status.success(), "{}", text(&listed.stderr));
        let all: Vec<serde_json::Value> = serde_json::from_slice(&listed.stdout).unwrap();
        let id_of = |first: &str| {
            all.iter()
                .find(|c| c["argv"][0] == first)
                .map(|c| c["id"].as_u64().unwrap().to_string())
                .unwrap_or_else(|| panic!("no {first} among {all:?} (via {via:?})"))
        };
        let (reader, sleeper) = (id_of("sh"), id_of("sleep"));
        // Reconnected to, with input: its output and status.
        let all_args = cli(&["commands", "attach", "-i", &id, &reader]);
        let out = strata_with_input(&all_args.iter().map(String::as_str).collect::<Vec<_>>(), "hello\n");
        assert_eq!(
            (out.status.code(), text(&out.stdout)),
            (Some(4), "got-hello\n".to_string()),
            "{}",
            text(&out.stderr)
        );
        // Signalled: it ends, and is listed no more.
        let killed = run(&["commands", "kill", "-s", "KILL", &id, &sleeper]);
        assert!(killed.status.success(), "{}", text(&killed.stderr));
        let gone = wait_until(Duration::from_secs(20), || {
            let out = run(&["commands", "ls", &id]);
            out.status.success() && !text(&out.stdout).contains("sleep 300")
        });
        assert!(gone, "the killed command is still listed (via {via:?})");
        let bad = run(&["commands", "kill", "-s", "NOPE", &id, &sleeper]);
        assert!(text(&bad.stderr).contains("is not a signal"), "{}", text(&bad.stderr));
        let missing = run(&["commands", "attach", &id, "4242"]);
        assert!(text(&missing.stderr).contains("no running command 4242"), "{}", text(&missing.stderr));
    }
}

/// A `strata` command (a kill) run when dropped, also when a test fails.
struct KilledOnDrop(Vec<String>);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let args: Vec<&str> = self.0.iter().map(String::as_str).collect();
        let _ = strata(&args).output();
    }
}
