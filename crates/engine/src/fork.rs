//! Snapshots and forks. A snapshot is a running session's whole state
//! (memory, devices, disk writes) saved as an image chained on the image it
//! runs from, while the session runs on: the save copies memory while the
//! guest runs and stops it only for the last part and the copy of its disk
//! writes. New sessions start from a snapshot as from a paused image, each
//! under its own id and independent from then on. A fork is a snapshot
//! nobody named, kept while a session started from it needs it, whose
//! memory file its copies alone hold (it is never stored); a named one is
//! kept until `images rm`.
//!
//! A snapshot is recorded as a `paused` image with the `snapshot` fact (its
//! name, empty for a fork's): older strata builds read the catalog too, and
//! an image kind they do not know would make them refuse all of it.

use std::collections::BTreeMap;
use std::time::Duration;

use strata_store::{ImageKind, ImageRecord};
use strata_vmm::qemu::Stream;
use strata_vmm::{AfterLoad, Memory, Vm};

use crate::context::ContextSettings;
use crate::session::Session;
use crate::sessions::{read_record, SessionRecord};
use crate::{Engine, Error};

/// The fact that makes a paused image a snapshot: its name ("" for a fork's).
pub const SNAPSHOT_META: &str = "snapshot";
/// The fact that holds the context the snapshot's session ran with (JSON).
const SETTINGS_META: &str = "settings";
/// The session a snapshot was taken of.
pub const SOURCE_META: &str = "source_session";
/// The terminal whose session it was taken of (none: this machine's CLI's).
pub const TERMINAL_META: &str = "terminal";
/// The fact of a snapshot whose state was saved with the guest stopped:
/// a session restored from it is started once loaded.
const STOPPED_META: &str = "stopped";
/// At most this many sessions from one fork request.
pub const MAX_FORKS: usize = 32;
/// What to do about a session held by another process.
const HELD_ELSEWHERE: &str = "detach it first (Ctrl-P Ctrl-Q), or fork it through the server that holds it";

/// A session's state on its way to a snapshot ([`Engine::capture_snapshot`]):
/// its memory and devices sent by live migration to a stopped VM whose
/// memory is a file of its own, and a copy of its disk writes;
/// [`Engine::finish_snapshot`] stores them as a snapshot.
pub struct Captured {
    receiver: Receiver,
    relay: tokio::task::JoinHandle<std::io::Result<()>>,
    /// Holds the copy of the disk writes, and the devices' state once saved.
    work: strata_store::WorkDir,
    parent: ImageRecord,
    package: String,
    meta: BTreeMap<String, String>,
    name: Option<String>,
    session: String,
    /// How long the session's guest was stopped for it.
    pub stopped: Duration,
}

impl std::fmt::Debug for Captured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Captured").field("session", &self.session).field("stopped", &self.stopped).finish()
    }
}

/// The stopped VM a snapshot's guest is received into: its memory is the
/// file [`MemoryScratch`] names (on tmpfs, where QEMU fills it fast).
struct Receiver {
    vm: Vm,
    dir: strata_store::WorkDir,
    memory: MemoryScratch,
}

/// A snapshot's guest arrived in its receiving VM, that VM ended
/// ([`Engine::receive_captured`]): its devices' state and disk writes in
/// `work`, its memory file where the VM wrote it (being hashed, if asked).
struct Arrived {
    work: strata_store::WorkDir,
    hashing: Option<tokio::task::JoinHandle<Result<String, strata_store::Error>>>,
    parent: ImageRecord,
    package: String,
    meta: BTreeMap<String, String>,
    name: Option<String>,
    session: String,
    stopped: Duration,
    t0: std::time::Instant,
}

/// A snapshot's memory file where its receiving VM wrote it, until dropped.
struct ReceivedMemory {
    scratch: MemoryScratch,
    /// Holds the file when `/dev/shm` is no tmpfs.
    _dir: strata_store::WorkDir,
}

impl Arrived {
    fn disk(&self) -> std::path::PathBuf {
        self.work.path().join("disk.qcow2")
    }

    fn state(&self) -> std::path::PathBuf {
        self.work.path().join("state")
    }
}

/// How a session starts from `snapshot`: the context its session ran
/// with (its devices are in the saved state), sized to `terminal` if
/// given; its package; and its restore.
fn copy_plan(
    snapshot: &ImageRecord,
    terminal: Option<&ContextSettings>,
) -> (ContextSettings, String, crate::launch::Restore) {
    let mut settings: ContextSettings = snapshot
        .meta
        .get(SETTINGS_META)
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_else(|| ContextSettings::from_terminal(None));
    if let Some(t) = terminal {
        (settings.term, settings.rows, settings.cols) = (t.term.clone(), t.rows, t.cols);
    }
    let package = snapshot.package.clone().unwrap_or_default();
    let after_load = if snapshot.meta.contains_key(STOPPED_META) { AfterLoad::Run } else { AfterLoad::AsSaved };
    let how = crate::launch::Restore {
        plugs_in_state: settings.needs_devices(),
        after_load,
        ..crate::launch::Restore::default()
    };
    (settings, package, how)
}

/// A session saved while it runs on.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub image: ImageRecord,
    /// How long the session's guest was stopped for it.
    pub stopped: Duration,
}

/// Whether `image` is a snapshot.
pub fn is_snapshot(image: &ImageRecord) -> bool {
    snapshot_name(image).is_some()
}

/// A snapshot's name ("" for a fork's own); `None` for other images.
pub fn snapshot_name(image: &ImageRecord) -> Option<&str> {
    (image.kind == ImageKind::Paused).then(|| image.meta.get(SNAPSHOT_META)).flatten().map(String::as_str)
}

/// A snapshot's name, checked: what `strata run --from` and `images ls` use.
///
/// # Errors
/// If it is empty, too long, or has characters other than lower-case
/// letters, digits, `.`, `_` and `-` (or does not start with a letter or digit).
pub fn check_snapshot_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "snapshot name {name:?} is not valid: use 1 to 63 lower-case letters, digits, '.', '_' or '-', \
             starting with a letter or digit"
        )))
    }
}

impl Engine {
    /// Saves running session `s` as a snapshot (named `name`, or a fork's
    /// own with `None`) and lets it run on. The agent is left quiet: a
    /// caller with a terminal attached attaches it again.
    ///
    /// # Errors
    /// If the name is taken or not valid; if the session has a persistent
    /// home (its copies would claim it twice), forwards host ports (its
    /// copies would ask for the same ones) or shared folders; if the save
    /// fails (the session runs on).
    pub async fn snapshot_session(&self, s: &mut Session, name: Option<&str>) -> Result<Snapshot, Error> {
        let captured = self.capture_snapshot(s, name).await?;
        self.finish_snapshot(captured).await
    }

    /// The part of [`Engine::snapshot_session`] that needs the session:
    /// its memory and devices sent to a receiving VM while it runs, its
    /// disk writes copied in the short stop that ends that, and the guest
    /// continued. The agent is left quiet.
    ///
    /// # Errors
    /// As [`Engine::snapshot_session`].
    pub async fn capture_snapshot(&self, s: &mut Session, name: Option<&str>) -> Result<Captured, Error> {
        if let Some(n) = name {
            check_snapshot_name(n)?;
            let shared = match &self.remote {
                Some(remote) => remote.find_by_recipe(ImageKind::Paused, &snapshot_recipe(n)).await?.is_some(),
                None => false,
            };
            if shared || self.find_snapshot(n)?.is_some() {
                return Err(Error::Config(format!(
                    "a snapshot named {n} exists already; choose another name, or remove it first \
                     (`strata images rm DIGEST`, `strata images ls` lists it)"
                )));
            }
        }
        let Some(dir) = s.record.clone() else {
            return Err(Error::Config(format!("session {} was not started from an image; it cannot be copied", s.id)));
        };
        let rec = read_record(&dir).ok_or_else(|| Error::Config(format!("no session record in {}", dir.display())))?;
        check_copyable(&rec)?;
        crate::paused::check_savable(s, &rec)?;
        let _lock = self.lock_paused(&s.id)?;
        s.quiet().await?;
        let settings = rec.settings.clone().unwrap_or_else(|| ContextSettings::from_terminal(None));
        let mut meta = BTreeMap::from([
            (SOURCE_META.to_string(), s.id.clone()),
            (SNAPSHOT_META.to_string(), name.unwrap_or_default().to_string()),
            (SETTINGS_META.to_string(), serde_json::to_string(&settings).expect("serializes")),
            (STOPPED_META.to_string(), "true".to_string()),
        ]);
        if let Some(t) = rec.labels.get(TERMINAL_META) {
            meta.insert(TERMINAL_META.to_string(), t.clone());
        }
        let parent = self.image_of(s, &rec)?;
        let t0 = std::time::Instant::now();
        let mut receiver = self.receiver_for(&parent, &settings).await?;
        tracing::debug!(ms = t0.elapsed().as_secs_f64() * 1e3, "snapshot's receiving VM started");
        let (listener, socket) = self.outgoing_socket(s)?;
        let incoming = receiver.dir.path().join(strata_vmm::qemu::INCOMING_SOCK);
        let relay = crate::moves::relay_within_host(listener, incoming, Stream::Parallel);
        let sent = s.vm_mut().send_live(&socket, Stream::Parallel, crate::paused::SAVE_TIMEOUT).await;
        let _ = std::fs::remove_file(&socket);
        let saved = match sent {
            Ok(saved) => saved,
            Err(e) => {
                // A failed migration leaves the guest running; make sure.
                let _ = s.vm_mut().ensure_running().await;
                relay.abort();
                receiver.vm.kill().await;
                return Err(e.into());
            }
        };
        tracing::debug!(ms = t0.elapsed().as_secs_f64() * 1e3, "snapshot's guest sent");
        // The guest is stopped from here: its disk writes are copied, and
        // it runs on whatever happened.
        let stopped_at = std::time::Instant::now();
        let copied = self.copy_overlay(s).await;
        let resumed = s.vm_mut().resume().await;
        let stopped = saved.downtime + stopped_at.elapsed();
        let failed = match (copied, resumed) {
            (Ok(work), Ok(())) => {
                let (package, session) = (s.package.clone(), s.id.clone());
                let name = name.map(str::to_string);
                return Ok(Captured { receiver, relay, work, parent, package, meta, name, session, stopped });
            }
            (Err(e), _) => e,
            (_, Err(e)) => e.into(),
        };
        relay.abort();
        receiver.vm.kill().await;
        Err(failed)
    }

    /// A copy of the disk writes of stopped session `s`, in a work
    /// directory of its own (as `disk.qcow2`).
    async fn copy_overlay(&self, s: &mut Session) -> Result<strata_store::WorkDir, Error> {
        let overlay = s.vm_mut().throwaway_overlay(0).await?;
        let work = self.store.work_dir("snapshot")?;
        let disk = work.path().join("disk.qcow2");
        crate::tools::run("cp", tokio::process::Command::new("cp").arg("--sparse=always").arg(&overlay).arg(&disk))
            .await?;
        Ok(work)
    }

    /// A stopped VM with the machine and devices of a session running
    /// from `parent` with `settings`, waiting for the session's guest by
    /// live migration into a memory file of its own.
    async fn receiver_for(&self, parent: &ImageRecord, settings: &ContextSettings) -> Result<Receiver, Error> {
        // A scratch directory of its own, named as the sweeps tell live VMs
        // (a directory nested in another looked ended: its cgroup and ids
        // could be swept while it started).
        let dir = self.store.work_dir("snapshot-vm")?;
        let mib: u64 = parent.meta.get("memory_mib").and_then(|m| m.parse().ok()).unwrap_or(0);
        let memory = MemoryScratch::new(&dir.path().join("memory"), mib << 20);
        let plugs = crate::launch::plugs_of(settings, None)?;
        let mut cfg = self.restore_config(
            dir.path(),
            parent,
            Memory::SharedFile(memory.0.clone()),
            plugs,
            settings.needs_devices(),
        )?;
        (cfg.incoming, cfg.incoming_stream, cfg.whole_state) = (None, Some(Stream::Parallel), false);
        cfg.after_load = AfterLoad::Stay;
        cfg.die_with_parent = true;
        let (vm, _agent) = Vm::start(&cfg, Duration::from_secs(60)).await?;
        Ok(Receiver { vm, dir, memory })
    }

    /// Makes a captured state a snapshot, the session no longer needed:
    /// once the guest has arrived in the receiving VM, its devices are
    /// saved without its memory (the memory file is the snapshot's, which
    /// the sessions started from it share through the page cache), and
    /// its files stored. A named one's recipe is its name's, so servers
    /// sharing a store find it by name.
    ///
    /// # Errors
    /// If the guest did not arrive or its files cannot be saved or stored.
    pub async fn finish_snapshot(&self, c: Captured) -> Result<Snapshot, Error> {
        let (mut arrived, received) = self.receive_captured(c, true).await?;
        let mut files = self.store_saved_files(&arrived.parent, &arrived.disk(), &arrived.state()).await?;
        let memory = arrived.work.path().join("memory");
        crate::tools::run(
            "cp",
            tokio::process::Command::new("cp").arg("--sparse=always").arg(&received.scratch.0).arg(&memory),
        )
        .await?;
        drop(received);
        let hashing = arrived.hashing.take().expect("asked for");
        let digest = hashing.await.map_err(|e| Error::Config(e.to_string()))??;
        tracing::debug!(ms = arrived.t0.elapsed().as_secs_f64() * 1e3, "snapshot's memory file copied out and hashed");
        files.insert("memory".to_string(), self.store.ingest_file_hashed(&memory, &digest)?);
        let recipe = arrived.name.as_deref().map(snapshot_recipe);
        self.record_arrived(arrived, files, recipe)
    }

    /// Makes a captured state a fork's snapshot and starts `n` sessions
    /// from it (as [`Engine::start_from_snapshot`] does), sized to
    /// `terminal` if given; the snapshot, and each copy's outcome. The
    /// copies map the memory file where the receiving VM wrote it (tmpfs),
    /// copy-on-write, and hold its pages from then on: it is neither hashed
    /// nor stored (a 512 MiB file's hash and copy were ~0.45 s of CPU
    /// before the copies could start), so the snapshot has no memory file
    /// and starts no session after them.
    ///
    /// # Errors
    /// If the snapshot cannot be made.
    pub async fn fork_captured(
        &self,
        c: Captured,
        n: usize,
        terminal: Option<&ContextSettings>,
    ) -> Result<(Snapshot, Vec<Result<Session, Error>>), Error> {
        let (arrived, received) = self.receive_captured(c, false).await?;
        let files = self.store_saved_files(&arrived.parent, &arrived.disk(), &arrived.state()).await?;
        let snapshot = self.record_arrived(arrived, files, None)?;
        let memory = Memory::PrivateFile(received.scratch.0.clone());
        let copies =
            futures_util::future::join_all((0..n).map(|_| self.start_copy(&snapshot.image, &memory, terminal)));
        let copies = copies.await;
        // Every copy has mapped it by now.
        drop(received);
        Ok((snapshot, copies))
    }

    /// Waits for a captured guest to arrive in its receiving VM, then
    /// saves its devices (not its memory) and ends that VM. With `hash`,
    /// its memory file is hashed from the moment it is whole.
    async fn receive_captured(&self, c: Captured, hash: bool) -> Result<(Arrived, ReceivedMemory), Error> {
        let t0 = std::time::Instant::now();
        let Captured { mut receiver, relay, work, parent, package, meta, name, session, stopped } = c;
        let state = work.path().join("state");
        let mut hashing = None;
        let received = async {
            relay.await.map_err(|e| Error::Config(e.to_string()))?.map_err(|e| Error::Config(e.to_string()))?;
            receiver.vm.wait_loaded(crate::paused::SAVE_TIMEOUT).await?;
            tracing::debug!(ms = t0.elapsed().as_secs_f64() * 1e3, "snapshot received into a memory file");
            // The memory file is whole once the guest has arrived: hashed
            // from here, while the devices are saved and the file is copied
            // out (on two cores that work is hidden behind the hash).
            if hash {
                let source = receiver.memory.0.clone();
                hashing = Some(tokio::task::spawn_blocking(move || strata_store::hash_file(&source)));
            }
            receiver.vm.save(&state, crate::paused::SAVE_TIMEOUT).await.map_err(Error::from)
        }
        .await;
        if let Err(e) = received {
            // QEMU's last words say why.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let why = receiver.vm.diagnostics();
            receiver.vm.kill().await;
            return Err(Error::Config(format!("saving the snapshot of session {session}: {e}: {why}")));
        }
        receiver.vm.quit().await;
        // Taken from the receiving VM's uid: readable by the VMs started
        // from it, writable by none.
        receiver.memory.seal()?;
        tracing::debug!(ms = t0.elapsed().as_secs_f64() * 1e3, "snapshot's devices saved");
        let Receiver { dir, memory, .. } = receiver;
        let arrived = Arrived { work, hashing, parent, package, meta, name, session, stopped, t0 };
        Ok((arrived, ReceivedMemory { scratch: memory, _dir: dir }))
    }

    /// Records an arrived snapshot whose `files` are stored.
    fn record_arrived(
        &self,
        a: Arrived,
        files: BTreeMap<String, String>,
        recipe: Option<String>,
    ) -> Result<Snapshot, Error> {
        let image =
            self.record_image(crate::paused::saved_image(&a.parent, (&a.session, &a.package), files, &a.meta, recipe))?;
        tracing::info!(session = %a.session, image = %image.digest, name = a.name.as_deref().unwrap_or("-"), stopped_ms = a.stopped.as_secs_f64() * 1e3, store_ms = a.t0.elapsed().as_secs_f64() * 1e3, "session saved as a snapshot; it runs on");
        Ok(Snapshot { image, stopped: a.stopped })
    }

    /// Starts a session from `snapshot` with `memory` (see [`copy_plan`]).
    async fn start_copy(
        &self,
        snapshot: &ImageRecord,
        memory: &Memory,
        terminal: Option<&ContextSettings>,
    ) -> Result<Session, Error> {
        let (settings, package, how) = copy_plan(snapshot, terminal);
        let id = crate::launch::new_session_id();
        self.restore(&id, &package, snapshot, memory.clone(), &settings, how).await
    }

    /// Publishes a named snapshot to the store shared between servers, if
    /// there is one (a failure is logged: it is then only on this server).
    /// Apart from [`Engine::snapshot_session`], so that the session's
    /// holder is not kept waiting for the upload.
    pub async fn share_snapshot(&self, snapshot: &ImageRecord) {
        self.share(snapshot).await;
    }

    /// Starts a new session from `snapshot`, with the context its session
    /// ran with (its devices are in the saved state) sized to `terminal`
    /// if given.
    ///
    /// # Errors
    /// If the image is not a snapshot, its files are gone or damaged, or
    /// the VM cannot be restored.
    pub async fn start_from_snapshot(
        &self,
        snapshot: &ImageRecord,
        terminal: Option<&ContextSettings>,
    ) -> Result<Session, Error> {
        if !is_snapshot(snapshot) {
            return Err(Error::Config(format!("image {} is not a snapshot", snapshot.digest)));
        }
        // Its memory file mapped copy-on-write: its copies share its pages.
        // A fork's holds no memory file (its copies had it) and earlier
        // builds' kept all of it in the state.
        let memory = match snapshot.files.get("memory") {
            Some(blob) => Memory::PrivateFile(self.store.blob_path(blob)),
            None if snapshot.meta.contains_key(crate::launch::WHOLE_STATE_META) => Memory::Anonymous,
            None => {
                return Err(Error::Config(format!(
                    "snapshot {} is a fork's: its memory went to the sessions forked from it, so no session starts \
                     from it now; fork the session again, or save a named snapshot (`strata snapshot SESSION NAME`)",
                    &snapshot.digest[..12.min(snapshot.digest.len())]
                )))
            }
        };
        self.start_copy(snapshot, &memory, terminal).await
    }

    /// Saves detached session `id` (no terminal holds it) as a snapshot
    /// (named `name`, or a fork's own) while it runs on, detached.
    ///
    /// # Errors
    /// As [`Engine::snapshot_session`], or if a terminal holds it or it is
    /// paused or unknown.
    pub async fn snapshot_detached(&self, id: &str, name: Option<&str>) -> Result<Snapshot, Error> {
        let mut s = self.reattach_unheld(id, HELD_ELSEWHERE).await?;
        let r = self.snapshot_session(&mut s, name).await;
        s.release();
        if let (Ok(snap), Some(_)) = (&r, name) {
            self.share_snapshot(&snap.image).await;
        }
        r
    }

    /// Forks detached session `id` (no terminal holds it) into `n` new
    /// sessions (see [`Engine::fork_captured`]) while it runs on, detached.
    ///
    /// # Errors
    /// As [`Engine::snapshot_detached`].
    pub async fn fork_detached(&self, id: &str, n: usize) -> Result<(Snapshot, Vec<Result<Session, Error>>), Error> {
        let mut s = self.reattach_unheld(id, HELD_ELSEWHERE).await?;
        let captured = self.capture_snapshot(&mut s, None).await;
        s.release();
        self.fork_captured(captured?, n, None).await
    }

    /// The context running session `id` was started with (the defaults if
    /// its record does not say).
    pub fn session_settings(&self, id: &str) -> ContextSettings {
        self.running_record(id).and_then(|r| r.settings).unwrap_or_else(|| ContextSettings::from_terminal(None))
    }

    /// The snapshot named `name` (or whose digest starts with `name`) here,
    /// or else, by name, in the store shared between servers (fetched).
    ///
    /// # Errors
    /// If the catalog or the shared store cannot be read, or the fetch fails.
    pub async fn resolve_snapshot(&self, name: &str) -> Result<Option<ImageRecord>, Error> {
        if let Some(here) = self.find_snapshot(name)? {
            return Ok(Some(here));
        }
        let Some(remote) = &self.remote else { return Ok(None) };
        if check_snapshot_name(name).is_err() {
            return Ok(None);
        }
        let Some(shared) = remote.find_by_recipe(ImageKind::Paused, &snapshot_recipe(name)).await? else {
            return Ok(None);
        };
        let shared = self.fetch_shared(shared).await?;
        tracing::info!(snapshot = name, image = %shared.digest, "snapshot fetched from the shared store");
        Ok(Some(shared))
    }

    /// The named snapshots of this store, newest first.
    ///
    /// # Errors
    /// If the catalog cannot be read.
    pub fn named_snapshots(&self) -> Result<Vec<ImageRecord>, Error> {
        let named = |i: &ImageRecord| snapshot_name(i).is_some_and(|n| !n.is_empty());
        Ok(self.store.list_images()?.into_iter().filter(named).collect())
    }

    /// The snapshot named `name` in this store, found by its name's recipe
    /// (not by reading every image's record).
    ///
    /// # Errors
    /// If the catalog cannot be read.
    pub fn named_snapshot(&self, name: &str) -> Result<Option<ImageRecord>, Error> {
        if check_snapshot_name(name).is_err() {
            return Ok(None);
        }
        let found = self.store.find_by_recipe(ImageKind::Paused, &snapshot_recipe(name))?;
        Ok(found.filter(|i| snapshot_name(i) == Some(name)))
    }

    /// The snapshot named `name`, or whose digest starts with `name`.
    ///
    /// # Errors
    /// If the catalog cannot be read, or a digest prefix names several.
    pub fn find_snapshot(&self, name: &str) -> Result<Option<ImageRecord>, Error> {
        if let Some(named) = self.named_snapshot(name)? {
            return Ok(Some(named));
        }
        if name.len() < 6 || !name.chars().all(|c| c.is_ascii_hexdigit()) {
            return Ok(None);
        }
        let snapshots = self.store.list_images()?.into_iter().filter(is_snapshot);
        let mut by_digest = snapshots.into_iter().filter(|i| i.digest.starts_with(name));
        match (by_digest.next(), by_digest.next()) {
            (Some(one), None) => Ok(Some(one)),
            (Some(_), Some(_)) => {
                Err(Error::Config(format!("{name} is the start of several snapshots' digests; give more of it")))
            }
            _ => Ok(None),
        }
    }
}

/// Where QEMU writes a snapshot's memory file: in `/dev/shm` when it is
/// a tmpfs, else at `fallback`. Removed when dropped.
struct MemoryScratch(std::path::PathBuf);

/// Where [`MemoryScratch`] files are made, when it is a tmpfs.
const SCRATCH_DIR: &str = "/dev/shm";
/// Their names: this, the pid of their maker, `-`, a random part.
const SCRATCH_PREFIX: &str = "strata-snapshot-";

/// Removes the memory files that strata processes killed while making a
/// snapshot left in [`SCRATCH_DIR`] (they hold memory until removed).
pub(crate) fn sweep_memory_scratch() {
    let Ok(entries) = std::fs::read_dir(SCRATCH_DIR) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let maker = name.strip_prefix(SCRATCH_PREFIX).and_then(|r| r.split('-').next()).and_then(|p| p.parse().ok());
        if maker.is_some_and(|pid| !strata_store::process_alive(pid)) {
            tracing::info!(file = %e.path().display(), "removed a snapshot's memory file its maker left");
            let _ = std::fs::remove_file(e.path());
        }
    }
}

impl MemoryScratch {
    /// One for a guest of `bytes` of memory: on tmpfs if it has room for
    /// all of it (a full tmpfs would end the receiving QEMU midway; the
    /// copies of a fork hold theirs while they run).
    fn new(fallback: &std::path::Path, bytes: u64) -> MemoryScratch {
        let shm = std::path::Path::new(SCRATCH_DIR);
        let is_tmpfs =
            nix::sys::statfs::statfs(shm).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC);
        let room = nix::sys::statvfs::statvfs(shm).is_ok_and(|v| v.blocks_available() * v.fragment_size() >= bytes);
        if !is_tmpfs || !room {
            return MemoryScratch(fallback.to_path_buf());
        }
        let n = crate::launch::new_session_id();
        MemoryScratch(shm.join(format!("{SCRATCH_PREFIX}{}-{n}", std::process::id())))
    }
}

impl MemoryScratch {
    /// Takes the file from the VM that wrote it: root's, read-only for all
    /// (as a stored blob is), so the VMs started from it can map it.
    fn seal(&self) -> Result<(), Error> {
        use std::os::unix::fs::PermissionsExt;
        let path = &self.0;
        let err =
            |e: std::io::Error| Error::Config(format!("taking the snapshot's memory file {}: {e}", path.display()));
        let (uid, gid) = (nix::unistd::geteuid().as_raw(), nix::unistd::getegid().as_raw());
        std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444)).map_err(err)
    }
}

impl Drop for MemoryScratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The recipe of the snapshot named `name`: the key servers sharing a
/// store find it by.
fn snapshot_recipe(name: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(format!("snapshot\0{name}")))
}

/// Refuses a session whose copies could not run beside it.
fn check_copyable(rec: &SessionRecord) -> Result<(), Error> {
    if let Some(home) = &rec.home {
        return Err(Error::Config(format!(
            "session {} mounts the persistent home of {home}: its copies would claim that home too; \
             start it without a home to fork or snapshot it",
            rec.id
        )));
    }
    if !rec.ports.is_empty() {
        return Err(Error::Config(format!(
            "session {} forwards host ports to its guest: its copies would ask for the same ports; \
             start it without forwarded ports to fork or snapshot it",
            rec.id
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_names_are_checked() {
        for good in ["a", "my-snap.2", "0_x", &"n".repeat(63)] {
            assert!(check_snapshot_name(good).is_ok(), "{good}");
        }
        for bad in ["", "Big", "-x", ".x", "a/b", "../x", "a b", &"n".repeat(64)] {
            assert!(check_snapshot_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn memory_files_of_dead_makers_are_swept_and_live_ones_kept() {
        if !std::path::Path::new(SCRATCH_DIR).is_dir() {
            return;
        }
        let dead = std::path::Path::new(SCRATCH_DIR).join(format!("{SCRATCH_PREFIX}0-test{}", std::process::id()));
        let live = std::path::Path::new(SCRATCH_DIR).join(format!("{SCRATCH_PREFIX}{}-test", std::process::id()));
        std::fs::write(&dead, b"x").unwrap();
        std::fs::write(&live, b"x").unwrap();
        sweep_memory_scratch();
        assert!(!dead.exists(), "a dead maker's file stayed");
        assert!(live.exists(), "a live maker's file went");
        std::fs::remove_file(&live).unwrap();
    }
}
