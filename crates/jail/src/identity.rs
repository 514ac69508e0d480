//! A uid and gid of its own for every VM.
//!
//! QEMU never runs as root: each VM gets a user and group id from a range
//! the server owns, the subordinate ids of the system user `strata` in
//! `/etc/subuid` and `/etc/subgid` (the setup makes them; an operator may
//! set any range there). Ids are claimed host-wide, since several strata
//! stores may share one host (a cluster's agents in a test, a CLI beside a
//! server): a claim is a file named after the uid in [`CLAIMS_DIR`],
//! created exclusively, that says which store and VM hold it. Claims start
//! at a random place in the range, so an id is seldom reused soon.

use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::{io_err, Error};

/// The system user whose subordinate ids VMs run as.
pub const VM_USER: &str = "strata";

/// Where claims are kept: on a tmpfs, so a reboot (which ends every VM)
/// frees them all.
pub const CLAIMS_DIR: &str = "/run/strata/vm-ids";

/// A contiguous range of ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub uid_start: u32,
    pub gid_start: u32,
    pub count: u32,
}

impl IdRange {
    /// The last uid of the range.
    pub fn uid_end(&self) -> u32 {
        self.uid_start + self.count - 1
    }

    /// Reads `VM_USER`'s range from `subuid` and `subgid` text.
    ///
    /// # Errors
    /// [`Error::Setup`] naming what to add if either has no usable entry.
    pub fn parse(subuid: &str, subgid: &str) -> Result<IdRange, Error> {
        let find = |text: &str, file: &str| -> Result<(u32, u32), Error> {
            let entry = text.lines().find_map(|l| {
                let mut f = l.trim().split(':');
                (f.next() == Some(VM_USER)).then(|| {
                    let start = f.next().and_then(|s| s.parse::<u32>().ok());
                    let count = f.next().and_then(|s| s.parse::<u32>().ok());
                    (start, count)
                })
            });
            match entry {
                Some((Some(start), Some(count)))
                    if start >= 1000 && count >= 1 && start.checked_add(count).is_some() =>
                {
                    Ok((start, count))
                }
                Some(_) => Err(Error::Setup(format!(
                    "the {file} entry of {VM_USER:?} is malformed or starts below 1000: it must read \
                     `{VM_USER}:START:COUNT`"
                ))),
                None => Err(Error::Setup(format!(
                    "{file} gives the user {VM_USER:?} no ids for VMs to run as: run `scripts/deps.sh`, \
                     or `useradd --system {VM_USER}; usermod --add-subuids 2000000-2065535 \
                     --add-subgids 2000000-2065535 {VM_USER}`"
                ))),
            }
        };
        let (uid_start, uids) = find(subuid, "/etc/subuid")?;
        let (gid_start, gids) = find(subgid, "/etc/subgid")?;
        Ok(IdRange { uid_start, gid_start, count: uids.min(gids) })
    }

    /// The range of this host.
    ///
    /// # Errors
    /// As [`IdRange::parse`], or if the files cannot be read.
    pub fn of_host() -> Result<IdRange, Error> {
        let read = |p: &str| {
            fs::read_to_string(p).or_else(|e| {
                if e.kind() == ErrorKind::NotFound {
                    Ok(String::new())
                } else {
                    Err(io_err(Path::new(p))(e))
                }
            })
        };
        IdRange::parse(&read("/etc/subuid")?, &read("/etc/subgid")?)
    }
}

/// The ids of one VM, claimed until it is released (dropped).
#[derive(Debug)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the `kvm` group where KVM is used).
    pub groups: Vec<u32>,
    claim: Option<PathBuf>,
}

impl Identity {
    /// Gives `path` to this VM (owner and group), so QEMU can use it.
    ///
    /// # Errors
    /// If the owner cannot be changed.
    pub fn grant(&self, path: &Path) -> Result<(), Error> {
        give(path, self.uid, self.gid)
    }

    /// Makes an empty file at `path` (or keeps the one there) owned by this
    /// VM, mode 0600: for files QEMU writes in directories it may not
    /// write (its console log, a saved state).
    ///
    /// # Errors
    /// If it cannot be made or given.
    pub fn grant_new_file(&self, path: &Path) -> Result<(), Error> {
        give_new_file(path, self.uid, self.gid)
    }

    /// Makes directory `path` owned by this VM, mode 0700: for what QEMU
    /// creates itself (the display's socket).
    ///
    /// # Errors
    /// If it cannot be made or given.
    pub fn grant_new_dir(&self, path: &Path) -> Result<(), Error> {
        match fs::DirBuilder::new().mode(0o700).create(path) {
            Err(e) if e.kind() != ErrorKind::AlreadyExists => return Err(io_err(path)(e)),
            _ => {}
        }
        self.grant(path)
    }

    /// Lets this VM's uid into the folder tree at `path` (a shared folder):
    /// an access list entry on every file and directory, and a default one
    /// on directories so what is made inside inherits it. The folder is
    /// noted in the claim, so the entries go when the ids are released,
    /// also by a sweep after a crash.
    ///
    /// # Errors
    /// If `setfacl` is missing or fails.
    pub fn grant_tree(&self, path: &Path, readonly: bool) -> Result<(), Error> {
        if let Some(claim) = &self.claim {
            let mut f = fs::OpenOptions::new().append(true).open(claim).map_err(io_err(claim))?;
            writeln!(f, "tree\t{}", path.display()).map_err(io_err(claim))?;
        }
        let entry = if readonly { format!("u:{}:rX", self.uid) } else { format!("u:{0}:rwX,d:u:{0}:rwX", self.uid) };
        setfacl(&["-R", "-m", &entry], path)
    }

    /// Keeps the claim when this handle goes (its VM lives on, detached);
    /// the sweep releases it once the VM is gone.
    pub fn keep(mut self) {
        self.claim = None;
    }

    /// Gives the ids back (also done on drop).
    pub fn release(&mut self) {
        if let Some(claim) = self.claim.take() {
            release_claim(&claim, self.uid);
        }
    }
}

/// Revokes the folder access a claim notes, then removes it.
fn release_claim(claim: &Path, uid: u32) {
    if let Ok(text) = fs::read_to_string(claim) {
        for tree in text.lines().filter_map(|l| l.strip_prefix("tree\t")) {
            if let Err(e) = setfacl(&["-R", "-x", &format!("u:{uid},d:u:{uid}")], Path::new(tree)) {
                tracing::warn!(error = %e, uid, "a shared folder keeps an access entry of a VM that ended");
            }
        }
    }
    let _ = fs::remove_file(claim);
}

fn setfacl(args: &[&str], path: &Path) -> Result<(), Error> {
    let out = std::process::Command::new("setfacl")
        .args(args)
        .arg("--")
        .arg(path)
        .output()
        .map_err(|e| Error::Setup(format!("setfacl ({e}): install the acl package (`apt-get install acl`)")))?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(Error::Setup(format!("sharing {} with a VM's uid: {why}", path.display())));
    }
    Ok(())
}

impl Drop for Identity {
    fn drop(&mut self) {
        self.release();
    }
}

/// Gives `path` to `uid` and `gid`, and to nobody else (mode 0600, or
/// 0700 for a directory).
///
/// # Errors
/// If the owner or mode cannot be changed.
pub fn give(path: &Path, uid: u32, gid: u32) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(io_err(path))?;
    let meta = fs::metadata(path).map_err(io_err(path))?;
    let mode = if meta.is_dir() { 0o700 } else { 0o600 };
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err(path))
}

/// Makes an empty file at `path` (or keeps the one there) and gives it to
/// `uid` and `gid` ([`give`]).
///
/// # Errors
/// If it cannot be made or given.
pub fn give_new_file(path: &Path, uid: u32, gid: u32) -> Result<(), Error> {
    fs::OpenOptions::new().write(true).create(true).truncate(false).mode(0o600).open(path).map_err(io_err(path))?;
    give(path, uid, gid)
}

/// The ids this host's VMs run as, and their claims.
#[derive(Debug, Clone)]
pub struct Identities {
    range: IdRange,
    claims: PathBuf,
    /// This store's directory: claims name it, so a sweep touches only its
    /// own, and claims of stores that are gone can be taken.
    store: PathBuf,
}

impl Identities {
    /// The host's range ([`IdRange::of_host`]), claims in [`CLAIMS_DIR`].
    ///
    /// # Errors
    /// [`Error::Setup`] if the host has no range for VMs.
    pub fn detect(store: &Path) -> Result<Identities, Error> {
        Identities::new(IdRange::of_host()?, Path::new(CLAIMS_DIR), store)
    }

    /// Ids from `range`, claims in `claims`.
    ///
    /// # Errors
    /// If the claims directory cannot be made.
    pub fn new(range: IdRange, claims: &Path, store: &Path) -> Result<Identities, Error> {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(claims).map_err(io_err(claims))?;
        let store = fs::canonicalize(store).unwrap_or_else(|_| store.to_path_buf());
        Ok(Identities { range, claims: claims.to_path_buf(), store })
    }

    pub fn range(&self) -> IdRange {
        self.range
    }

    /// Claims a uid and gid for VM `vm` (the name of its directory).
    ///
    /// # Errors
    /// [`Error::Setup`] if every id of the range is in use.
    pub fn claim(&self, vm: &str, groups: Vec<u32>) -> Result<Identity, Error> {
        let count = self.range.count;
        let start = random_below(count);
        let owner = format!("{}\n{vm}\n", self.store.display());
        for i in 0..count {
            let n = (start + i) % count;
            let uid = self.range.uid_start + n;
            let path = self.claims.join(uid.to_string());
            let mut taken = self.try_claim(&path, &owner)?;
            if !taken && self.claim_is_stale(&path) {
                let _ = fs::remove_file(&path);
                taken = self.try_claim(&path, &owner)?;
            }
            if taken {
                return Ok(Identity { uid, gid: self.range.gid_start + n, groups, claim: Some(path) });
            }
        }
        Err(Error::Setup(format!(
            "all {count} ids of the range for VMs (uids {}-{}) are in use: end sessions, or give the user \
             {VM_USER:?} a larger range in /etc/subuid and /etc/subgid",
            self.range.uid_start,
            self.range.uid_end()
        )))
    }

    fn try_claim(&self, path: &Path, owner: &str) -> Result<bool, Error> {
        match fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
            Ok(mut f) => {
                f.write_all(owner.as_bytes()).map_err(io_err(path))?;
                Ok(true)
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(io_err(path)(e)),
        }
    }

    /// A claim whose store is gone (a removed test store) holds nothing.
    /// One being written (empty) is not stale.
    fn claim_is_stale(&self, path: &Path) -> bool {
        let Ok(text) = fs::read_to_string(path) else { return false };
        match text.lines().next() {
            Some(store) if !store.is_empty() => !Path::new(store).exists(),
            _ => false,
        }
    }

    /// The ids VM `vm` of this store holds, if any (for one another
    /// process started): uid and gid.
    pub fn held_by(&self, vm: &str) -> Option<(u32, u32)> {
        self.claims_of_this_store().into_iter().find(|(_, v)| v == vm).map(|(uid, _)| (uid, self.gid_of(uid)))
    }

    fn gid_of(&self, uid: u32) -> u32 {
        self.range.gid_start + (uid - self.range.uid_start)
    }

    fn claims_of_this_store(&self) -> Vec<(u32, String)> {
        let Ok(entries) = fs::read_dir(&self.claims) else { return Vec::new() };
        let store = self.store.display().to_string();
        entries
            .flatten()
            .filter_map(|e| {
                let uid: u32 = e.file_name().to_str()?.parse().ok()?;
                let text = fs::read_to_string(e.path()).ok()?;
                let mut lines = text.lines();
                (lines.next()? == store).then(|| (uid, lines.next().unwrap_or_default().to_string()))
            })
            .filter(|(uid, _)| (self.range.uid_start..=self.range.uid_end()).contains(uid))
            .collect()
    }

    /// Releases this store's claims whose VM `is_live` says is gone (a VM's
    /// directory is made before its ids are claimed). Returns how many.
    pub fn sweep(&self, is_live: impl Fn(&str) -> bool) -> usize {
        let mut released = 0;
        for (uid, vm) in self.claims_of_this_store() {
            if !is_live(&vm) {
                release_claim(&self.claims.join(uid.to_string()), uid);
                released += 1;
            }
        }
        released
    }
}

/// A number in `0..n` that differs between calls and processes (where to
/// start looking; not for secrets).
fn random_below(n: u32) -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    (h.finish() % u64::from(n.max(1))) as u32
}

/// The id of group `name` in `/etc/group`, if it exists.
pub fn group_id(name: &str) -> Option<u32> {
    let text = fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next() == Some(name)).then(|| f.nth(1).and_then(|g| g.parse().ok())).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_range_comes_from_the_vm_users_entries() {
        let r = IdRange::parse("alice:100000:65536\nstrata:2000000:4096\n", "strata:3000000:1024\n").unwrap();
        assert_eq!(r, IdRange { uid_start: 2_000_000, gid_start: 3_000_000, count: 1024 });
        assert_eq!(r.uid_end(), 2_001_023);
    }

    #[test]
    fn a_missing_or_bad_range_says_what_to_set_up() {
        let missing = IdRange::parse("alice:100000:65536\n", "strata:1:2\n").unwrap_err().to_string();
        assert!(missing.contains("/etc/subuid") && missing.contains("usermod --add-subuids"), "{missing}");
        let low = IdRange::parse("strata:0:65536\n", "strata:2000000:10\n").unwrap_err().to_string();
        assert!(low.contains("below 1000"), "{low}");
        let junk = IdRange::parse("strata:2000000:x\n", "strata:2000000:10\n").unwrap_err().to_string();
        assert!(junk.contains("malformed"), "{junk}");
    }

    #[test]
    fn claims_are_exclusive_released_on_drop_and_exhaustion_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let store = tmp.path().join("store");
        fs::create_dir(&store).unwrap();
        let range = IdRange { uid_start: 5000, gid_start: 7000, count: 3 };
        let ids = Identities::new(range, &tmp.path().join("claims"), &store).unwrap();
        let a = ids.claim("vm-a", vec![]).unwrap();
        let b = ids.claim("vm-b", vec![]).unwrap();
        let c = ids.claim("vm-c", vec![]).unwrap();
        let mut uids = vec![a.uid, b.uid, c.uid];
        uids.sort_unstable();
        assert_eq!(uids, vec![5000, 5001, 5002]);
        assert_eq!(a.gid - 7000, a.uid - 5000);
        assert_eq!(ids.held_by("vm-b"), Some((b.uid, b.gid)));
        let full = ids.claim("vm-d", vec![]).unwrap_err().to_string();
        assert!(full.contains("in use") && full.contains("5000-5002"), "{full}");
        let freed = b.uid;
        drop(b);
        assert_eq!(ids.claim("vm-d", vec![]).unwrap().uid, freed);
    }

    #[test]
    fn a_sweep_frees_only_this_stores_dead_claims_and_a_gone_stores_claims_are_taken() {
        let tmp = tempfile::tempdir().unwrap();
        let (mine, gone) = (tmp.path().join("mine"), tmp.path().join("gone"));
        fs::create_dir(&mine).unwrap();
        fs::create_dir(&gone).unwrap();
        let claims = tmp.path().join("claims");
        let range = IdRange { uid_start: 5000, gid_start: 5000, count: 2 };
        let ours = Identities::new(range, &claims, &mine).unwrap();
        let theirs = Identities::new(range, &claims, &gone).unwrap();
        let mut live = ours.claim("live", vec![]).unwrap();
        let mut dead = theirs.claim("x", vec![]).unwrap();
        // Forgotten claims, as a killed process leaves them.
        live.claim = None;
        dead.claim = None;
        assert!(ours.claim("more", vec![]).is_err());
        assert_eq!(ours.sweep(|vm| vm == "live"), 0);
        fs::remove_dir(&gone).unwrap();
        let taken = ours.claim("more", vec![]).unwrap();
        assert_eq!(taken.uid, dead.uid);
        drop(taken);
        assert_eq!(ours.sweep(|_| false), 1, "the live one, once it is not");
    }
}
