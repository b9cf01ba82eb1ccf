//! The host board's stand-in for the bootloader: two OTA slot files and an
//! `otadata` file, next to the flash file.
//!
//! - `FLASH.ota0`, `FLASH.ota1`: the slots, NOR flash files of
//!   [`SLOT_LEN`] bytes. Updates are written to the slot not running.
//! - `FLASH.otadata`: a small text file (`key=value` lines), replaced
//!   atomically: the selected slot, its state (`new`, `pending-verify`,
//!   `valid`) and the firmware version each slot holds.
//!
//! The host cannot execute the downloaded bytes: after an activation it
//! keeps running this binary and only *pretends* the new image runs, by
//! reporting the slot's recorded version as the running version. On each
//! start, [`HostBoot::power_on`] does what the ESP-IDF bootloader does with
//! rollback enabled: a `new` slot boots as `pending-verify`; a slot still
//! `pending-verify` at the next start (never confirmed: the process was
//! killed, or its self-test never ended) is abandoned and the other slot
//! boots. A missing `otadata` means slot 0 with this binary's own version.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use wildcam_firmware_app::{BootControl, Restart};
use wildcam_sdk::ota::OtaRecord;
use wildcam_sdk::protocol::{FirmwareVersion, ResetReason};

use crate::sim::ExecRestart;

/// Size of each slot file, bytes.
pub const SLOT_LEN: usize = 4 * 1024 * 1024;

/// The state of the selected slot, as `otadata` keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// Activated, not booted yet.
    New,
    /// Booted once, not confirmed yet.
    PendingVerify,
    /// Confirmed (or never updated).
    Valid,
}

impl SlotState {
    fn name(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::PendingVerify => "pending-verify",
            Self::Valid => "valid",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        [Self::New, Self::PendingVerify, Self::Valid]
            .into_iter()
            .find(|state| state.name() == text)
    }
}

/// What `otadata` holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtaData {
    /// The slot the bootloader starts.
    pub selected: usize,
    /// Its state.
    pub state: SlotState,
    /// The firmware version in each slot (`None`: this binary's own).
    pub versions: [Option<FirmwareVersion>; 2],
}

impl Default for OtaData {
    fn default() -> Self {
        Self { selected: 0, state: SlotState::Valid, versions: [None; 2] }
    }
}

impl OtaData {
    /// Parses the file's text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut data = Self::default();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| format!("otadata: cannot read {line:?}"))?;
            let bad = || format!("otadata: bad value in {line:?}");
            match key.trim() {
                "selected" => {
                    data.selected = value
                        .trim()
                        .parse()
                        .ok()
                        .filter(|&s| s < 2)
                        .ok_or_else(bad)?
                }
                "state" => data.state = SlotState::parse(value.trim()).ok_or_else(bad)?,
                "version0" => data.versions[0] = Some(parse_version(value.trim()).ok_or_else(bad)?),
                "version1" => data.versions[1] = Some(parse_version(value.trim()).ok_or_else(bad)?),
                _ => return Err(format!("otadata: unknown key in {line:?}")),
            }
        }
        Ok(data)
    }
}

impl fmt::Display for OtaData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "# WildCAM host board: the stand-in for the bootloader's otadata")?;
        writeln!(f, "selected={}", self.selected)?;
        writeln!(f, "state={}", self.state.name())?;
        for (slot, version) in self.versions.iter().enumerate() {
            if let Some(version) = version {
                writeln!(f, "version{slot}={}", show_version(*version))?;
            }
        }
        Ok(())
    }
}

/// `major.minor.patch`.
pub fn parse_version(text: &str) -> Option<FirmwareVersion> {
    let mut parts = text.split('.').map(|part| part.parse().ok());
    let version = FirmwareVersion { major: parts.next()??, minor: parts.next()??, patch: parts.next()?? };
    parts.next().is_none().then_some(version)
}

/// `major.minor.patch`.
pub fn show_version(version: FirmwareVersion) -> String {
    format!("{}.{}.{}", version.major, version.minor, version.patch)
}

/// Where a slot's file is.
pub fn slot_path(flash: &Path, slot: usize) -> PathBuf {
    sibling(flash, &format!("ota{slot}"))
}

fn sibling(flash: &Path, extension: &str) -> PathBuf {
    let mut name = flash.as_os_str().to_owned();
    name.push(".");
    name.push(extension);
    PathBuf::from(name)
}

/// The host's boot control.
#[derive(Debug)]
pub struct HostBoot {
    path: PathBuf,
    data: OtaData,
    running: usize,
    own_version: FirmwareVersion,
    self_test_fail_version: Option<FirmwareVersion>,
    restart: ExecRestart,
}

/// Why `otadata` could not be written.
#[derive(Debug)]
pub struct OtaDataError(io::Error);

impl HostBoot {
    /// The stand-in bootloader's start: reads `otadata` next to `flash`,
    /// picks the slot to "boot" and records what it did.
    pub fn power_on(
        flash: &Path,
        own_version: FirmwareVersion,
        self_test_fail_version: Option<FirmwareVersion>,
    ) -> Result<Self, String> {
        let path = sibling(flash, "otadata");
        let data = match fs::read_to_string(&path) {
            Ok(text) => OtaData::parse(&text)?,
            Err(error) if error.kind() == io::ErrorKind::NotFound => OtaData::default(),
            Err(error) => return Err(format!("{}: {error}", path.display())),
        };
        let mut boot = Self {
            path,
            running: data.selected,
            data,
            own_version,
            self_test_fail_version,
            restart: ExecRestart,
        };
        match boot.data.state {
            SlotState::New => {
                boot.data.state = SlotState::PendingVerify;
                boot.save().map_err(|error| error.to_string())?;
            }
            SlotState::PendingVerify => {
                log::warn!(
                    "bootloader (host stand-in): slot {} never confirmed itself: rolling back",
                    boot.data.selected
                );
                boot.data.selected = 1 - boot.data.selected;
                boot.data.state = SlotState::Valid;
                boot.running = boot.data.selected;
                boot.save().map_err(|error| error.to_string())?;
            }
            SlotState::Valid => {}
        }
        log::info!(
            "bootloader (host stand-in): running slot {} as firmware {} ({})",
            boot.running,
            show_version(boot.running_version()),
            boot.data.state.name()
        );
        Ok(boot)
    }

    /// The slot updates are written to.
    pub fn inactive_slot(&self) -> usize {
        1 - self.running
    }

    /// What `otadata` says now.
    #[cfg(test)]
    pub fn data(&self) -> &OtaData {
        &self.data
    }

    fn save(&self) -> Result<(), OtaDataError> {
        let temporary = sibling(&self.path, "tmp");
        let mut file = fs::File::create(&temporary).map_err(OtaDataError)?;
        file.write_all(self.data.to_string().as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(OtaDataError)?;
        fs::rename(&temporary, &self.path).map_err(OtaDataError)?;
        if let Some(directory) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::File::open(directory)
                .and_then(|d| d.sync_all())
                .map_err(OtaDataError)?;
        }
        Ok(())
    }
}

impl fmt::Display for OtaDataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "otadata: {}", self.0)
    }
}

impl Restart for HostBoot {
    fn reset_reason(&self) -> ResetReason {
        self.restart.reset_reason()
    }

    fn restart(&mut self) -> ! {
        self.restart.restart()
    }
}

impl BootControl for HostBoot {
    type Error = OtaDataError;

    fn running_version(&self) -> FirmwareVersion {
        self.data.versions[self.running].unwrap_or(self.own_version)
    }

    fn activate_update(&mut self, record: &OtaRecord) -> Result<(), Self::Error> {
        let slot = self.inactive_slot();
        self.data.selected = slot;
        self.data.state = SlotState::New;
        self.data.versions[slot] = Some(record.manifest.manifest.version);
        self.save()?;
        log::info!(
            "bootloader (host stand-in): slot {slot} activated with firmware {}",
            show_version(record.manifest.manifest.version)
        );
        Ok(())
    }

    fn mark_valid(&mut self) -> Result<(), Self::Error> {
        if self.data.selected == self.running && self.data.state != SlotState::Valid {
            self.data.state = SlotState::Valid;
            self.save()?;
            log::info!("bootloader (host stand-in): slot {} marked valid", self.running);
        }
        Ok(())
    }

    fn roll_back(&mut self) -> Result<(), Self::Error> {
        self.data.selected = 1 - self.running;
        self.data.state = SlotState::Valid;
        self.save()?;
        log::info!("bootloader (host stand-in): slot {} marked invalid", self.running);
        Ok(())
    }

    fn board_self_test(&mut self) -> Result<(), &'static str> {
        if self.self_test_fail_version == Some(self.running_version()) {
            return Err("--self-test-fail-version names the running version");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use wildcam_sdk::ota::BootedImage;

    const OWN: FirmwareVersion = FirmwareVersion { major: 0, minor: 1, patch: 0 };

    fn directory(name: &str) -> PathBuf {
        let directory = std::env::temp_dir().join(format!("wildcam-boot-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&directory);
        fs::create_dir_all(&directory).unwrap();
        directory
    }

    fn record(version: FirmwareVersion) -> OtaRecord {
        use wildcam_sdk::ota::{Manifest, ManifestSignature, OtaPhase, SignedManifest};
        OtaRecord {
            rollout_id: 1,
            manifest: SignedManifest {
                manifest: Manifest {
                    version,
                    secure_version: 1,
                    chip: wildcam_sdk::protocol::Chip::Host,
                    image_size: 1,
                    image_sha256: [0; 32],
                    min_battery_mv: 0,
                },
                signature: ManifestSignature([0; 64]),
            },
            chunk_len: 1024,
            offset: 0,
            phase: OtaPhase::PendingConfirmation,
        }
    }

    #[test]
    fn activation_confirmation_and_rollbacks() {
        let directory = directory("cycle");
        let flash = directory.join("trap.flash");
        let new = FirmwareVersion { major: 0, minor: 2, patch: 0 };
        let mut boot = HostBoot::power_on(&flash, OWN, None).unwrap();
        assert_eq!((boot.running_version(), boot.inactive_slot()), (OWN, 1));
        boot.activate_update(&record(new)).unwrap();

        // Booted once: pending; confirmed: valid, and stays on slot 1.
        let mut boot = HostBoot::power_on(&flash, OWN, None).unwrap();
        assert_eq!((boot.running_version(), boot.data().state), (new, SlotState::PendingVerify));
        assert_eq!(boot.booted_image(&record(new)), BootedImage::Updated);
        boot.mark_valid().unwrap();
        let boot = HostBoot::power_on(&flash, OWN, None).unwrap();
        assert_eq!((boot.running_version(), boot.inactive_slot()), (new, 0));

        // Never confirmed: the next start rolls back.
        let newer = FirmwareVersion { major: 0, minor: 3, patch: 0 };
        let mut boot = boot;
        boot.activate_update(&record(newer)).unwrap();
        let boot = HostBoot::power_on(&flash, OWN, None).unwrap();
        assert_eq!(boot.running_version(), newer);
        let mut boot = HostBoot::power_on(&flash, OWN, None).unwrap();
        assert_eq!(boot.running_version(), new);
        assert_eq!(boot.booted_image(&record(newer)), BootedImage::Previous);

        // A failed self-test rolls back explicitly.
        boot.activate_update(&record(newer)).unwrap();
        let mut boot = HostBoot::power_on(&flash, OWN, Some(newer)).unwrap();
        assert!(boot.board_self_test().is_err());
        boot.roll_back().unwrap();
        let mut boot = HostBoot::power_on(&flash, OWN, Some(newer)).unwrap();
        assert_eq!(boot.running_version(), new);
        assert!(boot.board_self_test().is_ok());
        fs::remove_dir_all(directory).unwrap();
    }

    #[test]
    fn otadata_round_trips_and_refuses_garbage() {
        let data = OtaData {
            selected: 1,
            state: SlotState::New,
            versions: [None, Some(FirmwareVersion { major: 1, minor: 2, patch: 3 })],
        };
        assert_eq!(OtaData::parse(&data.to_string()).unwrap(), data);
        assert!(OtaData::parse("selected=2").is_err());
        assert!(OtaData::parse("state=weird").is_err());
        assert!(OtaData::parse("version0=1.2").is_err());
        assert!(OtaData::parse("colour=blue").is_err());
        assert_eq!(parse_version("0.10.7"), Some(FirmwareVersion { major: 0, minor: 10, patch: 7 }));
    }
}
