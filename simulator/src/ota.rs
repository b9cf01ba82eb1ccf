//! The OTA rehearsal: the signed synthetic image, what the traps share about
//! the rollout, and each trap's update side — the SDK's [`OtaMachine`] over
//! a slot in RAM plus what its flash and bootloader keep across reboots.
//!
//! [`OtaDevice`] does no I/O: the trap feeds it offers and chunks and carries
//! out the [`OtaActions`] it hands back (messages, reboots), as firmware
//! would. Everything in its "flash" (the persisted [`OtaRecord`], the slot,
//! the image the bootloader trusts, a trial boot, the anti-rollback floor)
//! survives the trap's reboots; the machine itself is rebuilt on every boot
//! with [`OtaMachine::resume`].
//!
//! Memory: a slot (the image size) exists only while an update is
//! downloading, verifying or waiting to reboot, so at most about
//! `max_in_flight` slots exist at once (plus downloads of traps that went to
//! sleep or offline mid-way, until they finish).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Mutex, OnceLock};

use ed25519_dalek::pkcs8::DecodePrivateKey;
use ed25519_dalek::{Signer, SigningKey};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use wildcam_sdk::ota::{
    BootedImage, Chunk, MANIFEST_SIGNING_LEN_MAX, Manifest, ManifestSignature, MemorySlot, OtaActions,
    OtaConfig, OtaError, OtaMachine, OtaOffer, OtaOutcome, OtaPhase, OtaRecord, OtaStateKind, Persist,
    SignedManifest,
};
use wildcam_sdk::protocol::{Chip, FirmwareVersion};

use crate::rng::Rng;
use crate::scenario::{Scenario, parse_version};
use crate::stats::Counters;

/// Size of a trap's OTA slot: larger images are refused (`ImageTooLarge`).
pub const SLOT_BYTES: u32 = 4 * 1_024 * 1_024;
/// Bytes read back per verification step (a flash sector).
const VERIFY_STEP: usize = 4 * 1_024;
/// Anti-rollback floor of the running image at the start.
pub const SECURE_VERSION_FROM: u32 = 1;
/// Secure version of the rolled-out image (confirming it raises the floor).
pub const SECURE_VERSION_TO: u32 = 2;

/// Why the rehearsal could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OtaSetupError {
    /// The key file is missing, unreadable or not a PKCS#8 PEM ed25519 key.
    #[error("[ota] signing_key {path}: {message}")]
    Key {
        /// The file.
        path: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// The scenario's versions do not parse (validation should have refused them).
    #[error("[ota] {0}")]
    Scenario(String),
}

/// Reads the firmware signing key `cargo xtask keygen` writes.
pub fn load_signing_key(path: &Path) -> Result<SigningKey, OtaSetupError> {
    let shown = path.display().to_string();
    let hint = format!(
        "create it with `cargo xtask keygen --out {shown}` and give the fleet server its public key \
         ({shown}.pub) in [ota] signing_keys (or WILDCAM__OTA__SIGNING_KEYS)"
    );
    let pem = std::fs::read_to_string(path).map_err(|error| OtaSetupError::Key {
        path: shown.clone(),
        message: match error.kind() {
            std::io::ErrorKind::NotFound => format!("no such file; {hint}"),
            _ => format!("could not read it: {error}"),
        },
    })?;
    SigningKey::from_pkcs8_pem(&pem).map_err(|error| OtaSetupError::Key {
        path: shown,
        message: format!("not a PKCS#8 PEM ed25519 private key ({error}); {hint}"),
    })
}

/// The image rolled out: synthetic bytes from the seed, and its signed manifest.
#[derive(Clone)]
pub struct Firmware {
    /// The image.
    pub image: Vec<u8>,
    /// Its manifest, signed.
    pub signed: SignedManifest,
    /// The signing public key, as the traps' firmware embeds it.
    pub public_key: [u8; 32],
    /// What the traps run at the start.
    pub from: FirmwareVersion,
}

impl std::fmt::Debug for Firmware {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Firmware")
            .field("size", &self.image.len())
            .field("version", &self.signed.manifest.version)
            .finish_non_exhaustive()
    }
}

impl Firmware {
    /// Loads the scenario's key and builds the image.
    pub fn load(scenario: &Scenario) -> Result<Self, OtaSetupError> {
        let key = load_signing_key(&scenario.ota_signing_key_path())?;
        Self::build(scenario, &key)
    }

    /// The scenario's image (`image_kib` bytes drawn from the seed), signed with `key`.
    pub fn build(scenario: &Scenario, key: &SigningKey) -> Result<Self, OtaSetupError> {
        let ota = &scenario.ota;
        let version = |text: &str| {
            parse_version(text).ok_or_else(|| OtaSetupError::Scenario(format!("bad version {text:?}")))
        };
        let (from, to) = (version(&ota.from_version)?, version(&ota.to_version)?);
        let len = ota.image_kib as usize * 1_024;
        let mut rng = Rng::new(scenario.seed, 0x4F54_4149_4D41_4745);
        let mut image = Vec::with_capacity(len);
        while image.len() < len {
            image.extend_from_slice(&rng.next_u64().to_le_bytes());
        }
        image.truncate(len);
        let manifest = Manifest {
            version: to,
            secure_version: SECURE_VERSION_TO,
            chip: Chip::Host,
            image_size: len as u32,
            image_sha256: Sha256::digest(&image).into(),
            min_battery_mv: ota.min_battery_mv,
        };
        let signed = sign(manifest, key)?;
        Ok(Self { image, signed, public_key: key.verifying_key().to_bytes(), from })
    }

    /// The `X-WildCAM-Manifest` header: standard base64 of the postcard
    /// manifest (what `cargo xtask sign` writes).
    pub fn manifest_header(&self) -> String {
        let file = postcard::to_allocvec(&self.signed).unwrap_or_default();
        base64(&file)
    }

    /// The version rolled out.
    pub fn to(&self) -> FirmwareVersion {
        self.signed.manifest.version
    }
}

/// Signs `manifest` as `cargo xtask sign` does.
fn sign(manifest: Manifest, key: &SigningKey) -> Result<SignedManifest, OtaSetupError> {
    let mut message = [0u8; MANIFEST_SIGNING_LEN_MAX];
    let signing_bytes = manifest
        .signing_bytes(&mut message)
        .map_err(|e| OtaSetupError::Scenario(format!("manifest: {e}")))?;
    let signature = ManifestSignature(key.sign(signing_bytes).to_bytes());
    Ok(SignedManifest { manifest, signature })
}

/// Standard base64 (RFC 4648, padded).
fn base64(bytes: &[u8]) -> String {
    const SYMBOLS: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut text = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for triple in bytes.chunks(3) {
        let mut word = [0u8; 4];
        word[1..1 + triple.len()].copy_from_slice(triple);
        let bits = u32::from_be_bytes(word);
        let symbols = triple.len() + 1;
        for k in 0..4 {
            if k < symbols {
                text.push(char::from(SYMBOLS[((bits >> (18 - 6 * k)) & 63) as usize]));
            } else {
                text.push('=');
            }
        }
    }
    text
}

/// The rollout, once the engine created it.
#[derive(Debug, Clone, Copy)]
pub struct RolloutStart {
    /// The server's rollout id.
    pub id: u32,
    /// When it was created (real time).
    pub at: Instant,
    /// When it was created (virtual ms since the Unix epoch).
    pub at_virtual_ms: u64,
}

/// What the traps share about the rehearsal.
#[derive(Debug)]
pub struct OtaShared {
    /// The firmware signing public key the traps trust.
    pub public_key: [u8; 32],
    /// What they run at the start.
    pub from: FirmwareVersion,
    /// Set when the rollout exists.
    pub rollout: OnceLock<RolloutStart>,
    /// The rollout is over as far as the server is concerned (completed,
    /// paused, aborted) or could not be created: targets stop waiting for
    /// an offer.
    pub settled: AtomicBool,
    /// Counters.
    pub counters: OtaCounters,
    /// The last outcome delivered: real and virtual time.
    last_outcome: Mutex<Option<(Instant, u64)>>,
    /// Why the rollout could not be created.
    error: Mutex<Option<String>>,
}

impl OtaShared {
    /// For a run rolling out `firmware`.
    pub fn new(firmware: &Firmware) -> Self {
        Self {
            public_key: firmware.public_key,
            from: firmware.from,
            rollout: OnceLock::new(),
            settled: AtomicBool::new(false),
            counters: OtaCounters::default(),
            last_outcome: Mutex::new(None),
            error: Mutex::new(None),
        }
    }

    /// The rollout could not be created: nothing to wait for.
    pub fn fail(&self, error: String) {
        if let Ok(mut slot) = self.error.lock() {
            *slot = Some(error);
        }
        self.settled
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Why the rollout could not be created, if it could not.
    pub fn error(&self) -> Option<String> {
        self.error.lock().ok().and_then(|e| e.clone())
    }

    /// A trap delivered `outcome` at virtual `at_ms`.
    pub fn outcome_delivered(&self, outcome: OtaOutcome, at_ms: u64) {
        let c = &self.counters;
        Counters::add(&c.results, 1);
        match outcome {
            OtaOutcome::Confirmed => Counters::add(&c.confirmed, 1),
            OtaOutcome::SelfTestFailed => Counters::add(&c.self_test_failed, 1),
            OtaOutcome::RolledBack => Counters::add(&c.rolled_back, 1),
            other => {
                if let Ok(mut failed) = c.failed.lock() {
                    *failed.entry(format!("{other:?}")).or_default() += 1;
                }
            }
        }
        if let Ok(mut last) = self.last_outcome.lock() {
            *last = Some((Instant::now(), at_ms));
        }
    }

    /// Real and virtual time of the last outcome delivered.
    pub fn last_outcome(&self) -> Option<(Instant, u64)> {
        self.last_outcome.lock().ok().and_then(|l| *l)
    }
}

/// Fleet-wide OTA counters.
#[derive(Debug, Default)]
pub struct OtaCounters {
    /// Offers received (repeats included).
    pub offers: AtomicU64,
    /// Chunk requests sent (retries included).
    pub chunk_requests: AtomicU64,
    /// Chunk requests that got no chunk in time and were sent again.
    pub chunk_timeouts: AtomicU64,
    /// Chunks accepted.
    pub chunks: AtomicU64,
    /// Chunks refused (stale duplicates, wrong offset).
    pub chunks_refused: AtomicU64,
    /// Image bytes written to slots.
    pub bytes: AtomicU64,
    /// Downloads picked up again after a reboot at a persisted offset above 0.
    pub resumed: AtomicU64,
    /// Reboots into a new image.
    pub activations: AtomicU64,
    /// Results delivered (one per trap and rollout).
    pub results: AtomicU64,
    /// Confirmed.
    pub confirmed: AtomicU64,
    /// Rolled back after a failed self-test.
    pub self_test_failed: AtomicU64,
    /// Rolled back by the bootloader (killed before confirming).
    pub rolled_back: AtomicU64,
    /// Other outcomes, by name.
    pub failed: Mutex<BTreeMap<String, u64>>,
}

/// What the bootloader boots after an ActivateAndReboot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Trial {
    version: FirmwareVersion,
    /// It booted once already: another reset before it is marked valid
    /// rolls it back.
    booted: bool,
}

/// A trap's update side.
#[derive(Debug)]
pub struct OtaDevice {
    public_key: [u8; 32],
    machine: OtaMachine,
    running: FirmwareVersion,
    // Flash: survives reboots.
    record: Option<OtaRecord>,
    slot: Option<MemorySlot<Vec<u8>>>,
    valid: FirmwareVersion,
    trial: Option<Trial>,
    secure_version: u32,
}

/// What a boot did.
#[derive(Debug)]
pub struct Boot {
    /// The machine's local actions (persist, verify).
    pub actions: OtaActions,
    /// A download picks up at a persisted offset above 0.
    pub resumed_download: bool,
    /// The bootloader rolled an unconfirmed image back.
    pub rolled_back: bool,
}

impl OtaDevice {
    /// A trap running `version` with nothing persisted.
    pub fn new(public_key: [u8; 32], version: FirmwareVersion) -> Self {
        let config = OtaConfig::new(public_key, Chip::Host, version, SECURE_VERSION_FROM);
        Self {
            public_key,
            machine: OtaMachine::new(config),
            running: version,
            record: None,
            slot: None,
            valid: version,
            trial: None,
            secure_version: SECURE_VERSION_FROM,
        }
    }

    /// The running firmware's version (the hello's).
    pub fn running(&self) -> FirmwareVersion {
        self.running
    }

    /// The anti-rollback floor (the hello's secure version).
    pub fn secure_version(&self) -> u32 {
        self.secure_version
    }

    /// The state machine.
    pub fn machine(&self) -> &OtaMachine {
        &self.machine
    }

    /// Bytes held by the slot, if one exists.
    pub fn slot_bytes(&self) -> usize {
        self.slot.as_ref().map_or(0, |s| s.contents().len())
    }

    /// An update is in progress or a result is still to be delivered.
    pub fn busy(&self) -> bool {
        self.machine.state() != OtaStateKind::Idle
    }

    /// An offer arrived; `battery_mv` is the trap's battery.
    pub fn on_offer(&mut self, offer: &OtaOffer, battery_mv: u16) -> OtaActions {
        let slot = self.slot.get_or_insert_with(|| {
            let size = offer.manifest.manifest.image_size;
            // A slot of SLOT_BYTES: an image that does not fit is refused.
            let len = if size <= SLOT_BYTES { size as usize } else { 0 };
            MemorySlot::new(vec![0u8; len])
        });
        let actions = self.machine.on_offer(offer, battery_mv, slot);
        self.release_slot();
        actions
    }

    /// A chunk arrived.
    pub fn on_chunk(&mut self, chunk: &Chunk) -> Result<OtaActions, OtaError> {
        let slot = self.slot.as_mut().ok_or(OtaError::NotDownloading)?;
        let actions = self.machine.on_chunk(chunk, slot)?;
        self.release_slot();
        Ok(actions)
    }

    /// Verifies to the end (reads the slot back in 4 KiB steps); the
    /// actions after the last step.
    pub fn verify(&mut self) -> OtaActions {
        let mut buf = vec![0u8; VERIFY_STEP];
        let actions = loop {
            let Some(slot) = self.slot.as_mut() else {
                break OtaActions::default();
            };
            match self.machine.verify_step(slot, &mut buf) {
                Ok(step) if step.verify && step.persist.is_none() && step.boot.is_none() => {}
                Ok(step) => break step,
                Err(_) => break OtaActions::default(),
            }
        };
        self.release_slot();
        actions
    }

    /// Stores or clears the record (flash).
    pub fn persist(&mut self, persist: Persist) {
        self.record = match persist {
            Persist::Store(record) => Some(record),
            Persist::Clear => None,
        };
    }

    /// Marks the running image valid: the bootloader keeps it.
    pub fn mark_valid(&mut self) {
        self.valid = self.running;
        self.trial = None;
    }

    /// Raises the anti-rollback floor.
    pub fn raise_secure_version(&mut self, floor: u32) {
        self.secure_version = self.secure_version.max(floor);
    }

    /// Verified and ready: persist PendingConfirmation and activate.
    pub fn reboot_into_update(&mut self) -> OtaActions {
        self.machine.reboot_into_update().unwrap_or_default()
    }

    /// The self-test passed.
    pub fn confirm(&mut self) -> OtaActions {
        self.machine.confirm().unwrap_or_default()
    }

    /// The self-test failed.
    pub fn self_test_failed(&mut self) -> OtaActions {
        self.machine.self_test_failed().unwrap_or_default()
    }

    /// The pending result reached the server; the outcome it carried.
    pub fn result_delivered(&mut self) -> Option<(OtaOutcome, OtaActions)> {
        let outcome = self.machine.pending_result()?.outcome;
        let actions = self.machine.result_delivered().ok()?;
        Some((outcome, actions))
    }

    /// `ActivateAndReboot`: the updated slot becomes the boot slot, on
    /// trial (the next boot runs it; a reset before it is marked valid rolls
    /// it back). The slot's bytes are the image now: the RAM is released.
    pub fn activate(&mut self) {
        if let Some(record) = &self.record {
            self.trial = Some(Trial { version: record.manifest.manifest.version, booted: false });
        }
        self.slot = None;
    }

    /// `RollBackAndReboot`: the running image is marked invalid.
    pub fn roll_back(&mut self) {
        self.trial = None;
    }

    /// A reset: the bootloader picks the image, the machine is rebuilt from
    /// the persisted record.
    pub fn power_on(&mut self) -> Boot {
        let mut rolled_back = false;
        let booted = match self.trial {
            Some(Trial { version, booted: false }) => {
                self.trial = Some(Trial { version, booted: true });
                self.running = version;
                BootedImage::Updated
            }
            Some(Trial { booted: true, .. }) => {
                // Never marked valid: the bootloader goes back.
                self.trial = None;
                rolled_back = true;
                self.running = self.valid;
                BootedImage::Previous
            }
            None => {
                self.running = self.valid;
                BootedImage::Previous
            }
        };
        let config = OtaConfig::new(self.public_key, Chip::Host, self.running, self.secure_version);
        let resumed_download = self
            .record
            .as_ref()
            .is_some_and(|r| r.phase == OtaPhase::Downloading && r.offset > 0);
        let (machine, actions) = OtaMachine::resume(config, self.record.clone(), booted);
        self.machine = machine;
        self.release_slot();
        Boot { actions, resumed_download, rolled_back }
    }

    /// Frees the slot once no update needs it.
    fn release_slot(&mut self) {
        let needed = matches!(
            self.machine.record().map(|r| r.phase),
            Some(OtaPhase::Downloading | OtaPhase::Verifying | OtaPhase::ReadyToReboot)
        );
        if !needed {
            self.slot = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use wildcam_sdk::ota::BootAction;

    use super::*;

    fn scenario(kib: u32) -> Scenario {
        let text = format!(
            "name = \"ota\"\nseed = 5\n[ota]\nenabled = true\nsigning_key = \"k\"\nimage_kib = {kib}\n"
        );
        Scenario::parse(&text, "").unwrap()
    }

    fn firmware(kib: u32) -> Firmware {
        Firmware::build(&scenario(kib), &SigningKey::from_bytes(&[7; 32])).unwrap()
    }

    fn offer(firmware: &Firmware) -> OtaOffer {
        OtaOffer { rollout_id: 3, manifest: firmware.signed.clone(), chunk_len: 1_024 }
    }

    /// Serves chunk requests from `image` until the machine stops asking;
    /// `limit` chunks at most. The last actions.
    fn download(device: &mut OtaDevice, image: &[u8], mut actions: OtaActions, limit: usize) -> OtaActions {
        for _ in 0..limit {
            let Some(request) = actions.send_request else {
                return actions;
            };
            let start = request.offset as usize;
            let data = &image[start..start + usize::from(request.len)];
            let chunk = Chunk {
                rollout_id: 3,
                offset: request.offset,
                data: heapless::Vec::from_slice(data).unwrap(),
            };
            actions = device.on_chunk(&chunk).unwrap();
            if let Some(persist) = actions.persist.clone() {
                device.persist(persist);
            }
        }
        actions
    }

    #[test]
    fn the_image_is_deterministic_and_its_manifest_verifies() {
        let a = firmware(3);
        let b = firmware(3);
        assert_eq!(a.image, b.image);
        assert_eq!(a.image.len(), 3 * 1_024);
        assert_eq!(a.signed.verify(&a.public_key), Ok(&a.signed.manifest));
        assert_eq!(a.to(), FirmwareVersion { major: 1, minor: 1, patch: 0 });
        assert_eq!(a.from, FirmwareVersion { major: 1, minor: 0, patch: 0 });
        let other = Firmware::build(&scenario(3), &SigningKey::from_bytes(&[8; 32])).unwrap();
        assert_eq!(other.image, a.image);
        assert_ne!(other.public_key, a.public_key);
    }

    #[test]
    fn base64_is_standard_and_padded() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(&[0xfb, 0xff]), "+/8=");
    }

    #[test]
    fn a_missing_or_bad_key_file_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fw.key");
        let error = load_signing_key(&path).unwrap_err().to_string();
        assert!(error.contains("no such file") && error.contains("cargo xtask keygen --out"), "{error}");
        std::fs::write(&path, "not a key").unwrap();
        let error = load_signing_key(&path).unwrap_err().to_string();
        assert!(error.contains("PKCS#8"), "{error}");
    }

    #[test]
    fn a_download_cut_by_reboots_resumes_at_its_persisted_offset_and_confirms() {
        let firmware = firmware(8);
        let mut device = OtaDevice::new(firmware.public_key, firmware.from);
        let mut actions = device.on_offer(&offer(&firmware), 4_000);
        device.persist(actions.persist.take().unwrap());
        assert_eq!(device.slot_bytes(), 8 * 1_024);
        let actions = download(&mut device, &firmware.image, actions, 3);
        assert_eq!(actions.send_request.map(|r| r.offset), Some(3 * 1_024));

        // Power lost: the record and the slot survive, the download goes on from 3 KiB.
        let boot = device.power_on();
        assert!(boot.resumed_download && !boot.rolled_back);
        assert_eq!(device.running(), firmware.from);
        let again = device.machine().on_connected();
        assert_eq!(again.send_request.map(|r| r.offset), Some(3 * 1_024));
        let actions = download(&mut device, &firmware.image, again, 100);
        assert!(actions.verify);
        let ready = device.verify();
        assert_eq!(ready.boot, Some(BootAction::UpdateReady));
        device.persist(ready.persist.unwrap());
        let activate = device.reboot_into_update();
        assert_eq!(activate.boot, Some(BootAction::ActivateAndReboot));
        device.persist(activate.persist.unwrap());
        device.activate();
        assert_eq!(device.slot_bytes(), 0, "the slot is released once activated");

        let boot = device.power_on();
        assert!(!boot.rolled_back);
        assert_eq!(device.running(), firmware.to());
        assert!(device.machine().awaiting_self_test());
        let confirmed = device.confirm();
        assert!(confirmed.mark_valid);
        device.mark_valid();
        device.raise_secure_version(confirmed.raise_secure_version.unwrap());
        device.persist(confirmed.persist.unwrap());
        assert_eq!(device.secure_version(), SECURE_VERSION_TO);
        let (outcome, clear) = device.result_delivered().unwrap();
        assert_eq!(outcome, OtaOutcome::Confirmed);
        device.persist(clear.persist.unwrap());
        assert!(!device.busy());
        // A later reset keeps the new image.
        device.power_on();
        assert_eq!(device.running(), firmware.to());
    }

    #[test]
    fn a_reset_before_confirming_rolls_back() {
        let firmware = firmware(2);
        let mut device = OtaDevice::new(firmware.public_key, firmware.from);
        let mut actions = device.on_offer(&offer(&firmware), u16::MAX);
        device.persist(actions.persist.take().unwrap());
        assert!(download(&mut device, &firmware.image, actions, 100).verify);
        let ready = device.verify();
        device.persist(ready.persist.unwrap());
        let activate = device.reboot_into_update();
        device.persist(activate.persist.unwrap());
        device.activate();
        device.power_on();
        assert_eq!(device.running(), firmware.to());
        // Killed before the self-test: the bootloader goes back.
        let boot = device.power_on();
        assert!(boot.rolled_back);
        assert_eq!(device.running(), firmware.from);
        device.persist(boot.actions.persist.unwrap());
        let result = device.machine().on_connected().send_result.unwrap();
        assert_eq!(result.outcome, OtaOutcome::RolledBack);
    }

    #[test]
    fn an_image_larger_than_the_slot_is_refused_without_allocating_it() {
        let firmware = firmware(2);
        let mut manifest = firmware.signed.manifest.clone();
        manifest.image_size = SLOT_BYTES + 1;
        let mut big = offer(&firmware);
        big.manifest = sign(manifest, &SigningKey::from_bytes(&[7; 32])).unwrap();
        let mut device = OtaDevice::new(firmware.public_key, firmware.from);
        let actions = device.on_offer(&big, u16::MAX);
        assert_eq!(actions.send_result.map(|r| r.outcome), Some(OtaOutcome::ImageTooLarge));
        assert_eq!(device.slot_bytes(), 0);
        assert!(!device.busy(), "a refused offer leaves nothing to report later");
    }
}
