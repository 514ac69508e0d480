//! End-to-end: the context's devices (shared folders, network, persistent
//! home), `strata cp` and `strata context`, on real VMs.

mod common;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use strata_engine::context::{ContextSettings, PortForward, Share};
use strata_engine::{Engine, LogProgress, Session};

const ANSWER: Duration = Duration::from_secs(90);

fn plain() -> ContextSettings {
    ContextSettings::from_terminal(None)
}

/// A fresh directory under /tmp (one of the default share roots).
fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(format!("/tmp/strata-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Processes that have `file` open.
fn processes_with_open(file: &std::path::Path) -> Vec<u32> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(fds) = std::fs::read_dir(e.path().join("fd")) else { continue };
        if fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == file)) {
            found.push(pid);
        }
    }
    found
}

/// A port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn launch(eng: &Engine, package: &str, settings: &ContextSettings) -> Session {
    let pkg = eng.package(package).unwrap();
    eng.launch(&pkg, settings, &LogProgress).await.unwrap()
}

/// Types a line of Python and waits for the sentinel it prints last.
async fn python(s: &mut Session, code: &str) -> String {
    s.expect_after(format!("{code}; print(6*7)\n").as_bytes(), "\n42", ANSWER).await.unwrap()
}

#[tokio::test]
async fn a_shared_folder_carries_files_both_ways_and_a_readonly_one_refuses_writes() {
    if !e2e() {
        return;
    }
    let eng = engine();
    let rw = scratch("rw");
    let ro = scratch("ro");
    std::fs::write(rw.join("from-host.txt"), "written on the host").unwrap();
    std::fs::write(ro.join("keep.txt"), "read-only").unwrap();
    let mut settings = plain();
    settings.shares = vec![
        Share { host: rw.clone(), guest: "/mnt/rw".into(), readonly: false },
        Share { host: ro.clone(), guest: "/srv/ro".into(), readonly: true },
    ];
    let mut s = launch(&eng, "python3", &settings).await;
    let out = python(
        &mut s,
        "print('HOST:' + open('/mnt/rw/from-host.txt').read()); open('/mnt/rw/from-guest.txt','w').write('written in the guest')",
    )
    .await;
    assert!(out.contains("HOST:written on the host"), "{out:?}");
    assert_eq!(std::fs::read_to_string(rw.join("from-guest.txt")).unwrap(), "written in the guest");
    let out = python(
        &mut s,
        // One line: the REPL would need a blank line after a compound statement.
        r#"import errno; exec("try:\n open('/srv/ro/new.txt','w')\nexcept OSError as e:\n print('REFUSED', errno.errorcode[e.errno])")"#,
    )
    .await;
    assert!(out.contains("REFUSED EROFS"), "{out:?}");
    assert!(!ro.join("new.txt").exists());
    s.close().await;
    let _ = std::fs::remove_dir_all(&rw);
    let _ = std::fs::remove_dir_all(&ro);
}

#[tokio::test]
async fn no_network_by_default_and_a_forwarded_port_answers_at_once() {
    if !e2e() {
        return;
    }
    let eng = engine();
    let mut s = launch(&eng, "python3", &plain()).await;
    let out = python(&mut s, "import os; print('NICS', sorted(os.listdir('/sys/class/net')))").await;
    assert!(out.contains("NICS ['lo']"), "a VM without a network context has a network device: {out:?}");
    s.close().await;

    // lighttpd is already listening in its launch image: the forward answers
    // as soon as the session exists.
    let port = free_port();
    let mut settings = plain();
    settings.network.ports = vec![PortForward { host: port, guest: 80 }];
    let s = launch(&eng, "lighttpd", &settings).await;
    let page = tokio::task::spawn_blocking(move || {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        c.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
        let mut body = String::new();
        c.read_to_string(&mut body).unwrap();
        body
    })
    .await
    .unwrap();
    assert!(page.starts_with("HTTP/1.0 200"), "{page:?}");
    assert!(page.contains("<html"), "{page:?}");
    s.close().await;
}

#[tokio::test]
async fn the_persistent_home_survives_into_the_next_session_and_is_claimed_once() {
    if !e2e() {
        return;
    }
    let eng = engine();
    let terminal = format!("test-home-{}", std::process::id());
    let mut settings = plain();
    settings.home = Some(terminal.clone());
    let mut s = launch(&eng, "python3", &settings).await;
    python(&mut s, "open('/root/note.txt','w').write('kept across sessions')").await;
    // Stopped hard: what the program wrote must already be on the host.
    s.close().await;

    // Another package, same terminal: the file is there.
    let mut web = launch(&eng, "lighttpd", &settings).await;
    let out = std::env::temp_dir().join(format!("strata-note-{}", std::process::id()));
    web.copy_out("/root/note.txt", &out).await.unwrap();
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "kept across sessions");
    let _ = std::fs::remove_file(&out);

    // While it runs, nobody else gets that home, and no VM starts for trying.
    let home = env().state.join("homes").join(&terminal);
    let pkg = eng.package("python3").unwrap();
    let err = eng.launch(&pkg, &settings, &LogProgress).await.err().expect("a second claim is refused").to_string();
    assert!(err.contains("in use by session"), "{err}");
    let disk = home.join("debian-12.qcow2");
    assert_eq!(processes_with_open(&disk).len(), 1, "only the first session has the home open");
    web.close().await;
}

/// An HTTP GET of `path` on 127.0.0.1:`port`: the whole answer, or the error.
async fn http_get(port: u16, path: &str) -> Result<String, String> {
    let request = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
    tokio::task::spawn_blocking(move || {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        c.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
        let mut body = String::new();
        c.read_to_string(&mut body).map_err(|e| e.to_string())?;
        Ok(body)
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn a_session_with_a_home_and_a_forwarded_port_is_paused_and_resumed_with_them() {
    if !e2e() {
        return;
    }
    let eng = engine();
    let terminal = format!("test-pause-home-{}", std::process::id());
    let port = free_port();
    let mut settings = plain();
    settings.home = Some(terminal.clone());
    settings.network.ports = vec![PortForward { host: port, guest: 8000 }];
    let mut s = launch(&eng, "python3", &settings).await;
    // A web server thread in the program, serving the home.
    python(
        &mut s,
        "import http.server, threading, functools; open('/root/hello.txt','w').write('from the home'); \
         h = functools.partial(http.server.SimpleHTTPRequestHandler, directory='/root'); \
         srv = http.server.ThreadingHTTPServer(('', 8000), h); \
         threading.Thread(target=srv.serve_forever, daemon=True).start(); x = 41",
    )
    .await;
    assert!(http_get(port, "/hello.txt").await.unwrap().ends_with("from the home"));

    let id = s.id.clone();
    eng.pause_to_image(&mut s, "paused by a test").await.unwrap();
    drop(s);
    // Paused: nothing listens, and its home is still taken (its guest has it mounted).
    assert!(http_get(port, "/hello.txt").await.is_err(), "a paused session answers");
    let pkg = eng.package("python3").unwrap();
    let mut other = settings.clone();
    other.network.ports.clear();
    let err = eng.launch(&pkg, &other, &LogProgress).await.err().expect("the home is refused").to_string();
    assert!(err.contains(&format!("in use by session {id}")), "{err}");

    // Resumed: the same thread serves the same home on the same port, the
    // program's state is there, and the home takes new writes.
    let mut s = eng.resume_session(&id, None).await.unwrap();
    assert!(http_get(port, "/hello.txt").await.unwrap().ends_with("from the home"));
    let out = python(&mut s, "print('x is', x + 1); open('/root/after.txt','w').write('after the resume')").await;
    assert!(out.contains("x is 42"), "{out:?}");
    assert!(http_get(port, "/after.txt").await.unwrap().ends_with("after the resume"));
    s.close().await;

    // Shared folders cannot be saved by QEMU while mounted: refused, and the session runs on.
    let dir = scratch("pause-share");
    let mut shared = plain();
    shared.shares = vec![strata_engine::context::Share { host: dir.clone(), guest: "/mnt/s".into(), readonly: false }];
    let mut s = launch(&eng, "python3", &shared).await;
    let err = eng.pause_to_image(&mut s, "paused by a test").await.unwrap_err().to_string();
    assert!(err.contains("shared folders"), "{err}");
    python(&mut s, "print('still running')").await;
    s.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn bad_contexts_are_refused_before_any_vm_starts() {
    if !e2e() {
        return;
    }
    let eng = engine();
    let pkg = eng.package("bc").unwrap();
    // No other test of this file launches bc: a QEMU mapping its memory
    // file would be one this test started.
    let images = eng.ensure_images(&pkg, &LogProgress).await.unwrap();
    let memory = images.launch.file("memory").unwrap().to_string();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    let ok = scratch("ok");
    type Mutation = Box<dyn Fn(&mut ContextSettings)>;
    let cases: Vec<(Mutation, &str)> = vec![
        (
            Box::new(|s| {
                s.shares =
                    vec![Share { host: "/tmp/strata-no-such-dir".into(), guest: "/mnt/x".into(), readonly: false }]
            }),
            "cannot be used",
        ),
        (
            Box::new(|s| s.shares = vec![Share { host: "/etc".into(), guest: "/mnt/x".into(), readonly: true }]),
            "outside the folders",
        ),
        (
            Box::new(move |s| s.shares = vec![Share { host: "/tmp".into(), guest: "/etc".into(), readonly: false }]),
            "hide part of the system",
        ),
        (Box::new(move |s| s.network.ports = vec![PortForward { host: busy_port, guest: 80 }]), "cannot be forwarded"),
        (
            Box::new(|s| {
                s.network.ports = vec![PortForward { host: 40123, guest: 80 }, PortForward { host: 40123, guest: 81 }]
            }),
            "forwarded twice",
        ),
        (
            Box::new(|s| s.network.ports = vec![PortForward { host: 80, guest: 80 }]),
            "host port 80 is a privileged port",
        ),
        (Box::new(|s| s.home = Some("../escape".into())), "terminal name"),
        (
            Box::new(|s| s.screen = Some(strata_engine::context::Resolution { width: 20000, height: 600 })),
            "screen size",
        ),
        (Box::new(|s| s.keyboard = Some("qwertz-klingon".into())), "keyboard layout"),
    ];
    for (mutate, want) in cases {
        let mut s = plain();
        mutate(&mut s);
        let err = eng.launch(&pkg, &s, &LogProgress).await.err().expect("refused").to_string();
        assert!(err.contains(want), "{err:?} lacks {want:?}");
        assert!(qemu_processes_with(&memory).is_empty(), "a refused launch started a VM");
    }
    drop(busy);
    let _ = std::fs::remove_dir_all(&ok);
}

#[test]
fn cp_copies_files_into_and_out_of_a_detached_session_and_pause_keeps_them() {
    if !e2e() {
        return;
    }
    let run = strata(&["run", "-d", "python3"]).output().unwrap();
    assert!(run.status.success(), "{}", text(&run.stderr));
    let id = text(&run.stdout).trim().to_string();
    let dir = scratch("cp");
    // Bigger than one message, so it travels in pieces.
    let data: Vec<u8> = (0..2_500_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(dir.join("in.bin"), &data).unwrap();
    let into =
        strata(&["cp", dir.join("in.bin").to_str().unwrap(), &format!("{id}:/tmp/copied.bin")]).output().unwrap();
    assert!(into.status.success(), "{}", text(&into.stderr));
    let out =
        strata(&["cp", &format!("{id}:/tmp/copied.bin"), dir.join("out.bin").to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(std::fs::read(dir.join("out.bin")).unwrap() == data, "the copy came back different");
    let missing = strata(&["cp", &format!("{id}:/no/such/file"), dir.join("x").to_str().unwrap()]).output().unwrap();
    assert!(!missing.status.success());
    assert!(text(&missing.stderr).contains("No such file"), "{}", text(&missing.stderr));
    assert!(!dir.join("x").exists() && !dir.join(".x.strata-part").exists(), "a failed copy left a file");
    // `strata pause` saves it to an image; `resume` brings it back with the file.
    let pause = strata(&["pause", &id]).output().unwrap();
    assert!(pause.status.success(), "{}", text(&pause.stderr));
    let ps = text(&strata(&["ps"]).output().unwrap().stdout);
    assert!(ps.lines().any(|l| l.starts_with(&id) && l.contains("paused")), "{ps}");
    let refused = strata(&["cp", &format!("{id}:/tmp/copied.bin"), dir.join("x").to_str().unwrap()]).output().unwrap();
    assert!(!refused.status.success() && text(&refused.stderr).contains("paused"), "{}", text(&refused.stderr));
    let resume = strata(&["resume", &id]).output().unwrap();
    assert!(resume.status.success(), "{}", text(&resume.stderr));
    let _ = std::fs::remove_file(dir.join("out.bin"));
    let out =
        strata(&["cp", &format!("{id}:/tmp/copied.bin"), dir.join("out.bin").to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(std::fs::read(dir.join("out.bin")).unwrap() == data, "the file changed across pause and resume");
    let kill = strata(&["kill", &id]).output().unwrap();
    assert!(kill.status.success(), "{}", text(&kill.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn context_set_versions_a_terminals_context_and_refuses_bad_settings() {
    if !e2e() {
        return;
    }
    let terminal = format!("test-ctx-{}", std::process::id());
    let show = || {
        let out = strata(&["--terminal", &terminal, "context", "show", "--json"]).output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let set = |kv: &[&str]| {
        let mut args = vec!["--terminal", terminal.as_str(), "context", "set"];
        args.extend(kv);
        strata(&args).output().unwrap()
    };
    let v1 = show();
    assert!(set(&["timezone=Europe/Paris"]).status.success());
    let v2 = show();
    assert_eq!(v2["version"].as_u64(), v1["version"].as_u64().map(|v| v + 1));
    assert_eq!(v2["settings"]["timezone"], "Europe/Paris");
    // The same settings again: the same context image, no new version.
    assert!(set(&["timezone=Europe/Paris"]).status.success());
    assert_eq!(show()["digest"], v2["digest"]);
    assert!(set(&["ports=18080:80", "outbound=on"]).status.success());
    let v3 = show();
    assert_eq!(v3["settings"]["network"]["ports"][0]["guest"], 80);
    assert_eq!(v3["version"].as_u64(), v2["version"].as_u64().map(|v| v + 1));
    // Bad settings change nothing.
    for bad in [&["shares=/tmp/strata-no-such-dir:/mnt/x"][..], &["ports=99999:80"], &["colour=blue"]] {
        let out = set(bad);
        assert!(!out.status.success(), "{bad:?} was accepted");
        assert!(!text(&out.stderr).is_empty());
        assert_eq!(show()["digest"], v3["digest"], "{bad:?} changed the context");
    }
}

#[tokio::test]
async fn a_graphical_program_is_on_screen_at_once_and_follows_the_screen_size_and_keyboard() {
    if !e2e() {
        return;
    }
    let eng = engine();
    let mut st = plain();
    // A size the display does not list: the agent adds the mode.
    st.screen = Some(strata_engine::context::Resolution { width: 1008, height: 700 });
    st.keyboard = Some("de".into());
    let mut s = launch(&eng, "xeyes", &st).await;
    // Already drawn in the launch image: the first frame is not blank.
    let (w, h, lit) = s.screen_pixels().await.unwrap();
    assert!(lit > 500, "the screen is blank ({w}x{h}, {lit} pixels lit)");
    s.screenshot(std::path::Path::new("/tmp/strata-xeyes.png")).await.unwrap();
    // The context's size and layout are applied after the resume, no reboot.
    let state = std::env::temp_dir().join(format!("strata-display-{}", std::process::id()));
    let mut applied = String::new();
    for _ in 0..60 {
        if s.copy_out("/run/strata/display", &state).await.is_ok() {
            applied = std::fs::read_to_string(&state).unwrap_or_default();
            if applied.contains("layout") {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _ = std::fs::remove_file(&state);
    assert!(applied.contains("current 1008 x 700"), "{applied:?}");
    assert!(applied.lines().any(|l| l.starts_with("layout:") && l.trim_end().ends_with("de")), "{applied:?}");
    let (w, h, _) = s.screen_pixels().await.unwrap();
    assert_eq!((w, h), (1008, 700));
    // The clipboard, through the agent.
    s.set_clipboard("from the host \u{2713}").await.unwrap();
    assert_eq!(s.clipboard().await.unwrap(), "from the host \u{2713}");
    // Paused to an image (its VM stops) and resumed from it: the same
    // screen, and the clipboard's owner still running.
    let id = s.id.clone();
    let image = eng.pause_to_image(&mut s, "paused by a test").await.unwrap();
    assert_eq!(image.kind, strata_store::ImageKind::Paused);
    let qemu = s.vm_pid();
    drop(s);
    assert!(!std::path::Path::new(&format!("/proc/{qemu}")).exists(), "the paused session's QEMU still runs");
    let mut s = eng.resume_session(&id, Some(&st)).await.unwrap();
    let (w, h, lit) = s.screen_pixels().await.unwrap();
    assert!((w, h) == (1008, 700) && lit > 500, "after the resume: {w}x{h}, {lit} pixels lit");
    assert_eq!(s.clipboard().await.unwrap(), "from the host \u{2713}");
    s.close().await;
    // A console session has none.
    // python3, not bc: bc is kept for the refusal test, which watches for its VMs.
    let mut console = launch(&eng, "python3", &plain()).await;
    let err = console.clipboard().await.unwrap_err().to_string();
    assert!(err.contains("not a graphical package"), "{err}");
    console.close().await;
}

#[tokio::test]
async fn through_a_share_a_guest_makes_no_setuid_file_or_device_on_the_host() {
    if !e2e() {
        return;
    }
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let eng = engine();
    let rw = scratch("suid");
    let mut settings = plain();
    settings.shares = vec![Share { host: rw.clone(), guest: "/mnt/rw".into(), readonly: false }];
    let mut s = launch(&eng, "python3", &settings).await;
    let out = python(
        &mut s,
        "import os, stat; open('/mnt/rw/tool','w').write('x'); os.chmod('/mnt/rw/tool', 0o4755); \
         os.mknod('/mnt/rw/mem', stat.S_IFCHR | 0o666, os.makedev(1, 1)); \
         print('GUEST', oct(os.stat('/mnt/rw/tool').st_mode), stat.S_ISCHR(os.stat('/mnt/rw/mem').st_mode))",
    )
    .await;
    eprintln!("in the guest: {}", out.lines().find(|l| l.starts_with("GUEST")).unwrap_or("(nothing)"));
    // On the host: a plain file without the set-user-ID bit, and a plain
    // file for the device, both the VM's uid's (the guest's modes are kept
    // in extended attributes).
    let tool = std::fs::metadata(rw.join("tool")).unwrap();
    assert_eq!(tool.mode() & 0o7000, 0, "the host got a set-user-ID file: {:o}", tool.mode());
    assert_ne!(tool.uid(), 0, "the guest's file is root's on the host");
    let mem = std::fs::symlink_metadata(rw.join("mem")).unwrap();
    assert!(mem.file_type().is_file() && !mem.file_type().is_char_device(), "the host got a device: {mem:?}");
    let uid = tool.uid();
    s.close().await;
    // The VM's access to the folder goes with it.
    let acl = std::process::Command::new("getfacl").args(["-n", "-p"]).arg(&rw).output().unwrap();
    let acl = text(&acl.stdout);
    assert!(!acl.contains(&format!("user:{uid}:")), "the ended VM's uid keeps access: {acl}");
    let _ = std::fs::remove_dir_all(&rw);
}
