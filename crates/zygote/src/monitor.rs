//! A pid namespace of its own for every confined QEMU, and the small
//! process that stands outside it.
//!
//! A process cannot move itself into a new pid namespace: `unshare` puts
//! only the children it makes afterwards there, the first of them as the
//! namespace's PID 1. So the process being made into QEMU splits in two
//! after its file view is made: the new child (PID 1 inside, with a fresh
//! `/proc` showing only itself) goes on to become QEMU; the parent stays
//! outside as QEMU's *monitor*. The monitor holds nothing (every descriptor
//! closed), runs as the VM's ids with no capabilities and a seccomp filter
//! that allows little more than waiting, reaps QEMU and exits with its
//! status. QEMU dies with it (`PR_SET_PDEATHSIG`), so killing either ends
//! both; strata tracks QEMU itself, by its pid and pidfd.
//!
//! Everything here runs between fork and exec (or `main`): system calls
//! only, nothing allocated.

use crate::Credentials;

/// The name the monitor shows (`/proc/PID/comm`, `ps`).
pub const MONITOR_NAME: &std::ffi::CStr = c"strata-monitor";

/// Makes the next child of this process PID 1 of a new pid namespace.
///
/// # Errors
/// If the kernel refuses (errno holds why).
///
/// # Safety
/// A plain system call on this process.
pub unsafe fn unshare_pid_namespace() -> Result<(), &'static str> {
    // SAFETY: a plain system call.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        return Err("unsharing the pid namespace");
    }
    Ok(())
}

/// Mounts a fresh `/proc` for this process's pid namespace, where its
/// file view left an empty directory: it shows this namespace's processes
/// only. Needs the privilege to mount (call it before dropping root).
///
/// # Errors
/// If the mount fails (errno holds why).
///
/// # Safety
/// Changes this process's mounts; call it in the child about to become QEMU.
pub unsafe fn mount_proc() -> Result<(), &'static str> {
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: a mount with strings we own.
    if unsafe { libc::mount(c"proc".as_ptr(), c"/proc".as_ptr(), c"proc".as_ptr(), flags, std::ptr::null()) } != 0 {
        return Err("mounting /proc for the pid namespace");
    }
    Ok(())
}

/// Ends this process when its parent does (with SIGKILL), or at once if
/// the parent is already gone. After any change of ids, which clears it.
///
/// # Safety
/// A plain system call on this process.
pub unsafe fn die_with_parent() {
    // SAFETY: plain system calls on this process.
    unsafe {
        let parent = libc::getppid();
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        // The parent died between the fork and the prctl.
        if libc::getppid() != parent {
            libc::_exit(1);
        }
    }
}

/// What an exec'd QEMU goes through between fork and exec, in this order:
/// its file view (a mount namespace) and, with it, a pid namespace of its
/// own (the process splits: QEMU goes on as PID 1, the parent stays as its
/// monitor, see [`monitor`]); then [`crate::confine_self`]; then it dies
/// with its parent when asked, or always when it has a monitor.
pub struct ExecConfinement<'a> {
    pub view: Option<&'a crate::Steps>,
    /// Kept by the monitor (only with a view).
    pub console: Option<Console>,
    pub file_size_limit: u64,
    pub credentials: Option<&'a Credentials>,
    pub die_with_parent: bool,
}

impl ExecConfinement<'_> {
    /// Applies it, for a `pre_exec` hook. The monitor never returns from
    /// here; QEMU's process returns to exec. System calls only (the split
    /// is a raw `clone`: the child makes only system calls until its exec).
    ///
    /// # Errors
    /// Which step failed, and why (allocates, on failure only).
    ///
    /// # Safety
    /// Call it between fork and exec, in a child about to become QEMU.
    pub unsafe fn apply(&self) -> std::io::Result<()> {
        // SAFETY: as the caller promised.
        unsafe { self.steps() }.map_err(|what| {
            let e = std::io::Error::last_os_error();
            std::io::Error::new(e.kind(), format!("{what}: {e}"))
        })
    }

    /// The steps of [`ExecConfinement::apply`]; which failed (errno holds why).
    unsafe fn steps(&self) -> Result<(), &'static str> {
        // SAFETY: system calls on this process, as the caller promised.
        unsafe {
            if let Some(steps) = self.view {
                steps.apply()?;
                unshare_pid_namespace()?;
                let qemu = libc::syscall(libc::SYS_clone, libc::c_long::from(libc::SIGCHLD), 0, 0, 0, 0);
                if qemu < 0 {
                    return Err("forking QEMU into its pid namespace");
                }
                if qemu > 0 {
                    monitor(qemu as libc::pid_t, None, self.console, self.credentials, self.die_with_parent);
                }
                mount_proc()?;
            }
            crate::confine_self(self.file_size_limit, self.credentials)?;
            // After the change of ids, which clears it.
            if self.die_with_parent || self.view.is_some() {
                die_with_parent();
            }
        }
        Ok(())
    }
}

/// The most a VM's console log holds: beyond it, the older half goes.
pub const CONSOLE_LOG_MAX: u64 = 1 << 20;

/// A VM's console as its monitor keeps it: QEMU writes the guest's
/// console into a pipe, and the monitor copies it into the log, keeping
/// its newest part only ([`CONSOLE_LOG_MAX`]).
#[derive(Debug, Clone, Copy)]
pub struct Console {
    /// The pipe's read end.
    pub pipe: libc::c_int,
    /// The log file, open for writing.
    pub log: libc::c_int,
}

/// Becomes QEMU's monitor: QEMU is child `qemu` (PID 1 of its namespace).
/// Sends `qemu`'s pid down `report` first if asked (the fork server replies
/// with it), closes every descriptor but the console's, takes on
/// `credentials`, dies with its own parent if `die_with_parent`, filters
/// its system calls, keeps the console log until QEMU closes its end, and
/// waits for QEMU. Exits with QEMU's status (128 + its signal if killed).
///
/// # Safety
/// Call it in a child that has just forked QEMU; it never returns. The
/// console's descriptors are given up to it.
pub unsafe fn monitor(
    qemu: libc::pid_t,
    report: Option<libc::c_int>,
    console: Option<Console>,
    credentials: Option<&Credentials>,
    die_with_parent: bool,
) -> ! {
    // SAFETY: system calls on this process only.
    unsafe {
        // Named before it reports: who hears of QEMU can tell its monitor.
        libc::prctl(libc::PR_SET_NAME, MONITOR_NAME.as_ptr());
        // No handler of the process it was forked from runs here (strata's
        // runtime catches SIGCHLD, which QEMU's exit sends to this process).
        for sig in 1..libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        if let Some(fd) = report {
            let bytes = qemu.to_le_bytes();
            libc::write(fd, bytes.as_ptr().cast(), bytes.len());
        }
        // Nothing of the VM's (its sockets, QEMU's log) stays open here;
        // the console's pipe and log become 0 and 1.
        let first_closed = match console {
            Some(c) if crate::place_fds(&[c.pipe, c.log], &[0, 1]).is_ok() => 2,
            _ => 0,
        };
        if libc::syscall(libc::SYS_close_range, first_closed, u32::MAX, 0u32) != 0 {
            for fd in first_closed..4096 {
                libc::close(fd as libc::c_int);
            }
        }
        let confined = crate::confine_self(0, credentials).is_ok();
        if !confined {
            libc::kill(qemu, libc::SIGKILL);
            libc::_exit(126);
        }
        if die_with_parent {
            self::die_with_parent();
        }
        if filter_monitor().is_err() {
            libc::kill(qemu, libc::SIGKILL);
            libc::_exit(126);
        }
        if first_closed == 2 {
            keep_console(0, 1);
        }
        let mut status = 0;
        loop {
            let r = libc::waitpid(qemu, &mut status, libc::__WALL);
            if r == qemu {
                break;
            }
            if r < 0 && *libc::__errno_location() != libc::EINTR {
                libc::_exit(125);
            }
        }
        if libc::WIFEXITED(status) {
            libc::_exit(libc::WEXITSTATUS(status));
        }
        libc::_exit(128 + libc::WTERMSIG(status));
    }
}

/// Copies what comes down `pipe` into `log` until every writer closed it,
/// keeping `log` within [`CONSOLE_LOG_MAX`]: when a write would take it
/// beyond, its newer half is moved to the front and the rest cut off. If
/// the log cannot be written, the console is still drained (and dropped):
/// QEMU, and the guest behind it, never wait on a full pipe.
///
/// # Safety
/// `pipe` and `log` must be open descriptors this process owns, `log`
/// readable and writable.
unsafe fn keep_console(pipe: libc::c_int, log: libc::c_int) {
    const CHUNK: usize = 64 * 1024;
    let mut buf = [0u8; CHUNK];
    let mut carry = [0u8; CHUNK];
    // SAFETY: reads and writes within the buffers, on descriptors we own.
    unsafe {
        let mut size = Some(libc::lseek(log, 0, libc::SEEK_END).max(0) as u64);
        loop {
            let n = libc::read(pipe, buf.as_mut_ptr().cast(), CHUNK);
            if n == 0 {
                return;
            }
            if n < 0 {
                if *libc::__errno_location() == libc::EINTR {
                    continue;
                }
                return;
            }
            let n = n as u64;
            if let Some(at) = size {
                size = append_bounded(log, &buf[..n as usize], at, &mut carry);
            }
        }
    }
}

/// Writes `data` at the end (`size`) of `log`, first moving the log's
/// newest half to its front and cutting the rest if `data` would take it
/// beyond [`CONSOLE_LOG_MAX`]. Its new size, or `None` if it failed.
///
/// # Safety
/// `log` must be an open, readable and writable descriptor.
unsafe fn append_bounded(log: libc::c_int, data: &[u8], size: u64, carry: &mut [u8]) -> Option<u64> {
    let n = data.len() as u64;
    let mut size = size;
    // SAFETY: reads and writes within the buffers, on a descriptor we own.
    unsafe {
        if size + n > CONSOLE_LOG_MAX {
            // The newest part (with what comes now: half the bound) to the front.
            let keep = (CONSOLE_LOG_MAX / 2).saturating_sub(n).min(size);
            let from = size - keep;
            let mut done = 0u64;
            while done < keep {
                let want = (keep - done).min(carry.len() as u64) as usize;
                let got = libc::pread(log, carry.as_mut_ptr().cast(), want, (from + done) as libc::off_t);
                if got <= 0 || libc::pwrite(log, carry.as_ptr().cast(), got as usize, done as libc::off_t) != got {
                    return None;
                }
                done += got as u64;
            }
            if libc::ftruncate(log, keep as libc::off_t) != 0 {
                return None;
            }
            size = keep;
        }
        let mut written = 0u64;
        while written < n {
            let rest = &data[written as usize..];
            let w = libc::pwrite(log, rest.as_ptr().cast(), rest.len(), (size + written) as libc::off_t);
            if w <= 0 {
                return None;
            }
            written += w as u64;
        }
    }
    Some(size + n)
}

/// What the monitor may call once filtered: the console's reads,
/// positioned writes and cut, wait and exit, the signal return paths,
/// futex and sleeps for a thread QEMU's fork handlers recreated (its RCU
/// thread), and the memory calls of the allocator: that thread runs the
/// RCU callbacks the fork server had pending when it forked, which free
/// memory (glibc then grows or trims its heaps: `brk`, `madvise`;
/// without them a fork server in that state had every monitor it forked
/// killed, and so every VM). Anything else kills it, and QEMU with it.
const MONITOR_CALLS: [libc::c_long; 20] = [
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_read,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_ftruncate,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_rt_sigreturn,
    libc::SYS_restart_syscall,
    libc::SYS_futex,
    libc::SYS_clock_nanosleep,
    libc::SYS_rt_sigprocmask,
];

static MONITOR_FILTER: [libc::sock_filter; crate::seccomp::len(MONITOR_CALLS.len())] =
    crate::seccomp::program(&MONITOR_CALLS, libc::SECCOMP_RET_ALLOW, libc::SECCOMP_RET_KILL_PROCESS);

/// Filters every thread of this process with [`MONITOR_CALLS`]. Needs
/// `no_new_privs` (or privilege).
///
/// # Errors
/// If the kernel refuses the filter.
///
/// # Safety
/// Restricts the whole process for good.
pub unsafe fn filter_monitor() -> Result<(), &'static str> {
    // Never trimming its heaps, glibc's allocator makes no call the filter
    // refuses (a thread's arena, trimmed, reads
    // /proc/sys/vm/overcommit_memory the first time).
    // SAFETY: a plain libc call on this process's allocator.
    unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) };
    // SAFETY: as the caller promised.
    unsafe { crate::seccomp::install(&MONITOR_FILTER) }.map_err(|_| "installing the monitor's seccomp filter")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_log_keeps_its_newest_part_within_its_bound() {
        use std::os::fd::AsRawFd;
        let file = tempfile::tempfile().unwrap();
        let mut carry = vec![0u8; 4096];
        let mut size = 0;
        // Lines of 100 bytes, numbered, three bounds' worth.
        let lines = 3 * CONSOLE_LOG_MAX / 100;
        for i in 0..lines {
            let line = format!("{i:09} {}\n", "x".repeat(89));
            // SAFETY: the file is open for reading and writing.
            size = unsafe { append_bounded(file.as_raw_fd(), line.as_bytes(), size, &mut carry) }.unwrap();
            assert!(size <= CONSOLE_LOG_MAX);
        }
        let text = std::fs::read_to_string(format!("/proc/self/fd/{}", file.as_raw_fd())).unwrap();
        assert_eq!(text.len() as u64, size);
        assert!(size >= CONSOLE_LOG_MAX / 2, "only {size} bytes kept");
        assert!(text.ends_with(&format!("{:09} {}\n", lines - 1, "x".repeat(89))));
        // In order: each whole line's number is one more than the last.
        let numbers: Vec<u64> = text.lines().filter(|l| l.len() == 99).map(|l| l[..9].parse().unwrap()).collect();
        assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "lines out of order");
    }

    #[test]
    fn a_filtered_monitor_may_wait_and_exit_and_nothing_else() {
        // Allowed: waiting for a child and exiting with its status.
        let status = crate::status_of_child(|| {
            // SAFETY: system calls in the child.
            unsafe {
                let child = libc::fork();
                if child == 0 {
                    libc::_exit(7);
                }
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                if filter_monitor().is_err() {
                    return 99;
                }
                let mut status = 0;
                libc::waitpid(child, &mut status, 0);
                libc::WEXITSTATUS(status)
            }
        });
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 7, "status {status:#x}");

        // Allowed: the allocator growing and trimming its heap, as QEMU's
        // RCU thread freeing memory makes it.
        let status = crate::status_of_child(|| {
            // SAFETY: system calls in the child; plain allocations, each
            // freed once.
            unsafe {
                // The thread has its arena (as QEMU's, forked, has).
                libc::free(libc::malloc(16));
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                if filter_monitor().is_err() {
                    return 99;
                }
                let small: Vec<*mut libc::c_void> = (0..16384).map(|_| libc::malloc(1024)).collect();
                let large = libc::malloc(8 << 20);
                if large.is_null() || small.iter().any(|p| p.is_null()) {
                    return 98;
                }
                for p in small {
                    libc::free(p);
                }
                libc::free(large);
            }
            5
        });
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 5, "status {status:#x}");

        // Anything else (here: opening a file) kills it.
        let status = crate::status_of_child(|| {
            // SAFETY: system calls in the child.
            unsafe {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                if filter_monitor().is_err() {
                    return 99;
                }
                libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY);
            }
            0
        });
        assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS, "status {status:#x}");
    }
}
