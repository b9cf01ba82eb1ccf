//! Secret-derived values: hashes kept instead of secrets, compared in
//! constant time, and never shown by `Debug`.

use std::fmt;

use rand::RngCore;
use sha2::{Digest, Sha256};

use super::StoreError;

/// Domain separation of MQTT password hashes.
const MQTT_PASSWORD_DOMAIN: &[u8] = b"wildcam v1 mqtt password\0";

/// Whether `a` and `b` are equal, taking the same time wherever they differ
/// (lengths are not secret: they are compared first).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keeps the optimiser from turning the fold into an early exit.
    std::hint::black_box(difference) == 0
}

/// SHA-256 of a device's MQTT password, domain-separated. Passwords are 32
/// random bytes, so a plain (unsalted, fast) hash is as strong as the
/// password itself.
#[derive(Clone, PartialEq, Eq)]
pub struct PasswordHash([u8; 32]);

impl PasswordHash {
    /// The hash of `password`.
    pub fn of(password: &str) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(MQTT_PASSWORD_DOMAIN);
        hasher.update(password.as_bytes());
        Self(hasher.finalize().into())
    }

    /// Wraps stored hash bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The hash bytes, for storing.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Whether `password` hashes to this value (constant time).
    pub fn verify(&self, password: &str) -> bool {
        constant_time_eq(&Self::of(password).0, &self.0)
    }
}

impl fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PasswordHash(..)")
    }
}

/// A 32-byte digest as sensitive as the secret it comes from (a claim
/// token's `secret_digest`). `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretDigest([u8; 32]);

impl SecretDigest {
    /// Wraps digest bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Whether `other` is this digest (constant time).
    pub fn matches(&self, other: &[u8; 32]) -> bool {
        constant_time_eq(&self.0, other)
    }
}

impl fmt::Debug for SecretDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretDigest(..)")
    }
}

/// `N` bytes from the operating system's RNG.
pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N], StoreError> {
    let mut bytes = [0u8; N];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| StoreError::Random(e.to_string()))?;
    Ok(bytes)
}

/// Unpadded base64url (RFC 4648 §5) of `bytes`: the alphabet claim tokens
/// and API tokens are written in.
pub(crate) fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        // 2, 3 or 4 characters for 1, 2 or 3 input bytes.
        for i in 0..=chunk.len() {
            let index = (n >> (18 - 6 * i)) & 0x3f;
            out.push(char::from(ALPHABET[index as usize]));
        }
    }
    out
}

/// Lowercase hexadecimal of `bytes` (cursors, logs of public keys).
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses lowercase or uppercase hexadecimal into exactly `N` bytes.
pub(crate) fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(text.as_bytes().chunks(2)) {
        let pair = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn password_hash_verifies_only_the_password() {
        let hash = PasswordHash::of("s3cret");
        assert!(hash.verify("s3cret"));
        assert!(!hash.verify("s3cret "));
        assert_eq!(format!("{hash:?}"), "PasswordHash(..)");
    }

    #[test]
    fn base64url_matches_rfc_4648_vectors() {
        // RFC 4648 §10 test vectors, without padding.
        let cases =
            [("", ""), ("f", "Zg"), ("fo", "Zm8"), ("foo", "Zm9v"), ("foob", "Zm9vYg"), ("fooba", "Zm9vYmE")];
        for (input, expected) in cases {
            assert_eq!(base64url(input.as_bytes()), expected);
        }
        assert_eq!(base64url(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn hex_round_trips() {
        let bytes = [0u8, 0x7f, 0xff, 0x10];
        assert_eq!(hex(&bytes), "007fff10");
        assert_eq!(unhex::<4>("007fff10"), Some(bytes));
        assert_eq!(unhex::<4>("007fff1"), None);
        assert_eq!(unhex::<4>("007fff1g"), None);
    }
}
