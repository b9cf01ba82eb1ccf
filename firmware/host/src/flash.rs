//! A NOR flash in a file: erase sets bytes to `0xFF`, writes can only clear
//! bits (as on the chip, and as `sequential-storage` relies on), and every
//! change is synced to disk before it returns, so killing the process at any
//! point behaves like a power cut between two flash operations.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use embedded_storage::nor_flash::{
    ErrorType, MultiwriteNorFlash, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash, check_erase,
    check_read, check_write,
};

/// Erase page, bytes (the ESP32's flash sector).
pub const PAGE_LEN: usize = 4_096;
/// Write granularity, bytes.
pub const WORD_LEN: usize = 4;

/// Why a flash operation failed.
#[derive(Debug)]
pub enum FileFlashError {
    /// Misaligned or out of bounds.
    Bounds(NorFlashErrorKind),
    /// The file could not be read or written (logged when it happens).
    Io,
}

impl NorFlashError for FileFlashError {
    fn kind(&self) -> NorFlashErrorKind {
        match self {
            Self::Bounds(kind) => *kind,
            Self::Io => NorFlashErrorKind::Other,
        }
    }
}

impl From<NorFlashErrorKind> for FileFlashError {
    fn from(kind: NorFlashErrorKind) -> Self {
        Self::Bounds(kind)
    }
}

impl From<io::Error> for FileFlashError {
    fn from(error: io::Error) -> Self {
        log::error!("flash file: {error}");
        Self::Io
    }
}

/// The flash file.
#[derive(Debug)]
pub struct FileFlash {
    file: File,
    capacity: usize,
}

impl FileFlash {
    /// Opens `path`, creating it erased (all `0xFF`) with `capacity` bytes
    /// if it does not exist.
    pub fn open(path: &Path, capacity: usize) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let length = usize::try_from(file.metadata()?.len()).unwrap_or(usize::MAX);
        if length == 0 {
            file.write_all_at(&vec![0xFF; capacity], 0)?;
            file.sync_all()?;
        } else if length != capacity {
            return Err(io::Error::other(format!(
                "{} holds {length} bytes, expected a {capacity}-byte flash image",
                path.display()
            )));
        }
        Ok(Self { file, capacity })
    }
}

impl ErrorType for FileFlash {
    type Error = FileFlashError;
}

impl ReadNorFlash for FileFlash {
    const READ_SIZE: usize = 1;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Self::Error> {
        check_read(self, offset, bytes.len())?;
        self.file.read_exact_at(bytes, u64::from(offset))?;
        Ok(())
    }

    fn capacity(&self) -> usize {
        self.capacity
    }
}

impl NorFlash for FileFlash {
    const WRITE_SIZE: usize = WORD_LEN;
    const ERASE_SIZE: usize = PAGE_LEN;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
        check_erase(self, from, to)?;
        let len = usize::try_from(to - from).unwrap_or(0);
        self.file.write_all_at(&vec![0xFF; len], u64::from(from))?;
        self.file.sync_data()?;
        Ok(())
    }

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Self::Error> {
        check_write(self, offset, bytes.len())?;
        let mut current = vec![0; bytes.len()];
        self.file.read_exact_at(&mut current, u64::from(offset))?;
        // NOR: a write can only turn ones into zeros.
        for (old, new) in current.iter_mut().zip(bytes) {
            *old &= new;
        }
        self.file.write_all_at(&current, u64::from(offset))?;
        self.file.sync_data()?;
        Ok(())
    }
}

impl MultiwriteNorFlash for FileFlash {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_like_nor_and_persists() {
        let directory = std::env::temp_dir().join(format!("wildcam-flash-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let path = directory.join("flash.bin");
        let mut flash = FileFlash::open(&path, 2 * PAGE_LEN).unwrap();
        let mut bytes = [0; 4];
        flash.read(4, &mut bytes).unwrap();
        assert_eq!(bytes, [0xFF; 4], "a new flash is erased");
        flash.write(4, &[0x0F, 0xF0, 0xFF, 0x00]).unwrap();
        flash.write(4, &[0xFF, 0x0F, 0x0F, 0xFF]).unwrap();
        drop(flash);
        let mut flash = FileFlash::open(&path, 2 * PAGE_LEN).unwrap();
        flash.read(4, &mut bytes).unwrap();
        assert_eq!(bytes, [0x0F, 0x00, 0x0F, 0x00], "bits only clear, and survive a reopen");
        assert!(flash.write(3, &[0; 4]).is_err(), "misaligned");
        flash.erase(0, PAGE_LEN as u32).unwrap();
        flash.read(4, &mut bytes).unwrap();
        assert_eq!(bytes, [0xFF; 4]);
        assert!(FileFlash::open(&path, PAGE_LEN).is_err(), "size mismatch");
        std::fs::remove_dir_all(directory).unwrap();
    }
}
