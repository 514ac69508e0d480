//! A running session: one VM, its agent channel and the program on its terminal.

use std::time::Duration;

use strata_proto::{GuestMsg, HostMsg, ProcId, Readiness, TerminalContext, WinSize};
use strata_store::WorkDir;
use strata_vmm::{AgentConn, AgentWriter, Vm, VmConfig};
use tokio::sync::mpsc;

use crate::Error;

/// The process id of a package's program inside its VM.
pub const MAIN_PROC: ProcId = 1;

/// A command to run in a session's guest with pipes ([`Session::exec`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestCommand {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Working directory (default: the user's home).
    pub cwd: Option<String>,
    /// User to run as (default: root).
    pub user: Option<String>,
}

impl GuestCommand {
    /// Checks what came from outside: a program, arguments without NUL,
    /// environment names, an absolute working directory, a user name.
    ///
    /// # Errors
    /// What is wrong, in words.
    pub fn check(&self) -> Result<(), String> {
        if self.argv.first().is_none_or(String::is_empty) {
            return Err("the command is empty: name a program".into());
        }
        if self.argv.iter().any(|a| a.contains('\0')) {
            return Err("a command's arguments must not contain NUL".into());
        }
        for (k, v) in &self.env {
            crate::context::check_env(k, v)?;
        }
        if let Some(cwd) = &self.cwd {
            if !cwd.starts_with('/') || cwd.contains('\0') {
                return Err(format!("working directory {cwd:?} is not an absolute path"));
            }
        }
        if let Some(u) = &self.user {
            if u.is_empty() || u.len() > 32 || !u.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) {
                return Err(format!("user {u:?} is not a user name"));
            }
        }
        Ok(())
    }
}

/// What a session reports to its terminal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// Terminal output of the program.
    Output(Vec<u8>),
    /// The program ended with this status.
    Exited(i32),
    /// The VM or its agent went away without an exit status.
    Lost(String),
    /// The agent acknowledged a detach.
    Detached,
    /// The agent acknowledged an attach; the program's screen so far.
    Attached(Vec<u8>),
    /// The program's screen, as asked for.
    Screen(Vec<u8>),
    /// The agent's answer to a file read or write.
    File(Result<strata_proto::FilePart, String>),
    /// The agent's answer about the clipboard.
    Clipboard(Result<String, String>),
    /// Output of a command started by [`Session::exec`]: its stdout, or
    /// its stderr (`stderr`).
    CommandOutput { id: ProcId, stderr: bool, data: Vec<u8> },
    /// A command started by [`Session::exec`] ended with this status.
    CommandExited { id: ProcId, status: i32 },
    /// The commands that run in the guest, as asked for.
    Commands(Vec<strata_proto::CommandState>),
}

/// A running VM with the package's program. The VM is killed and its
/// scratch directory (sockets, throwaway overlay, logs) removed on drop.
pub struct Session {
    pub id: String,
    pub package: String,
    /// The OS its guest runs (its image's).
    pub os: String,
    /// What the program's screen showed when the terminal attached.
    pub screen: Vec<u8>,
    vm: Vm,
    writer: AgentWriter,
    events: mpsc::Receiver<SessionEvent>,
    /// Commands' events read while waiting for an answer of the agent,
    /// for [`Session::next_event`] to give first.
    held_back: std::collections::VecDeque<SessionEvent>,
    dir: WorkDir,
    /// The session's directory if it is registered (may be detached).
    pub(crate) record: Option<std::path::PathBuf>,
    /// Its VM has a display ([`Session::vnc_socket`]).
    pub graphical: bool,
    /// Its context plugged devices in (network, shared folders, home).
    pub has_devices: bool,
    /// The package's program waiting on pipes since the launch image was
    /// saved (a standby for a scripted run), until taken.
    pub(crate) standby: Option<ProcId>,
    /// The ids of the login shells waiting for a command that the image
    /// held (standby shells, [`crate::launch::SHELL_STANDBY_PROCS`]), each
    /// until given one.
    pub(crate) shell_standbys: Vec<ProcId>,
}

/// A VM booted (or restored) whose agent answered the first attach.
pub(crate) struct Attached {
    pub vm: Vm,
    pub conn: AgentConn,
    pub dir: WorkDir,
    pub screen: Vec<u8>,
    pub exited: Option<i32>,
}

/// Starts a VM and performs the first attach with `ctx`.
pub(crate) async fn start_and_attach(
    cfg: VmConfig,
    dir: WorkDir,
    ctx: &TerminalContext,
    timeout: Duration,
) -> Result<Attached, Error> {
    let t0 = std::time::Instant::now();
    let (mut vm, mut conn) = Vm::start(&cfg, timeout).await?;
    // The context's devices go in once the guest runs, before the attach
    // that tells the agent to set them up (unless the state holds them).
    let plugs: &[strata_vmm::Plug] = if cfg.plugs_in_state { &[] } else { &cfg.plugs };
    if let Err(e) = vm.plug(plugs).await {
        let diag = vm.diagnostics();
        vm.kill().await;
        return Err(Error::Agent(format!("plugging in the context's devices: {e}\n{diag}")));
    }
    let reply = first_attach(&mut conn, ctx, timeout).await;
    tracing::debug!(ms = t0.elapsed().as_secs_f64() * 1e3, cpu_ms = vm.cpu_ms(), "agent attached");
    match reply {
        Ok((screen, exited)) => Ok(Attached { vm, conn, dir, screen, exited }),
        Err(e) => {
            let diag = vm.diagnostics();
            vm.kill().await;
            Err(Error::Agent(format!("{e}\n{diag}")))
        }
    }
}

/// Boots a VM for an image build in a new scratch directory `label`; if the
/// guest does not answer, boots it once more. A guest that hangs early is
/// rare under TCG but must not fail a build (the second boot starts from the
/// same disks; `fresh` clears what the first one may have left, such as a
/// memory file).
pub(crate) async fn boot_for_build(
    store: &strata_store::Store,
    label: &str,
    make: impl Fn(&std::path::Path) -> Result<VmConfig, Error>,
    fresh: impl Fn(),
    ctx: &TerminalContext,
    timeout: Duration,
) -> Result<Attached, Error> {
    let mut attempt = 1;
    loop {
        let dir = store.work_dir(label)?;
        let cfg = make(dir.path())?;
        match start_and_attach(cfg, dir, ctx, timeout).await {
            Err(e @ (Error::Agent(_) | Error::Vm(strata_vmm::Error::AgentTimeout(_)))) if attempt == 1 => {
                tracing::warn!(error = %e, "a build VM did not answer; booting it again");
                fresh();
                attempt += 1;
            }
            r => return r,
        }
    }
}

fn main_screen(procs: Vec<strata_proto::ProcState>) -> Vec<u8> {
    procs.into_iter().find(|p| p.id == MAIN_PROC).map(|p| p.screen).unwrap_or_default()
}

/// The program's recent output from an agent connected but not attached.
pub(crate) async fn peek_screen(conn: &mut AgentConn, timeout: Duration) -> Result<Vec<u8>, Error> {
    conn.send(&HostMsg::Screen).await?;
    loop {
        match tokio::time::timeout(timeout, conn.recv()).await {
            Ok(Ok(Some(GuestMsg::Screens { procs }))) => return Ok(main_screen(procs)),
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => return Err(Error::AgentGone("reading the screen")),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => return Err(Error::Timeout { what: "the program's screen".into(), secs: timeout.as_secs() }),
        }
    }
}

/// Attaches a terminal's context to a freshly connected agent and returns
/// the main program's screen and exit status, if it has ended.
pub(crate) async fn first_attach(
    conn: &mut AgentConn,
    ctx: &TerminalContext,
    timeout: Duration,
) -> Result<(Vec<u8>, Option<i32>), Error> {
    conn.send(&HostMsg::Attach(ctx.clone())).await?;
    match tokio::time::timeout(timeout, conn.recv()).await {
        Ok(Ok(Some(GuestMsg::Attached { procs, problems, .. }))) => {
            if !problems.is_empty() {
                return Err(Error::Agent(format!("the context could not be applied: {}", problems.join("; "))));
            }
            let main = procs.into_iter().find(|p| p.id == MAIN_PROC);
            Ok(main.map(|p| (p.screen, p.exit)).unwrap_or_default())
        }
        Ok(Ok(Some(other))) => Err(Error::Agent(format!("expected Attached, got {other:?}"))),
        Ok(Ok(None)) => Err(Error::AgentGone("attach")),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(Error::Timeout { what: "the guest agent to attach".into(), secs: timeout.as_secs() }),
    }
}

/// Starts the package's program in an attached VM and waits until it is ready.
/// Returns what the program printed meanwhile.
pub(crate) async fn spawn_ready(
    a: &mut Attached,
    package: &str,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    readiness: Readiness,
    timeout_ms: u32,
) -> Result<Vec<u8>, Error> {
    a.conn.send(&HostMsg::Spawn { id: MAIN_PROC, argv, env, readiness, ready_timeout_ms: timeout_ms }).await?;
    let mut screen = Vec::new();
    // The agent enforces the readiness time-out; this one only guards a hung guest.
    let guard = Duration::from_millis(timeout_ms as u64) + Duration::from_secs(30);
    let not_ready = |reason: String, screen: &[u8]| Error::NotReady {
        package: package.into(),
        reason,
        screen: crate::tools::tail(&String::from_utf8_lossy(screen), 20),
    };
    loop {
        let msg = match tokio::time::timeout(guard, a.conn.recv()).await {
            Ok(m) => m?,
            Err(_) => return Err(not_ready("the guest stopped answering".into(), &screen)),
        };
        match msg {
            Some(GuestMsg::Output { data, .. }) => screen.extend_from_slice(&data),
            Some(GuestMsg::Ready { .. }) => return Ok(screen),
            Some(GuestMsg::Failed { reason, .. }) => return Err(not_ready(reason, &screen)),
            Some(GuestMsg::Exited { status, .. }) => {
                return Err(not_ready(format!("the program exited with status {status}"), &screen))
            }
            Some(GuestMsg::Spawned { .. }) => {}
            Some(other) => tracing::debug!(?other, "ignored while waiting for readiness"),
            None => return Err(Error::AgentGone("program start")),
        }
    }
}

impl Session {
    /// Wraps an attached VM; a task forwards the agent's messages as events.
    pub(crate) fn new(id: String, package: &str, os: &str, a: Attached) -> Session {
        let Attached { vm, conn, dir, screen, exited } = a;
        let AgentConn { mut reader, writer } = conn;
        let (tx, rx) = mpsc::channel(256);
        if let Some(code) = exited {
            let _ = tx.try_send(SessionEvent::Exited(code));
        }
        tokio::spawn(async move {
            loop {
                let ev = match reader.recv().await {
                    Ok(Some(GuestMsg::Output { id: MAIN_PROC, data })) => SessionEvent::Output(data),
                    Ok(Some(GuestMsg::Exited { id: MAIN_PROC, status })) => SessionEvent::Exited(status),
                    Ok(Some(GuestMsg::Detached)) => SessionEvent::Detached,
                    Ok(Some(GuestMsg::Attached { procs, .. })) => SessionEvent::Attached(main_screen(procs)),
                    Ok(Some(GuestMsg::Screens { procs })) => SessionEvent::Screen(main_screen(procs)),
                    Ok(Some(GuestMsg::File(r))) => SessionEvent::File(r),
                    Ok(Some(GuestMsg::Clipboard(r))) => SessionEvent::Clipboard(r),
                    Ok(Some(GuestMsg::Commands(list))) => SessionEvent::Commands(list),
                    Ok(Some(GuestMsg::Output { id, data })) => SessionEvent::CommandOutput { id, stderr: false, data },
                    Ok(Some(GuestMsg::Stderr { id, data })) => SessionEvent::CommandOutput { id, stderr: true, data },
                    Ok(Some(GuestMsg::Exited { id, status })) => SessionEvent::CommandExited { id, status },
                    Ok(Some(GuestMsg::Error { message })) => {
                        tracing::warn!(%message, "guest agent error");
                        continue;
                    }
                    Ok(Some(_)) => continue,
                    Ok(None) => SessionEvent::Lost("the VM closed its channel".into()),
                    Err(e) => SessionEvent::Lost(format!("agent channel: {e}")),
                };
                let end = matches!(ev, SessionEvent::Exited(_) | SessionEvent::Lost(_));
                if tx.send(ev).await.is_err() || end {
                    break;
                }
            }
        });
        Session {
            id,
            package: package.into(),
            os: os.into(),
            screen,
            vm,
            writer,
            events: rx,
            held_back: Default::default(),
            dir,
            record: None,
            graphical: false,
            has_devices: false,
            standby: None,
            shell_standbys: Vec::new(),
        }
    }

    /// Takes the package's program that waits on pipes in this session, if
    /// its launch image holds one: its command id. Once only: its input,
    /// output and exit are then the caller's, as after [`Session::exec`]
    /// (its input is still open).
    pub fn take_standby(&mut self) -> Option<ProcId> {
        self.standby.take()
    }

    /// How many standby shells wait for a command (see
    /// [`Session::exec_on_shell_standby`]).
    pub fn shell_standbys(&self) -> usize {
        self.shell_standbys.len()
    }

    /// Starts a standby shell as command `id` (the image's are used up):
    /// under TCG its start costs what a new login shell's does, but before
    /// a command needs it. A command given to it before it reads waits in
    /// its input.
    ///
    /// # Errors
    /// If the channel is broken.
    pub async fn add_shell_standby(&mut self, id: ProcId) -> Result<(), Error> {
        let argv = crate::launch::SHELL_STANDBY_ARGV.map(String::from).to_vec();
        self.writer.send(&HostMsg::Exec { id, argv, env: Vec::new(), cwd: None, user: None }).await?;
        self.shell_standbys.push(id);
        Ok(())
    }

    /// Runs `command` on a standby shell, if one waits and `command` is
    /// one it runs exactly as a new `/bin/bash -l -c CMD` would
    /// ([`crate::launch::shell_standby_input`]): its id, under which it
    /// goes on as [`Session::exec`]'s commands do. `None`: start it with
    /// [`Session::exec`].
    ///
    /// # Errors
    /// If the channel is broken.
    pub async fn exec_on_shell_standby(&mut self, command: &GuestCommand) -> Result<Option<ProcId>, Error> {
        let Some(&id) = self.shell_standbys.first() else { return Ok(None) };
        let Some(input) = crate::launch::shell_standby_input(command) else { return Ok(None) };
        self.shell_standbys.remove(0);
        self.command_input(id, &input).await?;
        Ok(Some(id))
    }

    /// The next thing the program did. Cancel-safe.
    /// Lends the session's events out (an empty stream is left in their
    /// place until [`Session::return_events`]), so that they can be read
    /// while the session itself is busy (moving).
    pub fn lend_events(&mut self) -> mpsc::Receiver<SessionEvent> {
        std::mem::replace(&mut self.events, mpsc::channel(1).1)
    }

    /// Gives back what [`Session::lend_events`] lent.
    pub fn return_events(&mut self, events: mpsc::Receiver<SessionEvent>) {
        self.events = events;
    }

    pub async fn next_event(&mut self) -> SessionEvent {
        match self.held_back.pop_front() {
            Some(ev) => ev,
            None => self.recv_event().await,
        }
    }

    async fn recv_event(&mut self) -> SessionEvent {
        match self.events.recv().await.unwrap_or_else(|| SessionEvent::Lost("the session ended".into())) {
            // Said plainly: the user's program did nothing wrong by exiting.
            SessionEvent::Lost(why) if self.vm.killed_by_memory_limit() => SessionEvent::Lost(format!(
                "ended by its memory limit: the kernel killed its VM, which used more than the guest's RAM \
                 plus the server's allowance (STRATA_MEMORY_ALLOWANCE_MIB) ({why})"
            )),
            // A standby shell that ended (killed from inside) takes no command.
            ev @ SessionEvent::CommandExited { id, .. } => {
                self.shell_standbys.retain(|s| *s != id);
                ev
            }
            ev => ev,
        }
    }

    /// Types bytes into the program.
    ///
    /// # Errors
    /// If the channel is broken.
    pub async fn input(&mut self, data: &[u8]) -> Result<(), Error> {
        Ok(self.writer.send(&HostMsg::Input { id: MAIN_PROC, data: data.to_vec() }).await?)
    }

    /// Ends the program's input (as a closed pipe would).
    ///
    /// # Errors
    /// If the channel is broken.
    pub async fn eof(&mut self) -> Result<(), Error> {
        Ok(self.writer.send(&HostMsg::Eof { id: MAIN_PROC }).await?)
    }

    /// Follows the terminal's size.
    ///
    /// # Errors
    /// If the channel is broken.
    pub async fn resize(&mut self, size: WinSize) -> Result<(), Error> {
        Ok(self.writer.send(&HostMsg::Resize { id: MAIN_PROC, size }).await?)
    }

    /// QEMU's process id.
    pub fn vm_pid(&self) -> u32 {
        self.vm.pid()
    }

    /// Sets the niceness of the session's QEMU (all its threads).
    pub fn set_niceness(&self, nice: i32) {
        self.vm.set_niceness(nice);
    }

    /// Counts the session's QEMU as work ahead of demand no more (not
    /// stopped while launches run); see [`strata_vmm::background`].
    pub fn leave_background(&self) {
        self.vm.leave_background();
    }

    /// Writes the VM's display (graphical packages) to `path` as a PNG.
    ///
    /// # Errors
    /// If the VM has no display or the file cannot be written.
    pub async fn screenshot(&mut self, path: &std::path::Path) -> Result<(), Error> {
        Ok(self.vm.screenshot(path, false).await?)
    }

    /// The VM's display now: (width, height, pixels not black).
    ///
    /// # Errors
    /// If the VM has no display.
    pub async fn screen_pixels(&mut self) -> Result<(u32, u32, u64), Error> {
        let data = self.screen_dump().await?;
        parse_ppm(&data).ok_or_else(|| Error::Agent("QEMU wrote an unreadable screen dump".into()))
    }

    /// The display's pixels, three bytes each (red, green, blue), row by row.
    ///
    /// # Errors
    /// If the VM has no display or QEMU cannot dump it.
    pub async fn screen_rgb(&mut self) -> Result<Vec<u8>, Error> {
        let data = self.screen_dump().await?;
        let (w, h, _) = parse_ppm(&data).ok_or_else(|| Error::Agent("QEMU wrote an unreadable screen dump".into()))?;
        let size = w as usize * h as usize * 3;
        Ok(data[data.len().saturating_sub(size)..].to_vec())
    }

    /// The display as QEMU dumps it (a PPM file's bytes).
    async fn screen_dump(&mut self) -> Result<Vec<u8>, Error> {
        let work = screen_dump_path(self.vm.dir());
        self.vm.screenshot(&work, true).await?;
        let data = std::fs::read(&work).map_err(crate::io_err(&work))?;
        let _ = std::fs::remove_file(&work);
        Ok(data)
    }

    /// Types `x` on the VM's keyboard (a graphical session's display).
    ///
    /// # Errors
    /// If QEMU refuses.
    pub async fn press_x(&mut self) -> Result<(), Error> {
        Ok(self.vm.press_x().await?)
    }

    /// The VNC socket of a graphical session's display.
    /// The VM's directory (its sockets, overlay, logs).
    pub fn vm_dir(&self) -> &std::path::Path {
        self.vm.dir()
    }

    pub fn vnc_socket(&self) -> std::path::PathBuf {
        self.vm.dir().join(strata_vmm::VNC_SOCK)
    }

    /// Pauses the VM: its program stops where it is, using no CPU.
    ///
    /// # Errors
    /// If QEMU refuses.
    pub async fn pause(&mut self) -> Result<(), Error> {
        Ok(self.vm.pause().await?)
    }

    /// Resumes a paused VM.
    ///
    /// # Errors
    /// If QEMU refuses.
    pub async fn resume(&mut self) -> Result<(), Error> {
        Ok(self.vm.resume().await?)
    }

    /// Tells the agent no terminal is watching: it keeps the program's output
    /// as its screen instead of sending it.
    ///
    /// # Errors
    /// If the channel is broken.
    pub async fn quiet(&mut self) -> Result<(), Error> {
        self.wait_for(HostMsg::Quiet, |e| matches!(e, SessionEvent::Detached)).await.map(|_| ())
    }

    /// Tells the agent a terminal is watching again with `ctx`; returns the
    /// program's screen so far, to repaint the terminal.
    ///
    /// # Errors
    /// If the channel is broken or the agent does not answer.
    pub async fn reattach(&mut self, ctx: &TerminalContext) -> Result<Vec<u8>, Error> {
        match self.wait_for(HostMsg::Attach(ctx.clone()), |e| matches!(e, SessionEvent::Attached(_))).await? {
            SessionEvent::Attached(screen) => Ok(screen),
            _ => unreachable!("wait_for returns the awaited event"),
        }
    }

    /// The program's recent output (what a terminal attaching now would see).
    ///
    /// # Errors
    /// If the agent does not answer.
    pub async fn screen(&mut self) -> Result<Vec<u8>, Error> {
        match self.wait_for(HostMsg::Screen, |e| matches!(e, SessionEvent::Screen(_))).await? {
            SessionEvent::Screen(s) => Ok(s),
            _ => unreachable!("wait_for returns the awaited event"),
        }
    }

    async fn file_op(&mut self, msg: HostMsg) -> Result<strata_proto::FilePart, Error> {
        match self.wait_for(msg, |e| matches!(e, SessionEvent::File(_))).await? {
            SessionEvent::File(r) => r.map_err(|m| Error::Config(format!("in the guest: {m}"))),
            _ => unreachable!("wait_for returns the awaited event"),
        }
    }

    /// The text on a graphical session's clipboard.
    ///
    /// # Errors
    /// If the session has no display or the agent cannot read it.
    pub async fn clipboard(&mut self) -> Result<String, Error> {
        self.clipboard_op(HostMsg::ClipboardGet).await
    }

    /// Puts text on a graphical session's clipboard.
    ///
    /// # Errors
    /// If the session has no display or the agent cannot set it.
    pub async fn set_clipboard(&mut self, text: &str) -> Result<(), Error> {
        self.clipboard_op(HostMsg::ClipboardSet { text: text.into() }).await?;
        // The guest's xclip takes the selection a moment after it read the
        // text; answer once the clipboard holds it, so a paste right after
        // this call gets it. Bounded: 50 looks, 40 ms apart.
        for _ in 0..50 {
            if self.clipboard().await? == text {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        Err(Error::Agent("the guest's clipboard did not take the text within 2 s".into()))
    }

    /// Asks the agent for the commands that run (answered as
    /// [`SessionEvent::Commands`]), for a caller that reads the events itself.
    ///
    /// # Errors
    /// If the agent's channel is gone.
    pub async fn request_commands(&mut self) -> Result<(), Error> {
        Ok(self.writer.send(&HostMsg::ListCommands).await?)
    }

    /// The commands started with pipes or on a PTY that run in the guest
    /// now, whoever started them.
    ///
    /// # Errors
    /// If the agent does not answer.
    pub async fn commands(&mut self) -> Result<Vec<strata_proto::CommandState>, Error> {
        match self.wait_for(HostMsg::ListCommands, |e| matches!(e, SessionEvent::Commands(_))).await? {
            SessionEvent::Commands(list) => Ok(list),
            _ => unreachable!("wait_for returns the awaited event"),
        }
    }

    async fn clipboard_op(&mut self, msg: HostMsg) -> Result<String, Error> {
        if !self.graphical {
            return Err(Error::Config(format!("{} is not a graphical package: it has no clipboard", self.package)));
        }
        match self.wait_for(msg, |e| matches!(e, SessionEvent::Clipboard(_))).await? {
            SessionEvent::Clipboard(r) => r.map_err(|m| Error::Config(format!("in the guest: {m}"))),
            _ => unreachable!("wait_for returns the awaited event"),
        }
    }

    /// Copies a host file into the guest at `guest` (replaced atomically
    /// there); returns the bytes copied.
    ///
    /// # Errors
    /// If the host file cannot be read or the guest refuses the write.
    pub async fn copy_in(&mut self, host: &std::path::Path, guest: &str) -> Result<u64, Error> {
        use std::io::Read;
        use std::os::unix::fs::PermissionsExt;
        let mut f = std::fs::File::open(host).map_err(crate::io_err(host))?;
        let meta = f.metadata().map_err(crate::io_err(host))?;
        if !meta.is_file() {
            return Err(Error::Config(format!("{} is not a file; copy files one at a time", host.display())));
        }
        let mode = meta.permissions().mode() & 0o7777;
        let mut offset = 0u64;
        let mut buf = vec![0u8; strata_proto::FILE_CHUNK];
        loop {
            let mut n = 0;
            while n < buf.len() {
                match f.read(&mut buf[n..]).map_err(crate::io_err(host))? {
                    0 => break,
                    k => n += k,
                }
            }
            let last = n < buf.len();
            let msg = HostMsg::FileWrite { path: guest.into(), offset, data: buf[..n].to_vec(), last, mode };
            self.file_op(msg).await?;
            offset += n as u64;
            if last {
                return Ok(offset);
            }
        }
    }

    /// Copies the guest file `guest` to `host` (written to a temporary
    /// file first, then renamed); returns the bytes copied.
    ///
    /// # Errors
    /// If the guest cannot read the file or the host file cannot be written.
    pub async fn copy_out(&mut self, guest: &str, host: &std::path::Path) -> Result<u64, Error> {
        use std::io::Write;
        let name = host.file_name().ok_or_else(|| Error::Config(format!("{} names no file", host.display())))?;
        let tmp = host.with_file_name(format!(".{}.strata-part", name.to_string_lossy()));
        let mut f = std::fs::File::create(&tmp).map_err(crate::io_err(&tmp))?;
        let mut offset = 0u64;
        let copied = async {
            loop {
                let part = self
                    .file_op(HostMsg::FileRead { path: guest.into(), offset, len: strata_proto::FILE_CHUNK as u32 })
                    .await?;
                f.write_all(&part.data).map_err(crate::io_err(&tmp))?;
                offset += part.data.len() as u64;
                if part.eof {
                    f.sync_all().map_err(crate::io_err(&tmp))?;
                    return Ok::<_, Error>(offset);
                }
            }
        }
        .await;
        match copied {
            Ok(n) => {
                std::fs::rename(&tmp, host).map_err(crate::io_err(host))?;
                Ok(n)
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    pub(crate) fn vm_mut(&mut self) -> &mut Vm {
        &mut self.vm
    }

    /// Runs a command in the guest with pipes (not the program's terminal):
    /// its output arrives as [`SessionEvent::CommandOutput`] and its end as
    /// [`SessionEvent::CommandExited`] under `id` (not [`MAIN_PROC`]);
    /// [`Session::command_input`] feeds it, [`Session::command_eof`] ends
    /// its input.
    ///
    /// # Errors
    /// If `id` is the program's, or the channel is broken.
    pub async fn exec(&mut self, id: ProcId, command: GuestCommand) -> Result<(), Error> {
        if id == MAIN_PROC {
            return Err(Error::Config(format!("process id {MAIN_PROC} is the program's")));
        }
        let GuestCommand { argv, env, cwd, user } = command;
        if argv.is_empty() {
            return Err(Error::Config("no command to run".into()));
        }
        Ok(self.writer.send(&HostMsg::Exec { id, argv, env, cwd, user }).await?)
    }

    /// Bytes for the standard input of command `id`.
    ///
    /// # Errors
    /// If the channel is broken.
    pub async fn command_input(&mut self, id: ProcId, data: &[u8]) -> Result<(), Error> {
        Ok(self.writer.send(&HostMsg::Input { id, data: data.to_vec() }).await?)
    }

    /// Ends the standard input of command `id`.
    ///
    /// # Errors
    /// If the channel is broken.
    pub async fn command_eof(&mut self, id: ProcId) -> Result<(), Error> {
        Ok(self.writer.send(&HostMsg::Eof { id }).await?)
    }

    /// Runs a command on a new pseudo-terminal of `size` beside the
    /// program: its output (one stream) comes as
    /// [`SessionEvent::CommandOutput`], then [`SessionEvent::CommandExited`].
    ///
    /// # Errors
    /// As [`Session::exec`].
    pub async fn exec_pty(&mut self, id: ProcId, command: GuestCommand, size: WinSize) -> Result<(), Error> {
        if id == MAIN_PROC {
            return Err(Error::Config(format!("process id {MAIN_PROC} is the program's")));
        }
        let GuestCommand { argv, env, cwd, user } = command;
        if argv.is_empty() {
            return Err(Error::Config("no command to run".into()));
        }
        Ok(self.writer.send(&HostMsg::ExecPty { id, argv, env, cwd, user, size }).await?)
    }

    /// Gives command `id`'s pseudo-terminal a new size.
    ///
    /// # Errors
    /// If the channel is broken.
    pub async fn command_resize(&mut self, id: ProcId, size: WinSize) -> Result<(), Error> {
        Ok(self.writer.send(&HostMsg::Resize { id, size }).await?)
    }

    /// Sends signal number `signal` to command `id` and its process group.
    ///
    /// # Errors
    /// If the channel is broken.
    pub async fn command_signal(&mut self, id: ProcId, signal: i32) -> Result<(), Error> {
        Ok(self.writer.send(&HostMsg::Signal { id, signal }).await?)
    }

    /// Lets go of a session this process only borrowed (to copy files, run
    /// a command), leaving it running and detached as it was.
    pub fn release(self) {
        let Session { vm, dir, .. } = self;
        vm.release();
        dir.keep();
    }

    /// Sends `msg` and waits (10 s at most) for the event `done` accepts,
    /// dropping program output meanwhile.
    async fn wait_for(&mut self, msg: HostMsg, done: impl Fn(&SessionEvent) -> bool) -> Result<SessionEvent, Error> {
        self.writer.send(&msg).await?;
        let wait = async {
            loop {
                let ev = self.recv_event().await;
                if done(&ev) {
                    return Ok(ev);
                }
                match ev {
                    // The program's output is on the agent's screen too;
                    // its commands' is not, and goes on to whoever reads
                    // the session's events next.
                    ev @ (SessionEvent::CommandOutput { .. }
                    | SessionEvent::CommandExited { .. }
                    | SessionEvent::Commands(_)) => self.held_back.push_back(ev),
                    SessionEvent::Output(_)
                    | SessionEvent::Detached
                    | SessionEvent::Attached(_)
                    | SessionEvent::Screen(_)
                    | SessionEvent::File(_)
                    | SessionEvent::Clipboard(_) => {}
                    other => return Err(Error::Agent(format!("{other:?} while waiting for the agent"))),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .map_err(|_| Error::Timeout { what: "the guest agent to answer".into(), secs: 10 })?
    }

    /// Whether the session can be detached (and re-attached later).
    pub fn detachable(&self) -> bool {
        self.record.is_some()
    }

    /// Stops the VM now and removes everything the session created.
    pub async fn close(mut self) {
        tracing::debug!(cpu_ms = self.vm.cpu_ms(), pid = self.vm.pid(), "closing the session");
        self.vm.kill().await;
    }

    /// Leaves the session running without a terminal; `strata attach` returns to it.
    ///
    /// # Errors
    /// If the session is not detachable or the agent does not acknowledge.
    pub async fn detach(mut self) -> Result<String, Error> {
        let Some(dir) = self.record.clone() else {
            return Err(Error::Config(
                "this session cannot be detached (it was not launched from a launch image)".into(),
            ));
        };
        self.ask_detach().await?;
        crate::sessions::mark_detached(&dir, "detached by its terminal")?;
        let Session { id, vm, dir: work, .. } = self;
        vm.release();
        work.keep();
        Ok(id)
    }

    /// Leaves a registered session running and detached whatever its agent
    /// answers (its process is stopping): never stops the VM. `why` is
    /// recorded for `ps`.
    pub async fn leave(mut self, why: &str) {
        if let Err(e) = self.ask_detach().await {
            tracing::warn!(session = %self.id, error = %e, "the agent did not acknowledge the detach; left running anyway");
        }
        if let Some(dir) = &self.record {
            if let Err(e) = crate::sessions::mark_detached(dir, why) {
                tracing::warn!(session = %self.id, error = %e, "could not mark the session detached");
            }
        }
        self.release();
    }

    /// Tells the agent the terminal leaves and waits for its acknowledgement
    /// (it has written its dirty data back then).
    async fn ask_detach(&mut self) -> Result<(), Error> {
        self.wait_for(HostMsg::Detach, |e| matches!(e, SessionEvent::Detached)).await.map(|_| ())
    }

    /// Sends input, then collects output until `expect` appears; returns the
    /// output seen. Used by tests and benchmarks.
    ///
    /// # Errors
    /// If the program ends or `timeout` passes first.
    pub async fn expect_after(&mut self, input: &[u8], expect: &str, timeout: Duration) -> Result<String, Error> {
        if !input.is_empty() {
            self.input(input).await?;
        }
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.next_event()).await {
                Ok(SessionEvent::Output(d)) => {
                    seen.extend_from_slice(&d);
                    if String::from_utf8_lossy(&seen).contains(expect) {
                        return Ok(String::from_utf8_lossy(&seen).into_owned());
                    }
                }
                Ok(other) => {
                    return Err(Error::Agent(format!(
                        "{other:?} before {expect:?} appeared; output was {:?}",
                        String::from_utf8_lossy(&seen)
                    )))
                }
                Err(_) => {
                    return Err(Error::Timeout {
                        what: format!("{expect:?} (output so far: {:?})", String::from_utf8_lossy(&seen)),
                        secs: timeout.as_secs(),
                    })
                }
            }
        }
    }
}

/// Where a screen dump is written for reading back, in the VM's directory.
fn screen_dump_path(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join(format!("screen.{}.ppm", std::process::id()))
}

/// (width, height, pixels not black) of a binary PPM (P6, 8 bits).
fn parse_ppm(data: &[u8]) -> Option<(u32, u32, u64)> {
    let mut fields = Vec::new();
    let mut i = 0;
    while fields.len() < 4 {
        while data.get(i)?.is_ascii_whitespace() {
            i += 1;
        }
        let start = i;
        while !data.get(i)?.is_ascii_whitespace() {
            i += 1;
        }
        fields.push(std::str::from_utf8(&data[start..i]).ok()?.to_string());
    }
    if fields[0] != "P6" || fields[3] != "255" {
        return None;
    }
    let (w, h): (u32, u32) = (fields[1].parse().ok()?, fields[2].parse().ok()?);
    let pixels = data.get(i + 1..)?;
    let lit = pixels.chunks_exact(3).filter(|p| p.iter().any(|b| *b != 0)).count() as u64;
    Some((w, h, lit))
}

#[cfg(test)]
mod tests {
    #[test]
    fn ppm_pixels_are_counted() {
        let mut img = b"P6\n2 1\n255\n".to_vec();
        img.extend_from_slice(&[0, 0, 0, 9, 0, 0]);
        assert_eq!(super::parse_ppm(&img), Some((2, 1, 1)));
        assert_eq!(super::parse_ppm(b"P3\n1 1\n255\n"), None);
        assert_eq!(super::parse_ppm(b"P6"), None);
    }

    #[test]
    fn commands_from_outside_are_checked() {
        let cmd = |argv: &[&str]| super::GuestCommand {
            argv: argv.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        };
        assert!(cmd(&["echo", "hi"]).check().is_ok());
        assert!(cmd(&[]).check().unwrap_err().contains("empty"));
        assert!(cmd(&["echo", "a\0b"]).check().unwrap_err().contains("NUL"));
        let with = |f: fn(&mut super::GuestCommand)| {
            let mut c = cmd(&["true"]);
            f(&mut c);
            c.check()
        };
        assert!(with(|c| c.env = vec![("BAD NAME".into(), "x".into())]).is_err());
        assert!(with(|c| c.cwd = Some("relative".into())).unwrap_err().contains("absolute"));
        assert!(with(|c| c.user = Some("a b".into())).unwrap_err().contains("user"));
        assert!(with(|c| c.user = Some("nobody".into())).is_ok());
    }
}
