//! A new firmware image proves itself or rolls back.
//!
//! After an OTA switch the ESP-IDF bootloader starts the new slot with its
//! `otadata` state `New` (or `PendingVerify` when the bootloader has
//! rollback enabled). The image's self-test passes when the trap opened its
//! storage and reached its fleet server as itself (hello sent) within
//! [`SELF_TEST_TIMEOUT`]; the slot is then marked `Valid`. Otherwise the
//! firmware marks it `Invalid`, selects the previous slot and restarts into
//! it. An image flashed by cable has no `otadata` entry and runs untested.
//!
//! Reporting a rollback to the server (`OtaResult`, from the SDK's OTA
//! machine record persisted before the switch) comes with the OTA download.

use core::cell::RefCell;

use embassy_time::{Duration, with_timeout};
use esp_bootloader_esp_idf::ota::OtaImageState;
use esp_bootloader_esp_idf::ota_updater::OtaUpdater;
use esp_bootloader_esp_idf::partitions::{Error as OtaError, PARTITION_TABLE_MAX_LEN};
use esp_storage::FlashStorage;
use wildcam_firmware_app::Shared;
use wildcam_firmware_app::storage::StateStore;
use wildcam_sdk::queue::QueueStore;

/// How long a new image may take to reach its fleet server.
pub const SELF_TEST_TIMEOUT: Duration = Duration::from_secs(300);

fn with_updater<T>(
    flash: &RefCell<FlashStorage<'static>>,
    action: impl FnOnce(&mut OtaUpdater<'_, 'static>) -> Result<T, OtaError>,
) -> Result<T, OtaError> {
    let mut table = [0u8; PARTITION_TABLE_MAX_LEN];
    let mut flash = flash.borrow_mut();
    let mut updater = OtaUpdater::new(&mut flash, &mut table)?;
    action(&mut updater)
}

/// Whether the running image still has to prove itself.
fn awaiting_verification(flash: &RefCell<FlashStorage<'static>>) -> bool {
    match with_updater(flash, |updater| updater.current_ota_state()) {
        Ok(OtaImageState::New | OtaImageState::PendingVerify) => true,
        Ok(_) => false,
        Err(error) => {
            log::info!("no OTA state ({error:?}): image flashed by cable, no self-test");
            false
        }
    }
}

/// Confirms a new image once the trap reached its server; rolls back if it
/// does not within [`SELF_TEST_TIMEOUT`]. Returns at once for a confirmed image.
pub async fn confirm_when_connected<Q: QueueStore, S: StateStore, G, C>(
    flash: &RefCell<FlashStorage<'static>>,
    shared: &Shared<Q, S, G, C>,
) {
    if !awaiting_verification(flash) {
        return;
    }
    log::info!(
        "new firmware image: self-test, reaching the fleet server within {} s",
        SELF_TEST_TIMEOUT.as_secs()
    );
    if with_timeout(SELF_TEST_TIMEOUT, shared.connected.wait())
        .await
        .is_err()
    {
        roll_back(flash, "the fleet server was not reached");
    }
    match with_updater(flash, |updater| updater.set_current_ota_state(OtaImageState::Valid)) {
        Ok(()) => log::info!("self-test passed: firmware image confirmed"),
        Err(error) => log::error!("could not confirm the firmware image: {error:?}"),
    }
}

/// The trap's storage failed to open: a new image rolls back; an old one
/// has nowhere to go and stops.
pub async fn storage_failed(flash: &RefCell<FlashStorage<'static>>, reason: &str) -> ! {
    if awaiting_verification(flash) {
        roll_back(flash, reason);
    }
    log::error!("storage failed: {reason}; the trap stops");
    loop {
        embassy_time::Timer::after_secs(3_600).await;
    }
}

/// Marks the running slot invalid, selects the other one and restarts.
fn roll_back(flash: &RefCell<FlashStorage<'static>>, reason: &str) -> ! {
    log::error!("self-test failed ({reason}): rolling back to the previous firmware");
    let switched = with_updater(flash, |updater| {
        updater.set_current_ota_state(OtaImageState::Invalid)?;
        updater.activate_next_partition()
    });
    if let Err(error) = switched {
        log::error!("rollback failed: {error:?}");
    }
    esp_hal::system::software_reset()
}
