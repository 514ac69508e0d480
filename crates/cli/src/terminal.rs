//! Attaching the user's terminal to a session, like `docker run -it` / `-i`.

use std::io::IsTerminal;
use std::io::Write;
use std::os::fd::BorrowedFd;

use nix::sys::termios::{self, SetArg, Termios};
use strata_engine::{Session, SessionEvent};
use strata_proto::WinSize;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

/// The detach sequence: Ctrl-P then Ctrl-Q, as in docker.
pub const DETACH_KEYS: [u8; 2] = [0x10, 0x11];

/// How an attachment ended.
#[derive(Debug, PartialEq, Eq)]
pub enum AttachEnd {
    Exited(i32),
    Detached,
    Lost(String),
    Interrupted,
    /// The terminal went away (SIGHUP: a closed window, a dropped SSH
    /// connection) or this process was asked to end (SIGTERM): the session
    /// is left detached, as after Ctrl-P Ctrl-Q.
    Vanished,
}

/// Set while a terminal is attached: the signals that end strata are then
/// the attachment's to handle (a vanished terminal detaches its session).
pub static ATTACHED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

struct Attaching;

impl Attaching {
    fn start() -> Attaching {
        ATTACHED.store(true, std::sync::atomic::Ordering::SeqCst);
        Attaching
    }
}

impl Drop for Attaching {
    fn drop(&mut self) {
        ATTACHED.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Puts the terminal in raw mode until dropped.
pub struct RawMode {
    saved: Termios,
}

fn stdin_fd() -> BorrowedFd<'static> {
    // SAFETY: fd 0 stays open for the life of the process.
    unsafe { BorrowedFd::borrow_raw(0) }
}

impl RawMode {
    /// Enters raw mode on standard input.
    ///
    /// # Errors
    /// If standard input is not a terminal.
    pub fn enter() -> nix::Result<RawMode> {
        let saved = termios::tcgetattr(stdin_fd())?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin_fd(), SetArg::TCSANOW, &raw)?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(stdin_fd(), SetArg::TCSANOW, &self.saved);
    }
}

/// Whether standard input is a terminal.
pub fn stdin_is_tty() -> bool {
    std::io::stdin().is_terminal()
}

/// The size of the terminal on standard input or output.
pub fn terminal_size() -> Option<WinSize> {
    for fd in [0, 1, 2] {
        let mut ws: libc::winsize = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCGWINSZ writes into the winsize we pass.
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_row > 0 && ws.ws_col > 0 {
            return Some(WinSize { rows: ws.ws_row, cols: ws.ws_col });
        }
    }
    None
}

/// Reads standard input in a thread of its own (a blocking read cannot be
/// cancelled); `None` marks end of input.
pub fn stdin_channel() -> mpsc::Receiver<Option<Vec<u8>>> {
    let (tx, rx) = mpsc::channel(64);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            // SAFETY: read into a buffer we own, from fd 0.
            let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            if n <= 0 {
                let _ = tx.blocking_send(None);
                return;
            }
            if tx.blocking_send(Some(buf[..n as usize].to_vec())).is_err() {
                return;
            }
        }
    });
    rx
}

/// Converts a terminal's CRLF line ends to LF for pipes, across chunks.
#[derive(Default)]
pub struct CrlfToLf {
    pending_cr: bool,
}

impl CrlfToLf {
    pub fn push(&mut self, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len() + 1);
        for &b in data {
            if self.pending_cr {
                self.pending_cr = false;
                if b != b'\n' {
                    out.push(b'\r');
                }
            }
            if b == b'\r' {
                self.pending_cr = true;
            } else {
                out.push(b);
            }
        }
        out
    }
}

fn write_out(data: &[u8]) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(data);
    let _ = out.flush();
}

/// Connects the terminal to the session until the program exits, the user
/// detaches, or a signal arrives. With `tty`, the terminal is raw, the
/// program's current screen is shown first and resizes follow.
///
/// # Errors
/// If the session's channel breaks while sending.
pub async fn attach(session: &mut Session, tty: bool) -> anyhow::Result<AttachEnd> {
    let _attached = Attaching::start();
    let _raw = if tty { Some(RawMode::enter()?) } else { None };
    if tty {
        write_out(&session.screen);
    }
    let mut input = stdin_channel();
    let mut input_open = true;
    let mut winch = signal(SignalKind::window_change())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut crlf = CrlfToLf::default();
    let mut last_key: Option<u8> = None;
    loop {
        tokio::select! {
            ev = session.next_event() => match ev {
                SessionEvent::Output(d) => write_out(&if tty { d } else { crlf.push(&d) }),
                SessionEvent::Exited(code) => return Ok(AttachEnd::Exited(code)),
                SessionEvent::Lost(why) => return Ok(AttachEnd::Lost(why)),
                SessionEvent::Detached | SessionEvent::Attached(_) | SessionEvent::Screen(_) | SessionEvent::File(_) | SessionEvent::Clipboard(_)
                    | SessionEvent::CommandOutput { .. } | SessionEvent::CommandExited { .. } | SessionEvent::Commands(_) => {}
            },
            data = input.recv(), if input_open => match data.flatten() {
                Some(d) => {
                    if tty {
                        if let Some(pos) = find_detach(last_key, &d) {
                            if pos > 0 { session.input(&d[..pos - 1]).await?; }
                            return Ok(AttachEnd::Detached);
                        }
                        last_key = d.last().copied();
                    }
                    session.input(&d).await?;
                }
                None => {
                    input_open = false;
                    if !tty { session.eof().await?; }
                }
            },
            _ = winch.recv() => if let Some(size) = terminal_size() { session.resize(size).await?; },
            _ = term.recv() => return Ok(AttachEnd::Vanished),
            _ = hup.recv() => return Ok(AttachEnd::Vanished),
            _ = int.recv() => return Ok(AttachEnd::Interrupted),
        }
    }
}

/// Index just past the detach sequence in `data`, given the previous key.
pub fn find_detach(prev: Option<u8>, data: &[u8]) -> Option<usize> {
    if prev == Some(DETACH_KEYS[0]) && data.first() == Some(&DETACH_KEYS[1]) {
        return Some(0);
    }
    data.windows(2).position(|w| w == DETACH_KEYS).map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crlf_is_converted_across_chunks() {
        let mut c = CrlfToLf::default();
        let mut out = c.push(b"42\r");
        out.extend(c.push(b"\n>>> \ra"));
        assert_eq!(out, b"42\n>>> \ra");
    }

    #[test]
    fn detach_sequence_is_found_within_and_across_reads() {
        assert_eq!(find_detach(None, b"ab\x10\x11"), Some(3));
        assert_eq!(find_detach(Some(0x10), b"\x11rest"), Some(0));
        assert_eq!(find_detach(None, b"\x10x"), None);
    }
}
