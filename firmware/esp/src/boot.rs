//! The ESP-IDF bootloader behind the application's [`BootControl`]: the
//! `otadata` partition through esp-bootloader-esp-idf, and the inactive OTA
//! app partition as the update slot.
//!
//! An update is written to the OTA slot that did not boot
//! ([`crate::partitions::OtaSlots`]). Activation selects it in `otadata`
//! with the image state `New`; the bootloader starts it (as `PendingVerify`
//! when built with rollback support) and, if it is started again without
//! having been confirmed, goes back to the previous slot. The application's
//! self-test (`wildcam_firmware_app::ota`) confirms the image (`Valid`) or
//! marks it `Invalid` and selects the previous slot.
//!
//! Which image runs after an update: the update's when this firmware's
//! version is the record's manifest version and the running partition is
//! the one `otadata` selects (the bootloader did not fall back).
//!
//! Flash encryption is not supported for updates yet: the slot is written
//! in plain text.

use core::cell::RefCell;

use esp_bootloader_esp_idf::ota::OtaImageState;
use esp_bootloader_esp_idf::ota_updater::OtaUpdater;
use esp_bootloader_esp_idf::partitions::{Error as PartitionError, PARTITION_TABLE_MAX_LEN};
use esp_storage::FlashStorage;
use wildcam_firmware_app::{BootControl, Restart};
use wildcam_sdk::ota::{BootedImage, OtaRecord};
use wildcam_sdk::protocol::{FirmwareVersion, ResetReason};

use crate::hardware::EspRestart;
use crate::partitions::OtaSlots;

/// The ESP boards' boot control.
#[derive(Debug)]
pub struct EspBoot {
    flash: &'static RefCell<FlashStorage<'static>>,
    slots: OtaSlots,
    version: FirmwareVersion,
    restart: EspRestart,
}

impl EspBoot {
    /// Boot control for the running image (`version`) in `slots`.
    pub fn new(
        flash: &'static RefCell<FlashStorage<'static>>,
        slots: OtaSlots,
        version: FirmwareVersion,
    ) -> Self {
        Self { flash, slots, version, restart: EspRestart }
    }

    fn with_updater<T>(
        &self,
        action: impl FnOnce(&mut OtaUpdater<'_, 'static>) -> Result<T, PartitionError>,
    ) -> Result<T, PartitionError> {
        let mut table = [0u8; PARTITION_TABLE_MAX_LEN];
        let mut flash = self.flash.borrow_mut();
        let mut updater = OtaUpdater::new(&mut flash, &mut table)?;
        action(&mut updater)
    }

    /// Whether the running image is the one `otadata` selects and still has
    /// to prove itself (`New` or `PendingVerify`).
    pub fn awaiting_verification(&self) -> bool {
        let running = self.slots.running;
        let state = self.with_updater(|updater| {
            let selected = updater.selected_partition()?;
            Ok((selected, updater.current_ota_state()?))
        });
        match state {
            Ok((selected, OtaImageState::New | OtaImageState::PendingVerify)) => selected == running,
            Ok(_) => false,
            Err(error) => {
                log::info!("no OTA state ({error:?}): image flashed by cable");
                false
            }
        }
    }
}

impl Restart for EspBoot {
    fn reset_reason(&self) -> ResetReason {
        self.restart.reset_reason()
    }

    fn restart(&mut self) -> ! {
        self.restart.restart()
    }
}

impl BootControl for EspBoot {
    type Error = PartitionError;

    fn running_version(&self) -> FirmwareVersion {
        self.version
    }

    fn booted_image(&mut self, record: &OtaRecord) -> BootedImage {
        let selected = self.with_updater(|updater| updater.selected_partition());
        let fell_back = selected.is_ok_and(|selected| selected != self.slots.running);
        if self.version == record.manifest.manifest.version && !fell_back {
            BootedImage::Updated
        } else {
            BootedImage::Previous
        }
    }

    fn activate_update(&mut self, _record: &OtaRecord) -> Result<(), Self::Error> {
        let OtaSlots { running, inactive, .. } = self.slots;
        self.with_updater(|updater| {
            let mut ota = updater.ota_data()?;
            // An image flashed by cable has blank otadata: select the
            // running slot first, so the sequence numbers start as the
            // bootloader expects.
            if ota.current_app_partition()? != running {
                ota.set_current_app_partition(running)?;
            }
            ota.set_current_app_partition(inactive)?;
            ota.set_current_ota_state(OtaImageState::New)
        })?;
        log::info!("OTA: {inactive:?} selected as the boot slot, pending verification");
        Ok(())
    }

    fn mark_valid(&mut self) -> Result<(), Self::Error> {
        if !self.awaiting_verification() {
            return Ok(());
        }
        self.with_updater(|updater| updater.set_current_ota_state(OtaImageState::Valid))?;
        log::info!("firmware image marked valid");
        Ok(())
    }

    fn roll_back(&mut self) -> Result<(), Self::Error> {
        let previous = self.slots.inactive;
        self.with_updater(|updater| {
            let mut ota = updater.ota_data()?;
            ota.set_current_ota_state(OtaImageState::Invalid)?;
            ota.set_current_app_partition(previous)?;
            ota.set_current_ota_state(OtaImageState::Valid)
        })?;
        log::warn!("firmware image marked invalid: {previous:?} selected again");
        Ok(())
    }
}
