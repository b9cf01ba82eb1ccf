//! Running external commands, with errors that name the command line so it can be
//! copied and run by hand.

use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Renders `command` as a shell-like line: variables it sets, program, arguments.
pub fn display(command: &Command) -> String {
    let mut words: Vec<String> = command
        .get_envs()
        .filter_map(|(key, value)| Some(format!("{}={}", key.to_string_lossy(), value?.to_string_lossy())))
        .collect();
    words.push(command.get_program().to_string_lossy().into_owned());
    words.extend(
        command
            .get_args()
            .map(|argument| argument.to_string_lossy().into_owned()),
    );
    if let Some(directory) = command.get_current_dir() {
        words.push(format!("(in {})", directory.display()));
    }
    words.join(" ")
}

/// Runs `command` with the terminal's stdin, stdout and stderr; fails if it cannot
/// start or exits unsuccessfully.
pub fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("could not start `{}`", display(command)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(command));
    }
    Ok(())
}

/// Runs `command` and returns its stdout as text; stderr goes to the terminal.
pub fn output(command: &mut Command) -> Result<String> {
    let result = command
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("could not start `{}`", display(command)))?;
    if !result.status.success() {
        bail!("`{}` failed ({})", display(command), result.status);
    }
    String::from_utf8(result.stdout).with_context(|| format!("`{}` printed non-UTF-8 text", display(command)))
}

/// Whether `command` starts and exits successfully; its output is discarded. For
/// probing which tools are installed.
pub fn succeeds(command: &mut Command) -> bool {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_shows_variables_program_and_arguments() {
        let mut command = Command::new("cargo");
        command
            .args(["build", "--locked"])
            .env("RUSTC_BOOTSTRAP", "1")
            .env_remove("RUSTUP_TOOLCHAIN");
        assert_eq!(display(&command), "RUSTC_BOOTSTRAP=1 cargo build --locked");
    }

    #[test]
    fn failures_name_the_command() {
        let error = run(&mut Command::new("false")).unwrap_err();
        assert!(error.to_string().starts_with("`false` failed"), "{error}");
        assert!(succeeds(&mut Command::new("true")));
        assert!(!succeeds(&mut Command::new("/nonexistent/program")));
    }
}
