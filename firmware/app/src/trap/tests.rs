//! The trap's core against the SDK's server side, in RAM: claims, sealed
//! detections, acks, reboots, configuration and commands.

use std::vec::Vec;

use wildcam_sdk::protocol::*;
use wildcam_sdk::provision::{
    CREDENTIALS_FRAME_LEN_MAX, ClaimToken, Credentials, MqttPassword, PendingClaim, ServerChallenge,
    ServerIdentity, seal_credentials,
};
use wildcam_sdk::queue::{FlashStore, MemFlash, MemoryStore};
use wildcam_sdk::seal::{Opener, SEAL_OVERHEAD, Sealer, SessionKey};
use wildcam_sdk::topic::{self, Direction};

use super::*;
use crate::hardware::ClassifierVerdict;
use crate::storage::{FlashStateStore, StateError};

const TOKEN: &str = "field-2026.Jx3v9QmZt0aKc7LpWn2Rb5YsUe8HdFgk";

/// A state store in RAM whose saves can be made to fail.
#[derive(Default)]
pub(crate) struct RamState {
    saved: Option<DeviceState>,
    fail_saves: bool,
    saves: usize,
}

impl StateStore for RamState {
    fn load(&mut self) -> Result<Option<DeviceState>, StateError> {
        Ok(self.saved.clone())
    }
    fn save(&mut self, state: &DeviceState) -> Result<(), StateError> {
        if self.fail_saves {
            return Err(StateError::Io);
        }
        self.saves += 1;
        self.saved = Some(state.clone());
        Ok(())
    }
}

/// Deterministic "randomness".
pub(crate) struct Counter(u8);

impl Entropy for Counter {
    fn fill(&mut self, bytes: &mut [u8]) {
        for byte in bytes {
            self.0 = self.0.wrapping_add(1);
            *byte = self.0;
        }
    }
}

pub(crate) type TestTrap = Trap<MemoryStore<32>, RamState>;

pub(crate) fn identity() -> TrapIdentity {
    TrapIdentity {
        hardware_model: "wildcam-test-board-with-a-long-name",
        chip: Chip::Host,
        firmware: FirmwareVersion { major: 0, minor: 1, patch: 0 },
        secure_version: 1,
        capabilities: Capabilities::PIR,
        ota_public_key: None,
    }
}

fn open(queue: MemoryStore<32>, state: RamState) -> TestTrap {
    open_as(identity(), queue, state)
}

pub(crate) fn open_as(identity: TrapIdentity, queue: MemoryStore<32>, state: RamState) -> TestTrap {
    Trap::open(identity, queue, state, ResetReason::PowerOn, &mut Counter(0)).unwrap()
}

pub(crate) fn reboot(trap: TestTrap) -> TestTrap {
    let (queue, state) = trap.into_stores();
    open(queue, state)
}

/// The server's side of one device.
pub(crate) struct Server {
    id: DeviceId,
    opener: Opener,
    sealer: Sealer,
}

impl Server {
    pub(crate) fn open(&mut self, frame: &[u8]) -> Uplink {
        let mut frame = frame.to_vec();
        let plain = self.opener.open(self.id.as_bytes(), &mut frame).unwrap();
        Uplink::decode(plain).unwrap()
    }

    /// A sealed downlink frame and its topic.
    pub(crate) fn seal(&mut self, message: &Downlink) -> (Topic, Vec<u8>) {
        let mut envelope = [0u8; 2048];
        let len = message.encode(&mut envelope).unwrap().len();
        let mut frame = std::vec![0u8; len + SEAL_OVERHEAD];
        self.sealer
            .seal(self.id.as_bytes(), &envelope[..len], &mut frame)
            .unwrap();
        let Route::Device(_, suffix) = message.kind().route() else {
            unreachable!()
        };
        (topic::device_topic(&self.id, Direction::Down, suffix), frame)
    }
}

use wildcam_sdk::topic::Topic;

/// Claims `trap` against the SDK's server side.
pub(crate) fn claim(trap: &mut TestTrap) -> Server {
    let server_identity = ServerIdentity::from_seed([7; 32]);
    let token = ClaimToken::parse(TOKEN).unwrap();
    let mut provisioner =
        trap.provisioner(Some(token.clone()), Some(server_identity.public_key()), &mut Counter(9));
    let request = provisioner.request();
    assert_eq!(request.identity_key, trap.identity_key());
    let (challenge, pending): (ClaimChallenge, PendingClaim) =
        ServerChallenge::new(&server_identity, [3; 32], [4; 32], request.identity_key).into_parts();
    let proof = provisioner.on_challenge(&challenge).unwrap();
    let key = pending.verify(Some(&token), &proof).unwrap();
    let credentials = Credentials {
        device_id: "trap-7".parse().unwrap(),
        mqtt_password: MqttPassword::try_from("password-7").unwrap(),
    };
    let mut frame = [0u8; CREDENTIALS_FRAME_LEN_MAX];
    let len = seal_credentials(&key, &provisioner.session(), &credentials, &mut frame).unwrap();
    let provisioned = provisioner.on_credentials(&mut frame[..len]).unwrap();
    trap.complete_claim(provisioned).unwrap();
    server_for(&key)
}

fn server_for(key: &SessionKey) -> Server {
    Server {
        id: "trap-7".parse().unwrap(),
        opener: Opener::new(key.clone(), Direction::Up),
        sealer: Sealer::new(key.clone(), Direction::Down),
    }
}

pub(crate) fn capture(burst_index: u8) -> CaptureRecord {
    CaptureRecord {
        captured_at: 1_795_000_000,
        trigger: Trigger::Pir,
        burst_index,
        burst_len: 3,
        verdict: ClassifierVerdict::default(),
        image_len: 4_096,
        image_digest: [burst_index; 8],
        battery_mv: 3_900,
    }
}

/// Everything the in-flight window lets out, opened by the server.
pub(crate) fn drain(trap: &mut TestTrap, server: &mut Server) -> Vec<Detection> {
    let mut frame = [0u8; 256];
    let mut sent = Vec::new();
    while let Some(outgoing) = trap.next_detection(&mut frame).unwrap() {
        let Uplink::Detection(detection) = server.open(&frame[..outgoing.len]) else {
            panic!("not a detection")
        };
        assert_eq!(detection.seq, outgoing.seq);
        sent.push(detection);
    }
    sent
}

pub(crate) fn deliver(trap: &mut TestTrap, server: &mut Server, message: &Downlink) -> Reaction {
    let (topic, mut frame) = server.seal(message);
    trap.on_publish(&topic, &mut frame).unwrap()
}

#[test]
fn a_fresh_trap_draws_and_keeps_its_identity() {
    let trap = open(MemoryStore::new(), RamState::default());
    let key = trap.identity_key();
    assert!(trap.device_id().is_none());
    assert_eq!(trap.config(), &TrapConfig::default());
    let trap = reboot(trap);
    assert_eq!(trap.identity_key(), key, "the seed was persisted on first boot");
}

#[test]
fn hello_before_a_claim_is_refused() {
    let mut trap = open(MemoryStore::new(), RamState::default());
    assert_eq!(trap.on_connected().unwrap_err(), TrapError::NotProvisioned);
    let mut frame = [0u8; 256];
    assert!(trap.next_detection(&mut frame).is_ok(), "nothing queued yet");
    trap.record_detection(&capture(0)).unwrap();
    assert_eq!(trap.next_detection(&mut frame).unwrap_err(), TrapError::NotProvisioned);
}

#[test]
fn claimed_trap_says_hello_and_survives_a_reboot() {
    let mut trap = open(MemoryStore::new(), RamState::default());
    let mut server = claim(&mut trap);
    let hello = trap.on_connected().unwrap();
    assert_eq!(hello.device_id.as_str(), "trap-7");
    assert_eq!(hello.hardware_model.as_str(), "wildcam-test-board-with-");
    assert_eq!((hello.queue_floor, hello.queue_next), (1, 1));
    let mut frame = [0u8; 256];
    let sealed = trap
        .seal(&Uplink::Hello(hello.clone()), &mut frame)
        .unwrap();
    assert_eq!(sealed.suffix, "hello");
    assert_eq!(server.open(&frame[..sealed.len]), Uplink::Hello(hello));

    let mut trap = reboot(trap);
    assert_eq!(trap.device_id().unwrap().as_str(), "trap-7");
    let hello = trap.on_connected().unwrap();
    let sealed = trap
        .seal(&Uplink::Hello(hello.clone()), &mut frame)
        .unwrap();
    assert_eq!(
        server.open(&frame[..sealed.len]),
        Uplink::Hello(hello),
        "counters resume past the reservation"
    );
}

#[test]
fn detections_are_sealed_in_order_and_released_by_acks() {
    let mut trap = open(MemoryStore::new(), RamState::default());
    let mut server = claim(&mut trap);
    for index in 0..3 {
        assert_eq!(trap.record_detection(&capture(index)).unwrap(), u32::from(index) + 1);
    }
    let sent = drain(&mut trap, &mut server);
    assert_eq!(sent.iter().map(|d| d.seq).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(sent[2].image_digest, [2; 8]);
    assert!(drain(&mut trap, &mut server).is_empty(), "in flight, not sent twice");

    let reaction = deliver(&mut trap, &mut server, &Downlink::Ack(Ack { through: 2 }));
    assert_eq!(reaction.released, 2);
    assert_eq!(trap.queue_stats().len, 1);
    // A forged ack beyond what was sent changes nothing.
    let reaction = deliver(&mut trap, &mut server, &Downlink::Ack(Ack { through: 9 }));
    assert_eq!(reaction.released, 0);
    assert_eq!(trap.queue_stats().len, 1);
}

#[test]
fn unacknowledged_detections_survive_a_reboot_and_go_out_again() {
    let mut trap = open(MemoryStore::new(), RamState::default());
    let mut server = claim(&mut trap);
    for index in 0..3 {
        trap.record_detection(&capture(index)).unwrap();
    }
    drain(&mut trap, &mut server);
    deliver(&mut trap, &mut server, &Downlink::Ack(Ack { through: 1 }));

    let mut trap = reboot(trap);
    let hello = trap.on_connected().unwrap();
    assert_eq!((hello.queue_floor, hello.queue_next), (2, 4));
    let resent = drain(&mut trap, &mut server);
    assert_eq!(resent.iter().map(|d| d.seq).collect::<Vec<_>>(), [2, 3]);
    assert_eq!(trap.record_detection(&capture(0)).unwrap(), 4, "numbers are never reused");
}

#[test]
fn a_rewind_resends_everything_unacknowledged() {
    let mut trap = open(MemoryStore::new(), RamState::default());
    let mut server = claim(&mut trap);
    trap.record_detection(&capture(0)).unwrap();
    assert_eq!(drain(&mut trap, &mut server).len(), 1);
    assert_eq!(trap.rewind(), None, "nothing dropped: no hello needed");
    assert_eq!(drain(&mut trap, &mut server).len(), 1);
}

#[test]
fn after_dropping_unsent_records_a_rewind_says_hello_with_the_new_floor() {
    let mut trap = open(MemoryStore::new(), RamState::default());
    let mut server = claim(&mut trap);
    trap.record_detection(&capture(0)).unwrap();
    drain(&mut trap, &mut server);
    deliver(&mut trap, &mut server, &Downlink::Ack(Ack { through: 1 }));
    // The server stops acknowledging; the full queue drops its oldest.
    for _ in 0..40 {
        trap.record_detection(&capture(1)).unwrap();
    }
    let stats = trap.queue_stats();
    assert!(stats.floor > 2, "records were dropped: floor {}", stats.floor);
    let hello = trap
        .rewind()
        .expect("the server's ack (1) is below the floor");
    assert_eq!(hello.queue_floor, stats.floor);
    // Once the server acks up to the floor, a rewind needs no hello.
    let sent = drain(&mut trap, &mut server);
    let through = sent.last().expect("resent").seq;
    deliver(&mut trap, &mut server, &Downlink::Ack(Ack { through }));
    assert_eq!(trap.rewind(), None);
}

#[test]
fn downlinks_on_the_wrong_topic_or_forged_are_refused() {
    let mut trap = open(MemoryStore::new(), RamState::default());
    let mut server = claim(&mut trap);
    trap.record_detection(&capture(0)).unwrap();
    drain(&mut trap, &mut server);

    let (_, mut frame) = server.seal(&Downlink::Ack(Ack { through: 1 }));
    let other = topic::device_topic(&"trap-8".parse().unwrap(), Direction::Down, "ack");
    assert_eq!(trap.on_publish(&other, &mut frame.clone()).unwrap_err(), TrapError::TopicMismatch);
    let wrong_suffix = topic::device_topic(&server.id, Direction::Down, "cfg");
    assert_eq!(
        trap.on_publish(&wrong_suffix, &mut frame.clone())
            .unwrap_err(),
        TrapError::TopicMismatch
    );
    let right = topic::device_topic(&server.id, Direction::Down, "ack");
    let mut forged = frame.clone();
    forged[8] ^= 1;
    assert!(matches!(trap.on_publish(&right, &mut forged), Err(TrapError::Open(_))));
    assert_eq!(trap.queue_stats().len, 1, "nothing released by refused frames");
    // The frame opened under the wrong suffix counts as seen: a copy moved
    // to another topic costs at most that one message, which is resent.
    assert!(matches!(trap.on_publish(&right, &mut frame), Err(TrapError::Open(_))));
    assert_eq!(deliver(&mut trap, &mut server, &Downlink::Ack(Ack { through: 1 })).released, 1);
}

fn desired(version: u32, burst_len: u8) -> Downlink {
    Downlink::DesiredConfig(DesiredConfig {
        version,
        config: TrapConfig { burst_len, ..TrapConfig::default() },
    })
}

#[test]
fn a_newer_configuration_is_applied_persisted_and_reported() {
    let mut trap = open(MemoryStore::new(), RamState::default());
    let mut server = claim(&mut trap);
    let reaction = deliver(&mut trap, &mut server, &desired(2, 5));
    assert!(reaction.config_changed);
    let Some(Uplink::ReportedConfig(report)) = reaction.reply else {
        panic!("no report")
    };
    assert_eq!((report.version, report.desired_version, report.status), (2, 2, ConfigStatus::Applied));
    assert_eq!(report.config.burst_len, 5);

    // A repeat (the server's catch-up after a hello) and a stale version are
    // reported without change.
    let repeat = deliver(&mut trap, &mut server, &desired(2, 5));
    assert!(!repeat.config_changed && repeat.reply.is_some());
    let stale = deliver(&mut trap, &mut server, &desired(1, 7));
    assert!(!stale.config_changed);
    assert_eq!(trap.config().burst_len, 5);

    let mut trap = reboot(trap);
    assert_eq!((trap.config_version(), trap.config().burst_len), (2, 5));
    assert_eq!(trap.on_connected().unwrap().config_version, 2);
}

#[test]
fn an_invalid_configuration_is_rejected_and_the_old_one_kept() {
    let mut trap = open(MemoryStore::new(), RamState::default());
    claim(&mut trap);
    // Decoding would refuse it; a direct call shows the trap checks too.
    let reaction = trap.on_downlink(desired(3, 0)).unwrap();
    let Some(Uplink::ReportedConfig(report)) = reaction.reply else {
        panic!("no report")
    };
    assert_eq!((report.version, report.desired_version), (0, 3));
    assert_eq!(report.status, ConfigStatus::RejectedInvalid);
    assert_eq!(trap.config(), &TrapConfig::default());
}

#[test]
fn commands_run_once_even_across_a_reboot() {
    let mut trap = open(MemoryStore::new(), RamState::default());
    let mut server = claim(&mut trap);
    let capture_now = Downlink::Command(Command { id: 41, ttl_s: 60, kind: CommandKind::CaptureNow });
    let reaction = deliver(&mut trap, &mut server, &capture_now);
    assert!(reaction.capture_now);
    assert_eq!(
        reaction.reply,
        Some(Uplink::CommandResult(CommandResult { id: 41, status: CommandStatus::Done }))
    );

    let reboot_command = Downlink::Command(Command { id: 42, ttl_s: 60, kind: CommandKind::Reboot });
    assert!(deliver(&mut trap, &mut server, &reboot_command).restart);
    let mut trap = reboot(trap);
    let again = deliver(&mut trap, &mut server, &reboot_command);
    assert!(!again.restart);
    assert_eq!(
        again.reply,
        Some(Uplink::CommandResult(CommandResult { id: 42, status: CommandStatus::Duplicate }))
    );

    let format = Downlink::Command(Command { id: 43, ttl_s: 60, kind: CommandKind::FormatStorage });
    let reaction = deliver(&mut trap, &mut server, &format);
    assert_eq!(
        reaction.reply,
        Some(Uplink::CommandResult(CommandResult { id: 43, status: CommandStatus::Unsupported }))
    );
}

#[test]
fn a_failed_reservation_save_withholds_the_frame_and_reuses_no_counter() {
    let mut trap = open(MemoryStore::new(), RamState::default());
    let mut server = claim(&mut trap);
    let (queue, mut state) = trap.into_stores();
    state.fail_saves = true;
    let mut trap = open(queue, state);
    let hello = Uplink::Hello(trap.on_connected().unwrap());
    let mut frame = [0u8; 256];
    // The first seal after a claim must reserve counters: the save fails.
    assert_eq!(trap.seal(&hello, &mut frame).unwrap_err(), TrapError::State(StateError::Io));
    let (queue, mut state) = trap.into_stores();
    state.fail_saves = false;
    let mut trap = open(queue, state);
    let sealed = trap.seal(&hello, &mut frame).unwrap();
    assert_eq!(server.open(&frame[..sealed.len]), hello);
}

#[test]
fn health_reports_the_queue_and_resets_the_trigger_count() {
    let mut trap = open(MemoryStore::new(), RamState::default());
    claim(&mut trap);
    trap.count_trigger();
    trap.count_trigger();
    trap.record_detection(&capture(0)).unwrap();
    let power = PowerReading {
        battery_mv: 3_900,
        battery_soc_pct: 180,
        charge_state: ChargeState::Charging,
        solar_mw: 500,
        temperature_decicelsius: 215,
    };
    let health = trap.health(power, 1_795_000_000, 42, -60);
    assert_eq!((health.triggers_since_last, health.queue_depth, health.battery_soc_pct), (2, 1, 100));
    assert!(health.validate().is_ok());
    assert_eq!(
        trap.health(power, 1_795_000_060, 102, -60)
            .triggers_since_last,
        0
    );
}

#[test]
fn the_state_journal_on_flash_keeps_the_newest_state() {
    let flash = core::cell::RefCell::new(MemFlash::<{ 16 * 4096 }>::new());
    let layout = crate::storage::FlashLayout { state: 0..2 * 4096, queue: 2 * 4096..16 * 4096 };
    let open_flash = || {
        let state = FlashStateStore::new(SharedFlash::new(&flash), layout.state.clone()).unwrap();
        let queue = FlashStore::<_>::new(SharedFlash::new(&flash), layout.queue.clone()).unwrap();
        Trap::open(identity(), queue, state, ResetReason::PowerOn, &mut Counter(0)).unwrap()
    };
    let mut trap = open_flash();
    let key = trap.identity_key();
    trap.record_detection(&capture(0)).unwrap();
    // Enough state writes to cycle the journal through both pages.
    for version in 1..40 {
        trap.on_downlink(desired(version, 2)).unwrap();
    }
    drop(trap);
    let trap = open_flash();
    assert_eq!(trap.identity_key(), key);
    assert_eq!(trap.config_version(), 39);
    assert_eq!(trap.queue_stats().len, 1);
}

use crate::storage::SharedFlash;
