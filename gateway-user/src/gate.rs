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
/// and at most at level [`MAX_GATE_DEPTH`]` - 1`.
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
    let level = level_of(&canonical)?;
    if level >= MAX_GATE_DEPTH {
        bail!(
            "{} is at cgroup level {level}; the programs look at levels 0 to {} (below {}): \
             gate one of its ancestors instead",
            canonical.display(),
            MAX_GATE_DEPTH - 1,
            below.display()
        );
    }
    let meta =
        fs::metadata(&canonical).with_context(|| format!("reading {}", canonical.display()))?;
    if !canonical.join("cgroup.procs").exists() {
        bail!("{} is not a cgroup v2 directory", canonical.display());
    }
    Ok(GatedCgroup {
        level,
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

/// How often `gateway run` checks that its configured cgroups are still
/// the ones gated (see [`regate_configured`]).
pub const REGATE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

/// Gates the configured cgroups again when one of them has a new id (it
/// was removed and created again under the same path). `known` holds the
/// ids seen last time; a cheap check (one `stat` per configured cgroup)
/// unless something changed. Missing cgroups are skipped (gated again
/// once they exist). Returns whether the gate table was updated.
pub fn regate_configured(
    pin_dir: &PinDir,
    config: &crate::config::Config,
    known: &mut Vec<u64>,
) -> Result<bool> {
    let attach = config.attach_cgroup()?;
    let current: Vec<GatedCgroup> = config
        .gated_cgroups()?
        .iter()
        .filter_map(|path| identify(&attach, path).ok())
        .collect();
    let ids: Vec<u64> = current.iter().map(|c| c.id).collect();
    if ids == *known {
        return Ok(false);
    }
    let first = known.is_empty();
    sync_configured(pin_dir, &current)?;
    if !first {
        log::info!(
            "configured cgroups changed identity (removed and created again?): gated again ({} of {})",
            current.len(),
            config.gated_cgroups()?.len()
        );
    }
    *known = ids;
    Ok(true)
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

/// One pod of a Kubernetes PodList, as `gateway gate-pods` needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    /// `namespace/name`, for messages.
    pub name: String,
    /// `metadata.uid`, which names its cgroup.
    pub uid: String,
    /// `spec.hostNetwork`: only such pods share the gateway's network
    /// namespace, where the kernel programs redirect.
    pub host_network: bool,
}

/// Reads the pods of a PodList (`GET /api/v1/pods?...`) that are not
/// finished. Anything else than a PodList is an error, so that a failed
/// API call never reads as "no pods" (which would ungate them all).
pub fn parse_pod_list(text: &str) -> Result<Vec<Pod>> {
    let value: serde_json::Value =
        serde_json::from_str(text).context("the pod list is not JSON")?;
    if value["kind"] != "PodList" {
        bail!(
            "expected a Kubernetes PodList, got kind {}; nothing changed",
            value["kind"]
        );
    }
    let items = value["items"]
        .as_array()
        .context("the PodList has no items array; nothing changed")?;
    let mut pods = Vec::new();
    for item in items {
        let phase = item["status"]["phase"].as_str().unwrap_or_default();
        if phase == "Succeeded" || phase == "Failed" {
            continue;
        }
        let uid = item["metadata"]["uid"]
            .as_str()
            .filter(|u| !u.is_empty() && u.chars().all(|c| c.is_ascii_hexdigit() || c == '-'))
            .with_context(|| format!("a pod without a valid metadata.uid: {}", item["metadata"]))?;
        pods.push(Pod {
            name: format!(
                "{}/{}",
                item["metadata"]["namespace"].as_str().unwrap_or("?"),
                item["metadata"]["name"].as_str().unwrap_or("?")
            ),
            uid: uid.to_owned(),
            host_network: item["spec"]["hostNetwork"] == true,
        });
    }
    Ok(pods)
}

/// Whether a cgroup directory name is the one of the pod with `uid`, as
/// the kubelet names them: `pod<uid>` (cgroupfs driver) or
/// `kubepods-<qos>-pod<uid with _ for ->.slice` (systemd driver).
pub fn is_pod_cgroup(dir_name: &str, uid: &str) -> bool {
    let dashed = format!("pod{uid}");
    let underscored = format!("pod{}", uid.replace('-', "_"));
    dir_name == dashed || dir_name.ends_with(&format!("-{underscored}.slice"))
}

/// The cgroup of each pod below `kubepods_root`, by uid, where the
/// kubelet puts them: directly below it (guaranteed pods) or one level
/// down (below a QoS class). Nothing deeper is looked at (a container's
/// own cgroups cannot pass for a pod), and a uid matching two directories
/// is left out (returned as ambiguous).
pub fn find_pod_cgroups(
    kubepods_root: &Path,
    pods: &[Pod],
) -> (std::collections::BTreeMap<String, PathBuf>, Vec<String>) {
    let mut found: std::collections::BTreeMap<String, PathBuf> = std::collections::BTreeMap::new();
    let mut ambiguous = BTreeSet::new();
    let subdirs = |dir: &Path| -> Vec<(String, PathBuf)> {
        fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut consider = |name: &str, path: &Path| -> bool {
        let Some(pod) = pods.iter().find(|p| is_pod_cgroup(name, &p.uid)) else {
            return false;
        };
        if found.insert(pod.uid.clone(), path.to_path_buf()).is_some() {
            ambiguous.insert(pod.uid.clone());
        }
        true
    };
    for (name, path) in subdirs(kubepods_root) {
        if consider(&name, &path) {
            continue;
        }
        for (name, path) in subdirs(&path) {
            consider(&name, &path);
        }
    }
    for uid in &ambiguous {
        found.remove(uid);
    }
    (found, ambiguous.into_iter().collect())
}

/// What one `gateway gate-pods` round did.
#[derive(Debug, Default, Serialize)]
pub struct PodSync {
    /// Pods gated now (new and already gated).
    pub gated: usize,
    /// Of those, gated by this round.
    pub newly_gated: usize,
    /// Pod cgroups ungated because their pod is no longer listed.
    pub ungated: usize,
    /// Pods whose cgroup does not exist (yet): gated by a later round.
    pub not_found: Vec<String>,
    /// Pods with their own network namespace: gated, but the kernel
    /// leaves them alone (the gateway serves its own namespace).
    pub own_network: Vec<String>,
    /// Pods that could not be gated, with the reason.
    pub failed: Vec<String>,
}

/// Makes the set of [`GateOrigin::Pod`] entries the cgroups of `pods`:
/// listed pods found below `kubepods_root` are gated, pods gated before
/// and no longer listed are ungated. Entries of other origins are left
/// alone. One pod that cannot be gated (outside the attach cgroup, a full
/// table) is reported and does not stop the others.
pub fn sync_pods(pin_dir: &PinDir, kubepods_root: &Path, pods: &[Pod]) -> Result<PodSync> {
    let attach = attach_cgroup(pin_dir)?;
    let root = fs::canonicalize(kubepods_root)
        .with_context(|| format!("--kubepods-root {}", kubepods_root.display()))?;
    // An unreadable root must not read as "no pods" (which would ungate
    // them all).
    fs::read_dir(&root).with_context(|| {
        format!(
            "listing --kubepods-root {}; nothing changed",
            root.display()
        )
    })?;
    let (cgroups, ambiguous) = find_pod_cgroups(&root, pods);
    let mut table = pin_dir.gated()?;
    let mut sync = PodSync::default();
    let mut wanted = Vec::new();
    for pod in pods {
        if ambiguous.contains(&pod.uid) {
            sync.failed
                .push(format!("{}: two cgroups match its uid", pod.name));
            continue;
        }
        let Some(path) = cgroups.get(&pod.uid) else {
            sync.not_found.push(pod.name.clone());
            continue;
        };
        match identify(&attach, path) {
            Ok(cgroup) => wanted.push((pod, cgroup)),
            Err(e) => sync.failed.push(format!("{}: {e:#}", pod.name)),
        }
    }
    // Ungate first (a full table must not keep gone pods gated), but not
    // while a listed pod could not be resolved: its entry is not known and
    // must not be taken for a gone pod's.
    let keep: BTreeSet<u64> = wanted.iter().map(|(_, c)| c.id).collect();
    if sync.failed.is_empty() {
        for (id, entry) in table.entries()? {
            if entry.origin == GateOrigin::Pod as u32 && !keep.contains(&id) && table.ungate(id)? {
                sync.ungated += 1;
            }
        }
    }
    for (pod, cgroup) in wanted {
        if !pod.host_network {
            sync.own_network.push(pod.name.clone());
        }
        let existing = table.get(cgroup.id)?;
        if existing.is_some_and(|e| e.origin != GateOrigin::Pod as u32) {
            sync.gated += 1;
            continue;
        }
        match table.gate(cgroup.id, cgroup.level, GateOrigin::Pod) {
            Ok(()) => {
                sync.gated += 1;
                if existing.is_none() {
                    sync.newly_gated += 1;
                }
            }
            Err(e) => sync.failed.push(format!("{}: {e:#}", pod.name)),
        }
    }
    Ok(sync)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_cgroups_are_recognised_in_both_kubelet_layouts() {
        let uid = "0f1e2d3c-4b5a-6978-8695-a4b3c2d1e0f9";
        let table: &[(&str, bool)] = &[
            ("pod0f1e2d3c-4b5a-6978-8695-a4b3c2d1e0f9", true),
            (
                "kubepods-besteffort-pod0f1e2d3c_4b5a_6978_8695_a4b3c2d1e0f9.slice",
                true,
            ),
            (
                "kubepods-burstable-pod0f1e2d3c_4b5a_6978_8695_a4b3c2d1e0f9.slice",
                true,
            ),
            (
                "kubepods-pod0f1e2d3c_4b5a_6978_8695_a4b3c2d1e0f9.slice",
                true,
            ),
            ("pod0f1e2d3c-4b5a-6978-8695-a4b3c2d1e0f8", false),
            (
                "kubepods-besteffort-pod0f1e2d3c_4b5a_6978_8695_a4b3c2d1e0f9.slice.bak",
                false,
            ),
            ("cri-containerd-0f1e2d3c.scope", false),
            ("besteffort", false),
        ];
        for (name, expected) in table {
            assert_eq!(is_pod_cgroup(name, uid), *expected, "{name}");
        }
    }

    #[test]
    fn only_a_pod_list_is_read_and_finished_pods_are_skipped() {
        let list = r#"{"kind":"PodList","items":[
            {"metadata":{"namespace":"a","name":"web","uid":"11-22"},"spec":{"hostNetwork":true},"status":{"phase":"Running"}},
            {"metadata":{"namespace":"a","name":"job","uid":"33-44"},"spec":{},"status":{"phase":"Succeeded"}},
            {"metadata":{"namespace":"b","name":"db","uid":"55-66"},"spec":{},"status":{"phase":"Pending"}}]}"#;
        let pods = parse_pod_list(list).expect("a pod list");
        assert_eq!(
            pods,
            vec![
                Pod {
                    name: "a/web".into(),
                    uid: "11-22".into(),
                    host_network: true
                },
                Pod {
                    name: "b/db".into(),
                    uid: "55-66".into(),
                    host_network: false
                },
            ]
        );
        let refused: &[(&str, &str)] = &[
            ("", "not JSON"),
            (
                r#"{"kind":"Status","status":"Failure","code":403}"#,
                "expected a Kubernetes PodList",
            ),
            (r#"{"kind":"PodList"}"#, "no items"),
            (
                r#"{"kind":"PodList","items":[{"metadata":{"uid":"../x"}}]}"#,
                "valid metadata.uid",
            ),
        ];
        for (text, expected) in refused {
            let e = format!("{:#}", parse_pod_list(text).expect_err("refused"));
            assert!(e.contains(expected), "{text}: {e}");
        }
    }
}
