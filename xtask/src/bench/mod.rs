//! `cargo xtask bench`: the costs that matter, side by side in one run.
//!
//! Everything runs inside a private network namespace the command makes
//! itself, against its own servers (an epoll echo server and a UDP
//! responder, see [`net`]). Each comparison interleaves its modes round by
//! round (A, B, C, A, B, C, ...) so that drift of the machine hits every
//! mode alike, and reports medians and ratios to its first mode:
//!
//! * `capture` — short TCP connections and UDP query/reply: direct vs the
//!   eBPF redirect vs iptables DNAT (vs nftables DNAT when `nft` exists);
//! * `scale` — the same connect latency while 1,000 / 10,000 / 50,000
//!   other connections are held through each mode, and the kernel memory
//!   each mode holds per connection;
//! * `dns` — queries per second (dnsperf) and p50/p99 latency at half that
//!   rate for `dns_gateway`, Envoy's `dns_filter` with the same names in an
//!   inline table, a canned-reply ceiling, and unmatched names relayed to
//!   a fallback, all in one Envoy with one worker;
//! * `lookup` — connections per second through tcp_proxy with
//!   `cache_lookup` reading the shared map, the seed's setup (iptables
//!   DNAT, `original_dst`, lookup by local address), and bare tcp_proxy;
//! * `vips` — 65,536 allocations into the pinned VIP map, memory per entry
//!   (module and kernel), lookup cost at 100 vs 65,536 entries.
//!
//! Output: Markdown tables on stdout and in `<out>/results.md`, the raw
//! figures in `<out>/results.json`, a chart of the ratios in
//! `<out>/chart.png`.

mod capture;
mod dns;
mod env;
mod gate;
mod lookup;
pub mod net;
mod report;
mod scale;
mod vips;

use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use serde_json::json;

use crate::{
    setup,
    util::{cargo, output, repo_root, run},
};

/// One comparison of the benchmark.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Suite {
    /// Direct vs eBPF redirect vs iptables (and nftables) DNAT.
    Capture,
    /// Capture cost with many connections held.
    Scale,
    /// DNS answer path in Envoy.
    Dns,
    /// Per-connection lookup cost in Envoy.
    Lookup,
    /// VIP table size.
    Vips,
    /// Gating a new cgroup: gate table vs an attachment of its own.
    Gate,
}

impl Suite {
    /// Every comparison, in the order they run.
    pub const ALL: [Suite; 6] = [
        Suite::Capture,
        Suite::Scale,
        Suite::Dns,
        Suite::Lookup,
        Suite::Vips,
        Suite::Gate,
    ];
}

/// Options of the bench command.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Comparisons to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Suite::ALL)]
    pub suites: Vec<Suite>,
    /// Rounds; each runs every mode of a comparison once.
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
    /// Seconds per rate measurement (dnsperf, connections per second).
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Operations per latency measurement.
    #[arg(long, default_value_t = 2000)]
    pub ops: u32,
    /// A few seconds per comparison with small sizes and debug builds:
    /// checks that the benchmark works (CI), figures mean nothing.
    #[arg(long)]
    pub smoke: bool,
    /// Where the results go (default: target/bench).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Options of the hidden client subcommand.
#[derive(clap::Args, Debug)]
pub struct ClientArgs {
    /// What to run.
    #[command(subcommand)]
    pub workload: net::Workload,
}

/// Runs one client workload (a separate process, so that it can be put in
/// the gated cgroup).
pub fn client(args: &ClientArgs) -> Result<()> {
    net::run_workload(&args.workload)
}

/// Sizes of one run.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Rounds per comparison.
    pub rounds: u32,
    /// Seconds per rate measurement.
    pub seconds: f64,
    /// Operations per latency measurement.
    pub ops: u32,
    /// Held connections of the scale comparison.
    pub scales: Vec<usize>,
    /// Names allocated by the VIP table comparison.
    pub vip_names: u32,
    /// Whether binaries are the debug build (smoke) or release.
    pub profile: &'static str,
}

impl Plan {
    fn from_args(args: &BenchArgs) -> Self {
        if args.smoke {
            Self {
                rounds: 1,
                seconds: 1.0,
                ops: 200,
                scales: vec![1000],
                vip_names: 2000,
                profile: "debug",
            }
        } else {
            Self {
                rounds: args.rounds.max(1),
                seconds: args.seconds.max(0.5),
                ops: args.ops.max(10),
                scales: vec![1000, 10_000, 50_000],
                vip_names: 65_536,
                profile: "release",
            }
        }
    }
}

/// Runs the benchmark: tables on stdout, results under `out`.
pub fn bench(args: &BenchArgs) -> Result<()> {
    setup::setup()?;
    if !nix::unistd::geteuid().is_root() {
        bail!("the benchmark loads eBPF programs and makes a network namespace: run it as root");
    }
    let plan = Plan::from_args(args);
    let mut build = cargo();
    build.args(["build", "-p", "gateway-user", "-p", "envoy-module"]);
    if plan.profile == "release" {
        build.arg("--release");
    }
    run(&mut build)?;
    let out_dir = args
        .out
        .clone()
        .unwrap_or_else(|| repo_root().join("target/bench"));
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let env = env::Env::enter(&plan)?;
    let mut tables = Vec::new();
    for suite in &args.suites {
        eprintln!("bench: {suite:?} ...");
        let started = std::time::Instant::now();
        let mut produced = match suite {
            Suite::Capture => capture::run(&plan, &env)?,
            Suite::Scale => scale::run(&plan, &env)?,
            Suite::Dns => dns::run(&plan, &env)?,
            Suite::Lookup => lookup::run(&plan, &env)?,
            Suite::Vips => vips::run(&plan, &env)?,
            Suite::Gate => gate::run(&plan, &env)?,
        };
        eprintln!(
            "bench: {suite:?} took {:.1} s",
            started.elapsed().as_secs_f64()
        );
        for table in &produced {
            println!("{}", table.markdown());
        }
        tables.append(&mut produced);
    }
    let machine = machine();
    let markdown: String = tables.iter().map(|t| t.markdown() + "\n").collect();
    std::fs::write(out_dir.join("results.md"), &markdown)?;
    let results = json!({
        "machine": machine,
        "plan": {
            "rounds": plan.rounds, "seconds": plan.seconds, "ops": plan.ops,
            "scales": plan.scales, "vip_names": plan.vip_names, "profile": plan.profile,
            "smoke": args.smoke,
        },
        "tables": tables.iter().map(|t| (t.id.clone(), t.json())).collect::<serde_json::Map<_, _>>(),
    });
    std::fs::write(
        out_dir.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    report::chart(&tables, &out_dir.join("chart.png"))?;
    eprintln!(
        "bench: results in {} (results.md, results.json, chart.png)",
        out_dir.display()
    );
    Ok(())
}

/// The indices `0..n` starting at `round % n`: each round runs the modes
/// in another order, so that what one mode leaves behind (TIME_WAIT
/// sockets, conntrack entries, warm caches) does not always land on the
/// same neighbour.
pub fn rotated(n: usize, round: u32) -> impl Iterator<Item = usize> {
    let start = round as usize % n.max(1);
    (0..n).map(move |k| (start + k) % n.max(1))
}

/// What the figures were measured on.
fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_default();
    json!({
        "kernel": output(std::process::Command::new("uname").arg("-r")).unwrap_or_default().trim(),
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "iptables": output(std::process::Command::new("iptables").arg("-V")).unwrap_or_default().trim(),
        "envoy": output(std::process::Command::new(crate::util::envoy_bin()).arg("--version")).unwrap_or_default().trim(),
    })
}
