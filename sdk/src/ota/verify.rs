//! What the device accepts: the offer checks and the image digest.

use core::fmt;

use sha2::{Digest, Sha256};

use super::OtaError;
use super::wire::{Manifest, SignedManifest};
use crate::protocol::{Chip, FirmwareVersion};

/// What the device knows about itself, fixed for the life of the running
/// firmware.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct OtaConfig {
    /// The firmware signing public key, baked into the firmware. Never take
    /// it from the network.
    pub signing_public_key: [u8; 32],
    /// The chip this firmware runs on.
    pub chip: Chip,
    /// The running firmware's version.
    pub running_version: FirmwareVersion,
    /// The device's anti-rollback floor: images with a lower secure version
    /// are refused whatever else is allowed.
    pub secure_version: u32,
    /// Accept images whose version is not newer than the running one (same
    /// version reinstall, or a downgrade that respects the secure version).
    /// Off by default.
    pub allow_not_newer: bool,
    /// Ask for the record to be persisted once at least this many bytes were
    /// written since the last time (`0`: after every chunk). Larger values
    /// wear the record's flash less and redo more after a power loss.
    pub persist_every: u32,
}

impl OtaConfig {
    /// A configuration that only accepts newer images and persists after
    /// every chunk.
    pub const fn new(
        signing_public_key: [u8; 32],
        chip: Chip,
        running_version: FirmwareVersion,
        secure_version: u32,
    ) -> Self {
        Self {
            signing_public_key,
            chip,
            running_version,
            secure_version,
            allow_not_newer: false,
            persist_every: 0,
        }
    }

    /// Checks a manifest before anything is written, in this order:
    /// signature, chip, secure version, version, size (non-empty, fits in a
    /// slot of `slot_capacity` bytes), battery (`battery_mv`; pass
    /// `u16::MAX` on mains power).
    pub fn check_offer<'m>(
        &self,
        signed: &'m SignedManifest,
        slot_capacity: u32,
        battery_mv: u16,
    ) -> Result<&'m Manifest, OtaError> {
        let manifest = signed.verify(&self.signing_public_key)?;
        self.check_target(manifest)?;
        check_size(manifest, slot_capacity)?;
        if battery_mv < manifest.min_battery_mv {
            return Err(OtaError::BatteryTooLow);
        }
        Ok(manifest)
    }

    /// Chip, anti-rollback and version policy.
    fn check_target(&self, manifest: &Manifest) -> Result<(), OtaError> {
        if manifest.chip != self.chip {
            return Err(OtaError::WrongChip);
        }
        if manifest.secure_version < self.secure_version {
            return Err(OtaError::Downgrade);
        }
        if manifest.version <= self.running_version && !self.allow_not_newer {
            return Err(OtaError::NotNewer);
        }
        Ok(())
    }

    /// Re-checks a manifest read back from a persisted record: signature and
    /// chip only (the version policy was applied when it was offered).
    pub(super) fn check_persisted(&self, signed: &SignedManifest) -> Result<(), OtaError> {
        let manifest = signed.verify(&self.signing_public_key)?;
        if manifest.chip != self.chip {
            return Err(OtaError::WrongChip);
        }
        if manifest.image_size == 0 {
            return Err(OtaError::SizeMismatch);
        }
        Ok(())
    }
}

fn check_size(manifest: &Manifest, slot_capacity: u32) -> Result<(), OtaError> {
    if manifest.image_size == 0 {
        return Err(OtaError::SizeMismatch);
    }
    if manifest.image_size > slot_capacity {
        return Err(OtaError::ImageTooLarge);
    }
    Ok(())
}

/// Streaming SHA-256 of an image plus its length, checked against a
/// manifest at the end.
#[derive(Clone, Default)]
pub struct ImageHasher {
    sha: Sha256,
    len: u64,
}

impl ImageHasher {
    /// An empty hasher.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the next bytes of the image.
    pub fn update(&mut self, data: &[u8]) {
        self.sha.update(data);
        self.len = self.len.saturating_add(data.len() as u64);
    }

    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was hashed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Checks the exact size, then the digest.
    pub fn finish(self, manifest: &Manifest) -> Result<(), OtaError> {
        if self.len != u64::from(manifest.image_size) {
            return Err(OtaError::SizeMismatch);
        }
        let digest: [u8; 32] = self.sha.finalize().into();
        if digest != manifest.image_sha256 {
            return Err(OtaError::DigestMismatch);
        }
        Ok(())
    }
}

impl fmt::Debug for ImageHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageHasher")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest_for(image: &[u8]) -> Manifest {
        Manifest {
            version: FirmwareVersion { major: 1, minor: 0, patch: 0 },
            secure_version: 0,
            chip: Chip::Esp32c3,
            image_size: image.len() as u32,
            image_sha256: Sha256::digest(image).into(),
            min_battery_mv: 0,
        }
    }

    #[test]
    fn hasher_streams() {
        let image: [u8; 300] = core::array::from_fn(|i| (i * 7) as u8);
        let manifest = manifest_for(&image);
        let mut hasher = ImageHasher::new();
        assert!(hasher.is_empty());
        for piece in image.chunks(17) {
            hasher.update(piece);
        }
        assert_eq!(hasher.len(), 300);
        assert_eq!(hasher.finish(&manifest), Ok(()));
    }

    #[test]
    fn hasher_checks_size_then_digest() {
        let image = [5u8; 64];
        let manifest = manifest_for(&image);
        let mut short = ImageHasher::new();
        short.update(&image[..63]);
        assert_eq!(short.finish(&manifest), Err(OtaError::SizeMismatch));
        let mut long = ImageHasher::new();
        long.update(&image);
        long.update(&[0]);
        assert_eq!(long.finish(&manifest), Err(OtaError::SizeMismatch));
        let mut wrong = ImageHasher::new();
        wrong.update(&[6u8; 64]);
        assert_eq!(wrong.finish(&manifest), Err(OtaError::DigestMismatch));
    }

    #[test]
    fn target_policy() {
        let running = FirmwareVersion { major: 1, minor: 0, patch: 0 };
        let mut config = OtaConfig::new([0; 32], Chip::Esp32c3, running, 5);
        let mut manifest = manifest_for(&[1, 2, 3]);
        manifest.secure_version = 5;
        assert_eq!(config.check_target(&manifest), Err(OtaError::NotNewer));
        config.allow_not_newer = true;
        assert_eq!(config.check_target(&manifest), Ok(()));
        manifest.secure_version = 4;
        assert_eq!(config.check_target(&manifest), Err(OtaError::Downgrade));
        manifest.chip = Chip::Esp32c6;
        assert_eq!(config.check_target(&manifest), Err(OtaError::WrongChip));
        assert_eq!(check_size(&manifest, 2), Err(OtaError::ImageTooLarge));
        assert_eq!(check_size(&manifest, 3), Ok(()));
        manifest.image_size = 0;
        assert_eq!(check_size(&manifest, 3), Err(OtaError::SizeMismatch));
    }
}
