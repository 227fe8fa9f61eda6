//! Typed access to the maps the loader pins on bpffs, for every user-space
//! party: the loader itself, `gateway status`, the Envoy module and tests.
//!
//! Maps are opened by path, so any process with the right privileges can
//! read them without owning a program. Values cross the boundary as byte
//! arrays converted with bytemuck, which checks the layouts at compile time.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use bytemuck::Pod;

use crate::{
    Counter, GateEntry, GateOrigin, GatewayConfig, LoaderInfo, OrigDstEntry, SockAddr6, SockAddrV4,
    VipRecord, MAP_CONFIG, MAP_COUNTERS, MAP_LOADER, MAP_ORIG_DST, MAP_SOCK_ORIG, MAP_VIPS,
    MAX_DOMAIN_LEN,
};

const SOCKADDR_SIZE: usize = size_of::<SockAddr6>();
const ORIG_DST_ENTRY_SIZE: usize = size_of::<OrigDstEntry>();
const VIP_RECORD_SIZE: usize = size_of::<VipRecord>();
const CONFIG_SIZE: usize = size_of::<GatewayConfig>();
const LOADER_INFO_SIZE: usize = size_of::<LoaderInfo>();

type SockAddrBytes = [u8; SOCKADDR_SIZE];
type OrigDstEntryBytes = [u8; ORIG_DST_ENTRY_SIZE];
type VipRecordBytes = [u8; VIP_RECORD_SIZE];

/// Key size, value size and capacity each pinned map must have; a pin
/// with others was left by an incompatible build.
const EXPECTED_LAYOUTS: [(&str, u32, u32, u32); 8] = [
    (MAP_CONFIG, 4, CONFIG_SIZE as u32, 1),
    (MAP_COUNTERS, 4, 8, crate::COUNTER_COUNT),
    (
        MAP_SOCK_ORIG,
        8,
        SOCKADDR_SIZE as u32,
        crate::CONNECTION_TABLE_CAPACITY,
    ),
    (
        MAP_ORIG_DST,
        SOCKADDR_SIZE as u32,
        ORIG_DST_ENTRY_SIZE as u32,
        crate::CONNECTION_TABLE_CAPACITY,
    ),
    (
        MAP_VIPS,
        4,
        VIP_RECORD_SIZE as u32,
        crate::VIP_TABLE_CAPACITY,
    ),
    (MAP_LOADER, 4, LOADER_INFO_SIZE as u32, 1),
    (crate::MAP_VIP_USE, 4, 8, crate::VIP_TABLE_CAPACITY),
    (crate::MAP_GATED, 8, 8, crate::GATED_CGROUP_CAPACITY),
];

fn to_bytes<T: Pod, const N: usize>(value: &T) -> [u8; N] {
    let mut out = [0u8; N];
    let bytes = bytemuck::bytes_of(value);
    // Sizes are tied by the constants above; a mismatch leaves zeros, which
    // the compile-time asserts below rule out.
    if bytes.len() == N {
        out.copy_from_slice(bytes);
    }
    out
}

fn from_bytes<T: Pod, const N: usize>(bytes: &[u8; N]) -> T {
    bytemuck::pod_read_unaligned(bytes)
}

const _: () = assert!(SOCKADDR_SIZE == 20);
const _: () = assert!(VIP_RECORD_SIZE == 260);
const _: () = assert!(ORIG_DST_ENTRY_SIZE == 40);
const _: () = assert!(CONFIG_SIZE == 128);
const _: () = assert!(LOADER_INFO_SIZE == 280);
const _: () = assert!(size_of::<GateEntry>() == 8);

/// Converts a std socket address to the kernel's representation.
pub fn sockaddr_from_std(addr: SocketAddrV4) -> SockAddrV4 {
    SockAddrV4::new(addr.ip().octets(), addr.port())
}

/// Converts the kernel's representation to a std socket address.
pub fn sockaddr_to_std(addr: SockAddrV4) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(addr.octets()), addr.port_host())
}

/// Converts a std socket address of either family to the kernel's
/// one-layout form (IPv4 v4-mapped).
pub fn sockaddr6_from_std(addr: SocketAddr) -> SockAddr6 {
    let v6 = match addr.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
    SockAddr6 {
        ip6: [word(0), word(4), word(8), word(12)],
        port: addr.port().to_be(),
        _pad: 0,
    }
}

/// Converts the kernel's one-layout form back; a v4-mapped address becomes
/// an IPv4 socket address.
pub fn sockaddr6_to_std(addr: SockAddr6) -> SocketAddr {
    let mut octets = [0u8; 16];
    for (chunk, word) in octets.chunks_exact_mut(4).zip(addr.ip6) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(octets);
    let ip = match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    };
    SocketAddr::new(ip, u16::from_be(addr.port))
}

/// A directory on bpffs holding the gateway's pinned maps.
#[derive(Clone, Debug)]
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    /// Names the directory; nothing is opened yet.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the map called `name` is pinned.
    pub fn map_path(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Whether the map called `name` is pinned here.
    pub fn has(&self, name: &str) -> bool {
        self.map_path(name).exists()
    }

    fn open(&self, name: &str) -> Result<MapData> {
        let path = self.map_path(name);
        MapData::from_pin(&path).with_context(|| {
            format!(
                "cannot open pinned map {} (is `gateway attach` or `gateway run` running with this pin directory?)",
                path.display()
            )
        })
    }

    fn open_map(&self, name: &str) -> Result<Map> {
        Map::from_map_data(self.open(name)?)
            .with_context(|| format!("pinned map {name} has an unexpected type"))
    }

    /// Removes the pins of transient maps (see [`crate::TRANSIENT_MAPS`])
    /// whose layout is not this build's, left by another version of the
    /// gateway; they hold nothing that must survive. Call it only while
    /// holding the pin directory's lock. The VIP table is never touched.
    /// Returns the names removed.
    pub fn remove_stale_transient_maps(&self) -> Result<Vec<&'static str>> {
        let mut removed = Vec::new();
        for (name, ..) in EXPECTED_LAYOUTS {
            if crate::TRANSIENT_MAPS.contains(&name) && self.layout_mismatch(name)?.is_some() {
                let path = self.map_path(name);
                fs::remove_file(&path)
                    .with_context(|| format!("removing the stale pin {}", path.display()))?;
                removed.push(name);
            }
        }
        Ok(removed)
    }

    /// How the pinned map `name` differs from this build's layout (key
    /// size, value size, capacity), or `None` when it matches or is not
    /// pinned.
    fn layout_mismatch(&self, name: &str) -> Result<Option<String>> {
        let Some((_, key, value, entries)) =
            EXPECTED_LAYOUTS.iter().find(|(n, ..)| *n == name).copied()
        else {
            return Ok(None);
        };
        if !self.has(name) {
            return Ok(None);
        }
        let info = self
            .open(name)?
            .info()
            .with_context(|| format!("reading info of {name}"))?;
        let found = (info.key_size(), info.value_size(), info.max_entries());
        Ok((found != (key, value, entries)).then(|| {
            format!(
                "key/value sizes {}/{} and {} entries but this build needs {key}/{value} and {entries}",
                found.0, found.1, found.2
            )
        }))
    }

    /// Checks that every map already pinned here has the layout this build
    /// expects, so a stale pin from another version fails with advice
    /// instead of corrupting data.
    pub fn check_layouts(&self) -> Result<()> {
        for (name, ..) in EXPECTED_LAYOUTS {
            if let Some(why) = self.layout_mismatch(name)? {
                bail!(
                    "pinned map {} has {why}: it was left by another version; remove it with \
                     `gateway reset --pin-dir {}`",
                    self.map_path(name).display(),
                    self.path.display()
                );
            }
        }
        Ok(())
    }

    /// The configuration the kernel programs run with.
    pub fn config(&self) -> Result<GatewayConfig> {
        let array: Array<MapData, [u8; CONFIG_SIZE]> = self.open_map(MAP_CONFIG)?.try_into()?;
        Ok(from_bytes(
            &array.get(&0, 0).context("reading the config entry")?,
        ))
    }

    /// Replaces the configuration the kernel programs run with.
    pub fn set_config(&self, config: &GatewayConfig) -> Result<()> {
        let mut array: Array<MapData, [u8; CONFIG_SIZE]> = self.open_map(MAP_CONFIG)?.try_into()?;
        array
            .set(0, to_bytes::<_, CONFIG_SIZE>(config), 0)
            .context("writing the config entry")
    }

    /// What the loader recorded about itself.
    pub fn loader_info(&self) -> Result<LoaderInfo> {
        let array: Array<MapData, [u8; LOADER_INFO_SIZE]> =
            self.open_map(MAP_LOADER)?.try_into()?;
        Ok(from_bytes(
            &array.get(&0, 0).context("reading the loader entry")?,
        ))
    }

    /// Records who attached the programs where.
    pub fn set_loader_info(&self, info: &LoaderInfo) -> Result<()> {
        let mut array: Array<MapData, [u8; LOADER_INFO_SIZE]> =
            self.open_map(MAP_LOADER)?.try_into()?;
        array
            .set(0, to_bytes::<_, LOADER_INFO_SIZE>(info), 0)
            .context("writing the loader entry")
    }

    /// Every counter summed over all CPUs.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>> {
        let array: PerCpuArray<MapData, u64> = self.open_map(MAP_COUNTERS)?.try_into()?;
        Counter::ALL
            .iter()
            .map(|c| {
                let per_cpu = array
                    .get(&(*c as u32), 0)
                    .with_context(|| format!("reading counter {}", c.name()))?;
                Ok((*c, per_cpu.iter().sum()))
            })
            .collect()
    }

    /// The VIP use table (last connect or answer per VIP).
    pub fn vip_use(&self) -> Result<VipUseTable> {
        Ok(VipUseTable {
            map: self.open_map(crate::MAP_VIP_USE)?.try_into()?,
        })
    }

    /// The gate table (which cgroups below the attach cgroup are gated).
    pub fn gated(&self) -> Result<GateTable> {
        Ok(GateTable {
            map: self.open_map(crate::MAP_GATED)?.try_into()?,
        })
    }

    /// The client address → original destination table.
    pub fn orig_dst(&self) -> Result<OrigDstTable> {
        Ok(OrigDstTable {
            map: self.open_map(MAP_ORIG_DST)?.try_into()?,
        })
    }

    /// The shared VIP table.
    pub fn vips(&self) -> Result<VipTable> {
        Ok(VipTable {
            map: self.open_map(MAP_VIPS)?.try_into()?,
        })
    }

    /// Lets members of group `gid` use the two maps the Envoy module needs
    /// (`GW_VIPS`, `GW_ORIG_DST`) without any capability: the directory
    /// becomes group-searchable and those pins group read-write (opening a
    /// pinned map asks for read and write access). The configuration,
    /// counters and loader record stay root-only, so a compromised Envoy
    /// cannot change where traffic is redirected. This is how Envoy runs
    /// unprivileged next to a privileged loader.
    pub fn share_with_group(&self, gid: u32) -> Result<()> {
        use std::os::unix::fs::{chown, PermissionsExt as _};
        let share = |path: &Path, mode: u32| -> Result<()> {
            chown(path, None, Some(gid))
                .with_context(|| format!("giving group {gid} access to {}", path.display()))?;
            fs::set_permissions(path, fs::Permissions::from_mode(mode))
                .with_context(|| format!("chmod {mode:o} {}", path.display()))
        };
        share(&self.path, 0o750)?;
        let lock = self.path.join(crate::RECLAIM_LOCK_DIR);
        if lock.exists() {
            share(&lock, 0o750)?;
        }
        for name in [MAP_VIPS, MAP_ORIG_DST, crate::MAP_VIP_USE] {
            let path = self.map_path(name);
            if path.exists() {
                share(&path, 0o660)?;
            }
        }
        Ok(())
    }

    /// Creates the directory Envoys lock while reclaiming (see
    /// [`crate::RECLAIM_LOCK_DIR`]) if it is missing.
    pub fn ensure_reclaim_lock(&self) -> Result<()> {
        let dir = self.path.join(crate::RECLAIM_LOCK_DIR);
        match fs::create_dir(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }

    /// Takes the pin directory's reclaim lock (an exclusive `flock` on
    /// [`crate::RECLAIM_LOCK_DIR`]), which every Envoy holds while it
    /// reclaims a VIP, so that two reclaims never interleave. It does not
    /// wait: the caller holds its process's allocator, and a holder that
    /// is stopped must not stall every worker of every other Envoy; a busy
    /// lock means "nothing reclaimable right now". The kernel releases it
    /// when the holder dies.
    pub fn lock_reclaims(&self) -> Result<ReclaimLock> {
        let path = self.path.join(crate::RECLAIM_LOCK_DIR);
        let dir = fs::File::open(&path).with_context(|| {
            format!(
                "opening the reclaim lock {} (pins made by an older loader have none: \
                 restart `gateway attach` or `gateway run` to create it)",
                path.display()
            )
        })?;
        match dir.try_lock() {
            Ok(()) => Ok(ReclaimLock { _dir: dir }),
            Err(fs::TryLockError::WouldBlock) => {
                bail!(
                    "another Envoy is reclaiming a VIP ({} is locked)",
                    path.display()
                )
            }
            Err(fs::TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("locking {}", path.display()))
            }
        }
    }

    /// Removes every pin of the gateway in this directory, then the
    /// directory if it is empty. Returns what was removed.
    pub fn remove_all(&self) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        for name in crate::ALL_MAPS {
            let path = self.map_path(name);
            if path.exists() {
                fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
                removed.push(path);
            }
        }
        let lock = self.path.join(crate::RECLAIM_LOCK_DIR);
        if lock.exists() {
            fs::remove_dir(&lock).with_context(|| format!("removing {}", lock.display()))?;
            removed.push(lock);
        }
        if self.path.exists()
            && fs::read_dir(&self.path)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false)
        {
            fs::remove_dir(&self.path)
                .with_context(|| format!("removing {}", self.path.display()))?;
            removed.push(self.path.clone());
        }
        Ok(removed)
    }
}

/// cgroup id → why it is gated (see [`crate::MAP_GATED`]).
pub struct GateTable {
    map: HashMap<MapData, u64, [u8; 8]>,
}

impl GateTable {
    /// Gates a cgroup (replacing the origin of an existing entry).
    pub fn gate(&mut self, id: u64, level: u32, origin: GateOrigin) -> Result<()> {
        let entry = GateEntry {
            level,
            origin: origin as u32,
        };
        self.map
            .insert(id, to_bytes::<_, 8>(&entry), 0)
            .map_err(|e| {
                anyhow::anyhow!(
                    "{e}; the gate table holds at most {} cgroups: ungate some first",
                    crate::GATED_CGROUP_CAPACITY
                )
            })
            .with_context(|| format!("gating cgroup id {id}"))
    }

    /// Ungates a cgroup; returns whether it was gated.
    pub fn ungate(&mut self, id: u64) -> Result<bool> {
        match self.map.remove(&id) {
            Ok(()) => Ok(true),
            Err(e) if is_missing(&e) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("ungating cgroup id {id}")),
        }
    }

    /// The entry of one cgroup, if gated.
    pub fn get(&self, id: u64) -> Result<Option<GateEntry>> {
        match self.map.get(&id, 0) {
            Ok(bytes) => Ok(Some(from_bytes(&bytes))),
            Err(e) if is_missing(&e) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading the gate of cgroup id {id}")),
        }
    }

    /// Every gated cgroup: (id, entry).
    pub fn entries(&self) -> Result<Vec<(u64, GateEntry)>> {
        self.map
            .iter()
            .map(|item| {
                let (id, bytes) = item.context("reading the gate table")?;
                Ok((id, from_bytes(&bytes)))
            })
            .collect()
    }
}

/// Client (ip, port) of either family → the destination it originally dialled, as recorded
/// by the sockops program for a connection the gateway redirected.
pub struct OrigDstTable {
    map: HashMap<MapData, SockAddrBytes, OrigDstEntryBytes>,
}

/// Whether a map error means "no such entry".
fn is_missing(err: &aya::maps::MapError) -> bool {
    match err {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(e) => e.io_error.kind() == std::io::ErrorKind::NotFound,
        _ => false,
    }
}

impl OrigDstTable {
    /// The original destination of the connection whose client side is
    /// `client`, without consuming it (diagnostics).
    pub fn peek(&self, client: SocketAddr) -> Result<Option<SocketAddr>> {
        let key = to_bytes::<_, SOCKADDR_SIZE>(&sockaddr6_from_std(client));
        match self.map.get(&key, 0) {
            Ok(value) => Ok(Some(sockaddr6_to_std(
                from_bytes::<OrigDstEntry, ORIG_DST_ENTRY_SIZE>(&value).dst,
            ))),
            Err(e) if is_missing(&e) => Ok(None),
            Err(e) => Err(e).context("looking up the original destination"),
        }
    }

    /// Consumes the original destination of the connection whose client
    /// side is `client` (the peer address of the proxy's accepted socket):
    /// it is handed out at most once. Only the caller whose delete
    /// succeeds gets it; a concurrent taker gets `None`. A record whose
    /// client closed more than [`crate::ORIG_DST_CLOSE_GRACE_NS`] ago is
    /// removed and never handed out, whether or not a loader still sweeps
    /// (an Envoy that outlives its loader must not hand a stale record to a
    /// connection that reuses the address).
    /// `now_ns` is CLOCK_MONOTONIC (the clock of `bpf_ktime_get_ns`).
    pub fn take(&mut self, client: SocketAddr, now_ns: u64) -> Result<Option<SocketAddr>> {
        let key = to_bytes::<_, SOCKADDR_SIZE>(&sockaddr6_from_std(client));
        let entry: OrigDstEntry = match self.map.get(&key, 0) {
            Ok(bytes) => from_bytes(&bytes),
            Err(e) if is_missing(&e) => return Ok(None),
            Err(e) => return Err(e).context("looking up the original destination"),
        };
        let removed = match self.map.remove(&key) {
            Ok(()) => true,
            Err(e) if is_missing(&e) => false,
            Err(e) => return Err(e).context("consuming the original destination"),
        };
        if !removed || expired(&entry, now_ns) {
            return Ok(None);
        }
        Ok(Some(sockaddr6_to_std(entry.dst)))
    }

    /// Records an original destination by hand (tests).
    pub fn insert(&mut self, client: SocketAddr, original: SocketAddr) -> Result<()> {
        self.insert_closed(client, original, 0)
    }

    /// Records an original destination whose client closed at
    /// `closed_at_ns` (CLOCK_MONOTONIC; 0: open), as sockops does (tests).
    pub fn insert_closed(
        &mut self,
        client: SocketAddr,
        original: SocketAddr,
        closed_at_ns: u64,
    ) -> Result<()> {
        let key = to_bytes::<_, SOCKADDR_SIZE>(&sockaddr6_from_std(client));
        let entry = OrigDstEntry {
            dst: sockaddr6_from_std(original),
            _pad: 0,
            cookie: 0,
            closed_at_ns,
        };
        let value = to_bytes::<_, ORIG_DST_ENTRY_SIZE>(&entry);
        self.map
            .insert(key, value, 0)
            .context("recording an original destination")
    }

    /// Removes the entries whose client socket closed more than `grace_ns`
    /// before `now_ns` (CLOCK_MONOTONIC) without the proxy consuming them.
    /// Returns how many were removed.
    pub fn reap_closed(&mut self, now_ns: u64, grace_ns: u64) -> Result<usize> {
        let expired: Vec<SockAddrBytes> = self
            .map
            .iter()
            .filter_map(|item| item.ok())
            .filter(|(_, v)| {
                let entry: OrigDstEntry = from_bytes(v);
                entry.closed_at_ns != 0 && now_ns.saturating_sub(entry.closed_at_ns) > grace_ns
            })
            .map(|(k, _)| k)
            .collect();
        let mut removed = 0;
        for key in expired {
            match self.map.remove(&key) {
                Ok(()) => removed += 1,
                Err(e) if is_missing(&e) => {}
                Err(e) => return Err(e).context("removing a closed original destination"),
            }
        }
        Ok(removed)
    }

    /// Every recorded (client, original destination) pair.
    pub fn entries(&self) -> Result<Vec<(SocketAddr, SocketAddr)>> {
        self.map
            .iter()
            .map(|item| {
                let (k, v) = item.context("iterating original destinations")?;
                Ok((
                    sockaddr6_to_std(from_bytes(&k)),
                    sockaddr6_to_std(from_bytes::<OrigDstEntry, ORIG_DST_ENTRY_SIZE>(&v).dst),
                ))
            })
            .collect()
    }
}

/// The held reclaim lock of a pin directory; released when dropped (or when
/// the process dies).
pub struct ReclaimLock {
    _dir: fs::File,
}

/// VIP → last use (CLOCK_MONOTONIC ns), stamped by the kernel at each
/// connect and by the module at each answer.
pub struct VipUseTable {
    map: HashMap<MapData, [u8; 4], u64>,
}

impl VipUseTable {
    /// When `vip` was last used, if it ever was since the map exists.
    pub fn last_use_ns(&self, vip: Ipv4Addr) -> Result<Option<u64>> {
        match self.map.get(&vip.octets(), 0) {
            Ok(ns) => Ok(Some(ns)),
            Err(e) if is_missing(&e) => Ok(None),
            Err(e) => Err(e).context("reading a VIP's last use"),
        }
    }

    /// Every (VIP, last use) pair.
    pub fn entries(&self) -> Result<Vec<(Ipv4Addr, u64)>> {
        self.map
            .iter()
            .map(|item| {
                let (k, v) = item.context("iterating VIP uses")?;
                Ok((Ipv4Addr::from(k), v))
            })
            .collect()
    }

    /// Records a use of `vip` at `ns`.
    pub fn stamp(&mut self, vip: Ipv4Addr, ns: u64) -> Result<()> {
        self.map
            .insert(vip.octets(), ns, 0)
            .with_context(|| format!("stamping the use of VIP {vip}"))
    }
}

/// VIP → domain, shared by every Envoy worker, restarts of Envoy and the
/// CLI.
pub struct VipTable {
    map: HashMap<MapData, [u8; 4], VipRecordBytes>,
}

impl VipTable {
    /// The domain `vip` stands for, if allocated (`None` too while it is
    /// being reclaimed).
    pub fn get(&self, vip: Ipv4Addr) -> Result<Option<String>> {
        match self.map.get(&vip.octets(), 0) {
            Ok(value) => record_domain(&from_bytes(&value)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("looking up a VIP"),
        }
    }

    /// Records that `vip` stands for `domain`.
    pub fn insert(&mut self, vip: Ipv4Addr, domain: &str) -> Result<()> {
        let record = vip_record(domain)?;
        self.map
            .insert(vip.octets(), to_bytes::<_, VIP_RECORD_SIZE>(&record), 0)
            .with_context(|| format!("recording VIP {vip} for {domain}"))
    }

    /// Records `vip` → `domain` only if `vip` is free (BPF_NOEXIST), so
    /// that two writers can never both claim one VIP. Returns false when
    /// another writer holds it.
    pub fn insert_new(&mut self, vip: Ipv4Addr, domain: &str) -> Result<bool> {
        const BPF_NOEXIST: u64 = 1;
        match self.map.insert(
            vip.octets(),
            to_bytes::<_, VIP_RECORD_SIZE>(&vip_record(domain)?),
            BPF_NOEXIST,
        ) {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.kind() == std::io::ErrorKind::AlreadyExists =>
            {
                Ok(false)
            }
            Err(e) => Err(e).with_context(|| format!("claiming VIP {vip} for {domain}")),
        }
    }

    /// Marks an allocated `vip` as being reclaimed (see
    /// [`crate::VIP_RECLAIMING_FLAG`]): from now on no name holds it, and
    /// [`VipTable::insert_new`] cannot take it; its name stays in the
    /// record for [`VipTable::repair_marked`].
    pub fn mark_reclaiming(&mut self, vip: Ipv4Addr) -> Result<()> {
        const BPF_EXIST: u64 = 2;
        let mut record: VipRecord = match self.map.get(&vip.octets(), 0) {
            Ok(value) => from_bytes(&value),
            Err(e) => return Err(e).with_context(|| format!("reading VIP {vip} to mark it")),
        };
        record.domain_len |= crate::VIP_RECLAIMING_FLAG;
        self.map
            .insert(
                vip.octets(),
                to_bytes::<_, VIP_RECORD_SIZE>(&record),
                BPF_EXIST,
            )
            .with_context(|| format!("marking VIP {vip} as being reclaimed"))
    }

    /// Gives every VIP left marked as being reclaimed back to its previous
    /// name (a reclaim whose Envoy died between mark and write). Call it
    /// holding the reclaim lock: then no reclaim is in progress. Returns
    /// the VIPs repaired.
    pub fn repair_marked(&mut self) -> Result<Vec<(Ipv4Addr, String)>> {
        let marked = self
            .map
            .iter()
            .filter_map(|item| {
                let (k, v) = item.ok()?;
                let mut record: VipRecord = from_bytes(&v);
                if record.domain_len & crate::VIP_RECLAIMING_FLAG == 0 {
                    return None;
                }
                record.domain_len &= !crate::VIP_RECLAIMING_FLAG;
                Some((Ipv4Addr::from(k), record_domain(&record)))
            })
            .collect::<Vec<_>>();
        let mut repaired = Vec::new();
        for (vip, name) in marked {
            let name = name?.with_context(|| format!("VIP {vip} is marked with no name"))?;
            self.insert(vip, &name)?;
            repaired.push((vip, name));
        }
        Ok(repaired)
    }

    /// Forgets `vip`.
    pub fn remove(&mut self, vip: Ipv4Addr) -> Result<()> {
        self.map
            .remove(&vip.octets())
            .with_context(|| format!("removing VIP {vip}"))
    }

    /// Every (VIP, domain) pair.
    pub fn entries(&self) -> Result<Vec<(Ipv4Addr, String)>> {
        let mut out = self
            .map
            .iter()
            .filter_map(|item| {
                let (k, v) = match item.context("iterating the VIP table") {
                    Ok(kv) => kv,
                    Err(e) => return Some(Err(e)),
                };
                record_domain(&from_bytes(&v))
                    .transpose()
                    .map(|domain| domain.map(|d| (Ipv4Addr::from(k), d)))
            })
            .collect::<Result<Vec<_>>>()?;
        out.sort();
        Ok(out)
    }
}

fn vip_record(domain: &str) -> Result<VipRecord> {
    let bytes = domain.as_bytes();
    if bytes.len() > MAX_DOMAIN_LEN {
        bail!("domain {domain:?} is longer than {MAX_DOMAIN_LEN} bytes");
    }
    if bytes.is_empty() {
        bail!("an empty domain cannot hold a VIP (it marks a VIP being reclaimed)");
    }
    let mut record = VipRecord {
        domain_len: bytes.len() as u32,
        domain: [0; MAX_DOMAIN_LEN + 1],
    };
    record.domain[..bytes.len()].copy_from_slice(bytes);
    Ok(record)
}

/// The domain of a record; `None` for a VIP being reclaimed.
fn record_domain(record: &VipRecord) -> Result<Option<String>> {
    if record.domain_len & crate::VIP_RECLAIMING_FLAG != 0 {
        return Ok(None);
    }
    let len = record.domain_len as usize;
    let bytes = record
        .domain
        .get(..len)
        .context("VIP record has a domain length beyond its buffer")?;
    String::from_utf8(bytes.to_vec())
        .map(Some)
        .context("VIP record holds a domain that is not UTF-8")
}

/// Whether a record's client closed more than the grace before `now_ns`.
fn expired(entry: &OrigDstEntry, now_ns: u64) -> bool {
    entry.closed_at_ns != 0
        && now_ns.saturating_sub(entry.closed_at_ns) > crate::ORIG_DST_CLOSE_GRACE_NS
}

/// FNV-1a, 64 bits: a stable short digest (of a pin directory's path, of
/// the eBPF object).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The state directory of the gateway pinned in `pin_dir`, below
/// `state_dir`: the pin directory's last path component (readable) and a
/// digest of its whole path (unique, so /a/gw and /b/gw never share a
/// bootstrap). Written once here for the loader and for the tests, which
/// find Envoy's admin socket in it.
pub fn instance_dir(state_dir: &Path, pin_dir: &Path) -> PathBuf {
    let last: String = pin_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "gateway".to_owned())
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let digest = fnv1a(pin_dir.as_os_str().as_encoded_bytes());
    state_dir.join(format!("{last}-{digest:016x}"))
}

/// Envoy's admin socket, in Envoy's own directory (see [`envoy_dir`]).
pub const ADMIN_SOCKET_NAME: &str = "admin.sock";

/// The one directory of a gateway's state directory that Envoy may write
/// (its admin socket, its acknowledgements); everything else there is
/// root's. Written once here for the loader and the tests.
pub fn envoy_dir(instance_dir: &Path) -> PathBuf {
    instance_dir.join("envoy")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reclaim_lock_is_exclusive_and_released_on_drop() {
        let dir = std::env::temp_dir().join(format!("gw-lock-test-{}", std::process::id()));
        let pins = PinDir::new(&dir);
        fs::create_dir_all(&dir).expect("temp dir");
        assert!(pins.lock_reclaims().is_err(), "no lock directory yet");
        pins.ensure_reclaim_lock().expect("lock directory");
        let held = pins.lock_reclaims().expect("first holder");
        let busy = pins
            .lock_reclaims()
            .err()
            .expect("a second holder must fail");
        assert!(format!("{busy:#}").contains("another Envoy"), "{busy:#}");
        drop(held);
        assert!(pins.lock_reclaims().is_ok(), "released on drop");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn socket_addresses_of_both_families_round_trip_through_the_kernel_layout() {
        let cases: [(&str, bool); 4] = [
            ("127.0.0.1:40000", true),
            ("10.10.0.1:443", true),
            ("[::1]:53", false),
            ("[fd00:6a7e::a0a:1]:80", false),
        ];
        for (text, mapped) in cases {
            let addr: SocketAddr = text.parse().expect("test address");
            let kernel = sockaddr6_from_std(addr);
            assert_eq!(kernel.is_v4_mapped(), mapped, "{text}");
            assert_eq!(sockaddr6_to_std(kernel), addr, "{text}");
        }
        let v4 = sockaddr6_from_std("10.10.0.1:443".parse().expect("addr"));
        assert_eq!(
            v4,
            SockAddr6::from_v4(u32::from_ne_bytes([10, 10, 0, 1]), 443u16.to_be())
        );
    }
}
