//! The virtual clock: virtual time runs `factor` times faster than real
//! time, from a virtual start, once started.
//!
//! With a fixed compression the factor never changes. In `"max"` mode a
//! pacer ([`Pacer`]) adjusts it every few milliseconds to keep the connected
//! traps' backlog near a target: virtual time runs as fast as the server
//! acknowledges. Traps never read a wall clock for their content: every
//! detection carries the virtual time its trigger was scheduled for, so a
//! trap that wakes late (the factor rose while it slept) produces exactly the
//! same detections.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Where the clock stands: virtual `virtual_ms` at real `real`, running at `factor`.
#[derive(Debug, Clone, Copy)]
struct Anchor {
    real: Instant,
    virtual_ms: f64,
    factor: f64,
}

/// A virtual clock shared by every trap.
#[derive(Debug)]
pub struct VirtualClock {
    anchor: Mutex<Option<Anchor>>,
    start_ms: u64,
    initial_factor: f64,
}

impl VirtualClock {
    /// A stopped clock at virtual `start_ms` (milliseconds since the Unix
    /// epoch) that will run at `factor`.
    pub fn new(start_ms: u64, factor: f64) -> Self {
        Self { anchor: Mutex::new(None), start_ms, initial_factor: factor }
    }

    fn anchor(&self) -> Option<Anchor> {
        *self.anchor.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the clock now.
    pub fn start(&self) {
        self.start_at(Instant::now());
    }

    fn start_at(&self, real: Instant) {
        let mut anchor = self.anchor.lock().unwrap_or_else(|e| e.into_inner());
        *anchor = Some(Anchor { real, virtual_ms: self.start_ms as f64, factor: self.initial_factor });
    }

    /// Virtual now, milliseconds since the Unix epoch (the start while stopped).
    pub fn now_ms(&self) -> u64 {
        self.now_ms_at(Instant::now())
    }

    fn now_ms_at(&self, real: Instant) -> u64 {
        match self.anchor() {
            Some(a) => virtual_at(&a, real) as u64,
            None => self.start_ms,
        }
    }

    /// The virtual start.
    pub fn start_ms(&self) -> u64 {
        self.start_ms
    }

    /// The current factor (virtual seconds per real second).
    pub fn factor(&self) -> f64 {
        self.anchor().map_or(self.initial_factor, |a| a.factor)
    }

    /// Changes the factor from now on.
    pub fn set_factor(&self, factor: f64) {
        self.set_factor_at(factor, Instant::now());
    }

    fn set_factor_at(&self, factor: f64, real: Instant) {
        let mut anchor = self.anchor.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(a) = anchor.as_mut() {
            a.virtual_ms = virtual_at(a, real);
            a.real = real;
            a.factor = factor;
        }
    }

    /// When virtual `at_ms` will come at the current factor (a stopped
    /// clock answers a second from now: callers re-check).
    pub fn real_deadline(&self, at_ms: u64) -> Instant {
        self.real_deadline_from(at_ms, Instant::now())
    }

    fn real_deadline_from(&self, at_ms: u64, now: Instant) -> Instant {
        match self.anchor() {
            Some(a) => {
                let ahead_ms = (at_ms as f64 - virtual_at(&a, now)).max(0.0);
                // Clamped: a far deadline is re-checked, never slept past a factor change.
                now + Duration::from_secs_f64((ahead_ms / a.factor / 1_000.0).min(3_600.0))
            }
            None => now + Duration::from_secs(1),
        }
    }
}

/// Virtual time at `real` (which may precede the anchor slightly: saturates).
fn virtual_at(anchor: &Anchor, real: Instant) -> f64 {
    anchor.virtual_ms + real.saturating_duration_since(anchor.real).as_secs_f64() * 1_000.0 * anchor.factor
}

/// Keeps the connected traps' backlog near a target by steering the clock
/// (`"max"` mode).
#[derive(Debug)]
pub struct Pacer {
    /// Detections queued by traps that are meant to be online (kept by the
    /// traps themselves: see `trap.rs`).
    pub backlog: AtomicI64,
    /// Traps meant to be online now.
    pub online: AtomicI64,
    /// Target backlog per online trap.
    pub target_per_trap: f64,
    /// Lowest and highest factor.
    pub factor_min: f64,
    /// Highest factor.
    pub factor_max: f64,
    /// Acknowledgements seen at the previous adjustment, and when they last grew.
    acks: Mutex<AckWatch>,
}

/// What the pacer remembers of the acknowledgements between adjustments.
#[derive(Debug, Clone, Copy)]
struct AckWatch {
    acked: u64,
    progressed_at: Option<Instant>,
}

/// How often the pacer adjusts the clock.
pub const PACER_PERIOD: Duration = Duration::from_millis(20);

/// With detections waiting and no acknowledgement for this long, the pacer
/// halves the factor at every adjustment until acknowledgements resume: a server that stalls (a broker
/// warming up, a restart) must not see the day race on and the traps' queues
/// overflow behind it.
pub const PACER_STALL: Duration = Duration::from_millis(250);

impl Pacer {
    /// A pacer aiming at `target_per_trap` queued detections per online trap.
    pub fn new(target_per_trap: f64, factor_min: f64, factor_max: f64) -> Self {
        Self {
            backlog: AtomicI64::new(0),
            online: AtomicI64::new(0),
            target_per_trap,
            factor_min,
            factor_max,
            acks: Mutex::new(AckWatch { acked: 0, progressed_at: None }),
        }
    }

    /// One adjustment, given the detections acknowledged so far: multiplies
    /// the factor by at most 1.25 or at least 0.5. The clock only speeds up
    /// while acknowledgements flow (or nothing waits), and holds at the lowest
    /// factor after [`PACER_STALL`] without one while detections wait.
    pub fn adjust(&self, clock: &VirtualClock, acked: u64) {
        self.adjust_at(clock, acked, Instant::now());
    }

    fn adjust_at(&self, clock: &VirtualClock, acked: u64, now: Instant) {
        let backlog = self.backlog.load(Ordering::Relaxed).max(0) as f64;
        let online = self.online.load(Ordering::Relaxed).max(1) as f64;
        let target = (online * self.target_per_trap).max(1.0);
        let mut watch = self.acks.lock().unwrap_or_else(|e| e.into_inner());
        let progressed = acked > watch.acked;
        if progressed || backlog == 0.0 || watch.progressed_at.is_none() {
            watch.progressed_at = Some(now);
        }
        watch.acked = acked;
        let stalled = watch
            .progressed_at
            .is_some_and(|at| now.saturating_duration_since(at) >= PACER_STALL);
        drop(watch);
        let mut ratio = (target / backlog.max(1.0)).sqrt().clamp(0.5, 1.25);
        if stalled {
            ratio = 0.5;
        } else if !progressed && backlog > 0.0 {
            ratio = ratio.min(1.0);
        }
        let factor = (clock.factor() * ratio).clamp(self.factor_min, self.factor_max);
        clock.set_factor_at(factor, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_at_its_factor_and_changes_it_smoothly() {
        let clock = VirtualClock::new(1_000_000, 100.0);
        assert_eq!(clock.now_ms(), 1_000_000);
        let t0 = Instant::now();
        clock.start_at(t0);
        let ms = |n| t0 + Duration::from_millis(n);
        assert_eq!(clock.now_ms_at(ms(10)), 1_001_000);
        clock.set_factor_at(1_000.0, ms(10));
        assert_eq!(clock.now_ms_at(ms(20)), 1_011_000);
        assert_eq!(clock.real_deadline_from(1_021_000, ms(20)), ms(30));
    }

    #[test]
    fn the_pacer_slows_down_on_backlog_and_speeds_up_without() {
        let clock = VirtualClock::new(0, 1_000.0);
        clock.start();
        let pacer = Pacer::new(4.0, 1.0, 1e6);
        pacer.online.store(10, Ordering::Relaxed);
        pacer.backlog.store(1_000, Ordering::Relaxed);
        pacer.adjust(&clock, 0);
        assert_eq!(clock.factor(), 500.0);
        pacer.backlog.store(0, Ordering::Relaxed);
        pacer.adjust(&clock, 0);
        assert_eq!(clock.factor(), 625.0);
    }

    #[test]
    fn the_pacer_speeds_up_only_while_acks_flow_and_holds_the_clock_on_a_stall() {
        let clock = VirtualClock::new(0, 1_000.0);
        let t0 = Instant::now();
        clock.start_at(t0);
        let ms = |n| t0 + Duration::from_millis(n);
        let pacer = Pacer::new(4.0, 1.0, 1e6);
        pacer.online.store(10, Ordering::Relaxed);
        // A small backlog but no acknowledgement yet: no speed-up.
        pacer.backlog.store(10, Ordering::Relaxed);
        pacer.adjust_at(&clock, 0, ms(20));
        assert_eq!(clock.factor(), 1_000.0);
        // Acks flow: speeds up.
        pacer.adjust_at(&clock, 5, ms(40));
        assert_eq!(clock.factor(), 1_250.0);
        // Acks stop while detections wait: held at first, then halved at
        // every adjustment once the stall lasts, down to the lowest factor.
        pacer.adjust_at(&clock, 5, ms(60));
        assert_eq!(clock.factor(), 1_250.0);
        let stall = ms(40) + PACER_STALL;
        pacer.adjust_at(&clock, 5, stall);
        assert_eq!(clock.factor(), 625.0);
        let mut at = stall;
        for _ in 0..20 {
            at += PACER_PERIOD;
            pacer.adjust_at(&clock, 5, at);
        }
        assert_eq!(clock.factor(), 1.0);
        let held_at = clock.now_ms_at(at);
        pacer.adjust_at(&clock, 5, ms(5_000));
        assert_eq!(clock.factor(), 1.0);
        assert!(clock.now_ms_at(ms(5_000)) - held_at < 5_000, "the virtual clock crawls in real time");
        // Acks again: it climbs back.
        pacer.adjust_at(&clock, 6, ms(5_020));
        assert_eq!(clock.factor(), 1.25);
    }
}
