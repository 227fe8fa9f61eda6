//! The `cache_lookup` network filter.
//!
//! On a new connection it finds the VIP the client dialled — the original
//! destination recorded in the pinned map for the client's address when
//! the gateway's kernel programs redirect (consumed: each entry serves one
//! connection), and/or the connection's local address (the seed's
//! iptables + `original_dst` setup), as `destination_from` says — then the
//! VIP's domain, then the metadata of the most specific pattern of its
//! gateway's `dns_gateway` config (same pin directory) matching that
//! domain, and publishes them as filter state:
//!
//! | key | value |
//! | --- | --- |
//! | `envoy.dns_gateway.domain` | the domain, e.g. `bucket-1.aws.com` |
//! | `envoy.dns_gateway.metadata.<key>` | each metadata value |
//! | `envoy.dns_gateway.port` | the port the client dialled, e.g. `443` |
//!
//! The port is an addition to the seed's keys: with the eBPF redirect the
//! listener's local port is Envoy's own, so a CONNECT target such as
//! `%FILTER_STATE(envoy.dns_gateway.domain:PLAIN)%:%FILTER_STATE(envoy.dns_gateway.port:PLAIN)%`
//! needs it from the original destination.
//!
//! With `set_tcp_proxy_cluster: true`, a `cluster` metadata value also
//! selects the tcp_proxy cluster (`envoy.tcp_proxy.cluster`, typed).
//! A miss (no recorded original destination: the gateway did not redirect
//! this connection; or a VIP no name holds) is logged and counted; the
//! connection goes on (`on_miss: "continue"`, the seed's behaviour) or is
//! closed (`on_miss: "close"`, what `gateway run` uses). Before declaring a
//! miss the pinned map is reopened once, in case a restarted loader
//! recreated it. A panic while handling the connection closes it.
//!
//! With `connect_response_timeout_ms`, a connection whose upstream is not
//! ready that long after it was accepted is closed and counted (in total
//! and per cluster named in `clusters`). tcp_proxy marks the upstream
//! ready only once the proxy answered the CONNECT, so this bounds a proxy
//! that accepts the TCP connection and never answers; Envoy 1.40's
//! tcp_proxy has no timeout of its own for that.

use std::{
    collections::HashMap,
    net::{SocketAddr, SocketAddrV4},
    sync::Arc,
};

pub use gateway_common::contract::{
    DOMAIN_KEY, METADATA_KEY_PREFIX, PORT_KEY, TCP_PROXY_CLUSTER_KEY,
};

use crate::{
    api::{
        log, CounterId, CounterKind, CounterRegistry, Counters, LogLevel, NetworkFilter,
        NetworkFilterConfig, NetworkFilterHandle, NetworkStatus, Timer,
    },
    config::{CacheLookupSettings, DestinationSource, OnMiss},
    state::GatewayState,
};

/// Counters of `cache_lookup`, visible on Envoy's `/stats` as
/// `dynamicmodulescustom.cache_lookup.<name>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheCounter {
    /// Connections whose domain was found.
    LookupHit,
    /// Connections whose domain was not found (either reason below).
    LookupMiss,
    /// Connections closed on a miss.
    Closed,
    /// Misses with no recorded original destination: connections the
    /// gateway did not redirect (or whose record was already consumed).
    NotRedirected,
    /// Misses whose destination is no allocated VIP.
    UnknownVip,
    /// Connections closed because handling them panicked.
    Panics,
    /// Connections closed because their tunnel was not established within
    /// `connect_response_timeout_ms`.
    ConnectResponseTimeout,
}

impl CounterKind for CacheCounter {
    const ALL: &'static [Self] = &[
        Self::LookupHit,
        Self::LookupMiss,
        Self::Closed,
        Self::NotRedirected,
        Self::UnknownVip,
        Self::Panics,
        Self::ConnectResponseTimeout,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::LookupHit => "cache_lookup.lookup_hit",
            Self::LookupMiss => "cache_lookup.lookup_miss",
            Self::Closed => "cache_lookup.closed",
            Self::NotRedirected => "cache_lookup.not_redirected",
            Self::UnknownVip => "cache_lookup.unknown_vip",
            Self::Panics => "cache_lookup.panics",
            Self::ConnectResponseTimeout => "cache_lookup.connect_response_timeout",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

struct Shared {
    settings: CacheLookupSettings,
    state: Arc<GatewayState>,
    counters: Counters<CacheCounter>,
    /// `cache_lookup.connect_response_timeout.<cluster>`, per configured
    /// cluster.
    timeouts_by_cluster: HashMap<String, CounterId>,
}

/// A port in decimal without a heap allocation.
struct PortText {
    digits: [u8; 5],
    start: usize,
}

impl PortText {
    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.digits[self.start..]).unwrap_or("0")
    }
}

fn itoa_u16(mut port: u16) -> PortText {
    let mut digits = [b'0'; 5];
    let mut start = 5;
    loop {
        start -= 1;
        digits[start] = b'0' + (port % 10) as u8;
        port /= 10;
        if port == 0 {
            break;
        }
    }
    PortText { digits, start }
}

/// The event id of the tunnel deadline timer.
const TUNNEL_DEADLINE: u64 = 1;

/// Defines the per-cluster timeout counters of `clusters`.
pub fn define_cluster_counters(
    clusters: &[String],
    registry: &mut dyn CounterRegistry,
) -> HashMap<String, CounterId> {
    clusters
        .iter()
        .filter_map(|cluster| {
            let name = format!("{}.{cluster}", CacheCounter::ConnectResponseTimeout.name());
            let id = registry.define_counter(&name);
            if id.is_none() {
                crate::log_fmt!(LogLevel::Warn, "could not define counter {name}");
            }
            Some((cluster.clone(), id?))
        })
        .collect()
}

/// A loaded `cache_lookup` config, shared by all connections.
pub struct CacheLookupConfig {
    shared: Arc<Shared>,
}

impl CacheLookupConfig {
    /// Builds the config.
    pub fn new(
        settings: CacheLookupSettings,
        state: Arc<GatewayState>,
        counters: Counters<CacheCounter>,
    ) -> Self {
        Self::with_cluster_counters(settings, state, counters, HashMap::new())
    }

    /// Builds the config with per-cluster timeout counters (see
    /// [`define_cluster_counters`]).
    pub fn with_cluster_counters(
        settings: CacheLookupSettings,
        state: Arc<GatewayState>,
        counters: Counters<CacheCounter>,
        timeouts_by_cluster: HashMap<String, CounterId>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                settings,
                state,
                counters,
                timeouts_by_cluster,
            }),
        }
    }
}

impl NetworkFilterConfig for CacheLookupConfig {
    fn new_filter(&self) -> Box<dyn NetworkFilter> {
        Box::new(CacheLookupFilter {
            shared: self.shared.clone(),
            deadline: None,
            route: None,
        })
    }
}

/// The filter of one connection.
pub struct CacheLookupFilter {
    shared: Arc<Shared>,
    /// Armed until it fires or the connection goes; whether the tunnel is
    /// up is asked only then (tcp_proxy tells no one when it comes up).
    deadline: Option<Timer>,
    /// The connection's domain and cluster, for the timeout's log and
    /// counters.
    route: Option<(String, Option<String>)>,
}

fn ipv4(addr: Option<SocketAddr>) -> Option<SocketAddrV4> {
    match addr? {
        SocketAddr::V4(v4) => Some(v4),
        SocketAddr::V6(v6) => v6
            .ip()
            .to_ipv4_mapped()
            .map(|ip| SocketAddrV4::new(ip, v6.port())),
    }
}

/// The IPv4 VIP a recorded destination stands for: itself, or for an
/// IPv6 VIP of the gateway's IPv6 range, the IPv4 VIP of the same domain;
/// `None` for any other IPv6 address.
fn ipv4_vip(state: &GatewayState, destination: SocketAddr) -> Option<SocketAddrV4> {
    match destination {
        SocketAddr::V4(v4) => Some(v4),
        SocketAddr::V6(v6) => {
            let ip = match v6.ip().to_ipv4_mapped() {
                Some(ip) => ip,
                None => state.ipv4_of_ipv6_vip(*v6.ip())?,
            };
            Some(SocketAddrV4::new(ip, v6.port()))
        }
    }
}

impl CacheLookupFilter {
    fn count(&self, handle: &mut dyn NetworkFilterHandle, counter: CacheCounter) {
        if let Some(id) = self.shared.counters.id(counter) {
            handle.increment_counter(id, 1);
        }
    }

    /// The original destination (VIP and port) of the connection, if any:
    /// consumed from the pinned map and/or the local address.
    fn destination(&self, handle: &dyn NetworkFilterHandle) -> Option<SocketAddrV4> {
        let state = &self.shared.state;
        let from_map = || {
            let client = handle.remote_address()?;
            state
                .take_original_destination(client, false)
                .or_else(|| state.take_original_destination(client, true))
                .and_then(|dst| ipv4_vip(state, dst))
        };
        let local = || ipv4(handle.local_address());
        match self.shared.settings.destination_from {
            DestinationSource::PinnedMap => from_map(),
            DestinationSource::LocalAddress => local(),
            DestinationSource::Either => from_map()
                .filter(|dst| state.domain_of(*dst.ip()).is_some())
                .or_else(local),
        }
    }

    fn miss(
        &self,
        handle: &mut dyn NetworkFilterHandle,
        reason: CacheCounter,
        what: String,
    ) -> NetworkStatus {
        self.count(handle, CacheCounter::LookupMiss);
        self.count(handle, reason);
        match self.shared.settings.on_miss {
            OnMiss::Continue => {
                crate::log_fmt!(
                    LogLevel::Info,
                    "cache_lookup: {what}; continuing without filter state"
                );
                NetworkStatus::Continue
            }
            OnMiss::Close => {
                crate::log_fmt!(
                    LogLevel::Info,
                    "cache_lookup: {what}; closing it (on_miss: close)"
                );
                self.count(handle, CacheCounter::Closed);
                handle.close();
                NetworkStatus::StopIteration
            }
        }
    }

    fn lookup(&mut self, handle: &mut dyn NetworkFilterHandle) -> NetworkStatus {
        let Some(destination) = self.destination(handle) else {
            let what = format!(
                "no original destination for the connection from {:?} (the gateway did not redirect it)",
                handle.remote_address()
            );
            return self.miss(handle, CacheCounter::NotRedirected, what);
        };
        let vip = *destination.ip();
        let Some(domain) = self.shared.state.domain_of(vip) else {
            let what = format!(
                "no domain holds {destination} (connection from {:?})",
                handle.remote_address()
            );
            return self.miss(handle, CacheCounter::UnknownVip, what);
        };
        self.count(handle, CacheCounter::LookupHit);
        let patterns = self.shared.state.patterns();
        let matched = patterns.best_match_state(&domain);
        let rule = matched.map(|(rule, _)| rule);
        if rule.is_none() {
            crate::log_fmt!(
                LogLevel::Info,
                "cache_lookup: {domain} (VIP {vip}) matches no configured pattern now: no metadata"
            );
        }
        let mut ok = handle.set_filter_state_bytes(DOMAIN_KEY, &domain);
        let port = itoa_u16(destination.port());
        ok &= handle.set_filter_state_bytes(PORT_KEY, port.as_str());
        if let Some((rule, state)) = matched {
            for (key, value) in state {
                ok &= handle.set_filter_state_bytes(key, value);
            }
            if self.shared.settings.set_tcp_proxy_cluster {
                if let Some(cluster) = rule.metadata.get("cluster") {
                    ok &= handle.set_filter_state_typed(TCP_PROXY_CLUSTER_KEY, cluster);
                }
            }
        }
        if !ok {
            crate::log_fmt!(
                LogLevel::Warn,
                "cache_lookup: Envoy refused some filter state for {domain}"
            );
        }
        crate::log_fmt!(LogLevel::Debug, "cache_lookup: VIP {vip} -> {domain}");
        if let Some(timeout) = self.shared.settings.connect_response_timeout {
            self.deadline = handle.start_timer(timeout, TUNNEL_DEADLINE);
            static WARNED: std::sync::Once = std::sync::Once::new();
            if self.deadline.is_none() {
                WARNED.call_once(|| {
                    log(
                        LogLevel::Warn,
                        "cache_lookup: this Envoy offers no scheduler (or no upstream state): \
                         connect_response_timeout is not enforced",
                    )
                });
            }
        }
        let cluster = rule.and_then(|r| r.metadata.get("cluster").cloned());
        self.route = Some((domain, cluster));
        NetworkStatus::Continue
    }

    /// The tunnel deadline passed: close the connection unless tcp_proxy
    /// has its upstream ready.
    fn deadline_passed(&mut self, handle: &mut dyn NetworkFilterHandle) {
        self.deadline = None;
        if handle.has_upstream_host() {
            return;
        }
        self.count(handle, CacheCounter::ConnectResponseTimeout);
        let (domain, cluster) = self
            .route
            .as_ref()
            .map(|(d, c)| (d.as_str(), c.as_deref()))
            .unwrap_or(("?", None));
        if let Some(id) = cluster.and_then(|c| self.shared.timeouts_by_cluster.get(c)) {
            handle.increment_counter(*id, 1);
        }
        let timeout = self
            .shared
            .settings
            .connect_response_timeout
            .unwrap_or_default();
        crate::log_fmt!(LogLevel::Info, "cache_lookup: the tunnel to {domain} (cluster {}) was not established within {timeout:?} \
                 (the proxy did not connect or did not answer the CONNECT); closing the client's connection",
                cluster.unwrap_or("?"));
        handle.close();
    }
}

impl NetworkFilter for CacheLookupFilter {
    fn on_new_connection(&mut self, handle: &mut dyn NetworkFilterHandle) -> NetworkStatus {
        crate::api::catch_panic(|| self.lookup(&mut *handle)).unwrap_or_else(|| {
            // Fail closed: the connection may hold partial filter state.
            self.count(handle, CacheCounter::Panics);
            log(
                LogLevel::Error,
                "cache_lookup: handling a connection panicked; closing it",
            );
            handle.close();
            NetworkStatus::StopIteration
        })
    }

    fn on_scheduled(&mut self, handle: &mut dyn NetworkFilterHandle, event: u64) {
        if event == TUNNEL_DEADLINE {
            self.deadline_passed(handle);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::itoa_u16;

    #[test]
    fn ports_print_in_decimal() {
        for port in [0u16, 7, 10, 443, 8080, 65535] {
            assert_eq!(itoa_u16(port).as_str(), port.to_string());
        }
    }
}
