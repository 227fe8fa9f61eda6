//! The programs and the maps they own. Every map is pinned by name under the
//! loader's pin directory, so a restarted loader or Envoy finds the same
//! tables again (see `gateway_common::ALL_MAPS`).

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE, BPF_TCP_FIN_WAIT2,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockOpsContext},
    EbpfContext,
};
use aya_log_ebpf::debug;
use gateway_common::{
    Counter, GatewayConfig, LoaderInfo, OrigDstEntry, SockAddrV4, VipRecord, CONFIG_FLAG_ENABLED,
    CONNECTION_TABLE_CAPACITY, COUNTER_COUNT, VIP_TABLE_CAPACITY,
};

const AF_INET: u32 = 2;
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

/// Socket cookie → the destination the application asked for. Filled at
/// connect/sendmsg time; read by sockops (TCP) and by recvmsg/getpeername
/// to undo the rewrite. LRU: a socket's entry is needed for its whole life
/// (getpeername may be called at any time), and the kernel gives cgroup
/// programs no close hook for UDP, so the oldest entries are evicted.
#[map]
static GW_SOCK_ORIG: LruHashMap<u64, SockAddrV4> = LruHashMap::pinned(CONNECTION_TABLE_CAPACITY, 0);

/// Client (ip, port) → original destination and client socket, for the
/// proxy. An entry belongs to one connection: the proxy consumes it
/// (lookup and delete) when it accepts the connection, and sockops removes
/// it when the client socket reaches TCP_CLOSE unconsumed: at once when
/// the proxy's side closed first, the connection was reset or the connect
/// failed (the proxy has accepted, or never will); when the client closed
/// first (from FIN_WAIT2: the proxy may not have accepted yet) it is
/// stamped instead, and the loader removes it after a grace shorter than
/// the TIME_WAIT reuse delay. Only sockets of the proxy's network
/// namespace are recorded, where a live (ip, port) is unique. LRU so that
/// a full table evicts instead of failing; an evicted entry makes that one
/// connection fail closed at the proxy.
#[map]
static GW_ORIG_DST: LruHashMap<SockAddrV4, OrigDstEntry> =
    LruHashMap::pinned(CONNECTION_TABLE_CAPACITY, 0);

/// VIP → domain, written by the Envoy module. Owned here so that the
/// loader creates and pins it and it outlives Envoy restarts.
#[map]
static GW_VIPS: HashMap<u32, VipRecord> = HashMap::pinned(VIP_TABLE_CAPACITY, BPF_F_NO_PREALLOC);

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

/// Fields of the socket address a cgroup program sees.
struct Destination {
    family: u32,
    protocol: u32,
    ip: u32,
    port: u16,
}

#[inline(always)]
fn destination(ctx: &SockAddrContext) -> Destination {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands a valid bpf_sock_addr for the program's run;
    // these fields are readable by every cgroup sock_addr attach type.
    unsafe {
        Destination {
            family: (*sa).user_family,
            protocol: (*sa).protocol,
            ip: (*sa).user_ip4,
            port: (*sa).user_port as u16,
        }
    }
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
fn redirect(ctx: &SockAddrContext, dest: &Destination, target: SockAddrV4) -> bool {
    let original = SockAddrV4 {
        ip: dest.ip,
        port: dest.port,
        _pad: 0,
    };
    if GW_SOCK_ORIG
        .insert(&socket_cookie(ctx), &original, 0)
        .is_err()
    {
        count(Counter::MapUpdateFailed);
        return false;
    }
    let sa = ctx.sock_addr;
    // SAFETY: user_ip4/user_port are writable in connect4 and sendmsg4.
    unsafe {
        (*sa).user_ip4 = target.ip;
        (*sa).user_port = target.port as u32;
    }
    true
}

#[inline(always)]
fn is_target(dest: &Destination, target: &SockAddrV4) -> bool {
    dest.ip == target.ip && dest.port == target.port
}

/// TCP to a VIP → TCP target; connected UDP to port 53 → DNS target.
#[cgroup_sock_addr(connect4)]
pub fn gw_connect4(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = config() else {
        return ALLOW;
    };
    let dest = destination(&ctx);
    if dest.family != AF_INET {
        count(Counter::OtherPassed);
        return ALLOW;
    }
    if !in_proxy_netns(&ctx, cfg) {
        return ALLOW;
    }
    match dest.protocol {
        IPPROTO_TCP => {
            if cfg.is_vip(dest.ip) && redirect(&ctx, &dest, cfg.tcp_target) {
                count(Counter::TcpRedirected);
                debug!(
                    &ctx,
                    "tcp connect to {:i}:{} redirected",
                    dest.ip.to_ne_bytes(),
                    u16::from_be(dest.port)
                );
            } else {
                count(Counter::TcpPassed);
            }
        }
        IPPROTO_UDP => {
            if dest.port == DNS_PORT
                && !is_target(&dest, &cfg.dns_target)
                && redirect(&ctx, &dest, cfg.dns_target)
            {
                count(Counter::UdpConnectRedirected);
                debug!(
                    &ctx,
                    "udp connect to {:i}:53 redirected",
                    dest.ip.to_ne_bytes()
                );
            } else {
                count(Counter::UdpPassed);
            }
        }
        _ => count(Counter::OtherPassed),
    }
    ALLOW
}

/// Unconnected UDP datagrams to port 53 → DNS target.
#[cgroup_sock_addr(sendmsg4)]
pub fn gw_sendmsg4(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = config() else {
        return ALLOW;
    };
    let dest = destination(&ctx);
    if dest.family != AF_INET || dest.port != DNS_PORT {
        count(Counter::UdpPassed);
        return ALLOW;
    }
    if !in_proxy_netns(&ctx, cfg) {
        return ALLOW;
    }
    if !is_target(&dest, &cfg.dns_target) && redirect(&ctx, &dest, cfg.dns_target) {
        count(Counter::UdpSendRedirected);
        debug!(
            &ctx,
            "udp datagram to {:i}:53 redirected",
            dest.ip.to_ne_bytes()
        );
    } else {
        count(Counter::UdpPassed);
    }
    ALLOW
}

/// When the address a socket reports is one of the redirect targets and the
/// socket was redirected, report the original destination instead.
#[inline(always)]
fn restore_original(ctx: &SockAddrContext, counter: Counter) {
    let Some(cfg) = config() else {
        return;
    };
    let dest = destination(ctx);
    if !is_target(&dest, &cfg.dns_target) && !is_target(&dest, &cfg.tcp_target) {
        return;
    }
    // SAFETY: the value is copied out at once; LRU eviction of a concurrent
    // entry can at worst hand us another socket's address, never bad memory.
    let Some(original) = (unsafe { GW_SOCK_ORIG.get(&socket_cookie(ctx)) }).copied() else {
        return;
    };
    let sa = ctx.sock_addr;
    // SAFETY: user_ip4/user_port are writable in recvmsg4 and getpeername4.
    unsafe {
        (*sa).user_ip4 = original.ip;
        (*sa).user_port = original.port as u32;
    }
    count(counter);
}

/// Replies from the DNS target appear to come from the server the
/// application asked.
#[cgroup_sock_addr(recvmsg4)]
pub fn gw_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_original(&ctx, Counter::RecvRewritten);
    // recvmsg programs must return 1.
    ALLOW
}

/// `getpeername` on a redirected socket reports the original destination.
#[cgroup_sock_addr(getpeername4)]
pub fn gw_getpeername4(ctx: SockAddrContext) -> i32 {
    restore_original(&ctx, Counter::PeerRewritten);
    ALLOW
}

/// At TCP_CONNECT_CB the client's port is assigned and the cookie is the
/// one connect4 saw: publish the original destination keyed by the client
/// address for the proxy, and ask for state callbacks so that the entry is
/// removed when the socket closes. At TCP_CLOSE, remove the entry if it is
/// still this socket's (the proxy did not consume it).
#[sock_ops]
pub fn gw_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.family() != AF_INET {
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

#[inline(always)]
fn client_address(ctx: &SockOpsContext) -> SockAddrV4 {
    SockAddrV4 {
        ip: ctx.local_ip4(),
        port: (ctx.local_port() as u16).to_be(),
        _pad: 0,
    }
}

#[inline(always)]
fn record_original_destination(ctx: &SockOpsContext) {
    let Some(cfg) = config() else {
        return;
    };
    // remote_port carries the network-order port in its upper 16 bits.
    let remote_port = (ctx.remote_port() >> 16) as u16;
    if ctx.remote_ip4() != cfg.tcp_target.ip || remote_port != cfg.tcp_target.port {
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
        cookie,
        closed_at_ns: 0,
    };
    if GW_ORIG_DST.insert(&client_address(ctx), &entry, 0).is_err() {
        count(Counter::MapUpdateFailed);
        return;
    }
    count(Counter::OrigDstRecorded);
    // Without the state callback the entry would outlive an unaccepted
    // connection; then it must not exist at all.
    if ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32).is_err() {
        let _ = GW_ORIG_DST.remove(&client_address(ctx));
        count(Counter::MapUpdateFailed);
    }
}

#[inline(always)]
fn forget_original_destination(ctx: &SockOpsContext, client_closed_first: bool) {
    let client = client_address(ctx);
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
