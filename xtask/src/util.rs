//! Running commands with clear failures, and the repository's paths.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context as _, Result};

pub use tests::{repo_root, target_dir, tools_dir};

/// The Envoy binary `cargo xtask setup` installs.
pub fn envoy_bin() -> PathBuf {
    tools_dir().join("bin").join("envoy")
}

/// Prints and runs `cmd`, failing with its description if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {}", describe(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", describe(cmd)))?;
    if !status.success() {
        bail!("{} failed with {status}", describe(cmd));
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its stdout, or None if it fails to start
/// or exits non-zero.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A shell-like rendering of a command for logs.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A `cargo` command run from the repository root.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(repo_root());
    cmd
}
