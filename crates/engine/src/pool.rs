//! A pool of sessions restored ahead of demand: already resumed from the
//! launch image, warmed, then paused. Taking one only resumes it and
//! attaches the terminal's context, which hides both QEMU's start and the
//! first, slow moments of a restored guest (under TCG its translation cache
//! starts empty).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use strata_package::Package;

use crate::context::ContextSettings;
use crate::demand::Demand;
use crate::{Engine, Error, Progress, Session};

/// How long a session beyond the pool's aim may wait unused before it is
/// stopped and its memory given back.
pub const GIVE_BACK_AFTER: Duration = Duration::from_secs(30);

/// How far back launches count towards a pool's size.
const DEMAND_WINDOW: Duration = Duration::from_secs(10);

/// How long a restored VM runs before it is paused into the pool.
const WARM_UP: Duration = Duration::from_millis(400);

/// The niceness of VMs restored for the pool until one is taken.
const POOL_NICENESS: i32 = 10;

/// Sessions restored at once while filling.
const FILL_PARALLEL: usize = 4;

/// The prefix of the pools of sessions made for E2B's API.
const E2B_PREFIX: &str = "e2b:";

/// The shell E2B's SDKs run every command with, run once while warming a
/// session for E2B's API (under TCG, its first run translates it).
const E2B_SHELL_WARM: [&str; 4] = ["/bin/bash", "-l", "-c", "echo warm"];

/// The id of that warming command (below the ids servers give commands).
const WARM_COMMAND: strata_proto::ProcId = 900;

/// Which pool a launch may be taken from, by name: a package's (`NAME`),
/// or that of its sessions made for E2B's API (`e2b:NAME`: an outbound
/// network plugged in and E2B's shell warmed); `@OS` after either names
/// an OS other than the server's default (`python3@debian-13`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolKey {
    pub package: String,
    pub e2b: bool,
    /// The OS named, if any (checked when the pool's package is resolved).
    pub os: Option<String>,
}

impl PoolKey {
    pub fn parse(name: &str) -> PoolKey {
        let (rest, os) = match name.split_once('@') {
            Some((p, os)) => (p, Some(os.to_string())),
            None => (name, None),
        };
        match rest.strip_prefix(E2B_PREFIX) {
            Some(p) => PoolKey { package: p.to_string(), e2b: true, os },
            None => PoolKey { package: rest.to_string(), e2b: false, os },
        }
    }

    /// The pool of `pkg`'s sessions (for E2B's API if `e2b`) on a server
    /// whose default OS is `default_os`.
    pub fn of(pkg: &Package, e2b: bool, default_os: crate::Os) -> PoolKey {
        let os = (pkg.os != default_os).then(|| pkg.os.name.to_string());
        PoolKey { package: pkg.name.clone(), e2b, os }
    }

    pub fn name(&self) -> String {
        let prefix = if self.e2b { E2B_PREFIX } else { "" };
        match &self.os {
            Some(os) => format!("{prefix}{}@{os}", self.package),
            None => format!("{prefix}{}", self.package),
        }
    }

    /// The package it pools, resolved for its OS.
    ///
    /// # Errors
    /// An unknown OS or package.
    pub fn resolve(&self, engine: &Engine) -> Result<Package, Error> {
        let os = match &self.os {
            Some(os) => crate::Os::named(os)?,
            None => engine.cfg.default_os,
        };
        engine.package_on(&self.package, os)
    }

    /// The context its sessions are restored with.
    fn settings(&self) -> ContextSettings {
        let mut s = ContextSettings::from_terminal(None);
        s.network.outbound = self.e2b;
        s
    }

    /// Whether its sessions can serve a launch with `settings` (the devices
    /// they have are the ones it asks for).
    fn serves(&self, settings: &ContextSettings) -> bool {
        let others = !settings.network.ports.is_empty() || !settings.shares.is_empty() || settings.home.is_some();
        !others && settings.network.outbound == self.e2b
    }
}

/// Restores one session and warms it; [`settle`] pauses it.
async fn warm(
    engine: &Engine,
    pkg: &Package,
    launch: &strata_store::ImageRecord,
    key: &PoolKey,
) -> Result<Session, Error> {
    let settings = &key.settings();
    // Filling yields to launches someone waits for; taking it renices it.
    let how = crate::launch::Restore {
        plugs_in_state: false,
        niceness: POOL_NICENESS,
        ahead_of_demand: true,
        ..Default::default()
    };
    let mut s = engine.launch_with(pkg, launch, settings, how).await?;
    // Warm what every launch from the pool runs: an attach with a new
    // terminal size (the program redraws), then going quiet.
    let mut other = settings.clone();
    other.rows = other.rows.saturating_add(1);
    s.reattach(&other.to_terminal_context()).await?;
    s.quiet().await?;
    s.reattach(&settings.to_terminal_context()).await?;
    s.quiet().await?;
    if key.e2b {
        warm_shell(&mut s).await?;
    }
    Ok(s)
}

/// Lets a warmed session run [`WARM_UP`] more, then pauses it.
async fn settle(mut s: Session) -> Result<Session, Error> {
    tokio::time::sleep(WARM_UP).await;
    s.pause().await?;
    // Paused, it uses no CPU: stopping it with the background would only
    // wake its threads.
    s.leave_background();
    Ok(s)
}

/// Runs E2B's shell once in `s`, to its end (30 s at most): on a standby
/// shell if two wait (the other then runs the first command on code already
/// translated; a new login shell's start would cost ~0.4 s of CPU under
/// TCG), else started afresh.
async fn warm_shell(s: &mut Session) -> Result<(), Error> {
    let command =
        crate::GuestCommand { argv: E2B_SHELL_WARM.iter().map(|a| a.to_string()).collect(), ..Default::default() };
    let standby = if s.shell_standbys() >= 2 { s.exec_on_shell_standby(&command).await? } else { None };
    let id = match standby {
        Some(id) => id,
        None => {
            s.exec(WARM_COMMAND, command).await?;
            WARM_COMMAND
        }
    };
    s.command_eof(id).await?;
    let ran = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match s.next_event().await {
                crate::SessionEvent::CommandExited { id: ended, .. } if ended == id => return Ok(()),
                crate::SessionEvent::Exited(_) | crate::SessionEvent::Lost(_) => {
                    return Err(Error::AgentGone("warming the shell"))
                }
                _ => {}
            }
        }
    });
    ran.await.map_err(|_| Error::AgentGone("warming the shell (30 s)"))?
}

/// Paused, warmed sessions by package name, each with when it joined.
#[derive(Default)]
pub struct Pool {
    ready: Mutex<HashMap<String, VecDeque<(Instant, Session)>>>,
    /// The demand of packages whose pool follows it.
    demand: Mutex<HashMap<String, Demand>>,
    /// Packages being filled now (one filler each, so targets hold).
    filling: Mutex<std::collections::HashSet<String>>,
}

/// Unmarks a package as being filled, however the fill ends.
struct Filling<'a>(&'a Pool, String);

impl Drop for Filling<'_> {
    fn drop(&mut self) {
        crate::lock(&self.0.filling).remove(&self.1);
    }
}

impl Pool {
    /// Sessions waiting in the pool named `name`.
    pub fn len(&self, name: &str) -> usize {
        self.lock().get(name).map_or(0, VecDeque::len)
    }

    /// Whether no session waits in the pool named `name`.
    pub fn is_empty(&self, name: &str) -> bool {
        self.len(name) == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, VecDeque<(Instant, Session)>>> {
        crate::lock(&self.ready)
    }

    fn demand(&self) -> std::sync::MutexGuard<'_, HashMap<String, Demand>> {
        crate::lock(&self.demand)
    }

    /// Sizes `package`'s pool by its demand, between `floor` and `cap`.
    pub fn follow(&self, package: &str, floor: usize, cap: usize) {
        self.demand().insert(package.to_string(), Demand::new(floor, cap, DEMAND_WINDOW));
    }

    /// How many sessions `package`'s pool aims at now (0 if it has no pool).
    pub fn target(&self, package: &str) -> usize {
        self.demand().get_mut(package).map_or(0, |d| d.target(Instant::now()))
    }

    /// Stops sessions beyond the pool's aim that waited unused longer than
    /// [`GIVE_BACK_AFTER`], oldest first; returns how many.
    pub async fn give_back(&self, package: &str) -> usize {
        let target = self.target(package);
        let extra: Vec<Session> = {
            let mut ready = self.lock();
            let Some(q) = ready.get_mut(package) else { return 0 };
            let mut out = Vec::new();
            while q.len() > target && q.front().is_some_and(|(t, _)| t.elapsed() > GIVE_BACK_AFTER) {
                out.extend(q.pop_front().map(|(_, s)| s));
            }
            out
        };
        let n = extra.len();
        for s in extra {
            s.close().await;
        }
        if n > 0 {
            tracing::info!(package, sessions = n, target, "pool gave memory back");
        }
        n
    }

    /// Adds sessions of `pkg` to the pool named `name` (a [`PoolKey`])
    /// until `target` wait.
    ///
    /// # Errors
    /// If images cannot be built or a VM cannot be restored.
    pub async fn fill(
        &self,
        engine: &Engine,
        name: &str,
        pkg: &Package,
        target: usize,
        progress: &dyn Progress,
    ) -> Result<(), Error> {
        // Nothing to do is the common case: decided before any catalog
        // work, which would hold up launches sharing this thread.
        if self.len(name) >= target || !crate::lock(&self.filling).insert(name.to_string()) {
            return Ok(());
        }
        let _filling = Filling(self, name.to_string());
        let key = PoolKey::parse(name);
        let images = engine.ensure_images(pkg, progress).await?;
        // E2B's sessions have a network: restored from an image that holds it.
        if key.e2b {
            engine.ensure_networked(pkg, &images, progress).await?;
        }
        // Several restores in flight at once, each joining the pool as
        // soon as it is ready, and the next one started then: a slow
        // restore holds up no other. The last part of a warm-up, waiting
        // with the guest running, holds no place among them (for E2B's
        // sessions, with their shell's run, that was ~0.4 s of ~1.1 s).
        let mut inflight = futures_util::stream::FuturesUnordered::new();
        let mut settling = futures_util::stream::FuturesUnordered::new();
        let mut failure = None;
        loop {
            let parallel = FILL_PARALLEL.min(engine.pool_restores_max());
            while failure.is_none()
                && inflight.len() < parallel
                && self.len(name) + inflight.len() + settling.len() < target
            {
                inflight.push(async {
                    // Not started under a launch someone waits for.
                    crate::background::quiet().await;
                    let t0 = Instant::now();
                    (t0, warm(engine, pkg, &images.launch, &key).await)
                });
            }
            let (t0, ready) = tokio::select! {
                Some((t0, warmed)) = futures_util::StreamExt::next(&mut inflight) => match warmed {
                    Ok(s) => {
                        settling.push(async move { (t0, settle(s).await) });
                        continue;
                    }
                    Err(e) => (t0, Err(e)),
                },
                Some(settled) = futures_util::StreamExt::next(&mut settling) => settled,
                else => break,
            };
            match ready {
                Ok(s) => {
                    if let Some(d) = self.demand().get_mut(name) {
                        d.refilled(t0.elapsed());
                    }
                    self.lock().entry(name.to_string()).or_default().push_back((Instant::now(), s));
                }
                // The others in flight finish; no new ones start.
                Err(e) => failure = failure.or(Some(e)),
            }
        }
        match failure {
            // Launches someone waits for hold the restore slots: the pool
            // fills later.
            None | Some(Error::Busy) => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// Takes a waiting session of the pool named `name` (a [`PoolKey`]),
    /// resumes it and attaches the terminal's context; `None` if none waits.
    ///
    /// # Errors
    /// If the session cannot be resumed (it is then stopped).
    pub async fn take(&self, name: &str, settings: &ContextSettings) -> Result<Option<Session>, Error> {
        if let Some(d) = self.demand().get_mut(name) {
            d.arrived(Instant::now());
        }
        // Pooled VMs have only their pool's devices, and plugging more
        // costs more than the pool saves: such launches restore their own.
        if !PoolKey::parse(name).serves(settings) {
            return Ok(None);
        }
        let s = self.lock().get_mut(name).and_then(VecDeque::pop_front);
        let Some((_, mut s)) = s else { return Ok(None) };
        let resumed = async {
            if let Some(dir) = &s.record {
                crate::sessions::mark_taken(dir)?;
            }
            s.set_niceness(0);
            s.resume().await?;
            s.reattach(&settings.to_terminal_context()).await
        };
        match resumed.await {
            Ok(screen) => {
                s.screen = screen;
                Ok(Some(s))
            }
            Err(e) => {
                s.close().await;
                Err(e)
            }
        }
    }

    /// Stops every waiting session.
    pub async fn drain(&self) {
        let all: Vec<Session> = self.lock().drain().flat_map(|(_, q)| q).map(|(_, s)| s).collect();
        for s in all {
            s.close().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::PoolKey;

    #[test]
    fn pool_names_carry_the_e2b_flag_and_an_os_other_than_the_default() {
        for name in ["python3", "e2b:python3", "python3@debian-13", "e2b:bc@debian-13"] {
            assert_eq!(PoolKey::parse(name).name(), name);
        }
        let k = PoolKey::parse("e2b:bc@debian-13");
        assert_eq!((k.package.as_str(), k.e2b, k.os.as_deref()), ("bc", true, Some("debian-13")));
        let trixie = strata_package::Os::named("debian-13").unwrap();
        let pkg = strata_package::Package::derived("sl", trixie, &[]).unwrap();
        assert_eq!(PoolKey::of(&pkg, false, crate::DEFAULT_OS).name(), "sl@debian-13");
        assert_eq!(PoolKey::of(&pkg, true, trixie).name(), "e2b:sl");
    }
}
