//! The ingest commit: one transaction per batch.

use std::collections::BTreeMap;

use rusqlite::{Connection, params};
use serde::Serialize;
use wildcam_sdk::DeviceId;
use wildcam_sdk::protocol::{Detection, Health, Hello, Message};
use wildcam_sdk::seal::ReplayWindow;

use super::SqliteStore;
use super::codec::{bitmap_from_sql, bitmap_to_sql, enum_text, first, to_json};
use crate::store::ingest::merge_windows;
use crate::store::{
    AckUpdate, BatchCommitted, IngestBatch, IngestStore, Received, StoreError, StoreFuture, UnixMillis,
};

/// What the batch changes for one device, applied once at the end.
#[derive(Debug)]
struct DeviceState {
    /// Stored `acked_through`, raised by hello floors during the batch.
    acked: u32,
    /// Stored window merged with the batch's windows.
    window: ReplayWindow,
    /// Latest receive time in the batch.
    last_seen_ms: Option<UnixMillis>,
    /// Whether the device gets an ack (it sent a detection or a hello).
    acked_in_reply: bool,
}

impl DeviceState {
    fn seen(&mut self, at_ms: UnixMillis) {
        self.last_seen_ms = Some(self.last_seen_ms.map_or(at_ms, |t| t.max(at_ms)));
    }
}

/// The batch's devices, loaded from the database on first sight.
#[derive(Debug, Default)]
struct Devices(BTreeMap<DeviceId, DeviceState>);

impl Devices {
    fn get(&mut self, tx: &Connection, id: &DeviceId) -> Result<&mut DeviceState, StoreError> {
        if !self.0.contains_key(id) {
            let state = load_state(tx, id)?;
            self.0.insert(id.clone(), state);
        }
        self.0
            .get_mut(id)
            .ok_or_else(|| StoreError::corrupt("device state vanished"))
    }
}

fn load_state(tx: &Connection, id: &DeviceId) -> Result<DeviceState, StoreError> {
    first(
        tx,
        "SELECT acked_through, uplink_highest, uplink_bitmap FROM device_ingest WHERE device_id = ?1",
        [id.as_str()],
        |row| {
            Ok(DeviceState {
                acked: row.get(0)?,
                window: ReplayWindow::from_parts(row.get(1)?, bitmap_from_sql(row.get(2)?)),
                last_seen_ms: None,
                acked_in_reply: false,
            })
        },
    )?
    .ok_or_else(|| StoreError::DeviceNotFound(id.clone()))
}

/// Refuses messages outside their documented ranges before touching anything.
fn validate(batch: &IngestBatch) -> Result<(), StoreError> {
    batch.check_size()?;
    let invalid =
        |kind: &str, id: &DeviceId| StoreError::invalid(format!("{kind} of device {id} is out of range"));
    for d in &batch.detections {
        d.message
            .validate()
            .map_err(|_| invalid("detection", &d.device_id))?;
    }
    for h in &batch.health {
        h.message
            .validate()
            .map_err(|_| invalid("health report", &h.device_id))?;
    }
    for h in &batch.hellos {
        h.message
            .validate()
            .map_err(|_| invalid("hello", &h.device_id))?;
    }
    Ok(())
}

/// Commits the batch; see [`IngestStore::commit_batch`].
fn commit(
    tx: &Connection,
    now: UnixMillis,
    batch: &IngestBatch,
    destinations: &[String],
) -> Result<BatchCommitted, StoreError> {
    let mut devices = Devices::default();
    let mut detections_stored = 0;
    for hello in &batch.hellos {
        let state = devices.get(tx, &hello.device_id)?;
        apply_hello(tx, hello)?;
        state.acked = state.acked.max(hello.message.queue_floor.saturating_sub(1));
        state.seen(hello.received_at_ms);
        state.acked_in_reply = true;
    }
    for detection in &batch.detections {
        let state = devices.get(tx, &detection.device_id)?;
        if insert_detection(tx, detection)? {
            insert_outbox(tx, now, detection, destinations)?;
            detections_stored += 1;
        }
        state.seen(detection.received_at_ms);
        state.acked_in_reply = true;
    }
    for health in &batch.health {
        devices
            .get(tx, &health.device_id)?
            .seen(health.received_at_ms);
        insert_health(tx, health)?;
    }
    for update in &batch.windows {
        let state = devices.get(tx, &update.device_id)?;
        state.window = merge_windows(state.window, update.window);
    }
    let acks = finish_devices(tx, devices)?;
    Ok(BatchCommitted { acks, detections_stored })
}

/// Advances each device's contiguous ack, writes its state, returns the acks.
fn finish_devices(tx: &Connection, devices: Devices) -> Result<Vec<AckUpdate>, StoreError> {
    let mut acks = Vec::new();
    let mut update = tx.prepare_cached(
        "UPDATE device_ingest SET acked_through = ?2, uplink_highest = ?3, uplink_bitmap = ?4,
             last_seen_at_ms = CASE WHEN ?5 IS NULL THEN last_seen_at_ms
                                    ELSE max(coalesce(last_seen_at_ms, ?5), ?5) END
         WHERE device_id = ?1",
    )?;
    for (id, state) in devices.0 {
        let acked = advance_contiguous(tx, &id, state.acked)?;
        let window = state.window;
        update.execute(params![
            id.as_str(),
            acked,
            window.highest(),
            bitmap_to_sql(window.bitmap()),
            state.last_seen_ms
        ])?;
        if state.acked_in_reply {
            acks.push(AckUpdate { device_id: id, acked_through: acked });
        }
    }
    Ok(acks)
}

/// The highest `n >= from` such that every sequence in `from+1..=n` is
/// stored. Reads only the device's rows above `from`, stopping at the first
/// gap: in the in-order case exactly the rows just inserted.
fn advance_contiguous(tx: &Connection, id: &DeviceId, from: u32) -> Result<u32, StoreError> {
    let mut stmt =
        tx.prepare_cached("SELECT seq FROM detections WHERE device_id = ?1 AND seq > ?2 ORDER BY seq")?;
    let mut rows = stmt.query(params![id.as_str(), from])?;
    let mut acked = from;
    while let Some(row) = rows.next()? {
        let seq: u32 = row.get(0)?;
        if Some(seq) != acked.checked_add(1) {
            break;
        }
        acked = seq;
    }
    Ok(acked)
}

fn apply_hello(tx: &Connection, hello: &Received<Hello>) -> Result<(), StoreError> {
    let h = &hello.message;
    tx.prepare_cached(
        "UPDATE devices SET hardware_model = ?2, chip = ?3, fw_major = ?4, fw_minor = ?5, fw_patch = ?6,
             secure_version = ?7, reset_reason = ?8, capabilities = ?9, config_version = ?10,
             hello_at_ms = ?11, queue_floor = max(queue_floor, ?12), queue_next = max(queue_next, ?13)
         WHERE id = ?1",
    )?
    .execute(params![
        hello.device_id.as_str(),
        h.hardware_model.as_str(),
        enum_text(&h.chip)?,
        h.firmware.major,
        h.firmware.minor,
        h.firmware.patch,
        h.secure_version,
        enum_text(&h.reset_reason)?,
        h.capabilities.0,
        h.config_version,
        hello.received_at_ms,
        h.queue_floor,
        h.queue_next,
    ])?;
    Ok(())
}

/// Inserts a detection unless (device, seq) is stored; `true` if it was new.
fn insert_detection(tx: &Connection, received: &Received<Detection>) -> Result<bool, StoreError> {
    let d = &received.message;
    let inserted = tx
        .prepare_cached(
            "INSERT INTO detections (device_id, seq, captured_at_s, trigger, burst_index, burst_len, classes,
                 bbox_x, bbox_y, bbox_width, bbox_height, image_len, image_digest, battery_mv, received_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
             ON CONFLICT (device_id, seq) DO NOTHING",
        )?
        .execute(params![
            received.device_id.as_str(),
            d.seq,
            d.captured_at,
            enum_text(&d.trigger)?,
            d.burst_index,
            d.burst_len,
            to_json(&d.classes)?,
            d.bbox.map(|b| b.x),
            d.bbox.map(|b| b.y),
            d.bbox.map(|b| b.width),
            d.bbox.map(|b| b.height),
            d.image_len,
            &d.image_digest[..],
            d.battery_mv,
            received.received_at_ms,
        ])?;
    if inserted == 0 {
        return Ok(false);
    }
    let mut class = tx.prepare_cached(
        "INSERT INTO detection_classes (label, captured_at_s, device_id, seq, rank, confidence_pct)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for (rank, c) in (0u8..).zip(&d.classes) {
        class.execute(params![
            c.label,
            d.captured_at,
            received.device_id.as_str(),
            d.seq,
            rank,
            c.confidence_pct
        ])?;
    }
    Ok(true)
}

/// The outbox payload: the JSON shape of [`crate::store::StoredDetection`].
#[derive(Serialize)]
struct Payload<'a> {
    device_id: &'a DeviceId,
    received_at_ms: UnixMillis,
    detection: &'a Detection,
}

fn insert_outbox(
    tx: &Connection,
    now: UnixMillis,
    received: &Received<Detection>,
    destinations: &[String],
) -> Result<(), StoreError> {
    if destinations.is_empty() {
        return Ok(());
    }
    let payload = to_json(&Payload {
        device_id: &received.device_id,
        received_at_ms: received.received_at_ms,
        detection: &received.message,
    })?;
    let mut insert = tx.prepare_cached(
        "INSERT INTO outbox (destination, device_id, seq, payload, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for destination in destinations {
        insert.execute(params![
            destination,
            received.device_id.as_str(),
            received.message.seq,
            payload,
            now
        ])?;
    }
    Ok(())
}

fn insert_health(tx: &Connection, received: &Received<Health>) -> Result<(), StoreError> {
    let h = &received.message;
    tx.prepare_cached(
        "INSERT INTO health_reports (device_id, taken_at_s, battery_mv, battery_soc_pct, charge_state, solar_mw,
             temperature_decicelsius, storage_free_kib, storage_errors, rssi_dbm, uptime_s, reset_reason,
             triggers_since_last, queue_depth, queue_dropped_total, received_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
    )?
    .execute(params![
        received.device_id.as_str(),
        h.taken_at,
        h.battery_mv,
        h.battery_soc_pct,
        enum_text(&h.charge_state)?,
        h.solar_mw,
        h.temperature_decicelsius,
        h.storage_free_kib,
        h.storage_errors,
        h.rssi_dbm,
        h.uptime_s,
        enum_text(&h.reset_reason)?,
        h.triggers_since_last,
        h.queue_depth,
        h.queue_dropped_total,
        received.received_at_ms,
    ])?;
    tx.prepare_cached(
        "UPDATE devices SET last_health = ?2, last_health_taken_at_s = ?3
         WHERE id = ?1 AND (last_health_taken_at_s IS NULL OR last_health_taken_at_s <= ?3)",
    )?
    .execute(params![received.device_id.as_str(), to_json(h)?, h.taken_at])?;
    Ok(())
}

impl IngestStore for SqliteStore {
    fn commit_batch(&self, batch: IngestBatch) -> StoreFuture<'_, BatchCommitted> {
        Box::pin(async move {
            validate(&batch)?;
            if batch.is_empty() {
                return Ok(BatchCommitted::default());
            }
            let destinations = std::sync::Arc::clone(&self.destinations);
            self.write(move |tx, now| commit(tx, now, &batch, &destinations))
                .await
        })
    }
}
