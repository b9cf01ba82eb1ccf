//! The final report: what was generated, sent, acknowledged and stored, what
//! was lost or duplicated, latency, throughput, connections, and the
//! simulator's own CPU and memory, and an OTA rehearsal's rollout; as JSON
//! (for CI) or a table.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::api::{RolloutView, StoredDetection};
use crate::ota::OtaShared;
use crate::stats::{Counters, ProcessSample};
use crate::trap::{Mode, TrapOutcome, World};

/// The comparison of what the traps generated with what the server stored.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Check {
    /// Generated detections stored (once or more).
    pub stored: u64,
    /// Extra copies of stored detections.
    pub duplicates: u64,
    /// Stored with a sequence number this run never generated.
    pub unknown: u64,
    /// Stored with content other than what was generated.
    pub mismatched: u64,
    /// Generated, not dropped by a full queue, and not stored.
    pub lost: u64,
    /// Dropped by a full queue (the SDK's counted policy) and not stored.
    pub dropped_not_stored: u64,
    /// Traps with a lost, duplicated, unknown or mismatched detection (first few).
    pub traps_with_problems: Vec<String>,
}

/// Traps named in [`Check::traps_with_problems`].
const PROBLEM_TRAPS_SHOWN: usize = 10;

impl Check {
    /// Adds one trap: its generated detections against its stored ones.
    pub fn add(&mut self, outcome: &TrapOutcome, stored: &[StoredDetection]) {
        let mut seen = vec![0u32; outcome.expected.len()];
        let before = (self.lost, self.duplicates, self.unknown, self.mismatched);
        for detection in stored {
            // Earlier runs of the same traps stored lower sequence numbers.
            let Some(slot) = detection.seq.checked_sub(outcome.first_seq) else {
                continue;
            };
            let Some(expected) = outcome.expected.get(slot as usize) else {
                self.unknown += 1;
                continue;
            };
            seen[slot as usize] += 1;
            if seen[slot as usize] == 1
                && (expected.digest != detection.image_digest
                    || expected.captured_at_s != detection.captured_at_s)
            {
                self.mismatched += 1;
            }
        }
        for (count, expected) in seen.iter().zip(&outcome.expected) {
            match (count, expected.dropped) {
                (0, true) => self.dropped_not_stored += 1,
                (0, false) => self.lost += 1,
                (n, _) => {
                    self.stored += 1;
                    self.duplicates += u64::from(n - 1);
                }
            }
        }
        if before != (self.lost, self.duplicates, self.unknown, self.mismatched)
            && self.traps_with_problems.len() < PROBLEM_TRAPS_SHOWN
        {
            self.traps_with_problems
                .push(outcome.state.device_id.as_str().to_owned());
        }
    }
}

/// Wall-clock phases, seconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Timings {
    /// Claiming traps that had no credentials.
    pub provisioning_s: f64,
    /// Connecting the always-on traps before the clock starts.
    pub connect_s: f64,
    /// The virtual run and the drain.
    pub day_s: f64,
    /// Reading detections back from the server.
    pub check_s: f64,
    /// Everything.
    pub total_s: f64,
}

/// Process samples at the phase edges.
#[derive(Debug, Clone, Copy)]
pub struct Samples {
    /// Before any trap connected.
    pub before: ProcessSample,
    /// With every trap connected, before the clock started.
    pub connected: ProcessSample,
    /// After the last trap finished.
    pub after: ProcessSample,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Its seed.
    pub seed: u64,
    /// `fleet` (sealed acks after commit) or `plain` (acked means PUBACK, stored unknown).
    pub target: &'static str,
    /// Virtual traps.
    pub traps: u32,
    /// Virtual hours simulated.
    pub virtual_hours: f64,
    /// Detections.
    pub detections: Detections,
    /// Publish → ack latency, milliseconds.
    pub latency_ms: Latency,
    /// Rates.
    pub throughput: Throughput,
    /// Connections and faults.
    pub connections: Connections,
    /// The simulator process.
    pub simulator: SimulatorUsage,
    /// Wall-clock phases.
    pub timings: Timings,
    /// The OTA rehearsal (scenarios with `[ota] enabled`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ota: Option<OtaReport>,
    /// No detection lost, duplicated, unknown or altered (always false
    /// against a plain broker, where nothing is checked), and the OTA
    /// rehearsal (if any) checked out.
    pub ok: bool,
}

/// The OTA rehearsal: the traps' side, and the server's read back.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OtaReport {
    /// The server's rollout id (absent if it could not be created).
    pub rollout_id: Option<u32>,
    /// The server's firmware id.
    pub firmware_id: u32,
    /// Image size, bytes.
    pub image_bytes: u64,
    /// Version at the start.
    pub from_version: String,
    /// Version rolled out.
    pub to_version: String,
    /// Traps the rollout names.
    pub targets: u64,
    /// Offers the traps received (repeats included).
    pub offers_received: u64,
    /// Chunk requests sent (retries included).
    pub chunk_requests: u64,
    /// Chunk requests sent again after no chunk came in time.
    pub chunk_timeouts: u64,
    /// Chunks refused by the machine (stale duplicates).
    pub chunks_refused: u64,
    /// Image bytes written to the traps' slots.
    pub bytes_downloaded: u64,
    /// Downloads picked up after a reboot at their persisted offset.
    pub downloads_resumed: u64,
    /// Reboots into the new image.
    pub activations: u64,
    /// Traps that confirmed the new image.
    pub confirmed: u64,
    /// Traps rolled back after a failed self-test (`SelfTestFailed`).
    pub rolled_back_self_test: u64,
    /// Traps the bootloader rolled back (`RolledBack`).
    pub rolled_back_bootloader: u64,
    /// Other outcomes delivered, by outcome.
    pub failed: BTreeMap<String, u64>,
    /// Targets that delivered no final result.
    pub without_result: u64,
    /// Rollout creation to the last outcome, real seconds.
    pub rollout_real_s: Option<f64>,
    /// Rollout creation to the last outcome, virtual hours.
    pub rollout_virtual_h: Option<f64>,
    /// The rollout as the server reports it at the end.
    pub server: Option<RolloutView>,
    /// The server's confirmed and rolled-back counts equal the traps'.
    pub counts_agree: bool,
    /// Every target reached a final state on the server.
    pub all_final: bool,
    /// Why the rollout could not be created or read back.
    pub error: Option<String>,
    /// Created, every target final, counts agree.
    pub ok: bool,
}

impl OtaReport {
    /// From the traps' counters and the server's view of the rollout.
    pub fn build(shared: &OtaShared, base: OtaReport, server: Option<RolloutView>) -> Self {
        let c = &shared.counters;
        let start = shared.rollout.get().copied();
        let last = shared.last_outcome();
        let (rollout_real_s, rollout_virtual_h) = match (start, last) {
            (Some(start), Some((at, at_ms))) => (
                Some(at.saturating_duration_since(start.at).as_secs_f64()),
                Some(at_ms.saturating_sub(start.at_virtual_ms) as f64 / 3_600_000.0),
            ),
            _ => (None, None),
        };
        let confirmed = Counters::get(&c.confirmed);
        let self_test = Counters::get(&c.self_test_failed);
        let bootloader = Counters::get(&c.rolled_back);
        let counts_agree = server.as_ref().is_some_and(|view| {
            view.count("confirmed") == confirmed && view.count("rolled_back") == self_test + bootloader
        });
        let all_final = server.as_ref().is_some_and(|view| view.open() == 0);
        let ok = base.error.is_none() && start.is_some() && counts_agree && all_final;
        Self {
            rollout_id: start.map(|s| s.id),
            offers_received: Counters::get(&c.offers),
            chunk_requests: Counters::get(&c.chunk_requests),
            chunk_timeouts: Counters::get(&c.chunk_timeouts),
            chunks_refused: Counters::get(&c.chunks_refused),
            bytes_downloaded: Counters::get(&c.bytes),
            downloads_resumed: Counters::get(&c.resumed),
            activations: Counters::get(&c.activations),
            confirmed,
            rolled_back_self_test: self_test,
            rolled_back_bootloader: bootloader,
            failed: c.failed.lock().map(|f| f.clone()).unwrap_or_default(),
            without_result: base.targets.saturating_sub(Counters::get(&c.results)),
            rollout_real_s,
            rollout_virtual_h,
            server,
            counts_agree,
            all_final,
            ok,
            ..base
        }
    }

    fn rows(&self, rows: &mut Vec<(&'static str, String)>) {
        rows.push((
            "ota rollout",
            format!(
                "{} {} → {}, {} KiB image, {} targets",
                self.rollout_id
                    .map_or_else(|| "not created".to_owned(), |id| format!("#{id}")),
                self.from_version,
                self.to_version,
                self.image_bytes / 1_024,
                count(self.targets)
            ),
        ));
        let failed: Vec<String> = self
            .failed
            .iter()
            .map(|(outcome, n)| format!("{n} {outcome}"))
            .collect();
        rows.push((
            "ota outcomes",
            format!(
                "{} confirmed, {} rolled back ({} self-test, {} bootloader), {} failed{}, {} without a result",
                count(self.confirmed),
                self.rolled_back_self_test + self.rolled_back_bootloader,
                self.rolled_back_self_test,
                self.rolled_back_bootloader,
                self.failed.values().sum::<u64>(),
                if failed.is_empty() { String::new() } else { format!(" ({})", failed.join(", ")) },
                self.without_result
            ),
        ));
        rows.push((
            "ota download",
            format!(
                "{} offers, {} chunk requests ({} timed out), {:.1} MiB, {} resumed after a reboot, {} activations",
                count(self.offers_received),
                count(self.chunk_requests),
                self.chunk_timeouts,
                self.bytes_downloaded as f64 / 1_048_576.0,
                self.downloads_resumed,
                self.activations
            ),
        ));
        if let (Some(real), Some(virtual_h)) = (self.rollout_real_s, self.rollout_virtual_h) {
            rows.push((
                "ota duration",
                format!("creation to last outcome: {real:.1} s real, {virtual_h:.2} virtual h"),
            ));
        }
        let server = match &self.server {
            Some(view) => {
                let counts: Vec<String> = view
                    .counts
                    .iter()
                    .filter(|(_, n)| **n > 0)
                    .map(|(state, n)| format!("{state} {n}"))
                    .collect();
                let reason = view
                    .pause_reason
                    .as_deref()
                    .map_or(String::new(), |r| format!(" ({r})"));
                format!("{}{reason}: {}", view.state, counts.join(", "))
            }
            None => "not read".to_owned(),
        };
        rows.push(("ota server", server));
        let verdict = if self.ok {
            "OK: every target final, server and traps agree".to_owned()
        } else if let Some(error) = &self.error {
            format!("FAILED: {error}")
        } else {
            format!(
                "FAILED: {}{}",
                if self.all_final { "" } else { "targets left unfinished; " },
                if self.counts_agree { "" } else { "server and trap counts differ" }
            )
        };
        rows.push(("ota check", verdict));
    }
}

/// Detection counts.
#[derive(Debug, Clone, Serialize)]
pub struct Detections {
    /// Appended to a trap's queue.
    pub generated: u64,
    /// Published at least once.
    pub sent: u64,
    /// Publishes, resends included.
    pub publishes: u64,
    /// Released by an ack (a sealed server ack; a PUBACK against a plain broker).
    pub acked: u64,
    /// Still unacknowledged when the traps stopped.
    pub unacked_at_end: u64,
    /// Dropped by a full queue (counted by the SDK, reported in health).
    pub dropped_by_full_queue: u64,
    /// The server's side (absent against a plain broker).
    pub check: Option<Check>,
}

/// Latency quantiles.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
    /// Samples (one per acknowledged detection).
    pub samples: u64,
}

/// Rates over the virtual run (drain included).
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    /// Acknowledged detections per second.
    pub acked_per_s: f64,
    /// Virtual seconds per real second, on average.
    pub compression: f64,
}

/// Connections and faults.
#[derive(Debug, Clone, Serialize)]
pub struct Connections {
    /// Most open at once.
    pub peak: u64,
    /// Successful connections.
    pub connects: u64,
    /// Failed attempts.
    pub connect_failures: u64,
    /// Lost without the trap deciding it.
    pub lost: u64,
    /// Cut by an injected fault.
    pub dropped_by_fault: u64,
    /// Reboots.
    pub reboots: u64,
    /// Rewinds after an ack timeout.
    pub ack_timeouts: u64,
    /// Hellos sent.
    pub hellos: u64,
    /// Health reports sent.
    pub health_reports: u64,
    /// Downlink frames refused (did not open or decode).
    pub downlink_refused: u64,
    /// Traps provisioned in this run (the rest reused stored credentials).
    pub provisioned: usize,
}

/// The simulator's own resources.
#[derive(Debug, Clone, Serialize)]
pub struct SimulatorUsage {
    /// CPU time during the virtual run, seconds.
    pub cpu_s: f64,
    /// CPU during the virtual run, percent of one core.
    pub cpu_pct: f64,
    /// Peak resident memory, MiB.
    pub rss_peak_mib: f64,
    /// Resident memory added by connecting the fleet, per trap, KiB.
    pub rss_per_trap_kib: f64,
    /// Resident memory with the fleet connected over the number of traps,
    /// KiB: everything of a virtual trap (queue, plan, connection) plus the
    /// process's fixed share.
    pub rss_total_per_trap_kib: f64,
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1_048_576.0
}

impl Report {
    /// Builds the report at the end of a run.
    pub fn build(
        world: &World,
        outcomes: &[TrapOutcome],
        check: Option<Check>,
        provisioned: usize,
        timings: Timings,
        samples: Samples,
        ota: Option<OtaReport>,
    ) -> Self {
        let c = &world.counters;
        let scenario = &world.scenario;
        let acked = Counters::get(&c.acked);
        let traps = scenario.fleet.traps;
        let ok = check
            .as_ref()
            .is_some_and(|k| k.lost == 0 && k.duplicates == 0 && k.unknown == 0 && k.mismatched == 0)
            && ota.as_ref().is_none_or(|o| o.ok);
        let added_rss = samples
            .connected
            .rss_bytes
            .saturating_sub(samples.before.rss_bytes);
        let cpu_s = samples.after.cpu_s - samples.connected.cpu_s;
        Self {
            scenario: scenario.name.clone(),
            seed: scenario.seed,
            target: match world.mode {
                Mode::Fleet => "fleet",
                Mode::Plain { .. } => "plain",
            },
            traps,
            virtual_hours: scenario.time.duration_h,
            detections: Detections {
                generated: Counters::get(&c.generated),
                sent: Counters::get(&c.sent),
                publishes: Counters::get(&c.publishes),
                acked,
                unacked_at_end: outcomes.iter().map(|o| o.unacked as u64).sum(),
                dropped_by_full_queue: Counters::get(&c.dropped_full),
                check,
            },
            latency_ms: Latency {
                p50: world.latency.quantile_ms(0.50),
                p95: world.latency.quantile_ms(0.95),
                p99: world.latency.quantile_ms(0.99),
                max: world.latency.max_ms(),
                samples: world.latency.count(),
            },
            throughput: Throughput {
                acked_per_s: acked as f64 / timings.day_s.max(1e-9),
                compression: scenario.time.duration_h * 3_600.0 / timings.day_s.max(1e-9),
            },
            connections: Connections {
                peak: Counters::get(&c.connected_peak),
                connects: Counters::get(&c.connections),
                connect_failures: Counters::get(&c.connect_failures),
                lost: Counters::get(&c.connections_lost),
                dropped_by_fault: Counters::get(&c.connections_dropped),
                reboots: Counters::get(&c.reboots),
                ack_timeouts: Counters::get(&c.ack_timeouts),
                hellos: Counters::get(&c.hellos),
                health_reports: Counters::get(&c.health_reports),
                downlink_refused: Counters::get(&c.downlink_refused),
                provisioned,
            },
            simulator: SimulatorUsage {
                cpu_s,
                cpu_pct: cpu_s / timings.day_s.max(1e-9) * 100.0,
                rss_peak_mib: mib(samples.after.rss_peak_bytes),
                rss_per_trap_kib: added_rss as f64 / 1_024.0 / f64::from(traps.max(1)),
                rss_total_per_trap_kib: samples.connected.rss_bytes as f64
                    / 1_024.0
                    / f64::from(traps.max(1)),
            },
            timings,
            ota,
            ok,
        }
    }

    /// The report as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    /// The report as a readable table.
    pub fn to_table(&self) -> String {
        let d = &self.detections;
        let mut rows: Vec<(&'static str, String)> = vec![
            (
                "scenario",
                format!(
                    "{} (seed {}, {} traps, {} virtual h)",
                    self.scenario, self.seed, self.traps, self.virtual_hours
                ),
            ),
            ("target", self.target.to_owned()),
            ("generated", count(d.generated)),
            ("sent", format!("{} ({} publishes with resends)", count(d.sent), count(d.publishes))),
            (
                "acked",
                match self.target {
                    "plain" => {
                        format!("{} (PUBACK from the broker; nothing is stored end to end)", count(d.acked))
                    }
                    _ => format!("{} (sealed acks after commit)", count(d.acked)),
                },
            ),
        ];
        match &d.check {
            Some(k) => {
                rows.push(("stored", count(k.stored)));
                rows.push((
                    "duplicates",
                    format!(
                        "{} (+{} unknown sequences, {} altered)",
                        count(k.duplicates),
                        k.unknown,
                        k.mismatched
                    ),
                ));
                rows.push(("lost", count(k.lost)));
                if k.dropped_not_stored > 0 || d.dropped_by_full_queue > 0 {
                    rows.push((
                        "dropped (full queue)",
                        format!("{} ({} never stored)", d.dropped_by_full_queue, k.dropped_not_stored),
                    ));
                }
                if !k.traps_with_problems.is_empty() {
                    rows.push(("traps with problems", k.traps_with_problems.join(", ")));
                }
            }
            None => rows.push(("stored / lost", "unknown (plain broker: no server to ask)".into())),
        }
        let l = &self.latency_ms;
        rows.push((
            "latency publish→ack",
            format!("p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms", l.p50, l.p95, l.p99, l.max),
        ));
        let t = &self.timings;
        rows.push((
            "throughput",
            format!(
                "{:.0} acked/s; virtual run in {:.1} s (×{:.0})",
                self.throughput.acked_per_s, t.day_s, self.throughput.compression
            ),
        ));
        let c = &self.connections;
        rows.push((
            "connections",
            format!(
                "peak {}, {} connects, {} failed, {} lost, {} cut by faults, {} reboots, {} ack timeouts",
                c.peak, c.connects, c.connect_failures, c.lost, c.dropped_by_fault, c.reboots, c.ack_timeouts
            ),
        ));
        rows.push((
            "messages",
            format!("{} hellos, {} health reports", count(c.hellos), count(c.health_reports)),
        ));
        let s = &self.simulator;
        rows.push((
            "simulator",
            format!(
                "CPU {:.1} s ({:.0}% of a core); RSS peak {:.0} MiB; per trap {:.1} KiB in all, {:.1} KiB of it for the connection",
                s.cpu_s, s.cpu_pct, s.rss_peak_mib, s.rss_total_per_trap_kib, s.rss_per_trap_kib
            ),
        ));
        rows.push((
            "wall time",
            format!(
                "provisioning {:.1} s ({} claimed), connecting {:.1} s, run {:.1} s, check {:.1} s, total {:.1} s",
                t.provisioning_s, c.provisioned, t.connect_s, t.day_s, t.check_s, t.total_s
            ),
        ));
        if let Some(ota) = &self.ota {
            ota.rows(&mut rows);
        }
        rows.push((
            "result",
            if self.ok { "OK: every detection stored exactly once".into() } else { self.verdict() },
        ));
        let width = rows
            .iter()
            .map(|(k, _)| k.chars().count())
            .max()
            .unwrap_or(0);
        rows.iter()
            .map(|(k, v)| format!("{k:<width$}  {v}\n"))
            .collect()
    }

    fn verdict(&self) -> String {
        match &self.detections.check {
            None => "not checked (plain broker)".into(),
            Some(k) if k.lost + k.duplicates + k.unknown + k.mismatched == 0 => {
                "FAILED: the OTA rehearsal did not check out (see ota check)".into()
            }
            Some(k) => format!(
                "FAILED: {} lost, {} duplicated, {} unknown, {} altered",
                k.lost, k.duplicates, k.unknown, k.mismatched
            ),
        }
    }
}

/// 1234567 → "1,234,567".
fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::TrapState;
    use crate::trap::Expected;

    fn outcome(first_seq: u32, n: u32) -> TrapOutcome {
        TrapOutcome {
            index: 0,
            state: TrapState::plain(1, 0),
            first_seq,
            expected: (0..n)
                .map(|i| Expected { captured_at_s: 100 + i, digest: u64::from(i), dropped: i == 3 })
                .collect(),
            unacked: 0,
        }
    }

    fn stored(seq: u32, first_seq: u32) -> StoredDetection {
        let i = seq - first_seq;
        StoredDetection { seq, captured_at_s: 100 + i, image_digest: u64::from(i) }
    }

    #[test]
    fn the_check_counts_lost_duplicated_unknown_and_altered() {
        let outcome = outcome(11, 5);
        let mut rows: Vec<StoredDetection> = [11, 12, 12, 15].iter().map(|&s| stored(s, 11)).collect();
        rows.push(StoredDetection { seq: 16, captured_at_s: 0, image_digest: 0 });
        rows.push(StoredDetection { seq: 5, captured_at_s: 0, image_digest: 0 });
        let mut check = Check::default();
        check.add(&outcome, &rows);
        assert_eq!((check.stored, check.duplicates, check.unknown), (3, 1, 1));
        // 13 lost; 14 was dropped by the full queue.
        assert_eq!((check.lost, check.dropped_not_stored, check.mismatched), (1, 1, 0));
        let mut altered = Check::default();
        altered.add(&outcome, &[StoredDetection { seq: 11, captured_at_s: 1, image_digest: 0 }]);
        assert_eq!(altered.mismatched, 1);
        assert_eq!(count(1_234_567), "1,234,567");
    }
}
