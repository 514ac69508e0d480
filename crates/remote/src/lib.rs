//! Images shared between servers through an S3-compatible object store.
//!
//! A server publishes what it builds: every blob under `blobs/sha256/DIGEST`,
//! then the image's record under `images/DIGEST.json`, then a pointer from
//! its recipe, `recipes/KIND/RECIPE`. A record is therefore only ever
//! reachable once all its blobs are there. Another server that lacks an image
//! finds it by recipe, fetches the blobs it lacks into its local store (each
//! checked against its digest on the way in, and fetched once however many
//! launches want it at the same moment), and records the image locally. The
//! local store is a cache with a size limit: blobs the object store also
//! holds are evicted least recently used first.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload, WriteMultipart};
use sha2::{Digest, Sha256};
use strata_store::{ImageKind, ImageRecord, Store};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

/// What can go wrong with the shared store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the object store at {endpoint} (bucket {bucket}) failed: {source}")]
    Remote {
        endpoint: String,
        bucket: String,
        #[source]
        source: object_store::Error,
    },
    #[error(transparent)]
    Local(#[from] strata_store::Error),
    #[error("blob {0} is missing from the object store; publish its image again from a server that has it")]
    MissingBlob(String),
    #[error("blob {digest} in the object store is corrupt (its content hashes to {actual}); nothing was cached")]
    CorruptBlob { digest: String, actual: String },
    #[error("image record {digest} in the object store is damaged: {message}")]
    BadRecord { digest: String, message: String },
    #[error("object store settings: {0}")]
    Config(String),
    #[error("I/O on {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where the shared store is and how much of it a server keeps locally.
#[derive(Clone)]
pub struct RemoteConfig {
    /// e.g. `http://127.0.0.1:3900`.
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Bytes of blobs the local store keeps before evicting shared ones.
    pub cache_limit: u64,
}

impl std::fmt::Debug for RemoteConfig {
    // The secret never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteConfig")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("cache_limit", &self.cache_limit)
            .finish_non_exhaustive()
    }
}

impl RemoteConfig {
    /// The settings from the environment: `STRATA_S3_ENDPOINT`,
    /// `STRATA_S3_BUCKET`, `STRATA_S3_REGION` (default `garage`),
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and
    /// `STRATA_CACHE_LIMIT_GIB` (default 50); `None` without an endpoint.
    ///
    /// # Errors
    /// If the endpoint is set but something else is missing or malformed.
    pub fn from_env() -> Result<Option<RemoteConfig>, Error> {
        let Ok(endpoint) = std::env::var("STRATA_S3_ENDPOINT") else { return Ok(None) };
        let var =
            |k: &str| std::env::var(k).map_err(|_| Error::Config(format!("STRATA_S3_ENDPOINT is set but {k} is not")));
        let cache_gib: f64 = match std::env::var("STRATA_CACHE_LIMIT_GIB") {
            Ok(v) => v.parse().ok().filter(|g: &f64| *g > 0.0 && *g < 1e6).ok_or_else(|| {
                Error::Config(format!("STRATA_CACHE_LIMIT_GIB={v:?} is not a positive number of GiB"))
            })?,
            Err(_) => 50.0,
        };
        let cfg = RemoteConfig {
            endpoint,
            bucket: var("STRATA_S3_BUCKET")?,
            region: std::env::var("STRATA_S3_REGION").unwrap_or_else(|_| "garage".into()),
            access_key_id: var("AWS_ACCESS_KEY_ID")?,
            secret_access_key: var("AWS_SECRET_ACCESS_KEY")?,
            cache_limit: (cache_gib * (1u64 << 30) as f64) as u64,
        };
        cfg.check()?;
        Ok(Some(cfg))
    }

    fn check(&self) -> Result<(), Error> {
        if !(self.endpoint.starts_with("http://") || self.endpoint.starts_with("https://")) {
            return Err(Error::Config(format!("endpoint {:?} must be an http:// or https:// URL", self.endpoint)));
        }
        let bucket_ok = (3..=63).contains(&self.bucket.len())
            && self.bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !bucket_ok {
            return Err(Error::Config(format!(
                "bucket {:?} is not a valid S3 bucket name (3-63 of a-z, 0-9, '-', '.')",
                self.bucket
            )));
        }
        Ok(())
    }
}

/// What an eviction removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Evicted {
    pub blobs: u64,
    pub bytes: u64,
}

/// The shared store, and this server's local store as its cache.
pub struct Remote {
    objects: Arc<dyn ObjectStore>,
    local: Arc<Store>,
    cfg: RemoteConfig,
    /// Blobs downloaded by this process (each fetch of a blob counts once).
    downloads: AtomicU64,
}

/// Pieces of a multipart upload.
const PART: usize = 8 << 20;
/// Runs of zeros this long (and aligned) are left as holes in fetched blobs.
const PAGE: usize = 4096;

fn blob_key(digest: &str) -> ObjectPath {
    ObjectPath::from(format!("blobs/sha256/{digest}"))
}

fn image_key(digest: &str) -> ObjectPath {
    ObjectPath::from(format!("images/{digest}.json"))
}

fn recipe_key(kind: ImageKind, recipe: &str) -> ObjectPath {
    ObjectPath::from(format!("recipes/{kind}/{recipe}"))
}

impl Remote {
    /// Connects to the object store (nothing is sent yet).
    ///
    /// # Errors
    /// If the settings are invalid.
    pub fn new(cfg: RemoteConfig, local: Arc<Store>) -> Result<Remote, Error> {
        cfg.check()?;
        let objects = object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&cfg.endpoint)
            .with_bucket_name(&cfg.bucket)
            .with_region(&cfg.region)
            .with_access_key_id(&cfg.access_key_id)
            .with_secret_access_key(&cfg.secret_access_key)
            .with_allow_http(true)
            .with_virtual_hosted_style_request(false)
            .build()
            .map_err(|e| Error::Config(e.to_string()))?;
        Ok(Remote { objects: Arc::new(objects), local, cfg, downloads: AtomicU64::new(0) })
    }

    /// Blobs this process downloaded.
    pub fn downloads(&self) -> u64 {
        self.downloads.load(Ordering::Relaxed)
    }

    pub fn config(&self) -> &RemoteConfig {
        &self.cfg
    }

    fn remote_err(&self, source: object_store::Error) -> Error {
        Error::Remote { endpoint: self.cfg.endpoint.clone(), bucket: self.cfg.bucket.clone(), source }
    }

    async fn exists(&self, key: &ObjectPath) -> Result<bool, Error> {
        match self.objects.head(key).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.remote_err(e)),
        }
    }

    async fn get_small(&self, key: &ObjectPath) -> Result<Option<Vec<u8>>, Error> {
        match self.objects.get(key).await {
            Ok(r) => Ok(Some(r.bytes().await.map_err(|e| self.remote_err(e))?.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.remote_err(e)),
        }
    }

    /// Publishes an image of the local store: its blobs (those not there
    /// yet), then its record, then its recipe's pointer to it.
    ///
    /// # Errors
    /// If a local blob is bad or the object store fails.
    pub async fn publish(&self, rec: &ImageRecord) -> Result<(), Error> {
        for digest in rec.files.values() {
            if self.exists(&blob_key(digest)).await? {
                continue;
            }
            self.local.verify(digest)?;
            self.upload(digest).await?;
        }
        let json = serde_json::to_vec(rec)
            .map_err(|e| Error::BadRecord { digest: rec.digest.clone(), message: e.to_string() })?;
        let put = |key: ObjectPath, data: Vec<u8>| async move {
            self.objects.put(&key, PutPayload::from(data)).await.map(|_| ()).map_err(|e| self.remote_err(e))
        };
        put(image_key(&rec.digest), json).await?;
        put(recipe_key(rec.kind, &rec.recipe), rec.digest.clone().into_bytes()).await?;
        tracing::info!(image = %rec.digest, kind = %rec.kind, "image published to the object store");
        Ok(())
    }

    async fn upload(&self, digest: &str) -> Result<(), Error> {
        use tokio::io::AsyncReadExt;
        let path = self.local.blob_path(digest);
        let io = |source| Error::Io { path: path.clone(), source };
        let mut file = tokio::fs::File::open(&path).await.map_err(io)?;
        let upload = self.objects.put_multipart(&blob_key(digest)).await.map_err(|e| self.remote_err(e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
        let mut buf = vec![0u8; PART];
        loop {
            let n = file.read(&mut buf).await.map_err(io)?;
            if n == 0 {
                break;
            }
            // At most a few parts in flight: memory stays bounded for big blobs.
            writer.wait_for_capacity(4).await.map_err(|e| self.remote_err(e))?;
            writer.write(&buf[..n]);
        }
        writer.finish().await.map_err(|e| self.remote_err(e))?;
        Ok(())
    }

    /// The record of image `digest` in the object store, if it is there.
    ///
    /// # Errors
    /// If the object store fails or the record is damaged.
    pub async fn image(&self, digest: &str) -> Result<Option<ImageRecord>, Error> {
        strata_store::check_digest(digest)?;
        let Some(bytes) = self.get_small(&image_key(digest)).await? else { return Ok(None) };
        let bad = |message: String| Error::BadRecord { digest: digest.to_string(), message };
        let rec: ImageRecord = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        if rec.digest != digest {
            return Err(bad(format!("it names itself {}", rec.digest)));
        }
        for d in rec.files.values() {
            strata_store::check_digest(d).map_err(|e| bad(e.to_string()))?;
        }
        Ok(Some(rec))
    }

    /// The image published for a recipe, if any.
    ///
    /// # Errors
    /// If the object store fails or the record is damaged.
    pub async fn find_by_recipe(&self, kind: ImageKind, recipe: &str) -> Result<Option<ImageRecord>, Error> {
        strata_store::check_digest(recipe)?;
        let Some(pointer) = self.get_small(&recipe_key(kind, recipe)).await? else { return Ok(None) };
        let digest = String::from_utf8_lossy(&pointer).trim().to_string();
        self.image(&digest).await
    }

    /// Makes an image usable locally: fetches the blobs the local store
    /// lacks (or holds damaged) and records the image in the local catalog.
    ///
    /// # Errors
    /// If a blob is missing or corrupt in the object store, or I/O fails;
    /// nothing half-written is left in the local store.
    pub async fn fetch(&self, rec: &ImageRecord) -> Result<(), Error> {
        for digest in rec.files.values() {
            self.fetch_blob(digest).await?;
        }
        if self.local.image(&rec.digest)?.is_none() {
            self.local.insert_image(rec)?;
        }
        Ok(())
    }

    /// An image and every image it needs ([`ImageRecord::needs`]: the
    /// images under it and its base), made usable locally.
    ///
    /// # Errors
    /// As [`Remote::fetch`], or if a needed image is in neither store.
    pub async fn fetch_with_parents(&self, rec: &ImageRecord) -> Result<(), Error> {
        let mut todo = vec![rec.clone()];
        let mut seen = HashSet::new();
        // Bounded: the images of the method and a chain of pauses.
        for _ in 0..1000 {
            let Some(img) = todo.pop() else { return Ok(()) };
            if !seen.insert(img.digest.clone()) {
                continue;
            }
            self.fetch(&img).await?;
            for need in img.needs() {
                let found = match self.local.image(need)? {
                    Some(local) => Some(local),
                    None => self.image(need).await?,
                };
                todo.push(found.ok_or_else(|| Error::BadRecord {
                    digest: img.digest.clone(),
                    message: format!("it needs image {need}, which is in neither the local nor the shared store"),
                })?);
            }
        }
        Err(Error::BadRecord { digest: rec.digest.clone(), message: "its chain of images is too long".into() })
    }

    /// One blob into the local store, downloaded once: whoever holds the
    /// blob's lock downloads it, the others wait and find it there.
    async fn fetch_blob(&self, digest: &str) -> Result<(), Error> {
        if self.local.verify(digest).is_ok() {
            return Ok(());
        }
        let local = self.local.clone();
        let d = digest.to_string();
        let lock = tokio::task::spawn_blocking(move || local.lock_blob(&d))
            .await
            .map_err(|e| Error::Config(format!("lock task failed: {e}")))??;
        match self.local.verify(digest) {
            Ok(()) => return Ok(()),
            Err(strata_store::Error::Corrupt { .. }) => self.local.remove_blob(digest),
            Err(_) => {}
        }
        let work = self.local.work_dir("fetch")?;
        let tmp = work.path().join("blob");
        let got = self.download(digest, &tmp).await;
        let result = match got {
            // Hashed as it streamed: the file is only synced and moved in,
            // on a blocking thread (a launch image's memory is hundreds of
            // MiB; its fsync must not hold up the caller's runtime).
            Ok(actual) if actual == digest => {
                let (local, tmp, d) = (self.local.clone(), tmp.clone(), digest.to_string());
                tokio::task::spawn_blocking(move || local.ingest_hashed(&tmp, &d))
                    .await
                    .map_err(|e| Error::Config(format!("ingest task failed: {e}")))?
                    .map_err(Error::from)
            }
            Ok(actual) => Err(Error::CorruptBlob { digest: digest.to_string(), actual }),
            Err(e) => Err(e),
        };
        drop(lock);
        if result.is_ok() {
            self.downloads.fetch_add(1, Ordering::Relaxed);
            tracing::info!(blob = %digest, "blob fetched from the object store");
        }
        result
    }

    /// Downloads a blob to `dest`, leaving aligned pages of zeros as holes;
    /// returns the sha256 of what arrived.
    async fn download(&self, digest: &str, dest: &Path) -> Result<String, Error> {
        let got = match self.objects.get(&blob_key(digest)).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Err(Error::MissingBlob(digest.to_string())),
            Err(e) => return Err(self.remote_err(e)),
        };
        let io = |source| Error::Io { path: dest.to_path_buf(), source };
        let mut file = tokio::fs::File::create(dest).await.map_err(io)?;
        let mut hasher = Sha256::new();
        let mut offset: u64 = 0;
        let mut stream = got.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.remote_err(e))?;
            hasher.update(&chunk);
            let mut rest: &[u8] = &chunk;
            while !rest.is_empty() {
                // Up to the next page boundary, so holes stay page-aligned.
                let to_boundary = PAGE - (offset as usize % PAGE);
                let (piece, tail) = rest.split_at(to_boundary.min(rest.len()));
                if piece.len() == PAGE && piece.iter().all(|b| *b == 0) {
                    file.seek(std::io::SeekFrom::Current(PAGE as i64)).await.map_err(io)?;
                } else {
                    file.write_all(piece).await.map_err(io)?;
                }
                offset += piece.len() as u64;
                rest = tail;
            }
        }
        file.set_len(offset).await.map_err(io)?;
        file.flush().await.map_err(io)?;
        Ok(hex::encode(hasher.finalize()))
    }

    /// Evicts local blobs, least recently used first, until the local store
    /// is within its limit. Only blobs the object store also holds go, never
    /// those in `keep` (the images running sessions use); the local records
    /// of images that lose a blob go with it (they are fetched again when
    /// wanted).
    ///
    /// # Errors
    /// If the local catalog or the object store fails.
    pub async fn evict(&self, keep: &HashSet<String>) -> Result<Evicted, Error> {
        let dir = self.local.root().join("blobs/sha256");
        let mut blobs: Vec<(String, u64)> = std::fs::read_dir(&dir)
            .map_err(|source| Error::Io { path: dir.clone(), source })?
            .flatten()
            .filter_map(|e| Some((e.file_name().to_str()?.to_string(), e.metadata().ok()?.len())))
            .filter(|(d, _)| strata_store::check_digest(d).is_ok())
            .collect();
        let mut total: u64 = blobs.iter().map(|(_, n)| n).sum();
        let mut out = Evicted::default();
        if total <= self.cfg.cache_limit {
            return Ok(out);
        }
        let used = self.local.blob_last_used()?;
        blobs.sort_by_key(|(d, _)| used.get(d).copied().unwrap_or(0));
        for (digest, size) in blobs {
            if total <= self.cfg.cache_limit {
                break;
            }
            if keep.contains(&digest) || !self.exists(&blob_key(&digest)).await? {
                continue;
            }
            for img in self.local.list_images()? {
                if img.files.values().any(|d| *d == digest) {
                    self.local.remove_image(&img.digest)?;
                }
            }
            self.local.remove_blob(&digest);
            total -= size;
            out.blobs += 1;
            out.bytes += size;
            tracing::info!(blob = %digest, bytes = size, "evicted from the local cache (the object store keeps it)");
        }
        Ok(out)
    }
}
