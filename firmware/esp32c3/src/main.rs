//! The WildCAM firmware for the ESP32-C3: everything is in `wildcam-firmware-esp` and the
//! application crate; this only names the chip.
//!
//! Build: `cargo xtask firmware build --chip esp32c3` (or, in `firmware/`,
//! `cargo build-esp32c3 -p wildcam-firmware-esp32c3`); flash with
//! `cargo xtask flash --chip esp32c3`.
#![no_std]
#![no_main]

use wildcam_firmware_esp::{BoardInfo, parse_version};
use wildcam_sdk::protocol::Chip;

esp_bootloader_esp_idf::esp_app_desc!();

#[esp_rtos::main]
async fn main(spawner: embassy_executor::Spawner) -> ! {
    let info = BoardInfo {
        chip: Chip::Esp32c3,
        hardware_model: "wildcam-esp32c3",
        firmware: parse_version(
            env!("CARGO_PKG_VERSION_MAJOR"),
            env!("CARGO_PKG_VERSION_MINOR"),
            env!("CARGO_PKG_VERSION_PATCH"),
        ),
    };
    wildcam_firmware_esp::run(spawner, info).await
}
