//! Starting a helper server (Garage, etcd) for tests so that it dies with
//! the test binary, however that ends. Shared by several crates' tests
//! (`#[path]`).

use std::os::unix::process::CommandExt;
use std::process::{Child, Command};

/// Spawns `cmd` with PR_SET_PDEATHSIG. That signal fires when the spawning
/// *thread* ends, so the spawn happens on a thread that lives as long as
/// the test binary.
pub fn spawn_tied(mut cmd: Command) -> std::io::Result<Child> {
    // SAFETY: only an async-signal-safe prctl between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            extern "C" {
                fn prctl(option: i32, arg2: u64, arg3: u64, arg4: u64, arg5: u64) -> i32;
            }
            const PR_SET_PDEATHSIG: i32 = 1;
            prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0);
            Ok(())
        });
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(cmd.spawn());
        loop {
            std::thread::park();
        }
    });
    rx.recv().map_err(std::io::Error::other)?
}
