//! Sessions the server runs. Each is an actor task that owns its
//! [`Session`]: terminals talk to it through a command channel, so a
//! terminal that vanishes mid-stream only drops its end, and the program
//! goes on (its output is kept by the guest agent as its screen).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use strata_engine::{Session, SessionEvent};
use strata_proto::{TerminalContext, WinSize};
use tokio::sync::{mpsc, oneshot};

/// What a session is doing.
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Running,
    Paused,
}

/// What an attached terminal receives.
#[derive(Debug)]
pub enum Out {
    Data(Vec<u8>),
    Exit(i32),
    Lost(String),
}

type Reply<T> = oneshot::Sender<Result<T, String>>;

pub enum Cmd {
    Attach {
        ctx: TerminalContext,
        out: mpsc::Sender<Out>,
        reply: Reply<Vec<u8>>,
    },
    Input(Vec<u8>),
    Resize(WinSize),
    Eof,
    Detach,
    Screen(Reply<Vec<u8>>),
    Pause(Reply<()>),
    Resume(Reply<()>),
    SetTimeout(Option<Duration>),
    Kill(oneshot::Sender<()>),
    /// Read the display's clipboard, or set it (`Some`).
    Clipboard {
        set: Option<String>,
        reply: Reply<String>,
    },
    /// Copy a host file into the guest, or a guest file out to the host.
    Copy {
        host: std::path::PathBuf,
        guest: String,
        into_guest: bool,
        reply: Reply<u64>,
    },
}

/// A session as the server tracks it.
pub struct Live {
    pub id: String,
    pub package: String,
    pub owner: String,
    pub attach_hash: [u8; 32],
    pub created: SystemTime,
    pub state: Mutex<State>,
    pub attached: Mutex<bool>,
    pub idle_timeout: Mutex<Option<Duration>>,
    pub cmd: mpsc::Sender<Cmd>,
    /// QEMU's VNC socket, for a graphical session.
    pub vnc: Option<std::path::PathBuf>,
}

/// Every live session, by id.
#[derive(Default)]
pub struct Registry {
    map: Mutex<HashMap<String, Arc<Live>>>,
}

impl Registry {
    pub fn get(&self, id: &str) -> Option<Arc<Live>> {
        self.lock().get(id).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Live>> {
        let mut v: Vec<_> = self.lock().values().cloned().collect();
        v.sort_by_key(|l| l.created);
        v
    }

    pub fn count_of(&self, owner: &str) -> usize {
        self.lock().values().filter(|l| l.owner == owner).count()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Live>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the actor of a launched session and registers it.
    pub fn start(
        self: &Arc<Self>,
        session: Session,
        owner: &str,
        attach_hash: [u8; 32],
        idle: Option<Duration>,
    ) -> Arc<Live> {
        let (tx, rx) = mpsc::channel(64);
        let live = Arc::new(Live {
            id: session.id.clone(),
            package: session.package.clone(),
            owner: owner.into(),
            attach_hash,
            created: SystemTime::now(),
            state: Mutex::new(State::Running),
            attached: Mutex::new(false),
            idle_timeout: Mutex::new(idle),
            cmd: tx,
            vnc: session.graphical.then(|| session.vnc_socket()),
        });
        self.lock().insert(live.id.clone(), live.clone());
        let (reg, l) = (self.clone(), live.clone());
        tokio::spawn(async move {
            run(session, rx, &l).await;
            reg.lock().remove(&l.id);
            tracing::info!(session = %l.id, "session ended");
        });
        live
    }
}

fn set<T: Copy>(m: &Mutex<T>, v: T) {
    *m.lock().unwrap_or_else(|e| e.into_inner()) = v;
}

/// The actor: owns the session until the program ends, it is killed, or it
/// stays unattached past its idle time-out.
async fn run(mut session: Session, mut rx: mpsc::Receiver<Cmd>, live: &Live) {
    let mut client: Option<mpsc::Sender<Out>> = None;
    // Nobody watches yet: the agent keeps output as the screen.
    if let Err(e) = session.quiet().await {
        tracing::warn!(session = %live.id, error = %e, "could not quiet the new session");
    }
    let mut idle_since = tokio::time::Instant::now();
    loop {
        let idle_limit = *live.idle_timeout.lock().unwrap_or_else(|e| e.into_inner());
        let idle_deadline = match (&client, idle_limit) {
            (None, Some(d)) => Some(idle_since + d),
            _ => None,
        };
        tokio::select! {
            ev = session.next_event() => match ev {
                SessionEvent::Output(d) => {
                    if let Some(c) = &client {
                        if c.send(Out::Data(d)).await.is_err() {
                            client = None;
                            set(&live.attached, false);
                            idle_since = tokio::time::Instant::now();
                            let _ = session.quiet().await;
                        }
                    }
                }
                SessionEvent::Exited(code) => {
                    if let Some(c) = &client { let _ = c.send(Out::Exit(code)).await; }
                    break;
                }
                SessionEvent::Lost(why) => {
                    if let Some(c) = &client { let _ = c.send(Out::Lost(why)).await; }
                    break;
                }
                SessionEvent::Detached | SessionEvent::Attached(_) | SessionEvent::Screen(_) | SessionEvent::File(_) | SessionEvent::Clipboard(_) => {}
            },
            cmd = rx.recv() => match cmd {
                None => break,
                Some(Cmd::Attach { ctx, out, reply }) => {
                    if client.as_ref().is_some_and(|c| !c.is_closed()) {
                        let _ = reply.send(Err("another terminal is attached to this session".into()));
                        continue;
                    }
                    match session.reattach(&ctx).await {
                        Ok(screen) => {
                            client = Some(out);
                            set(&live.attached, true);
                            let _ = reply.send(Ok(screen));
                        }
                        Err(e) => { let _ = reply.send(Err(e.to_string())); }
                    }
                }
                Some(Cmd::Input(d)) => { let _ = session.input(&d).await; }
                Some(Cmd::Resize(s)) => { let _ = session.resize(s).await; }
                Some(Cmd::Eof) => { let _ = session.eof().await; }
                Some(Cmd::Detach) => {
                    client = None;
                    set(&live.attached, false);
                    idle_since = tokio::time::Instant::now();
                    let _ = session.quiet().await;
                }
                Some(Cmd::Screen(reply)) => {
                    let _ = reply.send(session.screen().await.map_err(|e| e.to_string()));
                }
                Some(Cmd::Pause(reply)) => {
                    let r = session.pause().await.map_err(|e| e.to_string());
                    if r.is_ok() { set(&live.state, State::Paused); }
                    let _ = reply.send(r);
                }
                Some(Cmd::Resume(reply)) => {
                    let r = session.resume().await.map_err(|e| e.to_string());
                    if r.is_ok() { set(&live.state, State::Running); }
                    let _ = reply.send(r);
                }
                Some(Cmd::SetTimeout(t)) => {
                    set(&live.idle_timeout, t);
                    idle_since = tokio::time::Instant::now();
                }
                Some(Cmd::Clipboard { set, reply }) => {
                    let r = match set {
                        Some(text) => session.set_clipboard(&text).await.map(|_| text),
                        None => session.clipboard().await,
                    };
                    let _ = reply.send(r.map_err(|e| e.to_string()));
                }
                Some(Cmd::Copy { host, guest, into_guest, reply }) => {
                    let r = if into_guest { session.copy_in(&host, &guest).await } else { session.copy_out(&guest, &host).await };
                    let _ = reply.send(r.map_err(|e| e.to_string()));
                }
                Some(Cmd::Kill(done)) => {
                    session.close().await;
                    let _ = done.send(());
                    return;
                }
            },
            _ = async { match idle_deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                tracing::info!(session = %live.id, "idle time-out: stopping the session");
                break;
            }
        }
    }
    session.close().await;
}
