//! The guest's system plumbing: mounts, signals, the host port, the clock.

use std::fs::{self, File, OpenOptions};
use std::os::fd::RawFd;
use std::path::Path;
use std::sync::Mutex;

use nix::mount::{mount, MsFlags};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use strata_proto::{TerminalContext, AGENT_PORT_NAME};

use crate::log;

/// Blocks SIGCHLD and SIGIO in every thread (threads inherit the mask), so
/// that dedicated threads can wait for them synchronously.
pub fn block_async_signals() {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    set.add(Signal::SIGIO);
    let _ = nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None);
}

/// Mounts what programs expect and brings up loopback. /dev, /proc and /sys
/// come from the initramfs, moved into the new root.
pub fn init_system() {
    let mounts: [(&str, &str, &str, MsFlags, &str); 5] = [
        ("proc", "/proc", "proc", MsFlags::empty(), ""),
        ("sysfs", "/sys", "sysfs", MsFlags::empty(), ""),
        ("devpts", "/dev/pts", "devpts", MsFlags::MS_NOSUID, "gid=5,mode=620,ptmxmode=666"),
        ("tmpfs", "/dev/shm", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, "mode=1777"),
        ("tmpfs", "/tmp", "tmpfs", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, "mode=1777"),
    ];
    for (src, target, fstype, flags, data) in mounts {
        let _ = fs::create_dir_all(target);
        if is_mountpoint(target) {
            continue;
        }
        if let Err(e) = mount(Some(src), target, Some(fstype), flags, Some(data)) {
            log(&format!("mount {target}: {e}"));
        }
    }
    zone_in_memory();
    quiet_housekeeping();
    let _ = nix::unistd::sethostname("strata");
    if let Err(e) = loopback_up() {
        log(&format!("loopback: {e}"));
    }
}

/// Stops the kernel's periodic housekeeping that a restored guest would run
/// in its first moments at every launch, translated afresh under TCG each
/// time (~120 blocks of a launch's ~7,300): per-CPU statistics folded every
/// second (now every minute; they are folded when they overflow anyway),
/// proactive compaction (kcompactd still compacts when an allocation needs
/// it), and the disks' writeback-throttling timers (the root disk is a
/// throwaway overlay on the host; a session's home is mounted with
/// synchronous writes).
fn quiet_housekeeping() {
    let set = |path: &Path, value: &str| {
        if let Err(e) = fs::write(path, value) {
            log(&format!("{}: {e}", path.display()));
        }
    };
    set(Path::new("/proc/sys/vm/stat_interval"), "60");
    set(Path::new("/proc/sys/vm/compaction_proactiveness"), "0");
    for disk in fs::read_dir("/sys/block").into_iter().flatten().flatten() {
        let wbt = disk.path().join("queue/wbt_lat_usec");
        if wbt.exists() {
            set(&wbt, "0");
        }
    }
}

/// Whether something is mounted exactly at `path`.
pub fn is_mountpoint(path: &str) -> bool {
    fs::read_to_string("/proc/self/mounts")
        .map(|m| m.lines().any(|l| l.split(' ').nth(1) == Some(path)))
        .unwrap_or(false)
}

fn loopback_up() -> std::io::Result<()> {
    // SAFETY: plain socket/ioctl calls on a zeroed `ifreq` we own; the socket
    // is closed before returning.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        let mut rc = libc::ioctl(s, libc::SIOCGIFFLAGS, &mut req);
        if rc == 0 {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            rc = libc::ioctl(s, libc::SIOCSIFFLAGS, &req);
        }
        let err = std::io::Error::last_os_error();
        libc::close(s);
        if rc != 0 {
            return Err(err);
        }
    }
    Ok(())
}

/// Finds the virtio-serial port named [`AGENT_PORT_NAME`] and opens it.
pub fn open_host_port() -> std::io::Result<File> {
    for _ in 0..500 {
        if let Ok(entries) = fs::read_dir("/sys/class/virtio-ports") {
            for e in entries.flatten() {
                let name = fs::read_to_string(e.path().join("name")).unwrap_or_default();
                if name.trim() == AGENT_PORT_NAME {
                    let dev = Path::new("/dev").join(e.file_name());
                    return OpenOptions::new().read(true).write(true).open(dev);
                }
            }
        }
        // The port appears as soon as virtio_console has probed; this only
        // waits at first boot, never after a snapshot restore.
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Err(std::io::Error::new(std::io::ErrorKind::NotFound, "virtio port org.strata.agent"))
}

/// Asks the kernel for SIGIO on the port when the host connects.
pub fn enable_sigio(fd: RawFd) {
    // SAFETY: fcntl on a file descriptor we own.
    unsafe {
        libc::fcntl(fd, libc::F_SETOWN, libc::getpid());
        let fl = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, fl | libc::O_ASYNC);
    }
}

/// Waits for SIGIO (a host connected) or the time-out, whichever is first.
pub fn wait_sigio(timeout_ms: u64) {
    let mut set = SigSet::empty();
    set.add(Signal::SIGIO);
    let ts = libc::timespec {
        tv_sec: (timeout_ms / 1000) as libc::time_t,
        tv_nsec: ((timeout_ms % 1000) * 1_000_000) as libc::c_long,
    };
    // SAFETY: the set and timespec are valid for the call; SIGIO is blocked.
    unsafe {
        libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &ts);
    }
}

/// Reaps every child of PID 1 for ever, reporting each exit status.
pub fn reap_children(mut on_exit: impl FnMut(i32, i32)) -> ! {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    loop {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => on_exit(pid.as_raw(), code),
                Ok(WaitStatus::Signaled(pid, sig, _)) => on_exit(pid.as_raw(), 128 + sig as i32),
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => {}
            }
        }
        let _ = set.wait();
    }
}

/// Applies a terminal's context: the wall clock and the time zone. Size and
/// environment are applied per process by the caller.
pub fn apply_context(ctx: &TerminalContext) {
    if ctx.unix_time_ms > 0 {
        let ts = libc::timespec {
            tv_sec: (ctx.unix_time_ms / 1000) as libc::time_t,
            tv_nsec: ((ctx.unix_time_ms % 1000) * 1_000_000) as libc::c_long,
        };
        // SAFETY: a valid timespec for the duration of the call.
        unsafe {
            libc::clock_settime(libc::CLOCK_REALTIME, &ts);
        }
    }
    if let Some(tz) = &ctx.timezone {
        set_timezone(tz);
    }
}

// /run is a tmpfs (the initramfs mounts it), so these live in guest memory.
const LOCALTIME: &str = "/run/strata/localtime";
const TIMEZONE: &str = "/run/strata/timezone";

/// Makes /etc/localtime and /etc/timezone links into /run/strata, so that a
/// time zone is set in memory: every attach applies the terminal's zone,
/// and a write to the root disk there cost ~70 ms of CPU per launch under
/// TCG (the throwaway overlay allocates clusters, ext4 journals). The links
/// are written to disk once, at the first boot of an image.
fn zone_in_memory() {
    let zone = fs::read_link("/etc/localtime").ok();
    let name = zone
        .as_deref()
        .and_then(|t| t.strip_prefix("/usr/share/zoneinfo/").ok())
        .map_or_else(|| "Etc/UTC".to_string(), |z| z.display().to_string());
    set_timezone(&name);
    for (link, target) in [("/etc/localtime", LOCALTIME), ("/etc/timezone", TIMEZONE)] {
        if !fs::read_link(link).is_ok_and(|t| t == Path::new(target)) {
            replace_link(Path::new(target), link);
        }
    }
}

/// The zone the link in memory was last set to or found at. Only this agent
/// writes the link, so an attach in the same zone (nearly all) needs no
/// system call: a readlink and a stat walked ~290 blocks of path lookup
/// code, ~4% of what a restored guest translates afresh per launch.
static APPLIED_ZONE: Mutex<Option<String>> = Mutex::new(None);

/// Points the zone link in memory at `tz` unless it already does; glibc
/// re-reads /etc/localtime when its target changes, so running programs see
/// the new zone without restarting.
fn set_timezone(tz: &str) {
    let mut applied = APPLIED_ZONE.lock().unwrap_or_else(|e| e.into_inner());
    if applied.as_deref() == Some(tz) {
        return;
    }
    let valid =
        !tz.is_empty() && !tz.contains("..") && tz.chars().all(|c| c.is_ascii_alphanumeric() || "/_+-".contains(c));
    let zone = Path::new("/usr/share/zoneinfo").join(tz);
    if !valid || !zone.is_file() {
        log(&format!("time zone {tz:?} is not installed in this guest"));
        return;
    }
    if !fs::read_link(LOCALTIME).is_ok_and(|t| t == zone) {
        if !replace_link(&zone, LOCALTIME) {
            log(&format!("could not point {LOCALTIME} at {}", zone.display()));
            return;
        }
        let _ = fs::write(TIMEZONE, format!("{tz}\n"));
    }
    *applied = Some(tz.to_string());
}

/// Makes `link` a symbolic link to `target` atomically (a new link, then a
/// rename over the old one), so a reader never finds it missing. Whether
/// it did.
fn replace_link(target: &Path, link: &str) -> bool {
    let tmp = format!("{link}.strata");
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).is_ok() && fs::rename(&tmp, link).is_ok()
}

/// Flushes file systems and powers the machine off; never returns.
pub fn power_off() -> ! {
    nix::unistd::sync();
    if std::process::id() == 1 {
        let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    }
    std::process::exit(0);
}
