//! Servers sharing images through a real S3-compatible store (Garage): a
//! package built on one server launches on another that never built it, and
//! a session paused on one resumes on another.

mod common;
#[path = "../../remote/tests/garage/mod.rs"]
mod garage;

use std::time::Duration;

use common::*;
use strata_engine::context::ContextSettings;
use strata_engine::{Config, Engine, LogProgress};

/// An engine over the test packages with its own store at `state`, sharing images through Garage.
fn server(state: &std::path::Path, accel: strata_vmm::Accel) -> Engine {
    let e = env();
    let mut cfg = Config::from_env();
    cfg.state_dir = state.to_path_buf();
    cfg.packages_dir = e.packages.clone();
    cfg.agent_binary = e.agent.clone();
    cfg.remote = Some(garage::garage().cfg.clone());
    cfg.accel = Some(accel);
    Engine::open(cfg).unwrap()
}

#[tokio::test]
async fn a_package_built_on_one_server_launches_on_another_and_a_paused_session_moves() {
    if !garage::e2e() {
        return;
    }
    // Server A is the test store, where the package is built.
    let a = {
        let e = env();
        let mut cfg = Config::from_env();
        cfg.state_dir = e.state.clone();
        cfg.packages_dir = e.packages.clone();
        cfg.agent_binary = e.agent.clone();
        cfg.remote = Some(garage::garage().cfg.clone());
        Engine::open(cfg).unwrap()
    };
    let pkg = a.package("bc").unwrap();
    a.publish_package(&pkg, &LogProgress).await.unwrap();
    let built = a.ensure_images(&pkg, &LogProgress).await.unwrap();
    let accel: strata_vmm::Accel = built.launch.meta["accel"].parse().unwrap();

    // Server B starts empty and builds nothing: it fetches and launches.
    let b_dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let b = server(b_dir.path(), accel);
    let settings = ContextSettings::from_terminal(None);
    let mut s = b.launch(&pkg, &settings, &LogProgress).await.unwrap();
    s.expect_after(b"6*7\n", "42", Duration::from_secs(60)).await.unwrap();
    let builds: u64 = b.stats.builds.iter().map(|c| c.load(std::sync::atomic::Ordering::Relaxed)).sum();
    assert_eq!(builds, 0, "server B built images instead of fetching them");
    for rec in [&built.base, &built.install, &built.launch] {
        assert!(b.store.image(&rec.digest).unwrap().is_some(), "{} image {} not on B", rec.kind, rec.digest);
    }

    // A session with state, paused on B, resumes on C (a third, empty
    // server) from the shared store: the record travels by hand here.
    s.input(b"x = 41\n").await.unwrap();
    let id = s.id.clone();
    b.pause_to_image(&mut s, "paused by a test").await.unwrap();
    drop(s);
    let c_dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let c = server(c_dir.path(), accel);
    let record = format!("paused/{id}.json");
    std::fs::create_dir_all(c_dir.path().join("paused")).unwrap();
    std::fs::copy(b_dir.path().join(&record), c_dir.path().join(&record)).unwrap();
    let mut s = c.resume_session(&id, None).await.unwrap();
    s.expect_after(b"x+1\n", "42", Duration::from_secs(60)).await.unwrap();
    s.close().await;
}
