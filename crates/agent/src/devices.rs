//! Devices the host plugs in after a restore, for one terminal's context:
//! the network interface and the file systems (shared folders, the home
//! disk). They appear a moment after the host's `device_add`, so each step
//! waits for its device, briefly and boundedly.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};
use strata_proto::{GuestMount, GuestNetwork, MountSource};

/// How long a hot-plugged device may take to appear in the guest.
const DEVICE_WAIT: Duration = Duration::from_secs(10);

/// Calls `probe` until it yields a value or [`DEVICE_WAIT`] passes.
fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> Result<T, String> {
    let deadline = Instant::now() + DEVICE_WAIT;
    loop {
        if let Some(v) = probe() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(format!("{what} did not appear within {} s", DEVICE_WAIT.as_secs()));
        }
        // Only sessions whose context asks for devices get here.
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Brings up the plugged network interface with static settings; nothing
/// to do when it is already configured (a re-attach).
pub fn apply_network(net: &GuestNetwork) -> Result<(), String> {
    let name = wait_for("the network interface", || {
        fs::read_dir("/sys/class/net")
            .ok()?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n != "lo")
    })?;
    configure_interface(&name, net).map_err(|e| format!("configuring {name}: {e}"))?;
    if let Some(dns) = net.dns {
        let conf = format!("nameserver {}.{}.{}.{}\n", dns[0], dns[1], dns[2], dns[3]);
        let _ = fs::remove_file("/etc/resolv.conf");
        fs::write("/etc/resolv.conf", conf).map_err(|e| format!("writing /etc/resolv.conf: {e}"))?;
    }
    Ok(())
}

fn sockaddr(ip: [u8; 4]) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(ip) },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads
    // the family to interpret it.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn configure_interface(name: &str, net: &GuestNetwork) -> std::io::Result<()> {
    if name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::other("interface name too long"));
    }
    let mask = if net.prefix_len == 0 { 0 } else { u32::MAX << (32 - net.prefix_len.min(32) as u32) };
    // SAFETY: plain socket/ioctl calls on zeroed structures we own; the
    // socket is closed before returning.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let result = (|| {
            let mut req: libc::ifreq = std::mem::zeroed();
            for (i, b) in name.bytes().enumerate() {
                req.ifr_name[i] = b as libc::c_char;
            }
            let check = |rc: libc::c_int| if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) };
            req.ifr_ifru.ifru_addr = sockaddr(net.address);
            check(libc::ioctl(s, libc::SIOCSIFADDR, &req))?;
            req.ifr_ifru.ifru_netmask = sockaddr(mask.to_be_bytes());
            check(libc::ioctl(s, libc::SIOCSIFNETMASK, &req))?;
            check(libc::ioctl(s, libc::SIOCGIFFLAGS, &mut req))?;
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            check(libc::ioctl(s, libc::SIOCSIFFLAGS, &req))?;
            let mut rt: libc::rtentry = std::mem::zeroed();
            rt.rt_dst = sockaddr([0; 4]);
            rt.rt_genmask = sockaddr([0; 4]);
            rt.rt_gateway = sockaddr(net.gateway);
            rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
            if libc::ioctl(s, libc::SIOCADDRT, &rt) < 0 {
                let e = std::io::Error::last_os_error();
                // A re-attach finds the route already there.
                if e.raw_os_error() != Some(libc::EEXIST) {
                    return Err(e);
                }
            }
            Ok(())
        })();
        libc::close(s);
        result
    }
}

/// The block device whose virtio serial number is `serial`.
fn disk_with_serial(serial: &str) -> Option<String> {
    fs::read_dir("/sys/block").ok()?.flatten().find_map(|e| {
        let s = fs::read_to_string(e.path().join("serial")).ok()?;
        (s.trim() == serial).then(|| format!("/dev/{}", e.file_name().to_string_lossy()))
    })
}

/// Mounts one plugged file system; nothing to do if it is already mounted.
pub fn apply_mount(m: &GuestMount) -> Result<(), String> {
    if !m.path.starts_with('/') || m.path.contains("/../") || m.path.ends_with("/..") {
        return Err(format!("mount point {:?} is not an absolute path", m.path));
    }
    if crate::system::is_mountpoint(&m.path) {
        return Ok(());
    }
    fs::create_dir_all(&m.path).map_err(|e| format!("creating {}: {e}", m.path))?;
    let mut flags = MsFlags::MS_NODEV | MsFlags::MS_NOSUID;
    if m.readonly {
        flags |= MsFlags::MS_RDONLY;
    }
    match &m.source {
        MountSource::Share(tag) => {
            let opts = "trans=virtio,version=9p2000.L,msize=262144,cache=none";
            // The tag is unknown (ENOENT) until the device has probed.
            let r = wait_for(&format!("shared folder {tag}"), || {
                match mount(Some(tag.as_str()), m.path.as_str(), Some("9p"), flags, Some(opts)) {
                    Ok(()) => Some(Ok(())),
                    Err(nix::errno::Errno::ENOENT) => None,
                    Err(e) => Some(Err(format!("mounting shared folder {tag} at {}: {e}", m.path))),
                }
            });
            r?
        }
        MountSource::Disk(serial) => {
            let dev = wait_for(&format!("disk {serial}"), || disk_with_serial(serial))?;
            // Every write reaches the host before it returns: the session may
            // be stopped at any moment and the home must keep what was saved.
            flags |= MsFlags::MS_SYNCHRONOUS | MsFlags::MS_DIRSYNC;
            mount(Some(Path::new(&dev)), m.path.as_str(), Some("ext4"), flags, None::<&str>)
                .map_err(|e| format!("mounting {dev} at {}: {e}", m.path))
        }
    }
}

/// Applies a graphical session's screen size and keyboard layout with
/// xrandr and setxkbmap. It runs in the background (the reaper collects it)
/// and its complaints go to the console log; the names were checked by the
/// host, and are checked again here before they reach a shell.
pub fn apply_display(d: &strata_proto::GuestDisplay) {
    if !Path::new("/tmp/.X11-unix/X0").exists() {
        return;
    }
    let mut script = String::from("export DISPLAY=:0; ");
    if let Some((w, h)) = d.size {
        script.push_str(&strata_proto::screen_size_script(w, h));
    }
    if let Some(k) = &d.keyboard {
        if k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            script.push_str(&format!("setxkbmap {k}; "));
        }
    }
    // What took effect, for whoever wants to check (tests, `strata cp`).
    script.push_str("{ xrandr --current | head -n1; setxkbmap -query; } > /run/strata/display 2>&1");
    if let Err(e) = std::process::Command::new("/bin/sh").args(["-c", &script]).spawn() {
        crate::log(&format!("display settings: {e}"));
    }
}
