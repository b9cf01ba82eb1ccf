//! The one error type of the storage interface.

use std::path::PathBuf;

use wildcam_sdk::DeviceId;

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The data directory could not be created or the database not opened there.
    #[error("cannot use data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The database engine failed (I/O, disk full, lock timeout, constraint).
    #[error("database error: {0}")]
    Database(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The database was written by a newer server; this one refuses to touch it.
    #[error(
        "database schema version {found} is newer than this server supports ({supported}): upgrade the server"
    )]
    SchemaTooNew {
        /// Version found in the database.
        found: u32,
        /// Newest version this code knows.
        supported: u32,
    },
    /// The database is not in the mode durability requires.
    #[error("database setting {setting} is {found:?}, expected {expected:?}")]
    Setting {
        /// The pragma.
        setting: &'static str,
        /// What the database reports.
        found: String,
        /// What the store needs.
        expected: &'static str,
    },
    /// A stored value does not decode (hand-edited or corrupt database).
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The store was closed.
    #[error("the store is closed")]
    Closed,
    /// A storage worker died while running the request (it panicked).
    #[error("a storage worker failed while running the request")]
    WorkerFailed,
    /// A lock inside the store was poisoned by a panic.
    #[error("a storage lock was poisoned by a panic")]
    Poisoned,
    /// A storage thread could not be started.
    #[error("cannot start a storage thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The operating system's random number generator failed.
    #[error("random number generator failed: {0}")]
    Random(String),
    /// An ingest batch holds more items than allowed.
    #[error("batch of {items} items exceeds the limit of {max}")]
    BatchTooLarge {
        /// Items in the batch.
        items: usize,
        /// The limit.
        max: usize,
    },
    /// A page limit is 0 or above the maximum.
    #[error("page limit {limit} is outside 1..={max}")]
    LimitOutOfRange {
        /// The requested limit.
        limit: u32,
        /// The maximum.
        max: u32,
    },
    /// A pagination cursor was not produced by this query.
    #[error("invalid pagination cursor")]
    InvalidCursor,
    /// An argument is out of its documented range.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// No device has this id.
    #[error("device {0} not found")]
    DeviceNotFound(DeviceId),
    /// The device is revoked; the operation needs an active device.
    #[error("device {0} is revoked")]
    DeviceRevoked(DeviceId),
    /// Another device already has this id.
    #[error("device id {0} is already taken")]
    DeviceIdTaken(DeviceId),
    /// The identity key is already registered to an active device.
    #[error("identity key already belongs to device {device_id}")]
    IdentityAlreadyClaimed {
        /// The device holding the key.
        device_id: DeviceId,
    },
    /// The identity key belongs to a revoked device.
    #[error("identity key belongs to revoked device {device_id}")]
    IdentityRevoked {
        /// The revoked device.
        device_id: DeviceId,
    },
    /// No claim token has this id.
    #[error("claim token {0} not found")]
    ClaimTokenNotFound(String),
    /// A claim token with this id exists already.
    #[error("claim token {0} already exists")]
    ClaimTokenExists(String),
    /// The claim token's expiry has passed.
    #[error("claim token {0} has expired")]
    ClaimTokenExpired(String),
    /// The claim token has no uses left.
    #[error("claim token {0} has no uses left")]
    ClaimTokenExhausted(String),
    /// The claim token was revoked.
    #[error("claim token {0} was revoked")]
    ClaimTokenRevoked(String),
    /// A claim without token whose identity is not on the factory allow-list.
    #[error("identity key is not on the factory allow-list")]
    NotOnAllowList,
    /// The device has no command with this id.
    #[error("device {device_id} has no command {id}")]
    CommandNotFound {
        /// The device.
        device_id: DeviceId,
        /// The command id.
        id: u32,
    },
    /// The device has too many commands not yet answered or expired.
    #[error("device {device_id} already has {max} open commands")]
    TooManyOpenCommands {
        /// The device.
        device_id: DeviceId,
        /// The limit.
        max: usize,
    },
    /// Command ids (u32 on the wire) are used up.
    #[error("command ids are exhausted")]
    CommandIdsExhausted,
    /// No API token has this id.
    #[error("API token {0} not found")]
    ApiTokenNotFound(i64),
    /// No firmware has this id.
    #[error("firmware {0} not found")]
    FirmwareNotFound(u32),
    /// An image with this SHA-256 is stored with another manifest.
    #[error("an image with this SHA-256 is already stored as firmware {0}, with another manifest")]
    FirmwareConflict(u32),
    /// No rollout has this id.
    #[error("rollout {0} not found")]
    RolloutNotFound(u32),
    /// The rollout's state does not allow the change.
    #[error("rollout {id} is {state}: {message}")]
    RolloutState {
        /// The rollout.
        id: u32,
        /// Its state.
        state: &'static str,
        /// What is not allowed.
        message: &'static str,
    },
    /// Firmware or rollout ids (u32 on the wire) are used up.
    #[error("firmware or rollout ids are exhausted")]
    OtaIdsExhausted,
    /// The downlink reservation moved since the caller read it.
    #[error(
        "downlink reservation of device {device_id} is {current}, not the expected {expected}: reload and resume"
    )]
    ReservationConflict {
        /// The device.
        device_id: DeviceId,
        /// What the caller expected.
        expected: u32,
        /// What is stored.
        current: u32,
    },
}

impl StoreError {
    /// A database-engine failure from any backend's error type.
    pub fn database(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Database(Box::new(error))
    }

    /// Wraps a value that does not decode as [`StoreError::Corrupt`].
    pub(crate) fn corrupt(what: impl std::fmt::Display) -> Self {
        Self::Corrupt(what.to_string())
    }

    /// An out-of-range argument.
    pub(crate) fn invalid(what: impl std::fmt::Display) -> Self {
        Self::InvalidInput(what.to_string())
    }
}
