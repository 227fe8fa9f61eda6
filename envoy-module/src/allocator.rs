//! VIP allocation: the table VIP ↔ domain and the pools VIPs come from.
//!
//! VIPs are handed out sequentially from the network address + 1, never
//! the network or broadcast address, at most `max_entries` per pool, and
//! are never reused for another name. The same name always gets the same
//! VIP. When a persistent [`VipStore`] (the pinned VIP map) is attached it
//! is the truth: its entries are loaded on attach, every new allocation is
//! written to it, and a VIP some other process recorded there is never
//! handed out again; allocation continues after the highest VIP in use.
//!
//! The allocator itself is not synchronised: [`crate::state`] keeps it
//! behind one process-wide mutex shared by every Envoy worker.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

/// A range VIPs are allocated from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool {
    network: u32,
    prefix_len: u8,
    max_entries: u32,
    reclaim_idle_after: Option<Duration>,
    new_vip_rate: Option<NewVipRate>,
}

/// A cap on how fast new VIPs are handed out: `per_second` on average, at
/// most `burst` at once. Without it one client could exhaust a range in a
/// moment with random names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NewVipRate {
    /// Sustained new allocations per second.
    pub per_second: u32,
    /// Allocations allowed at once.
    pub burst: u32,
}

impl Pool {
    /// Addresses of a `/prefix_len` that are neither network nor broadcast.
    pub fn usable_hosts(prefix_len: u8) -> u64 {
        (1u64 << (32 - u32::from(prefix_len.clamp(1, 32)))).saturating_sub(2)
    }

    /// A pool of `network/prefix_len` (1..=30) handing out at most
    /// `max_entries` VIPs; `network` must have no host bits set.
    pub fn new(network: Ipv4Addr, prefix_len: u8, max_entries: u32) -> Result<Self, String> {
        if !(1..=30).contains(&prefix_len) {
            return Err(format!(
                "prefix length {prefix_len} leaves no usable address"
            ));
        }
        let mask = u32::MAX << (32 - u32::from(prefix_len));
        let bits = u32::from(network);
        if bits & !mask != 0 {
            return Err(format!(
                "{network} has host bits set for /{prefix_len} (the network address is {})",
                Ipv4Addr::from(bits & mask)
            ));
        }
        let usable = Self::usable_hosts(prefix_len);
        if max_entries == 0 || u64::from(max_entries) > usable {
            return Err(format!(
                "max_entries {max_entries} is not within 1..={usable}"
            ));
        }
        Ok(Self {
            network: bits,
            prefix_len,
            max_entries,
            reclaim_idle_after: None,
            new_vip_rate: None,
        })
    }

    /// The same pool, allocating at most `per_second` new VIPs a second
    /// (bursts up to `burst`).
    pub fn with_new_vip_rate(mut self, per_second: u32, burst: u32) -> Self {
        self.new_vip_rate = Some(NewVipRate {
            per_second: per_second.max(1),
            burst: burst.max(1),
        });
        self
    }

    /// The cap on new allocations, if any.
    pub fn new_vip_rate(&self) -> Option<NewVipRate> {
        self.new_vip_rate
    }

    /// The same pool, reclaiming for a new name, once it is full, the VIP
    /// idle the longest if neither answered nor connected to for `idle`.
    pub fn with_reclaim_idle_after(mut self, idle: Option<Duration>) -> Self {
        self.reclaim_idle_after = idle;
        self
    }

    /// How long a VIP must be idle before it may be reclaimed.
    pub fn reclaim_idle_after(&self) -> Option<Duration> {
        self.reclaim_idle_after
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.network)
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// The most VIPs this pool hands out.
    pub fn max_entries(&self) -> u32 {
        self.max_entries
    }

    fn first(&self) -> u32 {
        self.network + 1
    }

    fn last(&self) -> u32 {
        self.network + (u32::MAX >> self.prefix_len) - 1
    }

    /// Whether `vip` is an allocatable address of this pool.
    pub fn contains(&self, vip: Ipv4Addr) -> bool {
        (self.first()..=self.last()).contains(&u32::from(vip))
    }

    fn key(&self) -> (u32, u8) {
        (self.network, self.prefix_len)
    }
}

/// Persistent storage of the VIP table (the pinned VIP map).
pub trait VipStore: Send {
    /// Every (VIP, domain) pair.
    fn entries(&self) -> Result<Vec<(Ipv4Addr, String)>, String>;
    /// The domain of `vip`, if recorded.
    fn get(&self, vip: Ipv4Addr) -> Result<Option<String>, String>;
    /// Records `vip` → `domain`.
    fn insert(&mut self, vip: Ipv4Addr, domain: &str) -> Result<(), String>;
    /// Records `vip` → `domain` only if `vip` is free; false if another
    /// writer holds it (or it is being reclaimed).
    fn insert_new(&mut self, vip: Ipv4Addr, domain: &str) -> Result<bool, String>;
    /// Marks the allocated `vip` as being reclaimed: until the next
    /// [`VipStore::insert`], no name holds it ([`VipStore::get`] gives
    /// `None`) and [`VipStore::insert_new`] cannot take it.
    fn mark_reclaiming(&mut self, vip: Ipv4Addr) -> Result<(), String>;
    /// Serialises reclaims among every process sharing the store; held
    /// until the guard is dropped.
    fn lock_reclaims(&self) -> Result<ReclaimGuard, String> {
        Ok(Box::new(()))
    }
    /// Gives VIPs left marked by a reclaim cut short back to their names;
    /// called holding the reclaim lock. Returns how many.
    fn repair_marked(&mut self) -> Result<usize, String> {
        Ok(0)
    }
    /// When `vip` was last used by anyone (a connect the kernel saw, or an
    /// answer any Envoy gave), CLOCK_MONOTONIC nanoseconds; `None` when the
    /// store keeps no such stamps or has none for it.
    fn last_use_ns(&self, _vip: Ipv4Addr) -> Option<u64> {
        None
    }
    /// Records that `vip` was answered at `ns` (CLOCK_MONOTONIC); true
    /// when the shared table took it.
    fn stamp_use(&mut self, _vip: Ipv4Addr, _ns: u64) -> bool {
        false
    }
    /// Every VIP's last use at once (one pass over the table instead of a
    /// lookup per VIP); `None` when the store keeps no stamps.
    fn all_last_uses(&self) -> Option<HashMap<u32, u64>> {
        None
    }
}

/// Held while one process reclaims a VIP (see [`VipStore::lock_reclaims`]).
pub type ReclaimGuard = Box<dyn std::any::Any + Send>;

/// How long a snapshot of the shared use stamps serves reclaiming before it
/// is read again. The VIP finally chosen is always checked afresh.
const USE_SNAPSHOT_TTL: Duration = Duration::from_secs(5);

use crate::abi::monotonic_ns;

/// How often one process stamps the same VIP's use in the shared table.
const STAMP_INTERVAL: Duration = Duration::from_secs(1);

/// How long an answer from memory stands on its last check against the
/// store. A check made after this process's stamp saw its name: no
/// reclaim can complete until that stamp is `reclaim_idle_after` old (at
/// least [`crate::config::MIN_RECLAIM_IDLE_SECS`]), so answers within this
/// shorter time need no map access at all.
const VERIFIED_FOR: Duration = Duration::from_secs(1);

const _: () = assert!(VERIFIED_FOR.as_secs() < crate::config::MIN_RECLAIM_IDLE_SECS);

/// The outcome of a successful [`VipAllocator::allocate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allocated {
    /// The VIP of the name.
    pub vip: Ipv4Addr,
    /// True when the VIP was allocated by this call.
    pub new: bool,
    /// The name that held the VIP before, when it was reclaimed.
    pub reclaimed_from: Option<String>,
}

/// Why [`VipAllocator::allocate`] gave no VIP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllocError {
    /// The pool has no VIP left for a new name.
    Exhausted,
    /// The shared store could not record the allocation. The VIP is not
    /// handed out: a VIP only this process knows could go to another name
    /// after a restart while clients still cache it.
    Store(String),
    /// The pool's cap on new allocations per second is reached; names that
    /// already have a VIP are not affected.
    RateLimited,
}

/// A token bucket for [`NewVipRate`].
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(rate: NewVipRate, now: Instant) -> Self {
        Self {
            tokens: f64::from(rate.burst),
            at: now,
        }
    }

    /// Takes one token if there is one, after refilling for the time passed.
    fn take(&mut self, rate: NewVipRate, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens =
            (self.tokens + elapsed * f64::from(rate.per_second)).min(f64::from(rate.burst));
        self.at = now.max(self.at);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What claiming a candidate VIP in the store gave.
enum Claim {
    /// The VIP is now this name's.
    Won,
    /// Another writer holds it, for this domain.
    Owned(String),
    /// Another writer is reclaiming it at this moment.
    Busy,
}

#[derive(Clone, Copy, Debug)]
struct PoolState {
    next: u32,
    used: u32,
}

/// The in-process VIP table with its optional persistent store.
#[derive(Default)]
pub struct VipAllocator {
    by_vip: BTreeMap<u32, String>,
    by_domain: HashMap<String, Vec<u32>>,
    pools: HashMap<(u32, u8), PoolState>,
    store: Option<Box<dyn VipStore>>,
    /// When each VIP was last answered or connected to (in this process;
    /// VIPs learnt from the store count as used when learnt, unless the
    /// store's shared stamps say otherwise, see `learnt_only`).
    last_used: HashMap<u32, Instant>,
    /// VIPs whose `last_used` is only the time they were learnt.
    learnt_only: std::collections::HashSet<u32>,
    /// When this process last stamped each VIP's use in the store.
    stamped: HashMap<u32, Instant>,
    /// When memory's name of each VIP was last stamped then confirmed by
    /// the store (see [`VERIFIED_FOR`]).
    verified: HashMap<u32, Instant>,
    /// The shared use stamps as last read for reclaiming, and when.
    use_snapshot: Option<(Instant, HashMap<u32, u64>)>,
    /// Rate limits on new allocations, per pool.
    buckets: HashMap<(u32, u8), Bucket>,
}

impl VipAllocator {
    /// An empty table without a store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a persistent store is attached.
    pub fn has_store(&self) -> bool {
        self.store.is_some()
    }

    /// A real use of `vip` (an answer or a connection) at `now`: recorded
    /// in memory and, at most once per [`STAMP_INTERVAL`], in the store's
    /// shared use table.
    fn used(&mut self, vip: u32, now: Instant) {
        self.last_used.insert(vip, now);
        self.learnt_only.remove(&vip);
        let due = self
            .stamped
            .get(&vip)
            .is_none_or(|at| now.saturating_duration_since(*at) >= STAMP_INTERVAL);
        if due {
            if let Some(store) = self.store.as_mut() {
                store.stamp_use(Ipv4Addr::from(vip), monotonic_ns());
                self.stamped.insert(vip, now);
            }
        }
    }

    /// Whether memory's `vip` → `domain` may be answered at `now`: with a
    /// store, the use is stamped and then the store must still give `vip`
    /// to `domain` (another Envoy may have reclaimed it), at most once per
    /// [`VERIFIED_FOR`] per VIP. When the store gives it to another name,
    /// memory follows and the answer is false.
    fn answerable(&mut self, vip: u32, domain: &str, now: Instant) -> Result<bool, AllocError> {
        self.last_used.insert(vip, now);
        self.learnt_only.remove(&vip);
        let Some(store) = self.store.as_mut() else {
            return Ok(true);
        };
        if self
            .verified
            .get(&vip)
            .is_some_and(|at| now.saturating_duration_since(*at) < VERIFIED_FOR)
        {
            return Ok(true);
        }
        // Stamped before it is checked: a reclaim that starts after the
        // check sees this use and backs off (see `reclaim_in_store`).
        let stamped = store.stamp_use(Ipv4Addr::from(vip), monotonic_ns());
        if stamped {
            self.stamped.insert(vip, now);
        }
        if !self.still_holds(vip, domain)? {
            return Ok(false);
        }
        if stamped {
            self.verified.insert(vip, now);
        }
        Ok(true)
    }

    /// How long `vip` has been idle at `now`: by the shared stamps (what
    /// the kernel and every Envoy saw) together with this process's own
    /// uses when the store has stamps; by this process's memory (uses, or
    /// the time it learnt the VIP) otherwise.
    fn idle_for(&self, vip: u32, now: Instant, shared: Option<u64>) -> Duration {
        let own = self
            .last_used
            .get(&vip)
            .map(|at| now.saturating_duration_since(*at));
        match shared {
            Some(ns) => {
                let shared_idle = Duration::from_nanos(monotonic_ns().saturating_sub(ns));
                match own {
                    Some(own) if !self.learnt_only.contains(&vip) => own.min(shared_idle),
                    _ => shared_idle,
                }
            }
            None => own.unwrap_or(Duration::ZERO),
        }
    }

    /// The shared use stamps, read again when `refresh` or when the last
    /// read is older than [`USE_SNAPSHOT_TTL`].
    fn use_snapshot(&mut self, now: Instant, refresh: bool) -> HashMap<u32, u64> {
        let stale = self.use_snapshot.as_ref().is_none_or(|(at, _)| {
            refresh || now.saturating_duration_since(*at) >= USE_SNAPSHOT_TTL
        });
        if stale {
            let uses = self
                .store
                .as_ref()
                .and_then(|s| s.all_last_uses())
                .unwrap_or_default();
            self.use_snapshot = Some((now, uses));
        }
        self.use_snapshot
            .as_ref()
            .map(|(_, uses)| uses.clone())
            .unwrap_or_default()
    }

    /// Whether the store still gives `vip` to `domain`, as memory says. In
    /// a pool that reclaims, another Envoy on the same store may have taken
    /// it for another name; memory then follows the store and the caller
    /// looks further. Without a store memory is the truth.
    fn still_holds(&mut self, vip: u32, domain: &str) -> Result<bool, AllocError> {
        let Some(store) = self.store.as_ref() else {
            return Ok(true);
        };
        let owner = store.get(Ipv4Addr::from(vip)).map_err(AllocError::Store)?;
        if owner.as_deref() == Some(domain) {
            return Ok(true);
        }
        self.forget(vip);
        if let Some(owner) = owner {
            self.remember(vip, owner);
        }
        Ok(false)
    }

    /// Drops `vip` from memory (the store holds it for no name, or for
    /// another one).
    fn forget(&mut self, vip: u32) {
        self.verified.remove(&vip);
        if let Some(old) = self.by_vip.remove(&vip) {
            if let Some(vips) = self.by_domain.get_mut(&old) {
                vips.retain(|v| *v != vip);
                if vips.is_empty() {
                    self.by_domain.remove(&old);
                }
            }
        }
        self.pools.clear();
    }

    fn remember(&mut self, vip: u32, domain: String) {
        if let std::collections::hash_map::Entry::Vacant(e) = self.last_used.entry(vip) {
            e.insert(Instant::now());
            self.learnt_only.insert(vip);
        }
        if let Some(old) = self.by_vip.insert(vip, domain.clone()) {
            if let Some(vips) = self.by_domain.get_mut(&old) {
                vips.retain(|v| *v != vip);
            }
        }
        let vips = self.by_domain.entry(domain).or_default();
        if !vips.contains(&vip) {
            vips.push(vip);
        }
    }

    /// Attaches `store` (or detaches with `None`): loads its entries (they
    /// win over conflicting ones in memory), then writes back what only
    /// memory knew. Returns how many entries the store held.
    pub fn attach_store(&mut self, store: Option<Box<dyn VipStore>>) -> Result<usize, String> {
        self.store = store;
        self.pools.clear();
        let Some(store) = self.store.as_mut() else {
            return Ok(0);
        };
        // A reclaim cut short (its Envoy died between mark and write) is
        // undone first, under the reclaim lock.
        if let Ok(_lock) = store.lock_reclaims() {
            match store.repair_marked() {
                Ok(0) => {}
                Ok(n) => crate::log_fmt!(
                    crate::api::LogLevel::Warn,
                    "VIP table: {n} VIPs were left marked by a reclaim cut short; given back to their names"
                ),
                Err(e) => crate::log_fmt!(
                    crate::api::LogLevel::Warn,
                    "VIP table: repairing marked VIPs: {e}"
                ),
            }
        }
        let stored = store.entries()?;
        let count = stored.len();
        let mut in_store = std::collections::HashSet::with_capacity(count);
        let mut loaded = Vec::with_capacity(count);
        for (vip, domain) in stored {
            in_store.insert(u32::from(vip));
            loaded.push((u32::from(vip), domain));
        }
        let missing: Vec<(u32, String)> = self
            .by_vip
            .iter()
            .filter(|(vip, _)| !in_store.contains(vip))
            .map(|(vip, domain)| (*vip, domain.clone()))
            .collect();
        let mut first_error = None;
        let mut lost = Vec::new();
        for (vip, domain) in &missing {
            // Only where the store has nothing: never over a VIP another
            // process holds (or is reclaiming) meanwhile.
            match store.insert_new(Ipv4Addr::from(*vip), domain) {
                Ok(true) => {}
                Ok(false) => {
                    lost.push(*vip);
                    if let Ok(Some(owner)) = store.get(Ipv4Addr::from(*vip)) {
                        loaded.push((*vip, owner));
                    }
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        for vip in lost {
            self.forget(vip);
        }
        for (vip, domain) in loaded {
            self.remember(vip, domain);
        }
        match first_error {
            Some(e) => Err(format!("writing back in-memory VIPs: {e}")),
            None => Ok(count),
        }
    }

    /// The domain `vip` stands for: memory first, then the store (an entry
    /// found only there is adopted).
    pub fn domain_of(&mut self, vip: Ipv4Addr) -> Option<String> {
        self.domain_of_at(vip, Instant::now())
    }

    /// [`VipAllocator::domain_of`] at a given time (a connection counts as
    /// a use of the VIP).
    ///
    /// With a store, the store answers: another Envoy on it may have
    /// reclaimed the VIP for another name since this process learnt it.
    /// A store that cannot be read gives `None` (the connection is refused
    /// rather than given a name memory may hold wrongly).
    pub fn domain_of_at(&mut self, vip: Ipv4Addr, now: Instant) -> Option<String> {
        let key = u32::from(vip);
        let domain = match self.store.as_ref() {
            None => self.by_vip.get(&key).cloned()?,
            Some(store) => {
                let stored = store.get(vip).ok().flatten();
                if stored.as_ref() != self.by_vip.get(&key) {
                    self.forget(key);
                    if let Some(domain) = &stored {
                        self.remember(key, domain.clone());
                    }
                }
                stored?
            }
        };
        // The kernel stamps connects itself; this keeps the process's own
        // view current too.
        self.last_used.insert(key, now);
        self.learnt_only.remove(&key);
        Some(domain)
    }

    /// Every (VIP, domain) pair in memory, by VIP.
    pub fn entries(&self) -> Vec<(Ipv4Addr, String)> {
        self.by_vip
            .iter()
            .map(|(vip, domain)| (Ipv4Addr::from(*vip), domain.clone()))
            .collect()
    }

    fn pool_state(&mut self, pool: &Pool) -> PoolState {
        let by_vip = &self.by_vip;
        *self.pools.entry(pool.key()).or_insert_with(|| {
            let mut in_pool = by_vip.range(pool.first()..=pool.last());
            let used = in_pool.clone().count() as u32;
            let next = match in_pool.next_back() {
                Some((&highest, _)) if highest < pool.last() => highest + 1,
                _ => pool.first(),
            };
            PoolState { next, used }
        })
    }

    /// The VIP of the normalised `domain` in `pool`, allocating the next
    /// free one for a new name.
    pub fn allocate(&mut self, domain: &str, pool: &Pool) -> Result<Allocated, AllocError> {
        self.allocate_at(domain, pool, Instant::now())
    }

    /// [`VipAllocator::allocate`] at a given time (an answer counts as a use
    /// of the VIP).
    pub fn allocate_at(
        &mut self,
        domain: &str,
        pool: &Pool,
        now: Instant,
    ) -> Result<Allocated, AllocError> {
        while let Some(vip) = self.by_domain.get(domain).and_then(|vips| {
            vips.iter()
                .copied()
                .find(|v| pool.contains(Ipv4Addr::from(*v)))
        }) {
            // Checked whatever this pool's own policy: another Envoy on the
            // same store may reclaim.
            if !self.answerable(vip, domain, now)? {
                continue;
            }
            return Ok(Allocated {
                vip: Ipv4Addr::from(vip),
                new: false,
                reclaimed_from: None,
            });
        }
        if let Some(rate) = pool.new_vip_rate() {
            let bucket = self
                .buckets
                .entry(pool.key())
                .or_insert_with(|| Bucket::full(rate, now));
            if !bucket.take(rate, now) {
                return Err(AllocError::RateLimited);
            }
        }
        let mut state = self.pool_state(pool);
        let span = pool.last() - pool.first() + 1;
        let mut found = None;
        for _ in 0..span {
            if state.used >= pool.max_entries {
                break;
            }
            let candidate = state.next;
            state.next = if candidate >= pool.last() {
                pool.first()
            } else {
                candidate + 1
            };
            if self.by_vip.contains_key(&candidate) {
                continue;
            }
            // Another process may hold it: claim it atomically in the store
            // so that a VIP is never handed out twice.
            let claim = match self.claim(candidate, domain) {
                Ok(claim) => claim,
                Err(e) => {
                    self.pools.insert(pool.key(), state);
                    return Err(AllocError::Store(e));
                }
            };
            match claim {
                Claim::Owned(owner) if owner == domain => {
                    self.remember(candidate, owner);
                    state.used += 1;
                    self.pools.insert(pool.key(), state);
                    // Stamp, then check again (the owner was read before
                    // the stamp): the same order as any answer from memory.
                    if !self.answerable(candidate, domain, now)? {
                        return self.allocate_at(domain, pool, now);
                    }
                    return Ok(Allocated {
                        vip: Ipv4Addr::from(candidate),
                        new: false,
                        reclaimed_from: None,
                    });
                }
                Claim::Owned(owner) => {
                    self.remember(candidate, owner);
                    state.used += 1;
                }
                Claim::Busy => {}
                Claim::Won => {
                    found = Some(candidate);
                    break;
                }
            }
        }
        self.pools.insert(pool.key(), state);
        let Some(vip) = found else {
            return self.reclaim(domain, pool, now);
        };
        if let Some(state) = self.pools.get_mut(&pool.key()) {
            state.used += 1;
        }
        self.remember(vip, domain.to_owned());
        self.used(vip, now);
        Ok(Allocated {
            vip: Ipv4Addr::from(vip),
            new: true,
            reclaimed_from: None,
        })
    }

    /// The pool is full: hands `domain` the VIP idle the longest, if the
    /// pool allows reclaiming and that VIP has been idle long enough.
    fn reclaim(
        &mut self,
        domain: &str,
        pool: &Pool,
        now: Instant,
    ) -> Result<Allocated, AllocError> {
        let Some(idle) = pool.reclaim_idle_after() else {
            return Err(AllocError::Exhausted);
        };
        // Candidates by a snapshot of the shared stamps (one pass over the
        // table at most every few seconds, not a lookup per VIP per new
        // name); the chosen one is checked afresh, and a stale snapshot
        // is read again once.
        let mut vip = None;
        for fresh_snapshot in [false, true] {
            let snapshot = self.use_snapshot(now, fresh_snapshot);
            let idlest = self
                .by_vip
                .range(pool.first()..=pool.last())
                .map(|(v, _)| (*v, self.idle_for(*v, now, snapshot.get(v).copied())))
                .max_by_key(|(_, idle_for)| *idle_for);
            let Some((candidate, idle_for)) = idlest else {
                return Err(AllocError::Exhausted);
            };
            if idle_for < idle {
                return Err(AllocError::Exhausted);
            }
            let current = self
                .store
                .as_ref()
                .and_then(|s| s.last_use_ns(Ipv4Addr::from(candidate)));
            if self.idle_for(
                candidate,
                now,
                current.or(snapshot.get(&candidate).copied()),
            ) >= idle
            {
                vip = Some(candidate);
                break;
            }
        }
        let Some(vip) = vip else {
            return Err(AllocError::Exhausted);
        };
        let previous = self.by_vip.get(&vip).cloned();
        if self.store.is_some() {
            let Some(previous) = previous.clone() else {
                return Err(AllocError::Exhausted);
            };
            if !self.reclaim_in_store(vip, &previous, domain, now, idle)? {
                return Err(AllocError::Exhausted);
            }
        }
        self.remember(vip, domain.to_owned());
        self.used(vip, now);
        Ok(Allocated {
            vip: Ipv4Addr::from(vip),
            new: true,
            reclaimed_from: previous,
        })
    }

    /// Hands `vip` from `previous` to `domain` in the store, so that no
    /// two processes on it ever give one VIP to two names. Under the
    /// store's reclaim lock (one reclaim at a time): the store must still
    /// give `vip` to `previous` (another reclaim may have moved it); the
    /// VIP is marked as being reclaimed (no name holds it); its use stamp
    /// is read afresh, and if anyone used it meanwhile it goes back to
    /// `previous`; only then does `domain` get it. An Envoy answering
    /// from memory stamps the use before it checks the store, so either
    /// this sees its stamp or it sees the mark or the new name.
    /// Returns false when the VIP is not reclaimed after all.
    fn reclaim_in_store(
        &mut self,
        vip: u32,
        previous: &str,
        domain: &str,
        now: Instant,
        idle: Duration,
    ) -> Result<bool, AllocError> {
        let Some(store) = self.store.as_mut() else {
            return Ok(true);
        };
        let addr = Ipv4Addr::from(vip);
        let _lock = store.lock_reclaims().map_err(AllocError::Store)?;
        if store.get(addr).map_err(AllocError::Store)?.as_deref() != Some(previous) {
            drop(_lock);
            // Memory was behind: follow the store and let the client retry.
            let _ = self.still_holds(vip, previous);
            return Ok(false);
        }
        store.mark_reclaiming(addr).map_err(AllocError::Store)?;
        // No stamp at all (lost, or a store without stamps) counts as a use
        // now: only a VIP seen idle is given away.
        let fresh = store.last_use_ns(addr);
        if fresh.is_none() {
            let _ = store.stamp_use(addr, monotonic_ns());
        }
        let back_off = fresh.is_none() || self.idle_for(vip, now, fresh) < idle;
        let Some(store) = self.store.as_mut() else {
            return Ok(false);
        };
        let (owner, outcome) = if back_off {
            (previous, Ok(false))
        } else {
            (domain, Ok(true))
        };
        if let Err(e) = store.insert(addr, owner) {
            if !back_off {
                // Leave no VIP marked: give it back to its previous name.
                let _ = store.insert(addr, previous);
            }
            return Err(AllocError::Store(e));
        }
        outcome
    }

    /// Claims `candidate` for `domain` in the store (always won without
    /// one). A read error after a lost claim counts as an error, never as
    /// "free".
    fn claim(&mut self, candidate: u32, domain: &str) -> Result<Claim, String> {
        let Some(store) = self.store.as_mut() else {
            return Ok(Claim::Won);
        };
        let vip = Ipv4Addr::from(candidate);
        if store.insert_new(vip, domain)? {
            return Ok(Claim::Won);
        }
        Ok(match store.get(vip)? {
            Some(owner) => Claim::Owned(owner),
            None => Claim::Busy,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A store kept in memory and shared with the test.
    #[derive(Clone, Default)]
    pub(crate) struct MemStore(pub Arc<Mutex<BTreeMap<Ipv4Addr, String>>>);

    impl VipStore for MemStore {
        fn entries(&self) -> Result<Vec<(Ipv4Addr, String)>, String> {
            Ok(self
                .0
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| (*k, v.clone()))
                .collect())
        }
        fn get(&self, vip: Ipv4Addr) -> Result<Option<String>, String> {
            // An empty name marks a VIP being reclaimed.
            Ok(self
                .0
                .lock()
                .unwrap()
                .get(&vip)
                .filter(|v| !v.is_empty())
                .cloned())
        }
        fn mark_reclaiming(&mut self, vip: Ipv4Addr) -> Result<(), String> {
            self.0.lock().unwrap().insert(vip, String::new());
            Ok(())
        }
        fn insert(&mut self, vip: Ipv4Addr, domain: &str) -> Result<(), String> {
            self.0.lock().unwrap().insert(vip, domain.to_owned());
            Ok(())
        }
        fn insert_new(&mut self, vip: Ipv4Addr, domain: &str) -> Result<bool, String> {
            let mut map = self.0.lock().unwrap();
            if map.contains_key(&vip) {
                return Ok(false);
            }
            map.insert(vip, domain.to_owned());
            Ok(true)
        }
    }

    fn pool(net: [u8; 4], len: u8) -> Pool {
        Pool::new(Ipv4Addr::from(net), len, Pool::usable_hosts(len) as u32).unwrap()
    }

    /// A store with shared use stamps, as the pinned maps have them.
    #[derive(Clone, Default)]
    struct StampedStore {
        vips: MemStore,
        uses: Arc<Mutex<std::collections::HashMap<Ipv4Addr, u64>>>,
        /// Reclaim locks taken.
        locks: Arc<std::sync::atomic::AtomicUsize>,
        /// Simulates another Envoy answering the VIP just as it is marked.
        use_while_marking: Arc<std::sync::atomic::AtomicBool>,
        /// The names of marked VIPs (the pinned record keeps them).
        marked_was: Arc<Mutex<BTreeMap<Ipv4Addr, String>>>,
        /// Reads of single VIPs.
        gets: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl VipStore for StampedStore {
        fn entries(&self) -> Result<Vec<(Ipv4Addr, String)>, String> {
            self.vips.entries()
        }
        fn get(&self, vip: Ipv4Addr) -> Result<Option<String>, String> {
            self.gets.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.vips.get(vip)
        }
        fn insert(&mut self, vip: Ipv4Addr, domain: &str) -> Result<(), String> {
            self.vips.insert(vip, domain)
        }
        fn insert_new(&mut self, vip: Ipv4Addr, domain: &str) -> Result<bool, String> {
            self.vips.insert_new(vip, domain)
        }
        fn mark_reclaiming(&mut self, vip: Ipv4Addr) -> Result<(), String> {
            if self
                .use_while_marking
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                self.uses.lock().unwrap().insert(vip, monotonic_ns());
            }
            if let Some(name) = self.vips.get(vip)? {
                self.marked_was.lock().unwrap().insert(vip, name);
            }
            self.vips.mark_reclaiming(vip)
        }
        fn repair_marked(&mut self) -> Result<usize, String> {
            let marked: Vec<_> = std::mem::take(&mut *self.marked_was.lock().unwrap())
                .into_iter()
                .filter(|(vip, _)| {
                    self.vips.0.lock().unwrap().get(vip).map(String::as_str) == Some("")
                })
                .collect();
            for (vip, name) in &marked {
                self.vips.insert(*vip, name)?;
            }
            Ok(marked.len())
        }
        fn lock_reclaims(&self) -> Result<ReclaimGuard, String> {
            self.locks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(Box::new(()))
        }
        fn last_use_ns(&self, vip: Ipv4Addr) -> Option<u64> {
            self.uses.lock().unwrap().get(&vip).copied()
        }
        fn stamp_use(&mut self, vip: Ipv4Addr, ns: u64) -> bool {
            self.uses.lock().unwrap().insert(vip, ns);
            true
        }
        fn all_last_uses(&self) -> Option<std::collections::HashMap<u32, u64>> {
            Some(
                self.uses
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|(vip, ns)| (u32::from(*vip), *ns))
                    .collect(),
            )
        }
    }

    #[test]
    fn reclaiming_follows_the_shared_stamps_not_one_process_memory() {
        let ago = |secs: u64| monotonic_ns().saturating_sub(secs * 1_000_000_000);
        let p = pool([10, 10, 0, 0], 30).with_reclaim_idle_after(Some(Duration::from_secs(2)));
        let store = StampedStore::default();
        // A first process answers both names: its answers are stamped.
        let mut first = VipAllocator::new();
        first.attach_store(Some(Box::new(store.clone()))).unwrap();
        let a = first.allocate("a.com", &p).unwrap().vip;
        let b = first.allocate("b.com", &p).unwrap().vip;
        assert!(store.last_use_ns(a).is_some(), "answers are stamped");
        // A restarted process learns the VIPs. By the shared stamps, a.com
        // was last used 5 s ago (idle), b.com just now (a connect the
        // kernel saw): the new name gets a.com's VIP at once, although
        // this process has only just learnt both.
        store.uses.lock().unwrap().insert(a, ago(5));
        store.uses.lock().unwrap().insert(b, ago(0));
        let mut second = VipAllocator::new();
        second.attach_store(Some(Box::new(store.clone()))).unwrap();
        let c = second.allocate("c.com", &p).unwrap();
        assert_eq!(c.vip, a);
        assert_eq!(c.reclaimed_from.as_deref(), Some("a.com"));
        // Now every VIP was used within the idle time: nothing to reclaim.
        assert_eq!(second.allocate("d.com", &p), Err(AllocError::Exhausted));
        // A use the snapshot missed is caught by the fresh check of the
        // chosen VIP: c.com's VIP (stamped just now) is not given away,
        // although a snapshot older than the stamp says it was idle.
        store.uses.lock().unwrap().insert(a, ago(9));
        store.uses.lock().unwrap().insert(b, ago(5));
        let mut fifth = VipAllocator::new();
        fifth.attach_store(Some(Box::new(store.clone()))).unwrap();
        let _ = fifth.use_snapshot(Instant::now(), true);
        store.uses.lock().unwrap().insert(a, ago(0));
        let e = fifth.allocate("e.com", &p).unwrap();
        assert_eq!(e.vip, b, "the VIP used since the snapshot stays");
        // Without shared stamps a learnt VIP counts as just used.
        let plain = MemStore::default();
        let mut third = VipAllocator::new();
        third.attach_store(Some(Box::new(plain.clone()))).unwrap();
        third.allocate("a.com", &p).unwrap();
        third.allocate("b.com", &p).unwrap();
        let mut fourth = VipAllocator::new();
        fourth.attach_store(Some(Box::new(plain))).unwrap();
        assert_eq!(fourth.allocate("c.com", &p), Err(AllocError::Exhausted));
    }

    /// Two Envoys (allocators) on one store that have both learnt a full
    /// /30 whose VIPs were last used `idle` seconds ago.
    fn two_envoys_on_a_full_idle_pool(
        idle: [u64; 2],
    ) -> (
        StampedStore,
        Pool,
        VipAllocator,
        VipAllocator,
        [Ipv4Addr; 2],
    ) {
        let ago = |secs: u64| monotonic_ns().saturating_sub(secs * 1_000_000_000);
        let p = pool([10, 10, 0, 0], 30).with_reclaim_idle_after(Some(Duration::from_secs(2)));
        let store = StampedStore::default();
        let mut first = VipAllocator::new();
        first.attach_store(Some(Box::new(store.clone()))).unwrap();
        let vips = [
            first.allocate("a.com", &p).unwrap().vip,
            first.allocate("b.com", &p).unwrap().vip,
        ];
        for (vip, secs) in vips.iter().zip(idle) {
            store.uses.lock().unwrap().insert(*vip, ago(secs));
        }
        let mut one = VipAllocator::new();
        one.attach_store(Some(Box::new(store.clone()))).unwrap();
        let mut two = VipAllocator::new();
        two.attach_store(Some(Box::new(store.clone()))).unwrap();
        (store, p, one, two, vips)
    }

    #[test]
    fn a_vip_reclaimed_by_another_envoy_is_never_given_its_old_name_again() {
        let (store, p, mut one, mut two, [a, _]) = two_envoys_on_a_full_idle_pool([9, 5]);
        let mut three = VipAllocator::new();
        three.attach_store(Some(Box::new(store.clone()))).unwrap();
        // Envoy one reclaims a.com's VIP (the idlest) for c.com.
        let c = one.allocate("c.com", &p).unwrap();
        assert_eq!((c.vip, c.reclaimed_from.as_deref()), (a, Some("a.com")));
        // Envoy two still remembers a.com there, and its own pool does not
        // even reclaim. An answer for a.com never hands out c.com's VIP:
        // whatever it gets is what the store says a.com holds.
        let no_reclaim = p.with_reclaim_idle_after(None);
        match two.allocate("a.com", &no_reclaim) {
            Ok(got) => {
                assert_ne!(got.vip, a, "c.com's VIP answered for a.com");
                assert_eq!(store.get(got.vip).unwrap().as_deref(), Some("a.com"));
            }
            Err(e) => assert_eq!(e, AllocError::Exhausted),
        }
        // Envoy three also remembers a.com there. A connection to the VIP
        // gets the store's name, not the remembered one.
        assert_eq!(three.domain_of(a).as_deref(), Some("c.com"));
        assert_eq!(store.get(a).unwrap().as_deref(), Some("c.com"));
        assert!(store.locks.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    }

    #[test]
    fn answers_from_memory_check_the_store_at_most_once_a_second_per_vip() {
        use std::sync::atomic::Ordering::SeqCst;
        let p = pool([10, 10, 0, 0], 24);
        let store = StampedStore::default();
        let mut a = VipAllocator::new();
        a.attach_store(Some(Box::new(store.clone()))).unwrap();
        let t0 = Instant::now();
        let vip = a.allocate_at("a.com", &p, t0).unwrap().vip;
        let reads = |s: &StampedStore| s.gets.load(SeqCst);
        // The first answer from memory stamps and checks.
        a.allocate_at("a.com", &p, t0).unwrap();
        let after_first = reads(&store);
        let stamp = store.last_use_ns(vip).unwrap();
        // Within a second: no map access at all.
        for ms in [1, 200, 999] {
            let got = a.allocate_at("a.com", &p, t0 + Duration::from_millis(ms));
            assert_eq!(got.unwrap().vip, vip);
        }
        assert_eq!(reads(&store), after_first, "answers within a second");
        // After a second: stamped again, then checked again.
        a.allocate_at("a.com", &p, t0 + Duration::from_millis(1001))
            .unwrap();
        assert_eq!(reads(&store), after_first + 1);
        assert!(store.last_use_ns(vip).unwrap() >= stamp);
        // A store whose stamps fail gives no grace: every answer checks.
        let plain = MemStore::default();
        let mut b = VipAllocator::new();
        b.attach_store(Some(Box::new(plain.clone()))).unwrap();
        b.allocate_at("b.com", &p, t0).unwrap();
        plain
            .0
            .lock()
            .unwrap()
            .insert(ip("10.10.0.1"), "other.com".into());
        assert_ne!(
            b.allocate_at("b.com", &p, t0).map(|a| a.vip).ok(),
            Some(ip("10.10.0.1")),
            "without a stamp the check is made every time"
        );
    }

    #[test]
    fn a_use_during_a_reclaim_keeps_the_vip_for_its_name() {
        let (store, p, mut one, _, [a, b]) = two_envoys_on_a_full_idle_pool([9, 5]);
        // Another Envoy answers a.com just as the VIP is marked: the fresh
        // stamp after the mark makes the reclaim back off.
        store
            .use_while_marking
            .store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(one.allocate("c.com", &p), Err(AllocError::Exhausted));
        assert_eq!(
            store.entries().unwrap(),
            [(a, "a.com".to_owned()), (b, "b.com".to_owned())],
            "the VIP went back to its name, unmarked"
        );
        assert_eq!(one.domain_of(a).as_deref(), Some("a.com"));
    }

    #[test]
    fn a_vip_without_a_use_stamp_is_not_given_away_and_a_cut_short_reclaim_is_undone() {
        let (store, p, mut one, _, [a, b]) = two_envoys_on_a_full_idle_pool([9, 5]);
        // By the last snapshot a.com's VIP is the idlest; then its stamp
        // is gone (evicted, lost): not known to be idle any more.
        let _ = one.use_snapshot(Instant::now(), true);
        store.uses.lock().unwrap().remove(&a);
        // (Ten seconds on, so that this process's own memory finds it idle.)
        let later = Instant::now() + Duration::from_secs(10);
        assert_eq!(
            one.allocate_at("c.com", &p, later),
            Err(AllocError::Exhausted)
        );
        assert_eq!(store.get(a).unwrap().as_deref(), Some("a.com"));
        assert!(store.last_use_ns(a).is_some(), "stamped now instead");
        // An Envoy died between mark and write: the next one to attach
        // gives the VIP back to its name.
        store.vips.0.lock().unwrap().insert(b, String::new());
        store.marked_was.lock().unwrap().insert(b, "b.com".into());
        let mut three = VipAllocator::new();
        three.attach_store(Some(Box::new(store.clone()))).unwrap();
        assert_eq!(store.get(b).unwrap().as_deref(), Some("b.com"));
        assert_eq!(three.domain_of(b).as_deref(), Some("b.com"));
    }

    #[test]
    fn a_reclaim_from_stale_memory_never_overwrites_another_reclaim() {
        let ago = |secs: u64| monotonic_ns().saturating_sub(secs * 1_000_000_000);
        let (store, p, mut one, mut two, [a, b]) = two_envoys_on_a_full_idle_pool([9, 5]);
        assert_eq!(one.allocate("c.com", &p).unwrap().vip, a);
        // Envoy two has not seen that reclaim, and c.com's stamp was lost
        // (stamps may be): by its memory a.com's VIP is the idlest.
        store.uses.lock().unwrap().insert(a, ago(9));
        let _ = two.use_snapshot(Instant::now(), true);
        let d = two.allocate("d.com", &p);
        assert_ne!(d.as_ref().map(|d| d.vip), Ok(a), "{d:?}");
        assert_eq!(
            store.get(a).unwrap().as_deref(),
            Some("c.com"),
            "the first reclaim stands"
        );
        // Envoy two now follows the store.
        assert_eq!(two.domain_of(a).as_deref(), Some("c.com"));
        assert_eq!(store.get(b).unwrap().as_deref(), Some("b.com"));
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn new_allocations_are_capped_and_known_names_are_not() {
        let pool = pool([10, 10, 0, 0], 24).with_new_vip_rate(2, 3);
        let mut table = VipAllocator::new();
        let t0 = Instant::now();
        for name in ["a.com", "b.com", "c.com"] {
            assert!(table.allocate_at(name, &pool, t0).unwrap().new, "{name}");
        }
        assert_eq!(
            table.allocate_at("d.com", &pool, t0),
            Err(AllocError::RateLimited)
        );
        for _ in 0..10 {
            assert_eq!(
                table.allocate_at("a.com", &pool, t0).unwrap().vip,
                ip("10.10.0.1"),
                "a known name is answered whatever the rate"
            );
        }
        let later = t0 + Duration::from_millis(500);
        assert!(table.allocate_at("d.com", &pool, later).unwrap().new);
        assert_eq!(
            table.allocate_at("e.com", &pool, later),
            Err(AllocError::RateLimited)
        );
        let much_later = t0 + Duration::from_secs(60);
        for name in ["e.com", "f.com", "g.com"] {
            assert!(table.allocate_at(name, &pool, much_later).is_ok(), "{name}");
        }
        assert_eq!(
            table.allocate_at("h.com", &pool, much_later),
            Err(AllocError::RateLimited),
            "the bucket refills to the burst, no further"
        );
    }

    #[test]
    fn sequential_from_network_plus_one_and_stable() {
        let p = pool([10, 10, 0, 0], 24);
        let mut a = VipAllocator::new();
        assert_eq!(
            a.allocate("one.s3.aws.com", &p).unwrap().vip,
            ip("10.10.0.1")
        );
        assert_eq!(
            a.allocate("two.s3.aws.com", &p).unwrap().vip,
            ip("10.10.0.2")
        );
        let again = a.allocate("one.s3.aws.com", &p).unwrap();
        assert_eq!((again.vip, again.new), (ip("10.10.0.1"), false));
        assert_eq!(
            a.domain_of(ip("10.10.0.2")).as_deref(),
            Some("two.s3.aws.com")
        );
        assert_eq!(a.domain_of(ip("10.10.0.3")), None);
    }

    #[test]
    fn never_network_or_broadcast_and_exhaustion_is_reported() {
        let p = pool([192, 168, 7, 0], 29); // 6 usable: .1 – .6
        let mut a = VipAllocator::new();
        let vips: Vec<_> = (0..6)
            .map(|i| a.allocate(&format!("n{i}.com"), &p).unwrap().vip)
            .collect();
        assert_eq!(vips.first(), Some(&ip("192.168.7.1")));
        assert_eq!(vips.last(), Some(&ip("192.168.7.6")));
        assert_eq!(a.allocate("n6.com", &p), Err(AllocError::Exhausted));
        assert_eq!(a.allocate("n7.com", &p), Err(AllocError::Exhausted));
        // Known names still resolve when the pool is full.
        assert_eq!(a.allocate("n3.com", &p).unwrap().vip, ip("192.168.7.4"));
        let limited = Pool::new(ip("10.0.0.0"), 8, 2).unwrap();
        let mut b = VipAllocator::new();
        b.allocate("a.com", &limited).unwrap();
        b.allocate("b.com", &limited).unwrap();
        assert_eq!(b.allocate("c.com", &limited), Err(AllocError::Exhausted));
    }

    #[test]
    fn pool_rejects_host_bits_and_bad_sizes() {
        assert!(Pool::new(ip("10.10.0.5"), 24, 10)
            .unwrap_err()
            .contains("10.10.0.0"));
        assert!(Pool::new(ip("10.10.0.0"), 31, 1).is_err());
        assert!(Pool::new(ip("10.10.0.0"), 24, 255).is_err());
        assert!(Pool::new(ip("10.10.0.0"), 24, 0).is_err());
        assert_eq!(Pool::usable_hosts(24), 254);
        assert!(pool([10, 10, 0, 0], 24).contains(ip("10.10.0.254")));
        assert!(!pool([10, 10, 0, 0], 24).contains(ip("10.10.0.255")));
        assert!(!pool([10, 10, 0, 0], 24).contains(ip("10.10.0.0")));
    }

    #[test]
    fn concurrent_allocation_is_unique_and_stable() {
        let p = pool([10, 20, 0, 0], 16);
        let table = Arc::new(Mutex::new(VipAllocator::new()));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let table = table.clone();
                std::thread::spawn(move || {
                    // Every thread asks for the same 200 names, in its own order.
                    let mut got = BTreeMap::new();
                    for i in 0..200 {
                        let name = format!("host{}.example.com", (i * 7 + t * 13) % 200);
                        let vip = table.lock().unwrap().allocate(&name, &p).unwrap().vip;
                        got.insert(name, vip);
                    }
                    got
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        for r in &results[1..] {
            assert_eq!(r, &results[0], "every thread sees the same VIP per name");
        }
        let mut vips: Vec<_> = results[0].values().copied().collect();
        vips.sort();
        vips.dedup();
        assert_eq!(vips.len(), 200, "no VIP is shared by two names");
        assert_eq!(vips.first(), Some(&ip("10.20.0.1")));
        assert_eq!(vips.last(), Some(&ip("10.20.0.200")));
    }

    #[test]
    fn store_is_the_truth_across_restarts() {
        let p = pool([10, 10, 0, 0], 24);
        let store = MemStore::default();
        let mut first = VipAllocator::new();
        first.attach_store(Some(Box::new(store.clone()))).unwrap();
        assert_eq!(first.allocate("a.com", &p).unwrap().vip, ip("10.10.0.1"));
        assert_eq!(first.allocate("b.com", &p).unwrap().vip, ip("10.10.0.2"));
        assert_eq!(store.0.lock().unwrap().len(), 2);

        // Someone else (another Envoy, the CLI) records .3 meanwhile.
        store
            .0
            .lock()
            .unwrap()
            .insert(ip("10.10.0.3"), "c.com".into());
        // A restarted Envoy: fresh memory, same store.
        let mut second = VipAllocator::new();
        assert_eq!(
            second.attach_store(Some(Box::new(store.clone()))).unwrap(),
            3
        );
        assert_eq!(second.allocate("b.com", &p).unwrap().vip, ip("10.10.0.2"));
        assert_eq!(second.allocate("d.com", &p).unwrap().vip, ip("10.10.0.4"));
        assert_eq!(second.domain_of(ip("10.10.0.3")).as_deref(), Some("c.com"));

        // The first instance never hands out a VIP it only finds in the store.
        let e = first.allocate("e.com", &p).unwrap();
        assert_eq!(e.vip, ip("10.10.0.5"));
        assert_eq!(first.allocate("d.com", &p).unwrap().vip, ip("10.10.0.4"));
    }

    #[test]
    fn attaching_a_fresh_store_writes_memory_back() {
        let p = pool([10, 10, 0, 0], 24);
        let mut a = VipAllocator::new();
        a.allocate("a.com", &p).unwrap();
        let store = MemStore::default();
        assert_eq!(a.attach_store(Some(Box::new(store.clone()))).unwrap(), 0);
        assert_eq!(
            store
                .0
                .lock()
                .unwrap()
                .get(&ip("10.10.0.1"))
                .map(String::as_str),
            Some("a.com")
        );
    }

    #[test]
    fn two_processes_sharing_the_store_never_hand_out_one_vip_twice() {
        let store = MemStore::default();
        let p = pool([10, 10, 0, 0], 24);
        let mut a = VipAllocator::new();
        let mut b = VipAllocator::new();
        a.attach_store(Some(Box::new(store.clone()))).unwrap();
        b.attach_store(Some(Box::new(store.clone()))).unwrap();
        // b's memory does not know a's allocation; the store's claim does.
        let va = a.allocate("a.com", &p).unwrap().vip;
        let vb = b.allocate("b.com", &p).unwrap().vip;
        assert_ne!(va, vb);
        assert_eq!(store.0.lock().unwrap()[&va], "a.com");
        assert_eq!(store.0.lock().unwrap()[&vb], "b.com");
        assert_eq!(b.allocate("a.com", &p).unwrap().vip, va);
    }

    /// A store that refuses every write.
    struct BrokenStore;

    impl VipStore for BrokenStore {
        fn entries(&self) -> Result<Vec<(Ipv4Addr, String)>, String> {
            Ok(Vec::new())
        }
        fn get(&self, _: Ipv4Addr) -> Result<Option<String>, String> {
            Ok(None)
        }
        fn insert(&mut self, _: Ipv4Addr, _: &str) -> Result<(), String> {
            Err("map full".into())
        }
        fn insert_new(&mut self, _: Ipv4Addr, _: &str) -> Result<bool, String> {
            Err("map full".into())
        }
        fn mark_reclaiming(&mut self, _: Ipv4Addr) -> Result<(), String> {
            Err("map full".into())
        }
    }

    #[test]
    fn an_allocation_the_store_cannot_record_is_not_handed_out() {
        let mut a = VipAllocator::new();
        a.attach_store(Some(Box::new(BrokenStore))).unwrap();
        let p = pool([10, 10, 0, 0], 24);
        assert_eq!(
            a.allocate("a.com", &p),
            Err(AllocError::Store("map full".into()))
        );
        assert!(a.entries().is_empty(), "nothing may be remembered");
    }

    #[test]
    fn a_full_pool_reclaims_the_longest_idle_vip_only_after_the_idle_time() {
        let secs = Duration::from_secs;
        let p = pool([10, 10, 0, 0], 30).with_reclaim_idle_after(Some(secs(600)));
        let mut a = VipAllocator::new();
        let t0 = Instant::now();
        let va = a.allocate_at("a.com", &p, t0).unwrap().vip;
        let vb = a.allocate_at("b.com", &p, t0 + secs(10)).unwrap().vip;
        // Full, and nothing idle long enough.
        assert_eq!(
            a.allocate_at("c.com", &p, t0 + secs(300)),
            Err(AllocError::Exhausted)
        );
        // A connection to a.com's VIP keeps it in use: b.com is the idlest.
        assert_eq!(a.domain_of_at(va, t0 + secs(400)).as_deref(), Some("a.com"));
        let c = a.allocate_at("c.com", &p, t0 + secs(700)).unwrap();
        assert_eq!((c.vip, c.new), (vb, true));
        assert_eq!(c.reclaimed_from.as_deref(), Some("b.com"));
        assert_eq!(a.domain_of_at(vb, t0 + secs(701)).as_deref(), Some("c.com"));
        // a.com was used 300 s ago: not idle enough to give up.
        assert_eq!(
            a.allocate_at("b.com", &p, t0 + secs(700)),
            Err(AllocError::Exhausted)
        );
    }

    #[test]
    fn without_reclaiming_a_full_pool_stays_full() {
        let p = pool([10, 10, 0, 0], 30);
        let mut a = VipAllocator::new();
        let t0 = Instant::now();
        a.allocate_at("a.com", &p, t0).unwrap();
        a.allocate_at("b.com", &p, t0).unwrap();
        assert_eq!(
            a.allocate_at("c.com", &p, t0 + Duration::from_secs(86_400 * 365)),
            Err(AllocError::Exhausted)
        );
    }
}
