//! The program links, pinned on bpffs next to the maps (`<pin dir>/links/`),
//! so that the gate outlives the loader: a loader that crashes leaves every
//! program attached, and the next one adopts or replaces them. Only a clean
//! stop (or `gateway reset`) removes the pins, which detaches the programs.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use aya::programs::links::{FdLink, PinnedLink};

/// Directory of the link pins inside a pin directory.
pub fn dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

/// Names of the programs whose links are pinned in `pin_dir`.
pub fn pinned(pin_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir(pin_dir))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    // Temporary pins a crash left mid-rename are listed too, so that the
    // next loader releases them.
    names.sort();
    names
}

/// Pins `link` as the link of `program`, replacing a pin of that name
/// (whose link, and so the old program's attachment, is released once
/// this one is pinned: the new program is already attached, so there is
/// no moment without one).
pub fn pin(pin_dir: &Path, program: &str, link: FdLink) -> Result<()> {
    let links = dir(pin_dir);
    fs::create_dir_all(&links).with_context(|| format!("creating {}", links.display()))?;
    let path = links.join(program);
    // Pinned under a temporary name, then renamed over the old pin in one
    // step: at no moment (not even if this process dies here) is the
    // program's slot without a pinned link.
    // (bpffs refuses names with a dot.)
    let fresh = links.join(format!("{program}_new"));
    let _ = fs::remove_file(&fresh);
    let pinned = link
        .pin(&fresh)
        .with_context(|| format!("pinning the link of {program} at {}", fresh.display()))?;
    fs::rename(&fresh, &path)
        .with_context(|| format!("moving the pin of {program} to {}", path.display()))?;
    // The old pin is gone with the rename; dropping the last reference to
    // its link detaches the old program. This process's reference to the
    // new link goes too; the pin keeps it.
    drop(pinned);
    Ok(())
}

/// The id of the program behind the pinned link of `program`, if pinned.
pub fn program_id(pin_dir: &Path, program: &str) -> Option<u32> {
    let link = PinnedLink::from_pin(dir(pin_dir).join(program)).ok()?;
    let link: FdLink = link.into();
    link.info().ok().map(|info| info.program_id())
}

/// Removes every link pin of `pin_dir` (detaching those programs) and the
/// links directory; the number removed.
pub fn unpin_all(pin_dir: &Path) -> Result<usize> {
    let mut removed = 0;
    for name in pinned(pin_dir) {
        let path = dir(pin_dir).join(&name);
        match PinnedLink::from_pin(&path) {
            Ok(link) => {
                let _detached = link
                    .unpin()
                    .with_context(|| format!("unpinning {}", path.display()))?;
            }
            // Not a link (or already gone): remove the file all the same.
            Err(_) => {
                let _ = fs::remove_file(&path);
            }
        }
        removed += 1;
    }
    let links = dir(pin_dir);
    if links.exists() {
        fs::remove_dir(&links).with_context(|| format!("removing {}", links.display()))?;
    }
    Ok(removed)
}
