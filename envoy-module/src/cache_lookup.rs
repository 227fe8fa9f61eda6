//! The `cache_lookup` network filter.
//!
//! On a new connection it finds the VIP the client dialled — the original
//! destination recorded in the pinned map for the client's address when
//! the gateway's kernel programs redirect, otherwise the connection's local
//! address (the seed's iptables + `original_dst` setup) — then the VIP's
//! domain, then the metadata of the most specific pattern of the latest
//! `dns_gateway` config matching that domain, and publishes them as filter
//! state:
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
//! A miss (no VIP, or an unknown VIP) is logged and counted; the
//! connection goes on (`on_miss: "continue"`, the seed's behaviour) or is
//! closed (`on_miss: "close"`). Before declaring a miss the pinned map is
//! reopened once, in case a restarted loader recreated it.

use std::{
    net::{SocketAddr, SocketAddrV4},
    sync::Arc,
};

use crate::{
    api::{
        log, CounterKind, Counters, LogLevel, NetworkFilter, NetworkFilterConfig,
        NetworkFilterHandle, NetworkStatus,
    },
    config::{CacheLookupSettings, OnMiss},
    state::GatewayState,
};

/// Filter-state key of the domain.
pub const DOMAIN_KEY: &str = "envoy.dns_gateway.domain";

/// Filter-state key of the port the client originally dialled.
pub const PORT_KEY: &str = "envoy.dns_gateway.port";

/// Prefix of the filter-state keys of the metadata.
pub const METADATA_KEY_PREFIX: &str = "envoy.dns_gateway.metadata.";

/// Envoy's typed filter-state key selecting the tcp_proxy cluster.
pub const TCP_PROXY_CLUSTER_KEY: &str = "envoy.tcp_proxy.cluster";

/// Counters of `cache_lookup`, visible on Envoy's `/stats` as
/// `dynamicmodulescustom.cache_lookup.<name>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheCounter {
    /// Connections whose domain was found.
    LookupHit,
    /// Connections whose domain was not found.
    LookupMiss,
    /// Connections closed on a miss.
    Closed,
}

impl CounterKind for CacheCounter {
    const ALL: &'static [Self] = &[Self::LookupHit, Self::LookupMiss, Self::Closed];

    fn name(self) -> &'static str {
        match self {
            Self::LookupHit => "cache_lookup.lookup_hit",
            Self::LookupMiss => "cache_lookup.lookup_miss",
            Self::Closed => "cache_lookup.closed",
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
        Self {
            shared: Arc::new(Shared {
                settings,
                state,
                counters,
            }),
        }
    }
}

impl NetworkFilterConfig for CacheLookupConfig {
    fn new_filter(&self) -> Box<dyn NetworkFilter> {
        Box::new(CacheLookupFilter {
            shared: self.shared.clone(),
        })
    }
}

/// The filter of one connection.
pub struct CacheLookupFilter {
    shared: Arc<Shared>,
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

impl CacheLookupFilter {
    fn count(&self, handle: &mut dyn NetworkFilterHandle, counter: CacheCounter) {
        if let Some(id) = self.shared.counters.id(counter) {
            handle.increment_counter(id, 1);
        }
    }

    /// The original destination (VIP and port) and domain of the
    /// connection, if any.
    fn resolve(
        &self,
        handle: &dyn NetworkFilterHandle,
        reopen: bool,
    ) -> Option<(SocketAddrV4, String)> {
        let state = &self.shared.state;
        let dir = self
            .shared
            .settings
            .pin_dir
            .clone()
            .unwrap_or_else(|| state.pin_dir());
        let original = ipv4(handle.remote_address())
            .and_then(|client| state.original_destination(&dir, client, reopen));
        let local = ipv4(handle.local_address());
        [original, local]
            .into_iter()
            .flatten()
            .find_map(|dst| state.domain_of(*dst.ip()).map(|domain| (dst, domain)))
    }
}

impl NetworkFilter for CacheLookupFilter {
    fn on_new_connection(&mut self, handle: &mut dyn NetworkFilterHandle) -> NetworkStatus {
        let found = self
            .resolve(handle, false)
            .or_else(|| self.resolve(handle, true));
        let Some((destination, domain)) = found else {
            self.count(handle, CacheCounter::LookupMiss);
            let what = format!(
                "cache_lookup: no domain for the connection from {:?} to {:?}",
                handle.remote_address(),
                handle.local_address()
            );
            return match self.shared.settings.on_miss {
                OnMiss::Continue => {
                    log(
                        LogLevel::Info,
                        &format!("{what}; continuing without filter state"),
                    );
                    NetworkStatus::Continue
                }
                OnMiss::Close => {
                    log(
                        LogLevel::Info,
                        &format!("{what}; closing it (on_miss: close)"),
                    );
                    self.count(handle, CacheCounter::Closed);
                    handle.close();
                    NetworkStatus::StopIteration
                }
            };
        };
        self.count(handle, CacheCounter::LookupHit);
        let vip = *destination.ip();
        let patterns = self.shared.state.patterns();
        let rule = patterns.best_match(&domain);
        if rule.is_none() {
            log(LogLevel::Info, &format!("cache_lookup: {domain} (VIP {vip}) matches no configured pattern now: no metadata"));
        }
        let mut ok = handle.set_filter_state_bytes(DOMAIN_KEY, &domain);
        ok &= handle.set_filter_state_bytes(PORT_KEY, &destination.port().to_string());
        if let Some(rule) = rule {
            for (key, value) in &rule.metadata {
                ok &= handle.set_filter_state_bytes(&format!("{METADATA_KEY_PREFIX}{key}"), value);
            }
            if self.shared.settings.set_tcp_proxy_cluster {
                if let Some(cluster) = rule.metadata.get("cluster") {
                    ok &= handle.set_filter_state_typed(TCP_PROXY_CLUSTER_KEY, cluster);
                }
            }
        }
        if !ok {
            log(
                LogLevel::Warn,
                &format!("cache_lookup: Envoy refused some filter state for {domain}"),
            );
        }
        log(
            LogLevel::Debug,
            &format!("cache_lookup: VIP {vip} -> {domain}"),
        );
        NetworkStatus::Continue
    }
}
