//! `cargo xtask firmware build --chip esp32c3|esp32c6|host`: builds a board's
//! firmware; for a chip also its images (espflash as a library: the app
//! image, and a merged image of bootloader, partition table and app) and its
//! size figures. Shared with `flash.rs` and the CI step that checks both chip
//! images with esptool and enforces the ESP32-C3 size budget.
//!
//! Chip builds use the toolchain `toolchain.rs` finds (rustup's target, or
//! Debian's rustc with `-Zbuild-std`), in release (the size that ships).

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use espflash::flasher::{FlashData, FlashMode, FlashSettings, FlashSize};
use espflash::image_format::idf::IdfBootloaderFormat;
use object::{Object, ObjectSection, SectionKind};

use crate::process;
use crate::toolchain::{ESP32C3_TARGET, ESP32C6_TARGET, RiscvToolchain, host_cargo};

/// Flags of `cargo xtask firmware`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: FirmwareCommand,
}

#[derive(Debug, clap::Subcommand)]
enum FirmwareCommand {
    /// Build a board's firmware (for a chip: release ELF, app and merged images).
    Build {
        /// The board.
        #[arg(long, value_enum)]
        chip: Board,
    },
}

/// The boards the firmware workspace builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Board {
    /// ESP32-C3 (riscv32imc).
    Esp32c3,
    /// ESP32-C6 (riscv32imac).
    Esp32c6,
    /// Linux, networked over a TAP device.
    Host,
}

impl fmt::Display for Board {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Esp32c3 => "esp32c3",
            Self::Esp32c6 => "esp32c6",
            Self::Host => "host",
        })
    }
}

/// A chip the firmware runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EspChip {
    /// ESP32-C3.
    Esp32c3,
    /// ESP32-C6.
    Esp32c6,
}

impl EspChip {
    /// Both chips, in build order.
    pub const ALL: [Self; 2] = [Self::Esp32c3, Self::Esp32c6];

    /// The name used in crate names, file names and esptool's `--chip`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Esp32c3 => "esp32c3",
            Self::Esp32c6 => "esp32c6",
        }
    }

    /// The Rust target.
    pub fn target(self) -> &'static str {
        match self {
            Self::Esp32c3 => ESP32C3_TARGET,
            Self::Esp32c6 => ESP32C6_TARGET,
        }
    }

    fn espflash(self) -> espflash::target::Chip {
        match self {
            Self::Esp32c3 => espflash::target::Chip::Esp32c3,
            Self::Esp32c6 => espflash::target::Chip::Esp32c6,
        }
    }

    /// The board crate.
    pub fn package(self) -> String {
        format!("wildcam-firmware-{}", self.name())
    }

    /// The firmware binary's name.
    pub fn binary(self) -> String {
        format!("wildcam-{}", self.name())
    }

    /// Internal SRAM address ranges (data and instruction buses).
    #[allow(clippy::single_range_in_vec_init)] // A list of ranges, one on the C6.
    fn sram(self) -> &'static [std::ops::Range<u64>] {
        match self {
            Self::Esp32c3 => &[0x3FC8_0000..0x3FCE_0000, 0x4037_C000..0x403E_0000],
            Self::Esp32c6 => &[0x4080_0000..0x4088_0000],
        }
    }
}

/// The budget `cargo xtask ci` enforces on the ESP32-C3 build
/// (`docs/benchmarks.md`).
pub const APP_IMAGE_BUDGET_BYTES: u64 = 900 * 1024;
/// Static RAM (`.data` and `.bss`) budget on the ESP32-C3.
pub const STATIC_RAM_BUDGET_BYTES: u64 = 160 * 1024;

/// The flash layout the images are made for.
const FLASH_SIZE: FlashSize = FlashSize::_4Mb;
/// Where the bundled ESP-IDF bootloader looks for the partition table
/// (`CONFIG_PARTITION_TABLE_OFFSET`); espflash would otherwise guess 0x1000
/// below the first partition.
const PARTITION_TABLE_OFFSET: u32 = 0x8000;

/// Runs `cargo xtask firmware`.
pub fn run(args: &Args) -> Result<()> {
    let root = crate::repository_root();
    match args.command {
        FirmwareCommand::Build { chip: Board::Host } => build_host(&root),
        FirmwareCommand::Build { chip: Board::Esp32c3 } => {
            build_and_report(&root, EspChip::Esp32c3, None).map(drop)
        }
        FirmwareCommand::Build { chip: Board::Esp32c6 } => {
            build_and_report(&root, EspChip::Esp32c6, None).map(drop)
        }
    }
}

/// The firmware workspace.
pub fn firmware_dir(root: &Path) -> PathBuf {
    root.join("firmware")
}

fn build_host(root: &Path) -> Result<()> {
    let mut command = host_cargo();
    command
        .current_dir(firmware_dir(root))
        .args(["build", "--locked", "-p", "wildcam-firmware-host"]);
    process::run(&mut command)?;
    println!(
        "host firmware: {}",
        firmware_dir(root)
            .join("target/debug/wildcam-trap-host")
            .display()
    );
    Ok(())
}

/// What a chip build produced.
#[derive(Debug)]
pub struct ChipBuild {
    /// The app image (what goes into an OTA slot).
    pub app_image: PathBuf,
    /// Bootloader, partition table and app at their offsets, from 0x0.
    pub merged_image: PathBuf,
    /// Sizes.
    pub sizes: Sizes,
}

/// Builds `chip`, writes its images under `firmware/target/images/<chip>/`
/// and prints its sizes.
/// `ota_public_key` (64 hex digits) is built into the image as the firmware
/// signing key its OTA updates must be signed with; `None` leaves the
/// environment's `WILDCAM_OTA_PUBLIC_KEY`, if any.
/// The environment variable the ESP board crates read, at compile time, for
/// the firmware signing public key.
pub const OTA_PUBLIC_KEY_VAR: &str = "WILDCAM_OTA_PUBLIC_KEY";

pub fn build_and_report(root: &Path, chip: EspChip, ota_public_key: Option<&str>) -> Result<ChipBuild> {
    let elf = build_chip(root, chip, ota_public_key)?;
    let directory = firmware_dir(root).join("target/images").join(chip.name());
    let build = write_images(root, chip, &elf, &directory)?;
    println!("{}: {}", chip.name(), build.sizes);
    println!("  app image    {}", build.app_image.display());
    println!("  merged image {}", build.merged_image.display());
    Ok(build)
}

/// Builds the board crate for `chip` in release and returns the ELF.
pub fn build_chip(root: &Path, chip: EspChip, ota_public_key: Option<&str>) -> Result<PathBuf> {
    let toolchain = RiscvToolchain::find(chip.target())?;
    println!("{}: {}", chip.target(), toolchain.describe());
    let mut command = toolchain.cargo_build(chip.target(), &["core", "alloc"]);
    command
        .current_dir(firmware_dir(root))
        .args(["--release", "-p", &chip.package()]);
    if let Some(key) = ota_public_key {
        command.env(OTA_PUBLIC_KEY_VAR, key);
    }
    process::run(&mut command)?;
    Ok(firmware_dir(root)
        .join("target")
        .join(chip.target())
        .join("release")
        .join(chip.binary()))
}

/// Writes `<binary>.bin` (app) and `<binary>-merged.bin` into `directory`.
pub fn write_images(root: &Path, chip: EspChip, elf: &Path, directory: &Path) -> Result<ChipBuild> {
    let elf_data = fs::read(elf).with_context(|| format!("could not read {}", elf.display()))?;
    let partitions = partition_table(root);
    let flash = FlashData::new(
        FlashSettings::new(Some(FlashMode::Dio), Some(FLASH_SIZE), None),
        0,
        None,
        chip.espflash(),
        chip.espflash().default_xtal_frequency(),
    );
    let image = |elf_data| {
        IdfBootloaderFormat::new(
            elf_data,
            &flash,
            Some(&partitions),
            None,
            Some(PARTITION_TABLE_OFFSET),
            None,
        )
        .map_err(|error| anyhow::anyhow!("espflash could not make the {} image: {error}", chip.name()))
    };
    let app: Vec<u8> = image(&elf_data)?
        .ota_segments()
        .flat_map(|segment| segment.data.into_owned())
        .collect();
    let mut merged = Vec::new();
    for segment in image(&elf_data)?.flash_segments() {
        let offset = usize::try_from(segment.addr)?;
        if merged.len() > offset {
            bail!("overlapping segments at {offset:#x} in the {} image", chip.name());
        }
        merged.resize(offset, 0xFF);
        merged.extend_from_slice(&segment.data);
    }
    check_merged_layout(&merged, &app)?;
    fs::create_dir_all(directory).with_context(|| format!("could not create {}", directory.display()))?;
    let app_image = directory.join(format!("{}.bin", chip.binary()));
    let merged_image = directory.join(format!("{}-merged.bin", chip.binary()));
    fs::write(&app_image, &app).with_context(|| format!("could not write {}", app_image.display()))?;
    fs::write(&merged_image, &merged)
        .with_context(|| format!("could not write {}", merged_image.display()))?;
    let sizes = Sizes::measure(chip, &elf_data, u64::try_from(app.len())?)?;
    Ok(ChipBuild { app_image, merged_image, sizes })
}

/// The merged image must hold the partition table where the bootloader reads
/// it and the app where the table's first OTA slot starts.
fn check_merged_layout(merged: &[u8], app: &[u8]) -> Result<()> {
    const ENTRY_MAGIC: [u8; 2] = [0xAA, 0x50];
    const FIRST_SLOT: usize = 0x1_0000;
    let table = usize::try_from(PARTITION_TABLE_OFFSET)?;
    if merged.get(table..table + 2) != Some(&ENTRY_MAGIC[..]) {
        bail!("the merged image has no partition table at {table:#x}");
    }
    if merged.get(FIRST_SLOT..FIRST_SLOT + app.len()) != Some(app) {
        bail!("the merged image does not hold the app at {FIRST_SLOT:#x}");
    }
    Ok(())
}

/// The partition table flashed with every image (`firmware/esp/partitions.csv`).
pub fn partition_table(root: &Path) -> PathBuf {
    firmware_dir(root).join("esp/partitions.csv")
}

/// Size figures of one chip build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    /// The app image, bytes.
    pub app_image: u64,
    /// Initialised static data in RAM (`.data*`), bytes.
    pub data: u64,
    /// Zeroed static data in RAM (`.bss`, `.noinit`), bytes.
    pub bss: u64,
    /// Code placed in RAM (`.trap`, `.rwtext*`), bytes.
    pub ram_code: u64,
}

impl Sizes {
    /// Measures the ELF's sections that sit in the chip's internal SRAM. The
    /// stack (`.stack`: whatever RAM is left) and the heap the bootloader's
    /// RAM is reclaimed for (`.dram2_uninit`) are not static data.
    pub fn measure(chip: EspChip, elf: &[u8], app_image: u64) -> Result<Self> {
        let file = object::File::parse(elf).context("the firmware is not an ELF file")?;
        let mut sizes = Self { app_image, data: 0, bss: 0, ram_code: 0 };
        for section in file.sections() {
            let name = section.name().unwrap_or_default();
            let in_sram = chip
                .sram()
                .iter()
                .any(|range| range.contains(&section.address()));
            if !in_sram || section.size() == 0 || matches!(name, ".stack" | ".dram2_uninit" | ".rwdata_dummy")
            {
                continue;
            }
            match section.kind() {
                SectionKind::Text => sizes.ram_code += section.size(),
                SectionKind::UninitializedData | SectionKind::UninitializedTls => sizes.bss += section.size(),
                _ => sizes.data += section.size(),
            }
        }
        Ok(sizes)
    }

    /// `.data` plus `.bss`.
    pub fn static_ram(&self) -> u64 {
        self.data + self.bss
    }

    /// Fails if the figures exceed the ESP32-C3 budget.
    pub fn check_budget(&self) -> Result<()> {
        if self.app_image > APP_IMAGE_BUDGET_BYTES {
            bail!("app image is {} bytes, over the budget of {APP_IMAGE_BUDGET_BYTES}", self.app_image);
        }
        if self.static_ram() > STATIC_RAM_BUDGET_BYTES {
            bail!("static RAM is {} bytes, over the budget of {STATIC_RAM_BUDGET_BYTES}", self.static_ram());
        }
        Ok(())
    }
}

impl fmt::Display for Sizes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kib = |bytes: u64| bytes as f64 / 1024.0;
        write!(
            f,
            "app image {} bytes ({:.1} KiB); static RAM {:.1} KiB (.data {:.1} KiB + .bss {:.1} KiB); code in RAM {:.1} KiB",
            self.app_image,
            kib(self.app_image),
            kib(self.static_ram()),
            kib(self.data),
            kib(self.bss),
            kib(self.ram_code)
        )
    }
}

/// esptool, from PyPI, in a virtual environment under `target/tools` (made on
/// first use): the image checker independent of espflash, which made the images.
pub fn esptool(root: &Path) -> Result<PathBuf> {
    const ESPTOOL_VERSION: &str = "5.6.0";
    let venv = root.join("target/tools/esptool-venv");
    let esptool = venv.join("bin/esptool");
    let marker = venv.join(format!("esptool-{ESPTOOL_VERSION}"));
    if esptool.exists() && marker.exists() {
        return Ok(esptool);
    }
    if !process::succeeds(Command::new("python3").args(["-m", "venv", "--help"])) {
        bail!("esptool needs python3 with venv (Debian: `apt-get install python3-venv`)");
    }
    println!("installing esptool {ESPTOOL_VERSION} from PyPI into {}", venv.display());
    process::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    process::run(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("esptool=={ESPTOOL_VERSION}")),
    )?;
    fs::write(&marker, b"").with_context(|| format!("could not write {}", marker.display()))?;
    Ok(esptool)
}

/// Checks an app image with esptool: header, checksum and appended SHA-256
/// must all be valid.
pub fn check_image(esptool: &Path, chip: EspChip, image: &Path) -> Result<()> {
    let mut command = Command::new(esptool);
    command
        .args(["--chip", chip.name(), "image-info"])
        .arg(image);
    let report = process::output(&mut command)?;
    let verdict = image_verdict(&report);
    if let Err(problem) = verdict {
        bail!("esptool refuses {}: {problem}\n{report}", image.display());
    }
    println!("esptool: {} checksum and SHA-256 valid", image.display());
    Ok(())
}

/// Reads esptool's `image-info` report: `Ok` when both the checksum and the
/// validation hash are reported valid.
fn image_verdict(report: &str) -> Result<(), &'static str> {
    let line_valid = |label: &str| {
        report
            .lines()
            .any(|line| line.trim_start().starts_with(label) && line.contains("(valid)"))
    };
    if !line_valid("Checksum:") {
        return Err("the checksum is not reported valid");
    }
    if !line_valid("Validation hash:") {
        return Err("the SHA-256 validation hash is not reported valid");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn esptool_verdicts() {
        let good = "Checksum: 0x5d (valid)\nValidation hash: 4d2b...a1 (valid)\n";
        assert_eq!(image_verdict(good), Ok(()));
        assert!(
            image_verdict("Checksum: 0x5d (invalid - calculated 0x11)\nValidation hash: 4d (valid)").is_err()
        );
        assert!(image_verdict("Checksum: 0x5d (valid)\nValidation hash: 4d (invalid)").is_err());
        assert!(image_verdict("Checksum: 0x5d (valid)\n").is_err(), "a missing hash is not valid");
    }

    #[test]
    fn budget() {
        let sizes = Sizes { app_image: 800 * 1024, data: 10 * 1024, bss: 60 * 1024, ram_code: 40 * 1024 };
        assert!(sizes.check_budget().is_ok());
        assert!(
            Sizes { app_image: 901 * 1024, ..sizes }
                .check_budget()
                .is_err()
        );
        assert!(Sizes { bss: 151 * 1024, ..sizes }.check_budget().is_err());
    }
}
