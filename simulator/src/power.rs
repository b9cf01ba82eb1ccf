//! A trap's battery, solar panel and temperature, advanced in virtual time.
//!
//! Deliberately simple and deterministic: sleep current (higher in the
//! cold), a charge per captured frame, per planned radio connection and per
//! uplink message, solar input on a half-sine between 06:00 and 18:00. Only
//! scheduled things drain the battery (not the real retries against a real
//! broker), so a seed gives the same battery readings on every run.

use wildcam_sdk::protocol::ChargeState;

use crate::scenario::PowerConfig;

/// Nominal cell voltage used to turn solar power into charge, volts.
const CELL_V: f64 = 3.7;
/// Charger efficiency.
const CHARGE_EFFICIENCY: f64 = 0.8;

/// A trap's power state.
#[derive(Debug, Clone)]
pub struct Power {
    capacity_mah: f64,
    charge_mah: f64,
    solar_peak_mw: f64,
    idle_ma: f64,
    temperature_mean_c: f64,
    temperature_swing_c: f64,
    /// Virtual time of the last update, ms.
    at_ms: u64,
}

impl Power {
    /// A battery at `soc` (0..=1) at virtual `at_ms`.
    pub fn new(config: &PowerConfig, soc: f64, solar: bool, temperature_mean_c: f64, at_ms: u64) -> Self {
        Self {
            capacity_mah: config.battery_mah,
            charge_mah: config.battery_mah * soc,
            solar_peak_mw: if solar { config.solar_peak_mw } else { 0.0 },
            idle_ma: config.idle_ma,
            temperature_mean_c,
            temperature_swing_c: config.temperature_swing_c,
            at_ms,
        }
    }

    /// Temperature at virtual `at_ms`, °C: coldest at 05:00, warmest at 15:00.
    pub fn temperature_c(&self, at_ms: u64) -> f64 {
        let hour = hour_of(at_ms);
        self.temperature_mean_c
            + self.temperature_swing_c
                * (std::f64::consts::TAU * (hour - 10.0) / 20.0)
                    .sin()
                    .clamp(-1.0, 1.0)
    }

    /// Solar input at `at_ms`, milliwatts.
    pub fn solar_mw(&self, at_ms: u64) -> f64 {
        let hour = hour_of(at_ms);
        if (6.0..18.0).contains(&hour) {
            self.solar_peak_mw * (std::f64::consts::PI * (hour - 6.0) / 12.0).sin()
        } else {
            0.0
        }
    }

    /// Advances to `at_ms` (sleep drain and solar), then takes `mah` out.
    pub fn spend(&mut self, at_ms: u64, mah: f64) {
        if at_ms > self.at_ms {
            let hours = (at_ms - self.at_ms) as f64 / 3_600_000.0;
            // Cold batteries deliver less: +2 % drain per degree below 10 °C.
            let cold = 1.0 + (10.0 - self.temperature_c(at_ms)).max(0.0) * 0.02;
            let solar_mah = self.solar_mw(at_ms) / CELL_V * CHARGE_EFFICIENCY * hours;
            self.charge_mah += solar_mah - self.idle_ma * cold * hours;
            self.at_ms = at_ms;
        }
        self.charge_mah = (self.charge_mah - mah).clamp(0.0, self.capacity_mah);
    }

    /// State of charge, 0..=1.
    pub fn soc(&self) -> f64 {
        self.charge_mah / self.capacity_mah
    }

    /// Battery voltage, millivolts (a lithium cell: 3.3 V empty, 4.2 V full).
    pub fn battery_mv(&self) -> u16 {
        (3_300.0 + 900.0 * self.soc()) as u16
    }

    /// The charger's state at `at_ms`.
    pub fn charge_state(&self, at_ms: u64) -> ChargeState {
        match (self.solar_mw(at_ms) > 0.0, self.soc() >= 0.999) {
            (true, true) => ChargeState::Full,
            (true, false) => ChargeState::Charging,
            (false, _) => ChargeState::Discharging,
        }
    }
}

fn hour_of(at_ms: u64) -> f64 {
    (at_ms % 86_400_000) as f64 / 3_600_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_drain_and_the_sun_charges() {
        let config = PowerConfig::default();
        let mut dark = Power::new(&config, 0.5, false, 12.0, 0);
        dark.spend(0, 60.0);
        assert!((dark.soc() - 0.49).abs() < 1e-9);
        dark.spend(12 * 3_600_000, 0.0);
        assert!(dark.soc() < 0.49);
        let mut sunny = Power::new(&config, 0.5, true, 12.0, 12 * 3_600_000);
        sunny.spend(13 * 3_600_000, 0.0);
        assert!(sunny.soc() > 0.5);
        assert_eq!(sunny.charge_state(12 * 3_600_000), ChargeState::Charging);
        assert!(sunny.temperature_c(15 * 3_600_000) > sunny.temperature_c(5 * 3_600_000));
        assert!((3_300..=4_200).contains(&sunny.battery_mv()));
    }
}
