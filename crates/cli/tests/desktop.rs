//! End-to-end: graphical programs a package holds besides its own, and
//! desktop applications from their launch images; real QEMU.

mod common;

use common::*;

/// The launch images of `package` in the catalog.
fn launch_images_of(package: &str) -> Vec<String> {
    let images = text(&strata(&["images", "ls"]).output().unwrap().stdout);
    images
        .lines()
        .filter(|l| l.starts_with("launch") && l.split_whitespace().nth(2) == Some(package))
        .map(|l| l.split_whitespace().nth(1).unwrap_or_default().to_string())
        .collect()
}

/// Whether a process called `name` runs in session `id`'s guest.
fn runs_in(id: &str, name: &str) -> bool {
    let out = strata(&["exec", id, "sh", "-c", "cat /proc/[0-9]*/comm"]).output().unwrap();
    text(&out.stdout).lines().any(|l| l == name)
}

#[test]
fn another_program_of_a_graphical_package_gets_a_launch_image_of_its_own() {
    if !e2e() {
        return;
    }
    // x11-apps has no definition and no program of its name: it is seen
    // to draw windows (it links libX11), so `-- xcalc` launches xcalc on
    // its display, from a launch image keyed by the command.
    let before = launch_images_of("x11-apps");
    let run = || {
        let out = strata(&["run", "-d", "x11-apps", "--", "xcalc"]).output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout).trim().to_string()
    };
    let id = run();
    assert!(runs_in(&id, "xcalc"), "xcalc does not run in {id}");
    assert!(!runs_in(&id, "xeyes"));
    let after = launch_images_of("x11-apps");
    // Built once, or there already (images of earlier builds may be too).
    let made: Vec<&String> = after.iter().filter(|d| !before.contains(d)).collect();
    assert!(made.len() <= 1 && !after.is_empty(), "one launch image for xcalc: {before:?} then {after:?}");
    // Built once: the second launch of it builds nothing.
    let again = run();
    assert!(runs_in(&again, "xcalc"));
    assert_eq!(launch_images_of("x11-apps"), after);
    for s in [id, again] {
        assert!(strata(&["kill", &s]).status().unwrap().success());
    }
    // A program the package does not have is refused by its build.
    let out = strata(&["run", "-d", "x11-apps", "--", "strata-no-such-program"]).output().unwrap();
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("strata-no-such-program"), "{}", text(&out.stderr));
}

#[test]
fn the_launch_benchmark_measures_a_graphical_program_to_its_first_typed_character() {
    if !e2e() {
        return;
    }
    let out = strata(&["-q", "bench", "launch", "mousepad", "-n", "1", "--typed", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let first = |k: &str| r[k][0].as_f64().unwrap_or(0.0);
    let typed = |k: &str| r["typed"][k][0].as_f64().unwrap_or(0.0);
    // Each path measured, the typed character after its first frame.
    for (frame, key) in [("cold_ms", "cold_ms"), ("launch_ms", "launch_ms")] {
        assert!(first(frame) > 0.0 && typed(key) > first(frame), "{r}");
    }
    // A console package has no display to type into.
    let out = strata(&["-q", "bench", "launch", "bc", "-n", "1", "--typed"]).output().unwrap();
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("graphical"), "{}", text(&out.stderr));
}
