//! The install image: a qcow2 overlay on the base holding what installing the
//! package's .debs wrote, made by really installing them inside a VM.

use std::collections::BTreeMap;
use std::time::Duration;

use sha2::{Digest, Sha256};
use strata_package::Package;
use strata_proto::{GuestMsg, HostMsg, Readiness, TerminalContext};
use strata_store::{ImageKind, ImageRecord};
use strata_vmm::{Disk, DiskMode};
use tokio::process::Command;

use crate::session::{boot_for_build, MAIN_PROC};
use crate::tools::{rebase_to_digest, run, tail};
use crate::{io_err, Engine, Error, Progress, ARCH};

/// Exit status the install script uses when the package's program is missing.
const NO_PROGRAM: i32 = 97;

/// Recipe of an install image: the base's root disk and the Debian packages.
pub fn install_recipe(base_rootfs: &str, debs: &[String]) -> String {
    let mut sorted = debs.to_vec();
    sorted.sort();
    let mut h = Sha256::new();
    h.update(b"install-v1\0");
    h.update(base_rootfs.as_bytes());
    for d in sorted {
        h.update(b"\0");
        h.update(d.as_bytes());
    }
    hex::encode(h.finalize())
}

impl Engine {
    /// The package's install image, built if missing.
    ///
    /// # Errors
    /// If resolving, downloading or installing fails.
    pub async fn ensure_install(
        &self,
        pkg: &Package,
        base: &ImageRecord,
        progress: &dyn Progress,
    ) -> Result<ImageRecord, Error> {
        let recipe = install_recipe(base.file("rootfs")?, &pkg.def.all_debs());
        if let Some(rec) = self.find_image(ImageKind::Install, &recipe).await? {
            return Ok(rec);
        }
        let _lock = self.store.lock_recipe(&recipe)?;
        if let Some(rec) = self.find_image(ImageKind::Install, &recipe).await? {
            return Ok(rec);
        }
        let rec = self.counted(ImageKind::Install, self.build_install(pkg, base, &recipe, progress)).await?;
        self.share(&rec).await;
        Ok(rec)
    }

    async fn build_install(
        &self,
        pkg: &Package,
        base: &ImageRecord,
        recipe: &str,
        progress: &dyn Progress,
    ) -> Result<ImageRecord, Error> {
        let work = self.store.work_dir("install")?;
        let w = work.path();
        progress.step(&format!("install image for {}: resolving {}", pkg.name, pkg.def.all_debs().join(" ")));
        let debs = w.join("debs");
        std::fs::create_dir_all(debs.join("partial")).map_err(io_err(&debs))?;
        let status = self.store.blob_path(base.file("dpkg-status")?);
        let apt = crate::apt::options_async(&self.cfg.state_dir, &self.cfg.mirror, pkg.os, true).await?;
        // Resolve against the base image's own dpkg state, so exactly what the
        // base lacks is downloaded.
        let out = run(
            &format!("resolving {}", pkg.def.all_debs().join(" ")),
            Command::new("apt-get")
                .args(&apt)
                .args(["install", "--download-only", "-y", "-q", "--no-install-recommends"])
                .arg(format!("-oDir::State::status={}", status.display()))
                .arg(format!("-oDir::Cache::archives={}", debs.display()))
                .args(["-oDebug::NoLocking=1", "-oAPT::Sandbox::User=root"])
                .args(pkg.def.all_debs()),
        )
        .await
        .map_err(|e| match e {
            Error::Tool { output, .. } => Error::InstallFailed { package: pkg.name.clone(), output },
            e => e,
        })?;
        tracing::debug!(%out, "apt resolved");
        let _ = std::fs::remove_dir_all(debs.join("partial"));
        let files: Vec<String> = std::fs::read_dir(&debs)
            .map_err(io_err(&debs))?
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| n.ends_with(".deb"))
            .collect();
        let total: u64 = std::fs::read_dir(&debs)
            .map_err(io_err(&debs))?
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum();
        progress.step(&format!("install image for {}: {} .deb files, {} KiB", pkg.name, files.len(), total / 1024));
        let debs_img = w.join("debs.img");
        run(
            "mke2fs (debs disk)",
            Command::new("mke2fs")
                .args(["-q", "-t", "ext4", "-d"])
                .arg(&debs)
                .arg(&debs_img)
                .arg(format!("{}K", total / 1024 * 2 + 32 * 1024)),
        )
        .await?;
        let overlay = w.join("install.qcow2");
        strata_vmm::qcow2::create_overlay(&self.store.blob_path(base.file("rootfs")?), "qcow2", &overlay)?;
        let script = format!(
            "set -e; mount -o ro /dev/vdb /mnt; cd /mnt; \
             if ls *.deb >/dev/null 2>&1; then apt-get install -y -q --no-install-recommends \
             -oDpkg::Options::=--force-unsafe-io -oAPT::Sandbox::User=root ./*.deb; fi; \
             cd /; umount /mnt; \
             command -v {prog} >/dev/null || {{ echo 'strata: the package installed no program called {prog}'; exit {NO_PROGRAM}; }}; \
             sync",
            prog = shell_quote(&pkg.def.command[0]),
        );
        progress.step(&format!("install image for {}: installing in a VM", pkg.name));
        let accel = self.accel_for(base).await?;
        let make = |dir: &std::path::Path| {
            let mut cfg = self.boot_config(base, dir, accel, 1024)?;
            cfg.disks = vec![
                Disk { path: overlay.clone(), format: "qcow2", mode: DiskMode::Writable },
                Disk { path: debs_img.clone(), format: "raw", mode: DiskMode::ReadOnly },
            ];
            Ok(cfg)
        };
        let ctx = TerminalContext { term: "dumb".into(), ..Default::default() };
        let mut a = boot_for_build(&self.store, "install-vm", make, || {}, &ctx, Duration::from_secs(120)).await?;
        a.conn
            .send(&HostMsg::Spawn {
                id: MAIN_PROC,
                argv: vec!["/bin/sh".into(), "-c".into(), script],
                env: vec![("DEBIAN_FRONTEND".into(), "noninteractive".into())],
                readiness: Readiness::AliveMs(0),
                ready_timeout_ms: 1000,
            })
            .await?;
        let mut output = Vec::new();
        let mut set_up = 0;
        let status = loop {
            let msg = tokio::time::timeout(Duration::from_secs(1800), a.conn.recv())
                .await
                .map_err(|_| Error::Timeout { what: format!("installing {}", pkg.name), secs: 1800 })??;
            match msg {
                Some(GuestMsg::Output { data, .. }) => {
                    for line in String::from_utf8_lossy(&data).lines() {
                        let line = line.trim();
                        if line.starts_with("Unpacking") || line.starts_with("Setting up") {
                            progress.step(&format!("install image for {}: {line}", pkg.name));
                        }
                        // Each .deb is unpacked, then set up.
                        if line.starts_with("Setting up") {
                            set_up += 1;
                            progress.fraction(set_up, files.len() as u64);
                        }
                    }
                    output.extend_from_slice(&data);
                }
                Some(GuestMsg::Exited { status, .. }) => break status,
                Some(GuestMsg::Failed { reason, .. }) => {
                    return Err(Error::InstallFailed { package: pkg.name.clone(), output: reason })
                }
                Some(_) => {}
                None => return Err(Error::AgentGone("installing")),
            }
        };
        let text = tail(&String::from_utf8_lossy(&output).replace('\r', ""), 40);
        if status != 0 {
            a.vm.kill().await;
            return Err(Error::InstallFailed { package: pkg.name.clone(), output: text });
        }
        a.conn.send(&HostMsg::PowerOff).await?;
        if !a.vm.wait_exit(Duration::from_secs(60)).await {
            a.vm.kill().await;
            return Err(Error::Timeout { what: "the install VM to power off".into(), secs: 60 });
        }
        drop(a);
        rebase_to_digest(&overlay, base.file("rootfs")?).await?;
        let disk = self.store.ingest_file(&overlay)?;
        let rec = ImageRecord::new(
            ImageKind::Install,
            Some(pkg.name.clone()),
            pkg.os.name,
            ARCH,
            Some(base.digest.clone()),
            recipe,
            BTreeMap::from([("disk".to_string(), disk)]),
            BTreeMap::from([
                ("debs".to_string(), pkg.def.all_debs().join(" ")),
                ("deb_files".to_string(), files.len().to_string()),
            ]),
            0,
        );
        let rec = self.record_image(rec)?;
        progress.done(&format!("install image for {} ready ({} KiB)", pkg.name, rec.size / 1024));
        Ok(rec)
    }
}

/// Quotes a word for `/bin/sh`.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
