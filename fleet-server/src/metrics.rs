//! Counters and gauges, rendered in the Prometheus text format at `/metrics`.
//!
//! Plain atomics: ingest bumps them on its hot path without locks, and a
//! scrape reads them all. Every rejected message is counted under its
//! [`Rejection`] reason.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use wildcam_sdk::ota::OtaOutcome;

/// Why ingest refused a message. Each has its own counter and log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The topic is not a WildCAM uplink topic.
    TopicInvalid,
    /// No device has the id in the topic.
    DeviceUnknown,
    /// The device is revoked.
    DeviceRevoked,
    /// The payload is longer than any sealed uplink message.
    Oversized,
    /// The frame did not open under the device's key (forged, wrong device,
    /// tampered).
    Unauthentic,
    /// The frame's counter was seen before or is too old (replay).
    Replayed,
    /// The opened envelope is not a valid uplink message.
    Malformed,
    /// The message kind does not belong on the topic it came on.
    WrongTopic,
    /// A hello names another device than its topic.
    IdMismatch,
    /// A message kind the server does not handle yet.
    Unsupported,
    /// A provisioning message was refused (see the claim reject reasons).
    Provisioning,
}

impl Rejection {
    /// Every reason, in a fixed order.
    pub const ALL: [Rejection; 11] = [
        Rejection::TopicInvalid,
        Rejection::DeviceUnknown,
        Rejection::DeviceRevoked,
        Rejection::Oversized,
        Rejection::Unauthentic,
        Rejection::Replayed,
        Rejection::Malformed,
        Rejection::WrongTopic,
        Rejection::IdMismatch,
        Rejection::Unsupported,
        Rejection::Provisioning,
    ];

    /// The `reason` label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Rejection::TopicInvalid => "topic_invalid",
            Rejection::DeviceUnknown => "device_unknown",
            Rejection::DeviceRevoked => "device_revoked",
            Rejection::Oversized => "oversized",
            Rejection::Unauthentic => "unauthentic",
            Rejection::Replayed => "replayed",
            Rejection::Malformed => "malformed",
            Rejection::WrongTopic => "wrong_topic",
            Rejection::IdMismatch => "id_mismatch",
            Rejection::Unsupported => "unsupported",
            Rejection::Provisioning => "provisioning",
        }
    }
}

/// Why an OTA uplink was answered with nothing (or an empty chunk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtaRefusal {
    /// The device is not a target of the rollout it names (or the version
    /// in a result is not the rollout's).
    NotTargeted,
    /// The device is a target but was not offered the rollout yet.
    NotOffered,
    /// The rollout was aborted, or the device's target is finished
    /// (superseded, aborted, failed...): an empty chunk tells it so.
    RolloutInactive,
    /// A chunk of length 0 or above the offered chunk length.
    LengthInvalid,
    /// A chunk starting or ending past the image.
    OffsetInvalid,
    /// The image file could not be read.
    ImageUnavailable,
    /// The OTA queue was full (the device asks again after its timeout).
    QueueFull,
}

impl OtaRefusal {
    /// Every reason, in a fixed order.
    pub const ALL: [OtaRefusal; 7] = [
        OtaRefusal::NotTargeted,
        OtaRefusal::NotOffered,
        OtaRefusal::RolloutInactive,
        OtaRefusal::LengthInvalid,
        OtaRefusal::OffsetInvalid,
        OtaRefusal::ImageUnavailable,
        OtaRefusal::QueueFull,
    ];

    /// The `reason` label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            OtaRefusal::NotTargeted => "not_targeted",
            OtaRefusal::NotOffered => "not_offered",
            OtaRefusal::RolloutInactive => "rollout_inactive",
            OtaRefusal::LengthInvalid => "length_invalid",
            OtaRefusal::OffsetInvalid => "offset_invalid",
            OtaRefusal::ImageUnavailable => "image_unavailable",
            OtaRefusal::QueueFull => "queue_full",
        }
    }
}

/// Every device outcome of an update, with its `outcome` label value.
pub const OTA_OUTCOMES: [(OtaOutcome, &str); 16] = [
    (OtaOutcome::Confirmed, "confirmed"),
    (OtaOutcome::SignatureInvalid, "signature_invalid"),
    (OtaOutcome::WrongChip, "wrong_chip"),
    (OtaOutcome::Downgrade, "downgrade"),
    (OtaOutcome::NotNewer, "not_newer"),
    (OtaOutcome::ImageTooLarge, "image_too_large"),
    (OtaOutcome::BatteryTooLow, "battery_too_low"),
    (OtaOutcome::DigestMismatch, "digest_mismatch"),
    (OtaOutcome::SizeMismatch, "size_mismatch"),
    (OtaOutcome::WriteFailed, "write_failed"),
    (OtaOutcome::ReadFailed, "read_failed"),
    (OtaOutcome::SelfTestFailed, "self_test_failed"),
    (OtaOutcome::RolledBack, "rolled_back"),
    (OtaOutcome::Aborted, "aborted"),
    (OtaOutcome::Superseded, "superseded"),
    (OtaOutcome::Busy, "busy"),
];

/// Latency histogram buckets for ingest commits, in seconds.
const COMMIT_BUCKETS_S: [f64; 10] = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0];

/// The server's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    messages_in: AtomicU64,
    detections_stored: AtomicU64,
    acks_sent: AtomicU64,
    rejected: [AtomicU64; Rejection::ALL.len()],
    commit_buckets: [AtomicU64; COMMIT_BUCKETS_S.len()],
    commit_count: AtomicU64,
    commit_sum_us: AtomicU64,
    batch_items: AtomicU64,
    ingest_queue_depth: AtomicU64,
    devices_provisioned: AtomicU64,
    ota_offers: AtomicU64,
    ota_chunks: AtomicU64,
    ota_bytes: AtomicU64,
    ota_refused: [AtomicU64; OtaRefusal::ALL.len()],
    ota_outcomes: [AtomicU64; OTA_OUTCOMES.len()],
}

impl Metrics {
    /// A message arrived from the broker.
    pub fn message_in(&self) {
        self.messages_in.fetch_add(1, Ordering::Relaxed);
    }

    /// A message was refused for `reason`.
    pub fn reject(&self, reason: Rejection) {
        let index = Rejection::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.rejected[index].fetch_add(1, Ordering::Relaxed);
    }

    /// How many messages were refused for `reason`.
    pub fn rejected(&self, reason: Rejection) -> u64 {
        let index = Rejection::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.rejected[index].load(Ordering::Relaxed)
    }

    /// A batch of `items` committed in `seconds`, storing `detections`.
    pub fn commit(&self, items: usize, detections: usize, seconds: f64) {
        for (bucket, bound) in self.commit_buckets.iter().zip(COMMIT_BUCKETS_S) {
            if seconds <= bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.commit_count.fetch_add(1, Ordering::Relaxed);
        self.commit_sum_us
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
        self.batch_items.fetch_add(items as u64, Ordering::Relaxed);
        self.detections_stored
            .fetch_add(detections as u64, Ordering::Relaxed);
    }

    /// An ack was published.
    pub fn ack_sent(&self) {
        self.acks_sent.fetch_add(1, Ordering::Relaxed);
    }

    /// Messages waiting for ingest.
    pub fn set_ingest_queue_depth(&self, depth: usize) {
        self.ingest_queue_depth
            .store(depth as u64, Ordering::Relaxed);
    }

    /// A device completed provisioning.
    pub fn device_provisioned(&self) {
        self.devices_provisioned.fetch_add(1, Ordering::Relaxed);
    }

    /// An OTA offer was published.
    pub fn ota_offer_sent(&self) {
        self.ota_offers.fetch_add(1, Ordering::Relaxed);
    }

    /// A chunk of `len` image bytes was published.
    pub fn ota_chunk_served(&self, len: usize) {
        self.ota_chunks.fetch_add(1, Ordering::Relaxed);
        self.ota_bytes.fetch_add(len as u64, Ordering::Relaxed);
    }

    /// Chunks and image bytes published so far.
    pub fn ota_served(&self) -> (u64, u64) {
        (self.ota_chunks.load(Ordering::Relaxed), self.ota_bytes.load(Ordering::Relaxed))
    }

    /// An OTA uplink was refused for `reason`.
    pub fn ota_refuse(&self, reason: OtaRefusal) {
        if let Some(index) = OtaRefusal::ALL.iter().position(|r| *r == reason) {
            self.ota_refused[index].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// OTA uplinks refused for `reason` so far.
    pub fn ota_refused(&self, reason: OtaRefusal) -> u64 {
        OtaRefusal::ALL
            .iter()
            .position(|r| *r == reason)
            .map_or(0, |index| self.ota_refused[index].load(Ordering::Relaxed))
    }

    /// A device reported `outcome` for the first time for a rollout.
    pub fn ota_outcome(&self, outcome: OtaOutcome) {
        if let Some(index) = OTA_OUTCOMES.iter().position(|(o, _)| *o == outcome) {
            self.ota_outcomes[index].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Devices that reported `outcome` so far.
    pub fn ota_outcomes(&self, outcome: OtaOutcome) -> u64 {
        OTA_OUTCOMES
            .iter()
            .position(|(o, _)| *o == outcome)
            .map_or(0, |index| self.ota_outcomes[index].load(Ordering::Relaxed))
    }

    /// Messages received so far.
    pub fn messages_in_total(&self) -> u64 {
        self.messages_in.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition, with the gauges the caller measures
    /// at scrape time (connected devices, broker link losses).
    pub fn render(&self, connected_devices: Option<u64>, link_lost: u64, link_reconnects: u64) -> String {
        let mut out = String::with_capacity(4096);
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            &mut out,
            "wildcam_messages_in_total",
            "Messages received from the broker.",
            load(&self.messages_in),
        );
        counter(
            &mut out,
            "wildcam_detections_stored_total",
            "Detections stored (resends of stored ones not counted).",
            load(&self.detections_stored),
        );
        counter(&mut out, "wildcam_acks_sent_total", "Acks published after a commit.", load(&self.acks_sent));
        counter(
            &mut out,
            "wildcam_devices_provisioned_total",
            "Devices provisioned.",
            load(&self.devices_provisioned),
        );
        counter(
            &mut out,
            "wildcam_broker_link_lost_total",
            "Messages the broker dropped before ingest read them (traps resend).",
            link_lost,
        );
        counter(
            &mut out,
            "wildcam_broker_reconnects_total",
            "Connections to an external broker made again after a loss.",
            link_reconnects,
        );
        labelled(
            &mut out,
            "wildcam_messages_rejected_total",
            "Messages refused, by reason.",
            "reason",
            Rejection::ALL
                .iter()
                .map(|r| r.as_str())
                .zip(&self.rejected),
        );
        self.render_ota(&mut out);
        gauge(
            &mut out,
            "wildcam_ingest_queue_depth",
            "Messages waiting for ingest.",
            load(&self.ingest_queue_depth),
        );
        if let Some(connected) = connected_devices {
            gauge(
                &mut out,
                "wildcam_connected_devices",
                "MQTT connections the broker holds (devices and unclaimed traps), refreshed every second.",
                connected,
            );
        }
        self.render_commit_histogram(&mut out);
        out
    }

    fn render_ota(&self, out: &mut String) {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(out, "wildcam_ota_offers_sent_total", "OTA offers published.", load(&self.ota_offers));
        counter(out, "wildcam_ota_chunks_served_total", "OTA chunks published.", load(&self.ota_chunks));
        counter(
            out,
            "wildcam_ota_bytes_served_total",
            "Image bytes published in OTA chunks.",
            load(&self.ota_bytes),
        );
        labelled(
            out,
            "wildcam_ota_requests_refused_total",
            "OTA uplinks refused, by reason.",
            "reason",
            OtaRefusal::ALL
                .iter()
                .map(|r| r.as_str())
                .zip(&self.ota_refused),
        );
        labelled(
            out,
            "wildcam_ota_device_outcomes_total",
            "Update outcomes devices reported (each device and rollout once), by outcome.",
            "outcome",
            OTA_OUTCOMES
                .iter()
                .map(|(_, name)| *name)
                .zip(&self.ota_outcomes),
        );
    }

    fn render_commit_histogram(&self, out: &mut String) {
        let name = "wildcam_ingest_batch_commit_seconds";
        let _ = writeln!(out, "# HELP {name} Latency of one ingest batch commit.");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (bucket, bound) in self.commit_buckets.iter().zip(COMMIT_BUCKETS_S) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {}", bucket.load(Ordering::Relaxed));
        }
        let count = self.commit_count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.commit_sum_us.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
}

fn labelled<'a>(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    values: impl Iterator<Item = (&'a str, &'a AtomicU64)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (value, count) in values {
        let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {}", count.load(Ordering::Relaxed));
    }
}

fn gauge(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_by_reason_and_a_histogram() {
        let metrics = Metrics::default();
        metrics.message_in();
        metrics.reject(Rejection::Replayed);
        metrics.reject(Rejection::Replayed);
        metrics.commit(10, 7, 0.003);
        let text = metrics.render(Some(4), 0, 3);
        assert!(text.contains("wildcam_messages_in_total 1\n"), "{text}");
        assert!(text.contains("wildcam_messages_rejected_total{reason=\"replayed\"} 2\n"), "{text}");
        assert!(text.contains("wildcam_messages_rejected_total{reason=\"malformed\"} 0\n"), "{text}");
        assert!(text.contains("wildcam_detections_stored_total 7\n"), "{text}");
        assert!(text.contains("wildcam_ingest_batch_commit_seconds_bucket{le=\"0.002\"} 0\n"), "{text}");
        assert!(text.contains("wildcam_ingest_batch_commit_seconds_bucket{le=\"0.005\"} 1\n"), "{text}");
        assert!(text.contains("wildcam_connected_devices 4\n"), "{text}");
        assert!(text.contains("wildcam_broker_reconnects_total 3\n"), "{text}");
        metrics.ota_chunk_served(1_024);
        metrics.ota_refuse(OtaRefusal::OffsetInvalid);
        metrics.ota_outcome(OtaOutcome::SelfTestFailed);
        let text = metrics.render(None, 0, 0);
        assert!(text.contains("wildcam_ota_bytes_served_total 1024\n"), "{text}");
        assert!(text.contains("wildcam_ota_requests_refused_total{reason=\"offset_invalid\"} 1\n"), "{text}");
        assert!(
            text.contains("wildcam_ota_device_outcomes_total{outcome=\"self_test_failed\"} 1\n"),
            "{text}"
        );
        assert_eq!(metrics.rejected(Rejection::Replayed), 2);
        // Not reported yet (or not known for this broker): not rendered as a false 0.
        assert!(
            !metrics
                .render(None, 0, 0)
                .contains("wildcam_connected_devices")
        );
    }
}
