//! Applying a replaced domains file while Envoy runs. A `dns_gateway`
//! config with `domains_file` has the file watched by one module thread:
//! when the file is replaced (`gateway reload` writes a new one and renames
//! it into place), its domains and metadata become the gateway's patterns,
//! used from the next query and the next connection on. Nothing else moves:
//! no listener is drained, no established connection is touched, no VIP
//! changes.
//!
//! Each application is acknowledged (in the config's `domains_ack`, else
//! `<file>.applied`): the digest of the bytes applied and what happened,
//! which `gateway reload` waits for.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, Once, OnceLock, Weak},
    time::Duration,
};

use crate::{api::LogLevel, state::GatewayState};

/// How often the watcher looks at the files (one `stat` each).
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Suffix of the acknowledgement file written next to a domains file.
pub const ACK_SUFFIX: &str = ".applied";

/// One version of a file: a replaced file has a new inode; the digest is
/// of the bytes actually read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileVersion {
    inode: u64,
    modified_ns: i128,
    size: u64,
    /// FNV-1a of the bytes read.
    pub digest: u64,
}

/// (inode, modification time, size) of a path, without reading it.
type Stamp = (u64, i128, u64);

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some(stamp_of(&meta))
}

fn stamp_of(meta: &std::fs::Metadata) -> Stamp {
    (
        meta.ino(),
        i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        meta.size(),
    )
}

/// Reads a file once, with the version of exactly what was read (the
/// metadata of the opened file, the digest of its bytes).
pub fn read_versioned(path: &Path) -> std::io::Result<(Vec<u8>, FileVersion)> {
    use std::io::Read as _;
    let mut file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.read_to_end(&mut bytes)?;
    let (inode, modified_ns, size) = stamp_of(&meta);
    let version = FileVersion {
        inode,
        modified_ns,
        size,
        digest: gateway_common::pinned::fnv1a(&bytes),
    };
    Ok((bytes, version))
}

struct Watched {
    path: PathBuf,
    ack: PathBuf,
    state: Weak<GatewayState>,
    seen: Option<Stamp>,
}

static WATCHED: OnceLock<Mutex<Vec<Watched>>> = OnceLock::new();
static WATCHER: Once = Once::new();

fn watched() -> std::sync::MutexGuard<'static, Vec<Watched>> {
    WATCHED
        .get_or_init(|| Mutex::new(Vec::new()))
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Where the acknowledgement of `file` goes unless the config names a
/// place (`domains_ack`).
pub fn ack_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(ACK_SUFFIX);
    PathBuf::from(name)
}

/// Watches `file` for `state`, which a config just loaded at `version`
/// (acknowledged now, into `ack`). Idempotent per (file, gateway); the
/// watcher thread starts with the first call.
pub fn watch(file: &Path, ack: &Path, version: FileVersion, state: &Arc<GatewayState>) {
    let seen = Some((version.inode, version.modified_ns, version.size));
    {
        let mut list = watched();
        list.retain(|w| w.state.strong_count() > 0);
        match list
            .iter_mut()
            .find(|w| w.path == file && w.state.as_ptr() == Arc::as_ptr(state))
        {
            Some(existing) => {
                existing.seen = seen;
                existing.ack = ack.to_path_buf();
            }
            None => list.push(Watched {
                path: file.to_path_buf(),
                ack: ack.to_path_buf(),
                state: Arc::downgrade(state),
                seen,
            }),
        }
    }
    acknowledge(ack, version.digest, "applied");
    WATCHER.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("gw-domains-watch".to_owned())
            .spawn(|| loop {
                std::thread::sleep(POLL_INTERVAL);
                // A panic here must not end the watching (nor Envoy).
                let _ = std::panic::catch_unwind(poll_once);
            });
        if let Err(e) = spawned {
            crate::log_fmt!(
                LogLevel::Error,
                "dns_gateway: cannot start the domains file watcher ({e}): `gateway reload` will not apply domain changes until Envoy restarts"
            );
        }
    });
}

/// One pass over the watched files: applies those replaced since.
pub fn poll_once() {
    let mut due = Vec::new();
    {
        let mut list = watched();
        list.retain(|w| w.state.strong_count() > 0);
        for w in list.iter() {
            let now = stamp(&w.path);
            if now.is_some() && now != w.seen {
                if let Some(state) = w.state.upgrade() {
                    due.push((w.path.clone(), w.ack.clone(), state));
                }
            }
        }
    }
    for (path, ack, state) in due {
        let applied = apply(&path, &ack, &state);
        let mut list = watched();
        if let Some(w) = list
            .iter_mut()
            .find(|w| w.path == path && w.state.as_ptr() == Arc::as_ptr(&state))
        {
            // What was read, not what is there now: a file replaced again
            // meanwhile is seen as new at the next pass.
            w.seen = applied.map(|v| (v.inode, v.modified_ns, v.size)).or(w.seen);
        }
    }
}

/// Reads `file` and makes its domains the gateway's; a file that does not
/// parse leaves the previous domains in force, loudly. Returns the version
/// read.
pub fn apply(file: &Path, ack: &Path, state: &GatewayState) -> Option<FileVersion> {
    match crate::config::read_domains_file_versioned(file) {
        Ok((patterns, version)) => {
            let count = patterns.rules().len();
            state.set_patterns(Arc::new(patterns));
            crate::log_fmt!(
                LogLevel::Info,
                "dns_gateway: reloaded {count} domain patterns from {}",
                file.display()
            );
            acknowledge(ack, version.digest, "applied");
            Some(version)
        }
        Err((e, version)) => {
            crate::log_fmt!(
                LogLevel::Error,
                "dns_gateway: the domains file was replaced but is not valid, the previous domains stay in force: {e}"
            );
            if let Some(version) = version {
                acknowledge(ack, version.digest, &format!("rejected: {e}"));
            }
            version
        }
    }
}

/// Writes `<digest> <outcome>` to the acknowledgement file, replacing it
/// whole (written aside, then renamed).
fn acknowledge(ack: &Path, digest: u64, outcome: &str) {
    let mut partial = ack.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let _ = std::fs::remove_file(&partial);
    // Readable by the gateway through Envoy's group, whatever the umask.
    let written = std::fs::write(&partial, format!("{digest:016x} {outcome}\n"))
        .and_then(|()| {
            std::fs::set_permissions(
                &partial,
                std::os::unix::fs::PermissionsExt::from_mode(0o640),
            )
        })
        .and_then(|()| std::fs::rename(&partial, ack));
    if let Err(e) = written {
        crate::log_fmt!(
            LogLevel::Warn,
            "dns_gateway: cannot acknowledge the domains file in {}: {e}",
            ack.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> Arc<GatewayState> {
        Arc::new(GatewayState::new(
            Path::new("/nonexistent-pins"),
            Arc::new(crate::pinned::PinnedMaps),
        ))
    }

    fn write(path: &Path, text: &str) {
        let staged = path.with_extension("staged");
        std::fs::write(&staged, text).unwrap();
        std::fs::rename(&staged, path).unwrap();
    }

    #[test]
    fn a_replaced_file_is_applied_and_a_broken_one_leaves_the_domains_in_force() {
        let dir = std::env::temp_dir().join(format!("gw-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("domains.json");
        write(
            &file,
            r#"[{"domain":"*.a.com","metadata":{"cluster":"one"}}]"#,
        );
        let state = state();
        let (patterns, version) = crate::config::read_domains_file(&file).unwrap();
        state.set_patterns(Arc::new(patterns));
        let ack_file = dir.join("ack");
        watch(&file, &ack_file, version, &state);
        let ack = || std::fs::read_to_string(&ack_file).unwrap_or_default();
        assert!(
            ack().ends_with(" applied\n"),
            "the initial load is acknowledged: {:?}",
            ack()
        );
        let cluster = |name: &str| {
            state.with_patterns(|p| {
                p.best_match(name)
                    .and_then(|r| r.metadata.get("cluster").cloned())
            })
        };
        assert_eq!(cluster("x.a.com").as_deref(), Some("one"));

        write(
            &file,
            r#"[{"domain":"*.a.com","metadata":{"cluster":"two"}},{"domain":"b.org"}]"#,
        );
        poll_once();
        assert_eq!(
            cluster("x.a.com").as_deref(),
            Some("two"),
            "applied from the next query on"
        );
        assert!(state.with_patterns(|p| p.best_match("b.org").is_some()));
        let bytes = std::fs::read(&file).unwrap();
        let digest = format!("{:016x} applied", gateway_common::pinned::fnv1a(&bytes));
        assert_eq!(ack().trim(), digest);

        write(&file, r#"[{"domain":"a b"}]"#);
        poll_once();
        assert_eq!(
            cluster("x.a.com").as_deref(),
            Some("two"),
            "a broken file changes nothing"
        );
        assert!(ack().contains("rejected: domains_file"), "{:?}", ack());
        poll_once();
        assert!(
            ack().contains("rejected"),
            "an unchanged file is not applied again"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
