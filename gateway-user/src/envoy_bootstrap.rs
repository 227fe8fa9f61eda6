//! Envoy's bootstrap, generated from the gateway configuration:
//!
//! - a UDP DNS listener: `dns_gateway`, then Envoy's `udp_proxy` relaying
//!   every other query byte for byte to the fallback resolvers (any type,
//!   EDNS and DNSSEC flags kept, answers unchanged);
//! - a DNS-over-TCP listener on the same port: `dns_gateway_tcp`, then a
//!   `tcp_proxy` to the fallback resolvers over TCP;
//! - a TCP listener: `cache_lookup`, then tcp_proxy tunnelling over HTTP
//!   CONNECT to the cluster the domain's metadata names;
//! - with IPv6, the same three on `[::1]` at the same ports.
//!
//! The VIP path is the seed design's; only the capture differs (eBPF
//! instead of iptables, so no `original_dst` listener filter).

use std::path::Path;

pub use gateway_common::contract::MODULE_NAME;
use gateway_common::contract::{
    CACHE_LOOKUP_FILTER, DNS_GATEWAY_FILTER, DNS_GATEWAY_TCP_FILTER, DOMAIN_KEY,
    METADATA_KEY_PREFIX, PORT_KEY, TCP_PROXY_CLUSTER_KEY,
};
use serde_json::{json, Value};

use crate::{config::Config, instance::Instance};

/// Bound on Envoy's downstream connections (DNS is UDP and not counted).
pub const MAX_DOWNSTREAM_CONNECTIONS: u32 = 50_000;

/// Cluster tcp_proxy falls back to when no domain matched: it does not
/// exist, so such a connection is closed and counted by tcp_proxy.
pub const NO_MATCH_CLUSTER: &str = "no_matching_domain";

/// Cluster of the fallback resolvers over UDP (udp_proxy).
pub const FALLBACK_UDP_CLUSTER: &str = "dns_fallback_udp";

/// Cluster of the fallback resolvers over TCP (DNS over TCP).
pub const FALLBACK_TCP_CLUSTER: &str = "dns_fallback_tcp";

/// How long udp_proxy keeps a client's session (its upstream socket)
/// without traffic: as long as a stub resolver waits for an answer, and no
/// longer (every client port is a session).
const UDP_SESSION_IDLE: &str = "5s";

/// Bound on the fallback clusters' connections (udp_proxy sessions count
/// as connections): far above Envoy's default of 1024, which a burst of
/// unmatched queries from fresh ports would exhaust.
const FALLBACK_MAX_CONNECTIONS: u32 = 65_536;

/// Bound on each DNS-over-TCP listener's open connections (with the
/// module's per-connection query limit, this bounds what clients that
/// never read can make Envoy hold).
pub const DNS_TCP_CONNECTION_LIMIT: u32 = 1024;

/// What tcp_proxy buffers from a DNS-over-TCP client before its resolver
/// connection is up (a few queries).
const DNS_TCP_EARLY_DATA: u32 = 65_536;

/// How long an idle DNS-over-TCP connection is kept (RFC 7766 §6.2.3
/// suggests seconds).
const DNS_TCP_IDLE: &str = "30s";

fn socket_address(addr: impl Into<std::net::SocketAddr>, udp: bool) -> Value {
    let addr: std::net::SocketAddr = addr.into();
    let mut sa = json!({
        "address": addr.ip().to_string(),
        "port_value": addr.port(),
    });
    if udp {
        sa["protocol"] = json!("UDP");
    }
    json!({ "socket_address": sa })
}

fn dynamic_module(filter_name: &str) -> Value {
    json!({
        "dynamic_module_config": { "name": MODULE_NAME, "do_not_close": true },
        "filter_name": filter_name,
    })
}

/// The `dns_gateway` filter configuration (the seed's schema plus `ttl`,
/// `pin_dir`, the allocation cap, and `require_pinned_maps`: under the
/// gateway the pinned VIP map is the table of record, never an in-process
/// copy).
pub fn dns_gateway_config(config: &Config) -> Value {
    let domains: Vec<Value> = config
        .file
        .domains
        .iter()
        .map(|d| json!({ "domain": d.domain, "metadata": d.metadata }))
        .collect();
    let mut value = json!({
        "base_ip": config.vip_cidr.network.to_string(),
        "prefix_len": config.vip_cidr.prefix_len,
        "ttl": config.file.dns.ttl,
        "pin_dir": config.file.pin_dir.display().to_string(),
        "require_pinned_maps": true,
        "domains": domains,
    });
    if let Some(idle) = config.file.dns.reclaim_idle_after {
        value["reclaim_idle_after"] = json!(idle);
    }
    if let Some(rate) = config.file.dns.max_new_vips_per_second {
        value["max_new_vips_per_second"] = json!(rate);
    }
    if let Some(burst) = config.file.dns.new_vip_burst {
        value["new_vip_burst"] = json!(burst);
    }
    if let Some(policy) = &config.file.dns.on_exhausted {
        value["on_exhausted"] = json!(policy);
    }
    if let Some(prefix) = config.vip6_prefix {
        value["vip_ipv6_prefix"] = json!(format!(
            "{prefix}/{}",
            gateway_common::contract::VIP6_PREFIX_LEN
        ));
    }
    value
}

/// The `cache_lookup` filter configuration: only an original destination
/// the kernel recorded (and the module consumes) gives a connection a
/// domain; any other connection to the TCP listener is closed, and so is
/// one whose tunnel is not up within `tunnel.connect_response_timeout`
/// (counted per cluster).
pub fn cache_lookup_config(config: &Config) -> Value {
    json!({
        "pin_dir": config.file.pin_dir.display().to_string(),
        "destination_from": "pinned_map",
        "on_miss": "close",
        "require_pinned_maps": true,
        "connect_response_timeout_ms": config.file.tunnel.connect_response_timeout * 1000,
        "clusters": config.file.clusters.iter().map(|c| c.name.clone()).collect::<Vec<_>>(),
    })
}

/// The addresses a listener binds: the configured IPv4 one and, with
/// IPv6, `[::1]` at the same port.
fn listener_addresses(
    config: &Config,
    v4: std::net::SocketAddrV4,
) -> Vec<(String, std::net::SocketAddr)> {
    let mut out = vec![(String::new(), std::net::SocketAddr::V4(v4))];
    if config.ipv6 {
        out.push((
            "_v6".to_owned(),
            std::net::SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), v4.port()),
        ));
    }
    out
}

/// The `dns_gateway` configuration as the bootstrap carries it: the
/// domains inline, or (under `gateway run`) named by file so that a reload
/// replaces them without touching the listener.
fn dns_gateway_config_in(config: &Config, files: Option<&Instance>) -> Value {
    let mut value = dns_gateway_config(config);
    if let (Some(instance), Some(map)) = (files, value.as_object_mut()) {
        map.remove("domains");
        map.insert(
            "domains_file".to_owned(),
            json!(instance.domains_file().display().to_string()),
        );
        map.insert(
            "domains_ack".to_owned(),
            json!(instance.domains_ack().display().to_string()),
        );
    }
    value
}

/// The domains file (see [`Instance::domains_file`]): the `domains` array
/// of the `dns_gateway` configuration, alone.
pub fn domains_document(config: &Config) -> anyhow::Result<String> {
    use anyhow::Context as _;
    serde_json::to_string_pretty(&dns_gateway_config(config)["domains"])
        .context("rendering the domains file")
}

/// The clusters file (see [`Instance::cds_file`]): every cluster as a CDS
/// discovery response of version `version`.
pub fn cds_document(config: &Config, version: &str) -> anyhow::Result<String> {
    use anyhow::Context as _;
    let resources: Vec<Value> = clusters(config)
        .into_iter()
        .map(|mut cluster| {
            cluster["@type"] = json!("type.googleapis.com/envoy.config.cluster.v3.Cluster");
            cluster
        })
        .collect();
    serde_json::to_string_pretty(&json!({
        "version_info": version,
        "resources": resources,
    }))
    .context("rendering the clusters file")
}

fn dns_listeners(config: &Config, files: Option<&Instance>) -> Vec<Value> {
    let mut gateway = dynamic_module(DNS_GATEWAY_FILTER);
    gateway["@type"] =
        json!("type.googleapis.com/envoy.extensions.filters.udp.dynamic_modules.v3.DynamicModuleUdpListenerFilter");
    gateway["filter_config"] = json!({
        "@type": "type.googleapis.com/google.protobuf.Struct",
        "value": dns_gateway_config_in(config, files),
    });
    listener_addresses(config, config.dns_listener)
        .into_iter()
        .map(|(suffix, address)| json!({
            "name": format!("dns_listener{suffix}"),
            "address": socket_address(address, true),
            "listener_filters": [
                { "name": "envoy.filters.udp_listener.dynamic_modules", "typed_config": gateway },
                {
                    "name": "envoy.filters.udp_listener.udp_proxy",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.UdpProxyConfig",
                        "stat_prefix": "dns_fallback",
                        "idle_timeout": UDP_SESSION_IDLE,
                        // `matcher` rather than the deprecated `cluster`
                        // field (Envoy logs it as work in progress).
                        "matcher": { "on_no_match": { "action": {
                            "name": "route",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.Route",
                                "cluster": FALLBACK_UDP_CLUSTER,
                            },
                        }}},
                    },
                },
            ],
        }))
        .collect()
}

fn dns_tcp_listener_names(config: &Config) -> Vec<String> {
    listener_addresses(config, config.dns_tcp_listener)
        .into_iter()
        .map(|(suffix, _)| format!("dns_tcp_listener{suffix}"))
        .collect()
}

fn dns_tcp_listeners(config: &Config, files: Option<&Instance>) -> Vec<Value> {
    let mut gateway = dynamic_module(DNS_GATEWAY_TCP_FILTER);
    gateway["@type"] =
        json!("type.googleapis.com/envoy.extensions.filters.network.dynamic_modules.v3.DynamicModuleNetworkFilter");
    gateway["filter_config"] = json!({
        "@type": "type.googleapis.com/google.protobuf.Struct",
        "value": dns_gateway_config_in(config, files),
    });
    listener_addresses(config, config.dns_tcp_listener)
        .into_iter()
        .map(|(suffix, address)| json!({
            "name": format!("dns_tcp_listener{suffix}"),
            "address": socket_address(address, false),
            "filter_chains": [{ "filters": [
                { "name": "envoy.filters.network.dynamic_modules", "typed_config": gateway },
                {
                    "name": "envoy.filters.network.tcp_proxy",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                        "stat_prefix": "dns_fallback_tcp",
                        "cluster": FALLBACK_TCP_CLUSTER,
                        "idle_timeout": DNS_TCP_IDLE,
                        // Connect to a resolver only once a query is
                        // relayed: names the module answers never need
                        // one, so they work with every resolver down.
                        "upstream_connect_mode": "ON_DOWNSTREAM_DATA",
                        "max_early_data_bytes": DNS_TCP_EARLY_DATA,
                        // A dead resolver: try the next one.
                        "max_connect_attempts": config.fallback.len().max(1),
                    },
                },
            ]}],
        }))
        .collect()
}

fn tcp_listeners(config: &Config) -> Vec<Value> {
    let mut lookup = dynamic_module(CACHE_LOOKUP_FILTER);
    lookup["@type"] =
        json!("type.googleapis.com/envoy.extensions.filters.network.dynamic_modules.v3.DynamicModuleNetworkFilter");
    lookup["filter_config"] = json!({
        "@type": "type.googleapis.com/google.protobuf.Struct",
        "value": cache_lookup_config(config),
    });
    let headers: Vec<Value> = config
        .file
        .tunnel
        .headers
        .iter()
        .map(|(header, key)| {
            json!({ "header": {
                "key": header,
                "value": format!("%FILTER_STATE({METADATA_KEY_PREFIX}{key}:PLAIN)%"),
            }})
        })
        .collect();
    listener_addresses(config, config.tcp_listener)
        .into_iter()
        .map(|(suffix, address)| json!({
        "name": format!("tcp_listener{suffix}"),
        "address": socket_address(address, false),
        "filter_chains": [{ "filters": [
            { "name": "envoy.filters.network.dynamic_modules", "typed_config": lookup },
            {
                "name": "envoy.filters.network.set_filter_state",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.set_filter_state.v3.Config",
                    "on_new_connection": [{
                        "object_key": TCP_PROXY_CLUSTER_KEY,
                        "format_string": { "text_format_source": {
                            "inline_string": format!("%FILTER_STATE({METADATA_KEY_PREFIX}cluster:PLAIN)%"),
                        }},
                    }],
                },
            },
            {
                "name": "envoy.filters.network.tcp_proxy",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                    "stat_prefix": "egress",
                    "cluster": NO_MATCH_CLUSTER,
                    "idle_timeout": format!("{}s", config.file.tunnel.idle_timeout),
                    "tunneling_config": {
                        "hostname": format!("%FILTER_STATE({DOMAIN_KEY}:PLAIN)%:%FILTER_STATE({PORT_KEY}:PLAIN)%"),
                        "headers_to_add": headers,
                    },
                },
            },
        ]}],
    }))
        .collect()
}

fn static_cluster(name: &str, endpoints: &[std::net::SocketAddr]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|addr| json!({ "endpoint": { "address": socket_address(*addr, false) } }))
        .collect();
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{ "lb_endpoints": endpoints }],
        },
    })
}

/// The fallback resolvers as a cluster: with a high connection bound, and
/// for TCP a short connect timeout, so a dead resolver is passed over
/// quickly.
fn fallback_cluster(name: &str, resolvers: &[std::net::SocketAddr], tcp: bool) -> Value {
    let mut cluster = static_cluster(name, resolvers);
    cluster["circuit_breakers"] = json!({ "thresholds": [{
        "max_connections": FALLBACK_MAX_CONNECTIONS,
        "max_pending_requests": FALLBACK_MAX_CONNECTIONS,
    }]});
    if tcp {
        cluster["connect_timeout"] = json!("2s");
    }
    cluster
}

fn clusters(config: &Config) -> Vec<Value> {
    config
        .clusters
        .iter()
        .map(|(name, addr)| {
            let mut cluster = static_cluster(name, &[(*addr).into()]);
            cluster["connect_timeout"] = json!(format!("{}s", config.file.tunnel.connect_timeout));
            cluster
        })
        .chain([
            fallback_cluster(FALLBACK_UDP_CLUSTER, &config.fallback, false),
            fallback_cluster(FALLBACK_TCP_CLUSTER, &config.fallback, true),
        ])
        .collect()
}

/// Every listener: DNS (UDP), VIP (TCP) and DNS over TCP, the IPv4 ones
/// first.
fn listeners(config: &Config, files: Option<&Instance>) -> Vec<Value> {
    let mut all: Vec<Value> = dns_listeners(config, files)
        .into_iter()
        .zip(tcp_listeners(config))
        .flat_map(|(dns, tcp)| [dns, tcp])
        .collect();
    all.extend(dns_tcp_listeners(config, files));
    all
}

/// Node metadata key of [`Config::static_digest`] in the bootstrap.
pub const CONFIG_DIGEST_KEY: &str = "gateway_static_config_digest";

/// The metrics listener's name.
const METRICS_LISTENER: &str = "metrics";

/// At most this many connections to the metrics listener at once, so
/// that scrapers (or anyone reaching it) cannot hold many.
const METRICS_CONNECTION_LIMIT: u32 = 16;

/// Name of the cluster that reaches Envoy's own admin socket, for the
/// metrics listener.
const ADMIN_CLUSTER: &str = "gateway_admin";

/// Cluster names the bootstrap uses itself; a configured cluster may not
/// take one (the clusters would clash, or a connection without a domain
/// would be routed instead of closed).
pub const RESERVED_CLUSTER_NAMES: [&str; 4] = [
    FALLBACK_UDP_CLUSTER,
    FALLBACK_TCP_CLUSTER,
    ADMIN_CLUSTER,
    NO_MATCH_CLUSTER,
];

/// The metrics listener: `GET /stats/prometheus` is proxied to the admin
/// socket, every other request gets 404, so nothing else of the admin
/// interface (config dump with tokens, quit, drain) is reachable.
fn metrics_listener(addr: std::net::SocketAddrV4) -> Value {
    json!({
        "name": METRICS_LISTENER,
        "address": socket_address(addr, false),
        // Not counted against the tunnels' global connection limit; its
        // own limit is a runtime setting (see `bootstrap`).
        "ignore_global_conn_limit": true,
        "filter_chains": [{ "filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "metrics",
                // One request per connection at a time (no h2 streams
                // multiplying admin work).
                "codec_type": "HTTP1",
                // Slow or idle scrapers are cut off quickly.
                "request_headers_timeout": "5s",
                "stream_idle_timeout": "10s",
                "common_http_protocol_options": { "idle_timeout": "30s" },
                "route_config": { "virtual_hosts": [{
                    "name": "metrics",
                    "domains": ["*"],
                    "routes": [
                        {
                            // The whole :path (query included) and the
                            // method: no stats filters or other formats.
                            "match": { "prefix": "/", "headers": [
                                { "name": ":path", "string_match": { "exact": "/stats/prometheus" } },
                                { "name": ":method", "string_match": { "exact": "GET" } },
                            ]},
                            "route": { "cluster": ADMIN_CLUSTER, "timeout": "5s" },
                        },
                        {
                            "match": { "prefix": "/" },
                            "direct_response": { "status": 404, "body": { "inline_string": "only GET /stats/prometheus is served here\n" } },
                        },
                    ],
                }]},
                "http_filters": [{
                    "name": "envoy.filters.http.router",
                    "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" },
                }],
            },
        }]}],
    })
}

/// The cluster of the admin socket (see [`metrics_listener`]).
fn admin_cluster(admin_socket: &Path) -> Value {
    json!({
        "name": ADMIN_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        // The admin runs on Envoy's main thread: a few scrapes at once.
        "circuit_breakers": { "thresholds": [{
            "max_connections": 2, "max_pending_requests": 4, "max_requests": 2,
        }]},
        "load_assignment": {
            "cluster_name": ADMIN_CLUSTER,
            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": {
                "pipe": { "path": admin_socket.display().to_string() },
            }}}]}],
        },
    })
}

/// Mode of the admin socket: root (and Envoy's own user) only.
const ADMIN_SOCKET_MODE: u32 = 0o600;

/// The whole bootstrap. The admin interface is a Unix socket at
/// `admin_socket` (mode 0600): it shows every token and can stop Envoy.
/// With `files` (under `gateway run`), what `gateway reload` may change
/// lives in that instance's files instead of inline: the domains in the
/// domains file the module watches, the clusters in a CDS file Envoy
/// watches; listeners never change, so no connection is drained.
pub fn bootstrap(config: &Config, admin_socket: &Path, files: Option<&Instance>) -> Value {
    let mut bootstrap = json!({
        "node": {
            "id": "dns-egress-gateway",
            "cluster": "dns-egress-gateway",
            "metadata": { CONFIG_DIGEST_KEY: format!("{:016x}", config.static_digest()) },
        },
        "admin": { "address": { "pipe": {
            "path": admin_socket.display().to_string(),
            "mode": files.map_or(ADMIN_SOCKET_MODE, |i| i.sharing().admin_socket_mode()),
        }}},
        "overload_manager": { "resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                "max_active_downstream_connections": MAX_DOWNSTREAM_CONNECTIONS,
            },
        }]},
        // Per-listener connection limits are runtime settings.
        "layered_runtime": { "layers": [{
            "name": "gateway_limits",
            "static_layer": dns_tcp_listener_names(config)
                .into_iter()
                .map(|name| (name, DNS_TCP_CONNECTION_LIMIT))
                .chain(
                    config
                        .metrics_listener
                        .map(|_| (METRICS_LISTENER.to_owned(), METRICS_CONNECTION_LIMIT)),
                )
                .map(|(name, limit)| (
                    format!("envoy.resource_limits.listener.{name}.connection_limit"),
                    json!(limit),
                ))
                .collect::<serde_json::Map<String, Value>>(),
        }]},
        "static_resources": {
            "listeners": listeners(config, files),
        },
    });
    let mut static_clusters = Vec::new();
    if let Some(addr) = config.metrics_listener {
        if let Some(listeners) = bootstrap["static_resources"]["listeners"].as_array_mut() {
            listeners.push(metrics_listener(addr));
        }
        static_clusters.push(admin_cluster(admin_socket));
    }
    match files {
        None => {
            static_clusters.extend(clusters(config));
        }
        Some(instance) => {
            bootstrap["dynamic_resources"] = json!({ "cds_config": {
                "resource_api_version": "V3",
                "path_config_source": {
                    "path": instance.cds_file().display().to_string(),
                    "watched_directory": { "path": instance.cds_dir().display().to_string() },
                },
            }});
        }
    }
    if !static_clusters.is_empty() {
        bootstrap["static_resources"]["clusters"] = json!(static_clusters);
    }
    bootstrap
}

/// The bootstrap as text; JSON is valid YAML, so it may be saved as either.
pub fn render(
    config: &Config,
    admin_socket: &Path,
    files: Option<&Instance>,
) -> anyhow::Result<String> {
    use anyhow::Context as _;
    serde_json::to_string_pretty(&bootstrap(config, admin_socket, files))
        .context("rendering Envoy's bootstrap")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    #[test]
    fn bootstrap_follows_the_configuration() {
        let config = config::parse(config::DEFAULT_CONFIG).expect("default config");
        let b = bootstrap(&config, Path::new("/run/gw/admin.sock"), None);
        assert_eq!(b["admin"]["address"]["pipe"]["path"], "/run/gw/admin.sock");
        assert_eq!(b["admin"]["address"]["pipe"]["mode"], 0o600);
        let listeners = &b["static_resources"]["listeners"];
        assert_eq!(
            listeners[0]["address"]["socket_address"]["port_value"],
            15053
        );
        assert_eq!(listeners[0]["address"]["socket_address"]["protocol"], "UDP");
        let gw = &listeners[0]["listener_filters"][0]["typed_config"];
        assert_eq!(gw["dynamic_module_config"]["name"], MODULE_NAME);
        assert_eq!(gw["filter_name"], "dns_gateway");
        assert_eq!(gw["filter_config"]["value"]["base_ip"], "10.10.0.0");
        assert_eq!(gw["filter_config"]["value"]["prefix_len"], 24);
        assert_eq!(
            gw["filter_config"]["value"]["domains"][0]["domain"],
            "*.aws.com"
        );
        let tcp = &listeners[1]["filter_chains"][0]["filters"];
        assert_eq!(tcp[0]["typed_config"]["filter_name"], "cache_lookup");
        let lookup = &tcp[0]["typed_config"]["filter_config"]["value"];
        assert_eq!(lookup["destination_from"], "pinned_map");
        assert_eq!(lookup["on_miss"], "close");
        assert_eq!(gw["filter_config"]["value"]["require_pinned_maps"], true);
        let headers = &tcp[2]["typed_config"]["tunneling_config"]["headers_to_add"];
        assert_eq!(headers[0]["header"]["key"], "X-Auth-Token");
        assert_eq!(
            headers[0]["header"]["value"],
            "%FILTER_STATE(envoy.dns_gateway.metadata.auth_token:PLAIN)%"
        );
        let names: Vec<_> = b["static_resources"]["clusters"]
            .as_array()
            .expect("clusters")
            .iter()
            .map(|c| c["name"].as_str().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(
            names,
            [
                "cluster_1",
                "cluster_2",
                FALLBACK_UDP_CLUSTER,
                FALLBACK_TCP_CLUSTER
            ]
        );
        // Unmatched queries are relayed verbatim, not answered by dns_filter.
        let relay = &listeners[0]["listener_filters"][1];
        assert_eq!(relay["name"], "envoy.filters.udp_listener.udp_proxy");
        assert_eq!(
            relay["typed_config"]["matcher"]["on_no_match"]["action"]["typed_config"]["cluster"],
            FALLBACK_UDP_CLUSTER
        );
    }

    #[test]
    fn ipv6_adds_loopback_listeners_at_the_same_ports_and_dns_over_tcp_is_always_there() {
        for ipv6 in [false, true] {
            let mut config = config::parse(config::DEFAULT_CONFIG).expect("default config");
            config.ipv6 = ipv6;
            let b = bootstrap(&config, Path::new("/run/gw/admin.sock"), None);
            let listeners = b["static_resources"]["listeners"]
                .as_array()
                .expect("listeners")
                .clone();
            let described: Vec<(String, String, u64)> = listeners
                .iter()
                .map(|l| {
                    let sa = &l["address"]["socket_address"];
                    (
                        l["name"].as_str().unwrap_or_default().to_owned(),
                        sa["address"].as_str().unwrap_or_default().to_owned(),
                        sa["port_value"].as_u64().unwrap_or_default(),
                    )
                })
                .collect();
            let mut expected = vec![
                ("dns_listener".to_owned(), "127.0.0.1".to_owned(), 15053),
                ("tcp_listener".to_owned(), "127.0.0.1".to_owned(), 15001),
            ];
            if ipv6 {
                expected.push(("dns_listener_v6".to_owned(), "::1".to_owned(), 15053));
                expected.push(("tcp_listener_v6".to_owned(), "::1".to_owned(), 15001));
            }
            expected.push(("dns_tcp_listener".to_owned(), "127.0.0.1".to_owned(), 15053));
            if ipv6 {
                expected.push(("dns_tcp_listener_v6".to_owned(), "::1".to_owned(), 15053));
            }
            assert_eq!(described, expected, "ipv6 = {ipv6}");
            let dns_tcp = listeners
                .iter()
                .find(|l| l["name"] == "dns_tcp_listener")
                .expect("DNS over TCP listener");
            let filters = &dns_tcp["filter_chains"][0]["filters"];
            assert_eq!(
                filters[0]["typed_config"]["filter_name"],
                DNS_GATEWAY_TCP_FILTER
            );
            assert_eq!(filters[1]["typed_config"]["cluster"], FALLBACK_TCP_CLUSTER);
        }
    }
}
