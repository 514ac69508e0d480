//! `strata`: run software on demand, each program in its own VM, launched
//! from layered images in milliseconds.

mod bench_e2b;
mod cluster;
mod keeper;
mod listen;
mod local;
mod progress;
mod remote;
mod terminal;
mod verbs;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use strata_engine::context::{ContextSettings, PortForward, Resolution, Share};
use strata_engine::{Config, Engine};
use strata_vmm::Accel;

use crate::progress::Bar;
use crate::terminal::{attach, stdin_is_tty, terminal_size, AttachEnd};

/// How long a planned stop of `serve` waits for a housekeeping round in
/// progress (its pauses) to end.
const HOUSEKEEPING_ROUND_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

#[derive(Parser)]
#[command(name = "strata", version = strata_engine::sessions::STRATA_VERSION, about = "Run software on demand, already running, each in its own VM")]
struct Cli {
    /// Where images and the catalog live.
    #[arg(long, global = true, env = "STRATA_STATE")]
    state: Option<PathBuf>,
    /// Directory of package definitions.
    #[arg(long, global = true, env = "STRATA_PACKAGES")]
    packages: Option<PathBuf>,
    /// Accelerator, instead of probing: kvm or tcg.
    #[arg(long, global = true)]
    accel: Option<Accel>,
    /// Print no progress.
    #[arg(long, short, global = true)]
    quiet: bool,
    /// A strata server to talk to (`strata serve`), e.g. http://127.0.0.1:7070;
    /// without it, strata works on this machine directly.
    #[arg(long, global = true, env = "STRATA_ADDR")]
    addr: Option<String>,
    /// API token for --addr.
    #[arg(long, global = true, env = "STRATA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A PEM certificate to trust for an https:// --addr, besides the
    /// system's (e.g. the self-signed one `strata serve --tls` prints).
    #[arg(long, global = true, env = "STRATA_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// This terminal's name: it owns a context and a persistent home.
    #[arg(long, global = true, env = "STRATA_TERMINAL", default_value = "local")]
    terminal: String,
    /// The OS to launch and build on (debian-12, debian-13); default: the
    /// terminal's context's (`context set os=...`), else the server's
    /// (`STRATA_OS`, else debian-12).
    #[arg(long, global = true, value_parser = parse_os)]
    os: Option<strata_engine::Os>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Launch a package and attach this terminal to it. With standard
    /// input from a pipe or a file, the package's program runs afresh with
    /// pipes in the restored VM instead (like `docker run -i`): only its
    /// output on stdout, its errors on stderr, its exit status.
    Run {
        /// The package (leave it out with --from).
        #[arg(required_unless_present = "from")]
        package: Option<String>,
        /// Start from a snapshot (its name or digest) instead of a
        /// package's launch image: the saved session's whole state.
        #[arg(long, value_name = "SNAPSHOT", conflicts_with_all = ["package", "cold", "command", "interactive"])]
        from: Option<String>,
        /// With input from a pipe: attach it to the program's terminal (as
        /// if typed there: what the program echoes and prompts comes back
        /// too) instead of running the program afresh with pipes.
        #[arg(short, long)]
        interactive: bool,
        /// Give the program this terminal (the default when stdin is a terminal).
        #[arg(short, long)]
        tty: bool,
        /// Boot and start the program instead of using the launch image.
        #[arg(long, conflicts_with = "detach")]
        cold: bool,
        /// Start it in the background and print its session id.
        #[arg(short, long)]
        detach: bool,
        /// How long the session may stay detached before it is paused to an
        /// image (a running `strata serve` does it): 90s, 30m, 12h, 7d, or
        /// `never`. Default: the server's (an hour).
        #[arg(long, value_name = "DURATION", value_parser = parse_idle_timeout)]
        idle_timeout: Option<u64>,
        #[command(flatten)]
        devices: DeviceArgs,
        /// After `--`: a command to run in the restored VM, with pipes,
        /// instead of attaching to the package's program; strata exits with
        /// its status and the session ends with it.
        #[arg(last = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Run a command in a running session, beside its program, with pipes:
    /// its output on stdout, its errors on stderr, its exit status as
    /// strata's (like `docker exec`).
    Exec {
        /// Pass this terminal's standard input to the command (end of input
        /// reaches it as end of file); without it the command reads nothing.
        #[arg(short, long)]
        interactive: bool,
        /// Give the command a terminal: a PTY of this terminal's size that
        /// follows it, this terminal in raw mode, its input passed on (for
        /// shells and other interactive programs; output and errors arrive
        /// together, as on any terminal).
        #[arg(short, long)]
        tty: bool,
        /// Start it in the background and print its process id in the
        /// guest: it runs on after strata returns, its output discarded
        /// (like `docker exec -d`); `strata exec SESSION sh -c 'kill PID'` stops it.
        #[arg(short, long, conflicts_with_all = ["interactive", "tty"])]
        detach: bool,
        /// Set an environment variable: KEY=VALUE (repeatable).
        #[arg(short, long = "env", value_name = "KEY=VALUE", value_parser = parse_env_var)]
        env: Vec<(String, String)>,
        /// Working directory in the guest (default: the user's home).
        #[arg(short, long, value_name = "DIR")]
        workdir: Option<String>,
        /// User in the guest to run as (default: root).
        #[arg(short, long)]
        user: Option<String>,
        /// The session, as `strata ps` shows it.
        id: String,
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Copy a file into or out of a session: `cp FILE ID:/path` or `cp ID:/path FILE`.
    Cp { src: String, dst: String },
    /// Attach this terminal to a detached session.
    Attach { id: String },
    /// Print a session's recent output (what attaching would show).
    Logs { id: String },
    /// Pause sessions to images (they stop using memory and CPU, and survive restarts).
    Pause {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Fork a running session into N new ones, each with its whole state
    /// (memory, disk, the program's screen and processes) and independent
    /// from then on; it runs on. Prints the new sessions' ids.
    Fork {
        id: String,
        /// How many copies (1 to 32).
        #[arg(short = 'n', long = "count", default_value_t = 1)]
        count: usize,
        /// Place the copies like launches, on any server of the cluster
        /// (through a control plane), from a named snapshot of the session
        /// (`fork-ID-MILLIS`, kept until `images rm`); without it they start
        /// beside the session, sharing its memory.
        #[arg(long)]
        spread: bool,
    },
    /// Save a running session as a named snapshot while it runs on; `strata
    /// run --from NAME` starts sessions from it. Kept until `images rm`.
    Snapshot { id: String, name: String },
    /// Move a running session to another server of the cluster while it
    /// runs (QEMU's live migration: its memory goes while it runs, then a
    /// short stop); it keeps its id. Through a control plane (--addr).
    Move {
        id: String,
        /// The server to move it to (`strata servers` lists them); else
        /// placement picks one.
        #[arg(long)]
        to: Option<String>,
    },
    /// Resume paused sessions (they run on, detached; `attach` also resumes).
    Resume {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// List sessions: running (attached or detached) and paused.
    Ps {
        #[arg(long)]
        json: bool,
    },
    /// Stop sessions and remove them (running, paused, or ended).
    #[command(visible_alias = "rm")]
    Kill {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Build the images of a package (base, install, launch) if missing,
    /// following the build's progress; a build that runs joins it.
    Build {
        package: String,
        /// Start the build and print its id instead of following it (through
        /// a server: it goes on there; `strata builds show ID --follow`).
        #[arg(long, short)]
        detach: bool,
    },
    /// Commands that run in a session (started by `exec`, the API or E2B's
    /// SDKs): list them, reconnect to one, signal one.
    Commands {
        #[command(subcommand)]
        cmd: CommandsCmd,
    },
    /// Image builds: running ones, and the last finished ones with their logs.
    Builds {
        #[command(subcommand)]
        cmd: BuildsCmd,
    },
    /// Servers running sessions (in single-machine mode: this one).
    Servers {
        #[command(subcommand)]
        cmd: ServersCmd,
    },
    /// Image catalog.
    Images {
        #[command(subcommand)]
        cmd: ImagesCmd,
    },
    /// Package definitions.
    Packages {
        #[command(subcommand)]
        cmd: PackagesCmd,
    },
    /// The terminal's context (what the VM is linked to).
    Context {
        #[command(subcommand)]
        cmd: ContextCmd,
    },
    /// Serve the REST API (and run its sessions) until interrupted.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: std::net::SocketAddr,
        /// Sessions the server runs at once.
        #[arg(long, default_value_t = 64)]
        max_sessions: usize,
        /// Sessions one terminal may hold at once.
        #[arg(long, default_value_t = 16)]
        max_sessions_per_terminal: usize,
        /// Guest memory one terminal's running sessions may have together,
        /// in MiB (paused sessions hold none).
        #[arg(long, default_value_t = 8192)]
        max_memory_per_terminal_mib: u32,
        /// Keep sessions of PACKAGE restored, warmed and paused ahead of
        /// demand: PACKAGE=MAX (at least one waits) or PACKAGE=MIN-MAX; the
        /// size follows the launch rate and gives memory back when it drops
        /// (repeatable). `e2b:PACKAGE=...` keeps sessions for E2B's API
        /// (an outbound network, E2B's shell warmed); `PACKAGE@OS=...`
        /// keeps them of an OS other than the server's default.
        #[arg(long, value_parser = parse_pool_target)]
        pool: Vec<(String, (usize, usize))>,
        /// A folder terminals may share into their VMs, with its subfolders
        /// (repeatable; replaces the default: $HOME, /home, /srv, /tmp).
        #[arg(long)]
        share_root: Vec<PathBuf>,
        /// Serve HTTPS: with --tls-cert and --tls-key, else with a
        /// self-signed certificate kept in the state directory.
        #[arg(long)]
        tls: bool,
        /// PEM certificate chain for HTTPS (implies --tls).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// PEM private key for HTTPS (implies --tls).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Join a cluster: its etcd endpoints, comma-separated. Control
        /// planes then place launches here; STRATA_CLUSTER_TOKEN must hold
        /// the cluster's secret.
        #[arg(long, env = "STRATA_ETCD", value_delimiter = ',')]
        etcd: Vec<String>,
        /// The address other machines reach this server's API at (default:
        /// http://LISTEN).
        #[arg(long, requires = "etcd")]
        advertise: Option<String>,
        /// This server's id in the cluster (default: HOSTNAME-PORT).
        #[arg(long, requires = "etcd")]
        server_id: Option<String>,
        /// What a stop (SIGTERM, SIGINT, SIGHUP) does with running
        /// sessions: `keep` them running, detached, for the next server to
        /// take back; `pause` them to images, resumed when the server starts
        /// again; or `stop` them. Paused sessions are kept in every case.
        #[arg(long, value_enum, default_value = "keep")]
        on_stop: OnStopArg,
        /// Same as `--on-stop pause`.
        #[arg(long, conflicts_with = "on_stop")]
        pause_on_stop: bool,
        /// A terminal whose token sees every session of this server and of
        /// its store (the CLI's too) and may stop, pause and resume any;
        /// what runs inside stays each terminal's own (repeatable).
        #[arg(long, value_name = "TERMINAL")]
        operator: Vec<String>,
    },
    /// Run a control plane of a cluster: it places launches on the servers
    /// registered in etcd (`serve --etcd`) and tells terminals where to
    /// attach. Several may run; one leads.
    Control {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:7000")]
        listen: std::net::SocketAddr,
        /// The cluster's etcd endpoints, comma-separated.
        #[arg(long, env = "STRATA_ETCD", value_delimiter = ',', required = true)]
        etcd: Vec<String>,
        /// Placement rule: sample-2, sample-3, least-loaded, round-robin.
        #[arg(long, default_value = "sample-2")]
        rule: String,
        /// Guest memory a server may commit, as a multiple of its memory.
        #[arg(long, default_value_t = 1.0)]
        overcommit: f64,
        /// This plane's name in the leader election (default: HOSTNAME-PORT).
        #[arg(long)]
        name: Option<String>,
        /// Sessions one terminal may hold across the cluster.
        #[arg(long, default_value_t = 16)]
        max_sessions_per_terminal: usize,
        /// Guest memory one terminal's running sessions may have together
        /// across the cluster, in MiB.
        #[arg(long, default_value_t = 8192)]
        max_memory_per_terminal_mib: u32,
        /// Seconds a server may stay silent (its lease lapsed) before its
        /// running sessions are marked lost; until then it is only suspect:
        /// new launches avoid it, its sessions stay running.
        #[arg(long, default_value_t = 30, value_name = "SECONDS")]
        lost_after: u64,
        /// Serve HTTPS with this PEM certificate chain (with --tls-key).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The PEM private key for --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// A terminal whose token sees every session of the cluster and may
        /// stop, pause and resume any; what runs inside stays each
        /// terminal's own (repeatable).
        #[arg(long, value_name = "TERMINAL")]
        operator: Vec<String>,
    },
    /// API tokens (one per terminal).
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Show the accelerator strata uses (probing it if needed).
    Accel,
    /// Check how this server confines its VMs: each layer's state, and what
    /// to set up where one is missing.
    Doctor,
    /// The store's keeper (started by the CLI when a session may outlive
    /// it): applies idle time-outs and retention to the sessions no strata
    /// process holds, and ends once none runs.
    #[command(hide = true)]
    Keep,
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        cmd: BenchCmd,
    },
}

/// What `run` links into the VM besides the console.
#[derive(clap::Args, Clone, Default)]
struct DeviceArgs {
    /// Forward a port of this host (127.0.0.1) into the VM: HOST:GUEST (repeatable).
    #[arg(short = 'p', long = "publish", value_name = "HOST:GUEST")]
    ports: Vec<PortForward>,
    /// Share a folder into the VM: HOST_DIR:GUEST_DIR[:ro] (repeatable).
    #[arg(short = 'v', long = "volume", value_name = "HOST:GUEST[:ro]")]
    shares: Vec<Share>,
    /// Let the VM open connections out (user-mode NAT); off by default.
    #[arg(long)]
    net: bool,
    /// Mount this terminal's persistent home at /root.
    #[arg(long)]
    home: bool,
    /// Screen size of a graphical package: WIDTHxHEIGHT.
    #[arg(long, value_name = "WxH")]
    screen: Option<Resolution>,
    /// Keyboard layout of a graphical package (XKB name, e.g. de).
    #[arg(long)]
    keyboard: Option<String>,
}

impl DeviceArgs {
    /// Whether any device option was given.
    fn given(&self) -> bool {
        !self.ports.is_empty()
            || !self.shares.is_empty()
            || self.net
            || self.home
            || self.screen.is_some()
            || self.keyboard.is_some()
    }

    /// Adds these to a context.
    fn apply(&self, s: &mut ContextSettings, terminal: &str) {
        s.network.ports.extend(self.ports.iter().copied());
        s.network.outbound |= self.net;
        for sh in &self.shares {
            s.shares.push(Share { host: strata_engine::context::absolute(&sh.host), ..sh.clone() });
        }
        if self.home {
            s.home = Some(terminal.to_string());
        }
        if self.screen.is_some() {
            s.screen = self.screen;
        }
        if self.keyboard.is_some() {
            s.keyboard = self.keyboard.clone();
        }
    }

    /// The same, as the API's context fields.
    fn to_json(&self, terminal: &str) -> anyhow::Result<serde_json::Value> {
        let mut s = ContextSettings::from_terminal(None);
        self.apply(&mut s, terminal);
        Ok(serde_json::json!({
            "outbound": s.network.outbound,
            "ports": s.network.ports,
            "shares": s.shares,
            "home": s.home.is_some(),
            "screen": s.screen.map(|r| format!("{}x{}", r.width, r.height)),
            "keyboard": s.keyboard,
        }))
    }
}

/// The context a launch from this terminal uses: its stored context (or
/// one read from the terminal), sized to the terminal now, plus `devices`.
fn launch_settings(eng: &Engine, terminal: &str, devices: &DeviceArgs) -> anyhow::Result<ContextSettings> {
    let live = ContextSettings::from_terminal(terminal_size());
    let mut s = match eng.terminal_context(terminal)? {
        Some((_, mut stored)) => {
            stored.rows = live.rows;
            stored.cols = live.cols;
            stored
        }
        None => live,
    };
    devices.apply(&mut s, terminal);
    Ok(s)
}

/// Changes one context setting from `KEY=VALUE`.
fn set_context_key(s: &mut ContextSettings, kv: &str, terminal: &str) -> anyhow::Result<()> {
    let (k, v) = kv.split_once('=').with_context(|| format!("{kv:?} is not KEY=VALUE"))?;
    let on = |v: &str| match v {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => anyhow::bail!("{k} takes on or off, not {v:?}"),
    };
    let opt = |v: &str| (!v.is_empty()).then(|| v.to_string());
    match k {
        "term" => s.term = v.to_string(),
        "timezone" => s.timezone = opt(v),
        "locale" => s.locale = opt(v),
        "outbound" => s.network.outbound = on(v)?,
        "home" => s.home = on(v)?.then(|| terminal.to_string()),
        "screen" => s.screen = opt(v).map(|v| v.parse()).transpose().map_err(anyhow::Error::msg)?,
        "keyboard" => s.keyboard = opt(v),
        "os" => s.os = opt(v),
        "ports" => {
            s.network.ports = v
                .split(',')
                .filter(|p| !p.is_empty())
                .map(str::parse)
                .collect::<Result<_, _>>()
                .map_err(anyhow::Error::msg)?
        }
        "shares" => {
            s.shares = v
                .split(',')
                .filter(|p| !p.is_empty())
                .map(|p| p.parse::<Share>().map(|sh| Share { host: strata_engine::context::absolute(&sh.host), ..sh }))
                .collect::<Result<_, _>>()
                .map_err(anyhow::Error::msg)?
        }
        _ if k.starts_with("env.") => {
            let name = &k[4..];
            if v.is_empty() {
                s.env.remove(name);
            } else {
                s.env.insert(name.to_string(), v.to_string());
            }
        }
        _ => anyhow::bail!(
            "unknown context setting {k:?}; known: term, timezone, locale, outbound, home, ports, shares, screen, keyboard, os, env.NAME"
        ),
    }
    Ok(())
}

/// Splits `ID:/path` into a session id and a guest path.
fn session_path(arg: &str) -> Option<(&str, &str)> {
    let (id, path) = arg.split_once(':')?;
    (id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit()) && path.starts_with('/')).then_some((id, path))
}

/// `cp` arguments: (session, guest path, host path, into the guest?).
fn copy_plan<'a>(src: &'a str, dst: &'a str) -> anyhow::Result<(&'a str, &'a str, &'a str, bool)> {
    match (session_path(src), session_path(dst)) {
        (None, Some((id, guest))) => Ok((id, guest, src, true)),
        (Some((id, guest)), None) => Ok((id, guest, dst, false)),
        (Some(_), Some(_)) => anyhow::bail!("copy between two sessions through this host, in two steps"),
        (None, None) => {
            anyhow::bail!("one side must be SESSION:/absolute/path (the session id as `strata ps` shows it)")
        }
    }
}

#[derive(Subcommand)]
enum ServersCmd {
    /// List servers and their load.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Drain a server of the cluster (an operator, through a control
    /// plane): it takes no new launches, its running sessions move live to
    /// the others and its paused ones are taken in by them.
    Drain { server: String },
    /// Let a drained server take launches again.
    Undrain { server: String },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create (or replace) the token of a terminal and print it.
    Create {
        terminal: String,
        /// The token stops working after this long: 90s, 30m, 12h, 7d
        /// (default: never).
        #[arg(long, value_parser = parse_duration)]
        expires_in: Option<std::time::Duration>,
        /// Keep it in the cluster's etcd (endpoints, comma-separated), for
        /// its control planes, instead of this server's token file.
        #[arg(long, env = "STRATA_ETCD", value_delimiter = ',')]
        etcd: Vec<String>,
    },
    /// Print a new random secret, for a cluster's STRATA_CLUSTER_TOKEN.
    Secret,
}

#[derive(Subcommand)]
enum CommandsCmd {
    /// List the commands that run in SESSION.
    Ls {
        session: String,
        #[arg(long)]
        json: bool,
    },
    /// Reconnect to a running command: its output from now on.
    Attach {
        session: String,
        id: u32,
        /// Pass this process's input to it.
        #[arg(long, short)]
        interactive: bool,
    },
    /// Send a signal to a running command and its process group.
    Kill {
        session: String,
        id: u32,
        /// The signal: a name (TERM, KILL, INT, HUP, USR1, ...) or a number.
        #[arg(long, short, default_value = "TERM")]
        signal: String,
    },
}

#[derive(Subcommand)]
enum BuildsCmd {
    /// List builds, newest first.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// A build's state and log.
    Show {
        id: String,
        /// Print its steps as they come, until it ends.
        #[arg(long, short)]
        follow: bool,
    },
}

#[derive(Subcommand)]
enum ImagesCmd {
    /// List images.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Hash every blob of every image and report the damaged ones.
    Verify,
    /// Remove images from the catalog (their blobs go with `images gc`).
    Rm {
        #[arg(required = true)]
        digests: Vec<String>,
    },
    /// Remove blobs no image references.
    Gc,
    /// Remove superseded images: of each package's base, install and launch
    /// images, keep the one used last and what sessions stand on; then
    /// remove the blobs no image references.
    Prune {
        /// Only list what would be removed.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// Publish packages' images (built first if missing) to the object store
    /// shared by servers (STRATA_S3_ENDPOINT and the rest; see scripts/garage.sh).
    Push {
        // Not `packages`: that is the global --packages directory.
        #[arg(required = true, value_name = "PACKAGE")]
        names: Vec<String>,
    },
}

#[derive(Subcommand)]
enum PackagesCmd {
    /// List defined packages.
    Ls {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ContextCmd {
    /// Show this terminal's context (stored as a context image).
    Show {
        #[arg(long)]
        json: bool,
    },
    /// Change settings of this terminal's context (a new version if anything
    /// changed): term, timezone, locale, outbound=on|off, home=on|off,
    /// ports=8080:80,..., shares=/host:/guest[:ro],..., env.NAME=VALUE.
    Set {
        #[arg(required = true, value_name = "KEY=VALUE")]
        settings: Vec<String>,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// E2B's SDK against the native API: a `strata serve` with a pool on
    /// this store; launches at a steady rate through `POST /v1/sessions`,
    /// then through the SDK (`Sandbox.create()` and `commands.run("echo
    /// hi")`), each timed to its answer.
    E2b {
        package: String,
        /// Launches per second, each way.
        #[arg(long, default_value_t = 5.0)]
        rate: f64,
        /// How long launches keep arriving, each way.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Warm sessions the server keeps ready.
        #[arg(long, default_value_t = 16)]
        pool: usize,
        /// A python with E2B's SDK (`source scripts/e2b-sdk.sh` makes one).
        #[arg(long, env = "STRATA_E2B_PYTHON")]
        python: String,
        /// Where the server it starts writes its log (else nowhere).
        #[arg(long)]
        server_log: Option<std::path::PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Latency and throughput while launch requests arrive at a steady rate.
    Load {
        package: String,
        /// Launch requests per second.
        #[arg(long, default_value_t = 5.0)]
        rate: f64,
        /// How long requests keep arriving.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Warm sessions kept ready (0: every launch restores on demand).
        #[arg(long, default_value_t = 4)]
        pool: usize,
        #[arg(long)]
        json: bool,
    },
    /// Launch to first answer on a server whose cache is cold (images fetched
    /// from the shared store) versus warm, same run.
    Cache {
        package: String,
        /// Cold servers, and warm launches on each.
        #[arg(short = 'n', long, default_value_t = 3)]
        runs: usize,
        #[arg(long)]
        json: bool,
    },
    /// Placement decision time over a simulated fleet, for every rule.
    Placement {
        #[arg(long, default_value_t = 1000)]
        servers: usize,
        #[arg(long, default_value_t = 10000)]
        decisions: usize,
        #[arg(long)]
        json: bool,
    },
    /// What confinement costs: the same launches confined and unconfined
    /// (as root, no cgroup, filter, mount namespace or file bound),
    /// alternating, in one run.
    Confine {
        package: String,
        /// Launches each way.
        #[arg(short = 'n', long, default_value_t = 10)]
        runs: usize,
        #[arg(long)]
        json: bool,
    },
    /// Forks of a running session against as many launches from the launch
    /// image, same run: the parent's stop, the time until every copy
    /// answers, memory per copy.
    Fork {
        package: String,
        /// Copies per fork (and launches per baseline round).
        #[arg(short = 'n', long, default_value_t = 8)]
        copies: usize,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        #[arg(long)]
        json: bool,
    },
    /// Live moves of a session to a new QEMU on this host (the steps of a
    /// move between servers, without the network) against pausing it to an
    /// image and resuming it, alternating, same run: the guest's stop and
    /// the time until it answers again.
    Move {
        package: String,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// The guests' memory, instead of the package's (a launch image of
        /// that size is built once).
        #[arg(long)]
        memory_mib: Option<u32>,
        #[arg(long)]
        json: bool,
    },
    /// Memory per idle session: N sessions from the launch image at once.
    Density {
        package: String,
        #[arg(short = 'n', long, default_value_t = 10)]
        sessions: usize,
        /// Seconds the sessions sit idle after the last one started, before
        /// they are measured (a restored guest's memory grows for its first
        /// minute, as QEMU translates its periodic work).
        #[arg(long, default_value_t = 60)]
        idle: u64,
        #[arg(long)]
        json: bool,
    },
    /// Launch latency: cold boot versus launch image, same run.
    Launch {
        package: String,
        /// Launches each way.
        #[arg(short = 'n', long, default_value_t = 5)]
        runs: usize,
        /// Also measure launches from a pool of restored, warmed, paused sessions.
        #[arg(long)]
        pool: bool,
        /// A graphical package: also measure to the first character typed
        /// after the first frame being drawn (a program that draws typing).
        #[arg(long)]
        typed: bool,
        /// Also draw the latencies as an SVG plot into this file.
        #[arg(long)]
        svg: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The keeper's log is its record of what it did to whose session.
    let level = if matches!(cli.cmd, Cmd::Keep) { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG").unwrap_or_else(|_| level.into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    raise_open_files_limit();
    // A listing piped into `head` ends quietly, as other tools' do. Only
    // listings: commands that talk to VMs over Unix sockets need EPIPE.
    if matches!(
        cli.cmd,
        Cmd::Ps { .. }
            | Cmd::Images { cmd: ImagesCmd::Ls { .. } }
            | Cmd::Packages { .. }
            | Cmd::Servers { .. }
            | Cmd::Completions { .. }
    ) {
        // SAFETY: restoring a signal's default disposition before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    // One thread: every QEMU is spawned from it, and the work is I/O bound.
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("strata: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    // A server and the keeper stop on their own terms: their sessions
    // outlive them.
    let serving = matches!(cli.cmd, Cmd::Serve { .. } | Cmd::Keep);
    let ran = if serving { rt.block_on(real_main(cli)) } else { rt.block_on(with_signals(real_main(cli))) };
    match ran {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("strata: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Lifts the soft limit on open files to the hard one: every session holds
/// a few sockets, and Debian's default soft limit (1024) would stop a server
/// at a few hundred sessions.
fn raise_open_files_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::debug!("could not raise the open files limit");
            }
        }
    }
}

/// `serve --on-stop`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum OnStopArg {
    Keep,
    Pause,
    Stop,
}

/// Waits for SIGINT, SIGTERM or SIGHUP; gives the exit status it calls for.
async fn stop_signal() -> anyhow::Result<u8> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    Ok(tokio::select! {
        _ = int.recv() => 130,
        _ = term.recv() => 143,
        _ = hup.recv() => 129,
    })
}

/// Runs the command; on SIGINT/SIGTERM/SIGHUP the command is dropped, which
/// kills its QEMU processes and removes its scratch files.
async fn with_signals(f: impl std::future::Future<Output = anyhow::Result<u8>>) -> anyhow::Result<u8> {
    tokio::pin!(f);
    loop {
        tokio::select! {
            r = &mut f => return r,
            code = stop_signal() => {
                let code = code?;
                // An attached terminal handles them itself (terminal::attach).
                if terminal::ATTACHED.load(std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                if code == 130 {
                    eprintln!("strata: interrupted; cleaned up");
                }
                return Ok(code);
            }
        }
    }
}

fn parse_os(s: &str) -> Result<strata_engine::Os, String> {
    strata_engine::Os::named(s).map_err(|e| e.to_string())
}

/// Where package definitions are read from.
fn packages_dir(cli: &Cli) -> PathBuf {
    cli.packages.clone().unwrap_or_else(|| Config::from_env().packages_dir)
}

fn engine(cli: &Cli) -> anyhow::Result<Engine> {
    let mut cfg = Config::from_env();
    if let Some(s) = &cli.state {
        cfg.state_dir = s.clone();
    }
    if let Some(p) = &cli.packages {
        cfg.packages_dir = p.clone();
    }
    cfg.accel = cli.accel;
    if let Some(os) = cli.os {
        cfg.default_os = os;
    }
    // Processes that start many VMs fork QEMU from a fork server.
    let fork_server = match std::env::var("STRATA_FORK_SERVER").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        Ok(other) => anyhow::bail!("STRATA_FORK_SERVER must be 0 or 1, not {other:?}"),
        Err(_) => matches!(cli.cmd, Cmd::Serve { .. } | Cmd::Bench { .. }),
    };
    cfg.fork_server = fork_server.then(Config::preload_library);
    if let Cmd::Serve { share_root, .. } = &cli.cmd {
        if !share_root.is_empty() {
            if let Some(bad) = share_root.iter().find(|p| !p.is_absolute()) {
                anyhow::bail!("--share-root {} must be an absolute path", bad.display());
            }
            cfg.share_roots = share_root.clone();
        }
    }
    Engine::open(cfg).context("opening the strata store")
}

async fn real_main(cli: Cli) -> anyhow::Result<u8> {
    if let Cmd::Completions { shell } = &cli.cmd {
        use clap::CommandFactory;
        clap_complete::generate(*shell, &mut Cli::command(), "strata", &mut std::io::stdout());
        return Ok(0);
    }
    // Cluster commands that need no store of their own.
    match &cli.cmd {
        Cmd::Control {
            listen,
            etcd,
            rule,
            overcommit,
            name,
            max_sessions_per_terminal,
            max_memory_per_terminal_mib,
            lost_after,
            tls_cert,
            tls_key,
            operator,
        } => {
            let plane = cluster::Plane {
                listen: *listen,
                etcd,
                rule,
                overcommit: *overcommit,
                name: name.clone(),
                packages: packages_dir(&cli),
                tls: tls_cert.clone().zip(tls_key.clone()),
                ca_cert: cli.ca_cert.clone(),
                max_sessions_per_terminal: *max_sessions_per_terminal,
                max_memory_per_terminal_mib: *max_memory_per_terminal_mib,
                lost_after: *lost_after,
                operators: operator,
            };
            return cluster::control(plane).await;
        }
        Cmd::Token { cmd: TokenCmd::Create { terminal, expires_in, etcd } } if !etcd.is_empty() => {
            return cluster::create_token(etcd, terminal, *expires_in).await;
        }
        Cmd::Token { cmd: TokenCmd::Secret } => {
            println!("{}", strata_api::auth::new_token()?);
            return Ok(0);
        }
        _ => {}
    }
    if let Some(addr) = &cli.addr {
        let mut remote = remote::Remote::new(addr, cli.token.clone(), cli.ca_cert.as_deref())?;
        remote.os = cli.os;
        return verbs::shared(&remote, &cli.cmd, cli.quiet)
            .await
            .unwrap_or_else(|| Err(anyhow::anyhow!("this command works on this machine only; leave out --addr")));
    }
    let eng = engine(&cli)?;
    let bar = Bar::new(cli.quiet);
    let local = local::Local { eng: &eng, bar: &bar, terminal: &cli.terminal, quiet: cli.quiet, os: cli.os };
    if let Some(done) = verbs::shared(&local, &cli.cmd, cli.quiet).await {
        return done;
    }
    match &cli.cmd {
        Cmd::Images { cmd: ImagesCmd::Push { names } } => {
            for name in names {
                let pkg = eng.package(name)?;
                eng.publish_package(&pkg, &bar).await?;
            }
            bar.clear();
            Ok(0)
        }
        Cmd::Images { cmd: ImagesCmd::Verify } => {
            let mut bad = 0;
            for r in eng.store.list_images()? {
                for (role, d) in &r.files {
                    if let Err(e) = eng.store.verify_full(d) {
                        bad += 1;
                        println!("{} {} {role}: {e}", r.kind, &r.digest[..12]);
                    }
                }
            }
            println!("{bad} damaged blob(s)");
            Ok(if bad == 0 { 0 } else { 1 })
        }
        Cmd::Context { cmd: ContextCmd::Show { json } } => {
            let (version, settings, digest) = match eng.terminal_context(&cli.terminal)? {
                Some((rec, settings)) => (rec.version(), settings, rec.current),
                None => {
                    // Nothing stored yet: the terminal's own settings are version 1.
                    let settings = ContextSettings::from_terminal(terminal_size());
                    let (rec, _) = eng.set_terminal_context(&cli.terminal, &settings)?;
                    (rec.version(), settings, rec.current)
                }
            };
            if *json {
                let v = serde_json::json!({"terminal": cli.terminal, "version": version, "digest": digest, "settings": settings});
                println!("{v}");
            } else {
                println!("terminal {}: context image {} (version {version})", cli.terminal, &digest[..12]);
                println!("{}", serde_json::to_string_pretty(&settings)?);
            }
            Ok(0)
        }
        Cmd::Context { cmd: ContextCmd::Set { settings: kvs } } => {
            let mut settings = match eng.terminal_context(&cli.terminal)? {
                Some((_, s)) => s,
                None => ContextSettings::from_terminal(terminal_size()),
            };
            for kv in kvs {
                set_context_key(&mut settings, kv, &cli.terminal)?;
            }
            let (rec, _) = eng.set_terminal_context(&cli.terminal, &settings)?;
            println!("terminal {}: context image {} (version {})", cli.terminal, &rec.current[..12], rec.version());
            Ok(0)
        }
        Cmd::Serve {
            listen,
            max_sessions,
            max_sessions_per_terminal,
            max_memory_per_terminal_mib,
            pool,
            tls,
            tls_cert,
            tls_key,
            etcd,
            advertise,
            server_id,
            on_stop,
            pause_on_stop,
            operator,
            ..
        } => {
            if let Some(bad) = operator.iter().find(|t| !strata_api::auth::valid_terminal(t)) {
                anyhow::bail!("--operator {bad:?} is not a terminal name (letters, digits, - _ ., up to 64)");
            }
            let on_stop = match (pause_on_stop, on_stop) {
                (true, _) | (false, OnStopArg::Pause) => strata_api::live::OnStop::Pause,
                (false, OnStopArg::Keep) => strata_api::live::OnStop::Keep,
                (false, OnStopArg::Stop) => strata_api::live::OnStop::Stop,
            };
            if *max_sessions == 0 || *max_sessions_per_terminal == 0 {
                anyhow::bail!("--max-sessions and --max-sessions-per-terminal must be at least 1");
            }
            if *max_memory_per_terminal_mib < 128 {
                anyhow::bail!("--max-memory-per-terminal-mib must be at least 128 (the smallest guest)");
            }
            let limits = strata_api::Limits {
                max_sessions: *max_sessions,
                max_sessions_per_terminal: *max_sessions_per_terminal,
                max_memory_mib_per_terminal: *max_memory_per_terminal_mib,
                ..Default::default()
            };
            let tokens = tokens_file(&eng);
            let mut state = strata_api::AppState::new(std::sync::Arc::new(eng), tokens.clone(), limits)
                .map_err(anyhow::Error::msg)?;
            state.operators = operator.iter().cloned().collect();
            for (name, (min, max)) in pool {
                // Named as launches name it (no @OS for the default OS).
                let name = &pool_name(&state.engine, name)?;
                state.pool_targets.insert(name.clone(), *max);
                state.pool.follow(name, *min, *max);
            }
            {
                let mut store = state.tokens.write().unwrap_or_else(|e| e.into_inner());
                if store.is_empty() {
                    let token = store.create("default", None).map_err(anyhow::Error::msg)?;
                    let saved = tokens.with_file_name("default-token");
                    write_secret(&saved, &token)?;
                    eprintln!("strata: created the API token of terminal \"default\" (saved in {})", saved.display());
                }
            }
            let tls = match (tls_cert, tls_key) {
                (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
                _ if *tls => {
                    let (cert, key) = strata_api::tls::self_signed(
                        &state.engine.cfg.state_dir.join("tls"),
                        &[listen.ip().to_string()],
                    )
                    .map_err(anyhow::Error::msg)?;
                    eprintln!(
                        "strata: HTTPS with a self-signed certificate; clients trust it with --ca-cert {}",
                        cert.display()
                    );
                    Some((cert, key))
                }
                _ => None,
            };
            let tls = tls
                .map(|(cert, key)| strata_api::tls::server_config(&cert, &key))
                .transpose()
                .map_err(anyhow::Error::msg)?;
            let listener = std::net::TcpListener::bind(listen).with_context(|| format!("cannot listen on {listen}"))?;
            listener.set_nonblocking(true)?;
            let scheme = if tls.is_some() { "https" } else { "http" };
            state.web_dir = web_dir();
            if !etcd.is_empty() {
                let bound = listener.local_addr()?;
                let link = cluster::link(etcd, advertise.clone(), server_id.clone(), bound, scheme).await?;
                state.metrics = strata_api::metrics::Metrics::for_server(link.server_id.clone());
                state.cluster = Some(link);
            }
            println!("strata: serving the API on {scheme}://{}", listener.local_addr()?);
            let state = std::sync::Arc::new(state);
            let idle = Some(state.limits.idle_timeout);
            let adopted = state.sessions.adopt_paused(&state.engine, idle);
            if adopted > 0 {
                eprintln!("strata: {adopted} paused session(s) from before are listed again");
            }
            let running = state.sessions.adopt_running(&state.engine, idle, state.cluster.clone()).await;
            if running > 0 {
                eprintln!("strata: took back {running} running session(s) from before");
            }
            let resumed = state.sessions.resume_paused_on_stop(&state.engine).await;
            if resumed > 0 {
                eprintln!("strata: resumed {resumed} session(s) paused when the server last stopped");
            }
            // Kept for as long as the server runs; its lease lapses when it stops.
            let _registration = match state.cluster {
                Some(_) => Some(strata_api::cluster::join(state.clone()).await?),
                None => None,
            };
            for package in state.pool_targets.keys() {
                state.refill(package);
            }
            // This machine's CLI takes pooled sessions through it.
            let _local_socket = match state.pool_targets.is_empty() {
                true => None,
                false => Some(
                    strata_api::handover::listen(state.clone())
                        .with_context(|| format!("binding {}", strata_api::handover::SOCKET))?,
                ),
            };
            // Housekeeping: pools follow demand (grown on launches, trimmed
            // here); detached sessions past their idle time-out are paused;
            // paused sessions past their retention go. A planned stop lets
            // the round in progress end (a pause cut short would leave a
            // guest stopped) before the server stops.
            let (stop_housekeeping, mut housekeeping_stopped) = tokio::sync::watch::channel(false);
            let housekeeping = {
                let st = state.clone();
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
                    loop {
                        tokio::select! {
                            _ = tick.tick() => {}
                            _ = housekeeping_stopped.changed() => break,
                        }
                        for package in st.pool_targets.keys() {
                            st.pool.give_back(package).await;
                            st.refill(package);
                        }
                        // Sessions of this store it does not hold (the
                        // CLI's, detached) follow the same idle time-outs.
                        for id in st.engine.housekeep(Some(st.limits.idle_timeout)).await.removed {
                            if let Some(live) = st.sessions.get(&id) {
                                let (tx, rx) = tokio::sync::oneshot::channel();
                                if live.cmd.send(strata_api::live::Cmd::Kill(tx)).await.is_ok() {
                                    let _ = rx.await;
                                }
                            }
                        }
                    }
                })
            };
            let app = strata_api::router(state.clone());
            let served = listen::serve(listener, app, tls);
            let code = tokio::select! {
                r = served => { r?; 0 }
                code = stop_signal() => code?,
            };
            // A planned stop loses no session unless told to: each is left
            // running (or paused) for the next server.
            let _ = stop_housekeeping.send(true);
            if tokio::time::timeout(HOUSEKEEPING_ROUND_LIMIT, housekeeping).await.is_err() {
                tracing::warn!("a housekeeping round did not end in time; stopping without it");
            }
            let n = state.sessions.len();
            state.pool.drain().await;
            state.sessions.stop_all(&state.engine, on_stop).await;
            let how = match on_stop {
                strata_api::live::OnStop::Keep => "left running, to be taken back when the server starts again",
                strata_api::live::OnStop::Pause => "paused, to be resumed when the server starts again",
                strata_api::live::OnStop::Stop => "stopped (paused ones kept)",
            };
            eprintln!("strata: stopping; {n} session(s) {how}");
            Ok(code)
        }
        Cmd::Control { .. } | Cmd::Token { cmd: TokenCmd::Secret } => Ok(0),
        Cmd::Token { cmd: TokenCmd::Create { terminal, expires_in, .. } } => {
            let mut store = strata_api::auth::TokenStore::load(&tokens_file(&eng)).map_err(anyhow::Error::msg)?;
            println!("{}", store.create(terminal, *expires_in).map_err(anyhow::Error::msg)?);
            eprintln!("strata: a running server reads new tokens when it restarts");
            Ok(0)
        }
        Cmd::Completions { .. } => Ok(0),
        Cmd::Bench { cmd: BenchCmd::Load { package, rate, seconds, pool, json } } => {
            if !(0.1..=100.0).contains(rate) || *seconds == 0 || *seconds > 3600 || *pool > 64 {
                anyhow::bail!("--rate must be 0.1..100, --seconds 1..3600, --pool 0..64");
            }
            let pkg = eng.package(package)?;
            let r = eng.bench_load(&pkg, *rate, *seconds, *pool, &bar).await?;
            bar.clear();
            if *json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "strata bench load {} ({} launches at {}/s, pool {})",
                    r.package, r.requests, r.rate, r.pool_size
                );
                println!("latency p50 {:.1} ms, p99 {:.1} ms", r.latency_p50_ms, r.latency_p99_ms);
                println!(
                    "throughput {:.2} launches/s; {} from the pool, {} failed",
                    r.throughput, r.from_pool, r.failed
                );
                println!(
                    "CPU per launch (strata and its VMs, the pool's included): {:.1} ms, {:.0} page faults",
                    r.cpu_ms_per_launch, r.page_faults_per_launch
                );
            }
            Ok(0)
        }
        Cmd::Bench { cmd: BenchCmd::E2b { package, rate, seconds, pool, python, server_log, json } } => {
            if !(0.1..=50.0).contains(rate) || *seconds == 0 || *seconds > 3600 || *pool > 64 {
                anyhow::bail!("--rate must be 0.1..50, --seconds 1..3600, --pool 0..64");
            }
            eng.package(package)?;
            let r = bench_e2b::run(package, *rate, *seconds, *pool, python, server_log.as_deref()).await?;
            if *json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("strata bench e2b {} ({}/s for {} s each way, pool {})", r.package, r.rate, r.seconds, r.pool);
                println!("| path | p50 ms | p99 ms | failed | pool low |\n|---|---:|---:|---:|---:|");
                println!(
                    "| native API: POST /v1/sessions | {:.1} | {:.1} | {} | {} |",
                    r.native_p50_ms, r.native_p99_ms, r.native_failed, r.native_pool_low
                );
                println!(
                    "| E2B SDK: Sandbox.create + commands.run(\"echo hi\") | {:.1} | {:.1} | {} | {} |",
                    r.e2b_p50_ms, r.e2b_p99_ms, r.e2b_failed, r.e2b_pool_low
                );
                println!(
                    "| of which Sandbox.create | {:.1} | {:.1} | | |\n| of which commands.run(\"echo hi\") | {:.1} | {:.1} | | |",
                    r.create_p50_ms, r.create_p99_ms, r.run_p50_ms, r.run_p99_ms
                );
                println!("E2B p50 / native p50 = {:.2}x", r.ratio_p50);
            }
            Ok(0)
        }
        Cmd::Bench { cmd: BenchCmd::Cache { package, runs, json } } => {
            if *runs == 0 || *runs > 100 {
                anyhow::bail!("--runs must be between 1 and 100");
            }
            let pkg = eng.package(package)?;
            let r = eng.bench_cache(&pkg, *runs, &bar).await?;
            bar.clear();
            if *json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("strata bench cache {} ({} cold servers, {} warm launches each)", r.package, r.runs, r.runs);
                println!("{:<12} {:>10} {:>10}", "cache", "p50 ms", "p99 ms");
                println!("{:<12} {:>10.1} {:>10.1}", "cold", r.cold_p50_ms, r.cold_p99_ms);
                println!("{:<12} {:>10.1} {:>10.1}", "warm", r.warm_p50_ms, r.warm_p99_ms);
                println!(
                    "cold/warm p50: {:.1}x; a cold server fetched {:.1} MiB",
                    r.ratio_p50,
                    r.fetched_bytes as f64 / (1u64 << 20) as f64
                );
            }
            Ok(0)
        }
        Cmd::Bench { cmd: BenchCmd::Placement { servers, decisions, json } } => {
            if *servers == 0 || *decisions == 0 || *servers > 1_000_000 || *decisions > 10_000_000 {
                anyhow::bail!("--servers must be 1..=1000000 and --decisions 1..=10000000");
            }
            let timings = strata_placement::simulate(*servers, *decisions, 42);
            if *json {
                println!("{}", serde_json::json!({"servers": servers, "rules": timings}));
            } else {
                println!("strata bench placement ({servers} simulated servers, {decisions} decisions per rule)");
                println!("{:<14} {:>10} {:>10} {:>12}", "rule", "p50 us", "p99 us", "on a cache");
                for t in timings {
                    println!("{:<14} {:>10.2} {:>10.2} {:>11.1}%", t.rule, t.p50_us, t.p99_us, t.local_share * 100.0);
                }
            }
            Ok(0)
        }
        Cmd::Bench { cmd: BenchCmd::Confine { package, runs, json } } => {
            if *runs == 0 || *runs > 1000 {
                anyhow::bail!("--runs must be between 1 and 1000");
            }
            let pkg = eng.package(package)?;
            let r = eng.bench_confine(&pkg, *runs, &bar).await?;
            bar.clear();
            if *json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("strata bench confine {} ({} launches each way, accel {})", r.package, r.runs, r.accel);
                println!(
                    "{:<12} {:>10} {:>10} {:>16} {:>20}",
                    "path", "p50 ms", "p99 ms", "CPU/launch ms", "private MiB (idle)"
                );
                for (name, side) in [("unconfined", &r.unconfined), ("confined", &r.confined)] {
                    println!(
                        "{:<12} {:>10.1} {:>10.1} {:>16.1} {:>20.1}",
                        name, side.p50_ms, side.p99_ms, side.cpu_mean_ms, side.private_mean_mib
                    );
                }
                println!(
                    "confinement costs {:+.1}% CPU per launch and {:+.2} MiB per idle session",
                    r.cpu_cost * 100.0,
                    r.memory_cost_mib
                );
            }
            Ok(0)
        }
        Cmd::Bench { cmd: BenchCmd::Fork { package, copies, rounds, json } } => {
            if *copies == 0 || *copies > strata_engine::fork::MAX_FORKS || *rounds == 0 || *rounds > 100 {
                anyhow::bail!(
                    "-n must be between 1 and {} and --rounds between 1 and 100",
                    strata_engine::fork::MAX_FORKS
                );
            }
            let pkg = eng.package(package)?;
            let r = eng.bench_fork(&pkg, *copies, *rounds, &bar).await?;
            bar.clear();
            if *json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                use strata_engine::bench::percentile as pct;
                println!(
                    "strata bench fork {} ({} copies, {} rounds, {} MiB guests, accel {})",
                    r.package, r.copies, r.rounds, r.memory_mib, r.accel
                );
                println!("{:<34} {:>10} {:>10}", "", "p50 ms", "p99 ms");
                for (name, v) in [
                    ("parent stopped", &r.parent_stopped_ms),
                    ("parent running on", &r.captured_ms),
                    ("every copy answering (fork)", &r.forks_answering_ms),
                    ("every session answering (launch)", &r.launches_answering_ms),
                ] {
                    println!("{:<34} {:>10.1} {:>10.1}", name, pct(v, 50.0), pct(v, 99.0));
                }
                println!(
                    "memory per copy: Pss {:.1} MiB, Rss {:.1} MiB; per launched session: Pss {:.1} MiB, Rss {:.1} MiB",
                    r.fork_pss_mib, r.fork_rss_mib, r.launch_pss_mib, r.launch_rss_mib
                );
            }
            Ok(0)
        }
        Cmd::Bench { cmd: BenchCmd::Move { package, rounds, memory_mib, json } } => {
            if *rounds == 0 || *rounds > 100 {
                anyhow::bail!("--rounds must be between 1 and 100");
            }
            let mut pkg = eng.package(package)?;
            if let Some(mib) = memory_mib {
                if !(128..=16384).contains(mib) {
                    anyhow::bail!("--memory-mib must be between 128 and 16384");
                }
                pkg.def.memory_mib = *mib;
            }
            let r = eng.bench_move(&pkg, *rounds, &bar).await?;
            bar.clear();
            if *json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                use strata_engine::bench::percentile as pct;
                println!(
                    "strata bench move {} ({} rounds, {} MiB guests, accel {})",
                    r.package, r.rounds, r.memory_mib, r.accel
                );
                println!("{:<40} {:>10} {:>10}", "", "p50 ms", "p99 ms");
                for (name, v) in [
                    ("guest stopped (live move)", &r.downtime_ms),
                    ("answering again (live move)", &r.move_answering_ms),
                    ("answering again (pause, resume)", &r.pause_resume_answering_ms),
                ] {
                    println!("{:<40} {:>10.1} {:>10.1}", name, pct(v, 50.0), pct(v, 99.0));
                }
            }
            Ok(0)
        }
        Cmd::Bench { cmd: BenchCmd::Density { package, sessions, idle, json } } => {
            if *sessions == 0 || *sessions > 1000 {
                anyhow::bail!("--sessions must be between 1 and 1000");
            }
            if *idle > 3600 {
                anyhow::bail!("--idle must be at most 3600 seconds");
            }
            let pkg = eng.package(package)?;
            let r = eng.bench_density(&pkg, *sessions, std::time::Duration::from_secs(*idle), &bar).await?;
            bar.clear();
            if *json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "strata bench density {} ({} idle sessions, {} MiB guests, measured after {} s idle)",
                    r.package, r.sessions, r.guest_memory_mib, r.idle_seconds
                );
                println!(
                    "private memory per session: mean {:.1} MiB, max {:.1} MiB",
                    r.private_mean_mib, r.private_max_mib
                );
                println!("RSS per session (shared pages counted in each): mean {:.1} MiB", r.rss_mean_mib);
                println!("host memory used by all of them: {:.0} MiB", r.host_memory_used_mib);
                println!("CPU per idle session: mean {:.2}% of one core", r.idle_cpu_percent_mean);
                println!(
                    "CPU per session in its first {} s after the launch: mean {:.1} ms",
                    strata_engine::bench::SETTLE.as_secs(),
                    r.settle_cpu_ms_mean
                );
            }
            Ok(0)
        }
        Cmd::Doctor => Ok(doctor(&eng)),
        Cmd::Keep => keeper::run(&eng).await,
        Cmd::Accel => {
            let base = eng.ensure_base(eng.cfg.default_os, &bar).await?;
            bar.clear();
            println!("{}", eng.accel_for(&base).await?);
            Ok(0)
        }
        Cmd::Bench { cmd: BenchCmd::Launch { package, runs, pool, typed, svg, json } } => {
            if *runs == 0 || *runs > 1000 {
                anyhow::bail!("--runs must be between 1 and 1000");
            }
            let pkg = eng.package(package)?;
            if *typed && !pkg.def.graphical {
                anyhow::bail!("--typed measures a graphical package's display; {} has none", pkg.name);
            }
            let r = eng.bench_launch(&pkg, *runs, *pool, *typed, &bar).await?;
            bar.clear();
            if let Some(path) = svg {
                std::fs::write(path, strata_engine::bench::latency_svg(&r))
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            if *json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("strata bench launch {} ({} runs each way, accel {})", r.package, r.runs, r.accel);
                println!("{:<14} {:>10} {:>10}", "path", "p50 ms", "p99 ms");
                println!("{:<14} {:>10.1} {:>10.1}", "cold boot", r.cold_p50_ms, r.cold_p99_ms);
                println!("{:<14} {:>10.1} {:>10.1}", "launch image", r.launch_p50_ms, r.launch_p99_ms);
                if let (Some(p50), Some(p99)) = (r.pool_p50_ms, r.pool_p99_ms) {
                    println!("{:<14} {:>10.1} {:>10.1}", "warm pool", p50, p99);
                }
                if let (Some(p50), Some(p99)) = (r.scripted_p50_ms, r.scripted_p99_ms) {
                    println!("{:<14} {:>10.1} {:>10.1}", "scripted", p50, p99);
                }
                println!("ratio p50 (cold / launch image): {:.1}x", r.ratio_p50);
                if let Some(p50) = r.scripted_p50_ms {
                    println!("ratio p50 (scripted / launch image): {:.2}x", p50 / r.launch_p50_ms);
                }
                if let Some(ratio) = r.pool_ratio_p50 {
                    println!("ratio p50 (cold / warm pool):    {ratio:.1}x");
                }
                if let Some(t) = &r.typed {
                    use strata_engine::bench::percentile;
                    println!("to the first frame (above) and to the first typed character drawn:");
                    for (path, ms) in
                        [("cold boot", &t.cold_ms), ("launch image", &t.launch_ms), ("warm pool", &t.pool_ms)]
                    {
                        if !ms.is_empty() {
                            println!("{path:<14} {:>10.1} {:>10.1}", percentile(ms, 50.0), percentile(ms, 99.0));
                        }
                    }
                    if !t.launch_ms.is_empty() {
                        let ratio = percentile(&t.cold_ms, 50.0) / percentile(&t.launch_ms, 50.0);
                        println!("ratio p50, typed (cold / launch image): {ratio:.1}x");
                    }
                }
            }
            Ok(0)
        }
        // The shared verbs returned above.
        _ => unreachable!("a verb every backend has is run by verbs::shared"),
    }
}

/// The web page's directory: `STRATA_WEB`, or `web/` of the source tree the
/// binary was built in.
/// A signal by name (`TERM`, `SIGTERM`, any case) or number, 1 to 64.
pub(crate) fn signal_number(s: &str) -> anyhow::Result<i32> {
    if let Ok(n) = s.parse::<i32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
    }
    let name = s.to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    let known = [
        ("HUP", libc::SIGHUP),
        ("INT", libc::SIGINT),
        ("QUIT", libc::SIGQUIT),
        ("KILL", libc::SIGKILL),
        ("USR1", libc::SIGUSR1),
        ("USR2", libc::SIGUSR2),
        ("TERM", libc::SIGTERM),
        ("CONT", libc::SIGCONT),
        ("STOP", libc::SIGSTOP),
    ];
    known.iter().find(|(n, _)| *n == name).map(|(_, v)| *v).ok_or_else(|| {
        anyhow::anyhow!(
            "{s:?} is not a signal: give a number (1 to 64) or a name ({})",
            known.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
        )
    })
}

pub(crate) fn web_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("STRATA_WEB") {
        return Some(PathBuf::from(d));
    }
    let exe = std::env::current_exe().ok()?;
    exe.ancestors().map(|a| a.join("web")).find(|w| w.join("package.json").is_file())
}

/// Parses `PACKAGE=MAX` or `PACKAGE=MIN-MAX` for `serve --pool`.
fn parse_pool_target(s: &str) -> Result<(String, (usize, usize)), String> {
    let (pkg, range) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected PACKAGE=MAX or PACKAGE=MIN-MAX"))?;
    let number = |n: &str| n.parse::<usize>().map_err(|_| format!("{s:?}: {n:?} is not a number of sessions"));
    let (min, max) = match range.split_once('-') {
        Some((lo, hi)) => (number(lo)?, number(hi)?),
        None => {
            let max = number(range)?;
            (max.min(1), max)
        }
    };
    if max > 64 || min > max {
        return Err(format!("{s:?}: MIN-MAX must have MIN <= MAX <= 64"));
    }
    Ok((pkg.to_string(), (min, max)))
}

/// Checks the package of a pool's name (`PACKAGE` or `e2b:PACKAGE`, with
/// `@OS` after either) on its OS; the name as launches name that pool.
fn pool_name(eng: &Engine, name: &str) -> anyhow::Result<String> {
    let key = strata_engine::pool::PoolKey::parse(name);
    let pkg = key.resolve(eng).with_context(|| format!("--pool {name}"))?;
    Ok(strata_engine::pool::PoolKey::of(&pkg, key.e2b, eng.cfg.default_os).name())
}

fn tokens_file(eng: &Engine) -> PathBuf {
    eng.cfg.state_dir.join("api-tokens.json")
}

/// Writes a secret readable by its owner only.
fn write_secret(path: &std::path::Path, secret: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(secret.as_bytes())?;
    Ok(())
}

/// Runs the terminal until the session ends or is detached; returns
/// strata's exit code (the program's own when it exited).
async fn finish(mut session: strata_engine::Session, tty: bool) -> anyhow::Result<u8> {
    let end = attach(&mut session, tty).await?;
    Ok(match end {
        AttachEnd::Exited(code) => {
            session.close().await;
            code.clamp(0, 255) as u8
        }
        AttachEnd::Detached if session.detachable() => {
            let id = session.detach().await?;
            eprintln!("\r\nstrata: detached from session {id}; `strata attach {id}` returns to it, `strata kill {id}` stops it");
            0
        }
        AttachEnd::Detached => {
            session.close().await;
            eprintln!("\r\nstrata: this session cannot be detached; it was stopped");
            0
        }
        AttachEnd::Lost(why) => {
            session.close().await;
            eprintln!("\r\nstrata: session lost: {why}");
            1
        }
        AttachEnd::Interrupted => {
            session.close().await;
            130
        }
        // Whoever reads the terminal is gone; nothing is printed to it.
        AttachEnd::Vanished if session.detachable() => {
            session.leave("detached: its terminal went away (hangup)").await;
            129
        }
        AttachEnd::Vanished => {
            session.close().await;
            129
        }
    })
}

/// How long ago a Unix time was, briefly.
fn age(unix_secs: i64) -> String {
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let s = (now - unix_secs).max(0);
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// Prints what `images prune` removed (or would), from its report
/// (the API's body; the local engine's report has the same shape).
fn print_prune(v: &serde_json::Value, dry_run: bool, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        return;
    }
    let images = v["images"].as_array().cloned().unwrap_or_default();
    let verb = if dry_run { "would remove" } else { "removed" };
    for i in &images {
        println!(
            "{verb} {} {} {} ({})",
            i["kind"].as_str().unwrap_or(""),
            i["digest"].as_str().unwrap_or("").get(..12).unwrap_or(""),
            i["package"].as_str().unwrap_or("-"),
            human(i["size"].as_u64().unwrap_or(0))
        );
    }
    if dry_run {
        println!("{} superseded image(s); nothing removed (dry run)", images.len());
    } else {
        let (blobs, bytes) = (&v["removed_blobs"], human(v["freed_bytes"].as_u64().unwrap_or(0)));
        println!("removed {} image(s); {blobs} blob(s), {bytes} freed", images.len());
    }
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Percent-encodes a guest path for a query string.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Parses `90s`, `30m`, `12h` or `7d`.
/// `exec --env`: KEY=VALUE with a name a shell accepts.
fn parse_env_var(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    let name_ok = k.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !name_ok {
        return Err(format!("{k:?} is not a variable name (letters, digits and _, not starting with a digit)"));
    }
    Ok((k.to_string(), v.to_string()))
}

/// `--idle-timeout`: seconds, 0 for `never`.
fn parse_idle_timeout(s: &str) -> Result<u64, String> {
    if s == "never" {
        return Ok(0);
    }
    parse_duration(s).map(|d| d.as_secs())
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("{s:?} is not a duration like 90s, 30m, 12h or 7d");
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => n,
        "m" => n.checked_mul(60).ok_or_else(bad)?,
        "h" => n.checked_mul(3600).ok_or_else(bad)?,
        "d" => n.checked_mul(86400).ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    if secs == 0 || secs > 10 * 365 * 86400 {
        return Err(format!("{s:?} is out of range (1s to 3650d)"));
    }
    Ok(std::time::Duration::from_secs(secs))
}

/// `strata doctor`: each layer of a VM's confinement on this server, with
/// what to set up where one is missing. Exits 1 if a VM could not start.
fn doctor(eng: &Engine) -> u8 {
    let l = eng.cfg.vm_limits;
    let mut ok = true;
    let line = |layer: &str, state: &str| println!("{layer:<14} {state}");
    line("seccomp", &format!("on for every QEMU: -sandbox {}", strata_vmm::qemu::SANDBOX));
    line("no_new_privs", "on for every QEMU (nothing it executes gains privileges)");
    line("namespaces", "mount, IPC and UTS of its own for every QEMU; not yet pid (issue 19)");
    match eng.cgroups() {
        Ok(where_) => line(
            "cgroups",
            &format!(
                "one per VM, {where_}: {}% of a CPU, guest RAM + {} MiB, {} tasks",
                l.cpu_percent, l.memory_allowance_mib, l.pids
            ),
        ),
        Err(why) => {
            ok = false;
            line("cgroups", &format!("MISSING, no VM can start: {why}"));
        }
    }
    line(
        "files bound",
        &format!(
            "each file a session's QEMU writes at most its package's disk_mib + 256 MiB, capped at {} MiB \
             (STRATA_DISK_MIB; never below its guest's RAM + 64 MiB); console logs {} KiB; {} open files",
            l.disk_mib,
            strata_vmm::CONSOLE_LOG_MAX >> 10,
            strata_vmm::OPEN_FILES_MAX
        ),
    );
    match eng.identities() {
        Ok(range) => line("identity", &format!("a uid and gid of its own per VM ({range}), no capabilities")),
        Err(why) => {
            ok = false;
            line("identity", &format!("MISSING, no VM can start: {why}"));
        }
    }
    line(
        "files",
        "a mount namespace per QEMU: QEMU itself, its session's directory and its own images' files; its \
         session's files are its uid's alone",
    );
    match eng.guest_firewall() {
        Ok(table) => line(
            "network",
            &format!(
                "nftables table {table}: guests reach no address of this host and no private, link-local or \
                 metadata network; only the outside world and DNS"
            ),
        ),
        Err(why) => {
            ok = false;
            line("network", &format!("MISSING: {why}"));
        }
    }
    u8::from(!ok)
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::{Cli, Cmd, ImagesCmd};

    #[test]
    fn every_command_line_parses_without_clashing_with_global_options() {
        Cli::command().debug_assert();
        // `images push` once shared its field's name with the global --packages.
        let cli = Cli::try_parse_from(["strata", "--packages", "/p", "images", "push", "bc", "python3"]).unwrap();
        assert!(matches!(cli.cmd, Cmd::Images { cmd: ImagesCmd::Push { ref names } } if names == &["bc", "python3"]));
        for args in [
            &["strata", "serve", "--etcd", "http://127.0.0.1:2379", "--server-id", "a"][..],
            &["strata", "control", "--etcd", "http://127.0.0.1:2379", "--rule", "least-loaded"],
            &["strata", "token", "create", "alice", "--etcd", "http://127.0.0.1:2379"],
            &["strata", "token", "secret"],
        ] {
            Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        }
    }
}
