//! Bringing a memory file's pages into the page cache ahead of a
//! migration that reads them all.
//!
//! A restored guest maps its launch image's memory file copy-on-write and
//! touches a fraction of it. A live migration (a fork's, a move's) reads
//! every page: in the sparse file's holes each read allocates and zeroes a
//! page-cache page, one fault at a time in QEMU's migration thread (~1 s
//! of a 1.1 s send for a 512 MiB python3 guest the first time its image
//! was read so, ~0.15 s after). A thread of our own faults them in from
//! the file's end while QEMU reads from its start, on another core.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// What [`populate`] faults in at a time (and how often it looks at `stop`).
const CHUNK: usize = 2 << 20;

/// Starts bringing `path`'s pages that are not in the page cache into it,
/// from a thread of its own, from the end backwards; it stops once done or
/// when the returned flag is set.
pub fn warm_in_background(path: &Path) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let (path, flag) = (path.to_path_buf(), stop.clone());
    let started = std::thread::Builder::new().name("strata-warm".into()).spawn(move || {
        let t0 = std::time::Instant::now();
        match populate(&path, &flag) {
            Ok(bytes) => tracing::debug!(
                path = %path.display(), mib = bytes >> 20, ms = t0.elapsed().as_secs_f64() * 1e3,
                "memory file brought into the page cache"
            ),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "memory file not brought into the page cache")
            }
        }
    });
    if let Err(e) = started {
        tracing::debug!(error = %e, "no thread to bring a memory file into the page cache");
    }
    stop
}

/// Faults in the pages of `path` missing from the page cache (as
/// `mincore` tells), a chunk at a time from the end; the bytes it brought.
fn populate(path: &Path, stop: &AtomicBool) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path)?;
    let len = usize::try_from(file.metadata()?.len()).map_err(std::io::Error::other)?;
    if len == 0 {
        return Ok(0);
    }
    // SAFETY: a fresh read-only shared mapping of a file we hold open;
    // nothing else is given it, and it is unmapped below.
    let base = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0) };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let page = 4096;
    let mut resident = vec![0u8; len.div_ceil(page)];
    // SAFETY: `resident` has a byte for each page of the mapping.
    let known = unsafe { libc::mincore(base, len, resident.as_mut_ptr()) } == 0;
    let mut brought = 0;
    let mut end = len;
    while end > 0 && !stop.load(Ordering::Relaxed) {
        let start = end.saturating_sub(CHUNK) / page * page;
        let missing = !known || resident[start / page..end.div_ceil(page)].iter().any(|r| r & 1 == 0);
        if missing {
            // SAFETY: the range lies within the mapping.
            let r =
                unsafe { libc::madvise(base.cast::<u8>().add(start).cast(), end - start, libc::MADV_POPULATE_READ) };
            if r != 0 {
                // An older kernel: one read per page does it.
                for off in (start..end).step_by(page) {
                    // SAFETY: within the mapping, which is readable.
                    unsafe { std::ptr::read_volatile(base.cast::<u8>().add(off)) };
                }
            }
            brought += end - start;
        }
        end = start;
    }
    // SAFETY: the mapping made above, no longer used.
    unsafe { libc::munmap(base, len) };
    Ok(brought)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparse_file_is_brought_in_whole_and_a_stopped_warming_brings_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(8 << 20).unwrap();
        std::fs::write(dir.path().join("small"), b"x").unwrap();
        assert_eq!(populate(&path, &AtomicBool::new(true)).unwrap(), 0);
        assert_eq!(populate(&path, &AtomicBool::new(false)).unwrap(), 8 << 20);
        // Now in the page cache: nothing left to bring.
        assert_eq!(populate(&path, &AtomicBool::new(false)).unwrap(), 0);
        // A file just written is in the page cache already.
        assert_eq!(populate(&dir.path().join("small"), &AtomicBool::new(false)).unwrap(), 0);
    }
}
