//! Which cargo builds what: the host toolchain for the workspace, and a toolchain
//! that can compile for the RISC-V chips (ESP32-C3: `riscv32imc-unknown-none-elf`,
//! ESP32-C6: `riscv32imac-unknown-none-elf`).
//!
//! [`RiscvToolchain::find`] looks, for one target, in this order:
//! 1. **Prebuilt**: the host toolchain (the `rustc` cargo uses: `$RUSTC`, else
//!    `rustc` on `PATH`, i.e. rustup's) has the target's precompiled `core` in its
//!    sysroot. `rustup target add <target>` puts it there (and `rustup target list
//!    --installed` then lists the target). Build with a plain `cargo build --target`.
//! 2. **Debian**: Debian 12's `rustc-web` toolchain with its library sources
//!    ([`DEBIAN_PACKAGES`]). Build with `/usr/bin/cargo`, `RUSTC=/usr/bin/rustc`,
//!    `RUSTC_BOOTSTRAP=1` and `-Zbuild-std`, linking with `/usr/bin/rust-lld`.
//! 3. Neither: when running as root on a machine with `apt-get`, install Debian's
//!    packages and use them; otherwise fail, saying what to install.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::process;

/// The ESP32-C3's target (RV32IMC: no atomic instructions).
pub const ESP32C3_TARGET: &str = "riscv32imc-unknown-none-elf";
/// The ESP32-C6's target (RV32IMAC).
pub const ESP32C6_TARGET: &str = "riscv32imac-unknown-none-elf";

/// Debian 12 packages that make up the RISC-V capable toolchain. `lld-22` must be
/// named explicitly or linking fails. `.ci/run` installs the same list (and the tools the
/// tests need: `mosquitto`, `openssl`, `iproute2`, `dnsmasq-base`, `python3-venv`).
/// `rust-web-clippy` lints the firmware for the chips.
pub const DEBIAN_PACKAGES: &[&str] =
    &["rustc-web", "cargo-web", "rust-web-src", "rust-web-llvm", "lld-22", "rust-web-clippy"];

const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_LINKER: &str = "/usr/bin/rust-lld";
const DEBIAN_CORE_SOURCES: &str = "/usr/lib/rustlib/src/rust/library/core";
const DEBIAN_CLIPPY: &str = "/usr/bin/clippy-driver";

/// A `cargo` command of the toolchain running xtask (`$CARGO`, set by `cargo run`),
/// so every host step uses the same compiler as `cargo xtask` itself.
pub fn host_cargo() -> Command {
    Command::new(env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo")))
}

/// A toolchain able to build `no_std` code for one RISC-V target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RiscvToolchain {
    /// The host toolchain, which has the target's precompiled `core`.
    Prebuilt,
    /// Debian's toolchain, building `core` (and `alloc`) from source.
    Debian,
}

impl RiscvToolchain {
    /// Finds (or, as root, installs) a toolchain for `target`; see the module docs.
    pub fn find(target: &str) -> Result<Self> {
        if host_has_prebuilt_core(target)? {
            return Ok(Self::Prebuilt);
        }
        if debian_toolchain_present() {
            return Ok(Self::Debian);
        }
        if !can_install_debian_toolchain() {
            bail!("{}", missing_toolchain_help(target));
        }
        install_debian_toolchain()?;
        if !debian_toolchain_present() {
            bail!("installed {} but {} is still incomplete", DEBIAN_PACKAGES.join(" "), debian_paths_text());
        }
        Ok(Self::Debian)
    }

    /// One line saying which toolchain this is, for step headers.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Prebuilt => "host toolchain with the target installed",
            Self::Debian => "Debian rustc-web toolchain with -Zbuild-std",
        }
    }

    /// `cargo build --target <target>`. `std_crates` (`core`, `alloc`) are the
    /// standard crates to build from source where no prebuilt ones exist.
    pub fn cargo_build(self, target: &str, std_crates: &[&str]) -> Command {
        self.cargo("build", target, std_crates)
    }

    /// `cargo <subcommand> --target <target>` (`build`, `clippy`), building
    /// `std_crates` from source where no prebuilt ones exist.
    pub fn cargo(self, subcommand: &str, target: &str, std_crates: &[&str]) -> Command {
        let mut command = match self {
            Self::Prebuilt => host_cargo(),
            Self::Debian => debian_cargo(target),
        };
        command.args([subcommand, "--locked", "--target", target]);
        if self == Self::Debian {
            command.arg(format!("-Zbuild-std={}", std_crates.join(",")));
        }
        command
    }
}

/// `/usr/bin/cargo` set up to use Debian's `rustc` and `rust-lld`, whatever rustup
/// put in the environment of `cargo xtask`.
fn debian_cargo(target: &str) -> Command {
    let mut command = Command::new(DEBIAN_CARGO);
    for inherited in ["RUSTUP_TOOLCHAIN", "RUSTUP_TOOLCHAIN_SOURCE", "LD_LIBRARY_PATH", "CARGO"] {
        command.env_remove(inherited);
    }
    // Subcommands (`cargo clippy`) are found on PATH: Debian's first, not
    // rustup's proxies, which would run another toolchain's driver.
    let mut path = OsString::from("/usr/bin");
    if let Some(inherited) = env::var_os("PATH") {
        path.push(":");
        path.push(inherited);
    }
    command
        .env("PATH", path)
        .env("RUSTC", DEBIAN_RUSTC)
        .env("RUSTC_BOOTSTRAP", "1")
        .env(linker_variable(target), DEBIAN_LINKER);
    command
}

/// `CARGO_TARGET_<TRIPLE>_LINKER` for `target`.
fn linker_variable(target: &str) -> String {
    format!("CARGO_TARGET_{}_LINKER", target.to_ascii_uppercase().replace(['-', '.'], "_"))
}

/// Whether the host rustc's sysroot holds a precompiled `core` for `target`.
fn host_has_prebuilt_core(target: &str) -> Result<bool> {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| OsString::from("rustc"));
    let sysroot = process::output(Command::new(&rustc).args(["--print", "sysroot"]))
        .context("could not ask the host rustc for its sysroot")?;
    let library = Path::new(sysroot.trim())
        .join("lib/rustlib")
        .join(target)
        .join("lib");
    Ok(directory_has_core(&library))
}

/// Whether `directory` contains a `libcore-*.rlib`.
fn directory_has_core(directory: &Path) -> bool {
    let Ok(entries) = directory.read_dir() else {
        return false;
    };
    entries.filter_map(Result::ok).any(|entry| {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        name.starts_with("libcore-") && name.ends_with(".rlib")
    })
}

fn debian_paths() -> [PathBuf; 5] {
    [DEBIAN_CARGO, DEBIAN_RUSTC, DEBIAN_LINKER, DEBIAN_CORE_SOURCES, DEBIAN_CLIPPY].map(PathBuf::from)
}

fn debian_paths_text() -> String {
    debian_paths()
        .map(|path| path.display().to_string())
        .join(", ")
}

/// Whether every file of Debian's toolchain that the build needs is there.
fn debian_toolchain_present() -> bool {
    debian_paths().iter().all(|path| path.exists())
}

/// Root on a machine with `apt-get`.
fn can_install_debian_toolchain() -> bool {
    let is_root = process::output(Command::new("id").arg("-u")).is_ok_and(|uid| uid.trim() == "0");
    is_root && process::succeeds(Command::new("apt-get").arg("--version"))
}

fn install_debian_toolchain() -> Result<()> {
    eprintln!("xtask: no RISC-V toolchain found; installing Debian's: {}", DEBIAN_PACKAGES.join(" "));
    let apt_get = || {
        let mut command = Command::new("apt-get");
        command.env("DEBIAN_FRONTEND", "noninteractive");
        command
    };
    process::run(apt_get().args(["update", "-qq"]))?;
    process::run(
        apt_get()
            .args(["install", "-y", "-qq"])
            .args(DEBIAN_PACKAGES),
    )
}

fn missing_toolchain_help(target: &str) -> String {
    format!(
        "no toolchain can build for {target}. Either `rustup target add {target}` \
         (needs internet), or on Debian 12 as root: `apt-get install {}` (then \
         {} must exist)",
        DEBIAN_PACKAGES.join(" "),
        debian_paths_text()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linker_variable_follows_cargo_naming() {
        assert_eq!(linker_variable(ESP32C3_TARGET), "CARGO_TARGET_RISCV32IMC_UNKNOWN_NONE_ELF_LINKER");
    }

    #[test]
    fn debian_build_adds_build_std_and_drops_rustup_variables() {
        let command = RiscvToolchain::Debian.cargo_build(ESP32C6_TARGET, &["core", "alloc"]);
        let line = process::display(&command);
        assert!(line.contains("RUSTC=/usr/bin/rustc"), "{line}");
        assert!(
            line.ends_with(
                "/usr/bin/cargo build --locked --target riscv32imac-unknown-none-elf -Zbuild-std=core,alloc"
            ),
            "{line}"
        );
        let removed: Vec<_> = command
            .get_envs()
            .filter(|(_, value)| value.is_none())
            .map(|(key, _)| key)
            .collect();
        assert!(removed.contains(&"RUSTUP_TOOLCHAIN".as_ref()));
    }

    #[test]
    fn missing_toolchain_help_names_both_ways_out() {
        let help = missing_toolchain_help(ESP32C3_TARGET);
        assert!(help.contains("rustup target add riscv32imc-unknown-none-elf"), "{help}");
        assert!(
            help.contains(
                "apt-get install rustc-web cargo-web rust-web-src rust-web-llvm lld-22 rust-web-clippy"
            ),
            "{help}"
        );
    }

    #[test]
    fn prebuilt_core_is_found_by_file_name() {
        let directory = tempfile::tempdir().unwrap();
        assert!(!directory_has_core(directory.path()));
        std::fs::write(directory.path().join("libcore-0123abcd.rlib"), b"").unwrap();
        assert!(directory_has_core(directory.path()));
        assert!(!directory_has_core(&directory.path().join("missing")));
    }
}
