//! Claiming through the public API: the claim token's secret never travels,
//! and a proof without it is refused.

use std::collections::HashMap;

use proptest::prelude::*;
use wildcam_sdk::provision::{
    CLAIM_ID_LEN_MAX, CLAIM_SECRET_LEN_MIN, CLAIM_TOKEN_LEN_MAX, CREDENTIALS_FRAME_LEN_MAX, ClaimChallenge,
    ClaimProof, ClaimRequest, ClaimToken, Credentials, DeviceIdentity, MqttPassword, PendingClaim,
    ProvisionError, ProvisionState, Provisioner, ServerChallenge, ServerIdentity, seal_credentials,
};
use wildcam_sdk::seal::SessionKey;
use wildcam_sdk::topic::SessionId;

const TOKEN_ID: &str = "Kx9_q2Lm";
const SECRET: &str = "pV3n-8RtYw1cQz7bH4sDj0aFe6uGk2Li5MxNo9_TrWc";
const SERVER_SEED: [u8; 32] = [0x20; 32];

fn token_text() -> String {
    format!("{TOKEN_ID}.{SECRET}")
}

fn token() -> ClaimToken {
    ClaimToken::parse(&token_text()).unwrap()
}

fn session(seed: u8) -> SessionId {
    SessionId::from_random([seed; 8])
}

fn server() -> ServerIdentity {
    ServerIdentity::from_seed(SERVER_SEED)
}

fn device(seed: u8, claim: Option<ClaimToken>) -> Provisioner {
    let identity = DeviceIdentity::from_seed([seed; 32]);
    Provisioner::new(identity, claim, session(seed), [seed ^ 0x55; 32], Some(server().public_key()))
}

fn encode<T: serde::Serialize>(message: &T) -> Vec<u8> {
    let mut buffer = [0u8; 256];
    postcard::to_slice(message, &mut buffer).unwrap().to_vec()
}

/// A toy fleet server: tokens stored in full and looked up by id, an
/// allow-list of identity keys.
struct Server {
    identity: ServerIdentity,
    tokens: HashMap<String, String>,
    allow_list: Vec<[u8; 32]>,
}

enum Lookup {
    Token(ClaimToken),
    AllowList,
}

impl Server {
    fn new() -> Self {
        Self {
            identity: server(),
            tokens: HashMap::from([(TOKEN_ID.to_owned(), token_text())]),
            allow_list: Vec::new(),
        }
    }

    /// Step 1 → 2: decodes the request and answers it, or refuses.
    fn challenge(&self, request: &[u8], random: u8) -> Option<(ClaimChallenge, Pending)> {
        let request: ClaimRequest = postcard::from_bytes(request).ok()?;
        let lookup = if request.claim_id.is_empty() {
            self.allow_list
                .contains(&request.identity_key)
                .then_some(Lookup::AllowList)?
        } else {
            let stored = self.tokens.get(request.claim_id.as_str())?;
            Lookup::Token(ClaimToken::parse(stored).ok()?)
        };
        let (challenge, pending) = ServerChallenge::new(
            &self.identity,
            [random; 32],
            [random.wrapping_add(1); 32],
            request.identity_key,
        )
        .into_parts();
        Some((challenge, Pending { pending, lookup }))
    }
}

struct Pending {
    pending: PendingClaim,
    lookup: Lookup,
}

impl Pending {
    /// Step 3 → 4.
    fn verify(self, proof: &[u8]) -> Result<SessionKey, ProvisionError> {
        let proof: ClaimProof = postcard::from_bytes(proof).map_err(|_| ProvisionError::ProofInvalid)?;
        let claim = match &self.lookup {
            Lookup::Token(token) => Some(token),
            Lookup::AllowList => None,
        };
        self.pending.verify(claim, &proof)
    }
}

fn credentials() -> Credentials {
    Credentials {
        device_id: "trap-0042".parse().unwrap(),
        mqtt_password: MqttPassword::try_from("generated-pw").unwrap(),
    }
}

/// Steps 1 to 5 over encoded messages; returns the encoded request and proof.
fn claim_end_to_end(server: &Server, mut device: Provisioner) -> (Vec<u8>, Vec<u8>) {
    let request = encode(&device.request());
    let (challenge, pending) = server.challenge(&request, 7).expect("server answers");
    let challenge: ClaimChallenge = postcard::from_bytes(&encode(&challenge)).unwrap();
    let proof = encode(&device.on_challenge(&challenge).unwrap());
    let key = pending.verify(&proof).unwrap();
    let mut frame = [0u8; CREDENTIALS_FRAME_LEN_MAX];
    let len = seal_credentials(&key, &device.session(), &credentials(), &mut frame).unwrap();
    let provisioned = device.on_credentials(&mut frame[..len]).unwrap();
    assert_eq!(provisioned.session_key.as_bytes(), key.as_bytes());
    assert_eq!(provisioned.device_id.as_str(), "trap-0042");
    assert_eq!(device.state(), ProvisionState::Provisioned);
    (request, proof)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

#[test]
fn token_claim_works_and_the_secret_never_travels() {
    let (request, proof) = claim_end_to_end(&Server::new(), device(1, Some(token())));
    assert!(contains(&request, TOKEN_ID.as_bytes()), "the id travels");
    let digest = token().secret_digest().to_owned();
    for wire in [&request, &proof, &[request.clone(), proof.clone()].concat()] {
        assert!(!contains(wire, SECRET.as_bytes()), "secret on the wire");
        assert!(!contains(wire, &digest), "secret digest on the wire");
        // Not even a fragment of the secret.
        for fragment in SECRET.as_bytes().windows(8) {
            assert!(!contains(wire, fragment), "secret fragment on the wire");
        }
        assert!(!contains(wire, token_text().as_bytes()));
    }
}

#[test]
fn allow_list_claim_works() {
    let mut server = Server::new();
    let identity = DeviceIdentity::from_seed([3; 32]);
    server.allow_list.push(identity.public_key());
    let device = device(3, None);
    assert!(device.request().claim_id.is_empty());
    claim_end_to_end(&server, device);

    // An identity that is not listed gets no challenge.
    let unlisted = encode(&self::device(4, None).request());
    assert!(server.challenge(&unlisted, 7).is_none());
}

#[test]
fn right_id_with_a_wrong_secret_is_refused() {
    let server = Server::new();
    let wrong = ClaimToken::parse(&format!("{TOKEN_ID}.{}", "A".repeat(43))).unwrap();
    assert_eq!(wrong.id(), token().id());
    let mut device = device(5, Some(wrong));
    let request = encode(&device.request());
    let (challenge, pending) = server.challenge(&request, 9).unwrap();
    let proof = encode(&device.on_challenge(&challenge).unwrap());
    assert_eq!(pending.verify(&proof).map(|_| ()), Err(ProvisionError::ProofInvalid));
}

/// A client subscribed to `wc/v1/prov/+/up` copies the genuine request's id
/// and races with its own identity: it cannot prove the secret, and the
/// genuine device still claims.
#[test]
fn eavesdropper_racing_with_the_observed_id_is_refused() {
    let server = Server::new();
    let mut genuine = device(6, Some(token()));
    let observed: ClaimRequest = postcard::from_bytes(&encode(&genuine.request())).unwrap();

    let thief = DeviceIdentity::from_seed([0x66; 32]);
    let forged_request =
        ClaimRequest { claim_id: observed.claim_id.clone(), identity_key: thief.public_key() };
    let (thief_challenge, thief_pending) = server.challenge(&encode(&forged_request), 11).unwrap();
    // Best guesses: no token, or the id with a guessed secret.
    let guessed = ClaimToken::parse(&format!("{}.{}", observed.claim_id, "x".repeat(22))).unwrap();
    let mut thief_device = Provisioner::new(thief.clone(), Some(guessed), session(0x66), [9; 32], None);
    let proof = encode(&thief_device.on_challenge(&thief_challenge).unwrap());
    assert_eq!(thief_pending.verify(&proof).map(|_| ()), Err(ProvisionError::ProofInvalid));
    let (thief_challenge, thief_pending) = server.challenge(&encode(&forged_request), 12).unwrap();
    let mut thief_device = Provisioner::new(thief, None, session(0x67), [9; 32], None);
    let proof = encode(&thief_device.on_challenge(&thief_challenge).unwrap());
    assert_eq!(thief_pending.verify(&proof).map(|_| ()), Err(ProvisionError::ProofInvalid));
    // Replaying the genuine device's proof for the thief's challenge fails too.
    let (challenge, pending) = server.challenge(&encode(&observed), 13).unwrap();
    let genuine_proof = encode(&genuine.on_challenge(&challenge).unwrap());
    let (_, thief_pending) = server.challenge(&encode(&forged_request), 13).unwrap();
    assert_eq!(thief_pending.verify(&genuine_proof).map(|_| ()), Err(ProvisionError::ProofInvalid));
    assert!(pending.verify(&genuine_proof).is_ok());
}

#[test]
fn malformed_tokens_are_refused_with_a_clear_error() {
    let secret22 = "a".repeat(CLAIM_SECRET_LEN_MIN);
    let id24 = "i".repeat(CLAIM_ID_LEN_MAX);
    let cases: Vec<(String, ProvisionError)> = vec![
        (String::new(), ProvisionError::ClaimTokenMalformed),
        (SECRET.to_owned(), ProvisionError::ClaimTokenMalformed),
        (format!("{TOKEN_ID}{SECRET}"), ProvisionError::ClaimTokenMalformed),
        (format!(".{SECRET}"), ProvisionError::ClaimIdLengthInvalid),
        (format!("{id24}i.{secret22}"), ProvisionError::ClaimIdLengthInvalid),
        (format!("{TOKEN_ID}."), ProvisionError::ClaimSecretTooShort),
        (format!("{TOKEN_ID}.{}", "a".repeat(CLAIM_SECRET_LEN_MIN - 1)), ProvisionError::ClaimSecretTooShort),
        (format!("{TOKEN_ID}.{SECRET}.x"), ProvisionError::ClaimTokenBadCharacter),
        (format!("tok en.{SECRET}"), ProvisionError::ClaimTokenBadCharacter),
        (format!("{TOKEN_ID}.{SECRET}="), ProvisionError::ClaimTokenBadCharacter),
        (format!("{TOKEN_ID}.{SECRET}\n"), ProvisionError::ClaimTokenBadCharacter),
        (format!("{TOKEN_ID}.{SECRET}+/"), ProvisionError::ClaimTokenBadCharacter),
        (format!("tök.{SECRET}"), ProvisionError::ClaimTokenBadCharacter),
        (format!("{TOKEN_ID}.{SECRET}\0"), ProvisionError::ClaimTokenBadCharacter),
        (format!("i.{}", "s".repeat(CLAIM_TOKEN_LEN_MAX - 1)), ProvisionError::ClaimTokenTooLong),
        ("x".repeat(1000), ProvisionError::ClaimTokenTooLong),
    ];
    for (text, expected) in cases {
        let result = ClaimToken::parse(&text).map(|token| token.id().to_owned());
        assert_eq!(result, Err(expected), "{text:?}");
        assert_eq!(text.parse::<ClaimToken>().map(|_| ()), Err(expected));
        let message = expected.to_string();
        assert!(message.contains("claim token"), "{message}");
        assert!(!message.contains(SECRET));
    }
}

#[test]
fn tokens_at_the_limits_are_accepted() {
    let secret22 = "a".repeat(CLAIM_SECRET_LEN_MIN);
    let id24 = "i".repeat(CLAIM_ID_LEN_MAX);
    let longest = format!("{id24}.{}", "s".repeat(CLAIM_TOKEN_LEN_MAX - CLAIM_ID_LEN_MAX - 1));
    assert_eq!(longest.len(), CLAIM_TOKEN_LEN_MAX);
    for text in [
        format!("i.{secret22}"),
        format!("{id24}.{secret22}"),
        longest,
        format!("A-z_09.{}", "-_Zz09".repeat(4)),
    ] {
        let token = ClaimToken::parse(&text).unwrap();
        assert_eq!(Some(token.id()), text.split('.').next());
    }
}

#[test]
fn debug_never_shows_the_secret() {
    let device = device(8, Some(token()));
    for text in [format!("{:?}", token()), format!("{device:?}"), format!("{:?}", device.request())] {
        assert!(text.contains(TOKEN_ID), "{text}");
        assert!(!text.contains(&SECRET[..8]), "{text}");
    }
}

#[test]
fn different_secrets_give_different_digests() {
    let a = ClaimToken::parse(&format!("id.{}", "a".repeat(22))).unwrap();
    let b = ClaimToken::parse(&format!("id.{}b", "a".repeat(21))).unwrap();
    let same_secret_other_id = ClaimToken::parse(&format!("other.{}", "a".repeat(22))).unwrap();
    assert_ne!(a.secret_digest(), b.secret_digest());
    assert_eq!(a.secret_digest(), same_secret_other_id.secret_digest());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn parse_never_panics(text in "\\PC{0,80}") {
        if let Ok(token) = ClaimToken::parse(&text) {
            prop_assert!(text.len() <= CLAIM_TOKEN_LEN_MAX);
            let prefix = format!("{}.", token.id());
            prop_assert!(text.starts_with(&prefix));
        }
    }

    #[test]
    fn well_formed_tokens_parse(id in "[A-Za-z0-9_-]{1,24}", secret in "[A-Za-z0-9_-]{22,39}") {
        let token = ClaimToken::parse(&format!("{id}.{secret}")).unwrap();
        prop_assert_eq!(token.id(), id.as_str());
        let debug = format!("{token:?}");
        prop_assert!(!debug.contains(&secret));
    }
}
