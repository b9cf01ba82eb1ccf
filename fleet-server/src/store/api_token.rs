//! Operator API tokens: random bearer tokens stored as hashes.

use std::fmt;

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::secret::{base64url, constant_time_eq, random_bytes};
use super::{StoreError, UnixMillis};

/// Prefix of every API token, so leaked tokens are easy to scan for.
const TOKEN_PREFIX: &str = "wcat_";
/// Domain separation of token hashes.
const TOKEN_HASH_DOMAIN: &[u8] = b"wildcam v1 api token\0";

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiRole {
    /// Everything: reads, writes, token and claim management.
    Admin,
    /// Reads only.
    ReadOnly,
}

impl ApiRole {
    /// Whether a holder of this role may do what needs `required`.
    pub fn allows(self, required: ApiRole) -> bool {
        match required {
            ApiRole::ReadOnly => true,
            ApiRole::Admin => self == ApiRole::Admin,
        }
    }

    /// The stored name.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ApiRole::Admin => "admin",
            ApiRole::ReadOnly => "read_only",
        }
    }

    /// Parses a stored name.
    pub(crate) fn parse(text: &str) -> Result<Self, StoreError> {
        match text {
            "admin" => Ok(ApiRole::Admin),
            "read_only" => Ok(ApiRole::ReadOnly),
            other => Err(StoreError::corrupt(format!("unknown API role {other:?}"))),
        }
    }
}

/// The hash a token is stored and looked up by.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    /// The hash of a presented token. Tokens are 32 random bytes, so a fast
    /// hash is enough; the lookup by hash leaks nothing usable about a token.
    pub fn of(token: &str) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(TOKEN_HASH_DOMAIN);
        hasher.update(token.as_bytes());
        Self(hasher.finalize().into())
    }

    /// Wraps stored hash bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The hash bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Whether `token` hashes to this value (constant time).
    pub fn verify(&self, token: &str) -> bool {
        constant_time_eq(&Self::of(token).0, &self.0)
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenHash(..)")
    }
}

/// A new random token `wcat_{43 base64url characters}` and its hash.
pub fn generate_api_token() -> Result<(String, TokenHash), StoreError> {
    let token = format!("{TOKEN_PREFIX}{}", base64url(&random_bytes::<32>()?));
    let hash = TokenHash::of(&token);
    Ok((token, hash))
}

/// A stored API token (without the token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiTokenInfo {
    /// Its id, for listing and revoking.
    pub id: i64,
    /// What it may do.
    pub role: ApiRole,
    /// The operator's note.
    pub label: String,
    /// When it was created.
    pub created_at_ms: UnixMillis,
    /// When it was revoked, if it was.
    pub revoked_at_ms: Option<UnixMillis>,
}

impl ApiTokenInfo {
    /// Whether the token is not revoked and its role allows `required`.
    pub fn grants(&self, required: ApiRole) -> bool {
        self.revoked_at_ms.is_none() && self.role.allows(required)
    }
}

/// A created token: `token` is shown once, then only its hash exists.
pub struct CreatedApiToken {
    /// The stored record.
    pub info: ApiTokenInfo,
    /// The bearer token to hand to the operator.
    pub token: String,
}

impl fmt::Debug for CreatedApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreatedApiToken")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_allow_what_they_should() {
        assert!(ApiRole::Admin.allows(ApiRole::Admin));
        assert!(ApiRole::Admin.allows(ApiRole::ReadOnly));
        assert!(ApiRole::ReadOnly.allows(ApiRole::ReadOnly));
        assert!(!ApiRole::ReadOnly.allows(ApiRole::Admin));
        for role in [ApiRole::Admin, ApiRole::ReadOnly] {
            assert_eq!(ApiRole::parse(role.as_str()).unwrap(), role);
        }
    }

    #[test]
    fn generated_tokens_hash_and_verify() {
        let (token, hash) = generate_api_token().unwrap();
        assert!(token.starts_with(TOKEN_PREFIX));
        assert_eq!(token.len(), TOKEN_PREFIX.len() + 43);
        assert!(hash.verify(&token));
        assert!(!hash.verify("wcat_guess"));
        assert_eq!(TokenHash::of(&token), hash);
    }
}
