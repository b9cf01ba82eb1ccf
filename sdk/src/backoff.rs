//! Reconnect backoff: exponential, with jitter, a ceiling on the delay and an
//! optional ceiling on the number of attempts.
//!
//! Sans-IO: the caller supplies a random `u32` for every delay (a hardware RNG
//! on the trap, a seeded generator in the simulator) and sleeps itself.
//!
//! The delay for attempt `n` is drawn uniformly from `[cap/2, cap]` where
//! `cap = min(max_ms, initial_ms × 2ⁿ)` ("equal jitter"): never zero, so a
//! fleet that lost its broker at the same instant spreads its reconnects out
//! and no trap spins.

use core::fmt;

/// Why a backoff configuration was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum BackoffConfigError {
    /// `initial_ms` is zero.
    InitialZero,
    /// `max_ms` is below `initial_ms`.
    MaxBelowInitial,
}

impl fmt::Display for BackoffConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::InitialZero => "backoff initial delay must be at least 1 ms",
            Self::MaxBelowInitial => "backoff maximum delay is below the initial delay",
        })
    }
}

impl core::error::Error for BackoffConfigError {}

/// Backoff settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BackoffConfig {
    initial_ms: u32,
    max_ms: u32,
    attempts_max: Option<u32>,
}

impl BackoffConfig {
    /// A configuration growing from `initial_ms` up to `max_ms`, retrying forever.
    pub const fn new(initial_ms: u32, max_ms: u32) -> Result<Self, BackoffConfigError> {
        if initial_ms == 0 {
            return Err(BackoffConfigError::InitialZero);
        }
        if max_ms < initial_ms {
            return Err(BackoffConfigError::MaxBelowInitial);
        }
        Ok(Self { initial_ms, max_ms, attempts_max: None })
    }

    /// Gives up after `attempts` delays (a trap then sleeps until its next
    /// check-in instead of draining its battery).
    pub const fn with_attempts_max(mut self, attempts: u32) -> Self {
        self.attempts_max = Some(attempts);
        self
    }
}

impl Default for BackoffConfig {
    /// 1 s growing to 5 min, retrying forever.
    fn default() -> Self {
        Self { initial_ms: 1_000, max_ms: 300_000, attempts_max: None }
    }
}

/// Backoff state for one connection.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Backoff {
    config: BackoffConfig,
    attempt: u32,
}

impl Backoff {
    /// Starts at attempt 0.
    pub const fn new(config: BackoffConfig) -> Self {
        Self { config, attempt: 0 }
    }

    /// The delay before the next attempt, in milliseconds, or `None` when the
    /// attempt ceiling is reached.
    pub fn next_delay_ms(&mut self, random: u32) -> Option<u32> {
        if self
            .config
            .attempts_max
            .is_some_and(|max| self.attempt >= max)
        {
            return None;
        }
        let cap = self.cap_ms();
        self.attempt = self.attempt.saturating_add(1);
        let half = cap / 2;
        let spread = u64::from(cap - half) + 1;
        // `spread` ≤ 2³¹ + 1 and the remainder is below it, so this fits a u32.
        let jitter = (u64::from(random) % spread) as u32;
        Some(half + jitter)
    }

    /// Attempts made since the last [`reset`](Self::reset).
    pub const fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Call after a successful connection.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    fn cap_ms(&self) -> u32 {
        let shift = self.attempt.min(31);
        let grown = u64::from(self.config.initial_ms) << shift;
        grown.min(u64::from(self.config.max_ms)) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn grows_then_caps() {
        let mut backoff = Backoff::new(BackoffConfig::new(100, 1_000).unwrap());
        // With a zero random value every delay sits at half its cap.
        let delays: std::vec::Vec<u32> = (0..6).map(|_| backoff.next_delay_ms(0).unwrap()).collect();
        assert_eq!(delays, [50, 100, 200, 400, 500, 500]);
        backoff.reset();
        assert!(backoff.next_delay_ms(0).unwrap() <= 100);
    }

    #[test]
    fn attempt_ceiling_gives_up() {
        let mut backoff = Backoff::new(BackoffConfig::new(10, 100).unwrap().with_attempts_max(3));
        for _ in 0..3 {
            assert!(backoff.next_delay_ms(7).is_some());
        }
        assert_eq!(backoff.next_delay_ms(7), None);
        assert_eq!(backoff.attempts(), 3);
    }

    #[test]
    fn bad_configs_are_refused() {
        assert_eq!(BackoffConfig::new(0, 10), Err(BackoffConfigError::InitialZero));
        assert_eq!(BackoffConfig::new(10, 9), Err(BackoffConfigError::MaxBelowInitial));
    }

    proptest! {
        #[test]
        fn delays_stay_within_half_cap_and_cap(initial in 1u32..10_000, extra in 0u32..1_000_000,
                                               randoms in proptest::collection::vec(any::<u32>(), 1..80)) {
            let max = initial.saturating_add(extra);
            let mut backoff = Backoff::new(BackoffConfig::new(initial, max).unwrap());
            for (n, random) in randoms.into_iter().enumerate() {
                let cap = (u64::from(initial) << n.min(40)).min(u64::from(max)) as u32;
                let delay = backoff.next_delay_ms(random).unwrap();
                prop_assert!(delay >= cap / 2 && delay <= cap, "attempt {n}: {delay} not in [{}, {cap}]", cap / 2);
                prop_assert!(delay >= 1);
            }
        }
    }
}
