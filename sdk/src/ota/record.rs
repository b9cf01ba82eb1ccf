//! The progress record the firmware persists across reboots.

use postcard::experimental::max_size::MaxSize;
use serde::{Deserialize, Serialize};

use super::OtaError;
use super::wire::{OtaOutcome, OtaResult, OtaStateKind, SignedManifest};

/// Format version, the first byte of [`OtaRecord::encode`]. The record
/// written by one firmware is read by the next one after an update, so its
/// layout only ever changes together with this number.
pub const OTA_RECORD_FORMAT: u8 = 1;
/// Longest [`OtaRecord::encode`] output, in bytes.
pub const OTA_RECORD_LEN_MAX: usize = 1 + OtaRecord::POSTCARD_MAX_SIZE;

/// The persisted phase of an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum OtaPhase {
    /// Bytes before `offset` are durably in the slot.
    Downloading,
    /// The whole image is in the slot; verification restarts at byte 0.
    Verifying,
    /// Verified; the reboot was not requested yet (re-verified after a
    /// reboot).
    ReadyToReboot,
    /// Persisted just before switching the boot slot: on the next boot the
    /// new image must confirm itself, or it was rolled back.
    PendingConfirmation,
    /// Over, with the outcome still to be reported.
    Finished(OtaOutcome),
}

/// Everything needed to pick an update up again after a reboot or power
/// loss. Persist it whenever an action says so; hand the last one persisted
/// to [`super::OtaMachine::resume`] on boot.
///
/// Encoded by [`OtaRecord::encode`] as one format byte ([`OTA_RECORD_FORMAT`])
/// followed by the postcard encoding of the fields in order; at most
/// [`OTA_RECORD_LEN_MAX`] bytes. It carries no checksum: the storage layer
/// should store it atomically, and a record that decodes but lies about the
/// offset can only end in a digest mismatch, because the image is verified by
/// reading the slot back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct OtaRecord {
    /// The rollout.
    pub rollout_id: u32,
    /// The manifest as offered (signature included, re-checked on resume).
    pub manifest: SignedManifest,
    /// The chunk length in use (1 to [`super::OTA_CHUNK_LEN_MAX`]).
    pub chunk_len: u16,
    /// Image bytes durably written to the slot.
    pub offset: u32,
    /// Where the update is.
    pub phase: OtaPhase,
}

impl OtaRecord {
    /// Serializes the record into `buf` (needs [`OTA_RECORD_LEN_MAX`] bytes
    /// at most) and returns the used part.
    pub fn encode<'b>(&self, buf: &'b mut [u8]) -> Result<&'b [u8], OtaError> {
        let (format, rest) = buf.split_first_mut().ok_or(OtaError::BufferTooSmall)?;
        *format = OTA_RECORD_FORMAT;
        let len = postcard::to_slice(self, rest)
            .map_err(|_| OtaError::BufferTooSmall)?
            .len();
        Ok(&buf[..1 + len])
    }

    /// Parses what [`OtaRecord::encode`] produced.
    pub fn decode(bytes: &[u8]) -> Result<Self, OtaError> {
        let (format, rest) = bytes.split_first().ok_or(OtaError::Encoding)?;
        if *format != OTA_RECORD_FORMAT {
            return Err(OtaError::RecordFormat);
        }
        let (record, tail) = postcard::take_from_bytes(rest).map_err(|_| OtaError::Encoding)?;
        if !tail.is_empty() {
            return Err(OtaError::Encoding);
        }
        Ok(record)
    }

    /// The coarse state for reports.
    pub fn state(&self) -> OtaStateKind {
        match self.phase {
            OtaPhase::Downloading => OtaStateKind::Downloading,
            OtaPhase::Verifying => OtaStateKind::Verifying,
            OtaPhase::ReadyToReboot => OtaStateKind::ReadyToReboot,
            OtaPhase::PendingConfirmation => OtaStateKind::PendingConfirmation,
            OtaPhase::Finished(outcome) if outcome.is_success() => OtaStateKind::Confirmed,
            OtaPhase::Finished(outcome) if outcome.is_rollback() => OtaStateKind::RolledBack,
            OtaPhase::Finished(_) => OtaStateKind::Failed,
        }
    }

    /// The result message for `outcome` on this rollout.
    pub fn result(&self, outcome: OtaOutcome) -> OtaResult {
        OtaResult { rollout_id: self.rollout_id, version: self.manifest.manifest.version, outcome }
    }

    /// Image size from the manifest.
    pub(super) fn image_size(&self) -> u32 {
        self.manifest.manifest.image_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ota::{Manifest, ManifestSignature};
    use crate::protocol::{Chip, FirmwareVersion};

    fn record(phase: OtaPhase) -> OtaRecord {
        OtaRecord {
            rollout_id: u32::MAX,
            manifest: SignedManifest {
                manifest: Manifest {
                    version: FirmwareVersion { major: u16::MAX, minor: u16::MAX, patch: u16::MAX },
                    secure_version: u32::MAX,
                    chip: Chip::Host,
                    image_size: u32::MAX,
                    image_sha256: [0xee; 32],
                    min_battery_mv: u16::MAX,
                },
                signature: ManifestSignature([0xdd; 64]),
            },
            chunk_len: u16::MAX,
            offset: u32::MAX,
            phase,
        }
    }

    #[test]
    fn round_trips_at_max_size() {
        let original = record(OtaPhase::Finished(OtaOutcome::Busy));
        let mut buf = [0u8; OTA_RECORD_LEN_MAX];
        let bytes = original.encode(&mut buf).unwrap();
        assert_eq!(bytes.len(), OTA_RECORD_LEN_MAX);
        assert_eq!(bytes[0], OTA_RECORD_FORMAT);
        assert_eq!(OtaRecord::decode(bytes), Ok(original));
    }

    #[test]
    fn refuses_bad_bytes() {
        let original = record(OtaPhase::Downloading);
        let mut buf = [0u8; OTA_RECORD_LEN_MAX + 1];
        let len = original.encode(&mut buf).unwrap().len();
        assert_eq!(OtaRecord::decode(&buf[..len + 1]), Err(OtaError::Encoding));
        assert_eq!(OtaRecord::decode(&buf[..len - 1]), Err(OtaError::Encoding));
        assert_eq!(OtaRecord::decode(&[]), Err(OtaError::Encoding));
        buf[0] = OTA_RECORD_FORMAT + 1;
        assert_eq!(OtaRecord::decode(&buf[..len]), Err(OtaError::RecordFormat));
        assert_eq!(original.encode(&mut [0u8; 20]), Err(OtaError::BufferTooSmall));
        assert_eq!(original.encode(&mut []), Err(OtaError::BufferTooSmall));
    }

    #[test]
    fn state_follows_phase() {
        let cases = [
            (OtaPhase::Downloading, OtaStateKind::Downloading),
            (OtaPhase::Verifying, OtaStateKind::Verifying),
            (OtaPhase::ReadyToReboot, OtaStateKind::ReadyToReboot),
            (OtaPhase::PendingConfirmation, OtaStateKind::PendingConfirmation),
            (OtaPhase::Finished(OtaOutcome::Confirmed), OtaStateKind::Confirmed),
            (OtaPhase::Finished(OtaOutcome::SelfTestFailed), OtaStateKind::RolledBack),
            (OtaPhase::Finished(OtaOutcome::RolledBack), OtaStateKind::RolledBack),
            (OtaPhase::Finished(OtaOutcome::DigestMismatch), OtaStateKind::Failed),
        ];
        for (phase, state) in cases {
            assert_eq!(record(phase).state(), state, "{phase:?}");
        }
    }
}
