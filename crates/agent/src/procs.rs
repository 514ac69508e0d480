//! Programs on pseudo-terminals: start, feed, watch, report.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::pty::{openpty, Winsize};
use strata_proto::{GuestMsg, ProcId, ProcState, Readiness, TerminalContext, WinSize};

use crate::Agent;

/// How much recent output is kept to repaint a newly attached terminal.
const SCREEN_KEEP: usize = 64 << 10;

enum Feed {
    Data(Vec<u8>),
    Eof,
}

#[derive(Default)]
struct Status {
    ready: bool,
    exit: Option<i32>,
    output_done: bool,
    exit_reported: bool,
}

/// One program the agent started.
pub struct Proc {
    pub id: ProcId,
    pub pid: i32,
    /// The terminal's master side, non-blocking (every thread that waits
    /// on it waits in `poll`).
    master: File,
    feed: Mutex<mpsc::Sender<Feed>>,
    /// Items sent to the feeding thread and not yet written in full. Input
    /// is written directly only when none is, so it keeps its order.
    queued: AtomicUsize,
    screen: Mutex<VecDeque<u8>>,
    status: Mutex<Status>,
    changed: Condvar,
    /// Text whose appearance on the terminal makes the program ready.
    ready_text: Mutex<Option<Vec<u8>>>,
}

pub(crate) fn winsize(s: WinSize) -> Winsize {
    Winsize { ws_row: s.rows, ws_col: s.cols, ws_xpixel: 0, ws_ypixel: 0 }
}

fn set_cloexec(fd: &OwnedFd) {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC);
    }
}

impl Proc {
    /// Starts `argv` on a new pseudo-terminal sized from the context.
    pub fn spawn(
        agent: &Arc<Agent>,
        id: ProcId,
        argv: &[String],
        env: &[(String, String)],
        ctx: &TerminalContext,
    ) -> Result<Arc<Proc>, String> {
        let (prog, args) = argv.split_first().ok_or("empty command")?;
        let pty = openpty(Some(&winsize(ctx.size)), None).map_err(|e| format!("openpty: {e}"))?;
        set_cloexec(&pty.master);
        set_cloexec(&pty.slave);
        let term = if ctx.term.is_empty() { "xterm-256color" } else { &ctx.term };
        let envs = environment("root", "/root", Some(term), ctx, env);
        let pid = spawn_on_pty(prog, args, &envs, pty.slave.as_raw_fd())?;
        drop(pty.slave);
        // Non-blocking, so typed input can be written at once from the host
        // port's thread without ever stalling it behind a program that does
        // not read (what does not fit goes to the feeding thread). Handing
        // every line to that thread cost ~200 blocks of channel and futex
        // code that a restored guest translates afresh at each launch.
        // SAFETY: fcntl on the descriptor openpty gave us.
        unsafe {
            let fl = libc::fcntl(pty.master.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(pty.master.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        let master = File::from(pty.master);
        let (tx, rx) = mpsc::channel();
        let proc = Arc::new(Proc {
            id,
            pid,
            master: master.try_clone().map_err(|e| e.to_string())?,
            feed: Mutex::new(tx),
            queued: AtomicUsize::new(0),
            screen: Mutex::new(VecDeque::with_capacity(SCREEN_KEEP)),
            status: Mutex::new(Status::default()),
            changed: Condvar::new(),
            ready_text: Mutex::new(None),
        });
        let writer = master.try_clone().map_err(|e| e.to_string())?;
        {
            let proc = proc.clone();
            std::thread::spawn(move || feed_input(writer, rx, &proc));
        }
        {
            let (proc, agent) = (proc.clone(), agent.clone());
            std::thread::spawn(move || proc.pump_output(master, &agent));
        }
        Ok(proc)
    }

    fn lock_status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Copies the terminal's output to the host (when attached) and the screen.
    fn pump_output(&self, mut master: File, agent: &Agent) {
        let mut buf = vec![0u8; 16 << 10];
        let mut tail: Vec<u8> = Vec::new();
        let mut want: Option<Vec<u8>> = None;
        loop {
            let n = match master.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if wait_for(&master, libc::POLLIN).is_err() {
                        break;
                    }
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            let data = &buf[..n];
            // Kept and sent (or not) as one step against an attach.
            let gate = agent.output_gate.lock().unwrap_or_else(|e| e.into_inner());
            {
                let mut screen = self.screen.lock().unwrap_or_else(|e| e.into_inner());
                screen.extend(data);
                let excess = screen.len().saturating_sub(SCREEN_KEEP);
                screen.drain(..excess);
            }
            if want.is_none() {
                want = self.pending_text();
            }
            if let Some(text) = &want {
                tail.extend_from_slice(data);
                if tail.windows(text.len()).any(|w| w == text.as_slice()) {
                    want = None;
                    tail = Vec::new();
                    self.mark_ready();
                } else {
                    let keep = tail.len().saturating_sub(text.len());
                    tail.drain(..keep);
                }
            }
            agent.send(&GuestMsg::Output { id: self.id, data: data.to_vec() });
            drop(gate);
        }
        let report = {
            let mut st = self.lock_status();
            st.output_done = true;
            st.exit.filter(|_| !std::mem::replace(&mut st.exit_reported, true))
        };
        self.changed.notify_all();
        if let Some(status) = report {
            agent.send_to_host(&GuestMsg::Exited { id: self.id, status });
        }
    }

    /// The text this process waits for, if its readiness is still pending.
    fn pending_text(&self) -> Option<Vec<u8>> {
        let st = self.lock_status();
        if st.ready {
            return None;
        }
        self.ready_text.lock().ok()?.clone()
    }

    fn mark_ready(&self) {
        self.lock_status().ready = true;
        self.changed.notify_all();
    }

    /// Records the exit status; reports it once the output is drained, or
    /// after a short grace period if a descendant keeps the terminal open.
    pub fn exited(self: &Arc<Self>, agent: &Arc<Agent>, status: i32) {
        let report = {
            let mut st = self.lock_status();
            st.exit = Some(status);
            st.output_done && !std::mem::replace(&mut st.exit_reported, true)
        };
        self.changed.notify_all();
        if report {
            agent.send_to_host(&GuestMsg::Exited { id: self.id, status });
            return;
        }
        let (proc, agent) = (self.clone(), agent.clone());
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let late = !std::mem::replace(&mut proc.lock_status().exit_reported, true);
            if late {
                agent.send_to_host(&GuestMsg::Exited { id: proc.id, status });
            }
        });
    }

    /// Waits for the readiness rule in a thread of its own and reports it.
    pub fn watch_readiness(self: &Arc<Self>, agent: Arc<Agent>, rule: Readiness, timeout_ms: u32) {
        if let Readiness::Text(t) = &rule {
            *self.ready_text.lock().unwrap_or_else(|e| e.into_inner()) = Some(t.as_bytes().to_vec());
            // Output may already hold the text.
            let seen = {
                let screen = self.screen.lock().unwrap_or_else(|e| e.into_inner());
                let s: Vec<u8> = screen.iter().copied().collect();
                s.windows(t.len().max(1)).any(|w| w == t.as_bytes())
            };
            if seen {
                self.mark_ready();
            }
        }
        let proc = self.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            let deadline = started + Duration::from_millis(timeout_ms as u64);
            let outcome = proc.wait_ready(&rule, started, deadline);
            *proc.ready_text.lock().unwrap_or_else(|e| e.into_inner()) = None;
            agent.send(&match outcome {
                Ok(()) => GuestMsg::Ready { id: proc.id },
                Err(reason) => GuestMsg::Failed { id: proc.id, reason },
            });
        });
    }

    fn wait_ready(&self, rule: &Readiness, started: Instant, deadline: Instant) -> Result<(), String> {
        let alive_until = match rule {
            Readiness::AliveMs(ms) => Some(started + Duration::from_millis(*ms as u64)),
            _ => None,
        };
        let mut st = self.lock_status();
        loop {
            if let Some(code) = st.exit {
                return Err(format!("the program exited with status {code} before it was ready"));
            }
            let now = Instant::now();
            if st.ready || alive_until.is_some_and(|t| now >= t) {
                return Ok(());
            }
            if now >= deadline {
                return Err(format!(
                    "the program was not ready after {} ms",
                    deadline.duration_since(started).as_millis()
                ));
            }
            let mut wake = deadline;
            if let Some(t) = alive_until {
                wake = wake.min(t);
            }
            if let Readiness::Port(port) = rule {
                drop(st);
                let addr = std::net::SocketAddr::from(([127, 0, 0, 1], *port));
                if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return Ok(());
                }
                // A port has no event to wait on; check again shortly.
                std::thread::sleep(Duration::from_millis(25));
                st = self.lock_status();
                continue;
            }
            st =
                self.changed.wait_timeout(st, wake.saturating_duration_since(now)).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Writes bytes typed at the terminal: at once as far as the terminal
    /// takes them without waiting, the rest queued in order.
    pub fn input(&self, data: Vec<u8>) {
        let feed = self.feed.lock().unwrap_or_else(|e| e.into_inner());
        // Short when the terminal is full (the program is not reading) or
        // gone: the feeding thread waits, or finds it gone.
        let written = if self.queued.load(Ordering::Acquire) == 0 { write_now(&self.master, &data).0 } else { 0 };
        if written < data.len() {
            self.queued.fetch_add(1, Ordering::AcqRel);
            let rest = if written == 0 { data } else { data[written..].to_vec() };
            let _ = feed.send(Feed::Data(rest));
        }
    }

    /// Queues an end-of-file (the terminal's EOF character).
    pub fn eof(&self) {
        let feed = self.feed.lock().unwrap_or_else(|e| e.into_inner());
        self.queued.fetch_add(1, Ordering::AcqRel);
        let _ = feed.send(Feed::Eof);
    }

    /// Resizes the terminal; the kernel sends SIGWINCH to the program.
    pub fn resize(&self, size: WinSize) {
        let ws = winsize(size);
        // SAFETY: TIOCSWINSZ with a valid winsize on our pty master.
        unsafe {
            libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws);
        }
    }

    /// The state sent to a newly attached terminal.
    pub fn state(&self) -> ProcState {
        let screen = self.screen.lock().unwrap_or_else(|e| e.into_inner()).iter().copied().collect();
        let st = self.lock_status();
        ProcState { id: self.id, screen, exit: st.exit }
    }
}

/// Writes queued input to the terminal in its own thread, so a program that
/// does not read cannot stall the host port.
fn feed_input(master: File, rx: mpsc::Receiver<Feed>, proc: &Proc) {
    for item in rx {
        let res = match item {
            Feed::Data(d) => write_all_waiting(&master, &d),
            Feed::Eof => deliver_eof(&master, proc),
        };
        proc.queued.fetch_sub(1, Ordering::AcqRel);
        if res.is_err() {
            break;
        }
    }
}

/// Waits until the non-blocking `file` is ready for `events` (POLLIN,
/// POLLOUT), or has hung up (the next read or write then says how).
fn wait_for(file: &File, events: libc::c_short) -> std::io::Result<()> {
    let mut pfd = libc::pollfd { fd: file.as_raw_fd(), events, revents: 0 };
    loop {
        // SAFETY: one pollfd we own, for the duration of the call.
        if unsafe { libc::poll(&mut pfd, 1, -1) } >= 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Writes as much of `data` as the non-blocking terminal takes now: how
/// much, and what stopped it short other than a full terminal.
fn write_now(mut master: &File, data: &[u8]) -> (usize, Option<std::io::Error>) {
    let mut written = 0;
    while written < data.len() {
        match master.write(&data[written..]) {
            Ok(0) => return (written, Some(std::io::ErrorKind::WriteZero.into())),
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => return (written, Some(e)),
        }
    }
    (written, None)
}

/// `write_all` on the non-blocking terminal: waits for room as long as it
/// takes (the program reads at its own pace).
fn write_all_waiting(master: &File, mut data: &[u8]) -> std::io::Result<()> {
    loop {
        let (n, stopped) = write_now(master, data);
        data = &data[n..];
        if let Some(e) = stopped {
            return Err(e);
        }
        if data.is_empty() {
            return Ok(());
        }
        wait_for(master, libc::POLLOUT)?;
    }
}

/// The slave side's line mode: `Some(true)` when canonical (line editing by
/// the kernel), `Some(false)` when raw (the program reads key by key).
fn slave_mode(master: &File) -> Option<(bool, u8)> {
    let mut name = [0 as libc::c_char; 64];
    // SAFETY: ptsname_r writes a NUL-terminated name into our buffer; the
    // slave is opened without becoming our controlling terminal and closed.
    unsafe {
        if libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) != 0 {
            return None;
        }
        let fd = libc::open(name.as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        if fd < 0 {
            return None;
        }
        let mut t: libc::termios = std::mem::zeroed();
        let ok = libc::tcgetattr(fd, &mut t) == 0;
        libc::close(fd);
        ok.then(|| (t.c_lflag & libc::ICANON != 0, t.c_cc[libc::VEOF]))
    }
}

/// Delivers the end of a pipe's input to a program on a terminal.
///
/// A terminal has no end of input, only the EOF character, and its meaning
/// depends on the mode the program *reads* in: in canonical mode the kernel
/// turns it into end-of-file, in raw mode the program sees the byte (line
/// editors such as readline treat it as end-of-file on an empty line). Sent
/// while a REPL runs a line in canonical mode and then reads the next one in
/// raw mode, it is lost. So it is sent when the program reads raw, or has
/// stayed canonical for a while, and again if the program has not ended.
fn deliver_eof(master: &File, proc: &Proc) -> std::io::Result<()> {
    const SETTLE: Duration = Duration::from_millis(150);
    let exited = || proc.lock_status().exit.is_some();
    for _ in 0..3 {
        let start = Instant::now();
        let mut canonical_since: Option<Instant> = None;
        let mut veof = 4u8;
        while !exited() && start.elapsed() < Duration::from_secs(5) {
            match slave_mode(master) {
                Some((false, v)) => {
                    veof = v;
                    break;
                }
                Some((true, v)) => {
                    veof = v;
                    if canonical_since.get_or_insert_with(Instant::now).elapsed() >= SETTLE {
                        break;
                    }
                }
                None => break,
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if exited() {
            return Ok(());
        }
        write_all_waiting(master, &[veof])?;
        let sent = Instant::now();
        while !exited() && sent.elapsed() < Duration::from_secs(1) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if exited() {
            return Ok(());
        }
    }
    Ok(())
}

/// Forks and execs `prog` with the pty slave as its controlling terminal and
/// standard streams. Not `std::process::Command`: its error path waits for
/// the child itself, racing the PID 1 reaper, which reaps every child.
fn spawn_on_pty(prog: &str, args: &[String], env: &[(String, String)], slave: i32) -> Result<i32, String> {
    use std::ffi::CString;
    let cstr = |s: &str| CString::new(s).map_err(|_| format!("{s:?} contains a NUL byte"));
    let path = resolve_program(prog, env).ok_or_else(|| format!("cannot start {prog:?}: no such program in PATH"))?;
    let path = cstr(&path)?;
    let argv: Vec<CString> =
        std::iter::once(prog).chain(args.iter().map(String::as_str)).map(cstr).collect::<Result<_, _>>()?;
    let envp: Vec<CString> = env.iter().map(|(k, v)| cstr(&format!("{k}={v}"))).collect::<Result<_, _>>()?;
    let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|c| c.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut envp_p: Vec<*const libc::c_char> = envp.iter().map(|c| c.as_ptr()).collect();
    envp_p.push(std::ptr::null());
    let root = cstr("/root")?;
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills the array we pass.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: between fork and exec the child only makes async-signal-safe
    // calls on memory prepared before the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: see above; the child never returns from this block.
        unsafe {
            let empty: libc::sigset_t = std::mem::zeroed();
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            libc::setsid();
            libc::ioctl(slave, libc::TIOCSCTTY, 0);
            libc::dup2(slave, 0);
            libc::dup2(slave, 1);
            libc::dup2(slave, 2);
            libc::chdir(root.as_ptr());
            libc::execve(path.as_ptr(), argv_p.as_ptr(), envp_p.as_ptr());
            let err = *libc::__errno_location();
            libc::write(fds[1], (&err as *const i32).cast(), 4);
            libc::_exit(127);
        }
    }
    // SAFETY: closing our copy of the write end; reading the exec result.
    let errno = unsafe {
        libc::close(fds[1]);
        let mut err = 0i32;
        let n = libc::read(fds[0], (&mut err as *mut i32).cast(), 4);
        libc::close(fds[0]);
        if n == 4 {
            Some(err)
        } else {
            None
        }
    };
    match errno {
        Some(e) => Err(format!("cannot start {prog:?}: {}", std::io::Error::from_raw_os_error(e))),
        None => Ok(pid),
    }
}

/// A program's environment: what a login sets for `user` (its name and
/// home, a PATH, a shell, `TERM` when on a terminal), the context's locale
/// and variables (but its `TERM` on pipes), then `env`. Later entries
/// override earlier ones (a map: glibc's getenv would otherwise find the
/// first of two equal names).
pub(crate) fn environment(
    user: &str,
    home: &str,
    term: Option<&str>,
    ctx: &TerminalContext,
    env: &[(String, String)],
) -> Vec<(String, String)> {
    let mut envs: std::collections::BTreeMap<String, String> = [
        ("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/games:/usr/games"),
        ("HOME", home),
        ("USER", user),
        ("LOGNAME", user),
        ("SHELL", "/bin/sh"),
    ]
    .into_iter()
    .chain(term.map(|t| ("TERM", t)))
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    envs.extend(ctx.locale.iter().map(|l| ("LANG".to_string(), l.clone())));
    envs.extend(ctx.env.iter().filter(|(k, _)| term.is_some() || k != "TERM").cloned());
    envs.extend(env.iter().cloned());
    envs.into_iter().collect()
}

/// Finds a program the way a shell would, in the PATH of its environment.
fn resolve_program(prog: &str, env: &[(String, String)]) -> Option<String> {
    if prog.contains('/') {
        return Some(prog.to_string());
    }
    let path = env.iter().rev().find(|(k, _)| k == "PATH").map(|(_, v)| v.as_str()).unwrap_or("/usr/bin:/bin");
    path.split(':').map(|d| format!("{d}/{prog}")).find(|p| {
        std::fs::metadata(p)
            .map(|m| m.is_file() && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0)
            .unwrap_or(false)
    })
}
