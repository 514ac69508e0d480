//! Work done ahead of demand yields the machine to work someone waits for.
//!
//! A VM restored for a pool is background work: nobody waits for it. While
//! a launch or a sandbox's first command is in flight ([`Foreground`]),
//! every such VM is stopped (SIGSTOP) and continued once the last one
//! ends. A lower scheduling class is not enough: on a small host a
//! restore running on the other core still slows the foreground VM's
//! vCPU (measured on 2 cores under TCG: a sandbox's first command took
//! twice as long while a refill ran beside it, whether the refill was
//! niced or SCHED_IDLE).
//!
//! New background work also waits ([`quiet`]) until no foreground work has
//! run for a moment: a QEMU runs its machine's set-up before strata learns
//! its pid and can stop it.
//!
//! Bounded so that pools still fill under a steady stream of launches:
//! the background may be stopped for at most [`MAX_STOP`] at a time, and
//! for at most [`STOP_SHARE`] of the time over longer spans (a budget of
//! stop time that refills while the background runs).

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The longest the background stays stopped at a time.
pub const MAX_STOP: Duration = Duration::from_millis(150);
/// How long after foreground work ends new background work waits.
pub const LINGER: Duration = Duration::from_millis(20);
/// The longest new background work waits for a quiet moment.
pub const QUIET_WAIT: Duration = Duration::from_millis(500);
/// The share of time the background may be stopped, over spans longer
/// than [`MAX_STOP`].
pub const STOP_SHARE: f64 = 0.5;

struct State {
    /// QEMU processes doing background work.
    pids: Vec<u32>,
    /// Foreground work in flight.
    foreground: usize,
    /// Whether the background is stopped now, and which stop it is.
    stopped: bool,
    stop_number: u64,
    /// Stop time left to spend, in seconds, as of `budget_at`.
    budget: f64,
    budget_at: Option<Instant>,
    /// When foreground work last ended.
    last_end: Option<Instant>,
}

static STATE: Mutex<State> = Mutex::new(State {
    pids: Vec::new(),
    foreground: 0,
    stopped: false,
    stop_number: 0,
    budget: 0.0,
    budget_at: None,
    last_end: None,
});

fn state() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

fn signal(pid: u32, sig: libc::c_int) {
    if pid != 0 {
        // SAFETY: sending a signal has no memory effects.
        unsafe { libc::kill(pid as libc::pid_t, sig) };
    }
}

impl State {
    /// Brings the stop budget up to now: spent while stopped, earned
    /// (up to [`MAX_STOP`]) while running.
    fn account(&mut self) -> f64 {
        let now = Instant::now();
        let full = MAX_STOP.as_secs_f64();
        let elapsed = self.budget_at.map_or(full / STOP_SHARE, |t| now.duration_since(t).as_secs_f64());
        self.budget = if self.stopped {
            self.budget - elapsed
        } else {
            (self.budget + elapsed * STOP_SHARE / (1.0 - STOP_SHARE)).min(full)
        };
        self.budget_at = Some(now);
        self.budget
    }

    fn resume(&mut self) {
        self.account();
        for &pid in &self.pids {
            signal(pid, libc::SIGCONT);
        }
        self.stopped = false;
    }
}

/// Counts QEMU process `pid` as background work (stopped at once if the
/// background is stopped now).
pub fn add(pid: u32) {
    let mut st = state();
    if !st.pids.contains(&pid) {
        st.pids.push(pid);
        if st.stopped {
            signal(pid, libc::SIGSTOP);
        }
    }
}

/// Counts `pid` as background work no more (taken from its pool, paused,
/// or gone), continuing it if it was stopped.
pub fn remove(pid: u32) {
    let mut st = state();
    if let Some(i) = st.pids.iter().position(|p| *p == pid) {
        st.pids.swap_remove(i);
        if st.stopped {
            signal(pid, libc::SIGCONT);
        }
    }
}

/// Foreground work in flight: while one lives, background VMs are stopped
/// (within the bounds above).
#[must_use = "the background is stopped only while this lives"]
pub struct Foreground(());

/// Marks the start of foreground work; it ends when the value is dropped.
pub fn foreground() -> Foreground {
    let mut st = state();
    st.foreground += 1;
    // Stopped even with no background work yet: what starts meanwhile (a
    // refill for the session just taken from its pool) is stopped as it
    // starts.
    if st.stopped {
        return Foreground(());
    }
    let budget = st.account();
    if budget < 0.001 {
        return Foreground(());
    }
    tracing::debug!(processes = st.pids.len(), budget_ms = budget * 1e3, "background work stopped");
    for &pid in &st.pids {
        signal(pid, libc::SIGSTOP);
    }
    st.stopped = true;
    st.stop_number += 1;
    let number = st.stop_number;
    // The bound: resumed once the budget is spent, even if foreground
    // work goes on.
    let bound = std::thread::Builder::new().name("strata-bg-resume".into()).spawn(move || {
        std::thread::sleep(Duration::from_secs_f64(budget));
        let mut st = state();
        if st.stopped && st.stop_number == number {
            st.resume();
        }
    });
    if bound.is_err() {
        st.resume();
    }
    Foreground(())
}

impl Drop for Foreground {
    fn drop(&mut self) {
        let mut st = state();
        st.foreground = st.foreground.saturating_sub(1);
        st.last_end = Some(Instant::now());
        if st.foreground == 0 && st.stopped {
            st.resume();
        }
    }
}

/// Waits, before new background work starts, until no foreground work is
/// in flight or ended within [`LINGER`] (it comes in bursts: a sandbox's
/// first command follows its creation within milliseconds), for
/// [`QUIET_WAIT`] at most. A QEMU that starts runs its machine's set-up
/// (~20 ms of CPU) before strata learns its pid and can stop it.
pub async fn quiet() {
    let deadline = Instant::now() + QUIET_WAIT;
    loop {
        let busy = {
            let st = state();
            st.foreground > 0 || st.last_end.is_some_and(|t| t.elapsed() < LINGER)
        };
        if !busy || Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The state of process `pid` as /proc shows it (R, S, T, ...).
    fn run_state(pid: u32) -> char {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        stat.rsplit_once(')').unwrap().1.trim_start().chars().next().unwrap()
    }

    fn wait_for_state(pid: u32, want: impl Fn(char) -> bool) -> char {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let s = run_state(pid);
            if want(s) || Instant::now() > deadline {
                return s;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn background_work_stops_while_foreground_work_runs_within_its_budget() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        add(pid);
        let fg = foreground();
        assert_eq!(wait_for_state(pid, |s| s == 'T'), 'T', "stopped while foreground work runs");
        drop(fg);
        assert_ne!(wait_for_state(pid, |s| s != 'T'), 'T', "continued when it ends");

        // Foreground work that outlasts the budget: stopped about MAX_STOP
        // in all, then continued although the work goes on.
        std::thread::sleep(MAX_STOP.mul_f64(2.5));
        let long = foreground();
        let t0 = Instant::now();
        let mut stopped = Duration::ZERO;
        // Timed by the clock, not by counting samples: a slow machine's
        // samples come further apart.
        let mut last = t0;
        while t0.elapsed() < MAX_STOP * 3 {
            let was_stopped = run_state(pid) == 'T';
            std::thread::sleep(Duration::from_millis(5));
            let now = Instant::now();
            if was_stopped {
                stopped += now - last;
            }
            last = now;
        }
        assert!(stopped > MAX_STOP / 2 && stopped < MAX_STOP * 3 / 2, "stopped {stopped:?} of {:?}", MAX_STOP * 3);
        drop(long);

        // Taken out of the background while stopped: continued at once.
        std::thread::sleep(MAX_STOP.mul_f64(2.5));
        let again = foreground();
        assert_eq!(wait_for_state(pid, |s| s == 'T'), 'T');
        remove(pid);
        assert_ne!(wait_for_state(pid, |s| s != 'T'), 'T', "a process no longer in the background runs");
        assert!(!state().pids.contains(&pid));
        drop(again);
        child.kill().unwrap();
        child.wait().unwrap();

        // New background work waits for a quiet moment after foreground work.
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        drop(foreground());
        let t0 = Instant::now();
        rt.block_on(quiet());
        assert!(t0.elapsed() >= LINGER.mul_f64(0.9), "waited {:?}", t0.elapsed());
        let t0 = Instant::now();
        let held = foreground();
        rt.block_on(quiet());
        assert!(t0.elapsed() >= QUIET_WAIT, "waits for held foreground work, within a bound");
        drop(held);
    }
}
