//! Loaded into QEMU with `LD_PRELOAD` to make it strata's fork server (see
//! `strata-zygote`). glibc's start-up code calls `__libc_start_main`, which
//! runs the program's constructors and then `main`; this one takes that
//! call. Unless strata started the process as a fork server (its socket in
//! the environment and the marker argument), it passes the call straight
//! on. In a fork server it lets glibc run QEMU's constructors but puts its
//! own function in place of QEMU's `main`: that one prepares QEMU's types
//! once and serves requests, and each forked child goes on into QEMU's
//! `main` with the arguments and environment strata sent.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::OnceLock;

type Main = unsafe extern "C" fn(c_int, *mut *mut c_char, *mut *mut c_char) -> c_int;
type StartMain = unsafe extern "C" fn(
    Main,
    c_int,
    *mut *mut c_char,
    *const c_void,
    *const c_void,
    *const c_void,
    *mut c_void,
) -> c_int;

extern "C" {
    static mut environ: *mut *mut c_char;
}

/// A NULL-terminated array of C strings that lives for the rest of the
/// process (QEMU keeps pointers into its arguments and environment).
fn leak_vector(v: Vec<CString>) -> *mut *mut c_char {
    let ptrs: Vec<*mut c_char> =
        v.into_iter().map(CString::into_raw).chain(std::iter::once(std::ptr::null_mut())).collect();
    Box::leak(ptrs.into_boxed_slice()).as_mut_ptr()
}

/// What the server's `main` needs from the start-up call.
struct ServerStart {
    /// QEMU's own `main`, which each child runs.
    qemu_main: Main,
    /// The fork server's end of strata's socket.
    fd: c_int,
    /// The process's argument area ([`strata_zygote::serve`] reuses it),
    /// as an address and a length.
    cmdline: (usize, usize),
}

static SERVER_START: OnceLock<ServerStart> = OnceLock::new();

/// Runs in place of QEMU's `main` in a fork server, after QEMU's
/// constructors: prepares QEMU's types, serves, and in each child returns
/// QEMU's `main` with the child's arguments and environment.
unsafe extern "C" fn server_main(_argc: c_int, _argv: *mut *mut c_char, _envp: *mut *mut c_char) -> c_int {
    let Some(start) = SERVER_START.get() else {
        // SAFETY: unreachable (set before glibc was called); nothing to run.
        unsafe { libc::abort() }
    };
    // SAFETY: after QEMU's constructors, before any fork, on the main thread.
    let types = unsafe { strata_zygote::prepare_qemu_types() };
    // SAFETY: the argument area recorded at start-up, referenced nowhere
    // else since.
    let cmdline = unsafe { std::slice::from_raw_parts_mut(start.cmdline.0 as *mut u8, start.cmdline.1) };
    // SAFETY: this is the only thread running our code or QEMU's; QEMU's
    // RCU thread is the kind `serve` allows.
    let child = unsafe { strata_zygote::serve(start.fd, cmdline, types) };
    let argc = child.args.len() as c_int;
    let argv = leak_vector(child.args);
    // SAFETY: single-threaded use of the environment: QEMU's `main` has
    // not run, and the RCU thread does not read it.
    unsafe { environ = leak_vector(child.env) };
    // SAFETY: QEMU's main, with a valid argument vector and environment.
    unsafe { (start.qemu_main)(argc, argv, environ) }
}

/// glibc's program start, interposed.
///
/// # Safety
/// Called once, by the program's `_start`, with what it passes to glibc.
#[no_mangle]
pub unsafe extern "C" fn __libc_start_main(
    main: Main,
    argc: c_int,
    argv: *mut *mut c_char,
    init: *const c_void,
    fini: *const c_void,
    rtld_fini: *const c_void,
    stack_end: *mut c_void,
) -> c_int {
    // SAFETY: looking up glibc's own definition, next in search order.
    let next = unsafe { libc::dlsym(libc::RTLD_NEXT, c"__libc_start_main".as_ptr()) };
    if next.is_null() {
        // SAFETY: nothing can run without it.
        unsafe { libc::abort() };
    }
    // SAFETY: glibc's __libc_start_main has this signature.
    let real: StartMain = unsafe { std::mem::transmute::<*mut c_void, StartMain>(next) };
    // SAFETY: argv holds argc valid C strings (the kernel's layout).
    let args: Vec<&CStr> = (0..argc.max(0) as usize).map(|i| unsafe { CStr::from_ptr(*argv.add(i)) }).collect();
    let marked = args.len() == 3 && args[1].to_bytes() == strata_zygote::MARKER.as_bytes();
    let server_fd = if marked { strata_zygote::server_fd_from_env() } else { None };
    let Some(fd) = server_fd else {
        // SAFETY: passing the call on unchanged.
        return unsafe { real(main, argc, argv, init, fini, rtld_fini, stack_end) };
    };
    // The kernel lays the argument strings out back to back: the area runs
    // from the first to the NUL of the last.
    let start = args[0].as_ptr() as usize;
    let end = args[2].as_ptr() as usize + args[2].to_bytes().len() + 1;
    drop(args);
    if SERVER_START.set(ServerStart { qemu_main: main, fd, cmdline: (start, end - start) }).is_err() {
        // SAFETY: glibc's start-up runs once; a second call is a broken process.
        unsafe { libc::abort() };
    }
    // Before QEMU's constructors register their fork handlers: a child's
    // mount namespace must be made while it has one thread.
    strata_zygote::install_fork_handler();
    // SAFETY: glibc's start-up: QEMU's constructors, then the server.
    unsafe { real(server_main, argc, argv, init, fini, rtld_fini, stack_end) }
}
