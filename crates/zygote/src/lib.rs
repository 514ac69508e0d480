//! QEMU from a fork server.
//!
//! Starting QEMU by `exec` costs ~33 ms of CPU under TCG on the reference
//! machine, and a third of it is the same work every time: mapping 50
//! libraries and applying a quarter of a million relocations, each page
//! of them faulted in. A fork server does that once: QEMU is started with
//! strata's preload library (`strata-zygote-preload`), which takes over
//! before QEMU's own code runs (its `main`, even its constructors) and
//! waits on a socket. For each VM it forks; the child becomes an ordinary
//! QEMU with the VM's arguments, environment and descriptors. What the
//! children share with the server (relocated pages) stays shared.
//!
//! This crate has both ends: [`ForkServer`] is strata's side, [`serve`]
//! runs inside the server process. Messages are one datagram each on a
//! `SOCK_SEQPACKET` socket pair, descriptors passed with `SCM_RIGHTS`.

pub mod monitor;
pub mod seccomp;
pub mod view;

pub use view::{FileView, Shown, Steps, VIEW_MOUNT_POINT};

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// The environment variable that turns a QEMU with the preload library into
/// a fork server: the number of its end of the socket pair.
pub const SERVER_FD_ENV: &str = "STRATA_ZYGOTE_FD";

/// The server's command line, after QEMU's path: a marker, then room that
/// each child overwrites with its own arguments, so that /proc/PID/cmdline
/// shows them (strata finds a session's QEMU by it).
pub const MARKER: &str = "--strata-fork-server";
const CMDLINE_ROOM: usize = 32 * 1024;

const MAGIC: &[u8; 4] = b"SZ2\0";
/// Largest message either way; a QEMU command line is a few KiB.
pub const MAX_MESSAGE: usize = 256 * 1024;
/// Most descriptors one child gets (stdio and a few sockets).
pub const MAX_FDS: usize = 16;
const MAX_STRINGS: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("fork server: {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("fork server: malformed message: {0}")]
    Protocol(&'static str),
    #[error("fork server could not start QEMU: {0}")]
    Spawn(String),
    #[error("fork server did not come up: {0}")]
    NotReady(String),
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> Error {
    move |source| Error::Io { what, source }
}

/// What a child is to become.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SpawnRequest {
    /// The whole argument vector, program name first.
    pub args: Vec<Vec<u8>>,
    /// `NAME=value` entries: the child's whole environment.
    pub env: Vec<Vec<u8>>,
    /// For each descriptor sent along, in order, the number it gets in the
    /// child (0, 1 and 2 for standard input, output and error).
    pub fd_targets: Vec<i32>,
    pub niceness: i32,
    /// SIGKILL the child when the fork server exits (which it does when
    /// strata's end of the socket closes, strata's death included).
    pub die_with_parent: bool,
    /// No transparent huge pages for the child.
    pub no_thp: bool,
    /// The user and groups the child runs as (never root, for a VM).
    pub credentials: Option<Credentials>,
    /// The largest file the child may write, in bytes (0: no bound).
    pub file_size_limit: u64,
    /// The file system the child sees (a mount namespace of its own), made
    /// by the fork handler [`install_fork_handler`] registers, before
    /// QEMU's own handlers start threads in the child.
    pub view: Option<FileView>,
    /// The last two descriptors sent along are not the child's but its
    /// monitor's: the read end of the pipe QEMU writes the guest's console
    /// into, and the console log ([`monitor::Console`]). Only with a view.
    pub console: bool,
}

/// What every QEMU goes through before it runs, exec'd or forked, in this
/// order: it can never gain privileges (set-user-ID programs, file
/// capabilities); it gets IPC and UTS namespaces of its own (no System V
/// objects of the host's or another VM's); each file it writes is bounded
/// (`file_size_limit` bytes, 0: none); and with `credentials` its open
/// files are bounded and it stops being root. System calls only.
///
/// # Errors
/// Which step failed (errno holds why).
///
/// # Safety
/// Changes the whole process; call it in a child about to become QEMU.
pub unsafe fn confine_self(file_size_limit: u64, credentials: Option<&Credentials>) -> Result<(), &'static str> {
    // SAFETY: plain system calls on this process.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err("no_new_privs");
        }
        if libc::unshare(CHILD_NAMESPACES) != 0 {
            return Err("unsharing the IPC and UTS namespaces");
        }
        if file_size_limit != 0 && limit_file_size(file_size_limit).is_err() {
            return Err("limiting the size of files");
        }
        if let Some(c) = credentials {
            if limit_open_files().is_err() {
                return Err("limiting open files");
            }
            c.assume()?;
        }
    }
    Ok(())
}

/// Most descriptors a confined QEMU may have open (its disks, sockets, a
/// few per VNC client and chardev; far above what one VM uses).
pub const OPEN_FILES_MAX: u64 = 4096;

/// Bounds the descriptors this process may have open to
/// [`OPEN_FILES_MAX`]. Async-signal-safe.
///
/// # Errors
/// If the limit cannot be set (the OS error; nothing is allocated).
pub fn limit_open_files() -> io::Result<()> {
    let limit = libc::rlimit { rlim_cur: OPEN_FILES_MAX, rlim_max: OPEN_FILES_MAX };
    // SAFETY: a plain system call on this process.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Bounds the size of any file this process writes to `bytes`; a write
/// beyond fails with `EFBIG` instead of killing it (`SIGXFSZ` ignored,
/// which an exec keeps). Async-signal-safe.
///
/// # Errors
/// If the limit cannot be set (the OS error; nothing is allocated).
pub fn limit_file_size(bytes: u64) -> io::Result<()> {
    let limit = libc::rlimit { rlim_cur: bytes, rlim_max: bytes };
    // SAFETY: plain system calls on this process.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A user id, group id and supplementary groups a process takes on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// Most supplementary groups in [`Credentials`].
const MAX_GROUPS: usize = 16;

impl Credentials {
    /// Makes this process (every thread of it: glibc tells them all) run
    /// as these ids, with no capabilities left (a change away from uid 0
    /// clears them). Only async-signal-safe calls: usable between fork and
    /// exec.
    ///
    /// # Errors
    /// Which step failed (errno holds why).
    ///
    /// # Safety
    /// Changes the ids of the whole process.
    pub unsafe fn assume(&self) -> Result<(), &'static str> {
        if self.uid == 0 || self.gid == 0 {
            return Err("refusing to run a VM as root");
        }
        // SAFETY: plain system calls on this process, with memory we own.
        unsafe {
            if libc::setgroups(self.groups.len(), self.groups.as_ptr()) != 0 {
                return Err("setgroups");
            }
            if libc::setresgid(self.gid, self.gid, self.gid) != 0 {
                return Err("setresgid");
            }
            if libc::setresuid(self.uid, self.uid, self.uid) != 0 {
                return Err("setresuid");
            }
            // Belt and braces: root cannot be regained.
            if libc::setuid(0) == 0 {
                return Err("root regained after dropping it");
            }
        }
        Ok(())
    }
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Reads the message a little-endian field at a time.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], Error> {
        if self.0.len() < n {
            return Err(Error::Protocol("message ends early"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn i32(&mut self) -> Result<i32, Error> {
        Ok(i32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    /// A NUL-terminated string (without its NUL).
    fn string(&mut self) -> Result<Vec<u8>, Error> {
        let end = self.0.iter().position(|b| *b == 0).ok_or(Error::Protocol("string without its NUL"))?;
        let s = self.0[..end].to_vec();
        self.0 = &self.0[end + 1..];
        Ok(s)
    }
}

const FLAG_DIE_WITH_PARENT: u32 = 1;
const FLAG_NO_THP: u32 = 2;
const FLAG_CREDENTIALS: u32 = 4;
const FLAG_FILE_SIZE: u32 = 8;
const FLAG_VIEW: u32 = 16;
const FLAG_CONSOLE: u32 = 32;

impl SpawnRequest {
    /// # Errors
    /// If a string holds a NUL byte, or the request is too large.
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        if self.args.is_empty() {
            return Err(Error::Protocol("no program name"));
        }
        if self.fd_targets.len() > MAX_FDS || self.args.len() + self.env.len() > MAX_STRINGS {
            return Err(Error::Protocol("too many descriptors or strings"));
        }
        let mut out = MAGIC.to_vec();
        let flags = if self.die_with_parent { FLAG_DIE_WITH_PARENT } else { 0 }
            | if self.no_thp { FLAG_NO_THP } else { 0 }
            | if self.credentials.is_some() { FLAG_CREDENTIALS } else { 0 }
            | if self.file_size_limit != 0 { FLAG_FILE_SIZE } else { 0 }
            | if self.view.is_some() { FLAG_VIEW } else { 0 }
            | if self.console { FLAG_CONSOLE } else { 0 };
        if self.console && self.view.is_none() {
            return Err(Error::Protocol("a console kept by a monitor without a view"));
        }
        put_u32(&mut out, flags);
        out.extend_from_slice(&self.niceness.to_le_bytes());
        if self.file_size_limit != 0 {
            out.extend_from_slice(&self.file_size_limit.to_le_bytes());
        }
        if let Some(view) = &self.view {
            let entries = view.encode();
            if entries.len() > MAX_STRINGS {
                return Err(Error::Protocol("too many paths in the view"));
            }
            put_u32(&mut out, entries.len() as u32);
            for e in entries {
                if e.contains(&0) {
                    return Err(Error::Protocol("a path of the view holds a NUL byte"));
                }
                out.extend_from_slice(&e);
                out.push(0);
            }
        }
        if let Some(c) = &self.credentials {
            if c.groups.len() > MAX_GROUPS {
                return Err(Error::Protocol("too many groups"));
            }
            put_u32(&mut out, c.uid);
            put_u32(&mut out, c.gid);
            put_u32(&mut out, c.groups.len() as u32);
            for g in &c.groups {
                put_u32(&mut out, *g);
            }
        }
        put_u32(&mut out, self.fd_targets.len() as u32);
        for t in &self.fd_targets {
            out.extend_from_slice(&t.to_le_bytes());
        }
        put_u32(&mut out, self.args.len() as u32);
        put_u32(&mut out, self.env.len() as u32);
        for s in self.args.iter().chain(&self.env) {
            if s.contains(&0) {
                return Err(Error::Protocol("a string holds a NUL byte"));
            }
            out.extend_from_slice(s);
            out.push(0);
        }
        if out.len() > MAX_MESSAGE {
            return Err(Error::Protocol("request too large"));
        }
        Ok(out)
    }

    /// # Errors
    /// If the bytes are not a whole request.
    pub fn decode(buf: &[u8]) -> Result<SpawnRequest, Error> {
        let mut r = Reader(buf);
        if r.take(4)? != MAGIC {
            return Err(Error::Protocol("bad magic"));
        }
        let flags = r.u32()?;
        let niceness = r.i32()?;
        let file_size_limit =
            if flags & FLAG_FILE_SIZE != 0 { u64::from_le_bytes(r.take(8)?.try_into().expect("8 bytes")) } else { 0 };
        let view = if flags & FLAG_VIEW != 0 {
            let n = r.u32()? as usize;
            if n > MAX_STRINGS {
                return Err(Error::Protocol("too many paths in the view"));
            }
            let entries = (0..n).map(|_| r.string()).collect::<Result<Vec<_>, _>>()?;
            Some(FileView::decode(&entries).ok_or(Error::Protocol("malformed view"))?)
        } else {
            None
        };
        let credentials = if flags & FLAG_CREDENTIALS != 0 {
            let (uid, gid, ngroups) = (r.u32()?, r.u32()?, r.u32()? as usize);
            if ngroups > MAX_GROUPS {
                return Err(Error::Protocol("too many groups"));
            }
            let groups = (0..ngroups).map(|_| r.u32()).collect::<Result<Vec<_>, _>>()?;
            Some(Credentials { uid, gid, groups })
        } else {
            None
        };
        let nfds = r.u32()? as usize;
        if nfds > MAX_FDS {
            return Err(Error::Protocol("too many descriptors"));
        }
        let fd_targets = (0..nfds).map(|_| r.i32()).collect::<Result<Vec<_>, _>>()?;
        if fd_targets.iter().any(|t| *t < 0) {
            return Err(Error::Protocol("negative descriptor number"));
        }
        let (nargs, nenv) = (r.u32()? as usize, r.u32()? as usize);
        if nargs == 0 || nargs + nenv > MAX_STRINGS {
            return Err(Error::Protocol("bad number of strings"));
        }
        let args = (0..nargs).map(|_| r.string()).collect::<Result<Vec<_>, _>>()?;
        let env = (0..nenv).map(|_| r.string()).collect::<Result<Vec<_>, _>>()?;
        if !r.0.is_empty() {
            return Err(Error::Protocol("trailing bytes"));
        }
        Ok(SpawnRequest {
            args,
            env,
            fd_targets,
            niceness,
            die_with_parent: flags & FLAG_DIE_WITH_PARENT != 0,
            no_thp: flags & FLAG_NO_THP != 0,
            console: flags & FLAG_CONSOLE != 0 && view.is_some(),
            credentials,
            file_size_limit,
            view,
        })
    }

    /// How many descriptors come with this request.
    pub fn fd_count(&self) -> usize {
        self.fd_targets.len() + if self.console { 2 } else { 0 }
    }
}

/// The server's answer to a request: the child's pid (its pidfd comes with
/// it), or why there is no child, or the CPU its children used. The first
/// message, before any request, is `Ready`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Spawned {
        pid: i32,
    },
    Failed {
        errno: i32,
        what: String,
    },
    Usage(Usage),
    /// The server is ready: its own pid, and how many of QEMU's machine
    /// classes it prepared for its children or why it did not.
    Ready {
        pid: i32,
        prepared: Result<u32, String>,
    },
}

/// CPU time and page faults of the server and its exited children.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub cpu_us: u64,
    pub page_faults: u64,
}

/// A request for [`Usage`] instead of a child.
const USAGE_REQUEST: &[u8; 4] = b"SZU\0";

impl Reply {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        match self {
            Reply::Spawned { pid } => {
                out.push(1);
                out.extend_from_slice(&pid.to_le_bytes());
            }
            Reply::Failed { errno, what } => {
                out.push(2);
                out.extend_from_slice(&errno.to_le_bytes());
                out.extend_from_slice(what.as_bytes());
            }
            Reply::Usage(u) => {
                out.push(3);
                out.extend_from_slice(&u.cpu_us.to_le_bytes());
                out.extend_from_slice(&u.page_faults.to_le_bytes());
            }
            Reply::Ready { pid, prepared } => {
                out.push(4);
                out.extend_from_slice(&pid.to_le_bytes());
                match prepared {
                    Ok(n) => {
                        out.push(1);
                        out.extend_from_slice(&n.to_le_bytes());
                    }
                    Err(why) => {
                        out.push(0);
                        out.extend_from_slice(why.as_bytes());
                    }
                }
            }
        }
        out
    }

    /// # Errors
    /// If the bytes are not a reply.
    pub fn decode(buf: &[u8]) -> Result<Reply, Error> {
        let mut r = Reader(buf);
        if r.take(4)? != MAGIC {
            return Err(Error::Protocol("bad magic"));
        }
        let reply = match r.take(1)?[0] {
            1 => Reply::Spawned { pid: r.i32()? },
            2 => {
                Reply::Failed { errno: r.i32()?, what: String::from_utf8_lossy(std::mem::take(&mut r.0)).into_owned() }
            }
            3 => {
                let u64 = |r: &mut Reader<'_>| -> Result<u64, Error> {
                    Ok(u64::from_le_bytes(r.take(8)?.try_into().expect("8 bytes")))
                };
                Reply::Usage(Usage { cpu_us: u64(&mut r)?, page_faults: u64(&mut r)? })
            }
            4 => {
                let pid = r.i32()?;
                let prepared = match r.take(1)?[0] {
                    1 => Ok(u32::from_le_bytes(r.take(4)?.try_into().expect("4 bytes"))),
                    0 => Err(String::from_utf8_lossy(std::mem::take(&mut r.0)).into_owned()),
                    _ => return Err(Error::Protocol("bad readiness")),
                };
                Reply::Ready { pid, prepared }
            }
            _ => return Err(Error::Protocol("unknown reply")),
        };
        if !r.0.is_empty() {
            return Err(Error::Protocol("trailing bytes"));
        }
        Ok(reply)
    }
}

impl Usage {
    /// This process's usage and that of its children that were waited for.
    pub fn of_this_process() -> Usage {
        let mut total = Usage::default();
        for who in [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN] {
            // SAFETY: rusage is plain integers, for which all zeroes is valid.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: getrusage fills the struct we own.
            unsafe { libc::getrusage(who, &mut ru) };
            let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
            total.cpu_us += us(ru.ru_utime) + us(ru.ru_stime);
            total.page_faults += (ru.ru_minflt + ru.ru_majflt) as u64;
        }
        total
    }
}

/// A connected pair of `SOCK_SEQPACKET` sockets (close-on-exec).
fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut pair = [0; 2];
    // SAFETY: socketpair writes two descriptors into the array we own.
    if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, pair.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socketpair succeeded: both are open descriptors nobody else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) })
}

/// A pipe, both ends close-on-exec: (read, write).
///
/// # Errors
/// The OS error (out of descriptors).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut ends = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are open descriptors nobody else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) })
}

/// A pid written (4 bytes, little-endian) down a pipe within `timeout`;
/// `None` if the writer closed it first or took longer.
fn read_pid(fd: RawFd, timeout: Duration) -> Option<i32> {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one pollfd we own.
    if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
        return None;
    }
    let mut buf = [0u8; 4];
    // SAFETY: reading into a buffer we own; a pipe write of 4 bytes is atomic.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    (n == 4).then(|| i32::from_le_bytes(buf)).filter(|p| *p > 0)
}

/// Sends one datagram with descriptors attached.
fn send_with_fds(sock: RawFd, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let mut iov = libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = if fds.is_empty() { 0 } else { (unsafe { libc::CMSG_SPACE(fd_bytes as u32) }) as usize };
    let mut control = vec![0u8; space];
    // SAFETY: msghdr is plain data; all zeroes is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer is CMSG_SPACE(fd_bytes) long, room for
        // one header and the descriptors, and msg points at it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), fd_bytes);
        }
    }
    loop {
        // SAFETY: msg and the buffers it points to live across the call.
        let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Receives one datagram and the descriptors attached to it (close-on-exec).
/// An empty result means the other end closed.
fn recv_with_fds(sock: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    // SAFETY: CMSG_SPACE only computes a size.
    let space = (unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) }) as usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: msghdr is plain data; all zeroes is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let n = loop {
        // SAFETY: msg and the buffers it points to live across the call.
        let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled the control buffer; the CMSG macros walk it
    // within msg_controllen, and each SCM_RIGHTS payload is descriptors
    // that are now ours.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let len = (*c).cmsg_len as usize - (data as usize - c as usize);
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "message or descriptors truncated"));
    }
    Ok((n, fds))
}

/// strata's side: a running fork server and the socket to it. Requests are
/// answered one at a time, in order. Dropping it closes the socket, which
/// ends the server (and the children started with `die_with_parent`).
pub struct ForkServer {
    sock: Mutex<OwnedFd>,
    process: Mutex<Child>,
    pid: u32,
    prepared: Result<u32, String>,
}

impl ForkServer {
    /// Starts `qemu` with the preload library as a fork server, with
    /// `env` added to this process's environment (glibc's tunables are
    /// read once, here, for all children), and waits until it is ready.
    ///
    /// # Errors
    /// If it cannot start, or does not answer within `timeout` (a missing
    /// or broken preload library makes QEMU reject the marker argument).
    pub fn start(qemu: &Path, preload: &Path, env: &[(&str, &OsStr)], timeout: Duration) -> Result<ForkServer, Error> {
        if !preload.is_file() {
            return Err(Error::NotReady(format!(
                "no preload library at {} (cargo build --release builds it)",
                preload.display()
            )));
        }
        let (ours, theirs) = seqpacket_pair().map_err(io_err("socketpair"))?;
        let server_fd = theirs.as_raw_fd();
        let mut cmd = Command::new(qemu);
        cmd.arg(MARKER)
            .arg(" ".repeat(CMDLINE_ROOM))
            .env("LD_PRELOAD", preload)
            .env(SERVER_FD_ENV, server_fd.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        // SAFETY: fcntl is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                let flags = libc::fcntl(server_fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(server_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(io_err("starting QEMU as a fork server"))?;
        drop(theirs);
        let ready = (|| {
            let mut pfd = libc::pollfd { fd: ours.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one pollfd we own.
            if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
                return Err(Error::NotReady(format!("no answer in {} ms", timeout.as_millis())));
            }
            let mut buf = [0u8; 64];
            let (n, _) = recv_with_fds(ours.as_raw_fd(), &mut buf).map_err(io_err("reading its greeting"))?;
            match Reply::decode(&buf[..n]) {
                Ok(Reply::Ready { pid, prepared }) if pid as u32 == child.id() => Ok(prepared),
                _ if n == 0 => Err(Error::NotReady("it exited (is the preload library loadable?)".into())),
                other => Err(Error::NotReady(format!("unexpected greeting {other:?}"))),
            }
        })();
        let prepared = match ready {
            Ok(p) => p,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        let pid = child.id();
        Ok(ForkServer { sock: Mutex::new(ours), process: Mutex::new(child), pid, prepared })
    }

    /// The server process's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// How many of QEMU's machine classes the server prepared for its
    /// children ([`prepare_qemu_types`]), or why it could not (the children
    /// then prepare their own, as an exec'd QEMU does).
    pub fn prepared_types(&self) -> Result<u32, &str> {
        self.prepared.as_ref().copied().map_err(String::as_str)
    }

    /// Forks a child as `req` describes, handing it `fds` (numbered in the
    /// child as `req.fd_targets` says). Returns its pid and a pidfd, which
    /// becomes readable when the child exits (the server reaps it).
    ///
    /// # Errors
    /// If the server is gone or could not fork.
    pub fn spawn(&self, req: &SpawnRequest, fds: &[BorrowedFd<'_>]) -> Result<(u32, OwnedFd), Error> {
        if fds.len() != req.fd_count() {
            return Err(Error::Protocol("descriptors and their numbers differ in count"));
        }
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let (reply, mut got) = self.exchange(&req.encode()?, &raw)?;
        match reply {
            Reply::Spawned { pid } if got.len() == 1 => Ok((pid as u32, got.remove(0))),
            Reply::Spawned { .. } => Err(Error::Protocol("a child without its pidfd")),
            Reply::Failed { errno, what } => {
                Err(Error::Spawn(format!("{what}: {}", io::Error::from_raw_os_error(errno))))
            }
            Reply::Usage(_) | Reply::Ready { .. } => Err(Error::Protocol("not a child's pid")),
        }
    }

    /// Whether the server process has ended (killed, or crashed).
    pub fn has_exited(&self) -> bool {
        let mut p = self.process.lock().unwrap_or_else(|p| p.into_inner());
        !matches!(p.try_wait(), Ok(None))
    }

    /// CPU time and page faults of the server and of its children that
    /// have exited: what the VMs it forked cost.
    ///
    /// # Errors
    /// If the server is gone.
    pub fn usage(&self) -> Result<Usage, Error> {
        match self.exchange(USAGE_REQUEST, &[])?.0 {
            Reply::Usage(u) => Ok(u),
            _ => Err(Error::Protocol("not a usage reply")),
        }
    }

    /// One request and its reply, with the descriptors that came along.
    fn exchange(&self, request: &[u8], fds: &[RawFd]) -> Result<(Reply, Vec<OwnedFd>), Error> {
        let sock = self.sock.lock().unwrap_or_else(|p| p.into_inner());
        send_with_fds(sock.as_raw_fd(), request, fds).map_err(io_err("sending a request"))?;
        let mut buf = vec![0u8; 4096];
        let (n, got) = recv_with_fds(sock.as_raw_fd(), &mut buf).map_err(io_err("reading its answer"))?;
        drop(sock);
        if n == 0 {
            return Err(Error::Spawn("the fork server exited".into()));
        }
        Ok((Reply::decode(&buf[..n])?, got))
    }
}

impl std::fmt::Debug for ForkServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForkServer").field("pid", &self.pid).finish_non_exhaustive()
    }
}

impl Drop for ForkServer {
    fn drop(&mut self) {
        // Closing our end (with the struct) ends the server; reap it. Kill
        // it first so that a server stuck in a fork cannot hold us here.
        let mut p = self.process.lock().unwrap_or_else(|p| p.into_inner());
        let _ = p.kill();
        let _ = p.wait();
    }
}

/// What a child of the server goes on with: QEMU's `main` with these.
pub struct ChildStart {
    pub args: Vec<CString>,
    pub env: Vec<CString>,
}

/// Whether this process was started as a fork server: the descriptor of
/// its socket, read from [`SERVER_FD_ENV`] (then removed from the
/// environment, so that nothing it starts inherits it).
pub fn server_fd_from_env() -> Option<RawFd> {
    let v: OsString = std::env::var_os(SERVER_FD_ENV)?;
    std::env::remove_var(SERVER_FD_ENV);
    std::env::remove_var("LD_PRELOAD");
    std::str::from_utf8(v.as_bytes()).ok()?.parse().ok().filter(|fd| *fd > 2)
}

/// `module_call_init`'s number for QOM types (`MODULE_INIT_QOM`). In the
/// QEMU strata runs (10.0, Debian's backport) the module lists are 0
/// migration, 1 block, 2 options, 3 QOM, 4 trace; in older QEMUs 3 was QOM
/// or trace. Either is a list QEMU's `main` runs early anyway, and each
/// runs once, so a wrong guess costs nothing; [`prepare_qemu_types`]
/// checks that the types are there.
const MODULE_INIT_QOM: libc::c_int = 3;

/// Prepares QEMU's type system in the server, once, so that no child
/// spends its start on it: registers QOM's types and initializes every
/// machine class (QEMU's `main` lists the machine classes to find the one
/// asked for, which runs the initializer of each). Both steps are
/// idempotent in QEMU, so a child's `main` finds them done: a forked start
/// to a QMP `quit` costs ~3 ms and ~500 page faults less. QEMU's `main`
/// does both before it configures an accelerator, so doing them earlier
/// sees the same state; device classes, which it initializes after, are
/// left to the children. Uses QEMU's exported symbols (it exports them for
/// its loadable modules). Returns how many machine classes are ready.
///
/// # Errors
/// If the QEMU binary does not export what it needs, or its types did not
/// appear; the children then prepare their own, as without a server.
///
/// # Safety
/// Must run in the server after QEMU's constructors and before any child
/// is forked, on the thread that will fork.
pub unsafe fn prepare_qemu_types() -> Result<u32, &'static str> {
    type ModuleCallInit = unsafe extern "C" fn(libc::c_int);
    type ClassByName = unsafe extern "C" fn(*const libc::c_char) -> *mut libc::c_void;
    type ClassList = unsafe extern "C" fn(*const libc::c_char, bool) -> *mut libc::c_void;
    type SlistLength = unsafe extern "C" fn(*mut libc::c_void) -> libc::c_uint;
    type SlistFree = unsafe extern "C" fn(*mut libc::c_void);
    let find = |name: &std::ffi::CStr| {
        // SAFETY: a lookup in the loaded objects by a NUL-terminated name.
        let sym = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
        if sym.is_null() {
            Err("QEMU does not export its type functions")
        } else {
            Ok(sym)
        }
    };
    // SAFETY: each symbol is QEMU's or GLib's function of the type it is
    // given here (their C declarations).
    let (module_call_init, class_by_name, class_list, slist_length, slist_free) = unsafe {
        (
            std::mem::transmute::<*mut libc::c_void, ModuleCallInit>(find(c"module_call_init")?),
            std::mem::transmute::<*mut libc::c_void, ClassByName>(find(c"object_class_by_name")?),
            std::mem::transmute::<*mut libc::c_void, ClassList>(find(c"object_class_get_list")?),
            std::mem::transmute::<*mut libc::c_void, SlistLength>(find(c"g_slist_length")?),
            std::mem::transmute::<*mut libc::c_void, SlistFree>(find(c"g_slist_free")?),
        )
    };
    // SAFETY: QEMU's own start-up makes these calls, in this order, on
    // its main thread; here they come earlier, with nothing else running
    // but QEMU's RCU thread.
    unsafe {
        module_call_init(MODULE_INIT_QOM);
        if class_by_name(c"machine".as_ptr()).is_null() {
            return Err("QEMU's types did not appear (a module list numbered differently)");
        }
        let machines = class_list(c"machine".as_ptr(), false);
        let n = slist_length(machines);
        slist_free(machines);
        Ok(n)
    }
}

/// The server loop, inside the QEMU process strata started as a fork
/// server. Greets (with `types`, the outcome of [`prepare_qemu_types`]),
/// then answers requests until strata's end closes (then
/// exits the process). Returns only in a child, which is set up as asked
/// (session, signals, niceness, descriptors) and goes on to QEMU's `main`.
///
/// `cmdline` is the memory of this process's original arguments, which a
/// child overwrites with its own so that /proc/PID/cmdline shows them.
///
/// # Safety
/// Only this thread may run strata's or QEMU's code; other threads must be
/// ones that `fork`'s handlers recreate in the child (QEMU's RCU thread).
/// `cmdline` must be the argument area the kernel set up for this process
/// and not referenced elsewhere.
pub unsafe fn serve(sock: RawFd, cmdline: &mut [u8], types: Result<u32, &str>) -> ChildStart {
    // The server keeps only what making its children takes; a failure here
    // leaves it as it was (its children drop everything anyway).
    if let Err(e) = keep_only_server_capabilities() {
        let msg = format!("strata fork server: could not drop capabilities: {e}\n");
        // SAFETY: writing bytes we own to standard error.
        unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
    }
    // Nor may it (or its children) make the calls root should never need.
    // SAFETY: the filter is static and allows everything else.
    if let Err(e) = unsafe { seccomp::filter_server() } {
        let msg = format!("strata fork server: could not filter its system calls: {e}\n");
        // SAFETY: writing bytes we own to standard error.
        unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
    }
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    let prepared = types.map_err(str::to_string);
    if send_with_fds(sock, &Reply::Ready { pid: me, prepared }.encode(), &[]).is_err() {
        // SAFETY: ending the process is the only thing left to do.
        unsafe { libc::_exit(1) };
    }
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        reap_children();
        let mut pfd = libc::pollfd { fd: sock, events: libc::POLLIN, revents: 0 };
        // A second at most between reaps of exited children.
        // SAFETY: one pollfd we own.
        if unsafe { libc::poll(&mut pfd, 1, 1000) } == 0 {
            continue;
        }
        let (n, fds) = match recv_with_fds(sock, &mut buf) {
            Ok((0, _)) => {
                // strata closed its end (or died): done.
                // SAFETY: exiting without running atexit handlers or QEMU's
                // destructors, which never ran their constructors' pair.
                unsafe { libc::_exit(0) };
            }
            Ok(x) => x,
            Err(e) => {
                let _ = send_with_fds(
                    sock,
                    &Reply::Failed { errno: e.raw_os_error().unwrap_or(libc::EIO), what: "reading the request".into() }
                        .encode(),
                    &[],
                );
                continue;
            }
        };
        if &buf[..n] == USAGE_REQUEST {
            reap_children();
            let _ = send_with_fds(sock, &Reply::Usage(Usage::of_this_process()).encode(), &[]);
            continue;
        }
        let req = match SpawnRequest::decode(&buf[..n]) {
            Ok(r) if r.fd_count() == fds.len() => r,
            Ok(_) | Err(_) => {
                let what = "malformed request (or descriptors missing)".to_string();
                let _ = send_with_fds(sock, &Reply::Failed { errno: libc::EINVAL, what }.encode(), &[]);
                continue;
            }
        };
        // The child's view is prepared here (it allocates) and made by the
        // fork handler in the child, before QEMU's handlers start threads.
        let steps = match req.view.as_ref().map(FileView::steps).transpose() {
            Ok(s) => s.map(Box::new),
            Err(what) => {
                let _ = send_with_fds(sock, &Reply::Failed { errno: libc::EINVAL, what: what.into() }.encode(), &[]);
                continue;
            }
        };
        let pending = steps.as_ref().map_or(std::ptr::null_mut(), |s| std::ptr::from_ref::<Steps>(s).cast_mut());
        // A child with a view gets a pid namespace of its own: it splits
        // into QEMU and its monitor, which reports QEMU's pid down this pipe.
        let report = if req.view.is_some() { pipe().ok() } else { None };
        if req.view.is_some() && report.is_none() {
            let what = "making the pipe a child reports on".to_string();
            let _ = send_with_fds(sock, &Reply::Failed { errno: libc::EMFILE, what }.encode(), &[]);
            continue;
        }
        PENDING_VIEW.store(pending, Ordering::SeqCst);
        // SAFETY: glibc's fork runs the handlers QEMU registered (its RCU
        // thread is recreated in the child) and leaves malloc usable there;
        // no other thread runs code of ours (the caller's promise).
        let pid = unsafe { libc::fork() };
        PENDING_VIEW.store(std::ptr::null_mut(), Ordering::SeqCst);
        if pid == 0 {
            let report = report.map(|(r, w)| {
                drop(r);
                w.into_raw_fd()
            });
            // SAFETY: in the child, with the request's descriptors.
            return unsafe { become_child(sock, req, fds, cmdline, report) };
        }
        // QEMU's pid, from the monitor; if the child failed before it split,
        // the child itself (strata then sees it exit, and why in its log).
        let qemu = match report {
            Some((r, w)) if pid > 0 => {
                drop(w);
                read_pid(r.as_raw_fd(), Duration::from_secs(10)).unwrap_or(pid)
            }
            _ => pid,
        };
        let reply = if pid < 0 {
            (
                Reply::Failed {
                    errno: io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO),
                    what: "fork".into(),
                },
                None,
            )
        } else {
            // The child cannot have been reaped yet (only this loop reaps),
            // so its pid is still its own. QEMU, reaped by its monitor, may
            // already have failed: then the monitor's pidfd stands for it
            // (it exits at once, with QEMU's status).
            // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
            let open = |p: i32| unsafe { libc::syscall(libc::SYS_pidfd_open, p, 0) } as RawFd;
            let (pid, pidfd) = match open(qemu) {
                fd if fd < 0 && qemu != pid => (pid, open(pid)),
                fd => (qemu, fd),
            };
            if pidfd < 0 {
                let errno = io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);
                // SAFETY: our child (or QEMU); a kill has no memory effects.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                (Reply::Failed { errno, what: "pidfd_open".into() }, None)
            } else {
                // SAFETY: pidfd_open returned a new descriptor we own.
                (Reply::Spawned { pid }, Some(unsafe { OwnedFd::from_raw_fd(pidfd) }))
            }
        };
        drop(fds);
        let pidfd: Vec<RawFd> = reply.1.iter().map(AsRawFd::as_raw_fd).collect();
        if send_with_fds(sock, &reply.0.encode(), &pidfd).is_err() {
            // SAFETY: strata is gone; so is the reason to live.
            unsafe { libc::_exit(0) };
        }
    }
}

/// The capabilities the fork server keeps, by number: reading and
/// traversing what a child's view binds (`CAP_DAC_OVERRIDE`,
/// `CAP_DAC_READ_SEARCH`), killing a child it cannot hand over
/// (`CAP_KILL`), a child's ids (`CAP_SETGID`, `CAP_SETUID`), its
/// namespaces and mounts (`CAP_SYS_ADMIN`).
pub const SERVER_CAPABILITIES: [u32; 6] = [1, 2, 5, 6, 7, 21];

/// Drops every capability but [`SERVER_CAPABILITIES`] from this process:
/// from its bounding set, then from its effective, permitted and
/// inheritable sets.
///
/// # Errors
/// If the kernel refuses.
pub fn keep_only_server_capabilities() -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mask: u64 = SERVER_CAPABILITIES.iter().fold(0, |m, c| m | 1 << c);
    for cap in 0..64u32 {
        if mask & (1 << cap) == 0 {
            // SAFETY: a prctl on this process; capabilities past the
            // kernel's last one answer EINVAL, which is fine.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) } != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINVAL) {
                    return Err(e);
                }
            }
        }
    }
    let header = Header { version: VERSION_3, pid: 0 };
    let (lo, hi) = (mask as u32, (mask >> 32) as u32);
    let data =
        [Data { effective: lo, permitted: lo, inheritable: 0 }, Data { effective: hi, permitted: hi, inheritable: 0 }];
    // SAFETY: capset with a version 3 header and its two data words.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The child's view, between its preparation and the fork (null otherwise).
static PENDING_VIEW: AtomicPtr<Steps> = AtomicPtr::new(std::ptr::null_mut());
/// In a child: whether its view was made ([`VIEW_OK`]), failed, or not
/// asked for; why, and errno.
static VIEW_MADE: AtomicU8 = AtomicU8::new(0);
const VIEW_OK: u8 = 1;
const VIEW_FAILED: u8 = 2;
static VIEW_ERROR: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
static VIEW_ERRNO: AtomicI32 = AtomicI32::new(0);

/// Registers the fork handler that makes a child's file view. Must run
/// before QEMU's constructors register theirs: child handlers run in the
/// order they were registered, and QEMU's start threads, after which a
/// mount namespace can no longer be unshared.
pub fn install_fork_handler() {
    extern "C" fn in_child() {
        let pending = PENDING_VIEW.load(Ordering::SeqCst);
        if pending.is_null() {
            return;
        }
        // SAFETY: the server keeps the steps alive across the fork; this
        // child has one thread (fork's), and its copy of them is its own.
        let made = unsafe { (*pending).apply() };
        match made {
            Ok(()) => VIEW_MADE.store(VIEW_OK, Ordering::SeqCst),
            Err(what) => {
                VIEW_ERRNO.store(io::Error::last_os_error().raw_os_error().unwrap_or(0), Ordering::SeqCst);
                let _ = VIEW_ERROR.set(what);
                VIEW_MADE.store(VIEW_FAILED, Ordering::SeqCst);
            }
        }
    }
    // SAFETY: registers a handler with no preconditions.
    unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
}

/// The namespaces every QEMU gets of its own, exec'd or forked: IPC (no
/// System V objects of the host's or another VM's) and UTS.
pub const CHILD_NAMESPACES: libc::c_int = libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;

fn reap_children() {
    loop {
        let mut status = 0;
        // SAFETY: waitpid on our own children, non-blocking.
        if unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) } <= 0 {
            return;
        }
    }
}

/// Gives descriptor `fds[i]` the number `targets[i]` (not close-on-exec),
/// and closes the originals. Safe against any overlap between the two
/// lists: every descriptor is first moved above all the targets, so placing
/// one never closes another still to be placed. Allocates nothing, so it
/// may run in a child forked from a threaded process (its unit test).
///
/// # Safety
/// The descriptors in `fds` must be owned by the caller, who gives them up.
unsafe fn place_fds(fds: &[RawFd], targets: &[RawFd]) -> Result<(), &'static str> {
    if fds.len() != targets.len() || fds.len() > MAX_FDS {
        return Err("descriptors and their numbers differ in count");
    }
    let above = targets.iter().copied().max().unwrap_or(2).max(2) + 1;
    let mut high = [-1; MAX_FDS];
    for (i, fd) in fds.iter().enumerate() {
        // SAFETY: duplicating a descriptor the caller owns.
        let h = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, above) };
        if h < 0 {
            return Err("duplicating a descriptor");
        }
        high[i] = h;
    }
    for fd in fds {
        // SAFETY: the caller gave the originals up; their copies are above.
        unsafe { libc::close(*fd) };
    }
    for (h, target) in high.iter().zip(targets) {
        // SAFETY: dup2 onto the number the child's arguments name; the copy
        // is not close-on-exec.
        if unsafe { libc::dup2(*h, *target) } < 0 {
            return Err("placing a descriptor");
        }
    }
    for h in &high[..fds.len()] {
        // SAFETY: closing the temporary copies made above.
        unsafe { libc::close(*h) };
    }
    Ok(())
}

/// Sets the niceness of every thread of process `pid` (niceness is per
/// thread on Linux). A forked child already has threads that `fork`'s
/// handlers started (QEMU's RCU thread), and strata renices a pooled VM's
/// QEMU when it is taken.
pub fn renice_threads(pid: u32, niceness: i32) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return };
    for tid in tasks.flatten().filter_map(|t| t.file_name().to_str()?.parse::<libc::id_t>().ok()) {
        // SAFETY: setpriority takes plain integers.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, niceness) };
    }
}

/// Shows `args` as this process's command line (/proc/PID/cmdline) by
/// writing them over its original arguments' memory, `cmdline`.
fn show_arguments<A: AsRef<[u8]>>(cmdline: &mut [u8], args: &[A]) {
    let mut at = 0;
    for a in args {
        let a = a.as_ref();
        if at + a.len() + 1 > cmdline.len() {
            break;
        }
        cmdline[at..at + a.len()].copy_from_slice(a);
        cmdline[at + a.len()] = 0;
        at += a.len() + 1;
    }
    cmdline[at..].fill(0);
}

/// In a just-forked child: the request's process attributes and
/// descriptors. Failures are written to its standard error (QEMU's log)
/// and end it: strata sees an early exit. A child with a view splits into
/// QEMU, PID 1 of a pid namespace of its own, and its monitor, which sends
/// QEMU's pid down `report` ([`monitor`]).
unsafe fn become_child(
    sock: RawFd,
    req: SpawnRequest,
    mut fds: Vec<OwnedFd>,
    cmdline: &mut [u8],
    report: Option<RawFd>,
) -> ChildStart {
    // The monitor's descriptors, QEMU's the rest.
    let console = if req.console { fds.split_off(req.fd_targets.len()) } else { Vec::new() };
    let fail = |what: &str| -> ! {
        let msg = format!("strata fork server: {what}: {}\n", io::Error::last_os_error());
        // SAFETY: writing bytes we own to fd 2, then leaving.
        unsafe {
            libc::write(2, msg.as_ptr().cast(), msg.len());
            libc::_exit(127)
        }
    };
    // SAFETY: plain system calls on this process.
    unsafe {
        libc::close(sock);
        libc::setsid();
        libc::prctl(libc::PR_SET_THP_DISABLE, libc::c_ulong::from(req.no_thp), 0, 0, 0);
        if req.view.is_some() {
            match VIEW_MADE.load(Ordering::SeqCst) {
                VIEW_OK => {}
                VIEW_FAILED => {
                    let what = VIEW_ERROR.get().copied().unwrap_or("making the file view");
                    *libc::__errno_location() = VIEW_ERRNO.load(Ordering::SeqCst);
                    fail(what)
                }
                _ => fail("the fork handler that makes the file view is not installed"),
            }
            // The next fork is QEMU's alone; its view is made.
            PENDING_VIEW.store(std::ptr::null_mut(), Ordering::SeqCst);
            if let Err(what) = monitor::unshare_pid_namespace() {
                fail(what);
            }
            // glibc's fork again: QEMU's handlers recreate its RCU thread.
            let qemu = libc::fork();
            if qemu < 0 {
                fail("forking QEMU into its pid namespace");
            }
            if qemu > 0 {
                show_arguments(cmdline, &[monitor::MONITOR_NAME.to_bytes()]);
                let console = match console.as_slice() {
                    [pipe, log] => Some(monitor::Console { pipe: pipe.as_raw_fd(), log: log.as_raw_fd() }),
                    _ => None,
                };
                monitor::monitor(qemu, report, console, req.credentials.as_ref(), req.die_with_parent);
            }
            drop(console);
            if let Some(fd) = report {
                libc::close(fd);
            }
            if let Err(what) = monitor::mount_proc() {
                fail(what);
            }
        }
        // As for an exec'd QEMU. (The IPC and UTS namespaces need not be
        // unshared by the whole process at once: the RCU thread, recreated
        // by fork's handlers, stays in the server's, which it never uses;
        // the change of ids reaches every thread.)
        if let Err(what) = confine_self(req.file_size_limit, req.credentials.as_ref()) {
            fail(what);
        }
        // After the change of ids, which clears it. QEMU with a monitor
        // always dies with it: killing either ends the VM.
        if req.die_with_parent || req.view.is_some() {
            monitor::die_with_parent();
        }
    }
    if req.niceness != 0 {
        renice_threads(std::process::id(), req.niceness);
    }
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    // SAFETY: the descriptors are ours; nothing else in this process uses them.
    if let Err(what) = unsafe { place_fds(&raw, &req.fd_targets) } {
        fail(what);
    }
    // Closed by place_fds (or now the targets).
    std::mem::forget(fds);
    show_arguments(cmdline, &req.args);
    let cstrings = |v: Vec<Vec<u8>>| v.into_iter().map(|s| CString::new(s).expect("decode refused NULs")).collect();
    ChildStart { args: cstrings(req.args), env: cstrings(req.env) }
}

/// Runs `body` in a forked child, which exits with what it returns, and
/// gives the child's wait status. For tests of what changes a whole
/// process (filters, descriptors); `body` should make system calls only.
#[cfg(test)]
pub(crate) fn status_of_child(body: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the child runs `body` and leaves without returning.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let code = body();
        // SAFETY: leaving the child.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waiting for our child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SpawnRequest {
        SpawnRequest {
            args: vec![b"qemu-system-x86_64".to_vec(), b"-m".to_vec(), b"512M".to_vec()],
            env: vec![b"TMPDIR=/tmp/x".to_vec(), b"EMPTY=".to_vec()],
            fd_targets: vec![0, 1, 2, 7],
            niceness: 10,
            die_with_parent: true,
            no_thp: false,
            credentials: Some(Credentials { uid: 2_000_017, gid: 2_000_017, groups: vec![994] }),
            file_size_limit: 64 << 20,
            view: Some(FileView::for_qemu(
                true,
                [Shown::Bind { path: "/var/lib/strata/sessions/x".into(), writable: true }],
            )),
            console: true,
        }
    }

    #[test]
    fn requests_round_trip() {
        let r = sample();
        assert_eq!(SpawnRequest::decode(&r.encode().unwrap()).unwrap(), r);
        let r = SpawnRequest { die_with_parent: false, no_thp: true, niceness: -5, env: vec![], ..sample() };
        assert_eq!(SpawnRequest::decode(&r.encode().unwrap()).unwrap(), r);
        let r = SpawnRequest { credentials: None, file_size_limit: 0, view: None, console: false, ..sample() };
        assert_eq!(SpawnRequest::decode(&r.encode().unwrap()).unwrap(), r);
        assert!(SpawnRequest { view: None, ..sample() }.encode().is_err(), "a console without a monitor");
    }

    #[test]
    fn bad_requests_are_refused() {
        let good = sample().encode().unwrap();
        // Every truncation is an error, never a panic or a shorter request.
        for n in 0..good.len() {
            assert!(SpawnRequest::decode(&good[..n]).is_err(), "prefix of {n} bytes");
        }
        let mut trailing = good.clone();
        trailing.push(b'x');
        assert!(SpawnRequest::decode(&trailing).is_err());
        let mut magic = good.clone();
        magic[0] = b'X';
        assert!(SpawnRequest::decode(&magic).is_err());
        let nul = SpawnRequest { args: vec![b"a\0b".to_vec()], ..sample() };
        assert!(nul.encode().is_err());
        assert!(SpawnRequest { args: vec![], ..sample() }.encode().is_err());
        let many = SpawnRequest { fd_targets: vec![3; MAX_FDS + 1], ..sample() };
        assert!(many.encode().is_err());
        let groups = Credentials { groups: vec![5; MAX_GROUPS + 1], ..Credentials::default() };
        assert!(SpawnRequest { credentials: Some(groups), ..sample() }.encode().is_err());
        // A hand-made request claiming more descriptors than allowed.
        let mut forged = MAGIC.to_vec();
        forged.extend_from_slice(&0u32.to_le_bytes());
        forged.extend_from_slice(&0i32.to_le_bytes());
        forged.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(SpawnRequest::decode(&forged).is_err());
    }

    #[test]
    fn replies_round_trip() {
        for r in [
            Reply::Spawned { pid: 4242 },
            Reply::Failed { errno: libc::EAGAIN, what: "fork".into() },
            Reply::Usage(Usage { cpu_us: 1 << 40, page_faults: 7 }),
            Reply::Ready { pid: 77, prepared: Ok(190) },
            Reply::Ready { pid: 77, prepared: Err("no symbols".into()) },
        ] {
            let bytes = r.encode();
            assert_eq!(Reply::decode(&bytes).unwrap(), r);
            for n in 0..bytes.len() {
                // Every cut is an error, except a failure's message or a
                // reason, which may be empty.
                let fixed = match r {
                    Reply::Failed { .. } => 9,
                    Reply::Ready { prepared: Err(_), .. } => 10,
                    _ => usize::MAX,
                };
                if n < fixed.min(bytes.len()) {
                    assert!(Reply::decode(&bytes[..n]).is_err(), "{r:?} cut at {n}");
                }
            }
        }
        assert!(Reply::decode(b"SZ1\0\x09").is_err());
    }

    /// The inode behind descriptor `fd`, or 0.
    fn inode(fd: RawFd) -> u64 {
        // SAFETY: stat is plain data; fstat fills it.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes into st, which we own.
        if unsafe { libc::fstat(fd, &mut st) } == 0 {
            st.st_ino
        } else {
            0
        }
    }

    #[test]
    fn descriptors_land_on_their_numbers_whatever_the_overlap() {
        // Three files at the numbers a busy strata hands out, placed where
        // their own copies (or each other) would land.
        let files: Vec<std::fs::File> =
            ["/proc/self/stat", "/dev/null", "/proc/version"].iter().map(|p| std::fs::File::open(p).unwrap()).collect();
        let want: Vec<u64> = files.iter().map(|f| inode(f.as_raw_fd())).collect();
        let lowest = files.iter().map(AsRawFd::as_raw_fd).max().unwrap() + 1;
        // The last: where copies made above a fixed floor (256) would land.
        for targets in [
            vec![lowest + 1, lowest, lowest + 2],
            vec![lowest, lowest + 1, lowest + 2],
            vec![lowest + 2, lowest + 1, 2],
            vec![257, 256, 258],
        ] {
            // In a child: moving descriptors around must not disturb the
            // test harness. Only async-signal-safe calls after the fork.
            let raw: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
            // SAFETY: the child calls only fcntl, dup2, close, fstat and _exit.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: in the child, which owns its copies of the files.
                let ok = unsafe { place_fds(&raw, &targets) }.is_ok()
                    && targets.iter().zip(&want).all(|(t, w)| inode(*t) == *w)
                    && raw.iter().filter(|r| !targets.contains(r)).all(|r| inode(*r) == 0);
                // SAFETY: leaving the child.
                unsafe { libc::_exit(if ok { 0 } else { 1 }) };
            }
            let mut status = 0;
            // SAFETY: waiting for our child.
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
            assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "targets {targets:?}: status {status}");
        }
    }

    /// The niceness of each thread of this process.
    fn thread_niceness() -> Vec<i64> {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .map(|t| {
                let stat = std::fs::read_to_string(t.unwrap().path().join("stat")).unwrap();
                // Field 19, counted after the command name's closing parenthesis.
                stat.rsplit_once(')').unwrap().1.split_whitespace().nth(16).unwrap().parse().unwrap()
            })
            .collect()
    }

    #[test]
    fn a_child_renices_the_threads_it_already_has() {
        // A forked child of a threaded process (QEMU's RCU thread is
        // recreated by fork's handlers before the child is set up).
        // SAFETY: the child spawns a thread, reads /proc and leaves; glibc
        // keeps malloc usable after fork.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            let t = std::thread::spawn(move || rx.recv().ok());
            renice_threads(std::process::id(), 7);
            let nice = thread_niceness();
            let ok = nice.len() == 2 && nice.iter().all(|n| *n == 7);
            drop(tx);
            let _ = t.join();
            // SAFETY: leaving the child.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waiting for our child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "status {status}");
    }

    #[test]
    fn descriptors_pass_through_the_socket() {
        let (a, b) = seqpacket_pair().unwrap();
        let file = std::fs::File::open("/proc/self/stat").unwrap();
        send_with_fds(a.as_raw_fd(), b"hello", &[file.as_raw_fd(), file.as_raw_fd()]).unwrap();
        let mut buf = [0u8; 16];
        let (n, fds) = recv_with_fds(b.as_raw_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(fds.len(), 2);
        assert!(fds.iter().all(|f| f.as_raw_fd() != file.as_raw_fd()));
        drop(a);
        assert_eq!(recv_with_fds(b.as_raw_fd(), &mut buf).unwrap().0, 0, "a closed end reads as empty");
    }
}
