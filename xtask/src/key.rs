//! Firmware-signing key files, as `keygen` writes them and `sign` reads them.
//!
//! - Private key: PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), mode 0600. The loader
//!   refuses a file that group or others can read.
//! - Public key: the private key's path plus `.pub`, SubjectPublicKeyInfo PEM
//!   (`-----BEGIN PUBLIC KEY-----`). Both are what `openssl pkey` reads.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey};
use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Mode bits that must be clear on a private key file: any group or other access.
const GROUP_OR_OTHER_ACCESS: u32 = 0o077;

/// Where the public key of the private key at `private_key` lives: `<path>.pub`.
pub fn public_key_path(private_key: &Path) -> PathBuf {
    let mut name = private_key.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

/// Loads a private key written by `keygen`, refusing one others could read.
pub fn load_signing_key(path: &Path) -> Result<SigningKey> {
    refuse_shared_access(path)?;
    let pem = Zeroizing::new(
        fs::read_to_string(path).with_context(|| format!("could not read key file {}", path.display()))?,
    );
    SigningKey::from_pkcs8_pem(&pem)
        .map_err(|error| anyhow!("{} is not a PKCS#8 PEM ed25519 private key: {error}", path.display()))
}

/// Loads a public key file (`<private key>.pub`).
pub fn load_verifying_key(path: &Path) -> Result<VerifyingKey> {
    let pem = fs::read_to_string(path).with_context(|| format!("could not read {}", path.display()))?;
    VerifyingKey::from_public_key_pem(&pem)
        .map_err(|error| anyhow!("{} is not a PEM ed25519 public key: {error}", path.display()))
}

/// Lowercase hex of the raw 32-byte public key, as firmware embeds it.
pub fn public_key_hex(key: &VerifyingKey) -> String {
    hex(key.as_bytes())
}

/// `SHA256:` and the hex SHA-256 of the raw public key: a short, stable name for a
/// key in logs and release notes.
pub fn fingerprint(key: &VerifyingKey) -> String {
    format!("SHA256:{}", hex(&Sha256::digest(key.as_bytes())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Fails unless only the owner may access `path`.
fn refuse_shared_access(path: &Path) -> Result<()> {
    let metadata =
        fs::metadata(path).with_context(|| format!("could not read key file {}", path.display()))?;
    if !metadata.is_file() {
        bail!("key file {} is not a regular file", path.display());
    }
    let mode = metadata.permissions().mode() & 0o777;
    if mode & GROUP_OR_OTHER_ACCESS != 0 {
        bail!(
            "key file {} has mode {mode:03o}, so group or others can read it; a signing key must be \
             private to its owner: `chmod 600 {}` (and consider the key leaked if others could read it)",
            path.display(),
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::Permissions;

    #[test]
    fn public_key_path_appends_pub() {
        assert_eq!(public_key_path(Path::new("keys/fw.key")), Path::new("keys/fw.key.pub"));
    }

    #[test]
    fn loader_refuses_a_key_others_can_read() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("shared.key");
        fs::write(&path, "not even a key").unwrap();
        fs::set_permissions(&path, Permissions::from_mode(0o640)).unwrap();
        let error = load_signing_key(&path).unwrap_err().to_string();
        assert!(error.contains("mode 640") && error.contains("chmod 600"), "{error}");
    }

    #[test]
    fn loader_names_a_missing_or_malformed_file() {
        let directory = tempfile::tempdir().unwrap();
        let missing = directory.path().join("missing.key");
        assert!(
            load_signing_key(&missing)
                .unwrap_err()
                .to_string()
                .contains("missing.key")
        );
        let garbage = directory.path().join("garbage.key");
        fs::write(&garbage, "-----BEGIN PRIVATE KEY-----\n").unwrap();
        fs::set_permissions(&garbage, Permissions::from_mode(0o600)).unwrap();
        let error = load_signing_key(&garbage).unwrap_err().to_string();
        assert!(error.contains("not a PKCS#8 PEM ed25519 private key"), "{error}");
    }

    #[test]
    fn fingerprint_is_sha256_of_the_raw_key() {
        let key = SigningKey::from_bytes(&[7; 32]).verifying_key();
        let fingerprint = fingerprint(&key);
        assert_eq!(fingerprint.len(), "SHA256:".len() + 64);
        assert_eq!(public_key_hex(&key).len(), 64);
    }
}
