//! The trap's sans-IO core: what it knows (identity, credentials, queue,
//! configuration) and how it answers each event. No socket, no timer: the
//! session (`session.rs`) and the capture loop (`capture.rs`) feed it events
//! and carry out what it returns, so every decision here is unit-tested on
//! the host against in-RAM flash.

use core::fmt;

use heapless::String;
use wildcam_sdk::DeviceId;
use wildcam_sdk::protocol::{
    self, Capabilities, Chip, Command, CommandKind, CommandResult, CommandStatus, ConfigStatus,
    DesiredConfig, Detection, Downlink, FirmwareVersion, HARDWARE_MODEL_LEN_MAX, Health, Hello,
    ReportedConfig, ResetReason, Route, TrapConfig, Trigger, UnixSeconds, Uplink,
};
use wildcam_sdk::provision::{ClaimToken, DeviceIdentity, Provisioned, Provisioner};
use wildcam_sdk::queue::{
    FullPolicy, OfflineQueue, QueueConfig, QueueError, QueueStats, QueueStore, RECORD_LEN_MAX,
};
use wildcam_sdk::seal::{Opener, Sealer, SessionKey};
use wildcam_sdk::topic::{self, Direction, SessionId};

use crate::error::TrapError;
use crate::hardware::{ClassifierVerdict, Entropy, PowerReading};
use crate::ota::OtaDownlink;
use crate::storage::{DeviceState, OtaState, StateStore, StoredCredentials};

/// What the firmware is and can do, fixed at build time.
#[derive(Debug, Clone)]
pub struct TrapIdentity {
    /// Board or product name, at most 24 bytes.
    pub hardware_model: &'static str,
    /// The chip.
    pub chip: Chip,
    /// This firmware's version.
    pub firmware: FirmwareVersion,
    /// This firmware's anti-rollback counter.
    pub secure_version: u32,
    /// Feature bits announced in the hello ([`Capabilities::OTA`] is added
    /// when the firmware has a signing key).
    pub capabilities: Capabilities,
    /// The firmware signing public key (ed25519) OTA manifests must verify
    /// under, built into the firmware; `None`: every offer is refused.
    pub ota_public_key: Option<[u8; 32]>,
}

/// One captured frame, ready to become a queued detection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureRecord {
    /// When it was captured (0 while the clock is unset).
    pub captured_at: UnixSeconds,
    /// What fired it.
    pub trigger: Trigger,
    /// Index in its burst.
    pub burst_index: u8,
    /// Frames in the burst.
    pub burst_len: u8,
    /// The classifier's verdict.
    pub verdict: ClassifierVerdict,
    /// Image size, bytes.
    pub image_len: u32,
    /// First 8 bytes of the image's SHA-256.
    pub image_digest: [u8; 8],
    /// Battery at capture, millivolts.
    pub battery_mv: u16,
}

/// What the session must do after a downlink message.
#[derive(Debug, Default)]
pub struct Reaction {
    /// Publish this answer.
    pub reply: Option<Uplink>,
    /// Queue entries the message released (acks).
    pub released: usize,
    /// Take a burst now (a `Manual` trigger).
    pub capture_now: bool,
    /// Restart once the reply is out.
    pub restart: bool,
    /// A new configuration runs: re-read it.
    pub config_changed: bool,
    /// An OTA message for the update driver (`ota.rs`).
    pub ota: Option<OtaDownlink>,
}

/// A sealed uplink frame written to the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealedUplink {
    /// Frame length at the start of the buffer.
    pub len: usize,
    /// The topic's last level (`det`, `health`, ...).
    pub suffix: &'static str,
}

/// A queued detection, sealed and ready to publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutgoingDetection {
    /// Its sequence number.
    pub seq: u32,
    /// Frame length at the start of the buffer.
    pub len: usize,
}

/// The sealing state of a provisioned trap.
struct Link {
    device_id: DeviceId,
    key: SessionKey,
    sealer: Sealer,
    opener: Opener,
}

impl Link {
    fn new(credentials: &StoredCredentials, reservation: u32) -> Self {
        let key = SessionKey::from_bytes(credentials.session_key);
        Self {
            device_id: credentials.device_id.clone(),
            sealer: Sealer::resume(key.clone(), Direction::Up, reservation),
            // The downlink window is not persisted: every downlink message is
            // idempotent or guarded (stale acks change nothing, configuration
            // versions only go up, command ids are remembered).
            opener: Opener::new(key.clone(), Direction::Down),
            key,
        }
    }
}

/// The trap: identity, state journal, offline queue and sealing.
pub struct Trap<Q: QueueStore, S: StateStore> {
    identity: TrapIdentity,
    queue: OfflineQueue<Q>,
    store: S,
    state: DeviceState,
    link: Option<Link>,
    reset_reason: ResetReason,
    triggers_since_report: u16,
    storage_errors: u16,
}

impl<Q: QueueStore, S: StateStore> fmt::Debug for Trap<Q, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Trap")
            .field("identity", &self.identity)
            .field("state", &self.state)
            .field("queue", &self.queue.stats())
            .finish_non_exhaustive()
    }
}

impl<Q: QueueStore, S: StateStore> Trap<Q, S> {
    /// Loads the state (or creates it on a fresh device, drawing the identity
    /// seed from `entropy`) and opens the queue.
    pub fn open(
        identity: TrapIdentity,
        queue_store: Q,
        mut store: S,
        reset_reason: ResetReason,
        entropy: &mut impl Entropy,
    ) -> Result<Self, TrapError> {
        let state = match store.load()? {
            Some(state) => state,
            None => {
                let mut seed = [0u8; 32];
                entropy.fill(&mut seed);
                let state = DeviceState::new(seed);
                store.save(&state)?;
                state
            }
        };
        // `new` + `resync` keeps the store in the queue even if reading fails:
        // the queue re-reads it before its next operation.
        let mut queue = OfflineQueue::new(queue_store, QueueConfig::new(FullPolicy::DropOldest));
        let mut storage_errors = 0;
        if let Err(error) = queue.resync() {
            log::error!("offline queue unreadable: {error}");
            storage_errors += 1;
        }
        let link = state
            .credentials
            .as_ref()
            .map(|credentials| Link::new(credentials, state.uplink_reservation));
        Ok(Self {
            identity,
            queue,
            store,
            state,
            link,
            reset_reason,
            triggers_since_report: 0,
            storage_errors,
        })
    }

    /// Gives the queue store and the state store back (tests reopen them as
    /// after a reboot).
    pub fn into_stores(self) -> (Q, S) {
        (self.queue.into_store(), self.store)
    }

    /// What the firmware is.
    pub fn identity(&self) -> &TrapIdentity {
        &self.identity
    }

    /// The anti-rollback floor: the firmware's own secure version, or the
    /// one a confirmed update raised it to.
    pub fn secure_version(&self) -> u32 {
        self.identity
            .secure_version
            .max(self.state.ota.secure_version)
    }

    /// Whether the storage opened and has worked without error since (part
    /// of a new image's self-test).
    pub fn storage_sane(&self) -> bool {
        self.storage_errors == 0
    }

    /// What the trap keeps about firmware updates.
    pub fn ota_state(&self) -> &OtaState {
        &self.state.ota
    }

    /// Changes and durably saves the OTA part of the state.
    pub fn update_ota_state(&mut self, change: impl FnOnce(&mut OtaState)) -> Result<(), TrapError> {
        let mut state = self.state.clone();
        change(&mut state.ota);
        if let Err(error) = self.store.save(&state) {
            self.count_storage_error();
            return Err(error.into());
        }
        self.state = state;
        Ok(())
    }

    /// The device id, once claimed.
    pub fn device_id(&self) -> Option<&DeviceId> {
        self.link.as_ref().map(|link| &link.device_id)
    }

    /// The stored credentials, once claimed.
    pub fn credentials(&self) -> Option<&StoredCredentials> {
        self.state.credentials.as_ref()
    }

    /// The configuration running.
    pub fn config(&self) -> &TrapConfig {
        &self.state.config
    }

    /// The configuration version running.
    pub fn config_version(&self) -> u32 {
        self.state.config_version
    }

    /// The queue's counters.
    pub fn queue_stats(&self) -> QueueStats {
        self.queue.stats()
    }

    /// The identity's public key (what the server's allow-list names).
    pub fn identity_key(&self) -> [u8; 32] {
        DeviceIdentity::from_seed(self.state.identity_seed).public_key()
    }

    /// Starts a claim with a fresh provisioning session.
    pub fn provisioner(
        &self,
        claim: Option<ClaimToken>,
        pinned_server_key: Option<[u8; 32]>,
        entropy: &mut impl Entropy,
    ) -> Provisioner {
        let mut session = [0u8; 8];
        let mut agreement = [0u8; 32];
        entropy.fill(&mut session);
        entropy.fill(&mut agreement);
        let identity = DeviceIdentity::from_seed(self.state.identity_seed);
        Provisioner::new(identity, claim, SessionId::from_random(session), agreement, pinned_server_key)
    }

    /// Stores what a successful claim returned; sealing starts over at
    /// counter 1 under the new key.
    pub fn complete_claim(&mut self, provisioned: Provisioned) -> Result<(), TrapError> {
        let credentials = StoredCredentials {
            device_id: provisioned.device_id,
            mqtt_password: provisioned.mqtt_password,
            session_key: *provisioned.session_key.as_bytes(),
        };
        let mut state = self.state.clone();
        state.credentials = Some(credentials);
        state.uplink_reservation = 0;
        self.store.save(&state)?;
        self.state = state;
        self.link = self
            .state
            .credentials
            .as_ref()
            .map(|credentials| Link::new(credentials, 0));
        Ok(())
    }

    /// A connection is up: every unacknowledged detection goes out again, and
    /// this hello goes first.
    pub fn on_connected(&mut self) -> Result<Hello, TrapError> {
        self.queue.rewind();
        self.hello()
    }

    /// No ack came in time: resend everything unacknowledged. Returns a hello
    /// to send first when the server's ack is below the queue's floor
    /// ([`OfflineQueue::server_behind_floor`]).
    pub fn rewind(&mut self) -> Option<Hello> {
        self.queue.rewind();
        if self.queue.server_behind_floor() { self.hello().ok() } else { None }
    }

    fn hello(&self) -> Result<Hello, TrapError> {
        let device_id = self.device_id().ok_or(TrapError::NotProvisioned)?.clone();
        let stats = self.queue.stats();
        let capabilities = match self.identity.ota_public_key {
            Some(_) => self.identity.capabilities.union(Capabilities::OTA),
            None => self.identity.capabilities,
        };
        Ok(Hello {
            device_id,
            hardware_model: model_name(self.identity.hardware_model),
            chip: self.identity.chip,
            firmware: self.identity.firmware,
            secure_version: self.secure_version(),
            reset_reason: self.reset_reason,
            capabilities,
            config_version: self.state.config_version,
            queue_floor: stats.floor,
            queue_next: stats.next_seq,
        })
    }

    /// Counts a trigger for the next health report.
    pub fn count_trigger(&mut self) {
        self.triggers_since_report = self.triggers_since_report.saturating_add(1);
    }

    /// Counts a capture or storage failure for the next health report.
    pub fn count_storage_error(&mut self) {
        self.storage_errors = self.storage_errors.saturating_add(1);
    }

    /// Queues a detection for `capture`; returns its sequence number.
    pub fn record_detection(&mut self, capture: &CaptureRecord) -> Result<u32, TrapError> {
        let appended = self.queue.append_with(|seq, buf| {
            let detection = Detection {
                seq,
                captured_at: capture.captured_at,
                trigger: capture.trigger,
                burst_index: capture.burst_index,
                burst_len: capture.burst_len,
                classes: capture.verdict.classes.clone(),
                bbox: capture.verdict.bbox,
                image_len: capture.image_len,
                image_digest: capture.image_digest,
                battery_mv: capture.battery_mv,
            };
            protocol::encode(&detection, buf)
                .ok()
                .map(|encoded| encoded.len())
        });
        match appended {
            Ok(appended) => {
                if let Some(dropped) = appended.dropped_oldest {
                    log::warn!("queue full: dropped detections through seq {dropped}");
                }
                Ok(appended.seq)
            }
            Err(error) => {
                self.count_storage_error();
                Err(error.into())
            }
        }
    }

    /// A health report; the trigger count starts over.
    pub fn health(
        &mut self,
        power: PowerReading,
        taken_at: UnixSeconds,
        uptime_s: u32,
        rssi_dbm: i8,
    ) -> Health {
        let stats = self.queue.stats();
        let free_records = self.queue.fullness().map_or(0, |fullness| fullness.free);
        let record_kib = u32::try_from(RECORD_LEN_MAX).unwrap_or(u32::MAX);
        Health {
            taken_at,
            battery_mv: power.battery_mv,
            battery_soc_pct: power.battery_soc_pct.min(100),
            charge_state: power.charge_state,
            solar_mw: power.solar_mw,
            temperature_decicelsius: power.temperature_decicelsius,
            storage_free_kib: free_records.saturating_mul(record_kib) / 1024,
            storage_errors: self.storage_errors,
            rssi_dbm,
            uptime_s,
            reset_reason: self.reset_reason,
            triggers_since_last: core::mem::take(&mut self.triggers_since_report),
            queue_depth: stats.len,
            queue_dropped_total: stats.dropped_total,
        }
    }

    /// Seals `message` into `out`, persisting a counter reservation first
    /// when the sealer asks for one.
    pub fn seal(&mut self, message: &Uplink, out: &mut [u8]) -> Result<SealedUplink, TrapError> {
        let mut envelope = [0u8; Uplink::ENCODED_LEN_MAX];
        let len = message.encode(&mut envelope)?.len();
        let suffix = match message.kind().route() {
            Route::Device(_, suffix) => suffix,
            Route::Provision(_) => return Err(TrapError::TopicMismatch),
        };
        let len = self.seal_envelope(&envelope[..len], out)?;
        Ok(SealedUplink { len, suffix })
    }

    /// The next queued detection the in-flight window allows, sealed into
    /// `out`, or `None`.
    pub fn next_detection(&mut self, out: &mut [u8]) -> Result<Option<OutgoingDetection>, TrapError> {
        let mut record = [0u8; RECORD_LEN_MAX];
        let (seq, record_len) = match self.queue.next_to_send(&mut record) {
            Ok(Some(entry)) => (entry.seq, entry.record.len()),
            Ok(None) => return Ok(None),
            Err(error) => {
                self.count_storage_error();
                return Err(error.into());
            }
        };
        let len = self.seal_envelope(&record[..record_len], out)?;
        Ok(Some(OutgoingDetection { seq, len }))
    }

    fn seal_envelope(&mut self, envelope: &[u8], out: &mut [u8]) -> Result<usize, TrapError> {
        let link = self.link.as_mut().ok_or(TrapError::NotProvisioned)?;
        let previous = self.state.uplink_reservation;
        let sealed = link.sealer.seal(link.device_id.as_bytes(), envelope, out)?;
        let Some(reservation) = sealed.persist_reservation else {
            return Ok(sealed.len);
        };
        self.state.uplink_reservation = reservation;
        if let Err(error) = self.store.save(&self.state) {
            // The frame must not go out: resume from what is stored, so the
            // counters this reservation covered are never used unrecorded.
            self.state.uplink_reservation = previous;
            link.sealer = Sealer::resume(link.key.clone(), Direction::Up, previous);
            self.storage_errors = self.storage_errors.saturating_add(1);
            return Err(error.into());
        }
        Ok(sealed.len)
    }

    /// Opens a publish received on `topic` and reacts to it.
    pub fn on_publish(&mut self, topic: &str, frame: &mut [u8]) -> Result<Reaction, TrapError> {
        let link = self.link.as_mut().ok_or(TrapError::NotProvisioned)?;
        let parsed = topic::parse_device_topic(topic)?;
        if parsed.device != link.device_id || parsed.direction != Direction::Down {
            return Err(TrapError::TopicMismatch);
        }
        let plain = link.opener.open(link.device_id.as_bytes(), frame)?;
        let message = Downlink::decode(plain)?;
        if !message
            .kind()
            .fits_device_topic(Direction::Down, parsed.kind)
        {
            return Err(TrapError::TopicMismatch);
        }
        self.on_downlink(message)
    }

    /// Reacts to an opened downlink message.
    pub fn on_downlink(&mut self, message: Downlink) -> Result<Reaction, TrapError> {
        match message {
            Downlink::Ack(ack) => self.on_ack(ack.through),
            Downlink::DesiredConfig(desired) => self.on_desired_config(desired),
            Downlink::Command(command) => self.on_command(command),
            Downlink::OtaOffer(offer) => {
                Ok(Reaction { ota: Some(OtaDownlink::Offer(offer)), ..Reaction::default() })
            }
            Downlink::OtaChunk(chunk) => {
                Ok(Reaction { ota: Some(OtaDownlink::Chunk(chunk)), ..Reaction::default() })
            }
        }
    }

    fn on_ack(&mut self, through: u32) -> Result<Reaction, TrapError> {
        match self.queue.ack(through) {
            Ok(outcome) => Ok(Reaction { released: outcome.released, ..Reaction::default() }),
            Err(QueueError::AckBeyondAssigned) => {
                log::warn!("refused an ack through {through}: beyond what was sent");
                Ok(Reaction::default())
            }
            Err(error) => {
                self.count_storage_error();
                Err(error.into())
            }
        }
    }

    fn on_desired_config(&mut self, desired: DesiredConfig) -> Result<Reaction, TrapError> {
        let mut reaction = Reaction::default();
        if desired.version > self.state.desired_version && desired.version != self.state.config_version {
            let mut state = self.state.clone();
            state.desired_version = desired.version;
            if desired.config.validate().is_ok() {
                state.config = desired.config;
                state.config_version = desired.version;
                state.config_status = ConfigStatus::Applied;
                reaction.config_changed = true;
            } else {
                state.config_status = ConfigStatus::RejectedInvalid;
            }
            self.store.save(&state)?;
            self.state = state;
        }
        // Always answer, also a repeat: the previous report may have been lost.
        reaction.reply = Some(Uplink::ReportedConfig(self.reported_config()));
        Ok(reaction)
    }

    /// The configuration report.
    pub fn reported_config(&self) -> ReportedConfig {
        ReportedConfig {
            version: self.state.config_version,
            status: self.state.config_status,
            desired_version: self.state.desired_version,
            config: self.state.config.clone(),
        }
    }

    fn on_command(&mut self, command: Command) -> Result<Reaction, TrapError> {
        let mut reaction = Reaction::default();
        let status = if self.state.recent_commands.contains(&command.id) {
            CommandStatus::Duplicate
        } else {
            // Remembered before it runs: a reboot command never runs twice.
            let mut state = self.state.clone();
            state.remember_command(command.id);
            self.store.save(&state)?;
            self.state = state;
            match command.kind {
                CommandKind::Reboot => {
                    reaction.restart = true;
                    CommandStatus::Done
                }
                CommandKind::CaptureNow => {
                    reaction.capture_now = true;
                    CommandStatus::Done
                }
                // No image storage on these boards yet: nothing to format or send.
                _ => CommandStatus::Unsupported,
            }
        };
        reaction.reply = Some(Uplink::CommandResult(CommandResult { id: command.id, status }));
        Ok(reaction)
    }
}

/// The hardware model as the protocol carries it, cut at 24 bytes.
fn model_name(model: &str) -> String<HARDWARE_MODEL_LEN_MAX> {
    let mut name = String::new();
    for character in model.chars() {
        if name.push(character).is_err() {
            break;
        }
    }
    name
}

#[cfg(test)]
pub(crate) mod tests;
