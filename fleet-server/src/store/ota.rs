//! Firmware images and rollouts: what the store keeps of OTA updates.
//!
//! A [`FirmwareRecord`] describes an uploaded image (the image itself is a
//! file in the data directory, named by its SHA-256). A [`RolloutRecord`]
//! offers one firmware to a set of devices; each target has a
//! [`RolloutDevice`] row whose [`TargetState`] follows the device's reports.
//! A device has at most one unfinished row: creating a rollout marks the
//! device's unfinished rows of older rollouts [`TargetState::Superseded`].

use serde::Serialize;
use wildcam_sdk::DeviceId;
use wildcam_sdk::ota::{OtaOutcome, OtaStateKind, SignedManifest};
use wildcam_sdk::protocol::{Chip, FirmwareVersion};

use super::{StoreError, UnixMillis};

/// Most devices one rollout may target.
pub const ROLLOUT_TARGETS_MAX: usize = 10_000;

/// An uploaded firmware image to store.
#[derive(Debug, Clone)]
pub struct NewFirmware {
    /// The verified signed manifest.
    pub manifest: SignedManifest,
    /// The configured public key its signature verified under.
    pub signing_key: [u8; 32],
}

/// A stored firmware image's description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FirmwareRecord {
    /// Server-assigned id.
    pub id: u32,
    /// SHA-256 of the image (names its file).
    pub sha256: [u8; 32],
    /// Image length, bytes.
    pub size: u32,
    /// The chip it is built for.
    pub chip: Chip,
    /// Its version.
    pub version: FirmwareVersion,
    /// Its anti-rollback secure version.
    pub secure_version: u32,
    /// Minimum battery to start the update, millivolts.
    pub min_battery_mv: u16,
    /// The public key its manifest verified under.
    pub signing_key: [u8; 32],
    /// The signed manifest, as offered to devices.
    #[serde(skip)]
    pub manifest: SignedManifest,
    /// When it was uploaded.
    pub created_at_ms: UnixMillis,
}

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Offering to its targets.
    Active,
    /// No new offers (by an operator, or the failure threshold); downloads
    /// in progress continue.
    Paused,
    /// Stopped for good: no offers, no chunks; unfinished targets are aborted.
    Aborted,
    /// Every target finished.
    Completed,
}

/// What an operator does to a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutAction {
    /// Stop offering.
    Pause,
    /// Offer again (clears the pause reason).
    Resume,
    /// Stop for good.
    Abort,
}

/// Where one target device stands in a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetState {
    /// Not offered yet (or the device was busy with another update).
    Pending,
    /// Offered; no chunk asked for yet.
    Offered,
    /// Fetching chunks (see the offset).
    Downloading,
    /// Every byte served; the device checks the image.
    Verifying,
    /// Verified; waiting to reboot into it.
    Ready,
    /// Rebooted into it; not confirmed yet.
    PendingConfirmation,
    /// Runs the new image.
    Confirmed,
    /// Failed before the reboot (or refused the offer); see the outcome.
    Failed,
    /// The new image failed its self-test or the bootloader went back.
    RolledBack,
    /// A newer rollout took the device over.
    Superseded,
    /// The rollout was aborted before the device finished.
    Aborted,
}

impl TargetState {
    /// Every state, in display order.
    pub const ALL: [TargetState; 11] = [
        TargetState::Pending,
        TargetState::Offered,
        TargetState::Downloading,
        TargetState::Verifying,
        TargetState::Ready,
        TargetState::PendingConfirmation,
        TargetState::Confirmed,
        TargetState::Failed,
        TargetState::RolledBack,
        TargetState::Superseded,
        TargetState::Aborted,
    ];

    /// The stored (and JSON) name.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetState::Pending => "pending",
            TargetState::Offered => "offered",
            TargetState::Downloading => "downloading",
            TargetState::Verifying => "verifying",
            TargetState::Ready => "ready",
            TargetState::PendingConfirmation => "pending_confirmation",
            TargetState::Confirmed => "confirmed",
            TargetState::Failed => "failed",
            TargetState::RolledBack => "rolled_back",
            TargetState::Superseded => "superseded",
            TargetState::Aborted => "aborted",
        }
    }

    /// Parses a stored name.
    pub(crate) fn parse(text: &str) -> Result<Self, StoreError> {
        Self::ALL
            .into_iter()
            .find(|s| s.as_str() == text)
            .ok_or_else(|| StoreError::corrupt(format!("unknown rollout target state {text:?}")))
    }

    /// Whether the device is done with this rollout.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TargetState::Confirmed
                | TargetState::Failed
                | TargetState::RolledBack
                | TargetState::Superseded
                | TargetState::Aborted
        )
    }

    /// The state a device's progress report names, for the states a report
    /// may move a target to (results end a rollout, not reports).
    pub fn from_progress(state: OtaStateKind) -> Option<Self> {
        match state {
            OtaStateKind::Downloading => Some(TargetState::Downloading),
            OtaStateKind::Verifying => Some(TargetState::Verifying),
            OtaStateKind::ReadyToReboot => Some(TargetState::Ready),
            OtaStateKind::PendingConfirmation => Some(TargetState::PendingConfirmation),
            _ => None,
        }
    }

    /// The final state a device's outcome puts a target in; `None` for
    /// [`OtaOutcome::Busy`] (offer again later) and
    /// [`OtaOutcome::Superseded`] (the server moved it on already).
    pub fn from_outcome(outcome: OtaOutcome) -> Option<Self> {
        match outcome {
            OtaOutcome::Confirmed => Some(TargetState::Confirmed),
            OtaOutcome::Busy | OtaOutcome::Superseded => None,
            outcome if outcome.is_rollback() => Some(TargetState::RolledBack),
            _ => Some(TargetState::Failed),
        }
    }
}

/// A rollout to create.
#[derive(Debug, Clone)]
pub struct NewRollout {
    /// The firmware to offer.
    pub firmware_id: u32,
    /// Explicit target devices.
    pub devices: Vec<DeviceId>,
    /// Also every active device of the firmware's chip running an older version.
    pub all_of_chip: bool,
    /// Devices offered or downloading at once.
    pub max_in_flight: u32,
    /// Failed or rolled-back devices that pause the rollout.
    pub failure_threshold: u32,
}

/// A stored rollout with its counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RolloutRecord {
    /// Server-assigned id; the `rollout_id` on the wire.
    pub id: u32,
    /// The firmware offered.
    pub firmware: FirmwareRecord,
    /// Where it stands.
    pub state: RolloutState,
    /// Why it paused (operator, or the failure threshold).
    pub pause_reason: Option<String>,
    /// Devices offered or downloading at once.
    pub max_in_flight: u32,
    /// Failed or rolled-back devices that pause it.
    pub failure_threshold: u32,
    /// Targets per state, every state present.
    pub counts: Vec<(TargetState, u32)>,
    /// When it was created.
    pub created_at_ms: UnixMillis,
    /// When its state last changed.
    pub updated_at_ms: UnixMillis,
}

/// One target of a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RolloutDevice {
    /// The device.
    pub device_id: DeviceId,
    /// Where it stands.
    pub state: TargetState,
    /// Bytes the device has (as last reported or asked for).
    pub offset: u32,
    /// The device's outcome, once it reported one.
    pub outcome: Option<OtaOutcome>,
    /// How many times it was offered.
    pub offers: u32,
    /// When its row last changed.
    pub updated_at_ms: UnixMillis,
}

/// What a device should be offered when it says hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferGrant {
    /// The rollout.
    pub rollout_id: u32,
    /// What to offer.
    pub manifest: SignedManifest,
}

/// What serving a chunk of a rollout to a device needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkGrant {
    /// The target's state.
    pub target: TargetState,
    /// The rollout's state.
    pub rollout: RolloutState,
    /// The image's SHA-256 (its file name).
    pub sha256: [u8; 32],
    /// The image's length.
    pub size: u32,
}

/// What recording a device's result did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultRecorded {
    /// First time: the target moved to this state (`Pending` for Busy).
    New(TargetState),
    /// Already recorded (the device repeats results until delivered).
    Repeat,
    /// The device is not a target of this rollout, or the version differs.
    Unknown,
}

/// The outcome of [`crate::store::OtaStore::record_ota_result`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResultEffect {
    /// What happened to the target.
    pub recorded: ResultRecorded,
    /// The rollout reached its failure threshold with this result and paused.
    pub paused: bool,
}
