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
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use gateway_common::pinned::{fnv1a, PinDir};
use serde::{Deserialize, Serialize};

use crate::{cgroup, config::Config, envoy_bootstrap, instance::Instance};

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
    /// A reload wrote part of its files and failed: the next one writes
    /// everything again even if the file did not change.
    pub unsettled: bool,
}

impl Reloader<'_> {
    /// Writes what Envoy reads for the configuration in force (at start:
    /// generation 1).
    pub fn write_files(&self) -> Result<()> {
        self.instance.write_reloadable(
            &envoy_bootstrap::domains_document(&self.current)?,
            &envoy_bootstrap::cds_document(&self.current, &self.generation.to_string())?,
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
        if changes.is_empty() && !self.unsettled {
            return Ok((true, "nothing changed".to_owned()));
        }
        // Everything that can be refused is checked before anything is
        // written: the gated cgroups must exist and lie below the attach
        // cgroup (a reload creates none).
        let attach = new.attach_cgroup()?;
        let mut gated = Vec::new();
        for path in new.gated_cgroups()? {
            cgroup::ensure_outside(&path)?;
            gated.push(crate::gate::identify(&attach, &path)?);
        }
        let domains = envoy_bootstrap::domains_document(&new)?;
        // Clusters in two steps around the domains, so that no domain is
        // ever routed to a cluster Envoy does not have: first the old and
        // the new ones together, then only the new ones.
        let mut both = new.clone();
        for (name, addr) in &self.current.clusters {
            both.clusters.entry(name.clone()).or_insert(*addr);
        }
        let clusters_both = envoy_bootstrap::cds_document(&both, &format!("{generation}.0"))?;
        let clusters_new = envoy_bootstrap::cds_document(&new, &generation.to_string())?;
        let bootstrap =
            envoy_bootstrap::render(&new, &self.instance.admin_socket(), Some(self.instance))?;
        // From here on the new configuration is the one in force, even if
        // a step fails: a later reload writes everything again.
        let previous = std::mem::replace(&mut self.current, new);
        self.unsettled = true;
        let admin = self.instance.admin_socket();
        self.instance.write_clusters(&clusters_both)?;
        let mut unconfirmed = Vec::new();
        if let Err(e) = confirm_clusters(&admin, &format!("{generation}.0")).await {
            unconfirmed.push(format!("{e:#}"));
        }
        self.instance.write_domains(&domains)?;
        if let Err(e) =
            confirm_domains(&self.instance.domains_ack(), fnv1a(domains.as_bytes())).await
        {
            if e.to_string().contains("rejected") {
                // Put the previous domains and clusters back, so that no
                // file an Envoy (re)start would read holds what was refused.
                let restored = envoy_bootstrap::domains_document(&previous)
                    .and_then(|d| self.instance.write_domains(&d))
                    .and_then(|()| {
                        envoy_bootstrap::cds_document(&previous, &format!("{generation}.r"))
                    })
                    .and_then(|c| self.instance.write_clusters(&c));
                if restored.is_ok() {
                    self.current = previous;
                    self.unsettled = false;
                }
                return Err(e.context(
                    "the module refused the new domains; the previous domains and clusters are back in force",
                ));
            }
            unconfirmed.push(format!("{e:#}"));
        }
        self.instance.write_clusters(&clusters_new)?;
        if let Err(e) = confirm_clusters(&admin, &generation.to_string()).await {
            unconfirmed.push(format!("{e:#}"));
        }
        crate::gate::sync_configured(pin_dir, &gated)?;
        // A restarted Envoy starts from the bootstrap: keep it in step.
        self.instance.write_bootstrap(&bootstrap)?;
        self.unsettled = false;
        let what = if changes.is_empty() {
            "the configuration again".to_owned()
        } else {
            changes.join(", ")
        };
        let note = if self.fallback.is_empty() {
            String::new()
        } else {
            " (dns.fallback comes from --fallback on the command line; the file's is not used)"
                .to_owned()
        };
        if unconfirmed.is_empty() {
            Ok((true, format!("applied {what}; Envoy confirmed{note}")))
        } else {
            Ok((
                false,
                format!(
                    "applied {what}, but Envoy has not confirmed it ({}); a restarted Envoy reads the new files{note}",
                    unconfirmed.join("; ")
                ),
            ))
        }
    }
}

/// How long each confirmation may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// Waits until Envoy's CDS is at `version`.
async fn confirm_clusters(admin: &Path, version: &str) -> Result<()> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    let wanted = format!("\"{version}\"");
    loop {
        if let Ok(stats) =
            crate::supervisor::admin_get(admin, "/stats?filter=cluster_manager.cds.version_text")
                .await
        {
            if stats.contains(&wanted) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("Envoy's clusters are not at version {version} after {STEP_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the module acknowledged the domains file with `digest`;
/// an error saying "rejected" when it refused it.
async fn confirm_domains(ack: &Path, digest: u64) -> Result<()> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    let wanted = format!("{digest:016x} ");
    loop {
        if let Some(text) = read_envoy_file(ack) {
            if let Some(outcome) = text.strip_prefix(&wanted) {
                let outcome = outcome.trim();
                if outcome == "applied" {
                    return Ok(());
                }
                bail!("{outcome}");
            }
        }
        if Instant::now() > deadline {
            bail!("the module has not acknowledged the new domains after {STEP_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads a small file Envoy's user may have written, never following a
/// link, never blocking on a FIFO, and only a regular file of at most
/// 4 KiB: what Envoy's user puts there cannot make root read or wait on
/// anything else.
fn read_envoy_file(path: &Path) -> Option<String> {
    use std::{io::Read as _, os::unix::fs::OpenOptionsExt as _};
    let flags = nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits())
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() || meta.len() > 4096 {
        return None;
    }
    let mut text = String::new();
    file.take(4096).read_to_string(&mut text).ok()?;
    Some(text)
}

fn write_result(instance: &Instance, result: &ReloadResult) -> Result<()> {
    let text = serde_json::to_string_pretty(result).context("serialising the reload result")?;
    instance.write_reload_result(&text)
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
    // The recorded pid is the loader's in its own pid namespace: from
    // another one (the host, for a loader in a container) it names some
    // other process, which must not get the signal.
    let name_of = |exe: Option<PathBuf>| {
        exe.and_then(|e| e.file_name().map(|n| n.to_string_lossy().into_owned()))
            .map(|n| n.trim_end_matches(" (deleted)").to_owned())
    };
    let target = name_of(std::fs::read_link(format!("/proc/{pid}/exe")).ok());
    let ours = name_of(std::env::current_exe().ok());
    if target.is_none() || target != ours {
        bail!(
            "pid {pid}, recorded by the gateway of {}, is not a gateway in this pid namespace \
             (it is {}): the gateway runs in another one (a container?); run `gateway reload` \
             there (podman exec / kubectl exec into the loader) or send it SIGHUP",
            pin_dir.display(),
            target.as_deref().unwrap_or("gone")
        );
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
