//! Claim tokens and the factory allow-list.

use serde::Serialize;
use wildcam_sdk::provision::{CLAIM_ID_LEN_MAX, ClaimToken};

use super::device::check_label;
use super::secret::{base64url, random_bytes};
use super::{SecretDigest, StoreError, UnixMillis};

/// A claim token to store. Only the secret's digest is kept, never the secret.
#[derive(Debug, Clone)]
pub struct NewClaimToken {
    /// The public id (`ClaimToken::id`).
    pub id: String,
    /// `ClaimToken::secret_digest` of the token.
    pub secret_digest: SecretDigest,
    /// How many devices may claim with it (1: single use).
    pub uses_max: u32,
    /// After this instant the token is refused.
    pub expires_at_ms: UnixMillis,
    /// A note for operators (batch, customer...).
    pub label: String,
}

impl NewClaimToken {
    /// Checks the id's syntax, the use count and the label.
    pub(crate) fn validate(&self) -> Result<(), StoreError> {
        let id_ok = !self.id.is_empty()
            && self.id.len() <= CLAIM_ID_LEN_MAX
            && self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !id_ok {
            return Err(StoreError::invalid("claim token id must be 1 to 24 characters of [A-Za-z0-9_-]"));
        }
        if self.uses_max == 0 {
            return Err(StoreError::invalid("claim token uses_max must be at least 1"));
        }
        check_label("claim token label", &self.label)
    }
}

/// A freshly generated claim token: hand `token` to the operator once, store
/// `record`. `Debug` shows only the id.
pub struct GeneratedClaimToken {
    /// `{id}.{secret}`, to print on the trap's label or give to the installer.
    /// Shown once; only its digest is stored.
    pub token: String,
    /// What to pass to [`super::ClaimStore::create_claim_token`].
    pub record: NewClaimToken,
}

impl std::fmt::Debug for GeneratedClaimToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeneratedClaimToken")
            .field("id", &self.record.id)
            .finish_non_exhaustive()
    }
}

/// Generates a claim token with a random 12-character id (9 bytes) and a
/// 43-character secret (32 bytes), both base64url, as the SDK recommends.
pub fn generate_claim_token(
    uses_max: u32,
    expires_at_ms: UnixMillis,
    label: String,
) -> Result<GeneratedClaimToken, StoreError> {
    let id = base64url(&random_bytes::<9>()?);
    let secret = base64url(&random_bytes::<32>()?);
    let token = format!("{id}.{secret}");
    let parsed =
        ClaimToken::parse(&token).map_err(|e| StoreError::invalid(format!("generated claim token: {e}")))?;
    let record = NewClaimToken {
        id,
        secret_digest: SecretDigest::from_bytes(*parsed.secret_digest()),
        uses_max,
        expires_at_ms,
        label,
    };
    Ok(GeneratedClaimToken { token, record })
}

/// A stored claim token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClaimTokenInfo {
    /// The public id.
    pub id: String,
    /// The digest provisioning verifies a claim proof against. Never serialised.
    #[serde(skip)]
    pub secret_digest: SecretDigest,
    /// How many devices may claim with it.
    pub uses_max: u32,
    /// How many did.
    pub uses: u32,
    /// After this instant the token is refused.
    pub expires_at_ms: UnixMillis,
    /// When it was stored.
    pub created_at_ms: UnixMillis,
    /// When it was revoked, if it was.
    pub revoked_at_ms: Option<UnixMillis>,
    /// The operator's note.
    pub label: String,
}

impl ClaimTokenInfo {
    /// Whether a claim with this token would be accepted at `now_ms`, with
    /// the same checks (and errors) as [`super::DeviceStore::create_device`].
    pub fn check_usable(&self, now_ms: UnixMillis) -> Result<(), StoreError> {
        if self.revoked_at_ms.is_some() {
            return Err(StoreError::ClaimTokenRevoked(self.id.clone()));
        }
        if now_ms >= self.expires_at_ms {
            return Err(StoreError::ClaimTokenExpired(self.id.clone()));
        }
        if self.uses >= self.uses_max {
            return Err(StoreError::ClaimTokenExhausted(self.id.clone()));
        }
        Ok(())
    }
}

/// An identity key on the factory allow-list: it may claim without a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AllowedIdentity {
    /// The device's ed25519 identity public key.
    pub identity_key: [u8; 32],
    /// Where it comes from (factory batch, order...).
    pub note: String,
    /// When it was added.
    pub created_at_ms: UnixMillis,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_parse_and_differ() {
        let a = generate_claim_token(1, 10, String::new()).unwrap();
        let b = generate_claim_token(1, 10, String::new()).unwrap();
        assert_ne!(a.token, b.token);
        let parsed = ClaimToken::parse(&a.token).unwrap();
        assert_eq!(parsed.id(), a.record.id);
        assert!(a.record.secret_digest.matches(parsed.secret_digest()));
        assert!(a.record.validate().is_ok());
        let secret = a.token.split('.').nth(1).unwrap();
        assert!(!format!("{a:?}").contains(secret));
    }

    #[test]
    fn usability_checks_in_order() {
        let mut info = ClaimTokenInfo {
            id: "t".into(),
            secret_digest: SecretDigest::from_bytes([0; 32]),
            uses_max: 1,
            uses: 0,
            expires_at_ms: 100,
            created_at_ms: 0,
            revoked_at_ms: None,
            label: String::new(),
        };
        assert!(info.check_usable(99).is_ok());
        assert!(matches!(info.check_usable(100), Err(StoreError::ClaimTokenExpired(_))));
        info.uses = 1;
        assert!(matches!(info.check_usable(0), Err(StoreError::ClaimTokenExhausted(_))));
        info.revoked_at_ms = Some(1);
        assert!(matches!(info.check_usable(0), Err(StoreError::ClaimTokenRevoked(_))));
    }
}
