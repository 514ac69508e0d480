//! The verbs' backend on this machine: strata's engine in this process.

use std::path::Path;

use serde_json::Value;
use strata_engine::context::ContextSettings;
use strata_engine::Engine;

use crate::progress::Bar;
use crate::terminal::terminal_size;
use crate::verbs::{Backend, Built, CommandRow, ImageRow, RunHow, ServerRow, SessionRow};
use crate::{finish, launch_settings, DeviceArgs};
use strata_engine::builds::{BuildState, BuildStatus};

pub struct Local<'a> {
    pub eng: &'a Engine,
    pub bar: &'a Bar,
    /// The terminal whose context and home launches use.
    pub terminal: &'a str,
    pub quiet: bool,
    /// The OS `--os` chose, over the terminal's context's.
    pub os: Option<strata_engine::Os>,
}

impl Local<'_> {
    /// `package` resolved for the OS of a launch with `settings`: `--os`,
    /// else the context's, else the server's default.
    fn package_for(&self, package: &str, settings: &ContextSettings) -> anyhow::Result<strata_package::Package> {
        Ok(self.eng.package_on(package, self.eng.os_for(self.os, Some(settings)))?)
    }
}

fn image_row(r: &strata_store::ImageRecord) -> ImageRow {
    ImageRow {
        kind: r.kind.to_string(),
        digest: r.digest.clone(),
        package: r.package.clone(),
        os: r.os.clone(),
        size: r.size,
        created: r.created,
        snapshot: strata_engine::fork::snapshot_name(r).map(str::to_string),
    }
}

impl Local<'_> {
    /// A session of `pkg`: from the pool of the server of this store, if
    /// one runs and a session waits there, else restored from its launch
    /// image.
    async fn launch(
        &self,
        pkg: &strata_package::Package,
        settings: &ContextSettings,
    ) -> anyhow::Result<strata_engine::Session> {
        let pool = strata_engine::pool::PoolKey::of(pkg, false, self.eng.cfg.default_os).name();
        if let Some(id) = strata_api::handover::take_pooled(&self.eng.cfg.state_dir, &pool, settings).await {
            match self.eng.attach_session(&id, settings).await {
                Ok(s) => return Ok(s),
                Err(e) => {
                    tracing::warn!(session = %id, error = %e, "could not attach the pooled session handed over; launching");
                    let _ = self.eng.kill_session(&id).await;
                }
            }
        }
        self.launch_built(pkg, settings).await
    }

    /// For a graphical session, a viewer page on loopback for as long as
    /// this terminal is attached: its address printed and opened in the
    /// browser where there is one. (A VNC client may use the socket too.)
    async fn viewer(&self, session: &strata_engine::Session) -> Option<strata_api::viewer::Viewer> {
        if !session.graphical {
            return None;
        }
        let vnc = session.vnc_socket();
        match strata_api::viewer::serve(&session.id, &session.package, vnc.clone(), crate::web_dir()).await {
            Ok(v) => {
                if !self.quiet {
                    eprintln!(
                        "strata: {} shows its display at {} (or over VNC at unix:{})",
                        session.package,
                        v.url,
                        vnc.display()
                    );
                }
                crate::remote::open_in_browser(&v.url);
                Some(v)
            }
            Err(e) => {
                eprintln!(
                    "strata: no viewer page ({e}); {} shows its display over VNC at unix:{}",
                    session.package,
                    vnc.display()
                );
                None
            }
        }
    }

    /// Builds what is missing of `pkg`'s images as a recorded build job (its
    /// settings checked first), then launches it.
    async fn launch_built(
        &self,
        pkg: &strata_package::Package,
        settings: &ContextSettings,
    ) -> anyhow::Result<strata_engine::Session> {
        self.eng.check_launch(pkg, settings)?;
        let images = self.eng.run_build(&self.eng.new_build(&pkg.name), pkg, self.bar).await?;
        Ok(self.eng.launch_from(pkg, &images.launch, settings).await?)
    }
}

impl Backend for Local<'_> {
    async fn sessions(&self) -> anyhow::Result<(Vec<SessionRow>, Value)> {
        let mut sessions = self.eng.list_sessions();
        // Detached sessions are kept to their idle time-outs even when the
        // keeper that would was killed since.
        if sessions.iter().any(|r| r.detached && !r.pooled && r.paused_image.is_none()) {
            crate::keeper::ensure(self.eng);
        }
        sessions.extend(self.eng.ended_sessions());
        sessions.sort_by_key(|r| r.created);
        let rows = sessions
            .iter()
            .map(|r| SessionRow {
                id: r.id.clone(),
                package: r.package.clone(),
                os: r.os.clone(),
                state: match (&r.ended, &r.paused_image) {
                    (Some(e), _) => e.state.to_string(),
                    (None, Some(_)) => "paused".into(),
                    (None, None) => "running".into(),
                },
                attached: r.ended.is_none() && r.paused_image.is_none() && !r.detached,
                server: None,
                note: None,
                why: match &r.ended {
                    Some(e) => e.reason.lines().next().map(str::to_string),
                    None if r.detached || r.paused_image.is_some() => r.why.clone(),
                    None => None,
                },
                created: r.created,
            })
            .collect();
        // Each record with the state `ps --json` has always shown.
        let json = sessions
            .iter()
            .map(|r| {
                let mut v = serde_json::to_value(r).unwrap_or_default();
                v["state"] = r.state().into();
                v
            })
            .collect();
        Ok((rows, json))
    }

    async fn kill(&self, id: &str) -> anyhow::Result<()> {
        Ok(self.eng.kill_session(id).await?)
    }

    async fn pause(&self, id: &str) -> anyhow::Result<String> {
        let image = self.eng.pause_detached(id).await?;
        Ok(format!("{id} paused to image {}", &image.digest[..12]))
    }

    async fn resume(&self, id: &str) -> anyhow::Result<()> {
        self.eng.resume_session(id, None).await?.detach().await?;
        crate::keeper::ensure(self.eng);
        Ok(())
    }

    async fn fork(&self, id: &str, count: usize, spread: bool) -> anyhow::Result<(Vec<Result<String, String>>, f64)> {
        if spread {
            anyhow::bail!("--spread places copies on the servers of a cluster: fork through a control plane (--addr)");
        }
        let idle = self.eng.running_record(id).and_then(|r| r.idle_timeout_s);
        let (snap, started) = self.eng.fork_detached(id, count).await?;
        let mut forks = Vec::new();
        for started in started {
            let copy = async {
                let session = started?;
                if let Some(secs) = idle {
                    let idle = (secs > 0).then(|| std::time::Duration::from_secs(secs));
                    self.eng.set_idle_timeout(&session.id, idle)?;
                }
                session.detach().await
            };
            forks.push(copy.await.map_err(|e| e.to_string()));
        }
        crate::keeper::ensure(self.eng);
        Ok((forks, snap.stopped.as_secs_f64() * 1e3))
    }

    async fn snapshot(&self, id: &str, name: &str) -> anyhow::Result<String> {
        let snap = self.eng.snapshot_detached(id, Some(name)).await?;
        Ok(format!(
            "{id} saved as snapshot {name} (image {}); it was stopped {:.0} ms and runs on",
            &snap.image.digest[..12],
            snap.stopped.as_secs_f64() * 1e3
        ))
    }

    async fn drain(&self, server: &str, _on: bool) -> anyhow::Result<Value> {
        anyhow::bail!(
            "this machine is no cluster: servers are drained through a cluster's control plane \
             (strata --addr PLANE servers drain {server})"
        )
    }

    async fn move_session(&self, id: &str, _to: Option<&str>) -> anyhow::Result<String> {
        anyhow::bail!(
            "session {id} runs on this machine, which is no cluster: moves go between the servers of a cluster, \
             through its control plane (strata --addr PLANE move {id})"
        )
    }

    async fn run_snapshot(&self, name: &str, how: RunHow) -> anyhow::Result<u8> {
        let image = self
            .eng
            .resolve_snapshot(name)
            .await?
            .ok_or_else(|| anyhow::anyhow!("no snapshot {name}; `strata images ls` lists them"))?;
        let terminal = ContextSettings::from_terminal(terminal_size());
        let session = self.eng.start_from_snapshot(&image, Some(&terminal)).await?;
        if let Some(secs) = how.idle_timeout {
            let idle = (secs > 0).then(|| std::time::Duration::from_secs(secs));
            self.eng.set_idle_timeout(&session.id, idle)?;
        }
        crate::keeper::ensure(self.eng);
        if how.detach {
            println!("{}", session.detach().await?);
            return Ok(0);
        }
        finish(session, how.tty).await
    }

    async fn logs(&self, id: &str) -> anyhow::Result<Vec<u8>> {
        Ok(self.eng.session_logs(id).await?)
    }

    async fn copy(&self, id: &str, guest: &str, host: &Path, into_guest: bool) -> anyhow::Result<u64> {
        Ok(self.eng.copy_file(id, host, guest, into_guest).await?)
    }

    async fn run(&self, package: &str, devices: &DeviceArgs, how: RunHow) -> anyhow::Result<u8> {
        let RunHow { tty, detach, cold, idle_timeout, command } = how;
        let settings = launch_settings(self.eng, self.terminal, devices)?;
        let mut pkg = self.package_for(package, &settings)?;
        if !command.is_empty() {
            pkg = pkg.with_command(&command)?;
        }
        let session = if cold {
            self.eng.launch_cold(&pkg, &settings, self.bar).await?
        } else if !command.is_empty() {
            // Pools hold sessions of the package's own program.
            self.launch_built(&pkg, &settings).await?
        } else {
            self.launch(&pkg, &settings).await?
        };
        self.bar.clear();
        let _viewer = match detach {
            false => self.viewer(&session).await,
            true => {
                if session.graphical && !self.quiet {
                    eprintln!(
                        "strata: {} shows its display over VNC at unix:{}; `strata attach {}` opens a viewer in the browser",
                        pkg.name,
                        session.vnc_socket().display(),
                        session.id
                    );
                }
                None
            }
        };
        if session.detachable() {
            if let Some(secs) = idle_timeout {
                let idle = (secs > 0).then(|| std::time::Duration::from_secs(secs));
                self.eng.set_idle_timeout(&session.id, idle)?;
            }
            // It outlives this process if its terminal goes away.
            crate::keeper::ensure(self.eng);
        }
        if detach {
            println!("{}", session.detach().await?);
            return Ok(0);
        }
        finish(session, tty).await
    }

    async fn attach(&self, id: &str, tty: bool) -> anyhow::Result<u8> {
        let settings = ContextSettings::from_terminal(terminal_size());
        let session = self.eng.attach_session(id, &settings).await?;
        crate::keeper::ensure(self.eng);
        let _viewer = self.viewer(&session).await;
        finish(session, tty).await
    }

    async fn run_command(
        &self,
        package: &str,
        devices: &DeviceArgs,
        command: strata_engine::GuestCommand,
    ) -> anyhow::Result<u8> {
        let settings = launch_settings(self.eng, self.terminal, devices)?;
        let pkg = self.package_for(package, &settings)?;
        let mut session = self.launch_built(&pkg, &settings).await?;
        self.bar.clear();
        // The package's own program: the launch image's copy waiting on
        // pipes, already started, if it holds one.
        let start = match session.take_standby() {
            Some(id) if command.argv == pkg.def.command && command.cwd.is_none() && command.user.is_none() => {
                Start::Standby(id)
            }
            _ => Start::Exec(command),
        };
        let status = run_command(&mut session, start, true).await;
        session.close().await;
        status
    }

    async fn piped_program(&self, package: &str) -> anyhow::Result<Option<strata_engine::GuestCommand>> {
        let pkg = self.eng.package(package)?;
        if pkg.def.graphical {
            return Ok(None);
        }
        let env = pkg.def.env.into_iter().collect();
        Ok(Some(strata_engine::GuestCommand { argv: pkg.def.command, env, ..Default::default() }))
    }

    async fn exec(&self, id: &str, command: strata_engine::GuestCommand, stdin: bool, tty: bool) -> anyhow::Result<u8> {
        let mut session = self.eng.borrow_session(id).await?;
        let start = if tty { Start::Pty(command) } else { Start::Exec(command) };
        let status = run_command(&mut session, start, stdin).await;
        session.release();
        status
    }

    async fn commands(&self, id: &str) -> anyhow::Result<(Vec<CommandRow>, Value)> {
        let mut session = self.eng.borrow_session(id).await?;
        let listed = session.commands().await;
        session.release();
        let listed = listed?;
        let v = serde_json::to_value(&listed)?;
        Ok((listed.into_iter().map(|c| CommandRow { id: c.id, argv: c.argv, pty: c.pty }).collect(), v))
    }

    async fn signal_command(&self, id: &str, command: u32, signal: i32) -> anyhow::Result<()> {
        let mut session = self.eng.borrow_session(id).await?;
        let sent = async {
            running_command(&mut session, command).await?;
            Ok::<_, anyhow::Error>(session.command_signal(command, signal).await?)
        }
        .await;
        session.release();
        sent
    }

    async fn attach_command(&self, id: &str, command: u32, stdin: bool) -> anyhow::Result<u8> {
        let mut session = self.eng.borrow_session(id).await?;
        let status = match running_command(&mut session, command).await {
            Ok(()) => run_command(&mut session, Start::Standby(command), stdin).await,
            Err(e) => Err(e),
        };
        session.release();
        status
    }

    async fn build(
        &self,
        package: &str,
        detach: bool,
        _seen: &mut (dyn FnMut(&BuildStatus) + Send),
    ) -> anyhow::Result<Built> {
        let pkg = self.eng.package(package)?;
        if detach {
            // The same command in a process of its own, so the build
            // outlives this one.
            let args: Vec<std::ffi::OsString> =
                std::env::args_os().skip(1).filter(|a| a != "--detach" && a != "-d").collect();
            let mut args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
            args.insert(0, "--quiet".as_ref());
            crate::keeper::spawn_detached(self.eng, &args, &format!("build-{}.log", pkg.name))?;
            return Ok(Built::Started(None));
        }
        // This terminal draws the build's bar.
        let set = self.eng.run_build(&self.eng.new_build(&pkg.name), &pkg, self.bar).await?;
        self.bar.clear();
        Ok(Built::Images([&set.base, &set.install, &set.launch].into_iter().map(image_row).collect()))
    }

    async fn builds(&self) -> anyhow::Result<(Vec<BuildStatus>, Value)> {
        let rows = self.eng.builds();
        let v = serde_json::to_value(&rows)?;
        Ok((rows, v))
    }

    async fn follow_build(
        &self,
        id: &str,
        follow: bool,
        seen: &mut (dyn FnMut(&BuildStatus) + Send),
    ) -> anyhow::Result<BuildStatus> {
        let not_found = || anyhow::anyhow!("no build {id}; `strata builds ls` lists them");
        let mut status = self.eng.build_status(id).ok_or_else(not_found)?;
        // Whichever process builds it writes its record as it goes.
        while follow && status.state == BuildState::Running {
            seen(&status);
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            status = self.eng.build_status(id).ok_or_else(not_found)?;
        }
        Ok(status)
    }

    async fn images(&self) -> anyhow::Result<(Vec<ImageRow>, Value)> {
        let images = self.eng.store.list_images()?;
        Ok((images.iter().map(image_row).collect(), serde_json::to_value(&images)?))
    }

    async fn remove_image(&self, d: &str) -> anyhow::Result<()> {
        let images = self.eng.store.list_images()?;
        let in_use: Vec<String> = self.eng.list_sessions().into_iter().map(|s| s.launch_image).collect();
        // A unique prefix of at least 12 digits names an image, as `images ls` shows it.
        let found: Vec<_> = images.iter().filter(|r| d.len() >= 12 && r.digest.starts_with(d)).collect();
        match found.as_slice() {
            [r] if in_use.contains(&r.digest) => anyhow::bail!("in use by a running session; `strata kill` it first"),
            [r] => Ok(self.eng.store.remove_image(&r.digest)?),
            [] => anyhow::bail!("no such image (give at least 12 digits, as `strata images ls` shows)"),
            _ => anyhow::bail!("ambiguous: give more digits"),
        }
    }

    async fn gc(&self) -> anyhow::Result<(u64, u64)> {
        Ok(self.eng.gc()?)
    }

    async fn prune(&self, dry_run: bool) -> anyhow::Result<Value> {
        Ok(serde_json::to_value(self.eng.prune_images(dry_run)?)?)
    }

    async fn packages(&self) -> anyhow::Result<(Vec<(String, String, String)>, Value)> {
        let packages = self.eng.registry.packages.values();
        let rows =
            packages.clone().map(|p| (p.name.clone(), p.def.oses().join(","), p.def.description.clone())).collect();
        let json = packages
            .map(|p| serde_json::json!({"name": p.name, "description": p.def.description, "debs": p.def.debs, "command": p.def.command, "os": p.def.oses()}))
            .collect();
        Ok((rows, json))
    }

    async fn servers(&self) -> anyhow::Result<(Vec<ServerRow>, Value)> {
        let h = self.eng.server_status()?;
        let row = ServerRow {
            name: h.name.clone(),
            address: None,
            sessions: h.sessions as u64,
            memory_available_mib: h.memory_available_mib,
            guest_memory_committed_mib: h.guest_memory_committed_mib,
            load1: h.load1,
            cached: Vec::new(),
        };
        Ok((vec![row], serde_json::to_value([&h])?))
    }
}

/// The id of the command `exec` runs (the program is 1; builds use small ones).
const EXEC_ID: strata_proto::ProcId = 0x4558_0000;

/// What [`run_command`] runs.
/// Refuses a command id that does not run in `session`.
async fn running_command(session: &mut strata_engine::Session, command: u32) -> anyhow::Result<()> {
    if session.commands().await?.iter().any(|c| c.id == command) {
        return Ok(());
    }
    anyhow::bail!(
        "no running command {command} in session {}; `strata commands ls {}` lists them",
        session.id,
        session.id
    )
}

enum Start {
    /// A new command.
    Exec(strata_engine::GuestCommand),
    /// A new command on a PTY of this terminal's size, which follows it;
    /// this terminal in raw mode meanwhile.
    Pty(strata_engine::GuestCommand),
    /// The command of this id, already waiting for its input.
    Standby(strata_proto::ProcId),
}

/// Runs a command in `session`, copying this process's input to it (with
/// `stdin`) and its output and errors to ours, byte for byte; its status.
async fn run_command(session: &mut strata_engine::Session, start: Start, stdin: bool) -> anyhow::Result<u8> {
    use std::io::Write;
    use strata_engine::SessionEvent;
    let new_id = EXEC_ID | (std::process::id() & 0xffff);
    let mut raw = None;
    let id = match start {
        Start::Exec(command) => {
            session.exec(new_id, command).await?;
            new_id
        }
        Start::Pty(command) => {
            let size = terminal_size().unwrap_or(strata_proto::WinSize { rows: 24, cols: 80 });
            session.exec_pty(new_id, command, size).await?;
            raw = Some(crate::terminal::RawMode::enter()?);
            new_id
        }
        Start::Standby(id) => id,
    };
    let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())?;
    // Standard input is read only when it is passed on.
    let mut input = if stdin || raw.is_some() { Some(crate::terminal::stdin_channel()) } else { None };
    if input.is_none() {
        session.command_eof(id).await?;
    }
    loop {
        tokio::select! {
            _ = winch.recv(), if raw.is_some() => if let Some(size) = terminal_size() {
                session.command_resize(id, size).await?;
            },
            ev = session.next_event() => match ev {
                SessionEvent::CommandOutput { id: from, stderr, data } if from == id => {
                    let written = if stderr {
                        std::io::stderr().write_all(&data).and_then(|()| std::io::stderr().flush())
                    } else {
                        std::io::stdout().write_all(&data).and_then(|()| std::io::stdout().flush())
                    };
                    // A reader that went away (`| head`) ends the copy, not the command.
                    if written.is_err() {
                        return Ok(141);
                    }
                }
                SessionEvent::CommandExited { id: from, status } if from == id => return Ok(status.clamp(0, 255) as u8),
                SessionEvent::Lost(why) => anyhow::bail!("the session was lost: {why}"),
                _ => {}
            },
            data = async { input.as_mut()?.recv().await }, if input.is_some() => match data.flatten() {
                Some(d) => session.command_input(id, &d).await?,
                None => {
                    input = None;
                    session.command_eof(id).await?;
                }
            },
        }
    }
}
