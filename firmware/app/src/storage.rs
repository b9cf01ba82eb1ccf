//! What the trap keeps in flash besides the offline queue: its identity, its
//! credentials, the uplink counter reservation, and the configuration it runs.
//!
//! # Layout
//!
//! A board gives the app one NOR flash and a [`FlashLayout`]: two
//! page-aligned ranges of it, one for the [`DeviceState`] journal and one for
//! the SDK's `FlashStore` (the offline queue). Both share the flash through
//! [`SharedFlash`], which borrows it for the length of one blocking operation.
//!
//! # The state journal
//!
//! [`FlashStateStore`] appends the whole postcard-encoded [`DeviceState`] to a
//! `sequential-storage` queue with overwrite on (as the SDK's queue metadata
//! journal does): the newest item that decodes wins, a torn write is ignored
//! by its CRC, and the journal cycles through its pages. A state is written
//! only when something in it changes: a claim, a counter reservation (once
//! every 1,024 uplink frames), an applied configuration, an executed command,
//! and during an OTA update (see [`OtaState`]).
//!
//! A journal item is the postcard encoding of the [`DeviceState`] fields
//! followed by that of its [`OtaState`]. A state written by firmware older
//! than OTA has no such tail and reads as "no update, no raised floor"; older
//! firmware reading a newer item ignores the tail. The format byte stays 1.

use core::cell::RefCell;
use core::fmt;
use core::ops::Range;

use embassy_futures::block_on;
use embedded_storage::nor_flash::{ErrorType, MultiwriteNorFlash, NorFlash, ReadNorFlash};
use postcard::experimental::max_size::MaxSize;
use sequential_storage::cache::{Cache, Uncached};
use sequential_storage::queue::{QueueConfig, QueueStorage};
use serde::{Deserialize, Serialize};
use wildcam_sdk::DeviceId;
use wildcam_sdk::ota::OtaRecord;
use wildcam_sdk::protocol::{ConfigStatus, TrapConfig};
use wildcam_sdk::provision::MqttPassword;
use wildcam_sdk::queue::BlockingAsync;

/// Where the app's data lives in the board's flash (offsets in bytes, page aligned).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlashLayout {
    /// The [`DeviceState`] journal: at least 2 pages.
    pub state: Range<u32>,
    /// The offline queue: at least 4 pages (2 metadata, 2+ records).
    pub queue: Range<u32>,
}

/// One flash shared by the state journal and the queue store. Each operation
/// borrows the flash only while it runs (operations are blocking and never
/// nest), so the two users never conflict.
pub struct SharedFlash<'a, F>(&'a RefCell<F>);

impl<'a, F> SharedFlash<'a, F> {
    /// Shares `flash`.
    pub fn new(flash: &'a RefCell<F>) -> Self {
        Self(flash)
    }
}

impl<F> fmt::Debug for SharedFlash<'_, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedFlash")
    }
}

impl<F: ErrorType> ErrorType for SharedFlash<'_, F> {
    type Error = F::Error;
}

impl<F: ReadNorFlash> ReadNorFlash for SharedFlash<'_, F> {
    const READ_SIZE: usize = F::READ_SIZE;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Self::Error> {
        self.0.borrow_mut().read(offset, bytes)
    }

    fn capacity(&self) -> usize {
        self.0.borrow().capacity()
    }
}

impl<F: NorFlash> NorFlash for SharedFlash<'_, F> {
    const WRITE_SIZE: usize = F::WRITE_SIZE;
    const ERASE_SIZE: usize = F::ERASE_SIZE;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
        self.0.borrow_mut().erase(from, to)
    }

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Self::Error> {
        self.0.borrow_mut().write(offset, bytes)
    }
}

impl<F: MultiwriteNorFlash> MultiwriteNorFlash for SharedFlash<'_, F> {}

/// Format version of [`DeviceState`]; a journal item of another format is ignored.
pub const STATE_FORMAT: u8 = 1;
/// How many executed command ids the trap remembers to refuse a redelivery.
pub const RECENT_COMMANDS_MAX: usize = 8;

/// The credentials a claim produced. `Debug` hides the secrets.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, MaxSize)]
pub struct StoredCredentials {
    /// The id the server assigned.
    pub device_id: DeviceId,
    /// The broker password.
    pub mqtt_password: MqttPassword,
    /// The per-device session key.
    pub session_key: [u8; 32],
}

impl fmt::Debug for StoredCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredCredentials")
            .field("device_id", &self.device_id)
            .finish_non_exhaustive()
    }
}

/// Everything the trap must remember across reboots, besides the queue.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, MaxSize)]
pub struct DeviceState {
    /// [`STATE_FORMAT`].
    pub format: u8,
    /// Seed of the trap's ed25519 identity, drawn from the hardware RNG on
    /// first boot. Secret: on a chip, enable flash encryption.
    pub identity_seed: [u8; 32],
    /// Set once the trap is claimed.
    pub credentials: Option<StoredCredentials>,
    /// The uplink sealer's last persisted counter reservation (0: none yet).
    pub uplink_reservation: u32,
    /// The configuration version running (0: factory defaults).
    pub config_version: u32,
    /// The configuration running.
    pub config: TrapConfig,
    /// The most recent desired version seen.
    pub desired_version: u32,
    /// What became of it.
    pub config_status: ConfigStatus,
    /// Ids of the most recently executed commands, oldest first.
    pub recent_commands: heapless::Vec<u32, RECENT_COMMANDS_MAX>,
    /// The OTA part: encoded after the fields above (see the module docs),
    /// not by the derive.
    #[serde(skip)]
    pub ota: OtaState,
}

/// What the trap keeps about firmware updates.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, MaxSize)]
pub struct OtaState {
    /// The anti-rollback floor raised by confirmed updates (0: none yet; the
    /// firmware's own secure version applies).
    pub secure_version: u32,
    /// The update in progress or its result still to report, exactly as the
    /// SDK's `OtaMachine` last asked to persist it.
    pub record: Option<OtaRecord>,
}

impl DeviceState {
    /// A factory-fresh state with the given identity seed.
    pub fn new(identity_seed: [u8; 32]) -> Self {
        Self {
            format: STATE_FORMAT,
            identity_seed,
            credentials: None,
            uplink_reservation: 0,
            config_version: 0,
            config: TrapConfig::default(),
            desired_version: 0,
            config_status: ConfigStatus::Applied,
            recent_commands: heapless::Vec::new(),
            ota: OtaState::default(),
        }
    }

    /// Remembers an executed command id, forgetting the oldest beyond
    /// [`RECENT_COMMANDS_MAX`].
    pub fn remember_command(&mut self, id: u32) {
        if self.recent_commands.is_full() {
            self.recent_commands.remove(0);
        }
        // Cannot fail: a slot was just freed.
        let _ = self.recent_commands.push(id);
    }
}

impl fmt::Debug for DeviceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceState")
            .field("credentials", &self.credentials)
            .field("uplink_reservation", &self.uplink_reservation)
            .field("config_version", &self.config_version)
            .field("desired_version", &self.desired_version)
            .field("config_status", &self.config_status)
            .field("recent_commands", &self.recent_commands)
            .field("ota", &self.ota)
            .finish_non_exhaustive()
    }
}

/// Longest encoded [`DeviceState`] with its [`OtaState`] tail (the derived
/// maximum counts the skipped `ota` field too, so it covers the tail).
pub const STATE_LEN_MAX: usize = DeviceState::POSTCARD_MAX_SIZE;

/// Why the state could not be read or written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StateError {
    /// The range is not a usable `sequential-storage` region.
    LayoutInvalid,
    /// The flash reported an error.
    Io,
    /// The state did not encode (cannot happen for a valid state).
    Encode,
    /// The journal is damaged beyond what `sequential-storage` repairs.
    Corrupted,
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::LayoutInvalid => "state flash range is not usable",
            Self::Io => "state flash error",
            Self::Encode => "state does not encode",
            Self::Corrupted => "state journal is corrupted",
        })
    }
}

impl core::error::Error for StateError {}

impl<E> From<sequential_storage::Error<E>> for StateError {
    fn from(error: sequential_storage::Error<E>) -> Self {
        match error {
            sequential_storage::Error::Storage { .. } => Self::Io,
            _ => Self::Corrupted,
        }
    }
}

/// Where the [`DeviceState`] is kept.
pub trait StateStore {
    /// The newest saved state, `None` on a fresh device.
    fn load(&mut self) -> Result<Option<DeviceState>, StateError>;
    /// Durably saves `state` (it is the newest once this returns `Ok`).
    fn save(&mut self, state: &DeviceState) -> Result<(), StateError>;
}

/// The [`DeviceState`] journal on NOR flash (see the module docs).
pub struct FlashStateStore<F> {
    flash: F,
    range: Range<u32>,
}

impl<F> fmt::Debug for FlashStateStore<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlashStateStore")
            .field("range", &self.range)
            .finish_non_exhaustive()
    }
}

/// The journal as `sequential-storage` sees it, for one operation.
type Journal<'f, F> = QueueStorage<BlockingAsync<&'f mut F>, Cache<Uncached, Uncached, Uncached>>;

/// The journal's scratch buffer: a whole item, rounded up to flash words.
const ITEM_BUF_LEN: usize = STATE_LEN_MAX.next_multiple_of(32) + 32;

impl<F: MultiwriteNorFlash> FlashStateStore<F> {
    /// A journal over the page-aligned `range` of `flash` (at least 2 pages).
    pub fn new(flash: F, range: Range<u32>) -> Result<Self, StateError> {
        QueueConfig::<BlockingAsync<&mut F>>::try_new(range.clone())
            .map_err(|_| StateError::LayoutInvalid)?;
        if range.len() < 2 * F::ERASE_SIZE {
            return Err(StateError::LayoutInvalid);
        }
        Ok(Self { flash, range })
    }

    fn journal(&mut self) -> Result<Journal<'_, F>, StateError> {
        let config = QueueConfig::try_new(self.range.clone()).map_err(|_| StateError::LayoutInvalid)?;
        Ok(QueueStorage::new(BlockingAsync(&mut self.flash), config, Cache::new_uncached()))
    }
}

impl<F: MultiwriteNorFlash> StateStore for FlashStateStore<F> {
    fn load(&mut self) -> Result<Option<DeviceState>, StateError> {
        let mut buf = [0u8; ITEM_BUF_LEN];
        let mut journal = self.journal()?;
        block_on(async {
            let mut items = journal.iter().await?;
            let mut newest = None;
            while let Some(item) = items.next(&mut buf).await? {
                if let Some(state) = decode_state(&item) {
                    newest = Some(state);
                }
            }
            Ok::<_, StateError>(newest)
        })
    }

    fn save(&mut self, state: &DeviceState) -> Result<(), StateError> {
        let mut buf = [0u8; STATE_LEN_MAX];
        let item = encode_state(state, &mut buf)?;
        let mut journal = self.journal()?;
        block_on(journal.push(item, true)).map_err(StateError::from)
    }
}

/// A journal item: the state's fields, then its [`OtaState`].
pub fn encode_state<'b>(state: &DeviceState, buf: &'b mut [u8]) -> Result<&'b [u8], StateError> {
    let len = postcard::to_slice(state, buf)
        .map_err(|_| StateError::Encode)?
        .len();
    let tail = buf.get_mut(len..).ok_or(StateError::Encode)?;
    let tail_len = postcard::to_slice(&state.ota, tail)
        .map_err(|_| StateError::Encode)?
        .len();
    buf.get(..len + tail_len).ok_or(StateError::Encode)
}

/// Parses a journal item; `None` for another format or a damaged item. An
/// item without an OTA tail (written before OTA existed) has a default one.
pub fn decode_state(item: &[u8]) -> Option<DeviceState> {
    let (mut state, tail) = postcard::take_from_bytes::<DeviceState>(item).ok()?;
    if state.format != STATE_FORMAT {
        return None;
    }
    if !tail.is_empty() {
        state.ota = postcard::from_bytes(tail).ok()?;
    }
    Some(state)
}
