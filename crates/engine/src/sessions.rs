//! The registry of sessions launched from launch images: a directory per
//! session under `STATE/sessions/ID/` with its sockets, QEMU's throwaway
//! overlay, logs and `session.json`. A session whose terminal detached keeps
//! running there until `strata attach` or `strata kill`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use strata_store::{process_alive as alive, WorkDir};
use strata_vmm::Vm;

use crate::context::ContextSettings;
use crate::session::{first_attach, Attached, Session};
use crate::{io_err, write_atomic, Engine, Error};

const RECORD: &str = "session.json";

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
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
            home: None,
            ports: Vec::new(),
            settings: None,
            paused_image: None,
            labels: Default::default(),
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

pub(crate) fn read_record(dir: &Path) -> Option<SessionRecord> {
    serde_json::from_slice(&std::fs::read(dir.join(RECORD)).ok()?).ok()
}

pub(crate) fn mark_detached(dir: &Path) -> Result<(), Error> {
    let mut rec = read_record(dir).ok_or_else(|| Error::Config(format!("no session record in {}", dir.display())))?;
    rec.detached = true;
    rec.owner_pid = 0;
    write_atomic(&dir.join(RECORD), &serde_json::to_vec(&rec).expect("serializes"))
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
        Ok(WorkDir::adopt(dir))
    }

    pub(crate) fn write_session_record(&self, rec: &SessionRecord) -> Result<(), Error> {
        write_atomic(&self.session_dir(&rec.id).join(RECORD), &serde_json::to_vec(rec).expect("serializes"))
    }

    /// Adds `labels` to a running session's record (kept when it is paused).
    ///
    /// # Errors
    /// If the session has no record or it cannot be written.
    pub fn label_session(&self, id: &str, labels: std::collections::BTreeMap<String, String>) -> Result<(), Error> {
        check_id(id)?;
        let dir = self.session_dir(id);
        let mut rec = read_record(&dir).ok_or_else(|| Error::Config(format!("no session record for {id}")))?;
        rec.labels.extend(labels);
        self.write_session_record(&rec)
    }

    /// Whether the image `digest` (in the catalog) has a display.
    pub(crate) fn image_is_graphical(&self, digest: &str) -> bool {
        self.store.image(digest).ok().flatten().is_some_and(|i| crate::is_graphical(&i))
    }

    /// Where a session's display is served (its VNC socket), running or not.
    pub fn vnc_socket_of(&self, id: &str) -> PathBuf {
        self.session_dir(id).join(strata_vmm::VNC_SOCK)
    }

    /// Removes sessions whose VM is gone, and stops VMs whose terminal
    /// vanished without detaching (its strata process died).
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
            let orphan = rec.as_ref().is_some_and(|r| !r.detached && !alive(r.owner_pid));
            // A directory without a record is a launch still starting (its
            // creator writes the record) unless its creator is dead; keep it
            // for a minute to be safe.
            let young = e
                .metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|d| d < Duration::from_secs(60));
            if rec.is_none() && young {
                continue;
            }
            if rec.is_none() {
                // Its creator died before recording it: stop any QEMU still using it.
                for pid in qemu_using(&dir) {
                    kill_qemu(pid);
                }
            }
            if vm_alive && orphan {
                let pid = rec.as_ref().map(|r| r.qemu_pid).unwrap_or(0);
                tracing::info!(session = %e.file_name().to_string_lossy(), pid, "stopping a session whose terminal vanished");
                kill_qemu(pid);
            }
            if !vm_alive || orphan {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
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
        let mut rec =
            read_record(&dir).ok_or_else(|| Error::Config(format!("no session {id}; `strata ps` lists them")))?;
        if !rec.detached && alive(rec.owner_pid) {
            return Err(Error::Config(format!(
                "session {id} is attached to another terminal (strata process {})",
                rec.owner_pid
            )));
        }
        let (vm, mut conn) = Vm::reattach(&dir, rec.qemu_pid, Duration::from_secs(10)).await?;
        let (screen, exited) =
            match first_attach(&mut conn, &settings.to_terminal_context(), Duration::from_secs(10)).await {
                Ok(x) => x,
                Err(e) => {
                    vm.release();
                    return Err(Error::Agent(format!("session {id} did not answer the attach: {e}")));
                }
            };
        rec.detached = false;
        rec.owner_pid = std::process::id();
        self.write_session_record(&rec)?;
        let a = Attached { vm, conn, dir: WorkDir::adopt(dir.clone()), screen, exited };
        let mut s = Session::new(id.to_string(), &rec.package, a);
        s.record = Some(dir);
        Ok(s)
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
        let rec = read_record(&dir).ok_or_else(|| Error::Config(format!("no session {id}; `strata ps` lists them")))?;
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

    /// A running session no terminal holds, connected to this process (not
    /// attached: release it to leave it as it was).
    pub(crate) async fn reattach_unheld(&self, id: &str, hint: &str) -> Result<Session, Error> {
        if self.paused_record(id).is_some() {
            return Err(Error::Config(format!("session {id} is paused; resume it first (`strata resume {id}`)")));
        }
        let (dir, rec) = self.unheld_session(id, hint)?;
        let (vm, conn) = Vm::reattach(&dir, rec.qemu_pid, Duration::from_secs(10)).await?;
        let a = Attached { vm, conn, dir: WorkDir::adopt(dir.clone()), screen: Vec::new(), exited: None };
        let mut s = Session::new(id.to_string(), &rec.package, a);
        s.record = Some(dir);
        s.has_devices = rec.settings.as_ref().is_some_and(ContextSettings::needs_devices)
            || rec.home.is_some()
            || !rec.ports.is_empty();
        s.graphical = self.image_is_graphical(&rec.launch_image);
        Ok(s)
    }

    /// Stops a session and removes everything it left.
    ///
    /// # Errors
    /// If there is no such session.
    pub async fn kill_session(&self, id: &str) -> Result<(), Error> {
        check_id(id)?;
        if self.forget_paused(id)? {
            return Ok(());
        }
        let dir = self.session_dir(id);
        let rec = read_record(&dir).ok_or_else(|| Error::Config(format!("no session {id}; `strata ps` lists them")))?;
        if alive(rec.qemu_pid) && is_session_qemu(rec.qemu_pid, &dir) {
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
