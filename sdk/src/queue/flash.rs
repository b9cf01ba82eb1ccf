//! [`FlashStore`]: the queue store on NOR flash, over `sequential-storage`.

use core::fmt;
use core::ops::Range;

use embassy_futures::block_on;
use embedded_storage::nor_flash::{self as blocking, MultiwriteNorFlash, NorFlashError, NorFlashErrorKind};
use embedded_storage_async::nor_flash as asynch;
use sequential_storage::Error as SsError;
use sequential_storage::cache::{Cache, Uncached};
use sequential_storage::queue::{QueueConfig as SsQueueConfig, QueueStorage};

use super::{Extent, Fullness, QueueMeta, QueueStore, Removed, StoreError, StoredRecord};

/// Pages at the start of a [`FlashStore`] range that hold the metadata
/// journal.
pub const META_PAGES: u32 = 2;

/// Bytes of the sequence number in front of every record item.
const SEQ_LEN: usize = 4;
/// Encoded [`QueueMeta`] item length.
const META_LEN: usize = 12;
/// Tag and format version of a metadata item.
const META_TAG: [u8; 4] = [b'W', b'Q', 1, 0];

/// Adapts a blocking [`blocking::NorFlash`] to the `embedded-storage-async`
/// traits: every future completes on its first poll, so it can be driven by
/// [`embassy_futures::block_on`].
#[derive(Debug)]
pub struct BlockingAsync<F>(pub F);

impl<F: blocking::ErrorType> blocking::ErrorType for BlockingAsync<F> {
    type Error = F::Error;
}

impl<F: blocking::ReadNorFlash> asynch::ReadNorFlash for BlockingAsync<F> {
    const READ_SIZE: usize = F::READ_SIZE;

    async fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Self::Error> {
        blocking::ReadNorFlash::read(&mut self.0, offset, bytes)
    }

    fn capacity(&self) -> usize {
        blocking::ReadNorFlash::capacity(&self.0)
    }
}

impl<F: blocking::NorFlash> asynch::NorFlash for BlockingAsync<F> {
    const WRITE_SIZE: usize = F::WRITE_SIZE;
    const ERASE_SIZE: usize = F::ERASE_SIZE;

    async fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
        blocking::NorFlash::erase(&mut self.0, from, to)
    }

    async fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Self::Error> {
        blocking::NorFlash::write(&mut self.0, offset, bytes)
    }
}

impl<F: MultiwriteNorFlash> asynch::MultiwriteNorFlash for BlockingAsync<F> {}

/// Why a [`FlashStore`] layout was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum LayoutError {
    /// The range does not start and end on page boundaries.
    NotPageAligned,
    /// The range extends past the end of the flash.
    OutOfBounds,
    /// The range has fewer than [`META_PAGES`] + 2 pages.
    TooFewPages,
    /// A maximum-length record does not fit in one page (or in the store's
    /// read buffer, for tiny records on flash with large words).
    RecordTooLarge,
}

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotPageAligned => "queue flash range is not page aligned",
            Self::OutOfBounds => "queue flash range is past the end of the flash",
            Self::TooFewPages => "queue flash range needs at least 4 pages",
            Self::RecordTooLarge => "a maximum-length record does not fit in a flash page",
        })
    }
}

impl core::error::Error for LayoutError {}

/// The read/write buffer of a store: twice the record length, because stable
/// Rust cannot size an array as `RECORD_LEN_MAX + SEQ_LEN`. Word aligned for
/// flash drivers that want it.
#[derive(Debug)]
#[repr(align(4))]
struct Scratch<const N: usize>([[u8; N]; 2]);

/// A [`QueueStore`] on NOR flash holding records of up to `RECORD_LEN_MAX`
/// bytes. It survives reboots and power loss in the middle of any write.
///
/// Reads scan from the oldest record (there is no RAM cache), so
/// [`QueueStore::read_from`] costs O(records); pass `&mut flash` as `F` to
/// keep the flash after dropping the store.
///
/// # Flash layout
///
/// The store's flash range (page aligned) is split in two
/// `sequential-storage` queues:
///
/// - **meta**: the first [`META_PAGES`] pages, a journal of [`QueueMeta`]
///   items (12 bytes each: `b"WQ"`, format version, a zero byte, `floor` and
///   `dropped_total` as little-endian `u32`). Items are appended with overwrite
///   on, so the journal cycles through its pages; the newest item wins. Two
///   pages are needed so the newest item is never on the page being erased.
/// - **records**: the remaining pages (at least 2), one item per record: the
///   sequence number as a little-endian `u32`, then the record bytes. Items are
///   appended without overwrite and popped from the front.
///
/// A record item takes 8 bytes of header plus `4 + len` rounded up to the
/// flash word; each page loses two words to its state markers. On ESP32 flash
/// (4 KiB pages, 4-byte words) a 128-byte record takes 140 bytes, so a page
/// holds 29 of them: a 64 KiB range (2 metadata + 14 record pages) holds 406
/// maximum-length records, more when they are shorter.
///
/// `sequential-storage` protects every item with a CRC and repairs interrupted
/// writes and erases, so an item is either fully present or ignored after a
/// power loss. It needs [`MultiwriteNorFlash`] (popping an item rewrites its
/// header), which the ESP32 flash driver provides.
pub struct FlashStore<F, const RECORD_LEN_MAX: usize = { super::RECORD_LEN_MAX }> {
    flash: F,
    meta: Range<u32>,
    records: Range<u32>,
    scratch: Scratch<RECORD_LEN_MAX>,
    last_io_error: Option<NorFlashErrorKind>,
}

type Ss<'f, F> = QueueStorage<BlockingAsync<&'f mut F>, Cache<Uncached, Uncached, Uncached>>;

/// Wraps one region of `flash` as a `sequential-storage` queue for a single
/// operation (there is no cache to keep between operations).
fn region<F: MultiwriteNorFlash>(flash: &mut F, range: Range<u32>) -> Result<Ss<'_, F>, StoreError> {
    let config = SsQueueConfig::try_new(range).map_err(|_| StoreError::Corrupted)?;
    Ok(QueueStorage::new(BlockingAsync(flash), config, Cache::new_uncached()))
}

/// The flash word: the larger of the read and write sizes.
const fn word_size<F: blocking::NorFlash>() -> usize {
    if F::READ_SIZE > F::WRITE_SIZE { F::READ_SIZE } else { F::WRITE_SIZE }
}

/// Bytes a maximum-length record item takes in flash, header included.
fn item_size<F: MultiwriteNorFlash, const RECORD_LEN_MAX: usize>() -> usize {
    let overhead = Ss::<F>::item_overhead_size() as usize;
    overhead + (SEQ_LEN + RECORD_LEN_MAX).next_multiple_of(word_size::<F>())
}

/// Splits a record item into its sequence number and record bytes.
fn split_item(item: &[u8]) -> Option<(u32, &[u8])> {
    let (seq, record) = item.split_first_chunk::<SEQ_LEN>()?;
    Some((u32::from_le_bytes(*seq), record))
}

fn encode_meta(meta: QueueMeta) -> [u8; META_LEN] {
    let mut item = [0; META_LEN];
    item[..4].copy_from_slice(&META_TAG);
    item[4..8].copy_from_slice(&meta.floor.to_le_bytes());
    item[8..].copy_from_slice(&meta.dropped_total.to_le_bytes());
    item
}

fn decode_meta(item: &[u8]) -> Option<QueueMeta> {
    let (tag, rest) = item.split_first_chunk::<4>()?;
    let (floor, rest) = rest.split_first_chunk::<4>()?;
    let (dropped, rest) = rest.split_first_chunk::<4>()?;
    (*tag == META_TAG && rest.is_empty())
        .then(|| QueueMeta { floor: u32::from_le_bytes(*floor), dropped_total: u32::from_le_bytes(*dropped) })
}

/// A failure inside a `sequential-storage` operation.
enum Fail<E> {
    Flash(SsError<E>),
    Store(StoreError),
}

impl<E> From<SsError<E>> for Fail<E> {
    fn from(error: SsError<E>) -> Self {
        Self::Flash(error)
    }
}

impl<F: MultiwriteNorFlash, const RECORD_LEN_MAX: usize> FlashStore<F, RECORD_LEN_MAX> {
    /// A store over the page-aligned `range` of `flash`: the first
    /// [`META_PAGES`] pages for metadata, the rest (at least 2 pages) for
    /// records. A fresh (erased) range is an empty queue.
    pub fn new(flash: F, range: Range<u32>) -> Result<Self, LayoutError> {
        let page = u32::try_from(F::ERASE_SIZE).map_err(|_| LayoutError::NotPageAligned)?;
        if page == 0 || !range.start.is_multiple_of(page) || !range.end.is_multiple_of(page) {
            return Err(LayoutError::NotPageAligned);
        }
        if range.end as usize > flash.capacity() {
            return Err(LayoutError::OutOfBounds);
        }
        let split = range.start.saturating_add(META_PAGES * page);
        if range.end < split.saturating_add(2 * page) {
            return Err(LayoutError::TooFewPages);
        }
        Self::check_record_fits()?;
        let (meta, records) = (range.start..split, split..range.end);
        for part in [&meta, &records] {
            SsQueueConfig::<BlockingAsync<&mut F>>::try_new(part.clone())
                .map_err(|_| LayoutError::TooFewPages)?;
        }
        let scratch = Scratch([[0; RECORD_LEN_MAX]; 2]);
        Ok(Self { flash, meta, records, scratch, last_io_error: None })
    }

    fn check_record_fits() -> Result<(), LayoutError> {
        let page_data = F::ERASE_SIZE.saturating_sub(2 * word_size::<F>());
        let read_len = (SEQ_LEN + RECORD_LEN_MAX).next_multiple_of(word_size::<F>());
        if item_size::<F, RECORD_LEN_MAX>() > page_data || read_len > 2 * RECORD_LEN_MAX {
            return Err(LayoutError::RecordTooLarge);
        }
        Ok(())
    }

    /// The metadata journal's flash range.
    pub fn meta_range(&self) -> Range<u32> {
        self.meta.clone()
    }

    /// The records' flash range.
    pub fn records_range(&self) -> Range<u32> {
        self.records.clone()
    }

    /// The kind of the last flash error behind a [`StoreError::Io`].
    pub fn last_io_error(&self) -> Option<NorFlashErrorKind> {
        self.last_io_error
    }

    /// The flash.
    pub fn flash(&self) -> &F {
        &self.flash
    }

    /// The flash, mutably (for fault injection). Writing to the store's range
    /// behind its back loses data.
    pub fn flash_mut(&mut self) -> &mut F {
        &mut self.flash
    }

    /// Gives the flash back.
    pub fn into_flash(self) -> F {
        self.flash
    }

    /// Erases the whole range: every record and the metadata, including the
    /// sequence numbers. Only for a store reported [`StoreError::Corrupted`]
    /// or a device being reset to factory state.
    pub fn erase_all(&mut self) -> Result<(), StoreError> {
        for range in [self.meta.clone(), self.records.clone()] {
            let mut queue = region(&mut self.flash, range)?;
            let result = block_on(queue.erase_all());
            self.check(result.map_err(Fail::Flash))?;
        }
        Ok(())
    }

    /// Converts a failed operation, remembering the flash error kind.
    fn check<T>(&mut self, result: Result<T, Fail<F::Error>>) -> Result<T, StoreError> {
        result.map_err(|fail| match fail {
            Fail::Store(error) => error,
            Fail::Flash(SsError::Storage { value, .. }) => {
                self.last_io_error = Some(value.kind());
                StoreError::Io
            }
            Fail::Flash(SsError::FullStorage) => StoreError::Full,
            Fail::Flash(SsError::ItemTooBig) => StoreError::RecordTooLarge,
            Fail::Flash(_) => StoreError::Corrupted,
        })
    }
}

impl<F: MultiwriteNorFlash, const RECORD_LEN_MAX: usize> QueueStore for FlashStore<F, RECORD_LEN_MAX> {
    fn record_len_max(&self) -> usize {
        RECORD_LEN_MAX
    }

    fn push(&mut self, seq: u32, record: &[u8]) -> Result<(), StoreError> {
        if record.len() > RECORD_LEN_MAX {
            return Err(StoreError::RecordTooLarge);
        }
        let item = self
            .scratch
            .0
            .as_flattened_mut()
            .get_mut(..SEQ_LEN + record.len())
            .ok_or(StoreError::RecordTooLarge)?;
        let (head, tail) = item.split_at_mut(SEQ_LEN);
        head.copy_from_slice(&seq.to_le_bytes());
        tail.copy_from_slice(record);
        let mut queue = region(&mut self.flash, self.records.clone())?;
        let result = block_on(queue.push(item, false));
        self.check(result.map_err(Fail::Flash))
    }

    fn read_from(&mut self, from: u32, buf: &mut [u8]) -> Result<Option<StoredRecord>, StoreError> {
        let scratch = self.scratch.0.as_flattened_mut();
        let mut queue = region(&mut self.flash, self.records.clone())?;
        let result = block_on(async {
            let mut items = queue.iter().await?;
            while let Some(item) = items.next(&mut *scratch).await? {
                let Some((seq, record)) = split_item(&item).filter(|(seq, _)| *seq >= from) else {
                    continue;
                };
                let target = buf
                    .get_mut(..record.len())
                    .ok_or(Fail::Store(StoreError::BufferTooSmall))?;
                target.copy_from_slice(record);
                return Ok(Some(StoredRecord { seq, len: record.len() }));
            }
            Ok(None)
        });
        self.check(result)
    }

    fn remove_through(&mut self, through: u32) -> Result<Removed, StoreError> {
        let scratch = self.scratch.0.as_flattened_mut();
        let mut queue = region(&mut self.flash, self.records.clone())?;
        let result = block_on(async {
            let mut items = queue.iter().await?;
            let mut count = 0;
            while let Some(item) = items.next(&mut *scratch).await? {
                // An item too short to be a record is garbage: drop it too.
                let seq = split_item(&item).map(|(seq, _)| seq);
                if let Some(seq) = seq.filter(|seq| *seq > through) {
                    return Ok(Removed { count, oldest: Some(seq) });
                }
                item.pop().await?;
                count += usize::from(seq.is_some());
            }
            Ok(Removed { count, oldest: None })
        });
        self.check(result)
    }

    fn scan(&mut self) -> Result<Extent, StoreError> {
        let scratch = self.scratch.0.as_flattened_mut();
        let mut queue = region(&mut self.flash, self.records.clone())?;
        let result = block_on(async {
            let mut items = queue.iter().await?;
            let mut extent = Extent { len: 0, oldest: None, newest: None };
            while let Some(item) = items.next(&mut *scratch).await? {
                let Some((seq, _)) = split_item(&item) else {
                    continue;
                };
                if extent.newest.is_some_and(|newest| newest >= seq) {
                    return Err(Fail::Store(StoreError::Corrupted));
                }
                extent.len += 1;
                extent.oldest.get_or_insert(seq);
                extent.newest = Some(seq);
            }
            Ok(extent)
        });
        self.check(result)
    }

    fn load_meta(&mut self) -> Result<Option<QueueMeta>, StoreError> {
        let mut buf = [0; META_LEN.next_multiple_of(32)];
        let mut queue = region(&mut self.flash, self.meta.clone())?;
        let result = block_on(async {
            let mut items = queue.iter().await?;
            let mut newest = None;
            while let Some(item) = items.next(&mut buf).await? {
                newest = decode_meta(&item).or(newest);
            }
            Ok(newest)
        });
        self.check(result)
    }

    fn save_meta(&mut self, meta: QueueMeta) -> Result<(), StoreError> {
        let mut queue = region(&mut self.flash, self.meta.clone())?;
        let result = block_on(queue.push(&encode_meta(meta), true));
        self.check(result.map_err(Fail::Flash))
    }

    fn fullness(&mut self) -> Result<Fullness, StoreError> {
        let mut queue = region(&mut self.flash, self.records.clone())?;
        let result = block_on(queue.space_left());
        let free_bytes = self.check(result.map_err(Fail::Flash))? as usize;
        let item = item_size::<F, RECORD_LEN_MAX>();
        let per_page = F::ERASE_SIZE.saturating_sub(2 * word_size::<F>()) / item;
        let pages = self.records.len() / F::ERASE_SIZE;
        let to_u32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let capacity = pages * per_page;
        Ok(Fullness { free: to_u32((free_bytes / item).min(capacity)), capacity: to_u32(capacity) })
    }
}

impl<F, const RECORD_LEN_MAX: usize> fmt::Debug for FlashStore<F, RECORD_LEN_MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlashStore")
            .field("meta", &self.meta)
            .field("records", &self.records)
            .field("record_len_max", &RECORD_LEN_MAX)
            .field("last_io_error", &self.last_io_error)
            .finish_non_exhaustive()
    }
}
