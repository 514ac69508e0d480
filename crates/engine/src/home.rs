//! Persistent homes: one qcow2 disk per terminal and OS, holding an ext4
//! file system mounted at `/root` in every session of that terminal that
//! asks for it. A home is used by one session at a time.

use std::path::PathBuf;

use tokio::process::Command;

use crate::tools::run;
use crate::{io_err, Engine, Error};

/// Virtual size of a home (sparse: only what is written is stored).
const HOME_SIZE: &str = "4G";

/// Holds a terminal's home claim while a session is being started on it.
pub(crate) struct HomeClaim {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl Engine {
    fn home_dir(&self, terminal: &str) -> PathBuf {
        self.cfg.state_dir.join("homes").join(terminal)
    }

    /// The home disk of `terminal` for guests of `os` (each OS has its
    /// own: one release's files are never mounted into another's guest),
    /// created empty on first use.
    ///
    /// # Errors
    /// If the disk cannot be created.
    pub(crate) async fn home_disk(&self, terminal: &str, os: &str) -> Result<PathBuf, Error> {
        crate::context::check_terminal_name(terminal).map_err(Error::Config)?;
        crate::Os::named(os)?;
        let dir = self.home_dir(terminal);
        let disk = dir.join(format!("{os}.qcow2"));
        if disk.is_file() {
            return Ok(disk);
        }
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let work = self.store.work_dir("home")?;
        let raw = work.path().join("home.raw");
        run(
            "mke2fs",
            Command::new("mke2fs")
                .args(["-q", "-t", "ext4", "-L", "strata-home", "-E", "root_owner=0:0"])
                .arg(&raw)
                .arg(HOME_SIZE),
        )
        .await?;
        // Made in scratch space on the same file system, then renamed: a
        // crash before the rename leaves no half-made home behind.
        let staged = work.path().join("home.qcow2");
        run("qemu-img convert", Command::new("qemu-img").args(["convert", "-q", "-O", "qcow2"]).arg(&raw).arg(&staged))
            .await?;
        std::fs::File::open(&staged).and_then(|f| f.sync_all()).map_err(io_err(&staged))?;
        std::fs::rename(&staged, &disk).map_err(io_err(&disk))?;
        Ok(disk)
    }

    /// Claims `terminal`'s home for a new session: refused while another
    /// session uses it or is being started on it.
    ///
    /// # Errors
    /// [`Error::Config`] naming the session that holds the home.
    pub(crate) fn claim_home(&self, terminal: &str, session: &str) -> Result<HomeClaim, Error> {
        let dir = self.home_dir(terminal);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let path = dir.join("claim.lock");
        let f = std::fs::File::options().create(true).truncate(false).write(true).open(&path).map_err(io_err(&path))?;
        let lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|_| {
            Error::Config(format!(
                "the home of terminal {terminal} is being claimed by a session starting now; try again"
            ))
        })?;
        // Paused sessions count: their guest has the home mounted. The
        // session being resumed is the one exception.
        let holder = self.list_sessions().into_iter().find(|s| s.home.as_deref() == Some(terminal) && s.id != session);
        if let Some(s) = holder {
            return Err(Error::Config(format!(
                "the home of terminal {terminal} is in use by session {}; stop it (`strata kill {}`) or launch without --home",
                s.id, s.id
            )));
        }
        Ok(HomeClaim { _lock: lock })
    }
}
