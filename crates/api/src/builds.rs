//! The server's image builds as jobs: a build runs in a task of its own, so
//! it reaches its end even if whoever asked for it (a launch, the page, the
//! CLI) went away; a second request for the same package joins the build
//! that runs. Its progress is the engine's [`BuildJob`] record, streamed as
//! server-sent events.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use axum::response::sse::{Event, KeepAlive, Sse};
use strata_engine::builds::{BuildJob, BuildState, BuildStatus};
use strata_engine::launch::ImageSet;
use strata_engine::Engine;
use strata_package::Package;
use tokio::sync::watch;

use crate::error::ApiError;

type Outcome = Option<Result<ImageSet, ApiError>>;

/// A build this server runs.
pub struct Running {
    pub job: BuildJob,
    outcome: watch::Sender<Outcome>,
}

impl Running {
    /// Waits for the build's end: the package's images, or why it failed.
    ///
    /// # Errors
    /// The build's error, as the API reports it.
    pub async fn wait(&self) -> Result<ImageSet, ApiError> {
        let mut rx = self.outcome.subscribe();
        loop {
            if let Some(r) = rx.borrow_and_update().clone() {
                return r;
            }
            if rx.changed().await.is_err() {
                return Err(ApiError::internal("the build's task ended without an answer"));
            }
        }
    }
}

/// Ends a build's task, however it ends (a panic too): the build leaves
/// the running ones, and its waiters get an answer.
struct Ending {
    all: Arc<Mutex<HashMap<String, Arc<Running>>>>,
    package: String,
    run: Arc<Running>,
}

impl Drop for Ending {
    fn drop(&mut self) {
        self.all.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&self.package);
        if self.run.outcome.borrow().is_none() {
            let why = "the build stopped before its end";
            if self.run.job.status().state == BuildState::Running {
                self.run.job.finish(Err(why.into()));
            }
            self.run.outcome.send_replace(Some(Err(ApiError::internal(why))));
        }
    }
}

/// The builds running on this server, by package.
#[derive(Default)]
pub struct Builds {
    running: Arc<Mutex<HashMap<String, Arc<Running>>>>,
}

impl Builds {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Running>>> {
        self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Builds what is missing of `pkg`'s images, or joins the build of them
    /// that runs. Finding every image present takes milliseconds and leaves
    /// no record.
    pub fn start(&self, engine: &Arc<Engine>, pkg: &Package) -> Arc<Running> {
        let mut running = self.lock();
        if let Some(r) = running.get(&pkg.name) {
            return r.clone();
        }
        let r = Arc::new(Running { job: engine.new_build(&pkg.name), outcome: watch::channel(None).0 });
        running.insert(pkg.name.clone(), r.clone());
        let (engine, pkg) = (engine.clone(), pkg.clone());
        let ending = Ending { all: self.running.clone(), package: pkg.name.clone(), run: r.clone() };
        tokio::spawn(async move {
            let result = engine.run_build(&ending.run.job, &pkg, &strata_engine::LogProgress).await;
            if ending.run.job.built_anything() {
                tracing::info!(build = %ending.run.job.id(), package = %pkg.name, ok = result.is_ok(), "build ended");
            }
            ending.run.outcome.send_replace(Some(result.map_err(ApiError::from)));
        });
        r
    }

    /// The running build with id `id`.
    pub fn get(&self, id: &str) -> Option<Arc<Running>> {
        self.lock().values().find(|r| r.job.id() == id).cloned()
    }
}

/// A build's changes as server-sent events (`status`, the whole record each
/// time), ending with the build: `run` while it runs here, else its record.
pub fn events(
    run: Option<Arc<Running>>,
    last: BuildStatus,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    enum At {
        Watching(Arc<Running>, watch::Receiver<BuildStatus>, bool),
        Finished(BuildStatus),
        End,
    }
    let event = |s: &BuildStatus| Event::default().event("status").json_data(s).unwrap_or_default();
    let start = match run {
        Some(run) => {
            let rx = run.job.subscribe();
            At::Watching(run, rx, true)
        }
        None => At::Finished(last),
    };
    let stream = futures_util::stream::unfold(start, move |at| async move {
        match at {
            At::End => None,
            At::Finished(s) => Some((Ok(event(&s)), At::End)),
            At::Watching(run, mut rx, first) => {
                // The first event is the build as it is; each later one waits for a change.
                if !first && rx.changed().await.is_err() {
                    return Some((Ok(event(&run.job.status())), At::End));
                }
                let s = rx.borrow_and_update().clone();
                let next = if s.state == BuildState::Running { At::Watching(run, rx, false) } else { At::End };
                Some((Ok(event(&s)), next))
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
