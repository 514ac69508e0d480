//! Pool sizes that follow demand. Each package's pool aims at the number of
//! launches expected while one pooled session is being restored and warmed
//! (the arrival rate over a recent window times the refill time), plus one
//! for a burst, between a floor and a cap. Above its aim, a pool gives
//! sessions back (their memory) once they have waited a while unused.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Launches of one package and what they imply for its pool.
#[derive(Debug, Clone)]
pub struct Demand {
    /// Fewest sessions kept waiting, however quiet.
    pub floor: usize,
    /// Most sessions kept waiting, however busy.
    pub cap: usize,
    /// How far back arrivals count.
    pub window: Duration,
    /// Time to restore and warm one pooled session (measured, smoothed).
    refill: Duration,
    arrivals: VecDeque<Instant>,
}

/// Arrivals kept at most (bounded memory under any load).
const MAX_ARRIVALS: usize = 10_000;

impl Demand {
    /// A pool between `floor` and `cap`, counting arrivals over `window`.
    pub fn new(floor: usize, cap: usize, window: Duration) -> Demand {
        Demand { floor: floor.min(cap), cap, window, refill: Duration::from_millis(800), arrivals: VecDeque::new() }
    }

    /// A launch of this package arrived at `now`.
    pub fn arrived(&mut self, now: Instant) {
        self.arrivals.push_back(now);
        if self.arrivals.len() > MAX_ARRIVALS {
            self.arrivals.pop_front();
        }
    }

    /// One pooled session took `took` to restore and warm.
    pub fn refilled(&mut self, took: Duration) {
        // Smoothed, so one slow restore does not swing the size.
        self.refill = (self.refill * 3 + took) / 4;
    }

    /// Launches per second over the window ending at `now`.
    pub fn rate(&mut self, now: Instant) -> f64 {
        while self.arrivals.front().is_some_and(|t| now.saturating_duration_since(*t) > self.window) {
            self.arrivals.pop_front();
        }
        self.arrivals.len() as f64 / self.window.as_secs_f64()
    }

    /// How many sessions the pool should hold now.
    pub fn target(&mut self, now: Instant) -> usize {
        let rate = self.rate(now);
        if rate == 0.0 {
            return self.floor;
        }
        let during_refill = (rate * self.refill.as_secs_f64()).ceil() as usize;
        (during_refill + 1).clamp(self.floor, self.cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_follows_the_arrival_rate_between_floor_and_cap() {
        let t0 = Instant::now();
        let mut d = Demand::new(1, 8, Duration::from_secs(10));
        assert_eq!(d.target(t0), 1, "quiet: the floor");
        // 5 launches a second for 10 s, with a refill of 0.8 s: 4 in flight, plus one.
        for i in 0..50 {
            d.arrived(t0 + Duration::from_millis(200 * i));
        }
        let busy = t0 + Duration::from_secs(10);
        assert!((d.rate(busy) - 5.0).abs() < 0.2, "{}", d.rate(busy));
        assert_eq!(d.target(busy), 5);
        // Slower refills need more waiting sessions, never more than the cap.
        for _ in 0..20 {
            d.refilled(Duration::from_secs(3));
        }
        assert_eq!(d.target(busy), 8);
        // Demand stops: once the window has passed, back to the floor.
        assert_eq!(d.target(busy + Duration::from_secs(11)), 1);
    }

    #[test]
    fn a_floor_above_the_cap_is_the_cap_and_arrivals_stay_bounded() {
        let t0 = Instant::now();
        let mut d = Demand::new(5, 2, Duration::from_secs(1));
        assert_eq!(d.target(t0), 2);
        for _ in 0..(MAX_ARRIVALS + 10) {
            d.arrived(t0);
        }
        assert_eq!(d.arrivals.len(), MAX_ARRIVALS);
        assert_eq!(d.target(t0), 2);
    }
}
