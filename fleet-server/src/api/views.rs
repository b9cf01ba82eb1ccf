//! The JSON the API returns where the stored types' own serde form is not
//! what a client wants: byte arrays as hex, command kinds as flat
//! `snake_case` names, configuration records without nesting. Everything else
//! (SDK messages such as `Health` or `TrapConfig`, store enums) is serialised
//! as it is. The OpenAPI document (`openapi.rs`) describes all of it.

use serde::Serialize;
use wildcam_sdk::DeviceId;
use wildcam_sdk::protocol::{
    BoundingBox, Classification, CommandKind, CommandStatus, ConfigStatus, DesiredConfig, Health, TrapConfig,
    Trigger,
};

use super::extract::to_hex;
use crate::store::{
    AllowedIdentity, CommandRecord, CommandState, Cursor, Deployment, DesiredConfigRecord, Device,
    DeviceInfo, DeviceStatus, Page, ReportedConfigRecord, StoredDetection, UnixMillis,
};

/// One page of a list: `{items, next_cursor}`.
#[derive(Debug, Serialize)]
pub struct PageView<T> {
    /// The items, in the list's order.
    pub items: Vec<T>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

impl<T> PageView<T> {
    /// Converts every item of a store page.
    pub fn map<U>(page: Page<U>, convert: impl FnMut(U) -> T) -> Self {
        Self { items: page.items.into_iter().map(convert).collect(), next_cursor: page.next.map(cursor_text) }
    }
}

fn cursor_text(cursor: Cursor) -> String {
    cursor.as_str().to_owned()
}

/// A registered device.
#[derive(Debug, Serialize)]
pub struct DeviceView {
    id: DeviceId,
    identity_key: String,
    status: DeviceStatus,
    revoked_at_ms: Option<UnixMillis>,
    claim_id: Option<String>,
    created_at_ms: UnixMillis,
    last_seen_at_ms: Option<UnixMillis>,
    info: Option<DeviceInfo>,
    acked_through: u32,
    queue_floor: u32,
    queue_next: u32,
    last_health: Option<Health>,
    groups: Vec<String>,
    tags: Vec<String>,
    deployment: Option<Deployment>,
    desired_config: Option<DesiredConfigView>,
    reported_config: Option<ReportedConfigView>,
}

impl From<Device> for DeviceView {
    fn from(device: Device) -> Self {
        Self {
            id: device.id,
            identity_key: to_hex(&device.identity_key),
            status: device.status,
            revoked_at_ms: device.revoked_at_ms,
            claim_id: device.claim_id,
            created_at_ms: device.created_at_ms,
            last_seen_at_ms: device.last_seen_at_ms,
            info: device.info,
            acked_through: device.acked_through,
            queue_floor: device.queue_floor,
            queue_next: device.queue_next,
            last_health: device.last_health,
            groups: device.groups,
            tags: device.tags,
            deployment: device.deployment,
            desired_config: device.desired_config.map(DesiredConfigView::from),
            reported_config: device.reported_config.map(ReportedConfigView::from),
        }
    }
}

/// The configuration operators want a device to run.
#[derive(Debug, Serialize)]
pub struct DesiredConfigView {
    version: u32,
    config: TrapConfig,
    set_at_ms: Option<UnixMillis>,
}

impl From<DesiredConfigRecord> for DesiredConfigView {
    fn from(record: DesiredConfigRecord) -> Self {
        Self {
            version: record.desired.version,
            config: record.desired.config,
            set_at_ms: Some(record.set_at_ms),
        }
    }
}

impl From<DesiredConfig> for DesiredConfigView {
    fn from(desired: DesiredConfig) -> Self {
        Self { version: desired.version, config: desired.config, set_at_ms: None }
    }
}

/// The configuration a device reports running.
#[derive(Debug, Serialize)]
pub struct ReportedConfigView {
    version: u32,
    status: ConfigStatus,
    desired_version: u32,
    config: TrapConfig,
    received_at_ms: UnixMillis,
}

impl From<ReportedConfigRecord> for ReportedConfigView {
    fn from(record: ReportedConfigRecord) -> Self {
        let report = record.report;
        Self {
            version: report.version,
            status: report.status,
            desired_version: report.desired_version,
            config: report.config,
            received_at_ms: record.received_at_ms,
        }
    }
}

/// Desired and reported configuration of one device.
#[derive(Debug, Serialize)]
pub struct DeviceConfigView {
    /// What operators set, `null` if never.
    pub desired: Option<DesiredConfigView>,
    /// What the device last reported, `null` if never.
    pub reported: Option<ReportedConfigView>,
}

/// A stored detection, flattened, with its image digest as hex.
#[derive(Debug, Serialize)]
pub struct DetectionView {
    device_id: DeviceId,
    received_at_ms: UnixMillis,
    seq: u32,
    captured_at_s: u32,
    trigger: Trigger,
    burst_index: u8,
    burst_len: u8,
    classes: Vec<Classification>,
    bbox: Option<BoundingBox>,
    image_len: u32,
    image_digest: String,
    battery_mv: u16,
}

impl From<StoredDetection> for DetectionView {
    fn from(stored: StoredDetection) -> Self {
        let detection = stored.detection;
        Self {
            device_id: stored.device_id,
            received_at_ms: stored.received_at_ms,
            seq: detection.seq,
            captured_at_s: detection.captured_at,
            trigger: detection.trigger,
            burst_index: detection.burst_index,
            burst_len: detection.burst_len,
            classes: detection.classes.iter().copied().collect(),
            bbox: detection.bbox,
            image_len: detection.image_len,
            image_digest: to_hex(&detection.image_digest),
            battery_mv: detection.battery_mv,
        }
    }
}

/// An identity key on the factory allow-list.
#[derive(Debug, Serialize)]
pub struct AllowedIdentityView {
    identity_key: String,
    note: String,
    created_at_ms: UnixMillis,
}

impl From<AllowedIdentity> for AllowedIdentityView {
    fn from(entry: AllowedIdentity) -> Self {
        Self {
            identity_key: to_hex(&entry.identity_key),
            note: entry.note,
            created_at_ms: entry.created_at_ms,
        }
    }
}

/// A queued command, its kind as a flat name (plus `seq` for
/// `send_full_image`).
#[derive(Debug, Serialize)]
pub struct CommandView {
    id: u32,
    device_id: DeviceId,
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u32>,
    ttl_s: u32,
    created_at_ms: UnixMillis,
    expires_at_ms: UnixMillis,
    state: CommandState,
    delivered_at_ms: Option<UnixMillis>,
    deliveries: u32,
    result: Option<CommandStatus>,
    completed_at_ms: Option<UnixMillis>,
}

impl From<CommandRecord> for CommandView {
    fn from(record: CommandRecord) -> Self {
        let (kind, seq) = command_kind_name(record.kind);
        Self {
            id: record.id,
            device_id: record.device_id,
            kind,
            seq,
            ttl_s: record.ttl_s,
            created_at_ms: record.created_at_ms,
            expires_at_ms: record.expires_at_ms,
            state: record.state,
            delivered_at_ms: record.delivered_at_ms,
            deliveries: record.deliveries,
            result: record.result,
            completed_at_ms: record.completed_at_ms,
        }
    }
}

/// The API name of a command kind and its sequence argument, if any.
pub fn command_kind_name(kind: CommandKind) -> (&'static str, Option<u32>) {
    match kind {
        CommandKind::Reboot => ("reboot", None),
        CommandKind::CaptureNow => ("capture_now", None),
        CommandKind::FormatStorage => ("format_storage", None),
        CommandKind::SendFullImage { seq } => ("send_full_image", Some(seq)),
        // A kind added to the SDK before the API learned its name.
        _ => ("unknown", None),
    }
}
