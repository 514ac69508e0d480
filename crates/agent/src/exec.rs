//! Commands run with pipes (`HostMsg::Exec`): standard output and standard
//! error apart, input that ends, the exit status. Unlike a program on a
//! terminal, nothing is echoed or translated: bytes pass unchanged.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{ChildStdin, Stdio};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::Duration;

use strata_proto::{GuestMsg, ProcId, TerminalContext};

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

/// One command started by `HostMsg::Exec`.
pub struct Command {
    pub id: ProcId,
    pub pid: i32,
    /// Input for the feeding thread; `None` once input ended.
    stdin: Mutex<Option<mpsc::Sender<Vec<u8>>>>,
    status: Mutex<Status>,
    changed: Condvar,
}

impl Command {
    /// Starts `argv`. On failure: the exit status a shell would give (127:
    /// not found, 126: not executable) and what to print on its stderr.
    pub fn start(
        agent: &Arc<Agent>,
        id: ProcId,
        argv: &[String],
        env: &[(String, String)],
        cwd: Option<&str>,
        user: Option<&str>,
        ctx: &TerminalContext,
    ) -> Result<Arc<Command>, (i32, String)> {
        let (prog, args) = argv.split_first().ok_or((127, "strata-agent: empty command\n".to_string()))?;
        let name = user.unwrap_or("root");
        let account = nix::unistd::User::from_name(name)
            .ok()
            .flatten()
            .ok_or_else(|| (126, format!("strata-agent: no user {name:?} in this guest\n")))?;
        let home = account.dir.to_string_lossy().into_owned();
        let envs = crate::procs::environment(name, &home, None, ctx, env);
        // Checked before the fork: std reaps a child whose exec failed
        // itself, racing this agent's reaper (and panicking if it loses).
        let path = envs.iter().find(|(k, _)| k == "PATH").map_or("", |(_, v)| v.as_str());
        let program = resolve(prog, path)?;
        let dir = cwd.unwrap_or(if std::path::Path::new(&home).is_dir() { &home } else { "/" });
        if !std::path::Path::new(dir).is_dir() {
            return Err((126, format!("strata-agent: no directory {dir:?}\n")));
        }
        let mut cmd = std::process::Command::new(program);
        cmd.arg0(prog)
            .args(args)
            .env_clear()
            .envs(envs)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if account.uid.as_raw() != 0 {
            // std drops the supplementary groups as it changes ids.
            cmd.uid(account.uid.as_raw()).gid(account.gid.as_raw());
        }
        let spawned = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cmd.spawn()))
            .map_err(|_| (126, format!("{prog}: could not be started\n")))?;
        let mut child = spawned.map_err(|e| (126, format!("{prog}: {e}\n")))?;
        let (Some(stdin), Some(stdout), Some(stderr)) = (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err((126, "strata-agent: the command's pipes are missing\n".into()));
        };
        // The agent's reaper collects its status, not `child`.
        let pid = child.id() as i32;
        let (tx, rx) = mpsc::channel();
        let command = Arc::new(Command {
            id,
            pid,
            stdin: Mutex::new(Some(tx)),
            status: Mutex::new(Status { open: 2, ..Status::default() }),
            changed: Condvar::new(),
        });
        std::thread::spawn(move || feed(stdin, rx));
        command.pump(stdout, false, agent);
        command.pump(stderr, true, agent);
        Ok(command)
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
fn feed(mut stdin: ChildStdin, rx: mpsc::Receiver<Vec<u8>>) {
    for data in rx {
        if stdin.write_all(&data).is_err() {
            return;
        }
    }
}
