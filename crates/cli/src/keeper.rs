//! The store's keeper: a small process the CLI starts when a session may
//! outlive it. It does for the sessions no strata process holds what a
//! server does for its own: a session whose terminal went away is paused
//! to an image once its idle time-out passes, and paused sessions go after
//! their retention, with no `strata serve` running. One runs per store (a
//! lock says which); it ends once no session runs.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use strata_engine::Engine;

/// Held by the running keeper; holds its pid.
const LOCK: &str = "keeper.lock";
/// Where the keeper logs.
const LOG: &str = "keeper.log";
/// How often it looks (as a server's housekeeping does).
const TICK: Duration = Duration::from_secs(5);
/// Rounds with nothing to keep before it ends.
const IDLE_ROUNDS: u32 = 3;

fn lock_path(eng: &Engine) -> PathBuf {
    eng.cfg.state_dir.join(LOCK)
}

/// The lock, if no other keeper holds it.
fn try_lock(path: &Path) -> Option<nix::fcntl::Flock<std::fs::File>> {
    let f = std::fs::File::options().create(true).truncate(false).write(true).open(path).ok()?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).ok()
}

/// Starts the store's keeper unless one runs. Never fails the caller: a
/// keeper that cannot start is logged, and the sessions run on as before.
pub fn ensure(eng: &Engine) {
    let path = lock_path(eng);
    match try_lock(&path) {
        // Free: nobody keeps the store. Released before the keeper takes it.
        Some(lock) => drop(lock),
        None => return,
    }
    if let Err(e) = spawn(eng) {
        tracing::warn!(error = %e, "could not start the store's keeper; detached sessions are paused only while a server runs");
    }
}

fn spawn(eng: &Engine) -> std::io::Result<()> {
    let dir = eng.cfg.state_dir.as_os_str();
    spawn_detached(eng, &["--state".as_ref(), dir, "keep".as_ref()], LOG)
}

/// Starts `strata ARGS` as a process of its own, logging to `log` in the
/// store: it outlives this one.
pub fn spawn_detached(eng: &Engine, args: &[&std::ffi::OsStr], log: &str) -> std::io::Result<()> {
    let log = std::fs::File::options().create(true).append(true).open(eng.cfg.state_dir.join(log))?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(args).env_remove("STRATA_ADDR");
    cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(log);
    // A session of its own: the terminal's hangup or Ctrl-C do not reach it.
    // SAFETY: setsid is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    // Reaped here while this process lives; adopted by init after.
    std::thread::spawn(move || child.wait());
    Ok(())
}

/// `strata keep`: keeps the store until nothing runs in it.
pub async fn run(eng: &Engine) -> anyhow::Result<u8> {
    let path = lock_path(eng);
    let Some(lock) = try_lock(&path) else {
        return Ok(0);
    };
    std::fs::write(&path, format!("{}\n", std::process::id()))?;
    tracing::info!(store = %eng.cfg.state_dir.display(), "keeping the store's detached sessions");
    // Told to stop, it ends between rounds: a pause cut short would leave
    // a guest stopped.
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
    let mut quiet_rounds = 0;
    while quiet_rounds < IDLE_ROUNDS {
        let round = eng.housekeep(Some(strata_engine::sessions::IDLE_TIMEOUT)).await;
        quiet_rounds = if round.to_keep { 0 } else { quiet_rounds + 1 };
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = term.recv() => { tracing::info!("told to stop; the keeper ends"); return Ok(0) }
            _ = int.recv() => { tracing::info!("interrupted; the keeper ends"); return Ok(0) }
        }
    }
    tracing::info!("no session runs in the store; the keeper ends");
    drop(lock);
    Ok(0)
}
