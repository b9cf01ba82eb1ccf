//! Claiming a device and agreeing its session key.
//!
//! A factory-fresh device has an ed25519 identity key (from a 32-byte seed in
//! secure storage) and, unless its identity is on a factory allow-list, a
//! [`ClaimToken`] `{token_id}.{secret}`. The `token_id` is public: it only lets
//! the server find the token. The `secret` never leaves the device; the device
//! proves it knows it. The device picks a random [`SessionId`] and talks to the
//! fleet server on `wc/v1/prov/{session}/up|down`:
//!
//! 1. device → server: [`ClaimRequest`] `{ claim_id, identity_key }`, where
//!    `claim_id` is the token's `token_id`, or empty when the device relies on
//!    the allow-list. The server looks the token up by id (or checks the
//!    allow-list) before answering.
//! 2. server → device: [`ClaimChallenge`] `{ nonce, server_agreement_key,
//!    server_signature }`, where `server_agreement_key` is an ephemeral X25519
//!    public key and `server_signature` is the fleet server's ed25519 signature
//!    over `SHA-256("wildcam v1 claim challenge\0" || nonce ||
//!    server_agreement_key || identity_key)`. A device configured with the
//!    server's public key (pinning) refuses a challenge whose signature does not
//!    verify.
//! 3. device → server: [`ClaimProof`] `{ agreement_key, signature }`, where
//!    `agreement_key` is the device's ephemeral X25519 public key and
//!    `signature` is its ed25519 signature over `SHA-256("wildcam v1 claim
//!    proof\0" || nonce || server_agreement_key || agreement_key ||
//!    identity_key || claim_binding)`. The `claim_binding` is
//!    `SHA-256("wildcam v1 claim secret\0" || secret)` with a token, and 32
//!    zero bytes (the "no token" marker) on the allow-list path. The proof
//!    shows possession of the identity key and of the token secret, and binds
//!    both to the key agreement.
//! 4. Both sides: `shared = X25519(own ephemeral secret, peer ephemeral
//!    public)`, refused when all zero (non-contributory); the
//!    [`SessionKey`] is `HKDF-SHA256(salt = nonce, ikm = shared, info =
//!    "wildcam v1 session key" || identity_key || agreement_key ||
//!    server_agreement_key)`. The server computes it in
//!    [`PendingClaim::verify`], given the token it looked up by `claim_id`
//!    (or none on the allow-list path), only when the proof verifies.
//! 5. server → device: either [`Credentials`] `{ device_id, mqtt_password }`,
//!    postcard-encoded and sealed ([`crate::seal`], direction down, context =
//!    the session id bytes) so the MQTT password never travels in clear, or
//!    [`ClaimRejected`] `{ reason }` in clear.
//!
//! The credentials frame is sealed under a key derived from the session key
//! (`HKDF-SHA256(ikm = session key, info = "wildcam v1 credentials key" ||
//! session id)`), not the session key itself: device traffic then starts its
//! own counters at 1 under the session key without ever reusing a nonce.
//!
//! Everything here is sans-IO and takes its randomness from the caller: the
//! device runs a [`Provisioner`], the server [`ServerChallenge::new`],
//! [`PendingClaim::verify`] and [`seal_credentials`].
//!
//! # Example
//!
//! ```
//! use wildcam_sdk::provision::*;
//! use wildcam_sdk::topic::SessionId;
//! # fn main() -> Result<(), ProvisionError> {
//! let server = ServerIdentity::from_seed([2; 32]); // from the server's secret store
//! let session = SessionId::from_random([1; 8]); // all "random" values: use an RNG
//! // Printed on the device's label or written at the factory; the part after
//! // the dot is the secret (16+ random bytes, base64url).
//! let claim = ClaimToken::parse("k7Qm2x.Yq3vN8rT0bWc5LdE1fHs9A")?;
//! let identity = DeviceIdentity::from_seed([1; 32]);
//! let mut device = Provisioner::new(identity, Some(claim), session, [3; 32], Some(server.public_key()));
//!
//! // 1. device → server: only the token id travels
//! let request = device.request();
//! assert_eq!(request.claim_id, "k7Qm2x");
//! // 2. server → device, once the server found the token by `request.claim_id`
//! let stored = ClaimToken::parse("k7Qm2x.Yq3vN8rT0bWc5LdE1fHs9A")?; // from its database
//! let ServerChallenge { challenge, pending } =
//!     ServerChallenge::new(&server, [4; 32], [5; 32], request.identity_key);
//! // 3. device → server
//! let proof = device.on_challenge(&challenge)?;
//! // 4. the server checks the proof against the stored token and derives the same key
//! let key = pending.verify(Some(&stored), &proof)?;
//! // 5. server → device
//! let credentials = Credentials {
//!     device_id: "trap-0042".parse().expect("valid id"),
//!     mqtt_password: MqttPassword::try_from("generated-password").expect("short password"),
//! };
//! let mut frame = [0u8; CREDENTIALS_FRAME_LEN_MAX];
//! let len = seal_credentials(&key, &session, &credentials, &mut frame)?;
//! let provisioned = device.on_credentials(&mut frame[..len])?;
//! assert_eq!(provisioned.session_key.as_bytes(), key.as_bytes());
//! # Ok(())
//! # }
//! ```
//!
//! # Security notes
//!
//! - The token secret never travels. An eavesdropper on the broker (any
//!   client subscribed to `wc/v1/prov/+/up`, since the broker has no per-topic
//!   authorization) sees only the token id, the public keys, the nonce and the
//!   device's signature. The signature lets it test a guessed secret offline
//!   (one SHA-256 and one ed25519 verification per guess), so the secret must
//!   carry at least 128 bits of entropy (see [`ClaimToken`]): then offline
//!   guessing is infeasible. A short or human-chosen secret would be found.
//! - Knowing the token id does not let another client claim: its proof must be
//!   signed by the identity key it announced and bind the secret. Racing with a
//!   copied id only yields [`ProvisionError::ProofInvalid`] on the server. The
//!   server must therefore consume a token (bind it to the identity) only after
//!   a proof verifies, never on a request or a failed proof, and should rate
//!   limit failed proofs per token id so copied ids cannot be used for online
//!   guessing or to lock a token out.
//! - The server needs the secret (or [`ClaimToken::secret_digest`]) to verify
//!   proofs: both let anyone claim with the token, so store them like any
//!   other credential and expire used tokens.
//! - A [`PendingClaim`] must be used once: [`PendingClaim::verify`] consumes
//!   it. Refusing a reused nonce, rate limiting and the token bookkeeping
//!   (unknown, expired, exhausted, allow-list, revocation) are the server's job.
//!   The server must verify with the token found by the `claim_id` of the
//!   request that created the pending claim, and use the allow-list path
//!   (`None`) only when that `claim_id` was empty and the identity is listed.
//! - [`ClaimRejected`] is not authenticated: any broker client can publish one.
//!   A device must treat it as "this attempt ended", retry later with backoff
//!   and a fresh session and randomness, and never as a permanent verdict.
//! - Without pinning, a device cannot tell the real server from an impostor on
//!   the broker: it answers the first challenge it receives and then waits for
//!   credentials the real server will never send, so the firmware needs a
//!   timeout and retry. An impostor learns no more about the secret than an
//!   eavesdropper. Configure the server key whenever the firmware can carry it.

use core::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use hkdf::Hkdf;
use postcard::experimental::max_size::MaxSize;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, SharedSecret, StaticSecret};
use zeroize::Zeroize;

use crate::seal::{self, ReplayWindow, SEAL_OVERHEAD, SESSION_KEY_LEN, SealError, Sealer, SessionKey};
use crate::topic::{DeviceId, Direction, SessionId};

/// Longest claim token `{token_id}.{secret}`, in bytes.
pub const CLAIM_TOKEN_LEN_MAX: usize = 64;
/// Longest claim token id, in bytes.
pub const CLAIM_ID_LEN_MAX: usize = 24;
/// Shortest claim token secret, in bytes: 22 base64url characters carry 132
/// bits, enough for the 128 random bits a secret must hold.
pub const CLAIM_SECRET_LEN_MIN: usize = 22;
/// Longest MQTT password, in bytes.
pub const MQTT_PASSWORD_LEN_MAX: usize = 64;
pub use crate::signature::SIGNATURE_LEN;
/// Longest sealed [`Credentials`] frame, in bytes.
pub const CREDENTIALS_FRAME_LEN_MAX: usize = Credentials::POSTCARD_MAX_SIZE + SEAL_OVERHEAD;

/// The public id of a claim token (empty in a [`ClaimRequest`] that relies on
/// the allow-list).
pub type ClaimId = heapless::String<CLAIM_ID_LEN_MAX>;
/// The password the device uses to connect to the broker.
pub type MqttPassword = heapless::String<MQTT_PASSWORD_LEN_MAX>;

const CHALLENGE_DOMAIN: &[u8] = b"wildcam v1 claim challenge\0";
const PROOF_DOMAIN: &[u8] = b"wildcam v1 claim proof\0";
const CLAIM_SECRET_DOMAIN: &[u8] = b"wildcam v1 claim secret\0";
/// The claim binding of the allow-list path (no token).
const NO_CLAIM_BINDING: [u8; 32] = [0; 32];
const SESSION_KEY_INFO: &[u8] = b"wildcam v1 session key";
const CREDENTIALS_KEY_INFO: &[u8] = b"wildcam v1 credentials key";

/// Why a provisioning step failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum ProvisionError {
    /// The message does not fit the current step (e.g. credentials before a
    /// challenge, or a second challenge). The state is unchanged.
    OutOfOrder,
    /// Provisioning already ended (provisioned or rejected).
    Finished,
    /// The pinned server public key is not a valid ed25519 key.
    ServerKeyInvalid,
    /// The challenge's server signature does not verify under the pinned key.
    ServerSignatureInvalid,
    /// The device identity key is not a valid ed25519 key.
    IdentityKeyInvalid,
    /// The claim proof's signature does not verify (wrong identity, claim
    /// token secret, nonce or keys, or tampered).
    ProofInvalid,
    /// The X25519 shared secret is all zero (low-order peer key).
    KeyAgreementWeak,
    /// The credentials frame failed to open (forged, wrong key or session).
    CredentialsUnauthentic,
    /// The credentials frame opened but does not decode.
    CredentialsMalformed,
    /// The output buffer is too small for the sealed credentials.
    BufferTooSmall,
    /// The claim token has no `.` between its id and its secret.
    ClaimTokenMalformed,
    /// The claim token is longer than [`CLAIM_TOKEN_LEN_MAX`].
    ClaimTokenTooLong,
    /// The claim token id is empty or longer than [`CLAIM_ID_LEN_MAX`].
    ClaimIdLengthInvalid,
    /// The claim token holds a byte outside `[A-Za-z0-9_-]` (besides the one
    /// `.` separating id and secret).
    ClaimTokenBadCharacter,
    /// The claim token secret is shorter than [`CLAIM_SECRET_LEN_MIN`].
    ClaimSecretTooShort,
}

impl fmt::Display for ProvisionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::OutOfOrder => "provisioning message out of order",
            Self::Finished => "provisioning already finished",
            Self::ServerKeyInvalid => "pinned server key is not a valid ed25519 key",
            Self::ServerSignatureInvalid => "claim challenge is not signed by the pinned server",
            Self::IdentityKeyInvalid => "device identity key is not a valid ed25519 key",
            Self::ProofInvalid => "claim proof signature is invalid",
            Self::KeyAgreementWeak => "key agreement produced an all-zero secret",
            Self::CredentialsUnauthentic => "credentials frame failed authentication",
            Self::CredentialsMalformed => "credentials frame does not decode",
            Self::BufferTooSmall => "output buffer too small for the sealed credentials",
            Self::ClaimTokenMalformed => "claim token must be {token_id}.{secret}",
            Self::ClaimTokenTooLong => "claim token is longer than 64 bytes",
            Self::ClaimIdLengthInvalid => "claim token id must be 1 to 24 characters",
            Self::ClaimTokenBadCharacter => "claim token may only contain A-Z a-z 0-9 _ - and one '.'",
            Self::ClaimSecretTooShort => "claim token secret is shorter than 22 characters",
        })
    }
}

impl core::error::Error for ProvisionError {}

pub use crate::signature::Signature64;

/// A claim token `{token_id}.{secret}`, parsed; it keeps the id and a digest
/// of the secret, never the secret itself.
///
/// - `token_id`: 1 to [`CLAIM_ID_LEN_MAX`] characters of `[A-Za-z0-9_-]`. It is
///   public (sent in every [`ClaimRequest`]) and only lets the server find the
///   token; make it random rather than sequential so ids do not reveal how
///   many tokens exist.
/// - `secret`: at least [`CLAIM_SECRET_LEN_MIN`] characters of
///   `[A-Za-z0-9_-]`, the whole token at most [`CLAIM_TOKEN_LEN_MAX`] bytes.
///   Generate it as the unpadded base64url encoding of 32 bytes (43
///   characters; 16 bytes, 22 characters, is the minimum) from a
///   cryptographically secure RNG. The length check cannot measure entropy:
///   a secret that is not 128+ random bits can be guessed offline from one
///   observed claim.
///
/// For example, 9 random bytes for the id and 32 for the secret give
/// `{12 chars}.{43 chars}`, 56 bytes. `Debug` and `defmt` output show only
/// the id; the digest is wiped on drop.
#[derive(Clone)]
pub struct ClaimToken {
    id: ClaimId,
    secret_digest: [u8; 32],
}

impl ClaimToken {
    /// Parses and validates `{token_id}.{secret}`. Wipe your copy of `token`
    /// once parsed; the error never contains any part of it.
    pub fn parse(token: &str) -> Result<Self, ProvisionError> {
        if token.len() > CLAIM_TOKEN_LEN_MAX {
            return Err(ProvisionError::ClaimTokenTooLong);
        }
        let (id, secret) = token
            .split_once('.')
            .ok_or(ProvisionError::ClaimTokenMalformed)?;
        if !secret.bytes().all(claim_character) {
            return Err(ProvisionError::ClaimTokenBadCharacter);
        }
        let claim_id = parse_claim_id(id)?;
        if secret.len() < CLAIM_SECRET_LEN_MIN {
            return Err(ProvisionError::ClaimSecretTooShort);
        }
        Ok(Self {
            id: claim_id,
            secret_digest: Sha256::new()
                .chain_update(CLAIM_SECRET_DOMAIN)
                .chain_update(secret.as_bytes())
                .finalize()
                .into(),
        })
    }

    /// Rebuilds a token from what a server stores: its id and
    /// [`secret_digest`](Self::secret_digest) (never the secret itself).
    pub fn from_stored(id: &str, secret_digest: [u8; 32]) -> Result<Self, ProvisionError> {
        Ok(Self { id: parse_claim_id(id)?, secret_digest })
    }

    /// The public token id, sent as [`ClaimRequest::claim_id`].
    pub fn id(&self) -> &str {
        &self.id
    }

    /// `SHA-256("wildcam v1 claim secret\0" || secret)`, the value the claim
    /// proof binds. As sensitive as the secret: it is all a claimant needs
    /// besides its own identity key, so never log or publish it.
    pub fn secret_digest(&self) -> &[u8; 32] {
        &self.secret_digest
    }
}

impl Drop for ClaimToken {
    fn drop(&mut self) {
        self.secret_digest.zeroize();
    }
}

impl fmt::Debug for ClaimToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClaimToken")
            .field("id", &self.id())
            .field("secret", &"..")
            .finish()
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for ClaimToken {
    fn format(&self, f: defmt::Formatter) {
        defmt::write!(f, "ClaimToken {{ id: {=str}, secret: .. }}", self.id())
    }
}

impl core::str::FromStr for ClaimToken {
    type Err = ProvisionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// What the proof binds for `claim`: its secret digest, or the fixed
/// all-zero marker without a token.
fn claim_character(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-')
}

fn parse_claim_id(id: &str) -> Result<ClaimId, ProvisionError> {
    if id.is_empty() || id.len() > CLAIM_ID_LEN_MAX {
        return Err(ProvisionError::ClaimIdLengthInvalid);
    }
    if !id.bytes().all(claim_character) {
        return Err(ProvisionError::ClaimTokenBadCharacter);
    }
    ClaimId::try_from(id).map_err(|_| ProvisionError::ClaimIdLengthInvalid)
}

fn claim_binding(claim: Option<&ClaimToken>) -> &[u8; 32] {
    claim.map_or(&NO_CLAIM_BINDING, ClaimToken::secret_digest)
}

/// Step 1, device → server: who the device is and which claim token it holds.
///
/// Only the token's public id travels; its secret never does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ClaimRequest {
    /// The claim token's id ([`ClaimToken::id`]); empty when the identity is
    /// on a factory allow-list. Untrusted input: the server only uses it to
    /// look the token up.
    pub claim_id: ClaimId,
    /// The device's ed25519 public key.
    pub identity_key: [u8; 32],
}

/// Step 2, server → device: a fresh nonce and the server's ephemeral key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ClaimChallenge {
    /// A random nonce, never reused by the server.
    pub nonce: [u8; 32],
    /// The server's ephemeral X25519 public key.
    pub server_agreement_key: [u8; 32],
    /// The fleet server's signature over the challenge transcript.
    pub server_signature: Signature64,
}

/// Step 3, device → server: the device's ephemeral key and its proof.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ClaimProof {
    /// The device's ephemeral X25519 public key.
    pub agreement_key: [u8; 32],
    /// The device's identity signature over the proof transcript.
    pub signature: Signature64,
}

/// Step 5, server → device (sealed): the device's id and broker password.
///
/// `Debug` and `defmt` output never show the password.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, MaxSize)]
pub struct Credentials {
    /// The id the server assigned.
    pub device_id: DeviceId,
    /// The password for the broker.
    pub mqtt_password: MqttPassword,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("device_id", &self.device_id)
            .field("mqtt_password", &"..")
            .finish()
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for Credentials {
    fn format(&self, f: defmt::Formatter) {
        defmt::write!(f, "Credentials {{ device_id: {}, mqtt_password: .. }}", self.device_id)
    }
}

/// Step 5, server → device (in clear, unauthenticated): the claim failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ClaimRejected {
    /// Why.
    pub reason: ClaimRejectReason,
}

/// Why the server refused a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, MaxSize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum ClaimRejectReason {
    /// No claim token has this id.
    TokenUnknown,
    /// The claim token expired.
    TokenExpired,
    /// The claim token was used up.
    TokenExhausted,
    /// The identity is not on the allow-list (empty claim id).
    IdentityNotAllowed,
    /// The proof did not verify.
    ProofInvalid,
    /// The request or proof was seen before.
    Replayed,
    /// Too many attempts; retry later.
    RateLimited,
    /// The identity was revoked.
    Revoked,
    /// The server failed.
    Internal,
}

impl fmt::Display for ClaimRejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::TokenUnknown => "claim token unknown",
            Self::TokenExpired => "claim token expired",
            Self::TokenExhausted => "claim token exhausted",
            Self::IdentityNotAllowed => "identity not allowed",
            Self::ProofInvalid => "claim proof invalid",
            Self::Replayed => "claim replayed",
            Self::RateLimited => "rate limited",
            Self::Revoked => "identity revoked",
            Self::Internal => "server error",
        })
    }
}

/// An ed25519 key pair (wiped on drop). Shared by the device and server roles.
#[derive(Clone)]
struct KeyPair(SigningKey);

impl KeyPair {
    fn from_seed(mut seed: [u8; 32]) -> Self {
        let key = SigningKey::from_bytes(&seed);
        seed.zeroize();
        Self(key)
    }

    fn public_key(&self) -> [u8; 32] {
        self.0.verifying_key().to_bytes()
    }

    fn sign(&self, digest: &[u8; 32]) -> Signature64 {
        Signature64(self.0.sign(digest).to_bytes())
    }
}

/// The device's long-term ed25519 identity.
#[derive(Clone)]
pub struct DeviceIdentity(KeyPair);

impl DeviceIdentity {
    /// Derives the key pair from a 32-byte secret seed (keep it in secure
    /// storage; wipe your copy after this call).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(KeyPair::from_seed(seed))
    }

    /// The public key, sent as [`ClaimRequest::identity_key`].
    pub fn public_key(&self) -> [u8; 32] {
        self.0.public_key()
    }
}

impl fmt::Debug for DeviceIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("DeviceIdentity")
            .field(&self.public_key())
            .finish()
    }
}

/// The fleet server's long-term ed25519 identity (signs challenges).
#[derive(Clone)]
pub struct ServerIdentity(KeyPair);

impl ServerIdentity {
    /// Derives the key pair from a 32-byte secret seed.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(KeyPair::from_seed(seed))
    }

    /// The public key devices pin.
    pub fn public_key(&self) -> [u8; 32] {
        self.0.public_key()
    }
}

impl fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ServerIdentity")
            .field(&self.public_key())
            .finish()
    }
}

fn challenge_digest(nonce: &[u8; 32], server_agreement_key: &[u8; 32], identity_key: &[u8; 32]) -> [u8; 32] {
    Sha256::new()
        .chain_update(CHALLENGE_DOMAIN)
        .chain_update(nonce)
        .chain_update(server_agreement_key)
        .chain_update(identity_key)
        .finalize()
        .into()
}

/// The public values both sides bind into the proof and the session key.
struct Transcript<'a> {
    nonce: &'a [u8; 32],
    server_agreement_key: &'a [u8; 32],
    agreement_key: &'a [u8; 32],
    identity_key: &'a [u8; 32],
}

impl Transcript<'_> {
    fn proof_digest(&self, claim: Option<&ClaimToken>) -> [u8; 32] {
        Sha256::new()
            .chain_update(PROOF_DOMAIN)
            .chain_update(self.nonce)
            .chain_update(self.server_agreement_key)
            .chain_update(self.agreement_key)
            .chain_update(self.identity_key)
            .chain_update(claim_binding(claim))
            .finalize()
            .into()
    }

    fn session_key(&self, shared: &SharedSecret) -> Result<SessionKey, ProvisionError> {
        if !shared.was_contributory() {
            return Err(ProvisionError::KeyAgreementWeak);
        }
        let hkdf = Hkdf::<Sha256>::new(Some(self.nonce), shared.as_bytes());
        let info: [&[u8]; 4] =
            [SESSION_KEY_INFO, self.identity_key, self.agreement_key, self.server_agreement_key];
        expand_key(&hkdf, &info)
    }
}

/// HKDF-Expand into a [`SessionKey`], wiping the intermediate copy.
fn expand_key(hkdf: &Hkdf<Sha256>, info: &[&[u8]]) -> Result<SessionKey, ProvisionError> {
    let mut okm = [0u8; SESSION_KEY_LEN];
    // Cannot fail: 32 bytes is far below HKDF-SHA256's 8160-byte limit.
    hkdf.expand_multi_info(info, &mut okm)
        .map_err(|_| ProvisionError::KeyAgreementWeak)?;
    let key = SessionKey::from_bytes(okm);
    okm.zeroize();
    Ok(key)
}

/// The key sealing the credentials frame, derived from the session key.
fn credentials_key(session_key: &SessionKey, session: &SessionId) -> Result<SessionKey, ProvisionError> {
    let hkdf = Hkdf::<Sha256>::new(None, session_key.as_bytes());
    expand_key(&hkdf, &[CREDENTIALS_KEY_INFO, session.as_str().as_bytes()])
}

/// Where a [`Provisioner`] stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum ProvisionState {
    /// Waiting for the [`ClaimChallenge`] (after sending the request).
    AwaitingChallenge,
    /// Proof sent, waiting for the sealed [`Credentials`].
    AwaitingCredentials,
    /// Credentials received.
    Provisioned,
    /// The server (or someone on the broker) rejected the claim.
    Rejected,
}

enum State {
    AwaitingChallenge(StaticSecret),
    AwaitingCredentials(SessionKey),
    Provisioned,
    Rejected,
}

/// What a successful claim yields; persist all of it.
pub struct Provisioned {
    /// The id the server assigned.
    pub device_id: DeviceId,
    /// The broker password.
    pub mqtt_password: MqttPassword,
    /// The key sealing all device traffic from now on.
    pub session_key: SessionKey,
}

impl fmt::Debug for Provisioned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Provisioned")
            .field("device_id", &self.device_id)
            .field("mqtt_password", &"..")
            .field("session_key", &self.session_key)
            .finish()
    }
}

/// The device side of provisioning, as a sans-IO state machine.
///
/// Publish [`request`](Self::request), then feed the server's replies to
/// [`on_challenge`](Self::on_challenge), [`on_credentials`](Self::on_credentials)
/// or [`on_rejected`](Self::on_rejected). A call that does not fit the current
/// step, or a message that fails verification, returns an error and leaves the
/// state unchanged, so a forged message cannot derail a genuine exchange.
pub struct Provisioner {
    identity: DeviceIdentity,
    claim: Option<ClaimToken>,
    session: SessionId,
    server_identity: Option<[u8; 32]>,
    state: State,
}

impl Provisioner {
    /// Starts a claim.
    ///
    /// `claim` is the device's claim token, or `None` when its identity is on
    /// the server's allow-list. `agreement_secret_random` must be 32 fresh
    /// random bytes (the ephemeral X25519 secret); `server_identity` pins the
    /// fleet server's ed25519 public key when known.
    pub fn new(
        identity: DeviceIdentity,
        claim: Option<ClaimToken>,
        session: SessionId,
        agreement_secret_random: [u8; 32],
        server_identity: Option<[u8; 32]>,
    ) -> Self {
        let mut random = agreement_secret_random;
        let secret = StaticSecret::from(random);
        random.zeroize();
        Self { identity, claim, session, server_identity, state: State::AwaitingChallenge(secret) }
    }

    /// The request to publish on `wc/v1/prov/{session}/up` (may be resent).
    /// It carries the token id only, never the secret.
    pub fn request(&self) -> ClaimRequest {
        ClaimRequest {
            claim_id: self
                .claim
                .as_ref()
                .map_or_else(ClaimId::new, |claim| claim.id.clone()),
            identity_key: self.identity.public_key(),
        }
    }

    /// The provisioning session id (topic and seal context).
    pub fn session(&self) -> SessionId {
        self.session
    }

    /// Where the exchange stands.
    pub fn state(&self) -> ProvisionState {
        match self.state {
            State::AwaitingChallenge(_) => ProvisionState::AwaitingChallenge,
            State::AwaitingCredentials(_) => ProvisionState::AwaitingCredentials,
            State::Provisioned => ProvisionState::Provisioned,
            State::Rejected => ProvisionState::Rejected,
        }
    }

    fn unexpected(&self) -> ProvisionError {
        match self.state {
            State::Provisioned | State::Rejected => ProvisionError::Finished,
            _ => ProvisionError::OutOfOrder,
        }
    }

    /// Verifies the challenge (when a server key is pinned), agrees the
    /// session key and returns the proof to publish.
    pub fn on_challenge(&mut self, challenge: &ClaimChallenge) -> Result<ClaimProof, ProvisionError> {
        let State::AwaitingChallenge(secret) = &self.state else {
            return Err(self.unexpected());
        };
        let identity_key = self.identity.public_key();
        self.verify_server(challenge, &identity_key)?;
        let agreement_key = PublicKey::from(secret).to_bytes();
        let transcript = Transcript {
            nonce: &challenge.nonce,
            server_agreement_key: &challenge.server_agreement_key,
            agreement_key: &agreement_key,
            identity_key: &identity_key,
        };
        let shared = secret.diffie_hellman(&PublicKey::from(challenge.server_agreement_key));
        let key = transcript.session_key(&shared)?;
        let signature = self
            .identity
            .0
            .sign(&transcript.proof_digest(self.claim.as_ref()));
        self.state = State::AwaitingCredentials(key);
        Ok(ClaimProof { agreement_key, signature })
    }

    fn verify_server(
        &self,
        challenge: &ClaimChallenge,
        identity_key: &[u8; 32],
    ) -> Result<(), ProvisionError> {
        let Some(pinned) = &self.server_identity else {
            return Ok(());
        };
        let server = VerifyingKey::from_bytes(pinned).map_err(|_| ProvisionError::ServerKeyInvalid)?;
        let digest = challenge_digest(&challenge.nonce, &challenge.server_agreement_key, identity_key);
        let signature = Signature::from_bytes(&challenge.server_signature.0);
        server
            .verify_strict(&digest, &signature)
            .map_err(|_| ProvisionError::ServerSignatureInvalid)
    }

    /// Opens the sealed credentials frame (decrypting in place, then wiping
    /// `frame`) and finishes the claim.
    pub fn on_credentials(&mut self, frame: &mut [u8]) -> Result<Provisioned, ProvisionError> {
        let State::AwaitingCredentials(key) = &self.state else {
            return Err(self.unexpected());
        };
        let credentials = open_credentials(key, &self.session, frame)?;
        let session_key = key.clone();
        self.state = State::Provisioned;
        Ok(Provisioned {
            device_id: credentials.device_id,
            mqtt_password: credentials.mqtt_password,
            session_key,
        })
    }

    /// Records a rejection and returns its reason. The message is
    /// unauthenticated: retry later with a new session rather than giving up.
    pub fn on_rejected(&mut self, rejected: &ClaimRejected) -> Result<ClaimRejectReason, ProvisionError> {
        match self.state {
            State::AwaitingChallenge(_) | State::AwaitingCredentials(_) => {
                self.state = State::Rejected;
                Ok(rejected.reason)
            }
            State::Provisioned | State::Rejected => Err(ProvisionError::Finished),
        }
    }
}

impl fmt::Debug for Provisioner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Provisioner")
            .field("identity", &self.identity)
            .field("session", &self.session)
            .field("claim_id", &self.claim.as_ref().map(ClaimToken::id))
            .field("pinned", &self.server_identity.is_some())
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

fn open_credentials(
    key: &SessionKey,
    session: &SessionId,
    frame: &mut [u8],
) -> Result<Credentials, ProvisionError> {
    let credentials_key = credentials_key(key, session)?;
    let mut window = ReplayWindow::new();
    let context = session.as_str().as_bytes();
    let decoded = match seal::open_with(&mut window, &credentials_key, Direction::Down, context, frame) {
        Ok(plaintext) => decode_exact(plaintext),
        Err(_) => return Err(ProvisionError::CredentialsUnauthentic),
    };
    frame.zeroize();
    decoded
}

fn decode_exact(plaintext: &[u8]) -> Result<Credentials, ProvisionError> {
    match postcard::take_from_bytes::<Credentials>(plaintext) {
        Ok((credentials, [])) => Ok(credentials),
        _ => Err(ProvisionError::CredentialsMalformed),
    }
}

/// The server's first step: the challenge to publish and the state to keep
/// until the proof arrives (destructure it, or use
/// [`into_parts`](Self::into_parts)).
#[derive(Debug)]
pub struct ServerChallenge {
    /// Publish on `wc/v1/prov/{session}/down`.
    pub challenge: ClaimChallenge,
    /// Keep (keyed by session) until the proof arrives; use once.
    pub pending: PendingClaim,
}

impl ServerChallenge {
    /// Answers a [`ClaimRequest`] for `identity_key`, after the server found
    /// a usable token with the request's `claim_id` (or, for an empty
    /// `claim_id`, the identity on its allow-list).
    ///
    /// `nonce` and `agreement_secret` must be fresh random bytes, never reused.
    pub fn new(
        server: &ServerIdentity,
        nonce: [u8; 32],
        agreement_secret: [u8; 32],
        identity_key: [u8; 32],
    ) -> Self {
        let mut random = agreement_secret;
        let secret = StaticSecret::from(random);
        random.zeroize();
        let server_agreement_key = PublicKey::from(&secret).to_bytes();
        let digest = challenge_digest(&nonce, &server_agreement_key, &identity_key);
        let challenge =
            ClaimChallenge { nonce, server_agreement_key, server_signature: server.0.sign(&digest) };
        let pending = PendingClaim { nonce, secret, server_agreement_key, identity_key };
        Self { challenge, pending }
    }

    /// Splits into the challenge to publish and the state to keep.
    pub fn into_parts(self) -> (ClaimChallenge, PendingClaim) {
        (self.challenge, self.pending)
    }
}

/// What the server keeps between the challenge and the proof. Use it once:
/// [`verify`](Self::verify) consumes it, and the server must never issue a
/// second verification for the same nonce.
pub struct PendingClaim {
    nonce: [u8; 32],
    secret: StaticSecret,
    server_agreement_key: [u8; 32],
    identity_key: [u8; 32],
}

impl PendingClaim {
    /// The device identity key this claim is for.
    pub fn identity_key(&self) -> [u8; 32] {
        self.identity_key
    }

    /// The challenge nonce (for the server's replay bookkeeping).
    pub fn nonce(&self) -> [u8; 32] {
        self.nonce
    }

    /// Verifies the device's proof and derives the session key.
    ///
    /// `claim` is the full token the server stored and looked up by the
    /// request's `claim_id` (parse it with [`ClaimToken::parse`]), or `None`
    /// on the allow-list path (empty `claim_id`). A proof made without the
    /// token's secret fails with [`ProvisionError::ProofInvalid`].
    pub fn verify(
        self,
        claim: Option<&ClaimToken>,
        proof: &ClaimProof,
    ) -> Result<SessionKey, ProvisionError> {
        let device =
            VerifyingKey::from_bytes(&self.identity_key).map_err(|_| ProvisionError::IdentityKeyInvalid)?;
        let transcript = Transcript {
            nonce: &self.nonce,
            server_agreement_key: &self.server_agreement_key,
            agreement_key: &proof.agreement_key,
            identity_key: &self.identity_key,
        };
        let signature = Signature::from_bytes(&proof.signature.0);
        device
            .verify_strict(&transcript.proof_digest(claim), &signature)
            .map_err(|_| ProvisionError::ProofInvalid)?;
        let shared = self
            .secret
            .diffie_hellman(&PublicKey::from(proof.agreement_key));
        transcript.session_key(&shared)
    }
}

impl fmt::Debug for PendingClaim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingClaim")
            .field("identity_key", &self.identity_key)
            .finish_non_exhaustive()
    }
}

/// Seals `credentials` for the device (step 5) into `out`, returning the
/// frame length (at most [`CREDENTIALS_FRAME_LEN_MAX`]).
pub fn seal_credentials(
    key: &SessionKey,
    session: &SessionId,
    credentials: &Credentials,
    out: &mut [u8],
) -> Result<usize, ProvisionError> {
    let mut plaintext = [0u8; Credentials::POSTCARD_MAX_SIZE];
    let result = match postcard::to_slice(credentials, &mut plaintext) {
        Ok(encoded) => seal_credentials_frame(key, session, encoded, out),
        Err(_) => Err(ProvisionError::CredentialsMalformed),
    };
    plaintext.zeroize();
    result
}

fn seal_credentials_frame(
    key: &SessionKey,
    session: &SessionId,
    encoded: &[u8],
    out: &mut [u8],
) -> Result<usize, ProvisionError> {
    // A fresh key used for exactly this one frame, so counter 1 is unique.
    let mut sealer = Sealer::new(credentials_key(key, session)?, Direction::Down);
    match sealer.seal(session.as_str().as_bytes(), encoded, out) {
        Ok(sealed) => Ok(sealed.len),
        Err(SealError::BufferTooSmall) => Err(ProvisionError::BufferTooSmall),
        Err(_) => Err(ProvisionError::CredentialsMalformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    const DEVICE_SEED: [u8; 32] = [1; 32];
    const SERVER_SEED: [u8; 32] = [2; 32];
    const NONCE: [u8; 32] = [3; 32];
    const SERVER_SECRET: [u8; 32] = [4; 32];
    const DEVICE_SECRET: [u8; 32] = [5; 32];
    const TOKEN: &str = "tok_7f3a.Zk2mQ9vX4rT1nB8cL5wY0eH3";

    fn session() -> SessionId {
        SessionId::from_random([0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4])
    }

    fn token() -> ClaimToken {
        ClaimToken::parse(TOKEN).unwrap()
    }

    fn device(pinned: Option<[u8; 32]>) -> Provisioner {
        let identity = DeviceIdentity::from_seed(DEVICE_SEED);
        Provisioner::new(identity, Some(token()), session(), DEVICE_SECRET, pinned)
    }

    fn server() -> ServerIdentity {
        ServerIdentity::from_seed(SERVER_SEED)
    }

    fn challenge_for(request: &ClaimRequest) -> (ClaimChallenge, PendingClaim) {
        ServerChallenge::new(&server(), NONCE, SERVER_SECRET, request.identity_key).into_parts()
    }

    fn credentials() -> Credentials {
        Credentials {
            device_id: DeviceId::new("trap-0042").unwrap(),
            mqtt_password: MqttPassword::try_from("s3cret-pw").unwrap(),
        }
    }

    fn sealed_credentials(key: &SessionKey) -> Vec<u8> {
        let mut out = [0u8; CREDENTIALS_FRAME_LEN_MAX];
        let len = seal_credentials(key, &session(), &credentials(), &mut out).unwrap();
        out[..len].to_vec()
    }

    /// Runs steps 1 to 4, returning the device (awaiting credentials) and the
    /// server's key.
    fn claimed(pinned: Option<[u8; 32]>) -> (Provisioner, SessionKey) {
        let mut device = device(pinned);
        let request = device.request();
        let (challenge, pending) = challenge_for(&request);
        let proof = device.on_challenge(&challenge).unwrap();
        assert_eq!(request.claim_id, "tok_7f3a");
        let key = pending.verify(Some(&token()), &proof).unwrap();
        (device, key)
    }

    #[test]
    fn end_to_end_both_sides_agree() {
        for pinned in [None, Some(server().public_key())] {
            let (mut device, server_key) = claimed(pinned);
            assert_eq!(device.state(), ProvisionState::AwaitingCredentials);
            let mut frame = sealed_credentials(&server_key);
            assert!(!frame.windows(9).any(|w| w == b"s3cret-pw"), "password sealed");
            let provisioned = device.on_credentials(&mut frame).unwrap();
            assert_eq!(provisioned.session_key.as_bytes(), server_key.as_bytes());
            assert_eq!(provisioned.device_id.as_str(), "trap-0042");
            assert_eq!(provisioned.mqtt_password.as_str(), "s3cret-pw");
            assert!(frame.iter().all(|b| *b == 0), "decrypted frame wiped");
            assert_eq!(device.state(), ProvisionState::Provisioned);
            assert!(!std::format!("{provisioned:?}").contains("s3cret"));
        }
    }

    #[test]
    fn session_key_depends_on_every_random_input() {
        let (_, base) = claimed(None);
        let mut device =
            Provisioner::new(DeviceIdentity::from_seed(DEVICE_SEED), Some(token()), session(), [9; 32], None);
        let request = device.request();
        let (challenge, pending) =
            ServerChallenge::new(&server(), [8; 32], SERVER_SECRET, request.identity_key).into_parts();
        let proof = device.on_challenge(&challenge).unwrap();
        let other = pending.verify(Some(&token()), &proof).unwrap();
        assert_ne!(base.as_bytes(), other.as_bytes());
    }

    #[test]
    fn credentials_frame_is_not_under_the_session_key() {
        let (_, key) = claimed(None);
        let mut frame = sealed_credentials(&key);
        let mut window = ReplayWindow::new();
        let session = session();
        let opened =
            seal::open_with(&mut window, &key, Direction::Down, session.as_str().as_bytes(), &mut frame);
        assert_eq!(opened, Err(seal::OpenError::Authentication));
    }

    #[test]
    fn proof_from_another_identity_is_refused() {
        let victim = device(None).request();
        let (challenge, pending) = challenge_for(&victim);
        let identity = DeviceIdentity::from_seed([0x66; 32]);
        let mut attacker = Provisioner::new(identity, Some(token()), session(), DEVICE_SECRET, None);
        let proof = attacker.on_challenge(&challenge).unwrap();
        assert_eq!(pending.verify(Some(&token()), &proof).map(|_| ()), Err(ProvisionError::ProofInvalid));
    }

    #[test]
    fn proof_for_another_claim_token_is_refused() {
        let other_secret = ClaimToken::parse("tok_7f3a.Zk2mQ9vX4rT1nB8cL5wY0eH4").unwrap();
        for stored in [Some(&other_secret), None] {
            let mut device = device(None);
            let (challenge, pending) = challenge_for(&device.request());
            let proof = device.on_challenge(&challenge).unwrap();
            assert_eq!(pending.verify(stored, &proof).map(|_| ()), Err(ProvisionError::ProofInvalid));
        }
    }

    #[test]
    fn allow_list_proof_needs_the_allow_list_path() {
        let identity = DeviceIdentity::from_seed(DEVICE_SEED);
        let mut device = Provisioner::new(identity, None, session(), DEVICE_SECRET, None);
        let request = device.request();
        assert!(request.claim_id.is_empty());
        let (challenge, pending) = challenge_for(&request);
        let proof = device.on_challenge(&challenge).unwrap();
        assert_eq!(pending.verify(Some(&token()), &proof).map(|_| ()), Err(ProvisionError::ProofInvalid));
        let (_, pending) = challenge_for(&request);
        assert!(pending.verify(None, &proof).is_ok());
    }

    #[test]
    fn stored_token_verifies_like_the_parsed_one() {
        let parsed = token();
        let stored = ClaimToken::from_stored(parsed.id(), *parsed.secret_digest()).unwrap();
        assert_eq!(stored.id(), parsed.id());
        assert_eq!(stored.secret_digest(), parsed.secret_digest());
        assert_eq!(
            ClaimToken::from_stored("", [0; 32]).map(|_| ()),
            Err(ProvisionError::ClaimIdLengthInvalid)
        );
        assert_eq!(
            ClaimToken::from_stored("a.b", [0; 32]).map(|_| ()),
            Err(ProvisionError::ClaimTokenBadCharacter)
        );
    }

    #[test]
    fn claim_binding_is_the_domain_separated_secret_digest() {
        let expected: [u8; 32] = Sha256::new()
            .chain_update(b"wildcam v1 claim secret\0")
            .chain_update(b"Zk2mQ9vX4rT1nB8cL5wY0eH3")
            .finalize()
            .into();
        assert_eq!(claim_binding(Some(&token())), &expected);
        assert_eq!(claim_binding(None), &[0; 32]);
        let plain: [u8; 32] = Sha256::digest(b"Zk2mQ9vX4rT1nB8cL5wY0eH3").into();
        assert_ne!(token().secret_digest(), &plain);
    }

    #[test]
    fn tampered_proof_is_refused() {
        let request = device(None).request();
        let mut honest = device(None);
        let proof = honest.on_challenge(&challenge_for(&request).0).unwrap();
        let mut bad_signature = proof.clone();
        bad_signature.signature.0[17] ^= 0x10;
        let mut bad_agreement = proof.clone();
        bad_agreement.agreement_key[0] ^= 1;
        for forged in [bad_signature, bad_agreement] {
            let (_, pending) = challenge_for(&request);
            assert_eq!(
                pending.verify(Some(&token()), &forged).map(|_| ()),
                Err(ProvisionError::ProofInvalid)
            );
        }
    }

    #[test]
    fn invalid_identity_key_is_refused() {
        let not_a_point = (0u8..=255)
            .map(|b| [b; 32])
            .find(|bytes| VerifyingKey::from_bytes(bytes).is_err())
            .unwrap();
        let (_, pending) = ServerChallenge::new(&server(), NONCE, SERVER_SECRET, not_a_point).into_parts();
        let proof = ClaimProof { agreement_key: [9; 32], signature: Signature64([0; 64]) };
        assert_eq!(
            pending.verify(Some(&token()), &proof).map(|_| ()),
            Err(ProvisionError::IdentityKeyInvalid)
        );
    }

    #[test]
    fn pinned_server_signature_mismatch_is_refused() {
        let mut device = device(Some(ServerIdentity::from_seed([0x77; 32]).public_key()));
        let (challenge, _) = challenge_for(&device.request());
        assert_eq!(device.on_challenge(&challenge), Err(ProvisionError::ServerSignatureInvalid));
        assert_eq!(device.state(), ProvisionState::AwaitingChallenge);
    }

    #[test]
    fn pinned_device_refuses_a_tampered_challenge_then_accepts_the_genuine_one() {
        let mut device = device(Some(server().public_key()));
        let (challenge, pending) = challenge_for(&device.request());
        let mut swapped_key = challenge.clone();
        swapped_key.server_agreement_key = PublicKey::from(&StaticSecret::from([0x55; 32])).to_bytes();
        let mut other_nonce = challenge.clone();
        other_nonce.nonce[31] ^= 1;
        for forged in [swapped_key, other_nonce] {
            assert_eq!(device.on_challenge(&forged), Err(ProvisionError::ServerSignatureInvalid));
        }
        let proof = device.on_challenge(&challenge).unwrap();
        assert!(pending.verify(Some(&token()), &proof).is_ok());
    }

    #[test]
    fn pinned_key_that_is_not_a_point_is_reported() {
        let not_a_point = (0u8..=255)
            .map(|b| [b; 32])
            .find(|bytes| VerifyingKey::from_bytes(bytes).is_err())
            .unwrap();
        let mut device = device(Some(not_a_point));
        let (challenge, _) = challenge_for(&device.request());
        assert_eq!(device.on_challenge(&challenge), Err(ProvisionError::ServerKeyInvalid));
    }

    #[test]
    fn low_order_server_agreement_key_is_refused() {
        let mut device = device(None);
        let (mut challenge, _) = challenge_for(&device.request());
        challenge.server_agreement_key = [0; 32];
        assert_eq!(device.on_challenge(&challenge), Err(ProvisionError::KeyAgreementWeak));
        assert_eq!(device.state(), ProvisionState::AwaitingChallenge);
    }

    #[test]
    fn out_of_order_calls_are_refused() {
        let mut device = device(None);
        let mut frame = [0u8; 64];
        assert_eq!(device.on_credentials(&mut frame).map(|_| ()), Err(ProvisionError::OutOfOrder));
        let (challenge, pending) = challenge_for(&device.request());
        let proof = device.on_challenge(&challenge).unwrap();
        assert_eq!(device.on_challenge(&challenge), Err(ProvisionError::OutOfOrder));
        let key = pending.verify(Some(&token()), &proof).unwrap();
        device
            .on_credentials(&mut sealed_credentials(&key))
            .unwrap();
        let rejected = ClaimRejected { reason: ClaimRejectReason::Internal };
        assert_eq!(device.on_challenge(&challenge), Err(ProvisionError::Finished));
        assert_eq!(
            device
                .on_credentials(&mut sealed_credentials(&key))
                .map(|_| ()),
            Err(ProvisionError::Finished)
        );
        assert_eq!(device.on_rejected(&rejected), Err(ProvisionError::Finished));
    }

    #[test]
    fn rejection_ends_the_attempt() {
        let mut device = device(None);
        let (challenge, _) = challenge_for(&device.request());
        let rejected = ClaimRejected { reason: ClaimRejectReason::TokenExpired };
        assert_eq!(device.on_rejected(&rejected), Ok(ClaimRejectReason::TokenExpired));
        assert_eq!(device.state(), ProvisionState::Rejected);
        assert_eq!(device.on_challenge(&challenge), Err(ProvisionError::Finished));
    }

    #[test]
    fn forged_credentials_are_refused_without_derailing() {
        let (mut device, key) = claimed(None);
        let mut wrong_key = sealed_credentials(&SessionKey::from_bytes([0x13; 32]));
        let mut other_session = [0u8; CREDENTIALS_FRAME_LEN_MAX];
        let other = SessionId::from_random([0; 8]);
        let len = seal_credentials(&key, &other, &credentials(), &mut other_session).unwrap();
        for frame in [&mut wrong_key[..], &mut other_session[..len]] {
            assert_eq!(device.on_credentials(frame).map(|_| ()), Err(ProvisionError::CredentialsUnauthentic));
        }
        let mut garbage = [0u8; 64];
        let mut sealer = Sealer::new(credentials_key(&key, &session()).unwrap(), Direction::Down);
        let sealed = sealer
            .seal(session().as_str().as_bytes(), &[0xff; 8], &mut garbage)
            .unwrap();
        assert_eq!(
            device
                .on_credentials(&mut garbage[..sealed.len])
                .map(|_| ()),
            Err(ProvisionError::CredentialsMalformed)
        );
        assert_eq!(device.state(), ProvisionState::AwaitingCredentials);
        assert!(device.on_credentials(&mut sealed_credentials(&key)).is_ok());
    }

    #[test]
    fn seal_credentials_reports_a_small_buffer() {
        let (_, key) = claimed(None);
        let mut out = [0u8; 20];
        assert_eq!(
            seal_credentials(&key, &session(), &credentials(), &mut out),
            Err(ProvisionError::BufferTooSmall)
        );
    }

    fn assert_postcard_round_trip<T>(message: &T, exact: bool)
    where
        T: Serialize + for<'de> Deserialize<'de> + MaxSize + PartialEq + fmt::Debug,
    {
        let mut buffer = [0u8; 256];
        let encoded = postcard::to_slice(message, &mut buffer).unwrap();
        assert!(encoded.len() <= T::POSTCARD_MAX_SIZE);
        if exact {
            assert_eq!(encoded.len(), T::POSTCARD_MAX_SIZE);
        }
        assert_eq!(&postcard::from_bytes::<T>(encoded).unwrap(), message);
    }

    #[test]
    fn messages_round_trip_within_their_max_size() {
        let mut device = device(None);
        let long = "t".repeat(CLAIM_ID_LEN_MAX);
        let token = ClaimToken::parse(&std::format!("{long}.{}", "s".repeat(39))).unwrap();
        assert_eq!(token.id(), long);
        let request = ClaimRequest {
            claim_id: ClaimId::try_from(token.id()).unwrap(),
            identity_key: device.request().identity_key,
        };
        let (challenge, _) = challenge_for(&request);
        let proof = device.on_challenge(&challenge).unwrap();
        assert_postcard_round_trip(&request, true);
        assert_eq!(ClaimRequest::POSTCARD_MAX_SIZE, 1 + CLAIM_ID_LEN_MAX + 32);
        assert_postcard_round_trip(&challenge, true);
        assert_postcard_round_trip(&proof, true);
        let full = Credentials {
            device_id: DeviceId::new(&"d".repeat(32)).unwrap(),
            mqtt_password: MqttPassword::try_from("p".repeat(64).as_str()).unwrap(),
        };
        assert_postcard_round_trip(&full, true);
        assert_postcard_round_trip(&ClaimRejected { reason: ClaimRejectReason::RateLimited }, true);
        let json = serde_json::to_string(&proof).unwrap();
        assert_eq!(serde_json::from_str::<ClaimProof>(&json).unwrap(), proof);
        assert!(postcard::from_bytes::<ClaimProof>(&[0u8; 95]).is_err());
    }
}
