//! The seed's manual test as a reusable scenario: two HTTP CONNECT
//! upstreams (cluster_1 on 18001, cluster_2 on 18002), a stub fallback
//! resolver on 127.0.0.1:5353, and `gateway run`. Used by the end-to-end
//! tests and by `cargo xtask demo`. Call it only inside a private network
//! namespace ([`crate::enter_private_netns`]).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Output},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use nix::sys::signal::Signal;

use crate::{gateway_bin, repo_root, status_json, unique_name, wait_for, Guarded};

/// Where the stub resolver listens; the scenario passes it as `--fallback`.
pub const FALLBACK: &str = "127.0.0.1:5353";
/// The name the stub resolver knows, and its answer (TEST-NET-1).
pub const FALLBACK_NAME: &str = "github.com";
/// The stub resolver's answer for [`FALLBACK_NAME`].
pub const FALLBACK_ANSWER: &str = "192.0.2.10";

/// The upstreams of the built-in configuration: (cluster, port).
pub const UPSTREAMS: [(&str, u16); 2] = [("cluster_1", 18001), ("cluster_2", 18002)];

/// A running seed scenario; dropping it stops everything.
pub struct SeedScenario {
    work_dir: PathBuf,
    admin_socket: PathBuf,
    config_path: Option<PathBuf>,
    pin_dir: PathBuf,
    cgroup: PathBuf,
    gateway: Guarded,
    gateway_args: Vec<std::ffi::OsString>,
    _upstreams: Vec<Guarded>,
    _resolver: Guarded,
}

/// Starts the two upstreams of [`UPSTREAMS`], each logging the CONNECTs it
/// receives to `<log_dir>/<cluster>.jsonl`, and waits until they listen.
pub fn start_upstreams(log_dir: &Path) -> Result<Vec<Guarded>> {
    let mut upstreams = Vec::new();
    for (name, port) in UPSTREAMS {
        let log = log_dir.join(format!("{name}.jsonl"));
        let port = port.to_string();
        let args = [
            "--name",
            name,
            "--port",
            &port,
            "--log",
            &log.to_string_lossy(),
        ];
        upstreams.push(Guarded::spawn(name, python("upstream.py", &args))?);
    }
    for (_, port) in UPSTREAMS {
        crate::wait_for_listener(&format!("127.0.0.1:{port}"), Duration::from_secs(10))?;
    }
    Ok(upstreams)
}

/// Starts the stub resolver at [`FALLBACK`] (answering [`FALLBACK_NAME`]
/// with [`FALLBACK_ANSWER`]) and waits until it listens.
pub fn start_fallback_resolver() -> Result<Guarded> {
    let resolver = Guarded::spawn(
        "stub resolver",
        python(
            "stub_resolver.py",
            &[
                "--port",
                "5353",
                "--record",
                &format!("{FALLBACK_NAME}={FALLBACK_ANSWER}"),
            ],
        ),
    )?;
    crate::wait_for_listener(FALLBACK, Duration::from_secs(10))?;
    Ok(resolver)
}

/// The built-in configuration with a cgroup and a pin directory of the
/// caller's own (`<prefix>-<unique>`), so tests never share them.
pub fn isolated_config(prefix: &str) -> Result<String> {
    let name = unique_name(prefix);
    Ok(default_config_text()?
        .replacen(
            "cgroup = \"dns-egress-gateway\"",
            &format!("cgroup = \"{name}\""),
            1,
        )
        .replacen(
            "pin_dir = \"/sys/fs/bpf/dns-egress-gateway\"",
            &format!("pin_dir = \"/sys/fs/bpf/{name}\""),
            1,
        ))
}

/// Whether Envoy, the module and the command-line `tools` are present;
/// panics in CI when not, says why and returns false otherwise.
pub fn scenario_prerequisites(tools: &[&str]) -> bool {
    let needs = [crate::envoy::envoy_bin(), crate::envoy::module_path()];
    if !crate::prerequisites_met(&needs) {
        return false;
    }
    for tool in tools {
        if crate::which(tool).is_none() {
            assert!(!crate::in_ci(), "{tool} missing (run cargo xtask setup)");
            eprintln!("SKIPPED: {tool} missing");
            return false;
        }
    }
    true
}

/// Checks [`scenario_prerequisites`], enters a private network namespace
/// and starts the scenario on `config` with `extra_args`; `None` when
/// skipped (outside CI only).
pub fn start_isolated(
    config: String,
    extra_args: &[&str],
    tools: &[&str],
) -> Result<Option<SeedScenario>> {
    if !scenario_prerequisites(tools) {
        return Ok(None);
    }
    crate::enter_private_netns()?;
    Ok(Some(SeedScenario::start_with_args(
        Some(config),
        extra_args,
    )?))
}

/// The built-in configuration, as `gateway default-config` prints it.
pub fn default_config_text() -> Result<String> {
    let out = Command::new(gateway_bin()).arg("default-config").output()?;
    if !out.status.success() {
        bail!("gateway default-config failed");
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// `python3 -u tests/clients/<script> <args…>`.
pub fn python(script: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg("-u")
        .arg(repo_root().join("tests/clients").join(script))
        .args(args);
    cmd
}

impl SeedScenario {
    /// Starts the scenario. With `config_text`, the gateway runs on that
    /// configuration (written to a file); without, on the built-in default
    /// (cgroup `dns-egress-gateway`, pins in the default directory).
    pub fn start(config_text: Option<String>) -> Result<Self> {
        Self::start_with_args(config_text, &[])
    }

    /// Like [`SeedScenario::start`], with extra `gateway run` arguments.
    pub fn start_with_args(config_text: Option<String>, extra_args: &[&str]) -> Result<Self> {
        let work_dir = std::env::temp_dir().join(unique_name("gw-scenario"));
        fs::create_dir_all(&work_dir)?;
        let upstreams = start_upstreams(&work_dir)?;
        let resolver = start_fallback_resolver()?;
        let text = match &config_text {
            Some(t) => t.clone(),
            None => default_config_text()?,
        };
        let table: toml::Table = text.parse().context("parsing the scenario configuration")?;
        let pin_dir = PathBuf::from(
            table
                .get("pin_dir")
                .and_then(|v| v.as_str())
                .unwrap_or(gateway_common::DEFAULT_PIN_DIR),
        );
        let cgroup_name = table
            .get("cgroup")
            .and_then(|v| v.as_str())
            .context("configuration without cgroup")?;
        let cgroup = if Path::new(&cgroup_name).is_absolute() {
            PathBuf::from(cgroup_name)
        } else {
            crate::cgroup2_root()?.join(cgroup_name)
        };

        let config_path = match config_text {
            Some(t) => {
                let path = work_dir.join("gateway.toml");
                fs::write(&path, t)?;
                Some(path)
            }
            None => None,
        };
        let mut cmd = Command::new(gateway_bin());
        cmd.arg("run");
        if let Some(path) = &config_path {
            cmd.arg("--config").arg(path);
        }
        // The caller may name its own fallback resolver, on the command
        // line or in the configuration.
        let configured_fallback = table
            .get("dns")
            .and_then(|d| d.get("fallback"))
            .and_then(|f| f.as_array())
            .is_some_and(|f| !f.is_empty());
        if !extra_args.contains(&"--fallback") && !configured_fallback {
            cmd.args(["--fallback", FALLBACK]);
        }
        cmd.args(["--envoy-log-level", "warn", "--state-dir"])
            .arg(work_dir.join("state"))
            .args(extra_args);
        let admin_socket = gateway_common::pinned::envoy_dir(
            &gateway_common::pinned::instance_dir(&work_dir.join("state"), &pin_dir),
        )
        .join(gateway_common::pinned::ADMIN_SOCKET_NAME);
        let gateway_args: Vec<std::ffi::OsString> = cmd.get_args().map(|a| a.to_owned()).collect();
        let gateway = spawn_ready(&gateway_args, &pin_dir)?;
        Ok(Self {
            work_dir,
            admin_socket,
            config_path,
            pin_dir,
            cgroup,
            gateway,
            gateway_args,
            _upstreams: upstreams,
            _resolver: resolver,
        })
    }

    /// Kills `gateway run` with `signal` (e.g. SIGKILL, a crash) and
    /// returns its output.
    pub fn kill_gateway(&mut self, signal: Signal) -> Result<String> {
        self.gateway.stop(signal, Duration::from_secs(20))?;
        Ok(self.gateway.output())
    }

    /// Starts `gateway run` again with the same arguments and waits until
    /// it is ready.
    pub fn restart_gateway(&mut self) -> Result<()> {
        self.gateway = spawn_ready(&self.gateway_args, &self.pin_dir)?;
        Ok(())
    }

    /// The gated cgroup.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// What `gateway run` printed so far.
    pub fn gateway_output(&self) -> String {
        self.gateway.output()
    }

    /// The pid of `gateway run`.
    pub fn gateway_pid(&self) -> u32 {
        self.gateway.pid()
    }

    /// Runs an unmodified program in the gated cgroup through `gateway exec`.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output> {
        self.exec_command(program, args)
            .output()
            .with_context(|| format!("gateway exec -- {program}"))
    }

    /// The `gateway exec` command for `program args`, to start it
    /// alongside others.
    pub fn exec_command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(gateway_bin());
        cmd.arg("exec");
        if let Some(path) = &self.config_path {
            cmd.arg("--config").arg(path);
        }
        cmd.arg("--").arg(program).args(args);
        cmd
    }

    /// Every CONNECT an upstream received: {cluster, connect, headers}.
    pub fn upstream_requests(&self, cluster: &str) -> Result<Vec<serde_json::Value>> {
        let path = self.work_dir.join(format!("{cluster}.jsonl"));
        let text = fs::read_to_string(&path).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).context("upstream log line"))
            .collect()
    }

    /// The Envoy process `gateway run` supervises, if one runs.
    pub fn envoy_pid(&self) -> Option<u32> {
        let out = Command::new("pgrep")
            .args(["-P", &self.gateway.pid().to_string(), "-x", "envoy"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// Envoy's admin socket (root only).
    pub fn admin_socket(&self) -> &Path {
        &self.admin_socket
    }

    /// The directory holding the state of `gateway run` (bootstrap, admin).
    pub fn state_dir(&self) -> PathBuf {
        self.work_dir.join("state")
    }

    /// The configuration file `gateway run` was started with, if any.
    pub fn config_path(&self) -> Option<&Path> {
        self.config_path.as_deref()
    }

    /// The directory the upstreams log their CONNECTs in.
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// GET from Envoy's admin socket (with curl, as root).
    pub fn admin_get(&self, path: &str) -> Result<String> {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "5", "--unix-socket"])
            .arg(&self.admin_socket)
            .arg(format!("http://admin{path}"))
            .output()
            .context("running curl against Envoy's admin")?;
        if !out.status.success() {
            bail!("admin {path}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Stops `gateway run` with SIGTERM; returns its status and output.
    pub fn stop(&mut self) -> Result<(ExitStatus, String)> {
        let status = self
            .gateway
            .stop(Signal::SIGTERM, Duration::from_secs(20))?;
        Ok((status, self.gateway.output()))
    }
}

/// Starts `gateway run <args>` and waits until it says it is ready and
/// the pins show it attached.
fn spawn_ready(args: &[std::ffi::OsString], pin_dir: &Path) -> Result<Guarded> {
    let mut cmd = Command::new(gateway_bin());
    cmd.args(args);
    let mut gateway = Guarded::spawn("gateway run", cmd)?;
    let pins = pin_dir.to_path_buf();
    let ready = wait_for("gateway run to be ready", Duration::from_secs(60), || {
        if !gateway.is_running() {
            bail!("gateway run exited:\n{}", gateway.output());
        }
        Ok((gateway.output().contains("gateway ready")
            && status_json(&pins)?["loader"]["alive"] == true)
            .then_some(()))
    });
    if let Err(err) = ready {
        bail!("{err:#}\ngateway output:\n{}", gateway.output());
    }
    Ok(gateway)
}

impl Drop for SeedScenario {
    fn drop(&mut self) {
        if self.gateway.is_running() {
            let _ = self.gateway.stop(Signal::SIGTERM, Duration::from_secs(20));
        }
        crate::reset_pins(&self.pin_dir);
        let _ = fs::remove_dir(&self.cgroup);
        let _ = fs::remove_dir_all(&self.work_dir);
    }
}
