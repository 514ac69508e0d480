//! Confinement of the QEMU processes strata starts. Each VM runs in a
//! control group of its own, made beneath the cgroup strata itself runs in
//! (never elsewhere in the hierarchy), which bounds its CPU time, its
//! memory and its number of tasks, so one guest spinning or one QEMU
//! growing cannot take from its neighbours.
//!
//! Both cgroup layouts are supported: v2 (one unified hierarchy, Debian
//! 12's default) and v1 (separate `cpu`, `memory` and `pids` hierarchies,
//! as on hosts whose unified hierarchy has no controllers). A VM's cgroup is
//! named `strata-<owner>-<vm>`: `<owner>` tells apart the strata stores
//! sharing one parent cgroup, `<vm>` is the name of the VM's directory, so
//! [`Cgroups::sweep`] can remove the cgroups of VMs that are gone.

pub mod identity;
pub mod network;

pub use identity::{IdRange, Identities, Identity};

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

/// What can go wrong with control groups.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The host cannot give strata what confinement needs.
    #[error("confinement: {0}")]
    Setup(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// The bounds of one VM's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// CPU time it may use, in percent of one CPU (100: one whole CPU).
    pub cpu_percent: u32,
    /// Memory it may use (guest RAM, QEMU's own, page cache it brings in);
    /// beyond it the kernel reclaims, then kills it (and only it).
    pub memory_bytes: u64,
    /// Tasks (QEMU's threads) it may have.
    pub pids: u32,
}

/// The CPU accounting period the quota applies to, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// Where strata makes the cgroups of its VMs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Layout {
    /// cgroup v2: the directory beneath which VMs' cgroups go (strata's
    /// own cgroup, with the controllers enabled for its children).
    Unified(PathBuf),
    /// cgroup v1: strata's own cgroup in each of the three hierarchies.
    Split { cpu: PathBuf, memory: PathBuf, pids: PathBuf },
}

/// The control groups of this process's VMs.
#[derive(Debug, Clone)]
pub struct Cgroups {
    layout: Layout,
    /// Tells this store's VMs from other stores' in a shared parent.
    owner: String,
}

/// One VM's control group (a directory in each hierarchy).
#[derive(Debug)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
    unified: bool,
}

/// One line of /proc/PID/cgroup: hierarchy id, controllers, path.
fn parse_proc_cgroup(text: &str) -> Vec<(String, Vec<String>, String)> {
    text.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let id = parts.next()?.to_string();
            let ctrls = parts.next()?.split(',').filter(|c| !c.is_empty()).map(str::to_string).collect();
            let path = parts.next()?.to_string();
            Some((id, ctrls, path))
        })
        .collect()
}

/// A cgroup mount from /proc/self/mountinfo: its root within the
/// hierarchy, where it is mounted, its file system type, its super options.
struct Mount {
    root: String,
    point: PathBuf,
    fstype: String,
    options: Vec<String>,
}

fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            let (root, point) = (f.get(3)?, f.get(4)?);
            let fstype = r.first()?;
            if *fstype != "cgroup" && *fstype != "cgroup2" {
                return None;
            }
            Some(Mount {
                root: unescape(root),
                point: PathBuf::from(unescape(point)),
                fstype: fstype.to_string(),
                options: r.get(2).map(|o| o.split(',').map(str::to_string).collect()).unwrap_or_default(),
            })
        })
        .collect()
}

/// mountinfo escapes spaces and the like as octal (`\040`).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The directory of cgroup `path` under `mount`.
fn dir_of(mount: &Mount, path: &str) -> PathBuf {
    let rel = if mount.root == "/" { path } else { path.strip_prefix(mount.root.as_str()).unwrap_or(path) };
    match rel.trim_start_matches('/') {
        "" => mount.point.clone(),
        rel => mount.point.join(rel),
    }
}

/// Where this process's VMs' cgroups go, from its /proc/self/cgroup and
/// /proc/self/mountinfo: v1 if the `cpu`, `memory` and `pids` controllers
/// are mounted as v1 hierarchies, else v2 if the unified hierarchy has them.
fn find_layout(proc_cgroup: &str, mountinfo: &str, controllers_of: impl Fn(&Path) -> String) -> Result<Layout, Error> {
    let lines = parse_proc_cgroup(proc_cgroup);
    let mounts = parse_mountinfo(mountinfo);
    let v1 = |ctrl: &str| {
        let (_, _, path) = lines.iter().find(|(id, ctrls, _)| id != "0" && ctrls.iter().any(|c| c == ctrl))?;
        let m = mounts.iter().find(|m| m.fstype == "cgroup" && m.options.iter().any(|o| o == ctrl))?;
        Some(dir_of(m, path))
    };
    if let (Some(cpu), Some(memory), Some(pids)) = (v1("cpu"), v1("memory"), v1("pids")) {
        return Ok(Layout::Split { cpu, memory, pids });
    }
    let unified = lines.iter().find(|(id, _, _)| id == "0").zip(mounts.iter().find(|m| m.fstype == "cgroup2"));
    if let Some(((_, _, path), m)) = unified {
        let dir = dir_of(m, path);
        let have = controllers_of(&dir);
        let missing: Vec<&str> =
            ["cpu", "memory", "pids"].into_iter().filter(|c| !have.split_whitespace().any(|h| h == *c)).collect();
        if missing.is_empty() {
            return Ok(Layout::Unified(dir));
        }
        return Err(Error::Setup(format!(
            "strata's cgroup {} lacks the {} controller(s); delegate them to it (systemd: run strata in a unit with Delegate=yes)",
            dir.display(),
            missing.join(", ")
        )));
    }
    Err(Error::Setup(
        "neither cgroup v2 nor the v1 cpu, memory and pids hierarchies are mounted; mount them (Debian 12 does by default)"
            .into(),
    ))
}

fn write(path: &Path, value: &str) -> Result<(), Error> {
    fs::write(path, value).map_err(io_err(path))
}

impl Cgroups {
    /// Finds where this process may make its VMs' cgroups: beneath its own
    /// cgroup, with the controllers for CPU, memory and tasks. Under v2 the
    /// controllers are enabled for its children; if its own cgroup holds
    /// only this process, it first moves into a leaf `strata-main` beneath
    /// (a v2 cgroup with processes cannot enable controllers for children).
    /// `owner` names this store's VMs (a short word of letters and digits).
    ///
    /// # Errors
    /// [`Error::Setup`], naming what to set up, if the host lacks the
    /// controllers or strata's cgroup cannot hand them on.
    pub fn detect(owner: &str) -> Result<Cgroups, Error> {
        let proc_cgroup = fs::read_to_string("/proc/self/cgroup").map_err(io_err(Path::new("/proc/self/cgroup")))?;
        let mountinfo =
            fs::read_to_string("/proc/self/mountinfo").map_err(io_err(Path::new("/proc/self/mountinfo")))?;
        let layout = find_layout(&proc_cgroup, &mountinfo, |d| {
            fs::read_to_string(d.join("cgroup.controllers")).unwrap_or_default()
        })?;
        if let Layout::Unified(dir) = &layout {
            enable_for_children(dir)?;
        }
        let cgroups = Cgroups { layout, owner: owner.to_string() };
        for dir in cgroups.parents() {
            if fs::metadata(dir).is_err() {
                return Err(Error::Setup(format!("strata's own cgroup {} is not there", dir.display())));
            }
        }
        Ok(cgroups)
    }

    fn parents(&self) -> Vec<&Path> {
        match &self.layout {
            Layout::Unified(d) => vec![d.as_path()],
            Layout::Split { cpu, memory, pids } => vec![cpu.as_path(), memory.as_path(), pids.as_path()],
        }
    }

    /// "v2" or "v1", and the parent directories, for diagnostics.
    pub fn describe(&self) -> String {
        let dirs: Vec<String> = self.parents().iter().map(|d| d.display().to_string()).collect();
        match self.layout {
            Layout::Unified(_) => format!("cgroup v2 beneath {}", dirs.join(", ")),
            Layout::Split { .. } => format!("cgroup v1 beneath {}", dirs.join(", ")),
        }
    }

    fn name(&self, vm: &str) -> String {
        format!("strata-{}-{vm}", self.owner)
    }

    /// Makes the cgroup of VM `vm` (the name of its directory) with
    /// `limits`; one left by an earlier VM of that name is reused. Nothing
    /// is left behind if a step fails.
    ///
    /// # Errors
    /// If a directory or a limit cannot be written.
    pub fn create(&self, vm: &str, limits: &Limits) -> Result<Cgroup, Error> {
        if vm.is_empty() || vm.contains('/') || vm.starts_with('.') {
            return Err(Error::Setup(format!("{vm:?} cannot name a cgroup")));
        }
        let cg = self.of(vm);
        let made = (|| {
            for d in &cg.dirs {
                match fs::create_dir(d) {
                    Err(e) if e.kind() != ErrorKind::AlreadyExists => return Err(io_err(d)(e)),
                    _ => {}
                }
            }
            cg.apply(limits)
        })();
        if let Err(e) = made {
            let _ = cg.remove();
            return Err(e);
        }
        Ok(cg)
    }

    /// The cgroup of VM `vm`, as [`Cgroups::create`] made it (for a VM
    /// another process started).
    pub fn of(&self, vm: &str) -> Cgroup {
        self.named(&self.name(vm))
    }

    /// The cgroup directory `name` in each hierarchy.
    fn named(&self, name: &str) -> Cgroup {
        Cgroup {
            dirs: self.parents().iter().map(|p| p.join(name)).collect(),
            unified: matches!(self.layout, Layout::Unified(_)),
        }
    }

    /// Removes the cgroups of this store's VMs that have no task left and
    /// whose VM `is_live` says is gone (a VM's directory is made before its
    /// cgroup, so one being started is live), and those of other stores'
    /// VMs that have had no task for [`ABANDONED_AFTER`] (their strata
    /// process was killed before it could remove them, and its store may
    /// be gone). Returns how many went.
    pub fn sweep(&self, is_live: impl Fn(&str) -> bool) -> usize {
        let ours = format!("strata-{}-", self.owner);
        let Some(first) = self.parents().first().map(|p| p.to_path_buf()) else { return 0 };
        let Ok(entries) = fs::read_dir(&first) else { return 0 };
        let mut removed = 0;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let gone = match name.strip_prefix(&ours) {
                Some(vm) => !is_live(vm),
                // Another store's: `strata-OWNER-VM`, untouched for long.
                None => {
                    let foreign = name.strip_prefix("strata-").is_some_and(|rest| rest.contains('-'));
                    let age = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
                    foreign && age.is_some_and(|a| a >= ABANDONED_AFTER)
                }
            };
            if !gone {
                continue;
            }
            let cg = self.named(&name);
            if cg.is_empty() && cg.remove().is_ok() {
                removed += 1;
            }
        }
        removed
    }
}

/// How long another store's VM cgroup stays without a task before a sweep
/// takes it for abandoned (a VM joins its cgroup seconds after it is made).
const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

/// Under v2, turns on the cpu, memory and pids controllers for the
/// children of `dir`, moving this process into a leaf beneath first when
/// `dir` holds only it.
fn enable_for_children(dir: &Path) -> Result<(), Error> {
    let subtree = dir.join("cgroup.subtree_control");
    let enabled = fs::read_to_string(&subtree).unwrap_or_default();
    if ["cpu", "memory", "pids"].iter().all(|c| enabled.split_whitespace().any(|e| e == *c)) {
        return Ok(());
    }
    let first = fs::write(&subtree, "+cpu +memory +pids");
    match first {
        Ok(()) => return Ok(()),
        Err(e) if e.raw_os_error() != Some(libc::EBUSY) => return Err(io_err(&subtree)(e)),
        Err(_) => {}
    }
    // No internal processes: only a cgroup without tasks hands controllers on.
    let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    let me = std::process::id().to_string();
    if procs.lines().any(|p| p.trim() != me) {
        return Err(Error::Setup(format!(
            "strata's cgroup {} holds other processes, so it cannot give its VMs cgroups of their own; \
             run strata in a cgroup of its own with the cpu, memory and pids controllers delegated \
             (systemd: a service with Delegate=yes, or `systemd-run --scope -p Delegate=yes strata ...`)",
            dir.display()
        )));
    }
    let leaf = dir.join("strata-main");
    match fs::create_dir(&leaf) {
        Err(e) if e.kind() != ErrorKind::AlreadyExists => return Err(io_err(&leaf)(e)),
        _ => {}
    }
    write(&leaf.join("cgroup.procs"), &me)?;
    write(&subtree, "+cpu +memory +pids")
}

impl Cgroup {
    fn apply(&self, limits: &Limits) -> Result<(), Error> {
        let quota = u64::from(limits.cpu_percent.max(1)) * CPU_PERIOD_US / 100;
        if self.unified {
            let d = &self.dirs[0];
            write(&d.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
            write(&d.join("memory.max"), &limits.memory_bytes.to_string())?;
            // No swap: the bound is on memory, not memory plus swap.
            if d.join("memory.swap.max").exists() {
                write(&d.join("memory.swap.max"), "0")?;
            }
            // Killed, if it comes to that, as a whole.
            write(&d.join("memory.oom.group"), "1")?;
            write(&d.join("pids.max"), &limits.pids.to_string())?;
        } else {
            let (cpu, memory, pids) = (&self.dirs[0], &self.dirs[1], &self.dirs[2]);
            write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
            write(&cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
            // memsw must stay at or above the plain limit: lower it last
            // when lowering, raise it first when raising.
            let memsw = memory.join("memory.memsw.limit_in_bytes");
            let bytes = limits.memory_bytes.to_string();
            if memsw.exists() {
                let _ = fs::write(&memsw, &bytes);
                write(&memory.join("memory.limit_in_bytes"), &bytes)?;
                write(&memsw, &bytes)?;
            } else {
                write(&memory.join("memory.limit_in_bytes"), &bytes)?;
            }
            write(&pids.join("pids.max"), &limits.pids.to_string())?;
        }
        Ok(())
    }

    /// The `cgroup.procs` file of each hierarchy: writing `0` to each moves
    /// the writer (a child between fork and exec, say) into this cgroup.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// The cgroup's directories (one per hierarchy).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Moves process `pid` (all its threads) into this cgroup.
    ///
    /// # Errors
    /// If a hierarchy refuses it.
    pub fn add(&self, pid: u32) -> Result<(), Error> {
        for f in self.procs_files() {
            write(&f, &pid.to_string())?;
        }
        Ok(())
    }

    /// Whether no task is left in it (in any hierarchy).
    pub fn is_empty(&self) -> bool {
        self.procs_files().iter().all(|f| fs::read_to_string(f).map(|s| s.trim().is_empty()).unwrap_or(true))
    }

    /// Whether the kernel killed a task of it for exceeding its memory.
    pub fn oom_killed(&self) -> bool {
        let (file, dir) =
            if self.unified { ("memory.events", &self.dirs[0]) } else { ("memory.oom_control", &self.dirs[1]) };
        fs::read_to_string(dir.join(file))
            .ok()
            .and_then(|t| {
                t.lines().find_map(|l| l.strip_prefix("oom_kill ").and_then(|n| n.trim().parse::<u64>().ok()))
            })
            .is_some_and(|n| n > 0)
    }

    /// Removes it (each hierarchy's directory); one already gone is fine.
    ///
    /// # Errors
    /// If a task is still in it.
    pub fn remove(&self) -> Result<(), Error> {
        let mut first = None;
        for d in &self.dirs {
            match fs::remove_dir(d) {
                Err(e) if e.kind() != ErrorKind::NotFound => {
                    first.get_or_insert(io_err(d)(e));
                }
                _ => {}
            }
        }
        first.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests;
