//! The launch image (the program started, ready, and saved with the VM's
//! memory and devices) and launching sessions from the four images.

use std::collections::BTreeMap;
use std::time::Duration;

use sha2::{Digest, Sha256};
use strata_package::Package;
use strata_proto::{HostMsg, Readiness};
use strata_store::{ImageKind, ImageRecord};
use strata_vmm::{Accel, AfterLoad, Disk, DiskMode, Memory, Plug, VmConfig};

use crate::context::ContextSettings;
use crate::session::{boot_for_build, spawn_ready, start_and_attach, Attached, Session};
use crate::sessions::SessionRecord;
use crate::tools::rebase_to_digest;
use crate::{Engine, Error, Progress, ARCH};

/// How long a VM may take to connect its agent (a cold boot under TCG takes seconds).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// The images a launch concatenates.
#[derive(Debug, Clone)]
pub struct ImageSet {
    pub base: ImageRecord,
    pub install: ImageRecord,
    pub launch: ImageRecord,
}

/// How a session was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchPath {
    /// From the launch image: restored, already running.
    LaunchImage,
    /// Booted from base <- install, program started and awaited.
    Cold,
}

fn readiness(pkg: &Package) -> Readiness {
    let r = &pkg.def.ready;
    if pkg.def.graphical {
        // The X launcher says when the program has had its time to draw.
        return Readiness::Text(strata_proto::X11_READY.into());
    }
    if let Some(t) = &r.text {
        Readiness::Text(t.clone())
    } else if let Some(p) = r.port {
        Readiness::Port(p)
    } else {
        Readiness::AliveMs(r.alive_ms.unwrap_or(1000))
    }
}

/// The program's command line; a graphical program is started by the
/// agent's X launcher, which brings up the X server on the VM's display first.
fn argv_of(pkg: &Package) -> Vec<String> {
    let mut argv = Vec::new();
    if pkg.def.graphical {
        argv.extend(["/run/strata/agent", "x11", "--"].map(String::from));
    }
    argv.extend(pkg.def.command.iter().cloned());
    argv
}

fn env_of(pkg: &Package) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = pkg.def.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    if pkg.def.graphical {
        let settle = pkg.def.ready.alive_ms.unwrap_or(1000);
        env.push(("STRATA_X11_SETTLE_MS".into(), settle.to_string()));
        env.push(("DISPLAY".into(), ":0".into()));
    }
    env
}

pub(crate) fn new_session_id() -> String {
    let mut h = Sha256::new();
    h.update(std::process::id().to_le_bytes());
    h.update(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
            .to_le_bytes(),
    );
    hex::encode(&h.finalize()[..6])
}

/// How a launch build prepares its guest before the program starts (the
/// disk reserve); a change here makes new launch images.
const LAUNCH_BUILD: &str = "standby-on-pipes,standby-shells";

/// Recipe of a launch image: everything that shapes the saved VM.
pub fn launch_recipe(base: &ImageRecord, install: &ImageRecord, pkg: &Package, accel: Accel, qemu: &str) -> String {
    let mut h = Sha256::new();
    for part in [
        "launch",
        LAUNCH_BUILD,
        strata_vmm::SNAPSHOT_FORMAT,
        &base.digest,
        &install.digest,
        &pkg.def.digest(),
        accel.as_str(),
        qemu,
    ] {
        h.update(part.as_bytes());
        h.update(b"\0");
    }
    hex::encode(h.finalize())
}

/// What a launch image is built from, and whether with a network device.
#[derive(Clone, Copy)]
struct LaunchBuild<'a> {
    pkg: &'a Package,
    base: &'a ImageRecord,
    install: &'a ImageRecord,
    accel: Accel,
    recipe: &'a str,
    networked: bool,
}

/// Meta of a launch image whose saved state holds an outbound network's
/// device (`network`), configured: a session whose only device is a
/// network (E2B's sandboxes) is restored from it with the device declared
/// on QEMU's command line, instead of hot-plugging one, which under TCG
/// costs ~0.17 s of CPU (the guest's PCI hotplug and driver probe).
pub const NETWORKED_META: &str = "plugs";

/// Recipe of the networked sibling of launch image `launch`.
pub fn networked_recipe(launch: &ImageRecord) -> String {
    hex::encode(Sha256::digest(format!("launch-networked-v1\0{}", launch.recipe)))
}

/// The command id, in a launch image, of the package's program started a
/// second time with pipes and left waiting for its input (a standby): a
/// scripted run (`printf ... | strata run PACKAGE`) takes it instead of
/// starting the program afresh, whose start (under TCG, translating it
/// anew) costs more than the launch itself. Named in the image's meta.
pub const STANDBY_PROC: strata_proto::ProcId = 3;
const STANDBY_META: &str = "standby";
/// The id of the command that looks at the standby while it starts.
const STANDBY_CHECK: strata_proto::ProcId = 4;

/// The command ids, in a launch image, of login shells started with pipes
/// and left waiting for a command (standby shells): a command in the shape
/// E2B's SDKs give every command (`/bin/bash -l -c CMD`, as root, with no
/// environment or directory of its own) is handed to one (see
/// [`shell_standby_input`]) instead of starting a new login shell, whose
/// start (under TCG, translating bash, its profile's programs and the
/// kernel's exec afresh) costs ~0.4 s of CPU. Two: a pool warms a session
/// by running `echo warm` on the first (the second's command then runs on code
/// already translated). Named in the image's meta.
pub const SHELL_STANDBY_PROCS: [strata_proto::ProcId; 2] = [5, 7];
const SHELL_STANDBY_META: &str = "shell-standby";
/// The shell's argv: it reads one command up to a NUL byte from its input
/// (the rest of which is the command's), then runs it as `-c` would.
pub const SHELL_STANDBY_ARGV: [&str; 4] =
    ["/bin/bash", "-l", "-c", "IFS= read -r -d '' strata_command && eval \"unset strata_command; $strata_command\""];

/// What to write to a standby shell's input to run `command` there, if it
/// is one a standby shell runs exactly as a new `/bin/bash -l -c CMD`
/// would: that argv, as root, in the default directory and environment
/// (an environment of its own would be set before the profile runs).
pub fn shell_standby_input(command: &crate::GuestCommand) -> Option<Vec<u8>> {
    let crate::GuestCommand { argv, env, cwd, user } = command;
    let [bash, login, dash_c, script] = argv.as_slice() else { return None };
    let shape = bash == "/bin/bash" && login == "-l" && dash_c == "-c";
    let root = user.as_deref().is_none_or(|u| u == "root");
    (shape && root && env.is_empty() && cwd.is_none() && !script.contains('\0')).then(|| {
        let mut input = script.clone().into_bytes();
        input.push(0);
        input
    })
}

/// Starts the standby ([`STANDBY_PROC`]) in a launch build's guest and
/// waits (60 s at most) until it blocks reading its input: then its start
/// is in the image. `false` for a program that does not wait on pipes
/// (it exits, needs a terminal, or neither reads nor ends: then it is
/// killed) or a graphical package.
async fn start_standby(a: &mut Attached, pkg: &Package) -> Result<bool, Error> {
    if pkg.def.graphical {
        return Ok(false);
    }
    let exec = HostMsg::Exec { id: STANDBY_PROC, argv: argv_of(pkg), env: env_of(pkg), cwd: None, user: None };
    wait_until_reading(a, exec, STANDBY_CHECK).await
}

/// Starts the standby shells ([`SHELL_STANDBY_PROCS`]) in a launch build's
/// guest, each waited for until it blocks reading its command; those that
/// do (none without bash, say) are in the image.
async fn start_shell_standbys(a: &mut Attached) -> Result<Vec<strata_proto::ProcId>, Error> {
    let mut started = Vec::new();
    for id in SHELL_STANDBY_PROCS {
        let argv = SHELL_STANDBY_ARGV.map(String::from).to_vec();
        let exec = HostMsg::Exec { id, argv, env: Vec::new(), cwd: None, user: None };
        // Each looked at by the id after its own.
        if wait_until_reading(a, exec, id + 1).await? {
            started.push(id);
        }
    }
    Ok(started)
}

/// Sends `exec` (a command with pipes) and waits (60 s at most) until its
/// process blocks reading its input, looked at with command `check`;
/// `false` if it ends first or never reads (then it is killed).
async fn wait_until_reading(a: &mut Attached, exec: HostMsg, check: strata_proto::ProcId) -> Result<bool, Error> {
    use strata_proto::GuestMsg;
    let HostMsg::Exec { id, .. } = exec else {
        return Err(Error::Config("a standby is a command with pipes".into()));
    };
    a.conn.send(&exec).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut pid: Option<i32> = None;
    let mut checking = false;
    loop {
        if let (Some(pid), false) = (pid, checking) {
            // Blocked in read(2) on descriptor 0: /proc/PID/syscall starts "0 0x0".
            let script = "read nr fd rest < /proc/$1/syscall && [ \"$nr $fd\" = \"0 0x0\" ]";
            let argv = ["/bin/sh", "-c", script, "sh", &pid.to_string()].map(String::from).to_vec();
            a.conn.send(&HostMsg::Exec { id: check, argv, env: Vec::new(), cwd: None, user: None }).await?;
            a.conn.send(&HostMsg::Eof { id: check }).await?;
            checking = true;
        }
        let Ok(msg) = tokio::time::timeout_at(deadline, a.conn.recv()).await else {
            // A program that neither reads its input nor ends (a server,
            // say) gets no standby; the image is built without it.
            a.conn.send(&HostMsg::Signal { id, signal: 9 }).await?;
            return Ok(false);
        };
        match msg? {
            Some(GuestMsg::Spawned { id: i, pid: p }) if i == id => pid = Some(p),
            Some(GuestMsg::Exited { id: i, .. }) if i == id => return Ok(false),
            Some(GuestMsg::Exited { id: i, status: 0 }) if i == check => return Ok(true),
            Some(GuestMsg::Exited { id: i, .. }) if i == check => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                checking = false;
            }
            Some(_) => {}
            None => return Err(Error::AgentGone("starting a standby")),
        }
    }
}

/// What the host lets a session write beyond what its guest sees free:
/// the guest file system's journal (64 MiB on its 8 GiB root), metadata,
/// and qcow2's cluster rounding.
pub const DISK_SLACK_MIB: u32 = 256;

/// The file a launch image's guest keeps allocated (never written) so that
/// its root file system has the package's `disk_mib` free.
const DISK_RESERVE: &str = "/.strata-disk-reserve";

/// In a launch build's guest, before the program starts: allocates
/// [`DISK_RESERVE`] so that the root file system has `disk_mib` MiB free
/// for root, who runs the guest's programs (ext4 keeps 5% for root alone:
/// other users see that much less).
/// A session then sees "no space left" where its bound is, instead of an
/// I/O error when the host stops its writes. (Allocated, not written: it
/// costs the image a few MiB of metadata.)
async fn reserve_disk(a: &mut Attached, pkg: &Package) -> Result<(), Error> {
    const RESERVE_PROC: strata_proto::ProcId = 2;
    let script = format!(
        "set -e; set -- $(stat -f -c '%f %S' /); free_kib=$(($1 * $2 / 1024)); \
         reserve_kib=$((free_kib - {want})); \
         if [ \"$reserve_kib\" -gt 0 ]; then fallocate -l \"${{reserve_kib}}KiB\" {DISK_RESERVE}; \
         chmod 0 {DISK_RESERVE}; sync; fi",
        want = u64::from(pkg.def.disk_mib) * 1024,
    );
    a.conn
        .send(&HostMsg::Spawn {
            id: RESERVE_PROC,
            argv: vec!["/bin/sh".into(), "-c".into(), script],
            env: Vec::new(),
            readiness: Readiness::AliveMs(0),
            ready_timeout_ms: 1000,
        })
        .await?;
    let mut output = Vec::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(120), a.conn.recv())
            .await
            .map_err(|_| Error::Timeout { what: "reserving the guest's disk".into(), secs: 120 })??;
        match msg {
            Some(strata_proto::GuestMsg::Output { id: RESERVE_PROC, data }) => output.extend_from_slice(&data),
            Some(strata_proto::GuestMsg::Exited { id: RESERVE_PROC, status: 0 }) => return Ok(()),
            Some(strata_proto::GuestMsg::Exited { id: RESERVE_PROC, status }) => {
                return Err(Error::InstallFailed {
                    package: pkg.name.clone(),
                    output: format!(
                        "reserving the guest's disk exited with {status}: {}",
                        String::from_utf8_lossy(&output).trim()
                    ),
                })
            }
            Some(strata_proto::GuestMsg::Failed { id: RESERVE_PROC, reason }) => {
                return Err(Error::InstallFailed { package: pkg.name.clone(), output: reason })
            }
            Some(_) => {}
            None => return Err(Error::AgentGone("reserving the guest's disk")),
        }
    }
}

impl Engine {
    /// Refuses a package whose guest may write `disk_mib` MiB when this
    /// server bounds each session's files below that (plus the slack for
    /// the file system's own writes): its guest would meet I/O errors
    /// instead of "no space left on device".
    ///
    /// # Errors
    /// [`Error::Refused`], naming both figures and what to change.
    pub fn check_disk_cap(&self, package: &str, disk_mib: u32) -> Result<(), Error> {
        let cap = self.cfg.vm_limits.disk_mib;
        let needed = disk_mib.saturating_add(DISK_SLACK_MIB);
        if self.confined() && needed > cap {
            return Err(Error::Refused(format!(
                "{package} may write {disk_mib} MiB to its disk, and this server bounds what a session writes \
                 at {cap} MiB (STRATA_DISK_MIB): raise STRATA_DISK_MIB to at least {needed}, or lower the \
                 package's disk_mib"
            )));
        }
        Ok(())
    }

    /// The most a session's QEMU may write to one file: what its guest may
    /// write (the image's `disk_mib`) plus [`DISK_SLACK_MIB`], capped by
    /// the server's `STRATA_DISK_MIB`; never below the guest's RAM plus
    /// 64 MiB, since a pause writes the RAM into one file.
    fn file_size_limit(&self, image: &ImageRecord, memory_mib: u32) -> u64 {
        // `check_disk_cap` refused any image whose guest may write more.
        let guest = image.meta.get("disk_mib").and_then(|d| d.parse::<u32>().ok());
        let disk = guest
            .map_or(self.cfg.vm_limits.disk_mib, |g| g.saturating_add(DISK_SLACK_MIB).min(self.cfg.vm_limits.disk_mib));
        u64::from(disk.max(memory_mib + 64)) << 20
    }

    /// Base, install and launch images of a package, each built if missing.
    ///
    /// # Errors
    /// If a build fails.
    pub async fn ensure_images(&self, pkg: &Package, progress: &dyn Progress) -> Result<ImageSet, Error> {
        let fetched_before = self.remote.as_ref().map(|r| r.downloads());
        let base = self.ensure_base(pkg.os, progress).await?;
        let install = self.ensure_install(pkg, &base, progress).await?;
        let accel = self.accel_for(&base).await?;
        let recipe = launch_recipe(&base, &install, pkg, accel, &crate::accel::qemu_identity());
        let build = LaunchBuild { pkg, base: &base, install: &install, accel, recipe: &recipe, networked: false };
        let launch = self.ensure_launch(&build, progress).await?;
        // Fetches grew the local cache: trimmed once all three are here.
        if self.remote.as_ref().map(|r| r.downloads()) != fetched_before {
            self.trim_cache(&[&base, &install, &launch]).await?;
        }
        Ok(ImageSet { base, install, launch })
    }

    /// The launch image of `pkg` with an outbound network's device in its
    /// saved state (see [`NETWORKED_META`]), built if the catalog has none.
    ///
    /// # Errors
    /// If building fails.
    pub async fn ensure_networked(
        &self,
        pkg: &Package,
        images: &ImageSet,
        progress: &dyn Progress,
    ) -> Result<ImageRecord, Error> {
        let accel = self.accel_for(&images.base).await?;
        let recipe = networked_recipe(&images.launch);
        let build =
            LaunchBuild { pkg, base: &images.base, install: &images.install, accel, recipe: &recipe, networked: true };
        self.ensure_launch(&build, progress).await
    }

    /// The launch image `build` makes, built if the catalog has none.
    async fn ensure_launch(&self, build: &LaunchBuild<'_>, progress: &dyn Progress) -> Result<ImageRecord, Error> {
        if let Some(rec) = self.find_image(ImageKind::Launch, build.recipe).await? {
            return Ok(rec);
        }
        let _lock = self.store.lock_recipe(build.recipe)?;
        if let Some(rec) = self.find_image(ImageKind::Launch, build.recipe).await? {
            return Ok(rec);
        }
        let rec = self.build_launch(build, progress).await?;
        self.share(&rec).await;
        Ok(rec)
    }

    /// A VM booting the base image's kernel (disks and memory to be set).
    pub(crate) fn boot_config(
        &self,
        base: &ImageRecord,
        dir: &std::path::Path,
        accel: Accel,
        memory_mib: u32,
    ) -> Result<VmConfig, Error> {
        Ok(VmConfig {
            dir: dir.to_path_buf(),
            accel,
            memory_mib,
            memory: Memory::Anonymous,
            kernel: self.store.blob_path(base.file("kernel")?),
            initramfs: self.store.blob_path(base.file("initramfs")?),
            cmdline: base.meta.get("cmdline").cloned().unwrap_or_else(|| crate::base::CMDLINE.into()),
            disks: Vec::new(),
            incoming: None,
            plugs: Vec::new(),
            plugs_in_state: false,
            display: false,
            die_with_parent: true,
            niceness: 0,
            fork_server: self.fork_server(),
            cgroup: self.cgroup_for(memory_mib)?,
            identity: self.identity_for(accel)?,
            // Builds write large memory files; only sessions are bounded.
            file_size_limit: None,
            sandbox: self.confined(),
            after_load: AfterLoad::AsSaved,
            whole_state: false,
            incoming_stream: None,
        })
    }

    async fn build_launch(&self, build: &LaunchBuild<'_>, progress: &dyn Progress) -> Result<ImageRecord, Error> {
        let LaunchBuild { pkg, base, install, accel, recipe, networked } = *build;
        progress.step(&format!("launch image for {}: booting and starting {}", pkg.name, pkg.def.command.join(" ")));
        let work = self.store.work_dir("launch")?;
        let w = work.path();
        let mut settings = ContextSettings::from_terminal(None);
        settings.network.outbound = networked;
        let overlay = w.join("disk.qcow2");
        strata_vmm::qcow2::create_overlay(&self.store.blob_path(install.file("disk")?), "qcow2", &overlay)?;
        let memory = w.join("memory");
        let state = w.join("state");
        let make = |dir: &std::path::Path| {
            let mut cfg = self.boot_config(base, dir, accel, pkg.def.memory_mib)?;
            cfg.memory = Memory::SharedFile(memory.clone());
            cfg.disks = vec![Disk { path: overlay.clone(), format: "qcow2", mode: DiskMode::Writable }];
            cfg.display = pkg.def.graphical;
            if networked {
                // On the command line from boot, where a restore declares it.
                cfg.plugs = plugs_of(&settings, None)?;
                cfg.plugs_in_state = true;
            }
            Ok(cfg)
        };
        let fresh = || {
            let _ = std::fs::remove_file(&memory);
        };
        let ctx = settings.launch_context();
        let mut a = boot_for_build(&self.store, "launch-vm", make, fresh, &ctx, BOOT_TIMEOUT).await?;
        reserve_disk(&mut a, pkg).await?;
        let r = &pkg.def.ready;
        spawn_ready(&mut a, &pkg.name, argv_of(pkg), env_of(pkg), readiness(pkg), r.timeout_ms).await?;
        progress.step(&format!("launch image for {}: ready; a copy waiting on pipes for scripted runs", pkg.name));
        let standby = start_standby(&mut a, pkg).await?;
        let shell_standbys = start_shell_standbys(&mut a).await?;
        progress.step(&format!("launch image for {}: ready, saving memory and devices", pkg.name));
        // Let the program finish drawing, then tell the agent nobody is attached,
        // so the saved guest keeps its output for whoever attaches next.
        tokio::time::sleep(Duration::from_millis(300)).await;
        a.conn.send(&HostMsg::Detach).await?;
        loop {
            match tokio::time::timeout(Duration::from_secs(30), a.conn.recv()).await {
                Ok(Ok(Some(strata_proto::GuestMsg::Detached))) => break,
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) => return Err(Error::AgentGone("detach before saving")),
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => return Err(Error::Timeout { what: "the agent to detach".into(), secs: 30 }),
            }
        }
        save_vm(&mut a, &state).await?;
        drop(a);
        rebase_to_digest(&overlay, install.file("disk")?).await?;
        let files = BTreeMap::from([
            ("kernel".to_string(), base.file("kernel")?.to_string()),
            ("initramfs".to_string(), base.file("initramfs")?.to_string()),
            ("disk".to_string(), self.store.ingest_file(&overlay)?),
            ("memory".to_string(), self.store.ingest_file(&memory)?),
            ("state".to_string(), self.store.ingest_file(&state)?),
        ]);
        let meta = BTreeMap::from([
            ("accel".to_string(), accel.as_str().to_string()),
            ("memory_mib".to_string(), pkg.def.memory_mib.to_string()),
            ("disk_mib".to_string(), pkg.def.disk_mib.to_string()),
            ("cmdline".to_string(), base.meta.get("cmdline").cloned().unwrap_or_default()),
            ("base".to_string(), base.digest.clone()),
            ("graphical".to_string(), pkg.def.graphical.to_string()),
        ]);
        let mut meta = meta;
        if standby {
            meta.insert(STANDBY_META.to_string(), STANDBY_PROC.to_string());
        }
        if networked {
            meta.insert(NETWORKED_META.to_string(), "network".to_string());
        }
        if !shell_standbys.is_empty() {
            let ids: Vec<String> = shell_standbys.iter().map(ToString::to_string).collect();
            meta.insert(SHELL_STANDBY_META.to_string(), ids.join(","));
        }
        let rec = ImageRecord::new(
            ImageKind::Launch,
            Some(pkg.name.clone()),
            pkg.os.name,
            ARCH,
            Some(install.digest.clone()),
            recipe,
            files,
            meta,
            0,
        );
        let rec = self.record_image(rec)?;
        progress.done(&format!("launch image for {} ready", pkg.name));
        Ok(rec)
    }

    /// What a launch checks before any build, so a mistake is told at once
    /// rather than minutes later: this server can bound what the package
    /// writes, and the context's settings are valid.
    ///
    /// # Errors
    /// Naming what is wrong and what to change.
    pub fn check_launch(&self, pkg: &Package, settings: &ContextSettings) -> Result<(), Error> {
        self.check_disk_cap(&pkg.name, pkg.def.disk_mib)?;
        self.context_image(settings).map(drop)
    }

    /// Launches a package from its launch image (building what is missing)
    /// and attaches the terminal's context.
    ///
    /// # Errors
    /// If images cannot be built, the context is invalid, or the VM fails.
    pub async fn launch(
        &self,
        pkg: &Package,
        settings: &ContextSettings,
        progress: &dyn Progress,
    ) -> Result<Session, Error> {
        // Before any build: a package this server cannot bound is refused now.
        self.check_launch(pkg, settings)?;
        let images = self.ensure_images(pkg, progress).await?;
        self.launch_from(pkg, &images.launch, settings).await
    }

    /// Launches from a known launch image (the hot path).
    ///
    /// # Errors
    /// If the VM cannot be restored or the agent does not answer.
    pub async fn launch_from(
        &self,
        pkg: &Package,
        launch: &ImageRecord,
        settings: &ContextSettings,
    ) -> Result<Session, Error> {
        self.launch_with(
            pkg,
            launch,
            settings,
            Restore { plugs_in_state: false, niceness: 0, ahead_of_demand: false, ..Restore::default() },
        )
        .await
    }

    /// Restores a new session of `pkg` from its launch image.
    pub(crate) async fn launch_with(
        &self,
        pkg: &Package,
        launch: &ImageRecord,
        settings: &ContextSettings,
        how: Restore,
    ) -> Result<Session, Error> {
        let id = new_session_id();
        // A session whose only device is a network restores from the
        // sibling image that holds one, if there is one.
        let only_network = settings.network.enabled() && settings.shares.is_empty() && settings.home.is_none();
        let networked = match only_network && !how.plugs_in_state {
            true => self.usable(ImageKind::Launch, &networked_recipe(launch))?,
            false => None,
        };
        let (launch, how) = match &networked {
            Some(n) => (n, Restore { plugs_in_state: true, ..how }),
            None => (launch, how),
        };
        let memory = Memory::PrivateFile(self.store.blob_path(launch.file("memory")?));
        self.restore(&id, &pkg.name, launch, memory, settings, how).await
    }

    /// Restores a session `id` of `package` from a saved image (a launch
    /// image, or a paused session's image) with `memory`, plugs in the
    /// context's devices (or, with `how.plugs_in_state`, declares those the
    /// saved state already holds), attaches it, and records it as running
    /// from `image`.
    pub(crate) async fn restore(
        &self,
        id: &str,
        package: &str,
        image: &ImageRecord,
        memory: Memory,
        settings: &ContextSettings,
        how: Restore,
    ) -> Result<Session, Error> {
        let Restore { plugs_in_state, niceness, ahead_of_demand, after_load } = how;
        // Everything the context asks of this host is checked before a VM starts.
        settings.validate()?;
        settings.check_on_host(&self.cfg.share_roots)?;
        check_ports_free(settings)?;
        self.admit()?;
        if let Some(disk) = image.meta.get("disk_mib").and_then(|d| d.parse::<u32>().ok()) {
            self.check_disk_cap(package, disk)?;
        }
        let slot = self.restore_slot(ahead_of_demand).await?;
        let claim = match &settings.home {
            Some(t) => Some((self.claim_home(t, id)?, self.home_disk(t, &image.os).await?)),
            None => None,
        };
        let plugs = plugs_of(settings, claim.as_ref().map(|(_, disk)| disk))?;
        let dir = self.new_session_dir(id)?;
        let graphical = crate::is_graphical(image);
        let mut cfg = self.restore_config(dir.path(), image, memory, plugs, plugs_in_state)?;
        cfg.niceness = niceness;
        cfg.after_load = after_load;
        let forked_by = cfg.fork_server.clone();
        let a = match start_and_attach(cfg, dir, &settings.launch_context(), BOOT_TIMEOUT).await {
            Err(e @ Error::Vm(strata_vmm::Error::EarlyExit { .. })) => {
                if let Some(server) = &forked_by {
                    self.fork_server_failed(server);
                }
                return Err(e);
            }
            started => started?,
        };
        drop(slot);
        let mut record = SessionRecord::new(id, package, a.vm.pid(), &image.digest);
        record.os = image.os.clone();
        record.home = settings.home.clone();
        record.ports = settings.network.ports.clone();
        record.settings = Some(settings.clone());
        record.pooled = ahead_of_demand;
        self.write_session_record(&record)?;
        drop(claim);
        let mut s = Session::new(id.to_string(), package, &image.os, a);
        s.record = Some(self.session_dir(id));
        s.graphical = graphical;
        s.standby = image.meta.get(STANDBY_META).and_then(|p| p.parse().ok());
        s.shell_standbys = image
            .meta
            .get(SHELL_STANDBY_META)
            .map(|ids| ids.split(',').filter_map(|i| i.parse().ok()).collect())
            .unwrap_or_default();
        s.has_devices = settings.needs_devices();
        Ok(s)
    }

    /// How QEMU restores `image` in `dir` with `memory` and `plugs`, as a
    /// session that outlives this process (a terminal that vanishes leaves
    /// it detached: sessions.rs `reap_sessions`).
    pub(crate) fn restore_config(
        &self,
        dir: &std::path::Path,
        image: &ImageRecord,
        memory: Memory,
        plugs: Vec<Plug>,
        plugs_in_state: bool,
    ) -> Result<VmConfig, Error> {
        let accel: Accel = image.meta.get("accel").and_then(|a| a.parse().ok()).unwrap_or(Accel::Tcg);
        let memory_mib: u32 = image
            .meta
            .get("memory_mib")
            .and_then(|m| m.parse().ok())
            .ok_or_else(|| Error::Config(format!("image {} does not say its memory size", image.digest)))?;
        Ok(VmConfig {
            dir: dir.to_path_buf(),
            accel,
            memory_mib,
            memory,
            kernel: self.restore_kernel(image.file("kernel")?)?,
            initramfs: self.store.blob_path(image.file("initramfs")?),
            cmdline: image.meta.get("cmdline").cloned().unwrap_or_default(),
            disks: vec![Disk {
                path: self.store.blob_path(image.file("disk")?),
                format: "qcow2",
                mode: DiskMode::Throwaway,
            }],
            incoming: Some(self.store.blob_path(image.file("state")?)),
            plugs,
            plugs_in_state,
            display: crate::is_graphical(image),
            die_with_parent: false,
            niceness: 0,
            fork_server: self.fork_server(),
            cgroup: self.cgroup_for(memory_mib)?,
            identity: self.identity_for(accel)?,
            file_size_limit: self.confined().then_some(self.file_size_limit(image, memory_mib)),
            sandbox: self.confined(),
            after_load: AfterLoad::AsSaved,
            whole_state: image.meta.contains_key(WHOLE_STATE_META),
            incoming_stream: None,
        })
    }

    /// A slot to restore a VM in (see [`crate::Config::restore_slots`]): work
    /// ahead of demand never queues for one and leaves one free for a
    /// launch someone waits for.
    async fn restore_slot(&self, ahead_of_demand: bool) -> Result<tokio::sync::SemaphorePermit<'_>, Error> {
        if !ahead_of_demand {
            // The semaphore is never closed.
            return self.restore_slots.acquire().await.map_err(|_| Error::Busy);
        }
        if self.restore_slots.available_permits() <= self.pool_restores_reserve() {
            return Err(Error::Busy);
        }
        self.restore_slots.try_acquire().map_err(|_| Error::Busy)
    }

    /// Restore slots work ahead of demand leaves free (one, unless there is
    /// only one).
    fn pool_restores_reserve(&self) -> usize {
        usize::from(self.cfg.restore_slots > 1)
    }

    /// How many restores work ahead of demand may have in flight: the slots
    /// it may use, so that it never finds them all taken by itself.
    pub(crate) fn pool_restores_max(&self) -> usize {
        self.cfg.restore_slots.max(1) - self.pool_restores_reserve()
    }

    /// The kernel a restored VM is given: the base's kernel cut to its
    /// setup header and one sector. QEMU reads `-kernel` into memory it
    /// keeps for the VM's life (~8 MiB of every session), but a restored
    /// guest never boots it: its kernel is in the saved memory. The machine
    /// is the same (the boot ROM and firmware tables do not depend on the
    /// kernel's size), so the saved state loads. Anything that is not a
    /// bzImage is passed through whole.
    fn restore_kernel(&self, digest: &str) -> Result<std::path::PathBuf, Error> {
        let full = self.store.blob_path(digest);
        let stub = self.cfg.state_dir.join("restore-kernels").join(digest);
        if stub.is_file() {
            return Ok(stub);
        }
        let mut header = [0u8; 0x210];
        {
            use std::io::Read;
            let mut f = std::fs::File::open(&full).map_err(crate::io_err(&full))?;
            if f.read_exact(&mut header).is_err() {
                return Ok(full);
            }
        }
        // "HdrS" at 0x202: the Linux boot protocol's header.
        if &header[0x202..0x206] != b"HdrS" {
            return Ok(full);
        }
        let setup_sects = match header[0x1f1] {
            0 => 4,
            n => usize::from(n),
        };
        let setup_size = (setup_sects + 1) * 512;
        let bytes = std::fs::read(&full).map_err(crate::io_err(&full))?;
        if bytes.len() <= setup_size + 512 {
            return Ok(full);
        }
        let dir = stub.parent().expect("has a parent");
        std::fs::create_dir_all(dir).map_err(crate::io_err(dir))?;
        crate::write_atomic(&stub, &bytes[..setup_size + 512])?;
        Ok(stub)
    }

    /// Launches a package the slow way: boot base <- install, start the
    /// program, wait until it is ready. The baseline launch images beat.
    ///
    /// # Errors
    /// If images cannot be built or the program does not become ready.
    pub async fn launch_cold(
        &self,
        pkg: &Package,
        settings: &ContextSettings,
        progress: &dyn Progress,
    ) -> Result<Session, Error> {
        let base = self.ensure_base(pkg.os, progress).await?;
        let install = self.ensure_install(pkg, &base, progress).await?;
        let accel = self.accel_for(&base).await?;
        let dir = self.store.work_dir("cold")?;
        if settings.needs_devices() {
            return Err(Error::Config(
                "a cold launch takes no network, shared folders or home; launch from the launch image".into(),
            ));
        }
        let mut cfg = self.boot_config(&base, dir.path(), accel, pkg.def.memory_mib)?;
        cfg.disks = vec![Disk {
            path: self.store.blob_path(install.file("disk")?),
            format: "qcow2",
            mode: DiskMode::Throwaway,
        }];
        cfg.display = pkg.def.graphical;
        let mut a: Attached = start_and_attach(cfg, dir, &settings.to_terminal_context(), BOOT_TIMEOUT).await?;
        let screen =
            spawn_ready(&mut a, &pkg.name, argv_of(pkg), env_of(pkg), readiness(pkg), pkg.def.ready.timeout_ms).await;
        match screen {
            Ok(screen) => {
                a.screen = screen;
                let mut s = Session::new(new_session_id(), &pkg.name, pkg.os.name, a);
                s.graphical = pkg.def.graphical;
                Ok(s)
            }
            Err(e) => {
                a.vm.kill().await;
                Err(e)
            }
        }
    }
}

/// Refuses host ports something already listens on, before QEMU would fail.
pub(crate) fn check_ports_free(settings: &ContextSettings) -> Result<(), Error> {
    for p in &settings.network.ports {
        if let Err(e) = std::net::TcpListener::bind(("127.0.0.1", p.host)) {
            return Err(Error::Config(format!(
                "context: port {} on 127.0.0.1 cannot be forwarded ({e}); choose another, e.g. -p {}:{}",
                p.host,
                p.host.wrapping_add(1).max(1024),
                p.guest
            )));
        }
    }
    Ok(())
}

/// Pauses the VM, saves its devices to `state` (its memory is already in the
/// shared file) and stops QEMU.
async fn save_vm(a: &mut Attached, state: &std::path::Path) -> Result<(), Error> {
    a.vm.save_and_quit(state, Duration::from_secs(300)).await?;
    if !state.is_file() {
        return Err(Error::Io { path: state.to_path_buf(), source: std::io::Error::other("QEMU wrote no state") });
    }
    Ok(())
}

/// The fact of an image whose state holds all the guest's memory (the
/// snapshots of earlier builds, which saved the running guest to a file).
pub(crate) const WHOLE_STATE_META: &str = "whole_state";

/// The devices a context asks for: its network, shared folders and the
/// home's disk (`home`).
pub(crate) fn plugs_of(settings: &ContextSettings, home: Option<&std::path::PathBuf>) -> Result<Vec<Plug>, Error> {
    let mut plugs = Vec::new();
    if settings.network.enabled() {
        let forwards = settings.network.ports.iter().map(|p| (p.host, p.guest)).collect();
        plugs.push(Plug::Network { outbound: settings.network.outbound, forwards });
    }
    for (i, sh) in settings.shares.iter().enumerate() {
        let path = std::fs::canonicalize(&sh.host).map_err(crate::io_err(&sh.host))?;
        plugs.push(Plug::Share { tag: ContextSettings::share_tag(i), path, readonly: sh.readonly });
    }
    if let Some(disk) = home {
        plugs.push(Plug::Disk { path: disk.clone(), serial: crate::context::HOME_SERIAL.into() });
    }
    Ok(plugs)
}

/// How a VM is restored, besides from what.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Restore {
    /// The context's devices are in the saved state (a paused session):
    /// declared on QEMU's command line, not hot-plugged.
    pub plugs_in_state: bool,
    /// QEMU's niceness (the pool restores nice).
    pub niceness: i32,
    /// Work ahead of demand (the pool): it never queues for a restore slot,
    /// and leaves one free for a launch someone waits for; [`Error::Busy`]
    /// if it cannot start now.
    pub ahead_of_demand: bool,
    /// What the guest does once its state is loaded.
    pub after_load: AfterLoad,
}
