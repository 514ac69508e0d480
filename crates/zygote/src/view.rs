//! The file system a confined QEMU sees: a mount namespace of its own whose
//! root is an empty tmpfs holding only what the VM needs, each piece bound
//! from the host at the same path (read-only unless it is the VM's to
//! write): QEMU and its libraries (`/usr`), the loader's cache and the
//! resolver's configuration, a few device nodes, a `/proc` of its own pid
//! namespace (mounted by the process that becomes QEMU), the VM's
//! directory, and the files of its own images. Not the catalog, not other
//! sessions, not the rest of the host's `/etc` or of the store.
//!
//! A [`FileView`] is described before the fork (allocating) and turned
//! into [`Steps`], which the child applies with system calls only.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Where the new root is mounted in the child's namespace before it becomes
/// the root (an empty directory of the host; the mount is the child's alone).
pub const VIEW_MOUNT_POINT: &str = "/run/strata/vm-root";

/// One thing the view shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shown {
    /// A file or directory of the host at the same path.
    Bind { path: PathBuf, writable: bool },
    /// A device node (bound, usable: no `nodev`).
    Device(PathBuf),
    /// A symbolic link (`/lib -> usr/lib` on a merged-/usr system).
    Link { path: PathBuf, target: PathBuf },
    /// An empty `/proc`, where the process that becomes QEMU mounts the
    /// one of its own pid namespace ([`crate::monitor::mount_proc`]).
    Proc,
}

/// What a confined QEMU sees.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileView {
    pub shown: Vec<Shown>,
}

impl FileView {
    /// The view every VM gets: QEMU's binary, libraries and firmware, the
    /// loader's cache, the resolver's configuration (QEMU's user-mode
    /// network forwards DNS to it), `/proc` and the harmless devices; with
    /// `/dev/kvm` where KVM is used. `extra` is the VM's own.
    pub fn for_qemu(kvm: bool, extra: impl IntoIterator<Item = Shown>) -> FileView {
        let mut shown = host_part().to_vec();
        if kvm && Path::new("/dev/kvm").exists() {
            shown.push(Shown::Device("/dev/kvm".into()));
        }
        shown.extend(extra);
        FileView { shown }
    }

    /// Encodes the view as strings for the fork server's protocol.
    pub fn encode(&self) -> Vec<Vec<u8>> {
        self.shown
            .iter()
            .map(|s| match s {
                Shown::Bind { path, writable } => {
                    [if *writable { b"w:" } else { b"r:" }.as_slice(), path.as_os_str().as_bytes()].concat()
                }
                Shown::Device(path) => [b"d:".as_slice(), path.as_os_str().as_bytes()].concat(),
                Shown::Proc => b"p:".to_vec(),
                Shown::Link { path, target } => {
                    [b"l:".as_slice(), path.as_os_str().as_bytes(), b"\t", target.as_os_str().as_bytes()].concat()
                }
            })
            .collect()
    }

    /// The inverse of [`FileView::encode`]; `None` if an entry is malformed.
    pub fn decode(entries: &[Vec<u8>]) -> Option<FileView> {
        use std::os::unix::ffi::OsStringExt;
        let path = |b: &[u8]| -> Option<PathBuf> {
            let p = PathBuf::from(std::ffi::OsString::from_vec(b.to_vec()));
            p.is_absolute().then_some(p)
        };
        let shown = entries
            .iter()
            .map(|e| {
                let (kind, rest) = (e.get(..2)?, e.get(2..)?);
                Some(match kind {
                    b"w:" | b"r:" => Shown::Bind { path: path(rest)?, writable: kind == b"w:" },
                    b"d:" => Shown::Device(path(rest)?),
                    b"p:" if rest.is_empty() => Shown::Proc,
                    b"l:" => {
                        let tab = rest.iter().position(|b| *b == b'\t')?;
                        let target = PathBuf::from(std::ffi::OsString::from_vec(rest[tab + 1..].to_vec()));
                        Shown::Link { path: path(&rest[..tab])?, target }
                    }
                    _ => return None,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(FileView { shown })
    }

    /// The system calls that make the view, prepared (every string made):
    /// what is a directory and what a file is looked up here, on the host.
    ///
    /// # Errors
    /// A path that holds a NUL byte or is not absolute.
    pub fn steps(&self) -> Result<Steps, &'static str> {
        let root = Path::new(VIEW_MOUNT_POINT);
        let mut dirs: Vec<PathBuf> = Vec::new();
        let mut ops = Vec::new();
        let under = |p: &Path| -> Result<PathBuf, &'static str> {
            let rel = p.strip_prefix("/").map_err(|_| "a path of the view is not absolute")?;
            Ok(root.join(rel))
        };
        let parents = |p: &Path, dirs: &mut Vec<PathBuf>, ops: &mut Vec<Op>| -> Result<(), &'static str> {
            let mut chain: Vec<&Path> = p.ancestors().skip(1).filter(|a| *a != Path::new("/")).collect();
            chain.reverse();
            for a in chain {
                if !dirs.iter().any(|d| d == a) {
                    dirs.push(a.to_path_buf());
                    ops.push(Op::Mkdir(cstring(&under(a)?)?));
                }
            }
            Ok(())
        };
        for s in &self.shown {
            match s {
                Shown::Link { path, target } => {
                    parents(path, &mut dirs, &mut ops)?;
                    ops.push(Op::Symlink { target: cstring(target)?, at: cstring(&under(path)?)? });
                }
                Shown::Bind { path, writable } => {
                    parents(path, &mut dirs, &mut ops)?;
                    let dst = cstring(&under(path)?)?;
                    if path.is_dir() {
                        if !dirs.iter().any(|d| d == path) {
                            dirs.push(path.clone());
                            ops.push(Op::Mkdir(dst.clone()));
                        }
                    } else {
                        ops.push(Op::Touch(dst.clone()));
                    }
                    ops.push(Op::Bind { src: cstring(path)?, dst, read_only: !writable, devices: false });
                }
                Shown::Device(path) => {
                    parents(path, &mut dirs, &mut ops)?;
                    let dst = cstring(&under(path)?)?;
                    ops.push(Op::Touch(dst.clone()));
                    ops.push(Op::Bind { src: cstring(path)?, dst, read_only: false, devices: true });
                }
                Shown::Proc => ops.push(Op::Mkdir(cstring(&under(Path::new("/proc"))?)?)),
            }
        }
        Ok(Steps { root: cstring(root)?, ops })
    }
}

/// What every view shows of the host, looked up once: the host's layout
/// does not change while strata runs, and a launch need not ask again.
fn host_part() -> &'static [Shown] {
    static HOST: std::sync::OnceLock<Vec<Shown>> = std::sync::OnceLock::new();
    HOST.get_or_init(|| {
        let mut shown = Vec::new();
        for top in ["/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"] {
            let p = Path::new(top);
            match std::fs::read_link(p) {
                Ok(target) => shown.push(Shown::Link { path: p.into(), target }),
                Err(_) if p.is_dir() => shown.push(Shown::Bind { path: p.into(), writable: false }),
                Err(_) => {}
            }
        }
        for f in ["/etc/ld.so.cache", "/etc/resolv.conf"] {
            if Path::new(f).exists() {
                shown.push(Shown::Bind { path: f.into(), writable: false });
            }
        }
        let devices = ["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"];
        shown.extend(devices.into_iter().filter(|d| Path::new(d).exists()).map(|d| Shown::Device(d.into())));
        shown.push(Shown::Proc);
        shown
    })
}

fn cstring(p: &Path) -> Result<CString, &'static str> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| "a path of the view holds a NUL byte")
}

/// One prepared step.
#[derive(Debug, Clone)]
enum Op {
    Mkdir(CString),
    Touch(CString),
    Symlink { target: CString, at: CString },
    Bind { src: CString, dst: CString, read_only: bool, devices: bool },
}

/// A [`FileView`] ready to apply between fork and exec.
#[derive(Debug, Clone)]
pub struct Steps {
    root: CString,
    ops: Vec<Op>,
}

impl Steps {
    /// Makes this process's view: a mount namespace of its own (the caller
    /// must be the only thread, or the unshare fails), an empty tmpfs as
    /// its root with only the view's pieces in it. System calls only.
    ///
    /// # Errors
    /// Which step failed (errno holds why).
    ///
    /// # Safety
    /// Changes the whole process's root; call it in a child about to
    /// become QEMU.
    pub unsafe fn apply(&self) -> Result<(), &'static str> {
        use libc::{c_ulong, MS_BIND, MS_NODEV, MS_NOSUID, MS_PRIVATE, MS_RDONLY, MS_REC, MS_REMOUNT};
        let null = std::ptr::null::<libc::c_char>();
        // SAFETY: system calls with strings we own, in this process only.
        unsafe {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err("unsharing the mount namespace");
            }
            // Nothing done here reaches the host's mounts.
            if libc::mount(null, c"/".as_ptr(), null, MS_REC | MS_PRIVATE, std::ptr::null()) != 0 {
                return Err("making the mounts private");
            }
            let opts = c"size=1m,mode=0755";
            if libc::mount(
                c"tmpfs".as_ptr(),
                self.root.as_ptr(),
                c"tmpfs".as_ptr(),
                MS_NOSUID | MS_NODEV,
                opts.as_ptr().cast(),
            ) != 0
            {
                return Err("mounting the view's root");
            }
            for op in &self.ops {
                match op {
                    Op::Mkdir(p) => {
                        if libc::mkdir(p.as_ptr(), 0o755) != 0 && *libc::__errno_location() != libc::EEXIST {
                            return Err("making a directory of the view");
                        }
                    }
                    Op::Touch(p) => {
                        let fd = libc::open(p.as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o600);
                        if fd < 0 {
                            return Err("making a file of the view");
                        }
                        libc::close(fd);
                    }
                    Op::Symlink { target, at } => {
                        if libc::symlink(target.as_ptr(), at.as_ptr()) != 0 {
                            return Err("making a link of the view");
                        }
                    }
                    Op::Bind { src, dst, read_only, devices } => {
                        if libc::mount(src.as_ptr(), dst.as_ptr(), null, MS_BIND | MS_REC, std::ptr::null()) != 0 {
                            return Err("binding a path into the view");
                        }
                        let mut flags: c_ulong = MS_BIND | MS_REMOUNT | MS_NOSUID;
                        if !devices {
                            flags |= MS_NODEV;
                        }
                        if *read_only {
                            flags |= MS_RDONLY;
                        }
                        if libc::mount(null, dst.as_ptr(), null, flags, std::ptr::null()) != 0 {
                            return Err("restricting a path of the view");
                        }
                    }
                }
            }
            // The view becomes the root; the host's root, stacked beneath
            // it by pivot_root(".", "."), is detached.
            if libc::chdir(self.root.as_ptr()) != 0 {
                return Err("entering the view");
            }
            if libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) != 0 {
                return Err("pivot_root into the view");
            }
            if libc::umount2(c".".as_ptr(), libc::MNT_DETACH) != 0 {
                return Err("detaching the host's root");
            }
            if libc::chdir(c"/".as_ptr()) != 0 {
                return Err("entering the view's root");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_round_trips_and_junk_is_refused() {
        let v = FileView::for_qemu(
            false,
            [
                Shown::Bind { path: "/var/lib/strata/sessions/abc".into(), writable: true },
                Shown::Bind { path: "/var/lib/strata/blobs/sha256/00ff".into(), writable: false },
            ],
        );
        assert_eq!(FileView::decode(&v.encode()), Some(v.clone()));
        assert!(v.shown.contains(&Shown::Proc));
        assert!(!v.shown.iter().any(|s| matches!(s, Shown::Device(d) if d == Path::new("/dev/kvm"))));
        for junk in [&b"x:/a"[..], b"w:relative", b"l:/a", b"w", b"p:/proc"] {
            assert_eq!(FileView::decode(&[junk.to_vec()]), None, "{junk:?}");
        }
    }

    #[test]
    fn steps_make_each_parent_once_before_its_children() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("sessions/abc");
        std::fs::create_dir_all(&d).unwrap();
        let f = tmp.path().join("blobs/one");
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, "x").unwrap();
        let v = FileView {
            shown: vec![
                Shown::Bind { path: d.clone(), writable: true },
                Shown::Bind { path: f.clone(), writable: false },
            ],
        };
        let steps = v.steps().unwrap();
        let text: Vec<String> = steps.ops.iter().map(|o| format!("{o:?}")).collect();
        let root = Path::new(VIEW_MOUNT_POINT);
        let mk = |p: &Path| format!("Mkdir({:?})", cstring(&root.join(p.strip_prefix("/").unwrap())).unwrap());
        let first_tmp = text.iter().position(|t| *t == mk(tmp.path())).expect("the shared parent is made");
        assert_eq!(text.iter().filter(|t| **t == mk(tmp.path())).count(), 1, "{text:?}");
        let session = text.iter().position(|t| *t == mk(&d)).unwrap();
        assert!(first_tmp < session);
        assert!(text.iter().any(|t| t.starts_with("Touch(") && t.contains("blobs/one")), "{text:?}");
        assert!(text.iter().any(|t| t.contains("read_only: true") && t.contains("blobs/one")), "{text:?}");
    }
}
