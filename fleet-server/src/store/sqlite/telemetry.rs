//! Detection and health queries, keyset-paginated.

use rusqlite::{Connection, Row};
use wildcam_sdk::protocol::{BoundingBox, Detection, Health};

use super::SqliteStore;
use super::codec::{Query, device_id, enum_from_text, from_json, int, text};
use crate::store::{
    Cursor, DetectionQuery, HealthQuery, Page, StoreError, StoreFuture, StoredDetection, StoredHealth,
    TelemetryStore,
};

const DETECTION_SELECT: &str = "SELECT d.device_id, d.seq, d.captured_at_s, d.trigger, d.burst_index,
    d.burst_len, d.classes, d.bbox_x, d.bbox_y, d.bbox_width, d.bbox_height, d.image_len, d.image_digest,
    d.battery_mv, d.received_at_ms FROM detections d";
const HEALTH_SELECT: &str = "SELECT * FROM health_reports h";

/// `>` or `<` for the keyset condition, and the sort direction.
fn direction(newest_first: bool) -> (&'static str, &'static str) {
    if newest_first { ("<", "DESC") } else { (">", "ASC") }
}

fn parse_number<T: std::str::FromStr>(text: &str) -> Result<T, StoreError> {
    text.parse().map_err(|_| StoreError::InvalidCursor)
}

fn query_detections(conn: &Connection, query: &DetectionQuery) -> Result<Page<StoredDetection>, StoreError> {
    let limit = query.page.checked_limit()?;
    let mut sql = Query::new(DETECTION_SELECT);
    if let Some(id) = &query.device_id {
        sql.and("d.device_id = ?", [text(id.as_str())]);
    }
    if let Some(from) = query.captured_from_s {
        sql.and("d.captured_at_s >= ?", [int(from)]);
    }
    if let Some(until) = query.captured_until_s {
        sql.and("d.captured_at_s < ?", [int(until)]);
    }
    add_class_filter(&mut sql, query);
    let (compare, order) = direction(query.newest_first);
    if let Some(cursor) = &query.page.cursor {
        let [captured, seq, device] = cursor.decode("det", 3)?[..] else {
            return Err(StoreError::InvalidCursor);
        };
        let (captured, seq) = (parse_number::<u32>(captured)?, parse_number::<u32>(seq)?);
        let condition = format!("(d.captured_at_s, d.device_id, d.seq) {compare} (?, ?, ?)");
        sql.and(&condition, [int(captured), text(device), int(seq)]);
    }
    let tail = format!("ORDER BY d.captured_at_s {order}, d.device_id {order}, d.seq {order} LIMIT ?");
    let rows = sql.run(conn, &tail, [int(limit + 1)], detection_from_row)?;
    Ok(Page::from_rows(rows, limit, |d| {
        let (captured, seq) = (d.detection.captured_at.to_string(), d.detection.seq.to_string());
        Cursor::encode("det", &[&captured, &seq, d.device_id.as_str()])
    }))
}

/// "Has a classifier result of `label` (if given) with at least
/// `min_confidence_pct` (if given)".
///
/// With a label, the label-clustered `detection_classes` is searched (the
/// time window repeated so only that window of the label's rows is read).
/// Without one, no index narrows the search, so each candidate row's own
/// `classes` is tested while walking the time index: the scan stops as soon
/// as the page is full.
fn add_class_filter(sql: &mut Query, query: &DetectionQuery) {
    let confidence = query.min_confidence_pct.map(i64::from);
    let Some(label) = query.label else {
        if let Some(confidence) = confidence {
            let exists =
                "EXISTS (SELECT 1 FROM json_each(d.classes) j WHERE j.value ->> 'confidence_pct' >= ?)";
            sql.and(exists, [int(confidence)]);
        }
        return;
    };
    let mut conditions = vec!["c.label = ?"];
    let mut params = vec![int(label)];
    let optional = [
        ("c.confidence_pct >= ?", confidence),
        ("c.captured_at_s >= ?", query.captured_from_s.map(i64::from)),
        ("c.captured_at_s < ?", query.captured_until_s.map(i64::from)),
    ];
    for (condition, value) in optional {
        if let Some(value) = value {
            conditions.push(condition);
            params.push(int(value));
        }
    }
    let filter = format!(
        "(d.device_id, d.seq) IN (SELECT c.device_id, c.seq FROM detection_classes c WHERE {})",
        conditions.join(" AND ")
    );
    sql.and(&filter, params);
}

fn detection_from_row(row: &Row<'_>) -> Result<StoredDetection, StoreError> {
    let bbox = match row.get::<_, Option<u16>>("bbox_x")? {
        None => None,
        Some(x) => Some(BoundingBox {
            x,
            y: row.get("bbox_y")?,
            width: row.get("bbox_width")?,
            height: row.get("bbox_height")?,
        }),
    };
    let detection = Detection {
        seq: row.get("seq")?,
        captured_at: row.get("captured_at_s")?,
        trigger: enum_from_text(&row.get::<_, String>("trigger")?, "trigger")?,
        burst_index: row.get("burst_index")?,
        burst_len: row.get("burst_len")?,
        classes: from_json(&row.get::<_, String>("classes")?, "classes")?,
        bbox,
        image_len: row.get("image_len")?,
        image_digest: row.get("image_digest")?,
        battery_mv: row.get("battery_mv")?,
    };
    Ok(StoredDetection {
        device_id: device_id(&row.get::<_, String>("device_id")?)?,
        received_at_ms: row.get("received_at_ms")?,
        detection,
    })
}

fn health_history(conn: &Connection, query: &HealthQuery) -> Result<Page<StoredHealth>, StoreError> {
    let limit = query.page.checked_limit()?;
    let mut sql = Query::new(HEALTH_SELECT);
    sql.and("h.device_id = ?", [text(query.device_id.as_str())]);
    if let Some(from) = query.taken_from_s {
        sql.and("h.taken_at_s >= ?", [int(from)]);
    }
    if let Some(until) = query.taken_until_s {
        sql.and("h.taken_at_s < ?", [int(until)]);
    }
    let (compare, order) = direction(query.newest_first);
    if let Some(cursor) = &query.page.cursor {
        let [taken, id] = cursor.decode("health", 2)?[..] else {
            return Err(StoreError::InvalidCursor);
        };
        let (taken, id) = (parse_number::<u32>(taken)?, parse_number::<i64>(id)?);
        sql.and(&format!("(h.taken_at_s, h.id) {compare} (?, ?)"), [int(taken), int(id)]);
    }
    let tail = format!("ORDER BY h.taken_at_s {order}, h.id {order} LIMIT ?");
    let rows = sql.run(conn, &tail, [int(limit + 1)], health_from_row)?;
    Ok(Page::from_rows(rows, limit, |h| {
        Cursor::encode("health", &[&h.health.taken_at.to_string(), &h.id.to_string()])
    }))
}

fn health_from_row(row: &Row<'_>) -> Result<StoredHealth, StoreError> {
    let health = Health {
        taken_at: row.get("taken_at_s")?,
        battery_mv: row.get("battery_mv")?,
        battery_soc_pct: row.get("battery_soc_pct")?,
        charge_state: enum_from_text(&row.get::<_, String>("charge_state")?, "charge state")?,
        solar_mw: row.get("solar_mw")?,
        temperature_decicelsius: row.get("temperature_decicelsius")?,
        storage_free_kib: row.get("storage_free_kib")?,
        storage_errors: row.get("storage_errors")?,
        rssi_dbm: row.get("rssi_dbm")?,
        uptime_s: row.get("uptime_s")?,
        reset_reason: enum_from_text(&row.get::<_, String>("reset_reason")?, "reset reason")?,
        triggers_since_last: row.get("triggers_since_last")?,
        queue_depth: row.get("queue_depth")?,
        queue_dropped_total: row.get("queue_dropped_total")?,
    };
    Ok(StoredHealth {
        id: row.get("id")?,
        device_id: device_id(&row.get::<_, String>("device_id")?)?,
        received_at_ms: row.get("received_at_ms")?,
        health,
    })
}

impl TelemetryStore for SqliteStore {
    fn query_detections(&self, query: DetectionQuery) -> StoreFuture<'_, Page<StoredDetection>> {
        Box::pin(self.read(move |conn, _| query_detections(conn, &query)))
    }

    fn health_history(&self, query: HealthQuery) -> StoreFuture<'_, Page<StoredHealth>> {
        Box::pin(self.read(move |conn, _| health_history(conn, &query)))
    }
}
