//! The sans-IO update state machine.

use super::OtaError;
use super::record::{OtaPhase, OtaRecord};
use super::slot::OtaSlot;
use super::verify::{ImageHasher, OtaConfig};
use super::wire::{
    Chunk, ChunkRequest, OTA_CHUNK_LEN_MAX, OtaOffer, OtaOutcome, OtaProgress, OtaResult, OtaStateKind,
};

/// [`OTA_CHUNK_LEN_MAX`] as the wire's `u16`.
const CHUNK_LEN_MAX: u16 = {
    assert!(OTA_CHUNK_LEN_MAX <= u16::MAX as usize);
    OTA_CHUNK_LEN_MAX as u16
};

/// Which image is running, as the firmware learns from the bootloader (the
/// running partition against the one the update was written to; or, unless
/// same-version reinstalls are allowed, the running version against the
/// record's manifest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum BootedImage {
    /// The image the record's rollout installed.
    Updated,
    /// The image that ran before the update.
    Previous,
}

/// What to do with the persisted [`OtaRecord`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Persist {
    /// Store this record durably, replacing the previous one.
    Store(OtaRecord),
    /// Delete the record: no update in progress, nothing to report.
    Clear,
}

/// A bootloader action for the firmware.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum BootAction {
    /// The image is verified: call [`OtaMachine::reboot_into_update`] when it
    /// suits the device (nothing else is needed until then).
    UpdateReady,
    /// Make the updated slot the boot slot (image state "new"/pending
    /// verification, so the bootloader rolls back if it is never confirmed),
    /// then reboot.
    ActivateAndReboot,
    /// Mark the running image invalid and reboot into the previous one.
    RollBackAndReboot,
}

/// What the firmware must do after an event, **in field order**; fields that
/// are unset or `false` mean nothing to do.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[must_use]
pub struct OtaActions {
    /// 1. Tell the bootloader the running image is good (cancels rollback).
    pub mark_valid: bool,
    /// 2. Raise the device's anti-rollback floor to this secure version and
    ///    use it in the [`OtaConfig`] from now on.
    pub raise_secure_version: Option<u32>,
    /// 3. Store or clear the record, durably, before going on.
    pub persist: Option<Persist>,
    /// 4. Send this result to the server.
    pub send_result: Option<OtaResult>,
    /// 5. Send this chunk request to the server.
    pub send_request: Option<ChunkRequest>,
    /// 6. Call [`OtaMachine::verify_step`] (again).
    pub verify: bool,
    /// 7. Bootloader action; the reboots come last.
    pub boot: Option<BootAction>,
}

impl OtaActions {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    fn result(result: OtaResult) -> Self {
        Self { send_result: Some(result), ..Self::default() }
    }
}

/// The OTA state machine (see the [module docs](super) for the diagram).
///
/// Event methods return either `Ok(actions)` or `Err(error)`; an error means
/// the input was refused and nothing changed. Failures that end an update
/// are not errors: they come back as actions persisting a
/// [`OtaPhase::Finished`] record and sending the [`OtaResult`].
#[derive(Debug, Clone)]
pub struct OtaMachine {
    config: OtaConfig,
    record: Option<OtaRecord>,
    persisted_offset: u32,
    hasher: Option<ImageHasher>,
    running_update: bool,
}

impl OtaMachine {
    /// An idle machine (no record persisted).
    pub fn new(config: OtaConfig) -> Self {
        Self { config, record: None, persisted_offset: 0, hasher: None, running_update: false }
    }

    /// Rebuilds the machine on boot from the last persisted record.
    ///
    /// Returns only local actions (persist, verify, boot); once connected,
    /// send what [`OtaMachine::on_connected`] says. A Downloading,
    /// Verifying or ReadyToReboot record whose signature, chip or sizes no
    /// longer check out ends as [`OtaOutcome::Aborted`].
    pub fn resume(config: OtaConfig, record: Option<OtaRecord>, booted: BootedImage) -> (Self, OtaActions) {
        let mut machine = Self::new(config);
        let Some(record) = record else {
            return (machine, OtaActions::default());
        };
        machine.persisted_offset = record.offset;
        let phase = record.phase;
        machine.record = Some(record);
        let mut actions = match phase {
            OtaPhase::Downloading | OtaPhase::Verifying | OtaPhase::ReadyToReboot => {
                machine.resume_transfer()
            }
            OtaPhase::PendingConfirmation => machine.resume_pending(booted),
            OtaPhase::Finished(OtaOutcome::SelfTestFailed) if booted == BootedImage::Updated => {
                OtaActions { boot: Some(BootAction::RollBackAndReboot), ..OtaActions::default() }
            }
            OtaPhase::Finished(_) => OtaActions::default(),
        };
        actions.send_result = None;
        actions.send_request = None;
        (machine, actions)
    }

    fn resume_transfer(&mut self) -> OtaActions {
        let Some(record) = self.record.as_mut() else {
            return OtaActions::default();
        };
        let size = record.image_size();
        let complete = record.offset == size;
        let consistent = self.config.check_persisted(&record.manifest).is_ok()
            && record.offset <= size
            && (1..=CHUNK_LEN_MAX).contains(&record.chunk_len)
            && (complete || record.phase == OtaPhase::Downloading);
        if !consistent {
            return self.finish(OtaOutcome::Aborted);
        }
        if complete {
            record.phase = OtaPhase::Verifying;
            return OtaActions { verify: true, ..OtaActions::default() };
        }
        OtaActions::default()
    }

    fn resume_pending(&mut self, booted: BootedImage) -> OtaActions {
        match booted {
            BootedImage::Updated => {
                self.running_update = true;
                OtaActions::default()
            }
            BootedImage::Previous => self.finish(OtaOutcome::RolledBack),
        }
    }

    /// The device's configuration.
    pub fn config(&self) -> &OtaConfig {
        &self.config
    }

    /// The current coarse state.
    pub fn state(&self) -> OtaStateKind {
        self.record
            .as_ref()
            .map_or(OtaStateKind::Idle, OtaRecord::state)
    }

    /// The in-memory record. Persist only the records actions hand out: this
    /// one may be ahead of what is durably in the slot.
    pub fn record(&self) -> Option<&OtaRecord> {
        self.record.as_ref()
    }

    /// Whether the running image is an update awaiting its self-test:
    /// run it, then call [`OtaMachine::confirm`] or
    /// [`OtaMachine::self_test_failed`].
    pub fn awaiting_self_test(&self) -> bool {
        self.running_update && self.phase() == Some(OtaPhase::PendingConfirmation)
    }

    /// A progress report for the server, if an update exists.
    pub fn progress(&self) -> Option<OtaProgress> {
        self.record.as_ref().map(|record| OtaProgress {
            rollout_id: record.rollout_id,
            offset: record.offset,
            state: record.state(),
        })
    }

    /// The chunk the machine wants next, while downloading. Send it again
    /// after a refused chunk or a timeout.
    pub fn chunk_request(&self) -> Option<ChunkRequest> {
        let record = self
            .record
            .as_ref()
            .filter(|r| r.phase == OtaPhase::Downloading)?;
        let remaining = record
            .image_size()
            .checked_sub(record.offset)
            .filter(|&r| r > 0)?;
        let len = u16::try_from(remaining).map_or(record.chunk_len, |r| r.min(record.chunk_len));
        Some(ChunkRequest { rollout_id: record.rollout_id, offset: record.offset, len })
    }

    /// The result still to be reported, once an update is over.
    pub fn pending_result(&self) -> Option<OtaResult> {
        let record = self.record.as_ref()?;
        match record.phase {
            OtaPhase::Finished(outcome) => Some(record.result(outcome)),
            _ => None,
        }
    }

    /// The link to the server is (re)established: send the pending result,
    /// or ask for the next chunk.
    pub fn on_connected(&self) -> OtaActions {
        OtaActions {
            send_result: self.pending_result(),
            send_request: self.chunk_request(),
            ..OtaActions::default()
        }
    }

    /// The server offers an update; `battery_mv` is the current battery
    /// voltage (`u16::MAX` on mains power).
    ///
    /// - The rollout in progress, with the same manifest: picks up where it
    ///   is (asks for the next chunk, keeps verifying, re-sends a result;
    ///   nothing new once verified).
    /// - Otherwise the offer is checked ([`OtaConfig::check_offer`]); a
    ///   refusal is answered with a result and leaves any update in progress
    ///   untouched.
    /// - A valid offer while another rollout is downloading, verifying or
    ///   ready to reboot supersedes it (its [`OtaOutcome::Superseded`] result
    ///   is sent); while one awaits confirmation it is refused as
    ///   [`OtaOutcome::Busy`]; an unreported result of a finished rollout is
    ///   dropped.
    /// - Then the slot is prepared, the new record persisted and chunk 0
    ///   requested. If preparing fails, the new rollout fails with
    ///   [`OtaOutcome::WriteFailed`] (reported instead of the superseded one).
    pub fn on_offer<S: OtaSlot + ?Sized>(
        &mut self,
        offer: &OtaOffer,
        battery_mv: u16,
        slot: &mut S,
    ) -> OtaActions {
        if let Some(actions) = self.repeat_offer(offer) {
            return actions;
        }
        if let Err(error) = self
            .config
            .check_offer(&offer.manifest, slot.capacity(), battery_mv)
        {
            return OtaActions::result(offer_result(offer, error.outcome()));
        }
        let superseded = match self.record.as_ref() {
            Some(record) => match record.phase {
                OtaPhase::PendingConfirmation => {
                    return OtaActions::result(offer_result(offer, OtaOutcome::Busy));
                }
                OtaPhase::Finished(_) => None,
                _ => Some(record.result(OtaOutcome::Superseded)),
            },
            None => None,
        };
        let mut actions = self.start(offer, slot);
        actions.send_result = actions.send_result.or(superseded);
        actions
    }

    fn repeat_offer(&mut self, offer: &OtaOffer) -> Option<OtaActions> {
        let record = self.record.as_mut()?;
        if record.rollout_id != offer.rollout_id || record.manifest != offer.manifest {
            return None;
        }
        let actions = match record.phase {
            OtaPhase::Downloading => {
                record.chunk_len = effective_chunk_len(offer.chunk_len);
                OtaActions { send_request: self.chunk_request(), ..OtaActions::default() }
            }
            OtaPhase::Verifying => OtaActions { verify: true, ..OtaActions::default() },
            // UpdateReady is only ever said right after a verification.
            OtaPhase::ReadyToReboot | OtaPhase::PendingConfirmation => OtaActions::default(),
            OtaPhase::Finished(outcome) => OtaActions::result(record.result(outcome)),
        };
        Some(actions)
    }

    fn start<S: OtaSlot + ?Sized>(&mut self, offer: &OtaOffer, slot: &mut S) -> OtaActions {
        let record = OtaRecord {
            rollout_id: offer.rollout_id,
            manifest: offer.manifest.clone(),
            chunk_len: effective_chunk_len(offer.chunk_len),
            offset: 0,
            phase: OtaPhase::Downloading,
        };
        let image_size = record.image_size();
        self.record = Some(record);
        self.hasher = None;
        self.running_update = false;
        if slot.prepare(image_size).is_err() {
            return self.finish(OtaOutcome::WriteFailed);
        }
        OtaActions {
            persist: Some(self.store()),
            send_request: self.chunk_request(),
            ..OtaActions::default()
        }
    }

    /// A chunk arrived. It must belong to the rollout being downloaded, start
    /// exactly at the expected offset, be at most the chunk length and end
    /// within the image; otherwise it is refused (`Err`, nothing written) and
    /// [`OtaMachine::chunk_request`] still names the chunk wanted. Ask again
    /// for gaps (offset ahead); stale duplicates (offset behind) are best
    /// ignored.
    ///
    /// An empty chunk at the expected offset means the server has no more
    /// bytes: the update fails with [`OtaOutcome::SizeMismatch`]. A failed
    /// write fails it with [`OtaOutcome::WriteFailed`]. After the last byte
    /// the actions say to verify.
    pub fn on_chunk<S: OtaSlot + ?Sized>(
        &mut self,
        chunk: &Chunk,
        slot: &mut S,
    ) -> Result<OtaActions, OtaError> {
        let record = self
            .record
            .as_ref()
            .filter(|r| r.phase == OtaPhase::Downloading)
            .ok_or(OtaError::NotDownloading)?;
        if chunk.rollout_id != record.rollout_id {
            return Err(OtaError::WrongRollout);
        }
        if chunk.offset != record.offset {
            return Err(OtaError::WrongOffset);
        }
        if chunk.data.is_empty() {
            return Ok(self.finish(OtaOutcome::SizeMismatch));
        }
        if chunk.data.len() > usize::from(record.chunk_len) {
            return Err(OtaError::ChunkTooLarge);
        }
        let len = u32::try_from(chunk.data.len()).map_err(|_| OtaError::ChunkTooLarge)?;
        if len > record.image_size().saturating_sub(record.offset) {
            return Err(OtaError::ChunkOverflow);
        }
        if slot.write(record.offset, &chunk.data).is_err() {
            return Ok(self.finish(OtaOutcome::WriteFailed));
        }
        Ok(self.advance(len))
    }

    fn advance(&mut self, len: u32) -> OtaActions {
        let Some(record) = self.record.as_mut() else {
            return OtaActions::default();
        };
        record.offset = record.offset.saturating_add(len);
        if record.offset >= record.image_size() {
            record.phase = OtaPhase::Verifying;
            self.hasher = None;
            return OtaActions { persist: Some(self.store()), verify: true, ..OtaActions::default() };
        }
        let due = record.offset.saturating_sub(self.persisted_offset) >= self.config.persist_every;
        let persist = if due { Some(self.store()) } else { None };
        OtaActions { persist, send_request: self.chunk_request(), ..OtaActions::default() }
    }

    /// Verifies the image by reading the slot back: hashes the next
    /// `buf.len()` bytes (any non-empty size; a flash sector is a good
    /// choice) and, once the whole image is read, checks the exact size and
    /// the SHA-256 against the manifest. Call while the actions say
    /// `verify`; between calls the device may do other work.
    ///
    /// On success the record is persisted as ReadyToReboot and the actions
    /// carry [`BootAction::UpdateReady`]; on mismatch or a read failure the
    /// update fails. Nothing else may write the slot between steps (bytes
    /// already hashed are not read again).
    pub fn verify_step<S: OtaSlot + ?Sized>(
        &mut self,
        slot: &mut S,
        buf: &mut [u8],
    ) -> Result<OtaActions, OtaError> {
        let record = self
            .record
            .as_ref()
            .filter(|r| r.phase == OtaPhase::Verifying)
            .ok_or(OtaError::InvalidState)?;
        if buf.is_empty() {
            return Err(OtaError::BufferTooSmall);
        }
        let size = record.image_size();
        let hasher = self.hasher.get_or_insert_with(ImageHasher::new);
        let done = u32::try_from(hasher.len()).unwrap_or(u32::MAX);
        let remaining = usize::try_from(size.saturating_sub(done)).unwrap_or(usize::MAX);
        let piece_len = remaining.min(buf.len());
        if let Some(piece) = buf.get_mut(..piece_len).filter(|p| !p.is_empty()) {
            if slot.read(done, piece).is_err() {
                return Ok(self.finish(OtaOutcome::ReadFailed));
            }
            hasher.update(piece);
        }
        if hasher.len() < u64::from(size) {
            return Ok(OtaActions { verify: true, ..OtaActions::default() });
        }
        Ok(self.conclude_verification())
    }

    fn conclude_verification(&mut self) -> OtaActions {
        let (Some(hasher), Some(record)) = (self.hasher.take(), self.record.as_mut()) else {
            return OtaActions::default();
        };
        if let Err(error) = hasher.finish(&record.manifest.manifest) {
            return self.finish(error.outcome());
        }
        record.phase = OtaPhase::ReadyToReboot;
        OtaActions {
            persist: Some(self.store()),
            boot: Some(BootAction::UpdateReady),
            ..OtaActions::default()
        }
    }

    /// The firmware is ready to reboot into the verified image: the record is
    /// persisted as PendingConfirmation, then the firmware switches the boot
    /// slot and reboots ([`BootAction::ActivateAndReboot`]).
    pub fn reboot_into_update(&mut self) -> Result<OtaActions, OtaError> {
        let record = self
            .record
            .as_mut()
            .filter(|r| r.phase == OtaPhase::ReadyToReboot)
            .ok_or(OtaError::InvalidState)?;
        record.phase = OtaPhase::PendingConfirmation;
        Ok(OtaActions {
            persist: Some(self.store()),
            boot: Some(BootAction::ActivateAndReboot),
            ..OtaActions::default()
        })
    }

    /// The updated image passed its self-test: mark it valid, raise the
    /// anti-rollback floor to the manifest's secure version, persist and
    /// report [`OtaOutcome::Confirmed`]. Only after booting the update
    /// ([`OtaMachine::awaiting_self_test`]).
    pub fn confirm(&mut self) -> Result<OtaActions, OtaError> {
        let secure_version = self.running_manifest_secure_version()?;
        let raise = (secure_version > self.config.secure_version).then_some(secure_version);
        if let Some(floor) = raise {
            self.config.secure_version = floor;
        }
        self.running_update = false;
        let mut actions = self.finish(OtaOutcome::Confirmed);
        actions.mark_valid = true;
        actions.raise_secure_version = raise;
        Ok(actions)
    }

    /// The updated image failed its self-test: persist
    /// [`OtaOutcome::SelfTestFailed`] and roll back. The previous image
    /// reports the result after the reboot (and if the device boots the
    /// update again instead, [`OtaMachine::resume`] asks for the rollback
    /// again).
    pub fn self_test_failed(&mut self) -> Result<OtaActions, OtaError> {
        self.running_manifest_secure_version()?;
        self.running_update = false;
        let mut actions = self.finish(OtaOutcome::SelfTestFailed);
        actions.send_result = None;
        actions.boot = Some(BootAction::RollBackAndReboot);
        Ok(actions)
    }

    fn running_manifest_secure_version(&self) -> Result<u32, OtaError> {
        if !self.awaiting_self_test() {
            return Err(OtaError::InvalidState);
        }
        let record = self.record.as_ref().ok_or(OtaError::InvalidState)?;
        Ok(record.manifest.manifest.secure_version)
    }

    /// Gives up on the update before the reboot ([`OtaOutcome::Aborted`]).
    pub fn abort(&mut self) -> Result<OtaActions, OtaError> {
        match self.phase() {
            Some(OtaPhase::Downloading | OtaPhase::Verifying | OtaPhase::ReadyToReboot) => {
                Ok(self.finish(OtaOutcome::Aborted))
            }
            _ => Err(OtaError::InvalidState),
        }
    }

    /// The pending result reached the server: forget the update (clears the
    /// record) and go back to Idle.
    pub fn result_delivered(&mut self) -> Result<OtaActions, OtaError> {
        if !matches!(self.phase(), Some(OtaPhase::Finished(_))) {
            return Err(OtaError::InvalidState);
        }
        self.record = None;
        self.persisted_offset = 0;
        self.running_update = false;
        Ok(OtaActions { persist: Some(Persist::Clear), ..OtaActions::default() })
    }

    fn phase(&self) -> Option<OtaPhase> {
        self.record.as_ref().map(|record| record.phase)
    }

    /// Ends the update with `outcome`: persist it and report it.
    fn finish(&mut self, outcome: OtaOutcome) -> OtaActions {
        self.hasher = None;
        let Some(record) = self.record.as_mut() else {
            return OtaActions::default();
        };
        record.phase = OtaPhase::Finished(outcome);
        let result = record.result(outcome);
        OtaActions { persist: Some(self.store()), send_result: Some(result), ..OtaActions::default() }
    }

    /// The record to persist now; remembers its offset.
    fn store(&mut self) -> Persist {
        match self.record.as_ref() {
            Some(record) => {
                self.persisted_offset = record.offset;
                Persist::Store(record.clone())
            }
            None => Persist::Clear,
        }
    }
}

/// The chunk length actually used for an offered one.
fn effective_chunk_len(offered: u16) -> u16 {
    if offered == 0 { CHUNK_LEN_MAX } else { offered.min(CHUNK_LEN_MAX) }
}

fn offer_result(offer: &OtaOffer, outcome: OtaOutcome) -> OtaResult {
    OtaResult { rollout_id: offer.rollout_id, version: offer.manifest.manifest.version, outcome }
}
