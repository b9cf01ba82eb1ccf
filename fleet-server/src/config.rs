//! Server configuration: a TOML file, then environment variables, over
//! defaults for everything. A server started with no file and no variables
//! runs with its embedded defaults.
//!
//! Environment variables override any key: `WILDCAM__{SECTION}__{KEY}` (double
//! underscores between levels, case-insensitive), e.g.
//! `WILDCAM__HTTP__LISTEN=0.0.0.0:8080` or `WILDCAM__DATA_DIR=/var/lib/wildcam`.
//! Values parse as TOML scalars (`true`, `42`, `"text"`); anything that does
//! not parse is taken as a string.
//!
//! The MQTT side runs in one of two modes. By default the server embeds rumqttd,
//! configured by `[mqtt]`. With `[external_mqtt]` `enabled = true` (or
//! `WILDCAM__EXTERNAL_MQTT__ENABLED=true`) it connects to an external broker
//! instead, as an MQTT 5 client with shared subscriptions, and `[mqtt]` is not
//! used; see [`crate::broker::ExternalBrokerConfig`]:
//!
//! ```toml
//! [external_mqtt]
//! enabled = true
//! host = "mosquitto.internal"
//! port = 1883
//! client_id = "wildcam-fleet-1"
//! username = "wildcam-fleet"     # password: WILDCAM__EXTERNAL_MQTT__PASSWORD
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "WILDCAM__";

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("could not read configuration file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file or an override is not valid TOML or has a wrong key or value.
    #[error("invalid configuration{origin}: {message}")]
    Invalid {
        /// Where the bad value came from (file or variable), may be empty.
        origin: String,
        /// What is wrong.
        message: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the database and blobs live; created on first start.
    pub data_dir: PathBuf,
    /// The embedded MQTT broker (unused when `external_mqtt.enabled`).
    pub mqtt: crate::broker::BrokerConfig,
    /// An external MQTT broker to use instead of the embedded one (disabled by default).
    pub external_mqtt: crate::broker::ExternalBrokerConfig,
    /// Claiming new traps.
    pub provisioning: ProvisioningConfig,
    /// The HTTP API.
    pub http: HttpConfig,
    /// Ingest batching.
    pub ingest: IngestConfig,
    /// Firmware updates: accepted signing keys, image and chunk sizes, rollout pacing.
    pub ota: OtaConfig,
    /// Logging.
    pub log: LogConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("wildcam-data"),
            mqtt: crate::broker::BrokerConfig::default(),
            external_mqtt: crate::broker::ExternalBrokerConfig::default(),
            provisioning: ProvisioningConfig::default(),
            http: HttpConfig::default(),
            ingest: IngestConfig::default(),
            ota: OtaConfig::default(),
            log: LogConfig::default(),
        }
    }
}

/// Claiming new traps.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ProvisioningConfig {
    /// Password of the shared `provision` MQTT account unclaimed traps use;
    /// unset, only traps that already have credentials can connect. Set it
    /// with `WILDCAM__PROVISIONING__PASSWORD` rather than in a file.
    pub password: Option<String>,
    /// Claim requests accepted per minute from all traps together (1 to 600,000;
    /// default 6,000). Each trap is also limited to 10 requests a minute and each
    /// claim token to 20 failed proofs a minute (`provisioning.rs`).
    pub attempts_per_minute: u32,
}

impl Default for ProvisioningConfig {
    fn default() -> Self {
        Self {
            password: Some("wildcam-provisioning".into()),
            attempts_per_minute: crate::provisioning::ATTEMPTS_PER_MINUTE,
        }
    }
}

/// The HTTP API listener.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Listen address; port 0 picks a free port.
    pub listen: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self { listen: SocketAddr::from(([127, 0, 0, 1], 18080)) }
    }
}

/// How ingest groups messages into transactions.
///
/// A batch goes to the store when it is full, or once its oldest message has
/// waited `linger_ms` and the previous batch has committed (group commit): a
/// lone message waits about `linger_ms`, and under load batches grow towards
/// `batch_len_max` while the writer is busy. Each commit costs one sync and
/// rewrites every index page it touches, so bigger batches store more per
/// second: with 1,000 traps streaming, 8,000 gave ~65k detections/s against
/// ~48k for 2,000 (`docs/benchmarks.md`, `cargo xtask bench-ingest`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// Most messages in one transaction. A batch is also closed before it
    /// could exceed the store's limit of 10,000 items (messages plus one
    /// replay window per device).
    pub batch_len_max: usize,
    /// Longest a message waits for its batch to fill, milliseconds, when the
    /// writer is free (at most 10,000).
    ///
    /// The queue in front of ingest is the broker link's channel
    /// (`mqtt.link_capacity`); while ingest is busy it fills and the link stops
    /// reading from the broker (see `broker/mod.rs` on what each broker does then).
    pub linger_ms: u64,
}

/// Largest [`IngestConfig::batch_len_max`]: the store's item limit per batch.
pub const BATCH_LEN_LIMIT: usize = 10_000;
/// Largest [`IngestConfig::linger_ms`].
pub const LINGER_MS_LIMIT: u64 = 10_000;
/// Largest [`ProvisioningConfig::attempts_per_minute`].
pub const ATTEMPTS_PER_MINUTE_LIMIT: u32 = 600_000;

impl Default for IngestConfig {
    fn default() -> Self {
        Self { batch_len_max: 8_000, linger_ms: 5 }
    }
}

/// Firmware updates (`[ota]`).
///
/// ```toml
/// [ota]
/// # 64 hex digits, or the `.pub` file `cargo xtask keygen` writes; list the
/// # old and the new key while rotating.
/// signing_keys = ["/etc/wildcam/firmware.key.pub"]
/// max_image_bytes = 4194304
/// chunk_len = 1024
/// max_in_flight = 50
/// failure_threshold = 5
/// stall_timeout_s = 300
/// ```
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OtaConfig {
    /// Firmware signing public keys an uploaded manifest may be signed with
    /// (at most 16). Empty: uploads are refused. In a variable
    /// (`WILDCAM__OTA__SIGNING_KEYS`), separate entries with commas.
    #[serde(deserialize_with = "string_or_list")]
    pub signing_keys: Vec<String>,
    /// Largest image accepted, bytes (1 KiB to 64 MiB; default 4 MiB).
    pub max_image_bytes: u32,
    /// Largest chunk offered to devices, bytes (64 to 1,024).
    pub chunk_len: u16,
    /// Default of a rollout's `max_in_flight`: devices offered or downloading
    /// at once (1 to 10,000).
    pub max_in_flight: u32,
    /// Default of a rollout's `failure_threshold`: failed or rolled-back
    /// devices that pause it (1 to 100,000).
    pub failure_threshold: u32,
    /// An offered or downloading device that has shown no progress for this
    /// long no longer counts as in flight, so another one is offered
    /// (10 to 86,400 seconds).
    pub stall_timeout_s: u32,
}

/// A list, or one string of comma-separated entries (environment overrides
/// are scalars).
fn string_or_list<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Entries {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Entries::deserialize(deserializer)? {
        Entries::Many(entries) => entries,
        Entries::One(text) => text
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

/// Checks `ota.{key}` against its bounds.
fn within<T: PartialOrd + std::fmt::Display>(
    key: &str,
    value: T,
    range: &std::ops::RangeInclusive<T>,
) -> Result<(), String> {
    if range.contains(&value) {
        Ok(())
    } else {
        Err(format!("ota.{key} must be between {} and {}, not {value}", range.start(), range.end()))
    }
}

/// Most entries of [`OtaConfig::signing_keys`].
pub const SIGNING_KEYS_MAX: usize = 16;
/// Bounds of [`OtaConfig::max_image_bytes`].
pub const IMAGE_BYTES_RANGE: std::ops::RangeInclusive<u32> = 1_024..=64 * 1_024 * 1_024;
/// Bounds of [`OtaConfig::chunk_len`].
pub const CHUNK_LEN_RANGE: std::ops::RangeInclusive<u16> = 64..=1_024;
/// Bounds of [`OtaConfig::max_in_flight`] (and of a rollout's).
pub const MAX_IN_FLIGHT_RANGE: std::ops::RangeInclusive<u32> = 1..=10_000;
/// Bounds of [`OtaConfig::failure_threshold`] (and of a rollout's).
pub const FAILURE_THRESHOLD_RANGE: std::ops::RangeInclusive<u32> = 1..=100_000;
/// Bounds of [`OtaConfig::stall_timeout_s`].
pub const STALL_TIMEOUT_S_RANGE: std::ops::RangeInclusive<u32> = 10..=86_400;

impl Default for OtaConfig {
    fn default() -> Self {
        Self {
            signing_keys: Vec::new(),
            max_image_bytes: 4 * 1_024 * 1_024,
            chunk_len: 1_024,
            max_in_flight: 50,
            failure_threshold: 5,
            stall_timeout_s: 300,
        }
    }
}

impl OtaConfig {
    /// The configured keys, read and parsed; the error names the entry.
    pub fn signing_public_keys(&self) -> Result<Vec<[u8; 32]>, String> {
        if self.signing_keys.len() > SIGNING_KEYS_MAX {
            return Err(format!("ota.signing_keys holds at most {SIGNING_KEYS_MAX} keys"));
        }
        self.signing_keys
            .iter()
            .enumerate()
            .map(|(i, entry)| {
                crate::ota::signing_key(entry).map_err(|e| format!("ota.signing_keys[{i}]: {e}"))
            })
            .collect()
    }

    fn validate(&self) -> Result<(), String> {
        self.signing_public_keys()?;
        within("max_image_bytes", self.max_image_bytes, &IMAGE_BYTES_RANGE)?;
        within("chunk_len", self.chunk_len, &CHUNK_LEN_RANGE)?;
        within("max_in_flight", self.max_in_flight, &MAX_IN_FLIGHT_RANGE)?;
        within("failure_threshold", self.failure_threshold, &FAILURE_THRESHOLD_RANGE)?;
        within("stall_timeout_s", self.stall_timeout_s, &STALL_TIMEOUT_S_RANGE)?;
        Ok(())
    }
}

/// Log output.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` for people, `json` for log collectors.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `wildcam_fleet_server=debug`.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: LogFormat::Text, filter: "info".into() }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Config {
    /// Loads `file` (if given) and applies the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let text = match file {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?,
            None => String::new(),
        };
        let origin = file
            .map(|p| format!(" in {}", p.display()))
            .unwrap_or_default();
        Self::from_sources(&text, &origin, std::env::vars())
    }

    /// Parses `text` (TOML) and applies overrides from `vars`.
    pub fn from_sources(
        text: &str,
        origin: &str,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table: toml::Table = toml::from_str(text)
            .map_err(|e| ConfigError::Invalid { origin: origin.into(), message: e.to_string() })?;
        let overrides: BTreeMap<String, String> = vars
            .into_iter()
            .filter(|(name, _)| name.starts_with(ENV_PREFIX))
            .collect();
        for (name, value) in &overrides {
            apply_override(&mut table, name, value)?;
        }
        let origin = if overrides.is_empty() {
            origin.to_string()
        } else {
            let names: Vec<&str> = overrides.keys().map(String::as_str).collect();
            format!("{origin} (with overrides {})", names.join(", "))
        };
        let config: Self = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid {
                origin: origin.clone(),
                message: e.to_string(),
            })?;
        config
            .validate()
            .map_err(|message| ConfigError::Invalid { origin, message })?;
        Ok(config)
    }

    /// Checks the bounds of every value that has one (the broker's own are checked
    /// again when it starts); the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        let ingest = &self.ingest;
        if !(1..=BATCH_LEN_LIMIT).contains(&ingest.batch_len_max) {
            return Err(format!(
                "ingest.batch_len_max must be between 1 and {BATCH_LEN_LIMIT}, not {}",
                ingest.batch_len_max
            ));
        }
        if ingest.linger_ms > LINGER_MS_LIMIT {
            return Err(format!(
                "ingest.linger_ms must be at most {LINGER_MS_LIMIT}, not {}",
                ingest.linger_ms
            ));
        }
        let attempts = self.provisioning.attempts_per_minute;
        if !(1..=ATTEMPTS_PER_MINUTE_LIMIT).contains(&attempts) {
            return Err(format!(
                "provisioning.attempts_per_minute must be between 1 and {ATTEMPTS_PER_MINUTE_LIMIT}, not {attempts}"
            ));
        }
        if self
            .provisioning
            .password
            .as_deref()
            .is_some_and(str::is_empty)
        {
            return Err("provisioning.password must not be empty (leave it unset to refuse claims)".into());
        }
        self.ota.validate()?;
        self.mqtt.validate().map_err(|e| format!("mqtt: {e}"))
    }
}

fn apply_override(table: &mut toml::Table, name: &str, value: &str) -> Result<(), ConfigError> {
    let path: Vec<String> = name[ENV_PREFIX.len()..]
        .split("__")
        .map(|part| part.to_ascii_lowercase())
        .collect();
    let invalid =
        |message: &str| ConfigError::Invalid { origin: format!(" in {name}"), message: message.into() };
    let Some((key, sections)) = path.split_last() else {
        return Err(invalid("no key after the prefix"));
    };
    if path.iter().any(String::is_empty) {
        return Err(invalid("empty level in the variable name"));
    }
    let mut current = table;
    for section in sections {
        let entry = current
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = entry
            .as_table_mut()
            .ok_or_else(|| invalid("names a key that is not a section"))?;
    }
    current.insert(key.clone(), scalar(value));
    Ok(())
}

/// A TOML scalar if `value` parses as one, else the string itself.
fn scalar(value: &str) -> toml::Value {
    let parsed: Result<toml::Table, _> = toml::from_str(&format!("v = {value}"));
    match parsed.ok().and_then(|mut t| t.remove("v")) {
        Some(v) if !v.is_table() && !v.is_array() => v,
        _ => toml::Value::String(value.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn empty_sources_give_defaults() {
        assert_eq!(Config::from_sources("", "", vars(&[])).unwrap(), Config::default());
    }

    #[test]
    fn file_then_environment() {
        let text = "data_dir = \"/srv/wildcam\"\n[ingest]\nbatch_len_max = 500\n";
        let config = Config::from_sources(
            text,
            " in test.toml",
            vars(&[
                ("WILDCAM__INGEST__LINGER_MS", "9"),
                ("WILDCAM__HTTP__LISTEN", "0.0.0.0:9000"),
                ("WILDCAM__LOG__FORMAT", "json"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/srv/wildcam"));
        assert_eq!(config.ingest.batch_len_max, 500);
        assert_eq!(config.ingest.linger_ms, 9);
        assert_eq!(config.http.listen, "0.0.0.0:9000".parse().unwrap());
        assert_eq!(config.log.format, LogFormat::Json);
    }

    #[test]
    fn external_broker_mode_from_file_and_environment() {
        let text = "[external_mqtt]\nhost = \"broker.example\"\nshared_group = \"north\"\n";
        let config = Config::from_sources(text, "", vars(&[])).unwrap();
        assert!(!config.external_mqtt.enabled, "a section alone does not switch modes");
        assert_eq!(config.external_mqtt.host, "broker.example");
        let config = Config::from_sources(
            text,
            "",
            vars(&[("WILDCAM__EXTERNAL_MQTT__ENABLED", "true"), ("WILDCAM__EXTERNAL_MQTT__PORT", "8883")]),
        )
        .unwrap();
        assert!(config.external_mqtt.enabled);
        assert_eq!(config.external_mqtt.port, 8883);
        assert_eq!(config.external_mqtt.shared_group, "north");
        let error = Config::from_sources("[external_mqtt]\nhots = \"x\"\n", "", vars(&[])).unwrap_err();
        assert!(error.to_string().contains("hots"), "{error}");
    }

    #[test]
    fn ota_keys_from_a_list_or_a_variable() {
        let a = "11".repeat(32);
        let b = "22".repeat(32);
        let config =
            Config::from_sources(&format!("[ota]\nsigning_keys = [\"{a}\"]\n"), "", vars(&[])).unwrap();
        assert_eq!(config.ota.signing_public_keys().unwrap(), vec![[0x11; 32]]);
        let both = format!("{a}, {b}");
        let config = Config::from_sources("", "", vars(&[("WILDCAM__OTA__SIGNING_KEYS", &both)])).unwrap();
        assert_eq!(config.ota.signing_public_keys().unwrap(), vec![[0x11; 32], [0x22; 32]]);
        assert!(
            Config::default()
                .ota
                .signing_public_keys()
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn bad_input_is_named() {
        let error =
            Config::from_sources("[http]\nlisten = \"nowhere\"\n", " in a.toml", vars(&[])).unwrap_err();
        assert!(error.to_string().contains("a.toml"), "{error}");
        let error = Config::from_sources("typo = 1\n", " in a.toml", vars(&[])).unwrap_err();
        assert!(error.to_string().contains("typo"), "{error}");
        let error =
            Config::from_sources("", "", vars(&[("WILDCAM__INGEST__LINGER_MS", "soon")])).unwrap_err();
        assert!(error.to_string().contains("WILDCAM__"), "{error}");
        let error = Config::from_sources("", "", vars(&[("WILDCAM__DATA_DIR__X", "1")])).unwrap_err();
        assert!(error.to_string().contains("WILDCAM__DATA_DIR__X"), "{error}");
    }

    #[test]
    fn out_of_range_values_are_named() {
        for (text, key) in [
            ("[ingest]\nbatch_len_max = 0\n", "ingest.batch_len_max"),
            ("[ingest]\nbatch_len_max = 10001\n", "ingest.batch_len_max"),
            ("[ingest]\nlinger_ms = 60000\n", "ingest.linger_ms"),
            ("[provisioning]\nattempts_per_minute = 0\n", "provisioning.attempts_per_minute"),
            ("[provisioning]\npassword = \"\"\n", "provisioning.password"),
            ("[mqtt]\nmax_connections = 0\n", "max_connections"),
            ("[ota]\nmax_image_bytes = 10\n", "ota.max_image_bytes"),
            ("[ota]\nchunk_len = 2048\n", "ota.chunk_len"),
            ("[ota]\nmax_in_flight = 0\n", "ota.max_in_flight"),
            ("[ota]\nfailure_threshold = 0\n", "ota.failure_threshold"),
            ("[ota]\nstall_timeout_s = 1\n", "ota.stall_timeout_s"),
            ("[ota]\nsigning_keys = [\"abc\"]\n", "ota.signing_keys[0]"),
            ("[ota]\nsigning_keys = [\"/nonexistent/fw.key.pub\"]\n", "ota.signing_keys[0]"),
        ] {
            let error = Config::from_sources(text, " in a.toml", vars(&[])).unwrap_err();
            let message = error.to_string();
            assert!(message.contains(key) && message.contains("a.toml"), "{text}: {message}");
        }
        let error =
            Config::from_sources("", "", vars(&[("WILDCAM__INGEST__BATCH_LEN_MAX", "0")])).unwrap_err();
        assert!(error.to_string().contains("WILDCAM__INGEST__BATCH_LEN_MAX"), "{error}");
    }
}
