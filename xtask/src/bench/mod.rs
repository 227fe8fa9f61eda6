//! `cargo xtask bench`: what the capture costs, measured side by side in
//! one run and reported as ratios. Inside a private network namespace, a
//! client process repeats a TCP connect + 1-byte exchange, or a UDP query
//! + reply, against a local server, reached three ways:
//!
//! * `direct`   — the client dials the server's address itself (baseline);
//! * `ebpf`     — the client (in a gated cgroup) dials a VIP / a far DNS
//!   server and the gateway's cgroup programs redirect it;
//! * `iptables` — the client dials the same VIP / server and an iptables
//!   DNAT rule in the namespace redirects it (the seed's mechanism).
//!
//! Rounds alternate between the modes so that machine noise hits all of
//! them alike.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use tests::{Loader, TestCgroup};

use crate::{
    setup,
    util::{cargo, repo_root, run},
};

const TCP_SERVER: &str = "127.0.0.1:15001";
const UDP_SERVER: &str = "127.0.0.1:15053";
const VIP_TARGET: &str = "10.10.0.7:443";
const DNS_TARGET: &str = "203.0.113.53:53";

/// Options of the bench command.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Operations per round and mode.
    #[arg(long, default_value_t = 2000)]
    pub ops: u32,
    /// Rounds (each runs every mode once).
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
}

/// Options of the hidden client subcommand.
#[derive(clap::Args, Debug)]
pub struct ClientArgs {
    /// "tcp" or "udp".
    #[arg(long)]
    pub proto: String,
    /// Where to send.
    #[arg(long)]
    pub target: SocketAddr,
    /// How many operations.
    #[arg(long)]
    pub ops: u32,
}

/// The client loop, run as its own process (so it can be placed in a
/// cgroup); prints the nanoseconds of every operation, one per line.
pub fn client(args: &ClientArgs) -> Result<()> {
    let mut times = Vec::with_capacity(args.ops as usize);
    match args.proto.as_str() {
        "tcp" => {
            for _ in 0..args.ops {
                let start = Instant::now();
                let mut s = TcpStream::connect_timeout(&args.target, Duration::from_secs(2))
                    .with_context(|| format!("connecting to {}", args.target))?;
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                s.write_all(b"x")?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b)?;
                times.push(start.elapsed().as_nanos());
            }
        }
        "udp" => {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut b = [0u8; 64];
            for _ in 0..args.ops {
                let start = Instant::now();
                s.send_to(b"query", args.target)?;
                s.recv_from(&mut b).context("no UDP reply")?;
                times.push(start.elapsed().as_nanos());
            }
        }
        other => bail!("unknown protocol {other}"),
    }
    let lines: Vec<String> = times.iter().map(ToString::to_string).collect();
    println!("{}", lines.join("\n"));
    Ok(())
}

fn start_servers() -> Result<()> {
    let tcp = TcpListener::bind(TCP_SERVER)?;
    thread::spawn(move || {
        for conn in tcp.incoming().flatten() {
            let mut conn = conn;
            let mut b = [0u8; 1];
            if conn.read_exact(&mut b).is_ok() {
                let _ = conn.write_all(&b);
            }
        }
    });
    let udp = UdpSocket::bind(UDP_SERVER)?;
    thread::spawn(move || {
        let mut b = [0u8; 512];
        while let Ok((n, src)) = udp.recv_from(&mut b) {
            let _ = udp.send_to(&b[..n], src);
        }
    });
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args))
}

fn iptables(action: &str) -> Result<()> {
    for rule in [
        vec![
            "-p",
            "tcp",
            "-d",
            "10.10.0.0/24",
            "-j",
            "DNAT",
            "--to-destination",
            TCP_SERVER,
        ],
        vec![
            "-p",
            "udp",
            "--dport",
            "53",
            "-j",
            "DNAT",
            "--to-destination",
            UDP_SERVER,
        ],
    ] {
        run(Command::new("iptables")
            .args(["-t", "nat", action, "OUTPUT"])
            .args(rule))?;
    }
    Ok(())
}

/// Runs one client process and returns the nanoseconds of each operation.
fn measure(cgroup: Option<&TestCgroup>, proto: &str, target: &str, ops: u32) -> Result<Vec<f64>> {
    let xtask = std::env::current_exe()?;
    let xtask = xtask.to_string_lossy().into_owned();
    let ops_text = ops.to_string();
    let args = [
        "bench-client",
        "--proto",
        proto,
        "--target",
        target,
        "--ops",
        &ops_text,
    ];
    let out = match cgroup {
        Some(cg) => cg.run(&xtask, &args)?,
        None => Command::new(&xtask).args(args).output()?,
    };
    if !out.status.success() {
        bail!(
            "bench client ({proto} to {target}) failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().parse::<f64>().context("bench client output"))
        .collect()
}

/// The `q` quantile (0..1) of `values`, sorted in place.
fn quantile(values: &mut [f64], q: f64) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    let index = ((values.len() as f64 - 1.0) * q).round() as usize;
    values.get(index).copied().unwrap_or(f64::NAN)
}

/// Runs the benchmark and prints the table (also written as JSON under
/// target/bench/).
pub fn bench(args: &BenchArgs) -> Result<()> {
    setup::setup()?;
    run(cargo().args(["build", "--release", "-p", "gateway-user"]))?;
    if !nix::unistd::geteuid().is_root() {
        bail!("the benchmark loads eBPF programs: run it as root");
    }
    std::env::set_var("GATEWAY_BIN", repo_root().join("target/release/gateway"));
    tests::enter_private_netns()?;
    // Routes so that the iptables variant can route before its DNAT, and
    // route_localnet so that a DNAT to 127.0.0.1 is not dropped as
    // martian; all of it in this namespace only, which has nothing but lo.
    ip(&[
        "route",
        "add",
        "10.10.0.0/24",
        "dev",
        "lo",
        "src",
        "127.0.0.1",
    ])?;
    ip(&[
        "route",
        "add",
        "203.0.113.0/24",
        "dev",
        "lo",
        "src",
        "127.0.0.1",
    ])?;
    run(Command::new("sysctl").args([
        "-qw",
        "net.ipv4.conf.all.route_localnet=1",
        "net.ipv4.conf.lo.route_localnet=1",
    ]))?;
    start_servers()?;
    let cgroup = TestCgroup::new()?;
    let _loader = Loader::attach(
        &cgroup,
        &["10.10.0.0/24"],
        UDP_SERVER.parse()?,
        TCP_SERVER.parse()?,
    )?;

    let cases = [
        ("tcp", TCP_SERVER, VIP_TARGET),
        ("udp", UDP_SERVER, DNS_TARGET),
    ];
    let mut results = serde_json::Map::new();
    println!(
        "{:<5} {:<9} {:>10} {:>10} {:>12} {:>12}",
        "proto", "mode", "p50 µs", "p99 µs", "p50/direct", "p99/direct"
    );
    for (proto, server, far) in cases {
        let (mut direct, mut ebpf, mut nat) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..args.rounds {
            direct.extend(measure(None, proto, server, args.ops)?);
            ebpf.extend(measure(Some(&cgroup), proto, far, args.ops)?);
            iptables("-A")?;
            let r = measure(None, proto, far, args.ops);
            iptables("-D")?;
            nat.extend(r?);
        }
        let base = (quantile(&mut direct, 0.5), quantile(&mut direct, 0.99));
        let mut modes = serde_json::Map::new();
        for (mode, values) in [
            ("direct", &mut direct),
            ("ebpf", &mut ebpf),
            ("iptables", &mut nat),
        ] {
            let (p50, p99) = (quantile(values, 0.5), quantile(values, 0.99));
            println!(
                "{proto:<5} {mode:<9} {:>10.1} {:>10.1} {:>12.3} {:>12.3}",
                p50 / 1000.0,
                p99 / 1000.0,
                p50 / base.0,
                p99 / base.1
            );
            modes.insert(
                mode.to_owned(),
                serde_json::json!({
                    "p50_ns": p50, "p99_ns": p99,
                    "p50_over_direct": p50 / base.0, "p99_over_direct": p99 / base.1,
                    "operations": values.len(),
                }),
            );
        }
        results.insert(proto.to_owned(), serde_json::Value::Object(modes));
    }
    let dir = repo_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("capture.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results)?)?;
    println!(
        "(per-operation latency over {} rounds × {} operations per mode, modes interleaved; written to {})",
        args.rounds,
        args.ops,
        path.display()
    );
    Ok(())
}
