//! Firmware, rollouts and their targets.

use std::collections::BTreeSet;

use rusqlite::{Connection, OptionalExtension, Row, params};
use wildcam_sdk::DeviceId;
use wildcam_sdk::ota::{OtaOutcome, SignedManifest};
use wildcam_sdk::protocol::{Chip, FirmwareVersion, OtaResult};

use super::codec::{Query, device_id, enum_from_text, enum_text, first, int};
use super::{SqliteStore, devices};
use crate::config::{FAILURE_THRESHOLD_RANGE, MAX_IN_FLIGHT_RANGE};
use crate::store::{
    ChunkGrant, Cursor, FirmwareRecord, NewFirmware, NewRollout, OfferGrant, OtaStore, Page, PageRequest,
    ROLLOUT_TARGETS_MAX, ResultEffect, ResultRecorded, RolloutAction, RolloutDevice, RolloutRecord,
    RolloutState, StoreError, StoreFuture, TargetState, UnixMillis,
};

const FIRMWARE_SELECT: &str = "SELECT * FROM firmware";
const ROLLOUT_SELECT: &str = "SELECT * FROM rollouts";
/// Targets the device is done with, as SQL.
const FINAL_STATES: &str = "('confirmed', 'failed', 'rolled_back', 'superseded', 'aborted')";
/// Targets that hold one of the rollout's in-flight slots (while not stalled).
const IN_FLIGHT_STATES: &str = "('offered', 'downloading', 'verifying')";

fn rollout_state_text(state: RolloutState) -> &'static str {
    match state {
        RolloutState::Active => "active",
        RolloutState::Paused => "paused",
        RolloutState::Aborted => "aborted",
        RolloutState::Completed => "completed",
    }
}

fn parse_rollout_state(text: &str) -> Result<RolloutState, StoreError> {
    match text {
        "active" => Ok(RolloutState::Active),
        "paused" => Ok(RolloutState::Paused),
        "aborted" => Ok(RolloutState::Aborted),
        "completed" => Ok(RolloutState::Completed),
        other => Err(StoreError::corrupt(format!("unknown rollout state {other:?}"))),
    }
}

fn encode_manifest(manifest: &SignedManifest) -> Result<Vec<u8>, StoreError> {
    postcard::to_allocvec(manifest).map_err(|e| StoreError::invalid(format!("manifest does not encode: {e}")))
}

fn firmware_from_row(row: &Row<'_>) -> Result<FirmwareRecord, StoreError> {
    let blob = |name: &str| -> Result<[u8; 32], StoreError> {
        row.get::<_, Vec<u8>>(name)?
            .try_into()
            .map_err(|_| StoreError::corrupt(format!("firmware {name} is not 32 bytes")))
    };
    let manifest: SignedManifest = postcard::from_bytes(&row.get::<_, Vec<u8>>("manifest")?)
        .map_err(|e| StoreError::corrupt(format!("stored manifest: {e}")))?;
    Ok(FirmwareRecord {
        id: row.get("id")?,
        sha256: blob("sha256")?,
        size: row.get("size")?,
        chip: enum_from_text::<Chip>(&row.get::<_, String>("chip")?, "chip")?,
        version: FirmwareVersion {
            major: row.get("fw_major")?,
            minor: row.get("fw_minor")?,
            patch: row.get("fw_patch")?,
        },
        secure_version: row.get("secure_version")?,
        min_battery_mv: row.get("min_battery_mv")?,
        signing_key: blob("signing_key")?,
        manifest,
        created_at_ms: row.get("created_at_ms")?,
    })
}

fn get_firmware(conn: &Connection, id: u32) -> Result<Option<FirmwareRecord>, StoreError> {
    first(conn, &format!("{FIRMWARE_SELECT} WHERE id = ?1"), [id], firmware_from_row)
}

fn insert_firmware(
    tx: &Connection,
    now: UnixMillis,
    new: &NewFirmware,
) -> Result<(FirmwareRecord, bool), StoreError> {
    let m = &new.manifest.manifest;
    let encoded = encode_manifest(&new.manifest)?;
    let existing =
        first(tx, &format!("{FIRMWARE_SELECT} WHERE sha256 = ?1"), [&m.image_sha256[..]], firmware_from_row)?;
    if let Some(existing) = existing {
        if existing.manifest == new.manifest {
            return Ok((existing, false));
        }
        return Err(StoreError::FirmwareConflict(existing.id));
    }
    let row_id: i64 = tx.query_row(
        "INSERT INTO firmware (sha256, size, chip, fw_major, fw_minor, fw_patch, secure_version,
                               min_battery_mv, manifest, signing_key, created_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) RETURNING id",
        params![
            &m.image_sha256[..],
            m.image_size,
            enum_text(&m.chip)?,
            m.version.major,
            m.version.minor,
            m.version.patch,
            m.secure_version,
            m.min_battery_mv,
            encoded,
            &new.signing_key[..],
            now
        ],
        |row| row.get(0),
    )?;
    let id = u32::try_from(row_id).map_err(|_| StoreError::OtaIdsExhausted)?;
    let stored =
        get_firmware(tx, id)?.ok_or_else(|| StoreError::corrupt("firmware vanished after insert"))?;
    Ok((stored, true))
}

/// A keyset page of rows with a `u32` id, newest first.
fn newest_first<T>(
    conn: &Connection,
    select: &str,
    kind: &str,
    page: &PageRequest,
    convert: impl Fn(&Row<'_>) -> Result<T, StoreError>,
    id_of: impl Fn(&T) -> u32,
) -> Result<Page<T>, StoreError> {
    let limit = page.checked_limit()?;
    let mut sql = Query::new(select);
    if let Some(cursor) = &page.cursor {
        let [before] = cursor.decode(kind, 1)?[..] else {
            return Err(StoreError::InvalidCursor);
        };
        let before: u32 = before.parse().map_err(|_| StoreError::InvalidCursor)?;
        sql.and("id < ?", [int(before)]);
    }
    let rows = sql.run(conn, "ORDER BY id DESC LIMIT ?", [int(limit + 1)], convert)?;
    Ok(Page::from_rows(rows, limit, |item| Cursor::encode(kind, &[&id_of(item).to_string()])))
}

fn rollout_from_row(conn: &Connection, row: &Row<'_>) -> Result<RolloutRecord, StoreError> {
    let id: u32 = row.get("id")?;
    let firmware_id: u32 = row.get("firmware_id")?;
    let firmware = get_firmware(conn, firmware_id)?
        .ok_or_else(|| StoreError::corrupt(format!("rollout {id} names missing firmware {firmware_id}")))?;
    Ok(RolloutRecord {
        id,
        firmware,
        state: parse_rollout_state(&row.get::<_, String>("state")?)?,
        pause_reason: row.get("pause_reason")?,
        max_in_flight: row.get("max_in_flight")?,
        failure_threshold: row.get("failure_threshold")?,
        counts: counts(conn, id)?,
        created_at_ms: row.get("created_at_ms")?,
        updated_at_ms: row.get("updated_at_ms")?,
    })
}

fn counts(conn: &Connection, rollout_id: u32) -> Result<Vec<(TargetState, u32)>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT state, count(*) FROM rollout_devices WHERE rollout_id = ?1 GROUP BY state")?;
    let mut rows = stmt.query([rollout_id])?;
    let mut counts: Vec<(TargetState, u32)> = TargetState::ALL.iter().map(|s| (*s, 0)).collect();
    while let Some(row) = rows.next()? {
        let state = TargetState::parse(&row.get::<_, String>(0)?)?;
        if let Some(entry) = counts.iter_mut().find(|(s, _)| *s == state) {
            entry.1 = row.get(1)?;
        }
    }
    Ok(counts)
}

fn get_rollout(conn: &Connection, id: u32) -> Result<Option<RolloutRecord>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!("{ROLLOUT_SELECT} WHERE id = ?1"))?;
    let mut rows = stmt.query([id])?;
    rows.next()?
        .map(|row| rollout_from_row(conn, row))
        .transpose()
}

fn existing_rollout(conn: &Connection, id: u32) -> Result<RolloutRecord, StoreError> {
    get_rollout(conn, id)?.ok_or(StoreError::RolloutNotFound(id))
}

fn check_range(name: &str, value: u32, range: std::ops::RangeInclusive<u32>) -> Result<(), StoreError> {
    if range.contains(&value) {
        Ok(())
    } else {
        Err(StoreError::invalid(format!("{name} must be within {}..={}", range.start(), range.end())))
    }
}

/// The devices a new rollout targets, sorted.
fn targets(
    tx: &Connection,
    new: &NewRollout,
    firmware: &FirmwareRecord,
) -> Result<Vec<DeviceId>, StoreError> {
    let chip = enum_text(&firmware.chip)?;
    let mut targets = BTreeSet::new();
    for id in &new.devices {
        devices::ensure_active(tx, id)?;
        let known: Option<String> =
            tx.query_row("SELECT chip FROM devices WHERE id = ?1", [id.as_str()], |row| row.get(0))?;
        if let Some(known) = known.filter(|known| *known != chip) {
            return Err(StoreError::invalid(format!(
                "device {id} runs on {known}; firmware {} is built for {chip}",
                firmware.id
            )));
        }
        targets.insert(id.clone());
    }
    if new.all_of_chip {
        let v = firmware.version;
        let mut stmt = tx.prepare_cached(
            "SELECT id FROM devices WHERE status = 'active' AND chip = ?1
                 AND (fw_major, fw_minor, fw_patch) < (?2, ?3, ?4)
             ORDER BY id LIMIT ?5",
        )?;
        let limit = ROLLOUT_TARGETS_MAX + 1;
        let mut rows = stmt.query(params![chip, v.major, v.minor, v.patch, limit])?;
        while let Some(row) = rows.next()? {
            targets.insert(device_id(&row.get::<_, String>(0)?)?);
        }
    }
    if targets.is_empty() {
        return Err(StoreError::invalid(
            "the rollout targets no device (name devices, or all devices of the chip running an older version)",
        ));
    }
    if targets.len() > ROLLOUT_TARGETS_MAX {
        return Err(StoreError::invalid(format!("a rollout targets at most {ROLLOUT_TARGETS_MAX} devices")));
    }
    Ok(targets.into_iter().collect())
}

fn create_rollout(tx: &Connection, now: UnixMillis, new: &NewRollout) -> Result<RolloutRecord, StoreError> {
    check_range("max_in_flight", new.max_in_flight, MAX_IN_FLIGHT_RANGE)?;
    check_range("failure_threshold", new.failure_threshold, FAILURE_THRESHOLD_RANGE)?;
    let firmware = get_firmware(tx, new.firmware_id)?.ok_or(StoreError::FirmwareNotFound(new.firmware_id))?;
    let targets = targets(tx, new, &firmware)?;
    let row_id: i64 = tx.query_row(
        "INSERT INTO rollouts (firmware_id, max_in_flight, failure_threshold, created_at_ms, updated_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?4) RETURNING id",
        params![firmware.id, new.max_in_flight, new.failure_threshold, now],
        |row| row.get(0),
    )?;
    let id = u32::try_from(row_id).map_err(|_| StoreError::OtaIdsExhausted)?;
    let mut touched = BTreeSet::new();
    for device in &targets {
        let mut superseded = tx.prepare_cached(&format!(
            "UPDATE rollout_devices SET state = 'superseded', updated_at_ms = ?2
             WHERE device_id = ?1 AND state NOT IN {FINAL_STATES} RETURNING rollout_id"
        ))?;
        let mut rows = superseded.query(params![device.as_str(), now])?;
        while let Some(row) = rows.next()? {
            touched.insert(row.get::<_, u32>(0)?);
        }
        tx.prepare_cached(
            "INSERT INTO rollout_devices (rollout_id, device_id, updated_at_ms) VALUES (?1, ?2, ?3)",
        )?
        .execute(params![id, device.as_str(), now])?;
    }
    for older in touched {
        complete_if_done(tx, now, older)?;
    }
    existing_rollout(tx, id)
}

/// Marks an active or paused rollout completed once no target is unfinished.
fn complete_if_done(tx: &Connection, now: UnixMillis, rollout_id: u32) -> Result<(), StoreError> {
    tx.prepare_cached(&format!(
        "UPDATE rollouts SET state = 'completed', updated_at_ms = ?2
         WHERE id = ?1 AND state IN ('active', 'paused')
           AND NOT EXISTS (SELECT 1 FROM rollout_devices
                           WHERE rollout_id = ?1 AND state NOT IN {FINAL_STATES})"
    ))?
    .execute(params![rollout_id, now])?;
    Ok(())
}

fn change_rollout(
    tx: &Connection,
    now: UnixMillis,
    id: u32,
    action: RolloutAction,
) -> Result<RolloutRecord, StoreError> {
    let rollout = existing_rollout(tx, id)?;
    let refuse = |message| StoreError::RolloutState { id, state: rollout_state_text(rollout.state), message };
    let (state, reason) = match (action, rollout.state) {
        (RolloutAction::Pause, RolloutState::Paused) | (RolloutAction::Resume, RolloutState::Active) => {
            return Ok(rollout);
        }
        (RolloutAction::Abort, RolloutState::Aborted) => return Ok(rollout),
        (_, RolloutState::Aborted) => return Err(refuse("an aborted rollout stays aborted")),
        (_, RolloutState::Completed) => return Err(refuse("every target has finished")),
        (RolloutAction::Pause, _) => (RolloutState::Paused, Some("paused by an operator")),
        (RolloutAction::Resume, _) => (RolloutState::Active, None),
        (RolloutAction::Abort, _) => (RolloutState::Aborted, None),
    };
    tx.execute(
        "UPDATE rollouts SET state = ?2, pause_reason = ?3, updated_at_ms = ?4 WHERE id = ?1",
        params![id, rollout_state_text(state), reason, now],
    )?;
    if state == RolloutState::Aborted {
        tx.execute(
            &format!(
                "UPDATE rollout_devices SET state = 'aborted', updated_at_ms = ?2
                 WHERE rollout_id = ?1 AND state NOT IN {FINAL_STATES}"
            ),
            params![id, now],
        )?;
    }
    existing_rollout(tx, id)
}

fn in_flight(tx: &Connection, rollout_id: u32, since: UnixMillis) -> Result<u32, StoreError> {
    Ok(tx.query_row(
        &format!(
            "SELECT count(*) FROM rollout_devices
             WHERE rollout_id = ?1 AND state IN {IN_FLIGHT_STATES} AND updated_at_ms > ?2"
        ),
        params![rollout_id, since],
        |row| row.get(0),
    )?)
}

fn grant_offer(
    tx: &Connection,
    now: UnixMillis,
    device: &DeviceId,
    stall_ms: i64,
) -> Result<Option<OfferGrant>, StoreError> {
    let target = tx
        .query_row(
            &format!(
                "SELECT t.rollout_id, t.state, r.state, r.max_in_flight, f.manifest
                 FROM rollout_devices t
                 JOIN rollouts r ON r.id = t.rollout_id
                 JOIN firmware f ON f.id = r.firmware_id
                 WHERE t.device_id = ?1 AND t.state NOT IN {FINAL_STATES}
                 ORDER BY t.rollout_id DESC LIMIT 1"
            ),
            [device.as_str()],
            |row| {
                Ok((
                    row.get::<_, u32>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, u32>(3)?,
                    row.get::<_, Vec<u8>>(4)?,
                ))
            },
        )
        .optional()?;
    let Some((rollout_id, target, rollout, max_in_flight, manifest)) = target else {
        return Ok(None);
    };
    let target = TargetState::parse(&target)?;
    let rollout = parse_rollout_state(&rollout)?;
    let offer = match (target, rollout) {
        // Already started: offer again so the device picks up where it is.
        (
            TargetState::Offered | TargetState::Downloading | TargetState::Verifying,
            RolloutState::Active | RolloutState::Paused,
        ) => true,
        (TargetState::Pending, RolloutState::Active) => {
            in_flight(tx, rollout_id, now.saturating_sub(stall_ms))? < max_in_flight
        }
        _ => false,
    };
    if !offer {
        return Ok(None);
    }
    tx.prepare_cached(
        "UPDATE rollout_devices
         SET state = CASE state WHEN 'pending' THEN 'offered' ELSE state END,
             offers = offers + 1, updated_at_ms = ?3
         WHERE rollout_id = ?1 AND device_id = ?2",
    )?
    .execute(params![rollout_id, device.as_str(), now])?;
    let manifest =
        postcard::from_bytes(&manifest).map_err(|e| StoreError::corrupt(format!("stored manifest: {e}")))?;
    Ok(Some(OfferGrant { rollout_id, manifest }))
}

fn offer_candidates(
    conn: &Connection,
    now: UnixMillis,
    rollout_id: u32,
    stall_ms: i64,
) -> Result<Vec<DeviceId>, StoreError> {
    let Some((state, max_in_flight)) = conn
        .query_row("SELECT state, max_in_flight FROM rollouts WHERE id = ?1", [rollout_id], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, u32>(1)?))
        })
        .optional()?
    else {
        return Err(StoreError::RolloutNotFound(rollout_id));
    };
    if parse_rollout_state(&state)? != RolloutState::Active {
        return Ok(Vec::new());
    }
    let free = max_in_flight.saturating_sub(in_flight(conn, rollout_id, now.saturating_sub(stall_ms))?);
    let mut stmt = conn.prepare_cached(
        "SELECT t.device_id FROM rollout_devices t
         LEFT JOIN device_ingest i ON i.device_id = t.device_id
         WHERE t.rollout_id = ?1 AND t.state = 'pending'
         ORDER BY i.last_seen_at_ms DESC NULLS LAST, t.device_id LIMIT ?2",
    )?;
    let mut rows = stmt.query(params![rollout_id, free])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(device_id(&row.get::<_, String>(0)?)?);
    }
    Ok(out)
}

fn chunk_grant(
    conn: &Connection,
    rollout_id: u32,
    device: &DeviceId,
) -> Result<Option<ChunkGrant>, StoreError> {
    let row = conn
        .prepare_cached(
            "SELECT t.state, r.state, f.sha256, f.size FROM rollout_devices t
             JOIN rollouts r ON r.id = t.rollout_id
             JOIN firmware f ON f.id = r.firmware_id
             WHERE t.rollout_id = ?1 AND t.device_id = ?2",
        )?
        .query_row(params![rollout_id, device.as_str()], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?, row.get::<_, Vec<u8>>(2)?, row.get(3)?))
        })
        .optional()?;
    let Some((target, rollout, sha256, size)) = row else {
        return Ok(None);
    };
    Ok(Some(ChunkGrant {
        target: TargetState::parse(&target)?,
        rollout: parse_rollout_state(&rollout)?,
        sha256: sha256
            .try_into()
            .map_err(|_| StoreError::corrupt("firmware sha256 is not 32 bytes"))?,
        size,
    }))
}

fn record_progress(
    tx: &Connection,
    now: UnixMillis,
    rollout_id: u32,
    device: &DeviceId,
    from: &[TargetState],
    state: TargetState,
    offset: u32,
) -> Result<bool, StoreError> {
    let mut changed = 0;
    for from in from.iter().filter(|s| !s.is_final()) {
        changed += tx
            .prepare_cached(
                "UPDATE rollout_devices SET state = ?3, offset = ?4, updated_at_ms = ?5
                 WHERE rollout_id = ?1 AND device_id = ?2 AND state = ?6",
            )?
            .execute(params![rollout_id, device.as_str(), state.as_str(), offset, now, from.as_str()])?;
    }
    Ok(changed > 0)
}

fn record_result(
    tx: &Connection,
    now: UnixMillis,
    device: &DeviceId,
    result: &OtaResult,
) -> Result<ResultEffect, StoreError> {
    let unknown = ResultEffect { recorded: ResultRecorded::Unknown, paused: false };
    let row = tx
        .query_row(
            "SELECT t.state, t.outcome, f.fw_major, f.fw_minor, f.fw_patch, f.secure_version
             FROM rollout_devices t
             JOIN rollouts r ON r.id = t.rollout_id
             JOIN firmware f ON f.id = r.firmware_id
             WHERE t.rollout_id = ?1 AND t.device_id = ?2",
            params![result.rollout_id, device.as_str()],
            |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, Option<String>>(1)?,
                    FirmwareVersion { major: row.get(2)?, minor: row.get(3)?, patch: row.get(4)? },
                    row.get::<_, u32>(5)?,
                ))
            },
        )
        .optional()?;
    let Some((state, outcome, version, secure_version)) = row else {
        return Ok(unknown);
    };
    if version != result.version {
        return Ok(unknown);
    }
    let state = TargetState::parse(&state)?;
    let previous = outcome
        .map(|o| enum_from_text::<OtaOutcome>(&o, "OTA outcome"))
        .transpose()?;
    let repeat = ResultEffect { recorded: ResultRecorded::Repeat, paused: false };
    // The first final outcome stays; Busy only asks to be offered later.
    if previous.is_some_and(|p| p != OtaOutcome::Busy) {
        return Ok(repeat);
    }
    let next = match TargetState::from_outcome(result.outcome) {
        _ if result.outcome == OtaOutcome::Busy && state.is_final() => return Ok(repeat),
        None if result.outcome == OtaOutcome::Busy => TargetState::Pending,
        None => TargetState::Superseded,
        // Superseded or aborted by the server: only a confirmation changes
        // that (the device runs the image whatever the server decided).
        Some(next) if state.is_final() && next != TargetState::Confirmed => state,
        Some(next) => next,
    };
    tx.execute(
        "UPDATE rollout_devices SET state = ?3, outcome = ?4, updated_at_ms = ?5
         WHERE rollout_id = ?1 AND device_id = ?2",
        params![result.rollout_id, device.as_str(), next.as_str(), enum_text(&result.outcome)?, now],
    )?;
    if next == TargetState::Confirmed {
        tx.execute(
            "UPDATE devices SET fw_major = ?2, fw_minor = ?3, fw_patch = ?4,
                 secure_version = max(coalesce(secure_version, 0), ?5)
             WHERE id = ?1",
            params![device.as_str(), version.major, version.minor, version.patch, secure_version],
        )?;
    }
    let failed = matches!(next, TargetState::Failed | TargetState::RolledBack) && next != state;
    let paused = failed && pause_at_threshold(tx, now, result.rollout_id)?;
    complete_if_done(tx, now, result.rollout_id)?;
    Ok(ResultEffect { recorded: ResultRecorded::New(next), paused })
}

/// Pauses an active rollout whose failed and rolled-back targets reached its
/// threshold; `true` if it did.
fn pause_at_threshold(tx: &Connection, now: UnixMillis, rollout_id: u32) -> Result<bool, StoreError> {
    let failures: u32 = tx.query_row(
        "SELECT count(*) FROM rollout_devices WHERE rollout_id = ?1 AND state IN ('failed', 'rolled_back')",
        [rollout_id],
        |row| row.get(0),
    )?;
    let changed = tx.execute(
        "UPDATE rollouts SET state = 'paused', updated_at_ms = ?3,
             pause_reason = 'failure threshold reached: ' || ?2 || ' devices failed or rolled back'
         WHERE id = ?1 AND state = 'active' AND failure_threshold <= ?2",
        params![rollout_id, failures, now],
    )?;
    Ok(changed > 0)
}

fn rollout_devices(conn: &Connection, id: u32) -> Result<Vec<RolloutDevice>, StoreError> {
    existing_rollout(conn, id)?;
    let mut stmt = conn.prepare_cached(
        "SELECT device_id, state, offset, outcome, offers, updated_at_ms FROM rollout_devices
         WHERE rollout_id = ?1 ORDER BY device_id",
    )?;
    let mut rows = stmt.query([id])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(RolloutDevice {
            device_id: device_id(&row.get::<_, String>(0)?)?,
            state: TargetState::parse(&row.get::<_, String>(1)?)?,
            offset: row.get(2)?,
            outcome: row
                .get::<_, Option<String>>(3)?
                .map(|o| enum_from_text(&o, "OTA outcome"))
                .transpose()?,
            offers: row.get(4)?,
            updated_at_ms: row.get(5)?,
        });
    }
    Ok(out)
}

impl OtaStore for SqliteStore {
    fn insert_firmware(&self, firmware: NewFirmware) -> StoreFuture<'_, (FirmwareRecord, bool)> {
        Box::pin(self.write(move |tx, now| insert_firmware(tx, now, &firmware)))
    }

    fn get_firmware(&self, id: u32) -> StoreFuture<'_, Option<FirmwareRecord>> {
        Box::pin(self.read(move |conn, _| get_firmware(conn, id)))
    }

    fn list_firmware(&self, page: PageRequest) -> StoreFuture<'_, Page<FirmwareRecord>> {
        Box::pin(self.read(move |conn, _| {
            newest_first(conn, FIRMWARE_SELECT, "fw", &page, firmware_from_row, |f| f.id)
        }))
    }

    fn create_rollout(&self, rollout: NewRollout) -> StoreFuture<'_, RolloutRecord> {
        Box::pin(self.write(move |tx, now| create_rollout(tx, now, &rollout)))
    }

    fn get_rollout(&self, id: u32) -> StoreFuture<'_, Option<RolloutRecord>> {
        Box::pin(self.read(move |conn, _| get_rollout(conn, id)))
    }

    fn rollout_devices(&self, id: u32) -> StoreFuture<'_, Vec<RolloutDevice>> {
        Box::pin(self.read(move |conn, _| rollout_devices(conn, id)))
    }

    fn list_rollouts(&self, page: PageRequest) -> StoreFuture<'_, Page<RolloutRecord>> {
        Box::pin(self.read(move |conn, _| {
            newest_first(conn, ROLLOUT_SELECT, "ro", &page, |row| rollout_from_row(conn, row), |r| r.id)
        }))
    }

    fn change_rollout(&self, id: u32, action: RolloutAction) -> StoreFuture<'_, RolloutRecord> {
        Box::pin(self.write(move |tx, now| change_rollout(tx, now, id, action)))
    }

    fn grant_offer(&self, device: DeviceId, stall_ms: i64) -> StoreFuture<'_, Option<OfferGrant>> {
        Box::pin(self.write(move |tx, now| grant_offer(tx, now, &device, stall_ms)))
    }

    fn offer_candidates(&self, rollout_id: u32, stall_ms: i64) -> StoreFuture<'_, Vec<DeviceId>> {
        Box::pin(self.read(move |conn, now| offer_candidates(conn, now, rollout_id, stall_ms)))
    }

    fn chunk_grant(&self, rollout_id: u32, device: DeviceId) -> StoreFuture<'_, Option<ChunkGrant>> {
        Box::pin(self.read(move |conn, _| chunk_grant(conn, rollout_id, &device)))
    }

    fn record_ota_progress(
        &self,
        rollout_id: u32,
        device: DeviceId,
        from: Vec<TargetState>,
        state: TargetState,
        offset: u32,
    ) -> StoreFuture<'_, bool> {
        Box::pin(
            self.write(move |tx, now| record_progress(tx, now, rollout_id, &device, &from, state, offset)),
        )
    }

    fn record_ota_result(&self, device: DeviceId, result: OtaResult) -> StoreFuture<'_, ResultEffect> {
        Box::pin(self.write(move |tx, now| record_result(tx, now, &device, &result)))
    }
}
