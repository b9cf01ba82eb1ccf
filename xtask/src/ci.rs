//! `cargo xtask ci`: every check CI runs, in order, stopping at the first failure.
//! If it passes locally, CI is green (`.ci/run` only installs packages, then runs it).
//!
//! Steps ([`STEPS`]): formatting; clippy on the workspace and on the sdk with
//! `defmt`; tests (nextest when installed), doc tests and the examples; the sdk's dependency
//! boundary; the sdk built for both RISC-V chips; both chips' firmware images built,
//! checked with esptool and held to the ESP32-C3 size budget; the firmware's host
//! crates linted and tested, with the end-to-end test of the host board in a network
//! namespace; every fuzz target built.
//!
//! Build outputs: host steps use `target/`; the sdk's RISC-V builds use
//! `target/riscv` so they never invalidate host builds; the firmware and fuzz
//! workspaces use their own `firmware/target` and `sdk/fuzz/target`, as a developer
//! building there by hand does.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::firmware::{self, EspChip};
use crate::toolchain::{ESP32C3_TARGET, ESP32C6_TARGET, RiscvToolchain, host_cargo};
use crate::{boundary, process};

/// Flags of `cargo xtask ci` (none yet).
#[derive(Debug, clap::Args)]
pub struct Args {}

/// One named check.
struct Step {
    /// Short name, shown in the header and in the failure message.
    name: &'static str,
    run: fn(&Paths) -> Result<()>,
}

/// The checks, in the order they run. The dependency boundary goes before the
/// RISC-V builds: a std crate in the sdk's tree fails there with a clearer message.
const STEPS: &[Step] = &[
    Step { name: "fmt", run: fmt },
    Step { name: "clippy (workspace, all targets)", run: clippy_workspace },
    Step { name: "clippy (wildcam-sdk --features defmt)", run: clippy_sdk_defmt },
    Step { name: "test", run: test },
    Step { name: "doc tests", run: doc_test },
    Step { name: "examples", run: examples },
    Step { name: "sdk dependency boundary", run: dependency_boundary },
    Step { name: "sdk for ESP32-C3 (riscv32imc)", run: sdk_esp32c3 },
    Step {
        name: "firmware for ESP32-C3 and ESP32-C6 (clippy, images, esptool, size budget)",
        run: firmware_images,
    },
    Step { name: "firmware on the host (clippy, tests, end to end over TAP)", run: firmware_host },
    Step { name: "fuzz targets", run: fuzz_targets },
];

/// Where things are.
#[derive(Debug)]
struct Paths {
    /// The repository root (the host workspace).
    root: PathBuf,
}

impl Paths {
    fn firmware(&self) -> PathBuf {
        self.root.join("firmware")
    }

    fn fuzz(&self) -> PathBuf {
        self.root.join("sdk/fuzz")
    }

    /// A host `cargo` running in the repository root.
    fn cargo(&self) -> Command {
        let mut command = host_cargo();
        command.current_dir(&self.root);
        command
    }
}

/// Runs every step, printing a header and the time each took.
pub fn run(_args: &Args) -> Result<()> {
    let paths = Paths { root: crate::repository_root() };
    let started = Instant::now();
    let mut timings = Vec::with_capacity(STEPS.len());
    for (index, step) in STEPS.iter().enumerate() {
        let position = format!("{}/{}", index + 1, STEPS.len());
        println!("==> [{position}] {}", step.name);
        let step_started = Instant::now();
        let result = (step.run)(&paths);
        let elapsed = step_started.elapsed();
        result.with_context(|| {
            format!("ci step [{position}] `{}` failed after {}", step.name, seconds(elapsed))
        })?;
        println!("<== [{position}] {} ok in {}", step.name, seconds(elapsed));
        timings.push((step.name, elapsed));
    }
    print_summary(&timings, started.elapsed());
    Ok(())
}

fn print_summary(timings: &[(&str, Duration)], total: Duration) {
    println!("ci: all {} steps passed in {}", timings.len(), seconds(total));
    for (name, elapsed) in timings {
        println!("  {:>8}  {name}", seconds(*elapsed));
    }
}

fn seconds(duration: Duration) -> String {
    format!("{:.1} s", duration.as_secs_f64())
}

/// `cargo fmt --check` on the host workspace, the firmware and the fuzz crate.
/// The nested workspaces are checked from their own directory without `--all`:
/// `--all` would follow their path dependency into the host workspace.
fn fmt(paths: &Paths) -> Result<()> {
    cargo(paths, &["fmt", "--all", "--check"])?;
    for workspace in [paths.firmware(), paths.fuzz()] {
        let mut command = paths.cargo();
        command.current_dir(workspace).args(["fmt", "--check"]);
        process::run(&mut command)?;
    }
    Ok(())
}

/// Clippy on every crate and target of the workspace, with default features. Not
/// `--all-features`: features are per crate (and would turn on std in the sdk).
fn clippy_workspace(paths: &Paths) -> Result<()> {
    cargo(paths, &["clippy", "--locked", "--workspace", "--all-targets", "--", "-D", "warnings"])
}

/// Clippy on the sdk with `defmt`, as the firmware builds it.
fn clippy_sdk_defmt(paths: &Paths) -> Result<()> {
    let mut command = paths.cargo();
    command.args(["clippy", "--locked", "-p", "wildcam-sdk", "--all-targets", "--features", "defmt"]);
    process::run(command.args(["--", "-D", "warnings"]))
}

/// The workspace's tests: `cargo nextest run` when cargo-nextest is installed,
/// else `cargo test` (doc tests run in their own step either way).
fn test(paths: &Paths) -> Result<()> {
    if process::succeeds(paths.cargo().args(["nextest", "--version"])) {
        cargo(paths, &["nextest", "run", "--locked", "--workspace"])
    } else {
        println!("cargo-nextest is not installed; using cargo test");
        cargo(paths, &["test", "--locked", "--workspace", "--all-targets"])
    }
}

/// Doc tests (nextest does not run them).
fn doc_test(paths: &Paths) -> Result<()> {
    cargo(paths, &["test", "--locked", "--doc", "--workspace"])
}

/// Runs the examples that assert as they go (the README's quick start).
fn examples(paths: &Paths) -> Result<()> {
    cargo(paths, &["run", "--locked", "--quiet", "-p", "wildcam-sdk", "--example", "walkthrough"])
}

/// Runs the host `cargo` with `arguments` in the repository root.
fn cargo(paths: &Paths, arguments: &[&str]) -> Result<()> {
    process::run(paths.cargo().args(arguments))
}

/// No std-only crate or feature in the sdk's tree for either chip.
fn dependency_boundary(paths: &Paths) -> Result<()> {
    boundary::check(&paths.root, ESP32C3_TARGET)?;
    boundary::check(&paths.root, ESP32C6_TARGET)
}

/// The sdk alone, with `core` only, for the strictest target (no atomics).
/// The ESP32-C6 firmware step builds it for `riscv32imac` as part of the
/// firmware, and the dependency boundary is checked for both targets.
fn sdk_esp32c3(paths: &Paths) -> Result<()> {
    build_sdk(paths, ESP32C3_TARGET)
}

/// Builds the sdk for `target` with only `core`: it must need neither std nor an
/// allocator.
fn build_sdk(paths: &Paths, target: &str) -> Result<()> {
    let toolchain = find_toolchain(target)?;
    let mut command = toolchain.cargo_build(target, &["core"]);
    command
        .current_dir(&paths.root)
        .args(["-p", "wildcam-sdk", "--target-dir"])
        .arg(paths.root.join("target/riscv"));
    process::run(&mut command)
}

/// Builds both chips' firmware in release (the board crates, so the application,
/// the SDK and the ESP glue are all built for the chip), makes their images with
/// espflash, checks each with esptool (checksum and SHA-256) and enforces the
/// ESP32-C3 size budget (`docs/benchmarks.md`). Runs in `firmware/` so that cargo
/// reads `firmware/.cargo/config.toml` (rustflags, build-std).
fn firmware_images(paths: &Paths) -> Result<()> {
    clippy_esp(paths)?;
    let esptool = firmware::esptool(&paths.root)?;
    for chip in EspChip::ALL {
        let build = firmware::build_and_report(&paths.root, chip, None)?;
        firmware::check_image(&esptool, chip, &build.app_image)?;
        if chip == EspChip::Esp32c3 {
            build.sizes.check_budget()?;
            println!("{}: within the budget (app image <= 900 KiB, static RAM <= 160 KiB)", chip.name());
        }
    }
    Ok(())
}

/// Clippy on the ESP glue and board crates, for the ESP32-C3 (the C6 board is
/// the same code under another chip feature).
fn clippy_esp(paths: &Paths) -> Result<()> {
    let toolchain = find_toolchain(ESP32C3_TARGET)?;
    let mut command = toolchain.cargo("clippy", ESP32C3_TARGET, &["core", "alloc"]);
    command
        .current_dir(paths.firmware())
        .args(["--release", "-p", "wildcam-firmware-esp", "-p", "wildcam-firmware-esp32c3"])
        .args(["--", "-D", "warnings"]);
    process::run(&mut command)
}

/// The firmware crates that build for the host.
const FIRMWARE_HOST_CRATES: [&str; 4] = ["-p", FIRMWARE_APP, "-p", "wildcam-firmware-host"];
const FIRMWARE_APP: &str = "wildcam-firmware-app";

/// Clippy and the tests of the firmware crates that run on the host, including
/// the end-to-end test of the host board against the real server
/// (`firmware/host/tests/end_to_end.rs`, which needs root: CI runs as root and
/// fails it when a prerequisite is missing).
fn firmware_host(paths: &Paths) -> Result<()> {
    cargo(paths, &["build", "--locked", "-p", "wildcam-fleet-server", "--bin", "wildcam-fleet"])?;
    let fleet = paths.root.join("target/debug/wildcam-fleet");
    let mut clippy = paths.cargo();
    clippy
        .current_dir(paths.firmware())
        .args(["clippy", "--locked", "--all-targets"])
        .args(FIRMWARE_HOST_CRATES)
        .args(["--", "-D", "warnings"]);
    process::run(&mut clippy)?;
    let mut test = paths.cargo();
    test.current_dir(paths.firmware())
        .args(["test", "--locked"])
        .args(FIRMWARE_HOST_CRATES)
        .env("WILDCAM_FLEET_BIN", fleet);
    process::run(&mut test)
}

fn find_toolchain(target: &str) -> Result<RiscvToolchain> {
    let toolchain = RiscvToolchain::find(target)?;
    println!("{target}: {}", toolchain.describe());
    Ok(toolchain)
}

/// Builds every fuzz target: `cargo fuzz build` when cargo-fuzz and a nightly
/// toolchain are installed (sanitizers, as `cargo fuzz run` builds), else a plain
/// stable `cargo build --bins`, which checks the targets compile and link.
fn fuzz_targets(paths: &Paths) -> Result<()> {
    check_fuzz_targets_declared(&paths.fuzz())?;
    if cargo_fuzz_available() {
        println!("cargo-fuzz and nightly found: cargo +nightly fuzz build");
        let mut command = Command::new("rustup");
        command
            .args(["run", "nightly", "cargo", "fuzz", "build", "--dev"])
            .current_dir(paths.root.join("sdk"));
        return process::run(&mut command);
    }
    println!("cargo-fuzz or nightly missing: building the targets with stable cargo, without sanitizers");
    let mut command = paths.cargo();
    command
        .args(["build", "--locked", "--bins", "--manifest-path"])
        .arg(paths.fuzz().join("Cargo.toml"));
    process::run(&mut command)
}

/// cargo-fuzz installed and a nightly toolchain present (probed, not assumed).
fn cargo_fuzz_available() -> bool {
    let nightly = process::succeeds(Command::new("rustup").args(["run", "nightly", "rustc", "--version"]));
    nightly && process::succeeds(host_cargo().args(["fuzz", "--version"]))
}

/// Every `fuzz_targets/*.rs` must have a `[[bin]]` in the fuzz `Cargo.toml`, or it
/// would silently never be built.
fn check_fuzz_targets_declared(fuzz: &Path) -> Result<()> {
    let manifest_path = fuzz.join("Cargo.toml");
    let manifest = fs::read_to_string(&manifest_path)
        .with_context(|| format!("could not read {}", manifest_path.display()))?;
    let directory = fuzz.join("fuzz_targets");
    let entries =
        fs::read_dir(&directory).with_context(|| format!("could not list {}", directory.display()))?;
    let mut targets = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("could not list {}", directory.display()))?;
        targets.push(entry.file_name().to_string_lossy().into_owned());
    }
    let undeclared = undeclared_targets(&manifest, &targets);
    if let Some(name) = undeclared.first() {
        bail!(
            "fuzz_targets/{name}.rs is not declared in {}; add:\n[[bin]]\nname = \"{name}\"\npath = \
             \"fuzz_targets/{name}.rs\"\ntest = false\ndoc = false\nbench = false",
            manifest_path.display()
        );
    }
    Ok(())
}

/// The `.rs` files in `file_names` (target names without extension) whose path
/// does not appear in `manifest`.
fn undeclared_targets(manifest: &str, file_names: &[String]) -> Vec<String> {
    let mut undeclared: Vec<String> = file_names
        .iter()
        .filter_map(|file_name| file_name.strip_suffix(".rs"))
        .filter(|name| !manifest.contains(&format!("path = \"fuzz_targets/{name}.rs\"")))
        .map(str::to_owned)
        .collect();
    undeclared.sort();
    undeclared
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn undeclared_fuzz_targets_are_found() {
        let manifest = "[[bin]]\nname = \"topic\"\npath = \"fuzz_targets/topic.rs\"\n";
        let files = ["topic.rs", "seal.rs", "README.md"].map(String::from);
        assert_eq!(undeclared_targets(manifest, &files), ["seal"]);
    }

    #[test]
    fn the_repository_declares_every_fuzz_target() {
        check_fuzz_targets_declared(&crate::repository_root().join("sdk/fuzz")).unwrap();
    }

    #[test]
    fn step_names_are_unique() {
        for (index, step) in STEPS.iter().enumerate() {
            assert!(
                STEPS[index + 1..]
                    .iter()
                    .all(|other| other.name != step.name),
                "{}",
                step.name
            );
        }
    }
}
