//! Over-the-air firmware updates: signed manifests, image verification and a
//! sans-IO update state machine.
//!
//! The server offers an update ([`OtaOffer`]) carrying a [`SignedManifest`]:
//! the image's version, anti-rollback secure version, chip, size and SHA-256,
//! signed with ed25519 by the firmware signing key. The device checks the
//! signature against the public key baked into its firmware (never one fetched
//! from the network), then pulls the image chunk by chunk ([`ChunkRequest`] →
//! [`Chunk`]) into the inactive OTA slot, verifies it, reboots into it, runs
//! its self-test and confirms it, or rolls back.
//!
//! [`OtaMachine`] owns none of the I/O: the firmware (or the simulator) feeds it
//! events, lends it the slot ([`OtaSlot`]) when it needs to write or read, and
//! carries out the [`OtaActions`] it returns (persist the [`OtaRecord`], send a
//! message, switch the boot partition, reboot).
//!
//! # States
//!
//! ```text
//!  Idle ──on_offer (signed, right chip, newer, fits, battery ok)──▶ Downloading
//!   ▲                                               │  on_chunk at the expected
//!   │                                               │  offset, until the last byte
//!   │                                               ▼
//!   │                                           Verifying    verify_step: read the
//!   │                                               │        slot back, check size
//!   │                                               ▼        and SHA-256
//!   │                                         ReadyToReboot
//!   │                                               │  reboot_into_update
//!   │                                               ▼  (persist, switch slot, reboot)
//!   │                                      PendingConfirmation
//!   │                  booted the update:           │           booted the previous
//!   │                  self-test, then              │           image: the bootloader
//!   │                  confirm / self_test_failed   │           rolled back
//!   │                        ┌──────────────────────┼──────────────────────┐
//!   │                        ▼                      ▼                      ▼
//!   │                    Confirmed      RolledBack(SelfTestFailed)  RolledBack(RolledBack)
//!   │                        │                      │                      │
//!   └── result_delivered ────┴──────────────────────┴──────────────────────┘
//!
//!  Downloading / Verifying / ReadyToReboot ──▶ Failed(reason) ──result_delivered──▶ Idle
//!      reasons: DigestMismatch, SizeMismatch (image empty, server ran out of bytes),
//!      WriteFailed, ReadFailed, Aborted (abort(), unusable record), Superseded
//!  Refused offers (SignatureInvalid, WrongChip, Downgrade, NotNewer, ImageTooLarge,
//!      BatteryTooLow, SizeMismatch, Busy) are answered with a result and change nothing.
//! ```
//!
//! Every terminal state (Confirmed, RolledBack, Failed) keeps an [`OtaResult`]
//! to report ([`OtaMachine::pending_result`]) until the firmware says it was
//! delivered; it is persisted, so a result produced just before a reboot is
//! reported on the next connection.
//!
//! A new, valid offer for *another* rollout while Downloading, Verifying or
//! ReadyToReboot supersedes the current one (reported as
//! [`OtaOutcome::Superseded`]) and starts over; while one awaits confirmation
//! it is refused as [`OtaOutcome::Busy`]. The same rollout with the same
//! manifest resumes. An offer that fails verification never disturbs an update
//! in progress.
//!
//! # Power loss
//!
//! The firmware persists the [`OtaRecord`] whenever an action says so (after
//! every chunk, or every [`OtaConfig::persist_every`] bytes) and, on boot, rebuilds the
//! machine with [`OtaMachine::resume`]:
//!
//! - Downloading resumes at the record's offset: everything before it was
//!   durably written before the record was stored; anything after it is
//!   written again.
//! - The SHA-256 state is never persisted. Instead the image is verified **by
//!   reading the whole slot back** once the last byte is written (streaming,
//!   through a caller-provided buffer, [`OtaMachine::verify_step`]). This
//!   checks what actually landed in flash rather than what was received, so a
//!   torn write, a stale record, a bit flip or a chunk lost across a reboot
//!   can only ever end in [`OtaOutcome::DigestMismatch`], never in a corrupt
//!   image being booted. Verifying restarts from byte 0 after a reboot.
//! - ReadyToReboot (verified, reboot not yet requested) re-verifies after a
//!   reboot, so an update is only ever activated right after a verification.
//! - PendingConfirmation is persisted *before* the boot slot is switched. On
//!   boot, [`BootedImage::Updated`] means the new image runs and must confirm
//!   itself; [`BootedImage::Previous`] means the bootloader rolled back (or power
//!   was lost in the instant between persisting and switching), reported as
//!   [`OtaOutcome::RolledBack`].

mod machine;
mod record;
mod slot;
mod verify;
mod wire;

use core::fmt;

pub use machine::{BootAction, BootedImage, OtaActions, OtaMachine, Persist};
pub use record::{OTA_RECORD_FORMAT, OTA_RECORD_LEN_MAX, OtaPhase, OtaRecord};
pub use slot::{MemorySlot, MemorySlotError, OtaSlot, StorageSlot};
pub use verify::{ImageHasher, OtaConfig};
pub use wire::{
    Chunk, ChunkRequest, MANIFEST_SIGNING_CONTEXT, MANIFEST_SIGNING_LEN_MAX, Manifest, ManifestSignature,
    OTA_CHUNK_LEN_MAX, OtaOffer, OtaOutcome, OtaProgress, OtaResult, OtaStateKind, SIGNATURE_LEN,
    SignedManifest,
};

/// Why an OTA operation was refused or failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum OtaError {
    /// A caller-provided buffer is too small (or empty).
    BufferTooSmall,
    /// A record or message could not be encoded or decoded.
    Encoding,
    /// A persisted record has an unknown format version.
    RecordFormat,
    /// The manifest signature does not verify under the firmware signing key.
    SignatureInvalid,
    /// The image is built for another chip.
    WrongChip,
    /// The image's secure version is below the device's anti-rollback floor.
    Downgrade,
    /// The image is not newer than the running firmware.
    NotNewer,
    /// The image does not fit in the OTA slot.
    ImageTooLarge,
    /// The battery is below the manifest's minimum.
    BatteryTooLow,
    /// The image size or the number of bytes received is wrong.
    SizeMismatch,
    /// The image's SHA-256 does not match the manifest.
    DigestMismatch,
    /// A chunk belongs to another rollout.
    WrongRollout,
    /// A chunk is not at the offset the machine asked for.
    WrongOffset,
    /// A chunk is longer than the negotiated chunk length.
    ChunkTooLarge,
    /// A chunk would write past the end of the image.
    ChunkOverflow,
    /// A chunk arrived while no download is in progress.
    NotDownloading,
    /// Writing or preparing the OTA slot failed.
    SlotWrite,
    /// Reading the OTA slot back failed.
    SlotRead,
    /// The call is not valid in the machine's current state.
    InvalidState,
}

impl OtaError {
    /// The outcome to report when this error ends (or refuses) an update.
    pub const fn outcome(self) -> OtaOutcome {
        match self {
            Self::SignatureInvalid => OtaOutcome::SignatureInvalid,
            Self::WrongChip => OtaOutcome::WrongChip,
            Self::Downgrade => OtaOutcome::Downgrade,
            Self::NotNewer => OtaOutcome::NotNewer,
            Self::ImageTooLarge => OtaOutcome::ImageTooLarge,
            Self::BatteryTooLow => OtaOutcome::BatteryTooLow,
            Self::SizeMismatch | Self::ChunkOverflow => OtaOutcome::SizeMismatch,
            Self::DigestMismatch => OtaOutcome::DigestMismatch,
            Self::SlotWrite => OtaOutcome::WriteFailed,
            Self::SlotRead => OtaOutcome::ReadFailed,
            Self::InvalidState => OtaOutcome::Busy,
            _ => OtaOutcome::Aborted,
        }
    }
}

impl fmt::Display for OtaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::BufferTooSmall => "buffer too small",
            Self::Encoding => "OTA record or message could not be encoded or decoded",
            Self::RecordFormat => "OTA record has an unknown format version",
            Self::SignatureInvalid => "manifest signature is invalid",
            Self::WrongChip => "image is built for another chip",
            Self::Downgrade => "image secure version is below the anti-rollback floor",
            Self::NotNewer => "image is not newer than the running firmware",
            Self::ImageTooLarge => "image does not fit in the OTA slot",
            Self::BatteryTooLow => "battery below the manifest minimum",
            Self::SizeMismatch => "image size does not match the manifest",
            Self::DigestMismatch => "image SHA-256 does not match the manifest",
            Self::WrongRollout => "chunk belongs to another rollout",
            Self::WrongOffset => "chunk is not at the expected offset",
            Self::ChunkTooLarge => "chunk is longer than the negotiated chunk length",
            Self::ChunkOverflow => "chunk would write past the end of the image",
            Self::NotDownloading => "no download in progress",
            Self::SlotWrite => "writing the OTA slot failed",
            Self::SlotRead => "reading the OTA slot failed",
            Self::InvalidState => "not valid in the current OTA state",
        })
    }
}

impl core::error::Error for OtaError {}
