#![doc = include_str!("../README.md")]
#![no_std]

#[cfg(all(feature = "esp32c3", feature = "esp32c6"))]
compile_error!("enable exactly one chip feature: `esp32c3` or `esp32c6`");
#[cfg(not(any(feature = "esp32c3", feature = "esp32c6")))]
compile_error!("enable one chip feature: `esp32c3` or `esp32c6`");

// The panic handler (prints a backtrace, then halts).
use esp_backtrace as _;

pub mod boot;
pub mod hardware;
pub mod partitions;
pub mod wifi;

use core::cell::RefCell;

use embassy_executor::Spawner;
use esp_hal::clock::CpuClock;
use esp_hal::gpio::{Input, InputConfig, Pull};
use esp_hal::timer::timg::TimerGroup;
use esp_storage::FlashStorage;
use static_cell::StaticCell;
use wildcam_firmware_app::settings::Settings;
use wildcam_firmware_app::{
    Board, BootControl, CaptureHardware, FlashStateStore, NetworkHardware, NoClassifier, NorFlashSlot,
    Restart, Shared, SharedFlash, Trap, TrapIdentity,
};
use wildcam_sdk::protocol::{Capabilities, Chip, FirmwareVersion};
use wildcam_sdk::queue::FlashStore;

use crate::boot::EspBoot;
use crate::hardware::{CaptureStub, EspEntropy, GpioPir, NoBatteryGauge, UnsetClock};

/// The firmware signing public key OTA manifests must verify under, built
/// in from `WILDCAM_OTA_PUBLIC_KEY` (64 hex digits, as `cargo xtask keygen`
/// prints it) when the board crate is compiled. A malformed value stops the
/// build; without the variable (or with it empty) the firmware builds, does
/// not announce the OTA capability, and refuses every offer at run time.
pub const OTA_PUBLIC_KEY: Option<[u8; 32]> = match option_env!("WILDCAM_OTA_PUBLIC_KEY") {
    Some(hex) if !hex.is_empty() => Some(parse_public_key(hex)),
    _ => None,
};

/// 64 hex digits, at compile time.
const fn parse_public_key(hex: &str) -> [u8; 32] {
    let digits = hex.as_bytes();
    assert!(
        digits.len() == 64,
        "WILDCAM_OTA_PUBLIC_KEY must be the firmware signing public key as 64 hex digits"
    );
    let mut key = [0u8; 32];
    let mut index = 0;
    while index < 32 {
        key[index] = (hex_digit(digits[2 * index]) << 4) | hex_digit(digits[2 * index + 1]);
        index += 1;
    }
    key
}

const fn hex_digit(digit: u8) -> u8 {
    match digit {
        b'0'..=b'9' => digit - b'0',
        b'a'..=b'f' => digit - b'a' + 10,
        b'A'..=b'F' => digit - b'A' + 10,
        _ => panic!("WILDCAM_OTA_PUBLIC_KEY must be 64 hex digits"),
    }
}

/// What the board crate tells the glue.
#[derive(Debug, Clone, Copy)]
pub struct BoardInfo {
    /// The chip.
    pub chip: Chip,
    /// Hardware model announced in the hello (at most 24 bytes).
    pub hardware_model: &'static str,
    /// The firmware version (the board crate's package version).
    pub firmware: FirmwareVersion,
}

/// Parses `major.minor.patch` at compile time's leisure (0 where a part is missing).
pub fn parse_version(major: &str, minor: &str, patch: &str) -> FirmwareVersion {
    let part = |text: &str| text.parse().unwrap_or(0);
    FirmwareVersion { major: part(major), minor: part(minor), patch: part(patch) }
}

/// The board's firmware: brings up the chip, Wi-Fi and the network stack,
/// opens the trap's storage and runs the application (which downloads
/// updates into the inactive OTA slot and runs a new image's self-test).
/// Never returns.
pub async fn run(spawner: Spawner, info: BoardInfo) -> ! {
    esp_println::logger::init_logger(log::LevelFilter::Info);
    let peripherals = esp_hal::init(esp_hal::Config::default().with_cpu_clock(CpuClock::max()));
    // The radio driver needs a heap; most of it in RAM the bootloader used.
    esp_alloc::heap_allocator!(#[esp_hal::ram(reclaimed)] size: 64 * 1024);
    esp_alloc::heap_allocator!(size: 24 * 1024);
    let timg0 = TimerGroup::new(peripherals.TIMG0);
    esp_rtos::start(timg0.timer0, peripherals.FROM_CPU_INTR0);
    log::info!("wildcam {} {:?} starting", info.hardware_model, info.firmware);

    static FLASH: StaticCell<RefCell<FlashStorage<'static>>> = StaticCell::new();
    let flash = FLASH.init(RefCell::new(FlashStorage::new(peripherals.FLASH)));
    static SETTINGS_TEXT: StaticCell<[u8; partitions::SETTINGS_LEN]> = StaticCell::new();
    let text = SETTINGS_TEXT.init([0; partitions::SETTINGS_LEN]);
    let read = partitions::read(&mut flash.borrow_mut(), text);
    let layout = match read {
        Ok(layout) => layout,
        Err(error) => halt(&format_args!("flash partitions unusable: {error}")).await,
    };
    let settings = match Settings::parse(layout.settings_text) {
        Ok(settings) => settings,
        Err(error) => {
            halt(&format_args!("settings partition: {error}; write it with `cargo xtask flash`")).await
        }
    };
    log::info!("{settings:?}");

    let stack = match wifi::start(spawner, peripherals.WIFI, &settings) {
        Ok(stack) => stack,
        Err(error) => halt(&format_args!("Wi-Fi: {error}")).await,
    };
    let mut entropy = EspEntropy::new();
    let mut boot = EspBoot::new(flash, layout.ota.clone(), info.firmware);
    log::info!("running from {:?}; updates go to {:?}", layout.ota.running, layout.ota.inactive);
    let identity = TrapIdentity {
        hardware_model: info.hardware_model,
        chip: info.chip,
        firmware: boot.running_version(),
        secure_version: 1,
        capabilities: Capabilities::PIR,
        ota_public_key: OTA_PUBLIC_KEY,
    };
    let opened = FlashStateStore::new(SharedFlash::new(flash), layout.app.state.clone())
        .map_err(|_| "state partition layout")
        .and_then(|state| {
            let queue = FlashStore::<_>::new(SharedFlash::new(flash), layout.app.queue.clone())
                .map_err(|_| "queue partition layout")?;
            Trap::open(identity, queue, state, boot.reset_reason(), &mut entropy)
                .map_err(|_| "storage unreadable")
        });
    let trap = match opened {
        Ok(trap) => trap,
        // Storage is not sane: a new image rolls back (the previous one
        // reports it from the record), an old one stops here.
        Err(error) => {
            if boot.awaiting_verification() {
                log::error!("self-test failed ({error}): rolling back to the previous firmware");
                if let Err(error) = boot.roll_back() {
                    log::error!("rollback failed: {error:?}");
                }
                boot.restart();
            }
            halt(&format_args!("storage failed: {error}; the trap stops")).await
        }
    };
    let slot = match NorFlashSlot::new(SharedFlash::new(flash), layout.ota.inactive_range.clone()) {
        Ok(slot) => slot,
        Err(error) => halt(&format_args!("OTA slot unusable: {error:?}")).await,
    };
    let shared = Shared::new(trap, NoBatteryGauge, UnsetClock);
    let pir = Input::new(peripherals.GPIO4, InputConfig::default().with_pull(Pull::Down));
    let mut board = Board {
        capture: CaptureHardware {
            camera: CaptureStub::new(),
            classifier: NoClassifier,
            motion: GpioPir::new(pir),
        },
        network: NetworkHardware { entropy, boot, slot },
        utc_offset_min: settings.utc_offset_min,
    };
    match wildcam_firmware_app::run(&shared, stack, &settings.network, &mut board).await {}
}

/// Logs `message` and parks the main task (the watchdog-free way to stop).
async fn halt(message: &dyn core::fmt::Display) -> ! {
    log::error!("{message}");
    loop {
        embassy_time::Timer::after_secs(3_600).await;
    }
}
