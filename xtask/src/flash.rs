//! `cargo xtask flash --chip esp32c3|esp32c6`: builds the firmware, signs its
//! OTA manifest (with `--signing-key`), writes the trap's settings partition
//! and flashes everything through the espflash CLI; or, with `--save-image
//! DIR`, writes the images without any hardware.
//!
//! Settings (Wi-Fi, fleet server, claim token) go into the `wcfg` partition
//! (`firmware/esp/partitions.csv`), never into the firmware image or the
//! repository. Secrets are read from the environment so they stay out of shell
//! history: `WILDCAM_WIFI_PASSWORD`, `WILDCAM_CLAIM_TOKEN`,
//! `WILDCAM_PROVISION_PASSWORD`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use wildcam_sdk::protocol::FirmwareVersion;

use crate::firmware::{self, EspChip};
use crate::{process, sign};

/// Flags of `cargo xtask flash`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The chip.
    #[arg(long, value_enum)]
    chip: EspChip,
    /// The serial port (espflash finds one when omitted).
    #[arg(long)]
    port: Option<String>,
    /// Write the images (app, merged, settings) to this directory instead of
    /// flashing; needs no hardware.
    #[arg(long, value_name = "DIR")]
    save_image: Option<PathBuf>,
    /// Wi-Fi network name (the password comes from WILDCAM_WIFI_PASSWORD).
    #[arg(long)]
    wifi_ssid: Option<String>,
    /// The fleet server's broker, `host` or `host:port` (MQTT 5, default port 18831).
    #[arg(long)]
    server: Option<String>,
    /// The fleet server's identity key to pin while claiming (64 hex digits,
    /// from `GET /api/v1/server`).
    #[arg(long)]
    server_key: Option<String>,
    /// `always-on`, or `check-in:LINGER_S,UPLOAD_DELAY_S`.
    #[arg(long)]
    connectivity: Option<String>,
    /// Local time zone, minutes east of UTC (capture windows are local).
    #[arg(long)]
    utc_offset_min: Option<i16>,
    /// Sign an OTA manifest for the app image with this key (`cargo xtask keygen`).
    #[arg(long, value_name = "PATH")]
    signing_key: Option<PathBuf>,
    /// The image's anti-rollback secure version (with --signing-key).
    #[arg(long, default_value_t = 1)]
    secure_version: u32,
}

/// Label of the settings partition in the partition table.
const SETTINGS_LABEL: &str = "wcfg";
/// Bytes of the settings partition the firmware reads.
const SETTINGS_LEN: usize = 4_096;

/// Runs `cargo xtask flash`.
pub fn run(args: &Args) -> Result<()> {
    let root = crate::repository_root();
    let settings = settings_text(args)?;
    let ota_public_key = match &args.signing_key {
        Some(key) => Some(ota_public_key(key)?),
        None => {
            if std::env::var_os(firmware::OTA_PUBLIC_KEY_VAR).is_none() {
                println!(
                    "note: no --signing-key (nor {}): this image will refuse every OTA update",
                    firmware::OTA_PUBLIC_KEY_VAR
                );
            }
            None
        }
    };
    let build = firmware::build_and_report(&root, args.chip, ota_public_key.as_deref())?;
    let settings_offset =
        partition_offset(&fs::read_to_string(firmware::partition_table(&root))?, SETTINGS_LABEL)?;
    let out_dir = args.save_image.clone().unwrap_or_else(|| {
        build
            .app_image
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    });
    fs::create_dir_all(&out_dir).with_context(|| format!("could not create {}", out_dir.display()))?;
    let app = copy_into(&build.app_image, &out_dir)?;
    let merged = copy_into(&build.merged_image, &out_dir)?;
    if let Some(key) = &args.signing_key {
        sign_manifest(args, key, &app)?;
    }
    let settings_image = match &settings {
        Some(text) => Some(write_settings(&out_dir, text)?),
        None => None,
    };
    if args.save_image.is_some() {
        print_saved(args.chip, &app, &merged, settings_image.as_deref(), settings_offset);
        return Ok(());
    }
    if settings_image.is_none() {
        println!(
            "note: no --server given: the settings partition is left as it is (a new trap halts without it)"
        );
    }
    flash(args, &merged, settings_image.as_deref(), settings_offset)
}

/// The settings partition's text, or `None` when no setting is given.
fn settings_text(args: &Args) -> Result<Option<String>> {
    let environment = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
    let entries = [
        ("wifi_ssid", args.wifi_ssid.clone()),
        ("wifi_password", environment("WILDCAM_WIFI_PASSWORD")),
        ("server", args.server.clone()),
        ("claim_token", environment("WILDCAM_CLAIM_TOKEN")),
        ("provision_password", environment("WILDCAM_PROVISION_PASSWORD")),
        ("server_key", args.server_key.clone()),
        ("connectivity", args.connectivity.clone()),
        ("utc_offset_min", args.utc_offset_min.map(|minutes| minutes.to_string())),
    ];
    settings_from(&entries)
}

/// `key=value` lines for the given entries; refuses values that would break
/// the format and settings without a server.
fn settings_from(entries: &[(&str, Option<String>)]) -> Result<Option<String>> {
    if entries.iter().all(|(_, value)| value.is_none()) {
        return Ok(None);
    }
    if entries
        .iter()
        .any(|(key, value)| *key == "server" && value.is_none())
    {
        bail!("--server is required when writing settings");
    }
    let mut text = String::from("# WildCAM trap settings, written by cargo xtask flash\n");
    for (key, value) in entries {
        let Some(value) = value else { continue };
        if value.contains(['\n', '\r', '\0']) || value.trim() != value {
            bail!("the {key} setting may not contain line breaks or surrounding spaces");
        }
        text.push_str(&format!("{key}={value}\n"));
    }
    if text.len() > SETTINGS_LEN {
        bail!("settings are {} bytes, the partition holds {SETTINGS_LEN}", text.len());
    }
    Ok(Some(text))
}

/// The offset of partition `label` in a partition table CSV.
fn partition_offset(csv: &str, label: &str) -> Result<u32> {
    for line in csv.lines().map(str::trim) {
        if line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.first() == Some(&label) {
            let offset = fields.get(3).context("partition line without an offset")?;
            let hex = offset.trim_start_matches("0x");
            return u32::from_str_radix(hex, 16)
                .with_context(|| format!("bad offset {offset:?} for {label}"));
        }
    }
    bail!("no partition `{label}` in the partition table")
}

fn copy_into(file: &Path, directory: &Path) -> Result<PathBuf> {
    let target = directory.join(file.file_name().context("an image has no file name")?);
    if target != file {
        fs::copy(file, &target).with_context(|| format!("could not write {}", target.display()))?;
    }
    Ok(target)
}

/// The settings partition's contents (text, then erased bytes), written with
/// mode 0600: it may hold the Wi-Fi password and the claim token.
fn write_settings(directory: &Path, text: &str) -> Result<PathBuf> {
    let path = directory.join("settings.bin");
    let mut bytes = text.as_bytes().to_vec();
    bytes.resize(SETTINGS_LEN, 0xFF);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("could not write {}", path.display()))?;
    file.write_all(&bytes)?;
    Ok(path)
}

/// The firmware workspace's version (`[workspace.package] version`).
fn firmware_version(root: &Path) -> Result<FirmwareVersion> {
    let manifest_path = firmware::firmware_dir(root).join("Cargo.toml");
    let manifest = fs::read_to_string(&manifest_path)?;
    let version = manifest
        .lines()
        .find_map(|line| line.trim().strip_prefix("version = \""))
        .and_then(|rest| rest.strip_suffix('"'))
        .with_context(|| format!("no version in {}", manifest_path.display()))?;
    sign::parse_version(version).map_err(|error| anyhow::anyhow!(error))
}

/// The public half of `signing_key` in hex, to build into the image so that
/// later updates signed with the same key are accepted. Refuses a
/// contradicting `WILDCAM_OTA_PUBLIC_KEY` in the environment.
fn ota_public_key(signing_key: &Path) -> Result<String> {
    let key = crate::key::load_signing_key(signing_key)?;
    let public = crate::key::public_key_hex(&key.verifying_key());
    if let Ok(set) = std::env::var(firmware::OTA_PUBLIC_KEY_VAR)
        && !set.eq_ignore_ascii_case(&public)
    {
        bail!(
            "{} is set to another key than --signing-key's public key ({public}); unset it or pass the matching key",
            firmware::OTA_PUBLIC_KEY_VAR
        );
    }
    Ok(public)
}

fn sign_manifest(args: &Args, key: &Path, app: &Path) -> Result<()> {
    let firmware = firmware_version(&crate::repository_root())?;
    let chip = sign::parse_chip(args.chip.name()).map_err(|error| anyhow::anyhow!(error))?;
    sign::run(&sign::Args {
        key: key.to_path_buf(),
        image: app.to_path_buf(),
        chip,
        version: firmware,
        secure_version: args.secure_version,
        min_battery_mv: sign::MIN_BATTERY_MV_DEFAULT,
        out: Some(app.with_extension("manifest")),
        force: true,
    })
}

fn print_saved(chip: EspChip, app: &Path, merged: &Path, settings: Option<&Path>, settings_offset: u32) {
    println!("saved, nothing flashed:");
    println!("  app image (an OTA slot's contents)      {}", app.display());
    println!("  merged image (bootloader, partitions, app) at 0x0: {}", merged.display());
    if let Some(settings) = settings {
        println!(
            "  settings partition at {settings_offset:#x} (holds secrets, mode 0600): {}",
            settings.display()
        );
    }
    println!("flash later with: espflash write-bin --chip {} 0x0 {}", chip.name(), merged.display());
    if let Some(settings) = settings {
        println!(
            "             and: espflash write-bin --chip {} {settings_offset:#x} {}",
            chip.name(),
            settings.display()
        );
    }
}

/// Flashes the merged image (and the settings) with the espflash CLI.
fn flash(args: &Args, merged: &Path, settings: Option<&Path>, settings_offset: u32) -> Result<()> {
    if !process::succeeds(Command::new("espflash").arg("--version")) {
        bail!(
            "flashing needs the espflash CLI: `cargo install espflash --locked` (Debian needs \
             libudev-dev and pkg-config); or use --save-image DIR to write the images only"
        );
    }
    let write = |offset: u32, file: &Path| {
        let mut command = Command::new("espflash");
        command.args(["write-bin", "--chip", args.chip.name()]);
        if let Some(port) = &args.port {
            command.args(["--port", port]);
        }
        command.arg(format!("{offset:#x}")).arg(file);
        process::run(&mut command)
    };
    write(0, merged)?;
    if let Some(settings) = settings {
        write(settings_offset, settings)?;
    }
    println!("flashed; watch the trap with: espflash monitor --chip {}", args.chip.name());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_need_a_server_and_single_lines() {
        assert_eq!(settings_from(&[("server", None), ("wifi_ssid", None)]).unwrap(), None);
        assert!(settings_from(&[("server", None), ("wifi_ssid", Some("field".into()))]).is_err());
        assert!(settings_from(&[("server", Some("a\nclaim_token=x".into()))]).is_err());
        let text = settings_from(&[("server", Some("fleet.example:18831".into())), ("wifi_ssid", None)])
            .unwrap()
            .unwrap();
        assert!(text.ends_with("server=fleet.example:18831\n"), "{text}");
    }

    #[test]
    fn the_firmware_version_is_read_from_its_workspace() {
        let version = firmware_version(&crate::repository_root()).unwrap();
        assert_eq!((version.major, version.minor), (0, 1));
    }

    #[test]
    fn the_settings_partition_is_in_the_table() {
        let csv = fs::read_to_string(firmware::partition_table(&crate::repository_root())).unwrap();
        assert_eq!(partition_offset(&csv, SETTINGS_LABEL).unwrap(), 0x35_0000);
        assert!(partition_offset(&csv, "nothing").is_err());
    }
}
