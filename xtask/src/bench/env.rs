//! The benchmark's private network namespace: routes, limits, servers, the
//! DNAT rules of the firewall modes, client processes and Envoy.

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;
use tests::{Guarded, TestCgroup};

use super::{net, Plan};
use crate::util::{repo_root, run};

/// The echo server every TCP mode ends at.
pub const ECHO: &str = "127.0.0.1:15001";
/// The UDP responder every UDP mode ends at (and the DNS relay target).
pub const UDP: &str = "127.0.0.1:15053";
/// The range the capture modes treat as VIPs.
pub const VIP_CIDR: &str = "10.10.0.0/24";
/// A VIP the capture clients dial.
pub const VIP_TARGET: &str = "10.10.0.7:443";
/// A DNS server outside the namespace the UDP capture clients "ask".
pub const DNS_TARGET: &str = "203.0.113.53:53";

/// A packet-rewriting mode of the kernel's firewall.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firewall {
    /// `iptables -t nat` DNAT (the seed's mechanism).
    Iptables,
    /// An nftables nat chain with the same DNAT.
    Nftables,
}

/// The entered namespace and what runs in it.
pub struct Env {
    /// Debug or release binaries.
    pub profile: &'static str,
    /// Whether `nft` is there for the nftables mode.
    pub has_nft: bool,
    /// The echo server processes.
    _servers: Vec<Held>,
}

/// Connections one process may hold (its descriptor limit, less a margin).
pub fn fd_budget() -> usize {
    let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .unwrap_or((1024, 1024));
    (soft as usize).saturating_sub(500).max(100)
}

impl Env {
    /// Enters a private network namespace and prepares it.
    pub fn enter(plan: &Plan) -> Result<Self> {
        std::env::set_var(
            "GATEWAY_BIN",
            repo_root()
                .join("target")
                .join(plan.profile)
                .join("gateway"),
        );
        tests::enter_private_netns()?;
        // Many held connections: descriptors for both ends, ports for the
        // client side, and quick reuse of closed connections' ports.
        // (Raising the hard limit needs CAP_SYS_RESOURCE, which a container
        // may lack: connections are spread over processes instead.)
        let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)
            .context("raising the descriptor limit")?;
        for (key, value) in [
            ("net.ipv4.ip_local_port_range", "1024 65000"),
            ("net.ipv4.tcp_tw_reuse", "1"),
            ("net.ipv4.conf.all.route_localnet", "1"),
            ("net.ipv4.conf.lo.route_localnet", "1"),
            ("net.core.somaxconn", "65535"),
            ("net.ipv4.tcp_max_syn_backlog", "65535"),
        ] {
            run(Command::new("sysctl")
                .arg("-qw")
                .arg(format!("{key}={value}")))?;
        }
        // Routes so that the firewall modes can route before their DNAT.
        for net in ["10.10.0.0/24", "10.20.0.0/24", "203.0.113.0/24"] {
            run(Command::new("ip").args(["route", "add", net, "dev", "lo", "src", "127.0.0.1"]))?;
        }
        let per_process = fd_budget();
        let needed = plan.scales.iter().copied().max().unwrap_or(0) + 1000;
        let processes = needed.div_ceil(per_process).max(2);
        let mut servers = Vec::new();
        for _ in 0..processes {
            servers.push(Held::start(
                None,
                &["serve".to_owned(), "--addr".to_owned(), ECHO.to_owned()],
            )?);
        }
        net::start_udp_responder(UDP.parse()?)?;
        Ok(Self {
            profile: plan.profile,
            has_nft: tests::which("nft").is_some(),
            _servers: servers,
        })
    }

    /// The directory of the module `.so` Envoy loads.
    pub fn module_dir(&self) -> PathBuf {
        repo_root().join("target").join(self.profile)
    }
}

/// DNAT rules for `tcp` (destination range → target) and optionally UDP
/// port 53 → `udp`, added by `new` and removed on drop.
pub struct Dnat {
    firewall: Firewall,
    rules: Vec<Vec<String>>,
}

impl Dnat {
    /// Adds the rules.
    pub fn new(firewall: Firewall, tcp: (&str, &str), udp: Option<&str>) -> Result<Self> {
        let mut rules = vec![vec![
            "-p".into(),
            "tcp".into(),
            "-d".into(),
            tcp.0.into(),
            "-j".into(),
            "DNAT".into(),
            "--to-destination".into(),
            tcp.1.into(),
        ]];
        if let Some(udp) = udp {
            rules.push(vec![
                "-p".into(),
                "udp".into(),
                "--dport".into(),
                "53".into(),
                "-j".into(),
                "DNAT".into(),
                "--to-destination".into(),
                udp.into(),
            ]);
        }
        let mut added = Self {
            firewall,
            rules: Vec::new(),
        };
        match firewall {
            Firewall::Iptables => {
                for rule in rules {
                    run(Command::new("iptables")
                        .args(["-t", "nat", "-A", "OUTPUT"])
                        .args(&rule))?;
                    // Recorded as soon as it is in, so that a later failure
                    // still removes it (on drop).
                    added.rules.push(rule);
                }
            }
            Firewall::Nftables => {
                let mut script = String::from(
                    "table ip gwbench {\n chain out {\n  type nat hook output priority -100;\n",
                );
                script.push_str(&format!(
                    "  ip daddr {} tcp dport 0-65535 dnat to {}\n",
                    tcp.0, tcp.1
                ));
                if let Some(udp) = udp {
                    script.push_str(&format!("  udp dport 53 dnat to {udp}\n"));
                }
                script.push_str(" }\n}\n");
                let path = std::env::temp_dir().join(tests::unique_name("gwbench-nft"));
                std::fs::write(&path, script)?;
                let applied = run(Command::new("nft").arg("-f").arg(&path));
                let _ = std::fs::remove_file(&path);
                applied?;
            }
        }
        Ok(added)
    }
}

impl Drop for Dnat {
    fn drop(&mut self) {
        match self.firewall {
            Firewall::Iptables => {
                for rule in &self.rules {
                    let _ = Command::new("iptables")
                        .args(["-t", "nat", "-D", "OUTPUT"])
                        .args(rule)
                        .status();
                }
                // An empty nat table still hooks every packet and keeps
                // connection tracking on for the other modes: remove it
                // (iptables-nft; a legacy backend keeps it).
                let _ = Command::new("nft")
                    .args(["delete", "table", "ip", "nat"])
                    .stderr(Stdio::null())
                    .status();
            }
            Firewall::Nftables => {
                let _ = Command::new("nft")
                    .args(["delete", "table", "ip", "gwbench"])
                    .status();
            }
        }
    }
}

/// This executable's path. When cargo rebuilt the binary while it runs
/// (`cargo xtask test` builds the workspace, xtask included, before its
/// benchmark smoke run), Linux names the running file "<path> (deleted)";
/// the rebuilt binary at the same path serves as well.
fn this_executable() -> Result<String> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let exe = exe.to_string_lossy().into_owned();
    Ok(match exe.strip_suffix(" (deleted)") {
        Some(rebuilt) if Path::new(rebuilt).exists() => rebuilt.to_owned(),
        _ => exe,
    })
}

/// The `bench-client` command line of this executable.
fn client_command(cgroup: Option<&TestCgroup>, args: &[String]) -> Result<Command> {
    let exe = this_executable()?;
    let mut all = vec!["bench-client".to_owned()];
    all.extend(args.iter().cloned());
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    Ok(match cgroup {
        Some(cg) => cg.command(&exe, &refs),
        None => {
            let mut cmd = Command::new(exe);
            cmd.args(&refs);
            cmd
        }
    })
}

/// Runs a client workload to completion and returns its stdout.
pub fn client(cgroup: Option<&TestCgroup>, args: &[String]) -> Result<String> {
    let out = client_command(cgroup, args)?
        .output()
        .context("running the bench client")?;
    if !out.status.success() {
        bail!(
            "bench client {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a client workload that prints one JSON object.
pub fn client_json(cgroup: Option<&TestCgroup>, args: &[String]) -> Result<Value> {
    let text = client(cgroup, args)?;
    serde_json::from_str(text.trim()).with_context(|| format!("bench client output {text:?}"))
}

/// Per-operation latencies (ns) of the `latency` workload.
pub fn latencies(
    cgroup: Option<&TestCgroup>,
    proto: &str,
    target: &str,
    ops: u32,
) -> Result<Vec<f64>> {
    let args: Vec<String> = ["latency", "--proto", proto, "--target", target, "--ops"]
        .iter()
        .map(|s| (*s).to_owned())
        .chain([ops.to_string()])
        .collect();
    client(cgroup, &args)?
        .lines()
        .map(|l| l.trim().parse::<f64>().context("latency output"))
        .collect()
}

/// A client process that runs until dropped (holding connections, or
/// serving).
pub struct Held {
    child: Child,
}

/// Connections held through `target` by as many processes as the
/// descriptor limit needs.
pub struct HeldMany(#[allow(dead_code)] Vec<Held>);

impl HeldMany {
    /// Opens `count` connections to `target` (from `cgroup` if given).
    pub fn open(cgroup: Option<&TestCgroup>, target: &str, count: usize) -> Result<Self> {
        let budget = fd_budget();
        let mut held = Vec::new();
        let mut left = count;
        let mut first_source = 10usize;
        while left > 0 {
            let n = left.min(budget);
            held.push(Held::start(
                cgroup,
                &[
                    "hold".to_owned(),
                    "--target".to_owned(),
                    target.to_owned(),
                    "--count".to_owned(),
                    n.to_string(),
                    "--first-source".to_owned(),
                    first_source.to_string(),
                ],
            )?);
            first_source += n.div_ceil(8000);
            left -= n;
        }
        Ok(Self(held))
    }
}

impl Held {
    /// Starts a `bench-client` workload that prints "ready" when set and
    /// runs until its stdin closes.
    pub fn start(cgroup: Option<&TestCgroup>, args: &[String]) -> Result<Self> {
        let mut child = client_command(cgroup, args)?
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the holding client")?;
        let stdout = child.stdout.take().context("holder stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if line.trim() != "ready" {
            let _ = child.kill();
            bail!("bench client {args:?} did not get ready");
        }
        Ok(Self { child })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// Kernel slab memory in bytes (`Slab` of /proc/meminfo).
pub fn slab_bytes() -> Result<u64> {
    meminfo_field("/proc/meminfo", "Slab:")
}

/// This process's resident memory in bytes.
pub fn rss_bytes(pid: Option<u32>) -> Result<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_owned(),
    };
    meminfo_field(&path, "VmRSS:")
}

fn meminfo_field(path: &str, field: &str) -> Result<u64> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {field} in {path}"))?;
    Ok(kib * 1024)
}

/// Entries in this namespace's connection tracking table (0 when the
/// module is not loaded).
pub fn conntrack_count() -> u64 {
    std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// An Envoy for the benchmark: one worker, warnings only, the module of
/// this profile.
pub struct BenchEnvoy {
    _process: Guarded,
    admin: u16,
    _config: PathBuf,
}

impl BenchEnvoy {
    /// Starts Envoy on `bootstrap` and waits until its workers run.
    pub fn start(env: &Env, bootstrap: &Value, admin: u16) -> Result<Self> {
        let config = std::env::temp_dir().join(format!("{}.json", tests::unique_name("gwbench")));
        std::fs::write(&config, serde_json::to_vec_pretty(bootstrap)?)?;
        let mut cmd = Command::new(crate::util::envoy_bin());
        cmd.env("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", env.module_dir())
            .arg("-c")
            .arg(&config)
            .args(["--concurrency", "1", "-l", "warning", "--base-id"])
            .arg(tests::envoy::unique_base_id().to_string());
        let mut process = Guarded::spawn("envoy", cmd)?;
        tests::wait_for("Envoy to be ready", Duration::from_secs(20), || {
            if !process.is_running() {
                bail!("Envoy exited:\n{}", process.output());
            }
            let Ok(stats) = tests::envoy::admin_get(admin, "/stats?filter=workers_started") else {
                return Ok(None);
            };
            Ok(stats
                .contains("listener_manager.workers_started: 1")
                .then_some(()))
        })?;
        Ok(Self {
            _process: process,
            admin,
            _config: config,
        })
    }

    /// A counter or gauge of `/stats`.
    pub fn stat(&self, name: &str) -> Option<u64> {
        tests::envoy::stat_in(&tests::envoy::admin_get(self.admin, "/stats").ok()?, name)
    }
}

/// A free TCP/UDP port on loopback.
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// A `STATIC` cluster of one address.
pub fn static_cluster(name: &str, addr: &str) -> Value {
    let addr: SocketAddr = addr.parse().unwrap_or_else(|_| ([127, 0, 0, 1], 1).into());
    serde_json::json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": addr.ip().to_string(), "port_value": addr.port()}}}}]}]},
    })
}

/// The module's filter config as Envoy's `typed_config` of a dynamic
/// module filter.
pub fn module_filter(kind: &str, name: &str, config: &Value) -> Value {
    serde_json::json!({
        "@type": format!("type.googleapis.com/envoy.extensions.filters.{kind}.dynamic_modules.v3.DynamicModule{}",
            if kind == "network" { "NetworkFilter" } else { "UdpListenerFilter" }),
        "dynamic_module_config": {"name": gateway_common::contract::MODULE_NAME, "do_not_close": true},
        "filter_name": name,
        "filter_config": {"@type": "type.googleapis.com/google.protobuf.Struct", "value": config},
    })
}

/// A gated cgroup with a loader attached: VIP connects go to `tcp_to`.
pub struct Gate {
    /// The cgroup clients run in.
    pub cgroup: TestCgroup,
    /// The loader.
    pub loader: tests::Loader,
}

impl Gate {
    /// Attaches a loader for `vip_cidr` to a fresh cgroup.
    pub fn attach(vip_cidr: &str, dns_to: &str, tcp_to: &str) -> Result<Self> {
        let cgroup = TestCgroup::new()?;
        let loader = tests::Loader::attach(&cgroup, &[vip_cidr], dns_to.parse()?, tcp_to.parse()?)?;
        Ok(Self { cgroup, loader })
    }

    /// The loader's pin directory.
    pub fn pin_dir(&self) -> &Path {
        self.loader.pin_dir()
    }
}
