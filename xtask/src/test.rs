//! `cargo xtask test`: the one command that installs what is missing,
//! builds, lints and runs every test (unit and real kernel + real Envoy).

use anyhow::Result;

use crate::{
    setup,
    util::{cargo, run},
};

/// Options of the test command.
#[derive(clap::Args, Debug)]
pub struct TestArgs {
    /// Skip `cargo fmt --check` and clippy (quicker local iterations).
    #[arg(long)]
    pub no_lint: bool,
    /// Extra arguments for the test binaries (e.g. a test name filter).
    #[arg(last = true)]
    pub test_args: Vec<String>,
}

/// Runs setup, the build, the lints and the tests.
pub fn test(args: &TestArgs) -> Result<()> {
    setup::setup()?;
    if !args.no_lint {
        run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    }
    // The tests start the binaries, so build them all first.
    run(cargo().args(["build", "--workspace"]))?;
    if !args.no_lint {
        run(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    // The container test runs the image: build it from this tree (release
    // binaries, as shipped; the base is made once and cached).
    crate::image::image(&crate::image::ImageArgs {
        debug: false,
        tag: crate::image::IMAGE.to_owned(),
        no_build: false,
        refresh_base: false,
    })?;
    run(cargo()
        .args(["test", "--workspace", "--no-fail-fast", "--"])
        .args(&args.test_args))?;
    // The Kubernetes manifests, offline: a pinned schema checker from PyPI,
    // the deployment's own rules, and the ConfigMap's configuration
    // through the gateway just built.
    run(
        std::process::Command::new("bash").arg(crate::util::repo_root().join("deploy/validate.sh"))
    )?;
    if args.test_args.is_empty() {
        // A smoke run of every fuzz target: the targets still build, and
        // a shallow crash is caught.
        crate::fuzz::fuzz(&crate::fuzz::FuzzArgs {
            seconds: FUZZ_SMOKE_SECONDS,
            target: None,
        })?;
        // A smoke run of the benchmark: every comparison still runs end to
        // end (its figures mean nothing at this size).
        crate::bench::bench(&crate::bench::BenchArgs {
            suites: crate::bench::Suite::ALL.to_vec(),
            rounds: 1,
            seconds: 1.0,
            ops: 200,
            smoke: true,
            out: Some(crate::util::repo_root().join("target/bench-smoke")),
        })?;
    }
    Ok(())
}

/// Seconds each fuzz target runs in the test command.
const FUZZ_SMOKE_SECONDS: u32 = 20;
