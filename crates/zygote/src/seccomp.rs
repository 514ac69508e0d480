//! Seccomp filters of strata's own, built at compile time: the monitor's
//! allow-list and the fork server's deny-list. Each checks the
//! architecture first (a call through another ABI, x32's included, kills).

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

/// x32's system calls are x86-64's numbers with this bit set.
const X32_BIT: u32 = 0x4000_0000;

const fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter { code: code as u16, jt: 0, jf: 0, k }
}

const fn jump(op: u32, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code: (libc::BPF_JMP | op | libc::BPF_K) as u16, jt, jf, k }
}

/// The length of a [`program`] over `n` calls.
pub const fn len(n: usize) -> usize {
    7 + 2 * n
}

/// A filter answering `listed` for each of `calls` and `otherwise` for
/// every other call (offsets in `struct seccomp_data`: nr at 0, arch at 4).
pub const fn program<const N: usize>(calls: &[libc::c_long], listed: u32, otherwise: u32) -> [libc::sock_filter; N] {
    const LOAD: u32 = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    const RET: u32 = libc::BPF_RET | libc::BPF_K;
    assert!(N == len(calls.len()), "the filter's length");
    let kill = stmt(RET, libc::SECCOMP_RET_KILL_PROCESS);
    let mut f = [kill; N];
    f[0] = stmt(LOAD, 4);
    f[1] = jump(libc::BPF_JEQ, AUDIT_ARCH, 1, 0);
    f[2] = kill;
    f[3] = stmt(LOAD, 0);
    f[4] = jump(libc::BPF_JGE, X32_BIT, 0, 1);
    f[5] = kill;
    let mut i = 0;
    while i < calls.len() {
        f[6 + 2 * i] = jump(libc::BPF_JEQ, calls[i] as u32, 0, 1);
        f[7 + 2 * i] = stmt(RET, listed);
        i += 1;
    }
    f[N - 1] = stmt(RET, otherwise);
    f
}

/// Installs `filter` on every thread of this process. Needs
/// `no_new_privs` or `CAP_SYS_ADMIN`.
///
/// # Errors
/// The kernel's refusal.
///
/// # Safety
/// Restricts the whole process for good.
pub unsafe fn install(filter: &'static [libc::sock_filter]) -> std::io::Result<()> {
    let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr().cast_mut() };
    // SAFETY: the program is static; the kernel copies it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_TSYNC,
            std::ptr::from_ref(&prog),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// What the fork server (root, with [`crate::SERVER_CAPABILITIES`]) and
/// every QEMU it forks may never call: loading kernel code or a new
/// kernel, rebooting, swap, accounting, the clocks, the kernel log, BPF,
/// tracing or reading another process, opening files by handle (with
/// `CAP_DAC_READ_SEARCH`, a way around any mount namespace), keys,
/// performance counters, quotas, joining namespaces, fanotify,
/// userfaultfd. Each answers EPERM. (QEMU's own filter, which the children
/// add, denies more; the server's children need everything else.)
const SERVER_DENIED: [libc::c_long; 29] = [
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_syslog,
    libc::SYS_bpf,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_perf_event_open,
    libc::SYS_quotactl,
    libc::SYS_setns,
    libc::SYS_fanotify_init,
    libc::SYS_userfaultfd,
    libc::SYS_pidfd_getfd,
];

static SERVER_FILTER: [libc::sock_filter; len(SERVER_DENIED.len())] =
    program(&SERVER_DENIED, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32, libc::SECCOMP_RET_ALLOW);

/// Filters every thread of the fork server with [`SERVER_DENIED`].
///
/// # Errors
/// The kernel's refusal.
///
/// # Safety
/// Restricts the whole process, and every child it forks, for good.
pub unsafe fn filter_server() -> std::io::Result<()> {
    // SAFETY: as the caller promised.
    unsafe { install(&SERVER_FILTER) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_servers_filter_refuses_what_it_lists_and_lets_the_rest_through() {
        let status = crate::status_of_child(|| {
            // SAFETY: system calls in the child.
            unsafe {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                if filter_server().is_err() {
                    return 99;
                }
                // Listed: refused with EPERM, the process lives on.
                let r = libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0);
                let refused = r == -1 && *libc::__errno_location() == libc::EPERM;
                let r = libc::syscall(libc::SYS_setns, -1, 0);
                let refused = refused && r == -1 && *libc::__errno_location() == libc::EPERM;
                // Not listed: as before (getpid answers, a bad descriptor is EBADF).
                let fine = libc::getpid() > 0 && libc::close(-1) == -1 && *libc::__errno_location() == libc::EBADF;
                if refused && fine {
                    0
                } else {
                    1
                }
            }
        });
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0, "status {status:#x}");
    }
}
