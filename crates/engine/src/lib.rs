//! strata's core: the four images of the method and the sessions run from them.
//!
//! [`Engine`] ties the pieces together. A launch request resolves a package
//! ([`strata_package`]), selects (or builds) one image of each kind from the
//! catalog ([`strata_store`]): base, install, launch, context; then
//! concatenates them into a VM ([`strata_vmm`]): the qcow2 chain
//! base <- install <- launch <- throwaway overlay, the launch image's memory
//! file mapped copy-on-write, its device state loaded, the context applied by
//! the guest agent on attach.

pub mod accel;
mod apt;
pub mod base;
pub mod bench;
pub mod builds;
pub mod context;
pub mod demand;
pub mod fork;
pub mod home;
pub mod host;
pub mod initramfs;
pub mod install;
pub mod launch;
pub mod moves;
pub mod paused;
pub mod pool;
pub mod prune;
pub mod session;
pub mod sessions;
mod tools;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use strata_package::{Package, Registry};
use strata_store::{ImageKind, ImageRecord, Store};
use strata_vmm::Accel;

pub use session::{GuestCommand, Session, SessionEvent};

tokio::task_local! {
    /// The API request being served by this task, if any: it goes into the
    /// logs and, with each attach, to the guest agent's log.
    static REQUEST_ID: String;
}

/// Runs `f` as part of the request `id` (see [`request_id`]).
pub async fn with_request_id<F: std::future::Future>(id: String, f: F) -> F::Output {
    REQUEST_ID.scope(id, f).await
}

/// The request this task serves, if any.
pub fn request_id() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

pub use strata_package::{Os, DEFAULT_OS, OSES};
/// Launches someone waits for stop pool refills meanwhile.
pub use strata_vmm::background;

/// Architecture tag of the images this build makes.
pub const ARCH: &str = "x86_64";

/// Errors of building images and running sessions.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Package(#[from] strata_package::Error),
    #[error(transparent)]
    Store(#[from] strata_store::Error),
    #[error(transparent)]
    Vm(#[from] strata_vmm::Error),
    #[error(transparent)]
    Remote(#[from] strata_remote::Error),
    #[error("{what} failed ({status}):\n{output}")]
    Tool { what: String, status: String, output: String },
    #[error("cannot run {what}; is it installed? (the setup script installs it)")]
    ToolMissing {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("installing {package} failed:\n{output}")]
    InstallFailed { package: String, output: String },
    #[error("{package} did not become ready: {reason}\n--- its screen:\n{screen}")]
    NotReady { package: String, reason: String, screen: String },
    #[error("the guest agent closed the channel during {0}")]
    AgentGone(&'static str),
    #[error("the guest agent reported an error: {0}")]
    Agent(String),
    #[error("{0}")]
    Config(String),
    #[error("no guest agent binary at {0}: build it with `cargo build --release -p strata-agent` or set STRATA_AGENT")]
    NoAgent(PathBuf),
    #[error("timed out after {secs} s waiting for {what}")]
    Timeout { what: String, secs: u64 },
    /// Work ahead of demand found every restore slot taken (not a failure:
    /// it is tried again later).
    #[error("every restore slot is taken")]
    Busy,
    /// This server cannot take a VM now (a floor reached, or no cgroup to
    /// put it in); nothing was started.
    #[error("{0}")]
    Refused(String),
    /// A live move failed; the session runs on where it was.
    #[error("the move failed: {0}")]
    Move(String),
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// Writes a small file atomically (temporary file, then rename).
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<(), Error> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, data).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Reports long work to the user (the CLI draws it as a progress bar).
pub trait Progress: Send + Sync {
    /// A new step began.
    fn step(&self, message: &str);
    /// Fraction done of the current step, if known.
    fn fraction(&self, _done: u64, _total: u64) {}
    /// The step finished.
    fn done(&self, message: &str);
}

/// Progress that only logs.
pub struct LogProgress;

impl Progress for LogProgress {
    fn step(&self, message: &str) {
        tracing::info!("{message}");
    }
    fn done(&self, message: &str) {
        tracing::info!("{message}");
    }
}

/// Where strata keeps things, and how it runs VMs.
#[derive(Debug, Clone)]
pub struct Config {
    /// The store: blobs, catalog, scratch space (default /var/lib/strata).
    pub state_dir: PathBuf,
    /// Package definitions (default: `packages/` of the source tree).
    pub packages_dir: PathBuf,
    /// The guest agent binary put into the initramfs.
    pub agent_binary: PathBuf,
    /// Force an accelerator instead of probing.
    pub accel: Option<Accel>,
    /// Debian mirror for the base image and packages.
    pub mirror: String,
    /// The OS of a launch that names none (`STRATA_OS`; a terminal's
    /// context may choose another).
    pub default_os: Os,
    /// Host folders a context may share into VMs (their subfolders too).
    pub share_roots: Vec<PathBuf>,
    /// The object store shared with other servers; `None` reads it from the
    /// environment when the engine opens (see [`strata_remote::RemoteConfig::from_env`]),
    /// and without it images stay on this machine.
    pub remote: Option<strata_remote::RemoteConfig>,
    /// VMs restored at once; further launches queue for a slot. Restores
    /// are CPU-bound (QEMU's start, and under TCG translating the resumed
    /// guest's code), so more at once only adds contention: each takes
    /// longer, and every VM alive meanwhile costs CPU too.
    pub restore_slots: usize,
    /// Start QEMU from a fork server made with this preload library (see
    /// `strata_zygote`; [`Config::preload_library`]): ~14 ms less CPU per
    /// VM, for a process that starts many (a server, a benchmark). `None`
    /// (a one-shot command, which starts one VM): QEMU by exec.
    pub fork_server: Option<PathBuf>,
    /// What each VM's control group bounds (CPU, memory beyond the guest's,
    /// tasks): `STRATA_CPU_PERCENT`, `STRATA_MEMORY_ALLOWANCE_MIB`,
    /// `STRATA_PIDS_MAX`.
    pub vm_limits: VmLimits,
    /// What a server keeps free: no VM starts below these floors.
    pub floors: Floors,
    /// How long the record of a session that ended unseen is listed
    /// (`STRATA_ENDED_RETENTION_SECS`, default a day).
    pub ended_retention: std::time::Duration,
    /// How long a paused session is kept before it and its image are
    /// removed (`STRATA_PAUSED_RETENTION_SECS`; unset: until removed).
    pub paused_retention: Option<std::time::Duration>,
}

/// What a server keeps free: below either floor, launches, resumes and pool
/// refills are refused (with what is free and the floor) before any VM
/// starts, instead of failing half-way or starving the sessions running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Floors {
    /// Memory the host must have available (`MemAvailable`), MiB:
    /// `STRATA_MEMORY_FLOOR_MIB`, default 1024.
    pub memory_mib: u64,
    /// Free space on the store's file system, MiB: `STRATA_DISK_FLOOR_MIB`,
    /// default 2048.
    pub disk_mib: u64,
}

impl Default for Floors {
    fn default() -> Floors {
        Floors { memory_mib: 1024, disk_mib: 2048 }
    }
}

/// What bounds every VM's QEMU, beyond its guest's own size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmLimits {
    /// CPU time a VM may use, in percent of one CPU (its guest has one vCPU).
    pub cpu_percent: u32,
    /// Memory a VM may use beyond its guest's RAM: QEMU's own (under TCG
    /// its translated code) and page cache it brings in.
    pub memory_allowance_mib: u32,
    /// Tasks (QEMU's threads) a VM may have.
    pub pids: u32,
    /// What a session's QEMU may write to the host, in MiB: its disk's
    /// overlay and its console log each stay below it (beyond, the guest's
    /// writes fail and it runs on). Never below the guest's RAM plus 64 MiB:
    /// a pause writes the RAM into one file.
    pub disk_mib: u32,
}

impl Default for VmLimits {
    fn default() -> VmLimits {
        VmLimits { cpu_percent: 100, memory_allowance_mib: 384, pids: 256, disk_mib: 4096 }
    }
}

impl VmLimits {
    /// The defaults, with what the environment sets.
    ///
    /// # Errors
    /// A setting that is not a number in its range, named.
    pub fn from_env() -> Result<VmLimits, Error> {
        let d = VmLimits::default();
        Ok(VmLimits {
            cpu_percent: env_number("STRATA_CPU_PERCENT", d.cpu_percent, 1..=6400)?,
            memory_allowance_mib: env_number("STRATA_MEMORY_ALLOWANCE_MIB", d.memory_allowance_mib, 64..=1 << 20)?,
            pids: env_number("STRATA_PIDS_MAX", d.pids, 32..=1 << 20)?,
            disk_mib: env_number("STRATA_DISK_MIB", d.disk_mib, 16..=1 << 24)?,
        })
    }
}

impl Floors {
    /// The defaults, with what the environment sets.
    ///
    /// # Errors
    /// A setting that is not a whole number of MiB, named.
    pub fn from_env() -> Result<Floors, Error> {
        let d = Floors::default();
        Ok(Floors {
            memory_mib: env_number("STRATA_MEMORY_FLOOR_MIB", d.memory_mib, 0..=1 << 40)?,
            disk_mib: env_number("STRATA_DISK_FLOOR_MIB", d.disk_mib, 0..=1 << 40)?,
        })
    }
}

/// A whole number from the environment variable `name` within `range`, or
/// `default` if it is not set.
fn env_number<T>(name: &str, default: T, range: std::ops::RangeInclusive<T>) -> Result<T, Error>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display,
{
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(v) => v.trim().parse::<T>().ok().filter(|n| range.contains(n)).ok_or_else(|| {
            Error::Config(format!("{name}={v:?} must be a whole number from {} to {}", range.start(), range.end()))
        }),
    }
}

/// The OS `STRATA_OS` names, or the default.
fn default_os_from_env() -> Result<Os, Error> {
    match std::env::var("STRATA_OS") {
        Ok(name) => Os::named(name.trim()).map_err(|e| Error::Config(format!("STRATA_OS: {e}"))),
        Err(_) => Ok(DEFAULT_OS),
    }
}

/// Restore slots by default: two per CPU, so one restore's waits (QMP, the
/// agent's answer) are filled with another's work.
pub fn default_restore_slots() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()) * 2
}

impl Config {
    /// The defaults, overridable by `STRATA_STATE`, `STRATA_PACKAGES`,
    /// `STRATA_AGENT`, `STRATA_MIRROR`, `STRATA_SHARE_ROOTS` (a
    /// colon-separated list; by default the user's home, /home, /srv, /tmp)
    /// and `STRATA_RESTORE_SLOTS`.
    pub fn from_env() -> Config {
        let exe_dir = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf));
        let agent_binary = std::env::var_os("STRATA_AGENT")
            .map(PathBuf::from)
            .unwrap_or_else(|| exe_dir.clone().unwrap_or_default().join("strata-agent"));
        let packages_dir = std::env::var_os("STRATA_PACKAGES").map(PathBuf::from).unwrap_or_else(|| {
            // Installed next to the binary, or the source tree's packages/.
            let candidates = [
                exe_dir.clone().map(|d| d.join("packages")),
                exe_dir.clone().and_then(|d| d.ancestors().nth(2).map(|r| r.join("packages"))),
                Some(PathBuf::from("/usr/share/strata/packages")),
            ];
            candidates.into_iter().flatten().find(|p| p.is_dir()).unwrap_or_else(|| PathBuf::from("packages"))
        });
        Config {
            state_dir: std::env::var_os("STRATA_STATE").map(PathBuf::from).unwrap_or_else(|| "/var/lib/strata".into()),
            packages_dir,
            agent_binary,
            accel: None,
            mirror: std::env::var("STRATA_MIRROR").unwrap_or_else(|_| "http://deb.debian.org/debian".into()),
            // A bad setting is reported when the engine opens.
            default_os: default_os_from_env().unwrap_or(DEFAULT_OS),
            share_roots: match std::env::var("STRATA_SHARE_ROOTS") {
                Ok(list) => std::env::split_paths(&list).filter(|p| p.is_absolute()).collect(),
                Err(_) => std::env::var_os("HOME")
                    .map(PathBuf::from)
                    .into_iter()
                    .chain(["/home", "/srv", "/tmp"].map(PathBuf::from))
                    .collect(),
            },
            remote: None,
            restore_slots: std::env::var("STRATA_RESTORE_SLOTS")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|n| *n > 0)
                .unwrap_or_else(default_restore_slots),
            fork_server: None,
            // A bad setting is reported when the engine opens.
            vm_limits: VmLimits::from_env().unwrap_or_default(),
            floors: Floors::from_env().unwrap_or_default(),
            ended_retention: env_number(
                "STRATA_ENDED_RETENTION_SECS",
                sessions::ENDED_RETENTION.as_secs(),
                0..=u64::MAX,
            )
            .map(std::time::Duration::from_secs)
            .unwrap_or(sessions::ENDED_RETENTION),
            paused_retention: match env_number("STRATA_PAUSED_RETENTION_SECS", 0u64, 1..=u64::MAX) {
                Ok(0) | Err(_) => None,
                Ok(n) => Some(std::time::Duration::from_secs(n)),
            },
        }
    }

    /// The preload library that makes QEMU a fork server: `STRATA_QEMU_PRELOAD`,
    /// or next to this program (where `cargo build` puts it).
    pub fn preload_library() -> PathBuf {
        std::env::var_os("STRATA_QEMU_PRELOAD").map(PathBuf::from).unwrap_or_else(|| {
            let exe_dir = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf));
            exe_dir.unwrap_or_default().join("libstrata_qemu_preload.so")
        })
    }
}

/// Whether an image's VM has a display (a graphical package's).
pub(crate) fn is_graphical(image: &ImageRecord) -> bool {
    image.meta.get("graphical").is_some_and(|g| g == "true")
}

/// Counters of image lookups and builds, by image kind (for metrics).
#[derive(Debug, Default)]
pub struct Stats {
    /// Lookups that found a usable image, by kind (see [`kind_index`]).
    pub hits: [AtomicU64; 5],
    /// Lookups that found none (so the image is built), by kind.
    pub misses: [AtomicU64; 5],
    /// Images built, by kind.
    pub builds: [AtomicU64; 5],
    /// Builds that failed, by kind.
    pub build_failures: [AtomicU64; 5],
}

impl Stats {
    pub(crate) fn count(counters: &[AtomicU64; 5], kind: ImageKind) {
        counters[kind_index(kind)].fetch_add(1, Ordering::Relaxed);
    }
}

/// Index of a kind in the [`Stats`] arrays.
pub fn kind_index(kind: ImageKind) -> usize {
    match kind {
        ImageKind::Base => 0,
        ImageKind::Install => 1,
        ImageKind::Launch => 2,
        ImageKind::Context => 3,
        ImageKind::Paused => 4,
    }
}

/// Debian's package lists as the engine reads them: an OS whose lists
/// cannot be had knows no package.
struct EngineLists<'a>(&'a Engine);

impl strata_package::DebianLists for EngineLists<'_> {
    fn has(&self, os: Os, name: &str) -> bool {
        self.0.apt_options(os).is_ok_and(|apt| tools::debian_package_exists(&apt, name))
    }
    fn depends(&self, os: Os, name: &str) -> Vec<String> {
        self.0.apt_options(os).map(|apt| tools::debian_depends(&apt, name)).unwrap_or_default()
    }
    fn names(&self, os: Os) -> Vec<String> {
        self.0.apt_options(os).map(|apt| tools::debian_package_names(&apt)).unwrap_or_default()
    }
}

/// A mutex's guard, also when a thread panicked holding it (the maps it
/// guards hold whole entries only).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The engine: configuration, store, package registry.
pub struct Engine {
    pub cfg: Config,
    pub store: Arc<Store>,
    pub registry: Registry,
    pub stats: Stats,
    /// The object store shared with other servers, if configured.
    pub remote: Option<Arc<strata_remote::Remote>>,
    /// Each OS's base recipe, computed once: it holds the agent binary's
    /// digest, which does not change while this process runs.
    base_recipes: std::sync::Mutex<std::collections::HashMap<&'static str, String>>,
    /// apt's options for each OS whose lists are there (see [`apt::options`]).
    apt_options: std::sync::Mutex<std::collections::HashMap<&'static str, Vec<String>>>,
    /// Packages derived from Debian's lists, by name and OS: resolving one
    /// asks apt twice, and a launch resolves its package.
    derived: std::sync::Mutex<std::collections::HashMap<(String, &'static str), Package>>,
    /// Bounds the VMs being restored at once ([`Config::restore_slots`]).
    restore_slots: tokio::sync::Semaphore,
    /// Where VMs' QEMU is forked from ([`Config::fork_server`]); without it
    /// (not asked for, or it would not start), QEMU is started by exec.
    /// Replaced when it ends or the VMs it forks die at start
    /// ([`Engine::fork_server`]).
    fork_server: std::sync::Mutex<ForkServerSlot>,
    /// Where VMs' control groups are made, or why they cannot be: then no
    /// VM starts (never unconfined), and the reason is the error.
    cgroups: Result<Arc<strata_jail::Cgroups>, String>,
    /// The uids and gids VMs run as, or why there are none: then no VM
    /// starts.
    identities: Result<Arc<strata_jail::Identities>, String>,
    /// The firewall that keeps guests off this host, installed in this
    /// network namespace before the first VM starts (not by every engine
    /// opened, most of which start none), or why it could not be: then no
    /// VM starts.
    guest_firewall: std::sync::OnceLock<Result<(), String>>,
    /// Set only by `strata bench confine`, for the runs that measure what
    /// confinement costs: VMs then start as root, without their cgroup,
    /// filter, mount namespace and file bound. Nothing else can set it.
    unconfined_for_benchmark: AtomicBool,
}

/// The fork server in use, and when one last replaced another.
#[derive(Default)]
struct ForkServerSlot {
    server: Option<Arc<strata_vmm::ForkServer>>,
    replaced: Option<std::time::Instant>,
}

/// The least time between two replacements of the fork server: one that
/// cannot serve is not restarted in a loop (VMs start by exec meanwhile).
const FORK_SERVER_RESTART: std::time::Duration = std::time::Duration::from_secs(10);

/// Starts a fork server with `preload`, logging how; `None` if it would
/// not start (QEMU is then started by exec).
fn start_fork_server(preload: &Path) -> Option<Arc<strata_vmm::ForkServer>> {
    match strata_vmm::start_fork_server(preload) {
        Ok(server) => {
            match server.prepared_types() {
                Ok(machine_classes) => tracing::info!(pid = server.pid(), machine_classes, "QEMU fork server started"),
                Err(why) => tracing::warn!(
                    pid = server.pid(),
                    why,
                    "QEMU fork server started, but each VM prepares QEMU's types itself"
                ),
            }
            Some(Arc::new(server))
        }
        Err(e) => {
            tracing::warn!(error = %e, preload = %preload.display(), "no QEMU fork server; starting QEMU by exec");
            None
        }
    }
}

impl Engine {
    /// The pid of the fork server VMs are started from, if there is one.
    pub fn fork_server_pid(&self) -> Option<u32> {
        self.fork_server().map(|f| f.pid())
    }

    /// How many of QEMU's machine classes the fork server prepared for the
    /// VMs it forks, or why it did not; `None` without a fork server.
    pub fn fork_server_prepared_types(&self) -> Option<Result<u32, String>> {
        self.fork_server().map(|f| f.prepared_types().map_err(str::to_string))
    }

    /// The fork server to start the next VM from: another one if the last
    /// has ended (killed, crashed), at most once per [`FORK_SERVER_RESTART`].
    pub(crate) fn fork_server(&self) -> Option<Arc<strata_vmm::ForkServer>> {
        let mut slot = lock(&self.fork_server);
        if slot.server.as_ref().is_some_and(|s| s.has_exited()) {
            tracing::warn!("the QEMU fork server has ended; starting another");
            self.restart_fork_server(&mut slot);
        } else if slot.server.is_none() && slot.replaced.is_some_and(|t| t.elapsed() >= FORK_SERVER_RESTART) {
            // Given up on for a while after replacements came too close
            // together: tried again (one that never started is not).
            self.restart_fork_server(&mut slot);
        }
        slot.server.clone()
    }

    /// A VM forked by `used` died before its agent connected: if `used` is
    /// still the fork server in use, another one replaces it (a server in
    /// a bad state gives every VM it forks the same fate).
    pub(crate) fn fork_server_failed(&self, used: &Arc<strata_vmm::ForkServer>) {
        let mut slot = lock(&self.fork_server);
        if slot.server.as_ref().is_some_and(|s| Arc::ptr_eq(s, used)) {
            tracing::warn!(
                pid = used.pid(),
                "a VM forked by the QEMU fork server died at start; starting another server"
            );
            self.restart_fork_server(&mut slot);
        }
    }

    fn restart_fork_server(&self, slot: &mut ForkServerSlot) {
        let Some(preload) = &self.cfg.fork_server else { return };
        if slot.replaced.is_some_and(|t| t.elapsed() < FORK_SERVER_RESTART) {
            // Too soon after the last replacement: exec until then.
            slot.server = None;
            return;
        }
        slot.replaced = Some(std::time::Instant::now());
        slot.server = start_fork_server(preload);
    }

    /// Opens the store and loads the package definitions.
    ///
    /// # Errors
    /// If the store cannot be opened or a definition is invalid.
    pub fn open(cfg: Config) -> Result<Engine, Error> {
        let store = Arc::new(Store::open(&cfg.state_dir)?);
        let registry = if cfg.packages_dir.is_dir() { Registry::load(&cfg.packages_dir)? } else { Registry::default() };
        let remote = match cfg.remote.clone() {
            Some(c) => Some(c),
            None => strata_remote::RemoteConfig::from_env()?,
        };
        let remote = remote.map(|c| strata_remote::Remote::new(c, store.clone())).transpose()?.map(Arc::new);
        let restore_slots = tokio::sync::Semaphore::new(cfg.restore_slots.max(1));
        let fork_server =
            ForkServerSlot { server: cfg.fork_server.as_deref().and_then(start_fork_server), replaced: None };
        // Config::from_env falls back to the defaults; a bad setting is named here.
        VmLimits::from_env()?;
        Floors::from_env()?;
        default_os_from_env()?;
        env_number("STRATA_ENDED_RETENTION_SECS", 0u64, 0..=u64::MAX)?;
        env_number("STRATA_PAUSED_RETENTION_SECS", 0u64, 1..=u64::MAX)?;
        let cgroups =
            strata_jail::Cgroups::detect(&cgroup_owner(&cfg.state_dir)).map(Arc::new).map_err(|e| e.to_string());
        if let Err(why) = &cgroups {
            tracing::warn!(why, "no cgroups for VMs: no VM can start until this is set up");
        }
        let identities = strata_jail::Identities::detect(&cfg.state_dir).map(Arc::new).map_err(|e| e.to_string());
        if let Err(why) = &identities {
            tracing::warn!(why, "no unprivileged ids for VMs: no VM can start until this is set up");
        }
        let engine = Engine {
            cfg,
            store,
            registry,
            stats: Stats::default(),
            remote,
            base_recipes: Default::default(),
            apt_options: Default::default(),
            derived: Default::default(),
            restore_slots,
            fork_server: std::sync::Mutex::new(fork_server),
            cgroups,
            identities,
            guest_firewall: std::sync::OnceLock::new(),
            unconfined_for_benchmark: AtomicBool::new(false),
        };
        engine.reap_sessions();
        Ok(engine)
    }

    /// Debian packages (`os`'s package lists) whose name or description
    /// holds every word of `query`, names matching first; at most 50.
    ///
    /// # Errors
    /// If the query is empty, too long, or not plain words.
    pub async fn search_packages(&self, query: &str, os: Os) -> Result<Vec<(String, String)>, Error> {
        let words: Vec<&str> = query.split_whitespace().collect();
        let plain = |w: &&str| w.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
        if words.is_empty() || words.len() > 8 || query.len() > 100 || !words.iter().all(plain) {
            return Err(Error::Config(format!(
                "{query:?} is not a search: write up to 8 words of letters, digits, '+', '-' or '.'"
            )));
        }
        let apt = apt::options_async(&self.cfg.state_dir, &self.cfg.mirror, os, false).await?;
        Ok(tools::search_debian(&apt, &words, 50).await)
    }

    /// Resolves a package by name for this server's default OS.
    ///
    /// # Errors
    /// As [`Engine::package_on`].
    pub fn package(&self, name: &str) -> Result<Package, Error> {
        self.package_on(name, self.cfg.default_os)
    }

    /// Resolves a package by name for `os`: a definition made for it, else
    /// a Debian package of that name in `os`'s package lists, else an error
    /// naming the OSes that have it or suggesting close names. Fetches the
    /// lists of an OS this host does not run on first use.
    ///
    /// # Errors
    /// [`strata_package::Error::NotFound`] and friends; the lists of `os`
    /// could not be fetched.
    pub fn package_on(&self, name: &str, os: Os) -> Result<Package, Error> {
        strata_package::check_name(name)?;
        if let Some(defined) = self.registry.defined(name, os) {
            return Ok(defined?);
        }
        let key = (name.to_string(), os.name);
        if let Some(p) = lock(&self.derived).get(&key) {
            return Ok(p.clone());
        }
        // The chosen OS's lists must be had; another OS's only name who has it.
        self.apt_options(os)?;
        let pkg = self.registry.resolve(name, os, &EngineLists(self))?;
        lock(&self.derived).insert(key, pkg.clone());
        Ok(pkg)
    }

    /// The OS a launch or build is for: the one asked for, else the
    /// terminal's context's, else this server's default.
    pub fn os_for(&self, asked: Option<Os>, settings: Option<&context::ContextSettings>) -> Os {
        let default = self.cfg.default_os;
        asked.unwrap_or_else(|| settings.map_or(default, |s| s.os_or(default)))
    }

    /// apt's options that read `os`'s package lists, fetched on first use
    /// (see [`apt::options`]); remembered once the lists are there.
    ///
    /// # Errors
    /// If the lists cannot be fetched.
    fn apt_options(&self, os: Os) -> Result<Vec<String>, Error> {
        if let Some(o) = lock(&self.apt_options).get(os.name) {
            return Ok(o.clone());
        }
        let o = apt::options(&self.cfg.state_dir, &self.cfg.mirror, os, false)?;
        lock(&self.apt_options).insert(os.name, o.clone());
        Ok(o)
    }

    /// The control group a VM with `memory_mib` of guest RAM runs in.
    ///
    /// # Errors
    /// If this host cannot give VMs cgroups (what to set up is named).
    pub(crate) fn cgroup_for(&self, memory_mib: u32) -> Result<Option<strata_vmm::CgroupSpec>, Error> {
        if !self.confined() {
            return Ok(None);
        }
        let cgroups = self.cgroups.clone().map_err(|why| {
            Error::Refused(format!("a VM must run in a cgroup of its own, and this host cannot give it one: {why}"))
        })?;
        let l = self.cfg.vm_limits;
        Ok(Some(strata_vmm::CgroupSpec {
            cgroups,
            limits: strata_jail::Limits {
                cpu_percent: l.cpu_percent,
                memory_bytes: (u64::from(memory_mib) + u64::from(l.memory_allowance_mib)) << 20,
                pids: l.pids,
            },
        }))
    }

    /// The ids a VM runs as (with the `kvm` group where KVM is used).
    ///
    /// # Errors
    /// If this host has no range of ids for VMs (what to set up is named).
    pub(crate) fn identity_for(&self, accel: Accel) -> Result<Option<strata_vmm::IdentitySpec>, Error> {
        if !self.confined() {
            return Ok(None);
        }
        let identities = self.identities.clone().map_err(|why| {
            Error::Refused(format!("a VM must run as a user of its own, and this host cannot give it one: {why}"))
        })?;
        self.guest_firewall().map_err(Error::Refused)?;
        let groups = match accel {
            Accel::Kvm => strata_jail::identity::group_id("kvm").into_iter().collect(),
            Accel::Tcg => Vec::new(),
        };
        Ok(Some(strata_vmm::IdentitySpec { identities, groups }))
    }

    /// The record of running session `id`, read as it is (no reaping).
    pub fn running_record(&self, id: &str) -> Option<sessions::SessionRecord> {
        crate::sessions::read_record(&self.session_dir(id))
    }

    /// The guest memory of running session `id`'s VM, in MiB.
    pub fn session_memory_mib(&self, id: &str) -> Option<u32> {
        self.image_memory_mib(&self.running_record(id)?.launch_image)
    }

    /// The guest memory of VMs restored from image `digest`, in MiB.
    pub fn image_memory_mib(&self, digest: &str) -> Option<u32> {
        self.store.image(digest).ok().flatten()?.meta.get("memory_mib")?.parse().ok()
    }

    /// The ids VMs run as ("uids 2000000-2065535"), or why there are none.
    ///
    /// # Errors
    /// The reason, if there are none.
    pub fn identities(&self) -> Result<String, String> {
        self.identities
            .as_ref()
            .map(|i| {
                let r = i.range();
                format!("uids {}-{}, gids {}-{}", r.uid_start, r.uid_end(), r.gid_start, r.gid_start + r.count - 1)
            })
            .map_err(Clone::clone)
    }

    /// The firewall table that keeps guests off this host ("inet
    /// strata_guests"), installed in this network namespace if it is not
    /// yet (once per engine).
    ///
    /// # Errors
    /// Why it cannot be (no range of ids, nft missing or refusing).
    pub fn guest_firewall(&self) -> Result<String, String> {
        let ids = self.identities.as_ref().map_err(Clone::clone)?;
        self.guest_firewall
            .get_or_init(|| strata_jail::network::install(&ids.range()).map_err(|e| e.to_string()))
            .clone()?;
        Ok(format!("inet {}", strata_jail::network::TABLE))
    }

    /// Refuses a new VM if this server is below a floor ([`Floors`]).
    ///
    /// # Errors
    /// [`Error::Refused`], naming the floor and what is free.
    pub(crate) fn admit(&self) -> Result<(), Error> {
        let f = self.cfg.floors;
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let available = host::meminfo_mib(&meminfo, "MemAvailable:");
        if available < f.memory_mib {
            return Err(Error::Refused(format!(
                "this server has {available} MiB of memory available, below its floor of {} MiB \
                 (STRATA_MEMORY_FLOOR_MIB): no VM starts until sessions end",
                f.memory_mib
            )));
        }
        let dir = &self.cfg.state_dir;
        let free = nix::sys::statvfs::statvfs(dir)
            .map(|s| (s.blocks_available() * s.fragment_size()) >> 20)
            .map_err(|e| io_err(dir)(e.into()))?;
        if free < f.disk_mib {
            return Err(Error::Refused(format!(
                "the store's file system ({}) has {free} MiB free, below its floor of {} MiB \
                 (STRATA_DISK_FLOOR_MIB): no VM starts until space is freed (`strata images prune`)",
                dir.display(),
                f.disk_mib
            )));
        }
        Ok(())
    }

    /// Whether VMs start confined (always, but in a benchmark's unconfined runs).
    pub(crate) fn confined(&self) -> bool {
        !self.unconfined_for_benchmark.load(Ordering::Relaxed)
    }

    /// For `bench confine` only: VMs started from now on are (not) confined.
    pub(crate) fn set_confined_for_benchmark(&self, confined: bool) {
        self.unconfined_for_benchmark.store(!confined, Ordering::Relaxed);
    }

    /// Where VMs' control groups are made ("cgroup v1 beneath ..."), or
    /// why they cannot be.
    ///
    /// # Errors
    /// The reason, if there are none.
    pub fn cgroups(&self) -> Result<String, String> {
        self.cgroups.as_ref().map(|c| c.describe()).map_err(Clone::clone)
    }

    /// Removes the cgroups, and frees the ids, of this store's VMs whose
    /// directory is gone (and the cgroups other stores' killed processes
    /// left, once abandoned for an hour).
    pub(crate) fn sweep_confinement(&self) {
        let (sessions, tmp) = (self.cfg.state_dir.join("sessions"), self.cfg.state_dir.join("tmp"));
        let is_live = |vm: &str| sessions.join(vm).exists() || tmp.join(vm).exists();
        if let Ok(c) = &self.cgroups {
            c.sweep(is_live);
        }
        if let Ok(ids) = &self.identities {
            ids.sweep(is_live);
        }
    }
}

impl Drop for Engine {
    /// The cgroups and ids of VMs that ended go with the engine (those of
    /// detached sessions, still running, stay).
    fn drop(&mut self) {
        self.sweep_confinement();
    }
}

/// Tells this store's VMs' cgroups from other stores' (a hash of its
/// path): they are named `strata-OWNER-VM`.
pub fn cgroup_owner(state_dir: &Path) -> String {
    use sha2::Digest;
    let path = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
    hex::encode(&sha2::Sha256::digest(path.as_os_str().as_encoded_bytes())[..4])
}

impl Engine {
    /// An image of this recipe whose blobs are all intact, if any.
    pub(crate) fn usable(&self, kind: ImageKind, recipe: &str) -> Result<Option<ImageRecord>, Error> {
        while let Some(rec) = self.store.find_by_recipe(kind, recipe)? {
            match self.store.verify_image(&rec) {
                Ok(()) => {
                    crate::Stats::count(&self.stats.hits, kind);
                    return Ok(Some(rec));
                }
                // verify_image dropped the damaged image; look again, then rebuild.
                Err(e) => {
                    tracing::warn!(image = %rec.digest, error = %e, "image unusable, will rebuild")
                }
            }
        }
        crate::Stats::count(&self.stats.misses, kind);
        Ok(None)
    }

    /// An image of this recipe: a usable local one, else one the shared
    /// store has (fetched into the local store with the images under it).
    ///
    /// # Errors
    /// If the catalog or the shared store fails.
    pub(crate) async fn find_image(&self, kind: ImageKind, recipe: &str) -> Result<Option<ImageRecord>, Error> {
        if let Some(rec) = self.usable(kind, recipe)? {
            return Ok(Some(rec));
        }
        let Some(remote) = &self.remote else { return Ok(None) };
        let Some(rec) = remote.find_by_recipe(kind, recipe).await? else { return Ok(None) };
        remote.fetch_with_parents(&rec).await?;
        tracing::info!(image = %rec.digest, %kind, "image fetched from the shared store");
        Ok(Some(rec))
    }

    /// Brings the local cache back within its limit after fetches, keeping
    /// the images `roots` and those of every session (running or paused),
    /// with all they need.
    ///
    /// # Errors
    /// If the catalog or the shared store fails.
    pub(crate) async fn trim_cache(&self, roots: &[&ImageRecord]) -> Result<(), Error> {
        let Some(remote) = &self.remote else { return Ok(()) };
        let mut roots: Vec<String> = roots.iter().map(|r| r.digest.clone()).collect();
        roots.extend(self.session_images());
        let (needed, _) = self.store.image_closure(roots)?;
        let keep = needed.iter().flat_map(|i| i.files.values().cloned()).collect();
        let evicted = remote.evict(&keep).await?;
        if evicted.blobs > 0 {
            tracing::info!(blobs = evicted.blobs, bytes = evicted.bytes, "local cache trimmed to its limit");
        }
        Ok(())
    }

    /// Makes image `shared` of the shared store usable here, with every
    /// image it needs, within the local cache's limit.
    pub(crate) async fn fetch_shared(&self, shared: ImageRecord) -> Result<ImageRecord, Error> {
        if let Some(remote) = &self.remote {
            remote.fetch_with_parents(&shared).await?;
            self.trim_cache(&[&shared]).await?;
        }
        Ok(shared)
    }

    /// Publishes a new image to the shared store, if there is one. A
    /// failure only means other servers build it themselves: logged.
    pub(crate) async fn share(&self, rec: &ImageRecord) {
        if let Some(remote) = &self.remote {
            if let Err(e) = remote.publish(rec).await {
                tracing::error!(image = %rec.digest, error = %e, "could not publish the image to the shared store");
            }
        }
    }

    /// Runs a build, counting it (and its failure) by kind.
    pub(crate) async fn counted<T>(
        &self,
        kind: ImageKind,
        build: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        let r = build.await;
        let counters = if r.is_ok() { &self.stats.builds } else { &self.stats.build_failures };
        crate::Stats::count(counters, kind);
        r
    }
}
