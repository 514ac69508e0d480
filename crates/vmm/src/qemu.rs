//! QEMU processes: the command line, start, QMP, save, stop.

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
    /// Writes go to a temporary overlay QEMU creates and deletes itself.
    Throwaway,
}

/// One virtio-blk disk.
#[derive(Debug, Clone)]
pub struct Disk {
    pub path: PathBuf,
    pub format: &'static str,
    pub mode: DiskMode,
}

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
}

impl VmConfig {
    /// The QEMU arguments. Devices are the same in every mode, in the same
    /// order, so a state saved by one VM loads into another.
    pub fn args(&self) -> Vec<String> {
        let dir = &self.dir;
        let mut a: Vec<String> = Vec::new();
        let mut push = |s: &[&str]| a.extend(s.iter().map(|x| x.to_string()));
        push(&["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]);
        push(&["-machine", "pc,hpet=off,vmport=off,smm=off,usb=off,memory-backend=ram"]);
        match self.accel {
            Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
            Accel::Tcg => push(&["-accel", "tcg"]),
        }
        let size = format!("{}M", self.memory_mib);
        push(&["-m", &size, "-smp", "1"]);
        let ram = match &self.memory {
            Memory::Anonymous => format!("memory-backend-ram,id=ram,size={size}"),
            Memory::SharedFile(p) => format!("memory-backend-file,id=ram,size={size},mem-path={},share=on", p.display()),
            Memory::PrivateFile(p) => format!("memory-backend-file,id=ram,size={size},mem-path={},share=off", p.display()),
        };
        push(&["-object", &ram]);
        push(&["-kernel", &self.kernel.display().to_string(), "-initrd", &self.initramfs.display().to_string()]);
        push(&["-append", &self.cmdline]);
        let console = format!("file,id=console,path={}", dir.join("console.log").display());
        push(&["-chardev", &console, "-serial", "chardev:console"]);
        // Both channels connect to listeners the host opened before starting
        // QEMU, so nobody waits for a socket file to appear.
        let qmp = format!("socket,id=qmp,path={}", dir.join(QMP_SOCK).display());
        push(&["-chardev", &qmp, "-mon", "chardev=qmp,mode=control"]);
        let agent = format!("socket,id=agent,path={},reconnect-ms=250", dir.join(AGENT_SOCK).display());
        push(&["-device", "virtio-serial-pci,id=vser", "-chardev", &agent]);
        push(&["-device", &format!("virtserialport,bus=vser.0,chardev=agent,name={}", strata_proto::AGENT_PORT_NAME)]);
        for (i, d) in self.disks.iter().enumerate() {
            let mut drive = format!("file={},if=none,id=disk{i},format={},cache=unsafe", d.path.display(), d.format);
            match d.mode {
                DiskMode::Writable => {}
                DiskMode::ReadOnly => drive.push_str(",readonly=on"),
                DiskMode::Throwaway => drive.push_str(",snapshot=on"),
            }
            push(&["-drive", &drive, "-device", &format!("virtio-blk-pci,drive=disk{i}")]);
        }
        if self.incoming.is_some() {
            push(&["-incoming", "defer"]);
        }
        a
    }
}

const QMP_SOCK: &str = "qmp.sock";
const AGENT_SOCK: &str = "agent.sock";

type QmpStream = qapi::futures::QapiStream<
    qapi::futures::QmpStreamTokio<tokio::io::ReadHalf<UnixStream>>,
    qapi::futures::QmpStreamTokio<tokio::io::WriteHalf<UnixStream>>,
>;

fn listen(path: &Path) -> Result<UnixListener, Error> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })
}

fn qmp_err(command: &'static str) -> impl FnOnce(qapi::ExecuteError) -> Error {
    move |e| Error::Qmp { command, source: e.into() }
}

fn ignore_shared() -> qmp::migrate_set_capabilities {
    qmp::migrate_set_capabilities {
        capabilities: vec![qmp::MigrationCapabilityStatus {
            capability: qmp::MigrationCapability::x_ignore_shared,
            state: true,
        }],
    }
}

/// A running QEMU process. Killed when dropped.
pub struct Vm {
    child: Child,
    dir: PathBuf,
    qmp: QmpStream,
}

impl Vm {
    /// Starts QEMU, connects QMP, loads the incoming state if any (the guest
    /// then runs at once), and waits for the guest agent's channel.
    ///
    /// # Errors
    /// If QEMU cannot start, exits early, or a channel does not connect in time.
    pub async fn start(cfg: &VmConfig, connect_timeout: Duration) -> Result<(Vm, AgentConn), Error> {
        let qmp_listener = listen(&cfg.dir.join(QMP_SOCK))?;
        let agent_listener = listen(&cfg.dir.join(AGENT_SOCK))?;
        let log = cfg.dir.join("qemu.log");
        let mut cmd = Command::new(QEMU);
        cmd.args(cfg.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).map_err(|source| Error::Io { path: log, source })?))
            .env("TMPDIR", &cfg.dir)
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe. QEMU dies with strata even on
        // SIGKILL, so no VM outlives the process that owns it.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        tracing::debug!(args = ?cfg.args(), "starting QEMU");
        let mut child = cmd.spawn().map_err(|source| Error::Spawn { program: QEMU.into(), source })?;
        let dir = cfg.dir.clone();
        let early_exit = |st: std::io::Result<std::process::ExitStatus>| Error::EarlyExit {
            status: st.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
            console: diagnostics(&dir),
        };
        let setup = async {
            let (stream, _) = qmp_listener.accept().await.map_err(Error::Channel)?;
            let neg = qapi::futures::QmpStreamTokio::open(stream).await.map_err(Error::Channel)?;
            let mut qmp = neg.negotiate().await.map_err(Error::Channel)?;
            if let Some(state) = &cfg.incoming {
                qmp.execute(ignore_shared()).await.map_err(qmp_err("migrate-set-capabilities"))?;
                let uri = format!("file:{}", state.display());
                qmp.execute(qmp::migrate_incoming { uri: Some(uri), channels: None, exit_on_error: Some(true) })
                    .await
                    .map_err(qmp_err("migrate-incoming"))?;
            }
            let (agent, _) = agent_listener.accept().await.map_err(Error::Channel)?;
            Ok::<_, Error>((qmp, agent))
        };
        let (qmp, agent) = tokio::select! {
            r = setup => r?,
            st = child.wait() => return Err(early_exit(st)),
            _ = tokio::time::sleep(connect_timeout) => return Err(Error::AgentTimeout(connect_timeout.as_secs())),
        };
        for s in [QMP_SOCK, AGENT_SOCK] {
            let _ = std::fs::remove_file(cfg.dir.join(s));
        }
        Ok((Vm { child, dir: cfg.dir.clone(), qmp }, AgentConn::new(agent)))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The end of the console log and QEMU's own messages, for error reports.
    pub fn diagnostics(&self) -> String {
        diagnostics(&self.dir)
    }

    /// Saves the running guest's device state (and any memory not in a shared
    /// file) to `path`, and stops QEMU. The guest is not paused first: the
    /// save then records it as running, so a restore resumes it by itself
    /// with no `cont` round trip on the launch path.
    ///
    /// # Errors
    /// If QEMU refuses, the save fails, or it does not finish in `timeout`.
    pub async fn save_and_quit(&mut self, path: &Path, timeout: Duration) -> Result<(), Error> {
        self.qmp.execute(ignore_shared()).await.map_err(qmp_err("migrate-set-capabilities"))?;
        let uri = format!("file:{}", path.display());
        self.qmp
            .execute(qmp::migrate { uri: Some(uri), channels: None, detach: None, resume: None })
            .await
            .map_err(qmp_err("migrate"))?;
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.qmp.execute(qmp::query_migrate {}).await.map_err(qmp_err("query-migrate"))?;
            match info.status {
                Some(qmp::MigrationStatus::completed) => break,
                Some(qmp::MigrationStatus::failed) | Some(qmp::MigrationStatus::cancelled) => {
                    return Err(Error::Save(info.error_desc.unwrap_or_else(|| "migration failed".into())))
                }
                _ => {}
            }
            if Instant::now() > deadline {
                return Err(Error::Save(format!("not complete after {} s", timeout.as_secs())));
            }
            // Only while building a launch image: a short pause between queries is fine.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = self.qmp.execute(qmp::quit {}).await;
        if self.wait_exit(Duration::from_secs(30)).await.is_none() {
            self.kill().await;
        }
        Ok(())
    }

    /// Waits for QEMU to exit by itself, up to `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait()).await.ok().and_then(Result::ok)
    }

    /// Kills QEMU and waits for it.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
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
