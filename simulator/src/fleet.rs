//! The fleet: what each virtual trap is (drawn once from the scenario and
//! its seed), its identity and credentials, provisioning through the
//! server's real claim protocol, and the state directory that lets a second
//! run against the same server reuse the credentials.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use wildcam_sdk::DeviceId;
use wildcam_sdk::protocol::{ProvisionDown, ProvisionUp};
use wildcam_sdk::provision::{ClaimRejectReason, ClaimToken, DeviceIdentity, Provisioned, Provisioner};
use wildcam_sdk::seal::SessionKey;
use wildcam_sdk::topic::{self, Direction, SessionId};

use crate::activity::{Activity, Pattern};
use crate::mqtt::{ConnectOptions, Link};
use crate::rng::Rng;
use crate::scenario::{EventKind, Scenario};

/// The MQTT account unclaimed traps use (the fleet server's `provision`).
pub const PROVISION_USERNAME: &str = "provision";
/// Attempts per trap before provisioning gives up.
const CLAIM_ATTEMPTS_MAX: u32 = 30;
/// Wait after a rate-limited claim before the next attempt.
const RATE_LIMITED_WAIT: Duration = Duration::from_secs(5);
/// Claims in progress at once.
const CLAIMS_AT_ONCE: usize = 32;
/// Name of the state file in the state directory.
const STATE_FILE: &str = "fleet-state.json";

/// What a trap is, drawn deterministically from the scenario and its index.
#[derive(Debug, Clone)]
pub struct TrapPlan {
    /// Index in the fleet, 0-based.
    pub index: u32,
    /// Connects only at check-in.
    pub sleepy: bool,
    /// On a flaky link.
    pub flaky: bool,
    /// Has a solar panel.
    pub solar: bool,
    /// Clock error, seconds.
    pub skew_s: i32,
    /// When it triggers.
    pub activity: Activity,
    /// Offset of its check-ins within the interval, ms.
    pub checkin_phase_ms: u64,
    /// Its site's mean temperature, °C.
    pub temperature_mean_c: f64,
    /// Signal strength, dBm.
    pub rssi_dbm: i8,
    /// Starting state of charge, 0..=1.
    pub initial_soc: f64,
    /// Virtual windows `[start, end)` (ms since the Unix epoch) in which it cannot reach the broker.
    pub offline: Vec<(u64, u64)>,
}

impl TrapPlan {
    /// Draws trap `index` of `scenario`.
    pub fn draw(scenario: &Scenario, index: u32) -> Self {
        let mut rng = Rng::new(scenario.seed, 0x504C_414E_0000_0000 | u64::from(index));
        let fleet = &scenario.fleet;
        let activity_config = &scenario.activity;
        let rate_factor = (activity_config.trap_rate_spread * rng.normal()
            - activity_config.trap_rate_spread.powi(2) / 2.0)
            .exp();
        let species = pick_species(scenario, &mut rng);
        let activity = Activity::new(
            activity_config.triggers_per_trap_per_day * rate_factor,
            activity_config.blank_rate,
            &species,
        );
        let faults = &scenario.faults;
        let skew_s = if rng.chance(faults.clock_skew_fraction) {
            let max = f64::from(faults.clock_skew_max_s);
            rng.range(-max, max) as i32
        } else {
            0
        };
        let start_ms = u64::from(scenario.time.start_unix_s) * 1_000;
        let mut offline = Vec::new();
        for event in &scenario.events {
            let affected = match event.kind {
                EventKind::BrokerOutage => true,
                EventKind::TrapsOffline => rng.chance(event.fraction),
            };
            if affected {
                let from = start_ms + (event.at_h * 3_600_000.0) as u64;
                offline.push((from, from + (event.duration_h * 3_600_000.0) as u64));
            }
        }
        Self {
            index,
            sleepy: rng.chance(fleet.sleepy_fraction),
            flaky: rng.chance(faults.flaky_fraction),
            solar: rng.chance(scenario.power.solar_fraction),
            skew_s,
            activity,
            checkin_phase_ms: rng
                .int(0, fleet.checkin_interval_s.saturating_sub(1))
                .into(),
            temperature_mean_c: scenario.power.temperature_mean_c + rng.normal() * 2.0,
            rssi_dbm: -(rng.int(65, 110) as i8),
            initial_soc: rng.range(scenario.power.initial_soc_min, scenario.power.initial_soc_max),
            offline,
        }
    }
}

/// `species_per_trap` species of the scenario's list, drawn by weight without
/// replacement, each with a per-trap abundance.
fn pick_species(scenario: &Scenario, rng: &mut Rng) -> Vec<(usize, Pattern, f64)> {
    let all = &scenario.species;
    let wanted = match scenario.activity.species_per_trap {
        0 => all.len(),
        n => n.min(all.len()),
    };
    let mut left: Vec<usize> = (0..all.len()).collect();
    let mut picked = Vec::with_capacity(wanted);
    while picked.len() < wanted {
        let total: f64 = left.iter().map(|&i| all[i].weight).sum();
        let mut pick = rng.unit() * total;
        let position = left
            .iter()
            .position(|&i| {
                pick -= all[i].weight;
                pick < 0.0
            })
            .unwrap_or(left.len() - 1);
        let index = left.swap_remove(position);
        picked.push((index, all[index].pattern, all[index].weight * rng.range(0.3, 1.7)));
    }
    picked
}

/// A 32-byte value derived from the run's identity material.
fn derive(purpose: &str, fleet_seed: u64, generation: u32, index: u32) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(b"wildcam-simulator/");
    hasher.update(purpose.as_bytes());
    hasher.update(fleet_seed.to_le_bytes());
    hasher.update(generation.to_le_bytes());
    hasher.update(index.to_le_bytes());
    hasher.finalize().into()
}

/// A trap's credentials and the counters that must survive between runs.
#[derive(Debug, Clone)]
pub struct TrapState {
    /// The id the server assigned (or the simulator chose, against a plain broker).
    pub device_id: DeviceId,
    /// Broker password (empty against a plain broker).
    pub password: String,
    /// The session key.
    pub session_key: SessionKey,
    /// The next detection sequence number.
    pub next_seq: u32,
    /// Detections the queue ever dropped.
    pub dropped_total: u32,
    /// The uplink sealer's persisted counter reservation.
    pub reservation: u32,
}

impl TrapState {
    /// A freshly provisioned trap.
    pub fn new(provisioned: Provisioned) -> Self {
        Self {
            device_id: provisioned.device_id,
            password: provisioned.mqtt_password.to_string(),
            session_key: provisioned.session_key,
            next_seq: 1,
            dropped_total: 0,
            reservation: 1,
        }
    }

    /// A trap of a plain broker: id and key derived from the seed, no password.
    pub fn plain(fleet_seed: u64, index: u32) -> Self {
        let id = DeviceId::new(&format!("sim-{fleet_seed:x}-{index}"))
            .or_else(|_| DeviceId::new(&format!("sim-{index}")))
            .unwrap_or_else(|_| unreachable!("short ids of [a-z0-9-] are valid"));
        Self {
            device_id: id,
            password: String::new(),
            session_key: SessionKey::from_bytes(derive("plain-key", fleet_seed, 0, index)),
            next_seq: 1,
            dropped_total: 0,
            reservation: 1,
        }
    }
}

/// The state file: one fleet's credentials for one server.
#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    /// The server's identity public key, hex: another server, another fleet.
    server_identity: String,
    /// The scenario seed the identities derive from.
    fleet_seed: u64,
    /// Bumped whenever identities must be new (a run that did not finish).
    generation: u32,
    /// False while a run is using the credentials.
    clean: bool,
    /// By trap index.
    traps: BTreeMap<u32, StoredTrap>,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredTrap {
    device_id: String,
    password: String,
    session_key: String,
    next_seq: u32,
    dropped_total: u32,
    reservation: u32,
}

/// Why provisioning or the state directory failed.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The state directory could not be read or written.
    #[error("state directory {path}: {message}")]
    State {
        /// The file or directory.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A trap could not be claimed.
    #[error("provisioning trap {index}: {message}")]
    Claim {
        /// The trap.
        index: u32,
        /// Why.
        message: String,
    },
}

/// Credentials of a fleet, loaded from and saved to a state directory.
#[derive(Debug)]
pub struct FleetState {
    path: Option<PathBuf>,
    file: StateFile,
}

impl FleetState {
    /// Loads the state for `server_identity` and `fleet_seed` from `dir`
    /// (created if missing), or starts afresh. A state left unclean by a run
    /// that did not finish is discarded (its sequence numbers and sealer
    /// counters are unknown) and the identities move to a new generation.
    pub fn load(dir: Option<&Path>, server_identity: &str, fleet_seed: u64) -> Result<Self, FleetError> {
        let fresh = |generation| StateFile {
            server_identity: server_identity.to_owned(),
            fleet_seed,
            generation,
            clean: true,
            traps: BTreeMap::new(),
        };
        let Some(dir) = dir else {
            // No state: identities must still differ from any earlier run.
            let generation = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u32);
            return Ok(Self { path: None, file: fresh(generation) });
        };
        let state_error = |path: &Path, e: &dyn std::fmt::Display| FleetError::State {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| state_error(dir, &e))?;
        let path = dir.join(STATE_FILE);
        let file = match std::fs::read_to_string(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => fresh(0),
            Err(e) => return Err(state_error(&path, &e)),
            Ok(text) => {
                let stored: StateFile = serde_json::from_str(&text).map_err(|e| state_error(&path, &e))?;
                if stored.server_identity != server_identity || stored.fleet_seed != fleet_seed {
                    fresh(stored.generation.wrapping_add(1))
                } else if !stored.clean {
                    eprintln!("wildcam-sim: the last run did not finish; provisioning new identities");
                    fresh(stored.generation.wrapping_add(1))
                } else {
                    stored
                }
            }
        };
        Ok(Self { path: Some(path), file })
    }

    /// The stored state of trap `index`, if it is there and readable.
    pub fn trap(&self, index: u32) -> Option<TrapState> {
        let stored = self.file.traps.get(&index)?;
        Some(TrapState {
            device_id: DeviceId::new(&stored.device_id).ok()?,
            password: stored.password.clone(),
            session_key: SessionKey::from_bytes(from_hex(&stored.session_key)?),
            next_seq: stored.next_seq,
            dropped_total: stored.dropped_total,
            reservation: stored.reservation,
        })
    }

    /// Records trap `index`.
    pub fn set(&mut self, index: u32, state: &TrapState) {
        let stored = StoredTrap {
            device_id: state.device_id.as_str().to_owned(),
            password: state.password.clone(),
            session_key: to_hex(state.session_key.as_bytes()),
            next_seq: state.next_seq,
            dropped_total: state.dropped_total,
            reservation: state.reservation,
        };
        self.file.traps.insert(index, stored);
    }

    /// The identity seed of trap `index` in this state's generation.
    pub fn identity_seed(&self, index: u32) -> [u8; 32] {
        derive("identity", self.file.fleet_seed, self.file.generation, index)
    }

    /// Writes the file (atomically, owner-only), marked clean or in use.
    pub fn save(&mut self, clean: bool) -> Result<(), FleetError> {
        self.file.clean = clean;
        let Some(path) = &self.path else {
            return Ok(());
        };
        let state_error =
            |e: &dyn std::fmt::Display| FleetError::State { path: path.clone(), message: e.to_string() };
        let text = serde_json::to_string(&self.file).map_err(|e| state_error(&e))?;
        let temporary = path.with_extension("json.tmp");
        write_private(&temporary, text.as_bytes()).map_err(|e| state_error(&e))?;
        std::fs::rename(&temporary, path).map_err(|e| state_error(&e))
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex<const N: usize>(hex: &str) -> Option<[u8; N]> {
    if hex.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Where and how traps claim themselves.
#[derive(Debug, Clone)]
pub struct ClaimSetup {
    /// The broker.
    pub mqtt: SocketAddr,
    /// Password of the shared provisioning account.
    pub provision_password: String,
    /// Claim tokens; the `i`-th trap claimed uses token `i / claims_per_token`.
    pub tokens: Vec<String>,
    /// Traps per token (its number of uses).
    pub claims_per_token: u32,
    /// The server's identity key to pin.
    pub server_key: Option<[u8; 32]>,
}

/// Provisions every trap in `indexes` (concurrently, bounded), recording each
/// in `state`; returns how many were claimed.
pub async fn provision_all(
    setup: &ClaimSetup,
    state: &mut FleetState,
    indexes: &[u32],
    progress: impl Fn(usize),
) -> Result<usize, FleetError> {
    let slots = Arc::new(Semaphore::new(CLAIMS_AT_ONCE));
    let mut tasks = tokio::task::JoinSet::new();
    for (position, &index) in indexes.iter().enumerate() {
        let token_index = position / setup.claims_per_token.max(1) as usize % setup.tokens.len().max(1);
        let token = setup
            .tokens
            .get(token_index)
            .cloned()
            .ok_or_else(|| FleetError::Claim { index, message: "no claim token".into() })?;
        let seed = state.identity_seed(index);
        let (setup, slots) = (setup.clone(), slots.clone());
        tasks.spawn(async move {
            let _slot = slots.acquire().await;
            (index, claim_with_retries(&setup, &token, seed, index).await)
        });
    }
    let mut done = 0;
    while let Some(joined) = tasks.join_next().await {
        let (index, outcome) = joined.map_err(|e| FleetError::Claim { index: 0, message: e.to_string() })?;
        let provisioned = outcome.map_err(|message| FleetError::Claim { index, message })?;
        state.set(index, &TrapState::new(provisioned));
        done += 1;
        progress(done);
    }
    Ok(done)
}

/// Claims one trap, waiting out rate limits (bounded).
async fn claim_with_retries(
    setup: &ClaimSetup,
    token: &str,
    seed: [u8; 32],
    index: u32,
) -> Result<Provisioned, String> {
    let token = ClaimToken::parse(token).map_err(|e| format!("invalid claim token: {e}"))?;
    let mut rng = Rng::new(u64::from_le_bytes(seed[..8].try_into().unwrap_or_default()), u64::from(index));
    let mut last = String::new();
    for _ in 0..CLAIM_ATTEMPTS_MAX {
        match claim_once(setup, &token, seed, &mut rng).await {
            Ok(provisioned) => return Ok(provisioned),
            Err(Some(ClaimRejectReason::RateLimited)) => {
                last = "rate limited".into();
                tokio::time::sleep(RATE_LIMITED_WAIT + Duration::from_millis(rng.int(0, 2_000).into())).await;
            }
            Err(Some(ClaimRejectReason::Replayed)) => {
                return Err(
                    "claim rejected: this identity is already claimed on this server (was the state \
                            directory lost? use another --seed or the original --state-dir)"
                        .into(),
                );
            }
            Err(Some(reason)) => return Err(format!("claim rejected: {reason}")),
            Err(None) => {
                last = "no answer".into();
                tokio::time::sleep(Duration::from_millis(rng.int(200, 1_000).into())).await;
            }
        }
    }
    Err(format!("gave up after {CLAIM_ATTEMPTS_MAX} attempts ({last})"))
}

/// One claim: `Err(Some(reason))` when rejected, `Err(None)` on a transport
/// problem or silence.
async fn claim_once(
    setup: &ClaimSetup,
    token: &ClaimToken,
    seed: [u8; 32],
    rng: &mut Rng,
) -> Result<Provisioned, Option<ClaimRejectReason>> {
    let session = SessionId::from_random(rng.bytes());
    let client_id = format!("unclaimed-{}", session.as_str());
    let down = topic::provision_topic(&session, Direction::Down);
    let mut link = Link::connect(ConnectOptions {
        addr: setup.mqtt,
        client_id: &client_id,
        credentials: Some((PROVISION_USERNAME, &setup.provision_password)),
        keep_alive: Duration::from_secs(30),
        inflight: 4,
        subscribe: Some(down.as_str()),
        timeout: crate::mqtt::CONNECT_TIMEOUT,
    })
    .await
    .map_err(|_| None)?;
    let mut device = Provisioner::new(
        DeviceIdentity::from_seed(seed),
        Some(token.clone()),
        session,
        rng.bytes(),
        setup.server_key,
    );
    let up = topic::provision_topic(&session, Direction::Up);
    publish_up(&link, &up, &ProvisionUp::ClaimRequest(device.request()))?;
    let ProvisionDown::ClaimChallenge(challenge) = answer(&mut link).await? else {
        return Err(None);
    };
    let proof = device.on_challenge(&challenge).map_err(|_| None)?;
    publish_up(&link, &up, &ProvisionUp::ClaimProof(proof))?;
    let ProvisionDown::Credentials(mut sealed) = answer(&mut link).await? else {
        return Err(None);
    };
    let provisioned = device.on_credentials(&mut sealed.frame).map_err(|_| None)?;
    link.close().await;
    Ok(provisioned)
}

fn publish_up(link: &Link, topic: &str, message: &ProvisionUp) -> Result<(), Option<ClaimRejectReason>> {
    let mut buf = [0u8; ProvisionUp::ENCODED_LEN_MAX];
    let bytes = message.encode(&mut buf).map_err(|_| None)?;
    link.publish(topic, bytes.to_vec()).map_err(|_| None)
}

/// The server's next provisioning answer (a rejection as `Err(Some)`).
async fn answer(link: &mut Link) -> Result<ProvisionDown, Option<ClaimRejectReason>> {
    let wait = async {
        loop {
            match link.eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(publish))) => {
                    return match ProvisionDown::decode(&publish.payload) {
                        Ok(ProvisionDown::ClaimRejected(rejected)) => Err(Some(rejected.reason)),
                        Ok(other) => Ok(other),
                        Err(_) => Err(None),
                    };
                }
                Ok(_) => {}
                Err(_) => return Err(None),
            }
        }
    };
    tokio::time::timeout(crate::mqtt::CONNECT_TIMEOUT, wait)
        .await
        .map_err(|_| None)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_are_reproducible_and_follow_the_fractions() {
        let mut scenario = Scenario::parse("name = \"t\"", "").unwrap();
        scenario.fleet.sleepy_fraction = 0.25;
        let a = TrapPlan::draw(&scenario, 7);
        let b = TrapPlan::draw(&scenario, 7);
        assert_eq!((a.sleepy, a.skew_s, a.rssi_dbm), (b.sleepy, b.skew_s, b.rssi_dbm));
        let sleepy = (0..2_000)
            .filter(|&i| TrapPlan::draw(&scenario, i).sleepy)
            .count();
        assert!((400..600).contains(&sleepy), "{sleepy}");
    }

    #[test]
    fn state_round_trips_and_an_unclean_run_moves_to_new_identities() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = FleetState::load(Some(dir.path()), "ab", 5).unwrap();
        let seed = state.identity_seed(3);
        let mut trap = TrapState::plain(5, 3);
        trap.next_seq = 42;
        state.set(3, &trap);
        state.save(true).unwrap();
        let again = FleetState::load(Some(dir.path()), "ab", 5).unwrap();
        assert_eq!(again.trap(3).unwrap().next_seq, 42);
        assert_eq!(again.identity_seed(3), seed);
        let mut in_use = again;
        in_use.save(false).unwrap();
        let after_crash = FleetState::load(Some(dir.path()), "ab", 5).unwrap();
        assert!(after_crash.trap(3).is_none());
        assert_ne!(after_crash.identity_seed(3), seed);
        let other_server = FleetState::load(Some(dir.path()), "cd", 5).unwrap();
        assert!(other_server.trap(3).is_none());
    }
}
