//! OTA messages as they travel on the wire (postcard). The protocol module
//! wraps them with its version and kind header.
//!
//! Enum variants are only ever appended: postcard encodes the variant index.

use ed25519_dalek::{Signature, VerifyingKey};
use postcard::experimental::max_size::MaxSize;
use serde::{Deserialize, Serialize};

use super::OtaError;
use crate::protocol::{Chip, FirmwareVersion};

/// Largest chunk of image data in one [`Chunk`], in bytes.
pub const OTA_CHUNK_LEN_MAX: usize = 1024;
pub use crate::signature::SIGNATURE_LEN;
/// Domain separation prefix of the signed manifest message.
pub const MANIFEST_SIGNING_CONTEXT: &[u8; 24] = b"wildcam-ota-manifest-v1\0";
/// Longest message [`Manifest::signing_bytes`] produces.
pub const MANIFEST_SIGNING_LEN_MAX: usize = MANIFEST_SIGNING_CONTEXT.len() + Manifest::POSTCARD_MAX_SIZE;

/// What a firmware image is, as signed by the firmware signing key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Manifest {
    /// The image's firmware version.
    pub version: FirmwareVersion,
    /// Anti-rollback counter: a device never installs an image whose secure
    /// version is below its own, and raises its own on confirmation.
    pub secure_version: u32,
    /// The chip the image is built for.
    pub chip: Chip,
    /// Exact image length, in bytes.
    pub image_size: u32,
    /// SHA-256 of the whole image.
    pub image_sha256: [u8; 32],
    /// Minimum battery voltage to start the update, in millivolts.
    pub min_battery_mv: u16,
}

impl Manifest {
    /// The exact message the firmware signing key signs:
    /// [`MANIFEST_SIGNING_CONTEXT`] followed by the postcard encoding of the
    /// manifest. The xtask signer and the device both use this function.
    ///
    /// `buf` needs [`MANIFEST_SIGNING_LEN_MAX`] bytes at most.
    pub fn signing_bytes<'b>(&self, buf: &'b mut [u8]) -> Result<&'b [u8], OtaError> {
        let context_len = MANIFEST_SIGNING_CONTEXT.len();
        let (context, rest) = buf
            .split_at_mut_checked(context_len)
            .ok_or(OtaError::BufferTooSmall)?;
        context.copy_from_slice(MANIFEST_SIGNING_CONTEXT);
        let encoded_len = postcard::to_slice(self, rest)
            .map_err(|_| OtaError::BufferTooSmall)?
            .len();
        Ok(&buf[..context_len + encoded_len])
    }
}

/// The signature of a [`SignedManifest`] (see [`crate::signature`]).
pub use crate::signature::Signature64 as ManifestSignature;

/// A manifest and its ed25519 signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct SignedManifest {
    /// The signed manifest.
    pub manifest: Manifest,
    /// Signature over [`Manifest::signing_bytes`].
    pub signature: ManifestSignature,
}

impl SignedManifest {
    /// Checks the signature (strict ed25519) against the firmware signing
    /// public key baked into the firmware, and returns the manifest if valid.
    pub fn verify(&self, signing_public_key: &[u8; 32]) -> Result<&Manifest, OtaError> {
        let key = VerifyingKey::from_bytes(signing_public_key).map_err(|_| OtaError::SignatureInvalid)?;
        let mut buf = [0u8; MANIFEST_SIGNING_LEN_MAX];
        let message = self.manifest.signing_bytes(&mut buf)?;
        let signature = Signature::from_bytes(&self.signature.0);
        key.verify_strict(message, &signature)
            .map_err(|_| OtaError::SignatureInvalid)?;
        Ok(&self.manifest)
    }
}

/// Server → device: an update is available.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct OtaOffer {
    /// Server-chosen id of this rollout; every later message carries it.
    pub rollout_id: u32,
    /// What to install.
    pub manifest: SignedManifest,
    /// Largest chunk the server will send; `0` or anything above
    /// [`OTA_CHUNK_LEN_MAX`] means [`OTA_CHUNK_LEN_MAX`].
    pub chunk_len: u16,
}

/// Device → server: send `len` image bytes starting at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ChunkRequest {
    /// The rollout being downloaded.
    pub rollout_id: u32,
    /// First byte wanted.
    pub offset: u32,
    /// Number of bytes wanted (never more than the negotiated chunk length nor
    /// past the end of the image).
    pub len: u16,
}

/// Server → device: image bytes. An empty chunk at the expected offset means
/// the server has no more bytes (the image is shorter than the manifest says).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Chunk {
    /// The rollout the bytes belong to.
    pub rollout_id: u32,
    /// Position of the first byte in the image.
    pub offset: u32,
    /// The bytes.
    pub data: heapless::Vec<u8, OTA_CHUNK_LEN_MAX>,
}

/// Coarse update state, as reported to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum OtaStateKind {
    /// No update in progress.
    Idle,
    /// Fetching chunks into the OTA slot.
    Downloading,
    /// Reading the slot back and checking size and SHA-256.
    Verifying,
    /// Image verified; waiting for the firmware to reboot into it.
    ReadyToReboot,
    /// Switched (or switching) to the new image, which has not confirmed
    /// itself yet.
    PendingConfirmation,
    /// The new image confirmed itself.
    Confirmed,
    /// The new image failed its self-test or the bootloader rolled back.
    RolledBack,
    /// The update failed before the reboot.
    Failed,
}

/// Device → server: how far an update got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct OtaProgress {
    /// The rollout.
    pub rollout_id: u32,
    /// Bytes received and written so far.
    pub offset: u32,
    /// Current state.
    pub state: OtaStateKind,
}

/// How an update ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum OtaOutcome {
    /// The new image runs and confirmed itself.
    Confirmed,
    /// The manifest signature is invalid.
    SignatureInvalid,
    /// The image is built for another chip.
    WrongChip,
    /// The image's secure version is below the device's anti-rollback floor.
    Downgrade,
    /// The image is not newer than the running firmware.
    NotNewer,
    /// The image does not fit in the OTA slot.
    ImageTooLarge,
    /// The battery was below the manifest's minimum.
    BatteryTooLow,
    /// The image's SHA-256 (read back from flash) does not match.
    DigestMismatch,
    /// The image is empty, or the server ran out of bytes early.
    SizeMismatch,
    /// Writing the OTA slot failed.
    WriteFailed,
    /// Reading the OTA slot back failed.
    ReadFailed,
    /// The new image failed its self-test and was rolled back.
    SelfTestFailed,
    /// The bootloader rolled back to the previous image.
    RolledBack,
    /// The update was aborted (by the firmware, or its record was unusable).
    Aborted,
    /// A newer rollout replaced this one.
    Superseded,
    /// Another update is awaiting confirmation; offer again later.
    Busy,
}

impl OtaOutcome {
    /// Whether the update succeeded.
    pub const fn is_success(self) -> bool {
        matches!(self, Self::Confirmed)
    }

    /// Whether the outcome happened after rebooting into the new image.
    pub const fn is_rollback(self) -> bool {
        matches!(self, Self::SelfTestFailed | Self::RolledBack)
    }
}

/// Device → server: the final word on a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct OtaResult {
    /// The rollout.
    pub rollout_id: u32,
    /// The version the rollout offered.
    pub version: FirmwareVersion,
    /// How it ended.
    pub outcome: OtaOutcome,
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::{Signer, SigningKey};

    use super::*;

    fn max_manifest() -> Manifest {
        Manifest {
            version: FirmwareVersion { major: u16::MAX, minor: u16::MAX, patch: u16::MAX },
            secure_version: u32::MAX,
            chip: Chip::Host,
            image_size: u32::MAX,
            image_sha256: [0xff; 32],
            min_battery_mv: u16::MAX,
        }
    }

    fn signed(manifest: Manifest, key: &SigningKey) -> SignedManifest {
        let mut buf = [0u8; MANIFEST_SIGNING_LEN_MAX];
        let signature = key.sign(manifest.signing_bytes(&mut buf).unwrap());
        SignedManifest { manifest, signature: ManifestSignature(signature.to_bytes()) }
    }

    fn encoded_len<T: Serialize>(value: &T) -> usize {
        let mut buf = [0u8; 2048];
        postcard::to_slice(value, &mut buf).unwrap().len()
    }

    #[test]
    fn signature_is_64_raw_bytes() {
        let signature = ManifestSignature(core::array::from_fn(|i| i as u8));
        let mut buf = [0u8; 80];
        let bytes = postcard::to_slice(&signature, &mut buf).unwrap();
        assert_eq!(bytes.len(), ManifestSignature::POSTCARD_MAX_SIZE);
        assert_eq!(bytes, &signature.0[..]);
        assert_eq!(postcard::from_bytes::<ManifestSignature>(bytes).unwrap(), signature);
        assert!(postcard::from_bytes::<ManifestSignature>(&bytes[..63]).is_err());
    }

    #[test]
    fn signature_round_trips_through_json() {
        let signature = ManifestSignature([9; SIGNATURE_LEN]);
        let json = serde_json::to_string(&signature).unwrap();
        assert_eq!(serde_json::from_str::<ManifestSignature>(&json).unwrap(), signature);
        let short = serde_json::to_string(&[9u8; 63].as_slice()).unwrap();
        assert!(serde_json::from_str::<ManifestSignature>(&short).is_err());
        let long = serde_json::to_string(&[9u8; 65].as_slice()).unwrap();
        assert!(serde_json::from_str::<ManifestSignature>(&long).is_err());
    }

    #[test]
    fn max_sizes_match_largest_encodings() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let manifest = max_manifest();
        assert_eq!(encoded_len(&manifest), Manifest::POSTCARD_MAX_SIZE);
        let signed = signed(manifest, &key);
        assert_eq!(encoded_len(&signed), SignedManifest::POSTCARD_MAX_SIZE);
        let offer = OtaOffer { rollout_id: u32::MAX, manifest: signed, chunk_len: u16::MAX };
        assert_eq!(encoded_len(&offer), OtaOffer::POSTCARD_MAX_SIZE);
        let request = ChunkRequest { rollout_id: u32::MAX, offset: u32::MAX, len: u16::MAX };
        assert_eq!(encoded_len(&request), ChunkRequest::POSTCARD_MAX_SIZE);
        let mut data = heapless::Vec::new();
        data.resize(OTA_CHUNK_LEN_MAX, 0xff).unwrap();
        let chunk = Chunk { rollout_id: u32::MAX, offset: u32::MAX, data };
        assert_eq!(encoded_len(&chunk), Chunk::POSTCARD_MAX_SIZE);
        let progress = OtaProgress { rollout_id: u32::MAX, offset: u32::MAX, state: OtaStateKind::Failed };
        assert_eq!(encoded_len(&progress), OtaProgress::POSTCARD_MAX_SIZE);
        let result =
            OtaResult { rollout_id: u32::MAX, version: max_manifest().version, outcome: OtaOutcome::Busy };
        assert_eq!(encoded_len(&result), OtaResult::POSTCARD_MAX_SIZE);
    }

    #[test]
    fn signing_bytes_are_context_then_postcard() {
        let manifest = max_manifest();
        let mut buf = [0u8; MANIFEST_SIGNING_LEN_MAX];
        let message = manifest.signing_bytes(&mut buf).unwrap();
        assert_eq!(message.len(), MANIFEST_SIGNING_LEN_MAX);
        let (context, body) = message.split_at(MANIFEST_SIGNING_CONTEXT.len());
        assert_eq!(context, MANIFEST_SIGNING_CONTEXT);
        assert_eq!(postcard::from_bytes::<Manifest>(body).unwrap(), manifest);
        let mut small = [0u8; MANIFEST_SIGNING_LEN_MAX - 1];
        assert_eq!(manifest.signing_bytes(&mut small), Err(OtaError::BufferTooSmall));
        assert_eq!(manifest.signing_bytes(&mut [0u8; 10]), Err(OtaError::BufferTooSmall));
    }

    #[test]
    fn verify_accepts_only_the_signing_key() {
        let key = SigningKey::from_bytes(&[2; 32]);
        let public = key.verifying_key().to_bytes();
        let good = signed(max_manifest(), &key);
        assert_eq!(good.verify(&public), Ok(&good.manifest));
        let other = SigningKey::from_bytes(&[3; 32]).verifying_key().to_bytes();
        assert_eq!(good.verify(&other), Err(OtaError::SignatureInvalid));
        let mut flipped = good.clone();
        flipped.signature.0[40] ^= 1;
        assert_eq!(flipped.verify(&public), Err(OtaError::SignatureInvalid));
        // A small-order public key is refused by strict verification.
        assert_eq!(good.verify(&[0; 32]), Err(OtaError::SignatureInvalid));
    }

    #[test]
    fn signature_without_context_is_refused() {
        let key = SigningKey::from_bytes(&[4; 32]);
        let manifest = max_manifest();
        let mut buf = [0u8; MANIFEST_SIGNING_LEN_MAX];
        let body = postcard::to_slice(&manifest, &mut buf).unwrap();
        let signature = ManifestSignature(key.sign(body).to_bytes());
        let bare = SignedManifest { manifest, signature };
        assert_eq!(bare.verify(&key.verifying_key().to_bytes()), Err(OtaError::SignatureInvalid));
    }
}
