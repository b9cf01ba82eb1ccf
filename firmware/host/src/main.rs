//! The WildCAM firmware on a Linux host: the same application crate as the
//! ESP32 boards, on the Embassy executor for std, with embassy-net over a TAP
//! device, a file-backed NOR flash, a synthetic camera and a PIR driven by
//! standard input. The end-to-end test (`tests/end_to_end.rs`) runs it in a
//! network namespace against a real fleet server.
//!
//! Run (as root, or with CAP_NET_ADMIN):
//! `ip tuntap add dev wctap0 mode tap && ip addr add 192.168.77.1/24 dev wctap0 && ip link set wctap0 up`, then
//! `cargo run -p wildcam-firmware-host -- --tap wctap0 --flash /tmp/trap.flash
//!  --address 192.168.77.2/24 --gateway 192.168.77.1 --server 192.168.77.1
//!  --claim-token <token>` and type `pir` lines.

mod boot;
mod flash;
mod logger;
mod options;
mod sim;

use std::cell::RefCell;

use embassy_executor::Spawner;
use embassy_net::{Config, Ipv4Cidr, Runner, StackResources, StaticConfigV4};
use embassy_net_tuntap::TunTapDevice;
use embassy_time::Duration;
use static_cell::StaticCell;
use wildcam_firmware_app::session::NetworkSettings;
use wildcam_firmware_app::{
    Board, BootControl, CaptureHardware, FlashLayout, FlashStateStore, NetworkHardware, NoClassifier,
    NorFlashSlot, Restart, Shared, SharedFlash, Trap, TrapIdentity,
};
use wildcam_sdk::protocol::{Capabilities, Chip, FirmwareVersion};
use wildcam_sdk::queue::FlashStore;

use crate::boot::HostBoot;
use crate::flash::{FileFlash, PAGE_LEN};
use crate::options::{Addressing, Options};
use crate::sim::{OsEntropy, SimulatedBattery, SimulatedPir, SyntheticCamera, SystemClock};

/// The flash file: 2 pages of device state, 30 of offline queue (about 870
/// maximum-length detections).
const FLASH_LEN: usize = 32 * PAGE_LEN;
const STATE_PAGES: u32 = 2;

/// What this firmware is: `firmware` is the running version the boot
/// control reports (this binary's, or the update it stands in for).
fn identity(firmware: FirmwareVersion, ota_public_key: Option<[u8; 32]>) -> TrapIdentity {
    TrapIdentity {
        hardware_model: "wildcam-host",
        chip: Chip::Host,
        firmware,
        secure_version: 1,
        capabilities: Capabilities::PIR,
        ota_public_key,
    }
}

fn firmware_version() -> FirmwareVersion {
    let part = |text: &str| text.parse().unwrap_or(0);
    FirmwareVersion {
        major: part(env!("CARGO_PKG_VERSION_MAJOR")),
        minor: part(env!("CARGO_PKG_VERSION_MINOR")),
        patch: part(env!("CARGO_PKG_VERSION_PATCH")),
    }
}

#[embassy_executor::task]
async fn net_task(mut runner: Runner<'static, TunTapDevice>) -> ! {
    runner.run().await
}

#[embassy_executor::main]
async fn main(spawner: Spawner) {
    logger::init();
    let options = match Options::parse(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    if let Err(message) = run(spawner, options).await {
        log::error!("{message}");
        std::process::exit(1);
    }
}

async fn run(spawner: Spawner, options: Options) -> Result<(), String> {
    let device = TunTapDevice::new(&options.tap)
        .map_err(|error| format!("cannot attach to TAP device {}: {error}", options.tap))?;
    let mut entropy = OsEntropy;
    let mut seed = [0u8; 8];
    wildcam_firmware_app::Entropy::fill(&mut entropy, &mut seed);
    static RESOURCES: StaticCell<StackResources<4>> = StaticCell::new();
    let (stack, runner) = embassy_net::new(
        device,
        net_config(&options.addressing),
        RESOURCES.init(StackResources::new()),
        u64::from_le_bytes(seed),
    );
    spawner.spawn(net_task(runner).map_err(|error| format!("cannot start the network task: {error:?}"))?);

    let flash = FileFlash::open(&options.flash, FLASH_LEN)
        .map_err(|error| format!("cannot open the flash image {}: {error}", options.flash.display()))?;
    let flash = RefCell::new(flash);
    let split = STATE_PAGES * PAGE_LEN as u32;
    let layout = FlashLayout { state: 0..split, queue: split..FLASH_LEN as u32 };
    let state = FlashStateStore::new(SharedFlash::new(&flash), layout.state.clone())
        .map_err(|error| format!("state flash: {error}"))?;
    let queue = FlashStore::<_>::new(SharedFlash::new(&flash), layout.queue.clone())
        .map_err(|error| format!("queue flash: {error}"))?;
    let boot = HostBoot::power_on(&options.flash, firmware_version(), options.self_test_fail_version)?;
    let slot_file = boot::slot_path(&options.flash, boot.inactive_slot());
    let slot_flash = FileFlash::open(&slot_file, boot::SLOT_LEN)
        .map_err(|error| format!("cannot open the OTA slot {}: {error}", slot_file.display()))?;
    let slot = NorFlashSlot::new(slot_flash, 0..boot::SLOT_LEN as u32)
        .map_err(|error| format!("OTA slot {}: {error:?}", slot_file.display()))?;
    let identity = identity(boot.running_version(), options.ota_public_key);
    let trap = Trap::open(identity, queue, state, boot.reset_reason(), &mut entropy)
        .map_err(|error| format!("cannot open the trap's storage: {error}"))?;
    log::info!(
        "trap up: identity key {}, {}",
        hex(&trap.identity_key()),
        trap.device_id()
            .map_or("not claimed yet".into(), |id| format!("device id {id}"))
    );
    let shared = Shared::new(trap, SimulatedBattery::default(), SystemClock);
    let settings = NetworkSettings {
        server_host: &options.server_host,
        server_port: options.server_port,
        provision_password: &options.provision_password,
        claim_token: options.claim_token.as_deref(),
        server_key: options.server_key,
        connectivity: options.connectivity,
    };
    let mut board = Board {
        capture: CaptureHardware {
            camera: SyntheticCamera::new(options.image_len),
            classifier: NoClassifier,
            motion: SimulatedPir::new(options.pir_every_s.map(Duration::from_secs)),
        },
        network: NetworkHardware { entropy, boot, slot },
        utc_offset_min: options.utc_offset_min,
    };
    sim::spawn_stdin_reader();
    match wildcam_firmware_app::run(&shared, stack, &settings, &mut board).await {}
}

fn net_config(addressing: &Addressing) -> Config {
    match addressing {
        Addressing::Dhcp => Config::dhcpv4(Default::default()),
        Addressing::Static { address, prefix_len, gateway } => Config::ipv4_static(StaticConfigV4 {
            address: Ipv4Cidr::new(*address, *prefix_len),
            gateway: *gateway,
            dns_servers: heapless::Vec::new(),
        }),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}
