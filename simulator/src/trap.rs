//! One virtual trap: a tokio task driving the SDK's own state machines —
//! the offline queue (sequence numbers, in-flight window, cumulative acks,
//! the counted full policy), the sealer and opener, the reconnect backoff —
//! over one rumqttc connection, in virtual time.
//!
//! The trap's loop: do what is due in virtual time (triggers → detections
//! appended to the queue, check-ins → health reports, injected faults), make
//! the link match what the trap wants (connected, asleep, cut off), publish
//! what the queue hands out, then wait for the next virtual event, a packet
//! or a timeout. Acks release the queue; without one for `ack_timeout_ms`
//! the queue rewinds and resends, as firmware does.
//!
//! In an OTA rehearsal the trap also runs the SDK's update machine
//! ([`crate::ota::OtaDevice`]): it answers offers, pulls chunks (asking again
//! when none comes), verifies, reboots into the new image through the same
//! reboot path as injected faults, runs its self-test once its hello is
//! answered, and confirms or rolls back.
//!
//! Detection content comes from the trap's own random stream in trigger
//! order, so it depends on the seed only; the image digest is a hash of
//! (seed, trap, sequence): unique per (trap, sequence), which lets the final
//! check prove that every generated detection is stored exactly once.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rumqttc::{ConnectionError, Event, Outgoing, Packet};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::Instant;
use wildcam_sdk::backoff::{Backoff, BackoffConfig};
use wildcam_sdk::ota::{BootAction, OtaActions, OtaOutcome};
use wildcam_sdk::protocol::{
    BoundingBox, Capabilities, Chip, Classification, CommandKind, CommandResult, CommandStatus, ConfigStatus,
    Detection, Downlink, FirmwareVersion, Health, Hello, OtaChunk, OtaOffer, OtaResult, ReportedConfig,
    ResetReason, Route, Trigger, Uplink,
};
use wildcam_sdk::queue::{
    Extent, FlashStore, FullPolicy, Fullness, MemFlash, MemoryStore, OfflineQueue, QueueConfig, QueueError,
    QueueMeta, QueueStore, Removed, StoreError, StoredRecord,
};
use wildcam_sdk::seal::{Opener, SEAL_OVERHEAD, Sealer};
use wildcam_sdk::topic::{self, Direction};

use crate::activity::Cause;
use crate::clock::{Pacer, VirtualClock};
use crate::fleet::{TrapPlan, TrapState};
use crate::mqtt::{ConnectOptions, Link};
use crate::ota::{OtaDevice, OtaShared};
use crate::power::Power;
use crate::rng::{Rng, mix64};
use crate::scenario::{QueueStoreKind, Scenario};
use crate::stats::{Counters, Histogram};

/// Longest queue record: a detection envelope (at most 61 bytes).
pub const RECORD_LEN: usize = 64;
/// Size of the in-RAM NOR flash of a `flash` queue: 2 metadata pages and 14 record pages.
const FLASH_LEN: usize = 64 * 1024;
/// Longest uplink envelope (a hello).
const ENVELOPE_LEN_MAX: usize = Uplink::ENCODED_LEN_MAX;
/// Free image storage of a fresh SD card, KiB.
const STORAGE_KIB: u32 = 30_000_000;
/// Attempts per check-in of a sleepy trap before it gives up until the next.
const SLEEPY_ATTEMPTS_MAX: u32 = 6;
/// How often a trap with nothing to do re-checks the clock while draining.
const DRAIN_POLL: Duration = Duration::from_millis(50);
/// Longest real sleep: a trap re-checks the clock and the abort flag at least this often.
const SLEEP_MAX: Duration = Duration::from_secs(1);
/// A rollout target without an update stays connected this long after its
/// hello is answered: the server's offer follows the answer.
const CATCH_UP_GRACE: Duration = Duration::from_millis(1_000);
/// Chunk requests sent again in a row without a chunk before the trap says
/// hello again (the server then offers the rollout again).
const CHUNK_RETRIES_MAX: u32 = 5;
/// Longest wait for the progress report to be written before rebooting into an update.
const BOOT_FLUSH_MAX: Duration = Duration::from_secs(2);
/// Firmware a trap runs without an OTA rehearsal.
const FIRMWARE_DEFAULT: FirmwareVersion = FirmwareVersion { major: 1, minor: 0, patch: 0 };

/// What the traps talk to.
#[derive(Debug, Clone)]
pub enum Mode {
    /// The WildCAM fleet server: provisioned credentials, sealed acks after commit.
    Fleet,
    /// Any MQTT broker: no acks from a server; the broker's PUBACK releases the queue.
    Plain {
        /// Username and password for every trap, if the broker wants them.
        credentials: Option<(String, String)>,
    },
}

/// Everything the traps share.
#[derive(Debug)]
pub struct World {
    /// The scenario.
    pub scenario: Scenario,
    /// What the traps talk to.
    pub mode: Mode,
    /// The broker.
    pub mqtt: SocketAddr,
    /// Virtual time.
    pub clock: VirtualClock,
    /// Steers the clock in `"max"` mode.
    pub pacer: Option<Pacer>,
    /// Fleet-wide counters.
    pub counters: Counters,
    /// Publish → ack latency.
    pub latency: Histogram,
    /// Bounds connection attempts in progress.
    pub connect_slots: Semaphore,
    /// Virtual end, ms since the Unix epoch.
    pub end_ms: u64,
    /// Traps ready for the start (connected, or asleep).
    pub ready: AtomicU64,
    /// Wakes the runner when a trap is ready.
    pub ready_changed: Notify,
    /// Set once the clock runs.
    pub started: watch::Sender<bool>,
    /// Bumped when the pacer speeds the clock up a lot: sleeping traps
    /// recompute their deadlines (they were computed at the old factor).
    pub sped_up: watch::Sender<u64>,
    /// Set to stop every trap at once (Ctrl-C, an overall timeout).
    pub abort: AtomicBool,
    /// The OTA rehearsal, if the scenario has one.
    pub ota: Option<OtaShared>,
}

/// What the final check needs to know about one generated detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    /// Capture time as sent (skew included).
    pub captured_at_s: u32,
    /// The image digest as sent.
    pub digest: u64,
    /// Dropped by the full queue (the SDK's counted policy).
    pub dropped: bool,
}

/// What a trap hands back at the end.
#[derive(Debug)]
pub struct TrapOutcome {
    /// Its index.
    pub index: u32,
    /// Credentials and counters to persist.
    pub state: TrapState,
    /// Sequence number of `expected[0]`.
    pub first_seq: u32,
    /// Every detection generated this run, by sequence.
    pub expected: Vec<Expected>,
    /// Unacknowledged detections left when it stopped.
    pub unacked: usize,
}

/// A queue store chosen at run time (capacity and kind come from the scenario).
pub struct DynStore(Box<dyn QueueStore + Send>);

impl std::fmt::Debug for DynStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DynStore")
    }
}

impl DynStore {
    /// A store of `kind` holding `capacity` records (memory; flash is 64 KiB).
    pub fn new(kind: QueueStoreKind, capacity: usize) -> Self {
        match kind {
            QueueStoreKind::Flash => {
                let range = 0..FLASH_LEN as u32;
                let store = FlashStore::<MemFlash<FLASH_LEN>, RECORD_LEN>::new(MemFlash::new(), range)
                    .unwrap_or_else(|_| unreachable!("a 64 KiB page-aligned range is a valid layout"));
                Self(Box::new(store))
            }
            QueueStoreKind::Memory => match capacity {
                0..=64 => Self(Box::new(MemoryStore::<64, RECORD_LEN>::new())),
                65..=256 => Self(Box::new(MemoryStore::<256, RECORD_LEN>::new())),
                257..=1_024 => Self(Box::new(MemoryStore::<1_024, RECORD_LEN>::new())),
                _ => Self(Box::new(MemoryStore::<4_096, RECORD_LEN>::new())),
            },
        }
    }
}

impl QueueStore for DynStore {
    fn record_len_max(&self) -> usize {
        self.0.record_len_max()
    }
    fn push(&mut self, seq: u32, record: &[u8]) -> Result<(), StoreError> {
        self.0.push(seq, record)
    }
    fn read_from(&mut self, from: u32, buf: &mut [u8]) -> Result<Option<StoredRecord>, StoreError> {
        self.0.read_from(from, buf)
    }
    fn remove_through(&mut self, through: u32) -> Result<Removed, StoreError> {
        self.0.remove_through(through)
    }
    fn scan(&mut self) -> Result<Extent, StoreError> {
        self.0.scan()
    }
    fn load_meta(&mut self) -> Result<Option<QueueMeta>, StoreError> {
        self.0.load_meta()
    }
    fn save_meta(&mut self, meta: QueueMeta) -> Result<(), StoreError> {
        self.0.save_meta(meta)
    }
    fn fullness(&mut self) -> Result<Fullness, StoreError> {
        self.0.fullness()
    }
}

type Queue = OfflineQueue<DynStore>;

/// Virtual "never".
const NEVER: u64 = u64::MAX;

/// The OTA result published on the current link, until its PUBACK.
#[derive(Debug, Clone, Copy)]
struct ResultPublish {
    /// Its number among the link's publishes (1-based).
    number: u64,
    /// Its packet id, once written.
    pkid: Option<u16>,
    result: OtaResult,
}

/// A reboot the OTA machine asked for.
#[derive(Debug, Clone, Copy)]
struct PendingBoot {
    /// Reboot once what is queued is written, or at this time.
    deadline: Instant,
}

/// What happens to this trap's new image (drawn when it is activated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Passes its self-test and confirms.
    Passes,
    /// Fails its self-test and rolls back.
    FailsSelfTest,
    /// Dies after booting, before confirming: the bootloader rolls back.
    Killed,
}

/// One virtual trap.
pub struct Trap {
    plan: TrapPlan,
    world: Arc<World>,
    state: TrapState,
    queue: Queue,
    queue_config: QueueConfig,
    sealer: Sealer,
    opener: Opener,
    backoff: Backoff,
    /// Detection content: depends on the seed only.
    content_rng: Rng,
    /// Injected faults: depends on the seed only.
    fault_rng: Rng,
    /// Backoff jitter and connection coin flips.
    net_rng: Rng,
    power: Power,
    link: Option<Link>,
    /// Real time of the next connection attempt.
    retry_at: Instant,
    /// Real time of the last ack progress (or of the connection).
    last_progress: Instant,
    /// Sleepy traps: connected for a check-in.
    awake: bool,
    hello_sent: bool,
    /// rumqttc's request queue refused the last publish: the broker is not reading
    /// (a full queue is backpressure, not a lost connection).
    queue_full: bool,
    health_pending: bool,
    answers: VecDeque<Uplink>,
    next_trigger: Option<(u64, Cause)>,
    next_checkin_ms: u64,
    next_drop_ms: u64,
    next_reboot_ms: u64,
    boot_ms: u64,
    reset_reason: ResetReason,
    triggers_since_health: u16,
    storage_used_kib: u32,
    first_seq: u32,
    expected: Vec<Expected>,
    /// First publish time of each unacknowledged sequence, in order.
    sent_at: VecDeque<(u32, Instant)>,
    highest_sent: u32,
    /// Plain broker: sequences (0 for other messages) waiting for their packet id, and packet ids in flight.
    awaiting_pkid: VecDeque<u32>,
    pkid_seq: Vec<(u16, u32)>,
    /// What this trap adds to the pacer now.
    pacer_backlog: i64,
    pacer_online: bool,
    drain_deadline: Option<Instant>,
    sped_up: watch::Receiver<u64>,
    /// The update side (OTA rehearsal only).
    ota: Option<OtaDevice>,
    /// OTA messages waiting for the link: results, chunk requests, progress.
    ota_out: VecDeque<Uplink>,
    /// Publishes handed to the current link, and written by its event loop.
    published: u64,
    written: u64,
    result_publish: Option<ResultPublish>,
    /// When the last chunk request went out, and how many were sent again in a row.
    chunk_asked_at: Option<Instant>,
    chunk_retries: u32,
    /// When the hello of the current link was sent, and answered (its ack).
    hello_sent_at: Option<Instant>,
    hello_answered_at: Option<Instant>,
    pending_boot: Option<PendingBoot>,
    fate: Fate,
    /// Self-test verdicts and bootloader kills: depends on the seed only.
    ota_rng: Rng,
    /// Delivered a final result for the rollout.
    ota_done: bool,
}

impl std::fmt::Debug for Trap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trap")
            .field("index", &self.plan.index)
            .field("id", &self.state.device_id)
            .finish()
    }
}

impl Trap {
    /// A trap with its plan and persisted state.
    pub fn new(plan: TrapPlan, state: TrapState, world: Arc<World>) -> Result<Self, QueueError> {
        let scenario = &world.scenario;
        let seed = scenario.seed;
        let index = u64::from(plan.index);
        let queue_config =
            QueueConfig::new(FullPolicy::DropOldest).with_inflight_max(scenario.fleet.inflight_max);
        let mut store = DynStore::new(scenario.fleet.queue_store, scenario.fleet.queue_capacity);
        // The numbering of earlier runs goes on: the store's metadata is what
        // flash would have kept.
        store.save_meta(QueueMeta { floor: state.next_seq.max(1), dropped_total: state.dropped_total })?;
        let queue = OfflineQueue::open_with(store, queue_config)?;
        let network = &scenario.network;
        let mut backoff_config =
            BackoffConfig::new(network.backoff_initial_ms, network.backoff_max_ms).unwrap_or_default();
        if plan.sleepy {
            backoff_config = backoff_config.with_attempts_max(SLEEPY_ATTEMPTS_MAX);
        }
        let start_ms = world.clock.start_ms();
        let mut fault_rng = Rng::new(seed, 0x4641_554C_0000_0000 | index);
        let faults = &scenario.faults;
        let drop_rate = if plan.flaky { faults.flaky_drop_rate_per_day } else { faults.drop_rate_per_day };
        let next_drop_ms = next_poisson(&mut fault_rng, start_ms, drop_rate);
        let next_reboot_ms = next_poisson(&mut fault_rng, start_ms, faults.reboot_rate_per_day);
        let interval_ms = u64::from(scenario.fleet.checkin_interval_s) * 1_000;
        let power =
            Power::new(&scenario.power, plan.initial_soc, plan.solar, plan.temperature_mean_c, start_ms);
        let key = state.session_key.clone();
        let first_seq = queue.stats().next_seq;
        let mut trap = Self {
            sealer: Sealer::resume(key.clone(), Direction::Up, state.reservation),
            opener: Opener::new(key, Direction::Down),
            backoff: Backoff::new(backoff_config),
            content_rng: Rng::new(seed, 0x4445_5445_0000_0000 | index),
            fault_rng,
            net_rng: Rng::new(seed ^ start_ms, 0x4E45_5400_0000_0000 | index),
            power,
            link: None,
            retry_at: Instant::now(),
            last_progress: Instant::now(),
            awake: false,
            hello_sent: false,
            queue_full: false,
            health_pending: true,
            answers: VecDeque::new(),
            next_trigger: None,
            next_checkin_ms: start_ms + plan.checkin_phase_ms * 1_000 % interval_ms.max(1),
            next_drop_ms,
            next_reboot_ms,
            boot_ms: start_ms,
            reset_reason: ResetReason::PowerOn,
            triggers_since_health: 0,
            storage_used_kib: 0,
            first_seq,
            expected: Vec::new(),
            sent_at: VecDeque::new(),
            highest_sent: first_seq.saturating_sub(1),
            awaiting_pkid: VecDeque::new(),
            pkid_seq: Vec::new(),
            pacer_backlog: 0,
            pacer_online: false,
            drain_deadline: None,
            sped_up: world.sped_up.subscribe(),
            ota: world
                .ota
                .as_ref()
                .map(|shared| OtaDevice::new(shared.public_key, shared.from)),
            ota_out: VecDeque::new(),
            published: 0,
            written: 0,
            result_publish: None,
            chunk_asked_at: None,
            chunk_retries: 0,
            hello_sent_at: None,
            hello_answered_at: None,
            pending_boot: None,
            fate: Fate::Passes,
            ota_rng: Rng::new(seed, 0x4F54_4100_0000_0000 | index),
            ota_done: false,
            queue,
            queue_config,
            plan,
            state,
            world,
        };
        trap.next_trigger = trap.draw_trigger(start_ms as f64 / 1_000.0);
        Ok(trap)
    }

    /// Runs the trap to the end of the scenario and the drain.
    pub async fn run(mut self) -> TrapOutcome {
        let world = self.world.clone();
        if !self.plan.sleepy {
            self.initial_connect().await;
        }
        world.ready.fetch_add(1, Ordering::Relaxed);
        world.ready_changed.notify_one();
        let mut started = world.started.subscribe();
        let _ = started.wait_for(|s| *s).await;
        self.retry_at = Instant::now();
        self.last_progress = Instant::now();
        while !self.step().await {}
        self.set_pacer(false);
        if let Some(link) = self.link.take() {
            link.close().await;
            world.counters.disconnected();
        }
        Counters::add(&world.counters.traps_done, 1);
        self.finish()
    }

    fn finish(mut self) -> TrapOutcome {
        let stats = self.queue.stats();
        self.state.next_seq = stats.next_seq;
        self.state.dropped_total = stats.dropped_total;
        self.state.reservation = self.state.reservation.max(self.sealer.next_counter());
        TrapOutcome {
            index: self.plan.index,
            first_seq: self.first_seq,
            expected: std::mem::take(&mut self.expected),
            unacked: self.queue.len(),
            state: self.state,
        }
    }

    /// Connects before the clock starts (bounded by the backoff and an attempt ceiling).
    async fn initial_connect(&mut self) {
        for _ in 0..20 {
            if self.world.abort.load(Ordering::Relaxed) || self.connect().await {
                return;
            }
            tokio::time::sleep_until(self.retry_at).await;
        }
    }

    /// One turn of the loop; `true` when the trap is done.
    async fn step(&mut self) -> bool {
        let now_ms = self.world.clock.now_ms();
        let ended = now_ms >= self.world.end_ms;
        if self.drain_deadline.is_none() {
            // Up to the end, also when the clock jumped past it.
            self.do_due(now_ms.min(self.world.end_ms));
        }
        if self.ota.is_some() {
            self.ota_turn(now_ms.min(self.world.end_ms));
        }
        if ended && self.drain_deadline.is_none() {
            self.drain_deadline = Some(
                Instant::now() + Duration::from_secs(self.world.scenario.network.drain_timeout_s.into()),
            );
            self.awake = true;
        }
        if self.world.abort.load(Ordering::Relaxed)
            || self.drain_deadline.is_some_and(|d| Instant::now() >= d)
        {
            if !self.queue.is_empty() {
                eprintln!(
                    "wildcam-sim: trap {} ({}) stopped with {} unacknowledged (connected: {}, awake: {}, in flight: {})",
                    self.plan.index,
                    self.state.device_id,
                    self.queue.len(),
                    self.link.is_some(),
                    self.awake,
                    self.queue.inflight()
                );
            }
            return true;
        }
        if ended && self.queue.is_empty() && self.link.is_none() && !self.ota_waiting(true) {
            return true;
        }
        let reachable = !self.cut_off(now_ms.min(self.world.end_ms.saturating_sub(1)));
        let wanted = !self.plan.sleepy || self.awake;
        self.set_pacer(wanted && reachable && !ended);
        if !reachable && self.link.is_some() {
            self.drop_link(false);
        }
        if wanted && self.link.is_none() && Instant::now() >= self.retry_at {
            if !reachable {
                self.fail_connect();
            } else {
                self.connect().await;
            }
        }
        // A full request queue keeps the link: what was not queued goes out on a later
        // turn (or after the ack timeout's rewind); a dead link shows as a poll error.
        if self.link.is_some() && !self.pump() && !self.queue_full {
            self.drop_link(true);
        }
        if self.link.is_some() && self.idle(ended) && (ended || self.plan.sleepy) {
            // A sleepy trap goes back to sleep; at the end every trap leaves.
            if let Some(link) = self.link.take() {
                link.close().await;
                self.world.counters.disconnected();
            }
            self.awake = false;
            self.set_pacer(false);
            if ended {
                return true;
            }
        }
        let deadline = self.deadline(now_ms, ended, wanted);
        let sped_up = &mut self.sped_up;
        let event = match self.link.as_mut() {
            Some(link) => tokio::select! {
                event = link.eventloop.poll() => Some(event),
                () = tokio::time::sleep_until(deadline) => None,
                _ = sped_up.changed() => None,
            },
            None => tokio::select! {
                () = tokio::time::sleep_until(deadline) => None,
                _ = sped_up.changed() => None,
            },
        };
        if let Some(event) = event {
            self.on_event(event);
        }
        self.check_ack_timeout();
        false
    }

    /// Connected with nothing left to send or to wait for.
    fn idle(&self, ended: bool) -> bool {
        self.queue.is_empty()
            && !self.health_pending
            && self.answers.is_empty()
            && self.hello_sent
            && !self.ota_waiting(ended)
    }

    /// When to wake up next (real time).
    fn deadline(&self, now_ms: u64, ended: bool, wanted: bool) -> Instant {
        let mut deadline = if ended {
            Instant::now() + DRAIN_POLL
        } else {
            let at = self.world.clock.real_deadline(self.next_event_ms(now_ms));
            at.min(Instant::now() + SLEEP_MAX)
        };
        if wanted && self.link.is_none() {
            deadline = deadline.min(self.retry_at);
        }
        let ack_timeout = Duration::from_millis(self.world.scenario.network.ack_timeout_ms.into());
        if self.queue.inflight() > 0 {
            deadline = deadline.min(self.last_progress + ack_timeout);
        }
        if let Some(asked) = self.chunk_asked_at {
            deadline = deadline.min(asked + ack_timeout);
        }
        if self.pending_boot.is_some() {
            deadline = deadline.min(Instant::now() + DRAIN_POLL);
        }
        if let Some(wait_until) = self.catch_up_until().filter(|at| *at > Instant::now()) {
            deadline = deadline.min(wait_until);
        }
        deadline
    }

    /// The next virtual event after `now_ms`.
    fn next_event_ms(&self, now_ms: u64) -> u64 {
        let trigger = self.next_trigger.map_or(NEVER, |(t, _)| t);
        let boundary = self
            .plan
            .offline
            .iter()
            .flat_map(|&(from, to)| [from, to])
            .filter(|&t| t > now_ms)
            .min()
            .unwrap_or(NEVER);
        trigger
            .min(self.next_checkin_ms)
            .min(self.next_drop_ms)
            .min(self.next_reboot_ms)
            .min(boundary)
            .min(self.world.end_ms)
    }

    fn cut_off(&self, now_ms: u64) -> bool {
        self.plan
            .offline
            .iter()
            .any(|&(from, to)| (from..to).contains(&now_ms))
    }

    // ------------------------------------------------------------ virtual events

    /// Everything due at or before `now_ms`, in virtual-time order.
    fn do_due(&mut self, now_ms: u64) {
        while let Some((at_ms, cause)) = self.next_trigger.filter(|(t, _)| *t <= now_ms) {
            self.on_trigger(at_ms, cause);
            self.next_trigger = self.draw_trigger(at_ms as f64 / 1_000.0);
        }
        let interval_ms = u64::from(self.world.scenario.fleet.checkin_interval_s) * 1_000;
        while self.next_checkin_ms <= now_ms {
            self.health_pending = true;
            if self.plan.sleepy {
                let connect_mah = self.world.scenario.power.connect_mah;
                self.power.spend(self.next_checkin_ms, connect_mah);
                if !self.awake {
                    self.awake = true;
                    self.backoff.reset();
                    self.retry_at = Instant::now();
                    self.reset_reason = ResetReason::DeepSleepWake;
                }
            }
            self.next_checkin_ms += interval_ms.max(1);
        }
        let faults = &self.world.scenario.faults;
        let drop_rate =
            if self.plan.flaky { faults.flaky_drop_rate_per_day } else { faults.drop_rate_per_day };
        let reboot_rate = faults.reboot_rate_per_day;
        while self.next_drop_ms <= now_ms {
            let at = self.next_drop_ms;
            if self.link.is_some() {
                Counters::add(&self.world.counters.connections_dropped, 1);
                self.drop_link(false);
            }
            self.power.spend(at, self.world.scenario.power.connect_mah);
            self.next_drop_ms = next_poisson(&mut self.fault_rng, at, drop_rate);
        }
        while self.next_reboot_ms <= now_ms {
            let at = self.next_reboot_ms;
            self.reboot(at, ResetReason::Watchdog);
            self.next_reboot_ms = next_poisson(&mut self.fault_rng, at, reboot_rate);
        }
    }

    fn draw_trigger(&mut self, after_s: f64) -> Option<(u64, Cause)> {
        let until_s = self.world.end_ms as f64 / 1_000.0;
        self.plan
            .activity
            .next(&mut self.content_rng, after_s, until_s)
            .map(|(t, cause)| ((t * 1_000.0) as u64, cause))
    }

    /// A PIR trigger: a burst of frames, each one detection in the queue.
    fn on_trigger(&mut self, at_ms: u64, cause: Cause) {
        let scenario = &self.world.scenario;
        let burst_len = scenario.activity.burst_len;
        // The frame and, already, its upload: drawn in virtual time only.
        let frame_mah = scenario.power.frame_mah + scenario.power.message_mah;
        let label = match cause {
            Cause::Animal(species) => scenario.species.get(species).map(|s| s.label),
            Cause::Blank => None,
        };
        let other_label =
            scenario.species[self.content_rng.int(0, scenario.species.len() as u32 - 1) as usize].label;
        self.triggers_since_health = self.triggers_since_health.saturating_add(1);
        for burst_index in 0..burst_len {
            let frame_ms = at_ms + u64::from(burst_index) * 1_000;
            self.power.spend(frame_ms, frame_mah);
            let detection = self.frame(frame_ms, burst_index, burst_len, label, other_label);
            self.append(detection);
        }
    }

    /// One frame's detection (its sequence number is set by the queue).
    fn frame(
        &mut self,
        at_ms: u64,
        burst_index: u8,
        burst_len: u8,
        label: Option<u16>,
        other: u16,
    ) -> Detection {
        let rng = &mut self.content_rng;
        let mut classes = heapless::Vec::new();
        let mut bbox = None;
        if let Some(label) = label {
            let confidence = rng.int(55, 99) as u8;
            let _ = classes.push(Classification { label, confidence_pct: confidence });
            if rng.chance(0.3) && other != label {
                let _ = classes.push(Classification {
                    label: other,
                    confidence_pct: rng.int(1, 100 - u32::from(confidence)) as u8,
                });
            }
            let width = rng.int(800, 5_000) as u16;
            let height = rng.int(800, 5_000) as u16;
            let x = rng.int(0, u32::from(10_000 - width)) as u16;
            let y = rng.int(0, u32::from(10_000 - height)) as u16;
            bbox = Some(BoundingBox { x, y, width, height });
        }
        let image_len = rng.int(90_000, 420_000);
        self.storage_used_kib = self.storage_used_kib.saturating_add(image_len / 1_024);
        let captured_at =
            ((at_ms / 1_000) as i64 + i64::from(self.plan.skew_s)).clamp(0, i64::from(u32::MAX)) as u32;
        Detection {
            seq: 0,
            captured_at,
            trigger: Trigger::Pir,
            burst_index,
            burst_len,
            classes,
            bbox,
            image_len,
            image_digest: [0; 8],
            battery_mv: self.power.battery_mv(),
        }
    }

    /// Appends a detection under the queue's next sequence number.
    fn append(&mut self, mut detection: Detection) {
        let seed = self.world.scenario.seed;
        let index = u64::from(self.plan.index);
        let mut digest = 0;
        let captured_at_s = detection.captured_at;
        let appended = self.queue.append_with(|seq, buf| {
            digest = mix64(seed ^ mix64((index << 32) | u64::from(seq)));
            detection.seq = seq;
            detection.image_digest = digest.to_be_bytes();
            Uplink::Detection(detection)
                .encode(buf)
                .ok()
                .map(|e| e.len())
        });
        let counters = &self.world.counters;
        match appended {
            Ok(appended) => {
                Counters::add(&counters.generated, 1);
                let slot = (appended.seq - self.first_seq) as usize;
                debug_assert_eq!(slot, self.expected.len());
                self.expected
                    .push(Expected { captured_at_s, digest, dropped: false });
                if let Some(through) = appended.dropped_oldest {
                    Counters::add(&counters.dropped_full, u64::from(appended.dropped));
                    let from = through + 1 - appended.dropped;
                    for seq in from..=through {
                        if let Some(entry) = seq
                            .checked_sub(self.first_seq)
                            .and_then(|i| self.expected.get_mut(i as usize))
                        {
                            entry.dropped = true;
                        }
                    }
                    self.sent_at.retain(|(seq, _)| *seq > through);
                }
            }
            Err(error) => eprintln!("wildcam-sim: trap {}: queue append failed: {error}", self.plan.index),
        }
    }

    /// A reboot: the connection is cut, the queue is reopened from its store,
    /// the sealer resumes from its persisted reservation.
    fn reboot(&mut self, at_ms: u64, reason: ResetReason) {
        Counters::add(&self.world.counters.reboots, 1);
        self.drop_link(false);
        let placeholder = OfflineQueue::new(DynStore::new(QueueStoreKind::Memory, 64), self.queue_config);
        let store = std::mem::replace(&mut self.queue, placeholder).into_store();
        match OfflineQueue::open_with(store, self.queue_config) {
            Ok(queue) => self.queue = queue,
            Err(error) => eprintln!("wildcam-sim: trap {}: queue did not reopen: {error}", self.plan.index),
        }
        let key = self.state.session_key.clone();
        self.sealer = Sealer::resume(key.clone(), Direction::Up, self.state.reservation);
        self.opener = Opener::new(key, Direction::Down);
        self.boot_ms = at_ms;
        self.reset_reason = reason;
        self.health_pending = true;
        self.retry_at = Instant::now();
        self.power
            .spend(at_ms, self.world.scenario.power.connect_mah);
        self.pending_boot = None;
        if let (Some(ota), Some(shared)) = (self.ota.as_mut(), self.world.ota.as_ref()) {
            let boot = ota.power_on();
            if boot.resumed_download {
                Counters::add(&shared.counters.resumed, 1);
            }
            self.perform_ota(boot.actions);
        }
    }

    // ------------------------------------------------------------ the link

    /// One connection attempt; `true` when connected.
    async fn connect(&mut self) -> bool {
        let world = self.world.clone();
        let _slot = world.connect_slots.acquire().await;
        if self.plan.flaky
            && self
                .net_rng
                .chance(world.scenario.faults.flaky_connect_failure)
        {
            self.fail_connect();
            return false;
        }
        let id = self.state.device_id.clone();
        let filter = topic::device_downlink_filter(&id);
        let credentials = match &world.mode {
            Mode::Fleet => Some((id.as_str(), self.state.password.as_str())),
            Mode::Plain { credentials } => credentials.as_ref().map(|(u, p)| (u.as_str(), p.as_str())),
        };
        let options = ConnectOptions {
            addr: world.mqtt,
            client_id: id.as_str(),
            credentials,
            keep_alive: Duration::from_secs(world.scenario.network.keep_alive_s.into()),
            inflight: u16::try_from(world.scenario.fleet.inflight_max).unwrap_or(64) + 4,
            subscribe: matches!(world.mode, Mode::Fleet).then_some(filter.as_str()),
            timeout: Duration::from_secs(world.scenario.network.connect_timeout_s.into()),
        };
        match Link::connect(options).await {
            Ok(link) => {
                world.counters.connected();
                self.link = Some(link);
                self.hello_sent = false;
                self.published = 0;
                self.written = 0;
                self.queue.rewind();
                self.awaiting_pkid.clear();
                self.pkid_seq.clear();
                self.backoff.reset();
                self.last_progress = Instant::now();
                true
            }
            Err(_) => {
                self.fail_connect();
                false
            }
        }
    }

    /// A failed attempt: schedule the next one, or give up until the next check-in.
    fn fail_connect(&mut self) {
        Counters::add(&self.world.counters.connect_failures, 1);
        match self.backoff.next_delay_ms(self.net_rng.next_u32()) {
            Some(delay_ms) => self.retry_at = Instant::now() + Duration::from_millis(delay_ms.into()),
            None => {
                // Sleepy: back to sleep; what is queued waits for the next check-in.
                self.awake = false;
                self.backoff.reset();
            }
        }
    }

    /// Cuts the connection without a DISCONNECT (lost, injected, or cut off).
    fn drop_link(&mut self, lost: bool) {
        if self.link.take().is_some() {
            self.world.counters.disconnected();
            if lost {
                Counters::add(&self.world.counters.connections_lost, 1);
            }
        }
        self.queue.rewind();
        self.hello_sent = false;
        self.ota_out.clear();
        self.result_publish = None;
        self.chunk_asked_at = None;
        self.hello_sent_at = None;
        self.hello_answered_at = None;
        let delay = self
            .backoff
            .next_delay_ms(self.net_rng.next_u32())
            .unwrap_or(0);
        self.retry_at = Instant::now() + Duration::from_millis(delay.into());
    }

    /// Publishes what is due: hello, health, answers, then the queue's window.
    /// `false` if the connection refused a publish.
    fn pump(&mut self) -> bool {
        self.queue_full = false;
        if !self.hello_sent {
            let hello = self.hello();
            if !self.send(&Uplink::Hello(hello), 0) {
                return false;
            }
            Counters::add(&self.world.counters.hellos, 1);
            self.hello_sent = true;
            self.hello_sent_at = Some(Instant::now());
            self.hello_answered_at = None;
            if let Some(ota) = &self.ota {
                // Once connected: the pending result, or the next chunk request.
                let actions = ota.machine().on_connected();
                self.perform_ota(actions);
            }
        }
        if self.health_pending {
            let health = self.health();
            if !self.send(&Uplink::Health(health), 0) {
                return false;
            }
            Counters::add(&self.world.counters.health_reports, 1);
            self.health_pending = false;
            self.triggers_since_health = 0;
        }
        while let Some(answer) = self.answers.pop_front() {
            if !self.send(&answer, 0) {
                self.answers.push_front(answer);
                return false;
            }
            Counters::add(&self.world.counters.downlink_answers, 1);
        }
        if !self.pump_ota() {
            return false;
        }
        let mut record = [0u8; RECORD_LEN];
        loop {
            let entry = match self.queue.next_to_send(&mut record) {
                Ok(Some(entry)) => entry,
                Ok(None) => return true,
                Err(error) => {
                    eprintln!("wildcam-sim: trap {}: queue read failed: {error}", self.plan.index);
                    return true;
                }
            };
            let seq = entry.seq;
            let frame = match self.seal(entry.record) {
                Some(frame) => frame,
                None => return false,
            };
            if !self.publish_frame(DETECTION_SUFFIX, frame, seq) {
                return false;
            }
            let counters = &self.world.counters;
            Counters::add(&counters.publishes, 1);
            if seq > self.highest_sent {
                self.highest_sent = seq;
                self.sent_at.push_back((seq, Instant::now()));
                Counters::add(&counters.sent, 1);
            }
        }
    }

    /// Seals an envelope under the trap's key, keeping the reservation.
    fn seal(&mut self, envelope: &[u8]) -> Option<Vec<u8>> {
        let mut frame = vec![0u8; envelope.len() + SEAL_OVERHEAD];
        let sealed = self
            .sealer
            .seal(self.state.device_id.as_bytes(), envelope, &mut frame)
            .ok()?;
        if let Some(reservation) = sealed.persist_reservation {
            // What flash would hold before the frame goes out.
            self.state.reservation = reservation;
        }
        frame.truncate(sealed.len);
        Some(frame)
    }

    /// Encodes, seals and publishes a message.
    fn send(&mut self, message: &Uplink, seq: u32) -> bool {
        let mut envelope = [0u8; ENVELOPE_LEN_MAX];
        let Ok(bytes) = message.encode(&mut envelope) else {
            return true;
        };
        let len = bytes.len();
        let Route::Device(_, suffix) = message.kind().route() else {
            return true;
        };
        match self.seal(&envelope[..len]) {
            Some(frame) => self.publish_frame(suffix, frame, seq),
            None => false,
        }
    }

    fn publish_frame(&mut self, suffix: &str, frame: Vec<u8>, seq: u32) -> bool {
        let Some(link) = &self.link else {
            return false;
        };
        let topic = topic::device_topic(&self.state.device_id, Direction::Up, suffix);
        if link.publish(topic.as_str(), frame).is_err() {
            self.queue_full = true;
            return false;
        }
        self.published += 1;
        if matches!(self.world.mode, Mode::Plain { .. }) {
            self.awaiting_pkid.push_back(seq);
        }
        true
    }

    fn on_event(&mut self, event: Result<Event, ConnectionError>) {
        match &event {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                self.written += 1;
                if let Some(publish) = self
                    .result_publish
                    .as_mut()
                    .filter(|p| p.number == self.written)
                {
                    publish.pkid = Some(*pkid);
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack)))
                if self
                    .result_publish
                    .is_some_and(|p| p.pkid == Some(ack.pkid)) =>
            {
                self.on_result_delivered();
            }
            _ => {}
        }
        match event {
            Ok(Event::Incoming(Packet::Publish(publish))) => self.on_downlink(publish.payload.to_vec()),
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) if matches!(self.world.mode, Mode::Plain { .. }) => {
                if let Some(seq) = self.awaiting_pkid.pop_front().filter(|seq| *seq > 0) {
                    self.pkid_seq.push((pkid, seq));
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) if matches!(self.world.mode, Mode::Plain { .. }) => {
                if let Some(position) = self.pkid_seq.iter().position(|(pkid, _)| *pkid == ack.pkid) {
                    let (_, seq) = self.pkid_seq.swap_remove(position);
                    self.on_ack(seq);
                }
            }
            Ok(_) => {}
            Err(_) => self.drop_link(true),
        }
    }

    fn on_downlink(&mut self, mut frame: Vec<u8>) {
        let counters = &self.world.counters;
        let Ok(plain) = self
            .opener
            .open(self.state.device_id.as_bytes(), &mut frame)
        else {
            Counters::add(&counters.downlink_refused, 1);
            return;
        };
        match Downlink::decode(plain) {
            Ok(Downlink::Ack(ack)) => {
                if self.hello_sent && self.hello_answered_at.is_none() {
                    self.hello_answered_at = Some(Instant::now());
                    self.self_test_if_due();
                }
                self.on_ack(ack.through)
            }
            Ok(Downlink::DesiredConfig(desired)) => {
                self.answers
                    .push_back(Uplink::ReportedConfig(ReportedConfig {
                        version: desired.version,
                        status: ConfigStatus::Applied,
                        desired_version: desired.version,
                        config: desired.config,
                    }))
            }
            Ok(Downlink::Command(command)) => {
                let status = match command.kind {
                    CommandKind::Reboot | CommandKind::CaptureNow | CommandKind::FormatStorage => {
                        CommandStatus::Done
                    }
                    _ => CommandStatus::Unsupported,
                };
                self.answers
                    .push_back(Uplink::CommandResult(CommandResult { id: command.id, status }));
            }
            Ok(Downlink::OtaOffer(offer)) => self.on_ota_offer(&offer),
            Ok(Downlink::OtaChunk(chunk)) => self.on_ota_chunk(&chunk),
            Err(_) => Counters::add(&counters.downlink_refused, 1),
        }
    }

    /// Everything through `through` is stored: release it from the queue.
    fn on_ack(&mut self, through: u32) {
        let counters = &self.world.counters;
        match self.queue.ack(through) {
            Ok(outcome) if outcome.released > 0 => {
                Counters::add(&counters.acked, outcome.released as u64);
                let now = Instant::now();
                while let Some(&(seq, sent)) = self.sent_at.front() {
                    if seq > through {
                        break;
                    }
                    self.world.latency.record(now - sent);
                    self.sent_at.pop_front();
                }
                self.last_progress = now;
                self.backoff.reset();
                self.sync_backlog();
            }
            Ok(_) => {}
            Err(_) => Counters::add(&counters.acks_refused, 1),
        }
    }

    /// No ack for too long: resend everything unacknowledged, as firmware does.
    fn check_ack_timeout(&mut self) {
        let ack_timeout = Duration::from_millis(self.world.scenario.network.ack_timeout_ms.into());
        if self.link.is_some() && self.queue.inflight() > 0 && self.last_progress.elapsed() >= ack_timeout {
            Counters::add(&self.world.counters.ack_timeouts, 1);
            // The server holds its ack at a gap left by dropped records until
            // a hello tells it the floor: say hello again (as firmware does).
            if self.queue.server_behind_floor() && matches!(self.world.mode, Mode::Fleet) {
                self.hello_sent = false;
            }
            self.queue.rewind();
            self.awaiting_pkid.clear();
            self.last_progress = Instant::now();
        }
    }

    // ------------------------------------------------------------ OTA

    /// Publishes the queued OTA messages; `false` if the link refused one.
    fn pump_ota(&mut self) -> bool {
        while let Some(message) = self.ota_out.pop_front() {
            if !self.send(&message, 0) {
                self.ota_out.push_front(message);
                return false;
            }
            match message {
                Uplink::OtaResult(result) => {
                    self.result_publish = Some(ResultPublish { number: self.published, pkid: None, result });
                }
                Uplink::OtaChunkRequest(_) => {
                    self.chunk_asked_at = Some(Instant::now());
                    if let Some(shared) = &self.world.ota {
                        Counters::add(&shared.counters.chunk_requests, 1);
                    }
                }
                _ => {}
            }
        }
        true
    }

    /// Carries out what the OTA machine asked for, in field order.
    fn perform_ota(&mut self, actions: OtaActions) {
        let Some(ota) = self.ota.as_mut() else {
            return;
        };
        if actions.mark_valid {
            ota.mark_valid();
        }
        if let Some(floor) = actions.raise_secure_version {
            ota.raise_secure_version(floor);
        }
        if let Some(persist) = actions.persist {
            ota.persist(persist);
        }
        if let Some(result) = actions.send_result {
            self.ota_out.push_back(Uplink::OtaResult(result));
        }
        if let Some(request) = actions.send_request {
            self.ota_out.push_back(Uplink::OtaChunkRequest(request));
        }
        if actions.verify {
            let verified = ota.verify();
            self.perform_ota(verified);
        }
        match actions.boot {
            Some(BootAction::UpdateReady) => {
                let Some(ota) = self.ota.as_mut() else {
                    return;
                };
                // Ready: the server frees this trap's in-flight slot at once.
                if let Some(progress) = ota.machine().progress() {
                    self.ota_out.push_back(Uplink::OtaProgress(progress));
                }
                let activate = ota.reboot_into_update();
                self.perform_ota(activate);
            }
            Some(BootAction::ActivateAndReboot) => {
                if let Some(ota) = self.ota.as_mut() {
                    ota.activate();
                }
                let scenario = &self.world.scenario.ota;
                let draw = self.ota_rng.unit();
                self.fate = if draw < scenario.bootloader_rollback_rate {
                    Fate::Killed
                } else if draw < scenario.bootloader_rollback_rate + scenario.self_test_failure_rate {
                    Fate::FailsSelfTest
                } else {
                    Fate::Passes
                };
                self.pending_boot = Some(PendingBoot { deadline: Instant::now() + BOOT_FLUSH_MAX });
            }
            Some(BootAction::RollBackAndReboot) => {
                if let Some(ota) = self.ota.as_mut() {
                    ota.roll_back();
                }
                self.pending_boot = Some(PendingBoot { deadline: Instant::now() });
            }
            None => {}
        }
    }

    /// Due OTA work: a requested reboot, a chunk request without an answer.
    fn ota_turn(&mut self, now_ms: u64) {
        if let Some(boot) = self.pending_boot {
            let written = self.ota_out.is_empty() && self.written >= self.published;
            if self.link.is_none() || written || Instant::now() >= boot.deadline {
                self.reboot(now_ms, ResetReason::Software);
                if let Some(shared) = &self.world.ota
                    && self
                        .ota
                        .as_ref()
                        .is_some_and(|o| o.machine().awaiting_self_test())
                {
                    Counters::add(&shared.counters.activations, 1);
                    if self.fate == Fate::Killed {
                        // The new image hangs before its self-test: the watchdog resets it.
                        self.fate = Fate::Passes;
                        self.reboot(now_ms, ResetReason::Watchdog);
                    }
                }
            }
        }
        let ack_timeout = Duration::from_millis(self.world.scenario.network.ack_timeout_ms.into());
        let timed_out = self
            .chunk_asked_at
            .is_some_and(|at| self.link.is_some() && at.elapsed() >= ack_timeout);
        if !timed_out {
            return;
        }
        self.chunk_asked_at = None;
        let Some(request) = self.ota.as_ref().and_then(|o| o.machine().chunk_request()) else {
            return;
        };
        if let Some(shared) = &self.world.ota {
            Counters::add(&shared.counters.chunk_timeouts, 1);
        }
        self.chunk_retries += 1;
        if self.chunk_retries > CHUNK_RETRIES_MAX {
            // Say hello again: the server offers the rollout again and the
            // machine asks for the chunk it wants.
            self.chunk_retries = 0;
            self.hello_sent = false;
        } else {
            self.ota_out.push_back(Uplink::OtaChunkRequest(request));
        }
    }

    fn on_ota_offer(&mut self, offer: &OtaOffer) {
        let battery_mv = self.power.battery_mv();
        let (Some(ota), Some(shared)) = (self.ota.as_mut(), self.world.ota.as_ref()) else {
            return;
        };
        Counters::add(&shared.counters.offers, 1);
        self.chunk_retries = 0;
        let actions = ota.on_offer(offer, battery_mv);
        self.perform_ota(actions);
    }

    fn on_ota_chunk(&mut self, chunk: &OtaChunk) {
        let (Some(ota), Some(shared)) = (self.ota.as_mut(), self.world.ota.as_ref()) else {
            return;
        };
        match ota.on_chunk(chunk) {
            Ok(actions) => {
                let counters = &shared.counters;
                Counters::add(&counters.chunks, 1);
                Counters::add(&counters.bytes, chunk.data.len() as u64);
                self.chunk_asked_at = None;
                self.chunk_retries = 0;
                let at_ms = self.world.clock.now_ms().min(self.world.end_ms);
                self.power
                    .spend(at_ms, self.world.scenario.power.message_mah);
                self.perform_ota(actions);
            }
            // A stale duplicate, or a chunk of a rollout no longer downloading.
            Err(_) => Counters::add(&shared.counters.chunks_refused, 1),
        }
    }

    /// Running a new image whose hello was answered: the self-test.
    fn self_test_if_due(&mut self) {
        let Some(ota) = self.ota.as_mut() else {
            return;
        };
        if !ota.machine().awaiting_self_test() {
            return;
        }
        if let Some(progress) = ota.machine().progress() {
            self.ota_out.push_back(Uplink::OtaProgress(progress));
        }
        let verdict = match self.fate {
            Fate::FailsSelfTest => ota.self_test_failed(),
            Fate::Passes | Fate::Killed => ota.confirm(),
        };
        self.fate = Fate::Passes;
        self.perform_ota(verdict);
    }

    /// The PUBACK of the result published on this link came back.
    fn on_result_delivered(&mut self) {
        let Some(publish) = self.result_publish.take() else {
            return;
        };
        let Some(ota) = self.ota.as_mut() else {
            return;
        };
        if ota.machine().pending_result() == Some(publish.result)
            && let Some((_, actions)) = ota.result_delivered()
        {
            self.perform_ota(actions);
        }
        let result = publish.result;
        let Some(shared) = self.world.ota.as_ref() else {
            return;
        };
        // The run's one rollout (its offers may come before its creation returned).
        let ours = shared
            .rollout
            .get()
            .is_none_or(|r| r.id == result.rollout_id);
        if ours && !self.ota_done && result.outcome != OtaOutcome::Busy {
            self.ota_done = true;
            shared.outcome_delivered(result.outcome, self.world.clock.now_ms());
        }
    }

    /// Whether OTA keeps the trap connected: an update in progress or a
    /// result to deliver; or, as a target without its result yet, the
    /// catch-up after its hello (sleepy traps) or the whole drain.
    fn ota_waiting(&self, ended: bool) -> bool {
        let (Some(ota), Some(shared)) = (&self.ota, &self.world.ota) else {
            return false;
        };
        if ota.busy() || !self.ota_out.is_empty() || self.pending_boot.is_some() {
            return true;
        }
        if self.ota_done || shared.settled.load(Ordering::Relaxed) || shared.rollout.get().is_none() {
            return false;
        }
        ended || self.catch_up_until().is_some_and(|at| at > Instant::now())
    }

    /// Until when a target without an update waits for an offer on this link:
    /// the hello's answer (bounded by the ack timeout), then the catch-up
    /// grace after it.
    fn catch_up_until(&self) -> Option<Instant> {
        self.world.ota.as_ref()?;
        match (self.hello_sent_at, self.hello_answered_at) {
            (_, Some(answered)) => Some(answered + CATCH_UP_GRACE),
            (Some(sent), None) => {
                Some(sent + Duration::from_millis(self.world.scenario.network.ack_timeout_ms.into()))
            }
            (None, None) => None,
        }
    }

    // ------------------------------------------------------------ pacing

    fn set_pacer(&mut self, online: bool) {
        let Some(pacer) = &self.world.pacer else {
            return;
        };
        if online != self.pacer_online {
            pacer
                .online
                .fetch_add(if online { 1 } else { -1 }, Ordering::Relaxed);
            self.pacer_online = online;
        }
        self.sync_backlog();
    }

    fn sync_backlog(&mut self) {
        let Some(pacer) = &self.world.pacer else {
            return;
        };
        let wanted = if self.pacer_online { self.queue.len() as i64 } else { 0 };
        if wanted != self.pacer_backlog {
            pacer
                .backlog
                .fetch_add(wanted - self.pacer_backlog, Ordering::Relaxed);
            self.pacer_backlog = wanted;
        }
    }

    // ------------------------------------------------------------ messages

    fn hello(&self) -> Hello {
        let stats = self.queue.stats();
        Hello {
            device_id: self.state.device_id.clone(),
            hardware_model: heapless::String::try_from("wildcam-sim").unwrap_or_default(),
            chip: Chip::Host,
            firmware: self
                .ota
                .as_ref()
                .map_or(FIRMWARE_DEFAULT, OtaDevice::running),
            secure_version: self
                .ota
                .as_ref()
                .map_or(crate::ota::SECURE_VERSION_FROM, OtaDevice::secure_version),
            reset_reason: self.reset_reason,
            capabilities: Capabilities::PIR
                .union(Capabilities::CLASSIFIER)
                .union(if self.plan.solar { Capabilities::SOLAR } else { Capabilities(0) }),
            config_version: 0,
            queue_floor: stats.floor,
            queue_next: stats.next_seq,
        }
    }

    fn health(&mut self) -> Health {
        let at_ms = self.world.clock.now_ms().min(self.world.end_ms);
        let stats = self.queue.stats();
        let rssi_noise = self.fault_rng.int(0, 6) as i8 - 3;
        Health {
            taken_at: ((at_ms / 1_000) as i64 + i64::from(self.plan.skew_s)).clamp(0, i64::from(u32::MAX))
                as u32,
            battery_mv: self.power.battery_mv(),
            battery_soc_pct: (self.power.soc() * 100.0).round() as u8,
            charge_state: self.power.charge_state(at_ms),
            solar_mw: self.power.solar_mw(at_ms) as u16,
            temperature_decicelsius: (self.power.temperature_c(at_ms) * 10.0) as i16,
            storage_free_kib: STORAGE_KIB.saturating_sub(self.storage_used_kib),
            storage_errors: 0,
            rssi_dbm: self.plan.rssi_dbm.saturating_add(rssi_noise),
            uptime_s: (at_ms.saturating_sub(self.boot_ms) / 1_000) as u32,
            reset_reason: self.reset_reason,
            triggers_since_last: self.triggers_since_health,
            queue_depth: stats.len,
            queue_dropped_total: stats.dropped_total,
        }
    }
}

/// Topic suffix of detections.
pub const DETECTION_SUFFIX: &str = "det";

/// The next event of a Poisson process of `rate_per_day` after `after_ms`.
fn next_poisson(rng: &mut Rng, after_ms: u64, rate_per_day: f64) -> u64 {
    if rate_per_day <= 0.0 {
        return NEVER;
    }
    let wait_ms = rng.exponential(rate_per_day) * 86_400_000.0;
    after_ms.saturating_add(wait_ms as u64)
}
