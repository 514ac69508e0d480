//! Image builds as jobs: each build that does any work has an id, a stage,
//! a progress figure and a log, kept in `STATE/builds/ID.json` (written
//! atomically as it goes), so whoever started it (a CLI, a server, a page)
//! and whoever looks later (`strata builds ls`, `GET /v1/builds`) see the
//! same thing. A failed build keeps its log. A build whose process died is
//! listed `interrupted`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::{Engine, Progress};

/// Lines of a build's log kept.
const LOG_LINES: usize = 200;
/// Finished builds kept in the store's list.
const KEPT: usize = 50;
/// Least time between two writes of a running build's record.
const WRITE_EVERY: Duration = Duration::from_millis(500);

/// Where a build is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BuildState {
    Running,
    Done,
    Failed,
    /// Its process died before it ended.
    Interrupted,
}

impl std::fmt::Display for BuildState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BuildState::Running => "running",
            BuildState::Done => "done",
            BuildState::Failed => "failed",
            BuildState::Interrupted => "interrupted",
        })
    }
}

/// One build of a package's images, as recorded.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct BuildStatus {
    pub id: String,
    pub package: String,
    pub state: BuildState,
    /// The image being built: `base`, `install`, `launch` (empty before the
    /// first step).
    pub stage: String,
    /// What it does now.
    pub step: String,
    /// How far the whole build is, 0 to 1: it only grows.
    pub progress: f64,
    /// Unix seconds.
    pub started: i64,
    pub ended: Option<i64>,
    pub error: Option<String>,
    /// The last lines of its log (steps, packages set up, the guest's console).
    pub log: Vec<String>,
    /// The strata process building it (0 where not said: through a server).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pid: u32,
    /// Where in its stage the last step began (0 to 1): a fraction reported
    /// after it covers the rest of the stage.
    #[serde(skip)]
    step_at: f64,
}

/// Where each stage's share of the whole begins, and its size.
fn stage_span(stage: &str) -> (f64, f64) {
    match stage {
        "base" => (0.0, 0.3),
        "install" => (0.3, 0.4),
        "launch" => (0.7, 0.3),
        _ => (0.0, 0.0),
    }
}

/// The stage a step message belongs to, and how far into it the step is
/// when the message alone says so.
fn stage_of(message: &str) -> Option<(&'static str, Option<f64>)> {
    let after = |p: &str| message.strip_prefix(p);
    if let Some(rest) = after("base image") {
        let at = [
            ("preparing", 0.0),
            ("mmdebstrap", 0.05),
            ("ext4", 0.6),
            ("qcow2", 0.7),
            ("downloading", 0.8),
            ("initramfs", 0.9),
        ]
        .iter()
        .find(|(w, _)| rest.contains(w))
        .map(|(_, f)| *f);
        return Some(("base", at));
    }
    if let Some(rest) = after("install image") {
        let at = if rest.contains("resolving") {
            Some(0.0)
        } else if rest.contains(".deb files") {
            Some(0.2)
        } else if rest.contains("installing in a VM") {
            Some(0.3)
        } else {
            None
        };
        return Some(("install", at));
    }
    if let Some(rest) = after("launch image") {
        let at = if rest.contains("booting") {
            Some(0.0)
        } else if rest.contains("ready") {
            Some(0.7)
        } else {
            None
        };
        return Some(("launch", at));
    }
    None
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// A build in progress in this process. Its record is written only once it
/// does work: a build that finds every image present leaves nothing.
pub struct BuildJob {
    path: PathBuf,
    status: Mutex<BuildStatus>,
    written: Mutex<Option<Instant>>,
    changed: tokio::sync::watch::Sender<BuildStatus>,
}

impl BuildJob {
    /// A new build of `package` in the store at `dir` (`STATE/builds`).
    fn new(dir: &Path, package: &str) -> BuildJob {
        let id = format!("b-{}", &crate::launch::new_session_id());
        let status = BuildStatus {
            id: id.clone(),
            package: package.to_string(),
            state: BuildState::Running,
            stage: String::new(),
            step: "looking for the images".into(),
            progress: 0.0,
            started: unix_now(),
            ended: None,
            error: None,
            log: Vec::new(),
            pid: std::process::id(),
            step_at: 0.0,
        };
        BuildJob {
            path: dir.join(format!("{id}.json")),
            changed: tokio::sync::watch::channel(status.clone()).0,
            status: Mutex::new(status),
            written: Mutex::new(None),
        }
    }

    pub fn id(&self) -> String {
        self.lock().id.clone()
    }

    /// The build as it is now.
    pub fn status(&self) -> BuildStatus {
        self.lock().clone()
    }

    /// Each change of the build, from now on (the current one first).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<BuildStatus> {
        self.changed.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BuildStatus> {
        crate::lock(&self.status)
    }

    /// Whether it did any work (and so has a record).
    pub fn built_anything(&self) -> bool {
        !self.lock().stage.is_empty()
    }

    fn change(&self, f: impl FnOnce(&mut BuildStatus), force_write: bool) {
        let status = {
            let mut s = self.lock();
            f(&mut s);
            s.clone()
        };
        self.changed.send_replace(status.clone());
        if status.stage.is_empty() {
            return;
        }
        let mut written = crate::lock(&self.written);
        if force_write || written.is_none_or(|t| t.elapsed() >= WRITE_EVERY) {
            *written = Some(Instant::now());
            if let Err(e) = write_status(&self.path, &status) {
                tracing::warn!(error = %e, build = %status.id, "could not record the build's progress");
            }
        }
    }

    /// Records the build's end.
    pub fn finish(&self, result: Result<(), String>) {
        self.change(
            |s| {
                s.ended = Some(unix_now());
                match result {
                    Ok(()) => {
                        s.state = BuildState::Done;
                        s.progress = 1.0;
                        s.step = "ready".into();
                    }
                    Err(e) => {
                        s.state = BuildState::Failed;
                        s.log.push(format!("failed: {e}"));
                        s.error = Some(e);
                    }
                }
            },
            true,
        );
        if self.built_anything() {
            if let Some(dir) = self.path.parent() {
                prune(dir);
            }
        }
    }
}

fn push_log(s: &mut BuildStatus, line: &str) {
    s.log.push(line.to_string());
    if s.log.len() > LOG_LINES {
        let extra = s.log.len() - LOG_LINES;
        s.log.drain(..extra);
    }
}

impl Progress for BuildJob {
    fn step(&self, message: &str) {
        self.change(
            |s| {
                if let Some((stage, at)) = stage_of(message) {
                    if s.stage != stage {
                        s.stage = stage.to_string();
                    }
                    if let Some(at) = at {
                        let (from, size) = stage_span(stage);
                        s.progress = s.progress.max(from + size * at);
                        s.step_at = at;
                    }
                }
                s.step = message.to_string();
                push_log(s, message);
            },
            false,
        );
    }

    fn fraction(&self, done: u64, total: u64) {
        if total == 0 {
            return;
        }
        self.change(
            |s| {
                let (from, size) = stage_span(&s.stage);
                let share = done.min(total) as f64 / total as f64;
                s.progress = s.progress.max(from + size * (s.step_at + (1.0 - s.step_at) * share));
            },
            false,
        );
    }

    fn done(&self, message: &str) {
        self.change(
            |s| {
                if let Some((stage, _)) = stage_of(message) {
                    let (from, size) = stage_span(stage);
                    s.progress = s.progress.max(from + size);
                }
                s.step = message.to_string();
                push_log(s, message);
            },
            true,
        );
    }
}

/// Both at once: a CLI's bar and the build's record.
pub struct Tee<'a>(pub &'a dyn Progress, pub &'a dyn Progress);

impl Progress for Tee<'_> {
    fn step(&self, message: &str) {
        self.0.step(message);
        self.1.step(message);
    }
    fn fraction(&self, done: u64, total: u64) {
        self.0.fraction(done, total);
        self.1.fraction(done, total);
    }
    fn done(&self, message: &str) {
        self.0.done(message);
        self.1.done(message);
    }
}

fn write_status(path: &Path, status: &BuildStatus) -> Result<(), crate::Error> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(crate::io_err(dir))?;
    }
    let json = serde_json::to_vec_pretty(status).expect("a build's status serializes");
    crate::write_atomic(path, &json)
}

/// A build's record at `path`, a running one whose process died marked so.
fn read_one(path: &Path) -> Option<BuildStatus> {
    let mut s: BuildStatus = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    if s.state == BuildState::Running && s.pid != 0 && !strata_store::process_alive(s.pid) {
        s.state = BuildState::Interrupted;
    }
    Some(s)
}

fn read_all(dir: &Path) -> Vec<BuildStatus> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<BuildStatus> = entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| read_one(&e.path()))
        .collect();
    out.sort_by_key(|s| std::cmp::Reverse(s.started));
    out
}

/// Keeps the newest finished builds' records.
fn prune(dir: &Path) {
    let finished: Vec<BuildStatus> = read_all(dir).into_iter().filter(|s| s.state != BuildState::Running).collect();
    for old in finished.iter().skip(KEPT) {
        let _ = std::fs::remove_file(dir.join(format!("{}.json", old.id)));
    }
}

impl Engine {
    fn builds_dir(&self) -> PathBuf {
        self.cfg.state_dir.join("builds")
    }

    /// A new build job of `package` in this store.
    pub fn new_build(&self, package: &str) -> BuildJob {
        BuildJob::new(&self.builds_dir(), package)
    }

    /// Builds what is missing of `pkg`'s images as `job` (made by
    /// [`Self::new_build`]), reporting to `progress` as well.
    ///
    /// # Errors
    /// If a build fails; the job records it with its log.
    pub async fn run_build(
        &self,
        job: &BuildJob,
        pkg: &strata_package::Package,
        progress: &dyn Progress,
    ) -> Result<crate::launch::ImageSet, crate::Error> {
        let r = self.ensure_images(pkg, &Tee(progress, job)).await;
        job.finish(r.as_ref().map(drop).map_err(|e| {
            let mut text = e.to_string();
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                text.push_str(&format!(": {c}"));
                cause = c.source();
            }
            text
        }));
        r
    }

    /// The store's builds that did work, newest first: running ones (of any
    /// process), and the last finished ones with their logs.
    pub fn builds(&self) -> Vec<BuildStatus> {
        read_all(&self.builds_dir())
    }

    /// One build by id.
    pub fn build_status(&self, id: &str) -> Option<BuildStatus> {
        let plain = id.len() <= 40 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !plain {
            return None;
        }
        read_one(&self.builds_dir().join(format!("{id}.json")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_build_records_its_stages_its_growing_progress_and_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let job = BuildJob::new(dir.path(), "bc");
        let mut seen = vec![job.status().progress];
        job.step("install image for bc: resolving bc");
        // Nothing written until work is done... which a step is.
        assert!(job.built_anything());
        job.step("install image for bc: 3 .deb files, 500 KiB");
        for i in 0..=3 {
            job.fraction(i, 3);
            seen.push(job.status().progress);
        }
        job.done("install image for bc ready (900 KiB)");
        seen.push(job.status().progress);
        job.step("launch image for bc: booting and starting bc");
        seen.push(job.status().progress);
        job.finish(Ok(()));
        seen.push(job.status().progress);
        assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
        assert_eq!(*seen.last().unwrap(), 1.0);
        let listed = read_all(dir.path());
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].state, BuildState::Done);
        assert_eq!(listed[0].stage, "launch");
        assert!(listed[0].log.iter().any(|l| l.contains(".deb files")), "{:?}", listed[0].log);
    }

    #[test]
    fn a_build_with_nothing_to_do_leaves_no_record_and_a_failed_one_keeps_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let idle = BuildJob::new(dir.path(), "bc");
        idle.finish(Ok(()));
        assert!(read_all(dir.path()).is_empty());
        let failed = BuildJob::new(dir.path(), "nosuch");
        failed.step("install image for nosuch: resolving nosuch");
        failed.finish(Err("E: Unable to locate package nosuch".into()));
        let listed = read_all(dir.path());
        assert_eq!(listed[0].state, BuildState::Failed);
        assert!(listed[0].log.last().unwrap().contains("Unable to locate"), "{:?}", listed[0].log);
    }

    #[test]
    fn a_running_build_whose_process_died_is_interrupted() {
        let dir = tempfile::tempdir().unwrap();
        let job = BuildJob::new(dir.path(), "bc");
        job.step("base image: preparing");
        let mut s = job.status();
        s.pid = u32::MAX - 1;
        write_status(&job.path, &s).unwrap();
        assert_eq!(read_all(dir.path())[0].state, BuildState::Interrupted);
    }
}
