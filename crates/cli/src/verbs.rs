//! The verbs on sessions, images, packages and servers, written once
//! against [`Backend`]: this machine's engine ([`crate::local::Local`]) and a
//! server or control plane reached over HTTP ([`crate::remote::Remote`])
//! implement it. A verb validates its arguments, calls, and prints the same
//! columns whichever backend answered.

use std::path::Path;

use serde_json::Value;

use strata_engine::builds::{BuildState, BuildStatus};

use crate::{
    age, copy_plan, human, print_prune, stdin_is_tty, BuildsCmd, Cmd, CommandsCmd, DeviceArgs, ImagesCmd, PackagesCmd,
    ServersCmd,
};

/// A session as `ps` shows it.
pub struct SessionRow {
    pub id: String,
    pub package: String,
    /// running, paused, exited or lost.
    pub state: String,
    pub attached: bool,
    /// The OS its guest runs.
    pub os: String,
    /// The server that runs it, when a control plane says.
    pub server: Option<String>,
    /// What happened to it beside its state (a server's outage).
    pub note: Option<String>,
    /// Why it ended (exited, lost): the first line.
    pub why: Option<String>,
    /// Unix seconds.
    pub created: i64,
}

/// An image as `images ls` and `build` show it.
pub struct ImageRow {
    pub kind: String,
    pub digest: String,
    pub package: Option<String>,
    pub os: String,
    pub size: u64,
    pub created: i64,
    /// A snapshot's name ("" for a fork's own).
    pub snapshot: Option<String>,
}

/// A server as `servers ls` shows it.
pub struct ServerRow {
    pub name: String,
    /// Where a terminal reaches it (`None`: this machine, or the server asked).
    pub address: Option<String>,
    pub sessions: u64,
    pub memory_available_mib: u64,
    pub guest_memory_committed_mib: u64,
    pub load1: f64,
    /// Packages whose images it holds, when a control plane says.
    pub cached: Vec<String>,
}

/// How `run` launches and attaches.
#[derive(Clone)]
pub struct RunHow {
    /// Give the program this terminal (raw mode), else pipe input.
    pub tty: bool,
    /// Print the session's id instead of attaching.
    pub detach: bool,
    /// Boot it instead of restoring its launch image.
    pub cold: bool,
    /// Seconds it may stay detached (0: never; `None`: the server's default).
    pub idle_timeout: Option<u64>,
    /// A graphical package's other program to launch (from a launch image
    /// of its own) instead of its own; empty: its own.
    pub command: Vec<String>,
}

/// A command as `commands ls` shows it.
pub struct CommandRow {
    pub id: u32,
    pub argv: Vec<String>,
    pub pty: bool,
}

/// What `build` did.
pub enum Built {
    Images(Vec<ImageRow>),
    /// Left running on its own (its id, where the backend knows it).
    Started(Option<String>),
}

/// Prints a build's step when it changes (not with `quiet`).
fn build_printer(quiet: bool) -> impl FnMut(&BuildStatus) + Send {
    let mut last = String::new();
    move |s: &BuildStatus| {
        if !quiet && s.step != last {
            eprintln!("strata: [{:>3.0}%] {}", s.progress * 100.0, s.step);
            last.clone_from(&s.step);
        }
    }
}

/// What every verb needs of where sessions run. Each listing also returns
/// the backend's whole answer, which `--json` prints.
pub trait Backend {
    async fn sessions(&self) -> anyhow::Result<(Vec<SessionRow>, Value)>;
    async fn kill(&self, id: &str) -> anyhow::Result<()>;
    /// Pauses a session to an image; what to print.
    async fn pause(&self, id: &str) -> anyhow::Result<String>;
    async fn resume(&self, id: &str) -> anyhow::Result<()>;
    /// Forks session `id` into `count` copies: each copy's id or why it
    /// failed, and how long the parent was stopped (ms).
    async fn fork(&self, id: &str, count: usize, spread: bool) -> anyhow::Result<(Vec<Result<String, String>>, f64)>;
    /// Saves session `id` as snapshot `name`; what to print.
    async fn snapshot(&self, id: &str, name: &str) -> anyhow::Result<String>;
    /// Drains server `server` (`on`) or lets it take launches again; the
    /// plane's answer.
    async fn drain(&self, server: &str, on: bool) -> anyhow::Result<Value>;
    /// Moves running session `id` to server `to` (or one placement picks)
    /// by live migration; what to print.
    async fn move_session(&self, id: &str, to: Option<&str>) -> anyhow::Result<String>;
    /// Starts a session from snapshot `name` and attaches this terminal (or
    /// prints the id, with `detach`).
    async fn run_snapshot(&self, name: &str, how: RunHow) -> anyhow::Result<u8>;
    async fn logs(&self, id: &str) -> anyhow::Result<Vec<u8>>;
    /// Copies a file into the guest (`into_guest`) or out of it; the bytes.
    async fn copy(&self, id: &str, guest: &str, host: &Path, into_guest: bool) -> anyhow::Result<u64>;
    /// Launches `package` and attaches this terminal (or prints the id,
    /// with `detach`); the program's exit status.
    async fn run(&self, package: &str, devices: &DeviceArgs, how: RunHow) -> anyhow::Result<u8>;
    async fn attach(&self, id: &str, tty: bool) -> anyhow::Result<u8>;
    /// Launches `package` and runs `command` in it with pipes, this
    /// process's standard input passed on, instead of attaching to the
    /// program; the session ends with it. Its exit status.
    async fn run_command(
        &self,
        package: &str,
        devices: &DeviceArgs,
        command: strata_engine::GuestCommand,
    ) -> anyhow::Result<u8>;
    /// The package's own program as a command with pipes, for a run whose
    /// input is not a terminal (like `docker run -i`); `None` where the
    /// program is only attached to (a graphical package, or a server that
    /// runs no commands yet).
    async fn piped_program(&self, package: &str) -> anyhow::Result<Option<strata_engine::GuestCommand>>;
    /// Runs `command` in session `id` with pipes, this process's standard
    /// input passed on with `stdin`, or on a PTY of this terminal's size
    /// with `tty` (input passed on, this terminal in raw mode); its exit
    /// status.
    async fn exec(&self, id: &str, command: strata_engine::GuestCommand, stdin: bool, tty: bool) -> anyhow::Result<u8>;
    /// The commands that run in session `id` (whoever started them).
    async fn commands(&self, id: &str) -> anyhow::Result<(Vec<CommandRow>, Value)>;
    /// Sends `signal` to command `command` of session `id` and its process group.
    async fn signal_command(&self, id: &str, command: u32, signal: i32) -> anyhow::Result<()>;
    /// Reconnects to command `command` of session `id`: its output from now
    /// on to ours, this process's input to it with `stdin`; its status.
    async fn attach_command(&self, id: &str, command: u32, stdin: bool) -> anyhow::Result<u8>;
    /// Builds what is missing of `package`'s images (joining a build of
    /// them that runs), each change of the build given to `seen`: its
    /// images; or, with `detach`, starts it to go on without this process:
    /// its id, if known.
    async fn build(
        &self,
        package: &str,
        detach: bool,
        seen: &mut (dyn FnMut(&BuildStatus) + Send),
    ) -> anyhow::Result<Built>;
    /// The builds that did work, newest first.
    async fn builds(&self) -> anyhow::Result<(Vec<BuildStatus>, Value)>;
    /// Build `id` as it is; with `follow`, each change is given to `seen`
    /// until it ends.
    async fn follow_build(
        &self,
        id: &str,
        follow: bool,
        seen: &mut (dyn FnMut(&BuildStatus) + Send),
    ) -> anyhow::Result<BuildStatus>;
    async fn images(&self) -> anyhow::Result<(Vec<ImageRow>, Value)>;
    async fn remove_image(&self, digest: &str) -> anyhow::Result<()>;
    /// Removes unreferenced blobs: (blobs, bytes).
    async fn gc(&self) -> anyhow::Result<(u64, u64)>;
    async fn prune(&self, dry_run: bool) -> anyhow::Result<Value>;
    /// (name, description) of each package.
    /// Each defined package: name, the OSes it is made for, description.
    async fn packages(&self) -> anyhow::Result<(Vec<(String, String, String)>, Value)>;
    async fn servers(&self) -> anyhow::Result<(Vec<ServerRow>, Value)>;
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Runs `op` on each id, printing `id` (or what `op` says) or the error;
/// 1 if any failed.
async fn each<F, Fut>(ids: &[String], op: F) -> u8
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<String>>>,
{
    let mut code = 0;
    for id in ids {
        match op(id.clone()).await {
            Ok(said) => println!("{}", said.unwrap_or_else(|| id.clone())),
            Err(e) => {
                eprintln!("strata: {id}: {e:#}");
                code = 1;
            }
        }
    }
    code
}

/// Runs `cmd` if it is a verb every backend has; `None` for the others.
pub async fn shared<B: Backend>(b: &B, cmd: &Cmd, quiet: bool) -> Option<anyhow::Result<u8>> {
    let is_tty = stdin_is_tty();
    Some(match cmd {
        Cmd::Run { package, from, interactive, tty, cold, detach, idle_timeout, devices, command } => {
            if *tty && !is_tty {
                return Some(Err(anyhow::anyhow!(
                    "--tty needs standard input to be a terminal; leave it out to pipe input"
                )));
            }
            if let Some(name) = from {
                if devices.given() {
                    return Some(Err(anyhow::anyhow!(
                        "a session from a snapshot has the snapshot's context (its devices): leave out the device options"
                    )));
                }
                let how = RunHow {
                    tty: is_tty,
                    detach: *detach,
                    cold: false,
                    idle_timeout: *idle_timeout,
                    command: Vec::new(),
                };
                return Some(b.run_snapshot(name, how).await);
            }
            let Some(package) = package else {
                return Some(Err(anyhow::anyhow!("name a package to run, or a snapshot with --from")));
            };
            // A graphical package's other program (`x11-apps -- xcalc`) is
            // launched on its display, from a launch image of its own.
            let graphical = if command.is_empty() {
                false
            } else {
                match b.piped_program(package).await {
                    Ok(program) => program.is_none(),
                    Err(e) => return Some(Err(e)),
                }
            };
            if !command.is_empty() && !graphical {
                if *detach || *cold || *tty {
                    return Some(Err(anyhow::anyhow!(
                        "a command after `--` runs with pipes in a fresh session: leave out --detach, --cold and --tty"
                    )));
                }
                let command = strata_engine::GuestCommand { argv: command.clone(), ..Default::default() };
                return Some(b.run_command(package, devices, command).await);
            }
            // Input from a pipe or a file: a fresh process of the package's
            // program with pipes in the restored VM, so that stdout carries
            // only its output (no echo, prompt or terminal codes) and the
            // end of input reaches it (the program on the launch image's
            // terminal would echo and wait for a newline). `-i` attaches
            // to that terminal instead.
            if !is_tty && !*interactive && !*detach && !*cold {
                match b.piped_program(package).await {
                    Ok(Some(program)) => return Some(b.run_command(package, devices, program).await),
                    Ok(None) => {}
                    Err(e) => return Some(Err(e)),
                }
            }
            let how = RunHow {
                tty: is_tty && (*tty || !*interactive),
                detach: *detach,
                cold: *cold,
                idle_timeout: *idle_timeout,
                command: command.clone(),
            };
            b.run(package, devices, how).await
        }
        Cmd::Attach { id } => b.attach(id, is_tty).await,
        Cmd::Exec { interactive, tty, detach, env, workdir, user, id, command } => {
            if *tty && !is_tty {
                return Some(Err(anyhow::anyhow!(
                    "--tty needs standard input to be a terminal; leave it out to pipe input"
                )));
            }
            let argv = if *detach { in_background(command) } else { command.clone() };
            let command =
                strata_engine::GuestCommand { argv, env: env.clone(), cwd: workdir.clone(), user: user.clone() };
            b.exec(id, command, *interactive, *tty).await
        }
        Cmd::Logs { id } => b.logs(id).await.and_then(|bytes| {
            std::io::Write::write_all(&mut std::io::stdout(), &bytes)?;
            Ok(0)
        }),
        Cmd::Kill { ids } => Ok(each(ids, |id| async move { b.kill(&id).await.map(|()| None) }).await),
        Cmd::Pause { ids } => Ok(each(ids, |id| async move { b.pause(&id).await.map(Some) }).await),
        Cmd::Fork { id, count, spread } => {
            if !(1..=strata_engine::fork::MAX_FORKS).contains(count) {
                return Some(Err(anyhow::anyhow!(
                    "-n {count} is out of range: a fork makes 1 to {} copies",
                    strata_engine::fork::MAX_FORKS
                )));
            }
            b.fork(id, *count, *spread).await.map(|(forks, stopped_ms)| {
                let mut code = 0;
                for f in &forks {
                    match f {
                        Ok(id) => println!("{id}"),
                        Err(e) => {
                            eprintln!("strata: a copy of {id} failed: {e}");
                            code = 1;
                        }
                    }
                }
                if !quiet {
                    eprintln!("strata: {id} was stopped {stopped_ms:.0} ms for the fork; it runs on");
                }
                code
            })
        }
        Cmd::Move { id, to } => b.move_session(id, to.as_deref()).await.map(|said| {
            println!("{said}");
            0
        }),
        Cmd::Snapshot { id, name } => b.snapshot(id, name).await.map(|said| {
            println!("{said}");
            0
        }),
        Cmd::Resume { ids } => Ok(each(ids, |id| async move { b.resume(&id).await.map(|()| None) }).await),
        Cmd::Ps { json } => b.sessions().await.map(|(rows, v)| {
            if *json {
                print_json(&v);
            } else {
                print_sessions(&rows);
            }
            0
        }),
        Cmd::Cp { src, dst } => {
            let copied = async {
                let (id, guest, host, into_guest) = copy_plan(src, dst)?;
                let host = strata_engine::context::absolute(Path::new(host));
                b.copy(id, guest, &host, into_guest).await
            };
            copied.await.map(|n| {
                if !quiet {
                    eprintln!("strata: copied {}", human(n));
                }
                0
            })
        }
        Cmd::Build { package, detach } => b.build(package, *detach, &mut build_printer(quiet)).await.map(|built| {
            match built {
                Built::Images(rows) => {
                    for r in rows {
                        println!("{:<8} {}  {}", r.kind, r.digest.get(..12).unwrap_or(&r.digest), human(r.size));
                    }
                }
                Built::Started(Some(id)) => println!("{id}"),
                Built::Started(None) => {
                    eprintln!("strata: building {package} in the background; `strata builds ls` shows it")
                }
            }
            0
        }),
        Cmd::Commands { cmd: CommandsCmd::Ls { session, json } } => b.commands(session).await.map(|(rows, v)| {
            if *json {
                print_json(&v);
            } else {
                println!("{:<10} {:<4} COMMAND", "ID", "PTY");
                for c in rows {
                    println!("{:<10} {:<4} {}", c.id, if c.pty { "yes" } else { "no" }, c.argv.join(" "));
                }
            }
            0
        }),
        Cmd::Commands { cmd: CommandsCmd::Kill { session, id, signal } } => match crate::signal_number(signal) {
            Ok(n) => b.signal_command(session, *id, n).await.map(|()| 0),
            Err(e) => Err(e),
        },
        Cmd::Commands { cmd: CommandsCmd::Attach { session, id, interactive } } => {
            b.attach_command(session, *id, *interactive).await
        }
        Cmd::Builds { cmd: BuildsCmd::Ls { json } } => b.builds().await.map(|(rows, v)| {
            if *json {
                print_json(&v);
            } else {
                print_builds(&rows);
            }
            0
        }),
        Cmd::Builds { cmd: BuildsCmd::Show { id, follow } } => {
            b.follow_build(id, *follow, &mut build_printer(quiet || !*follow)).await.map(|s| {
                print_builds(std::slice::from_ref(&s));
                if !*follow {
                    for line in &s.log {
                        println!("  {line}");
                    }
                }
                match s.state {
                    BuildState::Done | BuildState::Running => 0,
                    BuildState::Failed | BuildState::Interrupted => 1,
                }
            })
        }
        Cmd::Images { cmd: ImagesCmd::Ls { json } } => b.images().await.map(|(rows, v)| {
            if *json {
                print_json(&v);
            } else {
                print_images(&rows);
            }
            0
        }),
        Cmd::Images { cmd: ImagesCmd::Rm { digests } } => {
            Ok(each(digests, |d| async move { b.remove_image(&d).await.map(|()| None) }).await)
        }
        Cmd::Images { cmd: ImagesCmd::Gc } => b.gc().await.map(|(n, bytes)| {
            println!("removed {n} blob(s), {}", human(bytes));
            0
        }),
        Cmd::Images { cmd: ImagesCmd::Prune { dry_run, json } } => b.prune(*dry_run).await.map(|v| {
            print_prune(&v, *dry_run, *json);
            0
        }),
        Cmd::Packages { cmd: PackagesCmd::Ls { json } } => b.packages().await.map(|(rows, v)| {
            if *json {
                print_json(&v);
            } else {
                println!("{:<16} {:<20} DESCRIPTION", "PACKAGE", "OS");
                for (name, os, description) in rows {
                    println!("{name:<16} {os:<20} {description}");
                }
            }
            0
        }),
        Cmd::Servers { cmd: ServersCmd::Drain { server } } => b.drain(server, true).await.map(|v| {
            for s in v["sessions"].as_array().into_iter().flatten() {
                let id = s["id"].as_str().unwrap_or("?");
                match s["moved_to"].as_str() {
                    Some(to) => println!("{id} moved to {to}"),
                    None => println!("{id} stays: {}", s["error"].as_str().unwrap_or("?")),
                }
            }
            let left = v["sessions_left"].as_u64().unwrap_or(0);
            println!("server {server} is draining: it takes no new launches; {left} session(s) left on it");
            u8::from(left > 0)
        }),
        Cmd::Servers { cmd: ServersCmd::Undrain { server } } => b.drain(server, false).await.map(|_| {
            println!("server {server} takes launches again");
            0
        }),
        Cmd::Servers { cmd: ServersCmd::Ls { json } } => b.servers().await.map(|(rows, v)| {
            if *json {
                print_json(&v);
            } else {
                print_servers(&rows);
            }
            0
        }),
        _ => return None,
    })
}

/// `argv` started in the background by a shell in the guest, its input
/// and output on /dev/null so that nothing waits for it; the shell prints
/// its process id and returns.
fn in_background(argv: &[String]) -> Vec<String> {
    let start = ["sh", "-c", "\"$@\" </dev/null >/dev/null 2>&1 & echo $!", "sh"];
    start.iter().map(|a| a.to_string()).chain(argv.iter().cloned()).collect()
}

fn print_sessions(rows: &[SessionRow]) {
    let state = |s: &SessionRow| match &s.note {
        Some(note) => format!("{}, {note}", s.state),
        None => s.state.clone(),
    };
    let width = rows.iter().map(|s| state(s).len()).max().unwrap_or(0).max(9);
    let server_width = rows.iter().filter_map(|s| s.server.as_ref().map(String::len)).max().unwrap_or(0).max(8);
    println!(
        "{:<12} {:<14} {:<9} {:<width$} {:<8} {:<server_width$} {:<6} WHY",
        "SESSION", "PACKAGE", "OS", "STATE", "ATTACHED", "SERVER", "AGE"
    );
    for s in rows {
        println!(
            "{:<12} {:<14} {:<9} {:<width$} {:<8} {:<server_width$} {:<6} {}",
            s.id,
            s.package,
            s.os,
            state(s),
            if s.attached { "yes" } else { "no" },
            s.server.as_deref().unwrap_or("-"),
            age(s.created),
            s.why.as_deref().unwrap_or("")
        );
    }
}

fn print_images(rows: &[ImageRow]) {
    println!("{:<8} {:<12} {:<14} {:<10} {:>10}  {:<6} NAME", "KIND", "DIGEST", "PACKAGE", "OS", "SIZE", "AGE");
    for r in rows {
        let (kind, name) = match &r.snapshot {
            Some(name) if name.is_empty() => ("snapshot", "(a fork's)"),
            Some(name) => ("snapshot", name.as_str()),
            None => (r.kind.as_str(), ""),
        };
        println!(
            "{:<8} {:<12} {:<14} {:<10} {:>10}  {:<6} {name}",
            kind,
            r.digest.get(..12).unwrap_or(&r.digest),
            r.package.as_deref().unwrap_or("-"),
            r.os,
            human(r.size),
            age(r.created)
        );
    }
}

fn print_servers(rows: &[ServerRow]) {
    println!(
        "{:<16} {:<26} {:>8} {:>12} {:>10} {:>6}  CACHED",
        "SERVER", "ADDRESS", "SESSIONS", "MEM FREE", "GUEST MEM", "LOAD"
    );
    for s in rows {
        println!(
            "{:<16} {:<26} {:>8} {:>8} MiB {:>6} MiB {:>6.2}  {}",
            s.name,
            s.address.as_deref().unwrap_or("(this server)"),
            s.sessions,
            s.memory_available_mib,
            s.guest_memory_committed_mib,
            s.load1,
            if s.cached.is_empty() { "-".to_string() } else { s.cached.join(",") }
        );
    }
}

fn print_builds(rows: &[BuildStatus]) {
    println!("{:<16} {:<14} {:<11} {:<8} {:>5} {:>5}  STEP", "BUILD", "PACKAGE", "STATE", "STAGE", "DONE", "AGE");
    for b in rows {
        let step = b.error.as_deref().unwrap_or(&b.step).lines().next().unwrap_or("");
        println!(
            "{:<16} {:<14} {:<11} {:<8} {:>4.0}% {:>5}  {}",
            b.id,
            b.package,
            b.state.to_string(),
            b.stage,
            b.progress * 100.0,
            age(b.started),
            step
        );
    }
}
