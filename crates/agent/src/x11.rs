//! `strata-agent x11 -- PROGRAM [ARGS]`: runs a graphical program on the
//! VM's display. It writes an X server configuration for the devices this
//! VM has (no udev in strata guests, so input devices are listed by hand),
//! starts the X server, waits for its socket, starts a window manager and
//! the program, waits until the program's window is drawn (the screen
//! holds lit pixels and two looks in a row see the same picture) and at
//! least `STRATA_X11_SETTLE_MS` have passed, prints [`READY`] (the
//! readiness text of graphical packages) and then waits for the program,
//! exiting as it does. Waiting for the picture, not only for the time, is
//! what makes a launch image hold the window and never a black screen.

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
    let started = Instant::now();
    let settle: u64 = std::env::var("STRATA_X11_SETTLE_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let settle = Duration::from_millis(settle.min(600_000));
    if let Err(e) = wait_until_drawn(&mut child, started + settle + Duration::from_secs(300)) {
        fail(format!("{program}: {e}"));
    }
    std::thread::sleep(settle.saturating_sub(started.elapsed()));
    if let Ok(Some(st)) = child.try_wait() {
        fail(format!("{program} exited before it was ready ({st})"));
    }
    println!("{READY}");
    let status = child.wait().map(|s| s.code().unwrap_or(1)).unwrap_or(1);
    std::process::exit(status);
}

/// Waits until the screen shows something (a lit pixel) and two looks
/// [`LOOK_EVERY`] apart see the same picture, so the program has drawn its
/// window and is not in the middle of drawing it. Fails if the program
/// exits or `deadline` passes first.
fn wait_until_drawn(child: &mut std::process::Child, deadline: Instant) -> Result<(), String> {
    use x11rb::connection::Connection;
    use x11rb::protocol::xproto::{ConnectionExt, ImageFormat};
    const LOOK_EVERY: Duration = Duration::from_millis(150);
    let (conn, screen) = x11rb::connect(Some(DISPLAY)).map_err(|e| format!("cannot reach the X server: {e}"))?;
    let root = &conn.setup().roots[screen];
    let (window, width, height) = (root.root, root.width_in_pixels, root.height_in_pixels);
    let mut previous: Option<u64> = None;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(format!("exited before its window was drawn ({st})"));
        }
        let image = conn
            .get_image(ImageFormat::Z_PIXMAP, window, 0, 0, width, height, !0)
            .map_err(|e| format!("reading the screen: {e}"))?
            .reply()
            .map_err(|e| format!("reading the screen: {e}"))?;
        let picture = lit_picture(&image.data);
        if picture.is_some() && picture == previous {
            return Ok(());
        }
        previous = picture;
        if Instant::now() > deadline {
            return Err("its window was not drawn in time (the screen stayed black or kept changing)".into());
        }
        // Only while capturing a launch image: nothing to wait on but the picture.
        std::thread::sleep(LOOK_EVERY);
    }
}

/// A fingerprint of a 32-bit-per-pixel screen image, or None while every
/// pixel is black.
fn lit_picture(pixels: &[u8]) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let lit = pixels.chunks_exact(4).any(|p| p[0] | p[1] | p[2] != 0);
    lit.then(|| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        pixels.hash(&mut h);
        h.finish()
    })
}

/// Largest clipboard text carried either way.
pub const MAX_CLIPBOARD: usize = 1 << 20;

/// Starts xclip on the display with `args`, one end piped: its output
/// (`read`) or its input. The reaper collects it when it exits.
fn xclip(args: &[&str], read: bool) -> Result<std::process::Child, String> {
    let (stdin, stdout) = if read { (Stdio::null(), Stdio::piped()) } else { (Stdio::piped(), Stdio::null()) };
    Command::new("xclip")
        .args(args)
        .env("DISPLAY", DISPLAY)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run xclip: {e}"))
}

/// The X clipboard's text; xclip's output ends when it exits.
pub fn clipboard_get() -> Result<String, String> {
    use std::io::Read;
    let stdout = xclip(&["-o", "-selection", "clipboard"], true)?.stdout.take().ok_or("xclip has no output")?;
    let mut out = Vec::new();
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
    let mut stdin =
        xclip(&["-i", "-selection", "clipboard", "-quiet"], false)?.stdin.take().ok_or("xclip has no input")?;
    stdin.write_all(text.as_bytes()).map_err(|e| format!("writing the clipboard: {e}"))?;
    Ok(text.to_string())
}

#[cfg(test)]
mod tests {
    use super::lit_picture;

    #[test]
    fn a_black_screen_is_no_picture() {
        assert_eq!(lit_picture(&[0; 64]), None);
        // The fourth byte of a pixel is padding, not colour.
        assert_eq!(lit_picture(&[0, 0, 0, 255, 0, 0, 0, 255]), None);
    }

    #[test]
    fn pictures_differ_when_pixels_do() {
        let a = lit_picture(&[0, 0, 9, 0, 0, 0, 0, 0]);
        let b = lit_picture(&[0, 0, 0, 0, 9, 0, 0, 0]);
        assert!(a.is_some() && b.is_some());
        assert_ne!(a, b);
        assert_eq!(a, lit_picture(&[0, 0, 9, 0, 0, 0, 0, 0]));
    }
}
