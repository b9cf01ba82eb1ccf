//! Connection settings and versioned migrations.
//!
//! `schema_version` holds one row: how many entries of [`MIGRATIONS`] were
//! applied. Each migration runs in its own transaction together with the
//! version bump. A database whose version is above [`SCHEMA_VERSION`] was
//! written by newer code and is refused, untouched.
//!
//! Migrations are append-only: never edit one that shipped, add the next.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior};

use crate::store::StoreError;

/// Version 1: devices, claims, telemetry, outbox, commands, API tokens.
///
/// Times: `*_ms` columns are Unix milliseconds (server clock), `*_s` columns
/// Unix seconds as reported by the trap.
const V1: &str = r#"
CREATE TABLE claim_tokens (
    id              TEXT PRIMARY KEY NOT NULL,
    secret_digest   BLOB NOT NULL CHECK (length(secret_digest) = 32),
    label           TEXT NOT NULL,
    uses_max        INTEGER NOT NULL CHECK (uses_max >= 1),
    uses            INTEGER NOT NULL DEFAULT 0 CHECK (uses >= 0 AND uses <= uses_max),
    expires_at_ms   INTEGER NOT NULL,
    created_at_ms   INTEGER NOT NULL,
    revoked_at_ms   INTEGER
) STRICT;

CREATE TABLE factory_allowlist (
    identity_key    BLOB PRIMARY KEY NOT NULL CHECK (length(identity_key) = 32),
    note            TEXT NOT NULL,
    created_at_ms   INTEGER NOT NULL
) STRICT, WITHOUT ROWID;

CREATE TABLE devices (
    id                      TEXT PRIMARY KEY NOT NULL,
    identity_key            BLOB NOT NULL UNIQUE CHECK (length(identity_key) = 32),
    mqtt_password_hash      BLOB NOT NULL CHECK (length(mqtt_password_hash) = 32),
    session_key             BLOB NOT NULL CHECK (length(session_key) = 32),
    status                  TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked')),
    revoked_at_ms           INTEGER,
    claim_id                TEXT REFERENCES claim_tokens (id),
    created_at_ms           INTEGER NOT NULL,
    last_seen_at_ms         INTEGER,
    -- from the last hello
    hardware_model          TEXT,
    chip                    TEXT,
    fw_major                INTEGER,
    fw_minor                INTEGER,
    fw_patch                INTEGER,
    secure_version          INTEGER,
    reset_reason            TEXT,
    capabilities            INTEGER,
    config_version          INTEGER,
    hello_at_ms             INTEGER,
    queue_floor             INTEGER NOT NULL DEFAULT 0,
    queue_next              INTEGER NOT NULL DEFAULT 0,
    -- JSON of the most recent Health by taken_at_s
    last_health             TEXT,
    last_health_taken_at_s  INTEGER,
    -- deployment
    site                    TEXT,
    latitude                REAL,
    longitude               REAL,
    camera_height_m         REAL,
    deployed_from_ms        INTEGER,
    deployed_until_ms       INTEGER,
    -- configuration: desired (JSON of TrapConfig) and reported (JSON of ReportedConfig)
    desired_version         INTEGER NOT NULL DEFAULT 0,
    desired_config          TEXT,
    desired_set_at_ms       INTEGER,
    reported_config         TEXT,
    reported_version        INTEGER,
    reported_status         TEXT,
    reported_at_ms          INTEGER,
    -- ingest state
    acked_through           INTEGER NOT NULL DEFAULT 0,
    uplink_highest          INTEGER NOT NULL DEFAULT 0,
    uplink_bitmap           INTEGER NOT NULL DEFAULT 0,  -- u64 bits stored as i64
    downlink_reservation    INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE INDEX devices_by_site ON devices (site) WHERE site IS NOT NULL;
CREATE INDEX devices_by_last_seen ON devices (last_seen_at_ms);

CREATE TABLE device_groups (
    device_id   TEXT NOT NULL REFERENCES devices (id),
    name        TEXT NOT NULL,
    PRIMARY KEY (device_id, name)
) STRICT, WITHOUT ROWID;
CREATE INDEX device_groups_by_name ON device_groups (name, device_id);

CREATE TABLE device_tags (
    device_id   TEXT NOT NULL REFERENCES devices (id),
    tag         TEXT NOT NULL,
    PRIMARY KEY (device_id, tag)
) STRICT, WITHOUT ROWID;
CREATE INDEX device_tags_by_tag ON device_tags (tag, device_id);

CREATE TABLE detections (
    device_id       TEXT NOT NULL REFERENCES devices (id),
    seq             INTEGER NOT NULL CHECK (seq >= 1),
    captured_at_s   INTEGER NOT NULL,
    trigger         TEXT NOT NULL,
    burst_index     INTEGER NOT NULL,
    burst_len       INTEGER NOT NULL,
    classes         TEXT NOT NULL,  -- JSON, best first; searchable copy in detection_classes
    bbox_x          INTEGER,
    bbox_y          INTEGER,
    bbox_width      INTEGER,
    bbox_height     INTEGER,
    image_len       INTEGER NOT NULL,
    image_digest    BLOB NOT NULL CHECK (length(image_digest) = 8),
    battery_mv      INTEGER NOT NULL,
    received_at_ms  INTEGER NOT NULL,
    PRIMARY KEY (device_id, seq)
) STRICT, WITHOUT ROWID;
CREATE INDEX detections_by_time ON detections (captured_at_s, device_id, seq);
CREATE INDEX detections_by_device_time ON detections (device_id, captured_at_s, seq);

-- The searchable copy of detections.classes, clustered by label then capture
-- time: "label X (with confidence >= Y, in a time window)" is one range scan,
-- and since capture times follow arrival, a batch appends to one place per
-- label whatever the mix of devices.
CREATE TABLE detection_classes (
    label           INTEGER NOT NULL,
    captured_at_s   INTEGER NOT NULL,
    device_id       TEXT NOT NULL,
    seq             INTEGER NOT NULL,
    rank            INTEGER NOT NULL,
    confidence_pct  INTEGER NOT NULL CHECK (confidence_pct BETWEEN 0 AND 100),
    PRIMARY KEY (label, captured_at_s, device_id, seq, rank),
    FOREIGN KEY (device_id, seq) REFERENCES detections (device_id, seq)
) STRICT, WITHOUT ROWID;

CREATE TABLE health_reports (
    id                      INTEGER PRIMARY KEY,
    device_id               TEXT NOT NULL REFERENCES devices (id),
    taken_at_s              INTEGER NOT NULL,
    battery_mv              INTEGER NOT NULL,
    battery_soc_pct         INTEGER NOT NULL,
    charge_state            TEXT NOT NULL,
    solar_mw                INTEGER NOT NULL,
    temperature_decicelsius INTEGER NOT NULL,
    storage_free_kib        INTEGER NOT NULL,
    storage_errors          INTEGER NOT NULL,
    rssi_dbm                INTEGER NOT NULL,
    uptime_s                INTEGER NOT NULL,
    reset_reason            TEXT NOT NULL,
    triggers_since_last     INTEGER NOT NULL,
    queue_depth             INTEGER NOT NULL,
    queue_dropped_total     INTEGER NOT NULL,
    received_at_ms          INTEGER NOT NULL
) STRICT;
CREATE INDEX health_by_device_time ON health_reports (device_id, taken_at_s, id);

-- Transactional outbox: one row per stored detection and destination.
CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    destination     TEXT NOT NULL,
    device_id       TEXT NOT NULL,
    seq             INTEGER NOT NULL,
    payload         TEXT NOT NULL,
    created_at_ms   INTEGER NOT NULL,
    delivered_at_ms INTEGER
) STRICT;
CREATE INDEX outbox_undelivered ON outbox (destination, id) WHERE delivered_at_ms IS NULL;

CREATE TABLE commands (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id       TEXT NOT NULL REFERENCES devices (id),
    kind            TEXT NOT NULL,  -- JSON of CommandKind
    ttl_s           INTEGER NOT NULL,
    created_at_ms   INTEGER NOT NULL,
    expires_at_ms   INTEGER NOT NULL,
    state           TEXT NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'delivered', 'done', 'expired')),
    delivered_at_ms INTEGER,
    deliveries      INTEGER NOT NULL DEFAULT 0,
    result          TEXT,           -- CommandStatus variant name
    completed_at_ms INTEGER
) STRICT;
CREATE INDEX commands_by_device ON commands (device_id, id);

CREATE TABLE api_tokens (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    token_hash      BLOB NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    role            TEXT NOT NULL CHECK (role IN ('admin', 'read_only')),
    label           TEXT NOT NULL,
    created_at_ms   INTEGER NOT NULL,
    revoked_at_ms   INTEGER
) STRICT;
"#;

/// Version 2: the state ingest rewrites on every batch (contiguous ack,
/// replay window, last seen) moves from the wide `devices` row (hello fields,
/// last health JSON, configuration JSON) to a narrow table of its own, so a
/// batch touching many devices rewrites ~50 bytes per device instead of the
/// whole registry row and its last-seen index.
const V2: &str = r#"
CREATE TABLE device_ingest (
    device_id       TEXT PRIMARY KEY NOT NULL REFERENCES devices (id),
    acked_through   INTEGER NOT NULL DEFAULT 0,
    uplink_highest  INTEGER NOT NULL DEFAULT 0,
    uplink_bitmap   INTEGER NOT NULL DEFAULT 0,  -- u64 bits stored as i64
    last_seen_at_ms INTEGER
) STRICT, WITHOUT ROWID;
INSERT INTO device_ingest (device_id, acked_through, uplink_highest, uplink_bitmap, last_seen_at_ms)
    SELECT id, acked_through, uplink_highest, uplink_bitmap, last_seen_at_ms FROM devices;
DROP INDEX devices_by_last_seen;
ALTER TABLE devices DROP COLUMN last_seen_at_ms;
ALTER TABLE devices DROP COLUMN acked_through;
ALTER TABLE devices DROP COLUMN uplink_highest;
ALTER TABLE devices DROP COLUMN uplink_bitmap;
"#;

/// Version 3: OTA. Uploaded firmware (the image is a file in the data
/// directory named by its SHA-256; the row holds the signed manifest),
/// rollouts, and one row per rollout and target device.
const V3: &str = r#"
CREATE TABLE firmware (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    sha256          BLOB NOT NULL UNIQUE CHECK (length(sha256) = 32),
    size            INTEGER NOT NULL CHECK (size >= 1),
    chip            TEXT NOT NULL,
    fw_major        INTEGER NOT NULL,
    fw_minor        INTEGER NOT NULL,
    fw_patch        INTEGER NOT NULL,
    secure_version  INTEGER NOT NULL,
    min_battery_mv  INTEGER NOT NULL,
    manifest        BLOB NOT NULL,  -- postcard SignedManifest, as offered
    signing_key     BLOB NOT NULL CHECK (length(signing_key) = 32),
    created_at_ms   INTEGER NOT NULL
) STRICT;

CREATE TABLE rollouts (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    firmware_id         INTEGER NOT NULL REFERENCES firmware (id),
    state               TEXT NOT NULL DEFAULT 'active'
                        CHECK (state IN ('active', 'paused', 'aborted', 'completed')),
    pause_reason        TEXT,
    max_in_flight       INTEGER NOT NULL CHECK (max_in_flight >= 1),
    failure_threshold   INTEGER NOT NULL CHECK (failure_threshold >= 1),
    created_at_ms       INTEGER NOT NULL,
    updated_at_ms       INTEGER NOT NULL
) STRICT;

CREATE TABLE rollout_devices (
    rollout_id      INTEGER NOT NULL REFERENCES rollouts (id),
    device_id       TEXT NOT NULL REFERENCES devices (id),
    state           TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'offered', 'downloading',
                        'verifying', 'ready', 'pending_confirmation', 'confirmed', 'failed', 'rolled_back',
                        'superseded', 'aborted')),
    offset          INTEGER NOT NULL DEFAULT 0,
    outcome         TEXT,           -- OtaOutcome variant name, as the device reported it
    offers          INTEGER NOT NULL DEFAULT 0,
    updated_at_ms   INTEGER NOT NULL,
    PRIMARY KEY (rollout_id, device_id)
) STRICT, WITHOUT ROWID;
CREATE INDEX rollout_devices_by_device ON rollout_devices (device_id, rollout_id);
CREATE INDEX rollout_devices_by_state ON rollout_devices (rollout_id, state);
"#;

/// Every migration, in order; entry `i` brings the schema to version `i + 1`.
const MIGRATIONS: &[&str] = &[V1, V2, V3];

/// The schema version this code writes.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Prepared statements cached per connection.
const STATEMENT_CACHE: usize = 64;
/// Page cache of the writer, KiB: holds the hot index pages of a busy fleet.
const WRITER_CACHE_KIB: i64 = 64 * 1024;
/// Page cache of each reader, KiB.
const READER_CACHE_KIB: i64 = 16 * 1024;
/// WAL size, in pages, that triggers an automatic checkpoint (32 MiB).
const WAL_AUTOCHECKPOINT_PAGES: i64 = 8 * 1024;

/// Opens the writing connection: WAL, `synchronous=FULL`, foreign keys, busy
/// timeout, then migrates.
pub(super) fn open_writer(path: &Path, busy: Duration) -> Result<Connection, StoreError> {
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(busy)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    // Refuse a newer schema before changing anything in the file.
    check_not_newer(&conn)?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    expect_setting("journal_mode", &mode.to_ascii_lowercase(), "wal")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    let synchronous: i64 = conn.pragma_query_value(None, "synchronous", |row| row.get(0))?;
    expect_setting("synchronous", &synchronous.to_string(), "2")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    let foreign_keys: i64 = conn.pragma_query_value(None, "foreign_keys", |row| row.get(0))?;
    expect_setting("foreign_keys", &foreign_keys.to_string(), "1")?;
    conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)?;
    // A larger WAL lets a checkpoint write each hot page once for many
    // commits instead of once per commit.
    conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)?;
    migrate(&mut conn)?;
    Ok(conn)
}

/// Opens a reading connection (the database must exist and be migrated).
pub(super) fn open_reader(path: &Path, busy: Duration) -> Result<Connection, StoreError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(busy)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    conn.pragma_update(None, "query_only", "ON")?;
    conn.pragma_update(None, "cache_size", -READER_CACHE_KIB)?;
    Ok(conn)
}

/// Copies the WAL into the database and truncates it (at close).
pub(super) fn checkpoint(conn: &mut Connection) -> Result<(), StoreError> {
    let busy: i64 = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| row.get(0))?;
    if busy != 0 {
        tracing::warn!("WAL checkpoint at close was partial: a reader was still active");
    }
    Ok(())
}

fn expect_setting(setting: &'static str, found: &str, expected: &'static str) -> Result<(), StoreError> {
    if found == expected {
        Ok(())
    } else {
        Err(StoreError::Setting { setting, found: found.to_owned(), expected })
    }
}

/// The applied version: 0 for a new database.
fn applied_version(conn: &Connection) -> Result<u32, StoreError> {
    let has_table: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'schema_version')",
        [],
        |row| row.get(0),
    )?;
    if !has_table {
        return Ok(0);
    }
    let version: Option<u32> = conn
        .query_row("SELECT version FROM schema_version WHERE id = 1", [], |row| row.get(0))
        .optional()?;
    Ok(version.unwrap_or(0))
}

fn check_not_newer(conn: &Connection) -> Result<(), StoreError> {
    let found = applied_version(conn)?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew { found, supported: SCHEMA_VERSION });
    }
    Ok(())
}

/// Applies the missing migrations, each in its own immediate transaction
/// (the version is re-read inside it, so concurrent openers cannot both
/// apply one).
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    loop {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_version (
                 id INTEGER PRIMARY KEY CHECK (id = 1),
                 version INTEGER NOT NULL
             ) STRICT",
        )?;
        check_not_newer(&tx)?;
        let applied = applied_version(&tx)?;
        let Some(migration) = MIGRATIONS.get(applied as usize) else {
            tx.commit()?;
            return Ok(());
        };
        tx.execute_batch(migration)?;
        let version = applied + 1;
        tx.execute(
            "INSERT INTO schema_version (id, version) VALUES (1, ?1)
             ON CONFLICT (id) DO UPDATE SET version = excluded.version",
            [version],
        )?;
        tx.commit()?;
        tracing::info!(version, "database schema migrated");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrates_a_new_database_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let conn = open_writer(&path, Duration::from_secs(1)).unwrap();
        assert_eq!(applied_version(&conn).unwrap(), SCHEMA_VERSION);
        drop(conn);
        let conn = open_writer(&path, Duration::from_secs(1)).unwrap();
        assert_eq!(applied_version(&conn).unwrap(), SCHEMA_VERSION);
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn version_2_keeps_the_ingest_state_of_a_version_1_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut conn = Connection::open(&path).unwrap();
        conn.execute_batch(V1).unwrap();
        conn.execute_batch(
            "CREATE TABLE schema_version (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL) STRICT;
             INSERT INTO schema_version VALUES (1, 1);
             INSERT INTO devices (id, identity_key, mqtt_password_hash, session_key, created_at_ms,
                                  last_seen_at_ms, acked_through, uplink_highest, uplink_bitmap)
             VALUES ('wc-1', zeroblob(32), zeroblob(32), zeroblob(32), 5, 1234, 17, 20, -1);",
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        assert_eq!(applied_version(&conn).unwrap(), SCHEMA_VERSION);
        let row: (u32, u32, i64, Option<i64>) = conn
            .query_row(
                "SELECT acked_through, uplink_highest, uplink_bitmap, last_seen_at_ms
                 FROM device_ingest WHERE device_id = 'wc-1'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap();
        assert_eq!(row, (17, 20, -1, Some(1234)));
        let moved = conn.prepare("SELECT acked_through FROM devices").is_err();
        assert!(moved, "the column left the devices table");
    }

    #[test]
    fn version_3_adds_ota_to_a_version_2_database_and_keeps_its_devices() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut conn = Connection::open(&path).unwrap();
        conn.execute_batch(V1).unwrap();
        conn.execute_batch(V2).unwrap();
        conn.execute_batch(
            "CREATE TABLE schema_version (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL) STRICT;
             INSERT INTO schema_version VALUES (1, 2);
             INSERT INTO devices (id, identity_key, mqtt_password_hash, session_key, created_at_ms, fw_major)
             VALUES ('wc-1', zeroblob(32), zeroblob(32), zeroblob(32), 5, 3);
             INSERT INTO device_ingest (device_id, acked_through) VALUES ('wc-1', 9);",
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        assert_eq!(applied_version(&conn).unwrap(), 3);
        let kept: (u32, u32) = conn
            .query_row(
                "SELECT d.fw_major, i.acked_through FROM devices d JOIN device_ingest i ON i.device_id = d.id",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(kept, (3, 9));
        conn.execute_batch(
            "INSERT INTO firmware (sha256, size, chip, fw_major, fw_minor, fw_patch, secure_version,
                                   min_battery_mv, manifest, signing_key, created_at_ms)
             VALUES (zeroblob(32), 10, 'Host', 1, 0, 0, 1, 0, x'00', zeroblob(32), 1);
             INSERT INTO rollouts (firmware_id, max_in_flight, failure_threshold, created_at_ms, updated_at_ms)
             VALUES (1, 2, 3, 1, 1);
             INSERT INTO rollout_devices (rollout_id, device_id, updated_at_ms) VALUES (1, 'wc-1', 1);",
        )
        .unwrap();
        // Foreign keys hold: a target must be a registered device.
        conn.pragma_update(None, "foreign_keys", "ON").unwrap();
        let orphan = conn.execute(
            "INSERT INTO rollout_devices (rollout_id, device_id, updated_at_ms) VALUES (1, 'nobody', 1)",
            [],
        );
        assert!(orphan.is_err());
    }

    #[test]
    fn refuses_a_newer_schema_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        drop(open_writer(&path, Duration::from_secs(1)).unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.execute("UPDATE schema_version SET version = ?1", [SCHEMA_VERSION + 1])
            .unwrap();
        drop(conn);
        let error = open_writer(&path, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(error, StoreError::SchemaTooNew { found, supported }
            if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION));
    }
}
