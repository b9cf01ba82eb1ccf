//! Standard base64 (RFC 4648 §4, with padding) for the manifest header, and
//! the firmware signing public keys `[ota] signing_keys` accepts: 64 hex
//! digits, or the path of the `.pub` file `cargo xtask keygen` writes (a
//! SubjectPublicKeyInfo PEM, `-----BEGIN PUBLIC KEY-----`).

use std::path::Path;

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE,
/// AlgorithmIdentifier { id-Ed25519 }, BIT STRING of 33 bytes (no unused bits);
/// the raw 32-byte key follows.
const ED25519_SPKI_PREFIX: [u8; 12] =
    [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

/// Standard base64 of `bytes`, padded.
pub fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let b = [group[0], *group.get(1).unwrap_or(&0), *group.get(2).unwrap_or(&0)];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= group.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 0x3f) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard padded base64; `None` on any other character, a bad
/// length or misplaced padding. ASCII whitespace is ignored (PEM lines).
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let symbols: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !symbols.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(symbols.len() / 4 * 3);
    let groups = symbols.len() / 4;
    for (index, group) in symbols.chunks_exact(4).enumerate() {
        let padding = group.iter().rev().take_while(|&&b| b == b'=').count();
        if padding > 2 || (padding > 0 && index + 1 != groups) {
            return None;
        }
        let mut n = 0u32;
        for &symbol in &group[..4 - padding] {
            let value = ALPHABET.iter().position(|&a| a == symbol)?;
            n = n << 6 | value as u32;
        }
        n <<= 6 * padding as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - padding]);
    }
    Some(out)
}

/// A signing public key from its configured form: 64 hex digits, or the
/// path of a PEM public key file.
pub fn signing_key(entry: &str) -> Result<[u8; 32], String> {
    if let Some(key) = crate::api::parse_key_hex(entry) {
        return Ok(key);
    }
    let looks_like_hex = entry.bytes().all(|b| b.is_ascii_hexdigit());
    if looks_like_hex && !entry.is_empty() {
        return Err(format!("{entry:?} is neither 64 hex digits nor a public key file"));
    }
    let pem = std::fs::read_to_string(Path::new(entry))
        .map_err(|error| format!("could not read public key file {entry}: {error}"))?;
    pem_public_key(&pem).ok_or_else(|| format!("{entry} is not a PEM ed25519 public key (`cargo xtask keygen` writes one next to the private key, ending in .pub)"))
}

/// The raw key of an Ed25519 `-----BEGIN PUBLIC KEY-----` PEM block.
pub fn pem_public_key(pem: &str) -> Option<[u8; 32]> {
    let body = pem
        .split("-----BEGIN PUBLIC KEY-----")
        .nth(1)?
        .split("-----END PUBLIC KEY-----")
        .next()?;
    let der = base64_decode(body)?;
    let key = der.strip_prefix(&ED25519_SPKI_PREFIX[..])?;
    key.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_and_refuses_garbage() {
        for len in 0..40 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let text = base64_encode(&bytes);
            assert_eq!(base64_decode(&text), Some(bytes), "{text}");
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_decode("Zm8="), Some(b"fo".to_vec()));
        assert_eq!(base64_decode("Zm8"), None);
        assert_eq!(base64_decode("Zm8=Zm8="), None);
        assert_eq!(base64_decode("Z===",), None);
        assert_eq!(base64_decode("Zm-="), None);
    }

    #[test]
    fn keys_from_hex_or_pem_files() {
        let key: [u8; 32] = std::array::from_fn(|i| i as u8 + 1);
        assert_eq!(signing_key(&crate::api::to_hex(&key)), Ok(key));
        let mut der = ED25519_SPKI_PREFIX.to_vec();
        der.extend_from_slice(&key);
        let pem = format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n", base64_encode(&der));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fw.key.pub");
        std::fs::write(&path, &pem).unwrap();
        assert_eq!(signing_key(path.to_str().unwrap()), Ok(key));
        let error = signing_key("abcd").unwrap_err();
        assert!(error.contains("64 hex digits"), "{error}");
        let error = signing_key(dir.path().join("missing.pub").to_str().unwrap()).unwrap_err();
        assert!(error.contains("missing.pub"), "{error}");
        std::fs::write(&path, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").unwrap();
        assert!(signing_key(path.to_str().unwrap()).is_err());
    }
}
