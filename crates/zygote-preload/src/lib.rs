//! Loaded into QEMU with `LD_PRELOAD` to make it strata's fork server (see
//! `strata-zygote`). glibc's start-up code calls `__libc_start_main` before
//! the program's constructors and `main`; this one takes that call. Unless
//! strata started the process as a fork server (its socket in the
//! environment and the marker argument), it passes the call straight on.
//! In a fork server it serves requests, and each forked child goes on into
//! glibc's real start-up, and so into QEMU, with the arguments and
//! environment strata sent.

use std::ffi::{c_char, c_int, c_void, CStr, CString};

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
    let start = args[0].as_ptr() as *mut u8;
    let end = args[2].as_ptr() as usize + args[2].to_bytes().len() + 1;
    // SAFETY: [start, end) is this process's argument area, which nothing
    // else refers to once the arguments above are dropped.
    let cmdline = unsafe { std::slice::from_raw_parts_mut(start, end - start as usize) };
    drop(args);
    // SAFETY: no thread has been started (glibc's start-up has not run
    // the program's constructors yet), and the area is ours.
    let child = unsafe { strata_zygote::serve(fd, cmdline) };
    let argc = child.args.len() as c_int;
    let argv = leak_vector(child.args);
    // SAFETY: single-threaded; glibc's start-up reads the environment from here.
    unsafe { environ = leak_vector(child.env) };
    // SAFETY: glibc's start-up, now with the child's arguments.
    unsafe { real(main, argc, argv, init, fini, rtld_fini, stack_end) }
}
