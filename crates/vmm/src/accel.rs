//! Choosing the accelerator by booting a probe guest.
//!
//! `/dev/kvm` existing proves nothing (nested KVM can be present and broken),
//! so the probe boots the real kernel and initramfs under KVM with a time
//! limit and looks for the initramfs's probe marker on the console.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::process::Command;

use crate::qemu::QEMU;
use crate::Error;

/// Text the initramfs prints when booted with `strata.probe`.
pub const PROBE_MARKER: &str = "STRATA-PROBE-OK";

/// A hardware or software CPU accelerator.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl std::str::FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            _ => Err(format!("unknown accelerator {s:?}: use kvm or tcg")),
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Boots the probe guest under KVM; `true` if it answered within `limit`.
///
/// # Errors
/// Only if QEMU cannot be started at all.
pub async fn kvm_boots(
    kernel: &Path,
    initramfs: &Path,
    limit: Duration,
    credentials: Option<strata_zygote::Credentials>,
) -> Result<bool, Error> {
    if !Path::new("/dev/kvm").exists() {
        return Ok(false);
    }
    let mut probe = Command::new(QEMU);
    // Like every QEMU strata starts, the probe is confined: a view of its
    // own (QEMU, /dev/kvm, the probe's kernel and initramfs), a pid
    // namespace with its monitor, no privileges to gain, the ids it was
    // given (with the kvm group), not root.
    crate::qemu::ensure_view_mount_point()?;
    let mut shown = Vec::new();
    for p in [kernel, initramfs] {
        let path = std::path::absolute(p).map_err(|source| Error::Io { path: p.to_path_buf(), source })?;
        shown.push(strata_zygote::Shown::Bind { path, writable: false });
    }
    let view = strata_zygote::FileView::for_qemu(true, shown).steps().map_err(|e| Error::Confine(e.to_string()))?;
    // SAFETY: the confinement makes system calls only.
    unsafe {
        probe.pre_exec(move || {
            let confinement = strata_zygote::monitor::ExecConfinement {
                view: Some(&view),
                console: None,
                file_size_limit: 0,
                credentials: credentials.as_ref(),
                die_with_parent: true,
            };
            confinement.apply()
        });
    }
    let mut child = probe
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
        .args(["-sandbox", crate::qemu::SANDBOX])
        .args(["-accel", "kvm", "-cpu", "host", "-m", "256", "-serial", "stdio"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", "console=ttyS0 quiet panic=-1 strata.probe"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| Error::Spawn { program: QEMU.into(), source })?;
    let mut out = child.stdout.take().expect("piped stdout");
    let found = tokio::time::timeout(limit, async {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match out.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => {
                    seen.extend_from_slice(&buf[..n]);
                    if seen.windows(PROBE_MARKER.len()).any(|w| w == PROBE_MARKER.as_bytes()) {
                        return true;
                    }
                }
            }
        }
    })
    .await
    .unwrap_or(false);
    let _ = child.kill().await;
    Ok(found)
}
