//! Copying files in and out of the guest (`strata cp`), one piece per message.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use strata_proto::{FilePart, FILE_CHUNK};

fn check(path: &str) -> Result<&Path, String> {
    if !path.starts_with('/') || path.contains('\0') {
        return Err(format!("{path:?} is not an absolute guest path"));
    }
    Ok(Path::new(path))
}

/// Reads up to `len` bytes (at most one chunk) from `offset`.
pub fn read(path: &str, offset: u64, len: u32) -> Result<FilePart, String> {
    let p = check(path)?;
    let f = File::open(p).map_err(|e| format!("{path}: {e}"))?;
    let meta = f.metadata().map_err(|e| format!("{path}: {e}"))?;
    if meta.is_dir() {
        return Err(format!("{path} is a directory; copy files one at a time"));
    }
    let want = (len as usize).min(FILE_CHUNK);
    let mut data = vec![0u8; want];
    let mut got = 0;
    while got < want {
        match f.read_at(&mut data[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("{path}: {e}")),
        }
    }
    data.truncate(got);
    Ok(FilePart { eof: got < want, data })
}

/// The hidden file a copy is written to before it replaces `path`.
fn part_path(p: &Path) -> PathBuf {
    let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    p.with_file_name(format!(".{name}.strata-part"))
}

/// Writes one piece of a new version of `path`; the last piece puts it in place.
pub fn write(path: &str, offset: u64, data: &[u8], last: bool, mode: u32) -> Result<FilePart, String> {
    let p = check(path)?;
    if p.is_dir() {
        return Err(format!("{path} is a directory; name the file to write"));
    }
    let part = part_path(p);
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(offset == 0)
        .mode(mode & 0o7777)
        .open(&part)
        .map_err(|e| format!("{}: {e}", part.display()))?;
    f.write_all_at(data, offset).map_err(|e| format!("{path}: {e}"))?;
    if last {
        f.sync_all().map_err(|e| format!("{path}: {e}"))?;
        let _ = fs::set_permissions(&part, fs::Permissions::from_mode(mode & 0o7777));
        fs::rename(&part, p).map_err(|e| format!("{path}: {e}"))?;
    }
    Ok(FilePart { data: Vec::new(), eof: last })
}
