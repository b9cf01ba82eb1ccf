//! A whole run: provision (or reuse) the fleet, connect it, run virtual time,
//! drain, then check with the server that every generated detection is
//! stored exactly once, and report.
//!
//! An OTA rehearsal adds: the signing key is read and the image signed before
//! anything else, the image uploaded after provisioning (idempotent: the
//! same image again is the same firmware), the rollout created at
//! `ota.start_h` virtual time naming this run's traps, watched until the
//! server says it is over, and read back for the report.
//!
//! [`Simulation::prepare`] does everything up to the start and returns the
//! shared [`World`] (its counters can be watched while it runs, as the CI test
//! does to restart the server in the middle); [`Simulation::run`] runs it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::api::{ApiClient, ApiError, RolloutView};
use crate::clock::{PACER_PERIOD, Pacer, VirtualClock};
use crate::fleet::{ClaimSetup, FleetError, FleetState, TrapPlan, TrapState};
use crate::ota::{Firmware, OtaSetupError, OtaShared, RolloutStart};
use crate::report::{Check, OtaReport, Report};
use crate::scenario::Scenario;
use crate::stats::{Counters, Histogram, ProcessSample};
use crate::trap::{Mode, Trap, TrapOutcome, World};

/// Lowest factor of `"max"` mode (virtual time never stops entirely).
const MAX_MODE_FACTOR_MIN: f64 = 1.0;
/// Highest factor of `"max"` mode.
const MAX_MODE_FACTOR_MAX: f64 = 1_000_000.0;
/// Factor `"max"` mode starts at.
const MAX_MODE_FACTOR_START: f64 = 2_000.0;
/// Longest wait for every trap to be connected before the clock starts.
const READY_TIMEOUT: Duration = Duration::from_secs(600);
/// Devices whose detections are read back at once.
const CHECKS_AT_ONCE: usize = 8;
/// Lifetime of the claim tokens the simulator creates, seconds.
const CLAIM_TOKEN_LIFETIME_S: u32 = 86_400;
/// How often the rollout is read while it runs (and while reading it back).
const ROLLOUT_POLL: Duration = Duration::from_millis(500);
/// Longest wait at the end for the server to record the last results.
const ROLLOUT_READ_BACK_MAX: Duration = Duration::from_secs(10);

/// What the traps talk to.
#[derive(Debug, Clone)]
pub enum Target {
    /// A WildCAM fleet server.
    Fleet {
        /// Its MQTT listener.
        mqtt: SocketAddr,
        /// Its HTTP listener (operator API).
        http: SocketAddr,
        /// An API token: admin to create claim tokens, read-only is enough
        /// with `claim_tokens` given or every trap already provisioned.
        api_token: String,
        /// Password of the shared provisioning account.
        provision_password: String,
        /// Claim tokens to use instead of creating them.
        claim_tokens: Vec<String>,
        /// Traps per claim token (its number of uses).
        claims_per_token: u32,
    },
    /// Any MQTT broker: no provisioning, no server acks, no final check.
    Plain {
        /// The broker.
        mqtt: SocketAddr,
        /// Username and password, if the broker wants them.
        credentials: Option<(String, String)>,
    },
}

/// How to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The scenario (already validated).
    pub scenario: Scenario,
    /// What to talk to.
    pub target: Target,
    /// Where provisioned credentials persist (None: nowhere).
    pub state_dir: Option<PathBuf>,
    /// Show a live progress line on standard error.
    pub progress: bool,
    /// Stop everything after this long (real time), whatever happened.
    pub timeout: Duration,
}

/// Why a run could not be carried out (as opposed to a run with losses,
/// which is a report).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The operator API failed.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// Provisioning or the state directory failed.
    #[error(transparent)]
    Fleet(#[from] FleetError),
    /// The OTA rehearsal could not be set up (its signing key).
    #[error(transparent)]
    Ota(#[from] OtaSetupError),
    /// Something else.
    #[error("{0}")]
    Setup(String),
}

/// A prepared run.
#[derive(Debug)]
pub struct Simulation {
    world: Arc<World>,
    options: Options,
    traps: Vec<Trap>,
    state: Option<FleetState>,
    provisioned: usize,
    provisioning_s: f64,
    ota: Option<OtaPlan>,
}

/// What the engine needs to run a rollout.
#[derive(Debug, Clone)]
struct OtaPlan {
    firmware_id: u32,
    image_bytes: u64,
    /// Every trap of the run.
    devices: Vec<String>,
}

impl Simulation {
    /// Provisions what is missing and builds every trap; nothing connects yet.
    pub async fn prepare(options: Options) -> Result<Self, EngineError> {
        let scenario = options.scenario.clone();
        let traps = scenario.fleet.traps;
        let firmware = match (&options.target, scenario.ota.enabled) {
            (_, false) => None,
            (Target::Fleet { .. }, true) => Some(Firmware::load(&scenario)?),
            (Target::Plain { .. }, true) => {
                return Err(EngineError::Setup(
                    "an OTA rehearsal ([ota] enabled) needs the fleet server, not a plain broker".into(),
                ));
            }
        };
        let started = Instant::now();
        let mut firmware_id = None;
        let (mode, mqtt, mut state, provisioned) = match &options.target {
            Target::Fleet { mqtt, http, api_token, provision_password, claim_tokens, claims_per_token } => {
                let api = ApiClient::new(*http, api_token.clone());
                let identity = api.server_identity().await?;
                let mut state = FleetState::load(options.state_dir.as_deref(), &identity, scenario.seed)?;
                let missing: Vec<u32> = (0..traps).filter(|&i| state.trap(i).is_none()).collect();
                let mut provisioned = 0;
                if !missing.is_empty() {
                    let tokens = if claim_tokens.is_empty() {
                        create_claim_tokens(&api, missing.len(), *claims_per_token).await?
                    } else {
                        claim_tokens.clone()
                    };
                    // Token k serves the k-th block of `claims_per_token` missing traps.
                    let setup = ClaimSetup {
                        mqtt: *mqtt,
                        provision_password: provision_password.clone(),
                        tokens,
                        claims_per_token: *claims_per_token,
                        server_key: parse_key(&identity),
                    };
                    let show = options.progress;
                    let total = missing.len();
                    provisioned = crate::fleet::provision_all(&setup, &mut state, &missing, |done| {
                        if show && (done % 50 == 0 || done == total) {
                            eprint!("\rprovisioning: {done}/{total} traps claimed");
                        }
                    })
                    .await?;
                    if show {
                        eprintln!();
                    }
                }
                state.save(false)?;
                if let Some(firmware) = &firmware {
                    firmware_id = Some(
                        api.upload_firmware(firmware.image.clone(), firmware.manifest_header())
                            .await?,
                    );
                }
                (Mode::Fleet, *mqtt, Some(state), provisioned)
            }
            Target::Plain { mqtt, credentials } => {
                (Mode::Plain { credentials: credentials.clone() }, *mqtt, None, 0)
            }
        };
        let provisioning_s = started.elapsed().as_secs_f64();
        let world = Arc::new(world(&scenario, mode, mqtt, firmware.as_ref().map(OtaShared::new)));
        let mut built = Vec::with_capacity(traps as usize);
        let mut devices = Vec::with_capacity(traps as usize);
        for index in 0..traps {
            let trap_state = match state.as_mut() {
                Some(state) => state
                    .trap(index)
                    .ok_or_else(|| EngineError::Setup(format!("trap {index} has no credentials")))?,
                None => TrapState::plain(scenario.seed, index),
            };
            devices.push(trap_state.device_id.as_str().to_owned());
            let plan = TrapPlan::draw(&scenario, index);
            let trap = Trap::new(plan, trap_state, world.clone())
                .map_err(|e| EngineError::Setup(format!("trap {index}: queue: {e}")))?;
            built.push(trap);
        }
        let ota = firmware
            .zip(firmware_id)
            .map(|(firmware, firmware_id)| OtaPlan {
                firmware_id,
                image_bytes: firmware.image.len() as u64,
                devices,
            });
        Ok(Self { world, options, traps: built, state, provisioned, provisioning_s, ota })
    }

    /// The shared state, to watch the counters while the run goes on.
    pub fn world(&self) -> Arc<World> {
        self.world.clone()
    }

    /// Connects the fleet, runs virtual time to the end, drains, checks and reports.
    pub async fn run(mut self) -> Result<Report, EngineError> {
        let world = self.world.clone();
        let overall = Instant::now();
        let before = ProcessSample::now();
        let trap_count = self.traps.len();
        let mut tasks = JoinSet::new();
        for trap in std::mem::take(&mut self.traps) {
            tasks.spawn(trap.run());
        }
        let _watchdog = AbortOnDrop(tokio::spawn(watchdog(world.clone(), self.options.timeout)));
        wait_ready(&world, trap_count, self.options.progress).await;
        let connect_s = overall.elapsed().as_secs_f64();
        let connected = ProcessSample::now();
        let day_started = Instant::now();
        world.clock.start();
        let _ = world.started.send(true);
        let _pacer = world
            .pacer
            .is_some()
            .then(|| AbortOnDrop(tokio::spawn(pace(world.clone()))));
        let _progress = self
            .options
            .progress
            .then(|| AbortOnDrop(tokio::spawn(progress(world.clone(), trap_count))));
        let rollout = match (&self.ota, &self.options.target) {
            (Some(plan), Target::Fleet { http, api_token, .. }) => {
                let api = ApiClient::new(*http, api_token.clone());
                Some(AbortOnDrop(tokio::spawn(drive_rollout(world.clone(), api, plan.clone()))))
            }
            _ => None,
        };
        let mut outcomes = Vec::with_capacity(trap_count);
        while let Some(joined) = tasks.join_next().await {
            outcomes.push(joined.map_err(|e| EngineError::Setup(format!("a trap task failed: {e}")))?);
        }
        let day_s = day_started.elapsed().as_secs_f64();
        drop(rollout);
        let after = ProcessSample::now();
        if self.options.progress {
            eprintln!();
        }
        outcomes.sort_by_key(|o| o.index);
        if let Some(state) = self.state.as_mut() {
            for outcome in &outcomes {
                state.set(outcome.index, &outcome.state);
            }
            state.save(true)?;
        }
        let check_started = Instant::now();
        let (check, ota) = match &self.options.target {
            Target::Fleet { http, api_token, .. } => {
                let api = ApiClient::new(*http, api_token.clone());
                let ota = match &self.ota {
                    Some(plan) => Some(ota_report(&world, &api, plan).await),
                    None => None,
                };
                (Some(check_stored(api, &outcomes).await?), ota)
            }
            Target::Plain { .. } => (None, None),
        };
        let timings = crate::report::Timings {
            provisioning_s: self.provisioning_s,
            connect_s,
            day_s,
            check_s: check_started.elapsed().as_secs_f64(),
            total_s: overall.elapsed().as_secs_f64() + self.provisioning_s,
        };
        let samples = crate::report::Samples { before, connected, after };
        Ok(Report::build(&world, &outcomes, check, self.provisioned, timings, samples, ota))
    }
}

/// Waits until every trap is connected (or asleep), bounded.
async fn wait_ready(world: &World, traps: usize, show: bool) {
    {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last_shown = 0;
        while (world.ready.load(Ordering::Relaxed) as usize) < traps && Instant::now() < deadline {
            if world.abort.load(Ordering::Relaxed) {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), world.ready_changed.notified()).await;
            let ready = world.ready.load(Ordering::Relaxed);
            if show && ready != last_shown {
                eprint!("\rconnecting: {ready}/{traps} traps ready");
                last_shown = ready;
            }
        }
        if show {
            eprintln!();
        }
    }
}

fn world(scenario: &Scenario, mode: Mode, mqtt: SocketAddr, ota: Option<OtaShared>) -> World {
    let start_ms = u64::from(scenario.time.start_unix_s) * 1_000;
    let (factor, pacer) = match scenario.time.compression.factor() {
        Some(factor) => (factor, None),
        None => {
            let target = scenario.fleet.inflight_max as f64;
            (MAX_MODE_FACTOR_START, Some(Pacer::new(target, MAX_MODE_FACTOR_MIN, MAX_MODE_FACTOR_MAX)))
        }
    };
    World {
        clock: VirtualClock::new(start_ms, factor),
        pacer,
        counters: Counters::default(),
        latency: Histogram::default(),
        connect_slots: Semaphore::new(scenario.network.connects_at_once),
        end_ms: start_ms + scenario.duration_ms(),
        ready: AtomicU64::new(0),
        ready_changed: Notify::new(),
        started: watch::channel(false).0,
        sped_up: watch::channel(0).0,
        abort: AtomicBool::new(false),
        ota,
        scenario: scenario.clone(),
        mode,
        mqtt,
    }
}

/// Aborts a helper task when the run ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn watchdog(world: Arc<World>, timeout: Duration) {
    tokio::time::sleep(timeout).await;
    eprintln!("wildcam-sim: the run took longer than {} s; stopping every trap", timeout.as_secs());
    world.abort.store(true, Ordering::Relaxed);
}

async fn pace(world: Arc<World>) {
    let Some(pacer) = &world.pacer else {
        return;
    };
    let mut tick = tokio::time::interval(PACER_PERIOD);
    let mut announced = world.clock.factor();
    loop {
        tick.tick().await;
        pacer.adjust(&world.clock, world.counters.acked.load(Ordering::Relaxed));
        let factor = world.clock.factor();
        if factor > 2.0 * announced {
            // Deadlines computed at a much lower factor are far too late.
            world.sped_up.send_modify(|n| *n += 1);
            announced = factor;
        } else if factor < announced {
            announced = factor;
        }
    }
}

/// The live line on standard error.
async fn progress(world: Arc<World>, traps: usize) {
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let start_ms = world.clock.start_ms();
    loop {
        tick.tick().await;
        let c = &world.counters;
        let elapsed_ms = world.clock.now_ms().min(world.end_ms) - start_ms;
        let acked = Counters::get(&c.acked);
        let rate = acked as f64 / started.elapsed().as_secs_f64().max(0.001);
        eprint!(
            "\r\x1b[Kday {} {:02}:{:02} (×{:.0}) | generated {} acked {} ({:.0}/s) | connected {} | traps done {}/{}",
            elapsed_ms / 86_400_000 + 1,
            elapsed_ms / 3_600_000 % 24,
            elapsed_ms / 60_000 % 60,
            world.clock.factor(),
            Counters::get(&c.generated),
            acked,
            rate,
            Counters::get(&c.connected_now),
            Counters::get(&c.traps_done),
            traps,
        );
    }
}

/// Creates the rollout at `ota.start_h` virtual time, then watches it until
/// the server says it is over (completed, paused, aborted): targets still
/// waiting for an offer stop waiting then.
async fn drive_rollout(world: Arc<World>, api: ApiClient, plan: OtaPlan) {
    let Some(shared) = world.ota.as_ref() else {
        return;
    };
    let ota = &world.scenario.ota;
    let at_ms = world.clock.start_ms() + (ota.start_h * 3_600_000.0) as u64;
    while world.clock.now_ms() < at_ms {
        if world.abort.load(Ordering::Relaxed) {
            return;
        }
        let wake = world
            .clock
            .real_deadline(at_ms)
            .min(Instant::now() + ROLLOUT_POLL);
        tokio::time::sleep_until(wake).await;
    }
    let (at, at_virtual_ms) = (Instant::now(), world.clock.now_ms());
    let created = api
        .create_rollout(plan.firmware_id, &plan.devices, ota.max_in_flight, ota.failure_threshold)
        .await;
    let id = match created {
        Ok(id) => id,
        Err(error) => {
            eprintln!("wildcam-sim: the rollout was not created: {error}");
            shared.fail(error.to_string());
            return;
        }
    };
    let _ = shared.rollout.set(RolloutStart { id, at, at_virtual_ms });
    loop {
        tokio::time::sleep(ROLLOUT_POLL).await;
        if let Ok(view) = api.rollout(id).await
            && view.state != "active"
        {
            shared.settled.store(true, Ordering::Relaxed);
            return;
        }
    }
}

/// Reads the rollout back (waiting, bounded, for the last results to be
/// recorded) and builds the report's OTA section.
async fn ota_report(world: &World, api: &ApiClient, plan: &OtaPlan) -> OtaReport {
    let ota = &world.scenario.ota;
    let base = OtaReport {
        firmware_id: plan.firmware_id,
        image_bytes: plan.image_bytes,
        from_version: ota.from_version.clone(),
        to_version: ota.to_version.clone(),
        targets: plan.devices.len() as u64,
        ..OtaReport::default()
    };
    let Some(shared) = world.ota.as_ref() else {
        return base;
    };
    let Some(start) = shared.rollout.get() else {
        let error = shared
            .error()
            .unwrap_or_else(|| "the rollout was never created (the run ended first)".into());
        return OtaReport::build(shared, OtaReport { error: Some(error), ..base }, None);
    };
    let deadline = Instant::now() + ROLLOUT_READ_BACK_MAX;
    let mut last: Result<RolloutView, ApiError>;
    loop {
        last = api.rollout(start.id).await;
        let report = OtaReport::build(shared, base.clone(), last.as_ref().ok().cloned());
        if report.ok || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(ROLLOUT_POLL).await;
    }
    match last {
        Ok(view) => OtaReport::build(shared, base, Some(view)),
        Err(error) => OtaReport::build(shared, OtaReport { error: Some(error.to_string()), ..base }, None),
    }
}

/// Creates enough claim tokens for `traps` at `claims_per_token` each.
async fn create_claim_tokens(
    api: &ApiClient,
    traps: usize,
    claims_per_token: u32,
) -> Result<Vec<String>, ApiError> {
    let per_token = claims_per_token.max(1) as usize;
    let count = traps.div_ceil(per_token);
    let mut tokens = Vec::with_capacity(count);
    for i in 0..count {
        let uses = per_token.min(traps - i * per_token) as u32;
        tokens.push(
            api.create_claim_token(uses, CLAIM_TOKEN_LIFETIME_S, "wildcam-sim")
                .await?,
        );
    }
    Ok(tokens)
}

fn parse_key(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(key)
}

/// Reads every trap's detections back and compares them with what it generated.
async fn check_stored(api: ApiClient, outcomes: &[TrapOutcome]) -> Result<Check, EngineError> {
    let slots = Arc::new(Semaphore::new(CHECKS_AT_ONCE));
    let mut tasks = JoinSet::new();
    for (position, outcome) in outcomes.iter().enumerate() {
        let device = outcome.state.device_id.as_str().to_owned();
        let (api, slots) = (api.clone(), slots.clone());
        tasks.spawn(async move {
            let _slot = slots.acquire().await;
            (position, read_all(&api, &device).await)
        });
    }
    let mut check = Check::default();
    while let Some(joined) = tasks.join_next().await {
        let (position, stored) = joined.map_err(|e| EngineError::Setup(e.to_string()))?;
        check.add(&outcomes[position], &stored?);
    }
    Ok(check)
}

/// Every stored detection of `device`, page by page (bounded by the page count).
async fn read_all(api: &ApiClient, device: &str) -> Result<Vec<crate::api::StoredDetection>, ApiError> {
    let mut all = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..100_000 {
        let (page, next) = api.detections_page(device, cursor.as_deref()).await?;
        all.extend(page);
        match next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    Ok(all)
}
