//! Running the host tools builds need (mmdebstrap, apt, mke2fs, qemu-img).

use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::{Error, Progress};

/// Runs a command to completion; on failure the error carries its output.
pub async fn run(what: &str, cmd: &mut Command) -> Result<String, Error> {
    tracing::debug!(?cmd, "running");
    let out = cmd
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| Error::ToolMissing { what: what.into(), source })?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        return Err(Error::Tool { what: what.into(), status: out.status.to_string(), output: tail(&text, 30) });
    }
    Ok(text)
}

/// Runs a command, showing each line of its output as progress.
pub async fn run_with_progress(what: &str, cmd: &mut Command, progress: &dyn Progress) -> Result<(), Error> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| Error::ToolMissing { what: what.into(), source })?;
    let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
    let mut out = BufReader::new(child.stdout.take().expect("piped")).lines();
    let mut log = Vec::new();
    loop {
        tokio::select! {
            l = lines.next_line() => match l { Ok(Some(l)) => { progress.step(&format!("{what}: {l}")); log.push(l) } _ => break },
            l = out.next_line() => if let Ok(Some(l)) = l { progress.step(&format!("{what}: {l}")); log.push(l) },
        }
    }
    while let Ok(Some(l)) = out.next_line().await {
        log.push(l);
    }
    let status = child.wait().await.map_err(|source| Error::ToolMissing { what: what.into(), source })?;
    if !status.success() {
        return Err(Error::Tool { what: what.into(), status: status.to_string(), output: tail(&log.join("\n"), 30) });
    }
    Ok(())
}

/// The last `n` lines of a text.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Whether Debian's package lists (those `apt` options select) know this
/// package name.
pub fn debian_package_exists(apt: &[String], name: &str) -> bool {
    std::process::Command::new("apt-cache")
        .args(apt)
        .args(["show", "--no-all-versions", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// The packages a Debian package depends on directly (the lists `apt`
/// options select): their names, without versions or alternatives.
pub fn debian_depends(apt: &[String], name: &str) -> Vec<String> {
    let Ok(out) = std::process::Command::new("apt-cache")
        .args(apt)
        .args(["depends", "--no-recommends", "--no-suggests", "--no-conflicts", "--no-breaks", "--no-replaces"])
        .args(["--no-enhances", name])
        .stderr(Stdio::null())
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .map(|d| d.trim_matches(['<', '>']).to_string())
        .collect()
}

/// Every package name Debian's lists know (for suggestions).
pub fn debian_package_names(apt: &[String]) -> Vec<String> {
    std::process::Command::new("apt-cache")
        .args(apt)
        .arg("pkgnames")
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Debian packages whose name or description holds every word of `words`
/// (the host's package lists, `apt-cache search`): name and short
/// description, names matching first, at most `limit`.
pub async fn search_debian(apt: &[String], words: &[&str], limit: usize) -> Vec<(String, String)> {
    let Ok(out) =
        Command::new("apt-cache").args(apt).arg("search").arg("--").args(words).stderr(Stdio::null()).output().await
    else {
        return Vec::new();
    };
    let mut found: Vec<(String, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(" - "))
        .map(|(n, d)| (n.to_string(), d.to_string()))
        .collect();
    // A word in the name says more than one in the description.
    found.sort_by_key(|(n, _)| (!words.iter().all(|w| n.contains(&w.to_lowercase())), n.len(), n.clone()));
    found.truncate(limit);
    found
}

/// Points an overlay's backing file at a blob by its bare digest, so the
/// overlay's own digest does not depend on where the store lives: blobs sit in
/// one directory and qcow2 resolves relative names against the overlay's.
pub async fn rebase_to_digest(overlay: &std::path::Path, backing_digest: &str) -> Result<(), Error> {
    run(
        "qemu-img rebase",
        Command::new("qemu-img")
            .args(["rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", backing_digest])
            .arg(overlay),
    )
    .await
    .map(|_| ())
}
