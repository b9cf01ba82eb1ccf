//! Devices: registration, registry reads and updates, secrets lookups.

use rusqlite::{Connection, Row, params};
use wildcam_sdk::DeviceId;
use wildcam_sdk::protocol::{Capabilities, DesiredConfig, FirmwareVersion};
use wildcam_sdk::seal::{ReplayWindow, SessionKey};

use super::codec::{
    Query, bitmap_from_sql, device_id, enum_from_text, first, from_json, from_json_opt, int, text,
};
use super::{SqliteStore, claims};
use crate::store::device::normalize_labels;
use crate::store::{
    ClaimAuthorization, Cursor, Deployment, DesiredConfigRecord, Device, DeviceCredentials, DeviceInfo,
    DeviceKeys, DeviceQuery, DeviceStatus, DeviceStore, NewDevice, Page, PasswordHash, ReportedConfigRecord,
    StoreError, StoreFuture, UnixMillis,
};

/// Every column of the registry view, groups and tags as JSON arrays.
const DEVICE_SELECT: &str = "SELECT d.*, i.acked_through, i.last_seen_at_ms,
    (SELECT json_group_array(name) FROM
        (SELECT name FROM device_groups WHERE device_id = d.id ORDER BY name)) AS groups_json,
    (SELECT json_group_array(tag) FROM
        (SELECT tag FROM device_tags WHERE device_id = d.id ORDER BY tag)) AS tags_json
    FROM devices d JOIN device_ingest i ON i.device_id = d.id";

/// Registers a device, consuming the claim's authorization.
fn create(tx: &Connection, now: UnixMillis, new: &NewDevice) -> Result<Device, StoreError> {
    let claim_id = authorize(tx, now, &new.authorization, &new.identity_key)?;
    check_identity_free(tx, &new.identity_key)?;
    if exists(tx, &new.id)? {
        return Err(StoreError::DeviceIdTaken(new.id.clone()));
    }
    tx.prepare_cached(
        "INSERT INTO devices (id, identity_key, mqtt_password_hash, session_key, claim_id, created_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        new.id.as_str(),
        &new.identity_key[..],
        &new.mqtt_password_hash.as_bytes()[..],
        &new.session_key.as_bytes()[..],
        claim_id,
        now
    ])?;
    tx.prepare_cached("INSERT INTO device_ingest (device_id) VALUES (?1)")?
        .execute([new.id.as_str()])?;
    get(tx, &new.id)?.ok_or_else(|| StoreError::corrupt("device vanished after insert"))
}

/// Consumes a token use or checks the allow-list; returns the token id used.
fn authorize(
    tx: &Connection,
    now: UnixMillis,
    authorization: &ClaimAuthorization,
    identity_key: &[u8; 32],
) -> Result<Option<String>, StoreError> {
    match authorization {
        ClaimAuthorization::Token { claim_id } => {
            claims::consume_use(tx, now, claim_id)?;
            Ok(Some(claim_id.clone()))
        }
        ClaimAuthorization::AllowList => {
            claims::allowed(tx, identity_key)?.ok_or(StoreError::NotOnAllowList)?;
            Ok(None)
        }
    }
}

/// Refuses an identity key that already belongs to a device.
fn check_identity_free(tx: &Connection, identity_key: &[u8; 32]) -> Result<(), StoreError> {
    let owner =
        first(tx, "SELECT id, status FROM devices WHERE identity_key = ?1", [&identity_key[..]], |row| {
            Ok((device_id(&row.get::<_, String>(0)?)?, DeviceStatus::parse(&row.get::<_, String>(1)?)?))
        })?;
    match owner {
        None => Ok(()),
        Some((device_id, DeviceStatus::Active)) => Err(StoreError::IdentityAlreadyClaimed { device_id }),
        Some((device_id, DeviceStatus::Revoked)) => Err(StoreError::IdentityRevoked { device_id }),
    }
}

/// Whether a device with this id exists.
pub(super) fn exists(conn: &Connection, id: &DeviceId) -> Result<bool, StoreError> {
    Ok(first(conn, "SELECT 1 FROM devices WHERE id = ?1", [id.as_str()], |_| Ok(()))?.is_some())
}

/// The device's status, or `DeviceNotFound`.
pub(super) fn status(conn: &Connection, id: &DeviceId) -> Result<DeviceStatus, StoreError> {
    first(conn, "SELECT status FROM devices WHERE id = ?1", [id.as_str()], |row| {
        DeviceStatus::parse(&row.get::<_, String>(0)?)
    })?
    .ok_or_else(|| StoreError::DeviceNotFound(id.clone()))
}

/// Fails unless the device exists and is active.
pub(super) fn ensure_active(conn: &Connection, id: &DeviceId) -> Result<(), StoreError> {
    match status(conn, id)? {
        DeviceStatus::Active => Ok(()),
        DeviceStatus::Revoked => Err(StoreError::DeviceRevoked(id.clone())),
    }
}

/// One device.
pub(super) fn get(conn: &Connection, id: &DeviceId) -> Result<Option<Device>, StoreError> {
    first(conn, &format!("{DEVICE_SELECT} WHERE d.id = ?1"), [id.as_str()], device_from_row)
}

fn list(conn: &Connection, query: &DeviceQuery) -> Result<Page<Device>, StoreError> {
    let limit = query.page.checked_limit()?;
    let mut sql = Query::new(DEVICE_SELECT);
    if let Some(status) = query.status {
        sql.and("d.status = ?", [text(status.as_str())]);
    }
    if let Some(group) = &query.group {
        sql.and("d.id IN (SELECT device_id FROM device_groups WHERE name = ?)", [text(group)]);
    }
    if let Some(tag) = &query.tag {
        sql.and("d.id IN (SELECT device_id FROM device_tags WHERE tag = ?)", [text(tag)]);
    }
    if let Some(site) = &query.site {
        sql.and("d.site = ?", [text(site)]);
    }
    if let Some(since) = query.seen_since_ms {
        sql.and("i.last_seen_at_ms >= ?", [int(since)]);
    }
    if let Some(cursor) = &query.page.cursor {
        let [after] = cursor.decode("dev", 1)?[..] else {
            return Err(StoreError::InvalidCursor);
        };
        sql.and("d.id > ?", [text(after)]);
    }
    let rows = sql.run(conn, "ORDER BY d.id LIMIT ?", [int(limit + 1)], device_from_row)?;
    Ok(Page::from_rows(rows, limit, |d| Cursor::encode("dev", &[d.id.as_str()])))
}

fn device_from_row(row: &Row<'_>) -> Result<Device, StoreError> {
    Ok(Device {
        id: device_id(&row.get::<_, String>("id")?)?,
        identity_key: row.get("identity_key")?,
        status: DeviceStatus::parse(&row.get::<_, String>("status")?)?,
        revoked_at_ms: row.get("revoked_at_ms")?,
        claim_id: row.get("claim_id")?,
        created_at_ms: row.get("created_at_ms")?,
        last_seen_at_ms: row.get("last_seen_at_ms")?,
        info: info_from_row(row)?,
        acked_through: row.get("acked_through")?,
        queue_floor: row.get("queue_floor")?,
        queue_next: row.get("queue_next")?,
        last_health: from_json_opt(row.get("last_health")?, "last health")?,
        groups: from_json(&row.get::<_, String>("groups_json")?, "groups")?,
        tags: from_json(&row.get::<_, String>("tags_json")?, "tags")?,
        deployment: deployment_from_row(row)?,
        desired_config: desired_from_row(row)?,
        reported_config: reported_from_row(row)?,
    })
}

fn info_from_row(row: &Row<'_>) -> Result<Option<DeviceInfo>, StoreError> {
    let Some(hello_at_ms) = row.get::<_, Option<i64>>("hello_at_ms")? else {
        return Ok(None);
    };
    let text_of = |column: &str| -> Result<String, StoreError> {
        row.get::<_, Option<String>>(column)?
            .ok_or_else(|| StoreError::corrupt(format!("{column} missing")))
    };
    let number_of = |column: &str| -> Result<u32, StoreError> {
        row.get::<_, Option<u32>>(column)?
            .ok_or_else(|| StoreError::corrupt(format!("{column} missing")))
    };
    let firmware = FirmwareVersion {
        major: row.get::<_, Option<u16>>("fw_major")?.unwrap_or(0),
        minor: row.get::<_, Option<u16>>("fw_minor")?.unwrap_or(0),
        patch: row.get::<_, Option<u16>>("fw_patch")?.unwrap_or(0),
    };
    Ok(Some(DeviceInfo {
        hardware_model: text_of("hardware_model")?,
        chip: enum_from_text(&text_of("chip")?, "chip")?,
        firmware,
        secure_version: number_of("secure_version")?,
        reset_reason: enum_from_text(&text_of("reset_reason")?, "reset reason")?,
        capabilities: Capabilities(number_of("capabilities")?),
        config_version: number_of("config_version")?,
        hello_at_ms,
    }))
}

fn deployment_from_row(row: &Row<'_>) -> Result<Option<Deployment>, StoreError> {
    let Some(site) = row.get::<_, Option<String>>("site")? else {
        return Ok(None);
    };
    Ok(Some(Deployment {
        site,
        latitude: row.get("latitude")?,
        longitude: row.get("longitude")?,
        camera_height_m: row.get("camera_height_m")?,
        start_ms: row.get("deployed_from_ms")?,
        end_ms: row.get("deployed_until_ms")?,
    }))
}

fn desired_from_row(row: &Row<'_>) -> Result<Option<DesiredConfigRecord>, StoreError> {
    let Some(config) = from_json_opt(row.get("desired_config")?, "desired config")? else {
        return Ok(None);
    };
    Ok(Some(DesiredConfigRecord {
        desired: DesiredConfig { version: row.get("desired_version")?, config },
        set_at_ms: row.get::<_, Option<i64>>("desired_set_at_ms")?.unwrap_or(0),
    }))
}

fn reported_from_row(row: &Row<'_>) -> Result<Option<ReportedConfigRecord>, StoreError> {
    let Some(report) = from_json_opt(row.get("reported_config")?, "reported config")? else {
        return Ok(None);
    };
    let received_at_ms = row.get::<_, Option<i64>>("reported_at_ms")?.unwrap_or(0);
    Ok(Some(ReportedConfigRecord { report, received_at_ms }))
}

/// Replaces the rows of `table` (`device_groups` or `device_tags`, column
/// `column`) for the device.
fn set_labels(
    tx: &Connection,
    id: &DeviceId,
    table: &str,
    column: &str,
    labels: &[String],
) -> Result<(), StoreError> {
    status(tx, id)?;
    tx.execute(&format!("DELETE FROM {table} WHERE device_id = ?1"), [id.as_str()])?;
    let mut insert =
        tx.prepare_cached(&format!("INSERT INTO {table} (device_id, {column}) VALUES (?1, ?2)"))?;
    for label in labels {
        insert.execute(params![id.as_str(), label])?;
    }
    Ok(())
}

fn set_deployment(tx: &Connection, id: &DeviceId, deployment: Option<&Deployment>) -> Result<(), StoreError> {
    if let Some(deployment) = deployment {
        deployment.validate()?;
    }
    let changed = tx.execute(
        "UPDATE devices SET site = ?2, latitude = ?3, longitude = ?4, camera_height_m = ?5,
             deployed_from_ms = ?6, deployed_until_ms = ?7
         WHERE id = ?1",
        params![
            id.as_str(),
            deployment.map(|d| d.site.as_str()),
            deployment.and_then(|d| d.latitude),
            deployment.and_then(|d| d.longitude),
            deployment.and_then(|d| d.camera_height_m),
            deployment.and_then(|d| d.start_ms),
            deployment.and_then(|d| d.end_ms),
        ],
    )?;
    if changed == 0 { Err(StoreError::DeviceNotFound(id.clone())) } else { Ok(()) }
}

fn revoke(tx: &Connection, now: UnixMillis, id: &DeviceId) -> Result<(), StoreError> {
    let changed = tx.execute(
        "UPDATE devices SET status = 'revoked', revoked_at_ms = coalesce(revoked_at_ms, ?2) WHERE id = ?1",
        params![id.as_str(), now],
    )?;
    if changed == 0 { Err(StoreError::DeviceNotFound(id.clone())) } else { Ok(()) }
}

fn credentials(conn: &Connection, id: &DeviceId) -> Result<Option<DeviceCredentials>, StoreError> {
    first(conn, "SELECT mqtt_password_hash, status FROM devices WHERE id = ?1", [id.as_str()], |row| {
        Ok(DeviceCredentials {
            device_id: id.clone(),
            mqtt_password_hash: PasswordHash::from_bytes(row.get(0)?),
            status: DeviceStatus::parse(&row.get::<_, String>(1)?)?,
        })
    })
}

fn keys(conn: &Connection, id: &DeviceId) -> Result<Option<DeviceKeys>, StoreError> {
    first(
        conn,
        "SELECT d.session_key, i.uplink_highest, i.uplink_bitmap, d.downlink_reservation, d.status
         FROM devices d JOIN device_ingest i ON i.device_id = d.id WHERE d.id = ?1",
        [id.as_str()],
        |row| {
            Ok(DeviceKeys {
                device_id: id.clone(),
                session_key: SessionKey::from_bytes(row.get(0)?),
                uplink_window: ReplayWindow::from_parts(row.get(1)?, bitmap_from_sql(row.get(2)?)),
                downlink_reservation: row.get(3)?,
                status: DeviceStatus::parse(&row.get::<_, String>(4)?)?,
            })
        },
    )
}

fn persist_reservation(
    tx: &Connection,
    id: &DeviceId,
    expected: u32,
    reservation: u32,
) -> Result<(), StoreError> {
    let current: u32 =
        first(tx, "SELECT downlink_reservation FROM devices WHERE id = ?1", [id.as_str()], |row| {
            Ok(row.get(0)?)
        })?
        .ok_or_else(|| StoreError::DeviceNotFound(id.clone()))?;
    if current != expected {
        return Err(StoreError::ReservationConflict { device_id: id.clone(), expected, current });
    }
    if reservation <= current {
        return Err(StoreError::invalid("a downlink reservation must move forward"));
    }
    tx.execute(
        "UPDATE devices SET downlink_reservation = ?2 WHERE id = ?1",
        params![id.as_str(), reservation],
    )?;
    Ok(())
}

impl DeviceStore for SqliteStore {
    fn create_device(&self, device: NewDevice) -> StoreFuture<'_, Device> {
        Box::pin(self.write(move |tx, now| create(tx, now, &device)))
    }

    fn get_device(&self, id: DeviceId) -> StoreFuture<'_, Option<Device>> {
        Box::pin(self.read(move |conn, _| get(conn, &id)))
    }

    fn list_devices(&self, query: DeviceQuery) -> StoreFuture<'_, Page<Device>> {
        Box::pin(self.read(move |conn, _| list(conn, &query)))
    }

    fn set_groups(&self, id: DeviceId, groups: Vec<String>) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let groups = normalize_labels("group", groups)?;
            self.write(move |tx, _| set_labels(tx, &id, "device_groups", "name", &groups))
                .await
        })
    }

    fn set_tags(&self, id: DeviceId, tags: Vec<String>) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let tags = normalize_labels("tag", tags)?;
            self.write(move |tx, _| set_labels(tx, &id, "device_tags", "tag", &tags))
                .await
        })
    }

    fn set_deployment(&self, id: DeviceId, deployment: Option<Deployment>) -> StoreFuture<'_, ()> {
        Box::pin(self.write(move |tx, _| set_deployment(tx, &id, deployment.as_ref())))
    }

    fn revoke_device(&self, id: DeviceId) -> StoreFuture<'_, ()> {
        Box::pin(self.write(move |tx, now| revoke(tx, now, &id)))
    }

    fn device_credentials(&self, id: DeviceId) -> StoreFuture<'_, Option<DeviceCredentials>> {
        Box::pin(self.read(move |conn, _| credentials(conn, &id)))
    }

    fn device_keys(&self, id: DeviceId) -> StoreFuture<'_, Option<DeviceKeys>> {
        Box::pin(self.read(move |conn, _| keys(conn, &id)))
    }

    fn persist_downlink_reservation(
        &self,
        id: DeviceId,
        expected: u32,
        reservation: u32,
    ) -> StoreFuture<'_, ()> {
        Box::pin(self.write(move |tx, _| persist_reservation(tx, &id, expected, reservation)))
    }
}
