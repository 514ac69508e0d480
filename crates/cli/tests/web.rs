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
        Served::start_with(name, &[])
    }

    /// A server with `extra` arguments (global ones such as `--packages`).
    fn start_with(name: &str, extra: &[&str]) -> Served {
        let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(2).unwrap().to_path_buf();
        let token = text(&strata(&["token", "create", name]).output().unwrap().stdout).trim().to_string();
        let mut args = extra.to_vec();
        args.extend(["serve", "--listen", "127.0.0.1:0", "--on-stop", "stop"]);
        let mut server = strata(&args).stdout(Stdio::piped()).spawn().unwrap();
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

/// A package of this run alone (bc, with an environment no other run has):
/// its launch image is never built yet, so a build must run.
fn fresh_package(dir: &std::path::Path) -> String {
    for e in std::fs::read_dir(&env().packages).unwrap().flatten() {
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let name = "bc-build-job".to_string();
    let def = format!(
        "debs = ['bc']\ncommand = ['bc', '-q']\nenv = {{ STRATA_TEST_RUN = '{nanos}' }}\n[ready]\nalive_ms = 500\n\
         [probe]\ninput = \"6*7\\n\"\nexpect = '42'\n"
    );
    std::fs::write(dir.join(format!("{name}.toml")), def).unwrap();
    name
}

#[test]
fn a_build_started_by_the_page_shows_its_progress_joins_and_ends_after_the_page_is_closed() {
    if !e2e() {
        return;
    }
    let packages = tempfile::tempdir().unwrap();
    let pkg = fresh_package(packages.path());
    // A setting that is wrong is refused before any build, not after it.
    let started = std::time::Instant::now();
    let refused =
        strata(&["--packages", packages.path().to_str().unwrap(), "run", "--screen", "0x0", &pkg]).output().unwrap();
    assert!(!refused.status.success() && text(&refused.stderr).contains("screen size"), "{}", text(&refused.stderr));
    assert!(started.elapsed() < std::time::Duration::from_secs(20), "refused only after {:?}", started.elapsed());
    let builds = text(&strata(&["builds", "ls"]).output().unwrap().stdout);
    assert!(!builds.lines().any(|l| l.contains(&pkg) && l.contains("running")), "a build started: {builds}");
    let srv = Served::start_with("web-build", &["--packages", packages.path().to_str().unwrap()]);
    // The page launches it: the build's progress appears and grows, then
    // the page is closed mid-build.
    let page = std::process::Command::new("node")
        .arg(srv.repo.join("web/test/build.mjs"))
        .args([&srv.base, &srv.token, &pkg])
        .current_dir(srv.repo.join("web"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let http = reqwest::Client::new();
    let call = |method: &str, path: &str, body: Option<serde_json::Value>| {
        let mut rq = http.request(method.parse().unwrap(), format!("{}{path}", srv.base)).bearer_auth(&srv.token);
        if let Some(b) = body {
            rq = rq.json(&b);
        }
        async move {
            let r = rq.send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap_or_default())
        }
    };
    rt.block_on(async {
        // The page's build, once it runs.
        let mut id = String::new();
        for _ in 0..600 {
            let (_, listed) = call("GET", "/v1/builds", None).await;
            if let Some(b) =
                listed.as_array().unwrap().iter().find(|b| b["package"] == pkg.as_str() && b["state"] == "running")
            {
                id = b["id"].as_str().unwrap().to_string();
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(!id.is_empty(), "the page started no build of {pkg}");
        // A second request joins it: the same id.
        let (status, joined) = call("POST", "/v1/builds", Some(serde_json::json!({ "package": pkg }))).await;
        assert_eq!(status, 202, "the build had ended before a second request: {joined}");
        assert_eq!(joined["id"], id.as_str(), "{joined}");
        let out = page.wait_with_output().unwrap();
        eprintln!("{}", text(&out.stdout));
        assert!(out.status.success(), "browser test failed:\n{}\n{}", text(&out.stdout), text(&out.stderr));
        // It ends although the page that started it is gone.
        let mut last = serde_json::Value::Null;
        for _ in 0..600 {
            last = call("GET", &format!("/v1/builds/{id}"), None).await.1;
            if last["state"] != "running" {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        assert_eq!(last["state"], "done", "{last}");
        assert_eq!(last["progress"], 1.0, "{last}");
        assert!(last["log"].as_array().unwrap().iter().any(|l| l.as_str().unwrap().contains("launch image")), "{last}");
        // The CLI lists it, here and through the server.
        let local = strata(&["builds", "ls"]).output().unwrap();
        assert!(
            text(&local.stdout).lines().any(|l| l.starts_with(&id) && l.contains(" done ")),
            "{}",
            text(&local.stdout)
        );
        let shown = strata(&["--addr", &srv.base, "--token", &srv.token, "builds", "show", &id]).output().unwrap();
        assert!(shown.status.success() && text(&shown.stdout).contains("launch image for"), "{}", text(&shown.stdout));
        // Built now: a build answers at once, and a launch is quick.
        let (status, again) = call("POST", "/v1/builds", Some(serde_json::json!({ "package": pkg }))).await;
        assert_eq!(status, 200, "{again}");
        let (status, created) = call("POST", "/v1/sessions", Some(serde_json::json!({ "package": pkg }))).await;
        assert_eq!(status, 201, "{created}");
        let sid = created["session"]["id"].as_str().unwrap().to_string();
        call("DELETE", &format!("/v1/sessions/{sid}"), None).await;
        // Its launch image is this test's alone.
        let (_, images) = call("GET", "/v1/images", None).await;
        for i in images.as_array().unwrap().iter().filter(|i| i["package"] == pkg.as_str() && i["kind"] == "launch") {
            call("DELETE", &format!("/v1/images/{}", i["digest"].as_str().unwrap()), None).await;
        }
    });
}

#[test]
fn a_local_run_of_a_graphical_package_serves_a_viewer_page_that_shows_it() {
    if !e2e() {
        return;
    }
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(2).unwrap().to_path_buf();
    // `strata run xeyes` on a terminal of its own, as a person types it.
    let line = format!("'{}' run xeyes", env().strata.display());
    let mut c = std::process::Command::new("script");
    c.args(["-qfec", &line, "/dev/null"]).env_remove("DISPLAY");
    with_test_store(&mut c, env().strata.parent().unwrap());
    let mut run = c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = run.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut seen = Vec::new();
    let url = loop {
        let l = rx
            .recv_timeout(std::time::Duration::from_secs(300))
            .unwrap_or_else(|_| panic!("no viewer address: {seen:?}"));
        if let Some(u) = l.split_whitespace().find(|w| w.starts_with("http://127.0.0.1:")) {
            break u.to_string();
        }
        seen.push(l);
    };
    assert!(url.contains("#session=") && url.contains("&attach="), "{url}");
    let shot = env().state.join("web-local-viewer.png");
    let out = std::process::Command::new("node")
        .arg(repo.join("web/test/viewer.mjs"))
        .args([url.as_str(), shot.to_str().unwrap()])
        .current_dir(repo.join("web"))
        .output()
        .unwrap();
    // The viewer's address without its token shows nothing.
    let tokenless = url.split("&attach=").next().unwrap().to_string() + "&attach=wrong";
    let refused = std::process::Command::new("node")
        .arg(repo.join("web/test/viewer.mjs"))
        .args([tokenless.as_str(), "/dev/null"])
        .env("VIEWER_TIMEOUT_MS", "5000")
        .current_dir(repo.join("web"))
        .output()
        .unwrap();
    // Ctrl-C ends the run and its session. (`script` runs it through a
    // shell, which may or may not have exec'd it: strata is found by name.)
    for pid in descendants(run.id()).into_iter().filter(|p| comm(*p) == "strata") {
        let _ = std::process::Command::new("kill").args(["-INT", &pid.to_string()]).status();
    }
    drop(run.stdin.take());
    let ended = wait_bounded(&mut run, std::time::Duration::from_secs(120), "strata run xeyes after Ctrl-C");
    assert!(out.status.success(), "viewer test failed:\n{}\n{}", text(&out.stdout), text(&out.stderr));
    assert!(!refused.status.success(), "a wrong token showed the display: {}", text(&refused.stdout));
    assert_eq!(ended.code(), Some(130), "Ctrl-C should end the run with 130");
}

/// A desktop application launched from the web page (test/desktop.mjs in
/// `mode`): its window drawn at once, then what `mode` checks.
fn desktop_application_in_the_browser(package: &str, mode: &str) {
    let srv = Served::start(&format!("web-{package}"));
    let shot = env().state.join(format!("web-{package}.png"));
    let _ = std::fs::remove_file(&shot);
    let out = srv.node("desktop.mjs", &[&srv.base, &srv.token, package, mode, shot.to_str().unwrap()]);
    assert!(out.status.success(), "browser test failed:\n{}\n{}", text(&out.stdout), text(&out.stderr));
    eprintln!("{}", text(&out.stdout));
    assert!(std::fs::metadata(&shot).map(|m| m.len() > 10_000).unwrap_or(false), "no screenshot at {}", shot.display());
    // Drawn at once: its launch image holds the window.
    let first = text(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("first frame after ")?.strip_suffix(" ms")?.parse::<u64>().ok())
        .expect("the first frame's time");
    assert!(first < 20_000, "{package}'s first frame took {first} ms");
}

#[test]
fn libreoffice_writer_is_drawn_at_once_in_the_browser_and_takes_typing_and_the_clipboard() {
    if !e2e() {
        return;
    }
    desktop_application_in_the_browser("libreoffice-writer", "writer");
}

#[test]
fn libreoffice_calc_is_drawn_at_once_in_the_browser_and_a_click_selects_a_cell() {
    if !e2e() {
        return;
    }
    desktop_application_in_the_browser("libreoffice-calc", "calc");
}

#[test]
fn gimp_is_drawn_at_once_in_the_browser() {
    if !e2e() {
        return;
    }
    desktop_application_in_the_browser("gimp", "view");
}
