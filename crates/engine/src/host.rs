//! What this server reports about itself: the load a placement rule weighs
//! (sessions, CPU, memory free and committed to guests, images cached).

use serde::Serialize;

use crate::Engine;

/// One server's load.
#[derive(Debug, Clone, Serialize)]
pub struct ServerStatus {
    pub name: String,
    pub cpus: usize,
    /// 1-minute load average.
    pub load1: f64,
    pub memory_total_mib: u64,
    pub memory_available_mib: u64,
    /// Guest memory of the sessions running here.
    pub guest_memory_committed_mib: u64,
    pub sessions: usize,
    /// Images in the local catalog, and the bytes of all blobs stored.
    pub images: usize,
    pub blobs_bytes: u64,
}

pub(crate) fn meminfo_mib(text: &str, field: &str) -> u64 {
    (crate::bench::kib_field(text, field) / 1024.0) as u64
}

impl Engine {
    /// This server's status.
    ///
    /// # Errors
    /// If the catalog cannot be read.
    pub fn server_status(&self) -> Result<ServerStatus, crate::Error> {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let load1 = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next().and_then(|v| v.parse().ok()))
            .unwrap_or(0.0);
        let images = self.store.list_images()?;
        let sessions = self.list_sessions();
        // Paused sessions hold no guest memory.
        let committed = sessions
            .iter()
            .filter(|s| s.paused_image.is_none())
            .filter_map(|s| images.iter().find(|i| i.digest == s.launch_image))
            .filter_map(|i| i.meta.get("memory_mib").and_then(|m| m.parse::<u64>().ok()))
            .sum();
        let blobs_bytes = std::fs::read_dir(self.store.root().join("blobs/sha256"))
            .map(|d| d.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
            .unwrap_or(0);
        Ok(ServerStatus {
            name: host_name(),
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            load1,
            memory_total_mib: meminfo_mib(&meminfo, "MemTotal:"),
            memory_available_mib: meminfo_mib(&meminfo, "MemAvailable:"),
            guest_memory_committed_mib: committed,
            sessions: sessions.len(),
            images: images.len(),
            blobs_bytes,
        })
    }
}

impl Engine {
    /// The packages whose launch image this server holds: what placement
    /// weighs as image locality.
    ///
    /// # Errors
    /// If the catalog cannot be read.
    pub fn cached_packages(&self) -> Result<std::collections::BTreeSet<String>, crate::Error> {
        Ok(self
            .store
            .list_images()?
            .into_iter()
            .filter(|i| i.kind == strata_store::ImageKind::Launch)
            .filter_map(|i| i.package)
            .collect())
    }
}

/// This machine's host name.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string()
}

/// CPU time a process has used (all its threads), in seconds; 0 if gone.
pub fn process_cpu_seconds(pid: u32) -> f64 {
    // utime and stime, fields 14 and 15 of /proc/PID/stat; the command name
    // (field 2) may hold spaces, so count from its closing parenthesis.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: f64 = after.split_whitespace().skip(11).take(2).filter_map(|v| v.parse::<f64>().ok()).sum();
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks / hz
}

/// The host memory a VM's QEMU costs, in MiB: its proportional share of
/// what it maps (memory shared with other sessions of its launch image
/// counted once between them); 0 if gone.
pub fn vm_memory_mib(qemu: u32) -> f64 {
    let rollup = std::fs::read_to_string(format!("/proc/{qemu}/smaps_rollup")).unwrap_or_default();
    crate::bench::kib_field(&rollup, "Pss:") / 1024.0
}
