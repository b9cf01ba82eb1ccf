//! The flash partitions the firmware uses, found by label in the partition
//! table (`../partitions.csv`, which `cargo xtask firmware` puts in the merged image): `wcfg` holds the
//! flash-time settings text, `wcdata` the device state journal (its first
//! two pages) and the offline queue (the rest). The OTA app partitions and
//! `otadata` belong to the bootloader and `boot.rs`: updates go to the OTA
//! slot that did not boot ([`OtaSlots`]).

use core::fmt;

use core::ops::Range;
use embedded_storage::nor_flash::ReadNorFlash;

use esp_bootloader_esp_idf::partitions::{self, AppPartitionSubType, PARTITION_TABLE_MAX_LEN, PartitionType};
use esp_storage::FlashStorage;
use wildcam_firmware_app::FlashLayout;

/// Label of the settings partition.
pub const SETTINGS_LABEL: &str = "wcfg";
/// Label of the state and queue partition.
pub const DATA_LABEL: &str = "wcdata";
/// Bytes of settings text read at boot (the whole `wcfg` partition).
pub const SETTINGS_LEN: usize = 4_096;
/// Pages of `wcdata` given to the device state journal.
const STATE_PAGES: u32 = 2;
const PAGE_LEN: u32 = FlashStorage::SECTOR_SIZE;

/// Why the partitions cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartitionError {
    /// The partition table does not read or verify.
    TableUnreadable,
    /// A partition the firmware needs is missing (its label).
    Missing(&'static str),
    /// A partition is too small or not page aligned (its label).
    Unusable(&'static str),
    /// The settings partition does not read.
    SettingsUnreadable,
}

impl fmt::Display for PartitionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TableUnreadable => f.write_str("the partition table does not read"),
            Self::Missing(label) => write!(f, "partition `{label}` is missing (flash partitions.csv)"),
            Self::Unusable(label) => write!(f, "partition `{label}` is too small or misaligned"),
            Self::SettingsUnreadable => f.write_str("the settings partition does not read"),
        }
    }
}

/// The OTA app partitions: the one running and the one updates go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtaSlots {
    /// The partition the running image was started from.
    pub running: AppPartitionSubType,
    /// The other OTA partition: the update slot.
    pub inactive: AppPartitionSubType,
    /// Where the update slot is in flash.
    pub inactive_range: Range<u32>,
}

/// Where things are, and the settings text.
#[derive(Debug)]
pub struct Layout<'t> {
    /// The settings partition's bytes.
    pub settings_text: &'t [u8],
    /// The app's state journal and queue.
    pub app: FlashLayout,
    /// The OTA slots.
    pub ota: OtaSlots,
}

/// Reads the partition table and the settings partition into `text`.
pub fn read<'t>(
    flash: &mut FlashStorage<'_>,
    text: &'t mut [u8; SETTINGS_LEN],
) -> Result<Layout<'t>, PartitionError> {
    let mut table = [0u8; PARTITION_TABLE_MAX_LEN];
    let table =
        partitions::read_partition_table(flash, &mut table).map_err(|_| PartitionError::TableUnreadable)?;
    let find = |label: &'static str| {
        table
            .iter()
            .find(|entry| entry.label_as_str() == label)
            .map(|entry| entry.offset()..entry.offset() + entry.len())
            .ok_or(PartitionError::Missing(label))
    };
    let booted = table
        .booted_partition()
        .ok()
        .flatten()
        .ok_or(PartitionError::Missing("the running app partition"))?;
    let running = match booted.partition_type() {
        PartitionType::App(running @ (AppPartitionSubType::Ota0 | AppPartitionSubType::Ota1)) => running,
        _ => return Err(PartitionError::Missing("ota_0 or ota_1 as the running app partition")),
    };
    let inactive = if running == AppPartitionSubType::Ota0 {
        AppPartitionSubType::Ota1
    } else {
        AppPartitionSubType::Ota0
    };
    let slot = table
        .find_partition(PartitionType::App(inactive))
        .ok()
        .flatten()
        .ok_or(PartitionError::Missing("the second OTA app partition"))?;
    let inactive_range = slot.offset()..slot.offset() + slot.len();
    if inactive_range.start % PAGE_LEN != 0 || inactive_range.end % PAGE_LEN != 0 {
        return Err(PartitionError::Unusable("the second OTA app partition"));
    }
    let ota = OtaSlots { running, inactive, inactive_range };
    let settings = find(SETTINGS_LABEL)?;
    let data = find(DATA_LABEL)?;
    if settings.len() < SETTINGS_LEN {
        return Err(PartitionError::Unusable(SETTINGS_LABEL));
    }
    let split = data.start + STATE_PAGES * PAGE_LEN;
    let aligned = data.start % PAGE_LEN == 0 && data.end % PAGE_LEN == 0;
    if !aligned || data.end < split + 4 * PAGE_LEN {
        return Err(PartitionError::Unusable(DATA_LABEL));
    }
    ReadNorFlash::read(flash, settings.start, text).map_err(|_| PartitionError::SettingsUnreadable)?;
    Ok(Layout {
        settings_text: text,
        app: FlashLayout { state: data.start..split, queue: split..data.end },
        ota,
    })
}
