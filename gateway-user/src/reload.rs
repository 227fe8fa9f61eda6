//! Configuration reload: `gateway reload` (or SIGHUP to `gateway run`)
//! applies changed domains, metadata, clusters, fallback resolvers and
//! gated cgroups while everything keeps running. Listeners never change,
//! so no established connection is drained, and the VIP table is not
//! touched, so every VIP a client holds keeps its domain.
//!
//! How each part reaches Envoy: the domains file is watched by the module
//! (which acknowledges each version it applies), the clusters file is
//! Envoy's CDS source (its version shows in Envoy's stats), the gate
//! table is a pinned map written here. What cannot change at run time is
//! refused, naming the fields, and nothing is applied.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use gateway_common::pinned::{fnv1a, PinDir};
use serde::{Deserialize, Serialize};

use crate::{cgroup, config::Config, envoy_bootstrap, instance::Instance};

/// How long `gateway run` waits for Envoy to confirm a reload.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `gateway reload` waits for `gateway run` to report.
pub const REPORT_TIMEOUT: Duration = Duration::from_secs(30);

/// The outcome of one reload, written by `gateway run` for `gateway
/// reload` (and anyone reading the state directory).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReloadResult {
    /// Counts reloads since `gateway run` started (the start is 1).
    pub generation: u64,
    /// Whether the new configuration is in force (written for Envoy and
    /// the kernel); false when it was refused and nothing changed.
    pub ok: bool,
    /// Whether Envoy confirmed it applied the domains and the clusters.
    pub confirmed: bool,
    /// What happened, for a person.
    pub message: String,
}

/// Everything a reload needs from the running gateway.
pub struct Reloader<'a> {
    /// The configuration in force.
    pub current: Config,
    /// The configuration file `gateway run` was started with, if any.
    pub path: Option<&'a Path>,
    /// `--fallback` resolvers of the command line (they override the file).
    pub fallback: &'a [std::net::SocketAddr],
    /// The gateway's state directory.
    pub instance: &'a Instance,
    /// Version of the clusters file in force.
    pub generation: u64,
}

impl Reloader<'_> {
    /// Writes what Envoy reads for the configuration in force (at start:
    /// generation 1).
    pub fn write_files(&self) -> Result<()> {
        self.instance.write_reloadable(
            &envoy_bootstrap::domains_document(&self.current)?,
            &envoy_bootstrap::cds_document(&self.current, self.generation)?,
        )
    }

    /// Reads the configuration file again and applies what changed;
    /// records the outcome for `gateway reload`.
    pub async fn reload(&mut self, pin_dir: &PinDir) -> ReloadResult {
        let generation = self.generation + 1;
        let result = match self.try_reload(pin_dir, generation).await {
            Ok((confirmed, message)) => ReloadResult {
                generation,
                ok: true,
                confirmed,
                message,
            },
            Err(e) => ReloadResult {
                generation,
                ok: false,
                confirmed: false,
                message: format!("{e:#}"),
            },
        };
        if result.ok {
            log::info!("reload {generation}: {}", result.message);
        } else {
            log::error!("reload {generation} refused: {}", result.message);
        }
        // Generations count attempts, so `gateway reload` can tell its own
        // report from an older one.
        self.generation = generation;
        if let Err(e) = write_result(self.instance, &result) {
            log::warn!("cannot record the reload result: {e:#}");
        }
        result
    }

    async fn try_reload(&mut self, pin_dir: &PinDir, generation: u64) -> Result<(bool, String)> {
        let Some(path) = self.path else {
            bail!(
                "this gateway runs on the built-in configuration, which cannot change; \
                 start it with --config FILE to reload"
            );
        };
        let new = crate::run::effective_config(Some(path), self.fallback)?;
        let changes = crate::config::reload_changes(&self.current, &new)?;
        if changes.is_empty() {
            return Ok((true, "nothing changed".to_owned()));
        }
        // The gate list first: a cgroup that cannot be gated refuses the
        // whole reload before anything is written.
        let attach = new.attach_cgroup()?;
        let mut gated = Vec::new();
        for path in new.gated_cgroups()? {
            cgroup::ensure_outside(&path)?;
            cgroup::ensure_exists(&path)?;
            gated.push(crate::gate::identify(&attach, &path)?);
        }
        let domains = envoy_bootstrap::domains_document(&new)?;
        let clusters = envoy_bootstrap::cds_document(&new, generation)?;
        self.instance.write_reloadable(&domains, &clusters)?;
        crate::gate::sync_configured(pin_dir, &gated)?;
        // A restarted Envoy starts from the bootstrap: keep it in step.
        self.instance.write_bootstrap(&envoy_bootstrap::render(
            &new,
            &self.instance.admin_socket(),
            Some(self.instance),
        )?)?;
        self.current = new;
        let what = changes.join(", ");
        match confirm(self.instance, fnv1a(domains.as_bytes()), generation).await {
            Ok(()) => Ok((true, format!("applied {what}; Envoy confirmed"))),
            Err(e) => Ok((
                false,
                format!("applied {what}, but Envoy has not confirmed it yet ({e:#}); a restarted Envoy reads the new files"),
            )),
        }
    }
}

/// Waits until the module acknowledged the domains file with `digest` and
/// Envoy's CDS is at `generation`.
async fn confirm(instance: &Instance, digest: u64, generation: u64) -> Result<()> {
    let deadline = Instant::now() + CONFIRM_TIMEOUT;
    let ack = connectivity_envoy_module::reload::ack_path(&instance.domains_file());
    let wanted_ack = format!("{digest:016x} ");
    let wanted_version = format!("\"{generation}\"");
    let mut domains_done = false;
    let mut clusters_done = false;
    loop {
        if !domains_done {
            if let Ok(text) = std::fs::read_to_string(&ack) {
                if let Some(outcome) = text.strip_prefix(&wanted_ack) {
                    if outcome.trim() != "applied" {
                        bail!("the module did not apply the domains: {}", outcome.trim());
                    }
                    domains_done = true;
                }
            }
        }
        if !clusters_done {
            if let Ok(stats) = crate::supervisor::admin_get(
                &instance.admin_socket(),
                "/stats?filter=cluster_manager.cds.version_text",
            )
            .await
            {
                clusters_done = stats.contains(&wanted_version);
            }
        }
        if domains_done && clusters_done {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "after {CONFIRM_TIMEOUT:?}: domains {}, clusters {}",
                if domains_done {
                    "applied"
                } else {
                    "not acknowledged"
                },
                if clusters_done {
                    "applied"
                } else {
                    "not at the new version"
                }
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn write_result(instance: &Instance, result: &ReloadResult) -> Result<()> {
    let text = serde_json::to_string_pretty(result).context("serialising the reload result")?;
    let path = instance.reload_result();
    let partial = path.with_extension("partial");
    std::fs::write(&partial, text).with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, &path).with_context(|| format!("writing {}", path.display()))
}

/// Records the start as generation 1, so that the first `gateway reload`
/// waits for generation 2.
pub fn record_start(instance: &Instance) -> Result<()> {
    write_result(
        instance,
        &ReloadResult {
            generation: 1,
            ok: true,
            confirmed: false,
            message: "started".to_owned(),
        },
    )
}

/// The last reload result recorded in `instance`, if any.
pub fn last_result(instance: &Instance) -> Option<ReloadResult> {
    let text = std::fs::read_to_string(instance.reload_result()).ok()?;
    serde_json::from_str(&text).ok()
}

/// `gateway reload`: asks the running gateway (SIGHUP to the loader that
/// owns `pin_dir`) to read its configuration again, and reports what it
/// did.
pub fn request(pin_dir: &Path, instance: &Instance) -> Result<ReloadResult> {
    let pins = PinDir::new(pin_dir);
    if !instance.domains_file().exists() {
        bail!(
            "no `gateway run` keeps its state in {} (a gateway started with `gateway attach` has no \
             configuration to reload; check --config and --state-dir)",
            instance.dir().display()
        );
    }
    if !crate::loader::owner_alive(pin_dir) {
        bail!(
            "no gateway is running with pin directory {} (start `gateway run` first)",
            pin_dir.display()
        );
    }
    let pid = pins
        .loader_info()
        .context("reading which process runs the gateway")?
        .pid;
    if pid == 0 {
        bail!("the gateway of {} has detached", pin_dir.display());
    }
    let before = last_result(instance).map_or(0, |r| r.generation);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .with_context(|| format!("signalling the gateway (pid {pid})"))?;
    let deadline = Instant::now() + REPORT_TIMEOUT;
    loop {
        if let Some(result) = last_result(instance).filter(|r| r.generation > before) {
            return Ok(result);
        }
        if Instant::now() > deadline {
            bail!(
                "the gateway (pid {pid}) did not report within {REPORT_TIMEOUT:?}; see its log \
                 (was it started by `gateway run` with the state directory {}?)",
                instance.dir().display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
