//! Running podman on this machine: the arguments its cgroup layout and
//! limits need, and a seccomp profile that lets the loader call bpf().
//! Shared by `cargo xtask image` and the container test.

use std::{fs, path::Path};

use anyhow::{Context as _, Result};

/// The image `cargo xtask image` builds by default and the container
/// test runs.
pub const IMAGE: &str = "localhost/dns-egress-gateway:latest";

/// Global podman arguments for this machine. With cgroup v2 alone (a
/// cgroup2 file system at /sys/fs/cgroup) podman's defaults work. With a
/// hybrid layout (v1 controllers there, v2 at /sys/fs/cgroup/unified) crun
/// refuses ("cgroups in hybrid mode not supported") and the systemd cgroup
/// manager does not apply, so podman must use runc and manage cgroupfs
/// itself; the same arguments also work on v1-only hosts.
pub fn base_args() -> Vec<&'static str> {
    if unified_cgroups() {
        Vec::new()
    } else {
        vec!["--runtime", "runc", "--cgroup-manager", "cgroupfs"]
    }
}

/// `--ulimit` arguments for `podman run` and `podman build`. Podman asks
/// the runtime for over a million open files and processes in a
/// container, which only works with CAP_SYS_RESOURCE (raising a hard
/// limit); where root lacks it (some VMs and nested containers) runc fails
/// in setrlimit. There the container gets this process's hard limits
/// instead, with processes capped at kernel.pid_max as podman caps its own.
/// Empty when CAP_SYS_RESOURCE is present.
pub fn limit_args() -> Vec<String> {
    use nix::sys::resource::{getrlimit, Resource, RLIM_INFINITY};
    /// CAP_SYS_RESOURCE's bit in the capability sets.
    const CAP_SYS_RESOURCE: u32 = 24;
    let effective = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .unwrap_or(0);
    if effective & (1 << CAP_SYS_RESOURCE) != 0 {
        return Vec::new();
    }
    let pid_max = fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(RLIM_INFINITY);
    [
        ("nofile", Resource::RLIMIT_NOFILE, RLIM_INFINITY),
        ("nproc", Resource::RLIMIT_NPROC, pid_max),
    ]
    .into_iter()
    .filter_map(|(name, resource, cap)| {
        let (_, hard) = getrlimit(resource).ok()?;
        let limit = hard.min(cap);
        // Unlimited: podman's own defaults fit under it.
        (limit != RLIM_INFINITY).then(|| ["--ulimit".to_owned(), format!("{name}={limit}:{limit}")])
    })
    .flatten()
    .collect()
}

/// True when /sys/fs/cgroup itself is a cgroup2 mount (no hybrid layout).
fn unified_cgroups() -> bool {
    fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        // The last mount there is the one in effect.
        .rfind(|l| l.split_whitespace().nth(1) == Some("/sys/fs/cgroup"))
        .is_some_and(|l| l.split_whitespace().nth(2) == Some("cgroup2"))
}

/// System calls the loader needs that podman's default seccomp profile
/// allows only with CAP_SYS_ADMIN (which the gateway never gets).
const LOADER_SYSCALLS: [&str; 2] = ["bpf", "perf_event_open"];

/// Writes to `out` the host's default container seccomp profile (podman's
/// `/usr/share/containers/seccomp.json`) with [`LOADER_SYSCALLS`] allowed
/// whatever the capabilities: the kernel still refuses them without
/// CAP_BPF / CAP_PERFMON, so the capabilities stay the only gate. Every
/// other rule is kept as it is.
pub fn write_loader_seccomp_profile(default: &Path, out: &Path) -> Result<()> {
    let text = fs::read_to_string(default)
        .with_context(|| format!("reading the default seccomp profile {}", default.display()))?;
    let mut profile: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not JSON", default.display()))?;
    let rules = profile["syscalls"]
        .as_array_mut()
        .context("the default seccomp profile has no syscalls list")?;
    for rule in rules.iter_mut() {
        if let Some(names) = rule["names"].as_array_mut() {
            names.retain(|n| !LOADER_SYSCALLS.iter().any(|s| n == s));
        }
    }
    rules.retain(|r| r["names"].as_array().is_some_and(|n| !n.is_empty()));
    rules.push(serde_json::json!({
        "names": LOADER_SYSCALLS,
        "action": "SCMP_ACT_ALLOW",
        "args": [],
        "comment": "dns-egress-gateway: the loader's bpf() and perf_event_open(), gated by CAP_BPF and CAP_PERFMON in the kernel",
    }));
    fs::write(out, serde_json::to_string_pretty(&profile)?)
        .with_context(|| format!("writing {}", out.display()))
}

/// The host's default container seccomp profile.
pub const DEFAULT_SECCOMP_PROFILE: &str = "/usr/share/containers/seccomp.json";
