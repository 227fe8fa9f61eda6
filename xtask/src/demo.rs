//! `cargo xtask demo`: the seed's manual test, without iptables, on the
//! built-in configuration. Inside a private network namespace it starts two
//! HTTP CONNECT upstreams, a stub fallback resolver and `gateway run`, then
//! runs the seed's commands unmodified in the gated cgroup and shows what
//! each upstream received.

use std::process::Output;

use anyhow::{bail, Context as _, Result};
use tests::scenario::{SeedScenario, FALLBACK, UPSTREAMS};

use crate::{
    setup,
    util::{cargo, run},
};

/// The seed's test steps, as run in the gated cgroup.
const STEPS: &[(&str, &[&str], &str)] = &[
    (
        "dig",
        &["+short", "one.s3.aws.com"],
        "allocates the first VIP",
    ),
    (
        "dig",
        &["+short", "two.s3.aws.com"],
        "allocates the next VIP",
    ),
    ("dig", &["+short", "example.com"], "exact match, next VIP"),
    (
        "dig",
        &["+short", "github.com"],
        "no pattern matches: answered by the fallback resolver",
    ),
    (
        "curl",
        &["-sS", "--max-time", "10", "http://s3.aws.com./"],
        "reaches cluster_1",
    ),
    (
        "curl",
        &["-sS", "--max-time", "10", "http://example.com./"],
        "reaches cluster_2",
    ),
];

fn show(output: &Output) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    for line in stdout.lines().chain(stderr.lines()) {
        println!("    {line}");
    }
}

/// Runs the demo; everything it starts is stopped before it returns.
pub fn demo() -> Result<()> {
    setup::setup()?;
    run(cargo().args([
        "build",
        "--quiet",
        "-p",
        "gateway-user",
        "-p",
        "envoy-module",
    ]))?;
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo loads eBPF programs: run it as root (sudo -E cargo xtask demo)");
    }
    tests::enter_private_netns().context("entering a private network namespace")?;
    println!("== private network namespace (only lo); starting:");
    println!(
        "   upstream cluster_1 on 127.0.0.1:18001, cluster_2 on 127.0.0.1:18002 (HTTP CONNECT)"
    );
    println!("   stub fallback resolver on {FALLBACK} (knows github.com)");
    println!(
        "   gateway run --fallback {FALLBACK}   (built-in configuration: `gateway default-config`)"
    );
    let mut scenario = SeedScenario::start(None)?;
    println!(
        "== gateway ready: cgroup {} gated, maps pinned in {}",
        scenario.cgroup().display(),
        scenario.pin_dir().display()
    );
    for (program, args, what) in STEPS {
        println!(
            "\n$ gateway exec -- {program} {}      # {what}",
            args.join(" ")
        );
        show(&scenario.exec(program, args)?);
    }
    println!("\n== what the upstreams received");
    for (cluster, port) in UPSTREAMS {
        let requests = scenario.upstream_requests(cluster)?;
        println!(
            "{cluster} (127.0.0.1:{port}): {} CONNECT request(s)",
            requests.len()
        );
        for r in requests {
            println!(
                "    CONNECT {}  X-Auth-Token: {}",
                r["connect"].as_str().unwrap_or("?"),
                r["headers"]["x-auth-token"].as_str().unwrap_or("(none)")
            );
        }
    }
    println!("\n$ gateway status");
    let status = std::process::Command::new(tests::gateway_bin())
        .args(["status", "--pin-dir"])
        .arg(scenario.pin_dir())
        .output()?;
    show(&status);
    let (exit, _) = scenario.stop()?;
    println!("\n== gateway run stopped ({exit}); programs detached, cgroup removed; pins reset by the demo");
    Ok(())
}
