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
