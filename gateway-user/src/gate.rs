//! Which cgroups are gated. The programs are attached once, to a parent
//! cgroup (the configuration's `cgroup`); a process below it is redirected
//! only when its own cgroup or an ancestor is in the pinned gate table
//! (`GW_GATED`). Adding or removing a workload is one map update: no
//! reattach, no Envoy restart, no VIP touched, and the siblings of a gated
//! cgroup stay untouched.

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use gateway_common::{pinned::PinDir, GateOrigin, MAX_GATE_DEPTH};
use serde::Serialize;

use crate::cgroup;

/// A cgroup as the gate table knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GatedCgroup {
    /// Canonical path of the cgroup directory.
    pub path: PathBuf,
    /// cgroup v2 id (the directory's inode number), what the programs see.
    pub id: u64,
    /// Level below the cgroup v2 root (the root is 0).
    pub level: u32,
}

/// The level of a cgroup directory: how many directories it is below the
/// cgroup v2 mount. Right when the mount shows the host's hierarchy (the
/// host's cgroup namespace), which the programs' ancestor lookup assumes.
pub fn level_of(path: &Path) -> Result<u32> {
    let mount =
        fs::canonicalize(cgroup::cgroup2_mount()?).context("resolving the cgroup2 mount")?;
    let below = path.strip_prefix(&mount).with_context(|| {
        format!(
            "{} is not below the cgroup v2 mount {}",
            path.display(),
            mount.display()
        )
    })?;
    Ok(below.components().count() as u32)
}

/// Resolves a cgroup to gate below `attach` (canonical, the cgroup the
/// programs are attached to): a relative path is taken below `attach`. It
/// must exist, be `attach` or below it (elsewhere the programs never run)
/// and at most [`MAX_GATE_DEPTH`]` - 1` levels deeper.
pub fn identify(attach: &Path, path: &Path) -> Result<GatedCgroup> {
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        attach.join(path)
    };
    let canonical = fs::canonicalize(&joined).with_context(|| {
        format!(
            "cgroup {} does not exist (create it first: mkdir {})",
            joined.display(),
            joined.display()
        )
    })?;
    let Ok(below) = canonical.strip_prefix(attach) else {
        bail!(
            "{} is not below {}, the cgroup the gateway's programs are attached to: its processes \
             would never be seen; gate a cgroup below it, or attach the gateway higher up \
             (the configuration's `cgroup`)",
            canonical.display(),
            attach.display()
        );
    };
    let depth = below.components().count() as u32;
    if depth >= MAX_GATE_DEPTH {
        bail!(
            "{} is {depth} levels below the attach cgroup {}; the programs look at most {} levels \
             down: gate one of its ancestors instead",
            canonical.display(),
            attach.display(),
            MAX_GATE_DEPTH - 1
        );
    }
    let meta =
        fs::metadata(&canonical).with_context(|| format!("reading {}", canonical.display()))?;
    if !canonical.join("cgroup.procs").exists() {
        bail!("{} is not a cgroup v2 directory", canonical.display());
    }
    Ok(GatedCgroup {
        level: level_of(&canonical)?,
        id: meta.ino(),
        path: canonical,
    })
}

/// Makes the configuration's list the set of [`GateOrigin::Config`]
/// entries: listed cgroups are gated (an entry `gateway gate` or
/// `gate-pods` made keeps its origin), configured ones no longer listed
/// are ungated. Returns (gated, ungated) counts.
pub fn sync_configured(pin_dir: &PinDir, wanted: &[GatedCgroup]) -> Result<(usize, usize)> {
    let mut table = pin_dir.gated()?;
    let mut gated = 0;
    for cgroup in wanted {
        let existing = table.get(cgroup.id)?;
        let other_origin = existing.is_some_and(|e| e.origin != GateOrigin::Config as u32);
        if !other_origin {
            if existing.is_none() {
                gated += 1;
            }
            table.gate(cgroup.id, cgroup.level, GateOrigin::Config)?;
        }
    }
    let keep: BTreeSet<u64> = wanted.iter().map(|c| c.id).collect();
    let mut ungated = 0;
    for (id, entry) in table.entries()? {
        if entry.origin == GateOrigin::Config as u32 && !keep.contains(&id) && table.ungate(id)? {
            ungated += 1;
        }
    }
    Ok((gated, ungated))
}

/// The cgroup the programs in `pin_dir` are attached to, from the
/// loader's record.
pub fn attach_cgroup(pin_dir: &PinDir) -> Result<PathBuf> {
    let info = pin_dir.loader_info().with_context(|| {
        format!(
            "no gateway has attached its programs with pin directory {}",
            pin_dir.path().display()
        )
    })?;
    let len = (info.cgroup_path_len as usize).min(info.cgroup_path.len());
    if len == 0 {
        bail!(
            "no gateway has attached its programs with pin directory {} (start `gateway run` first)",
            pin_dir.path().display()
        );
    }
    let recorded = PathBuf::from(String::from_utf8_lossy(&info.cgroup_path[..len]).into_owned());
    Ok(recorded)
}

/// One cgroup named on the command line of `gateway ungate`: a path, or
/// the id of a cgroup that no longer exists (as `gateway status` lists).
pub fn ungate_target(attach: &Path, arg: &str) -> Result<u64> {
    if let Ok(id) = arg.parse::<u64>() {
        if !attach.join(arg).exists() {
            return Ok(id);
        }
    }
    Ok(identify(attach, Path::new(arg))?.id)
}

/// Where each gated id lives below `attach` (a walk of at most
/// [`MAX_GATE_DEPTH`] levels); ids not found belong to removed cgroups.
pub fn paths_by_id(attach: &Path, ids: &BTreeSet<u64>) -> std::collections::BTreeMap<u64, PathBuf> {
    let mut found = std::collections::BTreeMap::new();
    let mut stack = vec![(attach.to_path_buf(), 0u32)];
    while let Some((dir, depth)) = stack.pop() {
        if found.len() == ids.len() {
            break;
        }
        if let Ok(meta) = fs::metadata(&dir) {
            if ids.contains(&meta.ino()) {
                found.insert(meta.ino(), dir.clone());
            }
        }
        if depth + 1 >= MAX_GATE_DEPTH {
            continue;
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push((entry.path(), depth + 1));
                }
            }
        }
    }
    found
}
