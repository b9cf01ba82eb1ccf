//! Project automation for WildCAM, run as `cargo xtask <verb>` (the alias lives in
//! `.cargo/config.toml`).
//!
//! Each verb is one module with an `Args` struct (its flags) and a `run` function:
//! - [`ci`]: everything CI checks, in order, failing fast (`cargo xtask ci`).
//! - [`keygen`]: a new ed25519 firmware-signing key pair.
//! - [`sign`]: a signed OTA manifest for a firmware image, and its check.
//! - [`bench`]: the ingest benchmark (`cargo xtask bench-ingest`), fleet server or Mosquitto.
//!
//! Shared pieces: [`key`] loads key files, [`toolchain`] finds a compiler for the
//! RISC-V chips, [`boundary`] checks the sdk's dependency tree, [`process`] runs
//! commands with errors that say what failed.
//!
//! To add a verb: write `src/<verb>.rs` with `Args` and `run`, add a `mod` line and
//! a variant to [`Verb`], and one arm to [`run`].

mod bench;
mod bench_sim;
mod boundary;
mod ci;
mod firmware;
mod flash;
mod key;
mod keygen;
mod process;
mod sign;
mod toolchain;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// `cargo xtask`: build, check and release tasks for the WildCAM workspace.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", version, about)]
struct Cli {
    #[command(subcommand)]
    verb: Verb,
}

/// The verbs, one module each.
#[derive(Debug, Subcommand)]
enum Verb {
    /// Run every check CI runs (fmt, clippy, tests, RISC-V builds, dependency
    /// boundary, fuzz targets), failing at the first broken step.
    Ci(ci::Args),
    /// Generate an ed25519 firmware-signing key pair.
    Keygen(keygen::Args),
    /// Write a signed OTA manifest for a firmware image.
    Sign(sign::Args),
    /// Check a signed OTA manifest (and optionally its image) as a trap would.
    VerifyManifest(sign::VerifyArgs),
    /// Build a board's firmware: `firmware build --chip esp32c3|esp32c6|host`.
    Firmware(firmware::Args),
    /// Build, sign and flash a chip's firmware through espflash, or save its
    /// images with --save-image DIR.
    Flash(flash::Args),
    /// Benchmark sustained durable ingest from many MQTT clients (or the same load
    /// through Mosquitto) and print throughput, latency, CPU and memory.
    BenchIngest(bench::Args),
    /// Run a simulator scenario (default: the 1M-detection day) against the
    /// release fleet server and print the report and the server's peak memory.
    BenchSim(bench_sim::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.verb) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Dispatches one verb.
fn run(verb: Verb) -> anyhow::Result<()> {
    match verb {
        Verb::Ci(args) => ci::run(&args),
        Verb::Keygen(args) => keygen::run(&args),
        Verb::Sign(args) => sign::run(&args),
        Verb::VerifyManifest(args) => sign::run_verify(&args),
        Verb::BenchIngest(args) => bench::run(&args),
        Verb::BenchSim(args) => bench_sim::run(&args),
        Verb::Firmware(args) => firmware::run(&args),
        Verb::Flash(args) => flash::run(&args),
    }
}

/// The repository root (the parent of `xtask/`), whatever the current directory.
fn repository_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}
