//! Checks on the cgroup the programs are attached to, and moving processes
//! into it.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC};

/// Resolves and checks a cgroup v2 directory. The root cgroup is refused
/// unless `allow_root` is set: attaching there would redirect every process
/// on the machine, including the proxy itself.
pub fn validate(path: &Path, allow_root: bool) -> Result<PathBuf> {
    let canonical = fs::canonicalize(path).with_context(|| {
        format!(
            "cgroup {} does not exist; create it first (mkdir {}) or pick an existing cgroup v2 directory",
            path.display(),
            path.display()
        )
    })?;
    if !canonical.is_dir() {
        bail!("cgroup {} is not a directory", canonical.display());
    }
    let fs_type = statfs(&canonical)
        .with_context(|| format!("statfs {}", canonical.display()))?
        .filesystem_type();
    if fs_type != CGROUP2_SUPER_MAGIC {
        bail!(
            "{} is not on a cgroup v2 filesystem; eBPF cgroup programs need cgroup v2 \
             (look for a cgroup2 line in /proc/mounts, e.g. /sys/fs/cgroup or /sys/fs/cgroup/unified)",
            canonical.display()
        );
    }
    // Only non-root cgroups have a cgroup.type file.
    if !canonical.join("cgroup.type").exists() && !allow_root {
        bail!(
            "{} is the root cgroup: attaching there would redirect every process on the host, \
             including the proxy; use a child cgroup, or pass --force-root-cgroup if you really mean it",
            canonical.display()
        );
    }
    Ok(canonical)
}

/// Moves process `pid` into the cgroup.
pub fn add_process(cgroup: &Path, pid: u32) -> Result<()> {
    let procs = cgroup.join("cgroup.procs");
    fs::write(&procs, pid.to_string())
        .with_context(|| format!("moving pid {pid} into {}", procs.display()))
}

/// The mount point of the cgroup v2 hierarchy (`/sys/fs/cgroup`, or
/// `/sys/fs/cgroup/unified` on hybrid systems).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    // The last one listed: in a container, the host's hierarchy mounted
    // over the container's own is the one in effect.
    mounts
        .lines()
        .rev()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .context("no cgroup v2 hierarchy is mounted (look for cgroup2 in /proc/mounts); eBPF cgroup programs need one")
}

/// An absolute cgroup path as is; a relative one below the cgroup v2 mount.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.is_absolute() {
        Ok(path.to_path_buf())
    } else {
        Ok(cgroup2_mount()?.join(path))
    }
}

/// Creates the cgroup if it does not exist; returns whether it did.
pub fn ensure_exists(path: &Path) -> Result<bool> {
    if path.is_dir() {
        return Ok(false);
    }
    match fs::create_dir(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(e).with_context(|| {
            format!(
                "creating cgroup {}: the parent is not writable here (a container has no \
                 CAP_DAC_OVERRIDE, and cgroup roots are often mode 0555): create it on the \
                 host first (mkdir {})",
                path.display(),
                path.display()
            )
        }),
        Err(e) => Err(e).with_context(|| format!("creating cgroup {}", path.display())),
    }
}

/// The cgroup v2 path of process `pid`, relative to the hierarchy root
/// (the `0::` line of /proc/<pid>/cgroup).
pub fn of_process(pid: u32) -> Result<PathBuf> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .with_context(|| format!("reading /proc/{pid}/cgroup"))?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("process has no cgroup v2 membership")?;
    Ok(cgroup2_mount()?.join(rel.trim_start_matches('/')))
}

/// Fails when this process runs inside `gated` (or below it): the proxy
/// must not be redirected to itself.
pub fn ensure_outside(gated: &Path) -> Result<()> {
    let own = of_process(std::process::id())?;
    let gated = fs::canonicalize(gated).unwrap_or_else(|_| gated.to_path_buf());
    if own.starts_with(&gated) {
        bail!(
            "this process runs inside the gated cgroup {} (it is in {}); run the gateway outside it, \
             or Envoy's own connections would be redirected to itself",
            gated.display(),
            own.display()
        );
    }
    Ok(())
}

/// Removes a cgroup the gateway created, if no process is left in it.
pub fn remove_if_empty(path: &Path) -> Result<bool> {
    let procs = fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
    if !procs.trim().is_empty() {
        return Ok(false);
    }
    fs::remove_dir(path).with_context(|| format!("removing cgroup {}", path.display()))?;
    Ok(true)
}
