//! Package definitions.
//!
//! A package is what a terminal asks for by name: the Debian packages to
//! install, the command to launch and how to tell it is ready. Definitions
//! live as small TOML files (`packages/NAME.toml`); any Debian package whose
//! main executable carries the package's name works without one, through
//! [`Package::derived`]. See `docs/packages.md` for the format.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Errors reading, validating or resolving packages.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading package definition {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("package definition {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("package definition {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{0:?} is not a valid package name: use lower-case letters, digits and + - . (2 to 63 characters, starting with a letter or digit)")]
    BadName(String),
    #[error("no package {name:?}{}", suggestions_text(.suggestions))]
    NotFound { name: String, suggestions: Vec<String> },
    #[error("{0:?} is not an operating system strata knows: use one of {known}", known = os_names())]
    UnknownOs(String),
    #[error("package {name} is not made for {os}: {}", others_text(.others))]
    NotOnOs { name: String, os: String, others: Vec<String> },
}

fn others_text(others: &[String]) -> String {
    if others.is_empty() {
        "no operating system strata knows has it".into()
    } else {
        format!("ask for it on {} (--os, or `os` in the API)", others.join(" or "))
    }
}

/// An operating system guests run: a Debian release, built from Debian's
/// packages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Os {
    /// strata's name for it, in images, sessions, homes and requests.
    pub name: &'static str,
    /// Debian's suite (the name its archive uses).
    pub suite: &'static str,
}

/// The operating systems strata builds images of; the first is the default.
pub const OSES: &[Os] = &[Os { name: "debian-12", suite: "bookworm" }, Os { name: "debian-13", suite: "trixie" }];

/// The OS used when nothing chooses one (`STRATA_OS` may choose another).
pub const DEFAULT_OS: Os = OSES[0];

fn os_names() -> String {
    OSES.iter().map(|o| o.name).collect::<Vec<_>>().join(", ")
}

impl Os {
    /// The OS called `name`.
    ///
    /// # Errors
    /// [`Error::UnknownOs`], listing the known ones.
    pub fn named(name: &str) -> Result<Os, Error> {
        OSES.iter().copied().find(|o| o.name == name).ok_or_else(|| Error::UnknownOs(name.chars().take(64).collect()))
    }
}

impl std::fmt::Display for Os {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

fn suggestions_text(s: &[String]) -> String {
    if s.is_empty() {
        ": it is neither defined in packages/ nor a Debian package".into()
    } else {
        format!("; did you mean {}?", s.join(", "))
    }
}

/// How to tell that the launched program is ready to be snapshotted.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Ready {
    /// Text that appears on the program's terminal when it is ready.
    pub text: Option<String>,
    /// A TCP port inside the guest that accepts connections when ready.
    pub port: Option<u16>,
    /// Ready when still alive after this many milliseconds.
    pub alive_ms: Option<u32>,
    /// Give up after this many milliseconds.
    #[serde(default = "default_ready_timeout")]
    pub timeout_ms: u32,
}

fn default_ready_timeout() -> u32 {
    120_000
}

/// A line to type and the answer to expect: used by tests and benchmarks to
/// measure "the program's first answer".
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    pub input: String,
    pub expect: String,
}

/// A package definition as written in `packages/NAME.toml`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    /// One line for listings.
    #[serde(default)]
    pub description: String,
    /// Debian packages to install (dependencies are resolved automatically).
    pub debs: Vec<String>,
    /// The program and its arguments.
    pub command: Vec<String>,
    /// Extra environment for the program.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Guest memory in MiB.
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
    /// What a session may write to its disk, in MiB: the guest's root file
    /// system has this much free space (beyond it, "no space left"), and
    /// the host holds its writes to a little more (capped by the server).
    #[serde(default = "default_disk")]
    pub disk_mib: u32,
    pub ready: Ready,
    pub probe: Option<Probe>,
    /// A graphical program: its VM has a display, and an X server is
    /// installed and started for it (see [`X_DEBS`]).
    /// (Not serialized when false, so console packages keep their digests.)
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub graphical: bool,
    /// The operating systems it is made for (their names, e.g. `debian-13`);
    /// absent: every one whose package lists have its debs.
    /// (Not serialized when absent, so existing digests stay.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<Vec<String>>,
}

/// What a graphical package's VM gets besides its own debs: the X server on
/// the VM's display, input through evdev, xrandr and setxkbmap (the context
/// sets resolution and keyboard layout with them), fonts, and a window
/// manager that shows the program full-screen and gives it the keyboard
/// (toolkits such as GTK take no typing without one), and xclip, through
/// which the agent reads and sets the clipboard.
pub const X_DEBS: &[&str] = &[
    "xserver-xorg-core",
    "xserver-xorg-input-evdev",
    "x11-xserver-utils",
    "x11-xkb-utils",
    "fonts-dejavu-core",
    "matchbox-window-manager",
    "xclip",
];

impl Definition {
    /// The OSes it is made for: those it names, else every one strata
    /// knows (whose lists have its debs, which is checked at launch).
    pub fn oses(&self) -> Vec<String> {
        self.os.clone().unwrap_or_else(|| OSES.iter().map(|o| o.name.to_string()).collect())
    }

    /// Every Debian package the install image needs.
    pub fn all_debs(&self) -> Vec<String> {
        let mut debs = self.debs.clone();
        if self.graphical {
            debs.extend(X_DEBS.iter().map(|d| d.to_string()).filter(|d| !self.debs.contains(d)));
        }
        debs
    }
}

fn default_memory() -> u32 {
    512
}

fn default_disk() -> u32 {
    2048
}

/// A resolved package: a name, its definition and the OS it runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    pub name: String,
    pub def: Definition,
    /// The OS its images are of.
    pub os: Os,
    /// Where the definition came from; `None` for a derived one.
    pub source: Option<PathBuf>,
}

/// Checks a package name (the Debian rules, which also make it safe in paths).
///
/// # Errors
/// [`Error::BadName`] if the name is not acceptable.
pub fn check_name(name: &str) -> Result<(), Error> {
    let ok = (2..=63).contains(&name.len())
        && name.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::BadName(name.to_string()))
    }
}

impl Definition {
    fn validate(&self) -> Result<(), String> {
        if self.debs.is_empty() {
            return Err("`debs` must name at least one Debian package".into());
        }
        for d in &self.debs {
            check_name(d).map_err(|e| e.to_string())?;
        }
        if self.command.is_empty() || self.command[0].is_empty() {
            return Err("`command` must name the program to run".into());
        }
        if self.command.iter().chain(self.env.values()).any(|a| a.contains('\0')) {
            return Err("`command` and `env` must not contain NUL bytes".into());
        }
        if let Some(k) = self.env.keys().find(|k| k.is_empty() || k.contains('=') || k.contains('\0')) {
            return Err(format!("environment name {k:?} is not valid"));
        }
        if !(128..=16384).contains(&self.memory_mib) {
            return Err(format!("`memory_mib` = {} is out of range 128..=16384", self.memory_mib));
        }
        if !(64..=1 << 20).contains(&self.disk_mib) {
            return Err(format!("`disk_mib` = {} is out of range 64..=1048576", self.disk_mib));
        }
        let r = &self.ready;
        let rules = [r.text.is_some(), r.port.is_some(), r.alive_ms.is_some()];
        if rules.iter().filter(|x| **x).count() != 1 {
            return Err("`[ready]` needs exactly one of `text`, `port`, `alive_ms`".into());
        }
        if self.graphical && r.alive_ms.is_none() {
            return Err("a graphical package is ready once its window has drawn: give `ready.alive_ms`, the time it takes to draw after the X server is up".into());
        }
        if r.text.as_deref() == Some("") {
            return Err("`ready.text` must not be empty".into());
        }
        if r.port == Some(0) {
            return Err("`ready.port` must be a port number from 1 to 65535".into());
        }
        if !(100..=3_600_000).contains(&r.timeout_ms) {
            return Err("`ready.timeout_ms` must be between 100 and 3600000".into());
        }
        if let Some(p) = &self.probe {
            if p.input.is_empty() || p.expect.is_empty() {
                return Err("`probe.input` and `probe.expect` must not be empty".into());
            }
        }
        if let Some(oses) = &self.os {
            if oses.is_empty() {
                return Err(format!("`os` must name at least one operating system ({}), or be left out", os_names()));
            }
            for o in oses {
                Os::named(o).map_err(|e| format!("`os`: {e}"))?;
            }
        }
        Ok(())
    }

    /// A stable digest of everything that shapes the launched program.
    pub fn digest(&self) -> String {
        let json = serde_json::to_vec(self).expect("definitions serialize");
        hex::encode(Sha256::digest(json))
    }
}

impl Package {
    /// Parses and validates a definition file named after its package.
    ///
    /// # Errors
    /// If the file cannot be read, is not valid TOML, or fails validation.
    pub fn from_file(path: &Path) -> Result<Package, Error> {
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.into(), source })?;
        Self::from_toml(&name, &text, path)
    }

    /// Parses and validates a definition given as text.
    ///
    /// # Errors
    /// If the name or the text is not valid.
    pub fn from_toml(name: &str, text: &str, path: &Path) -> Result<Package, Error> {
        check_name(name)?;
        let def: Definition =
            toml::from_str(text).map_err(|e| Error::Parse { path: path.into(), message: e.to_string() })?;
        def.validate().map_err(|message| Error::Invalid { path: path.into(), message })?;
        Ok(Package { name: name.into(), def, os: DEFAULT_OS, source: Some(path.into()) })
    }

    /// The same package with `argv` as its program (a graphical package's
    /// other program: `x11-apps` gives `xcalc`): its launch image is its own,
    /// keyed by the command through the definition's digest; its install
    /// image is the package's.
    ///
    /// # Errors
    /// An empty command, or one holding NUL bytes.
    pub fn with_command(mut self, argv: &[String]) -> Result<Package, Error> {
        self.def.command = argv.to_vec();
        let path = self.source.clone().unwrap_or_else(|| PathBuf::from(&self.name));
        self.def.validate().map_err(|message| Error::Invalid { path, message })?;
        Ok(self)
    }

    /// The definition derived for a Debian package that has none: install it,
    /// run the executable of the same name, ready when alive after 1.5 s.
    /// One whose direct dependencies (`depends`) hold a library programs
    /// draw windows with gets a display, like a graphical definition.
    ///
    /// # Errors
    /// If the name is not a valid package name.
    pub fn derived(name: &str, os: Os, depends: &[String]) -> Result<Package, Error> {
        check_name(name)?;
        let graphical = depends.iter().any(|d| is_display_library(d));
        let def = Definition {
            description: format!("Debian package {name}"),
            debs: vec![name.into()],
            command: vec![name.into()],
            env: BTreeMap::new(),
            memory_mib: if graphical { default_memory().max(DERIVED_DISPLAY_MEMORY_MIB) } else { default_memory() },
            disk_mib: default_disk(),
            ready: Ready {
                text: None,
                port: None,
                alive_ms: Some(if graphical { DERIVED_DRAW_MS } else { 1500 }),
                timeout_ms: 60_000,
            },
            probe: None,
            graphical,
            os: None,
        };
        Ok(Package { name: name.into(), def, os, source: None })
    }
}

/// How long a derived graphical package is given to draw its window after
/// the X server is up (GTK under TCG takes seconds).
const DERIVED_DRAW_MS: u32 = 8000;

/// The guest memory a derived graphical package gets at least.
const DERIVED_DISPLAY_MEMORY_MIB: u32 = 768;

/// Whether a Debian package is a library programs draw windows with.
pub fn is_display_library(name: &str) -> bool {
    const PREFIXES: &[&str] =
        &["libx11-6", "libgtk-3-0", "libgtk-4-1", "libgtk2.0-0", "libqt5gui5", "libqt6gui6", "libsdl2-2.0-0"];
    PREFIXES.iter().any(|p| name.starts_with(p))
}

/// What Debian's package lists of each OS know, as resolution needs it.
pub trait DebianLists {
    /// Whether `os`'s lists hold a package `name`.
    fn has(&self, os: Os, name: &str) -> bool;
    /// The names of the packages `name` depends on directly in `os`.
    fn depends(&self, os: Os, name: &str) -> Vec<String>;
    /// Every package name `os`'s lists hold (for suggestions).
    fn names(&self, os: Os) -> Vec<String>;
}

/// The packages defined in a directory.
#[derive(Debug, Default)]
pub struct Registry {
    pub packages: BTreeMap<String, Package>,
}

impl Registry {
    /// Loads every `*.toml` file of `dir`.
    ///
    /// # Errors
    /// The first definition that fails to load, with its path.
    pub fn load(dir: &Path) -> Result<Registry, Error> {
        let mut packages = BTreeMap::new();
        let entries = std::fs::read_dir(dir).map_err(|source| Error::Read { path: dir.into(), source })?;
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().and_then(|x| x.to_str()) == Some("toml") {
                let p = Package::from_file(&path)?;
                packages.insert(p.name.clone(), p);
            }
        }
        Ok(Registry { packages })
    }

    /// The package a definition makes of `name` for `os`: `None` when no
    /// definition names it (a Debian package may), [`Error::NotOnOs`] when
    /// its definition is made for other OSes. Reads no package lists.
    ///
    /// # Errors
    /// If the definition is not made for `os`.
    pub fn defined(&self, name: &str, os: Os) -> Option<Result<Package, Error>> {
        let p = self.packages.get(name)?;
        Some(match &p.def.os {
            Some(oses) if !oses.iter().any(|o| o == os.name) => {
                Err(Error::NotOnOs { name: name.into(), os: os.name.into(), others: oses.clone() })
            }
            _ => Ok(Package { os, ..p.clone() }),
        })
    }

    /// Finds a package for `os`: a definition made for it, else one derived
    /// from the Debian package of that name in `os`'s lists, else
    /// [`Error::NotOnOs`] naming the OSes that have it, or
    /// [`Error::NotFound`] with close names.
    ///
    /// # Errors
    /// If the name is invalid, `os` lacks it, or nothing matches.
    pub fn resolve(&self, name: &str, os: Os, lists: &dyn DebianLists) -> Result<Package, Error> {
        check_name(name)?;
        if let Some(defined) = self.defined(name, os) {
            return defined;
        }
        if lists.has(os, name) {
            return Package::derived(name, os, &lists.depends(os, name));
        }
        let others: Vec<String> =
            OSES.iter().filter(|o| **o != os && lists.has(**o, name)).map(|o| o.name.to_string()).collect();
        if !others.is_empty() {
            return Err(Error::NotOnOs { name: name.into(), os: os.name.into(), others });
        }
        let mut candidates: Vec<String> = self.packages.keys().cloned().collect();
        candidates.extend(lists.names(os));
        Err(Error::NotFound { name: name.into(), suggestions: suggest(name, &candidates) })
    }
}

/// Up to three names closest to `name`, defined packages first on ties.
pub fn suggest(name: &str, candidates: &[String]) -> Vec<String> {
    let mut scored: Vec<(f64, &String)> =
        candidates.iter().map(|c| (strsim::jaro_winkler(name, c), c)).filter(|(s, _)| *s >= 0.85).collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut out: Vec<String> = Vec::new();
    for (_, c) in scored {
        if !out.contains(c) {
            out.push(c.clone());
        }
        if out.len() == 3 {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, text: &str, expect_err: Option<&str>) {
        let r = Package::from_toml(name, text, Path::new("t.toml"));
        match (r, expect_err) {
            (Ok(_), None) => {}
            (Err(e), Some(want)) => {
                let msg = e.to_string();
                assert!(msg.contains(want), "error {msg:?} lacks {want:?}");
            }
            (r, want) => panic!("for {text:?}: got {r:?}, wanted error {want:?}"),
        }
    }

    const OK: &str = "debs=['python3']\ncommand=['python3']\n[ready]\ntext='>>> '\n";

    #[test]
    fn definitions_are_validated() {
        check("python3", OK, None);
        check("Python", OK, Some("not a valid package name"));
        check("py", "debs=[]\ncommand=['x']\n[ready]\nalive_ms=1\n", Some("at least one"));
        check("py", "debs=['a b']\ncommand=['x']\n[ready]\nalive_ms=1\n", Some("not a valid package name"));
        check("py", "debs=['py']\ncommand=[]\n[ready]\nalive_ms=1\n", Some("`command`"));
        check("py", "debs=['py']\ncommand=['x']\n[ready]\n", Some("exactly one"));
        check("py", "debs=['py']\ncommand=['x']\n[ready]\ntext='a'\nport=3\n", Some("exactly one"));
        check("py", "debs=['py']\ncommand=['x']\nmemory_mib=1\n[ready]\nalive_ms=1\n", Some("memory_mib"));
        check("py", "debs=['py']\ncommand=['x']\ndisk_mib=8\n[ready]\nalive_ms=1\n", Some("disk_mib"));
        check("py", "debs=['py']\ncommand=['x']\nbogus=1\n[ready]\nalive_ms=1\n", Some("unknown field"));
        check("py", "debs=['py']\ncommand=['x']\n[ready]\nport=0\n", Some("port number"));
        check("py", "not toml at all [", Some("not valid"));
        check("py", "debs=['py']\ncommand=['x']\nos=[]\n[ready]\nalive_ms=1\n", Some("at least one operating"));
        check("py", "debs=['py']\ncommand=['x']\nos=['dos']\n[ready]\nalive_ms=1\n", Some("debian-12, debian-13"));
        check("py", "debs=['py']\ncommand=['x']\nos=['debian-13']\n[ready]\nalive_ms=1\n", None);
    }

    /// Lists where `os` holds what `has` says; `x11-app` links libX11.
    struct Lists<F: Fn(Os, &str) -> bool>(F);

    impl<F: Fn(Os, &str) -> bool> DebianLists for Lists<F> {
        fn has(&self, os: Os, name: &str) -> bool {
            (self.0)(os, name)
        }
        fn depends(&self, _: Os, name: &str) -> Vec<String> {
            match name {
                "x11-app" => vec!["libc6".into(), "libx11-6".into()],
                _ => vec!["libc6".into()],
            }
        }
        fn names(&self, _: Os) -> Vec<String> {
            vec!["python3".into(), "htop".into(), "nano".into()]
        }
    }

    #[test]
    fn unknown_package_suggests_close_names() {
        let reg = Registry::default();
        let err = reg.resolve("pyhton3", DEFAULT_OS, &Lists(|_, _| false)).unwrap_err();
        match err {
            Error::NotFound { suggestions, .. } => {
                assert_eq!(suggestions, vec!["python3".to_string()])
            }
            e => panic!("{e}"),
        }
    }

    #[test]
    fn debian_package_without_definition_is_derived() {
        let reg = Registry::default();
        let lists = Lists(|_, n| n == "sl" || n == "x11-app");
        let p = reg.resolve("sl", DEFAULT_OS, &lists).unwrap();
        assert_eq!(p.def.command, vec!["sl".to_string()]);
        assert!(p.source.is_none() && !p.def.graphical);
        // One linking a display library draws a window: it gets a display.
        let p = reg.resolve("x11-app", DEFAULT_OS, &lists).unwrap();
        assert!(p.def.graphical && p.def.memory_mib >= 768, "{:?}", p.def);
    }

    #[test]
    fn packages_resolve_per_os() {
        let trixie = Os::named("debian-13").unwrap();
        // A Debian package only the newer release has: refused on the older,
        // naming the one that has it.
        let only_new = Lists(|os: Os, n: &str| n == "fastfetch" && os == trixie);
        let reg = Registry::default();
        assert_eq!(reg.resolve("fastfetch", trixie, &only_new).unwrap().os, trixie);
        match reg.resolve("fastfetch", DEFAULT_OS, &only_new).unwrap_err() {
            Error::NotOnOs { os, others, .. } => {
                assert_eq!((os.as_str(), others), ("debian-12", vec!["debian-13".to_string()]))
            }
            e => panic!("{e}"),
        }
        // A definition limited to one OS.
        let mut reg = Registry::default();
        let text = format!("{OK}os=['debian-13']\n").replace("[ready]\ntext='>>> '\n", "") + "[ready]\ntext='>>> '\n";
        reg.packages.insert("py".into(), Package::from_toml("py", &text, Path::new("py.toml")).unwrap());
        assert_eq!(reg.resolve("py", trixie, &Lists(|_, _| false)).unwrap().os, trixie);
        let e = reg.resolve("py", DEFAULT_OS, &Lists(|_, _| true)).unwrap_err().to_string();
        assert!(e.contains("not made for debian-12") && e.contains("debian-13"), "{e}");
        assert!(Os::named("debian-99").unwrap_err().to_string().contains("debian-12, debian-13"));
    }

    #[test]
    fn digest_changes_with_the_definition() {
        let a = Package::from_toml("py", OK, Path::new("a")).unwrap();
        let b = Package::from_toml("py", &OK.replace(">>> ", "$ "), Path::new("a")).unwrap();
        assert_ne!(a.def.digest(), b.def.digest());
        assert_eq!(a.def.digest(), a.def.clone().digest());
    }
}
