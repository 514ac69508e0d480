//! The web page in a real browser (Debian's headless chromium, driven by
//! playwright-core from web/node_modules) against a real `strata serve`.

mod common;

use std::io::BufRead;
use std::process::Stdio;

use common::*;

/// A `strata serve` on a free port and a token of terminal `name`.
struct Served {
    server: std::process::Child,
    base: String,
    token: String,
    repo: std::path::PathBuf,
}

impl Served {
    fn start(name: &str) -> Served {
        let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(2).unwrap().to_path_buf();
        let token = text(&strata(&["token", "create", name]).output().unwrap().stdout).trim().to_string();
        let mut server =
            strata(&["serve", "--listen", "127.0.0.1:0", "--on-stop", "stop"]).stdout(Stdio::piped()).spawn().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(server.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let base = line.trim().rsplit(' ').next().unwrap().to_string();
        Served { server, base, token, repo }
    }

    /// Runs one of web/test/*.mjs with `args`; its output.
    fn node(&self, script: &str, args: &[&str]) -> std::process::Output {
        std::process::Command::new("node")
            .arg(self.repo.join("web/test").join(script))
            .args(args)
            .current_dir(self.repo.join("web"))
            .output()
            .unwrap()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").arg(self.server.id().to_string()).status();
        let _ = self.server.wait();
    }
}

#[test]
fn the_web_page_launches_a_console_package_and_its_terminal_works() {
    if !e2e() {
        return;
    }
    let srv = Served::start("web-test");
    let shot = env().state.join("web-test.png");
    let out = srv.node("e2e.mjs", &[&srv.base, &srv.token, shot.to_str().unwrap()]);
    assert!(out.status.success(), "browser test failed:\n{}\n{}", text(&out.stdout), text(&out.stderr));
    assert!(std::fs::metadata(&shot).map(|m| m.len() > 10_000).unwrap_or(false), "no screenshot at {}", shot.display());
}

#[test]
fn the_web_page_shows_a_graphical_package_and_passes_the_pointer_to_it() {
    if !e2e() {
        return;
    }
    let srv = Served::start("web-display");
    let shot = env().state.join("web-display.png");
    let _ = std::fs::remove_file(&shot);
    let out = srv.node("display.mjs", &[&srv.base, &srv.token, shot.to_str().unwrap()]);
    assert!(out.status.success(), "browser test failed:\n{}\n{}", text(&out.stdout), text(&out.stderr));
    eprintln!("{}", text(&out.stdout));
    assert!(std::fs::metadata(&shot).map(|m| m.len() > 10_000).unwrap_or(false), "no screenshot at {}", shot.display());
}

#[test]
fn strata_run_of_a_graphical_package_prints_a_viewer_address_that_shows_it() {
    if !e2e() {
        return;
    }
    let srv = Served::start("web-viewer");
    let run = strata(&["--addr", &srv.base, "--token", &srv.token, "run", "-d", "xeyes"])
        .env_remove("DISPLAY")
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", text(&run.stderr));
    let stderr = text(&run.stderr);
    let viewer = stderr
        .split_whitespace()
        .find(|w| w.starts_with(&format!("{}/#session=", srv.base)))
        .unwrap_or_else(|| panic!("no viewer address in {stderr:?}"))
        .to_string();
    let shot = env().state.join("web-viewer.png");
    let _ = std::fs::remove_file(&shot);
    let out = srv.node("viewer.mjs", &[&viewer, shot.to_str().unwrap()]);
    assert!(out.status.success(), "viewer test failed:\n{}\n{}", text(&out.stdout), text(&out.stderr));
}
