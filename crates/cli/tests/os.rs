//! End-to-end: the OS as a dimension. Debian 12 and Debian 13, each with its
//! own base image built from Debian's packages; real QEMU.

mod common;

use common::api::*;
use common::*;
use serde_json::json;

/// What `/etc/debian_version` says in a python3 session launched with `args`.
fn release_of(args: &[&str]) -> String {
    let mut all = args.to_vec();
    all.extend(["run", "python3"]);
    let out = strata_with_input(&all, "print(open('/etc/debian_version').read().strip())\n");
    assert!(out.status.success(), "strata {all:?}: {}", text(&out.stderr));
    text(&out.stdout).trim().to_string()
}

#[test]
fn a_console_package_runs_on_both_oses_and_reports_its_release() {
    if !e2e() {
        return;
    }
    assert!(release_of(&[]).starts_with("12."), "the default OS is Debian 12");
    assert!(release_of(&["--os", "debian-13"]).starts_with("13."));
    assert!(release_of(&["--os", "debian-12"]).starts_with("12."));

    // A terminal's context chooses the OS of its launches; --os overrides it.
    let terminal = ["--terminal", "os-choice"];
    let set = strata(&[&terminal[..], &["context", "set", "os=debian-13"]].concat()).output().unwrap();
    assert!(set.status.success(), "{}", text(&set.stderr));
    assert!(release_of(&terminal).starts_with("13."));
    assert!(release_of(&[&terminal[..], &["--os", "debian-12"]].concat()).starts_with("12."));
    let bad = strata(&[&terminal[..], &["context", "set", "os=debian-99"]].concat()).output().unwrap();
    assert!(!bad.status.success());
    assert!(text(&bad.stderr).contains("debian-12, debian-13"), "{}", text(&bad.stderr));

    // Images and packages say their OS.
    let images = text(&strata(&["images", "ls"]).output().unwrap().stdout);
    for kind in ["base", "install", "launch"] {
        assert!(
            images.lines().any(|l| l.starts_with(kind) && l.contains("debian-13")),
            "no {kind} image of debian-13:\n{images}"
        );
    }
    let packages = text(&strata(&["packages", "ls"]).output().unwrap().stdout);
    assert!(packages.lines().any(|l| l.starts_with("python3") && l.contains("debian-12,debian-13")), "{packages}");

    // An OS strata does not know is refused before anything starts.
    let out = strata(&["--os", "debian-99", "run", "python3"]).output().unwrap();
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("debian-12, debian-13"), "{}", text(&out.stderr));

    // A server's (a process's) default: STRATA_OS.
    let out = strata(&["run", "python3"])
        .env("STRATA_OS", "debian-13")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(b"print(open('/etc/debian_version').read().strip())\n")?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(text(&out.stdout).trim().starts_with("13."), "{}", text(&out.stdout));
    let out = strata(&["ps"]).env("STRATA_OS", "debian-99").output().unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("STRATA_OS") && text(&out.stderr).contains("debian-13"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_package_of_one_os_launches_there_and_is_refused_on_the_other() {
    if !e2e() {
        return;
    }
    // python3.13 is a Debian package of Debian 13 only; python3.11 of 12 only.
    let out = strata_with_input(&["--os", "debian-13", "run", "python3.13"], "print(6*7)\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "42");
    for (os, package, other) in [("debian-12", "python3.13", "debian-13"), ("debian-13", "python3.11", "debian-12")] {
        let out = strata(&["--os", os, "run", package]).output().unwrap();
        let err = text(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains(&format!("not made for {os}")) && err.contains(other), "{err}");
        // Refused before any build: no image of it on that OS.
        let images = text(&strata(&["images", "ls"]).output().unwrap().stdout);
        assert!(!images.lines().any(|l| l.contains(&format!(" {package} ")) && l.contains(os)), "{images}");
    }
}

#[test]
fn each_os_has_its_own_home() {
    if !e2e() {
        return;
    }
    let terminal = "os-homes";
    let run = |os: &str, script: &str| {
        let out = strata(&["--terminal", terminal, "--os", os, "run", "--home", "python3", "--", "sh", "-c", script])
            .output()
            .unwrap();
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    let (code, _, err) = run("debian-12", "echo twelve > /root/mark");
    assert_eq!(code, Some(0), "{err}");
    // A Debian 12 home is never mounted into a Debian 13 guest.
    let (code, out, _) = run("debian-13", "cat /root/mark 2>/dev/null || echo none");
    assert_eq!((code, out.trim()), (Some(0), "none"));
    let (code, out, err) = run("debian-12", "cat /root/mark");
    assert_eq!((code, out.trim()), (Some(0), "twelve"), "{err}");
    let homes = env().state.join("homes").join(terminal);
    assert!(homes.join("debian-12.qcow2").is_file() && homes.join("debian-13.qcow2").is_file());
}

#[tokio::test]
async fn the_api_takes_and_shows_the_os() {
    if !e2e() {
        return;
    }
    let s = serve("api-os");
    let api = Api { http: reqwest::Client::new(), s: &s };
    let (st, v) = api.call("GET", "/v1/packages", Some(&s.a), None).await;
    assert_eq!(st, 200);
    assert!(v
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "python3" && p["os"] == json!(["debian-12", "debian-13"])));

    let body = json!({"package": "python3", "os": "debian-13"});
    let (st, v) = api.call("POST", "/v1/sessions", Some(&s.a), Some(body)).await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["session"]["os"], "debian-13");
    let id = v["session"]["id"].as_str().unwrap().to_string();
    let mut w = ws(&s, &id, v["attach_token"].as_str().unwrap()).await.unwrap();
    type_line(&mut w, "print('release', open('/etc/debian_version').read().strip())\r").await;
    let seen = read_until(&mut w, "release 13.").await;
    assert!(seen.contains("release 13."), "{seen}");
    let (st, v) = api.call("GET", "/v1/sessions", Some(&s.a), None).await;
    assert_eq!(st, 200);
    assert!(v.as_array().unwrap().iter().any(|x| x["id"] == id.as_str() && x["os"] == "debian-13"), "{v}");
    let (st, _) = api.call("DELETE", &format!("/v1/sessions/{id}"), Some(&s.a), None).await;
    assert_eq!(st, 204);

    // Bad input, refused before any VM starts.
    let (st, v) = api.call("POST", "/v1/sessions", Some(&s.a), Some(json!({"package": "python3", "os": "dos"}))).await;
    assert_eq!(st, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("debian-12, debian-13"), "{v}");
    let body = json!({"package": "python3.11", "os": "debian-13"});
    let (st, v) = api.call("POST", "/v1/sessions", Some(&s.a), Some(body)).await;
    assert_eq!(st, 404, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("debian-12"), "{v}");
    let body = json!({"package": "python3", "context": {"os": "debian-99"}});
    let (st, _) = api.call("POST", "/v1/sessions", Some(&s.a), Some(body)).await;
    assert_eq!(st, 400);
}
