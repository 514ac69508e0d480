//! Commands run with pipes (`HostMsg::Exec`): standard output and standard
//! error apart, input that ends, the exit status. Unlike a program on a
//! terminal, nothing is echoed or translated: bytes pass unchanged.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::Duration;

use strata_proto::{GuestMsg, ProcId, TerminalContext, WinSize};

use crate::Agent;

/// How long an exited command's output may keep flowing (a background
/// child of it may hold its pipes open) before its exit is reported.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Status {
    exit: Option<i32>,
    /// Output pipes not yet at end of file.
    open: u8,
    reported: bool,
}

/// What to run: `HostMsg::Exec`'s fields, and with `pty` the size of a new
/// pseudo-terminal to run it on (its own session, the terminal its
/// controlling one: output comes back as one stream, and it may be resized).
#[derive(Clone, Copy)]
pub struct Spec<'a> {
    pub argv: &'a [String],
    pub env: &'a [(String, String)],
    pub cwd: Option<&'a str>,
    pub user: Option<&'a str>,
    pub pty: Option<WinSize>,
}

/// One command started by `HostMsg::Exec`.
pub struct Command {
    pub id: ProcId,
    pub pid: i32,
    /// What it runs, for listings.
    pub argv: Vec<String>,
    /// Input for the feeding thread; `None` once input ended.
    stdin: Mutex<Option<mpsc::Sender<Vec<u8>>>>,
    status: Mutex<Status>,
    changed: Condvar,
    /// Its pseudo-terminal's master, if it runs on one.
    master: Option<std::fs::File>,
}

impl Command {
    /// How a listing shows it.
    pub fn state(&self) -> strata_proto::CommandState {
        strata_proto::CommandState { id: self.id, pid: self.pid, argv: self.argv.clone(), pty: self.master.is_some() }
    }

    /// Starts `argv`. On failure: the exit status a shell would give (127:
    /// not found, 126: not executable) and what to print on its stderr.
    pub fn start(
        agent: &Arc<Agent>,
        id: ProcId,
        spec: &Spec,
        ctx: &TerminalContext,
    ) -> Result<Arc<Command>, (i32, String)> {
        let Spec { argv, env, cwd, user, pty } = *spec;
        let (prog, args) = argv.split_first().ok_or((127, "strata-agent: empty command\n".to_string()))?;
        let name = user.unwrap_or("root");
        let account = nix::unistd::User::from_name(name)
            .ok()
            .flatten()
            .ok_or_else(|| (126, format!("strata-agent: no user {name:?} in this guest\n")))?;
        let home = account.dir.to_string_lossy().into_owned();
        let term = pty.map(|_| if ctx.term.is_empty() { "xterm-256color" } else { ctx.term.as_str() });
        let envs = crate::procs::environment(name, &home, term, ctx, env);
        // Checked before the fork: std reaps a child whose exec failed
        // itself, racing this agent's reaper (and panicking if it loses).
        let path = envs.iter().find(|(k, _)| k == "PATH").map_or("", |(_, v)| v.as_str());
        let program = resolve(prog, path)?;
        let dir = cwd.unwrap_or(if std::path::Path::new(&home).is_dir() { &home } else { "/" });
        if !std::path::Path::new(dir).is_dir() {
            return Err((126, format!("strata-agent: no directory {dir:?}\n")));
        }
        let mut cmd = std::process::Command::new(program);
        cmd.arg0(prog).args(args).env_clear().envs(envs).current_dir(dir);
        if account.uid.as_raw() != 0 {
            // std drops the supplementary groups as it changes ids.
            cmd.uid(account.uid.as_raw()).gid(account.gid.as_raw());
        }
        let spawn = |cmd: &mut std::process::Command| {
            let spawned = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cmd.spawn()))
                .map_err(|_| (126, format!("{prog}: could not be started\n")))?;
            spawned.map_err(|e| (126, format!("{prog}: {e}\n")))
        };
        let (tx, rx) = mpsc::channel();
        let new = |pid: u32, open: u8, master: Option<std::fs::File>| {
            Arc::new(Command {
                id,
                // The agent's reaper collects its status, not std's child.
                pid: pid as i32,
                argv: spec.argv.to_vec(),
                stdin: Mutex::new(Some(tx)),
                status: Mutex::new(Status { open, ..Status::default() }),
                changed: Condvar::new(),
                master,
            })
        };
        if let Some(size) = pty {
            let fail = |e: nix::Error| (126, format!("strata-agent: no pseudo-terminal: {e}\n"));
            let pair = nix::pty::openpty(Some(&crate::procs::winsize(size)), None).map_err(fail)?;
            let slave = std::fs::File::from(pair.slave);
            let io =
                |f: &std::fs::File| f.try_clone().map(Stdio::from).map_err(|e| (126, format!("strata-agent: {e}\n")));
            cmd.stdin(io(&slave)?).stdout(io(&slave)?).stderr(io(&slave)?);
            // SAFETY: only async-signal-safe calls between fork and exec:
            // a session of its own, with the terminal as its controlling one.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let child = spawn(&mut cmd)?;
            drop(slave);
            drop(cmd);
            let master = std::fs::File::from(pair.master);
            let (input, output, control) = match (master.try_clone(), master.try_clone()) {
                (Ok(i), Ok(o)) => (i, o, master),
                _ => return Err((126, "strata-agent: the pseudo-terminal cannot be shared\n".into())),
            };
            let command = new(child.id(), 1, Some(control));
            std::thread::spawn(move || feed(input, rx));
            command.pump(output, false, agent);
            return Ok(command);
        }
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        let mut child = spawn(&mut cmd)?;
        let (Some(stdin), Some(stdout), Some(stderr)) = (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err((126, "strata-agent: the command's pipes are missing\n".into()));
        };
        let command = new(child.id(), 2, None);
        std::thread::spawn(move || feed(stdin, rx));
        command.pump(stdout, false, agent);
        command.pump(stderr, true, agent);
        Ok(command)
    }

    /// Gives its pseudo-terminal a new size (nothing for one on pipes).
    pub fn resize(&self, size: WinSize) {
        if let Some(master) = &self.master {
            let ws = crate::procs::winsize(size);
            // SAFETY: TIOCSWINSZ with a valid winsize on our pty master.
            unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        }
    }

    /// Sends what `pipe` (its stdout, or its stderr with `err`) carries to
    /// the host, from a thread of its own. Each piece is sent before the
    /// next is read: a host that does not read holds the command up, not
    /// the guest's memory.
    fn pump(self: &Arc<Self>, mut pipe: impl Read + Send + 'static, err: bool, agent: &Arc<Agent>) {
        let (command, agent) = (self.clone(), agent.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let (id, data) = (command.id, buf[..n].to_vec());
                agent.send_to_host(&if err { GuestMsg::Stderr { id, data } } else { GuestMsg::Output { id, data } });
            }
            command.pipe_closed(&agent);
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes for its standard input.
    pub fn input(&self, data: Vec<u8>) {
        if let Some(tx) = self.stdin.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            let _ = tx.send(data);
        }
    }

    /// Sends `signal` to its process group (it leads one of its own).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) with a negative pid signals that process group.
        unsafe { libc::kill(-self.pid, signal) };
    }

    /// Ends its standard input once what was sent is written.
    pub fn eof(&self) {
        self.stdin.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    fn pipe_closed(&self, agent: &Agent) {
        let status = {
            let mut st = self.lock();
            st.open = st.open.saturating_sub(1);
            self.changed.notify_all();
            let exit = st.exit;
            match exit {
                Some(s) if st.open == 0 && !std::mem::replace(&mut st.reported, true) => Some(s),
                _ => None,
            }
        };
        if let Some(status) = status {
            agent.send_to_host(&GuestMsg::Exited { id: self.id, status });
        }
    }

    /// Its process ended with `status`: reported once its output is all
    /// sent (or [`DRAIN_AFTER_EXIT`] has passed).
    pub fn exited(self: &Arc<Self>, agent: &Arc<Agent>, status: i32) {
        self.lock().exit = Some(status);
        let (command, agent) = (self.clone(), agent.clone());
        std::thread::spawn(move || {
            let st = command.lock();
            let (mut st, _) = command
                .changed
                .wait_timeout_while(st, DRAIN_AFTER_EXIT, |st| st.open > 0)
                .unwrap_or_else(|e| e.into_inner());
            if !std::mem::replace(&mut st.reported, true) {
                drop(st);
                agent.send_to_host(&GuestMsg::Exited { id: command.id, status });
            }
        });
    }
}

/// The file `prog` names: itself if it has a slash, else the first
/// executable of that name in `path`; or the status and message a shell
/// gives (127: not found, 126: not executable).
fn resolve(prog: &str, path: &str) -> Result<std::path::PathBuf, (i32, String)> {
    let executable = |p: &std::path::Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file())
            && nix::unistd::access(p, nix::unistd::AccessFlags::X_OK).is_ok()
    };
    if prog.contains('/') {
        let p = std::path::Path::new(prog);
        return match std::fs::metadata(p) {
            Err(_) => Err((127, format!("{prog}: No such file or directory\n"))),
            Ok(_) if !executable(p) => Err((126, format!("{prog}: Permission denied\n"))),
            Ok(_) => Ok(p.to_path_buf()),
        };
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| std::path::Path::new(d).join(prog))
        .find(|p| executable(p))
        .ok_or_else(|| (127, format!("{prog}: command not found\n")))
}

/// Writes what arrives to the command's input; closes it when the sender
/// goes (end of input) or the command stops reading.
fn feed(mut stdin: impl Write, rx: mpsc::Receiver<Vec<u8>>) {
    for data in rx {
        if stdin.write_all(&data).is_err() {
            return;
        }
    }
}
