//! Running Envoy as a supervised child: its output goes to the gateway's
//! log, an unexpected exit or an Envoy whose listeners stopped (for
//! example drained through the admin interface) is followed by a restart
//! with backoff, and a shutdown stops it gracefully (SIGTERM, then
//! SIGKILL). Envoy's admin interface is a Unix socket only root and
//! Envoy's user can open.

use std::{
    future::Future,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
    process::{Child, Command},
};

/// How long Envoy gets to become ready after each start.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long Envoy gets to exit after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Restart backoff bounds; the backoff resets after a stable run.
const MIN_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const STABLE_RUN: Duration = Duration::from_secs(60);

/// How to start Envoy.
#[derive(Clone, Debug)]
pub struct EnvoyCommand {
    /// The envoy binary.
    pub binary: PathBuf,
    /// The generated bootstrap.
    pub bootstrap: PathBuf,
    /// Directory holding `libconnectivity_envoy_module.so`.
    pub module_dir: PathBuf,
    /// Envoy's admin socket, for readiness and health checks.
    pub admin: PathBuf,
    /// Envoy's `-l` log level.
    pub log_level: String,
    /// Worker threads.
    pub concurrency: u32,
    /// Run Envoy as this user instead of the gateway's own.
    pub run_as: Option<crate::addr::RunAs>,
    /// The static-configuration digest the bootstrap carries (see
    /// `Config::static_digest`): an external Envoy showing another one was
    /// started from an older configuration.
    pub config_digest: String,
}

impl EnvoyCommand {
    /// Envoy's command-line arguments (after the binary).
    pub fn args(&self) -> Vec<std::ffi::OsString> {
        vec![
            "-c".into(),
            self.bootstrap.clone().into(),
            "-l".into(),
            self.log_level.clone().into(),
            "--concurrency".into(),
            self.concurrency.to_string().into(),
            // No shared-memory hot restart: the gateway restarts Envoy
            // itself, and several gateways may run on one host.
            "--disable-hot-restart".into(),
        ]
    }

    fn spawn(&self) -> Result<Child> {
        let mut command = Command::new(&self.binary);
        if let Some(user) = &self.run_as {
            // Dropping to another uid also drops every capability.
            command.uid(user.uid).gid(user.gid);
        }
        // Envoy dies with the gateway, however it dies: no orphan keeps the
        // listeners (and a new gateway would find its ports taken).
        crate::sys::die_with_parent(&mut command);
        let mut child = command
            .args(self.args())
            .env("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", &self.module_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Its own process group: a terminal's Ctrl-C reaches only the
            // gateway, which then stops Envoy in order.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            tokio::spawn(async move {
                let mut reader = BufReader::new(stream);
                let mut line = Vec::new();
                // Byte lines, shown lossily: a non-UTF-8 line must not stop
                // the forwarding (Envoy would then block on a full pipe).
                while matches!(reader.read_until(b'\n', &mut line).await, Ok(n) if n > 0) {
                    let text = String::from_utf8_lossy(&line);
                    log::info!(target: "envoy", "{}", text.trim_end());
                    line.clear();
                }
            });
        }
        Ok(child)
    }
}

/// The largest admin response the gateway reads (its requests are small
/// stats filters, `/ready` and `/server_info`).
const ADMIN_RESPONSE_LIMIT: u64 = 1 << 20;

/// How long one admin request may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(2);

/// GETs `path` from Envoy's admin socket (HTTP/1.1: Envoy refuses
/// HTTP/1.0 by default); returns the raw body, which may be chunked. Gives
/// up after [`ADMIN_TIMEOUT`], so a stuck peer cannot hang the gateway.
pub async fn admin_get(admin: &Path, path: &str) -> Result<String> {
    tokio::time::timeout(ADMIN_TIMEOUT, admin_get_unbounded(admin, path))
        .await
        .with_context(|| {
            format!(
                "Envoy's admin at {} did not answer {path} within {ADMIN_TIMEOUT:?}",
                admin.display()
            )
        })?
}

async fn admin_get_unbounded(admin: &Path, path: &str) -> Result<String> {
    admin_request_unbounded(admin, "GET", path).await
}

/// One admin request with `method`, bounded in time.
async fn admin_request(admin: &Path, method: &str, path: &str) -> Result<String> {
    tokio::time::timeout(ADMIN_TIMEOUT, admin_request_unbounded(admin, method, path))
        .await
        .with_context(|| format!("Envoy's admin did not answer {method} {path}"))?
}

async fn admin_request_unbounded(admin: &Path, method: &str, path: &str) -> Result<String> {
    let mut stream = connect_admin(admin).await?;
    stream
        .write_all(
            format!(
                "{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await?;
    // Bounded: whatever answers on the socket cannot make the gateway
    // hold more than this.
    let mut response = String::new();
    stream
        .take(ADMIN_RESPONSE_LIMIT)
        .read_to_string(&mut response)
        .await?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed admin response")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("admin {path}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_owned())
}

/// Connects to Envoy's admin socket without following a link: the socket
/// lives in the one directory Envoy's user may write, so the path is
/// opened with `O_PATH | O_NOFOLLOW`, checked to be a socket, and
/// connected to through that very descriptor.
async fn connect_admin(admin: &Path) -> Result<UnixStream> {
    use std::os::unix::{
        fs::{FileTypeExt as _, OpenOptionsExt as _},
        io::AsRawFd as _,
    };
    let flags = nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_NOFOLLOW;
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits())
        .open(admin)
        .with_context(|| format!("opening Envoy's admin socket {}", admin.display()))?;
    let meta = handle
        .metadata()
        .with_context(|| format!("inspecting {}", admin.display()))?;
    if !meta.file_type().is_socket() {
        bail!(
            "{} is not a socket (a link or a file was put there); not connecting",
            admin.display()
        );
    }
    let via = format!("/proc/self/fd/{}", handle.as_raw_fd());
    UnixStream::connect(&via)
        .await
        .with_context(|| format!("connecting to Envoy's admin at {}", admin.display()))
}

/// Stops an Envoy a previous gateway of this pin directory left running.
/// It is provably this gateway's: it answers on the admin socket in this
/// gateway's state directory (root only), which belongs to whoever holds
/// the pin directory's lock, now this process.
async fn reap_leftover(admin: &Path) -> Result<()> {
    if admin_get(admin, "/ready").await.is_err() {
        return Ok(());
    }
    log::warn!(
        "an Envoy a previous gateway left still answers on {}; stopping it to take over",
        admin.display()
    );
    let _ = admin_request(admin, "POST", "/quitquitquit").await;
    let deadline = Instant::now() + STOP_TIMEOUT;
    while admin_get(admin, "/ready").await.is_ok() {
        if Instant::now() > deadline {
            bail!(
                "the Envoy left on {} did not stop within {STOP_TIMEOUT:?}; stop it by hand and start again",
                admin.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// How often a running Envoy's health is checked.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// Failed health checks in a row after which Envoy is restarted.
const HEALTH_FAILURES: u32 = 3;

/// Whether Envoy still serves: its admin answers and none of its listeners
/// has been stopped (a drained listener no longer accepts anything while
/// the process and `/ready` look fine).
async fn healthy(admin: &Path) -> Result<()> {
    let stats = admin_get(
        admin,
        "/stats?filter=^listener_manager%5C.listener_stopped$",
    )
    .await?;
    let stopped = stats
        .lines()
        .find_map(|l| l.trim().strip_prefix("listener_manager.listener_stopped:"))
        .map(|n| n.trim().parse::<u64>().unwrap_or(u64::MAX))
        .context("Envoy's stats lack listener_manager.listener_stopped")?;
    if stopped > 0 {
        bail!("{stopped} of Envoy's listeners were stopped (drained): DNS or connections are no longer served");
    }
    Ok(())
}

async fn wait_ready(admin: &Path, child: &mut Child) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(body) = admin_get(admin, "/ready").await {
            if body.lines().any(|l| l.trim() == "LIVE") {
                return Ok(());
            }
        }
        if let Some(status) = child.try_wait()? {
            bail!("Envoy exited with {status} before becoming ready (its log is above)");
        }
        if Instant::now() > deadline {
            bail!("Envoy did not become ready within {READY_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn stop(child: &mut Child) -> Result<Option<ExitStatus>> {
    let Some(pid) = child.id() else {
        return Ok(None);
    };
    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
    match tokio::time::timeout(STOP_TIMEOUT, child.wait()).await {
        Ok(status) => Ok(Some(status?)),
        Err(_) => {
            log::warn!("Envoy ignored SIGTERM for {STOP_TIMEOUT:?}; killing it");
            child.kill().await?;
            Ok(Some(child.wait().await?))
        }
    }
}

/// How often the gateway says it is still waiting for an external Envoy.
const EXTERNAL_WAIT_NOTICE: Duration = Duration::from_secs(15);

/// For an Envoy someone else runs (`gateway run --external-envoy`): waits
/// until it answers on the admin socket, calls `on_ready` once, then
/// reports its health until `shutdown`. It never starts, restarts or
/// stops it; when it is down the kernel's outage policy applies until its
/// orchestrator brings it back.
async fn watch_external(
    admin: &Path,
    config_digest: &str,
    on_ready: impl FnOnce() -> Result<()>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    tokio::pin!(shutdown);
    let mut notice = Instant::now();
    loop {
        let live = matches!(admin_get(admin, "/ready").await, Ok(body) if body.lines().any(|l| l.trim() == "LIVE"));
        if live {
            match running_digest(admin).await {
                Some(digest) if digest == config_digest => break,
                Some(digest) => {
                    // Started from an older configuration that a reload
                    // cannot bring in step (listeners, VIP range, …).
                    log::error!(
                        "the running Envoy was started from another configuration (digest {digest}, \
                         this gateway's is {config_digest}): asking it to quit so that its \
                         orchestrator starts it again on the current bootstrap"
                    );
                    let _ = admin_request(admin, "POST", "/quitquitquit").await;
                }
                None => {}
            }
        }
        if notice.elapsed() > EXTERNAL_WAIT_NOTICE {
            log::info!(
                "waiting for Envoy on {} (start it with `gateway envoy-exec` as Envoy's user, with the same --config and --state-dir)",
                admin.display()
            );
            notice = Instant::now();
        }
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    log::info!("Envoy (external) is ready");
    on_ready()?;
    let mut health = tokio::time::interval(HEALTH_INTERVAL);
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            _ = health.tick() => {}
        }
        match healthy(admin).await {
            Ok(()) if failing => {
                log::info!("Envoy (external) serves again");
                failing = false;
            }
            Ok(()) => {}
            Err(err) if !failing => {
                log::error!(
                    "Envoy (external) is not serving: {err:#}; its orchestrator must restart it \
                     (meanwhile DNS follows dns.outage and VIP connects are refused)"
                );
                failing = true;
            }
            Err(_) => {}
        }
    }
}

/// The static-configuration digest in the running Envoy's node metadata
/// (`/server_info`; the body may arrive chunked, so the value is found by
/// its key rather than by parsing the whole document). `None` when it
/// cannot be read; `Some("")` when that Envoy carries none.
async fn running_digest(admin: &Path) -> Option<String> {
    let body = admin_get(admin, "/server_info").await.ok()?;
    let key = format!("\"{}\"", crate::envoy_bootstrap::CONFIG_DIGEST_KEY);
    let Some(at) = body.find(&key) else {
        return Some(String::new());
    };
    let rest = body[at + key.len()..]
        .trim_start()
        .strip_prefix(':')?
        .trim_start();
    let value = rest.strip_prefix('"')?;
    Some(value[..value.find('"')?].to_owned())
}

/// Starts Envoy, waits until it is ready, then calls `on_ready` once and
/// keeps Envoy running until `shutdown` completes. A first start that
/// fails is an error (bad bootstrap, missing module, admin address taken);
/// later exits, failed spawns and restarts that never become ready are
/// retried with exponential backoff. `shutdown` is honoured at every step.
pub async fn supervise(
    envoy: &EnvoyCommand,
    external: bool,
    on_ready: impl FnOnce() -> Result<()>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    if external {
        return watch_external(&envoy.admin, &envoy.config_digest, on_ready, shutdown).await;
    }
    tokio::pin!(shutdown);
    reap_leftover(&envoy.admin).await?;
    // A socket file nobody answers on was left by a killed Envoy.
    let _ = std::fs::remove_file(&envoy.admin);
    let mut child = envoy.spawn()?;
    let first = tokio::select! {
        () = &mut shutdown => None,
        ready = wait_ready(&envoy.admin, &mut child) => Some(ready),
    };
    match first {
        None => {
            stop(&mut child).await?;
            return Ok(());
        }
        Some(Err(err)) => {
            let _ = stop(&mut child).await;
            return Err(err);
        }
        Some(Ok(())) => {}
    }
    log::info!("Envoy is ready (pid {})", child.id().unwrap_or(0));
    on_ready()?;
    let mut backoff = MIN_BACKOFF;
    let mut started = Instant::now();
    let mut health = tokio::time::interval(HEALTH_INTERVAL);
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures = 0u32;
    loop {
        enum Event {
            Shutdown,
            Exited(std::io::Result<ExitStatus>),
            Check,
        }
        let event = tokio::select! {
            () = &mut shutdown => Event::Shutdown,
            status = child.wait() => Event::Exited(status),
            _ = health.tick() => Event::Check,
        };
        match event {
            Event::Shutdown => {
                if let Some(status) = stop(&mut child).await? {
                    log::info!("Envoy stopped ({status})");
                }
                return Ok(());
            }
            Event::Check => {
                match healthy(&envoy.admin).await {
                    Ok(()) => failures = 0,
                    Err(err) => {
                        failures += 1;
                        log::warn!(
                            "Envoy health check failed ({failures}/{HEALTH_FAILURES}): {err:#}"
                        );
                    }
                }
                if failures < HEALTH_FAILURES {
                    continue;
                }
                failures = 0;
                log::error!("Envoy is running but not serving; restarting it");
                let _ = stop(&mut child).await;
            }
            Event::Exited(status) => {
                let status = status.context("waiting for Envoy")?;
                log::error!(
                    "Envoy exited unexpectedly ({status}); the VIP table is kept in the pinned map"
                );
            }
        }
        if started.elapsed() > STABLE_RUN {
            backoff = MIN_BACKOFF;
        }
        // Retry until a restarted Envoy is ready, or shutdown.
        loop {
            log::warn!("restarting Envoy in {backoff:?}");
            let slept = tokio::select! {
                () = &mut shutdown => false,
                () = tokio::time::sleep(backoff) => true,
            };
            if !slept {
                return Ok(());
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            let _ = std::fs::remove_file(&envoy.admin);
            child = match envoy.spawn() {
                Ok(child) => child,
                Err(err) => {
                    log::error!("cannot start Envoy: {err:#}");
                    continue;
                }
            };
            started = Instant::now();
            let ready = tokio::select! {
                () = &mut shutdown => None,
                ready = wait_ready(&envoy.admin, &mut child) => Some(ready),
            };
            match ready {
                None => {
                    stop(&mut child).await?;
                    return Ok(());
                }
                Some(Ok(())) => {
                    log::info!(
                        "Envoy restarted and ready (pid {})",
                        child.id().unwrap_or(0)
                    );
                    break;
                }
                Some(Err(err)) => {
                    log::error!("restarted Envoy is not ready: {err:#}");
                    let _ = stop(&mut child).await;
                }
            }
        }
    }
}
