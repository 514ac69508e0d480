//! Launch benchmark: cold boot versus launch image, in one run.

use std::time::{Duration, Instant};

use serde::Serialize;
use strata_package::Package;

use crate::context::ContextSettings;
use crate::{Engine, Error, Progress};

/// Results of `strata bench launch`.
#[derive(Debug, Clone, Serialize)]
pub struct LaunchReport {
    pub package: String,
    pub runs: usize,
    pub accel: String,
    pub cold_ms: Vec<f64>,
    pub launch_ms: Vec<f64>,
    pub cold_p50_ms: f64,
    pub cold_p99_ms: f64,
    pub launch_p50_ms: f64,
    pub launch_p99_ms: f64,
    pub ratio_p50: f64,
    /// From a pool of restored, warmed, paused sessions (with `--pool`).
    pub pool_ms: Vec<f64>,
    pub pool_p50_ms: Option<f64>,
    pub pool_p99_ms: Option<f64>,
    pub pool_ratio_p50: Option<f64>,
    /// Scripted (input from a pipe): from the launch image, the package's
    /// program run afresh with pipes, the probe line written and its input
    /// ended, to the answer on its stdout (console packages).
    pub scripted_ms: Vec<f64>,
    pub scripted_p50_ms: Option<f64>,
    pub scripted_p99_ms: Option<f64>,
    /// Graphical packages: from the request to the first character typed
    /// after the first frame drawn on the display, each way.
    pub typed: Option<TypedReport>,
}

/// From the request to the first typed character drawn, each way (ms).
#[derive(Debug, Clone, Default, Serialize)]
pub struct TypedReport {
    pub cold_ms: Vec<f64>,
    pub launch_ms: Vec<f64>,
    pub pool_ms: Vec<f64>,
}

/// The id the scripted benchmark's command gets.
const SCRIPTED_COMMAND: strata_proto::ProcId = 901;

/// Takes `pkg`'s program waiting on pipes in `s` (the launch image's
/// standby), else runs it afresh with pipes; writes `input` and ends it;
/// waits until its stdout holds `expect`.
async fn scripted_answer(s: &mut crate::Session, pkg: &Package, input: &str, expect: &str) -> Result<(), Error> {
    let id = match s.take_standby() {
        Some(id) => id,
        None => {
            let env = pkg.def.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            let command = crate::GuestCommand { argv: pkg.def.command.clone(), env, ..Default::default() };
            s.exec(SCRIPTED_COMMAND, command).await?;
            SCRIPTED_COMMAND
        }
    };
    s.command_input(id, input.as_bytes()).await?;
    s.command_eof(id).await?;
    let mut out = Vec::new();
    let wait = async {
        loop {
            match s.next_event().await {
                crate::SessionEvent::CommandOutput { id: from, stderr: false, data } if from == id => {
                    out.extend_from_slice(&data);
                    if String::from_utf8_lossy(&out).contains(expect) {
                        return Ok(());
                    }
                }
                crate::SessionEvent::CommandExited { id: from, status } if from == id => {
                    return Err(Error::Config(format!("the scripted program exited ({status}) without {expect:?}")))
                }
                crate::SessionEvent::Lost(why) => return Err(Error::Config(why)),
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(180), wait)
        .await
        .map_err(|_| Error::Timeout { what: "a scripted answer".into(), secs: 180 })?
}

/// The nearest-rank percentile of `values` (p in 0..=100).
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

/// What "the program answered" means for a package in the benchmarks.
enum FirstAnswer {
    /// A console program printed the answer to its probe line.
    Probe(strata_package::Probe),
    /// A graphical program's first frame: a window is drawn (at least a
    /// twentieth of the display lit, not a cursor on black).
    Frame,
}

/// Pixels that must change, beyond what changes by itself (a blinking
/// cursor), for a typed character to count as drawn.
const TYPED_PIXELS: usize = 20;

/// With `typing` (a graphical program that draws what is typed), the time
/// to the first typed character drawn, into `into`: the first frame's
/// (`frame_ms`, when a person could type) plus the key's to its drawing.
async fn typed_after(typing: bool, s: &mut crate::Session, frame_ms: f64, into: &mut Vec<f64>) -> Result<(), Error> {
    if typing {
        into.push(frame_ms + typed_drawn(s).await?.as_secs_f64() * 1000.0);
    }
    Ok(())
}

/// How many of the pixels of two screens (RGB, same size) differ.
fn changed_pixels(a: &[u8], b: &[u8]) -> usize {
    a.chunks_exact(3).zip(b.chunks_exact(3)).filter(|(x, y)| x != y).count()
}

/// Types `x` into a graphical session whose window is drawn and waits until
/// it is drawn: more pixels change than change by themselves (its cursor's
/// blinking, watched for a second first). The time from the key to its
/// drawing; up to 60 s.
async fn typed_drawn(s: &mut crate::Session) -> Result<Duration, Error> {
    let mut last = s.screen_rgb().await?;
    let mut noise = 0;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = s.screen_rgb().await?;
        noise = noise.max(changed_pixels(&last, &now));
        last = now;
    }
    let pressed = Instant::now();
    s.press_x().await?;
    let deadline = pressed + Duration::from_secs(60);
    loop {
        let now = s.screen_rgb().await?;
        if changed_pixels(&last, &now) > noise + TYPED_PIXELS {
            return Ok(pressed.elapsed());
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout { what: "a typed character to be drawn".into(), secs: 60 });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl FirstAnswer {
    fn of(pkg: &Package) -> Result<FirstAnswer, Error> {
        if pkg.def.graphical {
            return Ok(FirstAnswer::Frame);
        }
        pkg.def.probe.clone().map(FirstAnswer::Probe).ok_or_else(|| {
            Error::Config(format!(
                "package {} has no [probe] (a line to type and the answer to expect); the benchmark needs one",
                pkg.name
            ))
        })
    }

    async fn wait(&self, s: &mut crate::Session) -> Result<(), Error> {
        let timeout = Duration::from_secs(180);
        match self {
            FirstAnswer::Probe(p) => s.expect_after(p.input.as_bytes(), &p.expect, timeout).await.map(|_| ()),
            FirstAnswer::Frame => {
                let deadline = Instant::now() + timeout;
                // A screen dump is the frame a viewer would get first.
                loop {
                    let (w, h, lit) = s.screen_pixels().await?;
                    if lit * 20 >= u64::from(w) * u64::from(h) {
                        break;
                    }
                    if Instant::now() > deadline {
                        return Err(Error::Timeout { what: "a first frame".into(), secs: timeout.as_secs() });
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Ok(())
            }
        }
    }
}

impl Engine {
    /// Measures `runs` launches each way, interleaved, from the request to the
    /// program's answer to its probe line (console packages) or its first
    /// frame on the display (graphical packages; with `with_typed`, also to
    /// the first typed character drawn).
    ///
    /// # Errors
    /// If the package has no probe, or a launch fails.
    pub async fn bench_launch(
        &self,
        pkg: &Package,
        runs: usize,
        with_pool: bool,
        with_typed: bool,
        progress: &dyn Progress,
    ) -> Result<LaunchReport, Error> {
        let answer = FirstAnswer::of(pkg)?;
        let images = self.ensure_images(pkg, progress).await?;
        let settings = ContextSettings::from_terminal(None);
        let (mut cold, mut launch, mut scripted) = (Vec::new(), Vec::new(), Vec::new());
        let typing = with_typed && matches!(answer, FirstAnswer::Frame);
        let mut typed = TypedReport::default();
        for i in 0..runs {
            progress.step(&format!("bench {}: run {}/{runs} cold", pkg.name, i + 1));
            let t = Instant::now();
            let mut s = self.launch_cold(pkg, &settings, progress).await?;
            answer.wait(&mut s).await?;
            cold.push(t.elapsed().as_secs_f64() * 1000.0);
            typed_after(typing, &mut s, cold[i], &mut typed.cold_ms).await?;
            s.close().await;
            progress.step(&format!("bench {}: run {}/{runs} from launch image", pkg.name, i + 1));
            let t = Instant::now();
            let mut s = self.launch(pkg, &settings, progress).await?;
            answer.wait(&mut s).await?;
            launch.push(t.elapsed().as_secs_f64() * 1000.0);
            typed_after(typing, &mut s, launch[i], &mut typed.launch_ms).await?;
            s.close().await;
            if let FirstAnswer::Probe(p) = &answer {
                progress.step(&format!("bench {}: run {}/{runs} scripted", pkg.name, i + 1));
                let t = Instant::now();
                let mut s = self.launch(pkg, &settings, progress).await?;
                scripted_answer(&mut s, pkg, &p.input, &p.expect).await?;
                scripted.push(t.elapsed().as_secs_f64() * 1000.0);
                s.close().await;
            }
        }
        let mut pooled = Vec::new();
        if with_pool {
            let pool = crate::pool::Pool::default();
            for i in 0..runs {
                progress.step(&format!("bench {}: run {}/{runs} from the pool (filling)", pkg.name, i + 1));
                pool.fill(self, &pkg.name, pkg, 1, progress).await?;
                let t = Instant::now();
                let mut s = pool.take(&pkg.name, &settings).await?.expect("the pool was just filled");
                answer.wait(&mut s).await?;
                pooled.push(t.elapsed().as_secs_f64() * 1000.0);
                typed_after(typing, &mut s, pooled[i], &mut typed.pool_ms).await?;
                s.close().await;
            }
        }
        let (cold_p50, launch_p50) = (percentile(&cold, 50.0), percentile(&launch, 50.0));
        let pool_p50 = (!pooled.is_empty()).then(|| percentile(&pooled, 50.0));
        progress.done("benchmark finished");
        Ok(LaunchReport {
            package: pkg.name.clone(),
            runs,
            accel: images.launch.meta.get("accel").cloned().unwrap_or_default(),
            cold_p50_ms: cold_p50,
            cold_p99_ms: percentile(&cold, 99.0),
            launch_p50_ms: launch_p50,
            launch_p99_ms: percentile(&launch, 99.0),
            ratio_p50: cold_p50 / launch_p50,
            pool_p99_ms: (!pooled.is_empty()).then(|| percentile(&pooled, 99.0)),
            pool_ratio_p50: pool_p50.map(|p| cold_p50 / p),
            pool_p50_ms: pool_p50,
            pool_ms: pooled,
            cold_ms: cold,
            launch_ms: launch,
            scripted_p50_ms: (!scripted.is_empty()).then(|| percentile(&scripted, 50.0)),
            scripted_p99_ms: (!scripted.is_empty()).then(|| percentile(&scripted, 99.0)),
            scripted_ms: scripted,
            typed: typing.then_some(typed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn the_latency_plot_has_a_row_per_measured_path() {
        let r = super::LaunchReport {
            package: "p".into(),
            runs: 2,
            accel: "tcg".into(),
            cold_ms: vec![4000.0, 5000.0],
            launch_ms: vec![200.0, 210.0],
            cold_p50_ms: 4000.0,
            cold_p99_ms: 5000.0,
            launch_p50_ms: 200.0,
            launch_p99_ms: 210.0,
            ratio_p50: 20.0,
            pool_ms: vec![],
            pool_p50_ms: None,
            pool_p99_ms: None,
            pool_ratio_p50: None,
            scripted_ms: vec![],
            scripted_p50_ms: None,
            scripted_p99_ms: None,
            typed: None,
        };
        let svg = super::latency_svg(&r);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("cold boot") && svg.contains("launch image") && !svg.contains("warm pool"));
        assert_eq!(svg.matches("<circle").count(), 4);
        assert!(svg.contains("p50 4000") && svg.contains("p50 200"));
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(percentile(&v, 50.0), 3.0);
        assert_eq!(percentile(&v, 99.0), 5.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert!(percentile(&[], 50.0).is_nan());
    }
}

/// Results of `strata bench density`.
#[derive(Debug, Clone, Serialize)]
pub struct DensityReport {
    pub package: String,
    pub sessions: usize,
    pub guest_memory_mib: u32,
    /// How long the sessions sat idle after the last one started.
    pub idle_seconds: u64,
    /// Private memory of each idle session's QEMU: the larger of its
    /// Private_Dirty and Anonymous (from /proc/PID/smaps_rollup), MiB.
    pub private_mib: Vec<f64>,
    pub private_mean_mib: f64,
    pub private_max_mib: f64,
    pub rss_mean_mib: f64,
    /// MemAvailable before the sessions started minus after, MiB.
    pub host_memory_used_mib: f64,
    /// CPU each idle session's QEMU used over the last part of the idle
    /// time (at most 10 s), in percent of one core; mean over sessions.
    pub idle_cpu_percent_mean: f64,
    /// CPU each session's QEMU used in its first seconds after the launch
    /// answered ([`SETTLE`]), in ms; mean over sessions. Work a restored
    /// guest does on its own (what its launch image left pending) shows here.
    pub settle_cpu_ms_mean: f64,
}

/// How long after its launch a session's CPU counts as settling.
pub const SETTLE: Duration = Duration::from_secs(5);

/// CPU of a session's QEMU from its launch until [`SETTLE`] later.
struct Settling {
    pid: u32,
    launched: Instant,
    cpu_at_launch: f64,
    cpu_settled: Option<f64>,
}

impl Settling {
    fn new(pid: u32) -> Settling {
        Settling {
            pid,
            launched: Instant::now(),
            cpu_at_launch: crate::host::process_cpu_seconds(pid),
            cpu_settled: None,
        }
    }

    /// Takes the reading of every session whose settling time is over.
    fn read_due(all: &mut [Settling]) {
        for s in all.iter_mut().filter(|s| s.cpu_settled.is_none() && s.launched.elapsed() >= SETTLE) {
            s.cpu_settled = Some(crate::host::process_cpu_seconds(s.pid) - s.cpu_at_launch);
        }
    }
}

/// Private memory of a VM's processes, in MiB: its QEMU's (dirty or
/// anonymous, from `rollup`, QEMU's smaps_rollup) and, for a confined VM,
/// what its monitor dirtied of its own (the rest it shares with the fork
/// server).
fn vm_private_mib(qemu: u32, rollup: &str) -> f64 {
    let mut kib = kib_field(rollup, "Private_Dirty:").max(kib_field(rollup, "Anonymous:"));
    if let Some(monitor) = strata_vmm::monitor_of(qemu) {
        let text = std::fs::read_to_string(format!("/proc/{monitor}/smaps_rollup")).unwrap_or_default();
        kib += kib_field(&text, "Private_Dirty:");
    }
    kib / 1024.0
}

/// QEMU `pid`'s smaps_rollup ("" if gone).
fn smaps_rollup(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default()
}

/// A `Field:   N kB` value of /proc files such as meminfo and smaps_rollup, in KiB.
pub(crate) fn kib_field(text: &str, field: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
}

fn mem_available_mib() -> f64 {
    kib_field(&std::fs::read_to_string("/proc/meminfo").unwrap_or_default(), "MemAvailable:") / 1024.0
}

impl Engine {
    /// Starts `count` sessions from the launch image, lets them go idle, and
    /// measures what each costs the host.
    ///
    /// # Errors
    /// If a launch fails (the sessions started so far are stopped).
    pub async fn bench_density(
        &self,
        pkg: &Package,
        count: usize,
        idle: Duration,
        progress: &dyn Progress,
    ) -> Result<DensityReport, Error> {
        let images = self.ensure_images(pkg, progress).await?;
        let settings = ContextSettings::from_terminal(None);
        let before = mem_available_mib();
        let mut sessions = Vec::new();
        let mut settling = Vec::new();
        for i in 0..count {
            progress.step(&format!("bench density {}: session {}/{count}", pkg.name, i + 1));
            let mut s = self.launch_from(pkg, &images.launch, &settings).await?;
            s.quiet().await?;
            settling.push(Settling::new(s.vm_pid()));
            Settling::read_due(&mut settling);
            sessions.push(s);
        }
        progress.step(&format!("bench density: letting the sessions sit idle for {} s", idle.as_secs()));
        let idle_end = Instant::now() + idle;
        let window = idle.min(Duration::from_secs(10));
        // The last sessions finish settling during the idle time (or after
        // it, when it is shorter): one reading each, when it is due.
        while let Some(due) = settling.iter().filter(|s| s.cpu_settled.is_none()).map(|s| s.launched + SETTLE).min() {
            tokio::time::sleep_until(due.into()).await;
            Settling::read_due(&mut settling);
        }
        tokio::time::sleep_until((idle_end - window).into()).await;
        let cpu_before: Vec<f64> = sessions.iter().map(|s| crate::host::process_cpu_seconds(s.vm_pid())).collect();
        tokio::time::sleep(window).await;
        let idle_cpu: Vec<f64> = sessions
            .iter()
            .zip(&cpu_before)
            .map(|(s, before)| {
                (crate::host::process_cpu_seconds(s.vm_pid()) - before) / window.as_secs_f64().max(1e-3) * 100.0
            })
            .collect();
        let after = mem_available_mib();
        let (mut private, mut rss) = (Vec::new(), Vec::new());
        for s in &sessions {
            let text = smaps_rollup(s.vm_pid());
            private.push(vm_private_mib(s.vm_pid(), &text));
            rss.push(kib_field(&text, "Rss:") / 1024.0);
        }
        for s in sessions {
            s.close().await;
        }
        let mean = |v: &[f64]| if v.is_empty() { 0.0 } else { v.iter().sum::<f64>() / v.len() as f64 };
        progress.done("density benchmark finished");
        Ok(DensityReport {
            package: pkg.name.clone(),
            sessions: count,
            guest_memory_mib: pkg.def.memory_mib,
            private_mean_mib: mean(&private),
            private_max_mib: private.iter().copied().fold(0.0, f64::max),
            rss_mean_mib: mean(&rss),
            host_memory_used_mib: before - after,
            private_mib: private,
            idle_seconds: idle.as_secs(),
            idle_cpu_percent_mean: mean(&idle_cpu),
            settle_cpu_ms_mean: mean(
                &settling.iter().filter_map(|s| s.cpu_settled).map(|c| c * 1e3).collect::<Vec<_>>(),
            ),
        })
    }
}

/// Results of `strata bench load`.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub package: String,
    /// Launch requests per second asked for, and for how long.
    pub rate: f64,
    pub seconds: u64,
    pub pool_size: usize,
    pub requests: usize,
    pub failed: usize,
    /// Launches served from the warm pool (the rest restored on demand).
    pub from_pool: usize,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    /// Completed launches per second over the whole run.
    pub throughput: f64,
    /// CPU time of this process and its VMs (the pool's included) per
    /// completed launch, ms: under TCG what bounds launches per second.
    pub cpu_ms_per_launch: f64,
    /// Page faults (minor and major) of this process and its VMs per
    /// completed launch: under nested virtualisation each costs microseconds.
    pub page_faults_per_launch: f64,
}

/// CPU seconds and page faults used so far by this process and by its
/// children that were waited for (the VMs it started and stopped), and by
/// the fork server and the VMs it forked that have exited.
fn own_and_children_usage(fork_server: Option<&strata_vmm::ForkServer>) -> (f64, f64) {
    let own = strata_vmm::Usage::of_this_process();
    let forked = fork_server.and_then(|f| f.usage().ok()).unwrap_or_default();
    ((own.cpu_us + forked.cpu_us) as f64 / 1e6, (own.page_faults + forked.page_faults) as f64)
}

impl Engine {
    /// Sends launch requests at `rate` per second for `seconds`, each timed
    /// from the request to the program's probe answer, served from a pool of
    /// `pool_size` warm sessions refilled meanwhile (or restored on demand
    /// when the pool is empty).
    ///
    /// # Errors
    /// If the package has no probe or its images cannot be built.
    pub async fn bench_load(
        &self,
        pkg: &Package,
        rate: f64,
        seconds: u64,
        pool_size: usize,
        progress: &dyn Progress,
    ) -> Result<LoadReport, Error> {
        use futures_util::stream::{FuturesUnordered, StreamExt};
        let probe =
            pkg.def.probe.clone().ok_or_else(|| {
                Error::Config(format!("package {} has no [probe]; the benchmark needs one", pkg.name))
            })?;
        let images = self.ensure_images(pkg, progress).await?;
        let settings = ContextSettings::from_terminal(None);
        let pool = crate::pool::Pool::default();
        let (cpu_before, faults_before) = own_and_children_usage(self.fork_server().as_deref());
        if pool_size > 0 {
            progress.step(&format!("bench load {}: filling the pool ({pool_size})", pkg.name));
            pool.fill(self, &pkg.name, pkg, pool_size, progress).await?;
        }
        let total = ((rate * seconds as f64).round() as usize).clamp(1, 100_000);
        let interval = Duration::from_secs_f64(1.0 / rate);
        let one = |_: usize| {
            let (pool, settings, probe, launch) = (&pool, &settings, &probe, &images.launch);
            async move {
                let t = Instant::now();
                let (mut s, pooled) = match pool.take(&pkg.name, settings).await {
                    Ok(Some(s)) => (s, true),
                    _ => (self.launch_from(pkg, launch, settings).await?, false),
                };
                let answered = s.expect_after(probe.input.as_bytes(), &probe.expect, Duration::from_secs(120)).await;
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                s.close().await;
                answered.map(|_| (ms, pooled))
            }
        };
        let refill = async {
            loop {
                if pool_size > 0 {
                    if let Err(e) = pool.fill(self, &pkg.name, pkg, pool_size, &crate::LogProgress).await {
                        tracing::warn!(error = %e, "pool refill failed");
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::pin!(refill);
        let start = tokio::time::Instant::now();
        let mut next = start;
        let (mut issued, mut failed, mut from_pool) = (0, 0, 0);
        let mut latencies = Vec::new();
        let mut inflight = FuturesUnordered::new();
        progress.step(&format!("bench load {}: {total} launches at {rate}/s", pkg.name));
        while issued < total || !inflight.is_empty() {
            tokio::select! {
                _ = tokio::time::sleep_until(next), if issued < total => {
                    inflight.push(one(issued));
                    issued += 1;
                    next += interval;
                }
                Some(r) = inflight.next(), if !inflight.is_empty() => match r {
                    Ok((ms, pooled)) => {
                        latencies.push(ms);
                        from_pool += usize::from(pooled);
                    }
                    Err(e) => {
                        failed += 1;
                        tracing::warn!(error = %e, "a launch under load failed");
                    }
                },
                _ = &mut refill => {}
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        pool.drain().await;
        let (cpu, faults) = own_and_children_usage(self.fork_server().as_deref());
        let (cpu, faults) = (cpu - cpu_before, faults - faults_before);
        progress.done("load benchmark finished");
        Ok(LoadReport {
            package: pkg.name.clone(),
            rate,
            seconds,
            pool_size,
            requests: total,
            failed,
            from_pool,
            latency_p50_ms: percentile(&latencies, 50.0),
            latency_p99_ms: percentile(&latencies, 99.0),
            throughput: latencies.len() as f64 / elapsed,
            cpu_ms_per_launch: cpu * 1000.0 / latencies.len().max(1) as f64,
            page_faults_per_launch: faults / latencies.len().max(1) as f64,
        })
    }
}

/// Draws the launch latencies of a report as an SVG strip plot on a
/// logarithmic axis: one row per path, one dot per launch, p50 marked.
pub fn latency_svg(r: &LaunchReport) -> String {
    let rows: Vec<(&str, &[f64], &str)> = [
        ("cold boot", r.cold_ms.as_slice(), "#c0392b"),
        ("launch image", r.launch_ms.as_slice(), "#2471a3"),
        ("warm pool", r.pool_ms.as_slice(), "#1e8449"),
    ]
    .into_iter()
    .filter(|(_, v, _)| !v.is_empty())
    .collect();
    let all: Vec<f64> = rows.iter().flat_map(|(_, v, _)| v.iter().copied()).filter(|v| *v > 0.0).collect();
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min).max(1.0);
    let hi = all.iter().copied().fold(0.0, f64::max).max(lo * 10.0);
    let (lo_d, hi_d) = (lo.log10().floor(), hi.log10().ceil());
    let (left, right, top, row_h) = (130.0, 760.0, 50.0, 60.0);
    let x = |ms: f64| left + (ms.max(1.0).log10() - lo_d) / (hi_d - lo_d) * (right - left);
    let height = top + row_h * rows.len() as f64 + 50.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"800\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"400\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">{} launch latency, request to first answer ({} runs, {})</text>\n",
        r.package, r.runs, r.accel
    );
    let axis_y = top + row_h * rows.len() as f64;
    let mut d = lo_d;
    while d <= hi_d {
        let px = x(10f64.powf(d));
        svg += &format!(
            "<line x1=\"{px:.1}\" y1=\"{top}\" x2=\"{px:.1}\" y2=\"{axis_y}\" stroke=\"#ddd\"/>\
             <text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{} ms</text>\n",
            axis_y + 18.0,
            10f64.powf(d)
        );
        d += 1.0;
    }
    for (i, (name, values, color)) in rows.iter().enumerate() {
        let y = top + row_h * i as f64 + row_h / 2.0;
        svg += &format!("<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{name}</text>\n", left - 10.0, y + 4.0);
        for (j, v) in values.iter().enumerate() {
            let jitter = ((j * 7919) % 17) as f64 - 8.0;
            svg += &format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"{color}\" fill-opacity=\"0.6\"/>\n",
                x(*v),
                y + jitter
            );
        }
        let p50 = percentile(values, 50.0);
        svg += &format!(
            "<line x1=\"{0:.1}\" y1=\"{1:.1}\" x2=\"{0:.1}\" y2=\"{2:.1}\" stroke=\"black\" stroke-width=\"2\"/>\
             <text x=\"{0:.1}\" y=\"{3:.1}\" text-anchor=\"middle\">p50 {4:.0}</text>\n",
            x(p50),
            y - 14.0,
            y + 14.0,
            y - 18.0,
            p50
        );
    }
    svg += &format!(
        "<text x=\"400\" y=\"{:.1}\" text-anchor=\"middle\">milliseconds (log scale)</text>\n</svg>\n",
        axis_y + 40.0
    );
    svg
}

/// Results of `strata bench cache`: launches on a server whose local cache
/// is cold (its images come from the shared store) versus warm.
#[derive(Debug, Clone, Serialize)]
pub struct CacheReport {
    pub package: String,
    pub runs: usize,
    /// Bytes of blobs one cold server fetched.
    pub fetched_bytes: u64,
    pub cold_ms: Vec<f64>,
    pub warm_ms: Vec<f64>,
    pub cold_p50_ms: f64,
    pub cold_p99_ms: f64,
    pub warm_p50_ms: f64,
    pub warm_p99_ms: f64,
    pub ratio_p50: f64,
}

impl Engine {
    /// Publishes a package's images (base, install, launch; built first if
    /// missing) to the shared store.
    ///
    /// # Errors
    /// If there is no shared store, a build fails, or the upload fails.
    pub async fn publish_package(&self, pkg: &Package, progress: &dyn Progress) -> Result<(), Error> {
        let remote = self.remote.as_ref().ok_or_else(|| {
            Error::Config("no shared store: set STRATA_S3_ENDPOINT and the rest (see scripts/garage.sh)".into())
        })?;
        let images = self.ensure_images(pkg, progress).await?;
        for rec in [&images.base, &images.install, &images.launch] {
            progress.step(&format!("publishing the {} image {}", rec.kind, &rec.digest[..12]));
            remote.publish(rec).await?;
        }
        progress.done(&format!("{} published", pkg.name));
        Ok(())
    }

    /// Launch to first answer on a server with an empty local store (a new
    /// one per run, in `STATE/tmp`), which fetches the images from the
    /// shared store, versus launches on that server once its cache is warm.
    ///
    /// # Errors
    /// If there is no shared store, or a launch fails.
    pub async fn bench_cache(&self, pkg: &Package, runs: usize, progress: &dyn Progress) -> Result<CacheReport, Error> {
        let answer = FirstAnswer::of(pkg)?;
        self.publish_package(pkg, progress).await?;
        let remote_cfg = self.remote.as_ref().map(|r| r.config().clone());
        let accel = self.accel_for(&self.ensure_base(pkg.os, progress).await?).await?;
        let settings = ContextSettings::from_terminal(None);
        let (mut cold, mut warm, mut fetched_bytes) = (Vec::new(), Vec::new(), 0);
        for run in 0..runs {
            let work = self.store.work_dir("cold-server")?;
            let mut cfg = self.cfg.clone();
            cfg.state_dir = work.path().to_path_buf();
            cfg.remote = remote_cfg.clone();
            cfg.accel = Some(accel);
            let server = Engine::open(cfg)?;
            progress.step(&format!("cold server {}/{runs}: fetching and launching {}", run + 1, pkg.name));
            let t0 = Instant::now();
            let mut s = server.launch(pkg, &settings, progress).await?;
            answer.wait(&mut s).await?;
            cold.push(t0.elapsed().as_secs_f64() * 1e3);
            s.close().await;
            fetched_bytes = server.store.list_images()?.iter().map(|i| i.size).sum();
            for _ in 0..runs {
                let t0 = Instant::now();
                let mut s = server.launch(pkg, &settings, progress).await?;
                answer.wait(&mut s).await?;
                warm.push(t0.elapsed().as_secs_f64() * 1e3);
                s.close().await;
            }
        }
        progress.done("cache benchmark done");
        let (c50, w50) = (percentile(&cold, 50.0), percentile(&warm, 50.0));
        Ok(CacheReport {
            package: pkg.name.clone(),
            runs,
            fetched_bytes,
            cold_p50_ms: c50,
            cold_p99_ms: percentile(&cold, 99.0),
            warm_p50_ms: w50,
            warm_p99_ms: percentile(&warm, 99.0),
            ratio_p50: c50 / w50,
            cold_ms: cold,
            warm_ms: warm,
        })
    }
}

/// One way of launching in `strata bench confine`: its measurements.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ConfineSide {
    /// Request to the program's first answer, ms.
    pub first_answer_ms: Vec<f64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// CPU of the VM's QEMU from its start to the first answer, ms.
    pub cpu_ms: Vec<f64>,
    pub cpu_mean_ms: f64,
    /// Private memory of the QEMU after it sat idle (Private_Dirty and
    /// Anonymous, from smaps_rollup), MiB.
    pub private_mib: Vec<f64>,
    pub private_mean_mib: f64,
}

/// Results of `strata bench confine`: the same launches confined and
/// unconfined, interleaved, in one run.
#[derive(Debug, Clone, Serialize)]
pub struct ConfineReport {
    pub package: String,
    pub runs: usize,
    pub accel: String,
    pub confined: ConfineSide,
    pub unconfined: ConfineSide,
    /// Confined over unconfined CPU per launch, minus one (0.05: 5% more).
    pub cpu_cost: f64,
    /// Confined minus unconfined private memory per idle session, MiB.
    pub memory_cost_mib: f64,
}

impl ConfineSide {
    fn summarize(mut self) -> ConfineSide {
        let mean = |v: &[f64]| if v.is_empty() { 0.0 } else { v.iter().sum::<f64>() / v.len() as f64 };
        self.p50_ms = percentile(&self.first_answer_ms, 50.0);
        self.p99_ms = percentile(&self.first_answer_ms, 99.0);
        self.cpu_mean_ms = mean(&self.cpu_ms);
        self.private_mean_mib = mean(&self.private_mib);
        self
    }
}

/// How long a session sits idle before its private memory is read.
const CONFINE_IDLE: Duration = Duration::from_secs(3);

impl Engine {
    /// Launches `runs` sessions confined and `runs` unconfined (the ids,
    /// cgroup, seccomp filter, mount namespace and file bound left out),
    /// alternating so the host's drift hits both alike, each from the
    /// launch image to the first answer.
    ///
    /// # Errors
    /// If the package has no probe, or a launch fails.
    pub async fn bench_confine(
        &self,
        pkg: &Package,
        runs: usize,
        progress: &dyn Progress,
    ) -> Result<ConfineReport, Error> {
        let answer = FirstAnswer::of(pkg)?;
        let images = self.ensure_images(pkg, progress).await?;
        let settings = ContextSettings::from_terminal(None);
        let (mut confined, mut unconfined) = (ConfineSide::default(), ConfineSide::default());
        let measured = async {
            for i in 0..runs {
                for confine in [i % 2 == 0, i % 2 != 0] {
                    let (side, name) =
                        if confine { (&mut confined, "confined") } else { (&mut unconfined, "unconfined") };
                    progress.step(&format!("bench confine {}: run {}/{runs} {name}", pkg.name, i + 1));
                    self.set_confined_for_benchmark(confine);
                    let t = Instant::now();
                    let mut s = self.launch_from(pkg, &images.launch, &settings).await?;
                    answer.wait(&mut s).await?;
                    side.first_answer_ms.push(t.elapsed().as_secs_f64() * 1000.0);
                    side.cpu_ms.push(crate::host::process_cpu_seconds(s.vm_pid()) * 1000.0);
                    s.quiet().await?;
                    tokio::time::sleep(CONFINE_IDLE).await;
                    side.private_mib.push(vm_private_mib(s.vm_pid(), &smaps_rollup(s.vm_pid())));
                    s.close().await;
                }
            }
            Ok::<_, Error>(())
        };
        let result = measured.await;
        self.set_confined_for_benchmark(true);
        result?;
        let (confined, unconfined) = (confined.summarize(), unconfined.summarize());
        progress.done("confinement benchmark finished");
        Ok(ConfineReport {
            package: pkg.name.clone(),
            runs,
            accel: images.launch.meta.get("accel").cloned().unwrap_or_default(),
            cpu_cost: confined.cpu_mean_ms / unconfined.cpu_mean_ms.max(1e-9) - 1.0,
            memory_cost_mib: confined.private_mean_mib - unconfined.private_mean_mib,
            confined,
            unconfined,
        })
    }
}

/// Results of `strata bench fork`: forks of a running session against
/// launches of as many sessions from the launch image, same run.
#[derive(Debug, Clone, Serialize)]
pub struct ForkReport {
    pub package: String,
    pub copies: usize,
    pub rounds: usize,
    pub accel: String,
    /// The guest's memory size, MiB.
    pub memory_mib: u32,
    /// How long the parent's guest was stopped for each fork, ms.
    pub parent_stopped_ms: Vec<f64>,
    /// Request to the parent running on (its state sent and its disk
    /// writes copied), ms.
    pub captured_ms: Vec<f64>,
    /// Request to every copy answering its probe, ms.
    pub forks_answering_ms: Vec<f64>,
    /// The baseline: `copies` sessions launched at once from the launch
    /// image, request to every one answering, ms.
    pub launches_answering_ms: Vec<f64>,
    /// Mean proportional (Pss) and resident memory of a copy once all
    /// answered, MiB; and of a launched session.
    pub fork_pss_mib: f64,
    pub fork_rss_mib: f64,
    pub launch_pss_mib: f64,
    pub launch_rss_mib: f64,
}

/// Waits for every session to answer; the time from `t0`.
async fn all_answer(answer: &FirstAnswer, sessions: &mut [crate::Session], t0: Instant) -> Result<f64, Error> {
    let waits = sessions.iter_mut().map(|s| answer.wait(s));
    for r in futures_util::future::join_all(waits).await {
        r?;
    }
    Ok(t0.elapsed().as_secs_f64() * 1000.0)
}

/// Mean (Pss, Rss) of the sessions' QEMUs, MiB.
fn mean_pss_rss(sessions: &[crate::Session]) -> (f64, f64) {
    let n = sessions.len().max(1) as f64;
    let (pss, rss) = sessions.iter().fold((0.0, 0.0), |(p, r), s| {
        let rollup = smaps_rollup(s.vm_pid());
        (p + kib_field(&rollup, "Pss:"), r + kib_field(&rollup, "Rss:"))
    });
    (pss / n / 1024.0, rss / n / 1024.0)
}

impl Engine {
    /// Forks a running session of `pkg` into `copies` sessions, `rounds`
    /// times, each round beside a baseline of `copies` sessions launched
    /// at once from the launch image: the parent's stop, the time until
    /// every copy answers its probe, and the copies' memory.
    ///
    /// # Errors
    /// If the package has no probe (or is graphical), or a launch or fork fails.
    pub async fn bench_fork(
        &self,
        pkg: &Package,
        copies: usize,
        rounds: usize,
        progress: &dyn Progress,
    ) -> Result<ForkReport, Error> {
        let answer = FirstAnswer::of(pkg)?;
        let images = self.ensure_images(pkg, progress).await?;
        let settings = ContextSettings::from_terminal(None);
        let mut parent = self.launch_from(pkg, &images.launch, &settings).await?;
        answer.wait(&mut parent).await?;
        let mut r = ForkReport {
            package: pkg.name.clone(),
            copies,
            rounds,
            accel: images.launch.meta.get("accel").cloned().unwrap_or_default(),
            memory_mib: pkg.def.memory_mib,
            parent_stopped_ms: Vec::new(),
            captured_ms: Vec::new(),
            forks_answering_ms: Vec::new(),
            launches_answering_ms: Vec::new(),
            fork_pss_mib: 0.0,
            fork_rss_mib: 0.0,
            launch_pss_mib: 0.0,
            launch_rss_mib: 0.0,
        };
        let (mut fork_mem, mut launch_mem) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            progress.step(&format!("bench fork {}: round {}/{rounds}, {copies} launches", pkg.name, round + 1));
            let t0 = Instant::now();
            let launched =
                futures_util::future::join_all((0..copies).map(|_| self.launch_from(pkg, &images.launch, &settings)));
            let mut sessions = launched.await.into_iter().collect::<Result<Vec<_>, _>>()?;
            r.launches_answering_ms.push(all_answer(&answer, &mut sessions, t0).await?);
            launch_mem.push(mean_pss_rss(&sessions));
            for s in sessions {
                s.close().await;
            }

            progress.step(&format!("bench fork {}: round {}/{rounds}, {copies} copies", pkg.name, round + 1));
            let t0 = Instant::now();
            let captured = self.capture_snapshot(&mut parent, None).await?;
            r.captured_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
            r.parent_stopped_ms.push(captured.stopped.as_secs_f64() * 1000.0);
            let (snap, forks) = self.fork_captured(captured, copies, None).await?;
            let mut forks = forks.into_iter().collect::<Result<Vec<_>, _>>()?;
            r.forks_answering_ms.push(all_answer(&answer, &mut forks, t0).await?);
            fork_mem.push(mean_pss_rss(&forks));
            for s in forks {
                s.close().await;
            }
            self.store.remove_image(&snap.image.digest)?;
        }
        parent.close().await;
        let mean =
            |v: &[(f64, f64)], pick: fn(&(f64, f64)) -> f64| v.iter().map(pick).sum::<f64>() / v.len().max(1) as f64;
        (r.fork_pss_mib, r.fork_rss_mib) = (mean(&fork_mem, |m| m.0), mean(&fork_mem, |m| m.1));
        (r.launch_pss_mib, r.launch_rss_mib) = (mean(&launch_mem, |m| m.0), mean(&launch_mem, |m| m.1));
        progress.done("fork benchmark finished");
        Ok(r)
    }
}

/// What `strata bench move` measured: live moves of a session to a new
/// QEMU on this host (the same steps as between servers, without the
/// network), against pausing it to an image and resuming it, the way a
/// session changed servers before live moves.
#[derive(Debug, Clone, Serialize)]
pub struct MoveReport {
    pub package: String,
    pub rounds: usize,
    pub accel: String,
    /// The guest's memory size, MiB.
    pub memory_mib: u32,
    /// How long the guest was stopped by each live move, ms: QEMU's
    /// downtime, then until the receiving QEMU runs it (its disk's writes
    /// put in place).
    pub downtime_ms: Vec<f64>,
    /// From the move's start until the moved guest answers its probe, ms
    /// (it runs where it was for most of it).
    pub move_answering_ms: Vec<f64>,
    /// The baseline: from the pause's start until the resumed guest
    /// answers, ms (it is stopped throughout).
    pub pause_resume_answering_ms: Vec<f64>,
}

impl Engine {
    /// Live-moves a session of `pkg` to a new QEMU on this host `rounds`
    /// times, and pauses and resumes one as many times, alternating.
    ///
    /// # Errors
    /// If images cannot be built, a launch, move or resume fails, or a
    /// guest does not answer.
    pub async fn bench_move(&self, pkg: &Package, rounds: usize, progress: &dyn Progress) -> Result<MoveReport, Error> {
        let answer = FirstAnswer::of(pkg)?;
        let images = self.ensure_images(pkg, progress).await?;
        let settings = ContextSettings::from_terminal(None);
        let mut r = MoveReport {
            package: pkg.name.clone(),
            rounds,
            accel: images.launch.meta.get("accel").cloned().unwrap_or_default(),
            memory_mib: pkg.def.memory_mib,
            downtime_ms: Vec::new(),
            move_answering_ms: Vec::new(),
            pause_resume_answering_ms: Vec::new(),
        };
        for round in 0..rounds {
            progress.step(&format!("bench move {}: round {}/{rounds}, a live move", pkg.name, round + 1));
            let mut s = self.launch_from(pkg, &images.launch, &settings).await?;
            answer.wait(&mut s).await?;
            s.quiet().await?;
            let t0 = Instant::now();
            let moved = self.move_within_host(&mut s).await;
            s.close().await;
            let (mut moved, downtime) = moved?;
            moved.reattach(&settings.to_terminal_context()).await?;
            answer.wait(&mut moved).await?;
            r.move_answering_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
            r.downtime_ms.push(downtime.as_secs_f64() * 1000.0);
            moved.close().await;

            progress.step(&format!("bench move {}: round {}/{rounds}, a pause and resume", pkg.name, round + 1));
            let mut s = self.launch_from(pkg, &images.launch, &settings).await?;
            answer.wait(&mut s).await?;
            let id = s.id.clone();
            let t0 = Instant::now();
            self.pause_to_image(&mut s, "bench move: the baseline").await?;
            drop(s);
            let mut resumed = self.resume_session(&id, Some(&settings)).await?;
            answer.wait(&mut resumed).await?;
            r.pause_resume_answering_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
            resumed.close().await;
        }
        self.drop_paused_images()?;
        progress.done("move benchmark finished");
        Ok(r)
    }

    /// A live move of `s` to a new QEMU on this host, under a new id: the
    /// moved session and QEMU's downtime. `s` is left stopped.
    async fn move_within_host(&self, s: &mut crate::Session) -> Result<(crate::Session, Duration), Error> {
        let mut rec = self.movable_record(&s.id)?;
        rec.id = crate::launch::new_session_id();
        let incoming = self.receive_session(&rec).await?;
        let (listener, socket) = self.outgoing_socket(s)?;
        let relay = crate::moves::relay_within_host(listener, incoming.socket(), strata_vmm::qemu::Stream::Single);
        let sent = self.send_session(s, &socket).await;
        let _ = std::fs::remove_file(&socket);
        let (overlay, downtime) = match sent {
            Ok(done) => done,
            Err(e) => {
                relay.abort();
                incoming.abandon().await;
                return Err(e);
            }
        };
        // The guest stays stopped until the receiving QEMU runs it: QEMU's
        // downtime, then the disk's writes put in place.
        let stopped_at = Instant::now();
        let relayed =
            relay.await.map_err(|e| Error::Move(e.to_string())).and_then(|r| r.map_err(|e| Error::Move(e.to_string())));
        if let Err(e) = relayed {
            incoming.abandon().await;
            return Err(e);
        }
        let moved = self.finish_receive(incoming, &overlay).await?;
        Ok((moved, downtime + stopped_at.elapsed()))
    }
}
