//! Wi-Fi station and the network stack: the link task keeps the station
//! associated (reconnecting after a drop), embassy-net gets an address over DHCP.

use core::fmt;

use embassy_executor::Spawner;
use embassy_net::{Runner, Stack, StackResources};
use embassy_time::Timer;
use esp_radio::wifi::sta::StationConfig;
use esp_radio::wifi::{AuthenticationMethodConfig, Config, Interface, WifiController};
use static_cell::StaticCell;
use wildcam_firmware_app::settings::Settings;

/// Why Wi-Fi could not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WifiStartError {
    /// No `wifi_ssid` in the settings.
    SsidMissing,
    /// The SSID or password is too long.
    CredentialsTooLong,
    /// The driver refused to start.
    Driver,
    /// A task could not be spawned.
    Spawn,
}

impl fmt::Display for WifiStartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::SsidMissing => "no wifi_ssid in the settings",
            Self::CredentialsTooLong => "the Wi-Fi SSID or password is too long",
            Self::Driver => "the Wi-Fi driver did not start",
            Self::Spawn => "a network task could not be started",
        })
    }
}

/// Sockets the stack holds at once (MQTT, DNS, DHCP, spare).
const SOCKETS: usize = 4;

/// Starts the station on the settings' network and returns the stack
/// (DHCP); the link and the stack run in their own tasks.
pub fn start(
    spawner: Spawner,
    device: esp_hal::peripherals::WIFI<'static>,
    settings: &Settings<'_>,
) -> Result<Stack<'static>, WifiStartError> {
    let ssid = settings.wifi_ssid.ok_or(WifiStartError::SsidMissing)?;
    let authentication = match settings.wifi_password {
        Some(password) => AuthenticationMethodConfig::Wpa2Personal(
            password
                .try_into()
                .map_err(|_| WifiStartError::CredentialsTooLong)?,
        ),
        None => AuthenticationMethodConfig::Open,
    };
    let station = StationConfig::default()
        .with_ssid(
            ssid.try_into()
                .map_err(|_| WifiStartError::CredentialsTooLong)?,
        )
        .with_authentication(authentication);
    let mut controller =
        WifiController::new(device, Default::default()).map_err(|_| WifiStartError::Driver)?;
    controller
        .set_config(&Config::Station(station))
        .map_err(|_| WifiStartError::Driver)?;
    let interface = Interface::station();
    let rng = esp_hal::rng::Rng::new();
    let seed = (u64::from(rng.random()) << 32) | u64::from(rng.random());
    static RESOURCES: StaticCell<StackResources<SOCKETS>> = StaticCell::new();
    let (stack, runner) = embassy_net::new(
        interface,
        embassy_net::Config::dhcpv4(Default::default()),
        RESOURCES.init(StackResources::new()),
        seed,
    );
    spawner.spawn(link_task(controller).map_err(|_| WifiStartError::Spawn)?);
    spawner.spawn(net_task(runner).map_err(|_| WifiStartError::Spawn)?);
    Ok(stack)
}

/// Keeps the station associated.
#[embassy_executor::task]
async fn link_task(mut controller: WifiController<'static>) -> ! {
    loop {
        match controller.connect_async().await {
            Ok(info) => {
                log::info!("Wi-Fi: associated on channel {}", info.channel);
                let lost = controller.wait_for_disconnect_async().await;
                log::warn!("Wi-Fi: link lost ({lost:?}), reconnecting");
            }
            Err(error) => {
                log::warn!("Wi-Fi: could not associate ({error:?}), retrying in 5 s");
                Timer::after_secs(5).await;
            }
        }
    }
}

/// Runs the network stack.
#[embassy_executor::task]
async fn net_task(mut runner: Runner<'static, Interface>) -> ! {
    runner.run().await
}
