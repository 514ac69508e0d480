//! The image store: content-addressed blobs plus a catalog of images.
//!
//! A blob is an immutable file named by the sha256 of its content
//! (`blobs/sha256/HEX`). An image is a small manifest naming its blobs by role
//! (a base image has `rootfs`, `kernel`, `initramfs`; a launch image has
//! `disk`, `memory`, `state`), recorded in the catalog (`catalog.db`, SQLite)
//! with its kind, package, OS, architecture, parent and the *recipe* digest of
//! the inputs it was built from. Life of a build:
//!
//! 1. `work_dir()` gives a private scratch directory under `tmp/`;
//! 2. results are moved in with `ingest_file()`: hashed, made read-only,
//!    renamed into place (atomic; an existing identical blob wins);
//! 3. `insert_image()` records the manifest in one transaction.
//!
//! A crash at any point leaves the catalog as it was; scratch directories of
//! dead processes are removed by the next `open()`, and blobs no image
//! references are left for garbage collection.

mod catalog;

pub use catalog::{ImageKind, ImageRecord};

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use rusqlite::Connection;
use sha2::{Digest, Sha256};

/// Errors of the store and the catalog.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("store I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("catalog database")]
    Db(#[from] rusqlite::Error),
    #[error("blob {digest} is corrupt: its content hashes to {actual}")]
    Corrupt { digest: String, actual: String },
    #[error("blob {0} is missing from the store")]
    Missing(String),
    #[error("{0:?} is not a sha256 digest")]
    BadDigest(String),
    #[error("catalog record for {digest} is damaged: {message}")]
    BadRecord { digest: String, message: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// A sha256 digest as 64 lower-case hex characters.
pub fn check_digest(d: &str) -> Result<(), Error> {
    if d.len() == 64 && d.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(())
    } else {
        Err(Error::BadDigest(d.to_string()))
    }
}

/// Whether a process with this id exists.
pub fn process_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    pid > 0 && unsafe { libc::kill(pid as i32, 0) } == 0
}

/// The sha256 of a byte string, as hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The blob store and catalog rooted at one directory.
pub struct Store {
    root: PathBuf,
    db: Mutex<Connection>,
}

/// A scratch directory removed when dropped (and by the next `open()` if the
/// process dies first).
pub struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    /// Takes charge of an existing directory: removed when dropped.
    pub fn adopt(path: PathBuf) -> WorkDir {
        WorkDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps the directory after this handle is gone.
    pub fn keep(self) -> PathBuf {
        let path = self.path.clone();
        std::mem::forget(self);
        path
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        // For debugging a failed build: keep the scratch files.
        if std::env::var_os("STRATA_KEEP_WORK").is_some() {
            tracing::warn!(dir = %self.path.display(), "keeping scratch directory");
            return;
        }
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// An exclusive lock on a build recipe, so that identical inputs are built
/// once even by concurrent processes. Released when dropped.
pub struct RecipeLock {
    _lock: nix::fcntl::Flock<File>,
}

static WORK_SEQ: AtomicU32 = AtomicU32::new(0);

impl Store {
    /// Opens (creating if needed) the store at `root`.
    ///
    /// # Errors
    /// If the directories cannot be created or the catalog cannot be opened.
    pub fn open(root: &Path) -> Result<Store, Error> {
        for sub in ["blobs/sha256", "tmp", "locks"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        let db = catalog::open(&root.join("catalog.db"))?;
        // Strata's alone: VMs run as other users and have no business there.
        let _ = fs::set_permissions(root.join("catalog.db"), fs::Permissions::from_mode(0o600));
        let store = Store { root: root.to_path_buf(), db: Mutex::new(db) };
        store.remove_stale_work_dirs();
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob with this digest lives (whether or not it exists).
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        self.root.join("blobs/sha256").join(digest)
    }

    /// A fresh scratch directory on the store's file system, so that results
    /// can be renamed into the store without copying.
    ///
    /// # Errors
    /// If the directory cannot be created.
    pub fn work_dir(&self, label: &str) -> Result<WorkDir, Error> {
        let n = WORK_SEQ.fetch_add(1, Ordering::Relaxed);
        let path = self.root.join("tmp").join(format!("{}.{n}.{label}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).map_err(io_err(&path))?;
        Ok(WorkDir { path })
    }

    fn remove_stale_work_dirs(&self) {
        let Ok(entries) = fs::read_dir(self.root.join("tmp")) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let pid: i32 = name.split('.').next().and_then(|p| p.parse().ok()).unwrap_or(0);
            if !process_alive(pid.max(0) as u32) {
                tracing::info!(dir = %e.path().display(), "removing scratch directory of a dead process");
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }

    /// Takes the build lock of a recipe, waiting for another builder.
    ///
    /// # Errors
    /// If the lock file cannot be opened or locked.
    pub fn lock_recipe(&self, recipe: &str) -> Result<RecipeLock, Error> {
        check_digest(recipe)?;
        let path = self.root.join("locks").join(recipe);
        let f = File::options().create(true).truncate(false).write(true).open(&path).map_err(io_err(&path))?;
        let lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| Error::Io { path, source: e.into() })?;
        Ok(RecipeLock { _lock: lock })
    }

    /// Takes the lock of one blob, waiting for its holder: one process (or
    /// task) fetches a blob while the others wait for it.
    ///
    /// # Errors
    /// If the lock file cannot be opened or locked.
    pub fn lock_blob(&self, digest: &str) -> Result<RecipeLock, Error> {
        check_digest(digest)?;
        let path = self.root.join("locks").join(format!("blob-{digest}"));
        let f = File::options().create(true).truncate(false).write(true).open(&path).map_err(io_err(&path))?;
        let lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| Error::Io { path, source: e.into() })?;
        Ok(RecipeLock { _lock: lock })
    }

    /// Moves a file that should hold blob `digest` into the store. If its
    /// content hashes to something else, the file is removed and nothing
    /// enters the store.
    ///
    /// # Errors
    /// [`Error::Corrupt`] on a mismatch; I/O errors.
    pub fn ingest_expected(&self, path: &Path, digest: &str) -> Result<(), Error> {
        check_digest(digest)?;
        let actual = hash_file(path)?;
        if actual != digest {
            let _ = fs::remove_file(path);
            return Err(Error::Corrupt { digest: digest.into(), actual });
        }
        self.place(path, digest)
    }

    /// Moves a file into the store as blob `digest`, which the caller
    /// computed over exactly the bytes it wrote to the file (a download
    /// hashed as it streamed): the file is not read again.
    ///
    /// # Errors
    /// If syncing or renaming fails (the file is then left where it was).
    pub fn ingest_hashed(&self, path: &Path, digest: &str) -> Result<(), Error> {
        check_digest(digest)?;
        self.place(path, digest)
    }

    /// When each blob was last used (unix seconds), for evicting the least
    /// recently used first. A blob never used has no entry.
    ///
    /// # Errors
    /// On database errors.
    pub fn blob_last_used(&self) -> Result<std::collections::HashMap<String, i64>, Error> {
        catalog::last_uses(&self.lock_db(), catalog::UseOf::Blob)
    }

    /// Moves a file into the store under its digest and returns the digest.
    ///
    /// # Errors
    /// If hashing, syncing or renaming fails (the file is then left where it was).
    pub fn ingest_file(&self, path: &Path) -> Result<String, Error> {
        self.ingest(path, None)
    }

    /// Moves a file into the store as [`Store::ingest_file`] does, its
    /// digest `digest` (its caller hashed it while it was made).
    ///
    /// # Errors
    /// On I/O failure.
    pub fn ingest_file_hashed(&self, path: &Path, digest: &str) -> Result<String, Error> {
        check_digest(digest)?;
        self.ingest(path, Some(digest))
    }

    fn ingest(&self, path: &Path, digest: Option<&str>) -> Result<String, Error> {
        // A file a VM wrote (a saved state) is taken from its uid before it
        // is hashed: from then on only strata can change it, and a blob is
        // never writable by a VM.
        // SAFETY: geteuid and getegid cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(io_err(path))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o444)).map_err(io_err(path))?;
        let digest = match digest {
            Some(d) => d.to_string(),
            None => hash_file(path)?,
        };
        self.place(path, &digest)?;
        Ok(digest)
    }

    /// Moves a file whose content hashes to `digest` into the store (or
    /// drops it if the store holds that blob, intact, already).
    fn place(&self, path: &Path, digest: &str) -> Result<(), Error> {
        let dest = self.blob_path(digest);
        if dest.exists() && self.verify(digest).is_ok() {
            fs::remove_file(path).map_err(io_err(path))?;
            return Ok(());
        }
        File::open(path).and_then(|f| f.sync_all()).map_err(io_err(path))?;
        fs::set_permissions(path, fs::Permissions::from_mode(0o444)).map_err(io_err(path))?;
        fs::rename(path, &dest).map_err(io_err(&dest))?;
        if let Ok(dir) = File::open(dest.parent().expect("blob dir")) {
            let _ = dir.sync_all();
        }
        self.record_check(digest)
    }

    /// Writes bytes as a blob and returns the digest.
    ///
    /// # Errors
    /// On I/O failure.
    pub fn ingest_bytes(&self, bytes: &[u8]) -> Result<String, Error> {
        let digest = sha256_hex(bytes);
        if self.blob_path(&digest).exists() && self.verify(&digest).is_ok() {
            return Ok(digest);
        }
        let work = self.work_dir("bytes")?;
        let tmp = work.path().join("blob");
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(bytes).map_err(io_err(&tmp))?;
        drop(f);
        self.ingest_file(&tmp)
    }

    /// Checks a blob before use. Cheap when its size, inode and modification
    /// time still match those recorded when it was last hashed; otherwise the
    /// blob is hashed again.
    ///
    /// # Errors
    /// [`Error::Missing`] or [`Error::Corrupt`].
    pub fn verify(&self, digest: &str) -> Result<(), Error> {
        check_digest(digest)?;
        let path = self.blob_path(digest);
        let meta = match fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Error::Missing(digest.into())),
            Err(e) => return Err(Error::Io { path, source: e }),
        };
        let db = self.lock_db();
        catalog::note_use(&db, catalog::UseOf::Blob, digest)?;
        if catalog::check_matches(&db, digest, &stamp(&meta))? {
            return Ok(());
        }
        drop(db);
        self.verify_full(digest)
    }

    /// Hashes a blob in full and compares it with its name.
    ///
    /// # Errors
    /// [`Error::Missing`] or [`Error::Corrupt`].
    pub fn verify_full(&self, digest: &str) -> Result<(), Error> {
        let path = self.blob_path(digest);
        if !path.exists() {
            return Err(Error::Missing(digest.into()));
        }
        let actual = hash_file(&path)?;
        if actual != digest {
            return Err(Error::Corrupt { digest: digest.into(), actual });
        }
        self.record_check(digest)
    }

    /// Removes a blob (a corrupt one, or garbage).
    pub fn remove_blob(&self, digest: &str) {
        let _ = fs::remove_file(self.blob_path(digest));
        let _ = catalog::forget_check(&self.lock_db(), digest);
    }

    fn record_check(&self, digest: &str) -> Result<(), Error> {
        let path = self.blob_path(digest);
        let meta = fs::metadata(&path).map_err(io_err(&path))?;
        catalog::record_check(&self.lock_db(), digest, &stamp(&meta))
    }

    fn lock_db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records an image; its blobs must already be in the store.
    ///
    /// # Errors
    /// If the database refuses the record.
    pub fn insert_image(&self, rec: &ImageRecord) -> Result<(), Error> {
        catalog::insert(&mut self.lock_db(), rec)
    }

    /// The newest image of this kind built from this recipe.
    ///
    /// # Errors
    /// On database errors.
    pub fn find_by_recipe(&self, kind: ImageKind, recipe: &str) -> Result<Option<ImageRecord>, Error> {
        catalog::find_by_recipe(&self.lock_db(), kind, recipe)
    }

    /// The image with this digest, if the catalog has it.
    ///
    /// # Errors
    /// On database errors.
    pub fn image(&self, digest: &str) -> Result<Option<ImageRecord>, Error> {
        Ok(self.list_images()?.into_iter().find(|r| r.digest == digest))
    }

    /// The images reachable from `roots` through what each needs
    /// ([`ImageRecord::needs`]), each once, and the digests among them the
    /// catalog does not have.
    ///
    /// # Errors
    /// On database errors.
    pub fn image_closure(
        &self,
        roots: impl IntoIterator<Item = String>,
    ) -> Result<(Vec<ImageRecord>, Vec<String>), Error> {
        let images = self.list_images()?;
        let (found, missing) = closure(&images, roots);
        Ok((found.into_iter().cloned().collect(), missing))
    }

    /// Every image, newest first.
    ///
    /// # Errors
    /// On database errors.
    pub fn list_images(&self) -> Result<Vec<ImageRecord>, Error> {
        catalog::list(&self.lock_db())
    }

    /// Removes an image record (its blobs stay until garbage collection).
    ///
    /// # Errors
    /// On database errors.
    pub fn remove_image(&self, digest: &str) -> Result<(), Error> {
        catalog::remove(&self.lock_db(), digest)
    }

    /// Checks every blob of an image before it is used, and notes the use;
    /// on the first bad blob, removes that blob and every image that uses
    /// it, and returns the error.
    ///
    /// # Errors
    /// The first missing or corrupt blob.
    pub fn verify_image(&self, rec: &ImageRecord) -> Result<(), Error> {
        for digest in rec.files.values() {
            if let Err(e) = self.verify(digest) {
                tracing::warn!(image = %rec.digest, blob = %digest, error = %e, "dropping image with a bad blob");
                self.remove_blob(digest);
                for other in self.list_images()? {
                    if other.files.values().any(|d| d == digest) {
                        self.remove_image(&other.digest)?;
                    }
                }
                return Err(e);
            }
        }
        catalog::note_use(&self.lock_db(), catalog::UseOf::Image, &rec.digest)
    }

    /// When each image was last used (unix seconds): checked for use by
    /// [`Store::verify_image`]. An image never used since it was recorded
    /// has no entry.
    ///
    /// # Errors
    /// On database errors.
    pub fn image_last_used(&self) -> Result<std::collections::HashMap<String, i64>, Error> {
        catalog::last_uses(&self.lock_db(), catalog::UseOf::Image)
    }
}

impl Store {
    /// Removes blobs that no image references and that are older than
    /// `min_age` (younger ones may belong to a build about to record its
    /// image). Returns how many were removed and their bytes.
    ///
    /// # Errors
    /// If the catalog cannot be read.
    pub fn gc(&self, min_age: std::time::Duration) -> Result<(u64, u64), Error> {
        let referenced: std::collections::HashSet<String> =
            self.list_images()?.into_iter().flat_map(|r| r.files.into_values()).collect();
        let dir = self.root.join("blobs/sha256");
        let (mut n, mut bytes) = (0, 0);
        for e in fs::read_dir(&dir).map_err(io_err(&dir))?.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if check_digest(&name).is_err() || referenced.contains(&name) {
                continue;
            }
            let Ok(meta) = e.metadata() else { continue };
            let old = meta.modified().ok().and_then(|t| t.elapsed().ok()).is_some_and(|a| a >= min_age);
            if old {
                self.remove_blob(&name);
                n += 1;
                bytes += meta.len();
            }
        }
        Ok((n, bytes))
    }
}

fn stamp(meta: &fs::Metadata) -> String {
    format!("{}:{}:{}.{}", meta.len(), meta.ino(), meta.mtime(), meta.mtime_nsec())
}

/// The images of `images` reachable from `roots` through what each needs
/// ([`ImageRecord::needs`]), each once, and the digests among them not in
/// `images`.
pub fn closure(images: &[ImageRecord], roots: impl IntoIterator<Item = String>) -> (Vec<&ImageRecord>, Vec<String>) {
    let (mut found, mut missing, mut seen) = (Vec::new(), Vec::new(), std::collections::HashSet::new());
    let mut todo: Vec<String> = roots.into_iter().collect();
    // Bounded by the catalog's size: each digest is visited once.
    while let Some(d) = todo.pop() {
        if !seen.insert(d.clone()) {
            continue;
        }
        match images.iter().find(|i| i.digest == d) {
            Some(img) => {
                todo.extend(img.needs().into_iter().map(String::from));
                found.push(img);
            }
            None => missing.push(d),
        }
    }
    (found, missing)
}

/// The sha256 of a file's content, as hex.
///
/// # Errors
/// On read errors.
pub fn hash_file(path: &Path) -> Result<String, Error> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests;
