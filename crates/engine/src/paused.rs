//! Sessions paused to an image. Pausing saves a running session's memory,
//! devices and disk writes as a `paused` image chained on the image it ran
//! from (its launch image, or its previous paused image), stops its VM and
//! keeps a record in `STATE/paused/ID.json`. Resuming restores the session
//! from that image under the same id, on this server or on any other that
//! shares the store. A paused session uses no memory or CPU and outlives the
//! process that paused it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use strata_store::{ImageKind, ImageRecord};
use strata_vmm::Memory;

use crate::context::ContextSettings;
use crate::session::Session;
use crate::sessions::SessionRecord;
use crate::tools::{rebase_to_digest, run};
use crate::{io_err, write_atomic, Engine, Error, ARCH};

/// How long saving a session's state may take (its memory goes to the file).
pub(crate) const SAVE_TIMEOUT: Duration = Duration::from_secs(300);

/// Holds a session id while it is paused or resumed, so two of these never
/// act on one session at once.
pub(crate) struct PauseLock(#[allow(dead_code)] nix::fcntl::Flock<std::fs::File>);

impl Engine {
    fn paused_root(&self) -> PathBuf {
        self.cfg.state_dir.join("paused")
    }

    fn paused_record_path(&self, id: &str) -> PathBuf {
        self.paused_root().join(format!("{id}.json"))
    }

    pub(crate) fn lock_paused(&self, id: &str) -> Result<PauseLock, Error> {
        let root = self.paused_root();
        std::fs::create_dir_all(&root).map_err(io_err(&root))?;
        let path = root.join(format!("{id}.lock"));
        let f = std::fs::File::options().create(true).truncate(false).write(true).open(&path).map_err(io_err(&path))?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map(PauseLock)
            .map_err(|_| Error::Config(format!("session {id} is being paused or resumed right now; try again")))
    }

    /// The record of a paused session, if `id` is one.
    pub fn paused_record(&self, id: &str) -> Option<SessionRecord> {
        serde_json::from_slice(&std::fs::read(self.paused_record_path(id)).ok()?).ok()
    }

    /// Whether a paused session has a display.
    pub fn paused_is_graphical(&self, rec: &SessionRecord) -> bool {
        rec.paused_image.as_deref().is_some_and(|d| self.image_is_graphical(d))
    }

    /// Every paused session, oldest first.
    pub fn paused_sessions(&self) -> Vec<SessionRecord> {
        crate::sessions::records_in(&self.paused_root())
    }

    /// Pauses a running session to an image: its memory, devices and disk
    /// writes are saved as an image chained on the one it runs from, its
    /// record moves to the paused sessions, and its VM stops. Drop the
    /// session afterwards. On failure the session keeps running. `why` is
    /// recorded for `ps`.
    ///
    /// # Errors
    /// If the session has devices plugged in (network, shared folders, home),
    /// is not registered, or the save fails.
    pub async fn pause_to_image(&self, s: &mut Session, why: &str) -> Result<ImageRecord, Error> {
        let Some(dir) = s.record.clone() else {
            return Err(Error::Config(format!(
                "session {} was not launched from a launch image; it cannot be paused",
                s.id
            )));
        };
        let _lock = self.lock_paused(&s.id)?;
        let mut rec = crate::sessions::read_record(&dir)
            .ok_or_else(|| Error::Config(format!("no session record in {}", dir.display())))?;
        // Refused before the agent is quieted: the terminal stays attached.
        check_savable(s, &rec)?;
        // Nobody watches while it is paused: the agent keeps the program's
        // output as its screen, for whoever attaches after the resume.
        s.quiet().await?;
        let t0 = std::time::Instant::now();
        let saved = async {
            let (image, _) = self.capture_state(s, &rec, &BTreeMap::new()).await?;
            rec.paused_image = Some(image.digest.clone());
            rec.qemu_pid = 0;
            rec.owner_pid = 0;
            rec.detached = true;
            rec.why = Some(why.to_string());
            write_atomic(&self.paused_record_path(&s.id), &serde_json::to_vec(&rec).expect("serializes"))?;
            Ok::<_, Error>(image)
        }
        .await;
        match saved {
            Ok(image) => {
                s.vm_mut().quit().await;
                // Other servers can resume it once its image is shared.
                self.share(&image).await;
                tracing::info!(session = %s.id, image = %image.digest, ms = t0.elapsed().as_millis() as u64, "session paused to an image");
                Ok(image)
            }
            Err(e) => {
                if let Err(r) = s.vm_mut().resume().await {
                    tracing::warn!(session = %s.id, error = %r, "could not resume the guest after a failed pause");
                }
                Err(e)
            }
        }
    }

    /// Saves running session `s` (record `rec`) as an image chained on the
    /// one it runs from: its memory, devices and disk writes, with `meta`
    /// added. The guest is left stopped whatever happens: the caller quits
    /// it (a pause) or resumes it (a failure). With the image, how long the
    /// guest was stopped so far.
    ///
    /// # Errors
    /// If the session has shared folders, its image is gone, or the save
    /// fails.
    pub(crate) async fn capture_state(
        &self,
        s: &mut Session,
        rec: &SessionRecord,
        meta: &BTreeMap<String, String>,
    ) -> Result<(ImageRecord, Duration), Error> {
        check_savable(s, rec)?;
        let parent = self.image_of(s, rec)?;
        let work = self.store.work_dir("pause")?;
        let state = work.path().join("state");
        let disk = work.path().join("disk.qcow2");
        let saved = s.vm_mut().save(&state, SAVE_TIMEOUT).await?;
        // The guest is stopped from here until the caller resumes it.
        let stopped = std::time::Instant::now();
        let overlay = s.vm_mut().throwaway_overlay(0).await?;
        run("cp", tokio::process::Command::new("cp").arg("--sparse=always").arg(&overlay).arg(&disk)).await?;
        let copied = stopped.elapsed();
        let image = self.record_saved(&parent, (&s.id, &s.package), (&disk, &state), meta, None).await?;
        Ok((image, saved.downtime + copied))
    }

    /// The image session `s` (record `rec`) runs from.
    ///
    /// # Errors
    /// If the catalog no longer has it.
    pub(crate) fn image_of(&self, s: &Session, rec: &SessionRecord) -> Result<ImageRecord, Error> {
        self.store
            .image(&rec.launch_image)?
            .ok_or_else(|| Error::Config(format!("the image session {} runs from is gone from the catalog", s.id)))
    }

    /// Records a saved session (`session`: its id and package) as an image
    /// chained on `parent`, the image it ran from: its files stored (its
    /// disk writes rebased on `parent`'s disk), the parent's machine facts
    /// and `meta` as its facts, under `recipe` (else one of its own).
    ///
    /// # Errors
    /// If a file cannot be stored or the catalog written.
    pub(crate) async fn record_saved(
        &self,
        parent: &ImageRecord,
        who: (&str, &str),
        (disk, state): (&Path, &Path),
        meta: &BTreeMap<String, String>,
        recipe: Option<String>,
    ) -> Result<ImageRecord, Error> {
        let files = self.store_saved_files(parent, disk, state).await?;
        self.record_image(saved_image(parent, who, files, meta, recipe))
    }

    /// The files of a session saved on `parent` but its memory, stored: its
    /// disk writes (rebased on `parent`'s disk) and devices' state, with
    /// `parent`'s kernel and initramfs; by role.
    ///
    /// # Errors
    /// If a file cannot be stored.
    pub(crate) async fn store_saved_files(
        &self,
        parent: &ImageRecord,
        disk: &Path,
        state: &Path,
    ) -> Result<BTreeMap<String, String>, Error> {
        rebase_to_digest(disk, parent.file("disk")?).await?;
        let mut files = BTreeMap::new();
        for role in ["kernel", "initramfs"] {
            files.insert(role.to_string(), parent.file(role)?.to_string());
        }
        files.insert("disk".to_string(), self.store.ingest_file(disk)?);
        files.insert("state".to_string(), self.store.ingest_file(state)?);
        Ok(files)
    }

    /// Pauses a detached session (no terminal holds it) to an image.
    ///
    /// # Errors
    /// As [`Engine::pause_to_image`], or if a terminal holds the session.
    pub async fn pause_detached(&self, id: &str) -> Result<ImageRecord, Error> {
        let mut s = self.reattach_unheld(id, "detach it first (Ctrl-P Ctrl-Q)").await?;
        let r = self.pause_to_image(&mut s, "paused by `strata pause`").await;
        match r {
            Ok(image) => {
                drop(s);
                Ok(image)
            }
            Err(e) => {
                s.release();
                Err(e)
            }
        }
    }

    /// Resumes a paused session from its image, under the same id, with the
    /// context it was launched with (its devices are in the saved state),
    /// sized to `terminal` if given, and attaches it. Its record becomes a
    /// running session's again.
    ///
    /// # Errors
    /// If `id` is not a paused session, its image is gone or damaged, or
    /// the VM cannot be restored.
    pub async fn resume_session(&self, id: &str, terminal: Option<&ContextSettings>) -> Result<crate::Session, Error> {
        crate::sessions::check_id(id)?;
        let _lock = self.lock_paused(id)?;
        let rec = self.paused_record(id).ok_or_else(|| {
            Error::Config(format!("session {id} is not paused; `strata ps` lists sessions and their state"))
        })?;
        let digest = rec.paused_image.clone().unwrap_or_default();
        // Paused on another server: its image is in the shared store.
        let image = self.image_here_or_shared(&digest).await?;
        let image = image.ok_or_else(|| {
            Error::Config(format!("the image of paused session {id} ({digest}) is gone; the session cannot be resumed"))
        })?;
        self.verify_chain(&image)?;
        // The devices are those it was paused with (they are in its saved
        // state); the terminal attaching now brings only its type and size.
        let mut resumed = rec.settings.clone().unwrap_or_else(|| ContextSettings::from_terminal(None));
        if let Some(t) = terminal {
            (resumed.term, resumed.rows, resumed.cols) = (t.term.clone(), t.rows, t.cols);
        }
        let plugs_in_state = resumed.needs_devices();
        let how = crate::launch::Restore { plugs_in_state, niceness: 0, ahead_of_demand: false, ..Default::default() };
        let s = self.restore(id, &rec.package, &image, Memory::Anonymous, &resumed, how).await?;
        // Carry the labels over, then the session is running, not paused.
        let dir = self.session_dir(id);
        if let Some(mut running) = crate::sessions::read_record(&dir) {
            running.labels = rec.labels.clone();
            running.created = rec.created;
            self.write_session_record(&running)?;
        }
        let path = self.paused_record_path(id);
        std::fs::remove_file(&path).map_err(io_err(&path))?;
        tracing::info!(session = %id, image = %digest, "session resumed from its image");
        Ok(s)
    }

    /// Takes in a session paused on another server (its record, as that
    /// server kept it), so that [`Engine::resume_session`] resumes it here
    /// from the shared store.
    ///
    /// # Errors
    /// If the record is not a paused session's, the id is in use here, or
    /// it mounts a persistent home (homes stay on the server that has them).
    pub fn import_paused(&self, rec: &SessionRecord) -> Result<(), Error> {
        crate::sessions::check_id(&rec.id)?;
        if rec.paused_image.is_none() {
            return Err(Error::Config(format!("session {} is not paused; only paused sessions move", rec.id)));
        }
        if let Some(home) = &rec.home {
            return Err(Error::Config(format!(
                "session {} mounts the persistent home of {home}, which stays on the server that holds it; resume it there",
                rec.id
            )));
        }
        let _lock = self.lock_paused(&rec.id)?;
        let path = self.paused_record_path(&rec.id);
        if path.exists() || crate::sessions::read_record(&self.session_dir(&rec.id)).is_some() {
            return Err(Error::Config(format!("session {} already exists on this server", rec.id)));
        }
        let data = serde_json::to_vec_pretty(rec).map_err(|e| Error::Config(e.to_string()))?;
        write_atomic(&path, &data)?;
        tracing::info!(session = %rec.id, "took in a session paused on another server");
        Ok(())
    }

    /// Checks every blob of an image and of the images it needs.
    pub(crate) fn verify_chain(&self, image: &ImageRecord) -> Result<(), Error> {
        let (images, missing) = self.store.image_closure([image.digest.clone()])?;
        if let Some(gone) = missing.first() {
            return Err(Error::Config(format!(
                "image {} needs image {gone}, which is gone from the catalog",
                image.digest
            )));
        }
        for img in &images {
            self.store.verify_image(img)?;
        }
        Ok(())
    }

    /// Forgets a paused session and the images it was paused to.
    pub(crate) fn forget_paused(&self, id: &str) -> Result<bool, Error> {
        let path = self.paused_record_path(id);
        if !path.exists() {
            return Ok(false);
        }
        let _lock = self.lock_paused(id)?;
        std::fs::remove_file(&path).map_err(io_err(&path))?;
        self.drop_paused_images()?;
        Ok(true)
    }

    /// Removes the paused sessions among `records` kept past the store's
    /// retention, and the images no session of `records` needs; the ids
    /// removed.
    pub(crate) fn expire_paused(&self, records: &[SessionRecord]) -> Vec<String> {
        // A fork's snapshot goes once no session stands on it.
        if let Err(e) = self.drop_paused_images_of(records) {
            tracing::warn!(error = %e, "could not drop the images no session needs");
        }
        let Some(keep) = self.cfg.paused_retention else { return Vec::new() };
        let mut gone = Vec::new();
        for rec in records.iter().filter(|r| r.paused_image.is_some()) {
            let age = std::fs::metadata(self.paused_record_path(&rec.id))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok());
            if age.is_some_and(|a| a > keep) {
                match self.forget_paused(&rec.id) {
                    Ok(true) => {
                        tracing::info!(session = %rec.id, retention_s = keep.as_secs(), "removed a paused session kept past its retention");
                        gone.push(rec.id.clone());
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(session = %rec.id, error = %e, "could not remove an expired paused session")
                    }
                }
            }
        }
        gone
    }

    /// Removes the catalog records of paused images no session needs any
    /// more: their session is neither paused nor running. Their blobs go at
    /// the next garbage collection.
    pub(crate) fn drop_paused_images(&self) -> Result<(), Error> {
        self.drop_paused_images_of(&self.list_sessions())
    }

    /// [`Self::drop_paused_images`], for the sessions `records` (read by the caller).
    fn drop_paused_images_of(&self, records: &[SessionRecord]) -> Result<(), Error> {
        // Every session's images, paused ones included, with all they need.
        let used = records.iter().flat_map(|s| [Some(s.launch_image.clone()), s.paused_image.clone()]).flatten();
        let needed: std::collections::HashSet<String> =
            self.store.image_closure(used)?.0.into_iter().map(|i| i.digest).collect();
        let images = self.store.list_images()?;
        // A pause records its image a moment before the session's record.
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        let settled = |i: &ImageRecord| now - i.created > 60;
        // A named snapshot stays until it is removed.
        let named = |i: &ImageRecord| crate::fork::snapshot_name(i).is_some_and(|n| !n.is_empty());
        let unneeded = |i: &&ImageRecord| i.kind == ImageKind::Paused && !needed.contains(&i.digest) && !named(i);
        for img in images.iter().filter(unneeded).filter(|i| settled(i)) {
            tracing::info!(image = %img.digest, "dropping the image of a session that ended");
            self.store.remove_image(&img.digest)?;
        }
        Ok(())
    }
}

/// Refuses a session QEMU cannot save. Its network and home stay in the
/// saved state and come back on the resume; a mounted 9p share cannot be
/// saved (QEMU refuses).
pub(crate) fn check_savable(s: &Session, rec: &SessionRecord) -> Result<(), Error> {
    let shares = rec.settings.as_ref().map_or(0, |c| c.shares.len());
    if shares > 0 || (s.has_devices && rec.settings.is_none()) {
        return Err(Error::Config(format!(
            "session {} has shared folders: a session with shared folders cannot be saved to an image \
             (QEMU cannot save a mounted 9p share); it keeps running",
            s.id
        )));
    }
    Ok(())
}

/// A paused image's recipe: unique to one pause of one session.
fn paused_recipe(id: &str, parent: &str) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    hex::encode(Sha256::digest(format!("paused\0{id}\0{parent}\0{now}")))
}

/// The image of a session (`session`: its id and package) saved on
/// `parent` as `files`: `parent`'s machine facts and `meta` as its facts,
/// under `recipe` (else one of its own).
pub(crate) fn saved_image(
    parent: &ImageRecord,
    (session, package): (&str, &str),
    files: BTreeMap<String, String>,
    meta: &BTreeMap<String, String>,
    recipe: Option<String>,
) -> ImageRecord {
    let mut all_meta: BTreeMap<String, String> = parent
        .meta
        .iter()
        .filter(|(k, _)| ["accel", "memory_mib", "disk_mib", "cmdline", "base", "graphical"].contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    all_meta.insert("session".into(), session.to_string());
    all_meta.extend(meta.iter().map(|(k, v)| (k.clone(), v.clone())));
    ImageRecord::new(
        ImageKind::Paused,
        Some(package.to_string()),
        &parent.os,
        ARCH,
        Some(parent.digest.clone()),
        &recipe.unwrap_or_else(|| paused_recipe(session, &parent.digest)),
        files,
        all_meta,
        0,
    )
}
