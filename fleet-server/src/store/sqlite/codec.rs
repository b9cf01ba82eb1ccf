//! Conversions between stored values and the interface's types, and a small
//! builder for queries with optional filters.

use rusqlite::types::Value;
use rusqlite::{Connection, Params, Row, Statement};
use serde::Serialize;
use serde::de::DeserializeOwned;
use wildcam_sdk::DeviceId;

use crate::store::StoreError;

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> Self {
        StoreError::database(error)
    }
}

/// JSON text of `value`.
pub(super) fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::invalid(format!("cannot encode as JSON: {e}")))
}

/// Decodes stored JSON, naming `what` on failure.
pub(super) fn from_json<T: DeserializeOwned>(text: &str, what: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::corrupt(format!("{what}: {e}")))
}

/// Decodes optional stored JSON.
pub(super) fn from_json_opt<T: DeserializeOwned>(
    text: Option<String>,
    what: &str,
) -> Result<Option<T>, StoreError> {
    text.map(|t| from_json(&t, what)).transpose()
}

/// The variant name of a unit-variant enum (`Chip::Esp32c3` → `Esp32c3`),
/// as serde names it: stable across SDK versions that keep variant names.
pub(super) fn enum_text<T: Serialize>(value: &T) -> Result<String, StoreError> {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => Ok(name),
        _ => Err(StoreError::invalid("value is not a unit enum variant")),
    }
}

/// Parses a name written by [`enum_text`].
pub(super) fn enum_from_text<T: DeserializeOwned>(text: &str, what: &str) -> Result<T, StoreError> {
    serde_json::from_value(serde_json::Value::String(text.to_owned()))
        .map_err(|_| StoreError::corrupt(format!("unknown {what} {text:?}")))
}

/// A stored device id.
pub(super) fn device_id(text: &str) -> Result<DeviceId, StoreError> {
    DeviceId::new(text).map_err(|e| StoreError::corrupt(format!("device id {text:?}: {e}")))
}

/// The u64 replay bitmap as SQLite's i64, bit for bit.
pub(super) fn bitmap_to_sql(bitmap: u64) -> i64 {
    i64::from_le_bytes(bitmap.to_le_bytes())
}

/// The inverse of [`bitmap_to_sql`].
pub(super) fn bitmap_from_sql(stored: i64) -> u64 {
    u64::from_le_bytes(stored.to_le_bytes())
}

/// A text or integer parameter, for dynamically built queries.
pub(super) fn text(value: impl Into<String>) -> Value {
    Value::Text(value.into())
}

/// An integer parameter.
pub(super) fn int(value: impl Into<i64>) -> Value {
    Value::Integer(value.into())
}

/// Runs `stmt` and converts every row with `convert`.
pub(super) fn collect<T>(
    stmt: &mut Statement<'_>,
    params: impl Params,
    convert: impl Fn(&Row<'_>) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut rows = stmt.query(params)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(convert(row)?);
    }
    Ok(out)
}

/// Runs `sql` and converts the first row, if any.
pub(super) fn first<T>(
    conn: &Connection,
    sql: &str,
    params: impl Params,
    convert: impl Fn(&Row<'_>) -> Result<T, StoreError>,
) -> Result<Option<T>, StoreError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.query(params)?;
    rows.next()?.map(convert).transpose()
}

/// A `SELECT` with optional `AND` conditions and positional parameters.
#[derive(Debug)]
pub(super) struct Query {
    sql: String,
    params: Vec<Value>,
}

impl Query {
    /// Starts from `select`, which must end before any `WHERE`.
    pub(super) fn new(select: &str) -> Self {
        Self { sql: format!("{select} WHERE 1 = 1"), params: Vec::new() }
    }

    /// Adds `AND {condition}` with its parameters (one per `?`).
    pub(super) fn and(&mut self, condition: &str, params: impl IntoIterator<Item = Value>) -> &mut Self {
        self.sql.push_str(" AND ");
        self.sql.push_str(condition);
        self.params.extend(params);
        self
    }

    /// Appends `ORDER BY`/`LIMIT` text and its parameters, then runs.
    pub(super) fn run<T>(
        mut self,
        conn: &Connection,
        tail: &str,
        params: impl IntoIterator<Item = Value>,
        convert: impl Fn(&Row<'_>) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        self.sql.push(' ');
        self.sql.push_str(tail);
        self.params.extend(params);
        let mut stmt = conn.prepare_cached(&self.sql)?;
        collect(&mut stmt, rusqlite::params_from_iter(self.params), convert)
    }
}

#[cfg(test)]
mod tests {
    use wildcam_sdk::protocol::{Chip, CommandStatus};

    use super::*;

    #[test]
    fn enums_round_trip_through_their_names() {
        assert_eq!(enum_text(&Chip::Esp32c6).unwrap(), "Esp32c6");
        assert_eq!(enum_from_text::<Chip>("Esp32c6", "chip").unwrap(), Chip::Esp32c6);
        assert_eq!(enum_text(&CommandStatus::Duplicate).unwrap(), "Duplicate");
        assert!(matches!(enum_from_text::<Chip>("Z80", "chip"), Err(StoreError::Corrupt(_))));
    }

    #[test]
    fn bitmap_keeps_every_bit() {
        for bitmap in [0, 1, u64::MAX, 1 << 63, 0x8000_0000_0000_0001] {
            assert_eq!(bitmap_from_sql(bitmap_to_sql(bitmap)), bitmap);
        }
    }
}
