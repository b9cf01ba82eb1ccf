//! Uploaded firmware: the checks an upload passes before anything is stored,
//! and the image files.
//!
//! Images live in `<data_dir>/firmware/<sha256 hex>.bin`, written to a
//! temporary file in the same directory, synced, renamed into place and the
//! directory synced: a crash leaves either no file or the whole image, and
//! the database row is inserted only after the file is durable. Content
//! addressing makes a repeated upload rewrite the same bytes.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wildcam_sdk::ota::SignedManifest;

use crate::api::to_hex;

/// Subdirectory of the data directory holding images.
pub const FIRMWARE_DIR: &str = "firmware";

/// Why an upload is refused, before anything is stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UploadError {
    /// No manifest header.
    #[error("missing header {0} (standard base64 of the signed manifest file)")]
    ManifestMissing(&'static str),
    /// The header is not base64 of a postcard `SignedManifest`.
    #[error("{0}")]
    ManifestInvalid(String),
    /// No firmware signing key is configured.
    #[error("no firmware signing key is configured ([ota] signing_keys): uploads are refused")]
    NoSigningKey,
    /// The signature verifies under none of the configured keys.
    #[error("the manifest signature is not valid under any of the {0} configured signing key(s)")]
    SignatureInvalid(usize),
    /// The image (or the size the manifest announces) exceeds the limit.
    #[error("image of {size} bytes exceeds the limit of {max} bytes ([ota] max_image_bytes)")]
    TooLarge {
        /// Its size.
        size: u64,
        /// The limit.
        max: u32,
    },
    /// The image's length differs from the manifest's.
    #[error("image is {actual} bytes, the manifest says {expected}")]
    SizeMismatch {
        /// From the manifest.
        expected: u32,
        /// Received.
        actual: usize,
    },
    /// The image's SHA-256 differs from the manifest's.
    #[error("image SHA-256 is {actual}, the manifest says {expected}")]
    DigestMismatch {
        /// From the manifest, hex.
        expected: String,
        /// Of the received bytes, hex.
        actual: String,
    },
}

/// Decodes the manifest header: standard base64 of the postcard file
/// `cargo xtask sign` writes, with nothing after the manifest.
pub fn parse_manifest_header(value: &str) -> Result<SignedManifest, UploadError> {
    let bytes = super::base64_decode(value.trim())
        .ok_or_else(|| UploadError::ManifestInvalid("the manifest header is not standard base64".into()))?;
    let (manifest, rest) = postcard::take_from_bytes::<SignedManifest>(&bytes)
        .map_err(|e| UploadError::ManifestInvalid(format!("the manifest does not decode: {e}")))?;
    if !rest.is_empty() {
        return Err(UploadError::ManifestInvalid(format!("{} bytes follow the manifest", rest.len())));
    }
    Ok(manifest)
}

/// The configured key the manifest's signature verifies under.
pub fn verify_signature(manifest: &SignedManifest, keys: &[[u8; 32]]) -> Result<[u8; 32], UploadError> {
    if keys.is_empty() {
        return Err(UploadError::NoSigningKey);
    }
    keys.iter()
        .find(|key| manifest.verify(key).is_ok())
        .copied()
        .ok_or(UploadError::SignatureInvalid(keys.len()))
}

/// Refuses a manifest announcing more than `max` bytes.
pub fn check_announced_size(manifest: &SignedManifest, max: u32) -> Result<(), UploadError> {
    let size = manifest.manifest.image_size;
    if size > max {
        return Err(UploadError::TooLarge { size: size.into(), max });
    }
    Ok(())
}

/// Checks the image's length and SHA-256 against the manifest.
pub fn check_image(manifest: &SignedManifest, image: &[u8]) -> Result<(), UploadError> {
    let expected = manifest.manifest.image_size;
    if usize::try_from(expected).ok() != Some(image.len()) {
        return Err(UploadError::SizeMismatch { expected, actual: image.len() });
    }
    let digest: [u8; 32] = Sha256::digest(image).into();
    if digest != manifest.manifest.image_sha256 {
        return Err(UploadError::DigestMismatch {
            expected: to_hex(&manifest.manifest.image_sha256),
            actual: to_hex(&digest),
        });
    }
    Ok(())
}

/// The image files of a data directory.
#[derive(Debug, Clone)]
pub struct ImageFiles {
    dir: PathBuf,
}

impl ImageFiles {
    /// The images under `data_dir`.
    pub fn new(data_dir: &Path) -> Self {
        Self { dir: data_dir.join(FIRMWARE_DIR) }
    }

    /// Where the image with this SHA-256 lives.
    pub fn path(&self, sha256: &[u8; 32]) -> PathBuf {
        self.dir.join(format!("{}.bin", to_hex(sha256)))
    }

    /// Writes `image` durably under its SHA-256 (blocking).
    pub fn write(&self, sha256: &[u8; 32], image: &[u8]) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let target = self.path(sha256);
        let mut nonce = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce);
        let temporary = self
            .dir
            .join(format!(".{}.{}.tmp", to_hex(sha256), to_hex(&nonce)));
        let written = (|| {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&temporary)?;
            file.write_all(image)?;
            file.sync_all()?;
            std::fs::rename(&temporary, &target)?;
            std::fs::File::open(&self.dir)?.sync_all()
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&temporary);
        }
        written
    }

    /// Reads the image with this SHA-256 and checks its digest (blocking).
    pub fn read(&self, sha256: &[u8; 32]) -> std::io::Result<Vec<u8>> {
        let image = std::fs::read(self.path(sha256))?;
        let digest: [u8; 32] = Sha256::digest(&image).into();
        if digest != *sha256 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} does not hash to its name", self.path(sha256).display()),
            ));
        }
        Ok(image)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_content_addressed_and_checked_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let files = ImageFiles::new(dir.path());
        let image = b"firmware image bytes".to_vec();
        let sha: [u8; 32] = Sha256::digest(&image).into();
        files.write(&sha, &image).unwrap();
        files.write(&sha, &image).unwrap();
        assert_eq!(files.read(&sha).unwrap(), image);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join(FIRMWARE_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left: {leftovers:?}");
        std::fs::write(files.path(&sha), b"tampered").unwrap();
        assert_eq!(files.read(&sha).unwrap_err().kind(), std::io::ErrorKind::InvalidData);
    }

    #[test]
    fn header_must_be_exactly_one_manifest() {
        assert!(matches!(parse_manifest_header("***"), Err(UploadError::ManifestInvalid(_))));
        assert!(matches!(parse_manifest_header("AAAA"), Err(UploadError::ManifestInvalid(_))));
    }
}
