//! Debian's package lists of each OS strata builds: what a package name
//! resolves to, what an install image downloads, which kernel a base image
//! gets. The host's own lists serve the OS the host runs; any other OS's
//! are fetched into the state directory (`apt/OS/`) on first use and
//! refreshed before a build once a day old.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use strata_package::Os;

use crate::{io_err, Error};

/// How old another OS's lists may be before a build fetches them again
/// (older ones may name .debs the mirror no longer has).
const FRESH_FOR: Duration = Duration::from_secs(24 * 3600);

/// The keyring Debian's archives are signed with (debian-archive-keyring,
/// which holds the keys of the releases after the host's too).
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// The suite this host runs (`VERSION_CODENAME` of /etc/os-release).
fn host_suite() -> Option<String> {
    let text = std::fs::read_to_string("/etc/os-release").ok()?;
    text.lines().find_map(|l| l.strip_prefix("VERSION_CODENAME=")).map(|v| v.trim_matches('"').to_string())
}

/// apt's options that make apt-get and apt-cache read `os`'s lists: none
/// for the host's own OS; else a private root under `state_dir`, fetched
/// from `mirror` if it has no lists yet, or if they are older than a day
/// and `refresh` is set.
///
/// # Errors
/// If the lists cannot be fetched (what failed, with apt's output).
pub(crate) fn options(state_dir: &Path, mirror: &str, os: Os, refresh: bool) -> Result<Vec<String>, Error> {
    if host_suite().as_deref() == Some(os.suite) {
        return Ok(Vec::new());
    }
    let root = state_dir.join("apt").join(os.name);
    let lists = root.join("lists");
    let parts = root.join("sources.list.d");
    for d in [lists.join("partial"), root.join("cache/archives/partial"), parts.clone()] {
        std::fs::create_dir_all(&d).map_err(io_err(&d))?;
    }
    // No packages installed: the host's own would otherwise count as known
    // (an install image's build names the base's status after these).
    let status = root.join("status");
    if !status.is_file() {
        crate::write_atomic(&status, b"")?;
    }
    let sources = root.join("sources.list");
    let line = format!("deb [signed-by={KEYRING}] {mirror} {} main\n", os.suite);
    if std::fs::read_to_string(&sources).ok().as_deref() != Some(line.as_str()) {
        crate::write_atomic(&sources, line.as_bytes())?;
        // Lists of another mirror or suite are not these.
        let _ = std::fs::remove_file(root.join("fetched"));
    }
    let opts: Vec<String> = [
        ("Dir::Etc::SourceList", sources),
        ("Dir::Etc::SourceParts", parts),
        ("Dir::State::Lists", lists),
        ("Dir::Cache", root.join("cache")),
        ("Dir::State::status", status),
        ("Dir::Etc::Preferences", PathBuf::from("/dev/null")),
        ("Dir::Etc::PreferencesParts", root.join("sources.list.d")),
    ]
    .into_iter()
    .map(|(k, v)| format!("-o{k}={}", v.display()))
    .chain(["-oDebug::NoLocking=1".to_string(), "-oAPT::Sandbox::User=root".to_string()])
    .collect();
    let stamp = root.join("fetched");
    // Fetched before, and young enough (or any age will do).
    let usable = || {
        let age = std::fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok());
        age.is_some_and(|a| !refresh || a < FRESH_FOR)
    };
    if usable() {
        return Ok(opts);
    }
    // One process fetches; the others wait for it, then find fresh lists.
    let lock_path = root.join("lock");
    let f = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err(&lock_path))?;
    let _lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| Error::Io { path: lock_path.clone(), source: e.into() })?;
    if usable() {
        return Ok(opts);
    }
    tracing::info!(os = os.name, mirror, "fetching Debian's package lists");
    let out = std::process::Command::new("apt-get")
        .args(&opts)
        .args(["-q", "update"])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::ToolMissing { what: "apt-get update".into(), source })?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // apt-get update exits 0 with unreachable mirrors: "W:"/"E:" lines say so.
    if !out.status.success() || text.lines().any(|l| l.starts_with("E:") || l.starts_with("W: Failed")) {
        return Err(Error::Tool {
            what: format!("fetching the package lists of {} from {mirror}", os.name),
            status: out.status.to_string(),
            output: crate::tools::tail(&text, 20),
        });
    }
    crate::write_atomic(&stamp, b"")?;
    Ok(opts)
}

/// As [`options`], from async code (the fetch blocks).
pub(crate) async fn options_async(state_dir: &Path, mirror: &str, os: Os, refresh: bool) -> Result<Vec<String>, Error> {
    let (dir, mirror) = (state_dir.to_path_buf(), mirror.to_string());
    tokio::task::spawn_blocking(move || options(&dir, &mirror, os, refresh))
        .await
        .map_err(|e| Error::Config(format!("fetching package lists: {e}")))?
}
