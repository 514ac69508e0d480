//! The initramfs: busybox, the virtio modules, strata's `/init` and the agent,
//! as an uncompressed newc archive (the kernel unpacks it fastest that way).

use std::collections::BTreeMap;
use std::path::Path;

use crate::{io_err, Error};

/// Version of the archive's layout (what `build` puts where); part of the
/// base recipe, so a change here builds a new base image.
pub const LAYOUT: &str = "2";

/// The shell script run as `/init`.
pub const INIT_SCRIPT: &str = include_str!("assets/init.sh");

/// Modules loaded at boot, so that they are already in every launch image's
/// memory: the root disk and the host channel, and the devices a terminal's
/// context may hot-plug later (network, shared folders, a home disk) or a
/// graphical package uses (display, tablet).
pub const WANTED_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    // ext4 checksums need crc32c, which ext4 does not name in depends=.
    "crc32c_generic",
    "ext4",
    "virtio_net",
    "9pnet_virtio",
    "9p",
    "bochs",
    "virtio_input",
    "evdev",
];

/// A newc cpio archive being written in memory.
#[derive(Default)]
pub struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry_dev(name, mode, data, (0, 0));
    }

    fn entry_dev(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.ino += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[]);
    }

    /// A character device node.
    pub fn char_dev(&mut self, name: &str, mode: u32, major: u32, minor: u32) {
        self.entry_dev(name, 0o020000 | mode, &[], (major, minor));
    }

    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, 0o100000 | mode, data);
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}

/// The `depends=` list from a module's `.modinfo` section.
fn module_depends(ko: &[u8]) -> Vec<String> {
    let key = b"depends=";
    let Some(pos) = ko.windows(key.len()).position(|w| w == key) else {
        return Vec::new();
    };
    let rest = &ko[pos + key.len()..];
    let end = rest.iter().position(|b| *b == 0).unwrap_or(0);
    String::from_utf8_lossy(&rest[..end]).split(',').filter(|s| !s.is_empty()).map(str::to_string).collect()
}

/// Finds `WANTED_MODULES` and their dependencies under `modules_root`
/// (`lib/modules/VERSION`), in load order; those built into the kernel
/// (`modules.builtin`: e.g. virtio_pci since Debian 13's) are left out.
///
/// # Errors
/// If a module cannot be found or read.
pub fn resolve_modules(modules_root: &Path) -> Result<Vec<(String, Vec<u8>)>, Error> {
    let builtin: std::collections::BTreeSet<String> = std::fs::read_to_string(modules_root.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next()?.strip_suffix(".ko").map(|n| n.replace('-', "_")))
        .collect();
    let mut index: BTreeMap<String, std::path::PathBuf> = BTreeMap::new();
    let mut stack = vec![modules_root.join("kernel")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).map_err(io_err(&dir))?.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(name) = p.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".ko")) {
                index.insert(name.replace('-', "_"), p);
            }
        }
    }
    let mut order: Vec<(String, Vec<u8>)> = Vec::new();
    fn visit(
        name: &str,
        index: &BTreeMap<String, std::path::PathBuf>,
        builtin: &std::collections::BTreeSet<String>,
        order: &mut Vec<(String, Vec<u8>)>,
        depth: u32,
    ) -> Result<(), Error> {
        if order.iter().any(|(n, _)| n == name) || depth > 32 || builtin.contains(name) {
            return Ok(());
        }
        let path = index.get(name).ok_or_else(|| Error::Config(format!("kernel module {name} not found")))?;
        let data = std::fs::read(path).map_err(io_err(path))?;
        for dep in module_depends(&data) {
            visit(&dep, index, builtin, order, depth + 1)?;
        }
        order.push((name.to_string(), data));
        Ok(())
    }
    for m in WANTED_MODULES {
        visit(m, &index, &builtin, &mut order, 0)?;
    }
    Ok(order)
}

/// Builds the initramfs archive.
pub fn build(busybox: &[u8], agent: &[u8], modules: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut c = Cpio::default();
    // The kernel opens /dev/console for init before /init mounts devtmpfs:
    // without this node PID 1 (the agent) would have no stdout or stderr,
    // and its log would never reach the console log on the host.
    c.dir("dev");
    c.char_dev("dev/console", 0o600, 5, 1);
    c.dir("bin");
    c.file("bin/busybox", 0o755, busybox);
    c.file("init", 0o755, INIT_SCRIPT.as_bytes());
    c.file("strata-agent", 0o755, agent);
    c.dir("modules");
    let order: Vec<&str> = modules.iter().map(|(n, _)| n.as_str()).collect();
    c.file("modules/order", 0o644, format!("{}\n", order.join("\n")).as_bytes());
    for (name, data) in modules {
        c.file(&format!("modules/{name}.ko"), 0o644, data);
    }
    c.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_are_read_from_modinfo() {
        let ko = b"\x00license=GPL\x00depends=virtio_ring,virtio\x00intree=Y\x00";
        assert_eq!(module_depends(ko), vec!["virtio_ring", "virtio"]);
        assert!(module_depends(b"depends=\x00").is_empty());
    }

    #[test]
    fn cpio_entries_are_aligned_and_terminated() {
        let mut c = Cpio::default();
        c.file("a", 0o644, b"xyz");
        let out = c.finish();
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        assert!(out.windows(10).any(|w| w == b"TRAILER!!!"));
    }
}
