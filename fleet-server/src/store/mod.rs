//! Durable storage of the fleet server behind a narrow, backend-neutral
//! interface.
//!
//! # Shape
//!
//! Callers see a handful of small traits, one per consumer:
//!
//! | trait | used by | holds |
//! |---|---|---|
//! | [`DeviceStore`] | provisioning, broker auth, ingest, API | devices, credentials, keys |
//! | [`ClaimStore`] | provisioning, API | claim tokens, factory allow-list |
//! | [`IngestStore`] | ingest | [`IngestStore::commit_batch`]: detections, health, hellos, replay windows, outbox |
//! | [`TelemetryStore`] | API | detection and health queries |
//! | [`OutboxStore`] | cloud bridges | the transactional outbox |
//! | [`ControlStore`] | API, downlink | desired/reported configuration, commands |
//! | [`ApiTokenStore`] | API | operator tokens |
//! | [`OtaStore`] | OTA service, API | firmware images, rollouts, per-device update status |
//!
//! and [`Store`], all of them plus [`Store::close`]. [`SqliteStore`] is the
//! embedded implementation; a PostgreSQL one can implement the same traits
//! without any caller changing.
//!
//! The traits are **object-safe** (methods return a boxed [`StoreFuture`]):
//! the backend is chosen at run time from configuration, so the server holds
//! an `Arc<dyn Store>` instead of being generic over the backend everywhere
//! (one monomorphised server, axum state that is simply `Arc<dyn Store>`).
//! One allocation per call is noise next to a database round trip, and no
//! `async-trait` dependency is needed. Arguments are owned values and every
//! type crossing the interface is plain owned data (SDK message types,
//! strings, integers): nothing of the database driver leaks out, and every
//! failure is a [`StoreError`].
//!
//! # Time
//!
//! - Instants taken by the server are **Unix milliseconds** ([`UnixMillis`],
//!   fields and columns ending in `_ms`), read from the store's [`Clock`]
//!   (tests use [`ManualClock`]) or, for received messages, given by ingest.
//! - Instants reported by a trap keep the wire's **Unix seconds** (fields
//!   ending in `_s`, e.g. `captured_at_s`, `taken_at_s`).
//!
//! # Bounds
//!
//! Pages hold at most [`PAGE_LIMIT_MAX`] items, an ingest batch at most
//! [`BATCH_ITEMS_MAX`] items, a device at most [`LABELS_PER_DEVICE_MAX`] tags
//! and as many groups, and at most [`OPEN_COMMANDS_MAX`] undelivered or
//! unanswered commands. Backends bound their queues (see [`SqliteConfig`]).

mod api_token;
mod claim;
mod clock;
mod control;
mod device;
mod error;
mod ingest;
mod ota;
mod page;
mod secret;
mod sqlite;

use std::future::Future;
use std::pin::Pin;

pub use wildcam_sdk::DeviceId;
use wildcam_sdk::protocol::{
    CommandKind, CommandResult, DesiredConfig, OtaResult, ReportedConfig, TrapConfig,
};

pub use api_token::{ApiRole, ApiTokenInfo, CreatedApiToken, TokenHash, generate_api_token};
pub use claim::{AllowedIdentity, ClaimTokenInfo, GeneratedClaimToken, NewClaimToken, generate_claim_token};
pub use clock::{Clock, ManualClock, SystemClock, UnixMillis};
pub use control::{COMMAND_TTL_MAX_S, CommandRecord, CommandState, OPEN_COMMANDS_MAX};
pub use device::{
    ClaimAuthorization, Deployment, DesiredConfigRecord, Device, DeviceCredentials, DeviceInfo, DeviceKeys,
    DeviceQuery, DeviceStatus, LABEL_LEN_MAX, LABELS_PER_DEVICE_MAX, NewDevice, ReportedConfigRecord,
};
pub use error::StoreError;
pub use ingest::{
    AckUpdate, BATCH_ITEMS_MAX, BatchCommitted, DetectionQuery, HealthQuery, IngestBatch, OutboxEntry,
    Received, StoredDetection, StoredHealth, UplinkWindow,
};
pub use ota::{
    ChunkGrant, FirmwareRecord, NewFirmware, NewRollout, OfferGrant, ROLLOUT_TARGETS_MAX, ResultEffect,
    ResultRecorded, RolloutAction, RolloutDevice, RolloutRecord, RolloutState, TargetState,
};
pub use page::{Cursor, PAGE_LIMIT_MAX, Page, PageRequest};
pub use secret::{PasswordHash, SecretDigest, constant_time_eq};
pub use sqlite::{DB_FILE_NAME, SCHEMA_VERSION, SqliteConfig, SqliteStore};

/// The future every store method returns: boxed so the traits stay
/// object-safe, `Send` so it can run on any tokio worker.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Devices: registration at claim time, registry, and the secrets the broker
/// and ingest need.
pub trait DeviceStore: Send + Sync {
    /// Registers a device from a successful claim. In one transaction the
    /// claim is authorized (a token use consumed, or the identity found on
    /// the allow-list) and the device inserted: either both happen or neither.
    ///
    /// Fails with [`StoreError::ClaimTokenNotFound`], `ClaimTokenExpired`,
    /// `ClaimTokenExhausted`, `ClaimTokenRevoked`, `NotOnAllowList`,
    /// `IdentityAlreadyClaimed`, `IdentityRevoked` or `DeviceIdTaken`.
    fn create_device(&self, device: NewDevice) -> StoreFuture<'_, Device>;

    /// One device, or `None`.
    fn get_device(&self, id: DeviceId) -> StoreFuture<'_, Option<Device>>;

    /// Devices matching every filter of `query`, ordered by id.
    fn list_devices(&self, query: DeviceQuery) -> StoreFuture<'_, Page<Device>>;

    /// Replaces the device's groups.
    fn set_groups(&self, id: DeviceId, groups: Vec<String>) -> StoreFuture<'_, ()>;

    /// Replaces the device's tags.
    fn set_tags(&self, id: DeviceId, tags: Vec<String>) -> StoreFuture<'_, ()>;

    /// Sets (or with `None` clears) where the device is deployed.
    fn set_deployment(&self, id: DeviceId, deployment: Option<Deployment>) -> StoreFuture<'_, ()>;

    /// Revokes the device: its credentials and keys lookups then report
    /// [`DeviceStatus::Revoked`]. Revoking twice keeps the first time.
    fn revoke_device(&self, id: DeviceId) -> StoreFuture<'_, ()>;

    /// What the broker needs to authenticate a connection.
    fn device_credentials(&self, id: DeviceId) -> StoreFuture<'_, Option<DeviceCredentials>>;

    /// What ingest and the downlink need to open and seal the device's frames.
    fn device_keys(&self, id: DeviceId) -> StoreFuture<'_, Option<DeviceKeys>>;

    /// Persists a new downlink counter reservation (the value a `Sealer`
    /// asks for in `Sealed::persist_reservation`), as a compare-and-set:
    /// `expected` is the reservation the caller's sealer resumed from or last
    /// persisted. If another writer moved it meanwhile, fails with
    /// [`StoreError::ReservationConflict`]: the caller must reload the keys
    /// and resume from the stored value, so no two sealers share counters.
    fn persist_downlink_reservation(
        &self,
        id: DeviceId,
        expected: u32,
        reservation: u32,
    ) -> StoreFuture<'_, ()>;
}

/// Claim tokens and the factory allow-list.
pub trait ClaimStore: Send + Sync {
    /// Stores a new claim token (its secret's digest only).
    fn create_claim_token(&self, token: NewClaimToken) -> StoreFuture<'_, ClaimTokenInfo>;

    /// One claim token, with the secret digest provisioning verifies against.
    fn get_claim_token(&self, id: String) -> StoreFuture<'_, Option<ClaimTokenInfo>>;

    /// Claim tokens ordered by id.
    fn list_claim_tokens(&self, page: PageRequest) -> StoreFuture<'_, Page<ClaimTokenInfo>>;

    /// Revokes a claim token; later claims with it fail.
    fn revoke_claim_token(&self, id: String) -> StoreFuture<'_, ()>;

    /// Adds an identity key to the factory allow-list (or updates its note).
    fn allow_identity(&self, identity_key: [u8; 32], note: String) -> StoreFuture<'_, AllowedIdentity>;

    /// Removes an identity key from the allow-list; `false` if it was absent.
    fn disallow_identity(&self, identity_key: [u8; 32]) -> StoreFuture<'_, bool>;

    /// The allow-list, ordered by key.
    fn list_allowed_identities(&self, page: PageRequest) -> StoreFuture<'_, Page<AllowedIdentity>>;

    /// One allow-list entry, or `None`.
    fn allowed_identity(&self, identity_key: [u8; 32]) -> StoreFuture<'_, Option<AllowedIdentity>>;
}

/// The ingest commit: everything ingest stores goes through one call.
pub trait IngestStore: Send + Sync {
    /// Commits `batch` in one transaction and returns, per device that had a
    /// detection or a hello in it, the highest contiguous sequence stored
    /// (also when unchanged, so resends are acked again), and how many
    /// detections were new. Acks may be sent once this returns: everything
    /// is durable.
    ///
    /// Detections are deduplicated on (device, sequence); a newly stored one
    /// gets an outbox row per configured destination in the same
    /// transaction. On any error nothing of the batch is stored.
    fn commit_batch(&self, batch: IngestBatch) -> StoreFuture<'_, BatchCommitted>;
}

/// Reads of stored telemetry for the API.
pub trait TelemetryStore: Send + Sync {
    /// Detections matching `query`, keyset-paginated.
    fn query_detections(&self, query: DetectionQuery) -> StoreFuture<'_, Page<StoredDetection>>;

    /// A device's health reports, keyset-paginated.
    fn health_history(&self, query: HealthQuery) -> StoreFuture<'_, Page<StoredHealth>>;
}

/// The transactional outbox drained by the cloud bridges.
pub trait OutboxStore: Send + Sync {
    /// Up to `limit` undelivered entries for `destination`, oldest first.
    fn outbox_pending(&self, destination: String, limit: u32) -> StoreFuture<'_, Vec<OutboxEntry>>;

    /// Marks entries delivered; returns how many were undelivered until now.
    fn outbox_mark_delivered(&self, ids: Vec<i64>) -> StoreFuture<'_, u64>;
}

/// Desired and reported configuration, and commands.
pub trait ControlStore: Send + Sync {
    /// Stores a new desired configuration; its version is one above any
    /// version the device has been given or reported.
    fn set_desired_config(&self, id: DeviceId, config: TrapConfig) -> StoreFuture<'_, DesiredConfig>;

    /// Records the configuration the device reports running.
    fn record_reported_config(
        &self,
        id: DeviceId,
        report: ReportedConfig,
        received_at_ms: UnixMillis,
    ) -> StoreFuture<'_, ()>;

    /// Queues a command that stays valid for `ttl_s` seconds from now.
    fn enqueue_command(&self, id: DeviceId, kind: CommandKind, ttl_s: u32) -> StoreFuture<'_, CommandRecord>;

    /// Commands to send when the device wakes: not answered and not expired,
    /// oldest first. Delivered-but-unanswered ones are included (a trap runs
    /// each id once and answers a repeat with `Duplicate`).
    fn commands_to_deliver(&self, id: DeviceId) -> StoreFuture<'_, Vec<CommandRecord>>;

    /// Records that the command was published to the device.
    fn mark_command_delivered(&self, id: DeviceId, command_id: u32) -> StoreFuture<'_, ()>;

    /// Records the device's answer; the first answer wins.
    fn record_command_result(&self, id: DeviceId, result: CommandResult) -> StoreFuture<'_, CommandRecord>;

    /// The device's commands, newest first.
    fn list_commands(&self, id: DeviceId, page: PageRequest) -> StoreFuture<'_, Page<CommandRecord>>;
}

/// Operator API tokens.
pub trait ApiTokenStore: Send + Sync {
    /// Creates a token; the token text is in the result and nowhere else.
    fn create_api_token(&self, role: ApiRole, label: String) -> StoreFuture<'_, CreatedApiToken>;

    /// Tokens ordered by id, revoked ones included.
    fn list_api_tokens(&self, page: PageRequest) -> StoreFuture<'_, Page<ApiTokenInfo>>;

    /// Revokes a token. Revoking twice keeps the first time.
    fn revoke_api_token(&self, id: i64) -> StoreFuture<'_, ()>;

    /// The token with this hash (see [`TokenHash::of`]), revoked or not.
    fn api_token_by_hash(&self, hash: TokenHash) -> StoreFuture<'_, Option<ApiTokenInfo>>;
}

/// Firmware images and rollouts.
pub trait OtaStore: Send + Sync {
    /// Stores a verified firmware description; an image with the same SHA-256
    /// and manifest returns the stored one (`false`: not new), one with
    /// another manifest fails with [`StoreError::FirmwareConflict`].
    fn insert_firmware(&self, firmware: NewFirmware) -> StoreFuture<'_, (FirmwareRecord, bool)>;

    /// One firmware, or `None`.
    fn get_firmware(&self, id: u32) -> StoreFuture<'_, Option<FirmwareRecord>>;

    /// Firmware, newest first.
    fn list_firmware(&self, page: PageRequest) -> StoreFuture<'_, Page<FirmwareRecord>>;

    /// Creates a rollout and its targets (explicit devices, which must be
    /// active and not of another chip, and with `all_of_chip` every active
    /// device of the firmware's chip running an older version). Each target's
    /// unfinished rows of older rollouts become [`TargetState::Superseded`].
    fn create_rollout(&self, rollout: NewRollout) -> StoreFuture<'_, RolloutRecord>;

    /// One rollout with its counts, or `None`.
    fn get_rollout(&self, id: u32) -> StoreFuture<'_, Option<RolloutRecord>>;

    /// Every target of a rollout, by device id.
    fn rollout_devices(&self, id: u32) -> StoreFuture<'_, Vec<RolloutDevice>>;

    /// Rollouts, newest first.
    fn list_rollouts(&self, page: PageRequest) -> StoreFuture<'_, Page<RolloutRecord>>;

    /// Pauses, resumes or aborts a rollout (aborting ends its unfinished
    /// targets); repeating the current state is harmless.
    fn change_rollout(&self, id: u32, action: RolloutAction) -> StoreFuture<'_, RolloutRecord>;

    /// What to offer `device` now: its unfinished target if already in
    /// flight (within `stall_ms`), or a pending one of an active rollout with
    /// a free slot (which becomes [`TargetState::Offered`]).
    fn grant_offer(&self, device: DeviceId, stall_ms: i64) -> StoreFuture<'_, Option<OfferGrant>>;

    /// Pending targets of an active rollout that free slots allow to offer,
    /// most recently seen first.
    fn offer_candidates(&self, rollout_id: u32, stall_ms: i64) -> StoreFuture<'_, Vec<DeviceId>>;

    /// What serving `device` chunks of `rollout_id` needs, or `None` if it is
    /// not a target.
    fn chunk_grant(&self, rollout_id: u32, device: DeviceId) -> StoreFuture<'_, Option<ChunkGrant>>;

    /// Moves an unfinished, offered target to `state` at `offset`; `false` if
    /// the target is not in one of `from`.
    fn record_ota_progress(
        &self,
        rollout_id: u32,
        device: DeviceId,
        from: Vec<TargetState>,
        state: TargetState,
        offset: u32,
    ) -> StoreFuture<'_, bool>;

    /// Records a device's result (idempotent: the first outcome stays); a
    /// confirmation also records the new firmware in the registry. Pauses
    /// the rollout at its failure threshold, completes it once every target
    /// is final.
    fn record_ota_result(&self, device: DeviceId, result: OtaResult) -> StoreFuture<'_, ResultEffect>;
}

/// The whole storage interface.
pub trait Store:
    DeviceStore
    + ClaimStore
    + IngestStore
    + TelemetryStore
    + OutboxStore
    + ControlStore
    + ApiTokenStore
    + OtaStore
{
    /// Finishes queued writes, checkpoints and stops the backend. Later calls
    /// fail with [`StoreError::Closed`]. Closing twice is harmless.
    fn close(&self) -> StoreFuture<'_, ()>;
}
