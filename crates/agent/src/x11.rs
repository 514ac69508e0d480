//! `strata-agent x11 -- PROGRAM [ARGS]`: runs a graphical program on the
//! VM's display. It writes an X server configuration for the devices this
//! VM has (no udev in strata guests, so input devices are listed by hand),
//! starts the X server, waits for its socket, starts a window manager and
//! the program, gives it
//! `STRATA_X11_SETTLE_MS` to draw, prints [`READY`] (the readiness text of
//! graphical packages) and then waits for the program, exiting as it does.

use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The X display strata's graphical programs use.
pub const DISPLAY: &str = ":0";
const SOCKET: &str = "/tmp/.X11-unix/X0";
const CONFIG: &str = "/run/strata/xorg.conf";
/// Printed once the program has had its time to draw.
pub const READY: &str = strata_proto::X11_READY;

/// Event devices of the guest, from /proc/bus/input/devices.
fn event_devices() -> Vec<String> {
    let text = fs::read_to_string("/proc/bus/input/devices").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.strip_prefix("H: Handlers="))
        .flat_map(|h| h.split_whitespace().filter(|w| w.starts_with("event")).map(str::to_string).collect::<Vec<_>>())
        .collect()
}

fn config(events: &[String]) -> String {
    let mut c = String::from(
        "Section \"ServerFlags\"\n  Option \"AutoAddDevices\" \"false\"\n  Option \"AutoEnableDevices\" \"false\"\n  \
         Option \"BlankTime\" \"0\"\n  Option \"StandbyTime\" \"0\"\n  Option \"SuspendTime\" \"0\"\n  Option \"OffTime\" \"0\"\nEndSection\n\
         Section \"Device\"\n  Identifier \"card\"\n  Driver \"modesetting\"\n  Option \"kmsdev\" \"/dev/dri/card0\"\n  \
         Option \"ShadowFB\" \"on\"\nEndSection\n\
         Section \"Screen\"\n  Identifier \"screen\"\n  Device \"card\"\n  DefaultDepth 24\nEndSection\n",
    );
    for e in events {
        c.push_str(&format!(
            "Section \"InputDevice\"\n  Identifier \"{e}\"\n  Driver \"evdev\"\n  Option \"Device\" \"/dev/input/{e}\"\nEndSection\n"
        ));
    }
    c.push_str("Section \"ServerLayout\"\n  Identifier \"strata\"\n  Screen \"screen\"\n");
    for e in events {
        c.push_str(&format!("  InputDevice \"{e}\"\n"));
    }
    c.push_str("EndSection\n");
    c
}

/// Entry point of `strata-agent x11 -- PROGRAM [ARGS]`; never returns.
pub fn main(args: &[String]) -> ! {
    let fail = |m: String| -> ! {
        eprintln!("strata-x11: {m}");
        std::process::exit(127);
    };
    let Some(program) = args.first() else { fail("usage: strata-agent x11 -- PROGRAM [ARGS]".into()) };
    if let Err(e) = fs::write(CONFIG, config(&event_devices())) {
        fail(format!("writing {CONFIG}: {e}"));
    }
    let _ = fs::create_dir_all("/tmp/.X11-unix");
    let server = Command::new("Xorg")
        .args([DISPLAY, "vt1", "-nolisten", "tcp", "-noreset", "-nocursor", "-config", CONFIG])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let mut server = server.unwrap_or_else(|e| fail(format!("cannot start Xorg: {e}")));
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::path::Path::new(SOCKET).exists() {
        if let Ok(Some(st)) = server.try_wait() {
            let log = fs::read_to_string("/var/log/Xorg.0.log").unwrap_or_default();
            let tail: Vec<&str> = log.lines().filter(|l| l.contains("(EE)")).collect();
            fail(format!("Xorg exited ({st}):\n{}", tail.join("\n")));
        }
        if Instant::now() > deadline {
            fail("Xorg did not open its socket within 120 s".into());
        }
        // Only while capturing a launch image: the program starts after X.
        std::thread::sleep(Duration::from_millis(20));
    }
    // The window manager: full-screen windows that get the keyboard.
    let wm = Command::new("matchbox-window-manager")
        .args(["-use_titlebar", "no", "-use_cursor", "no"])
        .env("DISPLAY", DISPLAY)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    if let Err(e) = wm {
        eprintln!("strata-x11: no window manager ({e}); the program may not get the keyboard");
    }
    let mut child = Command::new(program)
        .args(&args[1..])
        .env("DISPLAY", DISPLAY)
        .spawn()
        .unwrap_or_else(|e| fail(format!("cannot run {program}: {e}")));
    let settle: u64 = std::env::var("STRATA_X11_SETTLE_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    std::thread::sleep(Duration::from_millis(settle.min(600_000)));
    if let Ok(Some(st)) = child.try_wait() {
        fail(format!("{program} exited before it was ready ({st})"));
    }
    println!("{READY}");
    let status = child.wait().map(|s| s.code().unwrap_or(1)).unwrap_or(1);
    std::process::exit(status);
}

/// Largest clipboard text carried either way.
pub const MAX_CLIPBOARD: usize = 1 << 20;

/// The X clipboard's text, read with xclip. The reaper collects xclip; its
/// output ends when it exits.
pub fn clipboard_get() -> Result<String, String> {
    use std::io::Read;
    let mut child = Command::new("xclip")
        .args(["-o", "-selection", "clipboard"])
        .env("DISPLAY", DISPLAY)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run xclip: {e}"))?;
    let mut out = Vec::new();
    let stdout = child.stdout.take().ok_or("xclip has no output")?;
    stdout.take(MAX_CLIPBOARD as u64).read_to_end(&mut out).map_err(|e| format!("reading the clipboard: {e}"))?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Puts `text` on the X clipboard: xclip keeps serving it until another
/// program takes the clipboard.
pub fn clipboard_set(text: &str) -> Result<String, String> {
    use std::io::Write;
    if text.len() > MAX_CLIPBOARD {
        return Err(format!("clipboard text of {} bytes is over the limit of {MAX_CLIPBOARD}", text.len()));
    }
    let mut child = Command::new("xclip")
        .args(["-i", "-selection", "clipboard", "-quiet"])
        .env("DISPLAY", DISPLAY)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run xclip: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("xclip has no input")?;
    stdin.write_all(text.as_bytes()).map_err(|e| format!("writing the clipboard: {e}"))?;
    Ok(text.to_string())
}
