//! strata-agent: PID 1 of every strata guest.
//!
//! It sets up the minimal system (mounts, loopback, clock), then serves the
//! host over one virtio-serial port: it starts programs on pseudo-terminals,
//! streams their screens, applies the terminal's context on every attach and
//! reaps every process of the guest. It keeps no state on disk, so a memory
//! snapshot of the guest captures it whole, and a restored copy simply goes on
//! serving whoever attaches next.

mod devices;
mod exec;
mod files;
mod procs;
mod system;
mod x11;

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use strata_proto::{GuestMsg, HostMsg, ProcId, TerminalContext};

use crate::procs::Proc;

/// Everything the agent's threads share.
pub struct Agent {
    /// Write side of the host port; one frame at a time.
    port_out: Mutex<File>,
    /// Whether a terminal is attached; output is only kept, not sent, otherwise.
    attached: AtomicBool,
    /// Held while output is kept and sent (or not), and while an attach
    /// takes the screens and starts the sending: each piece of output is
    /// then in the screens an attach answers or sent after them, never
    /// neither (a terminal that follows a moved session relies on it).
    pub output_gate: Mutex<()>,
    /// Whether a host holds the channel (attached or not).
    host_connected: AtomicBool,
    procs: Mutex<HashMap<ProcId, Arc<Proc>>>,
    /// Commands run with pipes. Registered under the `procs` lock, as the
    /// reaper looks both up under it.
    commands: Mutex<HashMap<ProcId, Arc<exec::Command>>>,
    /// Exit statuses of children reaped before their `Proc` was registered.
    early_exits: Mutex<HashMap<i32, i32>>,
    context: Mutex<TerminalContext>,
}

impl Agent {
    /// Sends a message if a terminal is attached.
    pub fn send(&self, msg: &GuestMsg) {
        if self.attached.load(Ordering::Acquire) {
            self.send_always(msg);
        }
    }

    /// Sends what a host must learn even when no terminal is attached (a
    /// program's end), if a host holds the channel; otherwise it is in the
    /// state sent on the next attach.
    pub fn send_to_host(&self, msg: &GuestMsg) {
        if self.attached.load(Ordering::Acquire) || self.host_connected.load(Ordering::Acquire) {
            self.send_always(msg);
        }
    }

    /// Sends a message whatever the attach state (replies to the host).
    pub fn send_always(&self, msg: &GuestMsg) {
        match strata_proto::encode(msg) {
            Ok(frame) => {
                let mut out = self.port_out.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(e) = out.write_all(&frame) {
                    log(&format!("writing to host: {e}"));
                }
            }
            Err(e) => log(&format!("encoding a message: {e}")),
        }
    }

    fn handle(self: &Arc<Self>, msg: HostMsg) {
        match msg {
            HostMsg::Attach(ctx) => {
                if let Some(id) = &ctx.request_id {
                    log(&format!("attach for request {id}"));
                }
                system::apply_context(&ctx);
                let mut problems = Vec::new();
                if let Some(net) = &ctx.network {
                    problems.extend(devices::apply_network(net).err());
                }
                for m in &ctx.mounts {
                    problems.extend(devices::apply_mount(m).err());
                }
                if let Some(d) = &ctx.display {
                    devices::apply_display(d);
                }
                let procs: Vec<Arc<Proc>> = self.lock_procs().values().cloned().collect();
                for p in &procs {
                    p.resize(ctx.size);
                }
                *self.context.lock().unwrap_or_else(|e| e.into_inner()) = ctx;
                let _gate = self.output_gate.lock().unwrap_or_else(|e| e.into_inner());
                let states = procs.iter().map(|p| p.state()).collect();
                self.send_always(&GuestMsg::Attached {
                    agent_version: env!("CARGO_PKG_VERSION").to_string(),
                    procs: states,
                    problems,
                });
                self.attached.store(true, Ordering::Release);
            }
            HostMsg::Detach => {
                self.attached.store(false, Ordering::Release);
                // A detach comes before a launch image is saved: write dirty
                // data and commit the file system's journal now, so a
                // restored guest does not do it (5 s after every launch, ~100
                // ms of CPU under TCG, and clusters in the throwaway overlay).
                nix::unistd::sync();
                self.send_always(&GuestMsg::Detached);
            }
            HostMsg::Quiet => {
                self.attached.store(false, Ordering::Release);
                self.send_always(&GuestMsg::Detached);
            }
            HostMsg::Spawn { id, argv, env, readiness, ready_timeout_ms } => {
                let ctx = self.context.lock().unwrap_or_else(|e| e.into_inner()).clone();
                match Proc::spawn(self, id, &argv, &env, &ctx) {
                    Ok(p) => {
                        let early = {
                            let mut procs = self.lock_procs();
                            procs.insert(id, p.clone());
                            self.early_exits.lock().unwrap_or_else(|e| e.into_inner()).remove(&p.pid)
                        };
                        self.send(&GuestMsg::Spawned { id, pid: p.pid });
                        p.watch_readiness(self.clone(), readiness, ready_timeout_ms);
                        if let Some(status) = early {
                            p.exited(self, status);
                        }
                    }
                    Err(reason) => self.send(&GuestMsg::Failed { id, reason }),
                }
            }
            HostMsg::Input { id, data } => match self.command(id) {
                Some(c) => c.input(data),
                None => self.with_proc(id, |p| p.input(data)),
            },
            HostMsg::Eof { id } => match self.command(id) {
                Some(c) => c.eof(),
                None => self.with_proc(id, |p| p.eof()),
            },
            HostMsg::Resize { id, size } => match self.command(id) {
                Some(c) => c.resize(size),
                None => self.with_proc(id, |p| p.resize(size)),
            },
            HostMsg::Signal { id, signal } => match self.command(id) {
                Some(c) => c.signal(signal),
                None => self.send(&GuestMsg::Error { message: format!("no command {id}") }),
            },
            HostMsg::Screen => {
                let procs: Vec<Arc<Proc>> = self.lock_procs().values().cloned().collect();
                self.send_always(&GuestMsg::Screens { procs: procs.iter().map(|p| p.state()).collect() });
            }
            HostMsg::PowerOff => system::power_off(),
            HostMsg::FileRead { path, offset, len } => {
                self.send_always(&GuestMsg::File(files::read(&path, offset, len)));
            }
            HostMsg::FileWrite { path, offset, data, last, mode } => {
                self.send_always(&GuestMsg::File(files::write(&path, offset, &data, last, mode)));
            }
            // On a thread of their own: xclip talks to the X server, which
            // may take a moment, and the channel must keep flowing.
            HostMsg::ClipboardGet => {
                let agent = self.clone();
                std::thread::spawn(move || agent.send_always(&GuestMsg::Clipboard(x11::clipboard_get())));
            }
            HostMsg::ClipboardSet { text } => {
                let agent = self.clone();
                std::thread::spawn(move || agent.send_always(&GuestMsg::Clipboard(x11::clipboard_set(&text))));
            }
            HostMsg::Exec { id, argv, env, cwd, user } => {
                let (cwd, user) = (cwd.as_deref(), user.as_deref());
                self.exec(id, &exec::Spec { argv: &argv, env: &env, cwd, user, pty: None })
            }
            HostMsg::ExecPty { id, argv, env, cwd, user, size } => {
                let (cwd, user) = (cwd.as_deref(), user.as_deref());
                self.exec(id, &exec::Spec { argv: &argv, env: &env, cwd, user, pty: Some(size) })
            }
            HostMsg::ListCommands => {
                let mut list: Vec<_> =
                    self.commands.lock().unwrap_or_else(|e| e.into_inner()).values().map(|c| c.state()).collect();
                list.sort_by_key(|c| c.id);
                self.send_always(&GuestMsg::Commands(list));
            }
        }
    }

    /// Starts a command with pipes, or on a PTY.
    fn exec(self: &Arc<Self>, id: ProcId, spec: &exec::Spec) {
        let ctx = self.context.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match exec::Command::start(self, id, spec, &ctx) {
            Ok(c) => {
                let early = {
                    let _procs = self.lock_procs();
                    self.commands.lock().unwrap_or_else(|e| e.into_inner()).insert(id, c.clone());
                    self.early_exits.lock().unwrap_or_else(|e| e.into_inner()).remove(&c.pid)
                };
                self.send_to_host(&GuestMsg::Spawned { id, pid: c.pid });
                if let Some(status) = early {
                    c.exited(self, status);
                }
            }
            Err((status, message)) => {
                self.send_to_host(&GuestMsg::Stderr { id, data: message.into_bytes() });
                self.send_to_host(&GuestMsg::Exited { id, status });
            }
        }
    }

    fn command(&self, id: ProcId) -> Option<Arc<exec::Command>> {
        self.commands.lock().unwrap_or_else(|e| e.into_inner()).get(&id).cloned()
    }

    fn with_proc(&self, id: ProcId, f: impl FnOnce(&Proc)) {
        let p = self.lock_procs().get(&id).cloned();
        match p {
            Some(p) => f(&p),
            None => self.send(&GuestMsg::Error { message: format!("no process {id}") }),
        }
    }

    fn lock_procs(&self) -> std::sync::MutexGuard<'_, HashMap<ProcId, Arc<Proc>>> {
        self.procs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by the reaper for every child that ended.
    fn child_exited(self: &Arc<Self>, pid: i32, status: i32) {
        let p = {
            let procs = self.lock_procs();
            let p = procs.values().find(|p| p.pid == pid).cloned();
            let command = {
                let mut commands = self.commands.lock().unwrap_or_else(|e| e.into_inner());
                let id = commands.values().find(|c| c.pid == pid).map(|c| c.id);
                id.and_then(|id| commands.remove(&id))
            };
            if let Some(c) = command {
                drop(procs);
                c.exited(self, status);
                return;
            }
            if p.is_none() {
                // Not registered yet (it exited right after exec), or not ours.
                let mut early = self.early_exits.lock().unwrap_or_else(|e| e.into_inner());
                if early.len() < 1024 {
                    early.insert(pid, status);
                }
            }
            p
        };
        if let Some(p) = p {
            p.exited(self, status);
        }
    }
}

/// Writes a line to the guest console (the serial port the host logs).
pub fn log(msg: &str) {
    eprintln!("strata-agent: {msg}");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("x11") {
        let rest = if args.get(2).map(String::as_str) == Some("--") { &args[3..] } else { &args[2..] };
        x11::main(rest);
    }
    system::block_async_signals();
    if std::process::id() == 1 {
        system::init_system();
    }
    let port = match system::open_host_port() {
        Ok(p) => p,
        Err(e) => {
            log(&format!("no host port: {e}"));
            system::power_off();
        }
    };
    let port_out = port.try_clone().unwrap_or_else(|e| {
        log(&format!("dup host port: {e}"));
        system::power_off()
    });
    let agent = Arc::new(Agent {
        port_out: Mutex::new(port_out),
        attached: AtomicBool::new(false),
        output_gate: Mutex::new(()),
        host_connected: AtomicBool::new(false),
        procs: Mutex::new(HashMap::new()),
        commands: Mutex::new(HashMap::new()),
        early_exits: Mutex::new(HashMap::new()),
        context: Mutex::new(TerminalContext {
            term: "xterm-256color".into(),
            locale: Some("C.UTF-8".into()),
            ..Default::default()
        }),
    });
    {
        let agent = agent.clone();
        std::thread::spawn(move || system::reap_children(|pid, st| agent.child_exited(pid, st)));
    }
    serve(&agent, port);
}

/// Reads host frames for ever. A read of 0 bytes means no host is connected:
/// wait for the port's SIGIO (sent when a host connects) instead of spinning.
fn serve(agent: &Arc<Agent>, mut port: File) -> ! {
    let fd = port.as_raw_fd();
    system::enable_sigio(fd);
    let mut buf: Vec<u8> = Vec::with_capacity(64 << 10);
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        match port.read(&mut chunk) {
            Ok(0) => {
                agent.host_connected.store(false, Ordering::Release);
                // The host went away: one that vanished (its process was
                // killed) is a terminal detached. The program goes on, its
                // output kept as its screen for whoever attaches next; the
                // host side decides when the VM ends.
                if agent.attached.swap(false, Ordering::AcqRel) {
                    log("the host vanished while attached; detached");
                }
                buf.clear();
                system::wait_sigio(2000);
            }
            Ok(n) => {
                agent.host_connected.store(true, Ordering::Release);
                buf.extend_from_slice(&chunk[..n]);
                drain_frames(agent, &mut buf);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                log(&format!("reading host port: {e}"));
                system::wait_sigio(2000);
            }
        }
    }
}

fn drain_frames(agent: &Arc<Agent>, buf: &mut Vec<u8>) {
    let mut start = 0;
    while buf.len() - start >= 4 {
        let prefix: [u8; 4] = buf[start..start + 4].try_into().expect("4 bytes");
        let len = match strata_proto::frame_len(prefix) {
            Ok(l) => l,
            Err(e) => {
                log(&format!("dropping input: {e}"));
                buf.clear();
                return;
            }
        };
        if buf.len() - start - 4 < len {
            break;
        }
        let payload = &buf[start + 4..start + 4 + len];
        match strata_proto::decode::<HostMsg>(payload) {
            Ok(msg) => agent.handle(msg),
            Err(e) => agent.send(&GuestMsg::Error { message: format!("bad message: {e}") }),
        }
        start += 4 + len;
    }
    buf.drain(..start);
}
