//! Where the image goes: the inactive OTA partition, behind [`OtaSlot`].

use core::fmt;
use core::ops::Range;

/// The inactive OTA partition, as the update state machine sees it.
///
/// Offsets are relative to the start of the slot. `write` must leave exactly
/// `data` at `offset` whatever the slot held before, like
/// [`embedded_storage::Storage::write`] (erase as needed, read-modify-write at
/// sector edges): after a power loss the machine writes the same bytes again
/// over a possibly half-written region.
pub trait OtaSlot {
    /// The implementation's error; the machine only records that an
    /// operation failed.
    type Error;

    /// Usable size of the slot, in bytes.
    fn capacity(&self) -> u32;

    /// Called once when a new image starts (never on resume): erase, or
    /// prepare to erase lazily in `write`. Should not block for long.
    fn prepare(&mut self, image_size: u32) -> Result<(), Self::Error>;

    /// Stores `data` at `offset`.
    fn write(&mut self, offset: u32, data: &[u8]) -> Result<(), Self::Error>;

    /// Reads `buf.len()` bytes at `offset`.
    fn read(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), Self::Error>;
}

impl<T: OtaSlot + ?Sized> OtaSlot for &mut T {
    type Error = T::Error;

    fn capacity(&self) -> u32 {
        (**self).capacity()
    }

    fn prepare(&mut self, image_size: u32) -> Result<(), Self::Error> {
        (**self).prepare(image_size)
    }

    fn write(&mut self, offset: u32, data: &[u8]) -> Result<(), Self::Error> {
        (**self).write(offset, data)
    }

    fn read(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), Self::Error> {
        (**self).read(offset, buf)
    }
}

/// An [`OtaSlot`] over any [`embedded_storage::Storage`], such as the
/// `FlashRegion` of the inactive partition from `esp-bootloader-esp-idf`.
/// `Storage::write` erases as needed, so [`OtaSlot::prepare`] does nothing.
#[derive(Debug)]
pub struct StorageSlot<S> {
    storage: S,
}

impl<S> StorageSlot<S> {
    /// Wraps a storage region holding exactly the slot.
    pub const fn new(storage: S) -> Self {
        Self { storage }
    }

    /// Gives the storage back.
    pub fn into_inner(self) -> S {
        self.storage
    }
}

impl<S: embedded_storage::Storage> OtaSlot for StorageSlot<S> {
    type Error = S::Error;

    fn capacity(&self) -> u32 {
        u32::try_from(self.storage.capacity()).unwrap_or(u32::MAX)
    }

    fn prepare(&mut self, _image_size: u32) -> Result<(), Self::Error> {
        Ok(())
    }

    fn write(&mut self, offset: u32, data: &[u8]) -> Result<(), Self::Error> {
        self.storage.write(offset, data)
    }

    fn read(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), Self::Error> {
        self.storage.read(offset, buf)
    }
}

/// Why a [`MemorySlot`] operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum MemorySlotError {
    /// Injected power loss: the device is "off" until
    /// [`MemorySlot::power_cycle`].
    PowerLoss,
    /// The access goes past the end of the slot.
    OutOfBounds,
    /// Injected read failure.
    ReadFailed,
}

impl fmt::Display for MemorySlotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::PowerLoss => "power lost",
            Self::OutOfBounds => "access past the end of the slot",
            Self::ReadFailed => "read failed",
        })
    }
}

impl core::error::Error for MemorySlotError {}

/// An in-memory [`OtaSlot`] with fault injection, for tests and the
/// simulator. `B` is the backing memory (`[u8; N]`, `&mut [u8]`, `Vec<u8>`).
///
/// Every `prepare` and `write` call is a *mutation*, numbered from 0 in call
/// order (see [`MemorySlot::mutations`]); faults are injected by number.
#[derive(Debug)]
pub struct MemorySlot<B> {
    memory: B,
    mutations: u32,
    power_loss_at: Option<u32>,
    corrupt_at: Option<(u32, u8)>,
    powered_off: bool,
    reads_fail: bool,
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> MemorySlot<B> {
    /// A slot over `memory`, which keeps its current contents.
    pub const fn new(memory: B) -> Self {
        Self {
            memory,
            mutations: 0,
            power_loss_at: None,
            corrupt_at: None,
            powered_off: false,
            reads_fail: false,
        }
    }

    /// The slot's contents.
    pub fn contents(&self) -> &[u8] {
        self.memory.as_ref()
    }

    /// Number of mutations (`prepare` and `write` calls) so far, failed ones
    /// included: the number the next mutation gets.
    pub fn mutations(&self) -> u32 {
        self.mutations
    }

    /// Power is lost during mutation number `index`: a write lands only its
    /// first half followed by garbage, a prepare erases only half its range,
    /// and the call fails. From then on every call fails with
    /// [`MemorySlotError::PowerLoss`] until [`MemorySlot::power_cycle`].
    pub fn inject_power_loss(&mut self, index: u32) {
        self.power_loss_at = Some(index);
    }

    /// Mutation number `index`, if it is a write, silently stores its middle
    /// byte XORed with `mask` and reports success.
    pub fn inject_corruption(&mut self, index: u32, mask: u8) {
        self.corrupt_at = Some((index, mask));
    }

    /// Makes every read fail (or succeed again).
    pub fn set_reads_fail(&mut self, fail: bool) {
        self.reads_fail = fail;
    }

    /// Flips one bit of the contents (bit rot, a stray write); out-of-range
    /// positions are ignored.
    pub fn flip_bit(&mut self, offset: u32, bit: u8) {
        let index = usize::try_from(offset).unwrap_or(usize::MAX);
        if let Some(byte) = self.memory.as_mut().get_mut(index) {
            *byte ^= 1 << (bit % 8);
        }
    }

    /// Whether an injected power loss happened and the slot is still "off".
    pub fn power_lost(&self) -> bool {
        self.powered_off
    }

    /// Restores power after an injected power loss (the contents stay as
    /// they were when power was lost).
    pub fn power_cycle(&mut self) {
        self.powered_off = false;
    }

    fn range(&self, offset: u32, len: usize) -> Result<Range<usize>, MemorySlotError> {
        let start = usize::try_from(offset).map_err(|_| MemorySlotError::OutOfBounds)?;
        let end = start.checked_add(len).ok_or(MemorySlotError::OutOfBounds)?;
        if end > self.memory.as_ref().len() {
            return Err(MemorySlotError::OutOfBounds);
        }
        Ok(start..end)
    }

    /// Numbers a mutation; says whether power is lost during it.
    fn begin_mutation(&mut self) -> Result<(u32, bool), MemorySlotError> {
        if self.powered_off {
            return Err(MemorySlotError::PowerLoss);
        }
        let index = self.mutations;
        self.mutations = self.mutations.saturating_add(1);
        let lose_power = self.power_loss_at == Some(index);
        if lose_power {
            self.power_loss_at = None;
            self.powered_off = true;
        }
        Ok((index, lose_power))
    }
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> OtaSlot for MemorySlot<B> {
    type Error = MemorySlotError;

    fn capacity(&self) -> u32 {
        u32::try_from(self.memory.as_ref().len()).unwrap_or(u32::MAX)
    }

    fn prepare(&mut self, image_size: u32) -> Result<(), Self::Error> {
        let len = usize::try_from(image_size).map_err(|_| MemorySlotError::OutOfBounds)?;
        let range = self.range(0, len)?;
        let (_, lose_power) = self.begin_mutation()?;
        let target = &mut self.memory.as_mut()[range];
        let erased = if lose_power { target.len() / 2 } else { target.len() };
        target[..erased].fill(0xff);
        if lose_power {
            return Err(MemorySlotError::PowerLoss);
        }
        Ok(())
    }

    fn write(&mut self, offset: u32, data: &[u8]) -> Result<(), Self::Error> {
        let range = self.range(offset, data.len())?;
        let (index, lose_power) = self.begin_mutation()?;
        let target = &mut self.memory.as_mut()[range];
        target.copy_from_slice(data);
        if lose_power {
            let half = target.len() / 2;
            target[half..].iter_mut().for_each(|byte| *byte ^= 0xa5);
            return Err(MemorySlotError::PowerLoss);
        }
        if let Some((at, mask)) = self.corrupt_at
            && at == index
        {
            self.corrupt_at = None;
            if let Some(byte) = target.get_mut(target.len() / 2) {
                *byte ^= mask;
            }
        }
        Ok(())
    }

    fn read(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), Self::Error> {
        if self.powered_off {
            return Err(MemorySlotError::PowerLoss);
        }
        if self.reads_fail {
            return Err(MemorySlotError::ReadFailed);
        }
        let range = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.memory.as_ref()[range]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_loss_tears_the_write_and_stays_off() {
        let mut slot = MemorySlot::new([0u8; 16]);
        slot.inject_power_loss(1);
        slot.write(0, &[1; 4]).unwrap();
        assert_eq!(slot.write(4, &[2; 8]), Err(MemorySlotError::PowerLoss));
        assert!(slot.power_lost());
        assert_eq!(&slot.contents()[4..12], &[2, 2, 2, 2, 0xa7, 0xa7, 0xa7, 0xa7]);
        assert_eq!(slot.write(0, &[3]), Err(MemorySlotError::PowerLoss));
        assert_eq!(slot.read(0, &mut [0; 1]), Err(MemorySlotError::PowerLoss));
        assert_eq!(slot.mutations(), 2);
        slot.power_cycle();
        slot.write(12, &[4; 4]).unwrap();
        assert_eq!(slot.mutations(), 3);
        assert_eq!(&slot.contents()[..4], &[1; 4]);
    }

    #[test]
    fn power_loss_during_prepare_erases_half() {
        let mut slot = MemorySlot::new([0u8; 8]);
        slot.inject_power_loss(0);
        assert_eq!(slot.prepare(8), Err(MemorySlotError::PowerLoss));
        assert_eq!(slot.contents(), &[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
        slot.power_cycle();
        slot.prepare(6).unwrap();
        assert_eq!(slot.contents(), &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0]);
        assert_eq!(slot.prepare(9), Err(MemorySlotError::OutOfBounds));
    }

    #[test]
    fn corruption_and_read_faults() {
        let mut slot = MemorySlot::new([0u8; 8]);
        slot.inject_corruption(0, 0x10);
        slot.write(2, &[1, 1, 1]).unwrap();
        assert_eq!(slot.contents(), &[0, 0, 1, 0x11, 1, 0, 0, 0]);
        slot.flip_bit(0, 9);
        slot.flip_bit(100, 0);
        assert_eq!(slot.contents()[0], 2);
        let mut buf = [0u8; 3];
        slot.set_reads_fail(true);
        assert_eq!(slot.read(2, &mut buf), Err(MemorySlotError::ReadFailed));
        slot.set_reads_fail(false);
        slot.read(2, &mut buf).unwrap();
        assert_eq!(buf, [1, 0x11, 1]);
        assert_eq!(slot.read(6, &mut buf), Err(MemorySlotError::OutOfBounds));
        assert_eq!(slot.write(u32::MAX, &[1]), Err(MemorySlotError::OutOfBounds));
    }

    /// A RAM `embedded_storage::Storage`.
    struct Ram([u8; 8]);

    impl embedded_storage::ReadStorage for Ram {
        type Error = ();
        fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), ()> {
            let start = offset as usize;
            bytes.copy_from_slice(self.0.get(start..start + bytes.len()).ok_or(())?);
            Ok(())
        }
        fn capacity(&self) -> usize {
            self.0.len()
        }
    }

    impl embedded_storage::Storage for Ram {
        fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), ()> {
            let start = offset as usize;
            self.0
                .get_mut(start..start + bytes.len())
                .ok_or(())?
                .copy_from_slice(bytes);
            Ok(())
        }
    }

    #[test]
    fn storage_slot_delegates() {
        let mut slot = StorageSlot::new(Ram([0; 8]));
        assert_eq!(slot.capacity(), 8);
        slot.prepare(8).unwrap();
        slot.write(3, &[7, 8]).unwrap();
        let mut buf = [0u8; 3];
        OtaSlot::read(&mut &mut slot, 2, &mut buf).unwrap();
        assert_eq!(buf, [0, 7, 8]);
        assert_eq!(slot.write(7, &[1, 2]), Err(()));
        assert_eq!(slot.into_inner().0, [0, 0, 0, 7, 8, 0, 0, 0]);
    }
}
