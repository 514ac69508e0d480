//! Names the build: the package version and the commit it was built from,
//! so that a session record, a refusal to adopt a session or `--version`
//! says which strata started what (two builds of one release differ).

use std::path::Path;
use std::process::Command;

fn main() {
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    println!("cargo:rerun-if-env-changed=STRATA_BUILD_COMMIT");
    let commit = std::env::var("STRATA_BUILD_COMMIT").ok().filter(|c| !c.is_empty()).or_else(git_commit);
    let name = match commit {
        Some(c) => format!("{version}+{c}"),
        None => version,
    };
    println!("cargo:rustc-env=STRATA_BUILD_VERSION={name}");
}

/// The commit of the work tree, where it is a git checkout (a source
/// archive has none); rebuilt when HEAD moves.
fn git_commit() -> Option<String> {
    let git = |args: &[&str]| {
        let out = Command::new("git").args(args).output().ok().filter(|o| o.status.success())?;
        String::from_utf8(out.stdout).ok().map(|s| s.trim().to_string())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
    let git_dir = git(&["rev-parse", "--absolute-git-dir"])?;
    let git_dir = Path::new(&git_dir);
    // HEAD names the branch; the branch's ref (or packed-refs) moves with each commit.
    println!("cargo:rerun-if-changed={}", git_dir.join("HEAD").display());
    if let Ok(head) = std::fs::read_to_string(git_dir.join("HEAD")) {
        if let Some(r) = head.trim().strip_prefix("ref: ") {
            println!("cargo:rerun-if-changed={}", git_dir.join(r).display());
        }
    }
    println!("cargo:rerun-if-changed={}", git_dir.join("packed-refs").display());
    Some(commit)
}
