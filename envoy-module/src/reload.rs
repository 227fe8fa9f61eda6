//! Applying a replaced domains file while Envoy runs. A `dns_gateway`
//! config with `domains_file` has the file watched by one module thread:
//! when the file is replaced (`gateway reload` writes a new one and renames
//! it into place), its domains and metadata become the gateway's patterns,
//! used from the next query and the next connection on. Nothing else moves:
//! no listener is drained, no established connection is touched, no VIP
//! changes.
//!
//! Each application is acknowledged in `<file>.applied`: the digest of the
//! bytes applied and what happened, which `gateway reload` waits for.

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

/// What identifies one version of a file: replaced files get a new inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    inode: u64,
    modified_ns: i128,
    size: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        inode: meta.ino(),
        modified_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        size: meta.size(),
    })
}

struct Watched {
    path: PathBuf,
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

/// Where the acknowledgement of `file` is written.
pub fn ack_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(ACK_SUFFIX);
    PathBuf::from(name)
}

/// Watches `file` for `state` (the config just loaded it). Idempotent per
/// (file, gateway); the watcher thread starts with the first call.
pub fn watch(file: &Path, state: &Arc<GatewayState>) {
    let current = stamp(file);
    {
        let mut list = watched();
        list.retain(|w| w.state.strong_count() > 0);
        match list
            .iter_mut()
            .find(|w| w.path == file && w.state.as_ptr() == Arc::as_ptr(state))
        {
            Some(existing) => existing.seen = current,
            None => list.push(Watched {
                path: file.to_path_buf(),
                state: Arc::downgrade(state),
                seen: current,
            }),
        }
    }
    // The config's own load counts as applied.
    if let Ok(bytes) = std::fs::read(file) {
        acknowledge(file, gateway_common::pinned::fnv1a(&bytes), "applied");
    }
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
        for w in list.iter_mut() {
            let now = stamp(&w.path);
            if now.is_some() && now != w.seen {
                w.seen = now;
                if let Some(state) = w.state.upgrade() {
                    due.push((w.path.clone(), state));
                }
            }
        }
    }
    for (path, state) in due {
        apply(&path, &state);
    }
}

/// Reads `file` and makes its domains the gateway's; a file that does not
/// parse leaves the previous domains in force, loudly.
pub fn apply(file: &Path, state: &GatewayState) {
    match crate::config::read_domains_file(file) {
        Ok((patterns, digest)) => {
            let count = patterns.rules().len();
            state.set_patterns(Arc::new(patterns));
            crate::log_fmt!(
                LogLevel::Info,
                "dns_gateway: reloaded {count} domain patterns from {}",
                file.display()
            );
            acknowledge(file, digest, "applied");
        }
        Err(e) => {
            crate::log_fmt!(
                LogLevel::Error,
                "dns_gateway: the domains file was replaced but is not valid, the previous domains stay in force: {e}"
            );
            let digest = std::fs::read(file)
                .map(|b| gateway_common::pinned::fnv1a(&b))
                .unwrap_or_default();
            acknowledge(file, digest, &format!("rejected: {e}"));
        }
    }
}

/// Writes `<digest> <outcome>` to the acknowledgement file, replacing it
/// whole (written aside, then renamed).
fn acknowledge(file: &Path, digest: u64, outcome: &str) {
    let ack = ack_path(file);
    let mut partial = ack.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let written = std::fs::write(&partial, format!("{digest:016x} {outcome}\n"))
        .and_then(|()| std::fs::rename(&partial, &ack));
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
        let (patterns, _) = crate::config::read_domains_file(&file).unwrap();
        state.set_patterns(Arc::new(patterns));
        watch(&file, &state);
        let ack = || std::fs::read_to_string(ack_path(&file)).unwrap_or_default();
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
