#![doc = include_str!("../README.md")]
#![no_std]

#[cfg(all(feature = "esp32c3", feature = "esp32c6"))]
compile_error!("enable exactly one chip feature: `esp32c3` or `esp32c6`");
#[cfg(not(any(feature = "esp32c3", feature = "esp32c6")))]
compile_error!("enable one chip feature: `esp32c3` or `esp32c6`");

// The panic handler (prints a backtrace, then halts).
use esp_backtrace as _;

pub mod hardware;
pub mod partitions;
pub mod self_test;
pub mod wifi;

use core::cell::RefCell;

use embassy_executor::Spawner;
use embassy_futures::join::join;
use esp_hal::clock::CpuClock;
use esp_hal::gpio::{Input, InputConfig, Pull};
use esp_hal::timer::timg::TimerGroup;
use esp_storage::FlashStorage;
use static_cell::StaticCell;
use wildcam_firmware_app::settings::Settings;
use wildcam_firmware_app::{
    Board, CaptureHardware, FlashStateStore, NetworkHardware, NoClassifier, Restart, Shared, SharedFlash,
    Trap, TrapIdentity,
};
use wildcam_sdk::protocol::{Capabilities, Chip, FirmwareVersion};
use wildcam_sdk::queue::FlashStore;

use crate::hardware::{CaptureStub, EspEntropy, EspRestart, GpioPir, NoBatteryGauge, UnsetClock};

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
/// opens the trap's storage and runs the application with the self-test of
/// a new image beside it. Never returns.
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
    let restart = EspRestart;
    let identity = TrapIdentity {
        hardware_model: info.hardware_model,
        chip: info.chip,
        firmware: info.firmware,
        secure_version: 1,
        capabilities: Capabilities::PIR,
    };
    let opened = FlashStateStore::new(SharedFlash::new(flash), layout.app.state.clone())
        .map_err(|_| "state partition layout")
        .and_then(|state| {
            let queue = FlashStore::<_>::new(SharedFlash::new(flash), layout.app.queue.clone())
                .map_err(|_| "queue partition layout")?;
            Trap::open(identity, queue, state, restart.reset_reason(), &mut entropy)
                .map_err(|_| "storage unreadable")
        });
    let trap = match opened {
        Ok(trap) => trap,
        // Storage is not sane: a new image rolls back, an old one stops here.
        Err(error) => self_test::storage_failed(flash, error).await,
    };
    let shared = Shared::new(trap, NoBatteryGauge, UnsetClock);
    let pir = Input::new(peripherals.GPIO4, InputConfig::default().with_pull(Pull::Down));
    let mut board = Board {
        capture: CaptureHardware {
            camera: CaptureStub::new(),
            classifier: NoClassifier,
            motion: GpioPir::new(pir),
        },
        network: NetworkHardware { entropy, restart },
        utc_offset_min: settings.utc_offset_min,
    };
    let app = wildcam_firmware_app::run(&shared, stack, &settings.network, &mut board);
    let (never, ()) = join(app, self_test::confirm_when_connected(flash, &shared)).await;
    match never {}
}

/// Logs `message` and parks the main task (the watchdog-free way to stop).
async fn halt(message: &dyn core::fmt::Display) -> ! {
    log::error!("{message}");
    loop {
        embassy_time::Timer::after_secs(3_600).await;
    }
}
