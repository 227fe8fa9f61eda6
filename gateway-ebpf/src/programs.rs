//! The programs and the maps they own. Every map is pinned by name under the
//! loader's pin directory, so a restarted loader or Envoy finds the same
//! tables again (see `gateway_common::ALL_MAPS`).

use aya_ebpf::{
    bindings::{
        bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, BPF_TCP_FIN_WAIT2,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_uid_gid, bpf_get_netns_cookie,
        bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_sk_lookup_tcp, bpf_sk_lookup_udp,
        bpf_sk_release,
    },
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockOpsContext},
    EbpfContext,
};
use aya_log_ebpf::debug;
use gateway_common::{
    is_v4_mapped, Counter, GateEntry, GatewayConfig, LoaderInfo, OrigDstEntry, SockAddr6,
    SockAddrV4, VipRecord, CONFIG_FLAG_DNS_OUTAGE_DROP, CONFIG_FLAG_DNS_TCP, CONFIG_FLAG_ENABLED,
    CONFIG_FLAG_IPV6, CONFIG_FLAG_REFUSE_UNKNOWN_VIPS, CONNECTION_TABLE_CAPACITY, COUNTER_COUNT,
    GATED_CGROUP_CAPACITY, IPV6_LOOPBACK, MAX_GATE_DEPTH, NO_EXEMPT_UID, VIP_TABLE_CAPACITY,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
/// Port 53 as `user_port` carries it (network byte order in the low half).
const DNS_PORT: u16 = 53u16.to_be();
/// Hash map flag: allocate entries on demand instead of up front.
const BPF_F_NO_PREALLOC: u32 = 1;
/// cgroup sock_addr programs return 1 to let the syscall proceed.
const ALLOW: i32 = 1;

/// Written by the loader before attaching; read-only for the programs.
#[map]
static GW_CONFIG: Array<GatewayConfig> = Array::pinned(1, 0);

/// One slot per `Counter`, per CPU, so counting needs no atomics.
#[map]
static GW_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_COUNT, 0);

/// Socket cookie → the destination the application asked for (IPv4
/// v4-mapped). Filled at connect/sendmsg time; read by sockops (TCP) and
/// by recvmsg/getpeername to undo the rewrite. LRU: a socket's entry is
/// needed for its whole life (getpeername may be called at any time), and
/// the kernel gives cgroup programs no close hook for UDP, so the oldest
/// entries are evicted.
#[map]
static GW_SOCK_ORIG: LruHashMap<u64, SockAddr6> = LruHashMap::pinned(CONNECTION_TABLE_CAPACITY, 0);

/// Client (ip, port) of either family → original destination and client
/// socket, for the proxy. An entry belongs to one connection: the proxy
/// consumes it (lookup and delete) when it accepts the connection, and
/// sockops removes it when the client socket reaches TCP_CLOSE
/// unconsumed: at once when the proxy's side closed first, the connection
/// was reset or the connect failed (the proxy has accepted, or never
/// will); when the client closed first (from FIN_WAIT2: the proxy may not
/// have accepted yet) it is stamped instead, and the loader removes it
/// after a grace shorter than the TIME_WAIT reuse delay. Only sockets of
/// the proxy's network namespace are recorded, where a live (ip, port) is
/// unique. LRU so that a full table evicts instead of failing; an evicted
/// entry makes that one connection fail closed at the proxy.
#[map]
static GW_ORIG_DST: LruHashMap<SockAddr6, OrigDstEntry> =
    LruHashMap::pinned(CONNECTION_TABLE_CAPACITY, 0);

/// VIP → domain, written by the Envoy module. Owned here so that the
/// loader creates and pins it and it outlives Envoy restarts.
#[map]
static GW_VIPS: HashMap<u32, VipRecord> = HashMap::pinned(VIP_TABLE_CAPACITY, BPF_F_NO_PREALLOC);

/// VIP → last use (`bpf_ktime_get_ns`): stamped here at every connect to
/// a VIP and by the module at every answer; the module reclaims idle VIPs
/// by it. LRU so that it never refuses a stamp.
#[map]
static GW_VIP_USE: LruHashMap<u32, u64> = LruHashMap::pinned(VIP_TABLE_CAPACITY, 0);

/// cgroup id → gated (see `gateway_common::MAP_GATED`): written by the
/// loader, `gateway gate`/`ungate` and `gateway gate-pods`; the programs
/// only read it. Not preallocated: most hosts gate a handful of cgroups.
#[map]
static GW_GATED: HashMap<u64, GateEntry> =
    HashMap::pinned(GATED_CGROUP_CAPACITY, BPF_F_NO_PREALLOC);

/// Who attached the programs where; written by the loader for `status`.
#[map]
static GW_LOADER: Array<LoaderInfo> = Array::pinned(1, 0);

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = GW_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the pointer comes from a successful lookup of this CPU's
        // slot and stays valid while the program runs. On a preemptible
        // kernel another program on this CPU may interleave and lose an
        // increment; that costs counter accuracy, never memory safety.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn config() -> Option<&'static GatewayConfig> {
    match GW_CONFIG.get(0) {
        Some(cfg) if cfg.flags & CONFIG_FLAG_ENABLED != 0 => Some(cfg),
        _ => {
            count(Counter::NotConfigured);
            None
        }
    }
}

/// The destination (or, in recvmsg/getpeername, the peer) a cgroup
/// program sees, in one layout for both families: an IPv4 address is
/// held v4-mapped.
struct Destination {
    family: u32,
    protocol: u32,
    addr: SockAddr6,
}

impl Destination {
    /// The IPv4 address when the destination is IPv4 or v4-mapped.
    #[inline(always)]
    fn v4(&self) -> Option<u32> {
        if self.addr.is_v4_mapped() {
            Some(self.addr.ip6[3])
        } else {
            None
        }
    }

    #[inline(always)]
    fn port(&self) -> u16 {
        self.addr.port
    }
}

/// Reads one `bpf_sock_addr` field with a volatile load (see
/// `sock_ops_field!`).
macro_rules! sock_addr_field {
    ($ctx:expr, $($field:tt)+) => {{
        let sa = $ctx.sock_addr;
        // SAFETY: `sa` is the kernel's bpf_sock_addr for this run; family,
        // protocol and port are readable by every cgroup sock_addr attach
        // type, user_ip4 by the IPv4 ones and user_ip6 by the IPv6 ones
        // (callers read the address field of their own family only).
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*sa).$($field)+)) }
    }};
}

/// Writes one `bpf_sock_addr` field with a volatile store.
macro_rules! set_sock_addr_field {
    ($ctx:expr, $value:expr, $($field:tt)+) => {{
        let sa = $ctx.sock_addr;
        // SAFETY: `sa` is the kernel's bpf_sock_addr for this run; the
        // address of the hook's own family and user_port are writable in
        // the connect, sendmsg, recvmsg and getpeername hooks, the only
        // places this runs.
        unsafe { core::ptr::write_volatile(core::ptr::addr_of_mut!((*sa).$($field)+), $value) }
    }};
}

/// The destination as the hook of `hook_family` sees it; `hook_family` is
/// a constant in each program, so each reads only its own address field.
#[inline(always)]
fn destination(ctx: &SockAddrContext, hook_family: u32) -> Destination {
    let family = sock_addr_field!(ctx, user_family);
    let port = sock_addr_field!(ctx, user_port) as u16;
    let addr = if hook_family == AF_INET6 {
        SockAddr6 {
            ip6: [
                sock_addr_field!(ctx, user_ip6[0]),
                sock_addr_field!(ctx, user_ip6[1]),
                sock_addr_field!(ctx, user_ip6[2]),
                sock_addr_field!(ctx, user_ip6[3]),
            ],
            port,
            _pad: 0,
        }
    } else {
        SockAddr6::from_v4(sock_addr_field!(ctx, user_ip4), port)
    };
    Destination {
        family,
        protocol: sock_addr_field!(ctx, protocol),
        addr,
    }
}

/// Writes `to` into the socket address the syscall uses: the IPv4 field
/// for the IPv4 hooks, all of `user_ip6` for the IPv6 ones (an IPv4
/// address then stays v4-mapped, the form an AF_INET6 socket expects).
#[inline(always)]
fn write_address(ctx: &SockAddrContext, hook_family: u32, to: &SockAddr6) {
    if hook_family == AF_INET6 {
        set_sock_addr_field!(ctx, to.ip6[0], user_ip6[0]);
        set_sock_addr_field!(ctx, to.ip6[1], user_ip6[1]);
        set_sock_addr_field!(ctx, to.ip6[2], user_ip6[2]);
        set_sock_addr_field!(ctx, to.ip6[3], user_ip6[3]);
    } else {
        set_sock_addr_field!(ctx, to.ip6[3], user_ip4);
    }
    set_sock_addr_field!(ctx, to.port as u32, user_port);
}

/// Whether the socket lives in the network namespace the proxy serves.
/// Elsewhere the proxy's loopback listeners are unreachable, and an
/// address recorded there could collide with a real client of the proxy.
#[inline(always)]
fn in_proxy_netns<C: EbpfContext>(ctx: &C, cfg: &GatewayConfig) -> bool {
    // SAFETY: bpf_get_netns_cookie accepts sock_addr (5.7+) and sock_ops
    // (5.15+) contexts.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if cookie == cfg.netns_cookie {
        true
    } else {
        count(Counter::ForeignNetnsPassed);
        false
    }
}

/// Whether the calling process is gated: its cgroup or one of its
/// ancestors is in the gate table, and it is not Envoy's own user. Every
/// level from the root down to `MAX_GATE_DEPTH` is looked at, so nothing
/// depends on how user space counted levels. The programs run for every
/// process below the attach cgroup; the others (siblings of the gated
/// workloads) are left alone. Decided by the process making the call, as
/// the sock_addr hooks run in its context.
#[inline(always)]
fn in_gated_cgroup(cfg: &GatewayConfig) -> bool {
    if cfg.exempt_uid != NO_EXEMPT_UID && cfg.exempt_uid != 0 {
        // The low 32 bits are the calling task's uid.
        let uid = bpf_get_current_uid_gid() as u32;
        if uid == cfg.exempt_uid {
            count(Counter::NotGatedPassed);
            return false;
        }
    }
    let mut level = 0;
    while level < MAX_GATE_DEPTH {
        // SAFETY: the helper takes a level and returns 0 past the calling
        // task's own level; cgroup sock_addr programs may call it.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 {
            break;
        }
        // SAFETY: only the presence of the entry is used.
        if unsafe { GW_GATED.get(&id) }.is_some() {
            return true;
        }
        level += 1;
    }
    count(Counter::NotGatedPassed);
    false
}

#[inline(always)]
fn socket_cookie<C: EbpfContext>(ctx: &C) -> u64 {
    // SAFETY: bpf_get_socket_cookie accepts sock_addr and sock_ops contexts.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// Rewrites the destination to `target` after remembering the original
/// under the socket's cookie. Returns false (and leaves the socket alone)
/// when the original cannot be recorded: a redirect that can never be
/// undone would break the application worse than no redirect.
#[inline(always)]
fn redirect(
    ctx: &SockAddrContext,
    hook_family: u32,
    dest: &Destination,
    target: &SockAddr6,
) -> bool {
    if GW_SOCK_ORIG
        .insert(&socket_cookie(ctx), &dest.addr, 0)
        .is_err()
    {
        count(Counter::MapUpdateFailed);
        return false;
    }
    write_address(ctx, hook_family, target);
    true
}

/// Where a destination of this kind goes: the IPv4 listener (v4-mapped for
/// an AF_INET6 socket dialling an IPv4 address) or, for a native IPv6
/// destination, the same port on `::1` when the proxy listens there.
/// `None` when there is no listener of that family.
#[inline(always)]
fn target_for(cfg: &GatewayConfig, dest: &Destination, listener: &SockAddrV4) -> Option<SockAddr6> {
    if dest.v4().is_some() {
        Some(SockAddr6::from_v4(listener.ip, listener.port))
    } else if cfg.has(CONFIG_FLAG_IPV6) {
        Some(SockAddr6 {
            ip6: IPV6_LOOPBACK,
            port: listener.port,
            _pad: 0,
        })
    } else {
        count(Counter::Ipv6Unserved);
        None
    }
}

/// Which of the proxy's listeners an address is checked against.
#[derive(Clone, Copy)]
enum Listeners {
    /// Any of them: traffic to them is never redirected, and a connected
    /// socket's peer is restored only when it is one of them.
    Any,
    /// Only the UDP DNS listener: the only source whose datagrams a
    /// redirected socket may see restored (a datagram from another local
    /// port, e.g. a UDP socket someone bound on the TCP listener's port,
    /// must never pass for the application's nameserver).
    DnsUdp,
}

/// Whether `addr` is one of the proxy's `which` listeners (either family).
#[inline(always)]
fn is_listener_of(cfg: &GatewayConfig, addr: &SockAddr6, which: Listeners) -> bool {
    let port = addr.port;
    let v4 = if addr.is_v4_mapped() {
        Some(addr.ip6[3])
    } else if cfg.has(CONFIG_FLAG_IPV6)
        && addr.ip6[0] == IPV6_LOOPBACK[0]
        && addr.ip6[1] == IPV6_LOOPBACK[1]
        && addr.ip6[2] == IPV6_LOOPBACK[2]
        && addr.ip6[3] == IPV6_LOOPBACK[3]
    {
        None
    } else {
        return false;
    };
    let matches = |l: &SockAddrV4| l.port == port && v4.map_or(true, |ip| ip == l.ip);
    match which {
        Listeners::DnsUdp => matches(&cfg.dns_target),
        Listeners::Any => {
            matches(&cfg.dns_target)
                || matches(&cfg.tcp_target)
                || (cfg.has(CONFIG_FLAG_DNS_TCP) && matches(&cfg.dns_tcp_target))
        }
    }
}

/// Whether `addr` is any of the proxy's listeners.
#[inline(always)]
fn is_listener(cfg: &GatewayConfig, addr: &SockAddr6) -> bool {
    is_listener_of(cfg, addr, Listeners::Any)
}

/// A VIP of either form: an IPv4 VIP (plain or v4-mapped) or an IPv6 VIP.
#[inline(always)]
fn is_vip(cfg: &GatewayConfig, dest: &Destination) -> bool {
    match dest.v4() {
        Some(ip) => cfg.is_vip(ip),
        None => cfg.is_vip6(&dest.addr.ip6),
    }
}

/// cgroup sock_addr programs return 0 to fail the syscall with EPERM.
const DENY: i32 = 0;

/// `BPF_F_CURRENT_NETNS`: look sockets up in the caller's namespace.
const CURRENT_NETNS: u64 = u64::MAX;

/// Whether a socket of `protocol` is bound at `target` in the caller's
/// network namespace: the proxy's listener is up.
#[inline(always)]
fn listener_up(ctx: &SockAddrContext, protocol: u32, target: &SockAddr6) -> bool {
    // SAFETY: all-zero bytes are a valid bpf_sock_tuple (a plain union of
    // integer fields).
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if target.is_v4_mapped() {
        tuple.__bindgen_anon_1.ipv4 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
            saddr: 0,
            daddr: target.ip6[3],
            sport: 0,
            dport: target.port,
        };
        core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>()
    } else {
        tuple.__bindgen_anon_1.ipv6 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 {
            saddr: [0; 4],
            daddr: target.ip6,
            sport: 0,
            dport: target.port,
        };
        core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>()
    } as u32;
    // SAFETY: the tuple is a valid stack object of `size` bytes; both
    // lookups are available to cgroup sock_addr programs, and a socket
    // they return is released before the program ends.
    unsafe {
        let sk = if protocol == IPPROTO_TCP {
            bpf_sk_lookup_tcp(ctx.as_ptr(), &mut tuple, size, CURRENT_NETNS, 0)
        } else {
            bpf_sk_lookup_udp(ctx.as_ptr(), &mut tuple, size, CURRENT_NETNS, 0)
        };
        if sk.is_null() {
            false
        } else {
            bpf_sk_release(sk.cast());
            true
        }
    }
}

/// What became of a DNS exchange (UDP datagram, UDP connect or TCP
/// connect to port 53).
enum DnsVerdict {
    /// Sent to the proxy.
    Redirected,
    /// Left on its original path (not DNS for the proxy, or no proxy
    /// listener and the outage policy passes).
    Passed,
    /// Refused: no proxy listener and the outage policy drops.
    Refused,
}

/// DNS to `dest` → the proxy listener of `protocol` at `listener`, if it
/// is up; otherwise as the outage policy says.
#[inline(always)]
fn redirect_dns(
    ctx: &SockAddrContext,
    hook_family: u32,
    cfg: &GatewayConfig,
    dest: &Destination,
    protocol: u32,
    listener: &SockAddrV4,
) -> DnsVerdict {
    let Some(target) = target_for(cfg, dest, listener) else {
        return DnsVerdict::Passed;
    };
    if !listener_up(ctx, protocol, &target) {
        if cfg.has(CONFIG_FLAG_DNS_OUTAGE_DROP) {
            count(Counter::DnsOutageRefused);
            return DnsVerdict::Refused;
        }
        count(Counter::DnsOutagePassed);
        return DnsVerdict::Passed;
    }
    if redirect(ctx, hook_family, dest, &target) {
        DnsVerdict::Redirected
    } else {
        DnsVerdict::Passed
    }
}

/// Whether the VIP `dest` stands for a name (has an entry in the VIP
/// table); an IPv6 VIP by its embedded IPv4 VIP.
#[inline(always)]
fn vip_allocated(dest: &Destination) -> bool {
    let vip = dest.addr.ip6[3];
    // SAFETY: only the presence of the entry is used.
    unsafe { GW_VIPS.get(&vip) }.is_some()
}

/// TCP to a VIP → TCP target; TCP to port 53 → DNS-over-TCP target.
#[inline(always)]
fn on_tcp_connect(
    ctx: &SockAddrContext,
    hook_family: u32,
    cfg: &GatewayConfig,
    dest: &Destination,
) -> i32 {
    if is_vip(cfg, dest) {
        let allocated = vip_allocated(dest);
        if cfg.has(CONFIG_FLAG_REFUSE_UNKNOWN_VIPS) && !allocated {
            count(Counter::UnknownVipRefused);
            return DENY;
        }
        // Only allocated VIPs are stamped: connects to free addresses of the
        // range must not evict the stamps that reclaiming goes by.
        if allocated {
            // SAFETY: bpf_ktime_get_ns has no preconditions.
            let now = unsafe { bpf_ktime_get_ns() };
            let _ = GW_VIP_USE.insert(&dest.addr.ip6[3], &now, 0);
        }
        if let Some(target) = target_for(cfg, dest, &cfg.tcp_target) {
            if !listener_up(ctx, IPPROTO_TCP, &target) {
                // Redirected all the same: the connect fails at once with
                // ECONNREFUSED, and never leaves for the VIP itself.
                count(Counter::TcpTargetDown);
            }
            if redirect(ctx, hook_family, dest, &target) {
                count(Counter::TcpRedirected);
                debug!(ctx, "tcp connect to a VIP redirected");
                return ALLOW;
            }
        }
    } else if dest.port() == DNS_PORT
        && cfg.has(CONFIG_FLAG_DNS_TCP)
        && !is_listener(cfg, &dest.addr)
    {
        match redirect_dns(
            ctx,
            hook_family,
            cfg,
            dest,
            IPPROTO_TCP,
            &cfg.dns_tcp_target,
        ) {
            DnsVerdict::Redirected => {
                count(Counter::DnsTcpRedirected);
                debug!(ctx, "dns over tcp redirected");
                return ALLOW;
            }
            DnsVerdict::Refused => return DENY,
            DnsVerdict::Passed => {}
        }
    }
    // A record left by an earlier connect of this socket (one that failed,
    // or was undone with AF_UNSPEC) must not describe this connection.
    // Not when the destination is a listener already: then a program
    // attached before this one (the previous set, while a new loader
    // replaces it) has just redirected and recorded this very connect.
    if !is_listener(cfg, &dest.addr) {
        let _ = GW_SOCK_ORIG.remove(&socket_cookie(ctx));
    }
    count(Counter::TcpPassed);
    ALLOW
}

/// UDP to port 53 → DNS target.
#[inline(always)]
fn on_dns_datagram(
    ctx: &SockAddrContext,
    hook_family: u32,
    cfg: &GatewayConfig,
    dest: &Destination,
) -> DnsVerdict {
    if dest.port() != DNS_PORT || is_listener(cfg, &dest.addr) {
        return DnsVerdict::Passed;
    }
    redirect_dns(ctx, hook_family, cfg, dest, IPPROTO_UDP, &cfg.dns_target)
}

#[inline(always)]
fn on_connect(ctx: &SockAddrContext, family: u32) -> i32 {
    let Some(cfg) = config() else {
        return ALLOW;
    };
    let dest = destination(ctx, family);
    if dest.family != family {
        count(Counter::OtherPassed);
        return ALLOW;
    }
    if !in_gated_cgroup(cfg) || !in_proxy_netns(ctx, cfg) {
        return ALLOW;
    }
    match dest.protocol {
        IPPROTO_TCP => on_tcp_connect(ctx, family, cfg, &dest),
        IPPROTO_UDP => match on_dns_datagram(ctx, family, cfg, &dest) {
            DnsVerdict::Redirected => {
                count(Counter::UdpConnectRedirected);
                debug!(ctx, "udp connect to port 53 redirected");
                ALLOW
            }
            DnsVerdict::Refused => DENY,
            DnsVerdict::Passed => {
                count(Counter::UdpPassed);
                ALLOW
            }
        },
        _ => {
            count(Counter::OtherPassed);
            ALLOW
        }
    }
}

#[inline(always)]
fn on_sendmsg(ctx: &SockAddrContext, family: u32) -> i32 {
    let Some(cfg) = config() else {
        return ALLOW;
    };
    let dest = destination(ctx, family);
    if dest.family != family || dest.port() != DNS_PORT {
        count(Counter::UdpPassed);
        return ALLOW;
    }
    if !in_gated_cgroup(cfg) || !in_proxy_netns(ctx, cfg) {
        return ALLOW;
    }
    match on_dns_datagram(ctx, family, cfg, &dest) {
        DnsVerdict::Redirected => {
            count(Counter::UdpSendRedirected);
            debug!(ctx, "udp datagram to port 53 redirected");
            ALLOW
        }
        DnsVerdict::Refused => DENY,
        DnsVerdict::Passed => {
            count(Counter::UdpPassed);
            ALLOW
        }
    }
}

/// TCP to a VIP → TCP target; TCP to port 53 → DNS-over-TCP target;
/// connected UDP to port 53 → DNS target.
#[cgroup_sock_addr(connect4)]
pub fn gw_connect4(ctx: SockAddrContext) -> i32 {
    on_connect(&ctx, AF_INET)
}

/// The same for AF_INET6 sockets: v4-mapped destinations (dual-stack
/// sockets, e.g. Java's) go to the IPv4 listeners in v4-mapped form,
/// native IPv6 ones (IPv6 resolvers, IPv6 VIPs) to the listeners on `::1`.
#[cgroup_sock_addr(connect6)]
pub fn gw_connect6(ctx: SockAddrContext) -> i32 {
    on_connect(&ctx, AF_INET6)
}

/// Unconnected UDP datagrams to port 53 → DNS target.
#[cgroup_sock_addr(sendmsg4)]
pub fn gw_sendmsg4(ctx: SockAddrContext) -> i32 {
    on_sendmsg(&ctx, AF_INET)
}

/// Unconnected UDP datagrams of AF_INET6 sockets to port 53 → DNS target.
#[cgroup_sock_addr(sendmsg6)]
pub fn gw_sendmsg6(ctx: SockAddrContext) -> i32 {
    on_sendmsg(&ctx, AF_INET6)
}

/// When the address a socket reports is one of the redirect targets and the
/// socket was redirected, report the original destination instead.
#[inline(always)]
fn restore_original(ctx: &SockAddrContext, hook_family: u32, which: Listeners, counter: Counter) {
    let Some(cfg) = config() else {
        return;
    };
    let dest = destination(ctx, hook_family);
    if !is_listener_of(cfg, &dest.addr, which) {
        return;
    }
    // SAFETY: the value is copied out at once; LRU eviction of a concurrent
    // entry can at worst hand us another socket's address, never bad memory.
    let Some(original) = (unsafe { GW_SOCK_ORIG.get(&socket_cookie(ctx)) }).copied() else {
        return;
    };
    // An IPv4 socket can only show an IPv4 original.
    if hook_family != AF_INET6 && !original.is_v4_mapped() {
        return;
    }
    write_address(ctx, hook_family, &original);
    count(counter);
}

/// Replies from the DNS target appear to come from the server the
/// application asked.
#[cgroup_sock_addr(recvmsg4)]
pub fn gw_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_original(&ctx, AF_INET, Listeners::DnsUdp, Counter::RecvRewritten);
    // recvmsg programs must return 1.
    ALLOW
}

/// The same for AF_INET6 sockets (musl's resolver, IPv6 nameservers).
#[cgroup_sock_addr(recvmsg6)]
pub fn gw_recvmsg6(ctx: SockAddrContext) -> i32 {
    restore_original(&ctx, AF_INET6, Listeners::DnsUdp, Counter::RecvRewritten);
    ALLOW
}

/// `getpeername` on a redirected socket reports the original destination.
#[cgroup_sock_addr(getpeername4)]
pub fn gw_getpeername4(ctx: SockAddrContext) -> i32 {
    restore_original(&ctx, AF_INET, Listeners::Any, Counter::PeerRewritten);
    ALLOW
}

/// The same for AF_INET6 sockets.
#[cgroup_sock_addr(getpeername6)]
pub fn gw_getpeername6(ctx: SockAddrContext) -> i32 {
    restore_original(&ctx, AF_INET6, Listeners::Any, Counter::PeerRewritten);
    ALLOW
}

/// At TCP_CONNECT_CB the client's port is assigned and the cookie is the
/// one connect4/6 saw: publish the original destination keyed by the
/// client address for the proxy, and ask for state callbacks so that the
/// entry is removed when the socket closes. At TCP_CLOSE, remove the entry
/// if it is still this socket's (the proxy did not consume it).
#[sock_ops]
pub fn gw_sockops(ctx: SockOpsContext) -> u32 {
    let family = ctx.family();
    if family != AF_INET && family != AF_INET6 {
        return 1;
    }
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => record_original_destination(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            forget_original_destination(&ctx, ctx.arg(0) == BPF_TCP_FIN_WAIT2)
        }
        _ => {}
    }
    1
}

/// Reads one `bpf_sock_ops` field with a volatile load, so that the
/// compiler never merges loads of different fields into one load from a
/// computed context pointer (which the verifier refuses).
macro_rules! sock_ops_field {
    ($ctx:expr, $($field:tt)+) => {{
        let ops = $ctx.ops;
        // SAFETY: `ops` is the kernel's bpf_sock_ops for this run; every
        // field read here is readable by sock_ops programs.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*ops).$($field)+)) }
    }};
}

/// The connection's peer and its own address, both in the one layout.
/// An AF_INET6 socket dialling a v4-mapped address runs over IPv4: the
/// proxy sees an IPv4 peer, so such a connection is keyed by its IPv4
/// fields (set by the IPv4 connect path before the connect callback),
/// exactly like a plain IPv4 one.
#[inline(always)]
fn connection_ends(ctx: &SockOpsContext) -> (SockAddr6, SockAddr6) {
    // Every field is read before any branch: loads in different branches
    // get merged by the compiler into one load through a computed context
    // pointer, which the verifier refuses.
    // remote_port carries the network-order port in its upper 16 bits;
    // local_port is in host order.
    let remote_port = (sock_ops_field!(ctx, remote_port) >> 16) as u16;
    let local_port = (sock_ops_field!(ctx, local_port) as u16).to_be();
    let family = sock_ops_field!(ctx, family);
    let remote_ip4 = sock_ops_field!(ctx, remote_ip4);
    let local_ip4 = sock_ops_field!(ctx, local_ip4);
    let remote_ip6 = [
        sock_ops_field!(ctx, remote_ip6[0]),
        sock_ops_field!(ctx, remote_ip6[1]),
        sock_ops_field!(ctx, remote_ip6[2]),
        sock_ops_field!(ctx, remote_ip6[3]),
    ];
    let local_ip6 = [
        sock_ops_field!(ctx, local_ip6[0]),
        sock_ops_field!(ctx, local_ip6[1]),
        sock_ops_field!(ctx, local_ip6[2]),
        sock_ops_field!(ctx, local_ip6[3]),
    ];
    if family == AF_INET6 && !is_v4_mapped(&remote_ip6) {
        (
            SockAddr6 {
                ip6: remote_ip6,
                port: remote_port,
                _pad: 0,
            },
            SockAddr6 {
                ip6: local_ip6,
                port: local_port,
                _pad: 0,
            },
        )
    } else {
        (
            SockAddr6::from_v4(remote_ip4, remote_port),
            SockAddr6::from_v4(local_ip4, local_port),
        )
    }
}

#[inline(always)]
fn is_tcp_target(cfg: &GatewayConfig, addr: &SockAddr6) -> bool {
    if addr.port != cfg.tcp_target.port {
        return false;
    }
    if addr.is_v4_mapped() {
        addr.ip6[3] == cfg.tcp_target.ip
    } else {
        cfg.has(CONFIG_FLAG_IPV6) && addr.ip6 == IPV6_LOOPBACK
    }
}

#[inline(always)]
fn record_original_destination(ctx: &SockOpsContext) {
    let Some(cfg) = config() else {
        return;
    };
    let (remote, client) = connection_ends(ctx);
    if !is_tcp_target(cfg, &remote) {
        return;
    }
    if !in_proxy_netns(ctx, cfg) {
        return;
    }
    let cookie = socket_cookie(ctx);
    // SAFETY: the value is copied out at once (see restore_original).
    let Some(original) = (unsafe { GW_SOCK_ORIG.get(&cookie) }).copied() else {
        // Someone dialled the proxy directly: nothing to record.
        count(Counter::OrigDstMissing);
        return;
    };
    let entry = OrigDstEntry {
        dst: original,
        _pad: 0,
        cookie,
        closed_at_ns: 0,
    };
    if GW_ORIG_DST.insert(&client, &entry, 0).is_err() {
        count(Counter::MapUpdateFailed);
        return;
    }
    count(Counter::OrigDstRecorded);
    // Without the state callback the entry would outlive an unaccepted
    // connection; then it must not exist at all.
    if ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32).is_err() {
        let _ = GW_ORIG_DST.remove(&client);
        count(Counter::MapUpdateFailed);
    }
}

#[inline(always)]
fn forget_original_destination(ctx: &SockOpsContext, client_closed_first: bool) {
    let (_, client) = connection_ends(ctx);
    // SAFETY: the value is copied out at once (see restore_original).
    let Some(mut entry) = (unsafe { GW_ORIG_DST.get(&client) }).copied() else {
        return;
    };
    if entry.cookie != socket_cookie(ctx) {
        return;
    }
    if client_closed_first {
        // SAFETY: bpf_ktime_get_ns has no preconditions.
        entry.closed_at_ns = unsafe { bpf_ktime_get_ns() }.max(1);
        if GW_ORIG_DST.insert(&client, &entry, 0).is_err() {
            count(Counter::MapUpdateFailed);
        }
    } else if GW_ORIG_DST.remove(&client).is_ok() {
        count(Counter::OrigDstClosed);
    }
}

/// The kernel program license; GPL-compatible so that every helper the
/// programs and aya-log use is available.
#[no_mangle]
#[link_section = "license"]
pub static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
