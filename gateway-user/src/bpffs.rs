//! Making sure the pin directory lives on a mounted bpffs.

use std::{fs, path::Path};

use anyhow::{bail, Context as _, Result};
use nix::{
    fcntl::{Flock, FlockArg},
    mount::{mount, MsFlags},
    sys::statfs::{statfs, BPF_FS_MAGIC},
};

/// Where bpffs is conventionally mounted.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

fn is_bpffs(path: &Path) -> bool {
    statfs(path)
        .map(|s| s.filesystem_type() == BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// Mounts bpffs at /sys/fs/bpf when the pin directory is below it and it is
/// not mounted yet, then creates the pin directory. Fails with advice when
/// the directory is elsewhere and not on bpffs.
pub fn prepare_pin_dir(pin_dir: &Path) -> Result<()> {
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
            mount(Some("bpf"), root, Some("bpf"), MsFlags::empty(), None::<&str>).with_context(
                || format!("mounting bpffs at {BPFFS_ROOT} (needs CAP_SYS_ADMIN; or mount it yourself: mount -t bpf bpf {BPFFS_ROOT})"),
            )?;
            log::info!("mounted bpffs at {BPFFS_ROOT}");
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
             or mount bpffs there (mount -t bpf bpf <dir>)",
            pin_dir.display()
        );
    }
    fs::create_dir_all(pin_dir)
        .with_context(|| format!("creating the pin directory {}", pin_dir.display()))?;
    Ok(())
}
