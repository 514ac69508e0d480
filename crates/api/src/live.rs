//! Sessions the server runs. Each is an actor task that owns its
//! [`Session`]: terminals talk to it through a command channel, so a
//! terminal that vanishes mid-stream only drops its end, and the program
//! goes on (its output is kept by the guest agent as its screen).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use strata_engine::context::ContextSettings;
use strata_engine::sessions::EndState;
use strata_engine::{Engine, GuestCommand, Session, SessionEvent};
use strata_proto::{ProcId, SentTail, TerminalContext, WinSize};
use tokio::sync::{mpsc, oneshot};

/// What a session is doing.
#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Running,
    Paused,
    /// Ended while no terminal was attached: its program exited, or its
    /// guest powered off (listed until removed, see `reason`).
    Exited,
    /// Its VM was ended from outside while no terminal was attached.
    Lost,
}

/// What an attached terminal receives.
#[derive(Debug)]
pub enum Out {
    Data(Vec<u8>),
    Exit(i32),
    Lost(String),
    /// The session moved to this server: attach again (through the plane)
    /// and send the input it had not passed on (`unsent`) there.
    Moved {
        server: String,
        unsent: Vec<u8>,
    },
}

type Reply<T> = oneshot::Sender<Result<T, String>>;

/// What a command run with pipes reports to whoever watches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandOut {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(i32),
}

/// A command the server started in a session, while it runs.
#[derive(Debug, Clone)]
pub struct CommandInfo {
    pub id: ProcId,
    pub command: GuestCommand,
    pub tag: Option<String>,
    /// Whether it runs on a PTY.
    pub pty: bool,
}

/// How long a session's memory reading is reused by listings.
const MEMORY_READ_EVERY: Duration = Duration::from_secs(10);

/// How long a listing of a session's commands waits for its agent.
const LISTING_TIMEOUT: Duration = Duration::from_secs(3);

/// The commands that run in `live`'s guest (whoever started them); those
/// this server started if its agent does not list them within
/// [`LISTING_TIMEOUT`] (an agent older than the listing).
///
/// # Errors
/// If the session has ended.
pub async fn list_commands(live: &Live) -> Result<Vec<CommandInfo>, String> {
    let ended = || format!("session {} has ended", live.id);
    let (tx, rx) = oneshot::channel();
    live.cmd.send(Cmd::Commands(tx)).await.map_err(|_| ended())?;
    match tokio::time::timeout(LISTING_TIMEOUT, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(ended()),
        Err(_) => {
            tracing::warn!(session = %live.id, "its agent did not list its commands; listing those this server started");
            let (tx, rx) = oneshot::channel();
            live.cmd.send(Cmd::KnownCommands(tx)).await.map_err(|_| ended())?;
            rx.await.unwrap_or_else(|_| Err(ended()))
        }
    }
}

/// What happens to a session at its end time ([`Live::end`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndAction {
    Kill,
    Pause,
}

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
    /// Pause to an image; why, for the listing.
    Pause(String, Reply<()>),
    Resume(Reply<()>),
    SetTimeout(Option<Duration>),
    Kill(oneshot::Sender<()>),
    /// The server stops: leave the session running, detached, for the next
    /// server to take back (a paused one stays paused).
    Release(oneshot::Sender<()>),
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
    /// Run a command with pipes (or on a PTY of `pty`'s size) beside the
    /// program; `out` watches it. Its input is ended at once unless
    /// `stdin`. Answers the command's id.
    Exec {
        command: GuestCommand,
        tag: Option<String>,
        stdin: bool,
        pty: Option<WinSize>,
        out: mpsc::Sender<CommandOut>,
        reply: Reply<ProcId>,
    },
    /// Give a command's PTY a new size.
    CommandResize {
        id: ProcId,
        size: WinSize,
        reply: Reply<()>,
    },
    /// Watch a running command's output from now on (the previous watcher
    /// is let go). Answers whether it runs on a PTY.
    Watch {
        id: ProcId,
        out: mpsc::Sender<CommandOut>,
        reply: Reply<bool>,
    },
    /// Bytes for a command's input, or its end (`None`).
    CommandInput {
        id: ProcId,
        data: Option<Vec<u8>>,
        reply: Reply<()>,
    },
    /// Send a signal to a command and its process group.
    Signal {
        id: ProcId,
        signal: i32,
        reply: Reply<()>,
    },
    /// The commands running now, as the agent lists them.
    Commands(Reply<Vec<CommandInfo>>),
    /// The commands this server knows run (an agent too old to list them).
    KnownCommands(Reply<Vec<CommandInfo>>),
    /// Set (or clear) the time at which the session is ended or paused.
    SetEnd(Option<(SystemTime, EndAction)>),
    /// Save the session's state for a snapshot (named, or a fork's own)
    /// while it runs on ([`Engine::finish_snapshot`] makes the rest, the
    /// session free); an attached terminal stays attached and misses no
    /// output.
    Snapshot {
        name: Option<String>,
        reply: Reply<strata_engine::fork::Captured>,
    },
    /// Move the running session to another server of the cluster by live
    /// migration; answers QEMU's downtime. Once moved, the session is that
    /// server's and its actor here ends; on failure it runs on here.
    Move {
        to: Box<crate::moves::Destination>,
        reply: Reply<Duration>,
    },
}

/// A session as the server tracks it.
pub struct Live {
    pub id: String,
    pub package: String,
    /// The OS its guest runs.
    pub os: String,
    pub owner: String,
    pub attach_hash: [u8; 32],
    pub created: SystemTime,
    pub state: Mutex<State>,
    pub attached: Mutex<bool>,
    pub idle_timeout: Mutex<Option<Duration>>,
    pub cmd: mpsc::Sender<Cmd>,
    /// QEMU's VNC socket, for a graphical session.
    pub vnc: Option<std::path::PathBuf>,
    /// Its guest's memory, in MiB (held while it runs, not while paused).
    pub memory_mib: u32,
    /// When it is ended (or paused), whatever it does meanwhile; kept in
    /// its record's [`END_LABEL`].
    pub end: Mutex<Option<(SystemTime, EndAction)>>,
    /// Its record's labels, as this server wrote or found them (but the
    /// end time, kept in `end`).
    pub labels: BTreeMap<String, String>,
    /// Why it is paused, in words, while it is.
    pub why: Mutex<Option<String>>,
    /// Its QEMU while it runs (0 while paused).
    pub qemu_pid: std::sync::atomic::AtomicU32,
    /// It is moving to another server: a second move is refused, and this
    /// server leaves its record in the cluster alone meanwhile.
    pub moving: std::sync::atomic::AtomicBool,
    /// The server it moved to, once it has: a command's watcher is told
    /// where to watch it on.
    pub moved_to: Mutex<Option<String>>,
    /// It moved here from another server: what its commands print before
    /// their watchers find them here is kept for them a while.
    pub moved_in: bool,
    /// Its QEMU's CPU time when last looked at, for the use since.
    cpu_seen: Mutex<Option<(std::time::Instant, f64)>>,
    /// Its memory when last read, and when: reading it (`smaps_rollup`)
    /// costs milliseconds, so every listing shares one read for a while.
    memory_seen: Mutex<Option<(std::time::Instant, f64)>>,
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

    /// The guest memory `owner`'s running sessions have, in MiB.
    pub fn memory_of(&self, owner: &str) -> u32 {
        self.lock()
            .values()
            .filter(|l| l.owner == owner && *l.state.lock().unwrap_or_else(|e| e.into_inner()) == State::Running)
            .map(|l| l.memory_mib)
            .sum()
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

    /// Starts the actor of a launched session and registers it. The
    /// session's record keeps its terminal and attach-token hash, so a
    /// restarted server can take it back once it is paused to an image.
    pub fn start(
        self: &Arc<Self>,
        session: Session,
        owner: &str,
        attach_hash: [u8; 32],
        engine: Arc<Engine>,
        settings: ContextSettings,
        options: SessionOptions,
    ) -> Arc<Live> {
        let SessionOptions { idle, mut labels, end } = options;
        labels.insert(TERMINAL_LABEL.to_string(), owner.to_string());
        labels.insert(ATTACH_LABEL.to_string(), hex::encode(attach_hash));
        // One write of the record on the launch path.
        let kept = engine.update_session(&session.id, |rec| {
            rec.labels.extend(labels.clone());
            if let Some(end) = end {
                rec.labels.insert(END_LABEL.to_string(), end_label(end));
            }
            rec.idle_timeout_s = Some(strata_engine::sessions::idle_secs(idle));
        });
        if let Err(e) = kept {
            tracing::warn!(session = %session.id, error = %e, "could not label the session's record");
        }
        let vnc = session.graphical.then(|| session.vnc_socket());
        let mut live = Live::new(
            session.id.clone(),
            session.package.clone(),
            session.os.clone(),
            owner,
            attach_hash,
            SystemTime::now(),
            idle,
            vnc,
        );
        live.0.memory_mib = engine.session_memory_mib(&session.id).unwrap_or(0);
        live.0.end = Mutex::new(end);
        live.0.labels = labels;
        self.run_actor(live, Some(session), engine, settings)
    }

    /// Takes back the sessions paused to images by an earlier server (their
    /// records carry the terminal and attach-token hash); returns how many.
    pub fn adopt_paused(self: &Arc<Self>, engine: &Arc<Engine>, idle: Option<Duration>) -> usize {
        engine.paused_sessions().into_iter().filter(|rec| self.adopt_one(rec, engine, idle).is_some()).count()
    }

    /// Takes one paused session (its record labelled by an API server) as a
    /// live one, paused; `None` if its labels are missing or malformed.
    pub fn adopt_one(
        self: &Arc<Self>,
        rec: &strata_engine::sessions::SessionRecord,
        engine: &Arc<Engine>,
        idle: Option<Duration>,
    ) -> Option<Arc<Live>> {
        let mut live = self.live_of(rec, idle)?;
        let vnc = engine.paused_is_graphical(rec).then(|| engine.vnc_socket_of(&rec.id));
        live.0.vnc = vnc;
        live.0.memory_mib = engine.image_memory_mib(&rec.launch_image).unwrap_or(0);
        set(&live.0.state, State::Paused);
        live.0.why = Mutex::new(rec.why.clone());
        let settings = rec.settings.clone().unwrap_or_else(|| ContextSettings::from_terminal(None));
        Some(self.run_actor(live, None, engine.clone(), settings))
    }

    /// Takes back the running sessions an earlier server of this store
    /// left (it stopped, or died): each is connected again and gets its
    /// actor, with its terminal, attach token and idle time-out. Sessions
    /// started elsewhere (the CLI's) are left alone. Returns how many were
    /// taken; one that cannot be is left running, with the reason logged.
    ///
    /// In a cluster, a session the cluster records on another server moved
    /// there while this server was down: its QEMU here (stopped once its
    /// memory went) is ended. Any other is claimed in the cluster first
    /// (see [`crate::cluster::keep_after_restart`]): a move cut short by
    /// this server's end can no longer start it elsewhere.
    pub async fn adopt_running(
        self: &Arc<Self>,
        engine: &Arc<Engine>,
        idle: Option<Duration>,
        cluster: Option<Arc<crate::cluster::ClusterLink>>,
    ) -> usize {
        let mut n = 0;
        let mut undecided = Vec::new();
        for rec in engine.unheld_sessions() {
            let Some(live) = self.live_of(&rec, idle) else { continue };
            if let Some(link) = &cluster {
                match self.keep_or_end(link, engine, &rec, &live.0).await {
                    Some(true) => {}
                    Some(false) => continue,
                    None => {
                        undecided.push(rec);
                        continue;
                    }
                }
            }
            n += usize::from(self.take_back(live, &rec, engine).await);
        }
        // Those the cluster could not be asked about are asked again until
        // it answers (for an hour): each is taken back or ended then.
        if let (Some(link), false) = (cluster, undecided.is_empty()) {
            let (registry, engine) = (self.clone(), engine.clone());
            tokio::spawn(async move {
                for _ in 0..720 {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    let mut left = Vec::new();
                    for rec in undecided {
                        let Some(live) = registry.live_of(&rec, idle) else { continue };
                        match registry.keep_or_end(&link, &engine, &rec, &live.0).await {
                            Some(true) => {
                                registry.take_back(live, &rec, &engine).await;
                            }
                            Some(false) => {}
                            None => left.push(rec),
                        }
                    }
                    if left.is_empty() {
                        return;
                    }
                    undecided = left;
                }
            });
        }
        n
    }

    /// Whether this server, just started, keeps running session `rec`
    /// (see [`crate::cluster::keep_after_restart`]); if not, its copy here
    /// is ended. `None` if the cluster cannot be asked.
    async fn keep_or_end(
        &self,
        link: &crate::cluster::ClusterLink,
        engine: &Engine,
        rec: &strata_engine::sessions::SessionRecord,
        live: &Live,
    ) -> Option<bool> {
        match crate::cluster::keep_after_restart(link, live).await {
            Ok(true) => Some(true),
            Ok(false) => {
                tracing::info!(session = %rec.id, "the session moved to another server while this one was down; ending its copy here");
                if let Err(e) = engine.kill_session(&rec.id).await {
                    tracing::warn!(session = %rec.id, error = %e, "could not end the copy of a session that moved");
                }
                Some(false)
            }
            Err(e) => {
                tracing::warn!(session = %rec.id, error = %e, "the cluster does not say who runs this session; it is taken back once it does");
                None
            }
        }
    }

    /// Connects to running session `rec` again and gives it its actor;
    /// whether it was taken back.
    async fn take_back(
        self: &Arc<Self>,
        live: (Live, mpsc::Receiver<Cmd>),
        rec: &strata_engine::sessions::SessionRecord,
        engine: &Arc<Engine>,
    ) -> bool {
        match engine.adopt_session(&rec.id).await {
            Ok(session) => {
                self.run_held(live, rec, session, engine);
                tracing::info!(session = %rec.id, package = %rec.package, "took back a running session");
                true
            }
            Err(e) => {
                tracing::warn!(session = %rec.id, error = %e, "a running session from before is not taken back");
                false
            }
        }
    }

    /// Takes a session that moved here from another server (held by this
    /// process, running) as a live one; `None` if its record lacks the
    /// labels of an API server's session.
    pub fn adopt_moved(
        self: &Arc<Self>,
        rec: &strata_engine::sessions::SessionRecord,
        session: Session,
        engine: &Arc<Engine>,
        idle: Option<Duration>,
    ) -> Option<Arc<Live>> {
        let mut live = self.live_of(rec, idle)?;
        live.0.moved_in = true;
        tracing::info!(session = %rec.id, package = %rec.package, "took a session that moved here");
        Some(self.run_held(live, rec, session, engine))
    }

    /// Gives running session `session` (record `rec`), held by this
    /// process, its actor.
    fn run_held(
        self: &Arc<Self>,
        mut live: (Live, mpsc::Receiver<Cmd>),
        rec: &strata_engine::sessions::SessionRecord,
        session: Session,
        engine: &Arc<Engine>,
    ) -> Arc<Live> {
        live.0.vnc = session.graphical.then(|| session.vnc_socket());
        live.0.memory_mib = engine.session_memory_mib(&rec.id).unwrap_or(0);
        let settings = rec.settings.clone().unwrap_or_else(|| ContextSettings::from_terminal(None));
        self.run_actor(live, Some(session), engine.clone(), settings)
    }

    /// A live session for the record of one an API server started (its
    /// labels name its terminal and attach token); `None` for others.
    fn live_of(
        &self,
        rec: &strata_engine::sessions::SessionRecord,
        idle: Option<Duration>,
    ) -> Option<(Live, mpsc::Receiver<Cmd>)> {
        let (owner, hash) = (rec.labels.get(TERMINAL_LABEL)?, rec.labels.get(ATTACH_LABEL)?);
        let Some(attach_hash) = hex::decode(hash).ok().and_then(|h| <[u8; 32]>::try_from(h).ok()) else {
            tracing::warn!(session = %rec.id, "session with a malformed attach label; not taken");
            return None;
        };
        // Its own time-out, as it was set, else the server's.
        let idle = match rec.idle_timeout_s {
            Some(0) => None,
            Some(secs) => Some(Duration::from_secs(secs)),
            None => idle,
        };
        let created = UNIX_EPOCH + Duration::from_secs(rec.created.max(0) as u64);
        let mut live =
            Live::new(rec.id.clone(), rec.package.clone(), rec.os.clone(), owner, attach_hash, created, idle, None);
        let mut labels = rec.labels.clone();
        // The end time is kept typed, in `end`, not among the labels.
        live.0.end = Mutex::new(labels.remove(END_LABEL).and_then(|l| parse_end_label(&l)));
        live.0.labels = labels;
        Some(live)
    }

    /// What becomes of the sessions when the server stops: running ones
    /// are left running and detached for the next server (`Keep`), paused
    /// to images first and resumed when a server starts again (`Pause`;
    /// one that cannot be paused is left running), or stopped (`Stop`).
    /// Paused sessions stay paused in every case.
    pub async fn stop_all(&self, engine: &Engine, how: OnStop) {
        for live in self.all() {
            let running = *live.state.lock().unwrap_or_else(|e| e.into_inner()) == State::Running;
            if how == OnStop::Stop && running {
                let (tx, rx) = oneshot::channel();
                if live.cmd.send(Cmd::Kill(tx)).await.is_ok() {
                    let _ = rx.await;
                }
                continue;
            }
            if how == OnStop::Pause && running {
                let marked =
                    engine.label_session(&live.id, BTreeMap::from([(RESUME_LABEL.to_string(), "1".to_string())]));
                let (tx, rx) = oneshot::channel();
                let why = "paused when its server stopped; resumed when it starts again".to_string();
                let paused = live.cmd.send(Cmd::Pause(why, tx)).await.is_ok() && matches!(rx.await, Ok(Ok(())));
                if paused {
                    tracing::info!(session = %live.id, "paused for the server's stop");
                } else {
                    if marked.is_ok() {
                        let _ = engine.unlabel_session(&live.id, RESUME_LABEL);
                    }
                    tracing::warn!(session = %live.id, "could not be paused for the server's stop; left running");
                }
            }
            let (tx, rx) = oneshot::channel();
            if live.cmd.send(Cmd::Release(tx)).await.is_ok() {
                let _ = rx.await;
            }
        }
    }

    /// Resumes the sessions a server paused when it stopped with
    /// `--pause-on-stop`; returns how many.
    pub async fn resume_paused_on_stop(&self, engine: &Engine) -> usize {
        let mut n = 0;
        for rec in engine.paused_sessions().into_iter().filter(|r| r.labels.contains_key(RESUME_LABEL)) {
            let Some(live) = self.get(&rec.id) else { continue };
            let (tx, rx) = oneshot::channel();
            if live.cmd.send(Cmd::Resume(tx)).await.is_err() {
                continue;
            }
            match rx.await {
                Ok(Ok(())) => {
                    let _ = engine.unlabel_session(&rec.id, RESUME_LABEL);
                    n += 1;
                }
                Ok(Err(e)) => {
                    tracing::warn!(session = %rec.id, error = %e, "a session paused for the server's stop could not be resumed; it stays paused")
                }
                Err(_) => {}
            }
        }
        n
    }

    fn run_actor(
        self: &Arc<Self>,
        live: (Live, mpsc::Receiver<Cmd>),
        session: Option<Session>,
        engine: Arc<Engine>,
        settings: ContextSettings,
    ) -> Arc<Live> {
        let (live, rx) = live;
        if let Some(s) = &session {
            live.set_qemu(s.vm_pid());
        }
        let live = Arc::new(live);
        self.lock().insert(live.id.clone(), live.clone());
        let (reg, l) = (self.clone(), live.clone());
        tokio::spawn(async move {
            let commands = standby_commands(&l);
            let actor = Actor {
                held: session,
                client: None,
                live: &l,
                engine,
                settings,
                on_standby: commands.keys().copied().collect(),
                commands,
                listings: Vec::new(),
                next_command: FIRST_COMMAND,
                replenish_after: None,
                sent: SentTail::default(),
                stashed: std::collections::VecDeque::new(),
                unwatched: BTreeMap::new(),
                keep_unwatched_until: l.moved_in.then(|| tokio::time::Instant::now() + KEEP_UNWATCHED_FOR),
            };
            actor.run(rx).await;
            reg.lock().remove(&l.id);
            tracing::info!(session = %l.id, "session ended");
        });
        live
    }
}

/// What a stopping server does with its running sessions ([`Registry::stop_all`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStop {
    Keep,
    Pause,
    Stop,
}

/// Labels of a session's record that let a restarted server adopt it.
const TERMINAL_LABEL: &str = "terminal";
const ATTACH_LABEL: &str = "attach_sha256";
/// Paused by a server's stop, to be resumed when one starts.
const RESUME_LABEL: &str = "resume_on_start";
/// When the session ends: `UNIX_SECONDS kill` or `UNIX_SECONDS pause`.
pub const END_LABEL: &str = "end_at";

/// How a launched session is kept, beside its terminal and token.
#[derive(Default)]
pub struct SessionOptions {
    /// Paused after this long with nobody attached (`None`: never).
    pub idle: Option<Duration>,
    /// More labels for its record.
    pub labels: BTreeMap<String, String>,
    /// When it is ended or paused, whatever it does.
    pub end: Option<(SystemTime, EndAction)>,
}

fn end_label((at, action): (SystemTime, EndAction)) -> String {
    let secs = at.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format!("{secs} {}", if action == EndAction::Pause { "pause" } else { "kill" })
}

fn parse_end_label(label: &str) -> Option<(SystemTime, EndAction)> {
    let (secs, action) = label.split_once(' ')?;
    let at = UNIX_EPOCH + Duration::from_secs(secs.parse().ok()?);
    let action = match action {
        "kill" => EndAction::Kill,
        "pause" => EndAction::Pause,
        _ => return None,
    };
    Some((at, action))
}

/// The first id of the commands a server starts (below: the program's).
const FIRST_COMMAND: ProcId = 1000;

/// The record label holding the argv (JSON) of the command standby shell
/// `id` was given, kept for a server that takes the session back (its agent
/// lists it by the shell's argv).
fn shell_command_label(id: ProcId) -> String {
    format!("{SHELL_COMMAND_LABEL}{id}")
}

const SHELL_COMMAND_LABEL: &str = "shell_command_";

/// The commands a session's standby shells run, as a server that takes
/// the session back knows them (its record's [`shell_command_label`]s).
fn standby_commands(live: &Live) -> BTreeMap<ProcId, (CommandInfo, Option<mpsc::Sender<CommandOut>>)> {
    live.labels
        .iter()
        .filter_map(|(label, argv)| {
            let id: ProcId = label.strip_prefix(SHELL_COMMAND_LABEL)?.parse().ok()?;
            let argv: Vec<String> = serde_json::from_str(argv).ok()?;
            let command = GuestCommand { argv, ..GuestCommand::default() };
            Some((id, (CommandInfo { id, command, tag: None, pty: false }, None)))
        })
        .collect()
}

impl Live {
    fn set_qemu(&self, pid: u32) {
        self.qemu_pid.store(pid, std::sync::atomic::Ordering::Relaxed);
        *self.cpu_seen.lock().unwrap_or_else(|e| e.into_inner()) = None;
        *self.memory_seen.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// What its VM uses of the host now: CPU in percent of one core since
    /// it was last asked (`None` the first time), and memory in MiB
    /// (proportional: what it shares with other sessions counted once);
    /// nothing while it is paused.
    pub fn usage(&self) -> (Option<f64>, Option<f64>) {
        let pid = self.qemu_pid.load(std::sync::atomic::Ordering::Relaxed);
        if pid == 0 {
            return (None, None);
        }
        let (now, cpu) = (std::time::Instant::now(), strata_engine::host::process_cpu_seconds(pid));
        let mut seen = self.cpu_seen.lock().unwrap_or_else(|e| e.into_inner());
        let percent = seen.and_then(|(at, before)| {
            let secs = now.duration_since(at).as_secs_f64();
            (secs > 0.05).then(|| ((cpu - before) / secs * 100.0).max(0.0))
        });
        if seen.is_none_or(|(at, _)| now.duration_since(at).as_secs_f64() > 0.5) {
            *seen = Some((now, cpu));
        }
        drop(seen);
        let mut memory = self.memory_seen.lock().unwrap_or_else(|e| e.into_inner());
        let mib = match *memory {
            Some((at, mib)) if now.duration_since(at) < MEMORY_READ_EVERY => mib,
            _ => {
                let mib = strata_engine::host::vm_memory_mib(pid);
                *memory = Some((now, mib));
                mib
            }
        };
        (percent, Some(mib))
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        id: String,
        package: String,
        os: String,
        owner: &str,
        attach_hash: [u8; 32],
        created: SystemTime,
        idle: Option<Duration>,
        vnc: Option<std::path::PathBuf>,
    ) -> (Live, mpsc::Receiver<Cmd>) {
        let (tx, rx) = mpsc::channel(64);
        let live = Live {
            id,
            package,
            os,
            owner: owner.into(),
            attach_hash,
            created,
            state: Mutex::new(State::Running),
            attached: Mutex::new(false),
            idle_timeout: Mutex::new(idle),
            cmd: tx,
            vnc,
            memory_mib: 0,
            end: Mutex::new(None),
            labels: BTreeMap::new(),
            why: Mutex::new(None),
            qemu_pid: Default::default(),
            moving: Default::default(),
            moved_to: Mutex::new(None),
            moved_in: false,
            cpu_seen: Mutex::new(None),
            memory_seen: Mutex::new(None),
        };
        (live, rx)
    }
}

/// The commands an actor knows, with their watcher (if any).
type Commands = BTreeMap<ProcId, (CommandInfo, Option<mpsc::Sender<CommandOut>>)>;

/// Hands `out` to the watcher of command `id`; one that does not take it
/// within [`WATCHER_PATIENCE`] (or is gone) is let go. `out` back if
/// nobody watches.
async fn tell(commands: &mut Commands, id: ProcId, out: CommandOut) -> Option<CommandOut> {
    let Some((_, Some(watcher))) = commands.get(&id) else { return Some(out) };
    let watcher = watcher.clone();
    if !matches!(tokio::time::timeout(WATCHER_PATIENCE, watcher.send(out)).await, Ok(Ok(()))) {
        if let Some(c) = commands.get_mut(&id) {
            c.1 = None;
        }
    }
    None
}

fn set_moved_to(live: &Live, server: &str) {
    *live.moved_to.lock().unwrap_or_else(|e| e.into_inner()) = Some(server.to_string());
}

fn set<T: Copy>(m: &Mutex<T>, v: T) {
    *m.lock().unwrap_or_else(|e| e.into_inner()) = v;
}

/// The actor of one session. It holds the running [`Session`], or nothing
/// while the session is paused to an image; it ends when the program ends
/// or the session is killed.
struct Actor<'a> {
    held: Option<Session>,
    /// The attached terminal and the context it attached with.
    client: Option<(mpsc::Sender<Out>, TerminalContext)>,
    live: &'a Live,
    engine: Arc<Engine>,
    settings: ContextSettings,
    /// Commands started through the server, while they run, with their
    /// watcher (if any).
    commands: Commands,
    /// Listings waiting for the agent's answer.
    listings: Vec<Reply<Vec<CommandInfo>>>,
    next_command: ProcId,
    /// The command on the last standby shell: once it ends, another starts.
    replenish_after: Option<ProcId>,
    /// Commands running on standby shells, each named in the record (its
    /// label goes when it ends).
    on_standby: std::collections::BTreeSet<ProcId>,
    /// Where the attached terminal is on the program's output.
    sent: SentTail,
    /// Events read while the session moved, to be handled first (but its
    /// program's and commands' output, passed on at once).
    stashed: std::collections::VecDeque<SessionEvent>,
    /// What commands printed (and how they ended) with nobody watching,
    /// kept for the watcher that follows a moved session here.
    unwatched: BTreeMap<ProcId, Vec<CommandOut>>,
    /// Until when [`Actor::unwatched`] keeps output (a session moved here).
    keep_unwatched_until: Option<tokio::time::Instant>,
}

/// How long a session moved here keeps its commands' output for watchers
/// that follow it, and how much of each command's.
const KEEP_UNWATCHED_FOR: Duration = Duration::from_secs(60);
const KEEP_UNWATCHED_MAX: usize = 4 << 20;

/// How long a command's output waits for a watcher that does not read
/// before that watcher is let go (the command goes on).
const WATCHER_PATIENCE: Duration = Duration::from_secs(30);

const PAUSED: &str = "the session is paused; resume it first";

impl Actor<'_> {
    async fn next_event(&mut self) -> SessionEvent {
        if let Some(ev) = self.stashed.pop_front() {
            return ev;
        }
        match self.held.as_mut() {
            Some(s) => s.next_event().await,
            None => std::future::pending().await,
        }
    }

    /// Lets the agent keep output as the screen: nobody watches.
    async fn quiet(&mut self) {
        set(&self.live.attached, self.client.is_some());
        if let Some(s) = self.held.as_mut() {
            if let Err(e) = s.quiet().await {
                tracing::warn!(session = %self.live.id, error = %e, "could not quiet the session");
            }
        }
    }

    /// Pauses the session to an image (nothing to do if it is paused);
    /// `why` is listed with it.
    async fn pause(&mut self, why: &str) -> Result<(), String> {
        let Some(mut s) = self.held.take() else { return Ok(()) };
        match self.engine.pause_to_image(&mut s, why).await {
            Ok(_) => {
                drop(s);
                self.live.set_qemu(0);
                set(&self.live.state, State::Paused);
                *self.live.why.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.to_string());
                Ok(())
            }
            Err(e) => {
                self.held = Some(s);
                Err(e.to_string())
            }
        }
    }

    /// Resumes a paused session from its image and gives it back to the
    /// attached terminal, if any (nothing to do if it runs).
    async fn resume(&mut self) -> Result<(), String> {
        if self.held.is_some() {
            return Ok(());
        }
        let s = self.engine.resume_session(&self.live.id, Some(&self.settings)).await.map_err(|e| e.to_string())?;
        self.live.set_qemu(s.vm_pid());
        self.held = Some(s);
        set(&self.live.state, State::Running);
        *self.live.why.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let ctx = self.client.as_ref().map(|(_, ctx)| ctx.clone());
        match (ctx, self.held.as_mut()) {
            (Some(ctx), Some(s)) => {
                // The terminal saw the screen before the pause; it goes on from there.
                if let Err(e) = s.reattach(&ctx).await {
                    tracing::warn!(session = %self.live.id, error = %e, "could not re-attach after the resume");
                    self.client = None;
                }
                set(&self.live.attached, self.client.is_some());
            }
            _ => self.quiet().await,
        }
        Ok(())
    }

    /// Saves the session as a snapshot while it runs on; the attached
    /// terminal, if any, is given what the program wrote meanwhile.
    async fn snapshot(&mut self, name: Option<&str>) -> Result<strata_engine::fork::Captured, String> {
        let s = self.held.as_mut().ok_or(PAUSED)?;
        let saved = self.engine.capture_snapshot(s, name).await.map_err(|e| e.to_string());
        let ctx = self.client.as_ref().map(|(_, ctx)| ctx.clone());
        match ctx {
            Some(ctx) => match s.reattach(&ctx).await {
                Ok(screen) => {
                    let missed = self.sent.after(&screen).to_vec();
                    if !missed.is_empty() {
                        self.sent.keep(&missed);
                        if let Some((c, _)) = &self.client {
                            let _ = c.send(Out::Data(missed)).await;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(session = %self.live.id, error = %e, "could not re-attach after a snapshot");
                    self.client = None;
                    set(&self.live.attached, false);
                }
            },
            None => self.quiet().await,
        }
        saved
    }

    /// Moves the session to `to` (see [`crate::moves::send`]). On success
    /// this server's QEMU is gone and an attached terminal is told where
    /// its session went; on failure the session runs on here as it was.
    async fn move_to(&mut self, to: &crate::moves::Destination) -> Result<Duration, String> {
        let Actor { held, client, sent, engine, stashed, commands, .. } = self;
        let s = held.as_mut().ok_or(PAUSED)?;
        // While its memory goes the guest runs: an attached terminal is
        // given the program's output meanwhile, and its commands' watchers
        // theirs; other events wait for the move's end. What the program
        // writes after the last output read here is on the agent's screen,
        // for the terminal that attaches on the other server; what its
        // commands write is kept there for their watchers (`unwatched`).
        let mut events = s.lend_events();
        let mut pass_on = async |ev: Option<SessionEvent>| match ev {
            Some(SessionEvent::Output(d)) => {
                if let Some((c, _)) = client.as_ref() {
                    sent.keep(&d);
                    if c.send(Out::Data(d)).await.is_err() {
                        *client = None;
                    }
                }
            }
            Some(SessionEvent::CommandOutput { id, stderr, data }) => {
                let out = if stderr { CommandOut::Stderr(data) } else { CommandOut::Stdout(data) };
                tell(commands, id, out).await;
            }
            Some(other) => stashed.push_back(other),
            None => stashed.push_back(SessionEvent::Lost("the session ended".into())),
        };
        let moved = {
            let moving = crate::moves::send(engine, s, to);
            tokio::pin!(moving);
            loop {
                tokio::select! {
                    r = &mut moving => break r,
                    ev = events.recv() => pass_on(ev).await,
                }
            }
        };
        if moved.is_ok() {
            // The guest stopped here: what it wrote before is read by now.
            while let Ok(ev) = events.try_recv() {
                pass_on(Some(ev)).await;
            }
        }
        s.return_events(events);
        match moved {
            Ok(downtime) => {
                for ev in std::mem::take(&mut self.stashed) {
                    if let SessionEvent::CommandExited { id, status } = ev {
                        tell(&mut self.commands, id, CommandOut::Exit(status)).await;
                    }
                }
                if let Some(s) = self.held.take() {
                    s.close().await;
                }
                tracing::info!(session = %self.live.id, to = %to.server, downtime_ms = downtime.as_millis() as u64, "the session moved to another server");
                Ok(downtime)
            }
            Err(e) => {
                tracing::warn!(session = %self.live.id, to = %to.server, error = %e, "a move failed; the session runs on here");
                set(&self.live.attached, self.client.is_some());
                Err(e)
            }
        }
    }

    /// Hands `out` to the watcher of command `id` (see [`tell`]); what
    /// nobody watches is kept a while if the session moved here lately.
    async fn tell_watcher(&mut self, id: ProcId, out: CommandOut) {
        if let Some(out) = tell(&mut self.commands, id, out).await {
            self.keep_unwatched(id, out);
        }
    }

    /// Keeps what command `id` printed (or how it ended) with nobody
    /// watching, for its watcher to come, if the session moved here lately.
    fn keep_unwatched(&mut self, id: ProcId, out: CommandOut) {
        if self.keep_unwatched_until.is_none_or(|t| tokio::time::Instant::now() >= t) {
            return;
        }
        let size = |o: &CommandOut| match o {
            CommandOut::Stdout(d) | CommandOut::Stderr(d) => d.len(),
            CommandOut::Exit(_) => 0,
        };
        let kept = self.unwatched.entry(id).or_default();
        if kept.iter().map(size).sum::<usize>() + size(&out) > KEEP_UNWATCHED_MAX {
            tracing::warn!(session = %self.live.id, command = id, "a command's output went unwatched beyond what is kept");
            return;
        }
        kept.push(out);
    }

    /// Takes the agent's list of running commands: those this server did
    /// not start become known (so they can be watched, fed and signalled),
    /// and every listing waiting is answered.
    fn answer_listings(&mut self, running: Vec<strata_proto::CommandState>) {
        // Ids of commands another server or process started are not
        // given again (a session moved or taken back runs them still).
        if let Some(last) = running.iter().map(|c| c.id).max() {
            self.next_command = self.next_command.max(last + 1);
        }
        let mut listed = Vec::new();
        for c in running {
            // Standbys (the launch image's copy of the program on pipes,
            // shells waiting for a command) are not commands until given work.
            let standby = c.id == strata_engine::launch::STANDBY_PROC
                || c.argv.iter().map(String::as_str).eq(strata_engine::launch::SHELL_STANDBY_ARGV);
            if standby && !self.commands.contains_key(&c.id) {
                continue;
            }
            let entry = self.commands.entry(c.id).or_insert_with(|| {
                let command = GuestCommand { argv: c.argv.clone(), ..GuestCommand::default() };
                (CommandInfo { id: c.id, command, tag: None, pty: c.pty }, None)
            });
            listed.push(entry.0.clone());
        }
        for reply in self.listings.drain(..) {
            let _ = reply.send(Ok(listed.clone()));
        }
    }

    /// The session command `id` (known here) runs in, or why it cannot
    /// be reached.
    fn command_session(&mut self, id: ProcId) -> Result<&mut Session, String> {
        if !self.commands.contains_key(&id) {
            return Err(format!("no running command {id} in session {}", self.live.id));
        }
        self.held.as_mut().ok_or_else(|| PAUSED.to_string())
    }

    /// Starts a command with pipes, or on a PTY of `pty`'s size; its id.
    async fn exec(
        &mut self,
        command: GuestCommand,
        tag: Option<String>,
        stdin: bool,
        pty: Option<WinSize>,
        out: mpsc::Sender<CommandOut>,
    ) -> Result<ProcId, String> {
        let s = self.held.as_mut().ok_or(PAUSED)?;
        // A login shell waiting in the image runs the first E2B-shaped
        // command (under TCG, starting one costs ~0.4 s of CPU).
        let on_standby = match pty {
            Some(_) => None,
            None => s.exec_on_shell_standby(&command).await.map_err(|e| e.to_string())?,
        };
        let id = match on_standby {
            Some(id) => id,
            None => {
                let id = self.next_command;
                match pty {
                    Some(size) => s.exec_pty(id, command.clone(), size).await,
                    None => s.exec(id, command.clone()).await,
                }
                .map_err(|e| e.to_string())?;
                self.next_command += 1;
                id
            }
        };
        // A PTY has no end of input (its user types Ctrl-D).
        if !stdin && pty.is_none() {
            s.command_eof(id).await.map_err(|e| e.to_string())?;
        }
        if on_standby.is_some() {
            // Another shell waits by the next such command, started once
            // this one ends (not to slow it down).
            if s.shell_standbys() == 0 {
                self.replenish_after = Some(id);
            }
            // Its agent lists it by the shell's argv: the record keeps what
            // it runs, for a server that takes the session back.
            let argv = serde_json::to_string(&command.argv).unwrap_or_default();
            let kept = self.engine.update_session(&self.live.id, |rec| {
                rec.labels.insert(shell_command_label(id), argv);
            });
            if let Err(e) = kept {
                tracing::warn!(session = %self.live.id, error = %e, "could not keep the standby shell's command");
            }
            self.on_standby.insert(id);
        }
        self.commands.insert(id, (CommandInfo { id, command, tag, pty: pty.is_some() }, Some(out)));
        Ok(id)
    }

    /// Starts a standby shell for the session's next E2B-shaped command.
    async fn add_shell_standby(&mut self) {
        let id = self.next_command;
        let Some(s) = self.held.as_mut() else { return };
        match s.add_shell_standby(id).await {
            Ok(()) => self.next_command += 1,
            Err(e) => tracing::warn!(session = %self.live.id, error = %e, "could not start a standby shell"),
        }
    }

    /// Sets (or clears) the session's end time, and keeps it in its record.
    fn set_end(&mut self, end: Option<(SystemTime, EndAction)>) {
        set(&self.live.end, end);
        let kept = self.engine.update_session(&self.live.id, |rec| match end {
            Some(e) => drop(rec.labels.insert(END_LABEL.to_string(), end_label(e))),
            None => drop(rec.labels.remove(END_LABEL)),
        });
        if let Err(e) = kept {
            tracing::warn!(session = %self.live.id, error = %e, "could not keep the end time with the session");
        }
    }

    /// Ends the session now: its VM stopped, or its paused image removed.
    async fn end(&mut self) {
        match self.held.take() {
            Some(s) => s.close().await,
            None => {
                if let Err(e) = self.engine.kill_session(&self.live.id).await {
                    tracing::warn!(session = %self.live.id, error = %e, "could not forget the paused session");
                }
            }
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        self.quiet().await;
        // The commands its guest runs already (a session moved or taken
        // back): known, and their ids not given again.
        if let Some(s) = self.held.as_mut() {
            if let Err(e) = s.request_commands().await {
                tracing::warn!(session = %self.live.id, error = %e, "could not list the session's commands");
            }
        }
        let mut idle_since = tokio::time::Instant::now();
        loop {
            let idle_limit = *self.live.idle_timeout.lock().unwrap_or_else(|e| e.into_inner());
            let idle_deadline = match (&self.client, &self.held, idle_limit) {
                (None, Some(_), Some(d)) => Some(idle_since + d),
                _ => None,
            };
            // A paused session's end time only ends it (pausing it again is nothing).
            let end = (*self.live.end.lock().unwrap_or_else(|e| e.into_inner()))
                .filter(|(_, action)| self.held.is_some() || *action == EndAction::Kill);
            let end_deadline = end.map(|(at, action)| {
                let left = at.duration_since(SystemTime::now()).unwrap_or_default();
                (tokio::time::Instant::now() + left, action)
            });
            tokio::select! {
                ev = self.next_event() => match ev {
                    SessionEvent::Output(d) => {
                        if let Some((c, _)) = &self.client {
                            self.sent.keep(&d);
                            if c.send(Out::Data(d)).await.is_err() {
                                self.client = None;
                                idle_since = tokio::time::Instant::now();
                                self.quiet().await;
                            }
                        }
                    }
                    SessionEvent::Exited(code) => {
                        match &self.client {
                            Some((c, _)) => { let _ = c.send(Out::Exit(code)).await; }
                            None => self.engine.end_unseen(&self.live.id, EndState::Exited, &format!("its program exited with status {code}")),
                        }
                        break;
                    }
                    SessionEvent::Lost(why) => {
                        match &self.client {
                            Some((c, _)) => { let _ = c.send(Out::Lost(why)).await; }
                            None => self.engine.end_unseen(&self.live.id, EndState::Lost, &why),
                        }
                        break;
                    }
                    SessionEvent::CommandOutput { id, stderr, data } => {
                        tracing::trace!(session = %self.live.id, command = id, stderr, len = data.len(), "command output");
                        let out = if stderr { CommandOut::Stderr(data) } else { CommandOut::Stdout(data) };
                        self.tell_watcher(id, out).await;
                    }
                    SessionEvent::CommandExited { id, status } => {
                        tracing::debug!(session = %self.live.id, command = id, status, "command exited");
                        self.tell_watcher(id, CommandOut::Exit(status)).await;
                        self.commands.remove(&id);
                        if self.replenish_after == Some(id) {
                            self.replenish_after = None;
                            self.add_shell_standby().await;
                        }
                        if self.on_standby.remove(&id) {
                            if let Err(e) = self.engine.unlabel_session(&self.live.id, &shell_command_label(id)) {
                                tracing::warn!(session = %self.live.id, error = %e, "could not forget a standby shell's command");
                            }
                        }
                    }
                    SessionEvent::Commands(running) => self.answer_listings(running),
                    SessionEvent::Detached | SessionEvent::Attached(_) | SessionEvent::Screen(_) | SessionEvent::File(_) | SessionEvent::Clipboard(_) => {}
                },
                cmd = rx.recv() => match cmd {
                    None => break,
                    Some(Cmd::Attach { ctx, out, reply }) => {
                        if self.client.as_ref().is_some_and(|(c, _)| !c.is_closed()) {
                            let _ = reply.send(Err("another terminal is attached to this session".into()));
                            continue;
                        }
                        // Attaching to a paused session resumes it.
                        if let Err(e) = self.resume().await {
                            let _ = reply.send(Err(e));
                            continue;
                        }
                        let Some(s) = self.held.as_mut() else { continue };
                        match s.reattach(&ctx).await {
                            Ok(screen) => {
                                self.client = Some((out, ctx));
                                set(&self.live.attached, true);
                                self.sent.clear();
                                self.sent.keep(&screen);
                                let _ = reply.send(Ok(screen));
                            }
                            Err(e) => { let _ = reply.send(Err(e.to_string())); }
                        }
                    }
                    Some(Cmd::Input(d)) => if let Some(s) = self.held.as_mut() { let _ = s.input(&d).await; },
                    Some(Cmd::Resize(size)) => {
                        if let Some((_, ctx)) = self.client.as_mut() { ctx.size = size; }
                        if let Some(s) = self.held.as_mut() { let _ = s.resize(size).await; }
                    }
                    Some(Cmd::Eof) => if let Some(s) = self.held.as_mut() { let _ = s.eof().await; },
                    Some(Cmd::Detach) => {
                        self.client = None;
                        idle_since = tokio::time::Instant::now();
                        self.quiet().await;
                    }
                    Some(Cmd::Screen(reply)) => {
                        let r = match self.held.as_mut() {
                            Some(s) => s.screen().await.map_err(|e| e.to_string()),
                            None => Err(PAUSED.into()),
                        };
                        let _ = reply.send(r);
                    }
                    Some(Cmd::Pause(why, reply)) => { let _ = reply.send(self.pause(&why).await); }
                    Some(Cmd::Resume(reply)) => {
                        let r = self.resume().await;
                        idle_since = tokio::time::Instant::now();
                        let _ = reply.send(r);
                    }
                    Some(Cmd::SetTimeout(t)) => {
                        set(&self.live.idle_timeout, t);
                        idle_since = tokio::time::Instant::now();
                        // Kept with the session, for a server that takes it back.
                        if self.held.is_some() {
                            if let Err(e) = self.engine.set_idle_timeout(&self.live.id, t) {
                                tracing::warn!(session = %self.live.id, error = %e, "could not keep the idle time-out with the session");
                            }
                        }
                    }
                    Some(Cmd::Clipboard { set, reply }) => {
                        let r = match (self.held.as_mut(), set) {
                            (None, _) => Err(PAUSED.into()),
                            (Some(s), Some(text)) => s.set_clipboard(&text).await.map(|_| text).map_err(|e| e.to_string()),
                            (Some(s), None) => s.clipboard().await.map_err(|e| e.to_string()),
                        };
                        let _ = reply.send(r);
                    }
                    Some(Cmd::Copy { host, guest, into_guest, reply }) => {
                        let r = match self.held.as_mut() {
                            None => Err(PAUSED.into()),
                            Some(s) if into_guest => s.copy_in(&host, &guest).await.map_err(|e| e.to_string()),
                            Some(s) => s.copy_out(&guest, &host).await.map_err(|e| e.to_string()),
                        };
                        let _ = reply.send(r);
                    }
                    Some(Cmd::Exec { command, tag, stdin, pty, out, reply }) => {
                        let r = self.exec(command, tag, stdin, pty, out).await;
                        tracing::debug!(session = %self.live.id, command = ?r, "command started");
                        let _ = reply.send(r);
                    }
                    Some(Cmd::CommandResize { id, size, reply }) => {
                        let r = match self.command_session(id) {
                            Ok(s) => s.command_resize(id, size).await.map_err(|e| e.to_string()),
                            Err(e) => Err(e),
                        };
                        let _ = reply.send(r);
                    }
                    Some(Cmd::Watch { id, out, reply }) => {
                        // What it printed unwatched since it moved here comes
                        // first, once the watcher has its answer and reads.
                        let kept = self.unwatched.remove(&id).unwrap_or_default();
                        if kept.iter().any(|o| matches!(o, CommandOut::Exit(_))) {
                            let _ = reply.send(Ok(false));
                            for o in kept {
                                if !matches!(tokio::time::timeout(WATCHER_PATIENCE, out.send(o)).await, Ok(Ok(()))) {
                                    break;
                                }
                            }
                            continue;
                        }
                        if !kept.is_empty() {
                            self.commands.entry(id).or_insert_with(|| {
                                (CommandInfo { id, command: GuestCommand::default(), tag: None, pty: false }, None)
                            });
                        }
                        let r = self.command_session(id).map(|_| ());
                        let r = r.map(|()| match self.commands.get_mut(&id) {
                            Some(c) => {
                                c.1 = Some(out);
                                c.0.pty
                            }
                            None => false,
                        });
                        let watched = r.is_ok();
                        let _ = reply.send(r);
                        if watched {
                            for o in kept {
                                tell(&mut self.commands, id, o).await;
                            }
                        }
                    }
                    Some(Cmd::CommandInput { id, data, reply }) => {
                        let r = match (self.command_session(id), data) {
                            (Ok(s), Some(d)) => s.command_input(id, &d).await.map_err(|e| e.to_string()),
                            (Ok(s), None) => s.command_eof(id).await.map_err(|e| e.to_string()),
                            (Err(e), _) => Err(e),
                        };
                        let _ = reply.send(r);
                    }
                    Some(Cmd::Signal { id, signal, reply }) => {
                        let r = match self.command_session(id) {
                            Ok(s) => s.command_signal(id, signal).await.map_err(|e| e.to_string()),
                            Err(e) => Err(e),
                        };
                        let _ = reply.send(r);
                    }
                    Some(Cmd::KnownCommands(reply)) => {
                        let _ = reply.send(Ok(self.commands.values().map(|(info, _)| info.clone()).collect()));
                    }
                    Some(Cmd::Commands(reply)) => {
                        // The agent knows them all (also those another
                        // strata process started); it answers as an event.
                        match self.held.as_mut() {
                            // An agent that never answers (too old) leaves
                            // its listings pending: a few are kept at most.
                            Some(_) if self.listings.len() >= 64 => {
                                let _ = reply.send(Err("the agent does not list its commands".into()));
                            }
                            Some(s) => match s.request_commands().await {
                                Ok(()) => self.listings.push(reply),
                                Err(e) => { let _ = reply.send(Err(e.to_string())); }
                            },
                            None => { let _ = reply.send(Ok(Vec::new())); }
                        }
                    }
                    Some(Cmd::SetEnd(end)) => self.set_end(end),
                    Some(Cmd::Snapshot { name, reply }) => { let _ = reply.send(self.snapshot(name.as_deref()).await); }
                    Some(Cmd::Move { to, reply }) => {
                        let r = self.move_to(&to).await;
                        let moved = r.is_ok();
                        let _ = reply.send(r);
                        if moved {
                            // Its commands' watchers (dropped as the actor
                            // ends) are told where it went.
                            set_moved_to(self.live, &to.server);
                            // What the terminal typed while the session moved
                            // goes back to it, to be typed there.
                            let mut unsent = Vec::new();
                            while let Ok(cmd) = rx.try_recv() {
                                if let Cmd::Input(d) = cmd {
                                    unsent.extend_from_slice(&d);
                                }
                            }
                            if let Some((c, _)) = self.client.take() {
                                let _ = c.send(Out::Moved { server: to.server.clone(), unsent }).await;
                            }
                            return;
                        }
                    }
                    Some(Cmd::Release(done)) => {
                        if let Some(s) = self.held.take() {
                            if let Some((c, _)) = &self.client {
                                let _ = c.send(Out::Lost("the server is stopping; attach again once it is back".into())).await;
                            }
                            s.leave("detached: its server stopped; the next server takes it back").await;
                        }
                        let _ = done.send(());
                        return;
                    }
                    Some(Cmd::Kill(done)) => {
                        self.end().await;
                        let _ = done.send(());
                        return;
                    }
                },
                _ = async { match end_deadline { Some((d, _)) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                    if end_deadline.is_some_and(|(_, action)| action == EndAction::Pause) {
                        match self.pause("paused: its end time came").await {
                            Ok(()) => tracing::info!(session = %self.live.id, "end time: paused the session to an image"),
                            Err(e) => tracing::warn!(session = %self.live.id, error = %e, "end time: the session cannot be paused to an image; it keeps running"),
                        }
                        self.set_end(None);
                    } else {
                        tracing::info!(session = %self.live.id, "end time: the session is ended");
                        self.end().await;
                        return;
                    }
                }
                _ = async { match idle_deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                    let idle = strata_engine::sessions::human_secs(idle_limit.unwrap_or_default().as_secs() as i64);
                    match self.pause(&format!("paused: detached longer than its idle time-out ({idle})")).await {
                        Ok(()) => tracing::info!(session = %self.live.id, "idle time-out: paused the session to an image"),
                        Err(e) => {
                            // Nothing is lost: it runs on, and no time-out fires again.
                            tracing::warn!(session = %self.live.id, error = %e, "idle time-out: the session cannot be paused to an image; it keeps running");
                            set(&self.live.idle_timeout, None);
                        }
                    }
                }
            }
        }
        if let Some(s) = self.held.take() {
            s.close().await;
        }
    }
}
