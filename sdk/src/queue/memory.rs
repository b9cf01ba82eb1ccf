//! [`MemoryStore`]: the queue store in RAM.

use heapless::{Deque, Vec};

use super::{Extent, Fullness, QueueMeta, QueueStore, Removed, StoreError, StoredRecord};

/// A [`QueueStore`] in RAM holding up to `CAPACITY` records of up to
/// `RECORD_LEN_MAX` bytes, without allocation.
///
/// It does not survive a real reboot; in tests, "rebooting" is reopening an
/// [`OfflineQueue`](super::OfflineQueue) over the same store.
#[derive(Debug, Clone)]
pub struct MemoryStore<const CAPACITY: usize, const RECORD_LEN_MAX: usize = { super::RECORD_LEN_MAX }> {
    records: Deque<(u32, Vec<u8, RECORD_LEN_MAX>), CAPACITY>,
    meta: Option<QueueMeta>,
}

impl<const CAPACITY: usize, const RECORD_LEN_MAX: usize> MemoryStore<CAPACITY, RECORD_LEN_MAX> {
    /// An empty store that has never been written.
    pub const fn new() -> Self {
        Self { records: Deque::new(), meta: None }
    }
}

impl<const CAPACITY: usize, const RECORD_LEN_MAX: usize> Default for MemoryStore<CAPACITY, RECORD_LEN_MAX> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const CAPACITY: usize, const RECORD_LEN_MAX: usize> QueueStore
    for MemoryStore<CAPACITY, RECORD_LEN_MAX>
{
    fn record_len_max(&self) -> usize {
        RECORD_LEN_MAX
    }

    fn push(&mut self, seq: u32, record: &[u8]) -> Result<(), StoreError> {
        let bytes = Vec::from_slice(record).map_err(|_| StoreError::RecordTooLarge)?;
        self.records
            .push_back((seq, bytes))
            .map_err(|_| StoreError::Full)
    }

    fn read_from(&mut self, from: u32, buf: &mut [u8]) -> Result<Option<StoredRecord>, StoreError> {
        let Some((seq, bytes)) = self.records.iter().find(|(seq, _)| *seq >= from) else {
            return Ok(None);
        };
        let target = buf
            .get_mut(..bytes.len())
            .ok_or(StoreError::BufferTooSmall)?;
        target.copy_from_slice(bytes);
        Ok(Some(StoredRecord { seq: *seq, len: bytes.len() }))
    }

    fn remove_through(&mut self, through: u32) -> Result<Removed, StoreError> {
        let mut count = 0;
        while self
            .records
            .pop_front_if(|(seq, _)| *seq <= through)
            .is_some()
        {
            count += 1;
        }
        let oldest = self.records.front().map(|(seq, _)| *seq);
        Ok(Removed { count, oldest })
    }

    fn scan(&mut self) -> Result<Extent, StoreError> {
        Ok(Extent {
            len: self.records.len(),
            oldest: self.records.front().map(|(seq, _)| *seq),
            newest: self.records.back().map(|(seq, _)| *seq),
        })
    }

    fn load_meta(&mut self) -> Result<Option<QueueMeta>, StoreError> {
        Ok(self.meta)
    }

    fn save_meta(&mut self, meta: QueueMeta) -> Result<(), StoreError> {
        self.meta = Some(meta);
        Ok(())
    }

    fn fullness(&mut self) -> Result<Fullness, StoreError> {
        let capacity = u32::try_from(CAPACITY).unwrap_or(u32::MAX);
        let used = u32::try_from(self.records.len()).unwrap_or(u32::MAX);
        Ok(Fullness { free: capacity.saturating_sub(used), capacity })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_and_removes_from_the_front() {
        let mut store = MemoryStore::<4, 8>::new();
        for seq in 1..=4 {
            store.push(seq, &[seq as u8; 3]).unwrap();
        }
        assert_eq!(store.push(5, b"x"), Err(StoreError::Full));
        assert_eq!(store.push(5, &[0; 9]), Err(StoreError::RecordTooLarge));
        let mut buf = [0; 8];
        assert_eq!(store.read_from(3, &mut buf), Ok(Some(StoredRecord { seq: 3, len: 3 })));
        assert_eq!(&buf[..3], &[3, 3, 3]);
        assert_eq!(store.read_from(3, &mut [0; 2]), Err(StoreError::BufferTooSmall));
        assert_eq!(store.remove_through(2), Ok(Removed { count: 2, oldest: Some(3) }));
        assert_eq!(store.scan(), Ok(Extent { len: 2, oldest: Some(3), newest: Some(4) }));
        assert_eq!(store.fullness(), Ok(Fullness { free: 2, capacity: 4 }));
        assert_eq!(store.remove_through(9), Ok(Removed { count: 2, oldest: None }));
        assert_eq!(store.read_from(0, &mut buf), Ok(None));
    }

    #[test]
    fn meta_round_trips() {
        let mut store = MemoryStore::<1, 1>::default();
        assert_eq!(store.load_meta(), Ok(None));
        let meta = QueueMeta { floor: 7, dropped_total: 2 };
        store.save_meta(meta).unwrap();
        assert_eq!(store.load_meta(), Ok(Some(meta)));
    }
}
