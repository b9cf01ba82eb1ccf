//! The update driver with the trap, against the SDK's server side, an
//! in-RAM NOR flash holding both slots and a bootloader model: downloads,
//! power cuts, refusals, self-tests and rollbacks.

use core::cell::RefCell;
use std::vec::Vec;

use ed25519_dalek::{Signer, SigningKey};
use sha2::{Digest, Sha256};
use wildcam_sdk::ota::{
    MANIFEST_SIGNING_LEN_MAX, Manifest, ManifestSignature, OtaOutcome, OtaPhase, SignedManifest,
};
use wildcam_sdk::protocol::*;
use wildcam_sdk::queue::{MemFlash, MemoryStore};

use super::*;
use crate::storage::SharedFlash;
use crate::trap::TrapIdentity;
use crate::trap::tests::{RamState, Server, TestTrap, capture, claim, deliver, drain, open_as};

const SIGNING_SEED: [u8; 32] = [0x42; 32];
const FACTORY: FirmwareVersion = FirmwareVersion { major: 0, minor: 1, patch: 0 };
const NEW: FirmwareVersion = FirmwareVersion { major: 0, minor: 2, patch: 0 };
const SLOT_LEN: u32 = 64 * 1024;
const FLASH_LEN: usize = 2 * SLOT_LEN as usize;
const BATTERY_MV: u16 = 3_900;

type Flash = MemFlash<FLASH_LEN>;

fn public_key() -> [u8; 32] {
    SigningKey::from_bytes(&SIGNING_SEED)
        .verifying_key()
        .to_bytes()
}

fn identity(firmware: FirmwareVersion, secure_version: u32) -> TrapIdentity {
    TrapIdentity {
        hardware_model: "wildcam-test",
        chip: Chip::Host,
        firmware,
        secure_version,
        capabilities: Capabilities::PIR,
        ota_public_key: Some(public_key()),
    }
}

/// Deterministic image bytes.
fn image(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 7)) as u8)
        .collect()
}

fn sign(manifest: Manifest, seed: [u8; 32]) -> SignedManifest {
    let mut buf = [0u8; MANIFEST_SIGNING_LEN_MAX];
    let signature = SigningKey::from_bytes(&seed).sign(manifest.signing_bytes(&mut buf).unwrap());
    SignedManifest { manifest, signature: ManifestSignature(signature.to_bytes()) }
}

fn manifest(image: &[u8]) -> Manifest {
    Manifest {
        version: NEW,
        secure_version: 3,
        chip: Chip::Host,
        image_size: image.len() as u32,
        image_sha256: Sha256::digest(image).into(),
        min_battery_mv: 3_300,
    }
}

fn offer(rollout_id: u32, manifest: Manifest, chunk_len: u16) -> Downlink {
    Downlink::OtaOffer(OtaOffer { rollout_id, manifest: sign(manifest, SIGNING_SEED), chunk_len })
}

/// esp-idf style state of the selected slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    New,
    PendingVerify,
    Valid,
}

/// The bootloader: two slots, the selected one and its state.
#[derive(Debug)]
struct RamBoot {
    running: usize,
    selected: usize,
    state: SlotState,
    versions: [FirmwareVersion; 2],
    self_test_fails: bool,
    activations: u32,
}

impl RamBoot {
    fn new() -> Self {
        Self {
            running: 0,
            selected: 0,
            state: SlotState::Valid,
            versions: [FACTORY; 2],
            self_test_fails: false,
            activations: 0,
        }
    }

    /// Power on: the bootloader picks the image.
    fn power_on(&mut self) {
        match self.state {
            SlotState::New => self.state = SlotState::PendingVerify,
            // Booted once and never confirmed: roll back.
            SlotState::PendingVerify => {
                self.selected = 1 - self.selected;
                self.state = SlotState::Valid;
            }
            SlotState::Valid => {}
        }
        self.running = self.selected;
    }

    fn inactive(&self) -> Range<u32> {
        let start = (1 - self.running) as u32 * SLOT_LEN;
        start..start + SLOT_LEN
    }
}

impl Restart for RamBoot {
    fn reset_reason(&self) -> ResetReason {
        ResetReason::PowerOn
    }
    fn restart(&mut self) -> ! {
        panic!("tests restart by power-cycling the device")
    }
}

impl BootControl for RamBoot {
    type Error = ();

    fn running_version(&self) -> FirmwareVersion {
        self.versions[self.running]
    }

    fn activate_update(&mut self, record: &OtaRecord) -> Result<(), ()> {
        self.activations += 1;
        self.selected = 1 - self.running;
        self.versions[self.selected] = record.manifest.manifest.version;
        self.state = SlotState::New;
        Ok(())
    }

    fn mark_valid(&mut self) -> Result<(), ()> {
        if self.selected == self.running {
            self.state = SlotState::Valid;
        }
        Ok(())
    }

    fn roll_back(&mut self) -> Result<(), ()> {
        self.selected = 1 - self.running;
        self.state = SlotState::Valid;
        Ok(())
    }

    fn board_self_test(&mut self) -> Result<(), &'static str> {
        if self.self_test_fails { Err("test switch") } else { Ok(()) }
    }
}

/// A claimed trap and the persistent parts of its device.
struct Device {
    trap: TestTrap,
    server: Server,
    boot: RamBoot,
    flash: RefCell<Flash>,
    /// What the server received on `up/ota`.
    uplinks: Vec<Uplink>,
}

type Slot<'f> = NorFlashSlot<SharedFlash<'f, Flash>>;

impl Device {
    fn new() -> Self {
        let mut trap = open_as(identity(FACTORY, 1), MemoryStore::new(), RamState::default());
        let server = claim(&mut trap);
        Self { trap, server, boot: RamBoot::new(), flash: RefCell::new(Flash::new()), uplinks: Vec::new() }
    }

    /// Power cycle: the bootloader picks an image, the trap reopens its
    /// storage as that image.
    fn power_cycle(self) -> Self {
        let Self { trap, server, mut boot, flash, uplinks } = self;
        boot.power_on();
        let (queue, state) = trap.into_stores();
        let trap = open_as(identity(boot.running_version(), 1), queue, state);
        Self { trap, server, boot, flash, uplinks }
    }

    fn slot_contents(&self, len: usize) -> Vec<u8> {
        let range = self.boot.inactive();
        let mut bytes = std::vec![0u8; len.next_multiple_of(4)];
        embedded_storage::nor_flash::ReadNorFlash::read(
            &mut *self.flash.borrow_mut(),
            range.start,
            &mut bytes,
        )
        .unwrap();
        bytes.truncate(len);
        bytes
    }
}

type TestOta<'d> = Ota<'d, RamBoot, Slot<'d>>;

/// Starts the driver on `device` (one boot) and hands it to `run` with the
/// trap, the server and what the server received.
fn with_ota<R>(
    device: &mut Device,
    run: impl FnOnce(&mut TestOta<'_>, &mut TestTrap, &mut Server, &mut Vec<Uplink>) -> R,
) -> R {
    let Device { trap, server, boot, flash, uplinks } = device;
    let mut slot = slot_for(flash, boot);
    let (mut ota, started) = Ota::start(trap, boot, &mut slot);
    assert!(started.is_empty(), "nothing to do before connecting");
    run(&mut ota, trap, server, uplinks)
}

fn slot_for<'f>(flash: &'f RefCell<Flash>, boot: &RamBoot) -> Slot<'f> {
    NorFlashSlot::new(SharedFlash::new(flash), boot.inactive()).unwrap()
}

/// Seals what a step says to publish and opens it at the server.
fn publish(trap: &mut TestTrap, server: &mut Server, step: &OtaStep, uplinks: &mut Vec<Uplink>) {
    let messages = [
        step.result.map(Uplink::OtaResult),
        step.progress.map(Uplink::OtaProgress),
        step.request.map(Uplink::OtaChunkRequest),
    ];
    for message in messages.into_iter().flatten() {
        let mut frame = [0u8; 256];
        let sealed = trap.seal(&message, &mut frame).unwrap();
        assert_eq!(sealed.suffix, "ota");
        let opened = server.open(&frame[..sealed.len]);
        assert_eq!(opened, message);
        uplinks.push(opened);
    }
}

/// Delivers a sealed OTA downlink through the trap to the driver.
fn downlink(
    ota: &mut TestOta<'_>,
    trap: &mut TestTrap,
    server: &mut Server,
    message: &Downlink,
    uplinks: &mut Vec<Uplink>,
) -> OtaStep {
    let reaction = deliver(trap, server, message);
    let step = ota
        .on_downlink(trap, reaction.ota.as_ref().expect("an OTA message"), BATTERY_MV)
        .unwrap();
    publish(trap, server, &step, uplinks);
    step
}

/// The server answers `request` from `image`.
fn chunk_for(request: ChunkRequest, image: &[u8]) -> Downlink {
    let start = request.offset as usize;
    let end = (start + usize::from(request.len)).min(image.len());
    Downlink::OtaChunk(OtaChunk {
        rollout_id: request.rollout_id,
        offset: request.offset,
        data: heapless::Vec::from_slice(&image[start..end]).unwrap(),
    })
}

fn results(uplinks: &[Uplink]) -> Vec<(u32, OtaOutcome)> {
    uplinks
        .iter()
        .filter_map(|uplink| match uplink {
            Uplink::OtaResult(result) => Some((result.rollout_id, result.outcome)),
            _ => None,
        })
        .collect()
}

fn requested_offsets(uplinks: &[Uplink]) -> Vec<u32> {
    uplinks
        .iter()
        .filter_map(|uplink| match uplink {
            Uplink::OtaChunkRequest(request) => Some(request.offset),
            _ => None,
        })
        .collect()
}

/// Serves chunks until the step stops asking or `limit` chunks went out;
/// returns the last step.
fn serve(
    ota: &mut TestOta<'_>,
    trap: &mut TestTrap,
    server: &mut Server,
    image: &[u8],
    mut step: OtaStep,
    limit: usize,
    uplinks: &mut Vec<Uplink>,
) -> OtaStep {
    for _ in 0..limit {
        let Some(request) = step.request else { break };
        step = downlink(ota, trap, server, &chunk_for(request, image), uplinks);
    }
    step
}

/// Runs one boot: start the driver, connect, run the self-test; returns the
/// device after the boot's steps, with the step of the connection.
fn boot_and_connect(device: &mut Device) -> OtaStep {
    with_ota(device, |ota, trap, server, uplinks| {
        let tested = ota.on_server_reached(trap).unwrap();
        if tested.restart {
            return tested;
        }
        let step = ota.on_connected();
        publish(trap, server, &step, uplinks);
        if step.result.is_some() {
            ota.result_delivered(trap).unwrap();
        }
        step
    })
}

#[test]
fn a_full_update_downloads_verifies_activates_and_confirms() {
    // An odd size and chunk length: unaligned writes and a short last chunk.
    let image = image(40_003);
    let mut device = Device::new();
    let hello = device.trap.on_connected().unwrap();
    assert!(hello.capabilities.contains(Capabilities::OTA));
    assert_eq!((hello.firmware, hello.secure_version), (FACTORY, 1));
    with_ota(&mut device, |ota, trap, server, uplinks| {
        assert!(ota.on_connected().is_empty());
        let step = downlink(ota, trap, server, &offer(7, manifest(&image), 1_000), uplinks);
        assert_eq!(step.request, Some(ChunkRequest { rollout_id: 7, offset: 0, len: 1_000 }));
        let last = serve(ota, trap, server, &image, step, 100, uplinks);
        assert!(last.restart, "verified and activated: restart");
        assert_eq!(last.progress.map(|p| p.state), Some(OtaStateKind::ReadyToReboot));
        assert_eq!(requested_offsets(uplinks), (0..41).map(|i| i * 1_000).collect::<Vec<_>>());
        assert_eq!(trap.ota_state().record.as_ref().unwrap().phase, OtaPhase::PendingConfirmation);
    });
    assert_eq!(device.boot.activations, 1);
    assert_eq!(device.slot_contents(image.len()), image, "the inactive slot holds the image");
    // Each sector of the slot was erased once: 40,003 bytes span 10 sectors.
    assert_eq!(device.flash.borrow().counts().erases, 10);

    let mut device = device.power_cycle();
    assert_eq!(device.boot.state, SlotState::PendingVerify);
    let step = boot_and_connect(&mut device);
    assert_eq!(step.result, Some(OtaResult { rollout_id: 7, version: NEW, outcome: OtaOutcome::Confirmed }));
    assert_eq!(device.boot.state, SlotState::Valid);
    assert_eq!(device.trap.ota_state().record, None, "delivered: forgotten");
    assert_eq!(device.trap.secure_version(), 3, "the floor was raised");
    let hello = device.trap.on_connected().unwrap();
    assert_eq!((hello.firmware, hello.secure_version), (NEW, 3));

    // Later boots stay on the update with nothing to report.
    let mut device = device.power_cycle();
    assert_eq!(device.boot.running_version(), NEW);
    assert!(boot_and_connect(&mut device).is_empty());
}

#[test]
fn a_power_cut_mid_download_resumes_from_the_persisted_offset() {
    let image = image(50_000);
    let mut device = Device::new();
    with_ota(&mut device, |ota, trap, server, uplinks| {
        let step = downlink(ota, trap, server, &offer(9, manifest(&image), 1_024), uplinks);
        // 20 chunks written (20 KiB); the record was last persisted at 16 KiB.
        let step = serve(ota, trap, server, &image, step, 20, uplinks);
        assert_eq!(step.request.unwrap().offset, 20 * 1_024);
        assert_eq!(trap.ota_state().record.as_ref().unwrap().offset, PERSIST_EVERY);
    });
    // Power is cut; the first connection after the reboot asks for the
    // chunk at the persisted offset, not 0.
    let mut device = device.power_cycle();
    device.uplinks.clear();
    let step = boot_and_connect(&mut device);
    assert_eq!(step.request.map(|r| r.offset), Some(PERSIST_EVERY));
    assert_eq!(step.progress.map(|p| (p.offset, p.state)), Some((PERSIST_EVERY, OtaStateKind::Downloading)));
    with_ota(&mut device, |ota, trap, server, uplinks| {
        let connected = ota.on_connected();
        let last = serve(ota, trap, server, &image, connected, 100, uplinks);
        assert!(last.restart, "the resumed image verified");
        assert_eq!(requested_offsets(uplinks).first(), Some(&PERSIST_EVERY));
    });
    let mut device = device.power_cycle();
    let step = boot_and_connect(&mut device);
    assert_eq!(step.result.map(|r| r.outcome), Some(OtaOutcome::Confirmed));
}

#[test]
fn bad_offers_are_refused_and_reported() {
    let image = image(5_000);
    let mut device = Device::new();
    with_ota(&mut device, |ota, trap, server, uplinks| {
        let forged = Downlink::OtaOffer(OtaOffer {
            rollout_id: 1,
            manifest: sign(manifest(&image), [0x13; 32]),
            chunk_len: 1_024,
        });
        let other_chip = offer(2, Manifest { chip: Chip::Esp32c3, ..manifest(&image) }, 1_024);
        let not_newer = offer(3, Manifest { version: FACTORY, ..manifest(&image) }, 1_024);
        let downgrade = offer(4, Manifest { secure_version: 0, ..manifest(&image) }, 1_024);
        let too_large = offer(5, Manifest { image_size: SLOT_LEN + 1, ..manifest(&image) }, 1_024);
        for message in [forged, other_chip, not_newer, downgrade, too_large] {
            let step = downlink(ota, trap, server, &message, uplinks);
            assert_eq!(step.request, None);
            assert!(!step.restart);
        }
        assert_eq!(
            results(uplinks),
            [
                (1, OtaOutcome::SignatureInvalid),
                (2, OtaOutcome::WrongChip),
                (3, OtaOutcome::NotNewer),
                (4, OtaOutcome::Downgrade),
                (5, OtaOutcome::ImageTooLarge),
            ]
        );
        assert_eq!(ota.state(), OtaStateKind::Idle);
        assert_eq!(trap.ota_state().record, None, "refusals persist nothing");
    });
    assert_eq!(device.flash.borrow().counts().writes, 0, "nor write anything");
}

#[test]
fn a_trap_without_a_signing_key_refuses_every_offer() {
    let image = image(5_000);
    let mut identity = identity(FACTORY, 1);
    identity.ota_public_key = None;
    let mut trap = open_as(identity, MemoryStore::new(), RamState::default());
    let mut server = claim(&mut trap);
    assert!(
        !trap
            .on_connected()
            .unwrap()
            .capabilities
            .contains(Capabilities::OTA)
    );
    let mut boot = RamBoot::new();
    let flash = RefCell::new(Flash::new());
    let mut slot = slot_for(&flash, &boot);
    let (mut ota, _) = Ota::start(&mut trap, &mut boot, &mut slot);
    let mut uplinks = Vec::new();
    let step = downlink(&mut ota, &mut trap, &mut server, &offer(1, manifest(&image), 1_024), &mut uplinks);
    assert_eq!(step.request, None);
    assert_eq!(results(&uplinks), [(1, OtaOutcome::SignatureInvalid)]);
}

/// Downloads `image` as rollout `rollout_id` and leaves the device switched
/// to it, not yet restarted.
fn install(device: &mut Device, rollout_id: u32, image: &[u8]) {
    with_ota(device, |ota, trap, server, uplinks| {
        let step = downlink(ota, trap, server, &offer(rollout_id, manifest(image), 1_024), uplinks);
        assert!(serve(ota, trap, server, image, step, 100, uplinks).restart);
    });
}

#[test]
fn a_failed_self_test_rolls_back_and_the_previous_image_reports_it() {
    let image = image(8_000);
    let mut device = Device::new();
    install(&mut device, 11, &image);
    let mut device = device.power_cycle();
    assert_eq!(device.boot.running_version(), NEW);
    device.boot.self_test_fails = true;
    let step = boot_and_connect(&mut device);
    assert!(step.restart, "rolling back");
    assert_eq!(step.result, None, "the previous image reports it");
    assert_eq!(device.boot.selected, 0);

    let mut device = device.power_cycle();
    assert_eq!(device.boot.running_version(), FACTORY);
    device.uplinks.clear();
    let step = boot_and_connect(&mut device);
    assert_eq!(
        step.result,
        Some(OtaResult { rollout_id: 11, version: NEW, outcome: OtaOutcome::SelfTestFailed })
    );
    assert_eq!(device.trap.ota_state().record, None);
    assert_eq!(device.trap.secure_version(), 1, "the floor stays");
}

#[test]
fn an_update_that_never_confirms_is_rolled_back_by_the_bootloader() {
    let image = image(8_000);
    let mut device = Device::new();
    install(&mut device, 12, &image);
    // The new image boots and dies before its self-test (killed, hung).
    let mut device = device.power_cycle();
    with_ota(&mut device, |ota, _, _, _| assert!(ota.awaiting_self_test()));
    let mut device = device.power_cycle();
    assert_eq!(device.boot.running_version(), FACTORY);
    let step = boot_and_connect(&mut device);
    assert_eq!(step.result.map(|r| (r.rollout_id, r.outcome)), Some((12, OtaOutcome::RolledBack)));
}

#[test]
fn a_result_is_reported_again_until_delivered() {
    let image = image(8_000);
    let mut device = Device::new();
    install(&mut device, 13, &image);
    let mut device = device.power_cycle();
    with_ota(&mut device, |ota, trap, server, uplinks| {
        let tested = ota.on_server_reached(trap).unwrap();
        assert_eq!(tested.result.map(|r| r.outcome), Some(OtaOutcome::Confirmed));
        let step = ota.on_connected();
        publish(trap, server, &step, uplinks);
        assert_eq!(step.result.map(|r| r.outcome), Some(OtaOutcome::Confirmed));
        // The connection drops before the broker's PUBACK.
    });
    let mut device = device.power_cycle();
    assert_eq!(device.boot.state, SlotState::Valid, "confirmed before the result went out");
    let step = boot_and_connect(&mut device);
    assert_eq!(step.result.map(|r| r.outcome), Some(OtaOutcome::Confirmed));
    assert_eq!(device.trap.ota_state().record, None);
}

#[test]
fn detections_are_sent_and_acked_during_a_download() {
    let image = image(12_000);
    let mut device = Device::new();
    with_ota(&mut device, |ota, trap, server, uplinks| {
        let mut step = downlink(ota, trap, server, &offer(21, manifest(&image), 1_024), uplinks);
        let mut acked = 0;
        while let Some(request) = step.request {
            // A burst between two chunks: queued, sent, acked.
            trap.record_detection(&capture(0)).unwrap();
            let sent = drain(trap, server);
            assert_eq!(sent.len(), 1);
            let reaction = deliver(trap, server, &Downlink::Ack(Ack { through: sent[0].seq }));
            acked += reaction.released;
            step = downlink(ota, trap, server, &chunk_for(request, &image), uplinks);
        }
        assert!(step.restart);
        assert_eq!(acked, 12);
        assert_eq!(trap.queue_stats().len, 0);
    });
}

#[test]
fn stale_and_foreign_chunks_are_ignored_and_gaps_asked_again() {
    let image = image(6_000);
    let mut device = Device::new();
    with_ota(&mut device, |ota, trap, server, uplinks| {
        let step = downlink(ota, trap, server, &offer(31, manifest(&image), 1_024), uplinks);
        let first = step.request.unwrap();
        let step = downlink(ota, trap, server, &chunk_for(first, &image), uplinks);
        let second = step.request.unwrap();
        // A duplicate of the first chunk: ignored.
        assert!(downlink(ota, trap, server, &chunk_for(first, &image), uplinks).is_empty());
        // Another rollout's chunk: ignored.
        let foreign = ChunkRequest { rollout_id: 99, ..second };
        assert!(downlink(ota, trap, server, &chunk_for(foreign, &image), uplinks).is_empty());
        // A chunk past the one wanted: ask again for the one wanted.
        let ahead = ChunkRequest { offset: second.offset + 1_024, ..second };
        let step = downlink(ota, trap, server, &chunk_for(ahead, &image), uplinks);
        assert_eq!(step.request, Some(second));
        assert_eq!(ota.chunk_request(), Some(second));
    });
}

#[test]
fn the_slot_never_programs_over_unerased_bytes() {
    // MemFlash refuses writes that would set bits: writing twice over the
    // same slot (a second rollout) only works if every sector is erased
    // before its first byte is written again.
    let flash = RefCell::new(Flash::new());
    let mut slot = NorFlashSlot::new(SharedFlash::new(&flash), 0..SLOT_LEN).unwrap();
    let first = image(9_999);
    for (index, piece) in first.chunks(777).enumerate() {
        slot.write((index * 777) as u32, piece).unwrap();
    }
    let second: Vec<u8> = first.iter().map(|b| !b).collect();
    for (index, piece) in second.chunks(1_000).enumerate() {
        slot.write((index * 1_000) as u32, piece).unwrap();
    }
    let mut back = std::vec![0u8; second.len()];
    slot.read(0, &mut back[..3]).unwrap();
    slot.read(3, &mut back[3..]).unwrap();
    assert_eq!(back, second);
    assert_eq!(slot.write(SLOT_LEN - 2, &[1, 2, 3]), Err(SlotError::OutOfBounds));
    assert!(NorFlashSlot::new(SharedFlash::new(&flash), 100..SLOT_LEN).is_err());
}

#[test]
fn the_ota_state_survives_in_the_flash_journal() {
    use crate::storage::{DeviceState, FlashStateStore, StateStore, decode_state, encode_state};
    let journal = RefCell::new(MemFlash::<{ 2 * 4096 }>::new());
    let mut store = FlashStateStore::new(SharedFlash::new(&journal), 0..2 * 4096).unwrap();
    let mut state = DeviceState::new([5; 32]);
    state.ota.secure_version = 4;
    state.ota.record = Some(OtaRecord {
        rollout_id: 3,
        manifest: sign(manifest(&image(10)), SIGNING_SEED),
        chunk_len: 1_024,
        offset: 4_096,
        phase: OtaPhase::Downloading,
    });
    store.save(&state).unwrap();
    assert_eq!(store.load().unwrap(), Some(state.clone()));
    // A state written before OTA existed (no tail) reads as "no update".
    let mut buf = [0u8; crate::storage::STATE_LEN_MAX];
    let with_tail = encode_state(&state, &mut buf).unwrap().to_vec();
    let mut plain = [0u8; crate::storage::STATE_LEN_MAX];
    let without_tail = postcard::to_slice(&state, &mut plain).unwrap();
    assert!(with_tail.starts_with(without_tail));
    let old = decode_state(without_tail).unwrap();
    assert_eq!(old.ota, crate::storage::OtaState::default());
    assert_eq!(old.identity_seed, [5; 32]);
}
