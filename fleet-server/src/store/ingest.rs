//! Ingest batches, what they store, and the queries over it.

use serde::Serialize;
use wildcam_sdk::DeviceId;
use wildcam_sdk::protocol::{Detection, Health, Hello};
use wildcam_sdk::seal::{REPLAY_WINDOW_LEN, ReplayWindow};

use super::{PageRequest, StoreError, UnixMillis};

/// Most items (detections + health reports + hellos + windows) in one batch.
pub const BATCH_ITEMS_MAX: usize = 10_000;

/// A message opened by ingest, with the device whose key opened it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received<M> {
    /// The authenticated device (the one whose key opened the frame).
    pub device_id: DeviceId,
    /// When ingest received it.
    pub received_at_ms: UnixMillis,
    /// The decoded message.
    pub message: M,
}

/// A device's uplink replay window to persist with the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UplinkWindow {
    /// The device.
    pub device_id: DeviceId,
    /// Its window after opening this batch's frames. It is merged with the
    /// stored one, so an older window committed late never forgets counters.
    pub window: ReplayWindow,
}

/// Everything ingest commits in one transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestBatch {
    /// Detections, in any order; resends are deduplicated.
    pub detections: Vec<Received<Detection>>,
    /// Health reports.
    pub health: Vec<Received<Health>>,
    /// Hellos: device info and queue floor (applied before detections).
    pub hellos: Vec<Received<Hello>>,
    /// Replay windows to persist.
    pub windows: Vec<UplinkWindow>,
}

impl IngestBatch {
    /// Items in the batch.
    pub fn len(&self) -> usize {
        self.detections.len() + self.health.len() + self.hellos.len() + self.windows.len()
    }

    /// Whether the batch holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Refuses a batch above [`BATCH_ITEMS_MAX`].
    pub(crate) fn check_size(&self) -> Result<(), StoreError> {
        let items = self.len();
        if items > BATCH_ITEMS_MAX {
            return Err(StoreError::BatchTooLarge { items, max: BATCH_ITEMS_MAX });
        }
        Ok(())
    }
}

/// What a committed batch did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BatchCommitted {
    /// Per device that had a detection or a hello in the batch, the highest
    /// contiguous sequence stored.
    pub acks: Vec<AckUpdate>,
    /// Detections stored by this batch (resends of stored ones not counted).
    pub detections_stored: usize,
}

/// The ack to publish to a device after a commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AckUpdate {
    /// The device.
    pub device_id: DeviceId,
    /// Highest contiguous sequence stored (or skipped by its queue floor).
    pub acked_through: u32,
}

/// A stored detection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredDetection {
    /// The device.
    pub device_id: DeviceId,
    /// When ingest received it.
    pub received_at_ms: UnixMillis,
    /// The detection as the trap sent it.
    pub detection: Detection,
}

/// A stored health report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredHealth {
    /// Row id (orders reports taken in the same second).
    pub id: i64,
    /// The device.
    pub device_id: DeviceId,
    /// When ingest received it.
    pub received_at_ms: UnixMillis,
    /// The report as the trap sent it.
    pub health: Health,
}

/// Filters of [`super::TelemetryStore::query_detections`]; every given
/// filter must match. Results are ordered by (capture time, device, sequence).
#[derive(Debug, Clone, Default)]
pub struct DetectionQuery {
    /// Only this device's detections.
    pub device_id: Option<DeviceId>,
    /// Captured at or after (Unix seconds).
    pub captured_from_s: Option<u32>,
    /// Captured before (Unix seconds, exclusive).
    pub captured_until_s: Option<u32>,
    /// Only detections with a classifier result of this label...
    pub label: Option<u16>,
    /// ...(or of any label, without `label`) with at least this confidence.
    pub min_confidence_pct: Option<u8>,
    /// Newest first instead of oldest first.
    pub newest_first: bool,
    /// Page size and cursor.
    pub page: PageRequest,
}

/// Filters of [`super::TelemetryStore::health_history`]. Results are ordered
/// by (taken time, id).
#[derive(Debug, Clone)]
pub struct HealthQuery {
    /// The device.
    pub device_id: DeviceId,
    /// Taken at or after (Unix seconds).
    pub taken_from_s: Option<u32>,
    /// Taken before (Unix seconds, exclusive).
    pub taken_until_s: Option<u32>,
    /// Newest first instead of oldest first.
    pub newest_first: bool,
    /// Page size and cursor.
    pub page: PageRequest,
}

/// One outbox row: a stored detection to deliver to one destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutboxEntry {
    /// Row id, increasing in commit order.
    pub id: i64,
    /// The configured destination name.
    pub destination: String,
    /// The device.
    pub device_id: DeviceId,
    /// The detection's sequence.
    pub seq: u32,
    /// JSON of the [`StoredDetection`].
    pub payload: String,
    /// When it was committed.
    pub created_at_ms: UnixMillis,
}

impl OutboxEntry {
    /// The id consumers deduplicate on: `{device}/{seq}`, the same for every
    /// resend and every destination.
    pub fn message_id(&self) -> String {
        format!("{}/{}", self.device_id, self.seq)
    }
}

/// The union of two replay windows: every counter either saw counts as seen.
pub(crate) fn merge_windows(a: ReplayWindow, b: ReplayWindow) -> ReplayWindow {
    let highest = a.highest().max(b.highest());
    let aligned = |w: ReplayWindow| {
        let shift = highest - w.highest();
        if w.highest() == 0 || shift >= REPLAY_WINDOW_LEN { 0 } else { w.bitmap() << shift }
    };
    ReplayWindow::from_parts(highest, aligned(a) | aligned(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_window_refuses_what_either_saw() {
        let older = ReplayWindow::from_parts(10, 0b101); // saw 10 and 8
        let newer = ReplayWindow::from_parts(12, 0b1); // saw 12
        let merged = merge_windows(older, newer);
        assert_eq!(merged.highest(), 12);
        for seen in [12, 10, 8] {
            assert!(merged.check(seen).is_err(), "{seen} must be refused");
        }
        for fresh in [11, 9, 13] {
            assert!(merged.check(fresh).is_ok(), "{fresh} must be accepted");
        }
        assert_eq!(merge_windows(newer, older), merged);
    }

    #[test]
    fn merge_with_an_empty_or_distant_window() {
        let w = ReplayWindow::from_parts(100, 0b11);
        assert_eq!(merge_windows(w, ReplayWindow::new()), w);
        assert_eq!(merge_windows(ReplayWindow::new(), w), w);
        let far = ReplayWindow::from_parts(1_000, 1);
        assert_eq!(merge_windows(w, far), far);
    }

    #[test]
    fn batch_size_is_bounded() {
        let mut batch = IngestBatch::default();
        assert!(batch.check_size().is_ok());
        let window = UplinkWindow { device_id: DeviceId::new("d").unwrap(), window: ReplayWindow::new() };
        batch.windows = vec![window; BATCH_ITEMS_MAX + 1];
        assert!(
            matches!(batch.check_size(), Err(StoreError::BatchTooLarge { items, .. }) if items == BATCH_ITEMS_MAX + 1)
        );
    }
}
