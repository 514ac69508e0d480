//! QEMU processes: the command line, start, QMP, save, stop.

use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use qapi::qmp;
use tokio::net::{UnixListener, UnixStream};
use tokio::process::{Child, Command};

use crate::{Accel, AgentConn, Error};

/// The QEMU binary strata runs.
pub const QEMU: &str = "qemu-system-x86_64";

/// How guest RAM is backed.
#[derive(Debug, Clone)]
pub enum Memory {
    /// Plain anonymous memory (cold boots and builds).
    Anonymous,
    /// A file that receives every guest write (while capturing a launch image).
    SharedFile(PathBuf),
    /// A file mapped copy-on-write: many VMs share its pages, none changes it.
    PrivateFile(PathBuf),
}

/// How a disk is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskMode {
    Writable,
    ReadOnly,
    /// Writes go to an empty overlay made for this VM in its directory
    /// ([`VmConfig::dir`]), which goes with it.
    Throwaway,
}

/// One virtio-blk disk.
#[derive(Debug, Clone)]
pub struct Disk {
    pub path: PathBuf,
    pub format: &'static str,
    pub mode: DiskMode,
}

/// A device a terminal's context plugs in after the restore. Its host-side
/// backend is on the command line (backends are not part of the saved
/// device state, so the launch image still loads); the device itself is
/// added over QMP once the guest runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plug {
    /// User-mode networking. Without `outbound` the guest reaches nothing,
    /// only the forwards reach it: (host port on 127.0.0.1, guest port).
    Network { outbound: bool, forwards: Vec<(u16, u16)> },
    /// A host folder shared over 9p, mounted by its tag.
    Share { tag: String, path: PathBuf, readonly: bool },
    /// A qcow2 disk, found in the guest by its serial number.
    Disk { path: PathBuf, serial: String },
}

/// The guest's address on user-mode networking (QEMU's fixed layout).
pub const USER_NET_GUEST: [u8; 4] = [10, 0, 2, 15];
/// The gateway, which is also how the guest reaches the host.
pub const USER_NET_GATEWAY: [u8; 4] = [10, 0, 2, 2];
/// QEMU's DNS forwarder on user-mode networking.
pub const USER_NET_DNS: [u8; 4] = [10, 0, 2, 3];

/// Escapes a value for QEMU's `key=value,...` option syntax.
fn opt(value: &Path) -> String {
    value.display().to_string().replace(',', ",,")
}

impl Plug {
    fn id(&self, i: usize) -> String {
        match self {
            Plug::Network { .. } => format!("ctx-net{i}"),
            Plug::Share { .. } => format!("ctx-share{i}"),
            Plug::Disk { .. } => format!("ctx-disk{i}"),
        }
    }

    /// The backend's command-line arguments, if it goes on the command line.
    fn backend(&self, id: &str) -> Option<[String; 2]> {
        match self {
            Plug::Network { outbound, forwards } => {
                let mut v = format!("user,id={id},restrict={}", if *outbound { "off" } else { "on" });
                for (host, guest) in forwards {
                    v.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
                }
                Some(["-netdev".into(), v])
            }
            // The guest's owners and modes are kept in extended attributes:
            // a file the guest makes set-user-ID, or a device node it makes,
            // is a plain file on the host, owned by the VM's uid.
            Plug::Share { path, readonly, .. } => {
                let ro = if *readonly { ",readonly=on" } else { "" };
                Some(["-fsdev".into(), format!("local,id={id},path={},security_model=mapped-xattr{ro}", opt(path))])
            }
            // A block node on the command line stays inactive after an
            // incoming migration; disks are added once the guest runs.
            Plug::Disk { .. } => None,
        }
    }

    /// The HMP command that adds the backend once the guest runs, if any.
    fn late_backend(&self, id: &str) -> Option<String> {
        match self {
            Plug::Disk { path, .. } => {
                Some(format!("drive_add 0 if=none,id={id},format=qcow2,cache=writeback,file={}", opt(path)))
            }
            _ => None,
        }
    }

    /// The device's driver and properties. Each plug sits in a fixed PCI
    /// slot by its index, so a VM restored from a state saved with the
    /// plugs in it can declare them on its command line exactly as they were.
    fn device_props(&self, id: &str, index: usize) -> (&'static str, Vec<(&'static str, String)>) {
        let (driver, mut props) = match self {
            Plug::Network { .. } => ("virtio-net-pci", vec![("netdev", id.to_string())]),
            Plug::Share { tag, .. } => ("virtio-9p-pci", vec![("fsdev", id.to_string()), ("mount_tag", tag.clone())]),
            Plug::Disk { serial, .. } => {
                ("virtio-blk-pci", vec![("drive", id.to_string()), ("serial", serial.clone())])
            }
        };
        props.push(("addr", format!("{:#x}", PLUG_SLOT0 + index)));
        (driver, props)
    }

    /// The QMP `device_add` that plugs the device into the running guest.
    fn device(&self, id: &str, index: usize) -> qmp::device_add {
        let (driver, props) = self.device_props(id, index);
        let props: Vec<(String, qapi::Any)> =
            props.into_iter().map(|(k, v)| (k.to_string(), qapi::Any::from(v))).collect();
        qmp::device_add::new(driver, Some(format!("{id}-dev")), None, props)
    }

    /// The device and every backend on the command line, for a VM whose
    /// incoming state already holds the device.
    fn on_command_line(&self, id: &str, index: usize) -> Vec<String> {
        let mut a: Vec<String> = match (self, self.backend(id)) {
            (_, Some(b)) => b.to_vec(),
            (Plug::Disk { path, .. }, None) => {
                vec!["-drive".into(), format!("if=none,id={id},format=qcow2,cache=writeback,file={}", opt(path))]
            }
            _ => Vec::new(),
        };
        let (driver, props) = self.device_props(id, index);
        let mut dev = driver.to_string();
        for (k, v) in props {
            dev.push_str(&format!(",{k}={}", v.replace(',', ",,")));
        }
        dev.push_str(&format!(",id={id}-dev"));
        a.extend(["-device".to_string(), dev]);
        a
    }
}

/// PCI slot of the first plugged device; the machine's own devices sit below.
const PLUG_SLOT0: usize = 0x0c;
/// At most this many devices are plugged into one VM (slots up to 0x1f).
pub const MAX_PLUGS: usize = 0x20 - PLUG_SLOT0;

/// Everything that defines one QEMU process.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Directory for this VM's sockets and console log; must exist.
    pub dir: PathBuf,
    pub accel: Accel,
    pub memory_mib: u32,
    pub memory: Memory,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub cmdline: String,
    pub disks: Vec<Disk>,
    /// Device state to load instead of booting.
    pub incoming: Option<PathBuf>,
    /// Devices plugged in after the start ([`Vm::plug`]); only their
    /// backends are on the command line.
    pub plugs: Vec<Plug>,
    /// The incoming state already holds the plugs' devices (it was saved
    /// with them): they go on the command line, in the slots they were
    /// plugged into, and [`Vm::plug`] has nothing to do.
    pub plugs_in_state: bool,
    /// A graphical VM: a VGA display, a tablet and a keyboard, shown over
    /// VNC on a Unix socket in `dir` ([`VNC_SOCK`]). Part of the machine:
    /// a launch image made with a display restores only with one.
    pub display: bool,
    /// Kill QEMU when the thread that started it exits, even by SIGKILL.
    /// Off for sessions that may be detached and outlive their terminal.
    pub die_with_parent: bool,
    /// Scheduling niceness QEMU starts with (0: normal). Work done ahead of
    /// demand starts nice, so it yields to launches someone waits for.
    pub niceness: i32,
    /// Fork QEMU from this fork server instead of starting it by exec
    /// (cheaper: its libraries are loaded and relocated once).
    pub fork_server: Option<std::sync::Arc<strata_zygote::ForkServer>>,
    /// The control group QEMU runs in, made for it beneath strata's own and
    /// named after its directory, with these limits (CPU, memory, tasks).
    /// QEMU is in it before it runs any code of its own. `None` only for
    /// `strata bench confine`'s unconfined runs.
    pub cgroup: Option<CgroupSpec>,
    /// The user and groups QEMU runs as: ids claimed for it alone from the
    /// host's range, never root. It is given its files (overlay, console
    /// log, display socket, saved states). `None` only for `strata bench
    /// confine`'s unconfined runs.
    pub identity: Option<IdentitySpec>,
    /// The largest file QEMU may write, in bytes (`RLIMIT_FSIZE`): bounds
    /// what a session writes to the host through its disk's overlay and its
    /// console log. A write beyond fails (QEMU ignores `SIGXFSZ`), the
    /// guest sees an I/O error and runs on.
    pub file_size_limit: Option<u64>,
    /// QEMU's seccomp filter ([`SANDBOX`]). Off only for `strata bench
    /// confine`'s unconfined runs, which measure what the filter costs.
    pub sandbox: bool,
    /// What the guest does once an incoming state is loaded.
    pub after_load: AfterLoad,
    /// The incoming state holds all the guest's memory (snapshots of
    /// earlier builds were saved so; else the memory mapped from a shared
    /// file is the file's, as [`Vm::save`] leaves it out).
    pub whole_state: bool,
    /// The guest comes from another QEMU's live migration, on the socket
    /// QEMU listens on in its directory ([`INCOMING_SOCK`]), instead of
    /// from a file: QEMU waits for it, stopped, with its disks not yet
    /// taken (`late-block-activate`), until [`Vm::resume`]; with
    /// [`AfterLoad::Stay`] (a guest received to be saved again) its disks
    /// are taken once it has arrived.
    pub incoming_stream: Option<Stream>,
}

/// How a guest travels by live migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// On one connection (between servers: relayed over HTTP).
    Single,
    /// On a main connection and [`PARALLEL_CHANNELS`] more for its pages
    /// (`multifd`; within a host). A receiver then leaves alone the pages
    /// it never had that come as zero: on a shared memory file, touching
    /// one allocated it (a 512 MiB guest's 100,000 zero pages cost the
    /// receiving QEMU 0.5 s of CPU).
    Parallel,
}

/// The page channels of a [`Stream::Parallel`] migration.
pub const PARALLEL_CHANNELS: u8 = 2;

impl Stream {
    /// The connections it makes.
    pub fn connections(self) -> usize {
        match self {
            Stream::Single => 1,
            Stream::Parallel => 1 + usize::from(PARALLEL_CHANNELS),
        }
    }
}

/// What a guest restored from a saved state does once it is loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AfterLoad {
    /// What the state says: one saved running runs at once.
    #[default]
    AsSaved,
    /// Stays stopped (its state is only to be read or saved again).
    Stay,
    /// Runs, also when the state was saved stopped: [`Vm::start`] waits
    /// for the load and starts it.
    Run,
}

/// Where a VM's ids come from, and its supplementary groups (`kvm` where
/// KVM is used).
#[derive(Debug, Clone)]
pub struct IdentitySpec {
    pub identities: std::sync::Arc<strata_jail::Identities>,
    pub groups: Vec<u32>,
}

/// What a process running as `id` takes on.
pub fn credentials_of(id: &strata_jail::Identity) -> strata_zygote::Credentials {
    strata_zygote::Credentials { uid: id.uid, gid: id.gid, groups: id.groups.clone() }
}

/// Where a VM's control group is made, and its limits.
#[derive(Debug, Clone)]
pub struct CgroupSpec {
    pub cgroups: std::sync::Arc<strata_jail::Cgroups>,
    pub limits: strata_jail::Limits,
}

impl VmConfig {
    /// The QEMU arguments, with the QMP and agent channels served on the
    /// listening sockets `channels` (descriptors QEMU inherits). Devices
    /// are the same in every mode, in the same order, so a state saved by
    /// one VM loads into another.
    fn args(&self, channels: &Channels) -> Vec<String> {
        let dir = &self.dir;
        let mut a: Vec<String> = Vec::new();
        let mut push = |s: &[&str]| a.extend(s.iter().map(|x| x.to_string()));
        push(&["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]);
        // QEMU's seccomp filter, on every thread, before any guest code
        // runs: no obsolete calls, no privilege changes, no new processes
        // or programs, no scheduling or resource changes (strata renices
        // QEMU from outside). A call it forbids is refused (QEMU 10 answers
        // EPERM) or ends that QEMU only.
        if self.sandbox {
            push(&["-sandbox", SANDBOX]);
        }
        push(&["-machine", "pc,hpet=off,vmport=off,smm=off,usb=off,memory-backend=ram"]);
        // A restored VM is not a moved one on a shared network: nobody has
        // to learn where its address went. Without this, each restore has
        // QEMU tell the guest to announce itself five times in its first
        // half second (~3 ms of guest CPU each under TCG, and the packets).
        push(&["-global", "migration.announce-rounds=0"]);
        match self.accel {
            Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
            Accel::Tcg => push(&["-accel", "tcg"]),
        }
        let size = format!("{}M", self.memory_mib);
        push(&["-m", &size, "-smp", "1"]);
        let ram = match &self.memory {
            Memory::Anonymous => format!("memory-backend-ram,id=ram,size={size}"),
            Memory::SharedFile(p) => {
                format!("memory-backend-file,id=ram,size={size},mem-path={},share=on", p.display())
            }
            // Opened read-only (the image's file is not QEMU's to write),
            // mapped private and writable: the guest's writes stay in QEMU.
            Memory::PrivateFile(p) => {
                format!("memory-backend-file,id=ram,size={size},mem-path={},share=off,readonly=on,rom=off", p.display())
            }
        };
        push(&["-object", &ram]);
        push(&["-kernel", &self.kernel.display().to_string(), "-initrd", &self.initramfs.display().to_string()]);
        push(&["-append", &self.cmdline]);
        let console = match &channels.console {
            // Reopened through QEMU's own /proc: the pipe it inherited.
            Some(c) => format!("file,id=console,path=/proc/self/fd/{}", c.write.as_raw_fd()),
            None => format!("file,id=console,path={}", dir.join(CONSOLE_LOG).display()),
        };
        push(&["-chardev", &console, "-serial", "chardev:console"]);
        // QEMU serves both channels on sockets the host bound before it
        // started (see [`Channels`]).
        let qmp = format!("socket,id=qmp,fd={},server=on,wait=off", channels.qmp.as_raw_fd());
        push(&["-chardev", &qmp, "-mon", "chardev=qmp,mode=control"]);
        let agent = format!("socket,id=agent,fd={},server=on,wait=off", channels.agent.as_raw_fd());
        push(&["-device", "virtio-serial-pci,id=vser", "-chardev", &agent]);
        push(&["-device", &format!("virtserialport,bus=vser.0,chardev=agent,name={}", strata_proto::AGENT_PORT_NAME)]);
        if self.display {
            // std VGA (the guest's bochs DRM driver), absolute pointer, keyboard;
            // -display none above only means no window on this host.
            push(&["-device", "VGA,vgamem_mb=32", "-device", "virtio-tablet-pci", "-device", "virtio-keyboard-pci"]);
            let vnc = format!("unix:{},lossy=on", dir.join(VNC_SOCK).display());
            push(&["-vnc", &vnc]);
        }
        for (i, d) in self.disks.iter().enumerate() {
            let drive = match d.mode {
                DiskMode::Writable => format!("file={},format={}", d.path.display(), d.format),
                DiskMode::ReadOnly => format!("file={},format={},readonly=on", d.path.display(), d.format),
                DiskMode::Throwaway => format!("file={},format=qcow2", throwaway_overlay_path(dir, i).display()),
            };
            let drive = format!("{drive},if=none,id=disk{i},cache=unsafe");
            push(&["-drive", &drive, "-device", &format!("virtio-blk-pci,drive=disk{i}")]);
        }
        for (i, p) in self.plugs.iter().enumerate() {
            if self.plugs_in_state {
                a.extend(p.on_command_line(&p.id(i), i));
            } else {
                a.extend(p.backend(&p.id(i)).into_iter().flatten());
            }
        }
        if self.incoming.is_some() || self.incoming_stream.is_some() {
            a.extend(["-incoming".to_string(), "defer".to_string()]);
            if self.after_load == AfterLoad::Stay || self.incoming_stream.is_some() {
                a.push("-S".to_string());
            }
        }
        a
    }
}

/// glibc's allocator settings for QEMU. An idle session's QEMU holds
/// ~10 MiB of heap, and with the defaults ~1.5 MiB of it is free memory the
/// allocator keeps: freed chunks amid the heap, per-thread arenas, and
/// buffers that grew the mmap threshold and then came back to the heap. One
/// arena, and a fixed 256 KiB mmap and trim threshold, give most of it
/// back. Lower thresholds (32 KiB, no trim slack: 1 MiB less per idle
/// session) cost ~4 ms of CPU per VM start under TCG: QEMU rebuilds its
/// memory maps many times while it starts and loads a state, and each
/// rebuild's buffers then come from the kernel, zeroed page by page, and go
/// back (measured with `strata bench density` and `strata bench load`).
const QEMU_MALLOC_TUNABLES: &str =
    "glibc.malloc.arena_max=1:glibc.malloc.trim_threshold=262144:glibc.malloc.mmap_threshold=262144";

/// QEMU's `-sandbox` setting for every VM (see `VmConfig::args`).
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

const QMP_SOCK: &str = "qmp.sock";
/// The VNC socket of a graphical VM, in its directory: in a directory of
/// its own that QEMU may write (it makes the socket).
pub const VNC_SOCK: &str = "display/vnc.sock";
/// Where a VM that receives a live migration listens for it, in its
/// directory: in a directory of its own that QEMU may write.
pub const INCOMING_SOCK: &str = "migration/in.sock";
/// Where strata listens for a VM's outgoing live migration, in its
/// directory (strata's; the socket is given to the VM's uid alone).
pub const OUTGOING_SOCK: &str = "migration-out.sock";
/// A VM's console log, in its directory.
pub const CONSOLE_LOG: &str = "console.log";
const AGENT_SOCK: &str = "agent.sock";

type QmpReader = qapi::futures::QmpStreamTokio<tokio::io::ReadHalf<UnixStream>>;
type QmpWriter = qapi::futures::QmpStreamTokio<tokio::io::WriteHalf<UnixStream>>;

/// A VM's QMP channel: commands, and the events that come between their
/// answers, so that a wait for the guest to run is a wait on its event.
struct Qmp {
    service: qapi::futures::QapiService<QmpWriter>,
    events: qapi::futures::QapiEvents<QmpReader>,
    /// The guest runs (a RESUME event came since a STOP, or no STOP since a
    /// query found it running).
    running: bool,
}

impl Qmp {
    fn new(stream: qapi::futures::QapiStream<QmpReader, QmpWriter>) -> Qmp {
        let (service, events) = stream.into_parts();
        Qmp { service, events, running: false }
    }

    fn note(&mut self, event: &qmp::Event) {
        match event {
            qmp::Event::RESUME { .. } => self.running = true,
            qmp::Event::STOP { .. } | qmp::Event::SHUTDOWN { .. } => self.running = false,
            _ => {}
        }
    }

    /// The next event, or an error if QEMU closed the channel.
    async fn next_event(&mut self) -> std::io::Result<qmp::Event> {
        use futures_util::StreamExt;
        let eof = || std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "QEMU closed its monitor");
        let event = self.events.next().await.ok_or_else(eof)??;
        self.note(&event);
        Ok(event)
    }

    /// Runs a command; events read meanwhile update what is known of the guest.
    async fn execute<C>(&mut self, command: C) -> qapi::ExecuteResult<C>
    where
        C: qmp::QmpCommand,
        QmpWriter: futures_util::Sink<qapi::Execute<C, u32>, Error = std::io::Error> + Unpin,
    {
        let answer = self.service.execute(command);
        tokio::pin!(answer);
        loop {
            tokio::select! {
                biased;
                r = &mut answer => return r,
                e = self.next_event() => { e?; }
            }
        }
    }

    /// Waits until the guest runs: at once if it does, else for its RESUME
    /// event (an incoming state starts the guest when it is loaded).
    async fn wait_running(&mut self, timeout: Duration) -> Result<(), Error> {
        if self.running {
            return Ok(());
        }
        let st = self.execute(qmp::query_status {}).await.map_err(qmp_err("query-status"))?;
        // QEMU may send RESUME a moment before its run state says so (the
        // query can be answered in between): an event read while the query
        // ran counts, and one still to come ends the wait below.
        self.running |= st.status == qmp::RunState::running;
        let wait = async {
            while !self.running {
                self.next_event().await.map_err(Error::Channel)?;
            }
            Ok(())
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(r) => r,
            Err(_) => Err(Error::NotRunning(format!("{:?}", st.status))),
        }
    }
}

/// A listening socket at `path`, replacing a stale one.
fn bind_socket(path: &Path) -> Result<std::os::unix::net::UnixListener, Error> {
    let _ = std::fs::remove_file(path);
    std::os::unix::net::UnixListener::bind(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })
}

/// [`bind_socket`], for accepting here.
fn listen(path: &Path) -> Result<UnixListener, Error> {
    let std = bind_socket(path)?;
    let io = |source| Error::Io { path: path.to_path_buf(), source };
    std.set_nonblocking(true).map_err(io)?;
    UnixListener::from_std(std).map_err(io)
}

/// The listening sockets of a VM's QMP and agent channels, bound here and
/// handed to QEMU as open descriptors, which serves them. The host connects
/// at once: the connection waits in the socket's backlog until QEMU accepts
/// it, so nobody polls for a socket file to appear; a later attach (from
/// any process) connects by path. A detached VM has no work to do: a QEMU
/// that connected out instead would retry its connection, starting a
/// thread each time, several times a second (4x the CPU of an idle
/// session under TCG).
struct Channels {
    qmp: std::os::unix::net::UnixListener,
    agent: std::os::unix::net::UnixListener,
    /// A confined VM's console: QEMU writes it into a pipe, its monitor
    /// keeps the log (bounded; see [`strata_zygote::monitor`]).
    console: Option<ConsolePipe>,
}

struct ConsolePipe {
    read: std::os::fd::OwnedFd,
    write: std::os::fd::OwnedFd,
    log: std::fs::File,
}

impl Channels {
    /// Binds the channels' sockets in `dir`; with `monitored` (the ids a
    /// confined QEMU runs as) the console's pipe too.
    fn bind(dir: &Path, monitored: Option<(u32, u32)>) -> Result<Channels, Error> {
        let console = if let Some((uid, gid)) = monitored {
            let log_path = dir.join(CONSOLE_LOG);
            // Read too: its monitor moves the newest part to the front.
            let log = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&log_path)
                .map_err(|source| Error::Io { path: log_path.clone(), source })?;
            let (read, write) = strata_zygote::pipe().map_err(|source| Error::Io { path: log_path.clone(), source })?;
            // QEMU reopens its end by /proc/self/fd: the pipe must be its.
            std::os::unix::fs::fchown(&write, Some(uid), Some(gid))
                .map_err(|source| Error::Io { path: log_path, source })?;
            Some(ConsolePipe { read, write, log })
        } else {
            None
        };
        Ok(Channels { qmp: bind_socket(&dir.join(QMP_SOCK))?, agent: bind_socket(&dir.join(AGENT_SOCK))?, console })
    }

    /// The descriptors QEMU inherits.
    fn fds(&self) -> Vec<std::os::fd::RawFd> {
        let mut fds = vec![self.qmp.as_raw_fd(), self.agent.as_raw_fd()];
        fds.extend(self.console.as_ref().map(|c| c.write.as_raw_fd()));
        fds
    }

    /// The monitor's side of the console.
    fn monitor_console(&self) -> Option<strata_zygote::monitor::Console> {
        self.console
            .as_ref()
            .map(|c| strata_zygote::monitor::Console { pipe: c.read.as_raw_fd(), log: c.log.as_raw_fd() })
    }
}

/// Connects to a channel QEMU serves in `dir`.
async fn connect(dir: &Path, name: &str) -> std::io::Result<UnixStream> {
    UnixStream::connect(dir.join(name)).await
}

fn qmp_err(command: &'static str) -> impl FnOnce(qapi::ExecuteError) -> Error {
    move |e| Error::Qmp { command, source: e.into() }
}

/// Whether a state leaves out the memory QEMU maps from a shared file
/// (on: that memory is the file's, not the state's). Saving and loading
/// must agree: the state's format differs.
fn ignore_shared(on: bool) -> qmp::migrate_set_capabilities {
    migration_capabilities(on, false, Stream::Single)
}

/// The bandwidth a migration may use, bytes per second: more than any
/// disk or link here gives. QEMU's default (128 MiB/s) made a guest's
/// 120 MiB take 0.6 s to a file or a socket on this host; what bounds it
/// now is the disk, the socket's reader or the link.
const MIGRATION_MAX_BANDWIDTH: u64 = 64 << 30;
/// The longest stop a migration plans for its last part, ms (QEMU's
/// default is 300): at the bandwidth of this host's disks and sockets
/// what is left then is a few MiB.
const MIGRATION_DOWNTIME_MS: u64 = 50;

/// [`ignore_shared`], and whether the disks of a guest received by live
/// migration stay released until `cont` (so that its disk's writes, sent
/// after the memory, can be put in place first). Both sides set the same.
fn migration_capabilities(
    ignore_shared: bool,
    late_block_activate: bool,
    stream: Stream,
) -> qmp::migrate_set_capabilities {
    let cap = |capability, state| qmp::MigrationCapabilityStatus { capability, state };
    qmp::migrate_set_capabilities {
        capabilities: vec![
            cap(qmp::MigrationCapability::x_ignore_shared, ignore_shared),
            cap(qmp::MigrationCapability::late_block_activate, late_block_activate),
            cap(qmp::MigrationCapability::multifd, stream == Stream::Parallel),
        ],
    }
}

/// A running QEMU process. Killed when dropped, unless released.
pub struct Vm {
    process: Process,
    pid: u32,
    dir: PathBuf,
    qmp: Qmp,
    released: bool,
    /// Its control group, removed once QEMU is seen to exit (else swept by
    /// the engine when its directory is gone).
    cgroup: Option<strata_jail::Cgroup>,
    /// Its ids, released with the cgroup (a released VM keeps them; the
    /// engine's sweep frees them once its directory is gone).
    identity: Option<strata_jail::Identity>,
}

impl Drop for Vm {
    fn drop(&mut self) {
        crate::background::remove(self.pid);
        if !self.released {
            self.process.kill_now();
            // Its cgroup goes once the killed QEMU has left it (within
            // milliseconds); a drop cannot wait, so a short-lived thread does.
            let (cgroup, identity) = (self.cgroup.take(), self.identity.take());
            if cgroup.is_some() || identity.is_some() {
                let _ = std::thread::Builder::new().name("strata-cgroup-rm".into()).spawn(move || {
                    for _ in 0..500 {
                        if cgroup.as_ref().is_none_or(|cg| cg.is_empty() && cg.remove().is_ok()) {
                            // QEMU is gone: its ids are free.
                            drop(identity);
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    // Left for the sweep: never reused while QEMU may live.
                    if let Some(identity) = identity {
                        identity.keep();
                    }
                });
            }
        } else if let Some(identity) = self.identity.take() {
            identity.keep();
        }
    }
}

/// The child a fork request is making, and whether its requester gave up.
#[derive(Default)]
struct ForkedUnlessAbandoned {
    pid: std::sync::atomic::AtomicU32,
    abandoned: std::sync::atomic::AtomicBool,
}

/// Marks a fork request abandoned when dropped, unless disarmed, and kills
/// the child if it exists already.
struct AbandonGuard(std::sync::Arc<ForkedUnlessAbandoned>, bool);

impl Drop for AbandonGuard {
    fn drop(&mut self) {
        if !self.1 {
            self.0.abandoned.store(true, std::sync::atomic::Ordering::SeqCst);
            let pid = self.0.pid.load(std::sync::atomic::Ordering::SeqCst);
            if pid != 0 {
                kill_pid(pid);
            }
        }
    }
}

/// Kills a QEMU that never became a [`Vm`] (start failed or was cancelled),
/// unless disarmed.
struct KillUnlessDisarmed(u32, bool);

impl Drop for KillUnlessDisarmed {
    fn drop(&mut self) {
        if !self.1 {
            crate::background::remove(self.0);
            kill_pid(self.0);
        }
    }
}

fn kill_pid(pid: u32) {
    // 0 would be this process's own group.
    if pid == 0 {
        return;
    }
    // SAFETY: sending a signal has no memory effects.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
}

/// Reads QEMU's QMP greeting on a connected channel and negotiates
/// capabilities.
async fn open_qmp(stream: UnixStream) -> Result<Qmp, Error> {
    let neg = qapi::futures::QmpStreamTokio::open(stream).await.map_err(Error::Channel)?;
    Ok(Qmp::new(neg.negotiate().await.map_err(Error::Channel)?))
}

/// CPU time process `pid` has used (its live threads, from the scheduler's
/// nanosecond counters), in ms; 0 if it cannot be read. Fine-grained, for
/// the stages of a start; threads that have exited are not counted (the
/// benchmarks' whole-process figures come from /proc/PID/stat instead).
pub fn cpu_ms(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0.0 };
    let ns: u64 = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    ns as f64 / 1e6
}

/// A QEMU process, however it was started.
enum Process {
    /// Started by exec: our child, and QEMU's pid (the same, or a child
    /// of it: a confined QEMU's monitor is ours, QEMU its child, signalled
    /// through its pidfd; the monitor exits once it has reaped QEMU).
    Child(Child, u32, Option<std::os::fd::OwnedFd>),
    /// Forked by the fork server: its pidfd says when it exits (the server
    /// reaps it).
    Forked { pid: u32, pidfd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd> },
    /// Started by another strata process (a re-attached detached session).
    Other(u32),
}

impl Process {
    /// Sends SIGKILL. A forked QEMU is signalled through its pidfd, which
    /// cannot reach another process should the pid be reused.
    fn kill_now(&self) {
        match self {
            Process::Forked { pidfd, .. } => pidfd_kill(pidfd.get_ref()),
            Process::Child(_, _, Some(pidfd)) => pidfd_kill(pidfd),
            // A reaped child has no pid left to signal.
            Process::Child(c, _, None) => c.id().map_or((), kill_pid),
            Process::Other(pid) => kill_pid(*pid),
        }
    }

    fn pid(&self) -> u32 {
        match self {
            Process::Child(_, pid, _) | Process::Forked { pid, .. } | Process::Other(pid) => *pid,
        }
    }

    /// Waits until the process has exited; its exit status, as far as known.
    async fn exited(&mut self) -> String {
        match self {
            Process::Child(c, ..) => c.wait().await.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
            Process::Forked { pidfd, .. } => match pidfd.readable().await {
                Ok(_) => {
                    // Exited; gone once its monitor (or, unconfined, the
                    // fork server) reaped it, which keeps its status.
                    for _ in 0..2000 {
                        if !pidfd_alive(pidfd.get_ref()) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    "exited (status in the fork server)".into()
                }
                Err(e) => e.to_string(),
            },
            Process::Other(pid) => {
                // Not ours to wait for: watch /proc.
                while Path::new(&format!("/proc/{pid}")).exists() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                "exited".into()
            }
        }
    }
}

/// The environment QEMU runs with, besides what it inherits: a temporary
/// directory of its own (for any scratch file it makes) and the allocator's
/// tunables.
fn qemu_env(cfg: &VmConfig) -> [(&'static str, std::ffi::OsString); 2] {
    [("TMPDIR", cfg.dir.clone().into_os_string()), ("GLIBC_TUNABLES", QEMU_MALLOC_TUNABLES.into())]
}

/// Under TCG, transparent huge pages back the translation buffer in 2 MiB
/// steps, a few MiB of private memory per VM for code it never fills; under
/// KVM, guests want them.
fn no_thp(cfg: &VmConfig) -> bool {
    cfg.accel == Accel::Tcg
}

/// Starts QEMU as a fork server, with the preload library at `preload`
/// (`strata-zygote-preload`), for [`VmConfig::fork_server`].
///
/// # Errors
/// If it does not start and greet within 10 s.
pub fn start_fork_server(preload: &Path) -> Result<strata_zygote::ForkServer, strata_zygote::Error> {
    let tunables = std::ffi::OsStr::new(QEMU_MALLOC_TUNABLES);
    strata_zygote::ForkServer::start(Path::new(QEMU), preload, &[("GLIBC_TUNABLES", tunables)], Duration::from_secs(10))
}

/// Starts QEMU by exec.
fn exec_qemu(
    cfg: &VmConfig,
    args: &[String],
    channels: &Channels,
    log: std::fs::File,
    cgroup: Option<&strata_jail::Cgroup>,
    credentials: Option<strata_zygote::Credentials>,
    view: Option<&strata_zygote::FileView>,
) -> Result<Process, Error> {
    let channel_fds = channels.fds();
    let console = channels.monitor_console();
    // Prepared here: between fork and exec nothing may allocate.
    let cgroup_procs = cgroup_procs_files(cgroup)?;
    let view = view.map(strata_zygote::FileView::steps).transpose().map_err(|e| Error::Confine(e.to_string()))?;
    let monitored = view.is_some();
    let mut cmd = Command::new(QEMU);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::from(log));
    for (k, v) in qemu_env(cfg) {
        cmd.env(k, v);
    }
    let die_with_parent = cfg.die_with_parent;
    let no_thp = no_thp(cfg);
    let niceness = cfg.niceness;
    let file_size_limit = cfg.file_size_limit.unwrap_or(0);
    // SAFETY: setsid, prctl, setpriority and fcntl are async-signal-safe. A session of its
    // own keeps QEMU out of the terminal's signals (a closed terminal's
    // SIGHUP must not stop a detached VM; strata decides when VMs stop).
    // With `die_with_parent`, QEMU dies with strata even on SIGKILL.
    unsafe {
        cmd.pre_exec(move || {
            // Into its control group before QEMU runs at all.
            for procs in &cgroup_procs {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if written != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            libc::setsid();
            if no_thp {
                libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
            }
            if niceness != 0 {
                libc::setpriority(libc::PRIO_PROCESS, 0, niceness);
            }
            // Its view, pid namespace and monitor, no privileges to gain,
            // namespaces and bounds of its own, not root.
            let confinement = strata_zygote::monitor::ExecConfinement {
                view: view.as_ref(),
                console,
                file_size_limit,
                credentials: credentials.as_ref(),
                die_with_parent,
            };
            confinement.apply()?;
            // The channels' sockets stay open across exec, in QEMU only.
            for &fd in &channel_fds {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|source| Error::Spawn { program: QEMU.into(), source })?;
    let own = child.id().unwrap_or(0);
    // spawn returns once QEMU has exec'd (the monitor closed its copy of
    // the pipe that reports a failed exec): a monitor's QEMU is its child
    // by then, unless it already exited (then the monitor stands for it).
    let qemu = if monitored { only_child(own).unwrap_or(own) } else { own };
    // Opened at once: the pid is QEMU's unless QEMU already failed and was
    // reaped (then there is no pidfd, and its monitor is signalled instead).
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let pidfd = (qemu != own).then(|| unsafe { libc::syscall(libc::SYS_pidfd_open, qemu, 0) } as i32);
    // SAFETY: a new descriptor, ours alone.
    let pidfd = pidfd.filter(|fd| *fd >= 0).map(|fd| unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) });
    Ok(Process::Child(child, qemu, pidfd))
}

/// Whether the process behind a pidfd is still there (running, or exited
/// and not yet reaped).
fn pidfd_alive(pidfd: &std::os::fd::OwnedFd) -> bool {
    // SAFETY: signal 0 through a descriptor we own only checks.
    let r = unsafe {
        libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), 0, std::ptr::null::<libc::siginfo_t>(), 0)
    };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Sends SIGKILL through a pidfd (which cannot reach another process
/// should the pid be reused).
fn pidfd_kill(pidfd: &std::os::fd::OwnedFd) {
    // SAFETY: pidfd_send_signal takes a descriptor we own, a signal number
    // and no siginfo.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        );
    }
}

/// The monitor of a confined VM's QEMU `qemu` (its parent, outside QEMU's
/// pid namespace), if it has one.
pub fn monitor_of(qemu: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{qemu}/stat")).ok()?;
    let parent = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse::<u32>().ok()?;
    let comm = std::fs::read(format!("/proc/{parent}/comm")).ok()?;
    (comm.strip_suffix(b"\n") == Some(strata_zygote::monitor::MONITOR_NAME.to_bytes())).then_some(parent)
}

/// The one child of process `pid`, if it has exactly one.
fn only_child(pid: u32) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    match text.split_whitespace().map(str::parse::<u32>).collect::<Vec<_>>().as_slice() {
        [Ok(child)] => Some(*child),
        _ => None,
    }
}

/// Moves a file QEMU wrote to where it belongs (copied if that is on
/// another file system).
fn move_file(from: &Path, to: &Path) -> Result<(), Error> {
    let io = |source| Error::Io { path: to.to_path_buf(), source };
    match std::fs::rename(from, to) {
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            std::fs::copy(from, to).map_err(io)?;
            std::fs::remove_file(from).map_err(io)
        }
        r => r.map_err(io),
    }
}

/// What a confined VM's QEMU sees of the host's files ([`strata_zygote::view`]):
/// besides QEMU itself, its directory (writable), and each file it opens,
/// read-only unless it is the VM's to write: kernel, initramfs, memory
/// file, incoming state, disks and every file beneath them (their backing
/// chains), a home's disk, shared folders. Nothing else of the store.
fn file_view(cfg: &VmConfig) -> Result<strata_zygote::FileView, Error> {
    use strata_zygote::Shown;
    let abs = |p: &Path| std::path::absolute(p).map_err(|source| Error::Io { path: p.to_path_buf(), source });
    let dir = abs(&cfg.dir)?;
    let mut shown = vec![Shown::Bind { path: dir.clone(), writable: true }];
    let mut add = |p: &Path, writable: bool| -> Result<(), Error> {
        let p = abs(p)?;
        let known = shown.iter().any(|s| matches!(s, Shown::Bind { path, .. } if *path == p));
        if !p.starts_with(&dir) && !known {
            shown.push(Shown::Bind { path: p, writable });
        }
        Ok(())
    };
    add(&cfg.kernel, false)?;
    add(&cfg.initramfs, false)?;
    for d in &cfg.disks {
        // A throwaway overlay (in the VM's directory) stands on the disk.
        add(&d.path, d.mode == DiskMode::Writable)?;
        let beneath = match d.mode {
            DiskMode::Throwaway | DiskMode::ReadOnly => image_chain(&d.path),
            DiskMode::Writable => crate::qcow2::backing_chain(&d.path),
        };
        for below in beneath {
            add(&below, false)?;
        }
    }
    match &cfg.memory {
        Memory::SharedFile(p) => add(p, true)?,
        Memory::PrivateFile(p) => add(p, false)?,
        Memory::Anonymous => {}
    }
    if let Some(state) = &cfg.incoming {
        add(state, false)?;
    }
    for p in &cfg.plugs {
        match p {
            Plug::Disk { path, .. } => {
                add(path, true)?;
                for below in crate::qcow2::backing_chain(path) {
                    add(&below, false)?;
                }
            }
            Plug::Share { path, readonly, .. } => add(path, !readonly)?,
            Plug::Network { .. } => {}
        }
    }
    ensure_view_mount_point()?;
    Ok(strata_zygote::FileView::for_qemu(cfg.accel == Accel::Kvm, shown))
}

/// Makes, once, the directory a child mounts its view's root on.
pub(crate) fn ensure_view_mount_point() -> Result<(), Error> {
    static MOUNT_POINT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    MOUNT_POINT
        .get_or_init(|| std::fs::create_dir_all(strata_zygote::VIEW_MOUNT_POINT).map_err(|e| e.to_string()))
        .clone()
        .map_err(|e| Error::Confine(format!("{}: {e}", strata_zygote::VIEW_MOUNT_POINT)))
}

/// The files beneath a disk that is never written (an image's, which a
/// read-only or throwaway drive uses), read once per process: images are
/// immutable, and a launch need not read their headers again.
fn image_chain(disk: &Path) -> Vec<PathBuf> {
    type Chains = std::collections::BTreeMap<PathBuf, Vec<PathBuf>>;
    static CHAINS: std::sync::Mutex<Chains> = std::sync::Mutex::new(Chains::new());
    let mut chains = CHAINS.lock().unwrap_or_else(|e| e.into_inner());
    chains.entry(disk.to_path_buf()).or_insert_with(|| crate::qcow2::backing_chain(disk)).clone()
}

/// The uid and gid a VM's QEMU runs as, from the owner of its console log
/// (which strata gave it, in a directory QEMU cannot write: QEMU cannot
/// make it say otherwise), whichever process started it. `None` for a VM
/// that runs as root.
fn owner_of(dir: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir.join(CONSOLE_LOG)).ok()?;
    (meta.uid() != 0).then(|| (meta.uid(), meta.gid()))
}

/// Gives a VM's QEMU, running as `id`, the files it writes: its console
/// log and display directory (made here), its writable disks and memory
/// file, its throwaway overlays, the home disks in its incoming state; and
/// its shared folders, by an access list entry for its uid.
fn give_files(cfg: &VmConfig, id: &strata_jail::Identity) -> Result<(), strata_jail::Error> {
    id.grant_new_file(&cfg.dir.join(CONSOLE_LOG))?;
    if cfg.display {
        let display = cfg.dir.join(VNC_SOCK);
        id.grant_new_dir(display.parent().unwrap_or(&cfg.dir))?;
    }
    if cfg.incoming_stream.is_some() {
        let incoming = cfg.dir.join(INCOMING_SOCK);
        id.grant_new_dir(incoming.parent().unwrap_or(&cfg.dir))?;
    }
    for (i, d) in cfg.disks.iter().enumerate() {
        match d.mode {
            DiskMode::Writable => id.grant(&d.path)?,
            DiskMode::Throwaway => id.grant(&throwaway_overlay_path(&cfg.dir, i))?,
            DiskMode::ReadOnly => {}
        }
    }
    if let Memory::SharedFile(p) = &cfg.memory {
        id.grant_new_file(p)?;
    }
    for p in &cfg.plugs {
        match p {
            Plug::Disk { path, .. } if cfg.plugs_in_state => id.grant(path)?,
            Plug::Share { path, readonly, .. } => id.grant_tree(path, *readonly)?,
            _ => {}
        }
    }
    Ok(())
}

/// The `cgroup.procs` files of a VM's cgroup, as C strings.
fn cgroup_procs_files(cgroup: Option<&strata_jail::Cgroup>) -> Result<Vec<std::ffi::CString>, Error> {
    use std::os::unix::ffi::OsStrExt;
    cgroup
        .map(|c| c.procs_files())
        .unwrap_or_default()
        .into_iter()
        .map(|p| {
            std::ffi::CString::new(p.as_os_str().as_bytes())
                .map_err(|_| Error::Confine(format!("cgroup path {} has a NUL byte", p.display())))
        })
        .collect()
}

/// Starts QEMU as a child of the fork server: the same arguments,
/// environment and descriptors as [`exec_qemu`] gives it.
async fn fork_qemu(
    server: &std::sync::Arc<strata_zygote::ForkServer>,
    cfg: &VmConfig,
    args: &[String],
    channels: &Channels,
    log: &std::fs::File,
    credentials: Option<strata_zygote::Credentials>,
    view: Option<strata_zygote::FileView>,
) -> Result<Process, strata_zygote::Error> {
    use std::os::unix::ffi::OsStrExt;
    let dup = |fd: std::os::fd::BorrowedFd<'_>| {
        fd.try_clone_to_owned().map_err(|source| strata_zygote::Error::Io { what: "duplicating a descriptor", source })
    };
    let null = std::fs::File::open("/dev/null")
        .map_err(|source| strata_zygote::Error::Io { what: "opening /dev/null", source })?;
    let (qmp, agent) = (channels.qmp.as_fd(), channels.agent.as_fd());
    let mut fds = vec![dup(null.as_fd())?, dup(null.as_fd())?, dup(log.as_fd())?, dup(qmp)?, dup(agent)?];
    let mut fd_targets = vec![0, 1, 2, qmp.as_raw_fd(), agent.as_raw_fd()];
    // A monitored console: QEMU's end, then the monitor's two.
    if let Some(c) = &channels.console {
        fds.push(dup(c.write.as_fd())?);
        fd_targets.push(c.write.as_raw_fd());
        fds.push(dup(c.read.as_fd())?);
        fds.push(dup(c.log.as_fd())?);
    }
    let overrides = qemu_env(cfg);
    let mut env: Vec<Vec<u8>> = std::env::vars_os()
        .filter(|(k, _)| !overrides.iter().any(|(o, _)| k == o) && k != "LD_PRELOAD")
        .map(|(k, v)| [k.as_bytes(), b"=", v.as_bytes()].concat())
        .collect();
    env.extend(overrides.iter().map(|(k, v)| [k.as_bytes(), b"=", v.as_bytes()].concat()));
    let req = strata_zygote::SpawnRequest {
        args: std::iter::once(QEMU.as_bytes().to_vec()).chain(args.iter().map(|a| a.as_bytes().to_vec())).collect(),
        env,
        fd_targets,
        niceness: cfg.niceness,
        die_with_parent: cfg.die_with_parent,
        no_thp: no_thp(cfg),
        credentials,
        file_size_limit: cfg.file_size_limit.unwrap_or(0),
        // Made only for a confined VM, which has a view.
        console: channels.console.is_some(),
        view,
    };
    let server = server.clone();
    // If this future is dropped while the request is out (a cancelled
    // restore), the child the server forks must not live on: whichever of
    // the request and the drop comes second kills it.
    let forked = std::sync::Arc::new(ForkedUnlessAbandoned::default());
    let mut guard = AbandonGuard(forked.clone(), false);
    let (pid, pidfd) = tokio::task::spawn_blocking(move || {
        let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        let r = server.spawn(&req, &borrowed);
        if let Ok((pid, _)) = &r {
            forked.pid.store(*pid, std::sync::atomic::Ordering::SeqCst);
            if forked.abandoned.load(std::sync::atomic::Ordering::SeqCst) {
                kill_pid(*pid);
            }
        }
        r
    })
    .await
    .map_err(|e| strata_zygote::Error::Spawn(e.to_string()))??;
    // SAFETY: the AsyncFd owns the pidfd, which stays open and the same
    // until it is dropped.
    let pidfd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
        .map_err(|e| strata_zygote::Error::Io { what: "watching the pidfd", source: e.into() })?;
    guard.1 = true;
    Ok(Process::Forked { pid, pidfd })
}

/// Polls until QEMU has loaded its incoming state (a failed load ends QEMU).
async fn wait_loaded(qmp: &mut Qmp) -> Result<(), Error> {
    loop {
        let st = qmp.execute(qmp::query_status {}).await.map_err(qmp_err("query-status"))?;
        if st.status != qmp::RunState::inmigrate {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// What a finished save reports.
#[derive(Debug, Clone, Copy)]
pub struct Saved {
    /// How long the guest was stopped for the save's last part (QEMU's
    /// figure): the save copies memory while the guest runs, then stops it.
    pub downtime: Duration,
}

impl Vm {
    /// Starts QEMU, connects QMP, loads the incoming state if any (the guest
    /// then runs at once), and waits for the guest agent's channel.
    ///
    /// # Errors
    /// If QEMU cannot start, exits early, or a channel does not connect in time.
    pub async fn start(cfg: &VmConfig, connect_timeout: Duration) -> Result<(Vm, AgentConn), Error> {
        for (i, d) in cfg.disks.iter().enumerate().filter(|(_, d)| d.mode == DiskMode::Throwaway) {
            // One left by an earlier VM in this directory (a paused session's)
            // is stale: unlinked, it stays whole for any process holding it.
            let overlay = throwaway_overlay_path(&cfg.dir, i);
            let _ = std::fs::remove_file(&overlay);
            crate::qcow2::create_overlay(&d.path, d.format, &overlay)?;
        }
        // Its ids and cgroup are named after its directory (the sweeps
        // tell live VMs by it).
        let name = cfg.dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let identity = match &cfg.identity {
            Some(spec) => {
                let id =
                    spec.identities.claim(&name, spec.groups.clone()).map_err(|e| Error::Confine(e.to_string()))?;
                give_files(cfg, &id).map_err(|e| Error::Confine(e.to_string()))?;
                Some(id)
            }
            None => None,
        };
        let credentials = identity.as_ref().map(credentials_of);
        // A confined QEMU sees only its own files.
        let view = match &identity {
            Some(_) => Some(file_view(cfg)?),
            None => None,
        };
        let monitored = credentials.as_ref().filter(|_| view.is_some()).map(|c| (c.uid, c.gid));
        let channels = Channels::bind(&cfg.dir, monitored)?;
        let args = cfg.args(&channels);
        let log = cfg.dir.join("qemu.log");
        let log_file = std::fs::File::create(&log).map_err(|source| Error::Io { path: log, source })?;
        let cgroup = match &cfg.cgroup {
            Some(spec) => Some(spec.cgroups.create(&name, &spec.limits).map_err(|e| Error::Confine(e.to_string()))?),
            None => None,
        };
        tracing::debug!(?args, "starting QEMU");
        let mut process = match &cfg.fork_server {
            Some(server) => {
                match fork_qemu(server, cfg, &args, &channels, &log_file, credentials.clone(), view.clone()).await {
                    Ok(p) => {
                        // A forked QEMU joins its cgroup at once: it is still
                        // setting itself up in the fork server's code. Its
                        // monitor too (the console's copying is the VM's work).
                        let monitor = monitor_of(p.pid());
                        let joined = cgroup.as_ref().map(|c| {
                            c.add(p.pid())?;
                            monitor.map_or(Ok(()), |m| c.add(m))
                        });
                        if let Some(Err(e)) = joined {
                            p.kill_now();
                            return Err(Error::Confine(e.to_string()));
                        }
                        p
                    }
                    Err(e) => {
                        // A broken fork server must not stop launches: exec instead.
                        tracing::warn!(error = %e, "the fork server failed; starting QEMU by exec");
                        exec_qemu(cfg, &args, &channels, log_file, cgroup.as_ref(), credentials, view.as_ref())?
                    }
                }
            }
            None => exec_qemu(cfg, &args, &channels, log_file, cgroup.as_ref(), credentials, view.as_ref())?,
        };
        // QEMU has its own copies now.
        drop(channels);
        let dir = cfg.dir.clone();
        let early_exit = |status: String| Error::EarlyExit { status, console: diagnostics(&dir) };
        let pid = process.pid();
        // If this future is dropped before the Vm exists (a cancelled launch),
        // the process must not outlive it.
        let mut guard = KillUnlessDisarmed(pid, false);
        // Work ahead of demand (it starts nice) yields to launches.
        if cfg.niceness > 0 {
            crate::background::add(pid);
        }
        let t0 = Instant::now();
        let setup = async {
            let agent = connect(&cfg.dir, AGENT_SOCK).await.map_err(Error::Channel)?;
            let mut qmp = open_qmp(connect(&cfg.dir, QMP_SOCK).await.map_err(Error::Channel)?).await?;
            tracing::debug!(ms = t0.elapsed().as_secs_f64() * 1e3, cpu_ms = cpu_ms(pid), "QMP ready");
            if let Some(state) = &cfg.incoming {
                qmp.execute(ignore_shared(!cfg.whole_state)).await.map_err(qmp_err("migrate-set-capabilities"))?;
                let uri = format!("file:{}", state.display());
                qmp.execute(qmp::migrate_incoming { uri: Some(uri), channels: None, exit_on_error: Some(true) })
                    .await
                    .map_err(qmp_err("migrate-incoming"))?;
                tracing::debug!(ms = t0.elapsed().as_secs_f64() * 1e3, cpu_ms = cpu_ms(pid), "state loading");
                if cfg.after_load == AfterLoad::Run {
                    wait_loaded(&mut qmp).await?;
                    qmp.execute(qmp::cont {}).await.map_err(qmp_err("cont"))?;
                }
            } else if let Some(stream) = cfg.incoming_stream {
                // A guest that is to run here takes its disks only when it
                // starts (its overlay is put in place first); one received
                // to be saved again ([`AfterLoad::Stay`]) takes them at once.
                let late = cfg.after_load != AfterLoad::Stay;
                qmp.execute(migration_capabilities(false, late, stream))
                    .await
                    .map_err(qmp_err("migrate-set-capabilities"))?;
                let uri = format!("unix:{}", cfg.dir.join(INCOMING_SOCK).display());
                qmp.execute(qmp::migrate_incoming { uri: Some(uri), channels: None, exit_on_error: Some(true) })
                    .await
                    .map_err(qmp_err("migrate-incoming"))?;
            }
            Ok::<_, Error>((qmp, agent))
        };
        // Every early return below leaves `guard` armed: it kills QEMU.
        let (qmp, agent) = tokio::select! {
            r = setup => r?,
            st = process.exited() => return Err(early_exit(st)),
            _ = tokio::time::sleep(connect_timeout) => return Err(Error::AgentTimeout(connect_timeout.as_secs())),
        };
        guard.1 = true;
        Ok((Vm { process, pid, dir: cfg.dir.clone(), qmp, released: false, cgroup, identity }, AgentConn::new(agent)))
    }

    /// Reconnects to a VM started by another process (a detached session):
    /// connects to the channels QEMU serves. A VM started by an older strata
    /// connects out instead, retrying: for those, listeners are opened here.
    ///
    /// # Errors
    /// If QEMU does not answer within `timeout`.
    pub async fn reattach(dir: &Path, pid: u32, timeout: Duration) -> Result<(Vm, AgentConn), Error> {
        let both = async {
            match connect(dir, QMP_SOCK).await {
                Ok(qmp) => {
                    let agent = connect(dir, AGENT_SOCK).await.map_err(Error::Channel)?;
                    Ok::<_, Error>((open_qmp(qmp).await?, agent))
                }
                Err(_) => {
                    let qmp_listener = listen(&dir.join(QMP_SOCK))?;
                    let agent_listener = listen(&dir.join(AGENT_SOCK))?;
                    let qmp = open_qmp(qmp_listener.accept().await.map_err(Error::Channel)?.0).await?;
                    Ok((qmp, agent_listener.accept().await.map_err(Error::Channel)?.0))
                }
            }
        };
        let (qmp, agent) =
            tokio::time::timeout(timeout, both).await.map_err(|_| Error::AgentTimeout(timeout.as_secs()))??;
        Ok((
            Vm {
                process: Process::Other(pid),
                pid,
                dir: dir.to_path_buf(),
                qmp,
                released: false,
                cgroup: None,
                identity: None,
            },
            AgentConn::new(agent),
        ))
    }

    /// Leaves QEMU running when this handle is dropped (a detached session).
    pub fn release(mut self) -> u32 {
        self.released = true;
        self.pid
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sets the scheduling niceness of every thread of QEMU (on Linux a
    /// niceness is per thread): work done ahead of demand yields the CPU to
    /// sessions someone is waiting for. Best effort.
    pub fn set_niceness(&self, nice: i32) {
        strata_zygote::renice_threads(self.pid, nice);
    }

    /// Counts QEMU as work ahead of demand no more (it is not stopped
    /// while launches someone waits for run, [`crate::background`]).
    pub fn leave_background(&self) {
        crate::background::remove(self.pid);
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// CPU time QEMU has used so far (all its threads), in ms; 0 if unknown.
    pub fn cpu_ms(&self) -> f64 {
        cpu_ms(self.pid)
    }

    /// The end of the console log and QEMU's own messages, for error reports.
    pub fn diagnostics(&self) -> String {
        diagnostics(&self.dir)
    }

    /// Plugs the devices of `plugs` (the same list the VM was started with,
    /// whose backends are on its command line) into the running guest.
    ///
    /// # Errors
    /// If QEMU refuses a device.
    pub async fn plug(&mut self, plugs: &[Plug]) -> Result<(), Error> {
        if plugs.is_empty() {
            return Ok(());
        }
        // The agent's channel connects before an incoming state is loaded;
        // devices can only be added once the guest runs. Only sessions with
        // devices wait here, a few milliseconds at most.
        self.qmp.wait_running(Duration::from_secs(30)).await?;
        for (i, p) in plugs.iter().enumerate() {
            if let (Plug::Disk { path, .. }, Some((uid, gid))) = (p, owner_of(&self.dir)) {
                strata_jail::identity::give(path, uid, gid).map_err(|e| Error::Confine(e.to_string()))?;
            }
            let id = p.id(i);
            if let Some(cmd) = p.late_backend(&id) {
                let out = self
                    .qmp
                    .execute(qmp::human_monitor_command { command_line: cmd, cpu_index: None })
                    .await
                    .map_err(qmp_err("drive_add"))?;
                // HMP reports failure as text, not as a QMP error.
                if !out.trim().is_empty() && !out.trim().eq_ignore_ascii_case("OK") {
                    return Err(Error::Qmp {
                        command: "drive_add",
                        source: std::io::Error::other(out.trim().to_string()),
                    });
                }
            }
            self.qmp.execute(p.device(&id, i)).await.map_err(qmp_err("device_add"))?;
        }
        Ok(())
    }

    /// Writes what the VM's display shows to `path`: a PNG, or with `raw`
    /// a PPM (a header and the pixels as they are, for checking them).
    ///
    /// # Errors
    /// If the VM has no display or QEMU cannot write the file.
    pub async fn screenshot(&mut self, path: &Path, raw: bool) -> Result<(), Error> {
        let out = self.outgoing_file("screen.out")?;
        let cmd = qmp::screendump {
            filename: out.display().to_string(),
            format: Some(if raw { qmp::ImageFormat::ppm } else { qmp::ImageFormat::png }),
            device: None,
            head: None,
        };
        self.qmp.execute(cmd).await.map(|_| ()).map_err(qmp_err("screendump"))?;
        move_file(&out, path)
    }

    /// A file QEMU is to write, in the VM's directory (the only place a
    /// confined QEMU sees besides what it was started with), made and given
    /// to it; the caller moves it where it belongs once written.
    fn outgoing_file(&self, name: &str) -> Result<PathBuf, Error> {
        let out = self.dir.join(name);
        let _ = std::fs::remove_file(&out);
        self.give_new_file(&out)?;
        Ok(out)
    }

    /// Presses and releases the key `x` on the VM's keyboard (what a
    /// benchmark types to see a graphical program draw a character).
    ///
    /// # Errors
    /// If QEMU refuses or the monitor is gone.
    pub async fn press_x(&mut self) -> Result<(), Error> {
        let key = qmp::KeyValue::qcode(qmp::QKeyCodeWrapper { data: qmp::QKeyCode::x });
        self.qmp
            .execute(qmp::send_key { keys: vec![key], hold_time: Some(20) })
            .await
            .map(|_| ())
            .map_err(qmp_err("send-key"))
    }

    /// Pauses the guest's CPUs (the VM keeps its memory and devices).
    ///
    /// # Errors
    /// If QEMU refuses or the monitor is gone.
    pub async fn pause(&mut self) -> Result<(), Error> {
        self.qmp.execute(qmp::stop {}).await.map(|_| ()).map_err(qmp_err("stop"))
    }

    /// Waits until the incoming state is loaded (a guest started with
    /// [`AfterLoad::Stay`] is then stopped, ready to be saved again).
    ///
    /// # Errors
    /// If QEMU does not answer, or the load does not end within `timeout`.
    pub async fn wait_loaded(&mut self, timeout: Duration) -> Result<(), Error> {
        tokio::time::timeout(timeout, wait_loaded(&mut self.qmp))
            .await
            .map_err(|_| Error::Save(format!("the saved state did not load within {} s", timeout.as_secs())))?
    }

    /// Resumes the guest if it is stopped (a strata process that died while
    /// saving it leaves it so); whether it had to.
    ///
    /// # Errors
    /// If QEMU does not answer within 10 s or refuses.
    pub async fn ensure_running(&mut self) -> Result<bool, Error> {
        let asked = async {
            let st = self.qmp.execute(qmp::query_status {}).await.map_err(qmp_err("query-status"))?;
            if st.status == qmp::RunState::running {
                return Ok(false);
            }
            self.resume().await.map(|()| true)
        };
        tokio::time::timeout(Duration::from_secs(10), asked)
            .await
            .map_err(|_| Error::Save("QEMU did not answer query-status within 10 s".into()))?
    }

    /// Resumes a paused guest.
    ///
    /// # Errors
    /// If QEMU refuses or the monitor is gone.
    pub async fn resume(&mut self) -> Result<(), Error> {
        self.qmp.execute(qmp::cont {}).await.map(|_| ()).map_err(qmp_err("cont"))
    }

    /// Saves the running guest's device state (and any memory not in a shared
    /// file) to `path`, and stops QEMU. The guest is not paused first: the
    /// save then records it as running, so a restore resumes it by itself
    /// with no `cont` round trip on the launch path.
    ///
    /// # Errors
    /// If QEMU refuses, the save fails, or it does not finish in `timeout`.
    pub async fn save_and_quit(&mut self, path: &Path, timeout: Duration) -> Result<(), Error> {
        self.save(path, timeout).await?;
        self.quit().await;
        Ok(())
    }

    /// Saves the guest's state to `path` as [`Vm::save_and_quit`] does, but
    /// leaves QEMU alive, stopped, its disks flushed and released (so their
    /// files can be copied) until [`Vm::quit`].
    ///
    /// # Errors
    /// If QEMU refuses, the save fails, or it does not finish in `timeout`.
    pub async fn save(&mut self, path: &Path, timeout: Duration) -> Result<Saved, Error> {
        self.qmp.execute(ignore_shared(true)).await.map_err(qmp_err("migrate-set-capabilities"))?;
        let out = self.outgoing_file("outgoing.state")?;
        let saved = self.migrate_until_done(format!("file:{}", out.display()), timeout).await?;
        move_file(&out, path)?;
        Ok(saved)
    }

    /// Sends the running guest by live migration (all its memory, then its
    /// devices; the guest runs while most of it goes, then stops) to whoever
    /// accepts on `socket`, a Unix socket strata listens on in the VM's
    /// directory ([`OUTGOING_SOCK`]). Once it is done the guest stays
    /// stopped here, its disks flushed and released (so the overlay can be
    /// copied), until [`Vm::quit`], or [`Vm::resume`] if the other side
    /// fails; a migration that fails midway leaves it running here.
    ///
    /// # Errors
    /// If QEMU refuses, the migration fails, or it does not finish in `timeout`.
    pub async fn send_live(&mut self, socket: &Path, stream: Stream, timeout: Duration) -> Result<Saved, Error> {
        self.qmp
            .execute(migration_capabilities(false, true, stream))
            .await
            .map_err(qmp_err("migrate-set-capabilities"))?;
        self.migrate_until_done(format!("unix:{}", socket.display()), timeout).await
    }

    /// The file its RAM maps copy-on-write ([`Memory::PrivateFile`]), as
    /// QEMU says.
    async fn private_memory_file(&mut self) -> Option<PathBuf> {
        let prop = |property: &str| qmp::qom_get { path: "/objects/ram".into(), property: property.into() };
        let (share, path) = (prop("share"), prop("mem-path"));
        if self.qmp.execute(share).await.ok()? != serde_json::Value::Bool(false) {
            return None;
        }
        self.qmp.execute(path).await.ok()?.as_str().map(PathBuf::from)
    }

    /// Migrates to `uri` until done, as fast as the reader takes it.
    async fn migrate_until_done(&mut self, uri: String, timeout: Duration) -> Result<Saved, Error> {
        // The migration reads every page of its RAM.
        let warming = self.private_memory_file().await.map(|p| crate::pagecache::warm_in_background(&p));
        let done = self.migrate_and_wait(uri, timeout).await;
        if let Some(stop) = warming {
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        done
    }

    async fn migrate_and_wait(&mut self, uri: String, timeout: Duration) -> Result<Saved, Error> {
        let pace = qmp::MigrateSetParameters {
            max_bandwidth: Some(MIGRATION_MAX_BANDWIDTH),
            downtime_limit: Some(MIGRATION_DOWNTIME_MS),
            multifd_channels: Some(PARALLEL_CHANNELS),
            ..Default::default()
        };
        self.qmp.execute(qmp::migrate_set_parameters(pace)).await.map_err(qmp_err("migrate-set-parameters"))?;
        self.qmp
            .execute(qmp::migrate { uri: Some(uri), channels: None, detach: None, resume: None })
            .await
            .map_err(qmp_err("migrate"))?;
        let deadline = Instant::now() + timeout;
        loop {
            // A QEMU that stops answering fails the save at the deadline,
            // instead of holding its caller for ever.
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
            let asked = tokio::time::timeout(left, self.qmp.execute(qmp::query_migrate {}))
                .await
                .map_err(|_| Error::Save(format!("QEMU did not answer within {} s while saving", timeout.as_secs())))?;
            let info = asked.map_err(qmp_err("query-migrate"))?;
            match info.status {
                Some(qmp::MigrationStatus::completed) => {
                    let ms = info.downtime.and_then(|d| u64::try_from(d).ok()).unwrap_or(0);
                    if let Some(ram) = &info.ram {
                        tracing::debug!(total_ms = ?info.total_time, setup_ms = ?info.setup_time, downtime_ms = ms, normal_pages = ram.normal, zero_pages = ram.duplicate, mbps = ram.mbps, rounds = ram.dirty_sync_count, "migration completed");
                    }
                    return Ok(Saved { downtime: Duration::from_millis(ms) });
                }
                Some(qmp::MigrationStatus::failed) | Some(qmp::MigrationStatus::cancelled) => {
                    return Err(Error::Save(info.error_desc.unwrap_or_else(|| "migration failed".into())))
                }
                _ => {}
            }
            if Instant::now() > deadline {
                return Err(Error::Save(format!("not complete after {} s", timeout.as_secs())));
            }
            // Only while saving an image, never on the launch path.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Asks QEMU to quit and waits for it (killing it after 30 s).
    pub async fn quit(&mut self) {
        let _ = self.qmp.execute(qmp::quit {}).await;
        if !self.wait_exit(Duration::from_secs(30)).await {
            self.kill().await;
        }
        self.released = true;
    }

    /// Where to read the throwaway overlay of disk `index` (a
    /// [`DiskMode::Throwaway`] drive), while QEMU lives: the overlay made in
    /// the VM's directory. A VM started by an earlier strata has QEMU's own
    /// temporary overlay (`snapshot=on`), unlinked once opened: that one is
    /// read through QEMU's open file in /proc.
    ///
    /// # Errors
    /// If QEMU has no such drive, or it is not a throwaway overlay.
    pub async fn throwaway_overlay(&mut self, index: usize) -> Result<PathBuf, Error> {
        let made_here = throwaway_overlay_path(&self.dir, index);
        if made_here.is_file() {
            return Ok(made_here);
        }
        let device = format!("disk{index}");
        let blocks = self.qmp.execute(qmp::query_block {}).await.map_err(qmp_err("query-block"))?;
        let file = blocks
            .into_iter()
            .find(|b| b.device == device)
            .and_then(|b| b.inserted)
            .map(|i| i.file)
            .ok_or_else(|| Error::Save(format!("QEMU has no drive {device}")))?;
        let path = overlay_file_name(&file)
            .ok_or_else(|| Error::Save(format!("drive {device} is not a throwaway overlay ({file})")))?;
        let fds = PathBuf::from(format!("/proc/{}/fd", self.pid));
        let entries = std::fs::read_dir(&fds).map_err(|source| Error::Io { path: fds.clone(), source })?;
        for e in entries.flatten() {
            let Ok(target) = std::fs::read_link(e.path()) else { continue };
            let target = target.to_string_lossy();
            if target == path || target.strip_suffix(" (deleted)") == Some(&path) {
                return Ok(e.path());
            }
        }
        Err(Error::Save(format!("QEMU holds no open file {path} for drive {device}")))
    }

    /// Waits for QEMU (started by this process) to exit by itself, up to
    /// `timeout`; `true` if it did.
    pub async fn wait_exit(&mut self, timeout: Duration) -> bool {
        let exited = match &self.process {
            Process::Other(_) => false,
            _ => tokio::time::timeout(timeout, self.process.exited()).await.is_ok(),
        };
        if exited {
            self.remove_cgroup().await;
        }
        exited
    }

    /// Kills QEMU and waits for it to be gone.
    pub async fn kill(&mut self) {
        self.process.kill_now();
        // Bounded: a process stuck in the kernel must not hang a caller.
        if tokio::time::timeout(Duration::from_secs(10), self.process.exited()).await.is_ok() {
            self.remove_cgroup().await;
        }
        self.released = true;
    }

    /// Removes the VM's cgroup once QEMU has exited (tasks leave their
    /// cgroup when they exit, before they are reaped).
    /// QEMU's monitor leaves it just after QEMU: waited for, briefly.
    async fn remove_cgroup(&mut self) {
        if let Some(cg) = self.cgroup.take() {
            for _ in 0..200 {
                if cg.is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if let Err(e) = cg.remove() {
                tracing::debug!(error = %e, "the VM's cgroup is left for the sweep");
            }
        }
        // QEMU is gone: its ids are free.
        self.identity.take();
    }

    /// Makes `path` a file this VM's QEMU may write (it runs as its own
    /// uid, and may not create files where strata keeps them).
    fn give_new_file(&self, path: &Path) -> Result<(), Error> {
        match owner_of(&self.dir) {
            Some((uid, gid)) => {
                strata_jail::identity::give_new_file(path, uid, gid).map_err(|e| Error::Confine(e.to_string()))
            }
            None => Ok(()),
        }
    }

    /// Whether the kernel killed a task of this VM for exceeding its memory
    /// limit.
    pub fn killed_by_memory_limit(&self) -> bool {
        self.cgroup.as_ref().is_some_and(strata_jail::Cgroup::oom_killed)
    }
}

/// The file of a `snapshot=on` drive's temporary overlay, from the name
/// QEMU reports for the drive: `json:{"driver": "qcow2", "file": {"driver":
/// "file", "filename": PATH}, "backing": ...}`.
fn overlay_file_name(reported: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(reported.strip_prefix("json:")?).ok()?;
    if v["driver"] != "qcow2" || v["file"]["driver"] != "file" {
        return None;
    }
    v["file"]["filename"].as_str().map(str::to_string)
}

/// The overlay of a VM's throwaway disk `index`, in its directory `dir`.
pub fn throwaway_overlay_path(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("disk{index}.qcow2"))
}

/// The end of QEMU's messages and the console log in `dir`, for error reports.
pub fn diagnostics(dir: &Path) -> String {
    let mut out = String::new();
    for f in ["qemu.log", "console.log"] {
        if let Ok(text) = std::fs::read_to_string(dir.join(f)) {
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(20)..];
            if !tail.is_empty() {
                out.push_str(&format!("--- {f}\n{}\n", tail.join("\n")));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::overlay_file_name;

    #[test]
    fn the_temporary_overlay_is_found_in_the_name_qemu_reports() {
        // As QEMU 10 reports a `snapshot=on` drive in query-block.
        let reported = r#"json:{"backing": {"driver": "qcow2", "file": {"driver": "file", "filename": "/s/blobs/ab"}}, "driver": "qcow2", "file": {"driver": "file", "filename": "/var/tmp/vl.IRM8Y3"}}"#;
        assert_eq!(overlay_file_name(reported).as_deref(), Some("/var/tmp/vl.IRM8Y3"));
        assert_eq!(overlay_file_name("/s/blobs/ab"), None);
        assert_eq!(overlay_file_name(r#"json:{"driver": "raw", "file": {"driver": "file", "filename": "/x"}}"#), None);
        assert_eq!(overlay_file_name("json:{not json"), None);
    }
}
