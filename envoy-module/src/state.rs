//! Process-wide state shared by both filters and all Envoy workers.
//!
//! - the VIP table ([`VipAllocator`]) behind one mutex, so a name gets the
//!   same VIP whichever worker answers it;
//! - the domain patterns of the latest `dns_gateway` config, which
//!   `cache_lookup` uses to find a domain's metadata;
//! - the pin directory of that config and the opened original-destination
//!   map.
//!
//! Locks are never held across a call into Envoy, and a poisoned lock (a
//! panic elsewhere, caught by the hook) is recovered: the data it guards is
//! always left consistent between statements.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock},
    time::{Duration, Instant},
};

use gateway_common::DEFAULT_PIN_DIR;

use crate::{
    allocator::{AllocError, Allocated, Pool, VipAllocator},
    api::{log, LogLevel},
    matcher::PatternSet,
    pinned::{MapOpener, OrigDstSource, PinnedMaps},
};

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn read<T: Clone>(lock: &RwLock<T>) -> T {
    lock.read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone()
}

fn write<T>(lock: &RwLock<T>, value: T) {
    *lock
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner()) = value;
}

#[derive(Default)]
struct OrigDstSlot {
    dir: Option<PathBuf>,
    source: Option<Box<dyn OrigDstSource>>,
    opened_at: Option<Instant>,
}

/// Shortest time between two reopenings of the original-destination map
/// on a miss: a flood of connections that are not to a VIP must not turn
/// into a flood of bpf() calls under the process-wide lock.
pub const REOPEN_INTERVAL: Duration = Duration::from_secs(1);

/// State shared by every filter instance of the process.
pub struct GatewayState {
    allocator: Mutex<VipAllocator>,
    patterns: RwLock<Arc<PatternSet>>,
    pin_dir: RwLock<PathBuf>,
    opener: Arc<dyn MapOpener>,
    orig_dst: Mutex<OrigDstSlot>,
    reopen_interval: Duration,
}

static GLOBAL: OnceLock<Arc<GatewayState>> = OnceLock::new();

impl GatewayState {
    /// Fresh state that opens maps with `opener`.
    pub fn new(opener: Arc<dyn MapOpener>) -> Self {
        Self {
            allocator: Mutex::new(VipAllocator::new()),
            patterns: RwLock::new(Arc::new(PatternSet::default())),
            pin_dir: RwLock::new(PathBuf::from(DEFAULT_PIN_DIR)),
            opener,
            orig_dst: Mutex::new(OrigDstSlot::default()),
            reopen_interval: REOPEN_INTERVAL,
        }
    }

    /// The same state with another minimum time between reopenings of the
    /// original-destination map (tests use zero).
    pub fn with_reopen_interval(mut self, interval: Duration) -> Self {
        self.reopen_interval = interval;
        self
    }

    /// The state of this process (real pinned maps).
    pub fn global() -> Arc<Self> {
        GLOBAL
            .get_or_init(|| Arc::new(Self::new(Arc::new(PinnedMaps))))
            .clone()
    }

    /// Registers a `dns_gateway` config: its patterns and pin directory
    /// become the process's, and the VIP table is (re)loaded from the
    /// pinned VIP map when there is one. Returns a summary for the log.
    pub fn register(&self, patterns: Arc<PatternSet>, pin_dir: &Path) -> String {
        write(&self.patterns, patterns);
        write(&self.pin_dir, pin_dir.to_path_buf());
        let store = match self.opener.open_vips(pin_dir) {
            Ok(store) => store,
            Err(e) => {
                let allocator = lock(&self.allocator);
                if allocator.has_store() {
                    // A transient failure must not detach a working store.
                    return format!(
                        "cannot reopen the pinned VIP map in {} ({e}); keeping the one already open",
                        pin_dir.display()
                    );
                }
                drop(allocator);
                log(
                    LogLevel::Warn,
                    &format!("dns_gateway: cannot open the pinned VIP map in {}: {e}; VIPs stay in this process", pin_dir.display()),
                );
                None
            }
        };
        let persistent = store.is_some();
        let mut allocator = lock(&self.allocator);
        match allocator.attach_store(store) {
            Ok(loaded) if persistent => format!(
                "VIP table persisted in {} ({loaded} VIPs loaded)",
                pin_dir.display()
            ),
            Ok(_) => format!(
                "no pinned VIP map in {}: VIP table in this process only",
                pin_dir.display()
            ),
            Err(e) => format!("VIP map in {}: {e}", pin_dir.display()),
        }
    }

    /// The patterns of the latest `dns_gateway` config.
    pub fn patterns(&self) -> Arc<PatternSet> {
        read(&self.patterns)
    }

    /// The pin directory of the latest `dns_gateway` config.
    pub fn pin_dir(&self) -> PathBuf {
        read(&self.pin_dir)
    }

    /// The VIP of `domain` in `pool` (see [`VipAllocator::allocate`]).
    pub fn allocate(&self, domain: &str, pool: &Pool) -> Result<Allocated, AllocError> {
        lock(&self.allocator).allocate(domain, pool)
    }

    /// The domain `vip` stands for.
    pub fn domain_of(&self, vip: Ipv4Addr) -> Option<String> {
        lock(&self.allocator).domain_of(vip)
    }

    /// Every (VIP, domain) pair known in this process.
    pub fn entries(&self) -> Vec<(Ipv4Addr, String)> {
        lock(&self.allocator).entries()
    }

    /// Whether the VIP table is backed by a pinned map.
    pub fn is_persistent(&self) -> bool {
        lock(&self.allocator).has_store()
    }

    /// The original destination of `client` from the pinned map in `dir`
    /// (opened on first use; `reopen` opens it again, e.g. after a loader
    /// restart recreated it, at most once per reopen interval).
    pub fn original_destination(
        &self,
        dir: &Path,
        client: SocketAddrV4,
        reopen: bool,
    ) -> Option<SocketAddrV4> {
        let mut slot = lock(&self.orig_dst);
        let may_reopen = reopen
            && slot
                .opened_at
                .is_none_or(|at| at.elapsed() >= self.reopen_interval);
        if may_reopen || slot.dir.as_deref() != Some(dir) {
            slot.dir = Some(dir.to_path_buf());
            slot.opened_at = Some(Instant::now());
            slot.source = match self.opener.open_orig_dst(dir) {
                Ok(source) => source,
                Err(e) => {
                    log(LogLevel::Debug, &format!("cache_lookup: {e}"));
                    None
                }
            };
        }
        let source = slot.source.as_ref()?;
        match source.lookup(client) {
            Ok(found) => found,
            Err(e) => {
                log(
                    LogLevel::Debug,
                    &format!("cache_lookup: original destination of {client}: {e}"),
                );
                None
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{
        collections::HashMap,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use super::*;
    use crate::allocator::{tests::MemStore, VipStore};

    /// Fake pinned maps: an optional VIP store and an original-destination
    /// table whose opens are counted.
    #[derive(Default)]
    pub(crate) struct FakeMaps {
        pub vips: Mutex<Option<MemStore>>,
        pub orig_dst: Arc<Mutex<Option<HashMap<SocketAddrV4, SocketAddrV4>>>>,
        pub orig_dst_opens: AtomicUsize,
    }

    struct FakeOrigDst(HashMap<SocketAddrV4, SocketAddrV4>);

    impl OrigDstSource for FakeOrigDst {
        fn lookup(&self, client: SocketAddrV4) -> Result<Option<SocketAddrV4>, String> {
            Ok(self.0.get(&client).copied())
        }
    }

    impl MapOpener for FakeMaps {
        fn open_vips(&self, _dir: &Path) -> Result<Option<Box<dyn VipStore>>, String> {
            Ok(self
                .vips
                .lock()
                .unwrap()
                .clone()
                .map(|s| Box::new(s) as Box<dyn VipStore>))
        }
        fn open_orig_dst(&self, _dir: &Path) -> Result<Option<Box<dyn OrigDstSource>>, String> {
            self.orig_dst_opens.fetch_add(1, Ordering::SeqCst);
            // A snapshot, like a map fd that goes stale when the map is recreated.
            Ok(self
                .orig_dst
                .lock()
                .unwrap()
                .clone()
                .map(|m| Box::new(FakeOrigDst(m)) as Box<dyn OrigDstSource>))
        }
    }

    #[test]
    fn register_reloads_vips_from_the_store() {
        let store = MemStore::default();
        store
            .0
            .lock()
            .unwrap()
            .insert("10.10.0.7".parse().unwrap(), "kept.com".into());
        let maps = Arc::new(FakeMaps::default());
        *maps.vips.lock().unwrap() = Some(store.clone());
        let state = GatewayState::new(maps);
        let summary = state.register(Arc::new(PatternSet::default()), Path::new("/pins"));
        assert!(summary.contains("1 VIPs loaded"), "{summary}");
        assert!(state.is_persistent());
        let pool = Pool::new("10.10.0.0".parse().unwrap(), 24, 254).unwrap();
        assert_eq!(
            state.allocate("new.com", &pool).unwrap().vip.to_string(),
            "10.10.0.8"
        );
        assert_eq!(
            state.allocate("kept.com", &pool).unwrap().vip.to_string(),
            "10.10.0.7"
        );
        assert_eq!(store.0.lock().unwrap().len(), 2);
    }

    #[test]
    fn orig_dst_is_opened_once_and_reopened_on_request() {
        let maps = Arc::new(FakeMaps::default());
        let state = GatewayState::new(maps.clone()).with_reopen_interval(Duration::ZERO);
        let client: SocketAddrV4 = "127.0.0.1:40000".parse().unwrap();
        let vip: SocketAddrV4 = "10.10.0.1:443".parse().unwrap();
        assert_eq!(
            state.original_destination(Path::new("/p"), client, false),
            None
        );
        *maps.orig_dst.lock().unwrap() = Some(HashMap::from([(client, vip)]));
        assert_eq!(
            state.original_destination(Path::new("/p"), client, false),
            None,
            "stale handle"
        );
        assert_eq!(
            state.original_destination(Path::new("/p"), client, true),
            Some(vip)
        );
        assert_eq!(maps.orig_dst_opens.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn reopening_is_rate_limited() {
        let maps = Arc::new(FakeMaps::default());
        let state = GatewayState::new(maps.clone()).with_reopen_interval(Duration::from_secs(3600));
        let client: SocketAddrV4 = "127.0.0.1:40000".parse().unwrap();
        for _ in 0..100 {
            assert_eq!(
                state.original_destination(Path::new("/p"), client, true),
                None
            );
        }
        assert_eq!(maps.orig_dst_opens.load(Ordering::SeqCst), 1);
    }
}
