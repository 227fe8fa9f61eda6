//! Map layouts, map names and pin paths shared by the gateway's kernel
//! programs (`gateway-ebpf`), its loader (`gateway-user`) and the Envoy
//! module (`envoy-module`).
//!
//! Every type here is `#[repr(C)]` without implicit padding, so the kernel
//! and user space agree on the bytes. Addresses and ports are stored in
//! network byte order, exactly as `bpf_sock_addr.user_ip4` / `user_port`
//! carry them, so the eBPF side never converts.
#![cfg_attr(not(any(feature = "user", test)), no_std)]

pub mod contract;
#[cfg(feature = "user")]
pub mod pattern;
#[cfg(feature = "user")]
pub mod pinned;

/// How many VIP CIDRs the kernel programs can match against.
pub const MAX_VIP_CIDRS: usize = 8;

/// Longest domain name the shared VIP table stores (RFC 1035 limit is 253
/// characters in text form without the trailing dot).
pub const MAX_DOMAIN_LEN: usize = 255;

/// Capacity of the shared VIP table (a /16 pool holds 65,534 VIPs).
pub const VIP_TABLE_CAPACITY: u32 = 65_536;

/// Capacity of the per-socket and per-connection tables. They are LRU maps:
/// an entry is only needed between a connect and the proxy's accept (TCP) or
/// for the life of a DNS exchange (UDP), so the oldest entries may go.
pub const CONNECTION_TABLE_CAPACITY: u32 = 65_536;

/// Name of the single-entry array holding [`GatewayConfig`].
pub const MAP_CONFIG: &str = "GW_CONFIG";
/// Name of the per-CPU array of decision counters, indexed by [`Counter`].
pub const MAP_COUNTERS: &str = "GW_COUNTERS";
/// Name of the LRU map socket cookie → original destination ([`SockAddr6`]).
pub const MAP_SOCK_ORIG: &str = "GW_SOCK_ORIG";
/// Name of the LRU map client address ([`SockAddr6`]) → [`OrigDstEntry`] (what the proxy
/// consumes, keyed by the peer of its accepted socket).
pub const MAP_ORIG_DST: &str = "GW_ORIG_DST";
/// Name of the VIP table: VIP → [`VipRecord`]. It outlives the loader and
/// Envoy so that VIPs stay stable across restarts.
pub const MAP_VIPS: &str = "GW_VIPS";
/// Name of the single-entry array holding [`LoaderInfo`].
pub const MAP_LOADER: &str = "GW_LOADER";
/// Name of the VIP use table: VIP → when it was last used, in
/// CLOCK_MONOTONIC nanoseconds (`bpf_ktime_get_ns`). The connect programs
/// stamp every connect to a VIP; the module stamps its answers. Every
/// Envoy on the pin directory reclaims by these stamps, so idle times are
/// what the kernel saw, not what one process remembers. It outlives
/// restarts, like the VIP table.
pub const MAP_VIP_USE: &str = "GW_VIP_USE";

/// Name of the gate table: cgroup v2 id → [`GateEntry`]. The programs
/// are attached once, to a parent cgroup; a process is gated when its own
/// cgroup or one of its ancestors below that parent is in this table, so
/// workloads are gated and ungated at run time by a map update, without
/// reattaching, restarting Envoy or touching VIPs. It outlives restarts.
pub const MAP_GATED: &str = "GW_GATED";

/// How many cgroups can be gated at once.
pub const GATED_CGROUP_CAPACITY: u32 = 16_384;

/// The deepest cgroup level (the cgroup v2 root is level 0) a gated
/// cgroup may be at: the programs look up the calling process's ancestors
/// at every level up to this one, so the answer never depends on how a
/// cgroup's level was counted in user space (cgroup namespaces, bind
/// mounts). Processes below a gated cgroup are gated however deep they
/// are.
pub const MAX_GATE_DEPTH: u32 = 32;

/// No uid is exempt from the gate (see [`GatewayConfig::exempt_uid`]).
pub const NO_EXEMPT_UID: u32 = u32::MAX;

/// Directory in the pin directory that Envoys `flock` while one of them
/// reclaims a VIP (the pin directory itself is the loader's lock). The
/// loader creates it with the maps; it outlives loaders like the VIP map.
pub const RECLAIM_LOCK_DIR: &str = "reclaim_lock";

/// Every map the gateway pins, in the order `gateway status` shows them.
pub const ALL_MAPS: [&str; 8] = [
    MAP_CONFIG,
    MAP_COUNTERS,
    MAP_SOCK_ORIG,
    MAP_ORIG_DST,
    MAP_VIPS,
    MAP_VIP_USE,
    MAP_GATED,
    MAP_LOADER,
];

/// Maps that only make sense while a loader is attached; the loader removes
/// their pins when it detaches. The VIP table is not among them: it is the
/// state that must survive restarts.
pub const TRANSIENT_MAPS: [&str; 5] = [
    MAP_CONFIG,
    MAP_COUNTERS,
    MAP_SOCK_ORIG,
    MAP_ORIG_DST,
    MAP_LOADER,
];

/// Where bpffs is conventionally mounted; never a pin directory itself.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Default directory (on bpffs) where the loader pins the maps and the Envoy
/// module looks for them.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/dns-egress-gateway";

/// An IPv4 socket address as the kernel hands it to cgroup programs: the
/// address and the port both in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SockAddrV4 {
    /// IPv4 address, network byte order (first octet in the lowest byte).
    pub ip: u32,
    /// Port, network byte order.
    pub port: u16,
    /// Explicit padding so the layout has no hidden bytes.
    pub _pad: u16,
}

impl SockAddrV4 {
    /// Builds an address from its octets and a host-order port.
    pub const fn new(octets: [u8; 4], port: u16) -> Self {
        Self {
            ip: u32::from_ne_bytes(octets),
            port: port.to_be(),
            _pad: 0,
        }
    }

    /// The address octets, in the order they are written.
    pub const fn octets(&self) -> [u8; 4] {
        self.ip.to_ne_bytes()
    }

    /// The port in host byte order.
    pub const fn port_host(&self) -> u16 {
        u16::from_be(self.port)
    }
}

/// Words 0..=2 of a v4-mapped IPv6 address (`::ffff:a.b.c.d`) as the
/// kernel stores them in `user_ip6` (each word in memory order).
pub const V4_MAPPED_PREFIX: [u32; 3] = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff])];

/// `::1` in the kernel's word layout.
pub const IPV6_LOOPBACK: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

/// A socket address of either family in one layout, as the IPv6 cgroup
/// programs see it: IPv4 addresses are stored v4-mapped (`::ffff:a.b.c.d`),
/// so the IPv4 and IPv6 programs and user space share one key and value
/// type. Address words and port in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SockAddr6 {
    /// The 16 address bytes as four words in memory order (`user_ip6`).
    pub ip6: [u32; 4],
    /// Port, network byte order.
    pub port: u16,
    /// Explicit padding so the layout has no hidden bytes.
    pub _pad: u16,
}

impl SockAddr6 {
    /// An IPv4 address (network-order word) and port, stored v4-mapped.
    #[inline(always)]
    pub const fn from_v4(ip: u32, port: u16) -> Self {
        Self {
            ip6: [
                V4_MAPPED_PREFIX[0],
                V4_MAPPED_PREFIX[1],
                V4_MAPPED_PREFIX[2],
                ip,
            ],
            port,
            _pad: 0,
        }
    }

    /// Whether the address is v4-mapped (an IPv4 peer).
    #[inline(always)]
    pub const fn is_v4_mapped(&self) -> bool {
        is_v4_mapped(&self.ip6)
    }
}

/// Whether `ip6` (kernel word layout) is a v4-mapped IPv4 address.
#[inline(always)]
pub const fn is_v4_mapped(ip6: &[u32; 4]) -> bool {
    ip6[0] == V4_MAPPED_PREFIX[0] && ip6[1] == V4_MAPPED_PREFIX[1] && ip6[2] == V4_MAPPED_PREFIX[2]
}

/// An IPv4 network: an address matches when `addr & mask == network`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Ipv4Cidr {
    /// Network address, network byte order, host bits zero.
    pub network: u32,
    /// Netmask, network byte order.
    pub mask: u32,
}

impl Ipv4Cidr {
    /// Builds a CIDR from an address and a prefix length (0..=32); host bits
    /// of `octets` are cleared.
    pub const fn new(octets: [u8; 4], prefix_len: u8) -> Self {
        let host_mask: u32 = if prefix_len == 0 {
            0
        } else if prefix_len >= 32 {
            u32::MAX
        } else {
            u32::MAX << (32 - prefix_len as u32)
        };
        let mask = host_mask.to_be();
        Self {
            network: u32::from_ne_bytes(octets) & mask,
            mask,
        }
    }

    /// Whether `ip` (network byte order) lies inside this network.
    pub const fn contains(&self, ip: u32) -> bool {
        ip & self.mask == self.network
    }

    /// Prefix length of the mask.
    pub const fn prefix_len(&self) -> u32 {
        u32::from_be(self.mask).leading_ones()
    }
}

/// Set in [`GatewayConfig::flags`] once the loader has written a complete
/// configuration; until then every program leaves traffic alone.
pub const CONFIG_FLAG_ENABLED: u32 = 1;

/// Set when the proxy also listens on `::1` at the ports of `dns_target`,
/// `tcp_target` and `dns_tcp_target`: IPv6 DNS and connects to IPv6 VIPs
/// are redirected there. Without it (no IPv6 on the host) they are left
/// alone; v4-mapped destinations are handled either way.
pub const CONFIG_FLAG_IPV6: u32 = 2;

/// Set when `vip6_prefix` holds an IPv6 VIP range.
pub const CONFIG_FLAG_VIP6: u32 = 4;

/// Set when `dns_tcp_target` holds the DNS-over-TCP listener.
pub const CONFIG_FLAG_DNS_TCP: u32 = 8;

/// Set when a connect to an address of a VIP range that no name holds
/// (no entry in the VIP table) is refused at `connect()` (EPERM) instead
/// of going to the proxy, which could only close it.
pub const CONFIG_FLAG_REFUSE_UNKNOWN_VIPS: u32 = 16;

/// Set when DNS (UDP or TCP) is refused (EPERM) while no proxy listener
/// is bound at its target; without it such DNS is left on its original
/// path, so names keep resolving while the proxy restarts.
pub const CONFIG_FLAG_DNS_OUTAGE_DROP: u32 = 32;

/// Runtime configuration of the kernel programs, written by the loader into
/// the single entry of [`MAP_CONFIG`] before the programs are attached.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct GatewayConfig {
    /// Where DNS (UDP port 53) goes: the proxy's DNS listener.
    pub dns_target: SockAddrV4,
    /// Where TCP connects to a VIP go: the proxy's TCP listener.
    pub tcp_target: SockAddrV4,
    /// [`CONFIG_FLAG_ENABLED`] and future flags.
    pub flags: u32,
    /// How many entries of `vip_cidrs` are in use.
    pub vip_cidr_count: u32,
    /// Networks whose TCP connects are redirected.
    pub vip_cidrs: [Ipv4Cidr; MAX_VIP_CIDRS],
    /// Cookie of the network namespace the proxy serves (the loader's).
    /// Sockets in any other namespace are neither redirected nor recorded:
    /// the proxy's loopback listeners are not reachable from there, and an
    /// address recorded there could collide with a client of the proxy.
    pub netns_cookie: u64,
    /// Where DNS over TCP (TCP port 53) goes: the proxy's DNS-over-TCP
    /// listener; used when [`CONFIG_FLAG_DNS_TCP`] is set.
    pub dns_tcp_target: SockAddrV4,
    /// First 96 bits of the IPv6 VIP range (kernel word layout): an IPv6
    /// VIP is this prefix followed by the IPv4 VIP it stands for. Used
    /// when [`CONFIG_FLAG_VIP6`] is set.
    pub vip6_prefix: [u32; 3],
    /// Envoy's own uid when it runs as a dedicated user: its sockets are
    /// never gated, whatever cgroup it is in, so that no gate (a `gateway
    /// gate` of the wrong cgroup, a labelled gateway pod) can send Envoy's
    /// own DNS back to itself. [`NO_EXEMPT_UID`] for none (never root).
    pub exempt_uid: u32,
    /// Explicit padding. It also makes this layout's size differ from the
    /// one before `exempt_uid`, so that an upgrade recreates the pinned
    /// configuration map instead of handing the old programs a field they
    /// would read with another meaning.
    pub _pad: [u32; 2],
}

impl GatewayConfig {
    /// Whether `flag` is set.
    #[inline(always)]
    pub const fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }

    /// Whether `ip6` is an IPv6 VIP: inside the IPv6 prefix, with an
    /// embedded IPv4 address inside one of the VIP networks.
    #[inline(always)]
    pub fn is_vip6(&self, ip6: &[u32; 4]) -> bool {
        self.has(CONFIG_FLAG_VIP6)
            && ip6[0] == self.vip6_prefix[0]
            && ip6[1] == self.vip6_prefix[1]
            && ip6[2] == self.vip6_prefix[2]
            && self.is_vip(ip6[3])
    }

    /// Whether `ip` (network byte order) is inside one of the VIP networks.
    #[inline(always)]
    pub fn is_vip(&self, ip: u32) -> bool {
        let mut i = 0;
        while i < MAX_VIP_CIDRS {
            if (i as u32) < self.vip_cidr_count && self.vip_cidrs[i].contains(ip) {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// What the kernel records for the proxy about one redirected TCP
/// connection: where it was going, and which socket it was (so that the
/// entry is removed when that socket closes, and never outlives it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct OrigDstEntry {
    /// The VIP and port the application dialled (an IPv4 VIP v4-mapped).
    pub dst: SockAddr6,
    /// Explicit padding so the layout has no hidden bytes.
    pub _pad: u32,
    /// Socket cookie of the client socket that dialled it.
    pub cookie: u64,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) when the client socket closed
    /// first while the proxy may not have accepted yet; 0 while it is open.
    /// The loader removes such entries after [`ORIG_DST_CLOSE_GRACE_NS`].
    pub closed_at_ns: u64,
}

/// How long an entry whose client closed first (orderly, before the proxy
/// may have accepted) stays available to the proxy. Shorter than the one
/// second after which loopback may reuse a TIME_WAIT 4-tuple, so no other
/// socket can present the same client address within it.
pub const ORIG_DST_CLOSE_GRACE_NS: u64 = 500_000_000;

/// One entry of the VIP table: the domain a VIP stands for.
///
/// A record whose `domain_len` has [`VIP_RECLAIMING_FLAG`] set is a VIP
/// being reclaimed: no name holds it for that moment; readers treat it as
/// unallocated, writers that claim free VIPs cannot take it, and the
/// previous name stays in `domain` so that a reclaim cut short (its Envoy
/// died) can be undone.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct VipRecord {
    /// Number of meaningful bytes in `domain`.
    pub domain_len: u32,
    /// Lower-case domain without trailing dot, ASCII.
    pub domain: [u8; MAX_DOMAIN_LEN + 1],
}

/// Bit of `VipRecord::domain_len` marking a VIP in the middle of being
/// reclaimed for another name. A reclaiming Envoy sets it first (under
/// the reclaim lock), then checks that no one used the VIP meanwhile, then
/// writes the new name; an Envoy that answers from memory checks the
/// record after stamping its use, so the two never both hand the VIP out.
pub const VIP_RECLAIMING_FLAG: u32 = 0x8000_0000;

/// What the loader tells `gateway status` about itself.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct LoaderInfo {
    /// Process id of the loader that owns the attachments.
    pub pid: u32,
    /// Number of bytes used in `cgroup_path`.
    pub cgroup_path_len: u32,
    /// Seconds since the Unix epoch when the programs were attached.
    pub attached_at: u64,
    /// Path of the cgroup the programs are attached to (UTF-8).
    pub cgroup_path: [u8; 256],
    /// Digest of the eBPF object whose programs are attached: a new loader
    /// keeps (adopts) attached programs only when they are its own build.
    pub object_digest: u64,
}

/// Why a cgroup is in the gate table: the configuration's `gate` list
/// (replaced on every start and reload), `gateway gate` (kept until
/// `gateway ungate`), or `gateway gate-pods` (reconciled with the pods
/// listed).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateOrigin {
    /// Listed in the configuration.
    Config = 1,
    /// Added by `gateway gate`.
    Command = 2,
    /// Added by `gateway gate-pods` for a selected Kubernetes pod.
    Pod = 3,
}

impl GateOrigin {
    /// The origin stored in a [`GateEntry`], if it is a known one.
    pub const fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            1 => Some(Self::Config),
            2 => Some(Self::Command),
            3 => Some(Self::Pod),
            _ => None,
        }
    }

    /// Name shown by `gateway status`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Config => "config",
            Self::Command => "gate",
            Self::Pod => "pod",
        }
    }
}

/// Value of the gate table ([`MAP_GATED`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct GateEntry {
    /// The cgroup's level (cgroup v2 root = 0).
    pub level: u32,
    /// A [`GateOrigin`].
    pub origin: u32,
}

/// Decisions the kernel programs count, one slot each in [`MAP_COUNTERS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// TCP connect to a VIP sent to the TCP target.
    TcpRedirected = 0,
    /// TCP connect outside the VIP networks, left alone.
    TcpPassed = 1,
    /// Connected UDP socket to port 53 sent to the DNS target.
    UdpConnectRedirected = 2,
    /// UDP datagram to port 53 sent to the DNS target.
    UdpSendRedirected = 3,
    /// UDP connect or datagram to another port, left alone.
    UdpPassed = 4,
    /// Other protocols and families, left alone.
    OtherPassed = 5,
    /// Reply source rewritten back to the server the application asked.
    RecvRewritten = 6,
    /// `getpeername` answer rewritten back to the original server.
    PeerRewritten = 7,
    /// Original destination recorded for the proxy at TCP connect.
    OrigDstRecorded = 8,
    /// A redirected TCP socket whose cookie entry was gone at TCP connect.
    OrigDstMissing = 9,
    /// A map update failed (map full or kernel refused).
    MapUpdateFailed = 10,
    /// Programs ran before the loader wrote a configuration.
    NotConfigured = 11,
    /// A socket in another network namespace than the proxy's, left alone.
    ForeignNetnsPassed = 12,
    /// An original destination nobody consumed, removed when its client
    /// socket closed.
    OrigDstClosed = 13,
    /// TCP connect to port 53 sent to the DNS-over-TCP target.
    DnsTcpRedirected = 14,
    /// An IPv6 DNS datagram or connect (not v4-mapped) left alone because
    /// the proxy has no IPv6 listener.
    Ipv6Unserved = 15,
    /// A connect to an address of a VIP range that no name holds, refused.
    UnknownVipRefused = 16,
    /// DNS left on its original path because no proxy listener was bound
    /// at the target (the proxy is restarting).
    DnsOutagePassed = 17,
    /// DNS refused because no proxy listener was bound at the target and
    /// the outage policy is "drop".
    DnsOutageRefused = 18,
    /// A connect to a VIP while no proxy listener was bound (it fails at
    /// once with ECONNREFUSED).
    TcpTargetDown = 19,
    /// A connect or datagram of a process below the attach cgroup but in
    /// no gated cgroup, left alone.
    NotGatedPassed = 20,
}

/// Number of counter slots.
pub const COUNTER_COUNT: u32 = 21;

impl Counter {
    /// Every counter, in slot order.
    pub const ALL: [Counter; COUNTER_COUNT as usize] = [
        Counter::TcpRedirected,
        Counter::TcpPassed,
        Counter::UdpConnectRedirected,
        Counter::UdpSendRedirected,
        Counter::UdpPassed,
        Counter::OtherPassed,
        Counter::RecvRewritten,
        Counter::PeerRewritten,
        Counter::OrigDstRecorded,
        Counter::OrigDstMissing,
        Counter::MapUpdateFailed,
        Counter::NotConfigured,
        Counter::ForeignNetnsPassed,
        Counter::OrigDstClosed,
        Counter::DnsTcpRedirected,
        Counter::Ipv6Unserved,
        Counter::UnknownVipRefused,
        Counter::DnsOutagePassed,
        Counter::DnsOutageRefused,
        Counter::TcpTargetDown,
        Counter::NotGatedPassed,
    ];

    /// Stable snake_case name used by `gateway status`.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::TcpRedirected => "tcp_redirected",
            Counter::TcpPassed => "tcp_passed",
            Counter::UdpConnectRedirected => "udp_connect_redirected",
            Counter::UdpSendRedirected => "udp_send_redirected",
            Counter::UdpPassed => "udp_passed",
            Counter::OtherPassed => "other_passed",
            Counter::RecvRewritten => "recv_rewritten",
            Counter::PeerRewritten => "peer_rewritten",
            Counter::OrigDstRecorded => "orig_dst_recorded",
            Counter::OrigDstMissing => "orig_dst_missing",
            Counter::MapUpdateFailed => "map_update_failed",
            Counter::NotConfigured => "not_configured",
            Counter::ForeignNetnsPassed => "foreign_netns_passed",
            Counter::OrigDstClosed => "orig_dst_closed",
            Counter::DnsTcpRedirected => "dns_tcp_redirected",
            Counter::Ipv6Unserved => "ipv6_unserved",
            Counter::UnknownVipRefused => "unknown_vip_refused",
            Counter::DnsOutagePassed => "dns_outage_passed",
            Counter::DnsOutageRefused => "dns_outage_refused",
            Counter::TcpTargetDown => "tcp_target_down",
            Counter::NotGatedPassed => "not_gated_passed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_matches_inside_and_not_outside() {
        let cidr = Ipv4Cidr::new([10, 10, 0, 7], 24);
        assert_eq!(cidr.network, u32::from_ne_bytes([10, 10, 0, 0]));
        assert_eq!(cidr.prefix_len(), 24);
        assert!(cidr.contains(u32::from_ne_bytes([10, 10, 0, 255])));
        assert!(!cidr.contains(u32::from_ne_bytes([10, 10, 1, 0])));
        assert!(Ipv4Cidr::new([0, 0, 0, 0], 0).contains(u32::from_ne_bytes([1, 2, 3, 4])));
        assert!(!Ipv4Cidr::new([1, 2, 3, 4], 32).contains(u32::from_ne_bytes([1, 2, 3, 5])));
    }

    #[test]
    fn sockaddr_keeps_network_order() {
        let a = SockAddrV4::new([127, 0, 0, 1], 15001);
        assert_eq!(a.octets(), [127, 0, 0, 1]);
        assert_eq!(a.port_host(), 15001);
        assert_eq!(a.port.to_ne_bytes(), 15001u16.to_be_bytes());
    }

    #[test]
    fn config_is_vip_honours_count() {
        let mut cfg = GatewayConfig::default();
        cfg.vip_cidrs[0] = Ipv4Cidr::new([10, 10, 0, 0], 24);
        cfg.vip_cidrs[1] = Ipv4Cidr::new([10, 20, 0, 0], 16);
        cfg.vip_cidr_count = 1;
        assert!(cfg.is_vip(u32::from_ne_bytes([10, 10, 0, 3])));
        assert!(!cfg.is_vip(u32::from_ne_bytes([10, 20, 0, 3])));
        cfg.vip_cidr_count = 2;
        assert!(cfg.is_vip(u32::from_ne_bytes([10, 20, 9, 3])));
    }

    #[test]
    fn counter_slots_are_dense() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }
}
