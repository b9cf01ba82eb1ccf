//! The sdk's dependency boundary: `wildcam-sdk` is `no_std` and allocation-free,
//! so nothing in its normal dependency tree for the chips may need `std` or an
//! allocator. Proc-macros and build scripts run on the host and are not checked.
//!
//! The RISC-V build (`-Zbuild-std=core`) would fail on most violations too, but
//! with an error deep inside some crate; this check names the crate and says how
//! to find who pulls it in.

use std::fmt;
use std::path::Path;

use anyhow::{Result, bail};

use crate::process;
use crate::toolchain::host_cargo;

/// Crates that need an operating system or only belong in tests, with the reason.
pub const FORBIDDEN_CRATES: &[(&str, &str)] = &[
    ("tokio", "async runtime, needs std"),
    ("async-std", "async runtime, needs std"),
    ("mio", "OS event loop"),
    ("socket2", "OS sockets"),
    ("libc", "C library bindings"),
    ("getrandom", "OS randomness; the firmware passes random bytes in"),
    ("tempfile", "file system"),
    ("rayon", "threads"),
    ("proptest", "test-only"),
    ("proptest-state-machine", "test-only"),
];

/// Features that turn on `std` or an allocator in a dependency.
pub const FORBIDDEN_FEATURES: &[&str] = &["std", "use-std", "alloc"];

/// Feature sets of the sdk to check: default, and with `defmt` as the firmware uses.
const SDK_FEATURE_SETS: &[&[&str]] = &[&[], &["defmt"]];

/// One dependency that crosses the boundary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// A crate from [`FORBIDDEN_CRATES`] is in the tree.
    Crate { name: String, reason: &'static str },
    /// A crate has a feature from [`FORBIDDEN_FEATURES`] enabled.
    Feature { name: String, feature: String },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Crate { name, reason } => write!(f, "crate `{name}` ({reason})"),
            Self::Feature { name, feature } => write!(f, "feature `{feature}` of crate `{name}`"),
        }
    }
}

/// The sdk's package name.
const SDK: &str = "wildcam-sdk";

/// Checks the sdk's dependency tree for `target`, for each feature set, in the
/// workspace at `root`.
pub fn check(root: &Path, target: &str) -> Result<()> {
    for features in SDK_FEATURE_SETS {
        let tree = dependency_tree(root, SDK, Some(target), features)?;
        let violations = violations(&tree);
        if !violations.is_empty() {
            bail!("{}", report(target, features, &violations));
        }
    }
    Ok(())
}

/// `cargo tree` of `package`'s normal dependencies (for `target`, else the host)
/// with their enabled features, one node per line without indentation.
fn dependency_tree(root: &Path, package: &str, target: Option<&str>, features: &[&str]) -> Result<String> {
    let mut command = host_cargo();
    command
        .current_dir(root)
        .args(["tree", "--locked", "-p", package, "--prefix", "none"]);
    command.args(["-e", "normal,features,no-proc-macro"]);
    if let Some(target) = target {
        command.args(["--target", target]);
    }
    if !features.is_empty() {
        command.args(["--features", &features.join(",")]);
    }
    process::output(&mut command)
}

/// Every violation in `tree` (the output of [`dependency_tree`]), each reported once.
fn violations(tree: &str) -> Vec<Violation> {
    let mut found = Vec::new();
    for line in tree.lines() {
        if let Some(violation) = line_violation(line)
            && !found.contains(&violation)
        {
            found.push(violation);
        }
    }
    found
}

/// Reads one node: `name vX.Y.Z ...` (a crate) or `name feature "f"` (a feature).
fn line_violation(line: &str) -> Option<Violation> {
    let mut words = line.split_whitespace();
    let name = words.next()?;
    if words.next() == Some("feature") {
        let feature = words.next()?.trim_matches('"');
        return FORBIDDEN_FEATURES
            .contains(&feature)
            .then(|| Violation::Feature { name: name.to_owned(), feature: feature.to_owned() });
    }
    let (_, reason) = FORBIDDEN_CRATES
        .iter()
        .find(|(forbidden, _)| *forbidden == name)?;
    Some(Violation::Crate { name: name.to_owned(), reason })
}

fn report(target: &str, features: &[&str], violations: &[Violation]) -> String {
    let feature_flag =
        if features.is_empty() { String::new() } else { format!(" --features {}", features.join(",")) };
    let mut text = format!(
        "wildcam-sdk must stay no_std and allocation-free, but its dependencies for {target}{feature_flag} include:"
    );
    for violation in violations {
        text.push_str(&format!("\n  - {violation}"));
    }
    text.push_str(&format!(
        "\nSee who pulls one in: cargo tree -p wildcam-sdk -e normal,features --target {target}{feature_flag} -i <crate>"
    ));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLEAN: &str = "wildcam-sdk v0.1.0 (/repo/sdk)\nserde feature \"derive\"\nserde v1.0.229\n\
                         heapless feature \"serde\" (*)\nzeroize v1.9.2\n";

    #[test]
    fn clean_tree_passes() {
        assert_eq!(violations(CLEAN), []);
    }

    #[test]
    fn forbidden_crates_and_features_are_reported_once() {
        let tree = format!(
            "{CLEAN}tokio v1.48.0\nrand feature \"std\"\nrand feature \"std\" (*)\ntokio v1.48.0 (*)\n"
        );
        assert_eq!(
            violations(&tree),
            [
                Violation::Crate { name: "tokio".into(), reason: "async runtime, needs std" },
                Violation::Feature { name: "rand".into(), feature: "std".into() },
            ]
        );
    }

    #[test]
    fn similar_names_are_not_confused() {
        assert_eq!(violations("libcrux v0.1.0\nserde feature \"stdx\"\nlibc-print v0.1.0\n"), []);
    }

    #[test]
    fn real_cargo_tree_output_is_read() {
        // xtask itself is a std program: its tree shows what a violation looks like.
        let tree = dependency_tree(&crate::repository_root(), "xtask", None, &[]).unwrap();
        let found = violations(&tree);
        assert!(
            found.contains(&Violation::Feature { name: "anyhow".into(), feature: "std".into() }),
            "{found:?}"
        );
        assert!(
            found
                .iter()
                .any(|v| matches!(v, Violation::Crate { name, .. } if name == "getrandom")),
            "{found:?}"
        );
    }

    #[test]
    fn report_says_how_to_investigate() {
        let violation = Violation::Feature { name: "serde".into(), feature: "std".into() };
        let text = report("riscv32imc-unknown-none-elf", &["defmt"], &[violation]);
        assert!(text.contains("feature `std` of crate `serde`"), "{text}");
        assert!(text.contains("--features defmt -i <crate>"), "{text}");
    }
}
