//! The wire protocol between the host and the guest agent.
//!
//! One virtio-serial port carries a stream of frames in both directions. A
//! frame is a little-endian `u32` length followed by that many bytes of a
//! postcard-encoded [`HostMsg`] or [`GuestMsg`]. The protocol is symmetric in
//! framing and deliberately tiny: the agent must start in milliseconds and
//! the launch path must not spend time encoding.

use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};

/// Name of the virtio-serial port the agent opens inside the guest.
pub const AGENT_PORT_NAME: &str = "org.strata.agent";

/// Largest frame either side accepts; larger ones mean a broken peer.
pub const MAX_FRAME: usize = 8 << 20;

/// Identifier of a process the agent runs on behalf of the host.
pub type ProcId = u32;

/// Errors of framing and decoding.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    FrameTooLarge(usize),
    #[error("malformed message")]
    Decode(#[source] postcard::Error),
    #[error("encoding message")]
    Encode(#[source] postcard::Error),
    #[error("channel I/O")]
    Io(#[from] io::Error),
}

/// A terminal's window size.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct WinSize {
    pub rows: u16,
    pub cols: u16,
}

impl Default for WinSize {
    fn default() -> Self {
        WinSize { rows: 24, cols: 80 }
    }
}

/// How the agent decides that a freshly started program is ready.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// This text appeared in the program's terminal output.
    Text(String),
    /// Something accepts TCP connections on this port inside the guest.
    Port(u16),
    /// The program is still alive this many milliseconds after it started.
    AliveMs(u32),
}

/// The terminal's side of a session, applied by the agent on every attach:
/// console, clock, zone, environment, and the devices the host plugged in
/// for it (network, shared folders, the persistent home).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct TerminalContext {
    pub term: String,
    pub size: WinSize,
    /// IANA zone name, e.g. `Europe/Paris`; `None` leaves the guest's zone.
    pub timezone: Option<String>,
    /// Locale name for `LANG`, e.g. `C.UTF-8`.
    pub locale: Option<String>,
    /// Extra environment for processes the agent starts from now on.
    pub env: Vec<(String, String)>,
    /// Host wall-clock time, so a resumed guest does not live in the past.
    pub unix_time_ms: u64,
    /// The network interface the host plugged in, if any; `None` means the
    /// guest has no network at all.
    pub network: Option<GuestNetwork>,
    /// File systems the host plugged in, to mount (idempotent on re-attach).
    pub mounts: Vec<GuestMount>,
    /// Screen size and keyboard layout of a graphical session.
    pub display: Option<GuestDisplay>,
    /// The API request behind this attach, for the guest's log.
    pub request_id: Option<String>,
}

/// What a graphical session's display follows from the terminal.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct GuestDisplay {
    /// Resolution in pixels; `None` keeps the current one.
    pub size: Option<(u16, u16)>,
    /// XKB layout name, e.g. `de`; `None` keeps the current one.
    pub keyboard: Option<String>,
}

/// A shell snippet that gives the X display `$DISPLAY` a screen of `w` by
/// `h` pixels with xrandr: the mode if the display has it, else one added
/// with simple blanking timings (the display is virtual, and Debian's
/// minimal guests have no `cvt`). Run by the agent for a context's size and
/// by the host to resize a running session.
pub fn screen_size_script(w: u16, h: u16) -> String {
    let (ht, vt) = (u32::from(w) + 160, u32::from(h) + 30);
    let clock = f64::from(ht * vt) * 60.0 / 1e6;
    let (hs, he, vs, ve) = (u32::from(w) + 48, u32::from(w) + 80, u32::from(h) + 3, u32::from(h) + 8);
    format!(
        "o=$(xrandr | awk '/ connected/ {{print $1; exit}}'); \
         xrandr --output \"$o\" --mode {w}x{h} 2>/dev/null || {{ \
         xrandr --newmode {w}x{h}_strata {clock:.2} {w} {hs} {he} {ht} {h} {vs} {ve} {vt} -hsync +vsync 2>/dev/null; \
         xrandr --addmode \"$o\" {w}x{h}_strata 2>/dev/null; xrandr --output \"$o\" --mode {w}x{h}_strata; }}; "
    )
}

/// Static IPv4 settings for the one network interface the host plugs in.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct GuestNetwork {
    pub address: [u8; 4],
    pub prefix_len: u8,
    pub gateway: [u8; 4],
    pub dns: Option<[u8; 4]>,
}

/// Where a mount's file system comes from.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum MountSource {
    /// A 9p share with this mount tag.
    Share(String),
    /// An ext4 disk whose virtio serial number is this.
    Disk(String),
}

/// A file system to mount at `path` in the guest.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct GuestMount {
    pub source: MountSource,
    pub path: String,
    pub readonly: bool,
}

/// Part of a file, read from or written to the guest.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct FilePart {
    pub data: Vec<u8>,
    /// Reading: no bytes follow. Writing: the file is complete and in place.
    pub eof: bool,
}

/// What the agent's X launcher prints when a graphical program has drawn:
/// the readiness text of graphical packages.
pub const X11_READY: &str = "strata-x11: ready";

/// Largest piece of a file one message carries.
pub const FILE_CHUNK: usize = 1 << 20;

/// What the host asks of the agent.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum HostMsg {
    /// A terminal is connected: apply its context and replay every screen.
    Attach(TerminalContext),
    /// The terminal goes away on purpose (before a snapshot, or a detach):
    /// keep the output as the screen, and write dirty data back now.
    Detach,
    /// The host stays but nobody watches: keep the output as the screen.
    /// (A host that vanishes is taken as one that went quiet: the guest
    /// never stops itself.)
    Quiet,
    /// Start a program on a new pseudo-terminal.
    Spawn {
        id: ProcId,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        readiness: Readiness,
        /// Give up waiting for readiness after this long.
        ready_timeout_ms: u32,
    },
    /// Bytes typed at the terminal.
    Input { id: ProcId, data: Vec<u8> },
    /// The terminal's input ended (a pipe closed): deliver end-of-file.
    Eof { id: ProcId },
    /// The terminal was resized.
    Resize { id: ProcId, size: WinSize },
    /// Send every program's screen, changing nothing else.
    Screen,
    /// Flush the file systems and power the guest off.
    PowerOff,
    /// Read up to `len` bytes of a guest file from `offset`.
    FileRead { path: String, offset: u64, len: u32 },
    /// Write `data` at `offset` of a new version of a guest file; with
    /// `last`, the new version replaces the file atomically.
    FileWrite { path: String, offset: u64, data: Vec<u8>, last: bool, mode: u32 },
    /// Read the text of the display's clipboard (graphical sessions).
    ClipboardGet,
    /// Put text on the display's clipboard, as if copied there.
    ClipboardSet { text: String },
    /// Run a command with pipes, not a terminal: its standard output comes
    /// back as [`GuestMsg::Output`], its standard error as
    /// [`GuestMsg::Stderr`], then [`GuestMsg::Exited`]; input is
    /// [`HostMsg::Input`], closed by [`HostMsg::Eof`]. A command that cannot
    /// start exits 127 (not found) or 126 (not executable), as from a shell.
    Exec {
        id: ProcId,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        /// Working directory (default: the user's home).
        cwd: Option<String>,
        /// User to run as, by name (default: root).
        user: Option<String>,
    },
    /// Send signal number `signal` to command `id` (started by
    /// [`HostMsg::Exec`]) and every process of its group.
    Signal { id: ProcId, signal: i32 },
    /// Like [`HostMsg::Exec`], on a new pseudo-terminal of `size`: output
    /// (one stream) as [`GuestMsg::Output`], input as [`HostMsg::Input`],
    /// resized by [`HostMsg::Resize`], then [`GuestMsg::Exited`].
    ExecPty {
        id: ProcId,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: Option<String>,
        user: Option<String>,
        size: WinSize,
    },
    /// List the commands started by [`HostMsg::Exec`] and
    /// [`HostMsg::ExecPty`] that run now (by any host), as
    /// [`GuestMsg::Commands`].
    ListCommands,
}

/// A command that runs in the guest, as [`GuestMsg::Commands`] lists it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct CommandState {
    pub id: ProcId,
    /// Its process in the guest.
    pub pid: i32,
    pub argv: Vec<String>,
    /// It runs on a pseudo-terminal.
    pub pty: bool,
}

/// The state of one process, sent on attach.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ProcState {
    pub id: ProcId,
    /// The most recent output, so a new terminal sees the program's screen.
    pub screen: Vec<u8>,
    /// Exit status if the program has ended.
    pub exit: Option<i32>,
}

/// The last bytes a terminal was sent of a program's output: where that
/// terminal is, when the agent's screen (its last output) is all there is
/// to go on from, after a snapshot or on another server after a move.
#[derive(Debug, Default, Clone)]
pub struct SentTail(Vec<u8>);

impl SentTail {
    /// How much of what was sent is kept.
    pub const KEPT: usize = 4096;
    /// How much of that must match the screen to be sure of the place.
    const MARK: usize = 256;

    /// Notes that `more` was sent.
    pub fn keep(&mut self, more: &[u8]) {
        self.0.extend_from_slice(more);
        if self.0.len() > Self::KEPT {
            self.0.drain(..self.0.len() - Self::KEPT);
        }
    }

    /// Forgets what was sent (a terminal that starts afresh).
    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// What of `screen` follows what was sent last: all of it if the place
    /// cannot be found, since repeating output is better than losing it.
    pub fn after<'a>(&self, screen: &'a [u8]) -> &'a [u8] {
        let mark = &self.0[self.0.len().saturating_sub(Self::MARK)..];
        if mark.is_empty() {
            return screen;
        }
        match screen.windows(mark.len()).rposition(|w| w == mark) {
            Some(at) => &screen[at + mark.len()..],
            None => screen,
        }
    }
}

/// What the agent tells the host.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum GuestMsg {
    /// Reply to [`HostMsg::Attach`].
    Attached { agent_version: String, procs: Vec<ProcState>, problems: Vec<String> },
    /// Reply to [`HostMsg::Screen`].
    Screens { procs: Vec<ProcState> },
    /// Reply to [`HostMsg::Detach`] and [`HostMsg::Quiet`]: no output is
    /// sent until the next attach.
    Detached,
    /// The program started; readiness is reported separately.
    Spawned { id: ProcId, pid: i32 },
    /// The program is ready by its readiness rule.
    Ready { id: ProcId },
    /// The program could not be started or did not become ready.
    Failed { id: ProcId, reason: String },
    /// Terminal output of a program.
    Output { id: ProcId, data: Vec<u8> },
    /// The program ended; `status` is its exit code, or 128 + signal number.
    Exited { id: ProcId, status: i32 },
    /// A request the agent could not act on.
    Error { message: String },
    /// Reply to [`HostMsg::FileRead`] and [`HostMsg::FileWrite`].
    File(Result<FilePart, String>),
    /// Reply to [`HostMsg::ClipboardGet`] and [`HostMsg::ClipboardSet`]: the
    /// clipboard's text.
    Clipboard(Result<String, String>),
    /// Standard error of a command run with [`HostMsg::Exec`].
    Stderr { id: ProcId, data: Vec<u8> },
    /// Reply to [`HostMsg::ListCommands`].
    Commands(Vec<CommandState>),
}

/// Encodes one message as a frame.
///
/// # Errors
/// Fails only if the message cannot be encoded or exceeds [`MAX_FRAME`].
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, Error> {
    let mut out = vec![0u8; 4];
    out = postcard::to_extend(msg, out).map_err(Error::Encode)?;
    let len = out.len() - 4;
    if len > MAX_FRAME {
        return Err(Error::FrameTooLarge(len));
    }
    out[..4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(out)
}

/// Decodes a frame's payload (without its length prefix).
///
/// # Errors
/// Fails if the bytes are not a valid message.
pub fn decode<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, Error> {
    postcard::from_bytes(payload).map_err(Error::Decode)
}

/// Reads a frame's length prefix and checks it against [`MAX_FRAME`].
///
/// # Errors
/// Fails if the length exceeds the limit.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, Error> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(Error::FrameTooLarge(len));
    }
    Ok(len)
}

/// Writes one message to a blocking writer.
///
/// # Errors
/// Fails on encoding or I/O errors.
pub fn write_msg<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), Error> {
    w.write_all(&encode(msg)?)?;
    w.flush()?;
    Ok(())
}

/// Reads one message from a blocking reader; `Ok(None)` at a clean end of stream.
///
/// # Errors
/// Fails on I/O errors, oversized frames or malformed messages.
pub fn read_msg<R: Read, T: for<'a> Deserialize<'a>>(r: &mut R) -> Result<Option<T>, Error> {
    let mut prefix = [0u8; 4];
    match r.read_exact(&mut prefix) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let mut payload = vec![0u8; frame_len(prefix)?];
    r.read_exact(&mut payload)?;
    decode(&payload).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_through_a_byte_stream() {
        let msgs = vec![
            HostMsg::Attach(TerminalContext { term: "xterm".into(), ..Default::default() }),
            HostMsg::Input { id: 3, data: b"print(6*7)\n".to_vec() },
            HostMsg::Eof { id: 3 },
        ];
        let mut buf = Vec::new();
        for m in &msgs {
            write_msg(&mut buf, m).unwrap();
        }
        let mut r = &buf[..];
        for m in &msgs {
            let got: HostMsg = read_msg(&mut r).unwrap().unwrap();
            assert_eq!(&got, m);
        }
        assert!(read_msg::<_, HostMsg>(&mut r).unwrap().is_none());
    }

    #[test]
    fn oversized_frame_is_refused() {
        let prefix = ((MAX_FRAME + 1) as u32).to_le_bytes();
        assert!(matches!(frame_len(prefix), Err(Error::FrameTooLarge(_))));
    }

    #[test]
    fn garbage_payload_is_an_error_not_a_panic() {
        let buf = [3u8, 0, 0, 0, 0xff, 0xff, 0xff];
        assert!(read_msg::<_, GuestMsg>(&mut &buf[..]).is_err());
    }

    #[test]
    fn a_terminal_is_given_only_what_followed_its_place_on_the_screen() {
        let mut sent = SentTail::default();
        for i in 0..2000 {
            sent.keep(format!("{i}\n").as_bytes());
        }
        assert_eq!(sent.0.len(), SentTail::KEPT);
        assert!(sent.0.ends_with(b"1999\n"));
        // The screen holds what was sent and what followed while nobody watched.
        let screen: Vec<u8> = (1500..2003).flat_map(|i| format!("{i}\n").into_bytes()).collect();
        assert_eq!(sent.after(&screen), b"2000\n2001\n2002\n");
        // Nothing new.
        let same: Vec<u8> = (1500..2000).flat_map(|i| format!("{i}\n").into_bytes()).collect();
        assert_eq!(sent.after(&same), b"");
        // Its place scrolled off the screen: all of it, repeated rather than lost.
        assert_eq!(sent.after(b"9000\n"), b"9000\n");
        // A terminal sent nothing yet gets the whole screen.
        assert_eq!(SentTail::default().after(b"hello"), b"hello");
    }
}
