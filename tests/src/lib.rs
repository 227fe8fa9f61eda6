//! Harness for the end-to-end tests: private network namespaces, throwaway
//! child cgroups, the project's binaries, and processes that are always
//! stopped. Every test traffic stays on loopback inside a namespace that
//! has nothing but `lo`.
#![forbid(unsafe_code)]

pub mod envoy;
pub mod podman;
pub mod scenario;

use std::{
    fs,
    io::{BufRead, BufReader},
    net::SocketAddrV4,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use nix::{
    sched::{unshare, CloneFlags},
    sys::signal::{kill, Signal},
    unistd::Pid,
};

/// Root of the repository (the workspace).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Where `cargo xtask setup` puts Envoy and other tools.
pub fn tools_dir() -> PathBuf {
    repo_root().join(".tools")
}

/// The `gateway` binary under test (`GATEWAY_BIN` overrides).
pub fn gateway_bin() -> PathBuf {
    std::env::var_os("GATEWAY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("debug").join("gateway"))
}

/// Cargo's target directory for this workspace.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

/// True when running under CI, where a missing prerequisite is a failure.
pub fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
}

/// Checks what the real-kernel tests need. Returns false (after saying why)
/// when something is missing outside CI, so a developer without root can
/// still run the unit tests; panics in CI, where skipping is not allowed.
pub fn prerequisites_met(extra_files: &[PathBuf]) -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root (run the tests as root: they load eBPF programs)".to_owned());
    }
    if cgroup2_root().is_err() {
        missing.push("a mounted cgroup v2 hierarchy".to_owned());
    }
    for bin in [gateway_bin()].iter().chain(extra_files) {
        if !bin.exists() {
            missing.push(format!(
                "{} (run `cargo xtask test`, which builds it)",
                bin.display()
            ));
        }
    }
    for tool in [
        "ip", "bpftool", "python3", "iptables", "dig", "curl", "setpriv",
    ] {
        if which(tool).is_none() {
            missing.push(format!("{tool} (run `cargo xtask setup`)"));
        }
    }
    if missing.is_empty() {
        return true;
    }
    let message = format!("prerequisites missing: {}", missing.join("; "));
    if in_ci() {
        panic!("{message} (CI=true: a missing prerequisite is a failure)");
    }
    eprintln!("SKIPPED: {message}");
    false
}

/// Finds `tool` on PATH.
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Moves the calling thread (and every process it starts from now on) into
/// a fresh network namespace with only `lo`, brought up. A redirect that
/// fails then fails the connect instead of sending anything anywhere.
pub fn enter_private_netns() -> Result<()> {
    unshare(CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET)")?;
    let status = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .context("running `ip link set lo up`")?;
    if !status.success() {
        bail!("`ip link set lo up` failed");
    }
    Ok(())
}

/// The mount point of the cgroup v2 hierarchy.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .next()
        .context("no cgroup2 mount in /proc/self/mounts")
}

static UNIQUE: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call, for cgroups and pin dirs.
pub fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    )
}

/// A child cgroup created for one test and removed when dropped (after
/// killing whatever is still inside).
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    /// Creates `<cgroup2 root>/gw-test-<unique>`.
    pub fn new() -> Result<Self> {
        let path = cgroup2_root()?.join(unique_name("gw-test"));
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    /// The cgroup directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates a child cgroup `name` below this one, removed when dropped
    /// (drop it before its parent).
    pub fn child(&self, name: &str) -> Result<TestCgroup> {
        let path = self.path.join(name);
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TestCgroup { path })
    }

    /// A command that runs `program args…` inside this cgroup: a shell
    /// moves itself in, then execs the program unmodified.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!(
                "echo $$ > '{}/cgroup.procs' && exec \"$@\"",
                self.path.display()
            ))
            .arg("sh")
            .arg(program)
            .args(args);
        cmd
    }

    /// Runs `program args…` inside this cgroup and collects its output.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<Output> {
        self.command(program, args)
            .output()
            .with_context(|| format!("running {program} in {}", self.path.display()))
    }

    /// Programs attached to this cgroup, as `bpftool cgroup show` lists
    /// them (attach type and name per line).
    pub fn attached_programs(&self) -> Result<Vec<String>> {
        let out = Command::new("bpftool")
            .args(["cgroup", "show"])
            .arg(&self.path)
            .output()
            .context("running bpftool cgroup show")?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .filter(|l| !l.trim().is_empty())
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect())
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Ok(procs) = fs::read_to_string(self.path.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::remove_dir(&self.path).is_err() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A child process that is killed when dropped, with its stderr collected
/// in the background for diagnostics.
pub struct Guarded {
    child: Option<Child>,
    name: String,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Guarded {
    /// Spawns `cmd` with piped stderr (and stdout merged into the log).
    pub fn spawn(name: &str, mut cmd: Command) -> Result<Self> {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        for stream in [
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let log = log.clone();
            thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if let Ok(mut l) = log.lock() {
                        l.push_str(&line);
                        l.push('\n');
                    }
                }
            });
        }
        Ok(Self {
            child: Some(child),
            name: name.to_owned(),
            log,
        })
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// What the process printed so far.
    pub fn output(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Sends `signal` and waits up to `timeout` for the exit; returns the
    /// exit status, or an error with the process output if it hangs.
    pub fn stop(&mut self, signal: Signal, timeout: Duration) -> Result<std::process::ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("{} already stopped", self.name);
        };
        let _ = kill(Pid::from_raw(child.id() as i32), signal);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{} did not exit within {timeout:?} after {signal}; output:\n{}",
                    self.name,
                    self.output()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `check` every 50 ms until it returns `Ok(Some(_))` or `timeout`
/// passes; the error names what was awaited.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match check() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() > deadline {
            match last_err {
                Some(e) => bail!("timed out waiting for {what}: {e:#}"),
                None => bail!("timed out waiting for {what}"),
            }
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until something accepts TCP connections on `addr` (a server the
/// test started in the background).
pub fn wait_for_listener(addr: &str, timeout: Duration) -> Result<()> {
    let target: std::net::SocketAddr = addr.parse().context("listener address")?;
    wait_for(&format!("a listener on {addr}"), timeout, || {
        Ok(
            std::net::TcpStream::connect_timeout(&target, Duration::from_millis(200))
                .ok()
                .map(|_| ()),
        )
    })
}

/// A running `gateway attach` on a test cgroup with its own pin directory;
/// dropping it stops the loader and removes the pins.
pub struct Loader {
    process: Guarded,
    pin_dir: PathBuf,
}

impl Loader {
    /// Starts `gateway attach` and waits until `gateway status` says the
    /// programs are attached.
    pub fn attach(
        cgroup: &TestCgroup,
        vip_cidrs: &[&str],
        dns_to: SocketAddrV4,
        tcp_to: SocketAddrV4,
    ) -> Result<Self> {
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(unique_name("gw-test"));
        Self::attach_with_pin_dir(cgroup, vip_cidrs, dns_to, tcp_to, &pin_dir)
    }

    /// Like [`Loader::attach`], with a given pin directory (e.g. the one a
    /// previous loader left).
    pub fn attach_with_pin_dir(
        cgroup: &TestCgroup,
        vip_cidrs: &[&str],
        dns_to: SocketAddrV4,
        tcp_to: SocketAddrV4,
        pin_dir: &Path,
    ) -> Result<Self> {
        Self::attach_with_args(cgroup, vip_cidrs, dns_to, tcp_to, pin_dir, &[])
    }

    /// Like [`Loader::attach_with_pin_dir`], with extra `gateway attach`
    /// arguments.
    pub fn attach_with_args(
        cgroup: &TestCgroup,
        vip_cidrs: &[&str],
        dns_to: SocketAddrV4,
        tcp_to: SocketAddrV4,
        pin_dir: &Path,
        extra: &[&str],
    ) -> Result<Self> {
        let pin_dir = pin_dir.to_path_buf();
        let mut cmd = Command::new(gateway_bin());
        cmd.arg("attach")
            .arg("--cgroup")
            .arg(cgroup.path())
            .arg("--dns-to")
            .arg(dns_to.to_string())
            .arg("--tcp-to")
            .arg(tcp_to.to_string())
            .arg("--pin-dir")
            .arg(&pin_dir);
        for cidr in vip_cidrs {
            cmd.arg("--vip-cidr").arg(cidr);
        }
        cmd.args(extra);
        let mut process = Guarded::spawn("gateway attach", cmd)?;
        let loader_pid = process.pid();
        let pins = pin_dir.clone();
        let attached = wait_for(
            "gateway attach to be ready",
            Duration::from_secs(20),
            || {
                if !process.is_running() {
                    bail!("gateway attach exited early:\n{}", process.output());
                }
                let status = status_json(&pins)?;
                let ready = status["attached"].as_bool() == Some(true)
                    && status["loader"]["pid"].as_u64() == Some(u64::from(loader_pid));
                Ok(ready.then_some(()))
            },
        );
        let loader = Self { process, pin_dir };
        attached?;
        Ok(loader)
    }

    /// The pin directory of this loader.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// `gateway status --json` for this loader.
    pub fn status(&self) -> Result<serde_json::Value> {
        status_json(&self.pin_dir)
    }

    /// A kernel counter by name.
    pub fn counter(&self, name: &str) -> Result<u64> {
        status_counter(&self.pin_dir, name)
    }

    /// Stops the loader with `signal` and returns its exit status and
    /// output.
    pub fn stop_with(&mut self, signal: Signal) -> Result<(std::process::ExitStatus, String)> {
        let status = self.process.stop(signal, Duration::from_secs(10))?;
        Ok((status, self.process.output()))
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        if self.process.is_running() {
            let _ = self.process.stop(Signal::SIGINT, Duration::from_secs(10));
        }
        reset_pins(&self.pin_dir);
    }
}

/// Best-effort cleanup: `gateway reset --pin-dir <dir>` (removes the pins a
/// stopped gateway left).
pub fn reset_pins(pin_dir: &Path) {
    let _ = Command::new(gateway_bin())
        .args(["reset", "--pin-dir"])
        .arg(pin_dir)
        .output();
}

/// A system user with a group of its own, for running Envoy unprivileged
/// (`--envoy-user` refuses shared groups such as nogroup).
pub struct DedicatedUser {
    /// Its name.
    pub name: String,
    /// Its uid.
    pub uid: u32,
}

/// The name of the test's dedicated Envoy user.
pub const ENVOY_TEST_USER: &str = "gw-test-envoy";

/// Creates [`ENVOY_TEST_USER`] (system user, own group, no home) if it does
/// not exist yet, and returns it.
pub fn dedicated_user() -> Result<DedicatedUser> {
    let lookup = || nix::unistd::User::from_name(ENVOY_TEST_USER).ok().flatten();
    if lookup().is_none() {
        let out = Command::new("useradd")
            .args([
                "--system",
                "--user-group",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                ENVOY_TEST_USER,
            ])
            .output()
            .context("running useradd")?;
        // A concurrent test may have created it meanwhile.
        if !out.status.success() && lookup().is_none() {
            bail!("useradd failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let user = lookup().context("the dedicated user does not exist after useradd")?;
    Ok(DedicatedUser {
        name: ENVOY_TEST_USER.to_owned(),
        uid: user.uid.as_raw(),
    })
}

/// One kernel counter from `gateway status --json` for `pin_dir`.
pub fn status_counter(pin_dir: &Path, name: &str) -> Result<u64> {
    let status = status_json(pin_dir)?;
    status["counters"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|pair| pair[0].as_str() == Some(name))
                .and_then(|pair| pair[1].as_u64())
        })
        .with_context(|| format!("no counter {name} in status {status}"))
}

/// `gateway status --json --pin-dir <dir>`, parsed.
pub fn status_json(pin_dir: &Path) -> Result<serde_json::Value> {
    let out = Command::new(gateway_bin())
        .args(["status", "--json", "--pin-dir"])
        .arg(pin_dir)
        .output()
        .context("running gateway status")?;
    if !out.status.success() {
        bail!(
            "gateway status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("parsing gateway status --json")
}
