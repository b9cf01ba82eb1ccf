//! Draining the transactional outbox.

use rusqlite::{Connection, Row, params};

use super::SqliteStore;
use super::codec::{collect, device_id};
use crate::store::{
    BATCH_ITEMS_MAX, OutboxEntry, OutboxStore, PageRequest, StoreError, StoreFuture, UnixMillis,
};

fn pending(conn: &Connection, destination: &str, limit: u32) -> Result<Vec<OutboxEntry>, StoreError> {
    let limit = PageRequest::first(limit).checked_limit()?;
    let mut stmt = conn.prepare_cached(
        "SELECT id, destination, device_id, seq, payload, created_at_ms FROM outbox
         WHERE destination = ?1 AND delivered_at_ms IS NULL ORDER BY id LIMIT ?2",
    )?;
    collect(&mut stmt, params![destination, limit], entry_from_row)
}

fn entry_from_row(row: &Row<'_>) -> Result<OutboxEntry, StoreError> {
    Ok(OutboxEntry {
        id: row.get(0)?,
        destination: row.get(1)?,
        device_id: device_id(&row.get::<_, String>(2)?)?,
        seq: row.get(3)?,
        payload: row.get(4)?,
        created_at_ms: row.get(5)?,
    })
}

fn mark_delivered(tx: &Connection, now: UnixMillis, ids: &[i64]) -> Result<u64, StoreError> {
    if ids.len() > BATCH_ITEMS_MAX {
        return Err(StoreError::BatchTooLarge { items: ids.len(), max: BATCH_ITEMS_MAX });
    }
    let mut update = tx
        .prepare_cached("UPDATE outbox SET delivered_at_ms = ?2 WHERE id = ?1 AND delivered_at_ms IS NULL")?;
    let mut marked = 0u64;
    for id in ids {
        marked += update.execute(params![id, now])? as u64;
    }
    Ok(marked)
}

impl OutboxStore for SqliteStore {
    fn outbox_pending(&self, destination: String, limit: u32) -> StoreFuture<'_, Vec<OutboxEntry>> {
        Box::pin(self.read(move |conn, _| pending(conn, &destination, limit)))
    }

    fn outbox_mark_delivered(&self, ids: Vec<i64>) -> StoreFuture<'_, u64> {
        Box::pin(self.write(move |tx, now| mark_delivered(tx, now, &ids)))
    }
}
