//! Counters shared by every trap (relaxed atomics: figures, not
//! synchronisation) and a log-scale latency histogram.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Fleet-wide counters.
#[derive(Debug, Default)]
pub struct Counters {
    /// Detections appended to a queue.
    pub generated: AtomicU64,
    /// Distinct detections published at least once.
    pub sent: AtomicU64,
    /// Detection publishes, resends included.
    pub publishes: AtomicU64,
    /// Detections released by acks (sealed server acks, or PUBACKs against a plain broker).
    pub acked: AtomicU64,
    /// Detections dropped by a full queue (the SDK's counted policy).
    pub dropped_full: AtomicU64,
    /// Hellos sent.
    pub hellos: AtomicU64,
    /// Health reports sent.
    pub health_reports: AtomicU64,
    /// Configurations applied and commands answered.
    pub downlink_answers: AtomicU64,
    /// Successful MQTT connections.
    pub connections: AtomicU64,
    /// Failed connection attempts (refused, timed out, or a flaky link).
    pub connect_failures: AtomicU64,
    /// Connections cut by an injected fault (`faults.drop_rate_per_day`).
    pub connections_dropped: AtomicU64,
    /// Connections lost without the trap deciding to close them.
    pub connections_lost: AtomicU64,
    /// Connections open now.
    pub connected_now: AtomicU64,
    /// Most connections open at once.
    pub connected_peak: AtomicU64,
    /// Rewinds after an ack timeout.
    pub ack_timeouts: AtomicU64,
    /// Reboots.
    pub reboots: AtomicU64,
    /// Downlink frames that did not open or decode.
    pub downlink_refused: AtomicU64,
    /// Acks the queue refused (beyond what was assigned).
    pub acks_refused: AtomicU64,
    /// Traps that finished their run.
    pub traps_done: AtomicU64,
}

impl Counters {
    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Adds to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// A connection opened.
    pub fn connected(&self) {
        Self::add(&self.connections, 1);
        let now = self.connected_now.fetch_add(1, Ordering::Relaxed) + 1;
        self.connected_peak.fetch_max(now, Ordering::Relaxed);
    }

    /// A connection closed (either way).
    pub fn disconnected(&self) {
        self.connected_now.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Buckets per factor of ten.
const BUCKETS_PER_DECADE: usize = 40;
/// Decades from 1 µs to 10,000 s.
const DECADES: usize = 10;
const BUCKETS: usize = BUCKETS_PER_DECADE * DECADES + 1;

/// Latencies in log-spaced buckets (about 6 % wide), from 1 µs to 10,000 s.
#[derive(Debug)]
pub struct Histogram {
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    max_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            max_us: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// Records one latency.
    pub fn record(&self, latency: Duration) {
        let us = latency.as_micros().max(1) as f64;
        let index = ((us.log10() * BUCKETS_PER_DECADE as f64) as usize).min(BUCKETS - 1);
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.max_us.fetch_max(us as u64, Ordering::Relaxed);
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The `q` quantile (0..=1) in milliseconds: the upper edge of its bucket.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        let count = self.count();
        if count == 0 {
            return 0.0;
        }
        let rank = ((q * count as f64).ceil() as u64).clamp(1, count);
        let mut seen = 0;
        for (index, bucket) in self.buckets.iter().enumerate() {
            seen += bucket.load(Ordering::Relaxed);
            if seen >= rank {
                let upper_us = 10f64.powf((index + 1) as f64 / BUCKETS_PER_DECADE as f64);
                return (upper_us / 1_000.0).min(self.max_ms());
            }
        }
        self.max_ms()
    }

    /// The largest latency, milliseconds.
    pub fn max_ms(&self) -> f64 {
        self.max_us.load(Ordering::Relaxed) as f64 / 1_000.0
    }
}

/// CPU time and memory of this process, from `/proc/self` (Linux; zeros elsewhere).
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessSample {
    /// User plus system CPU time, seconds.
    pub cpu_s: f64,
    /// Resident memory now, bytes.
    pub rss_bytes: u64,
    /// Peak resident memory, bytes.
    pub rss_peak_bytes: u64,
}

/// Clock ticks per second of `/proc` CPU times (USER_HZ, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

impl ProcessSample {
    /// Reads `/proc/self/stat` and `/proc/self/status`.
    pub fn now() -> Self {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let ticks = stat
            .rfind(')')
            .map(|end| stat[end + 1..].split_whitespace().collect::<Vec<_>>())
            .and_then(|fields| {
                let user: u64 = fields.get(11)?.parse().ok()?;
                let system: u64 = fields.get(12)?.parse().ok()?;
                Some(user + system)
            })
            .unwrap_or(0);
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(key))
                .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Self {
            cpu_s: ticks as f64 / TICKS_PER_SECOND,
            rss_bytes: kib("VmRSS:") * 1_024,
            rss_peak_bytes: kib("VmHWM:") * 1_024,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_a_bucket() {
        let histogram = Histogram::default();
        for ms in 1..=100 {
            histogram.record(Duration::from_millis(ms));
        }
        let p50 = histogram.quantile_ms(0.5);
        let p99 = histogram.quantile_ms(0.99);
        assert!((50.0..=53.5).contains(&p50), "{p50}");
        assert!((99.0..=100.0).contains(&p99), "{p99}");
        assert_eq!(histogram.max_ms(), 100.0);
        assert_eq!(Histogram::default().quantile_ms(0.5), 0.0);
    }
}
