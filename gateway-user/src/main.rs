//! `gateway`: the privileged side of the DNS egress gateway.
#![forbid(unsafe_code)]

use std::{net::SocketAddrV4, path::PathBuf, process::ExitCode};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};
use gateway_common::DEFAULT_PIN_DIR;
use gateway_user::{
    addr::{parse_cidr, parse_group, parse_socket_addr, Cidr},
    config,
    config::DnsOutage,
    envoy_bootstrap, exec,
    loader::{self, AttachRequest},
    run::{self, RunOptions},
    status,
};

/// Transparent egress by domain name: eBPF cgroup programs send the DNS
/// queries and VIP connections of a cgroup's processes to a local Envoy,
/// which answers with virtual IPs and tunnels each connection to the
/// upstream its domain is configured for. No iptables, no NAT.
#[derive(Parser, Debug)]
#[command(
    name = "gateway",
    version,
    after_help = "Quick start (as root):\n  \
      gateway run                      # built-in configuration; see `gateway default-config`\n  \
      gateway exec -- curl http://bucket.aws.com/\n  \
      gateway status\n\n\
      `gateway run` needs Envoy 1.40 (`cargo xtask setup` installs it) and the module \
      libconnectivity_envoy_module.so next to this binary."
)]
struct Cli {
    /// Log filter (error, warn, info, debug, trace, or env_logger syntax).
    #[arg(long, global = true, env = "GATEWAY_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Load the eBPF programs, pin their maps and attach them to a cgroup;
    /// runs in the foreground and detaches on SIGINT/SIGTERM.
    ///
    /// Needs root, or CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON (and
    /// CAP_SYS_ADMIN if bpffs must be mounted).
    Attach {
        /// cgroup v2 directory the programs are attached to, e.g.
        /// /sys/fs/cgroup/myapp; gated itself unless --gate is given. The
        /// root cgroup is refused.
        #[arg(long)]
        cgroup: PathBuf,
        /// A cgroup to gate at or below --cgroup (repeatable; relative
        /// paths are below --cgroup). Without it --cgroup itself is gated.
        #[arg(long)]
        gate: Vec<PathBuf>,
        /// Envoy's own user (name or uid, not root): its sockets are never
        /// redirected, whatever cgroup it runs in.
        #[arg(long, value_parser = gateway_user::addr::parse_user)]
        envoy_user: Option<gateway_user::addr::RunAs>,
        /// Network of virtual IPs whose TCP connects go to --tcp-to
        /// (repeatable, up to 8), e.g. 10.10.0.0/24.
        #[arg(long = "vip-cidr", required = true, value_parser = parse_cidr)]
        vip_cidrs: Vec<Cidr>,
        /// Envoy's DNS listener: UDP to port 53 goes here.
        #[arg(long, value_parser = parse_socket_addr)]
        dns_to: SocketAddrV4,
        /// Envoy's TCP listener: connects to a VIP go here.
        #[arg(long, value_parser = parse_socket_addr)]
        tcp_to: SocketAddrV4,
        /// Envoy's DNS-over-TCP listener: TCP connects to port 53 go here
        /// (left alone without it).
        #[arg(long, value_parser = parse_socket_addr)]
        dns_tcp_to: Option<SocketAddrV4>,
        /// Envoy also listens on [::1] at the ports of --dns-to, --tcp-to and
        /// --dns-tcp-to: IPv6 DNS and connects to IPv6 VIPs go there
        /// (without it they are left alone; v4-mapped ones are always
        /// redirected).
        #[arg(long)]
        ipv6: bool,
        /// IPv6 VIP range, a /96 prefix such as fd00:6a7e:: (needs --ipv6):
        /// the prefix followed by an IPv4 VIP stands for the same domain.
        #[arg(long)]
        vip6_prefix: Option<std::net::Ipv6Addr>,
        /// Refuse (EPERM, counted) a connect to an address of a VIP range
        /// that no name holds, instead of sending it to Envoy. Needs Envoy's
        /// module to use this --pin-dir (it records the VIPs there).
        #[arg(long)]
        refuse_unknown_vips: bool,
        /// While no Envoy listener is bound at the DNS target: `pass` leaves
        /// DNS on its original path (names keep resolving; matched names
        /// get their real addresses meanwhile), `drop` refuses it (EPERM).
        #[arg(long, value_enum, default_value_t = DnsOutage::Pass)]
        dns_outage: DnsOutage,
        /// bpffs directory for the maps Envoy reads.
        #[arg(long, default_value = DEFAULT_PIN_DIR, value_parser = parse_pin_dir)]
        pin_dir: PathBuf,
        /// Allow attaching to the root cgroup (redirects the whole host).
        #[arg(long)]
        force_root_cgroup: bool,
        /// Group (name or gid) whose members may open the pinned maps, so
        /// Envoy can run without any capability as a member of it.
        #[arg(long, value_parser = parse_group)]
        maps_group: Option<u32>,
    },
    /// Show what is attached where, the kernel counters, the recorded
    /// original destinations and the VIP table.
    Status {
        /// bpffs directory the maps are pinned in.
        #[arg(long, default_value = DEFAULT_PIN_DIR, value_parser = parse_pin_dir)]
        pin_dir: PathBuf,
        /// Take the pin directory from this configuration instead.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// For health probes: exit 0 only when a live gateway has the
        /// programs attached and its Envoy (admin socket in --state-dir)
        /// is ready; print one line saying why not.
        #[arg(long, conflicts_with = "json")]
        check: bool,
        /// Parent of the state directory (for --check), as for `run`.
        #[arg(long, default_value = gateway_user::instance::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Run the whole gateway from one configuration file: attach the eBPF
    /// programs, start and supervise Envoy with the module, and stop both
    /// on SIGINT/SIGTERM. Without --config, the built-in default (the seed's
    /// example: *.aws.com → cluster_1, example.com → cluster_2).
    Run(RunOptions),
    /// Run an unmodified command inside the gated cgroup of a configuration.
    Exec {
        /// Gateway configuration (TOML); the built-in default when absent.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The cgroup to run in (relative: below the configuration's
        /// `cgroup`); default: the first gated one of the configuration.
        #[arg(long)]
        cgroup: Option<PathBuf>,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Print the Envoy bootstrap generated from a configuration, for
    /// running Envoy yourself next to `gateway attach`.
    EnvoyConfig {
        /// Gateway configuration (TOML); the built-in default when absent.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Resolver for unmatched names (repeatable), as for `run`.
        #[arg(long, value_parser = gateway_user::addr::parse_resolver_addr)]
        fallback: Vec<std::net::SocketAddr>,
        /// Parent of the state directory whose admin socket the bootstrap
        /// names, as for `run`.
        #[arg(long, default_value = gateway_user::instance::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Run Envoy for a `gateway run --external-envoy`: in Envoy's own
    /// container, as Envoy's user (no capability), wait for the bootstrap
    /// that gateway writes into the shared state directory, then become
    /// Envoy.
    EnvoyExec(gateway_user::run::EnvoyExecOptions),
    /// Apply a changed configuration file to the running `gateway run`
    /// (as SIGHUP does): domains, metadata, clusters, fallback resolvers
    /// and the gate list change without dropping connections or changing
    /// VIPs; anything else is refused with the fields named. Waits for the
    /// gateway's report and Envoy's confirmation.
    Reload {
        /// The configuration `gateway run` was started with (it reads its
        /// own file again; this one is checked first and names the pin
        /// directory).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Parent of the state directory, as for `run`.
        #[arg(long, default_value = gateway_user::instance::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Gate more cgroups at run time: their processes (and those below)
    /// are redirected from their next DNS query or connect on. No restart,
    /// no VIP changes; sibling cgroups stay untouched. Kept across
    /// restarts until `gateway ungate`.
    Gate(GateTarget),
    /// Stop gating cgroups (paths, or ids as `gateway status` lists them
    /// for cgroups that no longer exist). Their open connections go on;
    /// new ones are no longer redirected.
    Ungate(GateTarget),
    /// Kubernetes: gate exactly the pods of a PodList (the API's answer to
    /// GET /api/v1/pods?labelSelector=…&fieldSelector=spec.nodeName=…),
    /// found by uid under the kubelet's cgroups, and ungate the pods it
    /// gated before that are no longer listed. Anything but a PodList
    /// changes nothing. Run it in a loop next to the gateway.
    GatePods {
        /// The PodList JSON: a file, or `-` for standard input.
        #[arg(long)]
        pod_list: PathBuf,
        /// The kubelet's pod cgroups, at or below the gateway's attach
        /// cgroup, e.g. /sys/fs/cgroup/kubepods.slice (systemd driver) or
        /// /sys/fs/cgroup/kubepods (cgroupfs driver).
        #[arg(long)]
        kubepods_root: PathBuf,
        /// The gateway's configuration (for its pin directory).
        #[arg(long)]
        config: Option<PathBuf>,
        /// bpffs directory of the gateway's maps (instead of --config).
        #[arg(long, value_parser = parse_pin_dir, conflicts_with = "config")]
        pin_dir: Option<PathBuf>,
    },
    /// Print the built-in default configuration, a starting point for your own.
    DefaultConfig,
    /// Remove the pinned maps (including the VIP table) left after a
    /// gateway stopped. Refuses while a gateway still owns them.
    Reset {
        /// bpffs directory the maps are pinned in.
        #[arg(long, default_value = DEFAULT_PIN_DIR, value_parser = parse_pin_dir)]
        pin_dir: PathBuf,
    },
}

/// Writes a document to standard output; a reader that went away (`|
/// head`) ends the output quietly instead of failing.
fn emit(text: &str) -> Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("writing to standard output"),
    }
}

/// `gateway status --check`: the programs attached by a live gateway and
/// its Envoy ready, or an error saying which is missing.
fn health_check(pin_dir: &std::path::Path, state_dir: &std::path::Path) -> Result<()> {
    let status = status::read(pin_dir)?;
    let alive = status.loader.as_ref().is_some_and(|l| l.alive);
    if !status.attached || !alive {
        bail!(
            "not healthy: programs attached: {}, gateway running: {alive} (pin directory {})",
            status.attached,
            pin_dir.display()
        );
    }
    let admin = gateway_user::instance::Instance::new(state_dir, pin_dir).admin_socket();
    let ready = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(gateway_user::supervisor::admin_get(&admin, "/ready"));
    match ready {
        Ok(body) if body.lines().any(|l| l.trim() == "LIVE") => {
            println!("healthy: programs attached, Envoy ready");
            Ok(())
        }
        Ok(body) => bail!("not healthy: Envoy is not ready ({})", body.trim()),
        Err(e) => bail!("not healthy: Envoy does not answer: {e:#}"),
    }
}

/// The cgroups of `gateway gate` / `ungate` and whose gateway they go to.
#[derive(clap::Args, Debug)]
struct GateTarget {
    /// cgroup directories, at or below the gateway's attach cgroup
    /// (relative paths are taken below it).
    #[arg(required = true)]
    cgroups: Vec<String>,
    /// The gateway's configuration (for its pin directory); the built-in
    /// default when neither this nor --pin-dir is given.
    #[arg(long)]
    config: Option<PathBuf>,
    /// bpffs directory of the gateway's maps (instead of --config).
    #[arg(long, value_parser = parse_pin_dir, conflicts_with = "config")]
    pin_dir: Option<PathBuf>,
}

/// Adds cgroups to, or removes them from, the gate table of a running
/// (or stopped but still attached) gateway, and says how long it took.
fn gate_command(target: &GateTarget, gate: bool) -> Result<()> {
    let pin_dir = match &target.pin_dir {
        Some(dir) => dir.clone(),
        None => {
            gateway_user::config::load(target.config.as_deref())?
                .file
                .pin_dir
        }
    };
    let pins = gateway_common::pinned::PinDir::new(&pin_dir);
    let attach = gateway_user::gate::attach_cgroup(&pins)?;
    for arg in &target.cgroups {
        let started = std::time::Instant::now();
        if gate {
            let cgroup = gateway_user::gate::identify(&attach, std::path::Path::new(arg))?;
            pins.gated()?
                .gate(cgroup.id, cgroup.level, gateway_common::GateOrigin::Command)?;
            println!(
                "gated {} (cgroup id {}) in {} µs",
                cgroup.path.display(),
                cgroup.id,
                started.elapsed().as_micros()
            );
        } else {
            let id = gateway_user::gate::ungate_target(&attach, arg)?;
            if pins.gated()?.ungate(id)? {
                println!(
                    "ungated {arg} (cgroup id {id}) in {} µs",
                    started.elapsed().as_micros()
                );
            } else {
                println!("{arg} (cgroup id {id}) was not gated");
            }
        }
    }
    Ok(())
}

/// `--pin-dir`: the same rule as the configuration's `pin_dir`.
fn parse_pin_dir(text: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(text);
    gateway_common::contract::check_pin_dir(&path)?;
    Ok(path)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::new()
        .parse_filters(&cli.log)
        .format_timestamp_millis()
        .init();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("gateway: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Attach {
            cgroup,
            gate,
            envoy_user,
            vip_cidrs,
            dns_to,
            tcp_to,
            dns_tcp_to,
            ipv6,
            vip6_prefix,
            refuse_unknown_vips,
            dns_outage,
            pin_dir,
            force_root_cgroup,
            maps_group,
        } => {
            let request = AttachRequest {
                cgroup,
                gate: (!gate.is_empty()).then_some(gate),
                vip_cidrs,
                dns_to,
                tcp_to,
                dns_tcp_to,
                ipv6_listeners: ipv6,
                vip6_prefix,
                refuse_unknown_vips,
                dns_outage_drop: dns_outage == DnsOutage::Drop,
                pin_dir,
                allow_root_cgroup: force_root_cgroup,
                maps_group,
                exempt_uid: envoy_user.map(|u| u.uid),
            };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(attach_foreground(request))
        }
        Command::Status {
            pin_dir,
            config,
            json,
            check,
            state_dir,
        } => {
            let pin_dir = match config {
                Some(path) => gateway_user::config::load(Some(&path))?.file.pin_dir,
                None => pin_dir,
            };
            if check {
                return health_check(&pin_dir, &state_dir);
            }
            let status = status::read(&pin_dir)?;
            if json {
                emit(&(status::to_json(&status)? + "\n"))
            } else {
                emit(&status::render(&status))
            }
        }
        Command::Reset { pin_dir } => reset(&pin_dir),
        Command::Run(options) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the async runtime")?
            .block_on(run::run(options)),
        Command::Exec {
            config,
            cgroup,
            command,
        } => exec::exec(config.as_deref(), cgroup.as_deref(), &command),
        Command::EnvoyExec(options) => gateway_user::run::envoy_exec(&options),
        Command::Reload { config, state_dir } => {
            let config = gateway_user::config::load(config.as_deref())?;
            let instance = gateway_user::instance::Instance::new(&state_dir, &config.file.pin_dir);
            let result = gateway_user::reload::request(&config.file.pin_dir, &instance)?;
            if !result.ok {
                bail!("reload refused: {}", result.message);
            }
            if !result.confirmed {
                bail!(
                    "reload {} not confirmed: {}",
                    result.generation,
                    result.message
                );
            }
            println!("reload {}: {}", result.generation, result.message);
            Ok(())
        }
        Command::GatePods {
            pod_list,
            kubepods_root,
            config,
            pin_dir,
        } => {
            let pin_dir = match pin_dir {
                Some(dir) => dir,
                None => gateway_user::config::load(config.as_deref())?.file.pin_dir,
            };
            let text = if pod_list.as_os_str() == "-" {
                let mut text = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                    .context("reading the pod list from standard input")?;
                text
            } else {
                std::fs::read_to_string(&pod_list)
                    .with_context(|| format!("reading {}", pod_list.display()))?
            };
            let pods = gateway_user::gate::parse_pod_list(&text)?;
            let sync = gateway_user::gate::sync_pods(
                &gateway_common::pinned::PinDir::new(&pin_dir),
                &kubepods_root,
                &pods,
            )?;
            println!(
                "{} pods gated ({} new), {} ungated, not found yet: [{}]",
                sync.gated,
                sync.newly_gated,
                sync.ungated,
                sync.not_found.join(", ")
            );
            if !sync.failed.is_empty() {
                log::error!("pods not gated: [{}]", sync.failed.join("; "));
            }
            if !sync.own_network.is_empty() {
                log::warn!(
                    "pods with their own network namespace are gated but not served (the kernel \
                     redirects only in the gateway's namespace; counted as foreign_netns_passed): \
                     [{}]; give them hostNetwork: true",
                    sync.own_network.join(", ")
                );
            }
            if !sync.failed.is_empty() {
                bail!(
                    "{} pods could not be gated (see above); the others were",
                    sync.failed.len()
                );
            }
            Ok(())
        }
        Command::Gate(target) => gate_command(&target, true),
        Command::Ungate(target) => gate_command(&target, false),
        Command::EnvoyConfig {
            config,
            fallback,
            state_dir,
        } => {
            let config = run::effective_config(config.as_deref(), &fallback)?;
            let instance = gateway_user::instance::Instance::new(&state_dir, &config.file.pin_dir);
            emit(&(envoy_bootstrap::render(&config, &instance.admin_socket(), None)? + "\n"))
        }
        Command::DefaultConfig => emit(config::DEFAULT_CONFIG),
    }
}

async fn attach_foreground(request: AttachRequest) -> Result<()> {
    let shutdown = run::shutdown_signal()?;
    let mut attached = loader::attach(&request)?;
    let log_task = attached
        .ebpf_mut()
        .and_then(gateway_user::kernel_log::forward);
    let reaper = gateway_user::reaper::spawn(request.pin_dir.clone());
    log::info!(
        "attached to {}: DNS to {}, VIP connects ({}) to {}; maps pinned in {}; Ctrl-C or SIGTERM detaches",
        attached.cgroup().display(),
        request.dns_to,
        request
            .vip_cidrs
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        request.tcp_to,
        request.pin_dir.display()
    );
    shutdown.await;
    reaper.abort();
    if let Some(task) = log_task {
        task.abort();
    }
    attached.stop()
}

fn reset(pin_dir: &std::path::Path) -> Result<()> {
    let removed = loader::reset(pin_dir)?;
    if removed.is_empty() {
        println!("nothing to remove in {}", pin_dir.display());
    }
    for path in removed {
        println!("removed {}", path.display());
    }
    Ok(())
}
