//! State shared by both filters and all Envoy workers, one per gateway
//! (per pin directory), so that two gateways served by one Envoy never see
//! each other's patterns or VIPs:
//!
//! - the VIP table ([`VipAllocator`]) behind one mutex, so a name gets the
//!   same VIP whichever worker answers it;
//! - the domain patterns of the gateway's `dns_gateway` config, which
//!   `cache_lookup` uses to find a domain's metadata;
//! - the opened original-destination map.
//!
//! Locks are never held across a call into Envoy, and a poisoned lock (a
//! panic elsewhere, caught by the hook) is recovered: the data it guards is
//! always left consistent between statements.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock},
    time::{Duration, Instant},
};

use crate::{
    allocator::{AllocError, Allocated, Pool, VipAllocator},
    api::LogLevel,
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

/// One worker thread's own handles on a gateway's pinned maps: a
/// connection's lookups take no process-wide lock, and each thread
/// reopens its handles when the gateway's generation moves on.
#[derive(Default)]
struct ThreadMaps {
    orig_dst_generation: u64,
    orig_dst: Option<Box<dyn OrigDstSource>>,
}

thread_local! {
    /// This thread's handles, by gateway (see [`GatewayState::id`]).
    static THREAD_MAPS: std::cell::RefCell<HashMap<u64, ThreadMaps>> =
        std::cell::RefCell::new(HashMap::new());
}

thread_local! {
    /// Each worker's copy of each gateway's current patterns, with the
    /// generation it was taken at: the query path reads its own copy and
    /// refreshes it only after a reload.
    static THREAD_PATTERNS: std::cell::RefCell<HashMap<u64, (u64, Arc<PatternSet>)>> =
        std::cell::RefCell::new(HashMap::new());
}

/// Source of [`GatewayState`] ids.
static NEXT_STATE_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Shortest time between two reopenings of the original-destination map
/// on a miss: a flood of connections that are not to a VIP must not turn
/// into a flood of bpf() calls under the lock.
pub const REOPEN_INTERVAL: Duration = Duration::from_secs(1);

/// The state of one gateway (one pin directory) in this process.
pub struct GatewayState {
    pin_dir: PathBuf,
    allocator: Mutex<VipAllocator>,
    patterns: RwLock<Arc<PatternSet>>,
    /// Bumped whenever `patterns` is replaced (see [`Self::with_patterns`]).
    patterns_generation: std::sync::atomic::AtomicU64,
    opener: Arc<dyn MapOpener>,
    /// Identifies this state's handles in [`THREAD_MAPS`].
    id: u64,
    /// Bumped to make every thread reopen its original-destination handle.
    orig_dst_generation: std::sync::atomic::AtomicU64,
    /// When the original-destination map was last reopened on a miss.
    orig_dst_reopened_at: Mutex<Option<Instant>>,
    /// A read handle on the pinned VIP map the allocator's store is on,
    /// opened with it by `register`: a connection's lookup reads it
    /// without the allocator's lock. `None` while the table lives in this
    /// process only.
    vip_lookup: RwLock<Option<Arc<dyn crate::pinned::VipLookup>>>,
    reopen_interval: Duration,
    /// The IPv6 VIP range the `dns_gateway` of this pin directory answers
    /// AAAA from, for `cache_lookup` to map IPv6 VIPs back.
    vip6_prefix: RwLock<Option<std::net::Ipv6Addr>>,
}

/// Every gateway's state in this process, by pin directory.
static REGISTRY: OnceLock<Mutex<HashMap<PathBuf, Arc<GatewayState>>>> = OnceLock::new();

impl GatewayState {
    /// Fresh state for the gateway whose maps are pinned in `pin_dir`,
    /// opened with `opener`.
    pub fn new(pin_dir: &Path, opener: Arc<dyn MapOpener>) -> Self {
        Self {
            pin_dir: pin_dir.to_path_buf(),
            allocator: Mutex::new(VipAllocator::new()),
            patterns: RwLock::new(Arc::new(PatternSet::default())),
            patterns_generation: std::sync::atomic::AtomicU64::new(0),
            opener,
            vip6_prefix: RwLock::new(None),
            id: NEXT_STATE_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            orig_dst_generation: std::sync::atomic::AtomicU64::new(1),
            orig_dst_reopened_at: Mutex::new(None),
            vip_lookup: RwLock::new(None),
            reopen_interval: REOPEN_INTERVAL,
        }
    }

    /// The same state with another minimum time between reopenings of the
    /// original-destination map (tests use zero).
    pub fn with_reopen_interval(mut self, interval: Duration) -> Self {
        self.reopen_interval = interval;
        self
    }

    /// The state of the gateway pinned in `pin_dir`, shared by every filter
    /// config of this process that names that directory (real pinned maps).
    pub fn for_pin_dir(pin_dir: &Path) -> Arc<Self> {
        let registry = REGISTRY.get_or_init(|| Mutex::new(HashMap::new()));
        lock(registry)
            .entry(pin_dir.to_path_buf())
            .or_insert_with(|| Arc::new(Self::new(pin_dir, Arc::new(PinnedMaps))))
            .clone()
    }

    /// The pin directory of this gateway.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Registers a `dns_gateway` config of this gateway: its patterns
    /// become the gateway's, and the VIP table is (re)loaded from the
    /// pinned VIP map when there is one. With `require_map`, a missing map
    /// is an error (the config is refused) instead of an in-process table.
    /// Returns a summary for the log.
    pub fn register(&self, patterns: Arc<PatternSet>, require_map: bool) -> Result<String, String> {
        let pin_dir = &self.pin_dir;
        let store = match self.opener.open_vips(pin_dir) {
            Ok(store) => store,
            Err(e) => {
                let allocator = lock(&self.allocator);
                if allocator.has_store() {
                    // A transient failure must not detach a working store.
                    drop(allocator);
                    self.set_patterns(patterns);
                    return Ok(format!(
                        "cannot reopen the pinned VIP map in {} ({e}); keeping the one already open",
                        pin_dir.display()
                    ));
                }
                if require_map {
                    return Err(format!(
                        "pin_dir: cannot open the pinned VIP map in {}: {e}",
                        pin_dir.display()
                    ));
                }
                crate::log_fmt!(LogLevel::Warn, "dns_gateway: cannot open the pinned VIP map in {}: {e}; VIPs stay in this process", pin_dir.display());
                None
            }
        };
        if store.is_none() && require_map && !self.is_persistent() {
            return Err(format!(
                "pin_dir: no pinned VIP map in {} (require_pinned_maps is set: is the gateway's loader running with this pin directory?)",
                pin_dir.display()
            ));
        }
        self.set_patterns(patterns);
        let persistent = store.is_some();
        let lookup = if persistent {
            self.opener
                .open_vip_lookup(pin_dir)
                .ok()
                .flatten()
                .map(Arc::from)
        } else {
            None
        };
        let mut allocator = lock(&self.allocator);
        let attached = allocator.attach_store(store);
        write(&self.vip_lookup, lookup);
        drop(allocator);
        Ok(match attached {
            Ok(loaded) if persistent => format!(
                "VIP table persisted in {} ({loaded} VIPs loaded)",
                pin_dir.display()
            ),
            Ok(_) => format!(
                "no pinned VIP map in {}: VIP table in this process only",
                pin_dir.display()
            ),
            Err(e) => format!("VIP map in {}: {e}", pin_dir.display()),
        })
    }

    /// The patterns of this gateway's `dns_gateway` config.
    pub fn patterns(&self) -> Arc<PatternSet> {
        read(&self.patterns)
    }

    /// Replaces the patterns (a new config, or a reloaded domains file):
    /// every filter of this gateway uses them from its next query or
    /// connection on; VIPs are not touched.
    pub fn set_patterns(&self, patterns: Arc<PatternSet>) {
        write(&self.patterns, patterns);
        self.patterns_generation
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// Runs `f` with the current patterns from this thread's copy, taken
    /// again only when they were replaced since: no lock and no shared
    /// reference count per query.
    pub fn with_patterns<R>(&self, f: impl FnOnce(&PatternSet) -> R) -> R {
        let generation = self
            .patterns_generation
            .load(std::sync::atomic::Ordering::Acquire);
        THREAD_PATTERNS.with(|cell| {
            // A nested call (never made today) finds the map borrowed and
            // uses the shared copy instead of panicking.
            if let Ok(mut copies) = cell.try_borrow_mut() {
                let fresh = copies.get(&self.id).is_some_and(|(g, _)| *g == generation);
                if !fresh {
                    copies.insert(self.id, (generation, self.patterns()));
                }
            }
            match cell.try_borrow() {
                Ok(copies) => match copies.get(&self.id) {
                    Some((_, patterns)) => f(patterns),
                    None => f(&self.patterns()),
                },
                Err(_) => f(&self.patterns()),
            }
        })
    }

    /// The VIP of `domain` in `pool` (see [`VipAllocator::allocate`]).
    /// With `require_map`, a table without its pinned map allocates
    /// nothing (a VIP only this process knows could be handed out twice).
    pub fn allocate(
        &self,
        domain: &str,
        pool: &Pool,
        require_map: bool,
    ) -> Result<Allocated, AllocError> {
        let mut allocator = lock(&self.allocator);
        if require_map && !allocator.has_store() {
            return Err(AllocError::Store(format!(
                "no pinned VIP map in {}",
                self.pin_dir.display()
            )));
        }
        allocator.allocate(domain, pool)
    }

    /// The domain `vip` stands for. With a pinned VIP map the map answers
    /// through this thread's own handle, without the allocator's lock (it
    /// is the truth: another Envoy may have reclaimed the VIP); otherwise
    /// the in-process table does.
    pub fn domain_of(&self, vip: Ipv4Addr) -> Option<String> {
        let lookup = read(&self.vip_lookup);
        match lookup.map(|table| table.get(vip)) {
            Some(Ok(domain)) => domain,
            Some(Err(e)) => {
                crate::log_fmt!(LogLevel::Warn, "cache_lookup: reading VIP {vip}: {e}");
                None
            }
            None => lock(&self.allocator).domain_of(vip),
        }
    }

    /// Every (VIP, domain) pair known in this process.
    pub fn entries(&self) -> Vec<(Ipv4Addr, String)> {
        lock(&self.allocator).entries()
    }

    /// Records the IPv6 VIP range of this gateway's `dns_gateway`.
    pub fn set_vip6_prefix(&self, prefix: Option<std::net::Ipv6Addr>) {
        write(&self.vip6_prefix, prefix);
    }

    /// The IPv4 VIP an IPv6 VIP stands for: its last 32 bits, when it lies
    /// in the registered IPv6 range; `None` otherwise.
    pub fn ipv4_of_ipv6_vip(&self, vip: std::net::Ipv6Addr) -> Option<Ipv4Addr> {
        let prefix = read(&self.vip6_prefix)?;
        let o = vip.octets();
        (o[..12] == prefix.octets()[..12]).then(|| Ipv4Addr::new(o[12], o[13], o[14], o[15]))
    }

    /// Whether the VIP table is backed by a pinned map.
    pub fn is_persistent(&self) -> bool {
        lock(&self.allocator).has_store()
    }

    /// Whether the original-destination map can be opened now.
    pub fn has_orig_dst_map(&self) -> Result<(), String> {
        match self.opener.open_orig_dst(&self.pin_dir)? {
            Some(_) => Ok(()),
            None => Err(format!(
                "no pinned original-destination map in {} (is the gateway's loader running with this pin directory?)",
                self.pin_dir.display()
            )),
        }
    }

    /// Consumes the original destination of `client` from the pinned map
    /// (opened on first use; `reopen` opens it again, e.g. after a loader
    /// restart recreated it, at most once per reopen interval). An entry is
    /// handed out once: a second connection from the same address gets
    /// nothing.
    pub fn take_original_destination(
        &self,
        client: SocketAddr,
        reopen: bool,
    ) -> Option<SocketAddr> {
        use std::sync::atomic::Ordering;
        if reopen {
            let mut at = lock(&self.orig_dst_reopened_at);
            if at.is_none_or(|at| at.elapsed() >= self.reopen_interval) {
                *at = Some(Instant::now());
                self.orig_dst_generation.fetch_add(1, Ordering::Release);
            }
        }
        let generation = self.orig_dst_generation.load(Ordering::Acquire);
        let taken = THREAD_MAPS.with(|cell| {
            let mut maps = cell.borrow_mut();
            let mine = maps.entry(self.id).or_default();
            if mine.orig_dst_generation != generation {
                mine.orig_dst_generation = generation;
                mine.orig_dst = match self.opener.open_orig_dst(&self.pin_dir) {
                    Ok(source) => source,
                    Err(e) => {
                        crate::log_fmt!(LogLevel::Debug, "cache_lookup: {e}");
                        None
                    }
                };
            }
            mine.orig_dst.as_mut().map(|source| source.take(client))
        })?;
        match taken {
            Ok(found) => found,
            Err(e) => {
                crate::log_fmt!(
                    LogLevel::Warn,
                    "cache_lookup: original destination of {client}: {e}"
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
        #[allow(clippy::type_complexity)]
        pub orig_dst: Mutex<Option<Arc<Mutex<HashMap<SocketAddr, SocketAddr>>>>>,
        pub orig_dst_opens: AtomicUsize,
    }

    /// A view of the shared fake table, like a map fd: writes go through,
    /// but a "recreated" table (a new `Arc`) is not seen until reopened.
    struct FakeOrigDst(Arc<Mutex<HashMap<SocketAddr, SocketAddr>>>);

    impl OrigDstSource for FakeOrigDst {
        fn take(&mut self, client: SocketAddr) -> Result<Option<SocketAddr>, String> {
            Ok(self.0.lock().unwrap().remove(&client))
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
            Ok(self
                .orig_dst
                .lock()
                .unwrap()
                .clone()
                .map(|m| Box::new(FakeOrigDst(m)) as Box<dyn OrigDstSource>))
        }
    }

    fn state(maps: &Arc<FakeMaps>) -> GatewayState {
        GatewayState::new(Path::new("/pins"), maps.clone())
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
        let state = state(&maps);
        let summary = state
            .register(Arc::new(PatternSet::default()), true)
            .unwrap();
        assert!(summary.contains("1 VIPs loaded"), "{summary}");
        assert!(state.is_persistent());
        let pool = Pool::new("10.10.0.0".parse().unwrap(), 24, 254).unwrap();
        assert_eq!(
            state
                .allocate("new.com", &pool, true)
                .unwrap()
                .vip
                .to_string(),
            "10.10.0.8"
        );
        assert_eq!(
            state
                .allocate("kept.com", &pool, true)
                .unwrap()
                .vip
                .to_string(),
            "10.10.0.7"
        );
        assert_eq!(store.0.lock().unwrap().len(), 2);
    }

    #[test]
    fn a_required_vip_map_that_is_missing_refuses_the_config_and_allocates_nothing() {
        let maps = Arc::new(FakeMaps::default());
        let state = state(&maps);
        let err = state
            .register(Arc::new(PatternSet::default()), true)
            .unwrap_err();
        assert!(err.starts_with("pin_dir:"), "{err}");
        let pool = Pool::new("10.10.0.0".parse().unwrap(), 24, 254).unwrap();
        assert!(matches!(
            state.allocate("a.com", &pool, true),
            Err(AllocError::Store(_))
        ));
        // Not required (the seed's set-up): an in-process table.
        assert!(state
            .register(Arc::new(PatternSet::default()), false)
            .is_ok());
        assert!(state.allocate("a.com", &pool, false).is_ok());
    }

    #[test]
    fn an_original_destination_is_handed_out_once() {
        let maps = Arc::new(FakeMaps::default());
        let client: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let vip: SocketAddr = "10.10.0.1:443".parse().unwrap();
        *maps.orig_dst.lock().unwrap() = Some(Arc::new(Mutex::new(HashMap::from([(client, vip)]))));
        let state = state(&maps);
        assert_eq!(state.take_original_destination(client, false), Some(vip));
        assert_eq!(state.take_original_destination(client, false), None);
        assert_eq!(state.take_original_destination(client, true), None);
    }

    #[test]
    fn orig_dst_is_opened_once_and_reopened_on_request() {
        let maps = Arc::new(FakeMaps::default());
        let state = state(&maps).with_reopen_interval(Duration::ZERO);
        let client: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let vip: SocketAddr = "10.10.0.1:443".parse().unwrap();
        assert_eq!(state.take_original_destination(client, false), None);
        *maps.orig_dst.lock().unwrap() = Some(Arc::new(Mutex::new(HashMap::from([(client, vip)]))));
        assert_eq!(
            state.take_original_destination(client, false),
            None,
            "stale handle"
        );
        assert_eq!(state.take_original_destination(client, true), Some(vip));
        assert_eq!(maps.orig_dst_opens.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn reopening_is_rate_limited() {
        let maps = Arc::new(FakeMaps::default());
        let state = state(&maps).with_reopen_interval(Duration::from_secs(3600));
        let client: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        for _ in 0..100 {
            assert_eq!(state.take_original_destination(client, true), None);
        }
        assert_eq!(maps.orig_dst_opens.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn gateways_with_different_pin_dirs_do_not_share_state() {
        let a = GatewayState::for_pin_dir(Path::new("/sys/fs/bpf/unit-test-a"));
        let b = GatewayState::for_pin_dir(Path::new("/sys/fs/bpf/unit-test-b"));
        assert!(!Arc::ptr_eq(&a, &b));
        assert!(Arc::ptr_eq(
            &a,
            &GatewayState::for_pin_dir(Path::new("/sys/fs/bpf/unit-test-a"))
        ));
    }
}
