//! The host board's command line. Secrets (the claim token, the provisioning
//! password) may come from the environment instead, so they stay out of
//! shell history and process listings.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use wildcam_firmware_app::Connectivity;
use wildcam_sdk::protocol::FirmwareVersion;

use crate::boot::parse_version;

/// How the trap gets its IPv4 address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addressing {
    /// DHCP on the TAP link.
    Dhcp,
    /// A fixed address.
    Static {
        /// Address.
        address: Ipv4Addr,
        /// Prefix length.
        prefix_len: u8,
        /// Default gateway.
        gateway: Option<Ipv4Addr>,
    },
}

/// Everything the command line sets.
#[derive(Debug, Clone)]
pub struct Options {
    /// The TAP interface to attach to (it must exist: `ip tuntap add`).
    pub tap: String,
    /// The flash image file.
    pub flash: PathBuf,
    /// Addressing.
    pub addressing: Addressing,
    /// The fleet server's broker host (name or IPv4).
    pub server_host: String,
    /// Its MQTT 5 port.
    pub server_port: u16,
    /// The claim token.
    pub claim_token: Option<String>,
    /// The provisioning password.
    pub provision_password: String,
    /// The server's identity key (64 hex digits) to pin.
    pub server_key: Option<[u8; 32]>,
    /// Motion every this many seconds, besides `pir` lines on stdin.
    pub pir_every_s: Option<u64>,
    /// Network use.
    pub connectivity: Connectivity,
    /// Synthetic image size, bytes.
    pub image_len: usize,
    /// Local time zone, minutes east of UTC.
    pub utc_offset_min: i16,
    /// The firmware signing public key OTA manifests must verify under.
    pub ota_public_key: Option<[u8; 32]>,
    /// Test switch: the self-test fails while this version runs.
    pub self_test_fail_version: Option<FirmwareVersion>,
}

/// The usage text.
pub const USAGE: &str = "\
wildcam-trap-host: the WildCAM firmware on Linux, networked through a TAP device

usage: wildcam-trap-host --tap NAME --flash FILE --server HOST[:PORT]
                         (--dhcp | --address A.B.C.D/LEN [--gateway A.B.C.D])
                         [--claim-token TOKEN] [--provision-password PASSWORD]
                         [--server-key HEX] [--pir-every-s N] [--image-len BYTES]
                         [--check-in LINGER_S,UPLOAD_DELAY_S] [--utc-offset-min N]
                         [--ota-public-key HEX|FILE] [--self-test-fail-version X.Y.Z]

The TAP interface must exist (`ip tuntap add dev NAME mode tap`) and the
process needs the right to open /dev/net/tun. The server's MQTT 5 port
defaults to 18831. WILDCAM_CLAIM_TOKEN and WILDCAM_PROVISION_PASSWORD may
replace the flags. Each line `pir` on standard input is a motion event.

OTA: --ota-public-key is the firmware signing public key (64 hex digits, or
a file holding them or the PEM `.pub` file `cargo xtask keygen` writes);
without it every offer is refused. Updates go to FLASH.ota0/FLASH.ota1,
FLASH.otadata stands in for the bootloader's state; an activated update
restarts the process (it re-executes itself) and then reports the update's
version without running its bytes. --self-test-fail-version makes the
self-test fail while that version runs (to show a rollback).
";

impl Options {
    /// Parses `arguments` (without the program name) and the environment.
    pub fn parse(arguments: impl IntoIterator<Item = String>) -> Result<Self, String> {
        let mut options = Self {
            tap: String::new(),
            flash: PathBuf::new(),
            addressing: Addressing::Dhcp,
            server_host: String::new(),
            server_port: wildcam_firmware_app::session::DEFAULT_MQTT5_PORT,
            claim_token: std::env::var("WILDCAM_CLAIM_TOKEN").ok(),
            provision_password: std::env::var("WILDCAM_PROVISION_PASSWORD")
                .unwrap_or_else(|_| "wildcam-provisioning".into()),
            server_key: None,
            pir_every_s: None,
            connectivity: Connectivity::AlwaysOn,
            image_len: 48 * 1024,
            utc_offset_min: 0,
            ota_public_key: None,
            self_test_fail_version: None,
        };
        let mut gateway = None;
        let mut arguments = arguments.into_iter();
        while let Some(flag) = arguments.next() {
            if flag == "--dhcp" {
                options.addressing = Addressing::Dhcp;
                continue;
            }
            if flag == "--help" || flag == "-h" {
                return Err(USAGE.into());
            }
            let value = arguments
                .next()
                .ok_or_else(|| format!("{flag} needs a value"))?;
            match flag.as_str() {
                "--tap" => options.tap = value,
                "--flash" => options.flash = value.into(),
                "--address" => options.addressing = parse_cidr(&value)?,
                "--gateway" => gateway = Some(parse(&flag, &value)?),
                "--server" => {
                    (options.server_host, options.server_port) = parse_server(&value, options.server_port)?
                }
                "--claim-token" => options.claim_token = Some(value),
                "--provision-password" => options.provision_password = value,
                "--server-key" => options.server_key = Some(parse_key(&value)?),
                "--pir-every-s" => options.pir_every_s = Some(parse(&flag, &value)?),
                "--image-len" => options.image_len = parse(&flag, &value)?,
                "--check-in" => options.connectivity = parse_check_in(&value)?,
                "--utc-offset-min" => options.utc_offset_min = parse(&flag, &value)?,
                "--ota-public-key" => options.ota_public_key = Some(parse_public_key(&value)?),
                "--self-test-fail-version" => {
                    options.self_test_fail_version = Some(
                        parse_version(&value)
                            .ok_or_else(|| format!("{flag}: expected MAJOR.MINOR.PATCH, got {value:?}"))?,
                    )
                }
                other => return Err(format!("unknown flag {other}\n\n{USAGE}")),
            }
        }
        if let Addressing::Static { gateway: slot, .. } = &mut options.addressing {
            *slot = gateway;
        }
        for (missing, name) in [
            (options.tap.is_empty(), "--tap"),
            (options.flash.as_os_str().is_empty(), "--flash"),
            (options.server_host.is_empty(), "--server"),
        ] {
            if missing {
                return Err(format!("{name} is required\n\n{USAGE}"));
            }
        }
        Ok(options)
    }
}

fn parse<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("{flag}: cannot parse {value:?}"))
}

fn parse_cidr(value: &str) -> Result<Addressing, String> {
    let (address, prefix_len) = value
        .split_once('/')
        .ok_or_else(|| format!("--address: expected A.B.C.D/LEN, got {value:?}"))?;
    let prefix_len: u8 = parse("--address", prefix_len)?;
    if prefix_len > 32 {
        return Err("--address: the prefix length is at most 32".into());
    }
    Ok(Addressing::Static { address: parse("--address", address)?, prefix_len, gateway: None })
}

fn parse_server(value: &str, default_port: u16) -> Result<(String, u16), String> {
    match value.rsplit_once(':') {
        Some((host, port)) => Ok((host.to_owned(), parse("--server", port)?)),
        None => Ok((value.to_owned(), default_port)),
    }
}

fn parse_key(value: &str) -> Result<[u8; 32], String> {
    parse_hex_key(value).ok_or_else(|| "--server-key: expected 64 hex digits".to_owned())
}

/// 64 hex digits.
fn parse_hex_key(value: &str) -> Option<[u8; 32]> {
    if value.len() != 64 {
        return None;
    }
    let mut key = [0u8; 32];
    for (index, byte) in key.iter_mut().enumerate() {
        let digits = value.get(2 * index..2 * index + 2)?;
        *byte = u8::from_str_radix(digits, 16).ok()?;
    }
    Some(key)
}

/// DER prefix of an ed25519 SubjectPublicKeyInfo (RFC 8410): the raw key follows.
const ED25519_SPKI_PREFIX: [u8; 12] =
    [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

/// 64 hex digits, or a file holding them or a PEM ed25519 public key.
fn parse_public_key(value: &str) -> Result<[u8; 32], String> {
    if let Some(key) = parse_hex_key(value) {
        return Ok(key);
    }
    let text = std::fs::read_to_string(value)
        .map_err(|error| format!("--ota-public-key: not 64 hex digits, and {value}: {error}"))?;
    let text = text.trim();
    if let Some(key) = parse_hex_key(text) {
        return Ok(key);
    }
    let body: String = text
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    let der = decode_base64(&body)
        .ok_or_else(|| format!("--ota-public-key: {value} holds neither hex nor a PEM public key"))?;
    der.strip_prefix(&ED25519_SPKI_PREFIX[..])
        .and_then(|raw| <[u8; 32]>::try_from(raw).ok())
        .ok_or_else(|| format!("--ota-public-key: {value} is not an ed25519 public key"))
}

/// Standard base64 with padding.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let digits = text.trim_end_matches('=').as_bytes();
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for &c in digits {
        acc = (acc << 6) | u32::from(value(c)?);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

fn parse_check_in(value: &str) -> Result<Connectivity, String> {
    let (linger_s, upload_delay_s) = value
        .split_once(',')
        .ok_or_else(|| "--check-in: expected LINGER_S,UPLOAD_DELAY_S".to_owned())?;
    Ok(Connectivity::CheckIn {
        linger_s: parse("--check-in", linger_s)?,
        upload_delay_s: parse("--check-in", upload_delay_s)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_line(line: &str) -> Result<Options, String> {
        Options::parse(line.split_whitespace().map(String::from))
    }

    #[test]
    fn parses_a_static_setup() {
        let options = parse_line(
            "--tap wc0 --flash /tmp/f --address 192.168.77.2/24 --gateway 192.168.77.1 \
             --server 192.168.77.1:18831 --claim-token a.b --check-in 10,5",
        )
        .unwrap();
        assert_eq!(options.tap, "wc0");
        assert_eq!(
            options.addressing,
            Addressing::Static {
                address: Ipv4Addr::new(192, 168, 77, 2),
                prefix_len: 24,
                gateway: Some(Ipv4Addr::new(192, 168, 77, 1)),
            }
        );
        assert_eq!((options.server_host.as_str(), options.server_port), ("192.168.77.1", 18831));
        assert_eq!(options.connectivity, Connectivity::CheckIn { linger_s: 10, upload_delay_s: 5 });
    }

    #[test]
    fn refuses_missing_and_malformed_flags() {
        assert!(
            parse_line("--flash f --server s")
                .unwrap_err()
                .contains("--tap is required")
        );
        assert!(parse_line("--tap t --flash f --server s --address 1.2.3.4").is_err());
        assert!(parse_line("--tap t --flash f --server s --server-key abcd").is_err());
        assert!(parse_line("--tap t --flash f --server s --bogus 1").is_err());
        let dhcp = parse_line("--tap t --flash f --server fleet.example --dhcp").unwrap();
        assert_eq!((dhcp.addressing, dhcp.server_port), (Addressing::Dhcp, 18831));
        assert!(parse_line("--tap t --flash f --server s --self-test-fail-version 1.2").is_err());
        assert!(parse_line("--tap t --flash f --server s --ota-public-key /nonexistent").is_err());
    }

    #[test]
    fn reads_the_ota_public_key_as_hex_or_from_a_file() {
        let hex = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
        let options = parse_line(&format!(
            "--tap t --flash f --server s --ota-public-key {hex} --self-test-fail-version 0.2.0"
        ))
        .unwrap();
        let key = options.ota_public_key.unwrap();
        assert_eq!(key[..2], [0xd7, 0x5a]);
        assert_eq!(options.self_test_fail_version, Some(FirmwareVersion { major: 0, minor: 2, patch: 0 }));

        let directory = std::env::temp_dir().join(format!("wildcam-key-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let hex_file = directory.join("key.hex");
        std::fs::write(&hex_file, format!("{hex}\n")).unwrap();
        assert_eq!(parse_public_key(hex_file.to_str().unwrap()), Ok(key));
        // The same key as `openssl pkey -pubout` (and `cargo xtask keygen`) writes it.
        let pem_file = directory.join("key.pub");
        let pem = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=\n-----END PUBLIC KEY-----\n";
        std::fs::write(&pem_file, pem).unwrap();
        assert_eq!(parse_public_key(pem_file.to_str().unwrap()), Ok(key));
        std::fs::remove_dir_all(directory).unwrap();
    }
}
