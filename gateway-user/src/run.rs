//! `gateway run`: the whole gateway from one configuration file. Loads the
//! kernel programs and pins the maps, starts Envoy with the module on a
//! generated bootstrap, attaches the programs once Envoy is ready,
//! supervises Envoy, and on SIGINT/SIGTERM stops Envoy and detaches.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    addr::{parse_user, RunAs},
    cgroup, config,
    envoy_bootstrap::{self, MODULE_NAME},
    instance::{Instance, DEFAULT_STATE_DIR},
    kernel_log,
    loader::{self, AttachRequest, Attached},
    supervisor::{self, EnvoyCommand},
};

/// Options of `gateway run`: the configuration file and what the command
/// line adds to it.
#[derive(Clone, Debug, clap::Args)]
pub struct RunOptions {
    /// Gateway configuration (TOML); see `gateway default-config`. The
    /// built-in default when absent.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Resolver for names no pattern matches (repeatable); replaces
    /// dns.fallback of the configuration.
    #[arg(long, value_parser = crate::addr::parse_resolver_addr)]
    pub fallback: Vec<std::net::SocketAddr>,
    /// Envoy binary (default: $ENVOY_BIN, .tools/bin/envoy, PATH).
    #[arg(long)]
    pub envoy: Option<PathBuf>,
    /// Directory holding libconnectivity_envoy_module.so (default:
    /// $ENVOY_DYNAMIC_MODULES_SEARCH_PATH, then next to this binary).
    #[arg(long)]
    pub module_dir: Option<PathBuf>,
    /// Parent of the gateway's state directory (`<dir>/<name>-<digest>/`,
    /// one per pin directory, mode 0700): the generated Envoy bootstrap
    /// (0600, it holds the tokens) and Envoy's admin socket.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Envoy's log level.
    #[arg(long, default_value = "warn", value_parser = ["trace", "debug", "info", "warn", "error", "critical", "off"])]
    pub envoy_log_level: String,
    /// Envoy worker threads (1 to 128).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=i64::from(gateway_common::contract::MAX_CONCURRENCY)))]
    pub concurrency: u32,
    /// Run Envoy as this user (name or uid), without capabilities; the two
    /// maps Envoy writes are shared with the user's primary group, which
    /// must be its own (see README, "Security model").
    #[arg(long, value_parser = parse_user)]
    pub envoy_user: Option<RunAs>,
    /// Do not start Envoy: another container (or unit) runs it with
    /// `gateway envoy-exec` as --envoy-user, on the bootstrap this gateway
    /// writes into the shared state directory. The gateway waits for it,
    /// attaches, applies reloads and reports its health, but never starts,
    /// restarts or stops it. Files are shared through --envoy-user's group,
    /// of which this process must be a member, so the gateway needs no
    /// capability besides CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN.
    #[arg(long, requires = "envoy_user")]
    pub external_envoy: bool,
    /// On SIGINT/SIGTERM leave the programs attached (as a crash would), so
    /// that the next `gateway run` adopts them without a moment ungated:
    /// for upgrades and orchestrators that replace the gateway.
    #[arg(long)]
    pub keep_attached: bool,
}

/// Options of `gateway envoy-exec`.
#[derive(Clone, Debug, clap::Args)]
pub struct EnvoyExecOptions {
    /// The gateway's configuration (for its pin directory, which names
    /// the state directory); the built-in default when absent.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Parent of the state directory, as given to `gateway run`.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Envoy binary (default: $ENVOY_BIN, .tools/bin/envoy, PATH).
    #[arg(long)]
    pub envoy: Option<PathBuf>,
    /// Directory holding libconnectivity_envoy_module.so (default:
    /// $ENVOY_DYNAMIC_MODULES_SEARCH_PATH, then next to this binary).
    #[arg(long)]
    pub module_dir: Option<PathBuf>,
    /// Envoy's log level.
    #[arg(long, default_value = "warn", value_parser = ["trace", "debug", "info", "warn", "error", "critical", "off"])]
    pub envoy_log_level: String,
    /// Envoy worker threads (1 to 128).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=i64::from(gateway_common::contract::MAX_CONCURRENCY)))]
    pub concurrency: u32,
}

/// `gateway envoy-exec`: in Envoy's own container, as Envoy's user, waits
/// for the bootstrap a `gateway run --external-envoy` writes into the
/// shared state directory, then replaces this process with Envoy (so the
/// container lives and dies with it). Returns only on failure.
pub fn envoy_exec(options: &EnvoyExecOptions) -> Result<()> {
    use std::os::unix::process::CommandExt as _;
    let config = config::load(options.config.as_deref())?;
    let instance = Instance::new(&options.state_dir, &config.file.pin_dir);
    if nix::unistd::geteuid().is_root() {
        log::warn!(
            "envoy-exec runs Envoy as root: run it as the gateway's --envoy-user instead \
             (a container of its own with that user)"
        );
    }
    let envoy = EnvoyCommand {
        binary: find_envoy(options.envoy.as_deref())?,
        bootstrap: instance.bootstrap(),
        module_dir: find_module_dir(options.module_dir.as_deref())?,
        admin: instance.admin_socket(),
        log_level: options.envoy_log_level.clone(),
        concurrency: options.concurrency,
        run_as: None,
        config_digest: String::new(),
    };
    let mut notice = std::time::Instant::now();
    while std::fs::File::open(&envoy.bootstrap).is_err() {
        if notice.elapsed() > std::time::Duration::from_secs(15) {
            log::info!(
                "waiting for {} (written by `gateway run --external-envoy` with the same \
                 --config and --state-dir, readable by this user's group)",
                envoy.bootstrap.display()
            );
            notice = std::time::Instant::now();
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // A socket file left by a previous Envoy would make this one fail.
    let _ = std::fs::remove_file(&envoy.admin);
    let err = std::process::Command::new(&envoy.binary)
        .args(envoy.args())
        .env("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", &envoy.module_dir)
        .exec();
    Err(err).with_context(|| format!("executing {}", envoy.binary.display()))
}

/// How the state directory is shared with Envoy under `options`.
pub fn sharing(options: &RunOptions) -> Result<crate::instance::Sharing> {
    use crate::instance::Sharing;
    Ok(match (&options.envoy_user, options.external_envoy) {
        (None, _) => Sharing::Private,
        (Some(user), false) => Sharing::EnvoyUser {
            uid: user.uid,
            gid: user.gid,
        },
        (Some(user), true) => {
            let gid = nix::unistd::Gid::from_raw(user.gid);
            let member = nix::unistd::getegid() == gid
                || nix::unistd::getgroups()
                    .context("reading this process's groups")?
                    .contains(&gid);
            if !member {
                bail!(
                    "with --external-envoy the gateway shares its files with Envoy's group {} \
                     and must be a member of it (podman run --group-add {}, Kubernetes \
                     securityContext.supplementalGroups: [{}]); it then needs no CAP_CHOWN or \
                     CAP_DAC_OVERRIDE",
                    user.gid,
                    user.gid,
                    user.gid
                );
            }
            Sharing::EnvoyGroup { gid: user.gid }
        }
    })
}

/// The configuration with command-line overrides applied, validated as a
/// whole again: the command line gets the same checks as the file.
pub fn effective_config(
    path: Option<&Path>,
    fallback: &[std::net::SocketAddr],
) -> Result<config::Config> {
    let mut config = config::load(path)?;
    if !fallback.is_empty() {
        let mut file = config.file;
        file.dns.fallback = fallback.iter().map(ToString::to_string).collect();
        config = config::validate(file).context("invalid --fallback")?;
    }
    Ok(config)
}

fn executable_dir() -> Option<PathBuf> {
    std::env::current_exe()
        .ok()?
        .parent()
        .map(Path::to_path_buf)
}

/// Finds Envoy: `--envoy`, `$ENVOY_BIN`, the repository's `.tools/bin/envoy`
/// (when the gateway runs from `target/<profile>`), then `envoy` on PATH.
pub fn find_envoy(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = explicit {
        if path.is_file() {
            return Ok(path.to_path_buf());
        }
        bail!("--envoy {}: no such file", path.display());
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        candidates.push(p.into());
    }
    if let Some(dir) = executable_dir() {
        candidates.push(dir.join("../../.tools/bin/envoy"));
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("envoy")));
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .context("Envoy not found: pass --envoy <path>, set ENVOY_BIN, or run `cargo xtask setup` (installs Envoy 1.40 into .tools/bin)")
}

/// Finds the directory holding `libconnectivity_envoy_module.so`:
/// `--module-dir`, `$ENVOY_DYNAMIC_MODULES_SEARCH_PATH`, then the gateway
/// binary's own directory (where cargo puts both).
pub fn find_module_dir(explicit: Option<&Path>) -> Result<PathBuf> {
    let file = format!("lib{MODULE_NAME}.so");
    let candidates: Vec<PathBuf> = explicit
        .map(Path::to_path_buf)
        .into_iter()
        .chain(std::env::var_os("ENVOY_DYNAMIC_MODULES_SEARCH_PATH").map(PathBuf::from))
        .chain(executable_dir())
        .collect();
    candidates
        .iter()
        .find(|d| d.join(&file).is_file())
        .cloned()
        .with_context(|| {
            format!(
                "the Envoy module {file} is not in {}: build it with `cargo build -p envoy-module` or pass --module-dir",
                candidates
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// Installs the SIGINT/SIGTERM handlers now (so a signal that arrives
/// while Envoy starts is not fatal) and returns the future that completes
/// on the first of them.
pub fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>> {
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    Ok(async move {
        tokio::select! {
            _ = sigint.recv() => log::info!("SIGINT received, stopping"),
            _ = sigterm.recv() => log::info!("SIGTERM received, stopping"),
        }
    })
}

/// Runs the gateway until SIGINT/SIGTERM.
pub async fn run(options: RunOptions) -> Result<()> {
    let shutdown = shutdown_signal()?;
    // Installed first, so that an early SIGHUP never kills the gateway.
    let hangups = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let config = effective_config(options.config.as_deref(), &options.fallback)?;
    if !config.ipv6 {
        let resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        if resolv
            .lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .any(|ns| ns.trim().parse::<std::net::Ipv6Addr>().is_ok())
        {
            log::warn!(
                "/etc/resolv.conf names an IPv6 nameserver, but Envoy gets no [::1] listeners \
                 (listeners.ipv6 is off or this host cannot bind ::1): DNS to it is not \
                 redirected (counted as ipv6_unserved); enable IPv6 on loopback or list only \
                 IPv4 nameservers"
            );
        }
    }
    if let Some(user) = &options.envoy_user {
        crate::addr::check_dedicated_user_here(user)?;
    }
    let sharing = sharing(&options)?;
    // Envoy's own files are needed only where the gateway starts it.
    let (envoy_binary, module_dir) = if options.external_envoy {
        (PathBuf::from("envoy"), PathBuf::new())
    } else {
        (
            find_envoy(options.envoy.as_deref())?,
            find_module_dir(options.module_dir.as_deref())?,
        )
    };
    let cgroup_path = config.attach_cgroup()?;
    let gated = config.gated_cgroups()?;
    for path in &gated {
        cgroup::ensure_outside(path)?;
    }

    // One state directory per pin directory, so gateways never share a
    // bootstrap or an admin socket; written only once this gateway holds
    // its pin directory's lock (see run_with_cgroup).
    let instance = Instance::new(&options.state_dir, &config.file.pin_dir).with_sharing(sharing);

    let created_cgroup = cgroup::ensure_exists(&cgroup_path)?;
    let mut created_gated = Vec::new();
    for path in &gated {
        if cgroup::ensure_exists(path)? {
            created_gated.push(path.clone());
        }
    }
    let result = run_with_cgroup(
        &config,
        &options,
        &cgroup_path,
        shutdown,
        hangups,
        &instance,
        EnvoyCommand {
            binary: envoy_binary,
            bootstrap: instance.bootstrap(),
            module_dir,
            admin: instance.admin_socket(),
            log_level: options.envoy_log_level.clone(),
            concurrency: options.concurrency,
            run_as: options.envoy_user.clone(),
            config_digest: format!("{:016x}", config.static_digest()),
        },
    )
    .await;
    if options.keep_attached {
        // The gate stays in place: so do its cgroups.
        return result;
    }
    for path in created_gated.iter().rev() {
        if let Ok(false) | Err(_) = cgroup::remove_if_empty(path) {
            log::warn!("gated cgroup {} left in place (not empty)", path.display());
        }
    }
    if created_cgroup {
        match cgroup::remove_if_empty(&cgroup_path) {
            Ok(true) => log::info!("removed cgroup {}", cgroup_path.display()),
            Ok(false) => log::warn!(
                "cgroup {} still has processes; left in place (they are no longer redirected)",
                cgroup_path.display()
            ),
            Err(err) => log::warn!("{err:#}"),
        }
    }
    result
}

async fn run_with_cgroup(
    config: &config::Config,
    options: &RunOptions,
    cgroup_path: &Path,
    shutdown: impl std::future::Future<Output = ()>,
    mut hangups: tokio::signal::unix::Signal,
    instance: &Instance,
    envoy: EnvoyCommand,
) -> Result<()> {
    let request = AttachRequest {
        cgroup: cgroup_path.to_path_buf(),
        gate: Some(config.gated_cgroups()?),
        vip_cidrs: vec![config.vip_cidr],
        dns_to: config.dns_listener,
        tcp_to: config.tcp_listener,
        dns_tcp_to: Some(config.dns_tcp_listener),
        ipv6_listeners: config.ipv6,
        vip6_prefix: config.vip6_prefix,
        refuse_unknown_vips: true,
        dns_outage_drop: config.file.dns.outage == config::DnsOutage::Drop,
        pin_dir: config.file.pin_dir.clone(),
        allow_root_cgroup: false,
        maps_group: options.envoy_user.as_ref().map(|u| u.gid),
        exempt_uid: options.envoy_user.as_ref().map(|u| u.uid),
    };
    // 1. Discover: check, lock the pin directory, see what a previous
    //    gateway left. 2. Load or adopt: pins exist before Envoy starts, so
    //    the module finds the shared VIP table.
    let prepared = loader::discover(&request)?.load_or_adopt()?;
    // Closed original destinations a dead loader could not sweep go before
    // any Envoy can consume them.
    if let Err(err) = crate::reaper::sweep(prepared.pin_dir()) {
        log::warn!("cannot sweep closed original destinations: {err:#}");
    }
    let reaper = crate::reaper::spawn(config.file.pin_dir.clone());
    instance.prepare()?;
    // What `gateway reload` may change lives in files Envoy and the module
    // watch; the bootstrap names them.
    let mut reloader = crate::reload::Reloader {
        current: config.clone(),
        path: options.config.as_deref(),
        fallback: &options.fallback,
        instance,
        generation: 1,
        unsettled: false,
    };
    reloader.write_files()?;
    instance.write_bootstrap(&envoy_bootstrap::render(
        config,
        &instance.admin_socket(),
        Some(instance),
    )?)?;
    crate::reload::record_start(instance)?;
    let pins = gateway_common::pinned::PinDir::new(&config.file.pin_dir);
    let reloads = async {
        // A configured cgroup that is removed and created again (a systemd
        // service restarting, say) comes back with a new id: it is gated
        // again within a tick, instead of staying ungated until a reload.
        let mut regate = tokio::time::interval(crate::gate::REGATE_INTERVAL);
        regate.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut known = Vec::new();
        loop {
            tokio::select! {
                signal = hangups.recv() => {
                    if signal.is_none() {
                        break;
                    }
                    log::info!("SIGHUP received: reading the configuration again");
                    reloader.reload(&pins).await;
                    known.clear();
                }
                _ = regate.tick() => {
                    if let Err(e) = crate::gate::regate_configured(&pins, &reloader.current, &mut known) {
                        log::warn!("cannot check the configured gates: {e:#}");
                    }
                }
            }
        }
        std::future::pending::<()>().await
    };
    if options.external_envoy {
        log::info!(
            "bootstrap written to {}; waiting for the external Envoy (`gateway envoy-exec`, as {})",
            envoy.bootstrap.display(),
            options
                .envoy_user
                .as_ref()
                .map_or("Envoy's user", |u| u.name.as_str())
        );
    } else {
        log::info!(
            "starting Envoy {} (bootstrap {}, module from {})",
            envoy.binary.display(),
            envoy.bootstrap.display(),
            envoy.module_dir.display()
        );
    }
    // 3. Attach once Envoy listens (new programs; adopted ones are attached
    //    already, and while Envoy starts the DNS outage policy applies).
    // 4. Supervise until a stop signal.
    let mut prepared = Some(prepared);
    let mut attached: Option<Attached> = None;
    let mut log_task = None;
    let supervision = supervisor::supervise(
        &envoy,
        options.external_envoy,
        || {
            let prepared = prepared.take().context("programs already attached")?;
            let adopted = prepared.adopted();
            let mut done = prepared.attach()?;
            log_task = done.ebpf_mut().and_then(kernel_log::forward);
            log::info!(
                "gateway ready: {} is gated{} (DNS → {}, {} → {}); run programs in it with `gateway exec{} -- <command>`; `gateway status` shows the state",
                cgroup_path.display(),
                if adopted { " (programs adopted, counters continue)" } else { "" },
                config.dns_listener,
                config.vip_cidr,
                config.tcp_listener,
                options
                    .config
                    .as_ref()
                    .map(|c| format!(" --config {}", c.display()))
                    .unwrap_or_default(),
            );
            attached = Some(done);
            Ok(())
        },
        shutdown,
    );
    let supervised = tokio::select! {
        result = supervision => result,
        () = reloads => Ok(()),
    };
    for task in log_task.into_iter().chain([reaper]) {
        task.abort();
    }
    // 5. Stop: a clean stop detaches fully. A start that failed before
    //    attaching leaves whatever a previous gateway had attached: failing
    //    to start must not open the gate.
    let stopped = match attached {
        Some(a) if options.keep_attached => {
            a.leave_attached();
            Ok(())
        }
        Some(a) => a.stop(),
        None => {
            if prepared.is_some_and(|p| p.adopted()) {
                log::warn!(
                    "the programs a previous gateway left attached stay attached; `gateway reset` detaches them"
                );
            }
            Ok(())
        }
    };
    supervised.and(stopped)
}
