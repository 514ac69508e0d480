//! QEMU processes: the command line, start, QMP, save, stop.

use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use qapi::qmp;
use tokio::net::UnixListener;
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
        let agent = format!("socket,id=agent,path={},reconnect-ms=250", dir.join("agent.sock").display());
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
        let qmp = format!("unix:{},server=on,wait=off", dir.join("qmp.sock").display());
        push(&["-qmp", &qmp]);
        // Shared memory is never written into a saved state: it is the memory file.
        push(&["-global", "migration.x-ignore-shared=on"]);
        if let Some(state) = &self.incoming {
            push(&["-incoming", &format!("file:{}", state.display())]);
        }
        a
    }
}

/// A running QEMU process. Killed when dropped.
pub struct Vm {
    child: Child,
    dir: PathBuf,
}

impl Vm {
    /// Starts QEMU and waits for the guest agent's channel to connect.
    ///
    /// # Errors
    /// If QEMU cannot start, exits early, or the channel does not connect in time.
    pub async fn start(cfg: &VmConfig, connect_timeout: Duration) -> Result<(Vm, AgentConn), Error> {
        let sock = cfg.dir.join("agent.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).map_err(|source| Error::Io { path: sock.clone(), source })?;
        let mut cmd = Command::new(QEMU);
        cmd.args(cfg.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(cfg.dir.join("qemu.log"))
                    .map_err(|source| Error::Io { path: cfg.dir.join("qemu.log"), source })?,
            ))
            .env("TMPDIR", &cfg.dir)
            .kill_on_drop(true);
        tracing::debug!(args = ?cfg.args(), "starting QEMU");
        let child = cmd.spawn().map_err(|source| Error::Spawn { program: QEMU.into(), source })?;
        let mut vm = Vm { child, dir: cfg.dir.clone() };
        let accepted = tokio::select! {
            r = listener.accept() => r.map(|(s, _)| s).map_err(Error::Channel),
            st = vm.child.wait() => Err(Error::EarlyExit {
                status: st.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                console: vm.diagnostics(),
            }),
            _ = tokio::time::sleep(connect_timeout) => Err(Error::AgentTimeout(connect_timeout.as_secs())),
        };
        drop(listener);
        let _ = std::fs::remove_file(&sock);
        let stream = accepted?;
        Ok((vm, AgentConn::new(stream)))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The end of the console log and QEMU's own messages, for error reports.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        for f in ["qemu.log", "console.log"] {
            if let Ok(text) = std::fs::read_to_string(self.dir.join(f)) {
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(20)..];
                if !tail.is_empty() {
                    out.push_str(&format!("--- {f}\n{}\n", tail.join("\n")));
                }
            }
        }
        out
    }

    /// Connects to QMP (blocking; used on build paths, never on launch).
    ///
    /// # Errors
    /// If the socket cannot be reached or the handshake fails.
    pub fn qmp(&self) -> Result<Qmp, Error> {
        let path = self.dir.join("qmp.sock");
        let s = StdUnixStream::connect(&path).map_err(|source| Error::Io { path, source })?;
        s.set_read_timeout(Some(Duration::from_secs(120))).ok();
        let rd = s.try_clone().map_err(|source| Error::Io { path: self.dir.join("qmp.sock"), source })?;
        let mut q = qapi::Qmp::new(qapi::Stream::new(std::io::BufReader::new(rd), s));
        q.handshake().map_err(|e| Error::Qmp { command: "qmp_capabilities", source: e.into() })?;
        Ok(Qmp { q })
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

/// A QMP connection.
pub struct Qmp {
    q: qapi::Qmp<qapi::Stream<std::io::BufReader<StdUnixStream>, StdUnixStream>>,
}

impl Qmp {
    /// Pauses the guest's CPUs.
    ///
    /// # Errors
    /// If QEMU refuses.
    pub fn stop(&mut self) -> Result<(), Error> {
        self.q.execute(&qmp::stop {}).map(|_| ()).map_err(|e| Error::Qmp { command: "stop", source: e.into() })
    }

    /// Saves the paused VM's device state (and any memory not in a shared
    /// file) to `path`, waiting until it is complete.
    ///
    /// # Errors
    /// If the migration fails or does not finish in `timeout`.
    pub fn save_state(&mut self, path: &Path, timeout: Duration) -> Result<(), Error> {
        let uri = format!("file:{}", path.display());
        self.q
            .execute(&qmp::migrate { uri: Some(uri), channels: None, detach: None, resume: None })
            .map_err(|e| Error::Qmp { command: "migrate", source: e.into() })?;
        let deadline = Instant::now() + timeout;
        loop {
            let info = self
                .q
                .execute(&qmp::query_migrate {})
                .map_err(|e| Error::Qmp { command: "query-migrate", source: e.into() })?;
            match info.status {
                Some(qmp::MigrationStatus::completed) => return Ok(()),
                Some(qmp::MigrationStatus::failed) | Some(qmp::MigrationStatus::cancelled) => {
                    return Err(Error::Save(info.error_desc.unwrap_or_else(|| "migration failed".into())))
                }
                _ => {}
            }
            if Instant::now() > deadline {
                return Err(Error::Save(format!("not complete after {} s", timeout.as_secs())));
            }
            // Saving happens only while building a launch image; a short
            // sleep between status queries is fine there.
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Asks QEMU to exit.
    ///
    /// # Errors
    /// If the command cannot be sent.
    pub fn quit(&mut self) -> Result<(), Error> {
        let _ = self.q.execute(&qmp::quit {});
        Ok(())
    }
}
