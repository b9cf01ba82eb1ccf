//! Firmware updates over the air: the SDK's [`OtaMachine`] wired to the
//! board's boot control, the inactive slot and the trap's state journal.
//!
//! The board provides two things:
//!
//! - [`BootControl`]: which image booted, the running version, and the
//!   bootloader operations (activate the updated slot as pending
//!   verification, mark the running image valid, roll back), plus
//!   [`Restart`].
//! - An [`OtaSlot`] over the inactive slot, usually a [`NorFlashSlot`].
//!
//! [`Ota`] owns the machine and carries out its actions in order: the
//! record and the anti-rollback floor are persisted in the trap's
//! [`crate::storage::DeviceState`], the messages for the server come back
//! as an [`OtaStep`] for the session to seal and publish, verification reads
//! the slot back, and the boot actions switch the slot and ask for a
//! restart. The session (`session.rs`) owns the timing: chunk request
//! timeouts and retries, the self-test after a connection, delivery of the
//! result (the broker's PUBACK).
//!
//! # Self-test
//!
//! A new image proves itself when the trap opened its storage without error
//! and connected to its fleet server as itself (credentials accepted,
//! downlinks subscribed, hello sent), and the board's own check
//! ([`BootControl::board_self_test`]) passes, within [`SELF_TEST_TIMEOUT`].
//! Then the machine confirms it (marked valid, floor raised, `Confirmed`
//! reported); otherwise it persists `SelfTestFailed` and rolls back, and the
//! previous image reports it on its next connection. An image that dies
//! before either (a hang, a crash, a power cut) is rolled back by the
//! bootloader; the previous image finds the record still pending
//! confirmation and reports `RolledBack`.

use core::fmt::{self, Debug};
use core::ops::Range;

use embedded_storage::nor_flash::{MultiwriteNorFlash, NorFlashError, NorFlashErrorKind};
use wildcam_sdk::ota::{
    BootAction, BootedImage, ChunkRequest, OtaActions, OtaConfig, OtaError, OtaMachine, OtaProgress,
    OtaRecord, OtaResult, OtaSlot, OtaStateKind, Persist,
};
use wildcam_sdk::protocol::{FirmwareVersion, OtaChunk, OtaOffer};

use crate::error::TrapError;
use crate::hardware::Restart;
use crate::storage::StateStore;
use crate::trap::Trap;
use wildcam_sdk::queue::QueueStore;

/// How long a new image may take to prove itself (see the module docs).
pub const SELF_TEST_TIMEOUT: embassy_time::Duration = embassy_time::Duration::from_secs(300);
/// The record is persisted after at least this many new image bytes (and at
/// every phase change): a power cut redoes at most this much, and a
/// 900 KiB image costs about 60 state journal writes.
pub const PERSIST_EVERY: u32 = 16 * 1024;
/// A progress report goes out after at least this many new image bytes.
pub const PROGRESS_EVERY: u32 = 64 * 1024;
/// Bytes read back per verification step.
const VERIFY_STEP_LEN: usize = 1_024;

/// The board's bootloader interface (ESP: `otadata` through
/// esp-bootloader-esp-idf; host: a file standing in for it).
pub trait BootControl: Restart {
    /// What went wrong; only logged.
    type Error: Debug;

    /// The version of the image running now.
    fn running_version(&self) -> FirmwareVersion;

    /// Which image runs, given the record persisted before the switch
    /// (phase pending confirmation or a self-test failure): the update it
    /// installed, or the previous image (the bootloader rolled back, or the
    /// switch never happened). By default: the update when the running
    /// version is the manifest's (offers of the running version are refused,
    /// so only the update can have it).
    fn booted_image(&mut self, record: &OtaRecord) -> BootedImage {
        if self.running_version() == record.manifest.manifest.version {
            BootedImage::Updated
        } else {
            BootedImage::Previous
        }
    }

    /// Makes the inactive slot, which holds the verified image of `record`,
    /// the boot slot in state "new" (pending verification: the bootloader
    /// rolls back if the image never confirms itself). A restart follows.
    fn activate_update(&mut self, record: &OtaRecord) -> Result<(), Self::Error>;

    /// Marks the running image valid (cancels the rollback). Called after
    /// every passed self-test: a no-op when the image is valid already.
    fn mark_valid(&mut self) -> Result<(), Self::Error>;

    /// Marks the running image invalid and selects the previous one. A
    /// restart follows.
    fn roll_back(&mut self) -> Result<(), Self::Error>;

    /// The board's own part of the self-test (peripherals, ...); `Err` with
    /// a reason fails it.
    fn board_self_test(&mut self) -> Result<(), &'static str> {
        Ok(())
    }
}

/// An OTA downlink, opened and decoded. A chunk is the one chunk buffer:
/// it lives for one downlink, on the stack (there is no allocator to box it).
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OtaDownlink {
    /// An update is offered.
    Offer(OtaOffer),
    /// Image bytes.
    Chunk(OtaChunk),
}

/// What the session must do after an OTA event: publish these (in field
/// order), then restart if asked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use]
pub struct OtaStep {
    /// The outcome of a rollout.
    pub result: Option<OtaResult>,
    /// How far the update is.
    pub progress: Option<OtaProgress>,
    /// The next chunk wanted.
    pub request: Option<ChunkRequest>,
    /// Disconnect and call [`Ota::restart`]: the boot slot was switched.
    pub restart: bool,
}

impl OtaStep {
    /// Nothing to send, no restart.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// The trap's update driver (see the module docs).
pub struct Ota<'h, B, O> {
    machine: OtaMachine,
    boot: &'h mut B,
    slot: &'h mut O,
    /// Offset of the last progress report.
    reported_offset: u32,
    /// The self-test passed since boot.
    tested: bool,
}

impl<B, O> fmt::Debug for Ota<'_, B, O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ota")
            .field("state", &self.machine.state())
            .field("record", &self.machine.record())
            .finish_non_exhaustive()
    }
}

impl<'h, B: BootControl, O: OtaSlot> Ota<'h, B, O> {
    /// Rebuilds the machine from the record the trap persisted and carries
    /// out what that needs locally: finishing a verification, switching to
    /// a verified image, rolling back a failed one. When the step says
    /// `restart`, restart ([`Ota::restart`]) before connecting.
    pub fn start<Q: QueueStore, S: StateStore>(
        trap: &mut Trap<Q, S>,
        boot: &'h mut B,
        slot: &'h mut O,
    ) -> (Self, OtaStep) {
        let config = ota_config(trap);
        if config.signing_public_key == NO_KEY {
            log::warn!("no firmware signing key built in: every OTA offer is refused");
        }
        let record = trap.ota_state().record.clone();
        let booted = record
            .as_ref()
            .map_or(BootedImage::Previous, |record| boot.booted_image(record));
        if let Some(record) = &record {
            log::info!("OTA record: rollout {} {:?}, booted {booted:?}", record.rollout_id, record.phase);
        }
        let (machine, actions) = OtaMachine::resume(config, record, booted);
        let mut ota = Self { machine, boot, slot, reported_offset: 0, tested: false };
        if ota.awaiting_self_test() {
            log::info!(
                "new firmware image: self-test, reaching the fleet server within {} s",
                SELF_TEST_TIMEOUT.as_secs()
            );
        }
        let step = match ota.execute(trap, actions) {
            // Nothing to send before a connection: `on_connected` says it.
            Ok(step) => OtaStep { restart: step.restart, ..OtaStep::default() },
            Err(error) => {
                log::error!("OTA: resuming failed: {error}");
                OtaStep::default()
            }
        };
        (ota, step)
    }

    /// The machine's coarse state.
    pub fn state(&self) -> OtaStateKind {
        self.machine.state()
    }

    /// The machine (for reports and tests).
    pub fn machine(&self) -> &OtaMachine {
        &self.machine
    }

    /// Whether the running image is an update that must prove itself.
    pub fn awaiting_self_test(&self) -> bool {
        self.machine.awaiting_self_test()
    }

    /// A connection is up: the pending result, a progress report and the
    /// next chunk request.
    pub fn on_connected(&mut self) -> OtaStep {
        let actions = self.machine.on_connected();
        let progress = match self.machine.state() {
            OtaStateKind::Downloading | OtaStateKind::Verifying => self.machine.progress(),
            _ => None,
        };
        if let Some(progress) = progress {
            self.reported_offset = progress.offset;
        }
        OtaStep { result: actions.send_result, progress, request: actions.send_request, restart: false }
    }

    /// The chunk the machine wants (to ask again after a timeout).
    pub fn chunk_request(&self) -> Option<ChunkRequest> {
        self.machine.chunk_request()
    }

    /// An offer or a chunk arrived; `battery_mv` is the current reading (0:
    /// no gauge, the battery check is skipped).
    pub fn on_downlink<Q: QueueStore, S: StateStore>(
        &mut self,
        trap: &mut Trap<Q, S>,
        message: &OtaDownlink,
        battery_mv: u16,
    ) -> Result<OtaStep, TrapError> {
        match message {
            OtaDownlink::Offer(offer) => {
                let battery_mv = if battery_mv == 0 { u16::MAX } else { battery_mv };
                log::info!(
                    "OTA offer: rollout {} version {}.{}.{}, {} bytes",
                    offer.rollout_id,
                    offer.manifest.manifest.version.major,
                    offer.manifest.manifest.version.minor,
                    offer.manifest.manifest.version.patch,
                    offer.manifest.manifest.image_size
                );
                let actions = self.machine.on_offer(offer, battery_mv, self.slot);
                if actions.send_request.is_some() {
                    self.reported_offset = 0;
                }
                self.execute(trap, actions)
            }
            OtaDownlink::Chunk(chunk) => match self.machine.on_chunk(chunk, self.slot) {
                Ok(actions) => self.execute(trap, actions),
                Err(error) => Ok(self.refused_chunk(chunk, error)),
            },
        }
    }

    /// A refused chunk: ask again for a gap, ignore stale duplicates and
    /// other rollouts' chunks.
    fn refused_chunk(&self, chunk: &OtaChunk, error: OtaError) -> OtaStep {
        let wanted = self.machine.chunk_request();
        let ask_again = match (error, wanted) {
            (OtaError::WrongOffset, Some(wanted)) => chunk.offset > wanted.offset,
            (OtaError::ChunkTooLarge | OtaError::ChunkOverflow, Some(_)) => true,
            _ => false,
        };
        log::warn!("OTA: refused a chunk at {} ({error})", chunk.offset);
        OtaStep { request: wanted.filter(|_| ask_again), ..OtaStep::default() }
    }

    /// The connection reached the server as the trap: the self-test of a new
    /// image (see the module docs). The first time it passes after a boot,
    /// the running image is marked valid even without an update record (an
    /// image installed some other way confirms itself too).
    pub fn on_server_reached<Q: QueueStore, S: StateStore>(
        &mut self,
        trap: &mut Trap<Q, S>,
    ) -> Result<OtaStep, TrapError> {
        if self.tested {
            return Ok(OtaStep::default());
        }
        let verdict = if trap.storage_sane() { self.boot.board_self_test() } else { Err("storage errors") };
        self.tested = verdict.is_ok();
        if !self.awaiting_self_test() {
            if verdict.is_ok()
                && let Err(error) = self.boot.mark_valid()
            {
                log::debug!("could not mark the image valid: {error:?}");
            }
            return Ok(OtaStep::default());
        }
        let actions = match verdict {
            Ok(()) => {
                log::info!("self-test passed: confirming the firmware image");
                self.machine.confirm()
            }
            Err(reason) => {
                log::error!("self-test failed ({reason}): rolling back to the previous firmware");
                self.machine.self_test_failed()
            }
        };
        match actions {
            Ok(actions) => self.execute(trap, actions),
            Err(_) => Ok(OtaStep::default()),
        }
    }

    /// The self-test ran out of time (no connection as the trap): roll back.
    pub fn self_test_timed_out<Q: QueueStore, S: StateStore>(&mut self, trap: &mut Trap<Q, S>) -> OtaStep {
        log::error!("self-test failed: the fleet server was not reached in time; rolling back");
        let step = self
            .machine
            .self_test_failed()
            .map_err(TrapError::from)
            .and_then(|actions| self.execute(trap, actions));
        match step {
            Ok(step) => step,
            Err(error) => {
                // The record could not be stored: roll back all the same;
                // the previous image reports what the record says.
                log::error!("OTA: {error}");
                self.roll_back();
                OtaStep { restart: true, ..OtaStep::default() }
            }
        }
    }

    /// The pending result reached the broker: forget the update.
    pub fn result_delivered<Q: QueueStore, S: StateStore>(
        &mut self,
        trap: &mut Trap<Q, S>,
    ) -> Result<(), TrapError> {
        if let Ok(actions) = self.machine.result_delivered() {
            log::info!("OTA result delivered");
            let _ = self.execute(trap, actions)?;
        }
        Ok(())
    }

    /// Restarts into whatever the boot slot now is.
    pub fn restart(&mut self) -> ! {
        self.boot.restart()
    }

    /// Carries out `actions` in field order; stops before the boot actions
    /// if persisting fails.
    fn execute<Q: QueueStore, S: StateStore>(
        &mut self,
        trap: &mut Trap<Q, S>,
        mut actions: OtaActions,
    ) -> Result<OtaStep, TrapError> {
        let mut step = OtaStep::default();
        loop {
            if actions.mark_valid
                && let Err(error) = self.boot.mark_valid()
            {
                log::error!("could not mark the firmware image valid: {error:?}");
            }
            let floor = actions.raise_secure_version;
            let record = match actions.persist.take() {
                Some(Persist::Store(record)) => Some(Some(record)),
                Some(Persist::Clear) => Some(None),
                None => None,
            };
            if floor.is_some() || record.is_some() {
                trap.update_ota_state(|state| {
                    if let Some(floor) = floor {
                        state.secure_version = state.secure_version.max(floor);
                    }
                    if let Some(record) = record {
                        state.record = record;
                    }
                })?;
            }
            if let Some(result) = actions.send_result {
                log::info!("OTA result: rollout {} {:?}", result.rollout_id, result.outcome);
                step.result = Some(result);
            }
            if let Some(request) = actions.send_request {
                step.request = Some(request);
                if request.offset >= self.reported_offset.saturating_add(PROGRESS_EVERY) {
                    step.progress = self.machine.progress();
                    self.reported_offset = request.offset;
                }
            }
            if actions.verify {
                actions = self.verify()?;
                continue;
            }
            match actions.boot {
                Some(BootAction::UpdateReady) => {
                    log::info!("OTA image verified: rebooting into it");
                    step.progress = self.machine.progress();
                    actions = self.machine.reboot_into_update()?;
                    continue;
                }
                Some(BootAction::ActivateAndReboot) => {
                    if let Some(record) = self.machine.record()
                        && let Err(error) = self.boot.activate_update(record)
                    {
                        // The record says pending: the unchanged boot slot
                        // is reported as a rollback after the restart.
                        log::error!("could not activate the updated slot: {error:?}");
                    }
                    step.restart = true;
                }
                Some(BootAction::RollBackAndReboot) => {
                    self.roll_back();
                    step.restart = true;
                }
                None => {}
            }
            return Ok(step);
        }
    }

    fn roll_back(&mut self) {
        if let Err(error) = self.boot.roll_back() {
            log::error!("rollback failed: {error:?}");
        }
    }

    /// Reads the whole image back and checks it.
    fn verify(&mut self) -> Result<OtaActions, TrapError> {
        let mut buf = [0u8; VERIFY_STEP_LEN];
        loop {
            let actions = self.machine.verify_step(self.slot, &mut buf)?;
            if !actions.verify {
                return Ok(actions);
            }
        }
    }
}

/// The key an image without a built-in signing key uses: a small-order
/// point, which strict verification refuses for every signature.
const NO_KEY: [u8; 32] = [0; 32];

/// The trap's update policy: its chip, running version and floor, and the
/// signing key built into the firmware.
pub fn ota_config<Q: QueueStore, S: StateStore>(trap: &Trap<Q, S>) -> OtaConfig {
    let identity = trap.identity();
    let mut config = OtaConfig::new(
        identity.ota_public_key.unwrap_or(NO_KEY),
        identity.chip,
        identity.firmware,
        trap.secure_version(),
    );
    config.persist_every = PERSIST_EVERY;
    config
}

impl From<OtaError> for TrapError {
    fn from(error: OtaError) -> Self {
        Self::Ota(error)
    }
}

// ------------------------------------------------------------------ slot

/// Why a [`NorFlashSlot`] operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotError {
    /// The access goes past the end of the slot.
    OutOfBounds,
    /// The flash refused it.
    Flash(NorFlashErrorKind),
}

/// Largest flash word (write or read size) [`NorFlashSlot`] handles.
const WORD_MAX: usize = 32;

/// An [`OtaSlot`] over a range of NOR flash (the inactive app partition).
///
/// Erasing is lazy: a write erases each sector that *starts* inside it, so
/// the image is written sequentially over freshly erased sectors, no
/// sector is erased twice per image, and bytes durably written before the
/// offset a download resumes from are never erased again (a resumed write
/// programs the same bytes over themselves, which NOR allows). Unaligned
/// heads and tails are padded with the word's current bytes, which
/// programs nothing new.
pub struct NorFlashSlot<F> {
    flash: F,
    range: Range<u32>,
}

impl<F> fmt::Debug for NorFlashSlot<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NorFlashSlot")
            .field("range", &self.range)
            .finish_non_exhaustive()
    }
}

impl<F: MultiwriteNorFlash> NorFlashSlot<F> {
    /// The slot at `range` of `flash` (absolute offsets, sector aligned).
    pub fn new(flash: F, range: Range<u32>) -> Result<Self, SlotError> {
        let erase = u32::try_from(F::ERASE_SIZE).map_err(|_| SlotError::OutOfBounds)?;
        let aligned =
            range.start.is_multiple_of(erase) && range.end.is_multiple_of(erase) && range.start < range.end;
        let words = F::WRITE_SIZE <= WORD_MAX && F::READ_SIZE <= F::WRITE_SIZE;
        if !aligned || !words || !F::WRITE_SIZE.is_multiple_of(F::READ_SIZE) {
            return Err(SlotError::OutOfBounds);
        }
        Ok(Self { flash, range })
    }

    /// The word at `at` as it is: padding a partial word with what the
    /// flash holds programs no bit twice (the neighbouring write's bytes, or
    /// erased `0xFF`).
    fn current_word(&mut self, at: u32) -> Result<[u8; WORD_MAX], SlotError> {
        let mut word = [0xFF; WORD_MAX];
        self.flash
            .read(at, &mut word[..F::WRITE_SIZE])
            .map_err(flash_error)?;
        Ok(word)
    }

    fn absolute(&self, offset: u32, len: usize) -> Result<u32, SlotError> {
        let len = u32::try_from(len).map_err(|_| SlotError::OutOfBounds)?;
        let end = offset.checked_add(len).ok_or(SlotError::OutOfBounds)?;
        if end > self.capacity() {
            return Err(SlotError::OutOfBounds);
        }
        Ok(self.range.start + offset)
    }
}

fn flash_error<E: NorFlashError>(error: E) -> SlotError {
    SlotError::Flash(error.kind())
}

impl<F: MultiwriteNorFlash> OtaSlot for NorFlashSlot<F> {
    type Error = SlotError;

    fn capacity(&self) -> u32 {
        self.range.end - self.range.start
    }

    fn prepare(&mut self, _image_size: u32) -> Result<(), Self::Error> {
        Ok(())
    }

    fn write(&mut self, offset: u32, data: &[u8]) -> Result<(), Self::Error> {
        let start = self.absolute(offset, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        let erase = F::ERASE_SIZE as u32;
        let end = start + data.len() as u32;
        let first_sector = start.next_multiple_of(erase);
        if first_sector < end {
            self.flash
                .erase(first_sector, end.next_multiple_of(erase))
                .map_err(flash_error)?;
        }
        let word = F::WRITE_SIZE;
        let head = (start as usize) % word;
        let (mut at, mut rest) = (start, data);
        if head != 0 {
            let take = (word - head).min(rest.len());
            let mut padded = self.current_word(at - head as u32)?;
            padded[head..head + take].copy_from_slice(&rest[..take]);
            self.flash
                .write(at - head as u32, &padded[..word])
                .map_err(flash_error)?;
            at += take as u32;
            rest = &rest[take..];
        }
        let body = rest.len() - rest.len() % word;
        if body > 0 {
            self.flash.write(at, &rest[..body]).map_err(flash_error)?;
            at += body as u32;
            rest = &rest[body..];
        }
        if !rest.is_empty() {
            // The slot ends on a sector boundary: the padded word fits.
            let mut padded = self.current_word(at)?;
            padded[..rest.len()].copy_from_slice(rest);
            self.flash.write(at, &padded[..word]).map_err(flash_error)?;
        }
        Ok(())
    }

    fn read(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), Self::Error> {
        let start = self.absolute(offset, buf.len())?;
        let word = F::READ_SIZE;
        let head = (start as usize) % word;
        let (mut at, mut rest) = (start, buf);
        if head != 0 && !rest.is_empty() {
            let take = (word - head).min(rest.len());
            let mut padded = [0u8; WORD_MAX];
            self.flash
                .read(at - head as u32, &mut padded[..word])
                .map_err(flash_error)?;
            let (now, later) = rest.split_at_mut(take);
            now.copy_from_slice(&padded[head..head + take]);
            at += take as u32;
            rest = later;
        }
        let body = rest.len() - rest.len() % word;
        let (now, later) = rest.split_at_mut(body);
        if !now.is_empty() {
            self.flash.read(at, now).map_err(flash_error)?;
            at += body as u32;
        }
        if !later.is_empty() {
            let mut padded = [0u8; WORD_MAX];
            self.flash
                .read(at, &mut padded[..word])
                .map_err(flash_error)?;
            let len = later.len();
            later.copy_from_slice(&padded[..len]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
