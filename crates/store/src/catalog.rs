//! The catalog: one SQLite file recording every image and blob check.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::{Deserialize, Serialize};

use crate::Error;

/// The four kinds of image of the method.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum ImageKind {
    /// The OS installed: root disk, kernel, initramfs.
    Base,
    /// Delta from base to the package installed: a qcow2 overlay.
    Install,
    /// Delta from installed to launched and ready: disk overlay, memory, device state.
    Launch,
    /// The terminal's settings, applied on resume.
    Context,
    /// A session paused to disk: its disk delta and its saved memory and
    /// devices, chained on the image the session ran from.
    Paused,
}

impl ImageKind {
    /// Every kind, in the order of the method's images.
    pub const ALL: [ImageKind; 5] =
        [ImageKind::Base, ImageKind::Install, ImageKind::Launch, ImageKind::Context, ImageKind::Paused];

    pub fn as_str(self) -> &'static str {
        match self {
            ImageKind::Base => "base",
            ImageKind::Install => "install",
            ImageKind::Launch => "launch",
            ImageKind::Context => "context",
            ImageKind::Paused => "paused",
        }
    }

    fn parse(s: &str) -> Option<ImageKind> {
        Some(match s {
            "base" => ImageKind::Base,
            "install" => ImageKind::Install,
            "launch" => ImageKind::Launch,
            "context" => ImageKind::Context,
            "paused" => ImageKind::Paused,
            _ => return None,
        })
    }
}

impl std::fmt::Display for ImageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One image: its manifest and where it came from.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ImageRecord {
    /// sha256 of the manifest (every field below but `size` and `created`).
    pub digest: String,
    pub kind: ImageKind,
    pub package: Option<String>,
    pub os: String,
    pub arch: String,
    pub parent: Option<String>,
    /// Digest of the inputs this image was built from.
    pub recipe: String,
    /// Blob digests by role.
    pub files: BTreeMap<String, String>,
    /// Small facts needed to use the image (memory size, accelerator...).
    pub meta: BTreeMap<String, String>,
    /// Total bytes of its blobs.
    pub size: u64,
    /// Unix seconds.
    pub created: i64,
}

#[derive(Serialize)]
struct Manifest<'a> {
    kind: ImageKind,
    package: &'a Option<String>,
    os: &'a str,
    arch: &'a str,
    parent: &'a Option<String>,
    recipe: &'a str,
    files: &'a BTreeMap<String, String>,
    meta: &'a BTreeMap<String, String>,
}

impl ImageRecord {
    /// Builds a record and computes its digest from the manifest.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kind: ImageKind,
        package: Option<String>,
        os: &str,
        arch: &str,
        parent: Option<String>,
        recipe: &str,
        files: BTreeMap<String, String>,
        meta: BTreeMap<String, String>,
        size: u64,
    ) -> ImageRecord {
        let manifest =
            Manifest { kind, package: &package, os, arch, parent: &parent, recipe, files: &files, meta: &meta };
        let digest = crate::sha256_hex(&serde_json::to_vec(&manifest).expect("manifest serializes"));
        let created =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        ImageRecord {
            digest,
            kind,
            package,
            os: os.into(),
            arch: arch.into(),
            parent,
            recipe: recipe.into(),
            files,
            meta,
            size,
            created,
        }
    }

    /// The images this one needs besides its own blobs: its parent (the
    /// image it is a delta of) and the base it runs on. An install image's
    /// parent is only the base it was first built on (any base with the same
    /// root file system serves), so it is not a need; a launch image names
    /// its base in `meta.base`, and paused images keep that.
    pub fn needs(&self) -> Vec<&str> {
        let mut out = Vec::new();
        if self.kind != ImageKind::Install {
            out.extend(self.parent.as_deref());
        }
        if let Some(base) = self.meta.get("base") {
            if Some(base.as_str()) != self.parent.as_deref() {
                out.push(base);
            }
        }
        out
    }

    /// The blob digest of a role, or a damaged-record error.
    ///
    /// # Errors
    /// If the manifest has no such role.
    pub fn file(&self, role: &str) -> Result<&str, Error> {
        self.files
            .get(role)
            .map(String::as_str)
            .ok_or_else(|| Error::BadRecord { digest: self.digest.clone(), message: format!("no {role} file") })
    }
}

pub(crate) fn open(path: &Path) -> Result<Connection, Error> {
    let db = Connection::open(path)?;
    db.busy_timeout(Duration::from_secs(30))?;
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.pragma_update(None, "synchronous", "NORMAL")?;
    db.execute_batch(
        "CREATE TABLE IF NOT EXISTS images (
            digest TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            package TEXT,
            os TEXT NOT NULL,
            arch TEXT NOT NULL,
            parent TEXT,
            recipe TEXT NOT NULL,
            files TEXT NOT NULL,
            meta TEXT NOT NULL,
            size INTEGER NOT NULL,
            created INTEGER NOT NULL
        );
        CREATE INDEX IF NOT EXISTS images_by_recipe ON images(kind, recipe);
        CREATE TABLE IF NOT EXISTS blob_checks (
            digest TEXT PRIMARY KEY,
            stamp TEXT NOT NULL
        );
        CREATE TABLE IF NOT EXISTS blob_uses (
            digest TEXT PRIMARY KEY,
            last_used INTEGER NOT NULL
        );
        CREATE TABLE IF NOT EXISTS image_uses (
            digest TEXT PRIMARY KEY,
            last_used INTEGER NOT NULL
        );",
    )?;
    Ok(db)
}

fn from_row(row: &Row<'_>) -> rusqlite::Result<(ImageRecord, String, String, String)> {
    let kind: String = row.get(1)?;
    let files: String = row.get(7)?;
    let meta: String = row.get(8)?;
    Ok((
        ImageRecord {
            digest: row.get(0)?,
            kind: ImageKind::Base,
            package: row.get(2)?,
            os: row.get(3)?,
            arch: row.get(4)?,
            parent: row.get(5)?,
            recipe: row.get(6)?,
            files: BTreeMap::new(),
            meta: BTreeMap::new(),
            size: row.get::<_, i64>(9)? as u64,
            created: row.get(10)?,
        },
        kind,
        files,
        meta,
    ))
}

fn finish(raw: (ImageRecord, String, String, String)) -> Result<ImageRecord, Error> {
    let (mut rec, kind, files, meta) = raw;
    let bad = |message: String| Error::BadRecord { digest: rec.digest.clone(), message };
    rec.kind = ImageKind::parse(&kind).ok_or_else(|| bad(format!("unknown kind {kind:?}")))?;
    rec.files = serde_json::from_str(&files).map_err(|e| bad(e.to_string()))?;
    rec.meta = serde_json::from_str(&meta).map_err(|e| bad(e.to_string()))?;
    Ok(rec)
}

const COLUMNS: &str = "digest, kind, package, os, arch, parent, recipe, files, meta, size, created";

pub(crate) fn insert(db: &mut Connection, rec: &ImageRecord) -> Result<(), Error> {
    let tx = db.transaction()?;
    tx.execute(
        &format!("INSERT OR REPLACE INTO images ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"),
        params![
            rec.digest,
            rec.kind.as_str(),
            rec.package,
            rec.os,
            rec.arch,
            rec.parent,
            rec.recipe,
            serde_json::to_string(&rec.files).expect("map serializes"),
            serde_json::to_string(&rec.meta).expect("map serializes"),
            rec.size as i64,
            rec.created,
        ],
    )?;
    tx.commit()?;
    Ok(())
}

pub(crate) fn find_by_recipe(db: &Connection, kind: ImageKind, recipe: &str) -> Result<Option<ImageRecord>, Error> {
    let raw = db
        .query_row(
            &format!("SELECT {COLUMNS} FROM images WHERE kind = ?1 AND recipe = ?2 ORDER BY created DESC LIMIT 1"),
            params![kind.as_str(), recipe],
            from_row,
        )
        .optional()?;
    raw.map(finish).transpose()
}

pub(crate) fn list(db: &Connection) -> Result<Vec<ImageRecord>, Error> {
    let mut stmt = db.prepare(&format!("SELECT {COLUMNS} FROM images ORDER BY created DESC, kind"))?;
    let rows = stmt.query_map([], from_row)?;
    rows.map(|r| finish(r?)).collect()
}

pub(crate) fn remove(db: &Connection, digest: &str) -> Result<(), Error> {
    db.execute("DELETE FROM images WHERE digest = ?1", params![digest])?;
    Ok(())
}

pub(crate) fn check_matches(db: &Connection, digest: &str, stamp: &str) -> Result<bool, Error> {
    let known: Option<String> =
        db.query_row("SELECT stamp FROM blob_checks WHERE digest = ?1", params![digest], |r| r.get(0)).optional()?;
    Ok(known.as_deref() == Some(stamp))
}

pub(crate) fn record_check(db: &Connection, digest: &str, stamp: &str) -> Result<(), Error> {
    db.execute("INSERT OR REPLACE INTO blob_checks (digest, stamp) VALUES (?1, ?2)", params![digest, stamp])?;
    Ok(())
}

/// What a noted use is of: a blob (for evicting a cache) or a whole image
/// (for pruning superseded ones).
#[derive(Clone, Copy)]
pub(crate) enum UseOf {
    Blob,
    Image,
}

impl UseOf {
    fn table(self) -> &'static str {
        match self {
            UseOf::Blob => "blob_uses",
            UseOf::Image => "image_uses",
        }
    }
}

/// Notes that a blob or image is used now; the row changes at most once a
/// second, so a burst of launches does not write the database for each.
pub(crate) fn note_use(db: &Connection, of: UseOf, digest: &str) -> Result<(), Error> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    db.execute(
        &format!(
            "INSERT INTO {} (digest, last_used) VALUES (?1, ?2)
             ON CONFLICT(digest) DO UPDATE SET last_used = ?2 WHERE last_used < ?2",
            of.table()
        ),
        params![digest, now],
    )?;
    Ok(())
}

/// When each blob or image was last used (unix seconds).
pub(crate) fn last_uses(db: &Connection, of: UseOf) -> Result<std::collections::HashMap<String, i64>, Error> {
    let mut stmt = db.prepare(&format!("SELECT digest, last_used FROM {}", of.table()))?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    rows.collect::<Result<_, _>>().map_err(Error::from)
}

pub(crate) fn forget_check(db: &Connection, digest: &str) -> Result<(), Error> {
    db.execute("DELETE FROM blob_checks WHERE digest = ?1", params![digest])?;
    db.execute("DELETE FROM blob_uses WHERE digest = ?1", params![digest])?;
    Ok(())
}
