//! Devices: what is registered at claim time and what the registry shows.

use serde::Serialize;
use wildcam_sdk::DeviceId;
use wildcam_sdk::protocol::{
    Capabilities, Chip, DesiredConfig, FirmwareVersion, Health, ReportedConfig, ResetReason,
};
use wildcam_sdk::seal::{ReplayWindow, SessionKey};

use super::{PageRequest, PasswordHash, StoreError, UnixMillis};

/// Most tags a device may carry, and most groups it may be in.
pub const LABELS_PER_DEVICE_MAX: usize = 32;
/// Longest tag, group, site, note or label, in bytes.
pub const LABEL_LEN_MAX: usize = 128;

/// Whether a device may connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceStatus {
    /// Provisioned and allowed to connect.
    Active,
    /// Revoked by an operator: refused by the broker and ingest.
    Revoked,
}

impl DeviceStatus {
    /// The stored name.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            DeviceStatus::Active => "active",
            DeviceStatus::Revoked => "revoked",
        }
    }

    /// Parses a stored name.
    pub(crate) fn parse(text: &str) -> Result<Self, StoreError> {
        match text {
            "active" => Ok(DeviceStatus::Active),
            "revoked" => Ok(DeviceStatus::Revoked),
            other => Err(StoreError::corrupt(format!("unknown device status {other:?}"))),
        }
    }
}

/// What authorized a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimAuthorization {
    /// A claim token, one of whose uses the claim consumes.
    Token {
        /// The token's public id.
        claim_id: String,
    },
    /// The identity key is on the factory allow-list.
    AllowList,
}

/// A device to register after a successful claim.
#[derive(Debug, Clone)]
pub struct NewDevice {
    /// The id the server assigned.
    pub id: DeviceId,
    /// The device's ed25519 identity public key (unique among devices).
    pub identity_key: [u8; 32],
    /// Hash of the MQTT password sent in the credentials.
    pub mqtt_password_hash: PasswordHash,
    /// The agreed session key.
    pub session_key: SessionKey,
    /// What authorized the claim.
    pub authorization: ClaimAuthorization,
}

/// What the device last said about itself in a `Hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceInfo {
    /// Board or product name.
    pub hardware_model: String,
    /// The chip.
    pub chip: Chip,
    /// Running firmware.
    pub firmware: FirmwareVersion,
    /// Anti-rollback counter of the running firmware.
    pub secure_version: u32,
    /// Why it last reset.
    pub reset_reason: ResetReason,
    /// Feature bits.
    pub capabilities: Capabilities,
    /// Configuration version it runs.
    pub config_version: u32,
    /// When that hello was received.
    pub hello_at_ms: UnixMillis,
}

/// Where a device is deployed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Deployment {
    /// Site name (filterable).
    pub site: String,
    /// Degrees, -90..=90 (with `longitude`, or neither).
    pub latitude: Option<f64>,
    /// Degrees, -180..=180.
    pub longitude: Option<f64>,
    /// Camera height above ground, metres (0..=100).
    pub camera_height_m: Option<f64>,
    /// When the deployment started.
    pub start_ms: Option<UnixMillis>,
    /// When it ended (not before `start_ms`).
    pub end_ms: Option<UnixMillis>,
}

impl Deployment {
    /// Checks ranges and consistency.
    pub(crate) fn validate(&self) -> Result<(), StoreError> {
        check_label("site", &self.site)?;
        if self.site.is_empty() {
            return Err(StoreError::invalid("deployment site must not be empty"));
        }
        if self.latitude.is_some() != self.longitude.is_some() {
            return Err(StoreError::invalid("latitude and longitude go together"));
        }
        let in_range =
            |v: Option<f64>, lo: f64, hi: f64| v.is_none_or(|v| v.is_finite() && (lo..=hi).contains(&v));
        if !in_range(self.latitude, -90.0, 90.0) || !in_range(self.longitude, -180.0, 180.0) {
            return Err(StoreError::invalid("latitude or longitude out of range"));
        }
        if !in_range(self.camera_height_m, 0.0, 100.0) {
            return Err(StoreError::invalid("camera height must be within 0..=100 m"));
        }
        if let (Some(start), Some(end)) = (self.start_ms, self.end_ms)
            && end < start
        {
            return Err(StoreError::invalid("deployment ends before it starts"));
        }
        Ok(())
    }
}

/// The desired configuration and when it was set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DesiredConfigRecord {
    /// Version and configuration.
    pub desired: DesiredConfig,
    /// When an operator set it.
    pub set_at_ms: UnixMillis,
}

/// The configuration the device reported and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReportedConfigRecord {
    /// What the device sent.
    pub report: ReportedConfig,
    /// When it was received.
    pub received_at_ms: UnixMillis,
}

/// A registered device, as the registry shows it (no secrets).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Device {
    /// Its id.
    pub id: DeviceId,
    /// Its ed25519 identity public key.
    pub identity_key: [u8; 32],
    /// Active or revoked.
    pub status: DeviceStatus,
    /// When it was revoked.
    pub revoked_at_ms: Option<UnixMillis>,
    /// The claim token it was claimed with (`None`: allow-list).
    pub claim_id: Option<String>,
    /// When it was claimed.
    pub created_at_ms: UnixMillis,
    /// When any message of it was last stored.
    pub last_seen_at_ms: Option<UnixMillis>,
    /// From its last hello.
    pub info: Option<DeviceInfo>,
    /// Highest contiguous detection sequence stored (what acks say).
    pub acked_through: u32,
    /// Its queue's floor from the last hello.
    pub queue_floor: u32,
    /// Its queue's next sequence from the last hello.
    pub queue_next: u32,
    /// Its most recent health report (by `taken_at_s`).
    pub last_health: Option<Health>,
    /// Groups, sorted.
    pub groups: Vec<String>,
    /// Tags, sorted.
    pub tags: Vec<String>,
    /// Where it is deployed.
    pub deployment: Option<Deployment>,
    /// What operators want it to run.
    pub desired_config: Option<DesiredConfigRecord>,
    /// What it says it runs.
    pub reported_config: Option<ReportedConfigRecord>,
}

/// Filters of [`super::DeviceStore::list_devices`]; every given filter must match.
#[derive(Debug, Clone, Default)]
pub struct DeviceQuery {
    /// Only devices with this status.
    pub status: Option<DeviceStatus>,
    /// Only members of this group.
    pub group: Option<String>,
    /// Only devices with this tag.
    pub tag: Option<String>,
    /// Only devices deployed at this site.
    pub site: Option<String>,
    /// Only devices seen at or after this instant.
    pub seen_since_ms: Option<UnixMillis>,
    /// Page size and cursor.
    pub page: PageRequest,
}

/// What the broker needs to authenticate a device's connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCredentials {
    /// The device.
    pub device_id: DeviceId,
    /// Hash of its MQTT password ([`PasswordHash::verify`]).
    pub mqtt_password_hash: PasswordHash,
    /// Refuse the connection unless active.
    pub status: DeviceStatus,
}

/// Key material for opening and sealing a device's frames.
#[derive(Debug, Clone)]
pub struct DeviceKeys {
    /// The device.
    pub device_id: DeviceId,
    /// The session key (redacted in `Debug`, wiped on drop).
    pub session_key: SessionKey,
    /// The persisted uplink replay window.
    pub uplink_window: ReplayWindow,
    /// The persisted downlink counter reservation (`Sealer::resume`).
    pub downlink_reservation: u32,
    /// Refuse traffic unless active.
    pub status: DeviceStatus,
}

/// Checks a tag, group, site or label: at most [`LABEL_LEN_MAX`] bytes, no
/// control characters.
pub(crate) fn check_label(what: &str, value: &str) -> Result<(), StoreError> {
    if value.len() > LABEL_LEN_MAX || value.chars().any(char::is_control) {
        return Err(StoreError::invalid(format!(
            "{what} must be at most {LABEL_LEN_MAX} bytes without control characters"
        )));
    }
    Ok(())
}

/// Checks and normalises a set of tags or groups: non-empty labels, at most
/// [`LABELS_PER_DEVICE_MAX`], sorted and deduplicated.
pub(crate) fn normalize_labels(what: &str, mut labels: Vec<String>) -> Result<Vec<String>, StoreError> {
    for label in &labels {
        check_label(what, label)?;
        if label.is_empty() {
            return Err(StoreError::invalid(format!("{what} must not be empty")));
        }
    }
    labels.sort();
    labels.dedup();
    if labels.len() > LABELS_PER_DEVICE_MAX {
        return Err(StoreError::invalid(format!("at most {LABELS_PER_DEVICE_MAX} {what}s per device")));
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment() -> Deployment {
        Deployment {
            site: "ridge".into(),
            latitude: Some(46.5),
            longitude: Some(7.9),
            camera_height_m: Some(1.2),
            start_ms: Some(10),
            end_ms: None,
        }
    }

    #[test]
    fn deployment_validation() {
        assert!(deployment().validate().is_ok());
        assert!(
            Deployment { latitude: Some(91.0), ..deployment() }
                .validate()
                .is_err()
        );
        assert!(
            Deployment { longitude: None, ..deployment() }
                .validate()
                .is_err()
        );
        assert!(
            Deployment { camera_height_m: Some(f64::NAN), ..deployment() }
                .validate()
                .is_err()
        );
        assert!(
            Deployment { end_ms: Some(5), ..deployment() }
                .validate()
                .is_err()
        );
        assert!(
            Deployment { site: String::new(), ..deployment() }
                .validate()
                .is_err()
        );
    }

    #[test]
    fn labels_are_sorted_deduplicated_and_bounded() {
        let labels = normalize_labels("tag", vec!["b".into(), "a".into(), "b".into()]).unwrap();
        assert_eq!(labels, ["a", "b"]);
        assert!(normalize_labels("tag", vec![String::new()]).is_err());
        assert!(normalize_labels("tag", vec!["a\n".into()]).is_err());
        let many = (0..=LABELS_PER_DEVICE_MAX).map(|i| i.to_string()).collect();
        assert!(normalize_labels("tag", many).is_err());
    }
}
