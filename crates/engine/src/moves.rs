//! Live moves: a running session goes to another server by QEMU's live
//! migration. The receiving server starts a QEMU with the session's machine
//! and devices that waits, stopped, for the guest on a socket in its
//! directory ([`Engine::receive_session`]); the sending server's QEMU sends
//! the guest's memory while it runs, then stops it and sends the rest
//! ([`Engine::send_session`]); the guest's disk writes (its throwaway
//! overlay, small: only what it wrote since the launch) follow, are put in
//! place of the receiving QEMU's empty overlay, rebased on that server's
//! copy of the same image, and the guest runs on there under the same id
//! ([`Engine::finish_receive`]). Until then it can run on where it was.
//! How the bytes travel between servers is the caller's (the API relays
//! them over HTTP).

use std::path::{Path, PathBuf};
use std::time::Duration;

use strata_store::{ImageRecord, WorkDir};
use strata_vmm::{AgentConn, Memory, Vm};

use crate::context::ContextSettings;
use crate::session::{Attached, Session};
use crate::sessions::{SessionRecord, STRATA_VERSION};
use crate::{io_err, Engine, Error};

/// How long the memory may take to go (under TCG, on a busy host).
const SEND_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a receiving QEMU waits for its guest to arrive.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(300);

/// A session being received: its QEMU waits for the guest.
pub struct Incoming {
    record: SessionRecord,
    vm: Vm,
    conn: AgentConn,
    dir: WorkDir,
    disk_backing: PathBuf,
}

impl Incoming {
    /// The socket the guest's state is to be written to.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join(strata_vmm::qemu::INCOMING_SOCK)
    }

    /// The session's id.
    pub fn id(&self) -> &str {
        &self.record.id
    }

    /// The session's record, as the sending server kept it.
    pub fn record(&self) -> &SessionRecord {
        &self.record
    }

    /// Waits until the guest's memory and devices have arrived (it is then
    /// stopped, waiting for its disk).
    ///
    /// # Errors
    /// If QEMU fails to load what came (it ends), or nothing came in time.
    pub async fn wait_arrived(&mut self) -> Result<(), Error> {
        self.vm.wait_loaded(RECEIVE_TIMEOUT).await.map_err(|e| Error::Move(format!("receiving the guest: {e}")))
    }

    /// Ends the receiving QEMU (the move failed or was called off).
    pub async fn abandon(mut self) {
        self.vm.kill().await;
    }
}

impl Engine {
    /// Refuses a session that cannot move: one that mounts a persistent
    /// home (homes stay on their server) or has shared folders (a host's
    /// folder is not on another host).
    ///
    /// # Errors
    /// Naming what keeps it here.
    pub fn check_movable(&self, rec: &SessionRecord) -> Result<(), Error> {
        if let Some(home) = &rec.home {
            return Err(Error::Config(format!(
                "session {} mounts the persistent home of {home}, which stays on the server that holds it; it cannot move",
                rec.id
            )));
        }
        if rec.settings.as_ref().is_some_and(|c| !c.shares.is_empty()) {
            return Err(Error::Config(format!(
                "session {} has shared folders of this host; it cannot move to another",
                rec.id
            )));
        }
        if rec.paused_image.is_some() {
            return Err(Error::Config(format!(
                "session {} is paused; a paused session moves by resuming it elsewhere",
                rec.id
            )));
        }
        Ok(())
    }

    /// Puts the image running session `rec` stands on into the store shared
    /// between servers, if it is not there yet (a fork's snapshot is only
    /// on the server that made it), so that a move's receiver can fetch it.
    ///
    /// # Errors
    /// If the image is gone here or the shared store fails.
    pub async fn share_for_move(&self, rec: &SessionRecord) -> Result<(), Error> {
        let Some(remote) = &self.remote else { return Ok(()) };
        // The images it stands on that the shared store lacks (a fork of a
        // fork's copy stands on two), published parents first.
        let mut missing = Vec::new();
        let mut next = Some(rec.launch_image.clone());
        while let Some(digest) = next {
            if remote.image(&digest).await?.is_some() {
                break;
            }
            let image = self
                .store
                .image(&digest)?
                .ok_or_else(|| Error::Config(format!("image {digest}, which session {} stands on, is gone", rec.id)))?;
            next = image.parent.clone();
            missing.push(image);
        }
        for image in missing.iter().rev() {
            remote.publish(image).await?;
        }
        Ok(())
    }

    /// The record of running session `id` as this server keeps it.
    ///
    /// # Errors
    /// If there is none.
    pub fn movable_record(&self, id: &str) -> Result<SessionRecord, Error> {
        crate::sessions::check_id(id)?;
        let rec =
            self.running_record(id).ok_or_else(|| Error::Config(format!("no running session {id} on this server")))?;
        self.check_movable(&rec)?;
        Ok(rec)
    }

    /// Starts a QEMU for session `rec` (as the sending server keeps it),
    /// with its machine and devices, waiting for the guest. Nothing runs
    /// until [`Engine::finish_receive`].
    ///
    /// # Errors
    /// If the session cannot move, its id is in use here, its image is in
    /// neither store, or the VM cannot start.
    pub async fn receive_session(&self, rec: &SessionRecord) -> Result<Incoming, Error> {
        crate::sessions::check_id(&rec.id)?;
        self.check_movable(rec)?;
        if crate::sessions::read_record(&self.session_dir(&rec.id)).is_some() || self.paused_record(&rec.id).is_some() {
            return Err(Error::Config(format!("session {} already exists on this server", rec.id)));
        }
        let image = self.image_here_or_shared(&rec.launch_image).await?.ok_or_else(|| {
            Error::Config(format!("the image session {} runs from ({}) is in no store", rec.id, rec.launch_image))
        })?;
        self.verify_chain(&image)?;
        let settings = rec.settings.clone().unwrap_or_else(|| ContextSettings::from_terminal(None));
        settings.validate()?;
        crate::launch::check_ports_free(&settings)?;
        self.admit()?;
        let plugs = crate::launch::plugs_of(&settings, None)?;
        let dir = self.new_session_dir(&rec.id)?;
        // Its devices were plugged in where it ran: they are in the state.
        let mut cfg = self.restore_config(dir.path(), &image, Memory::Anonymous, plugs, settings.needs_devices())?;
        cfg.incoming = None;
        cfg.incoming_stream = Some(strata_vmm::qemu::Stream::Single);
        let (vm, conn) = Vm::start(&cfg, RECEIVE_TIMEOUT).await?;
        let disk_backing = self.store.blob_path(image.file("disk")?);
        tracing::info!(session = %rec.id, "waiting for a session moving here");
        Ok(Incoming { record: rec.clone(), vm, conn, dir, disk_backing })
    }

    /// Puts the guest's disk writes (`overlay`, the sending QEMU's overlay
    /// file as it left it) in place, starts the guest and records the
    /// session as this server's: the session, held by this process.
    ///
    /// # Errors
    /// If the overlay cannot be put in place or the guest does not start;
    /// the receiving QEMU is ended then.
    pub async fn finish_receive(&self, mut inc: Incoming, overlay: &Path) -> Result<Session, Error> {
        if let Err(e) = self.place_received(&mut inc, overlay).await {
            inc.abandon().await;
            return Err(e);
        }
        self.start_received(inc).await
    }

    /// Waits for the guest to arrive and puts its disk writes (`overlay`,
    /// the sending QEMU's overlay file as it left it) in place; the guest
    /// stays stopped.
    ///
    /// # Errors
    /// If the guest did not arrive or the overlay cannot be put in place
    /// (the caller abandons `inc` then).
    pub async fn place_received(&self, inc: &mut Incoming, overlay: &Path) -> Result<(), Error> {
        inc.wait_arrived().await?;
        // QEMU holds the overlay open, not yet in use: the file is
        // rewritten in place, and QEMU reads it afresh when the guest
        // starts. Its backing file is this server's copy of the image.
        let own = strata_vmm::qemu::throwaway_overlay_path(inc.dir.path(), 0);
        copy_in_place(overlay, &own)?;
        rebase_to_path(&own, &inc.disk_backing).await
    }

    /// Starts a guest put in place by [`Engine::place_received`] and records
    /// the session as this server's: the session, held by this process.
    ///
    /// # Errors
    /// If the guest does not start; the receiving QEMU is ended then.
    pub async fn start_received(&self, mut inc: Incoming) -> Result<Session, Error> {
        if let Err(e) = inc.vm.resume().await {
            inc.abandon().await;
            return Err(Error::Move(format!("starting the guest: {e}")));
        }
        let Incoming { record: mut rec, vm, conn, dir, .. } = inc;
        let id = rec.id.clone();
        rec.qemu_pid = vm.pid();
        rec.owner_pid = std::process::id();
        rec.detached = false;
        rec.strata_version = STRATA_VERSION.to_string();
        rec.why = None;
        let dir_path = dir.path().to_path_buf();
        let a = Attached { vm, conn, dir, screen: Vec::new(), exited: None };
        let mut s = self.session_of(&rec, dir_path, a);
        self.write_session_record(&rec)?;
        // Held, not attached: the agent keeps the program's output.
        if let Err(e) = s.quiet().await {
            tracing::warn!(session = %id, error = %e, "the moved session's agent did not answer at once");
        }
        tracing::info!(session = %id, "a session moved here runs");
        Ok(s)
    }

    /// The socket a session's outgoing migration goes to: strata listens on
    /// it (made before [`Engine::send_session`]), connectable by the VM's
    /// uid alone.
    ///
    /// # Errors
    /// If it cannot be made.
    pub fn outgoing_socket(&self, s: &Session) -> Result<(tokio::net::UnixListener, PathBuf), Error> {
        let path = s.vm_dir().join(strata_vmm::qemu::OUTGOING_SOCK);
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).map_err(io_err(&path))?;
        {
            use std::os::unix::fs::{MetadataExt, PermissionsExt};
            // Only the VM's QEMU (its own uid, the owner of its console log)
            // may connect: whoever did would read the guest's memory.
            let log = s.vm_dir().join(strata_vmm::qemu::CONSOLE_LOG);
            let owner = std::fs::metadata(&log).map_err(io_err(&log))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io_err(&path))?;
            std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid())).map_err(io_err(&path))?;
        }
        Ok((listener, path))
    }

    /// Sends running session `s` to `socket` (see [`Engine::outgoing_socket`])
    /// by live migration: once this returns the guest is stopped here and
    /// its overlay (the returned path) holds all its disk writes. On an
    /// error the guest runs on here.
    ///
    /// # Errors
    /// If the session cannot move or the migration fails.
    pub async fn send_session(&self, s: &mut Session, socket: &Path) -> Result<(PathBuf, Duration), Error> {
        self.movable_record(&s.id)?;
        let saved = s.vm_mut().send_live(socket, strata_vmm::qemu::Stream::Single, SEND_TIMEOUT).await;
        let saved = match saved {
            Ok(saved) => saved,
            Err(e) => {
                // A failed migration leaves the guest running (QEMU resumes
                // it if it had stopped it); make sure.
                let _ = s.vm_mut().ensure_running().await;
                return Err(Error::Move(format!("sending the guest: {e}")));
            }
        };
        let overlay = s.vm_mut().throwaway_overlay(0).await?;
        Ok((overlay, saved.downtime))
    }

    /// The guest of `s` runs on here after a move that failed once its
    /// memory had gone.
    ///
    /// # Errors
    /// If QEMU does not start it again.
    pub async fn resume_after_failed_move(&self, s: &mut Session) -> Result<(), Error> {
        s.vm_mut().ensure_running().await.map(|_| ()).map_err(Error::from)
    }

    /// An image by digest from this server's catalog, else fetched from the
    /// shared store; `None` if neither has it.
    pub(crate) async fn image_here_or_shared(&self, digest: &str) -> Result<Option<ImageRecord>, Error> {
        Ok(match (self.store.image(digest)?, &self.remote) {
            (Some(local), _) => Some(local),
            (None, Some(remote)) => match remote.image(digest).await? {
                Some(shared) => Some(self.fetch_shared(shared).await?),
                None => None,
            },
            (None, None) => None,
        })
    }
}

/// The size of the reads that pass a migration on within this host.
const RELAY_BUFFER: usize = 1 << 20;

/// Passes a guest's live migration on within this host: from the sending
/// QEMU, each of its `stream`'s connections to `listener` (see
/// [`Engine::outgoing_socket`]), to the receiving QEMU's socket `target`.
/// Ends when every one has.
pub(crate) fn relay_within_host(
    listener: tokio::net::UnixListener,
    target: PathBuf,
    stream: strata_vmm::qemu::Stream,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    tokio::spawn(async move {
        let mut passing = tokio::task::JoinSet::new();
        for _ in 0..stream.connections() {
            let (from, _) = listener.accept().await?;
            // Connected in the order accepted: QEMU takes its main
            // connection first, as it made it first.
            let mut to = tokio::net::UnixStream::connect(&target).await?;
            passing.spawn(async move {
                // In large reads: hundreds of MiB pass (with 8 KiB ones,
                // the relay's calls cost more than QEMU's work).
                tokio::io::copy_buf(&mut tokio::io::BufReader::with_capacity(RELAY_BUFFER, from), &mut to).await?;
                tokio::io::AsyncWriteExt::shutdown(&mut to).await
            });
        }
        while let Some(done) = passing.join_next().await {
            done.map_err(std::io::Error::other)??;
        }
        Ok(())
    })
}

/// Rewrites `to` with the bytes of `from`, in place (the same file: a
/// process holding it open reads the new bytes).
fn copy_in_place(from: &Path, to: &Path) -> Result<(), Error> {
    let mut src = std::fs::File::open(from).map_err(io_err(from))?;
    let mut dst = std::fs::OpenOptions::new().write(true).open(to).map_err(io_err(to))?;
    dst.set_len(0).map_err(io_err(to))?;
    std::io::copy(&mut src, &mut dst).map_err(io_err(to))?;
    dst.sync_all().map_err(io_err(to))
}

/// Names `backing` as the backing file of qcow2 `overlay`, its data unchanged.
async fn rebase_to_path(overlay: &Path, backing: &Path) -> Result<(), Error> {
    let mut c = tokio::process::Command::new("qemu-img");
    c.args(["rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b"]).arg(backing).arg(overlay);
    crate::tools::run("qemu-img rebase", &mut c).await.map(|_| ())
}
