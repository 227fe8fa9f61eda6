//! Making sure the pin directory lives on a mounted bpffs and belongs to
//! the gateway alone: nobody else may create, replace or write into it.

use std::{
    fs,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _},
    path::Path,
};

use anyhow::{bail, Context as _, Result};
pub use gateway_common::BPFFS_ROOT;
use nix::{
    fcntl::{Flock, FlockArg},
    mount::{mount, MsFlags},
    sys::statfs::{statfs, BPF_FS_MAGIC},
};

/// Whether `path` is on a bpffs mount.
pub fn is_bpffs(path: &Path) -> bool {
    statfs(path)
        .map(|s| s.filesystem_type() == BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// Mounts bpffs at /sys/fs/bpf (mode 0711: only root may create or list
/// pins; others may pass through to a pin directory shared with them)
/// when the pin directory is below it and it is not mounted yet, then
/// creates the pin directory (0700, owned by this user) or checks that an
/// existing one is ours. Fails with advice when the directory is elsewhere
/// and not on bpffs, or when someone else owns or can write it.
pub fn prepare_pin_dir(pin_dir: &Path) -> Result<()> {
    gateway_common::contract::check_pin_dir(pin_dir)
        .map_err(|e| anyhow::anyhow!("pin directory: {e}"))?;
    let root = Path::new(BPFFS_ROOT);
    if pin_dir.starts_with(root) && !is_bpffs(root) {
        fs::create_dir_all(root).with_context(|| format!("creating {BPFFS_ROOT}"))?;
        // Several gateways starting at once must not stack several bpffs
        // mounts (pins in a lower one would vanish from view): check again
        // under a lock on the mount point.
        let dir = fs::File::open(root).with_context(|| format!("opening {BPFFS_ROOT}"))?;
        let _lock = Flock::lock(dir, FlockArg::LockExclusive)
            .map_err(|(_, errno)| errno)
            .with_context(|| format!("locking {BPFFS_ROOT}"))?;
        if !is_bpffs(root) {
            mount(
                Some("bpf"),
                root,
                Some("bpf"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some("mode=0711"),
            )
            .with_context(|| {
                format!("mounting bpffs at {BPFFS_ROOT} (needs CAP_SYS_ADMIN; or mount it yourself: mount -t bpf -o mode=0711 bpf {BPFFS_ROOT})")
            })?;
            log::info!("mounted bpffs at {BPFFS_ROOT} (mode 0711)");
        }
    }
    // Check before creating anything, so a wrong path leaves no directory.
    let existing = pin_dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if !is_bpffs(existing) {
        bail!(
            "pin directory {} is not on a bpffs mount; choose a directory under {BPFFS_ROOT} \
             or mount bpffs there (mount -t bpf -o mode=0711 bpf <dir>)",
            pin_dir.display()
        );
    }
    if let Ok(meta) = fs::metadata(root) {
        if is_bpffs(root) && meta.mode() & 0o002 != 0 {
            log::warn!(
                "bpffs at {BPFFS_ROOT} is writable by every user (mode {:o}): they cannot touch the                  gateway's pins, but can squat on directory names; remount it with -o mode=0711",
                meta.mode() & 0o7777
            );
        }
    }
    if let Some(parent) = pin_dir.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    match fs::DirBuilder::new().mode(0o700).create(pin_dir) {
        Ok(()) => log::debug!("created the pin directory {}", pin_dir.display()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(e)
                .with_context(|| format!("creating the pin directory {}", pin_dir.display()))
        }
    }
    check_owned(pin_dir)
}

/// Lets other users pass through the bpffs directories above `pin_dir`
/// (search permission only: they can neither list nor create anything
/// there), so that an unprivileged Envoy can reach the pin directory the
/// loader shares with its group. A bpffs mounted with `mode=0700` (as
/// systemd and older set-ups do) gets `o+x` on its root, and only that.
pub fn allow_traversal(pin_dir: &Path) -> Result<()> {
    for dir in pin_dir.ancestors().skip(1) {
        if !is_bpffs(dir) {
            break;
        }
        let meta = fs::metadata(dir).with_context(|| format!("inspecting {}", dir.display()))?;
        let mode = meta.mode() & 0o7777;
        if mode & 0o001 == 0 {
            fs::set_permissions(
                dir,
                std::os::unix::fs::PermissionsExt::from_mode(mode | 0o001),
            )
            .with_context(|| format!("chmod o+x {}", dir.display()))?;
            log::info!(
                "{} had mode {mode:o}: added search permission for others (not read or write) \
                 so that Envoy's user can reach the pin directory",
                dir.display()
            );
        }
    }
    Ok(())
}

/// Refuses a pin directory (or its parent) that another user owns or may
/// write: whoever can write there can remove or replace the VIP table and
/// so send clients holding a cached answer to another domain.
pub fn check_owned(pin_dir: &Path) -> Result<()> {
    let me = nix::unistd::geteuid().as_raw();
    let meta = fs::symlink_metadata(pin_dir)
        .with_context(|| format!("inspecting the pin directory {}", pin_dir.display()))?;
    let advice = format!(
        "someone else may have created it to take over the gateway's maps; inspect it, remove it \
         (rm -r {}) and start the gateway again",
        pin_dir.display()
    );
    if !meta.file_type().is_dir() {
        bail!(
            "pin directory {} is not a directory; {advice}",
            pin_dir.display()
        );
    }
    if meta.uid() != me {
        bail!(
            "pin directory {} is owned by uid {}, not by the gateway's uid {me}; {advice}",
            pin_dir.display(),
            meta.uid()
        );
    }
    if meta.mode() & 0o022 != 0 {
        bail!(
            "pin directory {} has mode {:o}: writable by group or others; {advice}",
            pin_dir.display(),
            meta.mode() & 0o7777
        );
    }
    if let Some(parent) = pin_dir.parent() {
        let p = fs::metadata(parent).with_context(|| format!("inspecting {}", parent.display()))?;
        let sticky = p.mode() & 0o1000 != 0;
        if p.uid() != me && p.uid() != 0 || (p.mode() & 0o002 != 0 && !sticky) {
            bail!(
                "{} (the parent of the pin directory) can be changed by other users, who could \
                 replace the pin directory; use a parent owned by root and not writable by others",
                parent.display()
            );
        }
    }
    Ok(())
}
