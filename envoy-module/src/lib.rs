//! Envoy dynamic module of the DNS egress gateway, loaded by Envoy 1.40 as
//! `connectivity_envoy_module` (`libconnectivity_envoy_module.so` on
//! `ENVOY_DYNAMIC_MODULES_SEARCH_PATH`). It provides two filters that share
//! one process-wide VIP table:
//!
//! - `dns_gateway` (UDP listener filter, [`dns_gateway`]): answers queries
//!   for configured domains with a VIP from a private range and hands
//!   everything else to the next UDP listener filter;
//! - `dns_gateway_tcp` (network filter, [`dns_tcp`]): the same answers for
//!   DNS over TCP, in front of a tcp_proxy to the fallback resolvers;
//! - `cache_lookup` (network filter, [`cache_lookup`]): maps the VIP a
//!   connection dialled back to its domain and metadata and publishes them
//!   as filter state for `tcp_proxy`.
//!
//! # `dns_gateway` config (a `google.protobuf.Struct`)
//!
//! | field | type | default | meaning |
//! | --- | --- | --- | --- |
//! | `base_ip` | string | required | network address of the VIP range, e.g. `"10.10.0.0"` (no host bits) |
//! | `prefix_len` | integer 1–30 | required | prefix length of the range |
//! | `domains[]` | array | required | `{domain, metadata}` rules |
//! | `domains[].domain` | string | required | `example.com`, `*.example.com` or `*` |
//! | `domains[].metadata` | object of strings | `{}` | exposed as filter state |
//! | `ttl` | integer 0–604800 | 300 | TTL of answers and of the negative-answer SOA |
//! | `max_entries` | integer | usable addresses of the range, capped at 65,536 | most VIPs handed out from the range |
//! | `pin_dir` | string | `/sys/fs/bpf/dns-egress-gateway` | pinned maps; without a pinned `GW_VIPS` the table lives in this process only |
//! | `vip_ipv6_prefix` | string | none | IPv6 /96 (`"fd00:6a7e::/96"`): a matched AAAA gets this prefix + the name's IPv4 VIP |
//! | `on_exhausted` | `"servfail"` / `"pass"` | `"servfail"` | a new name once the pool is full and nothing is reclaimable |
//! | `debug_panic_on_domain` | string | none | **test hook**: a query for this name panics inside the filter |
//!
//! # `cache_lookup` config (empty, `{}` or a Struct)
//!
//! | field | type | default | meaning |
//! | --- | --- | --- | --- |
//! | `on_miss` | `"continue"` / `"close"` | `"continue"` | what to do when no domain is found |
//! | `pin_dir` | string | the latest `dns_gateway` config's | pinned maps |
//! | `set_tcp_proxy_cluster` | bool | false | also set `envoy.tcp_proxy.cluster` from the `cluster` metadata |
//!
//! # Behaviour on the DNS path
//!
//! Matching is case-insensitive, ignores a trailing dot and picks the most
//! specific pattern (exact, then the longest wildcard suffix, then `*`),
//! whatever the configured order. A matched A (or ANY) query gets the
//! name's VIP (AAAA too with `vip_ipv6_prefix`; sequential from the network address + 1, never network or
//! broadcast, the same on every worker and, with the pinned map, across
//! restarts); other types get NOERROR/NODATA with the zone's SOA; an
//! exhausted pool gets SERVFAIL. Unmatched names and non-standard queries
//! go on to the next UDP listener filter; unparseable datagrams are
//! dropped. See [`dns_gateway`].
//!
//! # Filter state and stats
//!
//! Filter state set by `cache_lookup` (plain strings, readable as
//! `%FILTER_STATE(<key>:PLAIN)%`): `envoy.dns_gateway.domain` and
//! `envoy.dns_gateway.metadata.<key>` ([`cache_lookup::DOMAIN_KEY`],
//! [`cache_lookup::METADATA_KEY_PREFIX`]); optionally the typed
//! `envoy.tcp_proxy.cluster`.
//!
//! Counters on Envoy's `/stats` ([`dns_gateway::DnsCounter`],
//! [`cache_lookup::CacheCounter`]):
//! `dynamicmodulescustom.dns_gateway.{queries, answered, nodata, passed_on,
//! malformed, allocations, exhausted, store_errors, send_errors}` and
//! `dynamicmodulescustom.cache_lookup.{lookup_hit, lookup_miss, closed}`.
//!
//! # Structure
//!
//! [`abi`] holds every `unsafe` line (Envoy's C ABI, callbacks resolved at
//! run time so that unit tests link without Envoy); [`api`] is the safe
//! layer filters are written against; the rest is plain Rust.
#![deny(unsafe_code)]

#[allow(unsafe_code)]
pub mod abi;
pub mod allocator;
pub mod api;
pub mod cache_lookup;
pub mod config;
pub mod dns;
pub mod dns_fast;
pub mod dns_gateway;
pub mod dns_tcp;
#[doc(hidden)]
pub mod fuzzing;
pub mod matcher;
pub mod pinned;
pub mod reflector;
pub mod reload;
pub mod state;

use api::{CounterRegistry, Counters, NetworkFilterConfig, UdpListenerFilterConfig};
use state::GatewayState;

/// Filter name of the UDP listener filter (the shared contract's).
pub const DNS_GATEWAY: &str = gateway_common::contract::DNS_GATEWAY_FILTER;

/// Filter name of the network filter (the shared contract's).
pub const CACHE_LOOKUP: &str = gateway_common::contract::CACHE_LOOKUP_FILTER;

/// Name of the DNS-over-TCP network filter.
pub const DNS_GATEWAY_TCP: &str = gateway_common::contract::DNS_GATEWAY_TCP_FILTER;

/// Creates the UDP listener filter config called `name` from its config
/// bytes; the error names the offending field.
pub fn new_udp_listener_filter_config(
    name: &str,
    config: &[u8],
    registry: &mut dyn CounterRegistry,
) -> Result<Box<dyn UdpListenerFilterConfig>, String> {
    if name == reflector::DNS_REFLECTOR {
        return Ok(Box::new(reflector::ReflectorConfig));
    }
    if name != DNS_GATEWAY {
        return Err(format!(
            "filter_name: unknown UDP listener filter {name:?} (this module has {DNS_GATEWAY:?} and {:?})",
            reflector::DNS_REFLECTOR
        ));
    }
    let settings = config::parse_dns_gateway(config).map_err(|e| format!("{DNS_GATEWAY}: {e}"))?;
    let state = GatewayState::for_pin_dir(&settings.pin_dir);
    let config = dns_gateway::DnsGatewayConfig::new(settings, state, Counters::define(registry))
        .map_err(|e| format!("{DNS_GATEWAY}: {e}"))?;
    Ok(Box::new(config))
}

/// Creates the network filter config called `name` from its config bytes;
/// the error names the offending field.
pub fn new_network_filter_config(
    name: &str,
    config: &[u8],
    registry: &mut dyn CounterRegistry,
) -> Result<Box<dyn NetworkFilterConfig>, String> {
    if name == DNS_GATEWAY_TCP {
        let settings =
            config::parse_dns_gateway(config).map_err(|e| format!("{DNS_GATEWAY_TCP}: {e}"))?;
        let state = GatewayState::for_pin_dir(&settings.pin_dir);
        // Network filter counters carry no filter name of their own.
        let mut prefixed = api::PrefixedRegistry::new(registry, "dns_gateway_tcp.");
        let udp =
            dns_gateway::DnsGatewayConfig::new(settings, state, Counters::define(&mut prefixed))
                .map_err(|e| format!("{DNS_GATEWAY_TCP}: {e}"))?;
        return Ok(Box::new(dns_tcp::DnsTcpConfig::new(udp)));
    }
    if name != CACHE_LOOKUP {
        return Err(format!(
            "filter_name: unknown network filter {name:?} (this module has {CACHE_LOOKUP:?} and {DNS_GATEWAY_TCP:?})"
        ));
    }
    let settings =
        config::parse_cache_lookup(config).map_err(|e| format!("{CACHE_LOOKUP}: {e}"))?;
    let pin_dir = settings
        .pin_dir
        .clone()
        .unwrap_or_else(|| std::path::PathBuf::from(gateway_common::DEFAULT_PIN_DIR));
    let state = GatewayState::for_pin_dir(&pin_dir);
    if settings.require_pinned_maps {
        state
            .has_orig_dst_map()
            .map_err(|e| format!("{CACHE_LOOKUP}: pin_dir: {e}"))?;
    }
    let counters = Counters::define(registry);
    let by_cluster = cache_lookup::define_cluster_counters(&settings.clusters, registry);
    Ok(Box::new(
        cache_lookup::CacheLookupConfig::with_cluster_counters(
            settings, state, counters, by_cluster,
        ),
    ))
}

#[cfg(test)]
mod filter_tests;
