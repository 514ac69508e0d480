//! Running strata VMs with QEMU.
//!
//! This crate owns every QEMU process strata starts: it builds the command
//! line (identical device layout for boot, snapshot and restore, since a
//! saved device state only loads into the same machine), opens the agent
//! channel (the host listens, QEMU connects, so nothing polls for a socket to
//! appear), speaks QMP for pause and save, and probes the accelerator.

pub mod accel;
pub mod agent;
pub mod background;
pub mod pagecache;
pub mod qcow2;
pub mod qemu;

pub use accel::Accel;
pub use agent::{AgentConn, AgentReader, AgentWriter};
pub use qemu::{
    credentials_of, monitor_of, start_fork_server, AfterLoad, CgroupSpec, Disk, DiskMode, IdentitySpec, Memory, Plug,
    Saved, Vm, VmConfig, MAX_PLUGS, USER_NET_DNS, USER_NET_GATEWAY, USER_NET_GUEST, VNC_SOCK,
};
pub use strata_zygote::monitor::CONSOLE_LOG_MAX;
pub use strata_zygote::{Credentials, ForkServer, Usage, OPEN_FILES_MAX, SERVER_CAPABILITIES};

use std::path::PathBuf;

/// Version of the way VMs are saved and restored; launch images record it,
/// so a change here never loads an old snapshot into an incompatible VM.
pub const SNAPSHOT_FORMAT: &str = "3";

/// Errors of running VMs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start {program}; is QEMU installed?")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("VM I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU exited ({status}) before the guest agent connected; console log:\n{console}")]
    EarlyExit { status: String, console: String },
    #[error("the guest agent did not connect within {0} s")]
    AgentTimeout(u64),
    #[error("guest agent channel")]
    Channel(#[source] std::io::Error),
    #[error("guest agent protocol")]
    Protocol(#[from] strata_proto::Error),
    #[error("QMP command {command} failed")]
    Qmp {
        command: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Disk(String),
    #[error("saving the VM state failed: {0}")]
    Save(String),
    #[error("the VM is {0}, not running, 30 s after its start; its devices cannot be plugged in")]
    NotRunning(String),
    #[error("confining QEMU: {0}")]
    Confine(String),
}
