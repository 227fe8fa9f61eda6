//! Developer and CI automation for the DNS egress gateway: `cargo xtask
//! <command>`. Every command installs what it needs first.
#![forbid(unsafe_code)]

mod bench;
mod demo;
mod fuzz;
mod image;
mod setup;
mod test;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "cargo xtask",
    about = "Set up, test, demo and benchmark the gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Install every prerequisite (Debian packages, nightly rust-src,
    /// bpf-linker for nightly's LLVM, Envoy 1.40 into .tools/); idempotent.
    Setup,
    /// The seed's scenario end to end on the built-in configuration, inside
    /// a private network namespace (root; installs what is missing).
    Demo,
    /// Measure side by side, as ratios: capture (eBPF redirect vs
    /// iptables/nftables DNAT vs direct), capture with many connections
    /// held, the DNS answer path and the per-connection lookup in Envoy,
    /// and the VIP table at scale (root; see docs/benchmarks.md).
    Bench(bench::BenchArgs),
    /// Internal: one benchmark client loop (run by `bench`).
    #[command(hide = true)]
    BenchClient(bench::ClientArgs),
    /// Run the fuzz targets (module DNS path, configuration parsers) for a
    /// bounded time each; installs cargo-fuzz if missing.
    Fuzz(fuzz::FuzzArgs),
    /// Set up, build, lint, and run all tests (needs root for the real
    /// kernel and Envoy tests; with CI=true nothing may be skipped).
    Test(test::TestArgs),
    /// Build the container image (deploy/container/Containerfile) with
    /// podman: release binaries, Envoy 1.40, on a Debian base made locally
    /// with mmdebstrap (no container registry needed; root).
    Image(image::ImageArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::setup(),
        Command::Demo => demo::demo(),
        Command::Bench(args) => bench::bench(&args),
        Command::BenchClient(args) => bench::client(&args),
        Command::Test(args) => test::test(&args),
        Command::Fuzz(args) => fuzz::fuzz(&args),
        Command::Image(args) => image::image(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
