//! The registry of sessions launched from launch images: a directory per
//! session under `STATE/sessions/ID/` with its sockets, QEMU's throwaway
//! overlay, logs and `session.json`. A session whose terminal detached, or
//! whose strata process died, keeps running there until `strata attach` or
//! `strata kill`; a restarted `strata serve` takes back its own. A session
//! whose VM ended while nobody watched is kept as a record under
//! `STATE/ended/ID.json` (exited or lost, and why) until it is removed or
//! its retention passes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use strata_store::{process_alive as alive, WorkDir};
use strata_vmm::Vm;

use crate::context::ContextSettings;
use crate::session::{first_attach, Attached, Session};
use crate::{io_err, write_atomic, Engine, Error};

const RECORD: &str = "session.json";
/// The pid of the process starting a session, written before its VM starts.
const CREATOR: &str = "creator.pid";
/// Locked while a process takes a session in.
const CLAIM_LOCK: &str = "claim.lock";

fn first_os() -> String {
    crate::DEFAULT_OS.name.to_string()
}

/// What `strata ps` shows of a session.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    pub id: String,
    pub package: String,
    pub qemu_pid: u32,
    /// The strata process attached to it (0 when detached).
    pub owner_pid: u32,
    pub detached: bool,
    pub launch_image: String,
    /// The OS its guest runs (records older than the OS choice: the first).
    #[serde(default = "first_os")]
    pub os: String,
    /// Unix seconds.
    pub created: i64,
    /// The terminal whose persistent home the session mounts.
    #[serde(default)]
    pub home: Option<String>,
    /// Host ports forwarded into the session.
    #[serde(default)]
    pub ports: Vec<crate::context::PortForward>,
    /// The context it was launched with (and is resumed with).
    #[serde(default)]
    pub settings: Option<ContextSettings>,
    /// Set while the session is paused to an image: that image's digest.
    /// Its VM is gone then; `resume_session` restores it.
    #[serde(default)]
    pub paused_image: Option<String>,
    /// What the program driving the session keeps with it (the API server's
    /// terminal and attach-token hash), so it outlives that program.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// A session restored ahead of demand, waiting in a pool: nobody's yet,
    /// so it is stopped, not kept, when its server dies.
    #[serde(default)]
    pub pooled: bool,
    /// The strata that started it (empty: one from before this was kept).
    #[serde(default)]
    pub strata_version: String,
    /// Set once its VM ended while no terminal was attached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<Ended>,
    /// Seconds it may stay detached before it is paused to an image (0:
    /// never; unset: the server's default). A running `strata serve`
    /// applies it to every session of its store.
    #[serde(default)]
    pub idle_timeout_s: Option<u64>,
    /// Unix seconds since when no terminal holds it.
    #[serde(default)]
    pub detached_since: Option<i64>,
    /// Why it is detached or paused, in words (who left it so, and when a
    /// time-out did); `ps` shows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

/// How a session ended that nobody saw end.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub state: EndState,
    /// Why, in words: the exit status or signal, the limit, and the last
    /// lines QEMU and the guest's console wrote.
    pub reason: String,
    /// Unix seconds.
    pub at: i64,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EndState {
    /// Its program or guest ended it (the guest powered off).
    Exited,
    /// Its VM was ended from outside (a crash, a signal, a limit, a reboot).
    Lost,
}

impl std::fmt::Display for EndState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EndState::Exited => "exited",
            EndState::Lost => "lost",
        })
    }
}

/// `what`, then the last lines QEMU and the guest's console wrote.
fn with_log_tail(what: &str, dir: &Path) -> String {
    let tail = strata_vmm::qemu::diagnostics(dir);
    if tail.is_empty() {
        what.to_string()
    } else {
        format!("{what}\n{tail}")
    }
}

/// An idle time-out as the record keeps it (0: never).
pub fn idle_secs(idle: Option<Duration>) -> u64 {
    idle.map_or(0, |d| d.as_secs())
}

/// What Linux writes to the console as the guest powers off.
const GUEST_POWER_OFF: &str = "reboot: Power down";

/// This build's version, as session records keep it.
pub const STRATA_VERSION: &str = env!("STRATA_BUILD_VERSION");

/// How long a session may stay detached before it is paused to an image,
/// where neither it nor its server says.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// How long the record of a session that ended unseen is kept, unless
/// `STRATA_ENDED_RETENTION_SECS` says otherwise.
pub const ENDED_RETENTION: Duration = Duration::from_secs(24 * 3600);

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

impl SessionRecord {
    pub(crate) fn new(id: &str, package: &str, qemu_pid: u32, launch_image: &str) -> SessionRecord {
        SessionRecord {
            id: id.into(),
            package: package.into(),
            qemu_pid,
            owner_pid: std::process::id(),
            detached: false,
            launch_image: launch_image.into(),
            os: first_os(),
            created: unix_now(),
            home: None,
            ports: Vec::new(),
            settings: None,
            paused_image: None,
            labels: Default::default(),
            pooled: false,
            strata_version: STRATA_VERSION.into(),
            ended: None,
            idle_timeout_s: None,
            detached_since: None,
            why: None,
        }
    }

    /// What `ps` shows as its state.
    pub fn state(&self) -> String {
        match (&self.ended, &self.paused_image, self.detached) {
            (Some(e), _, _) => e.state.to_string(),
            (None, Some(_), _) => "paused".into(),
            (None, None, true) => "detached".into(),
            (None, None, false) => "attached".into(),
        }
    }
}

/// Kills a session's QEMU (the caller checked the pid is that QEMU).
fn kill_qemu(pid: u32) {
    // SAFETY: sending a signal has no memory effects.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
}

/// Whether `pid` is the QEMU of the session in `dir` (not a reused pid).
fn is_session_qemu(pid: u32, dir: &Path) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(&*dir.to_string_lossy()))
        .unwrap_or(false)
}

/// QEMU processes whose command line names `dir`.
fn qemu_using(dir: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/comm")).is_ok_and(|c| c.starts_with(b"qemu-system")))
        .filter(|pid| is_session_qemu(*pid, dir))
        .collect()
}

/// What one housekeeping round did, and whether the store still needs one.
#[derive(Debug, Default)]
pub struct Housekeeping {
    /// Detached sessions paused past their idle time-out.
    pub paused: Vec<String>,
    /// Paused sessions removed past their retention.
    pub removed: Vec<String>,
    /// Something still runs (a pool's waiting sessions aside), or a paused
    /// session waits for its retention to pass.
    pub to_keep: bool,
}

/// A running session that no strata process holds: detached, not a pool's.
fn is_unheld(r: &SessionRecord) -> bool {
    r.detached && !r.pooled && r.paused_image.is_none()
}

pub(crate) fn read_record(dir: &Path) -> Option<SessionRecord> {
    serde_json::from_slice(&std::fs::read(dir.join(RECORD)).ok()?).ok()
}

/// Changes the record of the session in `dir` with `change`, atomically.
pub(crate) fn update_record(dir: &Path, change: impl FnOnce(&mut SessionRecord)) -> Result<(), Error> {
    let mut rec = read_record(dir).ok_or_else(|| Error::Config(format!("no session record in {}", dir.display())))?;
    change(&mut rec);
    write_atomic(&dir.join(RECORD), &serde_json::to_vec(&rec).expect("serializes"))
}

/// A span of seconds in words, briefly: 45s, 30m, 1h, 1h30m.
pub fn human_secs(secs: i64) -> String {
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    match (h, m, s) {
        (0, 0, s) => format!("{s}s"),
        (0, m, 0) => format!("{m}m"),
        (0, m, s) => format!("{m}m{s}s"),
        (h, 0, _) => format!("{h}h"),
        (h, m, _) => format!("{h}h{m}m"),
    }
}

/// Records the session in `dir` as held by no process, and `why`.
pub(crate) fn mark_detached(dir: &Path, why: &str) -> Result<(), Error> {
    update_record(dir, |rec| {
        rec.detached = true;
        rec.owner_pid = 0;
        rec.detached_since = Some(unix_now());
        rec.why = Some(why.to_string());
    })
}

/// The session records kept as `ID.json` files in `dir`, oldest first.
pub(crate) fn records_in(dir: &Path) -> Vec<SessionRecord> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<SessionRecord> = entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
        .collect();
    out.sort_by_key(|r| r.created);
    out
}

/// Records that a pooled session was taken: it is someone's now.
pub(crate) fn mark_taken(dir: &Path) -> Result<(), Error> {
    update_record(dir, |rec| rec.pooled = false)
}

/// Checks a session id before it becomes part of a path.
pub(crate) fn check_id(id: &str) -> Result<(), Error> {
    if id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(Error::Config(format!("{id:?} is not a session id (12 hex digits, as `strata ps` shows)")))
    }
}

impl Engine {
    fn sessions_root(&self) -> PathBuf {
        self.cfg.state_dir.join("sessions")
    }

    pub(crate) fn session_dir(&self, id: &str) -> PathBuf {
        self.sessions_root().join(id)
    }

    pub(crate) fn new_session_dir(&self, id: &str) -> Result<WorkDir, Error> {
        let dir = self.session_dir(id);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let dir = WorkDir::adopt(dir);
        // Until the record is written, this names who is starting it.
        let creator = dir.path().join(CREATOR);
        std::fs::write(&creator, std::process::id().to_string()).map_err(io_err(&creator))?;
        Ok(dir)
    }

    pub(crate) fn write_session_record(&self, rec: &SessionRecord) -> Result<(), Error> {
        write_atomic(&self.session_dir(&rec.id).join(RECORD), &serde_json::to_vec(rec).expect("serializes"))
    }

    /// Adds `labels` to a running session's record (kept when it is paused).
    ///
    /// # Errors
    /// If the session has no record or it cannot be written.
    pub fn label_session(&self, id: &str, labels: std::collections::BTreeMap<String, String>) -> Result<(), Error> {
        self.update_session(id, |rec| rec.labels.extend(labels))
    }

    /// Changes a running session's record with `change`, atomically (what
    /// its holder keeps with it: labels, idle time-out).
    ///
    /// # Errors
    /// If the session has no record or it cannot be written.
    pub fn update_session(&self, id: &str, change: impl FnOnce(&mut SessionRecord)) -> Result<(), Error> {
        check_id(id)?;
        update_record(&self.session_dir(id), change)
    }

    /// Removes label `key` from a running session's record.
    ///
    /// # Errors
    /// If the session has no record or it cannot be written.
    pub fn unlabel_session(&self, id: &str, key: &str) -> Result<(), Error> {
        self.update_session(id, |rec| {
            rec.labels.remove(key);
        })
    }

    /// Whether the image `digest` (in the catalog) has a display.
    pub(crate) fn image_is_graphical(&self, digest: &str) -> bool {
        self.store.image(digest).ok().flatten().is_some_and(|i| crate::is_graphical(&i))
    }

    /// Where a session's display is served (its VNC socket), running or not.
    pub fn vnc_socket_of(&self, id: &str) -> PathBuf {
        self.session_dir(id).join(strata_vmm::VNC_SOCK)
    }

    /// Keeps the sessions' directories true: a session whose strata
    /// process died is detached (a pooled one, nobody's yet, is stopped); one
    /// whose VM is gone while no terminal held it becomes an ended record.
    pub(crate) fn reap_sessions(&self) {
        let Ok(entries) = std::fs::read_dir(self.sessions_root()) else {
            return;
        };
        for e in entries.flatten() {
            let dir = e.path();
            let rec = read_record(&dir);
            // Paused, but its VM outlived the pause (the pausing process died
            // before stopping it): the image is the session now. The lock
            // tells it from a resume in progress.
            if let Some(r) = rec.as_ref().filter(|r| self.paused_record(&r.id).is_some()) {
                if let Ok(_lock) = self.lock_paused(&r.id) {
                    if self.paused_record(&r.id).is_some() {
                        if alive(r.qemu_pid) && is_session_qemu(r.qemu_pid, &dir) {
                            kill_qemu(r.qemu_pid);
                        }
                        let _ = std::fs::remove_dir_all(&dir);
                    }
                }
                continue;
            }
            let vm_alive = rec.as_ref().is_some_and(|r| alive(r.qemu_pid) && is_session_qemu(r.qemu_pid, &dir));
            // Attached to a strata process that died: a vanished terminal.
            let orphan = rec.as_ref().is_some_and(|r| !r.detached && !alive(r.owner_pid));
            // A directory without a record is a launch still starting (its
            // creator writes the record) unless its creator is dead; one
            // that does not name its creator is kept a minute to be safe.
            let starting = match std::fs::read_to_string(dir.join(CREATOR)).ok().and_then(|p| p.trim().parse().ok()) {
                Some(creator) => alive(creator),
                None => e
                    .metadata()
                    .ok()
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|d| d < Duration::from_secs(60)),
            };
            let Some(rec) = rec else {
                if !starting {
                    // Its creator died before recording it: stop any QEMU still using it.
                    for pid in qemu_using(&dir) {
                        kill_qemu(pid);
                    }
                    let _ = std::fs::remove_dir_all(&dir);
                }
                continue;
            };
            if rec.pooled && (orphan || !vm_alive) {
                // Waiting in the pool of a server that died: nobody's session.
                if vm_alive {
                    kill_qemu(rec.qemu_pid);
                }
                tracing::info!(session = %rec.id, "stopped a pooled session whose server is gone");
                let _ = std::fs::remove_dir_all(&dir);
            } else if vm_alive && orphan {
                tracing::info!(session = %rec.id, owner = rec.owner_pid, "the terminal of a session vanished; it is detached");
                let why = format!("detached: its terminal's strata process (pid {}) ended", rec.owner_pid);
                if let Err(e) = mark_detached(&dir, &why) {
                    tracing::warn!(session = %rec.id, error = %e, "could not mark the session detached");
                }
            } else if !vm_alive && (rec.detached || orphan) {
                // Its VM ended with no terminal to see it: kept as ended.
                let (state, why) = self.why_vm_ended(&dir);
                self.record_end(rec, state, why);
                let _ = std::fs::remove_dir_all(&dir);
            }
            // A VM gone under a live holder is left to it: the holder
            // records the end (a server's session nobody watched becomes
            // `lost`) and removes the directory; removing it here first
            // would lose that record.
        }
        self.sweep_ended();
        self.sweep_confinement();
    }

    /// The images sessions stand on: each running session's launch image
    /// and each paused session's image (what they need is not included).
    pub(crate) fn session_images(&self) -> Vec<String> {
        self.list_sessions().into_iter().flat_map(|s| [Some(s.launch_image), s.paused_image]).flatten().collect()
    }

    /// Sessions that are running (attached or detached) or paused.
    pub fn list_sessions(&self) -> Vec<SessionRecord> {
        self.reap_sessions();
        let Ok(entries) = std::fs::read_dir(self.sessions_root()) else {
            return self.paused_sessions();
        };
        let mut out: Vec<SessionRecord> = entries.flatten().filter_map(|e| read_record(&e.path())).collect();
        out.extend(self.paused_sessions());
        out.sort_by_key(|r| r.created);
        out
    }

    /// Attaches this terminal to a detached session, resuming it first if it
    /// is paused.
    ///
    /// # Errors
    /// If there is no such session, another terminal holds it, or its VM does not answer.
    pub async fn attach_session(&self, id: &str, settings: &ContextSettings) -> Result<Session, Error> {
        check_id(id)?;
        settings.validate()?;
        if self.paused_record(id).is_some() {
            // Resumed with the context it was launched with, sized to this terminal.
            return self.resume_session(id, Some(settings)).await;
        }
        self.reap_sessions();
        let dir = self.session_dir(id);
        let rec = self.claim(id, "attached to another terminal")?;
        let connected = async {
            let (vm, mut conn) = reattach_running(&dir, &rec).await?;
            match first_attach(&mut conn, &settings.to_terminal_context(), Duration::from_secs(10)).await {
                Ok((screen, exited)) => Ok((vm, conn, screen, exited)),
                Err(e) => {
                    vm.release();
                    Err(Error::Agent(format!("session {id} did not answer the attach: {e}")))
                }
            }
        };
        let (vm, conn, screen, exited) = match connected.await {
            Ok(x) => x,
            Err(e) => {
                let _ = mark_detached(&dir, &format!("detached: an attach failed ({e})"));
                return Err(e);
            }
        };
        let a = Attached { vm, conn, dir: WorkDir::adopt(dir.clone()), screen, exited };
        Ok(self.session_of(&rec, dir, a))
    }

    /// The session of record `rec`, connected by `a`.
    pub(crate) fn session_of(&self, rec: &SessionRecord, dir: PathBuf, a: Attached) -> Session {
        let mut s = Session::new(rec.id.clone(), &rec.package, &rec.os, a);
        s.record = Some(dir);
        s.has_devices = rec.settings.as_ref().is_some_and(ContextSettings::needs_devices)
            || rec.home.is_some()
            || !rec.ports.is_empty();
        s.graphical = self.image_is_graphical(&rec.launch_image);
        s
    }

    /// Removes blobs that no image references (and that no build is
    /// about to record: younger than ten minutes). Returns (blobs, bytes).
    ///
    /// # Errors
    /// If the catalog cannot be read.
    pub fn gc(&self) -> Result<(u64, u64), Error> {
        self.drop_paused_images()?;
        let removed = self.store.gc(Duration::from_secs(600))?;
        // Restore kernels cut from kernels that are gone.
        let dir = self.cfg.state_dir.join("restore-kernels");
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let digest = e.file_name().to_string_lossy().into_owned();
            if !self.store.blob_path(&digest).exists() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(removed)
    }

    /// A session no terminal holds: its directory and record. `hint` says
    /// what to do when a terminal does hold it.
    fn unheld_session(&self, id: &str, hint: &str) -> Result<(PathBuf, SessionRecord), Error> {
        check_id(id)?;
        self.reap_sessions();
        let dir = self.session_dir(id);
        let rec = read_record(&dir).ok_or_else(|| self.no_session(id))?;
        if !rec.detached && alive(rec.owner_pid) {
            return Err(Error::Config(format!(
                "session {id} is attached to a terminal (strata process {}); {hint}",
                rec.owner_pid
            )));
        }
        Ok((dir, rec))
    }

    /// The recent output of a detached session, changing nothing in it.
    ///
    /// # Errors
    /// If there is no such session, a terminal holds it, or it does not answer.
    pub async fn session_logs(&self, id: &str) -> Result<Vec<u8>, Error> {
        let (dir, rec) = self.unheld_session(id, "its output is there")?;
        let (vm, mut conn) = Vm::reattach(&dir, rec.qemu_pid, Duration::from_secs(10)).await?;
        let screen = crate::session::peek_screen(&mut conn, Duration::from_secs(10)).await;
        vm.release();
        screen
    }

    /// Copies a file between this host and a detached session: into the
    /// guest when `into_guest`, out of it otherwise. Returns the bytes copied.
    ///
    /// # Errors
    /// If there is no such session, a terminal holds it, or the copy fails.
    pub async fn copy_file(&self, id: &str, host: &Path, guest: &str, into_guest: bool) -> Result<u64, Error> {
        let mut s = self.reattach_unheld(id, "detach it first (Ctrl-P Ctrl-Q)").await?;
        let r = if into_guest { s.copy_in(host, guest).await } else { s.copy_out(guest, host).await };
        s.release();
        r
    }

    /// A running session no terminal holds, connected to this process to
    /// run commands in it (not attached: [`Session::release`] leaves it as
    /// it was).
    ///
    /// # Errors
    /// If there is no such running session, a terminal holds it, or it does
    /// not answer.
    pub async fn borrow_session(&self, id: &str) -> Result<Session, Error> {
        self.reattach_unheld(id, "detach it first (Ctrl-P Ctrl-Q)").await
    }

    /// A running session no terminal holds, connected to this process (not
    /// attached: release it to leave it as it was).
    pub(crate) async fn reattach_unheld(&self, id: &str, hint: &str) -> Result<Session, Error> {
        if self.paused_record(id).is_some() {
            return Err(Error::Config(format!("session {id} is paused; resume it first (`strata resume {id}`)")));
        }
        let (dir, rec) = self.unheld_session(id, hint)?;
        self.connect_session(dir, &rec).await
    }

    /// Connects this process to the running session in `dir`.
    async fn connect_session(&self, dir: PathBuf, rec: &SessionRecord) -> Result<Session, Error> {
        let (vm, conn) = reattach_running(&dir, rec).await?;
        let a = Attached { vm, conn, dir: WorkDir::adopt(dir.clone()), screen: Vec::new(), exited: None };
        Ok(self.session_of(rec, dir, a))
    }

    /// Stops a session and removes everything it left.
    ///
    /// # Errors
    /// If there is no such session.
    pub async fn kill_session(&self, id: &str) -> Result<(), Error> {
        check_id(id)?;
        if self.forget_paused(id)? || self.remove_ended(id)? {
            return Ok(());
        }
        let dir = self.session_dir(id);
        let rec = read_record(&dir).ok_or_else(|| Error::Config(format!("no session {id}; `strata ps` lists them")))?;
        if alive(rec.qemu_pid) && is_session_qemu(rec.qemu_pid, &dir) {
            // Held by this process while it goes: another strata process
            // reaping meanwhile leaves it to this one, instead of keeping
            // it as a session that ended unseen.
            let _ = update_record(&dir, |r| {
                r.detached = false;
                r.owner_pid = std::process::id();
            });
            kill_qemu(rec.qemu_pid);
            for _ in 0..100 {
                if !alive(rec.qemu_pid) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        match std::fs::remove_dir_all(&dir) {
            // Another strata process reaped it as soon as its VM was gone.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            r => r.map_err(io_err(&dir)),
        }
    }
}

/// Connects to the QEMU of running session `rec` in `dir`, and resumes its
/// guest if a process that died while pausing it left it stopped.
async fn reattach_running(dir: &Path, rec: &SessionRecord) -> Result<(Vm, strata_vmm::AgentConn), Error> {
    let (mut vm, conn) = Vm::reattach(dir, rec.qemu_pid, Duration::from_secs(10)).await?;
    match vm.ensure_running().await {
        Ok(true) => tracing::info!(session = %rec.id, "its guest was left stopped (a pause cut short); resumed"),
        Ok(false) => {}
        Err(e) => {
            vm.release();
            return Err(e.into());
        }
    }
    Ok((vm, conn))
}

impl Engine {
    fn ended_root(&self) -> PathBuf {
        self.cfg.state_dir.join("ended")
    }

    /// Keeps `rec` as a session that ended unseen (`ps` lists it until it
    /// is removed or its retention passes). Best effort: a record that
    /// cannot be written is logged.
    pub fn record_end(&self, mut rec: SessionRecord, state: EndState, reason: String) {
        tracing::info!(session = %rec.id, %state, %reason, "a session ended while no terminal was attached");
        rec.ended = Some(Ended { state, reason, at: unix_now() });
        rec.detached = true;
        rec.owner_pid = 0;
        let root = self.ended_root();
        let written = std::fs::create_dir_all(&root).map_err(io_err(&root)).and_then(|()| {
            write_atomic(&root.join(format!("{}.json", rec.id)), &serde_json::to_vec(&rec).expect("serializes"))
        });
        if let Err(e) = written {
            tracing::warn!(session = %rec.id, error = %e, "could not keep the record of an ended session");
        }
    }

    /// Keeps session `id`, whose end the process holding it saw while no
    /// terminal was attached, as ended: `what` happened, with the last
    /// lines of its logs.
    pub fn end_unseen(&self, id: &str, state: EndState, what: &str) {
        let dir = self.session_dir(id);
        if let Some(rec) = read_record(&dir) {
            self.record_end(rec, state, with_log_tail(what, &dir));
        }
    }

    /// How and why the VM in `dir` ended, as far as this host can tell once
    /// it is gone: its guest powered off (the kernel's last word on its
    /// console), its memory limit ended it, or something else did.
    fn why_vm_ended(&self, dir: &Path) -> (EndState, String) {
        let id = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let console = std::fs::read(dir.join("console.log")).unwrap_or_default();
        let tail = &console[console.len().saturating_sub(4096)..];
        let powered_off = String::from_utf8_lossy(tail).contains(GUEST_POWER_OFF);
        let limit = self.cgroups.as_ref().ok().is_some_and(|c| c.of(&id).oom_killed());
        let (state, what) = if limit {
            (
                EndState::Lost,
                "its VM was ended by its memory limit (it used more than the guest's RAM plus the server's allowance)",
            )
        } else if powered_off {
            (EndState::Exited, "its guest powered off while no terminal was attached")
        } else {
            (EndState::Lost, "its VM ended while no terminal was attached (QEMU exited or was killed)")
        };
        (state, with_log_tail(what, dir))
    }

    /// Sessions whose VM ended while nobody watched, oldest first.
    pub fn ended_sessions(&self) -> Vec<SessionRecord> {
        records_in(&self.ended_root())
    }

    /// The error for a session that is not running: ended (and why), or unknown.
    fn no_session(&self, id: &str) -> Error {
        match self.ended_sessions().into_iter().find(|r| r.id == id).and_then(|r| r.ended) {
            Some(e) => Error::Config(format!(
                "session {id} has ended ({}): {}\n`strata rm {id}` removes its record",
                e.state,
                e.reason.lines().next().unwrap_or_default()
            )),
            None => Error::Config(format!("no session {id}; `strata ps` lists them")),
        }
    }

    /// Removes the record of an ended session; whether there was one.
    ///
    /// # Errors
    /// If `id` is malformed or the record cannot be removed.
    pub fn remove_ended(&self, id: &str) -> Result<bool, Error> {
        check_id(id)?;
        let path = self.ended_root().join(format!("{id}.json"));
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Drops ended records older than their retention.
    fn sweep_ended(&self) {
        let keep = self.cfg.ended_retention.as_secs() as i64;
        let now = unix_now();
        for rec in self.ended_sessions() {
            if rec.ended.as_ref().is_some_and(|e| now - e.at > keep) {
                let _ = self.remove_ended(&rec.id);
            }
        }
    }

    /// Records this process as the holder of running session `id`, if no
    /// live process holds it; under a lock in its directory, so of two
    /// processes claiming it at once (two servers starting, a server's idle
    /// pause and an attach), one gets it. `held` words the refusal.
    fn claim(&self, id: &str, held: &str) -> Result<SessionRecord, Error> {
        let dir = self.session_dir(id);
        let path = dir.join(CLAIM_LOCK);
        let f = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|_| self.no_session(id))?;
        let _claim = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|_| Error::Config(format!("session {id} is being taken by another strata process; try again")))?;
        let mut rec = read_record(&dir).ok_or_else(|| self.no_session(id))?;
        if !rec.detached && alive(rec.owner_pid) {
            return Err(Error::Config(format!("session {id} is {held} (strata process {})", rec.owner_pid)));
        }
        rec.detached = false;
        rec.owner_pid = std::process::id();
        rec.detached_since = None;
        rec.why = None;
        self.write_session_record(&rec)?;
        Ok(rec)
    }

    /// Sets how long session `id` may stay detached before a server pauses
    /// it to an image (`None`: never).
    ///
    /// # Errors
    /// If it has no record or the record cannot be written.
    pub fn set_idle_timeout(&self, id: &str, idle: Option<Duration>) -> Result<(), Error> {
        self.update_session(id, |rec| rec.idle_timeout_s = Some(idle_secs(idle)))
    }

    /// One round of what keeps a store, by a server or the CLI's keeper:
    /// the detached sessions no process holds are paused past their idle
    /// time-out (`default_idle` where a session has none), paused ones past
    /// their retention go, and so do the images no session needs and the
    /// memory files of snapshots whose maker was killed. The store's
    /// records are read once per round.
    pub async fn housekeep(&self, default_idle: Option<Duration>) -> Housekeeping {
        crate::fork::sweep_memory_scratch();
        let records = self.list_sessions();
        let unheld = records.iter().filter(|r| is_unheld(r));
        let paused = self.pause_idle_unheld(unheld, default_idle).await;
        let removed = self.expire_paused(&records);
        let retained = self.cfg.paused_retention.is_some();
        // A pool's waiting sessions are their server's to keep.
        let to_keep =
            records.iter().any(|r| (r.paused_image.is_none() && !r.pooled) || (r.paused_image.is_some() && retained));
        Housekeeping { paused, removed, to_keep }
    }

    /// Pauses to images the running sessions among `unheld` (held by no
    /// process) whose idle time-out has passed (`default` where a session
    /// has none); returns their ids. What a server does for the sessions of
    /// its store that it does not hold (the CLI's, detached).
    async fn pause_idle_unheld<'a>(
        &self,
        unheld: impl Iterator<Item = &'a SessionRecord>,
        default: Option<Duration>,
    ) -> Vec<String> {
        let now = unix_now();
        let mut paused = Vec::new();
        for rec in unheld {
            let limit = match rec.idle_timeout_s {
                Some(0) => continue,
                Some(s) => s as i64,
                None => match default {
                    Some(d) => d.as_secs() as i64,
                    None => continue,
                },
            };
            if rec.detached_since.is_none_or(|since| now - since < limit) {
                continue;
            }
            let mut s = match self.adopt_session(&rec.id).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(session = %rec.id, error = %e, "idle time-out: not taken");
                    continue;
                }
            };
            let idle = human_secs(limit);
            match self.pause_to_image(&mut s, &format!("paused: detached longer than its idle time-out ({idle})")).await
            {
                Ok(_) => {
                    tracing::info!(session = %rec.id, idle_s = now - rec.detached_since.unwrap_or(now), "idle time-out: paused a detached session to an image");
                    paused.push(rec.id.clone());
                }
                Err(e) => {
                    tracing::warn!(session = %rec.id, error = %e, "idle time-out: the session cannot be paused to an image; it keeps running");
                    // Not tried again: it has devices a pause cannot save.
                    let _ = self.set_idle_timeout(&rec.id, None);
                    s.leave(&format!("detached; its idle time-out ({idle}) could not pause it: {e}")).await;
                }
            }
        }
        paused
    }

    /// Running sessions no live strata process holds (detached, or their
    /// process died), each with its record: what a restarted server
    /// takes back.
    pub fn unheld_sessions(&self) -> Vec<SessionRecord> {
        self.reap_sessions();
        let Ok(entries) = std::fs::read_dir(self.sessions_root()) else { return Vec::new() };
        entries.flatten().filter_map(|e| read_record(&e.path())).filter(is_unheld).collect()
    }

    /// Takes a running session no terminal holds into this process: it is
    /// connected (not attached: its agent is told to keep its output) and
    /// recorded as held here, so a process that dies leaves it detached
    /// again.
    ///
    /// # Errors
    /// If it is not running unheld, or its VM does not answer; an agent
    /// that does not speak this strata's protocol is named with both
    /// versions, and the session is left running.
    pub async fn adopt_session(&self, id: &str) -> Result<Session, Error> {
        check_id(id)?;
        let dir = self.session_dir(id);
        let rec = self.claim(id, "held by")?;
        let connected = async {
            let mut s = self.connect_session(dir.clone(), &rec).await?;
            match s.quiet().await {
                Ok(()) => Ok(s),
                Err(e) => {
                    s.release();
                    Err(e)
                }
            }
        };
        match connected.await {
            Ok(s) => Ok(s),
            Err(e) => {
                let _ = mark_detached(&dir, &format!("detached: it does not answer strata {STRATA_VERSION}"));
                let started_by = if rec.strata_version.is_empty() { "an earlier strata" } else { &rec.strata_version };
                Err(Error::Agent(format!(
                    "session {id} (started by strata {started_by}) does not answer strata {STRATA_VERSION}: {e}; \
                     it is left running, detached: attach to it with the strata that started it"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_an_earlier_strata_wrote_is_read_and_shown_by_its_state() {
        // As the previous release wrote it: no pool flag, version or end.
        let old = r#"{"id":"0123456789ab","package":"bc","qemu_pid":42,"owner_pid":0,"detached":true,
            "launch_image":"ab","created":1,"labels":{"terminal":"t"}}"#;
        let rec: SessionRecord = serde_json::from_str(old).unwrap();
        assert!(!rec.pooled && rec.strata_version.is_empty() && rec.ended.is_none());
        assert_eq!(rec.state(), "detached");
        let mut ended = rec.clone();
        ended.ended = Some(Ended { state: EndState::Lost, reason: "killed".into(), at: 2 });
        assert_eq!(ended.state(), "lost");
        // An end is written only when there is one.
        assert!(!serde_json::to_string(&rec).unwrap().contains("ended"));
        let back: SessionRecord = serde_json::from_str(&serde_json::to_string(&ended).unwrap()).unwrap();
        assert_eq!(back, ended);
        let mut attached = rec;
        attached.detached = false;
        assert_eq!(attached.state(), "attached");
        attached.paused_image = Some("cd".into());
        assert_eq!(attached.state(), "paused");
    }

    #[test]
    fn records_are_read_from_json_files_only_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        for (id, created) in [("0123456789ab", 5), ("ba9876543210", 3)] {
            let mut r = SessionRecord::new(id, "bc", 1, "img");
            r.created = created;
            std::fs::write(dir.path().join(format!("{id}.json")), serde_json::to_vec(&r).unwrap()).unwrap();
        }
        std::fs::write(dir.path().join("x.lock"), b"").unwrap();
        std::fs::write(dir.path().join("broken.json"), b"{").unwrap();
        let ids: Vec<String> = records_in(dir.path()).into_iter().map(|r| r.id).collect();
        assert_eq!(ids, ["ba9876543210", "0123456789ab"]);
        assert!(records_in(&dir.path().join("missing")).is_empty());
    }

    #[test]
    fn spans_are_worded_briefly() {
        let said: Vec<String> = [0, 45, 1800, 1845, 3600, 5400, 90061].into_iter().map(human_secs).collect();
        assert_eq!(said, ["0s", "45s", "30m", "30m45s", "1h", "1h30m", "25h1m"]);
    }
}
