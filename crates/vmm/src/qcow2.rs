//! Empty qcow2 overlays, written directly.
//!
//! Every overlay strata makes comes from here: a restored session's
//! throwaway disk, and the writable disks of image builds. A restored
//! session's disk is a throwaway overlay on its image's disk.
//! QEMU's `snapshot=on` makes one itself on every start (creates a qcow2,
//! opens it five times, starts an I/O thread for it): 2-3 ms of CPU per VM
//! under TCG (docs/performance.md). An empty overlay is a few fixed bytes in
//! a sparse file, written here instead. Layout (qcow2 version 3, 64 KiB
//! clusters): the header with the backing file's name and format in
//! cluster 0, the refcount table in cluster 1, its one refcount block in
//! cluster 2, and the L1 table, all zero (a hole), from cluster 3.

use std::io::Read;
use std::path::Path;

use crate::Error;

const MAGIC: u32 = 0x5146_49fb;
const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
/// Header fields up to and including `header_length`.
const HEADER_LEN: u32 = 104;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// 16-bit refcounts.
const REFCOUNT_ORDER: u32 = 4;
/// The backing file's name must fit in cluster 0 after the header.
const MAX_BACKING_NAME: usize = 1023;

/// The files beneath a qcow2 image: its backing file, that one's, and so on
/// (a relative name is relative to the image's directory). Stops at a
/// file that is not qcow2 or has no backing file, or after 64 links.
pub fn backing_chain(image: &Path) -> Vec<std::path::PathBuf> {
    use std::io::{Seek, SeekFrom};
    let mut chain = Vec::new();
    let mut at = image.to_path_buf();
    for _ in 0..64 {
        let next = (|| -> std::io::Result<Option<std::path::PathBuf>> {
            let mut f = std::fs::File::open(&at)?;
            let mut head = [0u8; 20];
            f.read_exact(&mut head)?;
            if u32::from_be_bytes(head[0..4].try_into().expect("4 bytes")) != MAGIC {
                return Ok(None);
            }
            let offset = u64::from_be_bytes(head[8..16].try_into().expect("8 bytes"));
            let len = u32::from_be_bytes(head[16..20].try_into().expect("4 bytes")) as usize;
            if offset == 0 || len == 0 || len > MAX_BACKING_NAME {
                return Ok(None);
            }
            let mut name = vec![0u8; len];
            f.seek(SeekFrom::Start(offset))?;
            f.read_exact(&mut name)?;
            let name = std::path::PathBuf::from(std::ffi::OsString::from(String::from_utf8_lossy(&name).into_owned()));
            Ok(Some(if name.is_absolute() { name } else { at.parent().unwrap_or(Path::new("/")).join(name) }))
        })();
        match next {
            Ok(Some(p)) => {
                chain.push(p.clone());
                at = p;
            }
            _ => break,
        }
    }
    chain
}

/// The guest-visible size of a disk image: a qcow2's from its header, a raw
/// file's from its length.
fn virtual_size(path: &Path, format: &str) -> Result<u64, Error> {
    let io = |source| Error::Io { path: path.to_path_buf(), source };
    match format {
        "qcow2" => {
            let mut head = [0u8; 32];
            std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut head)).map_err(io)?;
            if u32::from_be_bytes([head[0], head[1], head[2], head[3]]) != MAGIC {
                return Err(Error::Disk(format!("{} is not a qcow2 image", path.display())));
            }
            Ok(u64::from_be_bytes(head[24..32].try_into().expect("8 bytes")))
        }
        "raw" => Ok(std::fs::metadata(path).map_err(io)?.len()),
        other => Err(Error::Disk(format!("cannot put an overlay on a {other} image ({})", path.display()))),
    }
}

/// An empty overlay of `size` bytes on `backing` (absolute name), whose
/// format is `format`: the pieces that are not zero, by offset, and the
/// file's length (the rest is a hole).
fn overlay_pieces(backing: &str, format: &str, size: u64) -> (Vec<(u64, Vec<u8>)>, u64) {
    // Each L1 entry maps one L2 table: CLUSTER / 8 clusters.
    let per_l1 = CLUSTER * (CLUSTER / 8);
    let l1_entries = size.div_ceil(per_l1).max(1);
    let l1_clusters = (l1_entries * 8).div_ceil(CLUSTER);
    let (refcount_table, refcount_block, l1_table) = (CLUSTER, 2 * CLUSTER, 3 * CLUSTER);
    let clusters = 3 + l1_clusters;

    let mut head = Vec::with_capacity(512);
    let ext_padded = format.len().div_ceil(8) * 8;
    // header, the format extension, the end-of-extensions marker
    let backing_offset = u64::from(HEADER_LEN) + 8 + ext_padded as u64 + 8;
    for field in [
        &MAGIC.to_be_bytes()[..],
        &3u32.to_be_bytes(),
        &backing_offset.to_be_bytes(),
        &(backing.len() as u32).to_be_bytes(),
        &CLUSTER_BITS.to_be_bytes(),
        &size.to_be_bytes(),
        &0u32.to_be_bytes(), // no encryption
        &(l1_entries as u32).to_be_bytes(),
        &l1_table.to_be_bytes(),
        &refcount_table.to_be_bytes(),
        &1u32.to_be_bytes(), // refcount table clusters
        &0u32.to_be_bytes(), // snapshots
        &0u64.to_be_bytes(), // snapshots offset
        &0u64.to_be_bytes(), // incompatible features
        &0u64.to_be_bytes(), // compatible features
        &0u64.to_be_bytes(), // autoclear features
        &REFCOUNT_ORDER.to_be_bytes(),
        &HEADER_LEN.to_be_bytes(),
    ] {
        head.extend_from_slice(field);
    }
    debug_assert_eq!(head.len(), HEADER_LEN as usize);
    head.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
    head.extend_from_slice(&(format.len() as u32).to_be_bytes());
    head.extend_from_slice(format.as_bytes());
    head.resize(head.len() + ext_padded - format.len(), 0);
    head.extend_from_slice(&[0u8; 8]);
    debug_assert_eq!(head.len() as u64, backing_offset);
    head.extend_from_slice(backing.as_bytes());

    let refcounts = (0..clusters).flat_map(|_| 1u16.to_be_bytes()).collect();
    let pieces = vec![(0, head), (refcount_table, refcount_block.to_be_bytes().to_vec()), (refcount_block, refcounts)];
    (pieces, l1_table + l1_entries * 8)
}

/// Writes an empty qcow2 overlay at `overlay` whose backing file is
/// `backing` (a `format` image; its name is stored absolute). The file is
/// created new: an existing one is an error, never overwritten; if writing
/// fails, it is removed.
///
/// # Errors
/// If the backing file cannot be read or is not a qcow2 or raw image, its
/// name is too long, or the overlay cannot be written.
pub fn create_overlay(backing: &Path, format: &str, overlay: &Path) -> Result<(), Error> {
    use std::os::unix::fs::FileExt;
    let backing = std::path::absolute(backing).map_err(|source| Error::Io { path: backing.to_path_buf(), source })?;
    let name = backing.to_str().filter(|n| n.len() <= MAX_BACKING_NAME).ok_or_else(|| {
        Error::Disk(format!(
            "cannot name {} in a qcow2 overlay: the path must be UTF-8 and at most {MAX_BACKING_NAME} bytes \
                 (use a shorter state directory)",
            backing.display()
        ))
    })?;
    let (pieces, len) = overlay_pieces(name, format, virtual_size(&backing, format)?);
    let io = |source| Error::Io { path: overlay.to_path_buf(), source };
    let f = std::fs::OpenOptions::new().write(true).create_new(true).open(overlay).map_err(io)?;
    let written =
        pieces.iter().try_for_each(|(offset, bytes)| f.write_all_at(bytes, *offset)).and_then(|()| f.set_len(len));
    if let Err(e) = written {
        // No half-written overlay is left for QEMU to find.
        let _ = std::fs::remove_file(overlay);
        return Err(io(e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn be64(b: &[u8], at: usize) -> u64 {
        u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// The whole file, holes as zeros.
    fn overlay_bytes(backing: &str, format: &str, size: u64) -> Vec<u8> {
        let (pieces, len) = overlay_pieces(backing, format, size);
        let mut file = vec![0u8; len as usize];
        for (offset, bytes) in pieces {
            file[offset as usize..][..bytes.len()].copy_from_slice(&bytes);
        }
        file
    }

    #[test]
    fn the_backing_chain_is_followed_to_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let mid = dir.path().join("mid.qcow2");
        create_overlay(&base, "raw", &mid).unwrap();
        let top = dir.path().join("top.qcow2");
        create_overlay(&mid, "qcow2", &top).unwrap();
        assert_eq!(backing_chain(&top), vec![mid.clone(), base.clone()]);
        assert_eq!(backing_chain(&base), Vec::<std::path::PathBuf>::new());
    }

    #[test]
    fn the_header_names_the_backing_file_and_counts_every_cluster() {
        let b = overlay_bytes("/store/blobs/abc", "qcow2", 8 << 30);
        // 8 GiB: 16 L1 entries at cluster 3.
        assert_eq!(b.len(), 3 * 65536 + 16 * 8);
        assert_eq!(&b[..4], b"QFI\xfb");
        let (off, len) = (be64(&b, 8) as usize, u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize);
        assert_eq!(&b[off..off + len], b"/store/blobs/abc");
        assert_eq!(be64(&b, 24), 8 << 30);
        assert_eq!(u32::from_be_bytes(b[36..40].try_into().unwrap()), 16);
        assert_eq!(be64(&b, 65536), 2 * 65536, "refcount table points at the block");
        let refcounts: Vec<u16> =
            (0..5).map(|c| u16::from_be_bytes(b[2 * 65536 + 2 * c..][..2].try_into().unwrap())).collect();
        assert_eq!(refcounts, [1, 1, 1, 1, 0]);
    }

    #[test]
    fn a_large_disk_gets_an_l1_table_of_several_clusters() {
        // 8193 entries of 512 MiB: the L1 table spans two clusters.
        let b = overlay_bytes("/b", "raw", 8193 * (512 << 20));
        assert_eq!(b.len(), 3 * 65536 + 8193 * 8);
        let count = |c: usize| u16::from_be_bytes(b[2 * 65536 + 2 * c..][..2].try_into().unwrap());
        assert_eq!((count(4), count(5)), (1, 0));
    }

    #[test]
    fn refuses_what_it_cannot_overlay() {
        let dir = tempfile::tempdir().unwrap();
        let not_qcow2 = dir.path().join("plain");
        std::fs::write(&not_qcow2, vec![0u8; 4096]).unwrap();
        let out = dir.path().join("o.qcow2");
        assert!(matches!(create_overlay(&not_qcow2, "qcow2", &out), Err(Error::Disk(_))));
        assert!(matches!(create_overlay(&not_qcow2, "vmdk", &out), Err(Error::Disk(_))));
        assert!(!out.exists(), "nothing is written for a refused backing file");
        create_overlay(&not_qcow2, "raw", &out).unwrap();
        assert!(create_overlay(&not_qcow2, "raw", &out).is_err(), "an existing file is never overwritten");
        let deep = dir.path().join("d".repeat(200)).join("e".repeat(200)).join("f".repeat(200));
        std::fs::create_dir_all(&deep).unwrap();
        let long = deep.join("g".repeat(200)).join("h".repeat(200));
        std::fs::create_dir_all(&long).unwrap();
        let backing = long.join("disk");
        std::fs::write(&backing, vec![0u8; 4096]).unwrap();
        let refused = create_overlay(&backing, "raw", &dir.path().join("long.qcow2"));
        assert!(matches!(&refused, Err(Error::Disk(m)) if m.contains("shorter state directory")), "{refused:?}");
    }

    /// QEMU's own checker accepts the overlay, and QEMU reads the backing
    /// file's data through it and writes into it, not into the backing file.
    #[test]
    fn qemu_checks_reads_and_writes_an_overlay() {
        let dir = tempfile::tempdir().unwrap();
        let run = |program: &str, args: &[&str]| {
            let out = std::process::Command::new(program).args(args).output().expect("QEMU's tools are installed");
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert!(out.status.success() && !text.contains("failed"), "{program} {args:?}: {text}");
            text
        };
        let base = dir.path().join("base.qcow2");
        let overlay = dir.path().join("o.qcow2");
        let (b, o) = (base.to_str().unwrap(), overlay.to_str().unwrap());
        run("qemu-img", &["create", "-q", "-f", "qcow2", b, "3G"]);
        run("qemu-io", &["-c", "write -P 0x5a 1M 64k", b]);
        create_overlay(&base, "qcow2", &overlay).unwrap();
        let written = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&overlay).unwrap()) * 512;
        assert!(written <= 16 << 10, "the overlay is sparse: {written} bytes written");
        run("qemu-img", &["check", o]);
        let info: serde_json::Value = serde_json::from_str(&run("qemu-img", &["info", "--output=json", o])).unwrap();
        assert_eq!(info["virtual-size"], 3u64 << 30);
        assert_eq!(info["backing-filename-format"], "qcow2");
        run("qemu-io", &["-c", "read -P 0x5a 1M 64k", "-c", "write -P 0x33 2G 128k", o]);
        run("qemu-img", &["check", o]);
        run("qemu-io", &["-c", "read -P 0x33 2G 128k", "-c", "read -P 0x5a 1M 64k", o]);
        run("qemu-io", &["-c", "read -P 0 2G 128k", b]);
    }
}
