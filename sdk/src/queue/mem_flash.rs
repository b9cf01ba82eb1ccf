//! [`MemFlash`]: NOR flash in RAM with fault injection.

use core::fmt;
use core::ops::Range;

use embedded_storage::nor_flash::{
    ErrorType, MultiwriteNorFlash, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash, check_erase,
    check_read, check_write,
};

/// Why a [`MemFlash`] operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum MemFlashError {
    /// The range is outside the flash.
    OutOfBounds,
    /// The offset or length is not a multiple of the word or page size.
    NotAligned,
    /// The write would turn a 0 bit back into 1, which NOR flash cannot do
    /// without an erase.
    WouldSetBits,
    /// An injected [`Fault::Error`]: nothing was changed.
    Injected,
    /// Power was lost during the operation ([`Fault::PowerLoss`]), or is
    /// still off: call [`MemFlash::power_cycle`].
    PowerLoss,
}

impl fmt::Display for MemFlashError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::OutOfBounds => "flash range out of bounds",
            Self::NotAligned => "flash range not aligned",
            Self::WouldSetBits => "flash write would set cleared bits",
            Self::Injected => "injected flash error",
            Self::PowerLoss => "flash lost power",
        })
    }
}

impl core::error::Error for MemFlashError {}

impl NorFlashError for MemFlashError {
    fn kind(&self) -> NorFlashErrorKind {
        match self {
            Self::OutOfBounds => NorFlashErrorKind::OutOfBounds,
            Self::NotAligned => NorFlashErrorKind::NotAligned,
            Self::WouldSetBits | Self::Injected | Self::PowerLoss => NorFlashErrorKind::Other,
        }
    }
}

impl From<NorFlashErrorKind> for MemFlashError {
    fn from(kind: NorFlashErrorKind) -> Self {
        match kind {
            NorFlashErrorKind::NotAligned => Self::NotAligned,
            _ => Self::OutOfBounds,
        }
    }
}

/// Which operations a fault counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum OpKind {
    /// Writes only.
    Write,
    /// Erases only.
    Erase,
    /// Writes and erases.
    Mutation,
}

impl OpKind {
    fn counts(self, op: OpKind) -> bool {
        self == OpKind::Mutation || self == op
    }
}

/// What an injected fault does to the operation it hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Fault {
    /// The operation fails and changes nothing; the flash keeps working.
    Error,
    /// Power is cut during the operation: its first `landed` units (words for
    /// a write, pages for an erase) complete; if `torn`, the next unit is left
    /// half done (some bits of a word cleared, half a page erased). Every later
    /// access fails until [`MemFlash::power_cycle`]. With `landed` at or above
    /// the operation's size, it completes but still reports the power loss.
    PowerLoss {
        /// Units that complete.
        landed: usize,
        /// Leave the next unit half done.
        torn: bool,
    },
}

/// Operation counters of a [`MemFlash`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct OpCounts {
    /// Read calls.
    pub reads: u32,
    /// Write calls, including refused and faulted ones.
    pub writes: u32,
    /// Erase calls, including refused and faulted ones.
    pub erases: u32,
    /// Bytes written by completed writes.
    pub bytes_written: u32,
}

#[derive(Debug, Clone, Copy)]
struct Armed {
    on: OpKind,
    /// Matching operations left to complete before the fault hits.
    skip: u32,
    fault: Fault,
}

/// NOR flash in RAM: `SIZE` bytes, erased in pages of `ERASE_SIZE` bytes,
/// read and written in words of `WORD_SIZE` bytes.
///
/// It keeps NOR semantics: an erase sets bytes to `0xFF`, a write can only
/// clear bits (a write that would set one is refused with
/// [`MemFlashError::WouldSetBits`]) and may hit the same word again
/// ([`MultiwriteNorFlash`]). Faults ([`Fault`]) can be armed on the Nth
/// operation, and every operation is counted.
#[derive(Clone)]
pub struct MemFlash<const SIZE: usize, const ERASE_SIZE: usize = 4096, const WORD_SIZE: usize = 4> {
    bytes: [u8; SIZE],
    counts: OpCounts,
    armed: Option<Armed>,
    powered: bool,
}

impl<const SIZE: usize, const ERASE_SIZE: usize, const WORD_SIZE: usize>
    MemFlash<SIZE, ERASE_SIZE, WORD_SIZE>
{
    /// A fully erased flash.
    pub const fn new() -> Self {
        const {
            assert!(WORD_SIZE > 0 && ERASE_SIZE.is_multiple_of(WORD_SIZE));
            assert!(ERASE_SIZE > 0 && SIZE.is_multiple_of(ERASE_SIZE));
        }
        Self {
            bytes: [0xFF; SIZE],
            counts: OpCounts { reads: 0, writes: 0, erases: 0, bytes_written: 0 },
            armed: None,
            powered: true,
        }
    }

    /// Arms `fault` on the operation of kind `on` that comes after `skip`
    /// more such operations complete (`skip == 0`: the very next one).
    /// Replaces any fault already armed.
    pub fn fail_nth(&mut self, on: OpKind, skip: u32, fault: Fault) {
        self.armed = Some(Armed { on, skip, fault });
    }

    /// Removes the armed fault, if it has not hit yet.
    pub fn disarm(&mut self) {
        self.armed = None;
    }

    /// True while a fault is armed and has not hit yet.
    pub fn is_armed(&self) -> bool {
        self.armed.is_some()
    }

    /// Restores power after a [`Fault::PowerLoss`] (and disarms): the contents
    /// stay as the interrupted operation left them.
    pub fn power_cycle(&mut self) {
        self.powered = true;
        self.armed = None;
    }

    /// False between a [`Fault::PowerLoss`] and [`power_cycle`](Self::power_cycle).
    pub fn is_powered(&self) -> bool {
        self.powered
    }

    /// The operation counters.
    pub fn counts(&self) -> OpCounts {
        self.counts
    }

    /// The raw contents.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    fn check_powered(&self) -> Result<(), MemFlashError> {
        if self.powered { Ok(()) } else { Err(MemFlashError::PowerLoss) }
    }

    /// Counts an operation against the armed fault; returns the fault if it
    /// hits this operation.
    fn take_fault(&mut self, op: OpKind) -> Option<Fault> {
        let armed = self.armed.as_mut().filter(|armed| armed.on.counts(op))?;
        if armed.skip > 0 {
            armed.skip -= 1;
            return None;
        }
        let fault = armed.fault;
        self.armed = None;
        Some(fault)
    }

    fn range(offset: u32, len: usize) -> Range<usize> {
        let start = offset as usize;
        start..start + len
    }

    fn program(&mut self, offset: usize, data: &[u8], keep_mask: u8) {
        for (target, source) in self.bytes[offset..].iter_mut().zip(data) {
            *target &= *source | keep_mask;
        }
    }

    fn interrupted_write(&mut self, offset: usize, data: &[u8], landed: usize, torn: bool) {
        let done = landed.saturating_mul(WORD_SIZE).min(data.len());
        self.program(offset, &data[..done], 0);
        if torn && done < data.len() {
            // Only some of the bits to clear in the next word get cleared.
            self.program(offset + done, &data[done..done + WORD_SIZE], 0xAA);
        }
    }

    fn interrupted_erase(&mut self, range: Range<usize>, landed: usize, torn: bool) {
        let done = landed.saturating_mul(ERASE_SIZE).min(range.len());
        self.bytes[range.start..range.start + done].fill(0xFF);
        if torn && done < range.len() {
            let half = range.start + done..range.start + done + ERASE_SIZE / 2;
            self.bytes[half].fill(0xFF);
        }
    }
}

impl<const SIZE: usize, const ERASE_SIZE: usize, const WORD_SIZE: usize> Default
    for MemFlash<SIZE, ERASE_SIZE, WORD_SIZE>
{
    fn default() -> Self {
        Self::new()
    }
}

impl<const SIZE: usize, const ERASE_SIZE: usize, const WORD_SIZE: usize> fmt::Debug
    for MemFlash<SIZE, ERASE_SIZE, WORD_SIZE>
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemFlash")
            .field("size", &SIZE)
            .field("erase_size", &ERASE_SIZE)
            .field("word_size", &WORD_SIZE)
            .field("counts", &self.counts)
            .field("armed", &self.armed)
            .field("powered", &self.powered)
            .finish_non_exhaustive()
    }
}

impl<const SIZE: usize, const ERASE_SIZE: usize, const WORD_SIZE: usize> ErrorType
    for MemFlash<SIZE, ERASE_SIZE, WORD_SIZE>
{
    type Error = MemFlashError;
}

impl<const SIZE: usize, const ERASE_SIZE: usize, const WORD_SIZE: usize> ReadNorFlash
    for MemFlash<SIZE, ERASE_SIZE, WORD_SIZE>
{
    const READ_SIZE: usize = WORD_SIZE;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Self::Error> {
        self.counts.reads = self.counts.reads.saturating_add(1);
        self.check_powered()?;
        check_read(self, offset, bytes.len())?;
        bytes.copy_from_slice(&self.bytes[Self::range(offset, bytes.len())]);
        Ok(())
    }

    fn capacity(&self) -> usize {
        SIZE
    }
}

impl<const SIZE: usize, const ERASE_SIZE: usize, const WORD_SIZE: usize> NorFlash
    for MemFlash<SIZE, ERASE_SIZE, WORD_SIZE>
{
    const WRITE_SIZE: usize = WORD_SIZE;
    const ERASE_SIZE: usize = ERASE_SIZE;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
        self.counts.erases = self.counts.erases.saturating_add(1);
        self.check_powered()?;
        check_erase(self, from, to)?;
        let range = from as usize..to as usize;
        match self.take_fault(OpKind::Erase) {
            None => self.bytes[range].fill(0xFF),
            Some(Fault::Error) => return Err(MemFlashError::Injected),
            Some(Fault::PowerLoss { landed, torn }) => {
                self.interrupted_erase(range, landed, torn);
                self.powered = false;
                return Err(MemFlashError::PowerLoss);
            }
        }
        Ok(())
    }

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Self::Error> {
        self.counts.writes = self.counts.writes.saturating_add(1);
        self.check_powered()?;
        check_write(self, offset, bytes.len())?;
        let range = Self::range(offset, bytes.len());
        if self.bytes[range.clone()]
            .iter()
            .zip(bytes)
            .any(|(old, new)| new & !old != 0)
        {
            return Err(MemFlashError::WouldSetBits);
        }
        match self.take_fault(OpKind::Write) {
            None => self.program(range.start, bytes, 0),
            Some(Fault::Error) => return Err(MemFlashError::Injected),
            Some(Fault::PowerLoss { landed, torn }) => {
                self.interrupted_write(range.start, bytes, landed, torn);
                self.powered = false;
                return Err(MemFlashError::PowerLoss);
            }
        }
        let written = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        self.counts.bytes_written = self.counts.bytes_written.saturating_add(written);
        Ok(())
    }
}

impl<const SIZE: usize, const ERASE_SIZE: usize, const WORD_SIZE: usize> MultiwriteNorFlash
    for MemFlash<SIZE, ERASE_SIZE, WORD_SIZE>
{
}

#[cfg(test)]
mod tests {
    use super::*;

    type Flash = MemFlash<64, 32, 4>;

    #[test]
    fn nor_semantics() {
        let mut flash = Flash::new();
        assert!(flash.as_bytes().iter().all(|b| *b == 0xFF));
        flash.write(4, &[0x0F, 0xF0, 0x00, 0xFF]).unwrap();
        // Clearing more bits in the same word is allowed...
        flash.write(4, &[0x0E, 0x00, 0x00, 0x7F]).unwrap();
        let mut word = [0; 4];
        flash.read(4, &mut word).unwrap();
        assert_eq!(word, [0x0E, 0x00, 0x00, 0x7F]);
        // ...setting one is not.
        assert_eq!(flash.write(4, &[0x0F, 0, 0, 0]), Err(MemFlashError::WouldSetBits));
        flash.erase(0, 32).unwrap();
        flash.read(4, &mut word).unwrap();
        assert_eq!(word, [0xFF; 4]);
    }

    #[test]
    fn checks_alignment_and_bounds() {
        let mut flash = Flash::new();
        assert_eq!(flash.write(2, &[0; 4]), Err(MemFlashError::NotAligned));
        assert_eq!(flash.write(0, &[0; 3]), Err(MemFlashError::NotAligned));
        assert_eq!(flash.write(64, &[0; 4]), Err(MemFlashError::OutOfBounds));
        assert_eq!(flash.read(1, &mut [0; 4]), Err(MemFlashError::NotAligned));
        assert_eq!(flash.erase(0, 16), Err(MemFlashError::NotAligned));
        assert_eq!(flash.erase(32, 96), Err(MemFlashError::OutOfBounds));
        assert_eq!(flash.counts().bytes_written, 0);
    }

    #[test]
    fn injected_error_changes_nothing() {
        let mut flash = Flash::new();
        flash.fail_nth(OpKind::Write, 1, Fault::Error);
        flash.write(0, &[0; 4]).unwrap();
        assert_eq!(flash.write(4, &[0; 4]), Err(MemFlashError::Injected));
        assert_eq!(&flash.as_bytes()[4..8], &[0xFF; 4]);
        assert!(!flash.is_armed());
        flash.write(4, &[0; 4]).unwrap();
        assert_eq!(flash.counts(), OpCounts { reads: 0, writes: 3, erases: 0, bytes_written: 8 });
    }

    #[test]
    fn power_loss_during_write_tears_a_word_and_cuts_power() {
        let mut flash = Flash::new();
        flash.fail_nth(OpKind::Mutation, 0, Fault::PowerLoss { landed: 1, torn: true });
        assert_eq!(flash.write(0, &[0; 12]), Err(MemFlashError::PowerLoss));
        assert_eq!(&flash.as_bytes()[..4], &[0; 4]);
        assert_eq!(&flash.as_bytes()[4..8], &[0xAA; 4]);
        assert_eq!(&flash.as_bytes()[8..12], &[0xFF; 4]);
        assert_eq!(flash.read(0, &mut [0; 4]), Err(MemFlashError::PowerLoss));
        flash.power_cycle();
        assert!(flash.is_powered());
        flash.write(8, &[0; 4]).unwrap();
    }

    #[test]
    fn power_loss_during_erase_leaves_half_a_page() {
        let mut flash = Flash::new();
        flash.write(0, &[0; 64]).unwrap();
        flash.fail_nth(OpKind::Erase, 0, Fault::PowerLoss { landed: 0, torn: true });
        assert_eq!(flash.erase(0, 64), Err(MemFlashError::PowerLoss));
        assert!(flash.as_bytes()[..16].iter().all(|b| *b == 0xFF));
        assert!(flash.as_bytes()[16..].iter().all(|b| *b == 0));
    }

    #[test]
    fn fully_landed_write_still_reports_the_loss() {
        let mut flash = Flash::new();
        flash.fail_nth(OpKind::Write, 0, Fault::PowerLoss { landed: 99, torn: true });
        assert_eq!(flash.write(0, &[0; 8]), Err(MemFlashError::PowerLoss));
        assert_eq!(&flash.as_bytes()[..8], &[0; 8]);
        assert_eq!(flash.as_bytes()[8], 0xFF);
    }
}
