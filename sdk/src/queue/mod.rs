//! The offline detection queue: a durable FIFO of already-encoded detections,
//! resent until the server acknowledges them.
//!
//! # Sequence numbers
//!
//! Every [`OfflineQueue::append`] stores one record (opaque bytes, at most the
//! store's [`QueueStore::record_len_max`]) under the next per-device sequence
//! number: `1, 2, 3, ...`. A number is never handed out twice, not even across
//! reboots and not even after the queue has been fully acknowledged and is
//! empty. One append is one entry with one number: the queue never duplicates
//! a detection itself.
//!
//! # Acks, the floor and the full policy
//!
//! The server acknowledges with `through`, the highest *contiguous* sequence
//! number it has durably stored; [`OfflineQueue::ack`] releases everything up
//! to it. An ack beyond the highest number handed out is refused
//! ([`QueueError::AckBeyondAssigned`]) so a forged or buggy ack can never
//! release unsent data; a stale ack is a no-op.
//!
//! When the store is full, the caller's [`FullPolicy`] applies:
//! [`FullPolicy::RejectNew`] refuses the append ([`QueueError::Full`]);
//! [`FullPolicy::DropOldest`] removes the oldest unacknowledged entries until
//! the new one fits and counts them in a persistent `dropped_total`. Nothing
//! unacknowledged is lost in any other way. After a drop, the server must be
//! told the new [`OfflineQueue::floor`] (the lowest number still owed) so it
//! stops waiting for the dropped numbers.
//!
//! # Sending
//!
//! [`OfflineQueue::next_to_send`] walks the queue in order with a bounded
//! in-flight window ([`QueueConfig::inflight_max`]): it does not hand out an
//! entry twice until [`OfflineQueue::rewind`] (on reconnect or ack timeout)
//! restarts from the oldest unacknowledged entry.
//!
//! # Stores and durability
//!
//! The queue is sans-IO and blocking; it drives a [`QueueStore`]:
//! [`MemoryStore`] (RAM, for tests and hosts) or [`FlashStore`] (NOR flash via
//! `sequential-storage`, survives reboots and power loss). The commit point of
//! every removal is a [`QueueMeta`] write made *before* the records go: the
//! metadata holds the floor (every number below it is released) and the drop
//! counter. On [`OfflineQueue::open`] the queue finishes any interrupted
//! removal and derives the next number as `max(meta.floor, newest + 1)`, so
//! the metadata only has to be written when something is released, never on
//! append.
//!
//! [`MemFlash`] is an in-RAM NOR flash with fault injection, for tests and the
//! simulator.
//!
//! # Example
//!
//! ```
//! use wildcam_sdk::queue::{FlashStore, FullPolicy, MemFlash, OfflineQueue, RECORD_LEN_MAX};
//!
//! // 8 pages of 4 KiB: 2 for the metadata, 6 for records. On a device, pass
//! // the flash driver (or `&mut` to it) and the data partition's range.
//! let range = 0..8 * 4096;
//! let store = FlashStore::<_>::new(MemFlash::<{ 8 * 4096 }>::new(), range.clone()).unwrap();
//! let mut queue = OfflineQueue::open(store, FullPolicy::DropOldest).unwrap();
//!
//! assert_eq!(queue.append(b"encoded detection").unwrap().seq, 1);
//! let mut buf = [0; RECORD_LEN_MAX];
//! while let Some(entry) = queue.next_to_send(&mut buf).unwrap() {
//!     // Publish `entry.record` under `entry.seq`.
//!     assert_eq!((entry.seq, entry.record), (1, &b"encoded detection"[..]));
//! }
//! // The server has durably stored everything through 1.
//! assert_eq!(queue.ack(1).unwrap().released, 1);
//!
//! // After a reboot the numbering goes on, even though the queue is empty.
//! let flash = queue.into_store().into_flash();
//! let mut queue = OfflineQueue::open(FlashStore::<_>::new(flash, range).unwrap(), FullPolicy::DropOldest).unwrap();
//! assert!(queue.is_empty());
//! assert_eq!(queue.append(b"next").unwrap().seq, 2);
//! ```

use core::fmt;

use serde::{Deserialize, Serialize};

mod flash;
mod mem_flash;
mod memory;

pub use flash::{BlockingAsync, FlashStore, LayoutError, META_PAGES};
pub use mem_flash::{Fault, MemFlash, MemFlashError, OpCounts, OpKind};
pub use memory::MemoryStore;

/// Default longest record, in bytes (the default of the stores' const
/// parameter).
pub const RECORD_LEN_MAX: usize = 128;

/// Default bound of the in-flight window.
pub const INFLIGHT_MAX_DEFAULT: usize = 8;

/// Why a [`QueueStore`] operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum StoreError {
    /// There is no room for the record; nothing was changed.
    Full,
    /// The record is longer than [`QueueStore::record_len_max`]; nothing was
    /// changed.
    RecordTooLarge,
    /// The caller's buffer is shorter than the stored record; nothing was
    /// changed.
    BufferTooSmall,
    /// The storage device reported an error; the operation may or may not have
    /// taken effect.
    Io,
    /// The stored data is inconsistent and could not be repaired; erasing the
    /// store is the way out.
    Corrupted,
}

impl StoreError {
    /// True when the error guarantees that nothing was changed.
    pub const fn is_clean(self) -> bool {
        matches!(self, Self::Full | Self::RecordTooLarge | Self::BufferTooSmall)
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Full => "queue storage is full",
            Self::RecordTooLarge => "record is longer than the store accepts",
            Self::BufferTooSmall => "buffer is shorter than the stored record",
            Self::Io => "queue storage device error",
            Self::Corrupted => "queue storage is corrupted",
        })
    }
}

impl core::error::Error for StoreError {}

/// Why an [`OfflineQueue`] operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum QueueError {
    /// The store is full and the policy is [`FullPolicy::RejectNew`]; nothing
    /// was appended and no sequence number was used.
    Full,
    /// The record is longer than the store accepts.
    RecordTooLarge,
    /// The caller's buffer is shorter than the entry to return.
    BufferTooSmall,
    /// The ack names a sequence number that was never handed out; it was not
    /// applied.
    AckBeyondAssigned,
    /// All `u32` sequence numbers have been used.
    SequenceExhausted,
    /// The storage device reported an error. The operation may or may not have
    /// taken effect; the queue re-reads its state before the next operation.
    Io,
    /// The stored data is inconsistent and could not be repaired.
    Corrupted,
    /// The encoder given to [`OfflineQueue::append_with`] failed; nothing was
    /// appended and no sequence number was used.
    RecordEncode,
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Full => "offline queue is full",
            Self::RecordTooLarge => "record is longer than the queue accepts",
            Self::BufferTooSmall => "buffer is shorter than the queued record",
            Self::AckBeyondAssigned => "ack beyond the highest sequence number assigned",
            Self::SequenceExhausted => "sequence numbers exhausted",
            Self::Io => "offline queue storage error",
            Self::Corrupted => "offline queue storage is corrupted",
            Self::RecordEncode => "the record could not be encoded",
        })
    }
}

impl core::error::Error for QueueError {}

impl From<StoreError> for QueueError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Full => Self::Full,
            StoreError::RecordTooLarge => Self::RecordTooLarge,
            StoreError::BufferTooSmall => Self::BufferTooSmall,
            StoreError::Io => Self::Io,
            StoreError::Corrupted => Self::Corrupted,
        }
    }
}

/// What [`OfflineQueue::append`] does when the store is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum FullPolicy {
    /// Refuse the new record with [`QueueError::Full`]; the caller decides.
    RejectNew,
    /// Drop the oldest unacknowledged entries (counted in
    /// [`QueueStats::dropped_total`]) until the new record fits.
    DropOldest,
}

/// Queue settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct QueueConfig {
    /// What to do when the store is full.
    pub policy: FullPolicy,
    /// Most entries handed out by [`OfflineQueue::next_to_send`] and not yet
    /// acknowledged, until [`OfflineQueue::rewind`]. At least 1.
    pub inflight_max: usize,
}

impl QueueConfig {
    /// `policy` with the default window of [`INFLIGHT_MAX_DEFAULT`].
    pub const fn new(policy: FullPolicy) -> Self {
        Self { policy, inflight_max: INFLIGHT_MAX_DEFAULT }
    }

    /// The same settings with another in-flight window (0 is taken as 1).
    pub const fn with_inflight_max(self, inflight_max: usize) -> Self {
        let inflight_max = if inflight_max == 0 { 1 } else { inflight_max };
        Self { inflight_max, ..self }
    }
}

/// The small metadata a store persists next to the records.
///
/// Writing it is the commit point of every removal: the queue saves it
/// before it removes records, and on open removes whatever it says is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct QueueMeta {
    /// Every sequence number below this has been released (acknowledged or
    /// dropped). The next sequence number is never below it.
    pub floor: u32,
    /// Entries dropped by [`FullPolicy::DropOldest`] over the device's life.
    pub dropped_total: u32,
}

impl QueueMeta {
    /// The metadata of a store that has never been used.
    pub const INITIAL: Self = Self { floor: 1, dropped_total: 0 };
}

/// Where a record was found by [`QueueStore::read_from`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct StoredRecord {
    /// The record's sequence number.
    pub seq: u32,
    /// How many bytes were copied to the start of the caller's buffer.
    pub len: usize,
}

/// The result of [`QueueStore::remove_through`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Removed {
    /// How many records were removed.
    pub count: usize,
    /// The sequence number of the oldest record left, if any.
    pub oldest: Option<u32>,
}

/// What a store holds, from [`QueueStore::scan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Extent {
    /// Number of records.
    pub len: usize,
    /// Sequence number of the oldest record.
    pub oldest: Option<u32>,
    /// Sequence number of the newest record.
    pub newest: Option<u32>,
}

/// How full a store is, counted in records of the maximum length.
///
/// For flash this is an estimate: records are packed per page and shorter
/// records take less room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Fullness {
    /// Maximum-length records that still fit.
    pub free: u32,
    /// Maximum-length records an empty store holds.
    pub capacity: u32,
}

/// The narrow storage interface of the offline queue.
///
/// Records are kept in the order they were pushed, each with its sequence
/// number; the queue only ever pushes increasing numbers and only removes
/// from the front. Every method is blocking. Implementations must make
/// [`push`](Self::push) and [`save_meta`](Self::save_meta) atomic with respect
/// to power loss: afterwards a record is either fully present (with its own
/// sequence number) or absent, and [`load_meta`](Self::load_meta) returns
/// either the old or the new metadata.
pub trait QueueStore {
    /// Longest record this store accepts, in bytes.
    fn record_len_max(&self) -> usize;

    /// Appends `record` under `seq` (greater than every stored number),
    /// durably once this returns `Ok`. [`StoreError::Full`] when it does not
    /// fit.
    fn push(&mut self, seq: u32, record: &[u8]) -> Result<(), StoreError>;

    /// Copies the oldest record whose sequence number is at least `from` to
    /// the start of `buf`.
    fn read_from(&mut self, from: u32, buf: &mut [u8]) -> Result<Option<StoredRecord>, StoreError>;

    /// Removes every record whose sequence number is at most `through`
    /// (oldest first).
    fn remove_through(&mut self, through: u32) -> Result<Removed, StoreError>;

    /// Counts the records and finds the oldest and newest sequence numbers.
    fn scan(&mut self) -> Result<Extent, StoreError>;

    /// The last metadata saved, or `None` for a store never written.
    fn load_meta(&mut self) -> Result<Option<QueueMeta>, StoreError>;

    /// Durably replaces the metadata.
    fn save_meta(&mut self, meta: QueueMeta) -> Result<(), StoreError>;

    /// How full the store is.
    fn fullness(&mut self) -> Result<Fullness, StoreError>;
}

/// The result of a successful [`OfflineQueue::append`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Appended {
    /// The sequence number the record was stored under.
    pub seq: u32,
    /// How many of the oldest entries were dropped to make room
    /// ([`FullPolicy::DropOldest`] only).
    pub dropped: u32,
    /// The highest sequence number dropped to make room, if any: the server
    /// must be told that the floor moved.
    pub dropped_oldest: Option<u32>,
}

/// The result of a successful [`OfflineQueue::ack`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct AckOutcome {
    /// How many entries were released (0 for a stale ack).
    pub released: usize,
}

/// A queued entry, borrowed from the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Entry<'a> {
    /// The entry's sequence number.
    pub seq: u32,
    /// The record bytes as appended.
    pub record: &'a [u8],
}

/// A snapshot of the queue, for health reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct QueueStats {
    /// The sequence number the next append will get.
    pub next_seq: u32,
    /// The oldest unacknowledged entry, if any.
    pub oldest_unacked: Option<u32>,
    /// The lowest sequence number still owed: `oldest_unacked`, or `next_seq`
    /// when the queue is empty. Everything below was acknowledged or dropped.
    pub floor: u32,
    /// Unacknowledged entries.
    pub len: u32,
    /// Entries handed out by the send cursor and not yet acknowledged.
    pub inflight: u32,
    /// Entries dropped by [`FullPolicy::DropOldest`] over the device's life.
    pub dropped_total: u32,
}

/// The offline detection queue over a [`QueueStore`].
#[derive(Debug)]
pub struct OfflineQueue<S: QueueStore> {
    store: S,
    config: QueueConfig,
    /// The metadata last committed to the store.
    meta: QueueMeta,
    next_seq: u32,
    oldest: Option<u32>,
    len: usize,
    /// The lowest sequence number the send cursor may hand out next.
    cursor: u32,
    /// Entries below `cursor` still queued: always the oldest ones.
    inflight: usize,
    /// A storage error left the in-RAM state unsure; re-read before use.
    stale: bool,
    /// The highest ack accepted since the queue was created (RAM only).
    server_acked: u32,
}

impl<S: QueueStore> OfflineQueue<S> {
    /// Opens the queue over `store` with the default in-flight window,
    /// recovering the next sequence number, the entries and the counters.
    ///
    /// On error the store is dropped: pass a store over `&mut` flash to keep
    /// the device.
    pub fn open(store: S, policy: FullPolicy) -> Result<Self, QueueError> {
        Self::open_with(store, QueueConfig::new(policy))
    }

    /// [`open`](Self::open) with explicit settings.
    pub fn open_with(store: S, config: QueueConfig) -> Result<Self, QueueError> {
        let mut queue = Self::new(store, config);
        queue.resync()?;
        Ok(queue)
    }

    /// Wraps `store` without reading it: the first operation (or
    /// [`resync`](Self::resync)) recovers the state, and on a storage error
    /// the store stays in the queue (see [`into_store`](Self::into_store)).
    /// Until then the counters read as for an empty, never-used queue.
    pub fn new(store: S, config: QueueConfig) -> Self {
        Self {
            store,
            config: config.with_inflight_max(config.inflight_max),
            meta: QueueMeta::INITIAL,
            next_seq: 1,
            oldest: None,
            len: 0,
            cursor: 1,
            inflight: 0,
            stale: true,
            server_acked: 0,
        }
    }

    /// False until the state has been read from the store, and again after a
    /// storage error until it is re-read.
    pub fn is_synced(&self) -> bool {
        !self.stale
    }

    /// Re-reads the state from the store, finishing any interrupted removal,
    /// and rewinds the send cursor. Done automatically before the next
    /// operation after a storage error.
    pub fn resync(&mut self) -> Result<(), QueueError> {
        self.stale = true;
        let meta = self.store.load_meta()?.unwrap_or(QueueMeta::INITIAL);
        if let Some(released) = meta.floor.checked_sub(1).filter(|r| *r > 0) {
            self.store.remove_through(released)?;
        }
        let extent = self.store.scan()?;
        let after_newest = match extent.newest {
            Some(newest) => newest.checked_add(1).ok_or(QueueError::Corrupted)?,
            None => 1,
        };
        self.meta = meta;
        self.next_seq = meta.floor.max(after_newest);
        self.oldest = extent.oldest;
        self.len = extent.len;
        self.rewind();
        self.stale = false;
        Ok(())
    }

    /// Appends `record` under the next sequence number, applying the full
    /// policy if the store has no room.
    ///
    /// On [`QueueError::Io`] the record may or may not have been stored; if
    /// it was, it has the number it would have had, and numbers are never
    /// reused.
    pub fn append(&mut self, record: &[u8]) -> Result<Appended, QueueError> {
        self.ensure_synced()?;
        if record.len() > self.store.record_len_max() {
            return Err(QueueError::RecordTooLarge);
        }
        let seq = self.next_seq;
        if seq == u32::MAX {
            return Err(QueueError::SequenceExhausted);
        }
        let mut appended = Appended { seq, dropped: 0, dropped_oldest: None };
        while let Err(error) = self.store.push(seq, record) {
            if error != StoreError::Full || !self.may_drop() {
                return Err(self.fail(error));
            }
            appended.dropped_oldest = Some(self.drop_oldest()?);
            appended.dropped += 1;
        }
        self.next_seq = seq + 1;
        self.len += 1;
        self.oldest.get_or_insert(seq);
        Ok(appended)
    }

    /// Appends a record that carries its own sequence number: `encode` gets
    /// the number this record will have and a buffer of the longest record
    /// the store accepts, writes the record, and returns its length (`None`
    /// if it cannot encode it). This is how a detection, whose message holds
    /// its sequence, enters the queue.
    pub fn append_with<F>(&mut self, encode: F) -> Result<Appended, QueueError>
    where
        F: FnOnce(u32, &mut [u8]) -> Option<usize>,
    {
        self.ensure_synced()?;
        let mut buf = [0u8; RECORD_LEN_MAX];
        let limit = self.store.record_len_max().min(RECORD_LEN_MAX);
        let buf = &mut buf[..limit];
        let len = encode(self.next_seq, buf).ok_or(QueueError::RecordEncode)?;
        let record = buf.get(..len).ok_or(QueueError::RecordEncode)?;
        let appended = self.append(record)?;
        debug_assert_eq!(appended.seq + 1, self.next_seq);
        Ok(appended)
    }

    /// Releases every entry up to and including `through`, the highest
    /// contiguous sequence number the server has durably stored.
    ///
    /// A stale ack (below the floor) is a no-op; an ack beyond the highest
    /// number handed out is refused with [`QueueError::AckBeyondAssigned`].
    pub fn ack(&mut self, through: u32) -> Result<AckOutcome, QueueError> {
        self.ensure_synced()?;
        if through >= self.next_seq {
            return Err(QueueError::AckBeyondAssigned);
        }
        self.server_acked = self.server_acked.max(through);
        if self.oldest.is_none_or(|oldest| oldest > through) {
            return Ok(AckOutcome { released: 0 });
        }
        let meta = QueueMeta { floor: through + 1, ..self.meta };
        let released = self.release_through(through, meta)?;
        Ok(AckOutcome { released })
    }

    /// The next entry to send, copied into `buf`, or `None` when everything
    /// queued is in flight or the in-flight window is full.
    pub fn next_to_send<'b>(&mut self, buf: &'b mut [u8]) -> Result<Option<Entry<'b>>, QueueError> {
        self.ensure_synced()?;
        if self.inflight >= self.config.inflight_max || self.len == 0 {
            return Ok(None);
        }
        let from = self.cursor.max(self.floor());
        let Some(entry) = self.read(from, buf)? else {
            return Ok(None);
        };
        // Cannot overflow: u32::MAX is never assigned.
        self.cursor = entry.seq.saturating_add(1);
        self.inflight += 1;
        Ok(Some(entry))
    }

    /// Restarts the send cursor at the oldest unacknowledged entry (on
    /// reconnect or ack timeout): everything unacknowledged is sent again, in
    /// order.
    pub fn rewind(&mut self) {
        self.cursor = self.floor();
        self.inflight = 0;
    }

    /// The oldest entry whose sequence number is at least `from`, copied into
    /// `buf`, without moving the send cursor (for inspection).
    pub fn peek_from<'b>(&mut self, from: u32, buf: &'b mut [u8]) -> Result<Option<Entry<'b>>, QueueError> {
        self.ensure_synced()?;
        self.read(from.max(self.floor()), buf)
    }

    /// Unacknowledged entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when every entry has been acknowledged or dropped.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The lowest sequence number still owed: the oldest unacknowledged
    /// entry, or the next sequence number when the queue is empty.
    pub fn floor(&self) -> u32 {
        self.oldest.unwrap_or(self.next_seq)
    }

    /// True when the highest ack accepted since the queue was opened is below
    /// [`floor`](Self::floor) − 1: the full policy dropped entries the server
    /// never acknowledged (or nothing was acked since a reboot). The server
    /// holds its contiguous ack at such a gap until a hello carries the new
    /// floor, so the device says hello again, e.g. when its ack timeout fires
    /// (the hello that carried the floor may have been lost).
    pub fn server_behind_floor(&self) -> bool {
        self.floor() > self.server_acked.saturating_add(1)
    }

    /// Entries handed out by the send cursor and not yet acknowledged.
    pub fn inflight(&self) -> usize {
        self.inflight
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> QueueStats {
        QueueStats {
            next_seq: self.next_seq,
            oldest_unacked: self.oldest,
            floor: self.floor(),
            len: u32::try_from(self.len).unwrap_or(u32::MAX),
            inflight: u32::try_from(self.inflight).unwrap_or(u32::MAX),
            dropped_total: self.meta.dropped_total,
        }
    }

    /// How full the store is.
    pub fn fullness(&mut self) -> Result<Fullness, QueueError> {
        self.store.fullness().map_err(|error| self.fail(error))
    }

    /// The settings in use.
    pub fn config(&self) -> QueueConfig {
        self.config
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The store, mutably: for fault injection and diagnostics. Changing its
    /// contents behind the queue's back requires [`resync`](Self::resync).
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    /// Gives the store back (to reopen it later, as after a reboot).
    pub fn into_store(self) -> S {
        self.store
    }

    fn ensure_synced(&mut self) -> Result<(), QueueError> {
        if self.stale { self.resync() } else { Ok(()) }
    }

    /// Converts a store error, remembering to re-read the state unless the
    /// error guarantees nothing changed.
    fn fail(&mut self, error: StoreError) -> QueueError {
        if !error.is_clean() {
            self.stale = true;
        }
        error.into()
    }

    fn may_drop(&self) -> bool {
        self.config.policy == FullPolicy::DropOldest && self.len > 0
    }

    fn read<'b>(&mut self, from: u32, buf: &'b mut [u8]) -> Result<Option<Entry<'b>>, QueueError> {
        let found = self
            .store
            .read_from(from, buf)
            .map_err(|error| self.fail(error))?;
        let Some(found) = found else {
            return Ok(None);
        };
        let buf: &'b [u8] = buf;
        let record = buf.get(..found.len).ok_or(QueueError::Corrupted)?;
        Ok(Some(Entry { seq: found.seq, record }))
    }

    /// Drops the oldest entry, counted; returns its sequence number.
    fn drop_oldest(&mut self) -> Result<u32, QueueError> {
        let oldest = self.oldest.ok_or(QueueError::Corrupted)?;
        let meta = QueueMeta {
            floor: oldest.saturating_add(1),
            dropped_total: self.meta.dropped_total.saturating_add(1),
        };
        self.release_through(oldest, meta)?;
        Ok(oldest)
    }

    /// Commits `meta`, then removes the records it releases.
    fn release_through(&mut self, through: u32, meta: QueueMeta) -> Result<usize, QueueError> {
        self.store
            .save_meta(meta)
            .map_err(|error| self.fail(error))?;
        self.meta = meta;
        let removed = self
            .store
            .remove_through(through)
            .map_err(|error| self.fail(error))?;
        self.len = self.len.saturating_sub(removed.count);
        self.oldest = removed.oldest;
        self.inflight = self.inflight.saturating_sub(removed.count);
        self.cursor = self.cursor.max(meta.floor);
        Ok(removed.count)
    }
}

#[cfg(test)]
mod tests;
