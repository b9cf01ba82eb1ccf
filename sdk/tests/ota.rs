//! OTA end to end: signed manifests, the state machine, power loss and
//! rollback, against an in-memory slot, bootloader and server.

use ed25519_dalek::{Signer, SigningKey};
use proptest::prelude::*;
use sha2::{Digest, Sha256};
use wildcam_sdk::ota::{
    BootAction, BootedImage, Chunk, ChunkRequest, MANIFEST_SIGNING_LEN_MAX, Manifest, ManifestSignature,
    MemorySlot, OTA_RECORD_LEN_MAX, OtaActions, OtaConfig, OtaError, OtaMachine, OtaOffer, OtaOutcome,
    OtaPhase, OtaRecord, OtaResult, OtaSlot, OtaStateKind, Persist, SignedManifest,
};
use wildcam_sdk::protocol::{Chip, FirmwareVersion};

const SEED: [u8; 32] = [0x5e; 32];
const SLOT_LEN: usize = 16 * 1024;
const OLD: FirmwareVersion = FirmwareVersion { major: 1, minor: 4, patch: 2 };
const NEW: FirmwareVersion = FirmwareVersion { major: 1, minor: 5, patch: 0 };
const SECURE_VERSION: u32 = 3;
const BATTERY_OK: u16 = 3900;

fn signing_key() -> SigningKey {
    SigningKey::from_bytes(&SEED)
}

fn public_key() -> [u8; 32] {
    signing_key().verifying_key().to_bytes()
}

/// Deterministic pseudo-random image bytes.
fn image(len: usize, salt: u32) -> Vec<u8> {
    let mut state = salt.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state.to_le_bytes()[0]
        })
        .collect()
}

fn manifest_for(image: &[u8]) -> Manifest {
    Manifest {
        version: NEW,
        secure_version: SECURE_VERSION + 1,
        chip: Chip::Esp32c3,
        image_size: image.len() as u32,
        image_sha256: Sha256::digest(image).into(),
        min_battery_mv: 3300,
    }
}

fn sign_with(key: &SigningKey, manifest: Manifest) -> SignedManifest {
    let mut buf = [0u8; MANIFEST_SIGNING_LEN_MAX];
    let signature = key.sign(manifest.signing_bytes(&mut buf).unwrap());
    SignedManifest { manifest, signature: ManifestSignature(signature.to_bytes()) }
}

fn sign(manifest: Manifest) -> SignedManifest {
    sign_with(&signing_key(), manifest)
}

fn config(running: FirmwareVersion, secure_version: u32) -> OtaConfig {
    OtaConfig::new(public_key(), Chip::Esp32c3, running, secure_version)
}

/// The update server for one rollout.
#[derive(Clone)]
struct Server {
    image: Vec<u8>,
    offer: OtaOffer,
}

impl Server {
    fn new(rollout_id: u32, image: Vec<u8>, chunk_len: u16) -> Self {
        let manifest = sign(manifest_for(&image));
        Self { image, offer: OtaOffer { rollout_id, manifest, chunk_len } }
    }

    fn with_manifest(mut self, manifest: SignedManifest) -> Self {
        self.offer.manifest = manifest;
        self
    }

    /// The bytes it has for a request (fewer at the end of what it has).
    fn chunk(&self, request: ChunkRequest) -> Chunk {
        let start = (request.offset as usize).min(self.image.len());
        let end = (start + usize::from(request.len)).min(self.image.len());
        chunk(request.rollout_id, request.offset, &self.image[start..end])
    }
}

fn chunk(rollout_id: u32, offset: u32, bytes: &[u8]) -> Chunk {
    Chunk { rollout_id, offset, data: heapless::Vec::from_slice(bytes).unwrap() }
}

/// esp-idf style image state of the updated slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ImageState {
    New,
    PendingVerify,
    Valid,
}

/// A device: slot, persisted record, bootloader and the firmware glue that
/// carries out the machine's actions.
struct Device {
    slot: MemorySlot<Vec<u8>>,
    stored: Option<Vec<u8>>,
    /// `Some` while the updated slot is the boot slot.
    update_boot: Option<ImageState>,
    update_version: FirmwareVersion,
    secure_version: u32,
    machine: OtaMachine,
    results: Vec<OtaResult>,
    request: Option<ChunkRequest>,
    self_test_passes: bool,
    /// Go from ReadyToReboot straight into the update.
    auto_reboot: bool,
    /// Simulated crash: the current call's actions are lost.
    crashed: bool,
    /// Crash right after this slot mutation succeeds (before persisting).
    crash_after_mutation: Option<u32>,
    /// Crash after this many more verify steps.
    crash_in_verify: Option<u32>,
    boots: u32,
    activations: u32,
    verify_buf: usize,
}

impl Device {
    fn new() -> Self {
        Self::with_slot(MemorySlot::new(image(SLOT_LEN, 99)))
    }

    fn with_slot(slot: MemorySlot<Vec<u8>>) -> Self {
        Self {
            slot,
            stored: None,
            update_boot: None,
            update_version: NEW,
            secure_version: SECURE_VERSION,
            machine: OtaMachine::new(config(OLD, SECURE_VERSION)),
            results: Vec::new(),
            request: None,
            self_test_passes: true,
            auto_reboot: true,
            crashed: false,
            crash_after_mutation: None,
            crash_in_verify: None,
            boots: 0,
            activations: 0,
            verify_buf: 300,
        }
    }

    fn running_update(&self) -> bool {
        self.update_boot.is_some()
    }

    fn current_config(&self) -> OtaConfig {
        let running = if self.running_update() { self.update_version } else { OLD };
        config(running, self.secure_version)
    }

    fn stored_record(&self) -> Option<OtaRecord> {
        self.stored
            .as_ref()
            .map(|bytes| OtaRecord::decode(bytes).unwrap())
    }

    fn power_failed(&self) -> bool {
        self.crashed || self.slot.power_lost()
    }

    /// Checks a machine call for an injected fault; `None` means the
    /// device died and the actions are lost.
    fn survive(&mut self, mutations_before: u32, actions: OtaActions) -> Option<OtaActions> {
        if let Some(at) = self.crash_after_mutation
            && (mutations_before..self.slot.mutations()).contains(&at)
        {
            self.crash_after_mutation = None;
            self.crashed = true;
        }
        (!self.power_failed()).then_some(actions)
    }

    fn offer(&mut self, offer: &OtaOffer, battery_mv: u16) {
        let before = self.slot.mutations();
        let actions = self.machine.on_offer(offer, battery_mv, &mut self.slot);
        if let Some(actions) = self.survive(before, actions) {
            self.execute(actions);
        }
    }

    fn deliver(&mut self, chunk: &Chunk) -> Result<(), OtaError> {
        let before = self.slot.mutations();
        let actions = self.machine.on_chunk(chunk, &mut self.slot)?;
        if let Some(actions) = self.survive(before, actions) {
            self.execute(actions);
        }
        Ok(())
    }

    /// Serves the outstanding request from `server`.
    fn serve(&mut self, server: &Server) -> Result<(), OtaError> {
        let request = self.request.take().expect("a chunk request");
        self.deliver(&server.chunk(request))
    }

    fn connect(&mut self) {
        let actions = self.machine.on_connected();
        self.execute(actions);
    }

    fn execute(&mut self, mut actions: OtaActions) {
        loop {
            if actions.mark_valid {
                self.update_boot = self.update_boot.map(|_| ImageState::Valid);
            }
            if let Some(floor) = actions.raise_secure_version {
                self.secure_version = floor;
            }
            match actions.persist.take() {
                Some(Persist::Store(record)) => {
                    let mut buf = [0u8; OTA_RECORD_LEN_MAX];
                    self.stored = Some(record.encode(&mut buf).unwrap().to_vec());
                }
                Some(Persist::Clear) => self.stored = None,
                None => {}
            }
            self.results.extend(actions.send_result);
            if actions.send_request.is_some() {
                self.request = actions.send_request;
            }
            if actions.verify {
                if let Some(left) = self.crash_in_verify.as_mut() {
                    if *left == 0 {
                        self.crash_in_verify = None;
                        self.crashed = true;
                        return;
                    }
                    *left -= 1;
                }
                let mut buf = vec![0u8; self.verify_buf];
                actions = self.machine.verify_step(&mut self.slot, &mut buf).unwrap();
                continue;
            }
            match actions.boot {
                Some(BootAction::UpdateReady) if self.auto_reboot => {
                    self.check_slot_matches_record();
                    actions = self.machine.reboot_into_update().unwrap();
                    continue;
                }
                Some(BootAction::UpdateReady) => self.check_slot_matches_record(),
                Some(BootAction::ActivateAndReboot) => {
                    self.activations += 1;
                    self.update_boot = Some(ImageState::New);
                    self.reboot();
                }
                Some(BootAction::RollBackAndReboot) => {
                    self.update_boot = None;
                    self.reboot();
                }
                None => {}
            }
            return;
        }
    }

    /// The machine only says the image is ready when the slot holds it.
    fn check_slot_matches_record(&self) {
        let manifest = &self.machine.record().unwrap().manifest.manifest;
        let size = manifest.image_size as usize;
        let digest: [u8; 32] = Sha256::digest(&self.slot.contents()[..size]).into();
        assert_eq!(digest, manifest.image_sha256, "ready to reboot with a bad image");
    }

    /// Power comes back (or the device resets): the bootloader picks an
    /// image, the firmware rebuilds the machine from the stored record.
    fn reboot(&mut self) {
        self.slot.power_cycle();
        self.crashed = false;
        self.request = None;
        self.boots += 1;
        self.update_boot = match self.update_boot {
            Some(ImageState::New) => Some(ImageState::PendingVerify),
            // Booted once unconfirmed: the bootloader rolls back.
            Some(ImageState::PendingVerify) => None,
            other => other,
        };
        let booted = if self.running_update() { BootedImage::Updated } else { BootedImage::Previous };
        let (machine, actions) = OtaMachine::resume(self.current_config(), self.stored_record(), booted);
        self.machine = machine;
        assert_eq!(actions.send_result, None);
        assert_eq!(actions.send_request, None);
        self.execute(actions);
    }

    fn run_self_test(&mut self) {
        let actions =
            if self.self_test_passes { self.machine.confirm() } else { self.machine.self_test_failed() };
        self.execute(actions.unwrap());
    }

    /// Reports the pending result, as if it had been published.
    fn acknowledge(&mut self) {
        let actions = self.machine.result_delivered().unwrap();
        self.execute(actions);
    }

    fn result_for(&self, rollout_id: u32) -> Option<OtaOutcome> {
        self.results
            .iter()
            .rev()
            .find(|r| r.rollout_id == rollout_id)
            .map(|r| r.outcome)
    }

    /// Drives the rollout to its result like firmware + server would,
    /// rebooting whenever power fails. Returns the outcome.
    fn run(&mut self, server: &Server) -> OtaOutcome {
        let rollout = server.offer.rollout_id;
        for _ in 0..10_000 {
            if self.power_failed() {
                self.reboot();
                self.connect();
                continue;
            }
            if let Some(outcome) = self.result_for(rollout) {
                if self.machine.pending_result().is_some() {
                    self.acknowledge();
                }
                return outcome;
            }
            if self.machine.awaiting_self_test() {
                self.run_self_test();
                continue;
            }
            match self.machine.state() {
                OtaStateKind::Idle => self.offer(&server.offer, BATTERY_OK),
                OtaStateKind::Downloading if self.request.is_none() => self.connect(),
                OtaStateKind::Downloading => {
                    let _ = self.serve(server);
                }
                OtaStateKind::Confirmed | OtaStateKind::RolledBack | OtaStateKind::Failed => self.connect(),
                other => panic!("stuck in {other:?}"),
            }
        }
        panic!("rollout did not finish");
    }

    fn assert_holds(&self, image: &[u8]) {
        assert_eq!(&self.slot.contents()[..image.len()], image);
    }
}

fn small_server() -> Server {
    Server::new(7, image(5000, 1), 512)
}

#[test]
fn happy_path_end_to_end() {
    let server = small_server();
    let mut device = Device::new();
    device.auto_reboot = false;
    device.offer(&server.offer, BATTERY_OK);
    assert_eq!(device.machine.state(), OtaStateKind::Downloading);
    assert_eq!(device.request, Some(ChunkRequest { rollout_id: 7, offset: 0, len: 512 }));
    let mut offsets = Vec::new();
    while device.machine.state() == OtaStateKind::Downloading {
        offsets.push(device.request.unwrap().offset);
        let progress = device.machine.progress().unwrap();
        assert_eq!(progress.offset, *offsets.last().unwrap());
        device.serve(&server).unwrap();
        assert_eq!(device.stored_record().unwrap().offset, device.machine.record().unwrap().offset);
    }
    assert_eq!(offsets, (0..10).map(|i| i * 512).collect::<Vec<_>>());
    assert_eq!(device.machine.state(), OtaStateKind::ReadyToReboot);
    assert_eq!(device.stored_record().unwrap().phase, OtaPhase::ReadyToReboot);
    assert_eq!(device.activations, 0);

    let actions = device.machine.reboot_into_update().unwrap();
    assert_eq!(actions.boot, Some(BootAction::ActivateAndReboot));
    assert_eq!(
        actions
            .persist
            .as_ref()
            .map(|p| matches!(p, Persist::Store(r) if r.phase == OtaPhase::PendingConfirmation)),
        Some(true)
    );
    device.execute(actions);
    assert!(device.running_update());
    assert!(device.machine.awaiting_self_test());
    assert_eq!(device.machine.state(), OtaStateKind::PendingConfirmation);
    assert_eq!(device.machine.config().running_version, NEW);

    let actions = device.machine.confirm().unwrap();
    assert!(actions.mark_valid);
    assert_eq!(actions.raise_secure_version, Some(SECURE_VERSION + 1));
    device.execute(actions);
    assert_eq!(device.update_boot, Some(ImageState::Valid));
    assert_eq!(device.secure_version, SECURE_VERSION + 1);
    assert_eq!(
        device.results,
        vec![OtaResult { rollout_id: 7, version: NEW, outcome: OtaOutcome::Confirmed }]
    );
    assert_eq!(device.machine.state(), OtaStateKind::Confirmed);
    device.acknowledge();
    assert_eq!(device.machine.state(), OtaStateKind::Idle);
    assert_eq!(device.stored, None);
    device.assert_holds(&server.image);
    // Later reboots stay on the update.
    device.reboot();
    assert!(device.running_update());
    assert_eq!(device.machine.state(), OtaStateKind::Idle);
}

#[test]
fn run_helper_confirms_with_uneven_chunks() {
    let server = Server::new(8, image(4099, 2), 1000);
    let mut device = Device::new();
    device.verify_buf = 4096;
    assert_eq!(device.run(&server), OtaOutcome::Confirmed);
    device.assert_holds(&server.image);
    assert_eq!(device.boots, 1);
}

#[test]
fn chunk_len_zero_or_too_large_means_maximum() {
    for chunk_len in [0, 1025, u16::MAX] {
        let server = Server::new(1, image(3000, 3), chunk_len);
        let mut device = Device::new();
        device.offer(&server.offer, BATTERY_OK);
        assert_eq!(device.request.unwrap().len, 1024);
    }
}

#[test]
fn corrupted_chunk_fails_digest() {
    let server = small_server();
    let mut device = Device::new();
    device.offer(&server.offer, BATTERY_OK);
    device.serve(&server).unwrap();
    let request = device.request.take().unwrap();
    let mut bad = server.chunk(request);
    bad.data[100] ^= 0x04;
    device.deliver(&bad).unwrap();
    assert_eq!(device.run(&server), OtaOutcome::DigestMismatch);
    assert_eq!(device.activations, 0);
    assert_eq!(device.machine.state(), OtaStateKind::Idle);
}

#[test]
fn flash_corruption_fails_digest() {
    let server = small_server();
    let mut device = Device::new();
    device.slot.inject_corruption(4, 0x80);
    assert_eq!(device.run(&server), OtaOutcome::DigestMismatch);
    assert_eq!(device.activations, 0);
}

fn refused(device: &mut Device, offer: &OtaOffer, battery_mv: u16, outcome: OtaOutcome) {
    let state = device.machine.state();
    let mutations = device.slot.mutations();
    let actions = device.machine.on_offer(offer, battery_mv, &mut device.slot);
    let expected =
        OtaResult { rollout_id: offer.rollout_id, version: offer.manifest.manifest.version, outcome };
    assert_eq!(actions, OtaActions { send_result: Some(expected), ..OtaActions::default() });
    assert_eq!(device.machine.state(), state);
    assert_eq!(device.slot.mutations(), mutations, "nothing written");
}

#[test]
fn bad_signature_is_refused() {
    let server = small_server();
    let mut device = Device::new();
    let mut offer = server.offer.clone();
    offer.manifest.signature.0[3] ^= 0x20;
    refused(&mut device, &offer, BATTERY_OK, OtaOutcome::SignatureInvalid);
    let stranger = SigningKey::from_bytes(&[0x11; 32]);
    offer.manifest = sign_with(&stranger, manifest_for(&server.image));
    refused(&mut device, &offer, BATTERY_OK, OtaOutcome::SignatureInvalid);
}

#[test]
fn manifest_tampered_after_signing_is_refused() {
    let server = small_server();
    let mut device = Device::new();
    let tamper: [fn(&mut Manifest); 6] = [
        |m| m.version.major += 1,
        |m| m.secure_version += 1,
        |m| m.chip = Chip::Esp32c6,
        |m| m.image_size -= 1,
        |m| m.image_sha256[31] ^= 1,
        |m| m.min_battery_mv = 0,
    ];
    for change in tamper {
        let mut offer = server.offer.clone();
        change(&mut offer.manifest.manifest);
        refused(&mut device, &offer, BATTERY_OK, OtaOutcome::SignatureInvalid);
    }
}

#[test]
fn policy_refusals() {
    let image = image(3000, 4);
    let mut device = Device::new();
    let offer = |manifest: Manifest| OtaOffer { rollout_id: 9, manifest: sign(manifest), chunk_len: 512 };

    let wrong_chip = Manifest { chip: Chip::Esp32c6, ..manifest_for(&image) };
    refused(&mut device, &offer(wrong_chip), BATTERY_OK, OtaOutcome::WrongChip);

    let below_floor = Manifest { secure_version: SECURE_VERSION - 1, ..manifest_for(&image) };
    refused(&mut device, &offer(below_floor.clone()), BATTERY_OK, OtaOutcome::Downgrade);

    let same = Manifest { version: OLD, ..manifest_for(&image) };
    refused(&mut device, &offer(same.clone()), BATTERY_OK, OtaOutcome::NotNewer);
    let older =
        Manifest { version: FirmwareVersion { major: 1, minor: 4, patch: 1 }, ..manifest_for(&image) };
    refused(&mut device, &offer(older), BATTERY_OK, OtaOutcome::NotNewer);

    let too_large = Manifest { image_size: SLOT_LEN as u32 + 1, ..manifest_for(&image) };
    refused(&mut device, &offer(too_large), BATTERY_OK, OtaOutcome::ImageTooLarge);
    let empty = Manifest { image_size: 0, ..manifest_for(&image) };
    refused(&mut device, &offer(empty), BATTERY_OK, OtaOutcome::SizeMismatch);

    refused(&mut device, &offer(manifest_for(&image)), 3299, OtaOutcome::BatteryTooLow);

    // Allowing "not newer" permits a reinstall but never crosses the floor.
    let mut permissive = config(OLD, SECURE_VERSION);
    permissive.allow_not_newer = true;
    device.machine = OtaMachine::new(permissive);
    refused(&mut device, &offer(below_floor), BATTERY_OK, OtaOutcome::Downgrade);
    device.offer(&offer(same), BATTERY_OK);
    assert_eq!(device.machine.state(), OtaStateKind::Downloading);
}

#[test]
fn battery_recovers_then_update_proceeds() {
    let server = small_server();
    let mut device = Device::new();
    refused(&mut device, &server.offer, 3000, OtaOutcome::BatteryTooLow);
    assert_eq!(device.machine.state(), OtaStateKind::Idle);
    device.results.clear();
    assert_eq!(device.run(&server), OtaOutcome::Confirmed);
}

#[test]
fn server_running_out_of_bytes_is_size_mismatch() {
    let full = image(5000, 5);
    let server = Server::new(3, full[..4700].to_vec(), 512).with_manifest(sign(manifest_for(&full)));
    let mut device = Device::new();
    assert_eq!(device.run(&server), OtaOutcome::SizeMismatch);
    assert_eq!(device.activations, 0);
}

#[test]
fn short_chunks_never_reach_verification_early() {
    let server = small_server();
    let mut device = Device::new();
    device.offer(&server.offer, BATTERY_OK);
    // The server sends less than asked each time: still fine, never early.
    let mut offset = 0u32;
    while offset < 5000 {
        let end = (offset + 100).min(5000);
        device
            .deliver(&server.chunk(ChunkRequest { rollout_id: 7, offset, len: (end - offset) as u16 }))
            .unwrap();
        offset = end;
        if offset < 5000 {
            assert_eq!(device.machine.state(), OtaStateKind::Downloading);
        }
    }
    assert_eq!(device.result_for(7), None);
    assert_eq!(device.machine.state(), OtaStateKind::PendingConfirmation);
}

#[test]
fn overflowing_final_chunk_is_refused() {
    let server = small_server();
    let mut device = Device::new();
    device.offer(&server.offer, BATTERY_OK);
    while device.request.unwrap().offset < 4608 {
        device.serve(&server).unwrap();
    }
    let request = device.request.unwrap();
    assert_eq!((request.offset, request.len), (4608, 392));
    let mutations = device.slot.mutations();
    let tail = device.slot.contents()[5000..5120].to_vec();
    let overflowing = chunk(7, 4608, &image(512, 6));
    assert_eq!(device.deliver(&overflowing), Err(OtaError::ChunkOverflow));
    assert_eq!(device.slot.mutations(), mutations);
    assert_eq!(&device.slot.contents()[5000..5120], &tail[..]);
    assert_eq!(device.machine.chunk_request(), Some(request));
    device.auto_reboot = false;
    device.serve(&server).unwrap();
    assert_eq!(device.machine.state(), OtaStateKind::ReadyToReboot);
}

#[test]
fn misplaced_chunks_are_refused_without_writing() {
    let server = small_server();
    let mut device = Device::new();
    device.offer(&server.offer, BATTERY_OK);
    device.serve(&server).unwrap();
    device.serve(&server).unwrap();
    let wanted = device.machine.chunk_request().unwrap();
    assert_eq!(wanted.offset, 1024);
    let mutations = device.slot.mutations();
    let data = image(100, 7);
    let cases = [
        (chunk(8, 1024, &data), OtaError::WrongRollout),
        (chunk(7, 512, &data), OtaError::WrongOffset),
        (chunk(7, 1536, &data), OtaError::WrongOffset),
        (chunk(7, u32::MAX, &data), OtaError::WrongOffset),
        (chunk(7, 1024, &image(513, 8)), OtaError::ChunkTooLarge),
    ];
    for (bad, error) in cases {
        assert_eq!(device.deliver(&bad), Err(error));
        assert_eq!(device.machine.chunk_request(), Some(wanted));
    }
    assert_eq!(device.slot.mutations(), mutations);
    assert_eq!(device.run(&server), OtaOutcome::Confirmed);
    assert_eq!(device.deliver(&chunk(7, 0, &data)), Err(OtaError::NotDownloading));
}

#[test]
fn connection_drop_resumes_at_the_last_offset() {
    let server = small_server();
    let mut device = Device::new();
    device.offer(&server.offer, BATTERY_OK);
    for _ in 0..4 {
        device.serve(&server).unwrap();
    }
    // The link drops: the request in flight is lost.
    device.request = None;
    device.connect();
    assert_eq!(device.request.unwrap().offset, 2048);
    // The server re-offers the same rollout: resume, no re-erase.
    let mutations = device.slot.mutations();
    device.request = None;
    device.offer(&server.offer, BATTERY_OK);
    assert_eq!(device.request.unwrap().offset, 2048);
    assert_eq!(device.slot.mutations(), mutations);
    assert_eq!(device.run(&server), OtaOutcome::Confirmed);
    device.assert_holds(&server.image);
}

#[test]
fn new_rollout_supersedes_download() {
    let first = small_server();
    let second = Server::new(11, image(6000, 9), 700);
    let mut device = Device::new();
    device.offer(&first.offer, BATTERY_OK);
    device.serve(&first).unwrap();
    device.offer(&second.offer, BATTERY_OK);
    assert_eq!(device.result_for(7), Some(OtaOutcome::Superseded));
    assert_eq!(device.request, Some(ChunkRequest { rollout_id: 11, offset: 0, len: 700 }));
    assert_eq!(device.run(&second), OtaOutcome::Confirmed);
    device.assert_holds(&second.image);
}

#[test]
fn invalid_offer_does_not_disturb_download() {
    let server = small_server();
    let mut device = Device::new();
    device.offer(&server.offer, BATTERY_OK);
    device.serve(&server).unwrap();
    let mut forged = Server::new(12, image(100, 10), 512).offer;
    forged.manifest.manifest.image_size = 50;
    refused(&mut device, &forged, BATTERY_OK, OtaOutcome::SignatureInvalid);
    assert_eq!(device.machine.chunk_request().unwrap().offset, 512);
    assert_eq!(device.run(&server), OtaOutcome::Confirmed);
}

#[test]
fn repeated_offer_after_result_resends_it() {
    let server = small_server();
    let mut device = Device::new();
    device.slot.inject_corruption(3, 1);
    device.offer(&server.offer, BATTERY_OK);
    while device.machine.state() == OtaStateKind::Downloading {
        device.serve(&server).unwrap();
    }
    assert_eq!(device.results.len(), 1);
    device.offer(&server.offer, BATTERY_OK);
    assert_eq!(device.results.len(), 2);
    assert_eq!(device.results[0], device.results[1]);
    assert_eq!(device.results[1].outcome, OtaOutcome::DigestMismatch);
    // Once delivered, the same rollout may be tried again from scratch.
    device.acknowledge();
    device.results.clear();
    assert_eq!(device.run(&server), OtaOutcome::Confirmed);
}

/// How the device dies in [`power_loss_at_every_step`].
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Mutation N is torn and the device loses power.
    TornWrite,
    /// Mutation N lands but the device dies before persisting.
    BeforePersist,
}

#[test]
fn power_loss_at_every_step() {
    let server = Server::new(21, image(4500, 11), 400);
    // One prepare and 12 writes per clean run.
    let mutations = {
        let mut device = Device::new();
        assert_eq!(device.run(&server), OtaOutcome::Confirmed);
        device.slot.mutations()
    };
    assert_eq!(mutations, 13);
    for persist_every in [0, 1000] {
        for fault in [Fault::TornWrite, Fault::BeforePersist] {
            for at in 0..mutations {
                let mut device = Device::new();
                let mut cfg = config(OLD, SECURE_VERSION);
                cfg.persist_every = persist_every;
                device.machine = OtaMachine::new(cfg);
                match fault {
                    Fault::TornWrite => device.slot.inject_power_loss(at),
                    Fault::BeforePersist => device.crash_after_mutation = Some(at),
                }
                let outcome = device.run(&server);
                let context = format!("{fault:?} at mutation {at}, persist_every {persist_every}");
                assert_eq!(outcome, OtaOutcome::Confirmed, "{context}");
                device.assert_holds(&server.image);
                assert_eq!(device.boots, 2, "{context}");
                assert_eq!(device.activations, 1, "{context}");
                assert_eq!(device.results.len(), 1, "{context}");
            }
        }
    }
}

#[test]
fn power_loss_during_verification_restarts_it() {
    let server = small_server();
    for steps in 0..17 {
        let mut device = Device::new();
        device.crash_in_verify = Some(steps);
        assert_eq!(device.run(&server), OtaOutcome::Confirmed, "crash after {steps} steps");
        device.assert_holds(&server.image);
    }
}

#[test]
fn torn_write_with_corruption_is_never_accepted() {
    let server = Server::new(22, image(3000, 12), 500);
    for at in 1..7 {
        let mut device = Device::new();
        device.slot.inject_corruption(at, 0x01);
        device.slot.inject_power_loss(at + 1);
        assert_eq!(device.run(&server), OtaOutcome::DigestMismatch, "corrupt write {at}");
        assert_eq!(device.activations, 0);
        // The server tries again with a new rollout: clean this time.
        let retry = Server { offer: OtaOffer { rollout_id: 23, ..server.offer.clone() }, ..server.clone() };
        assert_eq!(device.run(&retry), OtaOutcome::Confirmed);
        device.assert_holds(&retry.image);
    }
}

#[test]
fn stale_record_still_ends_with_the_right_image() {
    let server = small_server();
    let mut device = Device::new();
    device.offer(&server.offer, BATTERY_OK);
    device.serve(&server).unwrap();
    let stale = device.stored.clone();
    for _ in 0..5 {
        device.serve(&server).unwrap();
    }
    // The record store lost its last updates.
    device.stored = stale;
    device.reboot();
    device.connect();
    assert_eq!(device.request.unwrap().offset, 512);
    assert_eq!(device.run(&server), OtaOutcome::Confirmed);
    device.assert_holds(&server.image);
}

#[test]
fn record_lying_about_offset_fails_digest() {
    let server = small_server();
    let mut device = Device::new();
    device.offer(&server.offer, BATTERY_OK);
    device.serve(&server).unwrap();
    let mut record = device.stored_record().unwrap();
    record.offset = 2048;
    let mut buf = [0u8; OTA_RECORD_LEN_MAX];
    device.stored = Some(record.encode(&mut buf).unwrap().to_vec());
    device.reboot();
    assert_eq!(device.run(&server), OtaOutcome::DigestMismatch);
    assert_eq!(device.activations, 0);
}

#[test]
fn unusable_record_is_aborted() {
    let server = small_server();
    let mut device = Device::new();
    device.offer(&server.offer, BATTERY_OK);
    let good = device.stored_record().unwrap();
    let broken: [fn(&mut OtaRecord); 4] = [
        |r| r.manifest.manifest.image_size += 1,
        |r| r.offset = r.manifest.manifest.image_size + 1,
        |r| r.chunk_len = 0,
        |r| {
            r.phase = OtaPhase::ReadyToReboot;
            r.offset = 100;
        },
    ];
    for change in broken {
        let mut record = good.clone();
        change(&mut record);
        let (machine, actions) =
            OtaMachine::resume(config(OLD, SECURE_VERSION), Some(record), BootedImage::Previous);
        assert_eq!(machine.pending_result().map(|r| r.outcome), Some(OtaOutcome::Aborted));
        assert!(
            matches!(actions.persist, Some(Persist::Store(r)) if r.phase == OtaPhase::Finished(OtaOutcome::Aborted))
        );
    }
    // Another chip's firmware (after a wrong flash) refuses it too.
    let c6 = OtaConfig::new(public_key(), Chip::Esp32c6, OLD, 0);
    let (machine, _) = OtaMachine::resume(c6, Some(good), BootedImage::Previous);
    assert_eq!(machine.state(), OtaStateKind::Failed);
}

#[test]
fn slot_read_failure_during_verification() {
    let server = small_server();
    let mut device = Device::new();
    device.offer(&server.offer, BATTERY_OK);
    device.slot.set_reads_fail(true);
    assert_eq!(device.run(&server), OtaOutcome::ReadFailed);
    assert_eq!(device.activations, 0);
}

#[test]
fn slot_write_failure_fails_update() {
    #[derive(Debug)]
    struct Broken;
    impl OtaSlot for Broken {
        type Error = ();
        fn capacity(&self) -> u32 {
            1 << 20
        }
        fn prepare(&mut self, _: u32) -> Result<(), ()> {
            Ok(())
        }
        fn write(&mut self, _: u32, _: &[u8]) -> Result<(), ()> {
            Err(())
        }
        fn read(&mut self, _: u32, _: &mut [u8]) -> Result<(), ()> {
            Err(())
        }
    }
    let server = small_server();
    let mut machine = OtaMachine::new(config(OLD, SECURE_VERSION));
    let _ = machine.on_offer(&server.offer, BATTERY_OK, &mut Broken);
    let actions = machine
        .on_chunk(&server.chunk(machine.chunk_request().unwrap()), &mut Broken)
        .unwrap();
    assert_eq!(actions.send_result.map(|r| r.outcome), Some(OtaOutcome::WriteFailed));
    assert_eq!(machine.state(), OtaStateKind::Failed);
}

#[test]
fn reboot_while_ready_re_verifies() {
    let server = small_server();
    let mut device = Device::new();
    device.auto_reboot = false;
    device.offer(&server.offer, BATTERY_OK);
    while device.machine.state() == OtaStateKind::Downloading {
        device.serve(&server).unwrap();
    }
    assert_eq!(device.machine.state(), OtaStateKind::ReadyToReboot);
    // Watchdog reset before the firmware chose to reboot: verified again.
    device.reboot();
    assert_eq!(device.machine.state(), OtaStateKind::ReadyToReboot);
    assert!(!device.running_update());
    // Bit rot before the next reset: caught by the re-verification.
    device.slot.flip_bit(4321, 2);
    device.reboot();
    assert_eq!(device.machine.pending_result().unwrap().outcome, OtaOutcome::DigestMismatch);
    assert_eq!(device.activations, 0);
}

#[test]
fn self_test_failure_rolls_back() {
    let server = small_server();
    let mut device = Device::new();
    device.self_test_passes = false;
    assert_eq!(device.run(&server), OtaOutcome::SelfTestFailed);
    assert!(!device.running_update());
    assert_eq!(device.secure_version, SECURE_VERSION);
    assert_eq!(device.boots, 2);
    assert_eq!(device.machine.state(), OtaStateKind::Idle);
}

#[test]
fn self_test_failure_survives_a_missed_rollback() {
    let server = small_server();
    let mut device = Device::new();
    device.offer(&server.offer, BATTERY_OK);
    while device.machine.state() == OtaStateKind::Downloading {
        device.serve(&server).unwrap();
    }
    assert!(device.machine.awaiting_self_test());
    let actions = device.machine.self_test_failed().unwrap();
    assert_eq!(actions.send_result, None);
    assert_eq!(actions.boot, Some(BootAction::RollBackAndReboot));
    // Persisted, then the device resets before switching back; the bootloader
    // (no automatic rollback here) boots the update again.
    device.execute(OtaActions { boot: None, ..actions });
    let (_, again) =
        OtaMachine::resume(device.current_config(), device.stored_record(), BootedImage::Updated);
    assert_eq!(again.boot, Some(BootAction::RollBackAndReboot));
    let (machine, quiet) =
        OtaMachine::resume(config(OLD, SECURE_VERSION), device.stored_record(), BootedImage::Previous);
    assert!(quiet.is_empty());
    assert_eq!(machine.on_connected().send_result.unwrap().outcome, OtaOutcome::SelfTestFailed);
}

#[test]
fn bootloader_rollback_is_detected_and_reported() {
    let server = small_server();
    let mut device = Device::new();
    device.offer(&server.offer, BATTERY_OK);
    while device.machine.state() == OtaStateKind::Downloading {
        device.serve(&server).unwrap();
    }
    assert!(device.machine.awaiting_self_test());
    // The new image hangs before confirming; the watchdog resets it and the
    // bootloader rolls back to the previous image.
    device.reboot();
    assert!(!device.running_update());
    assert_eq!(device.machine.state(), OtaStateKind::RolledBack);
    assert!(device.results.is_empty(), "nothing sent before connecting");
    device.connect();
    assert_eq!(
        device.results,
        vec![OtaResult { rollout_id: 7, version: NEW, outcome: OtaOutcome::RolledBack }]
    );
    // The result survives further reboots until delivered.
    device.reboot();
    assert_eq!(device.machine.pending_result().unwrap().outcome, OtaOutcome::RolledBack);
    device.acknowledge();
    assert_eq!(device.stored, None);
}

#[test]
fn offers_while_pending_confirmation_are_busy() {
    let server = small_server();
    let other = Server::new(30, image(1000, 13), 512);
    let mut device = Device::new();
    device.offer(&server.offer, BATTERY_OK);
    while device.machine.state() == OtaStateKind::Downloading {
        device.serve(&server).unwrap();
    }
    assert!(device.machine.awaiting_self_test());
    let mut offer = other.offer.clone();
    offer.manifest = sign(Manifest {
        version: FirmwareVersion { major: 2, minor: 0, patch: 0 },
        ..offer.manifest.manifest
    });
    refused(&mut device, &offer, BATTERY_OK, OtaOutcome::Busy);
    // The same rollout again: nothing to do.
    assert!(
        device
            .machine
            .on_offer(&server.offer, BATTERY_OK, &mut device.slot)
            .is_empty()
    );
}

#[test]
fn calls_in_the_wrong_state_are_refused() {
    let mut machine = OtaMachine::new(config(OLD, SECURE_VERSION));
    let mut slot = MemorySlot::new(vec![0u8; 64]);
    assert_eq!(machine.confirm(), Err(OtaError::InvalidState));
    assert_eq!(machine.self_test_failed(), Err(OtaError::InvalidState));
    assert_eq!(machine.reboot_into_update(), Err(OtaError::InvalidState));
    assert_eq!(machine.abort(), Err(OtaError::InvalidState));
    assert_eq!(machine.result_delivered(), Err(OtaError::InvalidState));
    assert_eq!(machine.verify_step(&mut slot, &mut [0; 8]), Err(OtaError::InvalidState));
    assert!(machine.on_connected().is_empty());
    assert_eq!(machine.progress(), None);
}

#[test]
fn abort_before_reboot() {
    let server = small_server();
    let mut device = Device::new();
    device.offer(&server.offer, BATTERY_OK);
    device.serve(&server).unwrap();
    let actions = device.machine.abort().unwrap();
    assert_eq!(actions.send_result.unwrap().outcome, OtaOutcome::Aborted);
    device.execute(actions);
    assert_eq!(device.machine.state(), OtaStateKind::Failed);
    assert_eq!(device.machine.verify_step(&mut device.slot, &mut []), Err(OtaError::InvalidState));
}

#[test]
fn verify_step_needs_a_buffer() {
    let server = Server::new(5, image(600, 14), 1024);
    let mut device = Device::new();
    device.offer(&server.offer, BATTERY_OK);
    let request = device.request.take().unwrap();
    let actions = device
        .machine
        .on_chunk(&server.chunk(request), &mut device.slot)
        .unwrap();
    assert!(actions.verify);
    assert_eq!(device.machine.state(), OtaStateKind::Verifying);
    assert_eq!(device.machine.verify_step(&mut device.slot, &mut []), Err(OtaError::BufferTooSmall));
    let mut steps = 0;
    while device.machine.state() == OtaStateKind::Verifying {
        let actions = device
            .machine
            .verify_step(&mut device.slot, &mut [0; 7])
            .unwrap();
        steps += 1;
        assert_eq!(actions.verify, device.machine.state() == OtaStateKind::Verifying);
    }
    assert_eq!(steps, 600usize.div_ceil(7));
    assert_eq!(device.machine.state(), OtaStateKind::ReadyToReboot);
}

// ---------------------------------------------------------------------------
// Model test: random event sequences.

/// One thing that can happen to a device.
#[derive(Debug, Clone)]
enum Event {
    /// 0, 1: genuine offers A and B; 2: A tampered; 3: B for another chip.
    Offer(u8),
    /// The server answers the outstanding request correctly.
    Serve,
    /// ... with one bit flipped.
    ServeFlipped(u16),
    /// A chunk at an arbitrary offset, for A's or another rollout.
    Garbage { offset: u32, len: u16, own_rollout: bool },
    /// The last chunk delivered, again.
    Duplicate,
    /// The link comes back.
    Connect,
    /// Power fails during the slot mutation `n` from now.
    PowerLoss(u8),
    /// Reset now.
    Reboot,
    /// A bit of the slot flips (unless a verification is under way).
    BitFlip(u32, u8),
    /// One verification step with a buffer of this size.
    VerifyStep(u16),
    /// The firmware asks to reboot into the update.
    RebootIntoUpdate,
    /// The update's self-test result.
    SelfTest(bool),
    /// The pending result reached the server.
    Deliver,
    /// The firmware gives up.
    Abort,
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        4 => prop_oneof![3 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8), 1 => Just(3u8)]
            .prop_map(Event::Offer),
        60 => Just(Event::Serve),
        2 => any::<u16>().prop_map(Event::ServeFlipped),
        5 => (0u32..2600, 0u16..1100, any::<bool>())
            .prop_map(|(offset, len, own_rollout)| Event::Garbage { offset, len, own_rollout }),
        5 => Just(Event::Duplicate),
        4 => Just(Event::Connect),
        3 => (0u8..4).prop_map(Event::PowerLoss),
        3 => Just(Event::Reboot),
        2 => (0u32..2600, 0u8..8).prop_map(|(offset, bit)| Event::BitFlip(offset, bit)),
        25 => prop_oneof![1 => 1u16..64, 4 => 64u16..1500].prop_map(Event::VerifyStep),
        8 => Just(Event::RebootIntoUpdate),
        8 => prop_oneof![3 => Just(true), 1 => Just(false)].prop_map(Event::SelfTest),
        5 => Just(Event::Deliver),
        1 => Just(Event::Abort),
    ]
}

/// The world of the model test.
struct World {
    servers: [Server; 4],
    device: Device,
    last_chunk: Option<Chunk>,
    pending_verify: bool,
}

impl World {
    fn new(chunk_len: u16) -> Self {
        let a = Server::new(1, image(2000, 21), chunk_len);
        let b = Server::new(2, image(2500, 22), chunk_len);
        let mut tampered = a.clone();
        tampered.offer.rollout_id = 3;
        tampered.offer.manifest.manifest.image_size = 1000;
        let mut other_chip = b.clone();
        other_chip.offer.rollout_id = 4;
        other_chip.offer.manifest =
            sign(Manifest { chip: Chip::Esp32c6, ..b.offer.manifest.manifest.clone() });
        let mut device = Device::with_slot(MemorySlot::new(image(4096, 23)));
        device.auto_reboot = false;
        Self { servers: [a, b, tampered, other_chip], device, last_chunk: None, pending_verify: false }
    }

    fn server_for(&self, rollout_id: u32) -> Option<&Server> {
        self.servers
            .iter()
            .find(|s| s.offer.rollout_id == rollout_id)
    }

    /// Runs one machine call's actions without the test glue's automatic
    /// verification and reboot, checking the safety properties.
    fn apply(&mut self, actions: OtaActions) {
        if self.device.power_failed() {
            return;
        }
        self.pending_verify = actions.verify;
        if actions.boot == Some(BootAction::UpdateReady) {
            let record = self.device.machine.record().unwrap();
            let server = self.server_for(record.rollout_id).unwrap();
            assert!(record.rollout_id <= 2, "only genuine manifests get this far");
            assert_eq!(record.manifest, server.offer.manifest);
            self.device.check_slot_matches_record();
            self.device.assert_holds(&server.image);
        }
        if let Some(result) = actions.send_result {
            assert!(
                result.outcome != OtaOutcome::Confirmed || result.rollout_id <= 2,
                "confirmed a forged rollout"
            );
        }
        self.device.execute(OtaActions { verify: false, ..actions });
    }

    fn step(&mut self, event: Event) {
        if self.device.power_failed() {
            self.reboot();
        }
        match event {
            Event::Offer(index) => {
                let offer = self.servers[usize::from(index)].offer.clone();
                let actions = self
                    .device
                    .machine
                    .on_offer(&offer, BATTERY_OK, &mut self.device.slot);
                self.apply(actions);
            }
            Event::Serve | Event::ServeFlipped(_) => self.serve(event),
            Event::Garbage { offset, len, own_rollout } => {
                let rollout = if own_rollout { self.device.request.map_or(1, |r| r.rollout_id) } else { 9 };
                let data = image(usize::from(len).min(1024), offset);
                self.deliver(chunk(rollout, offset, &data));
            }
            Event::Duplicate => {
                if let Some(last) = self.last_chunk.clone() {
                    self.deliver(last);
                }
            }
            Event::Connect => {
                let actions = self.device.machine.on_connected();
                self.apply(actions);
            }
            Event::PowerLoss(n) => {
                let at = self.device.slot.mutations() + u32::from(n);
                self.device.slot.inject_power_loss(at);
            }
            Event::Reboot => self.reboot(),
            // Bit rot at rest: verification reads each byte once, so the
            // slot must not change under a verification in progress.
            Event::BitFlip(offset, bit) => {
                if self.device.machine.state() != OtaStateKind::Verifying {
                    self.device.slot.flip_bit(offset, bit);
                }
            }
            Event::VerifyStep(len) => {
                let mut buf = vec![0u8; usize::from(len)];
                match self
                    .device
                    .machine
                    .verify_step(&mut self.device.slot, &mut buf)
                {
                    Ok(actions) => self.apply(actions),
                    Err(error) => {
                        assert_eq!(error, OtaError::InvalidState);
                        assert_ne!(self.device.machine.state(), OtaStateKind::Verifying);
                    }
                }
            }
            Event::RebootIntoUpdate => {
                if let Ok(actions) = self.device.machine.reboot_into_update() {
                    self.apply(actions);
                }
            }
            Event::SelfTest(pass) => {
                let result =
                    if pass { self.device.machine.confirm() } else { self.device.machine.self_test_failed() };
                match result {
                    Ok(actions) => self.apply(actions),
                    Err(error) => assert!(!self.device.machine.awaiting_self_test(), "{error}"),
                }
            }
            Event::Deliver => {
                if let Ok(actions) = self.device.machine.result_delivered() {
                    self.apply(actions);
                }
            }
            Event::Abort => {
                if let Ok(actions) = self.device.machine.abort() {
                    self.apply(actions);
                }
            }
        }
        self.check_invariants();
    }

    fn serve(&mut self, event: Event) {
        // A request lost to a reboot is sent again on timeout.
        let pending = self.device.request.take();
        let Some(request) = pending.or_else(|| self.device.machine.chunk_request()) else {
            return;
        };
        let Some(server) = self.server_for(request.rollout_id) else {
            return;
        };
        let mut chunk = server.chunk(request);
        if let (Event::ServeFlipped(bit), false) = (event, chunk.data.is_empty()) {
            let index = usize::from(bit / 8) % chunk.data.len();
            chunk.data[index] ^= 1 << (bit % 8);
        }
        self.deliver(chunk);
    }

    fn deliver(&mut self, chunk: Chunk) {
        let expected = self.device.machine.chunk_request();
        let mutations = self.device.slot.mutations();
        match self.device.machine.on_chunk(&chunk, &mut self.device.slot) {
            Ok(actions) => self.apply(actions),
            Err(_) => {
                assert_eq!(self.device.slot.mutations(), mutations, "refused chunk was written");
                assert_eq!(self.device.machine.chunk_request(), expected);
            }
        }
        self.last_chunk = Some(chunk);
    }

    fn reboot(&mut self) {
        // The world's glue does not verify on its own: resume's actions go
        // through `apply` like any other.
        self.device.slot.power_cycle();
        self.device.crashed = false;
        self.device.request = None;
        self.device.update_boot = match self.device.update_boot {
            Some(ImageState::New) => Some(ImageState::PendingVerify),
            Some(ImageState::PendingVerify) => None,
            other => other,
        };
        let booted = if self.device.running_update() { BootedImage::Updated } else { BootedImage::Previous };
        let (machine, actions) =
            OtaMachine::resume(self.device.current_config(), self.device.stored_record(), booted);
        self.device.machine = machine;
        assert_eq!((actions.send_result, actions.send_request), (None, None));
        self.apply(actions);
    }

    fn check_invariants(&self) {
        let machine = &self.device.machine;
        if let Some(record) = machine.record() {
            assert!(record.offset <= record.manifest.manifest.image_size);
            assert!(record.rollout_id <= 2, "only verified offers are ever recorded");
        }
        if let Some(stored) = self.device.stored_record() {
            assert!(stored.offset <= stored.manifest.manifest.image_size);
        }
        if machine.state() == OtaStateKind::Downloading && !self.device.power_failed() {
            let request = machine.chunk_request().unwrap();
            assert_eq!(request.offset, machine.record().unwrap().offset);
        }
        if self.pending_verify && !self.device.power_failed() {
            assert_eq!(machine.state(), OtaStateKind::Verifying);
        }
    }
}

fn model_cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: model_cases(), ..ProptestConfig::default() })]

    #[test]
    fn random_event_sequences_never_accept_a_bad_image(
        chunk_len in prop_oneof![Just(0u16), 64u16..1100],
        events in prop::collection::vec(event(), 1..200),
    ) {
        let mut world = World::new(chunk_len);
        for event in events {
            world.step(event);
        }
    }
}
