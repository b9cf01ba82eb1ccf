//! Desired/reported configuration and commands.

use rusqlite::{Connection, Row, params};
use wildcam_sdk::DeviceId;
use wildcam_sdk::protocol::{
    CommandKind, CommandResult, CommandStatus, DesiredConfig, Message, ReportedConfig, TrapConfig,
};

use super::codec::{
    Query, collect, device_id, enum_from_text, enum_text, first, from_json, int, text, to_json,
};
use super::{SqliteStore, devices};
use crate::store::control::check_ttl;
use crate::store::{
    CommandRecord, CommandState, ControlStore, Cursor, OPEN_COMMANDS_MAX, Page, PageRequest, StoreError,
    StoreFuture, UnixMillis,
};

const COMMAND_SELECT: &str = "SELECT * FROM commands";

fn set_desired(
    tx: &Connection,
    now: UnixMillis,
    id: &DeviceId,
    config: TrapConfig,
) -> Result<DesiredConfig, StoreError> {
    config
        .validate()
        .map_err(|_| StoreError::invalid("configuration field out of range"))?;
    devices::ensure_active(tx, id)?;
    // Above anything the device was given or runs, or it would ignore it.
    let highest: u32 = first(
        tx,
        "SELECT max(desired_version, coalesce(reported_version, 0), coalesce(config_version, 0))
         FROM devices WHERE id = ?1",
        [id.as_str()],
        |row| Ok(row.get(0)?),
    )?
    .ok_or_else(|| StoreError::DeviceNotFound(id.clone()))?;
    let version = highest
        .checked_add(1)
        .ok_or_else(|| StoreError::invalid("configuration versions exhausted"))?;
    tx.execute(
        "UPDATE devices SET desired_config = ?2, desired_version = ?3, desired_set_at_ms = ?4 WHERE id = ?1",
        params![id.as_str(), to_json(&config)?, version, now],
    )?;
    Ok(DesiredConfig { version, config })
}

fn record_reported(
    tx: &Connection,
    id: &DeviceId,
    report: &ReportedConfig,
    received_at_ms: UnixMillis,
) -> Result<(), StoreError> {
    report
        .validate()
        .map_err(|_| StoreError::invalid("reported configuration out of range"))?;
    let changed = tx.execute(
        "UPDATE devices SET reported_config = ?2, reported_version = ?3, reported_status = ?4,
             reported_at_ms = ?5
         WHERE id = ?1",
        params![id.as_str(), to_json(report)?, report.version, enum_text(&report.status)?, received_at_ms],
    )?;
    if changed == 0 { Err(StoreError::DeviceNotFound(id.clone())) } else { Ok(()) }
}

fn enqueue(
    tx: &Connection,
    now: UnixMillis,
    id: &DeviceId,
    kind: CommandKind,
    ttl_s: u32,
) -> Result<CommandRecord, StoreError> {
    check_ttl(ttl_s)?;
    devices::ensure_active(tx, id)?;
    let open: usize = tx.query_row(
        "SELECT count(*) FROM commands
         WHERE device_id = ?1 AND state IN ('pending', 'delivered') AND expires_at_ms > ?2",
        params![id.as_str(), now],
        |row| row.get(0),
    )?;
    if open >= OPEN_COMMANDS_MAX {
        return Err(StoreError::TooManyOpenCommands { device_id: id.clone(), max: OPEN_COMMANDS_MAX });
    }
    let expires_at_ms = now.saturating_add(i64::from(ttl_s) * 1_000);
    let row_id: i64 = tx.query_row(
        "INSERT INTO commands (device_id, kind, ttl_s, created_at_ms, expires_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5) RETURNING id",
        params![id.as_str(), to_json(&kind)?, ttl_s, now, expires_at_ms],
        |row| row.get(0),
    )?;
    // Ids travel as u32; refusing rolls the insert back.
    let command_id = u32::try_from(row_id).map_err(|_| StoreError::CommandIdsExhausted)?;
    get_command(tx, now, id, command_id)?.ok_or_else(|| StoreError::corrupt("command vanished after insert"))
}

fn get_command(
    conn: &Connection,
    now: UnixMillis,
    id: &DeviceId,
    command_id: u32,
) -> Result<Option<CommandRecord>, StoreError> {
    first(
        conn,
        &format!("{COMMAND_SELECT} WHERE id = ?1 AND device_id = ?2"),
        params![command_id, id.as_str()],
        |row| command_from_row(row, now),
    )
}

fn to_deliver(conn: &Connection, now: UnixMillis, id: &DeviceId) -> Result<Vec<CommandRecord>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "{COMMAND_SELECT} WHERE device_id = ?1 AND state IN ('pending', 'delivered') AND expires_at_ms > ?2
         ORDER BY id LIMIT ?3"
    ))?;
    let limit = u32::try_from(OPEN_COMMANDS_MAX).unwrap_or(u32::MAX);
    collect(&mut stmt, params![id.as_str(), now, limit], |row| command_from_row(row, now))
}

fn mark_delivered(
    tx: &Connection,
    now: UnixMillis,
    id: &DeviceId,
    command_id: u32,
) -> Result<(), StoreError> {
    let changed = tx.execute(
        "UPDATE commands SET state = 'delivered', delivered_at_ms = ?3, deliveries = deliveries + 1
         WHERE id = ?1 AND device_id = ?2 AND state IN ('pending', 'delivered')",
        params![command_id, id.as_str(), now],
    )?;
    if changed == 0 && get_command(tx, now, id, command_id)?.is_none() {
        return Err(StoreError::CommandNotFound { device_id: id.clone(), id: command_id });
    }
    Ok(())
}

fn record_result(
    tx: &Connection,
    now: UnixMillis,
    id: &DeviceId,
    result: CommandResult,
) -> Result<CommandRecord, StoreError> {
    let not_found = || StoreError::CommandNotFound { device_id: id.clone(), id: result.id };
    let command = get_command(tx, now, id, result.id)?.ok_or_else(not_found)?;
    if command.result.is_some() {
        return Ok(command); // The first answer wins (a repeat says Duplicate).
    }
    let state =
        if result.status == CommandStatus::Expired { CommandState::Expired } else { CommandState::Done };
    tx.execute(
        "UPDATE commands SET state = ?3, result = ?4, completed_at_ms = ?5 WHERE id = ?1 AND device_id = ?2",
        params![result.id, id.as_str(), state.as_str(), enum_text(&result.status)?, now],
    )?;
    get_command(tx, now, id, result.id)?.ok_or_else(not_found)
}

fn list(
    conn: &Connection,
    now: UnixMillis,
    id: &DeviceId,
    page: &PageRequest,
) -> Result<Page<CommandRecord>, StoreError> {
    let limit = page.checked_limit()?;
    let mut sql = Query::new(COMMAND_SELECT);
    sql.and("device_id = ?", [text(id.as_str())]);
    if let Some(cursor) = &page.cursor {
        let [before] = cursor.decode("cmd", 1)?[..] else {
            return Err(StoreError::InvalidCursor);
        };
        let before: u32 = before.parse().map_err(|_| StoreError::InvalidCursor)?;
        sql.and("id < ?", [int(before)]);
    }
    let rows =
        sql.run(conn, "ORDER BY id DESC LIMIT ?", [int(limit + 1)], |row| command_from_row(row, now))?;
    Ok(Page::from_rows(rows, limit, |c| Cursor::encode("cmd", &[&c.id.to_string()])))
}

/// A command as of `now`: an open one past its expiry reads as expired.
fn command_from_row(row: &Row<'_>, now: UnixMillis) -> Result<CommandRecord, StoreError> {
    let stored = CommandState::parse(&row.get::<_, String>("state")?)?;
    let expires_at_ms: i64 = row.get("expires_at_ms")?;
    let state = if stored.is_open() && now >= expires_at_ms { CommandState::Expired } else { stored };
    let result = row
        .get::<_, Option<String>>("result")?
        .map(|r| enum_from_text::<CommandStatus>(&r, "command status"))
        .transpose()?;
    Ok(CommandRecord {
        id: row.get("id")?,
        device_id: device_id(&row.get::<_, String>("device_id")?)?,
        kind: from_json(&row.get::<_, String>("kind")?, "command kind")?,
        ttl_s: row.get("ttl_s")?,
        created_at_ms: row.get("created_at_ms")?,
        expires_at_ms,
        state,
        delivered_at_ms: row.get("delivered_at_ms")?,
        deliveries: row.get("deliveries")?,
        result,
        completed_at_ms: row.get("completed_at_ms")?,
    })
}

impl ControlStore for SqliteStore {
    fn set_desired_config(&self, id: DeviceId, config: TrapConfig) -> StoreFuture<'_, DesiredConfig> {
        Box::pin(self.write(move |tx, now| set_desired(tx, now, &id, config)))
    }

    fn record_reported_config(
        &self,
        id: DeviceId,
        report: ReportedConfig,
        received_at_ms: UnixMillis,
    ) -> StoreFuture<'_, ()> {
        Box::pin(self.write(move |tx, _| record_reported(tx, &id, &report, received_at_ms)))
    }

    fn enqueue_command(&self, id: DeviceId, kind: CommandKind, ttl_s: u32) -> StoreFuture<'_, CommandRecord> {
        Box::pin(self.write(move |tx, now| enqueue(tx, now, &id, kind, ttl_s)))
    }

    fn commands_to_deliver(&self, id: DeviceId) -> StoreFuture<'_, Vec<CommandRecord>> {
        Box::pin(self.read(move |conn, now| to_deliver(conn, now, &id)))
    }

    fn mark_command_delivered(&self, id: DeviceId, command_id: u32) -> StoreFuture<'_, ()> {
        Box::pin(self.write(move |tx, now| mark_delivered(tx, now, &id, command_id)))
    }

    fn record_command_result(&self, id: DeviceId, result: CommandResult) -> StoreFuture<'_, CommandRecord> {
        Box::pin(self.write(move |tx, now| record_result(tx, now, &id, result)))
    }

    fn list_commands(&self, id: DeviceId, page: PageRequest) -> StoreFuture<'_, Page<CommandRecord>> {
        Box::pin(self.read(move |conn, now| list(conn, now, &id, &page)))
    }
}
