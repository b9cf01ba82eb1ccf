//! The claim service: turns a trap's claim into a registered device with
//! MQTT credentials and a session key (see `sdk/src/provision.rs` for the
//! protocol and `docs/protocol.md` for the flow).
//!
//! - A `ClaimRequest` is checked against the claim token it names (usable:
//!   not revoked, expired or used up) or the factory allow-list, then
//!   answered with a `ClaimChallenge` signed by the server's identity; the
//!   pending claim waits at most [`PENDING_TTL`], and at most
//!   [`PENDING_MAX`] wait at once.
//! - A `ClaimProof` consumes its pending claim (a replayed proof finds none),
//!   is verified, and then, in one store transaction, the token use is
//!   consumed and the device inserted. The credentials go back sealed.
//! - Claim requests are rate limited per identity key and overall, failed
//!   proofs per claim id (see [`ATTEMPTS_PER_IDENTITY_PER_MINUTE`],
//!   [`FAILURES_PER_CLAIM_PER_MINUTE`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::RngCore;
use rand::rngs::OsRng;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use wildcam_sdk::DeviceId;
use wildcam_sdk::protocol::{ClaimRejected, Message, ProvisionDown, ProvisionUp, SealedCredentials};
use wildcam_sdk::provision::{
    CREDENTIALS_FRAME_LEN_MAX, ClaimRejectReason, ClaimRequest, ClaimToken, Credentials, MqttPassword,
    PendingClaim, ServerChallenge, ServerIdentity, seal_credentials,
};
use wildcam_sdk::topic::{self, Direction, SessionId};

use crate::broker::{Inbound, Publisher};
use crate::credentials::CredentialCache;
use crate::metrics::{Metrics, Rejection};
use crate::store::{ClaimAuthorization, Clock, NewDevice, PasswordHash, Store, StoreError};

/// Longest a challenge waits for its proof.
pub const PENDING_TTL: Duration = Duration::from_secs(60);
/// Most claims waiting for their proof at once.
pub const PENDING_MAX: usize = 1_024;
/// Claim requests allowed per device identity key per minute (a trap retrying).
pub const ATTEMPTS_PER_IDENTITY_PER_MINUTE: u32 = 10;
/// Failed proofs allowed per claim id per minute; beyond it the claim id is refused until
/// the window ends, so guessing a token's secret is slowed without throttling a field team
/// that claims hundreds of traps with one valid multi-use token.
pub const FAILURES_PER_CLAIM_PER_MINUTE: u32 = 20;
/// Default of [`crate::config::ProvisioningConfig::attempts_per_minute`].
pub const ATTEMPTS_PER_MINUTE: u32 = 6_000;

struct Waiting {
    pending: PendingClaim,
    token: Option<ClaimToken>,
    claim_id: Option<String>,
    since: Instant,
}

/// Fixed one-minute windows: claim requests per identity key and overall, failed proofs
/// per claim id. Every map holds at most `total` entries, so memory is bounded by the
/// overall limit.
struct RateLimit {
    attempts_per_minute: u32,
    window_start: Option<Instant>,
    total: u32,
    per_identity: HashMap<[u8; 32], u32>,
    failures_per_claim: HashMap<String, u32>,
}

impl RateLimit {
    fn new(attempts_per_minute: u32) -> Self {
        Self {
            attempts_per_minute,
            window_start: None,
            total: 0,
            per_identity: HashMap::new(),
            failures_per_claim: HashMap::new(),
        }
    }

    fn roll(&mut self, now: Instant) {
        if self
            .window_start
            .is_none_or(|start| now.duration_since(start) >= Duration::from_secs(60))
        {
            self.window_start = Some(now);
            self.total = 0;
            self.per_identity.clear();
            self.failures_per_claim.clear();
        }
    }

    /// Counts a claim request; `false` if it is over a limit.
    fn allow(&mut self, identity_key: &[u8; 32], claim_id: &str, now: Instant) -> bool {
        self.roll(now);
        if self.total >= self.attempts_per_minute
            || self
                .failures_per_claim
                .get(claim_id)
                .is_some_and(|failures| *failures >= FAILURES_PER_CLAIM_PER_MINUTE)
        {
            return false;
        }
        let count = self.per_identity.entry(*identity_key).or_insert(0);
        if *count >= ATTEMPTS_PER_IDENTITY_PER_MINUTE {
            return false;
        }
        *count += 1;
        self.total += 1;
        true
    }

    /// Counts a proof that did not verify against `claim_id` (empty: the allow-list).
    fn failed(&mut self, claim_id: &str, now: Instant) {
        self.roll(now);
        // Bounded: a failure always follows a counted request.
        if self.failures_per_claim.len() < self.attempts_per_minute as usize {
            *self
                .failures_per_claim
                .entry(claim_id.to_owned())
                .or_insert(0) += 1;
        }
    }
}

/// The provisioning task.
#[allow(missing_debug_implementations)] // Holds trait objects; nothing useful to print.
pub struct Provisioning {
    /// Registry.
    pub store: Arc<dyn Store>,
    /// The fleet server's identity (devices may pin its public key).
    pub identity: ServerIdentity,
    /// Where answers go.
    pub publisher: Publisher,
    /// New devices are admitted by the broker at once.
    pub credentials: CredentialCache,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Time for token expiry.
    pub clock: Arc<dyn Clock>,
    /// Claim requests accepted per minute, all traps together.
    pub attempts_per_minute: u32,
}

impl Provisioning {
    /// Serves claim messages until the channel closes.
    pub async fn run(self, mut inbound: mpsc::Receiver<Inbound>) {
        let mut waiting: HashMap<SessionId, Waiting> = HashMap::new();
        let mut limits = RateLimit::new(self.attempts_per_minute);
        while let Some(message) = inbound.recv().await {
            let now = Instant::now();
            waiting.retain(|_, w| now.duration_since(w.since) < PENDING_TTL);
            let Ok((session, Direction::Up)) = topic::parse_provision_topic(&message.topic) else {
                self.metrics.reject(Rejection::TopicInvalid);
                continue;
            };
            let answer = match ProvisionUp::decode(&message.payload) {
                Ok(ProvisionUp::ClaimRequest(request)) => {
                    self.on_request(session, request, &mut waiting, &mut limits, now)
                        .await
                }
                Ok(ProvisionUp::ClaimProof(proof)) => match waiting.remove(&session) {
                    Some(claim) => {
                        let claim_id = claim.claim_id.clone().unwrap_or_default();
                        let answer = self.on_proof(session, claim, &proof).await;
                        if matches!(answer, Err(ClaimRejectReason::ProofInvalid)) {
                            limits.failed(&claim_id, now);
                        }
                        answer
                    }
                    None => Err(ClaimRejectReason::Replayed),
                },
                Err(_) => {
                    self.metrics.reject(Rejection::Malformed);
                    continue;
                }
            };
            let answer = answer.unwrap_or_else(|reason| {
                self.metrics.reject(Rejection::Provisioning);
                tracing::info!(session = session.as_str(), ?reason, "claim refused");
                ProvisionDown::ClaimRejected(ClaimRejected { reason })
            });
            self.publish(&session, &answer).await;
        }
    }

    async fn on_request(
        &self,
        session: SessionId,
        request: ClaimRequest,
        waiting: &mut HashMap<SessionId, Waiting>,
        limits: &mut RateLimit,
        now: Instant,
    ) -> Result<ProvisionDown, ClaimRejectReason> {
        if !limits.allow(&request.identity_key, &request.claim_id, now)
            || (waiting.len() >= PENDING_MAX && !waiting.contains_key(&session))
        {
            return Err(ClaimRejectReason::RateLimited);
        }
        let (token, claim_id) = self.authorize(&request).await?;
        let challenge = ServerChallenge::new(&self.identity, random(), random(), request.identity_key);
        let (challenge, pending) = challenge.into_parts();
        waiting.insert(session, Waiting { pending, token, claim_id, since: now });
        Ok(ProvisionDown::ClaimChallenge(challenge))
    }

    /// The token the proof must bind, after the checks the store repeats at commit.
    async fn authorize(
        &self,
        request: &ClaimRequest,
    ) -> Result<(Option<ClaimToken>, Option<String>), ClaimRejectReason> {
        if request.claim_id.is_empty() {
            return match self.store.allowed_identity(request.identity_key).await {
                Ok(Some(_)) => Ok((None, None)),
                Ok(None) => Err(ClaimRejectReason::IdentityNotAllowed),
                Err(error) => Err(internal(&error)),
            };
        }
        let info = match self
            .store
            .get_claim_token(request.claim_id.to_string())
            .await
        {
            Ok(Some(info)) => info,
            Ok(None) => return Err(ClaimRejectReason::TokenUnknown),
            Err(error) => return Err(internal(&error)),
        };
        info.check_usable(self.clock.now_ms())
            .map_err(|e| reject_reason(&e))?;
        let token = ClaimToken::from_stored(&info.id, *info.secret_digest.as_bytes())
            .map_err(|_| ClaimRejectReason::TokenUnknown)?;
        Ok((Some(token), Some(info.id)))
    }

    async fn on_proof(
        &self,
        session: SessionId,
        claim: Waiting,
        proof: &wildcam_sdk::provision::ClaimProof,
    ) -> Result<ProvisionDown, ClaimRejectReason> {
        let identity_key = claim.pending.identity_key();
        let session_key = claim
            .pending
            .verify(claim.token.as_ref(), proof)
            .map_err(|_| ClaimRejectReason::ProofInvalid)?;
        let device_id = device_id_for(&identity_key);
        let password = random_password();
        let authorization = match claim.claim_id {
            Some(claim_id) => ClaimAuthorization::Token { claim_id },
            None => ClaimAuthorization::AllowList,
        };
        let new_device = NewDevice {
            id: device_id.clone(),
            identity_key,
            mqtt_password_hash: PasswordHash::of(&password),
            session_key: session_key.clone(),
            authorization,
        };
        let device = self
            .store
            .create_device(new_device)
            .await
            .map_err(|e| reject_reason(&e))?;
        self.credentials
            .upsert(device.id.as_str(), PasswordHash::of(&password), device.status);
        self.metrics.device_provisioned();
        tracing::info!(device = device.id.as_str(), session = session.as_str(), "device provisioned");
        let credentials = Credentials {
            device_id,
            mqtt_password: MqttPassword::try_from(password.as_str())
                .map_err(|_| ClaimRejectReason::Internal)?,
        };
        let mut frame = [0u8; CREDENTIALS_FRAME_LEN_MAX];
        let len = seal_credentials(&session_key, &session, &credentials, &mut frame)
            .map_err(|_| ClaimRejectReason::Internal)?;
        let frame = heapless::Vec::from_slice(&frame[..len]).map_err(|_| ClaimRejectReason::Internal)?;
        Ok(ProvisionDown::Credentials(SealedCredentials { frame }))
    }

    async fn publish(&self, session: &SessionId, answer: &ProvisionDown) {
        let mut buf = vec![0u8; ProvisionDown::ENCODED_LEN_MAX];
        let Ok(bytes) = answer.encode(&mut buf) else {
            tracing::error!(kind = ?answer.kind(), "provisioning answer does not encode");
            return;
        };
        let topic = topic::provision_topic(session, Direction::Down);
        if let Err(error) = self.publisher.publish(topic.as_str(), bytes.to_vec()).await {
            tracing::warn!(session = session.as_str(), %error, "provisioning answer not published");
        }
    }
}

/// A device's id: `wc-` and 16 hex digits of the SHA-256 of its identity key,
/// so the same hardware always gets the same id.
pub fn device_id_for(identity_key: &[u8; 32]) -> DeviceId {
    let digest = Sha256::digest(identity_key);
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    // 3 + 16 characters of [a-z0-9-]: always a valid id.
    DeviceId::new(&format!("wc-{hex}")).unwrap_or_else(|_| unreachable_id())
}

fn unreachable_id() -> DeviceId {
    // `wc-` + hex is always valid; this only keeps the signature total.
    DeviceId::new("wc-invalid").unwrap_or_else(|_| unreachable!("a literal valid id"))
}

fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    OsRng.fill_bytes(&mut bytes);
    bytes
}

/// 32 random bytes as 64 lowercase hex digits (the broker's password field).
fn random_password() -> String {
    random::<32>().iter().map(|b| format!("{b:02x}")).collect()
}

fn internal(error: &StoreError) -> ClaimRejectReason {
    tracing::error!(%error, "store failed during provisioning");
    ClaimRejectReason::Internal
}

fn reject_reason(error: &StoreError) -> ClaimRejectReason {
    match error {
        StoreError::ClaimTokenNotFound(_) => ClaimRejectReason::TokenUnknown,
        StoreError::ClaimTokenExpired(_) => ClaimRejectReason::TokenExpired,
        StoreError::ClaimTokenExhausted(_) => ClaimRejectReason::TokenExhausted,
        StoreError::ClaimTokenRevoked(_) => ClaimRejectReason::Revoked,
        StoreError::NotOnAllowList => ClaimRejectReason::IdentityNotAllowed,
        StoreError::IdentityRevoked { .. } => ClaimRejectReason::Revoked,
        StoreError::IdentityAlreadyClaimed { .. } => ClaimRejectReason::Replayed,
        other => internal(other),
    }
}

/// The credentials frame fits its envelope (checked at compile time).
const _: () = assert!(SealedCredentials::ENCODED_LEN_MAX <= ProvisionDown::ENCODED_LEN_MAX);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_are_stable_and_valid() {
        let a = device_id_for(&[7; 32]);
        assert_eq!(a, device_id_for(&[7; 32]));
        assert_ne!(a, device_id_for(&[8; 32]));
        assert!(a.as_str().starts_with("wc-") && a.as_str().len() == 19, "{a}");
    }

    #[test]
    fn rate_limit_per_identity_per_claim_failures_and_overall() {
        let mut limits = RateLimit::new(100);
        let now = Instant::now();
        // One trap retrying is limited...
        for _ in 0..ATTEMPTS_PER_IDENTITY_PER_MINUTE {
            assert!(limits.allow(&[1; 32], "batch-1", now));
        }
        assert!(!limits.allow(&[1; 32], "batch-1", now));
        // ...but many traps share one valid multi-use token freely.
        for trap in 2..60u8 {
            assert!(limits.allow(&[trap; 32], "batch-1", now), "trap {trap}");
        }
        // Failed proofs lock the claim id for the window, not other ids.
        for _ in 0..FAILURES_PER_CLAIM_PER_MINUTE {
            limits.failed("batch-1", now);
        }
        assert!(!limits.allow(&[70; 32], "batch-1", now));
        assert!(limits.allow(&[70; 32], "batch-2", now));
        // The overall limit holds whatever the keys.
        for trap in 71..=101u8 {
            let _ = limits.allow(&[trap; 32], "batch-3", now);
        }
        assert!(!limits.allow(&[200; 32], "batch-4", now));
        // A new window starts afresh.
        let later = now + Duration::from_secs(61);
        assert!(limits.allow(&[1; 32], "batch-1", later));
        assert!(limits.allow(&[200; 32], "batch-4", later));
    }

    #[test]
    fn passwords_fit_the_credentials() {
        let password = random_password();
        assert_eq!(password.len(), 64);
        assert!(MqttPassword::try_from(password.as_str()).is_ok());
        assert_ne!(password, random_password());
    }
}
