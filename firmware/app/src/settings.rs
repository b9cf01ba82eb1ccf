//! Flash-time settings: how a trap reaches its network and its fleet server.
//!
//! They are written at flash time (`cargo xtask flash`) into their own data
//! partition, never into the firmware image and never into the repository,
//! so one signed image serves every trap and an OTA update keeps them. The
//! format is text, one `key=value` per line (`#` starts a comment), ended by
//! the first NUL or erased (`0xFF`) byte:
//!
//! ```text
//! wifi_ssid=field-station
//! wifi_password=...
//! server=fleet.example.org:18831
//! claim_token=k7Qm2xAbCdEf.Yq3vN8rT0bWc5LdE1fHs9A...
//! ```
//!
//! | key | meaning | default |
//! |---|---|---|
//! | `wifi_ssid`, `wifi_password` | the Wi-Fi network (ESP boards) | none, open network |
//! | `server` | the fleet server's broker, `host` or `host:port` | required |
//! | `claim_token` | the claim token `{id}.{secret}` | none (allow-list) |
//! | `provision_password` | the shared provisioning account's password | `wildcam-provisioning` |
//! | `server_key` | the server's identity key to pin, 64 hex digits | none |
//! | `utc_offset_min` | local time zone, minutes east of UTC | 0 |
//! | `connectivity` | `always-on`, or `check-in:LINGER_S,UPLOAD_DELAY_S` | `check-in:20,60` |

use core::fmt;

use crate::schedule::Connectivity;
use crate::session::{DEFAULT_MQTT5_PORT, NetworkSettings};

/// The password unclaimed traps use when none is set.
pub const DEFAULT_PROVISION_PASSWORD: &str = "wildcam-provisioning";
/// The default network use of a battery trap.
pub const DEFAULT_CONNECTIVITY: Connectivity = Connectivity::CheckIn { linger_s: 20, upload_delay_s: 60 };

/// Why the settings were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SettingsError {
    /// The partition is erased: nothing was written at flash time.
    Empty,
    /// The text is not UTF-8.
    NotText,
    /// A line has no `=`.
    LineMalformed,
    /// A key is not one of the documented ones.
    KeyUnknown,
    /// A value does not parse.
    ValueInvalid,
    /// `server` is missing.
    ServerMissing,
}

impl fmt::Display for SettingsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Empty => "no settings were written at flash time",
            Self::NotText => "settings are not UTF-8 text",
            Self::LineMalformed => "a settings line is not key=value",
            Self::KeyUnknown => "unknown settings key",
            Self::ValueInvalid => "a settings value does not parse",
            Self::ServerMissing => "the `server` setting is missing",
        })
    }
}

/// The parsed settings, borrowing the partition's text.
#[derive(Clone, Copy)]
pub struct Settings<'a> {
    /// Wi-Fi network name.
    pub wifi_ssid: Option<&'a str>,
    /// Wi-Fi password.
    pub wifi_password: Option<&'a str>,
    /// How to reach the fleet server.
    pub network: NetworkSettings<'a>,
    /// Local time zone, minutes east of UTC.
    pub utc_offset_min: i16,
}

impl fmt::Debug for Settings<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Secrets (Wi-Fi password, claim token) are never printed.
        f.debug_struct("Settings")
            .field("wifi_ssid", &self.wifi_ssid)
            .field("server_host", &self.network.server_host)
            .field("server_port", &self.network.server_port)
            .field("claimable", &self.network.claim_token.is_some())
            .field("pinned", &self.network.server_key.is_some())
            .field("connectivity", &self.network.connectivity)
            .finish_non_exhaustive()
    }
}

impl<'a> Settings<'a> {
    /// Parses the partition's bytes.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, SettingsError> {
        let end = bytes
            .iter()
            .position(|byte| matches!(byte, 0x00 | 0xFF))
            .unwrap_or(bytes.len());
        let text = core::str::from_utf8(&bytes[..end]).map_err(|_| SettingsError::NotText)?;
        if text.trim().is_empty() {
            return Err(SettingsError::Empty);
        }
        let mut settings = Self {
            wifi_ssid: None,
            wifi_password: None,
            network: NetworkSettings {
                server_host: "",
                server_port: DEFAULT_MQTT5_PORT,
                provision_password: DEFAULT_PROVISION_PASSWORD,
                claim_token: None,
                server_key: None,
                connectivity: DEFAULT_CONNECTIVITY,
            },
            utc_offset_min: 0,
        };
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = line.split_once('=').ok_or(SettingsError::LineMalformed)?;
            settings.set(key.trim(), value.trim())?;
        }
        if settings.network.server_host.is_empty() {
            return Err(SettingsError::ServerMissing);
        }
        Ok(settings)
    }

    fn set(&mut self, key: &str, value: &'a str) -> Result<(), SettingsError> {
        let network = &mut self.network;
        match key {
            "wifi_ssid" => self.wifi_ssid = Some(value),
            "wifi_password" => self.wifi_password = Some(value),
            "server" => (network.server_host, network.server_port) = parse_server(value)?,
            "claim_token" => network.claim_token = Some(value),
            "provision_password" => network.provision_password = value,
            "server_key" => network.server_key = Some(parse_key(value)?),
            "utc_offset_min" => {
                self.utc_offset_min = value.parse().map_err(|_| SettingsError::ValueInvalid)?
            }
            "connectivity" => network.connectivity = parse_connectivity(value)?,
            _ => return Err(SettingsError::KeyUnknown),
        }
        Ok(())
    }
}

fn parse_server(value: &str) -> Result<(&str, u16), SettingsError> {
    let (host, port) = match value.rsplit_once(':') {
        Some((host, port)) => (host, port.parse().map_err(|_| SettingsError::ValueInvalid)?),
        None => (value, DEFAULT_MQTT5_PORT),
    };
    if host.is_empty() {
        return Err(SettingsError::ValueInvalid);
    }
    Ok((host, port))
}

/// 64 hex digits into 32 bytes.
pub fn parse_key(value: &str) -> Result<[u8; 32], SettingsError> {
    let digits = value.as_bytes();
    if digits.len() != 64 {
        return Err(SettingsError::ValueInvalid);
    }
    let mut key = [0u8; 32];
    for (byte, pair) in key.iter_mut().zip(digits.chunks_exact(2)) {
        let text = core::str::from_utf8(pair).map_err(|_| SettingsError::ValueInvalid)?;
        *byte = u8::from_str_radix(text, 16).map_err(|_| SettingsError::ValueInvalid)?;
    }
    Ok(key)
}

fn parse_connectivity(value: &str) -> Result<Connectivity, SettingsError> {
    if value == "always-on" {
        return Ok(Connectivity::AlwaysOn);
    }
    let numbers = value
        .strip_prefix("check-in:")
        .ok_or(SettingsError::ValueInvalid)?;
    let (linger_s, upload_delay_s) = numbers.split_once(',').ok_or(SettingsError::ValueInvalid)?;
    Ok(Connectivity::CheckIn {
        linger_s: linger_s.parse().map_err(|_| SettingsError::ValueInvalid)?,
        upload_delay_s: upload_delay_s
            .parse()
            .map_err(|_| SettingsError::ValueInvalid)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_xtask_flash_writes() {
        let mut partition = [0xFFu8; 256];
        let text = b"# written by cargo xtask flash\nwifi_ssid=field\nwifi_password=s3cret pass\n\
                     server=fleet.example.org\nclaim_token=abc.def\nconnectivity=check-in:10,30\n";
        partition[..text.len()].copy_from_slice(text);
        let settings = Settings::parse(&partition).unwrap();
        assert_eq!(settings.wifi_ssid, Some("field"));
        assert_eq!(settings.wifi_password, Some("s3cret pass"));
        assert_eq!(settings.network.server_host, "fleet.example.org");
        assert_eq!(settings.network.server_port, DEFAULT_MQTT5_PORT);
        assert_eq!(settings.network.claim_token, Some("abc.def"));
        assert_eq!(settings.network.provision_password, DEFAULT_PROVISION_PASSWORD);
        assert_eq!(settings.network.connectivity, Connectivity::CheckIn { linger_s: 10, upload_delay_s: 30 });
        let shown = std::format!("{settings:?}");
        assert!(!shown.contains("s3cret") && !shown.contains("abc.def"), "{shown}");
    }

    #[test]
    fn refuses_what_it_cannot_use() {
        assert_eq!(Settings::parse(&[0xFF; 64]).unwrap_err(), SettingsError::Empty);
        assert_eq!(Settings::parse(b"wifi_ssid=x\n").unwrap_err(), SettingsError::ServerMissing);
        assert_eq!(Settings::parse(b"server\n").unwrap_err(), SettingsError::LineMalformed);
        assert_eq!(Settings::parse(b"server=a\ncolour=red").unwrap_err(), SettingsError::KeyUnknown);
        assert_eq!(Settings::parse(b"server=a:port").unwrap_err(), SettingsError::ValueInvalid);
        assert_eq!(Settings::parse(b"server=a\nserver_key=abcd").unwrap_err(), SettingsError::ValueInvalid);
        assert_eq!(Settings::parse(&[b's', 0xC3, 0x28]).unwrap_err(), SettingsError::NotText);
        let pinned =
            std::format!("server=10.0.0.5:1883\nserver_key={}\nconnectivity=always-on", "ab".repeat(32));
        let settings = Settings::parse(pinned.as_bytes()).unwrap();
        assert_eq!(settings.network.server_key, Some([0xab; 32]));
        assert_eq!((settings.network.server_host, settings.network.server_port), ("10.0.0.5", 1883));
        assert_eq!(settings.network.connectivity, Connectivity::AlwaysOn);
    }
}
