//! A real Garage for tests: one per test binary, on free ports, killed
//! when the binary exits. Shared by the tests of several crates (`#[path]`).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};

use strata_remote::RemoteConfig;

#[path = "../support/tied.rs"]
pub mod tied;

pub fn e2e() -> bool {
    if std::env::var_os("STRATA_E2E").is_some() {
        return true;
    }
    eprintln!("STRATA_E2E is not set: this test runs a real Garage and runs only under ./test.sh");
    false
}

pub struct Garage {
    pub cfg: RemoteConfig,
    pub dir: PathBuf,
    _server: Mutex<Child>,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(2).unwrap().to_path_buf()
}

/// Three free ports in a row from `base` (S3, RPC, and admin at +3).
fn free_ports_from(addr: &str, mut base: u16) -> u16 {
    for _ in 0..200 {
        let free = [0, 1, 3].iter().all(|o| std::net::TcpListener::bind((addr, base + o)).is_ok());
        if free {
            return base;
        }
        base += 10;
    }
    panic!("no free ports for Garage");
}

/// The Garage of this test binary, on loopback.
pub fn garage() -> &'static Garage {
    static G: OnceLock<Garage> = OnceLock::new();
    G.get_or_init(|| start_garage("127.0.0.1", 39_100))
}

/// A Garage listening on `addr`, on free ports from `base_port`, killed
/// with the test binary.
pub fn start_garage(addr: &str, base_port: u16) -> Garage {
    {
        remove_stale_dirs();
        let dir = PathBuf::from(format!("{PREFIX}{}-{addr}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let port = free_ports_from(addr, base_port).to_string();
        let script = repo().join("scripts/garage.sh");
        let run = |step: &str| {
            let out = Command::new("bash")
                .arg(&script)
                .arg(&dir)
                .arg(&port)
                .arg(step)
                .env("GARAGE_ADDR", addr)
                .output()
                .unwrap();
            assert!(out.status.success(), "garage.sh {step}: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        run("config");
        let bin = std::env::var("STRATA_GARAGE").unwrap_or_else(|_| "/opt/strata-tools/bin/garage".into());
        let mut cmd = Command::new(bin);
        cmd.arg("-c").arg(dir.join("garage.toml")).arg("server").stdout(Stdio::null()).stderr(Stdio::null());
        let server = tied::spawn_tied(cmd).expect("Garage is installed by scripts/deps-cluster.sh");
        let env = run("setup");
        let get = |k: &str| {
            env.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("no {k} in {env}"))
                .to_string()
        };
        let cfg = RemoteConfig {
            endpoint: get("STRATA_S3_ENDPOINT"),
            bucket: get("STRATA_S3_BUCKET"),
            region: get("STRATA_S3_REGION"),
            access_key_id: get("AWS_ACCESS_KEY_ID"),
            secret_access_key: get("AWS_SECRET_ACCESS_KEY"),
            cache_limit: u64::MAX,
        };
        Garage { cfg, dir, _server: Mutex::new(server) }
    }
}

const PREFIX: &str = "/tmp/strata-garage-test-";

/// Directories of earlier test runs whose process is gone.
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir("/tmp") else { return };
    for e in entries.flatten() {
        let path = e.path();
        let Some(rest) = path.to_str().and_then(|p| p.strip_prefix(PREFIX)) else { continue };
        let pid = rest.split('-').next().unwrap_or(rest);
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}
