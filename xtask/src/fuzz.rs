//! `cargo xtask fuzz`: builds the fuzz targets in `fuzz/` with cargo-fuzz
//! (pinned nightly, sanitizers; installs cargo-fuzz if missing) and runs
//! each for a bounded time. A crash fails the command and leaves its input
//! under `fuzz/artifacts/<target>/`, to be turned into a regression test.

use std::process::Command;

use anyhow::Result;

use crate::{
    setup::pinned_nightly,
    util::{output, repo_root, run},
};

/// The fuzz targets (files in `fuzz/fuzz_targets/`).
pub const TARGETS: [&str; 3] = ["dns_message", "dns_tcp_stream", "filter_configs"];

/// The version of cargo-fuzz installed when it is missing.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Options of the fuzz command.
#[derive(clap::Args, Debug)]
pub struct FuzzArgs {
    /// Seconds to run each target.
    #[arg(long, default_value_t = 60)]
    pub seconds: u32,
    /// Run only this target (default: all).
    #[arg(long)]
    pub target: Option<String>,
}

/// Installs cargo-fuzz if needed, then builds and runs the targets.
pub fn fuzz(args: &FuzzArgs) -> Result<()> {
    if output(Command::new("cargo").args(["fuzz", "--version"])).is_none() {
        run(Command::new("cargo").args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
        ]))?;
    }
    let nightly = format!("+{}", pinned_nightly()?);
    let targets: Vec<&str> = match &args.target {
        Some(t) => vec![t.as_str()],
        None => TARGETS.to_vec(),
    };
    for target in targets {
        run(Command::new("cargo")
            .current_dir(repo_root())
            .args([nightly.as_str(), "fuzz", "run", "-O", target, "--"])
            .arg(format!("-max_total_time={}", args.seconds))
            .arg("-print_final_stats=1"))?;
    }
    Ok(())
}
