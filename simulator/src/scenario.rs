//! Scenarios: TOML files describing a fleet, its animals, its faults and how
//! fast virtual time runs (`simulator/scenarios/*.toml`, format in the
//! README).
//!
//! Every section and key is optional except `name`; unknown keys are refused
//! (`deny_unknown_fields`) and every value is range-checked by
//! [`Scenario::validate`], which names the offending key.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use wildcam_sdk::protocol::FirmwareVersion;

use crate::activity::Pattern;

/// Most virtual traps one simulator runs.
pub const TRAPS_MAX: u32 = 100_000;
/// Longest virtual duration, hours (a year).
pub const DURATION_H_MAX: f64 = 24.0 * 366.0;
/// Highest time compression factor.
pub const COMPRESSION_MAX: f64 = 10_000_000.0;
/// Queue capacities the simulator can build (records of a MemoryStore).
pub const QUEUE_CAPACITIES: [usize; 4] = [64, 256, 1_024, 4_096];
/// Most species in a scenario.
pub const SPECIES_MAX: usize = 64;
/// Most scheduled events in a scenario.
pub const EVENTS_MAX: usize = 64;
/// Image sizes an OTA rehearsal may use, KiB.
pub const OTA_IMAGE_KIB: std::ops::RangeInclusive<u32> = 1..=4_096;
/// Most traps one rollout names (the fleet server's limit of an explicit list).
pub const OTA_TRAPS_MAX: u32 = 10_000;
/// Bounds of `ota.max_in_flight` (as the fleet server's).
pub const OTA_MAX_IN_FLIGHT: std::ops::RangeInclusive<u32> = 1..=10_000;
/// Bounds of `ota.failure_threshold` (as the fleet server's).
pub const OTA_FAILURE_THRESHOLD: std::ops::RangeInclusive<u32> = 1..=100_000;

/// Why a scenario was refused.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("could not read scenario {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Not TOML, an unknown key, or a value of the wrong type.
    #[error("invalid scenario{origin}: {message}")]
    Parse {
        /// Where it came from (file), may be empty.
        origin: String,
        /// The TOML parser's message, which names the key and line.
        message: String,
    },
    /// A value outside its allowed range.
    #[error("invalid scenario{origin}: `{key}` {message}")]
    OutOfRange {
        /// Where it came from (file), may be empty.
        origin: String,
        /// The dotted key, e.g. `fleet.traps`.
        key: String,
        /// What is allowed.
        message: String,
    },
}

/// A whole scenario.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name, shown in the report.
    pub name: String,
    /// What the scenario is for.
    #[serde(default)]
    pub description: String,
    /// Seed of every random choice: the same seed gives the same detections.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// The traps.
    #[serde(default)]
    pub fleet: FleetConfig,
    /// Virtual time.
    #[serde(default)]
    pub time: TimeConfig,
    /// Triggers, bursts, blanks.
    #[serde(default)]
    pub activity: ActivityConfig,
    /// The species mix (default: a temperate-forest mix).
    #[serde(default = "default_species")]
    pub species: Vec<SpeciesConfig>,
    /// Power: battery, solar, radio, temperature.
    #[serde(default)]
    pub power: PowerConfig,
    /// Random faults.
    #[serde(default)]
    pub faults: FaultConfig,
    /// Scheduled events (outages, traps going offline).
    #[serde(default)]
    pub events: Vec<EventConfig>,
    /// Connection handling.
    #[serde(default)]
    pub network: NetworkConfig,
    /// OTA rehearsal: a signed image rolled out to the fleet.
    #[serde(default)]
    pub ota: OtaConfig,
    /// The directory of the scenario file (relative paths in it start
    /// there); `None` for text parsed without a file (the current directory).
    #[serde(skip)]
    pub dir: Option<PathBuf>,
}

fn default_seed() -> u64 {
    1
}

/// The traps.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FleetConfig {
    /// How many virtual traps.
    pub traps: u32,
    /// Fraction of traps that sleep and connect only at check-in (the rest
    /// stay connected and upload at once).
    pub sleepy_fraction: f64,
    /// Seconds of virtual time between check-ins (health report, queue flush).
    pub checkin_interval_s: u32,
    /// Records the offline queue holds: 64, 256, 1024 or 4096.
    pub queue_capacity: usize,
    /// Where the queue lives: `memory` (`MemoryStore`) or `flash`
    /// (`FlashStore` over an in-RAM NOR flash of 64 KiB).
    pub queue_store: QueueStoreKind,
    /// Detections in flight per trap (the SDK queue's window).
    pub inflight_max: usize,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            traps: 1_000,
            sleepy_fraction: 0.2,
            checkin_interval_s: 3_600,
            queue_capacity: 1_024,
            queue_store: QueueStoreKind::Memory,
            inflight_max: 16,
        }
    }
}

/// Which SDK queue store a trap uses.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum QueueStoreKind {
    /// `MemoryStore`: RAM, reopened over the same store after a reboot.
    Memory,
    /// `FlashStore<MemFlash>`: NOR flash semantics in RAM.
    Flash,
}

/// Virtual time.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TimeConfig {
    /// Virtual hours simulated.
    pub duration_h: f64,
    /// Virtual start, Unix seconds (traps keep UTC as local time).
    pub start_unix_s: u32,
    /// Virtual seconds per real second, or `"max"`: as fast as the server
    /// acknowledges (the clock speeds up while the traps' backlog is small).
    pub compression: Compression,
}

impl Default for TimeConfig {
    fn default() -> Self {
        Self { duration_h: 24.0, start_unix_s: 1_780_012_800, compression: Compression::Factor(1_440.0) }
    }
}

/// How fast virtual time runs.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Compression {
    /// A fixed factor.
    Factor(f64),
    /// A word; only `"max"` is valid.
    Word(String),
}

impl Compression {
    /// The fixed factor, or `None` for `"max"`.
    pub fn factor(&self) -> Option<f64> {
        match self {
            Compression::Factor(f) => Some(*f),
            Compression::Word(_) => None,
        }
    }
}

/// Triggers, bursts and blanks.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ActivityConfig {
    /// Mean PIR triggers per trap per virtual day, blanks included.
    pub triggers_per_trap_per_day: f64,
    /// Spread of the per-trap rate (sigma of a log-normal factor; 0: equal).
    pub trap_rate_spread: f64,
    /// Fraction of triggers that are false (wind, sun on vegetation): blank
    /// frames without a classification. Field studies report 0.2 to 0.75.
    pub blank_rate: f64,
    /// Frames per trigger: each frame is one detection (1..=10).
    pub burst_len: u8,
    /// Species each trap sees, drawn from the scenario's list (0: all).
    pub species_per_trap: usize,
}

impl Default for ActivityConfig {
    fn default() -> Self {
        Self {
            triggers_per_trap_per_day: 110.0,
            trap_rate_spread: 0.5,
            blank_rate: 0.4,
            burst_len: 3,
            species_per_trap: 6,
        }
    }
}

/// One species.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SpeciesConfig {
    /// Common name (for the report).
    pub name: String,
    /// Label id in the classifier's table.
    pub label: u16,
    /// When it is active.
    pub pattern: Pattern,
    /// Relative abundance.
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

fn default_species() -> Vec<SpeciesConfig> {
    let species =
        |name: &str, label, pattern, weight| SpeciesConfig { name: name.into(), label, pattern, weight };
    use Pattern::*;
    vec![
        species("red fox", 12, Nocturnal, 3.0),
        species("wild boar", 31, Nocturnal, 2.5),
        species("european badger", 7, Nocturnal, 1.5),
        species("roe deer", 40, Crepuscular, 4.0),
        species("red deer", 41, Crepuscular, 1.5),
        species("brown hare", 22, Crepuscular, 1.0),
        species("red squirrel", 55, Diurnal, 1.0),
        species("common pheasant", 63, Diurnal, 0.8),
        species("human", 1, Diurnal, 0.7),
        species("domestic cat", 9, Nocturnal, 0.5),
    ]
}

/// Battery, solar, radio and temperature.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PowerConfig {
    /// Battery capacity, mAh.
    pub battery_mah: f64,
    /// Charge at the start: each trap draws uniformly from this range (0..=1).
    pub initial_soc_min: f64,
    /// Upper end of the starting charge.
    pub initial_soc_max: f64,
    /// Fraction of traps with a solar panel.
    pub solar_fraction: f64,
    /// Solar panel peak power, milliwatts.
    pub solar_peak_mw: f64,
    /// Sleep current, milliamps.
    pub idle_ma: f64,
    /// Charge per captured frame (PIR wake, sensor, flash, classifier), mAh.
    pub frame_mah: f64,
    /// Charge per radio connection (attach, TLS, MQTT connect), mAh.
    pub connect_mah: f64,
    /// Charge per uplink message, mAh.
    pub message_mah: f64,
    /// Mean site temperature, °C; each trap varies around it.
    pub temperature_mean_c: f64,
    /// Day–night swing, °C (peak to mean).
    pub temperature_swing_c: f64,
}

impl Default for PowerConfig {
    fn default() -> Self {
        Self {
            battery_mah: 6_000.0,
            initial_soc_min: 0.5,
            initial_soc_max: 1.0,
            solar_fraction: 0.5,
            solar_peak_mw: 1_500.0,
            idle_ma: 0.25,
            frame_mah: 0.06,
            connect_mah: 0.4,
            message_mah: 0.005,
            temperature_mean_c: 12.0,
            temperature_swing_c: 6.0,
        }
    }
}

/// Random faults, per trap.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FaultConfig {
    /// Connections dropped per connected trap per virtual day.
    pub drop_rate_per_day: f64,
    /// Fraction of traps on a flaky link.
    pub flaky_fraction: f64,
    /// Connections dropped per flaky trap per virtual day.
    pub flaky_drop_rate_per_day: f64,
    /// Probability that a connection attempt of a flaky trap fails.
    pub flaky_connect_failure: f64,
    /// Reboots per trap per virtual day (watchdog, brown-out): the
    /// connection is cut, the queue reopened from its store, the sealer
    /// resumed from its persisted reservation.
    pub reboot_rate_per_day: f64,
    /// Fraction of traps whose clock is off.
    pub clock_skew_fraction: f64,
    /// Largest clock error, seconds (either direction).
    pub clock_skew_max_s: u32,
}

impl Default for FaultConfig {
    fn default() -> Self {
        Self {
            drop_rate_per_day: 0.5,
            flaky_fraction: 0.05,
            flaky_drop_rate_per_day: 24.0,
            flaky_connect_failure: 0.3,
            reboot_rate_per_day: 0.05,
            clock_skew_fraction: 0.05,
            clock_skew_max_s: 900,
        }
    }
}

/// A scheduled event.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EventConfig {
    /// What happens.
    pub kind: EventKind,
    /// Virtual hours after the start.
    pub at_h: f64,
    /// Virtual duration, hours.
    pub duration_h: f64,
    /// Fraction of traps affected (`traps_offline`; `broker_outage`
    /// affects all).
    #[serde(default = "one")]
    pub fraction: f64,
}

/// Kinds of scheduled events.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// Every trap loses the broker: connections drop and attempts fail
    /// until the end (seen from the traps; the broker itself keeps running,
    /// a real restart is what the CI test does).
    BrokerOutage,
    /// A fraction of traps lose their uplink (cellular coverage, snow on the
    /// antenna) and reconnect afterwards, flushing what they queued.
    TrapsOffline,
}

/// Connection handling (real time: it paces the real broker).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// Without an ack for this long, a trap rewinds and resends, ms.
    pub ack_timeout_ms: u32,
    /// First reconnect delay (SDK `Backoff`), ms.
    pub backoff_initial_ms: u32,
    /// Longest reconnect delay, ms.
    pub backoff_max_ms: u32,
    /// Connection attempts in progress at once, all traps together.
    pub connects_at_once: usize,
    /// MQTT keep-alive, seconds.
    pub keep_alive_s: u16,
    /// Longest wait for a CONNACK, then for the SUBACK, seconds; a trap that gets
    /// no answer in time drops the attempt and backs off.
    pub connect_timeout_s: u16,
    /// After the virtual end, how long traps may take to flush, seconds.
    pub drain_timeout_s: u32,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            ack_timeout_ms: 5_000,
            backoff_initial_ms: 200,
            backoff_max_ms: 5_000,
            connects_at_once: 64,
            keep_alive_s: 60,
            connect_timeout_s: 15,
            drain_timeout_s: 120,
        }
    }
}

/// OTA rehearsal: the simulator signs a synthetic image (its content drawn
/// from the seed) with `signing_key`, uploads it to the fleet server and, at
/// `start_h`, creates a rollout naming every trap of the run. Each trap runs
/// the SDK's `OtaMachine` over a slot in RAM: chunk pulls, verification,
/// reboot into the new image, self-test, confirmation or rollback.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OtaConfig {
    /// Whether to rehearse a rollout (needs the fleet server).
    pub enabled: bool,
    /// The firmware signing private key (PKCS#8 PEM, as `cargo xtask keygen`
    /// writes it), relative to the scenario file's directory or absolute.
    /// Read when the run starts; the server must accept its public key
    /// (`[ota] signing_keys`).
    pub signing_key: String,
    /// Size of the synthetic image, KiB (1..=4096).
    pub image_kib: u32,
    /// The version every trap runs at the start (`MAJOR.MINOR.PATCH`).
    pub from_version: String,
    /// The version rolled out; newer than `from_version`.
    pub to_version: String,
    /// Virtual hours after the start when the rollout is created (within the run).
    pub start_h: f64,
    /// Traps offered, downloading or verifying at once (the rollout's `max_in_flight`).
    pub max_in_flight: u32,
    /// Failed or rolled-back traps that pause the rollout.
    pub failure_threshold: u32,
    /// Fraction of updated traps whose new image fails its self-test (they
    /// roll back and report `SelfTestFailed`).
    pub self_test_failure_rate: f64,
    /// Fraction of updated traps killed after booting the new image and
    /// before confirming it: the bootloader rolls back (`RolledBack`).
    pub bootloader_rollback_rate: f64,
    /// The manifest's minimum battery voltage, mV (0: none); traps below it
    /// refuse the offer (`BatteryTooLow`).
    pub min_battery_mv: u16,
}

impl Default for OtaConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            signing_key: String::new(),
            image_kib: 256,
            from_version: "1.0.0".into(),
            to_version: "1.1.0".into(),
            start_h: 0.0,
            max_in_flight: 50,
            failure_threshold: 5,
            self_test_failure_rate: 0.0,
            bootloader_rollback_rate: 0.0,
            min_battery_mv: 0,
        }
    }
}

/// `"1.2.3"` → the version; `None` unless three numbers separated by dots.
pub fn parse_version(text: &str) -> Option<FirmwareVersion> {
    let mut parts = text.trim().split('.').map(|p| p.parse::<u16>().ok());
    let version = FirmwareVersion { major: parts.next()??, minor: parts.next()??, patch: parts.next()?? };
    parts.next().is_none().then_some(version)
}

impl Scenario {
    /// Reads and validates a scenario file.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ScenarioError::Read { path: path.display().to_string(), source })?;
        let mut scenario = Self::parse(&text, &format!(" in {}", path.display()))?;
        scenario.dir = path.parent().map(Path::to_path_buf);
        Ok(scenario)
    }

    /// Parses and validates scenario text; `origin` prefixes error messages.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ScenarioError> {
        let scenario: Scenario = toml::from_str(text)
            .map_err(|e| ScenarioError::Parse { origin: origin.into(), message: e.to_string() })?;
        scenario.validate(origin)?;
        Ok(scenario)
    }

    /// Checks every value against its range.
    pub fn validate(&self, origin: &str) -> Result<(), ScenarioError> {
        let bad = |key: &str, message: String| ScenarioError::OutOfRange {
            origin: origin.into(),
            key: key.into(),
            message,
        };
        let fraction = |key: &str, value: f64| {
            if (0.0..=1.0).contains(&value) {
                Ok(())
            } else {
                Err(bad(key, format!("must be within 0..=1, not {value}")))
            }
        };
        let positive = |key: &str, value: f64, max: f64| {
            if value.is_finite() && value >= 0.0 && value <= max {
                Ok(())
            } else {
                Err(bad(key, format!("must be within 0..={max}, not {value}")))
            }
        };
        if self.name.trim().is_empty() {
            return Err(bad("name", "must not be empty".into()));
        }
        let fleet = &self.fleet;
        if !(1..=TRAPS_MAX).contains(&fleet.traps) {
            return Err(bad("fleet.traps", format!("must be within 1..={TRAPS_MAX}, not {}", fleet.traps)));
        }
        fraction("fleet.sleepy_fraction", fleet.sleepy_fraction)?;
        if !(60..=86_400).contains(&fleet.checkin_interval_s) {
            return Err(bad(
                "fleet.checkin_interval_s",
                format!("must be within 60..=86400, not {}", fleet.checkin_interval_s),
            ));
        }
        if !QUEUE_CAPACITIES.contains(&fleet.queue_capacity) {
            return Err(bad(
                "fleet.queue_capacity",
                format!("must be one of {QUEUE_CAPACITIES:?}, not {}", fleet.queue_capacity),
            ));
        }
        if fleet.inflight_max == 0 || fleet.inflight_max > fleet.queue_capacity.min(64) {
            return Err(bad(
                "fleet.inflight_max",
                format!("must be within 1..={}, not {}", fleet.queue_capacity.min(64), fleet.inflight_max),
            ));
        }
        let time = &self.time;
        if !(time.duration_h > 0.0 && time.duration_h <= DURATION_H_MAX) {
            return Err(bad(
                "time.duration_h",
                format!("must be above 0 and at most {DURATION_H_MAX}, not {}", time.duration_h),
            ));
        }
        match &time.compression {
            Compression::Factor(f) if !(f.is_finite() && *f >= 1.0 && *f <= COMPRESSION_MAX) => {
                return Err(bad(
                    "time.compression",
                    format!("must be within 1..={COMPRESSION_MAX} or \"max\", not {f}"),
                ));
            }
            Compression::Word(word) if word != "max" => {
                return Err(bad("time.compression", format!("must be a number or \"max\", not {word:?}")));
            }
            _ => {}
        }
        let end = f64::from(time.start_unix_s)
            + time.duration_h * 3_600.0
            + f64::from(self.faults.clock_skew_max_s);
        if end >= f64::from(u32::MAX) {
            return Err(bad("time.start_unix_s", "plus the duration must stay below 2^32 seconds".into()));
        }
        let activity = &self.activity;
        positive("activity.triggers_per_trap_per_day", activity.triggers_per_trap_per_day, 100_000.0)?;
        positive("activity.trap_rate_spread", activity.trap_rate_spread, 3.0)?;
        if !(0.0..1.0).contains(&activity.blank_rate) {
            return Err(bad(
                "activity.blank_rate",
                format!("must be within 0..1 (1 excluded), not {}", activity.blank_rate),
            ));
        }
        if !(1..=wildcam_sdk::protocol::BURST_LEN_MAX).contains(&activity.burst_len) {
            return Err(bad(
                "activity.burst_len",
                format!("must be within 1..=10, not {}", activity.burst_len),
            ));
        }
        if activity.species_per_trap > SPECIES_MAX {
            return Err(bad("activity.species_per_trap", format!("must be at most {SPECIES_MAX}")));
        }
        if self.species.is_empty() || self.species.len() > SPECIES_MAX {
            return Err(bad(
                "species",
                format!("must list 1..={SPECIES_MAX} species, not {}", self.species.len()),
            ));
        }
        for (i, species) in self.species.iter().enumerate() {
            if !(species.weight.is_finite() && species.weight > 0.0) {
                return Err(bad(
                    &format!("species[{i}].weight"),
                    format!("must be above 0, not {}", species.weight),
                ));
            }
        }
        self.validate_power(&bad, &fraction, &positive)?;
        self.validate_faults(&bad, &fraction, &positive)?;
        self.validate_network(&bad)?;
        self.validate_ota(&bad, &fraction)
    }

    fn validate_power(
        &self,
        bad: &impl Fn(&str, String) -> ScenarioError,
        fraction: &impl Fn(&str, f64) -> Result<(), ScenarioError>,
        positive: &impl Fn(&str, f64, f64) -> Result<(), ScenarioError>,
    ) -> Result<(), ScenarioError> {
        let power = &self.power;
        if !(power.battery_mah.is_finite() && power.battery_mah >= 100.0 && power.battery_mah <= 1_000_000.0)
        {
            return Err(bad(
                "power.battery_mah",
                format!("must be within 100..=1000000, not {}", power.battery_mah),
            ));
        }
        fraction("power.initial_soc_min", power.initial_soc_min)?;
        fraction("power.initial_soc_max", power.initial_soc_max)?;
        if power.initial_soc_min > power.initial_soc_max {
            return Err(bad("power.initial_soc_min", "must not exceed power.initial_soc_max".into()));
        }
        fraction("power.solar_fraction", power.solar_fraction)?;
        positive("power.solar_peak_mw", power.solar_peak_mw, 65_535.0)?;
        positive("power.idle_ma", power.idle_ma, 1_000.0)?;
        positive("power.frame_mah", power.frame_mah, 100.0)?;
        positive("power.connect_mah", power.connect_mah, 100.0)?;
        positive("power.message_mah", power.message_mah, 100.0)?;
        if !(-60.0..=70.0).contains(&power.temperature_mean_c) {
            return Err(bad(
                "power.temperature_mean_c",
                format!("must be within -60..=70, not {}", power.temperature_mean_c),
            ));
        }
        positive("power.temperature_swing_c", power.temperature_swing_c, 40.0)
    }

    fn validate_faults(
        &self,
        bad: &impl Fn(&str, String) -> ScenarioError,
        fraction: &impl Fn(&str, f64) -> Result<(), ScenarioError>,
        positive: &impl Fn(&str, f64, f64) -> Result<(), ScenarioError>,
    ) -> Result<(), ScenarioError> {
        let faults = &self.faults;
        positive("faults.drop_rate_per_day", faults.drop_rate_per_day, 10_000.0)?;
        fraction("faults.flaky_fraction", faults.flaky_fraction)?;
        positive("faults.flaky_drop_rate_per_day", faults.flaky_drop_rate_per_day, 10_000.0)?;
        fraction("faults.flaky_connect_failure", faults.flaky_connect_failure)?;
        if faults.flaky_connect_failure > 0.95 {
            return Err(bad(
                "faults.flaky_connect_failure",
                "must be at most 0.95 (a trap must get through)".into(),
            ));
        }
        positive("faults.reboot_rate_per_day", faults.reboot_rate_per_day, 1_000.0)?;
        fraction("faults.clock_skew_fraction", faults.clock_skew_fraction)?;
        if faults.clock_skew_max_s > 86_400 * 30 {
            return Err(bad("faults.clock_skew_max_s", "must be at most 30 days".into()));
        }
        if self.events.len() > EVENTS_MAX {
            return Err(bad("events", format!("must list at most {EVENTS_MAX} events")));
        }
        for (i, event) in self.events.iter().enumerate() {
            if !(event.at_h >= 0.0 && event.at_h < self.time.duration_h) {
                return Err(bad(
                    &format!("events[{i}].at_h"),
                    format!("must be within the run (0..{})", self.time.duration_h),
                ));
            }
            if !(event.duration_h > 0.0 && event.duration_h <= DURATION_H_MAX) {
                return Err(bad(&format!("events[{i}].duration_h"), "must be above 0".into()));
            }
            fraction(&format!("events[{i}].fraction"), event.fraction)?;
        }
        Ok(())
    }

    fn validate_network(&self, bad: &impl Fn(&str, String) -> ScenarioError) -> Result<(), ScenarioError> {
        let network = &self.network;
        if !(100..=600_000).contains(&network.ack_timeout_ms) {
            return Err(bad("network.ack_timeout_ms", "must be within 100..=600000".into()));
        }
        if network.backoff_initial_ms == 0 || network.backoff_max_ms < network.backoff_initial_ms {
            return Err(bad(
                "network.backoff_max_ms",
                "must be at least network.backoff_initial_ms, which must be above 0".into(),
            ));
        }
        if network.backoff_max_ms > 3_600_000 {
            return Err(bad("network.backoff_max_ms", "must be at most 3600000".into()));
        }
        if !(1..=10_000).contains(&network.connects_at_once) {
            return Err(bad("network.connects_at_once", "must be within 1..=10000".into()));
        }
        if network.keep_alive_s < 5 {
            return Err(bad("network.keep_alive_s", "must be at least 5".into()));
        }
        if !(1..=3_600).contains(&network.connect_timeout_s) {
            return Err(bad("network.connect_timeout_s", "must be within 1..=3600".into()));
        }
        if !(1..=86_400).contains(&network.drain_timeout_s) {
            return Err(bad("network.drain_timeout_s", "must be within 1..=86400".into()));
        }
        Ok(())
    }

    fn validate_ota(
        &self,
        bad: &impl Fn(&str, String) -> ScenarioError,
        fraction: &impl Fn(&str, f64) -> Result<(), ScenarioError>,
    ) -> Result<(), ScenarioError> {
        let ota = &self.ota;
        if !OTA_IMAGE_KIB.contains(&ota.image_kib) {
            return Err(bad("ota.image_kib", format!("must be within 1..=4096, not {}", ota.image_kib)));
        }
        let version = |key: &str, text: &str| {
            parse_version(text)
                .ok_or_else(|| bad(key, format!("must be a version like \"1.2.3\", not {text:?}")))
        };
        let from = version("ota.from_version", &ota.from_version)?;
        let to = version("ota.to_version", &ota.to_version)?;
        if to <= from {
            return Err(bad(
                "ota.to_version",
                format!("must be newer than ota.from_version ({})", ota.from_version),
            ));
        }
        if !(ota.start_h >= 0.0 && ota.start_h < self.time.duration_h) {
            return Err(bad(
                "ota.start_h",
                format!("must be within the run (0..{}), not {}", self.time.duration_h, ota.start_h),
            ));
        }
        if !OTA_MAX_IN_FLIGHT.contains(&ota.max_in_flight) {
            return Err(bad(
                "ota.max_in_flight",
                format!("must be within 1..=10000, not {}", ota.max_in_flight),
            ));
        }
        if !OTA_FAILURE_THRESHOLD.contains(&ota.failure_threshold) {
            return Err(bad(
                "ota.failure_threshold",
                format!("must be within 1..=100000, not {}", ota.failure_threshold),
            ));
        }
        fraction("ota.self_test_failure_rate", ota.self_test_failure_rate)?;
        fraction("ota.bootloader_rollback_rate", ota.bootloader_rollback_rate)?;
        if ota.self_test_failure_rate + ota.bootloader_rollback_rate > 1.0 {
            return Err(bad(
                "ota.bootloader_rollback_rate",
                "plus ota.self_test_failure_rate must not exceed 1".into(),
            ));
        }
        if ota.enabled {
            if ota.signing_key.trim().is_empty() {
                return Err(bad(
                    "ota.signing_key",
                    "must name the firmware signing key file (`cargo xtask keygen --out PATH`)".into(),
                ));
            }
            if self.fleet.traps > OTA_TRAPS_MAX {
                return Err(bad(
                    "fleet.traps",
                    format!(
                        "must be at most {OTA_TRAPS_MAX} with [ota] enabled (a rollout names at most that many devices)"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The OTA signing key file: relative to the scenario file's directory
    /// (or the current directory), or absolute.
    pub fn ota_signing_key_path(&self) -> PathBuf {
        let path = Path::new(&self.ota.signing_key);
        match &self.dir {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_path_buf(),
        }
    }

    /// Virtual duration, milliseconds.
    pub fn duration_ms(&self) -> u64 {
        (self.time.duration_h * 3_600_000.0) as u64
    }

    /// Expected detections: traps × triggers × frames × days.
    pub fn expected_detections(&self) -> f64 {
        f64::from(self.fleet.traps)
            * self.activity.triggers_per_trap_per_day
            * f64::from(self.activity.burst_len)
            * self.time.duration_h
            / 24.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(text: &str) -> String {
        Scenario::parse(text, "").unwrap_err().to_string()
    }

    #[test]
    fn a_name_is_enough() {
        let scenario = Scenario::parse("name = \"x\"", "").unwrap();
        assert_eq!(scenario.fleet.traps, 1_000);
        assert_eq!(scenario.species.len(), 10);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        assert!(error("name = \"x\"\n[fleet]\ntrapz = 3").contains("trapz"));
        assert!(error("name = \"x\"\n[fleet]\ntraps = 0").contains("`fleet.traps`"));
        assert!(error("name = \"x\"\n[activity]\nblank_rate = 1.5").contains("`activity.blank_rate`"));
        assert!(error("name = \"x\"\n[time]\ncompression = \"fast\"").contains("`time.compression`"));
        assert!(error("name = \"x\"\n[fleet]\nqueue_capacity = 100").contains("`fleet.queue_capacity`"));
        let event = "name = \"x\"\n[[events]]\nkind = \"traps_offline\"\nat_h = 30.0\nduration_h = 1.0";
        assert!(error(event).contains("`events[0].at_h`"));
        assert!(
            error("name = \"x\"\n[[species]]\nname = \"a\"\nlabel = 1\npattern = \"sometimes\"")
                .contains("sometimes")
        );
    }

    const OTA: &str = "name = \"x\"\n[ota]\nenabled = true\nsigning_key = \"fw.key\"\n";

    #[test]
    fn an_ota_rehearsal_is_accepted_and_its_keys_range_checked() {
        let scenario = Scenario::parse(OTA, "").unwrap();
        assert!(scenario.ota.enabled);
        assert_eq!(scenario.ota_signing_key_path(), PathBuf::from("fw.key"));
        assert_eq!(parse_version("1.10.3"), Some(FirmwareVersion { major: 1, minor: 10, patch: 3 }));
        for bad in ["1.0", "1.0.0.0", "1.x.0", "", "1.0.70000"] {
            assert_eq!(parse_version(bad), None, "{bad}");
        }
        let cases = [
            ("image_kib = 0", "`ota.image_kib`"),
            ("image_kib = 4097", "`ota.image_kib`"),
            ("from_version = \"one\"", "`ota.from_version`"),
            ("to_version = \"1.0.0\"", "`ota.to_version`"),
            ("to_version = \"0.9.9\"", "`ota.to_version`"),
            ("start_h = 24.0", "`ota.start_h`"),
            ("start_h = -1.0", "`ota.start_h`"),
            ("max_in_flight = 0", "`ota.max_in_flight`"),
            ("failure_threshold = 0", "`ota.failure_threshold`"),
            ("self_test_failure_rate = 1.5", "`ota.self_test_failure_rate`"),
            ("bootloader_rollback_rate = -0.1", "`ota.bootloader_rollback_rate`"),
            (
                "self_test_failure_rate = 0.6\nbootloader_rollback_rate = 0.6",
                "`ota.bootloader_rollback_rate`",
            ),
            ("image_mib = 1", "image_mib"),
        ];
        for (line, key) in cases {
            let text = format!("{OTA}{line}\n");
            assert!(error(&text).contains(key), "{line}: {}", error(&text));
        }
        let keyless = OTA.replace("fw.key", " ");
        assert!(error(&keyless).contains("`ota.signing_key`"));
        let many = format!("{OTA}[fleet]\ntraps = 10001\n");
        assert!(error(&many).contains("`fleet.traps`"));
        // Disabled, the key may be missing.
        assert!(Scenario::parse("name = \"x\"\n[ota]\nenabled = false", "").is_ok());
    }

    #[test]
    fn the_signing_key_is_relative_to_the_scenario_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.toml");
        std::fs::write(&path, OTA).unwrap();
        let scenario = Scenario::load(&path).unwrap();
        assert_eq!(scenario.ota_signing_key_path(), dir.path().join("fw.key"));
        let absolute = OTA.replace("fw.key", "/etc/wildcam/fw.key");
        std::fs::write(&path, absolute).unwrap();
        let scenario = Scenario::load(&path).unwrap();
        assert_eq!(scenario.ota_signing_key_path(), PathBuf::from("/etc/wildcam/fw.key"));
    }
}
