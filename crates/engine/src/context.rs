//! Context images: a terminal's settings, content-addressed like every image.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use strata_proto::{GuestMount, GuestNetwork, MountSource, TerminalContext, WinSize};
use strata_store::{ImageKind, ImageRecord};

use crate::{Engine, Error, ARCH};

/// The OS tag of context images: a context is of no OS (the same settings
/// serve a session of any).
const CONTEXT_OS: &str = "any";

/// The settings of one terminal, as stored in its context image.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ContextSettings {
    pub term: String,
    pub rows: u16,
    pub cols: u16,
    pub timezone: Option<String>,
    pub locale: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// None by default: the VM has no network device at all.
    #[serde(default)]
    pub network: NetworkSettings,
    /// Folders of the terminal's side shared into the VM.
    #[serde(default)]
    pub shares: Vec<Share>,
    /// The terminal whose persistent home is mounted at [`HOME_PATH`].
    #[serde(default)]
    pub home: Option<String>,
    /// Screen size of graphical sessions (`WIDTHxHEIGHT`); `None` keeps the VM's.
    #[serde(default)]
    pub screen: Option<Resolution>,
    /// Keyboard layout of graphical sessions (an XKB layout such as `de`).
    #[serde(default)]
    pub keyboard: Option<String>,
    /// The OS a launch from this terminal gets when it names none (`None`:
    /// the server's default). Not serialized when unset, so the digests of
    /// existing context images stay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
}

/// A screen size in pixels.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Resolution {
    pub width: u16,
    pub height: u16,
}

/// Screen sizes the VM's display can show (its 32 MiB of video memory).
impl Resolution {
    /// Refuses a size out of the range a guest display is given.
    ///
    /// # Errors
    /// Naming the range.
    pub fn check(&self) -> Result<(), String> {
        if WIDTHS.contains(&self.width) && HEIGHTS.contains(&self.height) {
            return Ok(());
        }
        Err(format!(
            "screen size {}x{} is out of range ({}x{} to {}x{})",
            self.width,
            self.height,
            WIDTHS.start(),
            HEIGHTS.start(),
            WIDTHS.end(),
            HEIGHTS.end()
        ))
    }
}

impl Resolution {
    /// The size the guest's display is set to: the width rounded down to
    /// 16 pixels, so its rows (4 bytes a pixel) need no padding to the 64
    /// bytes its driver aligns them to (a viewer resized live showed padded
    /// rows as a sheared picture).
    pub fn for_display(&self) -> (u16, u16) {
        (self.width - self.width % 16, self.height)
    }
}

const WIDTHS: std::ops::RangeInclusive<u16> = 640..=2560;
const HEIGHTS: std::ops::RangeInclusive<u16> = 480..=1600;

impl std::str::FromStr for Resolution {
    type Err = String;
    /// `WIDTHxHEIGHT`, e.g. `1280x800`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a screen size; write WIDTHxHEIGHT, e.g. 1280x800");
        let (w, h) = s.split_once('x').ok_or_else(bad)?;
        Ok(Resolution { width: w.parse().map_err(|_| bad())?, height: h.parse().map_err(|_| bad())? })
    }
}

/// XKB keyboard layouts a context may name (those of Debian's xkb-data
/// most people use; the guest checks nothing else reaches its shell).
pub const KEYBOARD_LAYOUTS: &[&str] = &[
    "us", "gb", "de", "fr", "es", "it", "pt", "br", "nl", "be", "ch", "at", "dk", "no", "se", "fi", "is", "ie", "pl",
    "cz", "sk", "hu", "si", "hr", "rs", "ro", "bg", "gr", "tr", "ru", "ua", "by", "lt", "lv", "ee", "il", "ara", "ir",
    "in", "jp", "kr", "cn", "tw", "th", "vn", "ca", "latam", "mx", "au", "nz", "za",
];

/// Where the persistent home appears in the guest.
pub const HOME_PATH: &str = "/root";
/// The home disk's serial number, by which the guest agent finds it.
pub const HOME_SERIAL: &str = "strata-home";
/// At most this many shared folders and port forwards per context.
const MAX_SHARES: usize = 16;
// Shares, a network and a home must fit the VM's slots for plugged devices.
const _: () = assert!(MAX_SHARES + 2 <= strata_vmm::MAX_PLUGS);
const MAX_PORTS: usize = 32;

/// The VM's network: user-mode NAT, port forwards from the terminal's side.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct NetworkSettings {
    /// The guest may open connections out.
    #[serde(default)]
    pub outbound: bool,
    /// Ports of the host (on 127.0.0.1) forwarded into the guest.
    #[serde(default)]
    pub ports: Vec<PortForward>,
}

impl NetworkSettings {
    /// Whether the VM gets a network device.
    pub fn enabled(&self) -> bool {
        self.outbound || !self.ports.is_empty()
    }
}

/// A TCP port of the host forwarded to one of the guest.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PortForward {
    pub host: u16,
    pub guest: u16,
}

impl std::str::FromStr for PortForward {
    type Err = String;
    /// `HOST:GUEST`, as in `docker run -p 8080:80`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a port forward; write HOST:GUEST, e.g. 8080:80");
        let (h, g) = s.split_once(':').ok_or_else(bad)?;
        let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad);
        Ok(PortForward { host: port(h)?, guest: port(g)? })
    }
}

/// A folder of the terminal's side shared into the VM.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Share {
    /// The folder on the host (absolute).
    pub host: PathBuf,
    /// Where it appears in the guest (absolute).
    pub guest: String,
    #[serde(default)]
    pub readonly: bool,
}

impl std::str::FromStr for Share {
    type Err = String;
    /// `HOST:GUEST[:ro|:rw]`, as in `docker run -v`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a shared folder; write HOST_DIR:GUEST_DIR[:ro], e.g. /srv/data:/data:ro");
        let parts: Vec<&str> = s.split(':').collect();
        let (host, guest, readonly) = match parts.as_slice() {
            [h, g] => (h, g, false),
            [h, g, "ro"] => (h, g, true),
            [h, g, "rw"] => (h, g, false),
            _ => return Err(bad()),
        };
        if host.is_empty() || guest.is_empty() {
            return Err(bad());
        }
        Ok(Share { host: PathBuf::from(host), guest: guest.to_string(), readonly })
    }
}

/// Guest paths a share or the home must not cover: the system itself.
const SYSTEM_PATHS: &[&str] =
    &["/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/run", "/sbin", "/sys", "/usr", "/var"];

fn check_guest_path(p: &str) -> Result<(), String> {
    if !p.starts_with('/') || p.len() > 256 {
        return Err(format!("guest path {p:?} must be absolute (and under 256 bytes)"));
    }
    if p.split('/').any(|c| c == ".." || c == ".") || p.contains("//") || p.contains('\0') || p.contains(',') {
        return Err(format!("guest path {p:?} must be a plain path, without '.', '..', '//' or ','"));
    }
    let trimmed = p.trim_end_matches('/');
    if SYSTEM_PATHS.contains(&trimmed) || SYSTEM_PATHS.contains(&p) || trimmed == HOME_PATH {
        return Err(format!("guest path {p:?} would hide part of the system; choose e.g. /mnt/NAME"));
    }
    Ok(())
}

/// Checks a terminal's name (it names its home on disk).
/// Checks one environment variable given to a guest program.
///
/// # Errors
/// What is wrong with it.
pub fn check_env(name: &str, value: &str) -> Result<(), String> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!("environment name {name:?} is not valid (letters, digits and _ only)"));
    }
    if value.contains('\0') {
        return Err(format!("the value of environment variable {name} contains NUL"));
    }
    Ok(())
}

pub fn check_terminal_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 64
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        || name.starts_with('.')
    {
        return Err(format!("terminal name {name:?} must be 1 to 64 letters, digits, '-', '_' or '.'"));
    }
    Ok(())
}

impl ContextSettings {
    /// The OS a launch with this context gets when the request names none.
    pub fn os_or(&self, default: crate::Os) -> crate::Os {
        self.os.as_deref().and_then(|o| crate::Os::named(o).ok()).unwrap_or(default)
    }

    /// The settings of the terminal this process runs in (or sane defaults).
    pub fn from_terminal(size: Option<WinSize>) -> ContextSettings {
        let size = size.unwrap_or_default();
        let timezone = std::env::var("TZ").ok().filter(|s| !s.is_empty()).or_else(|| {
            std::fs::read_to_string("/etc/timezone").ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
        });
        let locale = std::env::var("LC_ALL")
            .or_else(|_| std::env::var("LANG"))
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "C.UTF-8".into());
        ContextSettings {
            term: std::env::var("TERM").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "xterm-256color".into()),
            rows: size.rows,
            cols: size.cols,
            timezone,
            locale: Some(locale),
            env: BTreeMap::new(),
            network: NetworkSettings::default(),
            shares: Vec::new(),
            home: None,
            screen: None,
            keyboard: None,
            os: None,
        }
    }

    /// Whether the VM needs devices plugged in for this context.
    pub fn needs_devices(&self) -> bool {
        self.network.enabled() || !self.shares.is_empty() || self.home.is_some()
    }

    /// Checks every field.
    ///
    /// # Errors
    /// [`Error::Config`] naming the first bad field.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::Config(format!("context: {m}")));
        if self.term.is_empty()
            || self.term.len() > 64
            || !self.term.chars().all(|c| c.is_ascii_alphanumeric() || "-_.+".contains(c))
        {
            return bad(format!("terminal type {:?} is not valid", self.term));
        }
        if !(1..=1000).contains(&self.rows) || !(1..=1000).contains(&self.cols) {
            return bad(format!("terminal size {}x{} is out of range 1..1000", self.cols, self.rows));
        }
        if let Some(tz) = &self.timezone {
            if tz.is_empty()
                || tz.contains("..")
                || !tz.chars().all(|c| c.is_ascii_alphanumeric() || "/_+-".contains(c))
            {
                return bad(format!("time zone {tz:?} is not a zone name like Europe/Paris"));
            }
        }
        if let Some(os) = &self.os {
            if let Err(e) = crate::Os::named(os) {
                return bad(e.to_string());
            }
        }
        if let Some(l) = &self.locale {
            if l.is_empty() || !l.chars().all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c)) {
                return bad(format!("locale {l:?} is not a locale name like C.UTF-8"));
            }
        }
        for (k, v) in &self.env {
            check_env(k, v).map_err(|m| Error::Config(format!("context: {m}")))?;
        }
        if self.network.ports.len() > MAX_PORTS {
            return bad(format!("{} port forwards; at most {MAX_PORTS}", self.network.ports.len()));
        }
        let mut hosts = std::collections::BTreeSet::new();
        for p in &self.network.ports {
            if p.host == 0 || p.guest == 0 {
                return bad("port 0 cannot be forwarded".into());
            }
            // The forward is bound by the VM's QEMU, which runs unprivileged.
            if p.host < 1024 {
                return bad(format!(
                    "host port {} is a privileged port: forward a host port from 1024 to 65535 (e.g. {}:{})",
                    p.host,
                    u32::from(p.host) + 8000,
                    p.guest
                ));
            }
            if !hosts.insert(p.host) {
                return bad(format!("host port {} is forwarded twice", p.host));
            }
        }
        if self.shares.len() > MAX_SHARES {
            return bad(format!("{} shared folders; at most {MAX_SHARES}", self.shares.len()));
        }
        let mut guests = std::collections::BTreeSet::new();
        for sh in &self.shares {
            if !sh.host.is_absolute() {
                return bad(format!("shared folder {} must be an absolute path", sh.host.display()));
            }
            check_guest_path(&sh.guest).or_else(bad)?;
            if !guests.insert(sh.guest.trim_end_matches('/')) {
                return bad(format!("two shared folders appear at {}", sh.guest));
            }
        }
        if let Some(t) = &self.home {
            check_terminal_name(t).or_else(bad)?;
        }
        if let Some(r) = self.screen {
            r.check().or_else(bad)?;
        }
        if let Some(k) = &self.keyboard {
            if !KEYBOARD_LAYOUTS.contains(&k.as_str()) {
                return bad(format!("keyboard layout {k:?} is unknown; known: {}", KEYBOARD_LAYOUTS.join(" ")));
            }
        }
        Ok(())
    }

    /// Checks what depends on this host: each shared folder exists, is a
    /// directory and lies inside one of `roots` (after resolving symlinks).
    ///
    /// # Errors
    /// [`Error::Config`] naming the folder and what to do.
    pub fn check_on_host(&self, roots: &[PathBuf]) -> Result<(), Error> {
        for sh in &self.shares {
            let real = std::fs::canonicalize(&sh.host).map_err(|e| {
                Error::Config(format!("context: shared folder {} cannot be used: {e}", sh.host.display()))
            })?;
            if !real.is_dir() {
                return Err(Error::Config(format!("context: shared folder {} is not a directory", sh.host.display())));
            }
            let inside = roots.iter().filter_map(|r| std::fs::canonicalize(r).ok()).any(|r| real.starts_with(&r));
            if !inside {
                let list: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
                return Err(Error::Config(format!(
                    "context: shared folder {} lies outside the folders this server shares ({}); \
                     move it there or start the server with --share-root",
                    sh.host.display(),
                    if list.is_empty() { "none".to_string() } else { list.join(", ") }
                )));
            }
        }
        Ok(())
    }

    /// The 9p tag of the `i`th shared folder.
    pub fn share_tag(i: usize) -> String {
        format!("share{i}")
    }

    /// What the agent applies at launch: the console context plus the
    /// devices plugged in for it.
    pub fn launch_context(&self) -> TerminalContext {
        let mut ctx = self.to_terminal_context();
        if self.network.enabled() {
            ctx.network = Some(GuestNetwork {
                address: strata_vmm::USER_NET_GUEST,
                prefix_len: 24,
                gateway: strata_vmm::USER_NET_GATEWAY,
                dns: self.network.outbound.then_some(strata_vmm::USER_NET_DNS),
            });
        }
        for (i, sh) in self.shares.iter().enumerate() {
            ctx.mounts.push(GuestMount {
                source: MountSource::Share(Self::share_tag(i)),
                path: sh.guest.clone(),
                readonly: sh.readonly,
            });
        }
        if self.home.is_some() {
            ctx.mounts.push(GuestMount {
                source: MountSource::Disk(HOME_SERIAL.into()),
                path: HOME_PATH.into(),
                readonly: false,
            });
        }
        ctx
    }

    /// What the agent applies on every attach (console, clock, zone,
    /// environment), with the current time. Devices are plugged only at
    /// launch ([`Self::launch_context`]) and stay for the session.
    pub fn to_terminal_context(&self) -> TerminalContext {
        TerminalContext {
            term: self.term.clone(),
            size: WinSize { rows: self.rows, cols: self.cols },
            timezone: self.timezone.clone(),
            locale: self.locale.clone(),
            env: self.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            unix_time_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            network: None,
            mounts: Vec::new(),
            request_id: crate::request_id(),
            display: (self.screen.is_some() || self.keyboard.is_some()).then(|| strata_proto::GuestDisplay {
                size: self.screen.map(|r| r.for_display()),
                keyboard: self.keyboard.clone(),
            }),
        }
    }
}

/// Resolves a path relative to the current directory, for CLI arguments.
pub fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().map(|d| d.join(p)).unwrap_or_else(|_| p.to_path_buf())
    }
}

/// A terminal's stored context: its current context image and the ones
/// before it, oldest first (each change makes a new, content-addressed one).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct TerminalRecord {
    pub current: String,
    pub history: Vec<String>,
}

impl TerminalRecord {
    /// The current context's version number (1 for the first).
    pub fn version(&self) -> usize {
        self.history.len()
    }
}

impl Engine {
    fn terminal_path(&self, terminal: &str) -> Result<std::path::PathBuf, Error> {
        check_terminal_name(terminal).map_err(Error::Config)?;
        Ok(self.cfg.state_dir.join("terminals").join(format!("{terminal}.json")))
    }

    /// A terminal's stored context, if it has one.
    ///
    /// # Errors
    /// If the record or its context image cannot be read.
    pub fn terminal_context(&self, terminal: &str) -> Result<Option<(TerminalRecord, ContextSettings)>, Error> {
        let path = self.terminal_path(terminal)?;
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::Io { path, source: e }),
        };
        let rec: TerminalRecord = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Config(format!("{} is damaged ({e}); remove it to start afresh", path.display())))?;
        let image = self
            .store
            .image(&rec.current)?
            .ok_or_else(|| Error::Config(format!("terminal {terminal}: context image {} is gone", rec.current)))?;
        let blob = self.store.blob_path(image.file("context")?);
        let settings = serde_json::from_slice(&std::fs::read(&blob).map_err(crate::io_err(&blob))?)
            .map_err(|e| Error::Config(format!("context image {} does not parse: {e}", rec.current)))?;
        Ok(Some((rec, settings)))
    }

    /// Makes `settings` the terminal's context: a new version if they
    /// changed, the same one otherwise. Nothing changes if they are invalid.
    ///
    /// # Errors
    /// If the settings are invalid for this host or the store fails.
    pub fn set_terminal_context(
        &self,
        terminal: &str,
        settings: &ContextSettings,
    ) -> Result<(TerminalRecord, ImageRecord), Error> {
        let path = self.terminal_path(terminal)?;
        settings.check_on_host(&self.cfg.share_roots)?;
        let image = self.context_image(settings)?;
        let mut rec = self.terminal_context(terminal)?.map(|(r, _)| r).unwrap_or_default();
        if rec.current != image.digest {
            rec.current = image.digest.clone();
            rec.history.push(image.digest.clone());
            let dir = path.parent().expect("terminals dir");
            std::fs::create_dir_all(dir).map_err(crate::io_err(dir))?;
            crate::write_atomic(&path, &serde_json::to_vec_pretty(&rec).expect("serializes"))?;
        }
        Ok((rec, image))
    }

    /// Stores the settings as a context image, reusing an identical one.
    ///
    /// # Errors
    /// If the settings are invalid or the store fails.
    pub fn context_image(&self, settings: &ContextSettings) -> Result<ImageRecord, Error> {
        settings.validate()?;
        let json = serde_json::to_vec(settings).expect("settings serialize");
        let recipe = strata_store::sha256_hex(&json);
        if let Some(rec) = self.usable(ImageKind::Context, &recipe)? {
            return Ok(rec);
        }
        let blob = self.store.ingest_bytes(&json)?;
        let rec = ImageRecord::new(
            ImageKind::Context,
            None,
            CONTEXT_OS,
            ARCH,
            None,
            &recipe,
            BTreeMap::from([("context".to_string(), blob)]),
            BTreeMap::new(),
            json.len() as u64,
        );
        self.store.insert_image(&rec)?;
        Ok(rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> ContextSettings {
        ContextSettings {
            term: "xterm".into(),
            rows: 24,
            cols: 80,
            timezone: Some("Europe/Paris".into()),
            locale: Some("C.UTF-8".into()),
            env: BTreeMap::new(),
            network: NetworkSettings::default(),
            shares: Vec::new(),
            home: None,
            screen: None,
            keyboard: None,
            os: None,
        }
    }

    #[test]
    fn a_display_is_a_multiple_of_16_pixels_wide() {
        assert_eq!(Resolution { width: 1144, height: 801 }.for_display(), (1136, 801));
        assert_eq!(Resolution { width: 1152, height: 800 }.for_display(), (1152, 800));
    }

    #[test]
    fn settings_are_validated() {
        assert!(ok().validate().is_ok());
        type Mutation = Box<dyn Fn(&mut ContextSettings)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|s| s.rows = 0), "size"),
            (Box::new(|s| s.cols = 5000), "size"),
            (Box::new(|s| s.timezone = Some("../../etc/passwd".into())), "time zone"),
            (Box::new(|s| s.term = "x term".into()), "terminal type"),
            (Box::new(|s| s.locale = Some("en US".into())), "locale"),
            (Box::new(|s| s.screen = Some(Resolution { width: 100, height: 800 })), "screen size"),
            (Box::new(|s| s.screen = Some(Resolution { width: 1280, height: 9000 })), "screen size"),
            (Box::new(|s| s.keyboard = Some("klingon".into())), "keyboard layout"),
            (Box::new(|s| s.keyboard = Some("de; rm -rf /".into())), "keyboard layout"),
            (
                Box::new(|s| {
                    s.env.insert("A=B".into(), "c".into());
                }),
                "environment",
            ),
        ];
        for (mutate, want) in cases {
            let mut s = ok();
            mutate(&mut s);
            let err = s.validate().unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} lacks {want:?}");
        }
    }
}
