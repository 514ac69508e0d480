//! The base image: Debian's root file system, kernel and strata's initramfs.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use strata_store::{ImageKind, ImageRecord};
use tokio::process::Command;

use crate::tools::{run, run_with_progress};
use crate::{initramfs, io_err, Engine, Error, Os, Progress, ARCH};
/// Debian package whose kernel the guests run.
/// The generic kernel: the cloud flavour lacks 9p (shared folders) and DRM
/// (graphical packages).
pub const KERNEL_PACKAGE: &str = "linux-image-amd64";
/// Static busybox from Debian's busybox-static, the initramfs's only tool.
pub const BUSYBOX: &str = "/bin/busybox";
/// Size of the root file system (sparse: only what is used is stored).
pub const ROOTFS_SIZE: &str = "8G";
/// Kernel command line of every strata guest.
pub const CMDLINE: &str = "console=ttyS0 quiet loglevel=3 panic=-1 tsc=reliable no_timer_check psi=0";

fn sha_hex(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    hex::encode(h.finalize())
}

/// Identity of a file by size and modification time (cheap, for recipes of
/// host tools that change only on upgrade).
pub(crate) fn file_identity(path: &Path) -> String {
    std::fs::metadata(path).map(|m| format!("{}:{}", m.len(), m.mtime())).unwrap_or_default()
}

/// Recipe of `os`'s root file system alone: reused when only the agent
/// changes.
pub fn rootfs_recipe(os: Os) -> String {
    sha_hex(&[b"rootfs-v1", os.suite.as_bytes(), b"minbase"])
}

impl Engine {
    fn agent_bytes(&self) -> Result<Vec<u8>, Error> {
        let p = &self.cfg.agent_binary;
        if !p.is_file() {
            return Err(Error::NoAgent(p.clone()));
        }
        std::fs::read(p).map_err(io_err(p))
    }

    /// Recipe of `os`'s base image: root file system, kernel package, init
    /// script, agent and busybox.
    ///
    /// # Errors
    /// If the agent binary is missing.
    pub fn base_recipe(&self, os: Os) -> Result<String, Error> {
        if let Some(r) = crate::lock(&self.base_recipes).get(os.name) {
            return Ok(r.clone());
        }
        let agent = Sha256::digest(self.agent_bytes()?);
        let recipe = sha_hex(&[
            b"base-v1",
            rootfs_recipe(os).as_bytes(),
            KERNEL_PACKAGE.as_bytes(),
            initramfs::WANTED_MODULES.join(",").as_bytes(),
            initramfs::LAYOUT.as_bytes(),
            CMDLINE.as_bytes(),
            initramfs::INIT_SCRIPT.as_bytes(),
            &agent,
            file_identity(Path::new(BUSYBOX)).as_bytes(),
        ]);
        crate::lock(&self.base_recipes).insert(os.name, recipe.clone());
        Ok(recipe)
    }

    /// `os`'s base image, built if the catalog has none for the current
    /// recipe.
    ///
    /// # Errors
    /// If building fails.
    pub async fn ensure_base(&self, os: Os, progress: &dyn Progress) -> Result<ImageRecord, Error> {
        let recipe = self.base_recipe(os)?;
        if let Some(rec) = self.find_image(ImageKind::Base, &recipe).await? {
            return Ok(rec);
        }
        let _lock = self.store.lock_recipe(&recipe)?;
        if let Some(rec) = self.find_image(ImageKind::Base, &recipe).await? {
            return Ok(rec);
        }
        let rec = self.counted(ImageKind::Base, self.build_base(os, &recipe, progress)).await?;
        self.share(&rec).await;
        Ok(rec)
    }

    async fn build_base(&self, os: Os, recipe: &str, progress: &dyn Progress) -> Result<ImageRecord, Error> {
        let work = self.store.work_dir("base")?;
        progress.step(&format!("base image of {os}: preparing"));
        let (rootfs, status) = match self.reusable_rootfs(os)? {
            Some(found) => found,
            None => self.build_rootfs(os, work.path(), progress).await?,
        };
        let (kernel, kernel_version, modules) = self.fetch_kernel(os, work.path(), progress).await?;
        progress.step("base image: initramfs");
        let busybox = std::fs::read(BUSYBOX).map_err(io_err(Path::new(BUSYBOX)))?;
        if !is_static_elf(&busybox) {
            return Err(Error::Config(format!("{BUSYBOX} is dynamically linked; install busybox-static")));
        }
        let image = initramfs::build(&busybox, &self.agent_bytes()?, &modules);
        let initramfs = self.store.ingest_bytes(&image)?;
        let files = BTreeMap::from([
            ("rootfs".to_string(), rootfs),
            ("dpkg-status".to_string(), status),
            ("kernel".to_string(), kernel),
            ("initramfs".to_string(), initramfs),
        ]);
        let meta = BTreeMap::from([
            ("rootfs_recipe".to_string(), rootfs_recipe(os)),
            ("kernel_version".to_string(), kernel_version),
            ("cmdline".to_string(), CMDLINE.to_string()),
            ("suite".to_string(), os.suite.to_string()),
        ]);
        let rec = ImageRecord::new(ImageKind::Base, None, os.name, ARCH, None, recipe, files, meta, 0);
        let rec = self.record_image(rec)?;
        progress.done(&format!("base image {} ready", &rec.digest[..12]));
        Ok(rec)
    }

    /// Records a built image in the catalog, with the sizes of its blobs
    /// summed; its blobs must already be in the store.
    pub(crate) fn record_image(&self, mut rec: ImageRecord) -> Result<ImageRecord, Error> {
        let digests: Vec<&str> = rec.files.values().map(String::as_str).collect();
        rec.size = self.blobs_size(&digests)?;
        self.store.insert_image(&rec)?;
        Ok(rec)
    }

    fn blobs_size(&self, digests: &[&str]) -> Result<u64, Error> {
        let mut total = 0;
        for d in digests {
            let p = self.store.blob_path(d);
            total += std::fs::metadata(&p).map_err(io_err(&p))?.len();
        }
        Ok(total)
    }

    /// A root file system of `os`'s current recipe from an earlier base image.
    fn reusable_rootfs(&self, os: Os) -> Result<Option<(String, String)>, Error> {
        let want = rootfs_recipe(os);
        for rec in self.store.list_images()? {
            if rec.kind == ImageKind::Base && rec.meta.get("rootfs_recipe") == Some(&want) {
                let (Ok(r), Ok(s)) = (rec.file("rootfs"), rec.file("dpkg-status")) else {
                    continue;
                };
                if self.store.verify(r).is_ok() && self.store.verify(s).is_ok() {
                    return Ok(Some((r.to_string(), s.to_string())));
                }
            }
        }
        Ok(None)
    }

    async fn build_rootfs(&self, os: Os, work: &Path, progress: &dyn Progress) -> Result<(String, String), Error> {
        let tree = work.join("rootfs");
        progress.step(&format!("base image of {os}: mmdebstrap (Debian {} minbase)", os.suite));
        run_with_progress(
            "mmdebstrap",
            Command::new("mmdebstrap")
                .args(["--variant=minbase", "--mode=root", "--verbose", os.suite])
                .arg(&tree)
                .arg(&self.cfg.mirror),
            progress,
        )
        .await?;
        let status = work.join("dpkg-status");
        std::fs::copy(tree.join("var/lib/dpkg/status"), &status).map_err(io_err(&status))?;
        progress.step("base image: ext4 file system");
        let raw = work.join("rootfs.raw");
        run(
            "mke2fs",
            Command::new("mke2fs")
                .args(["-q", "-t", "ext4", "-L", "strata-root", "-E", "lazy_itable_init=0", "-d"])
                .arg(&tree)
                .arg(&raw)
                .arg(ROOTFS_SIZE),
        )
        .await?;
        let _ = std::fs::remove_dir_all(&tree);
        let qcow = work.join("rootfs.qcow2");
        progress.step("base image: qcow2");
        run("qemu-img convert", Command::new("qemu-img").args(["convert", "-q", "-O", "qcow2"]).arg(&raw).arg(&qcow))
            .await?;
        let _ = std::fs::remove_file(&raw);
        Ok((self.store.ingest_file(&qcow)?, self.store.ingest_file(&status)?))
    }

    async fn fetch_kernel(
        &self,
        os: Os,
        work: &Path,
        progress: &dyn Progress,
    ) -> Result<(String, String, Vec<(String, Vec<u8>)>), Error> {
        progress.step(&format!("base image of {os}: downloading {KERNEL_PACKAGE}"));
        let apt = crate::apt::options_async(&self.cfg.state_dir, &self.cfg.mirror, os, true).await?;
        let deps =
            run("apt-cache depends", Command::new("apt-cache").args(&apt).args(["depends", KERNEL_PACKAGE])).await?;
        let versioned = deps
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|d| d.starts_with("linux-image-"))
            .ok_or_else(|| {
                Error::Config(format!("cannot find the kernel package {KERNEL_PACKAGE} depends on; run apt-get update"))
            })?
            .to_string();
        let dl = work.join("kernel");
        std::fs::create_dir_all(&dl).map_err(io_err(&dl))?;
        run(
            "apt-get download",
            Command::new("apt-get")
                .args(&apt)
                .args(["-q", "-o", "APT::Sandbox::User=root", "download", &versioned])
                .current_dir(&dl),
        )
        .await?;
        let deb = std::fs::read_dir(&dl)
            .map_err(io_err(&dl))?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .ok_or_else(|| Error::Config(format!("apt-get download {versioned} produced no .deb")))?;
        let tree = dl.join("x");
        run("dpkg-deb", Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree)).await?;
        let version = versioned.trim_start_matches("linux-image-").to_string();
        let vmlinuz: PathBuf = tree.join(format!("boot/vmlinuz-{version}"));
        // Under /lib until Debian 12, /usr/lib since.
        let modules_root = ["lib", "usr/lib"]
            .iter()
            .map(|d| tree.join(format!("{d}/modules/{version}")))
            .find(|p| p.is_dir())
            .ok_or_else(|| Error::Config(format!("{versioned} holds no modules directory")))?;
        // Debian 13 ships its modules xz-compressed; the initramfs loads them plain.
        run(
            "xz (kernel modules)",
            Command::new("find").arg(&modules_root).args(["-name", "*.ko.xz", "-exec", "xz", "-d", "-q", "{}", "+"]),
        )
        .await?;
        let modules = initramfs::resolve_modules(&modules_root)?;
        let kernel = self.store.ingest_file(&vmlinuz)?;
        let _ = std::fs::remove_dir_all(&dl);
        Ok((kernel, version, modules))
    }
}

/// Whether an ELF executable has no program interpreter (is statically linked).
fn is_static_elf(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u64_at = |o: usize| elf.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize);
    if !elf.starts_with(b"\x7fELF") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return false;
    };
    (0..phnum).all(|i| {
        let at = phoff + i * phentsize;
        elf.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes"))) != Some(PT_INTERP)
    })
}

#[cfg(test)]
mod tests {
    use super::is_static_elf;

    #[test]
    fn static_and_dynamic_executables_are_told_apart() {
        assert!(!is_static_elf(b"not an elf"));
        // The test binary itself is dynamically linked.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(!is_static_elf(&me));
    }
}
