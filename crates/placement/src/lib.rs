//! Placement: which server launches a session.
//!
//! Every server reports its load ([`ServerLoad`]); a launch request
//! ([`Request`]) names the package's memory and the image digests it needs.
//! A [`Rule`], named in the configuration, picks one server among the
//! eligible ones. Eligibility is admission control: a server never commits
//! more guest memory than `overcommit` times its own memory, and a server
//! that stopped reporting is never chosen.
//!
//! The default rule, `sample-2`, is "the power of two choices": it samples
//! two eligible servers and takes the better score, which is almost as good
//! as scanning all of them and costs the same at any fleet size. The score
//! weighs image locality highest (a server holding the package's images
//! launches from its cache, without fetching), then free memory, then load.

use std::collections::BTreeSet;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Errors of placement.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Error {
    #[error("no server can take a session of {memory_mib} MiB: {reason}")]
    NoServer { memory_mib: u64, reason: String },
    #[error("unknown placement rule {0:?}; known: sample-2, sample-3, least-loaded, round-robin")]
    UnknownRule(String),
    #[error("overcommit ratio {0} is out of range (0.1 to 16)")]
    BadOvercommit(f64),
}

/// What a server reports about itself.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ServerLoad {
    pub id: String,
    /// It reported recently (its lease is alive).
    pub healthy: bool,
    pub sessions: u32,
    pub cpus: u32,
    /// Load average over the last minute.
    pub load1: f64,
    pub memory_total_mib: u64,
    pub memory_free_mib: u64,
    /// Guest memory of the sessions it runs.
    pub memory_committed_mib: u64,
    /// What it holds in its local cache: image digests, and `package/NAME`
    /// for each package whose launch image it holds (a control plane knows
    /// package names, not the digests a server's recipes come to).
    pub cached_images: BTreeSet<String>,
    /// Where its API answers (`http://ADDR:PORT`); empty in simulations.
    #[serde(default)]
    pub address: String,
}

/// A launch request as placement sees it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub memory_mib: u64,
    /// Digests of the images the launch needs (base, install, launch).
    pub images: Vec<String>,
}

/// How placement decides.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    pub rule: RuleKind,
    /// Guest memory a server may commit, as a multiple of its own memory.
    pub overcommit: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { rule: RuleKind::Sample(2), overcommit: 1.0 }
    }
}

/// The rules there are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleKind {
    /// Sample this many eligible servers, take the best score.
    Sample(u8),
    /// The best score among all eligible servers.
    LeastLoaded,
    /// Eligible servers in turn.
    RoundRobin,
}

impl std::str::FromStr for RuleKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "sample-2" => Ok(RuleKind::Sample(2)),
            "sample-3" => Ok(RuleKind::Sample(3)),
            "least-loaded" => Ok(RuleKind::LeastLoaded),
            "round-robin" => Ok(RuleKind::RoundRobin),
            _ => Err(Error::UnknownRule(s.to_string())),
        }
    }
}

impl Policy {
    /// # Errors
    /// [`Error::BadOvercommit`] if the ratio is out of range.
    pub fn new(rule: RuleKind, overcommit: f64) -> Result<Policy, Error> {
        if !(0.1..=16.0).contains(&overcommit) {
            return Err(Error::BadOvercommit(overcommit));
        }
        Ok(Policy { rule, overcommit })
    }
}

/// Whether `s` may take `req` under `overcommit` (admission control).
pub fn eligible(s: &ServerLoad, req: &Request, overcommit: f64) -> bool {
    let limit = (s.memory_total_mib as f64 * overcommit) as u64;
    s.healthy && s.memory_committed_mib.saturating_add(req.memory_mib) <= limit && s.memory_free_mib >= req.memory_mib
}

/// How good a home `s` is for `req`; higher is better.
pub fn score(s: &ServerLoad, req: &Request) -> f64 {
    let cached = if req.images.is_empty() {
        1.0
    } else {
        req.images.iter().filter(|d| s.cached_images.contains(*d)).count() as f64 / req.images.len() as f64
    };
    let free = s.memory_free_mib as f64 / s.memory_total_mib.max(1) as f64;
    let busy = s.load1 / f64::from(s.cpus.max(1));
    // Locality first: fetching images costs more than any load difference.
    4.0 * cached + free - busy.min(4.0) * 0.5
}

/// A placer: a policy and the state its rule keeps (random source, turn).
pub struct Placer {
    policy: Policy,
    rng: SmallRng,
    turn: usize,
}

impl Placer {
    /// `seed` makes the random choices repeatable (tests, simulations).
    pub fn new(policy: Policy, seed: u64) -> Placer {
        Placer { policy, rng: SmallRng::seed_from_u64(seed), turn: 0 }
    }

    /// The index in `servers` of the server to launch `req` on.
    ///
    /// # Errors
    /// [`Error::NoServer`] when no server is eligible, saying why.
    pub fn choose(&mut self, servers: &[ServerLoad], req: &Request) -> Result<usize, Error> {
        let eligible: Vec<usize> =
            (0..servers.len()).filter(|&i| eligible(&servers[i], req, self.policy.overcommit)).collect();
        if eligible.is_empty() {
            let healthy = servers.iter().filter(|s| s.healthy).count();
            let reason = if servers.is_empty() {
                "no server is registered".to_string()
            } else if healthy == 0 {
                format!("none of the {} servers is reporting", servers.len())
            } else {
                format!(
                    "all {healthy} reporting servers are full (guest memory committed up to {} times their memory)",
                    self.policy.overcommit
                )
            };
            return Err(Error::NoServer { memory_mib: req.memory_mib, reason });
        }
        let best = |cands: &mut dyn Iterator<Item = usize>| {
            cands
                .max_by(|&a, &b| {
                    score(&servers[a], req)
                        .total_cmp(&score(&servers[b], req))
                        // Ties go to the server listed first, so choices are stable.
                        .then(b.cmp(&a))
                })
                .expect("at least one candidate")
        };
        Ok(match self.policy.rule {
            RuleKind::LeastLoaded => best(&mut eligible.iter().copied()),
            RuleKind::RoundRobin => {
                let i = eligible[self.turn % eligible.len()];
                self.turn = self.turn.wrapping_add(1);
                i
            }
            RuleKind::Sample(k) => {
                let k = usize::from(k).min(eligible.len());
                let mut picked: Vec<usize> = Vec::with_capacity(k);
                while picked.len() < k {
                    let i = eligible[self.rng.random_range(0..eligible.len())];
                    if !picked.contains(&i) {
                        picked.push(i);
                    }
                }
                best(&mut picked.into_iter())
            }
        })
    }
}

#[cfg(test)]
mod tests;

/// Decision times of each rule over a simulated fleet.
#[derive(Serialize, Debug, Clone)]
pub struct RuleTiming {
    pub rule: String,
    pub decisions: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Share of decisions that landed on a server holding all the images.
    pub local_share: f64,
}

/// Times `decisions` placements by each rule over `servers` simulated
/// servers (scattered load and memory, a tenth of them holding the
/// package's images, a twentieth silent).
pub fn simulate(servers: usize, decisions: usize, seed: u64) -> Vec<RuleTiming> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let images: Vec<String> = ["base", "install", "launch"].iter().map(|s| s.to_string()).collect();
    let fleet: Vec<ServerLoad> = (0..servers)
        .map(|i| {
            let total = 65536;
            let committed = rng.random_range(0..total);
            ServerLoad {
                id: format!("server-{i}"),
                healthy: rng.random_range(0..20) != 0,
                sessions: (committed / 512) as u32,
                cpus: 32,
                load1: rng.random_range(0.0..40.0),
                memory_total_mib: total,
                memory_free_mib: total - committed,
                memory_committed_mib: committed,
                cached_images: if rng.random_range(0..10) == 0 {
                    images.iter().cloned().collect()
                } else {
                    BTreeSet::new()
                },
                address: String::new(),
            }
        })
        .collect();
    let req = Request { memory_mib: 512, images };
    let mut out = Vec::new();
    for (name, rule) in [
        ("sample-2", RuleKind::Sample(2)),
        ("sample-3", RuleKind::Sample(3)),
        ("least-loaded", RuleKind::LeastLoaded),
        ("round-robin", RuleKind::RoundRobin),
    ] {
        let mut placer = Placer::new(Policy { rule, overcommit: 1.0 }, seed);
        let mut times = Vec::with_capacity(decisions);
        let mut local = 0usize;
        for _ in 0..decisions {
            let t = std::time::Instant::now();
            let chosen = placer.choose(&fleet, &req);
            times.push(t.elapsed().as_secs_f64() * 1e6);
            if let Ok(i) = chosen {
                if req.images.iter().all(|d| fleet[i].cached_images.contains(d)) {
                    local += 1;
                }
            }
        }
        times.sort_by(f64::total_cmp);
        let at = |p: f64| times[((p / 100.0 * times.len() as f64).ceil() as usize).clamp(1, times.len()) - 1];
        out.push(RuleTiming {
            rule: name.into(),
            decisions,
            p50_us: at(50.0),
            p99_us: at(99.0),
            local_share: local as f64 / decisions.max(1) as f64,
        });
    }
    out
}
