//! The ESP boards' hardware behind the application's traits.

use wildcam_firmware_app::{
    BatteryGauge, Camera, Clock, Entropy, FrameSink, MotionSensor, PowerReading, Restart,
};
use wildcam_sdk::protocol::{ChargeState, ResetReason, UnixSeconds};

/// **Capture stub** — these boards have no camera driver yet. Each capture
/// produces a small synthetic frame (a JPEG start and end marker around
/// bytes derived from a counter) so that every other part of the firmware
/// (hashing, the queue, the server) runs for real. Replace it with an SPI
/// camera driver (e.g. an OV2640 ArduCAM) implementing [`Camera`].
#[derive(Debug, Default)]
pub struct CaptureStub {
    frame: u32,
}

impl CaptureStub {
    /// The stub; logs once that no real camera is attached.
    pub fn new() -> Self {
        log::warn!("camera: capture stub (synthetic frames), no camera driver on this board");
        Self { frame: 0 }
    }
}

/// Size of a stub frame, bytes.
const STUB_FRAME_LEN: usize = 1_024;

impl Camera for CaptureStub {
    type Error = core::convert::Infallible;

    async fn capture<S: FrameSink>(&mut self, sink: &mut S) -> Result<(), Self::Error> {
        self.frame = self.frame.wrapping_add(1);
        sink.write(&[0xFF, 0xD8]);
        let mut chunk = [0u8; 64];
        for block in 0..(STUB_FRAME_LEN - 4) / chunk.len() {
            for (index, byte) in chunk.iter_mut().enumerate() {
                let position = u32::try_from(block * 64 + index).unwrap_or(0);
                *byte = self
                    .frame
                    .wrapping_mul(31)
                    .wrapping_add(position)
                    .to_le_bytes()[0];
            }
            sink.write(&chunk);
        }
        sink.write(&[0xFF, 0xD9]);
        Ok(())
    }
}

/// A PIR sensor's output on a GPIO (rising edge = motion). Sensitivity is set
/// by the module's potentiometer, so the configured value is only recorded.
#[derive(Debug)]
pub struct GpioPir {
    input: esp_hal::gpio::Input<'static>,
    sensitivity_pct: u8,
}

impl GpioPir {
    /// The PIR on `input`.
    pub fn new(input: esp_hal::gpio::Input<'static>) -> Self {
        Self { input, sensitivity_pct: 60 }
    }
}

impl MotionSensor for GpioPir {
    async fn wait_for_motion(&mut self) {
        self.input.wait_for_rising_edge().await;
        log::info!("pir: motion (sensitivity set to {} %)", self.sensitivity_pct);
    }

    fn set_sensitivity(&mut self, percent: u8) {
        self.sensitivity_pct = percent;
    }
}

/// No battery gauge is wired yet: reports an unknown charger state and 0 mV.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoBatteryGauge;

impl BatteryGauge for NoBatteryGauge {
    fn read(&mut self) -> PowerReading {
        PowerReading {
            battery_mv: 0,
            battery_soc_pct: 0,
            charge_state: ChargeState::Unknown,
            solar_mw: 0,
            temperature_decicelsius: 0,
        }
    }
}

/// No wall clock yet (no SNTP, no RTC battery): the time is unknown, so
/// capture windows stay armed and detections carry time 0.
#[derive(Debug, Default, Clone, Copy)]
pub struct UnsetClock;

impl Clock for UnsetClock {
    fn now_unix(&self) -> Option<UnixSeconds> {
        None
    }
}

/// The chip's RNG; true random once the radio runs (the Wi-Fi driver keeps
/// the entropy source enabled), which happens before the trap draws keys.
#[derive(Debug, Default)]
pub struct EspEntropy {
    rng: esp_hal::rng::Rng,
}

impl EspEntropy {
    /// The RNG.
    pub fn new() -> Self {
        Self { rng: esp_hal::rng::Rng::new() }
    }
}

impl Entropy for EspEntropy {
    fn fill(&mut self, bytes: &mut [u8]) {
        self.rng.read(bytes);
    }
}

/// Software reset, and the chip's reset reason.
#[derive(Debug, Default, Clone, Copy)]
pub struct EspRestart;

impl Restart for EspRestart {
    fn reset_reason(&self) -> ResetReason {
        use esp_hal::rtc_cntl::SocResetReason as Soc;
        match esp_hal::system::reset_reason() {
            Some(Soc::ChipPowerOn) => ResetReason::PowerOn,
            Some(Soc::SysBrownOut) => ResetReason::Brownout,
            Some(Soc::CoreSw | Soc::Cpu0Sw) => ResetReason::Software,
            Some(Soc::CoreDeepSleep) => ResetReason::DeepSleepWake,
            Some(
                Soc::CoreMwdt0
                | Soc::CoreMwdt1
                | Soc::CoreRtcWdt
                | Soc::Cpu0Mwdt0
                | Soc::Cpu0Mwdt1
                | Soc::Cpu0RtcWdt
                | Soc::SysRtcWdt
                | Soc::SysSuperWdt,
            ) => ResetReason::Watchdog,
            _ => ResetReason::Unknown,
        }
    }

    fn restart(&mut self) -> ! {
        esp_hal::system::software_reset()
    }
}
