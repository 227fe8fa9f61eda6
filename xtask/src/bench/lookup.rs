//! Per-connection cost in Envoy: connections per second through tcp_proxy
//! (to the benchmark's echo server) with
//!
//! * no lookup at all (the baseline);
//! * no lookup, the clients redirected by the eBPF programs (what the
//!   capture alone costs on this path);
//! * `cache_lookup` reading the original destination and the VIP's name
//!   from the shared pinned maps (clients in the gated cgroup dial a VIP,
//!   the eBPF redirect sends them to this listener);
//! * the seed's setup: an iptables DNAT of the VIP range to the listener,
//!   `original_dst`, and `cache_lookup` by the connection's local address.

use anyhow::{bail, Result};
use gateway_common::contract::{CACHE_LOOKUP_FILTER, DNS_GATEWAY_FILTER};
use serde_json::{json, Value};

use super::{
    env::{self, BenchEnvoy, Dnat, Env, Firewall, Gate},
    report::{median, Row, Table},
    Plan,
};

fn tcp_listener(name: &str, port: u16, listener_filters: Value, filters: Vec<Value>) -> Value {
    json!({
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "listener_filters": listener_filters,
        "filter_chains": [{"filters": filters}],
    })
}

fn tcp_proxy() -> Value {
    json!({
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": "bench",
            "cluster": "echo",
        },
    })
}

fn cache_lookup(config: Value) -> Value {
    json!({"name": "envoy.filters.network.dynamic_modules", "typed_config": env::module_filter("network", CACHE_LOOKUP_FILTER, &config)})
}

/// The lookup comparison.
pub fn run(plan: &Plan, env: &Env) -> Result<Vec<Table>> {
    let ports: Vec<u16> = (0..5).map(|_| env::free_port()).collect::<Result<_>>()?;
    let (admin, p_dns, p_bare, p_lookup, p_seed) =
        (ports[0], ports[1], ports[2], ports[3], ports[4]);
    let gate = Gate::attach("10.20.0.0/24", env::UDP, &format!("127.0.0.1:{p_lookup}"))?;
    // The same redirect, to the listener without a lookup.
    let bare_gate = Gate::attach("10.21.0.0/24", env::UDP, &format!("127.0.0.1:{p_bare}"))?;
    let pin_dir = gate.pin_dir().to_string_lossy().into_owned();
    let gateway = json!({
        "base_ip": "10.20.0.0", "prefix_len": 24, "ttl": 300,
        "pin_dir": pin_dir, "require_pinned_maps": true,
        "domains": [{"domain": "*.bench.example", "metadata": {"cluster": "echo", "auth_token": "t"}}],
    });
    let bootstrap = json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "dns",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": p_dns, "protocol": "UDP"}},
                    "listener_filters": [{"name": "envoy.filters.udp_listener.dynamic_modules", "typed_config": env::module_filter("udp", DNS_GATEWAY_FILTER, &gateway)}],
                },
                tcp_listener("bare", p_bare, json!([]), vec![tcp_proxy()]),
                tcp_listener("lookup", p_lookup, json!([]), vec![
                    cache_lookup(json!({"pin_dir": pin_dir, "destination_from": "pinned_map", "on_miss": "close", "require_pinned_maps": true})),
                    tcp_proxy(),
                ]),
                tcp_listener("seed", p_seed,
                    json!([{"name": "envoy.filters.listener.original_dst", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"}}]),
                    vec![
                        cache_lookup(json!({"pin_dir": pin_dir, "destination_from": "local_address", "on_miss": "close"})),
                        tcp_proxy(),
                    ]),
            ],
            "clusters": [env::static_cluster("echo", env::ECHO)],
        },
    });
    let envoy = BenchEnvoy::start(env, &bootstrap, admin)?;
    // The VIP the clients dial: allocated by dns_gateway into the map.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    socket.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
    socket.send_to(
        &super::net::dns_query(7, "lookup.bench.example"),
        ("127.0.0.1", p_dns),
    )?;
    let mut buf = [0u8; 512];
    let (n, _) = socket.recv_from(&mut buf)?;
    if n < 4 || buf[..n].windows(4).all(|w| w != [10, 20, 0, 1]) {
        bail!("dns_gateway did not answer lookup.bench.example with 10.20.0.1");
    }
    let vip = "10.20.0.1:443";
    let bare = format!("127.0.0.1:{p_bare}");
    let modes = [
        "tcp_proxy, no lookup",
        "eBPF redirect, no lookup",
        "eBPF redirect + cache_lookup (pinned map)",
        "seed (iptables DNAT, original_dst, cache_lookup)",
    ];
    let mut rate: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut p50: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut p99: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut failed: Vec<f64> = vec![0.0; modes.len()];
    let workload = |target: &str| -> Vec<String> {
        ["rate", "--target", target, "--threads", "4", "--seconds"]
            .iter()
            .map(|s| (*s).to_owned())
            .chain([plan.seconds.to_string()])
            .collect()
    };
    for round in 0..plan.rounds {
        for i in super::rotated(modes.len(), round) {
            let got = match i {
                0 => env::client_json(None, &workload(&bare))?,
                1 => env::client_json(Some(&bare_gate.cgroup), &workload("10.21.0.1:443"))?,
                2 => env::client_json(Some(&gate.cgroup), &workload(vip))?,
                _ => {
                    let _rules = Dnat::new(
                        Firewall::Iptables,
                        ("10.20.0.0/24", &format!("127.0.0.1:{p_seed}")),
                        None,
                    )?;
                    env::client_json(None, &workload(vip))?
                }
            };
            rate[i].push(got["ops_per_s"].as_f64().unwrap_or(0.0));
            p50[i].push(got["p50_ns"].as_f64().unwrap_or(f64::NAN) / 1000.0);
            p99[i].push(got["p99_ns"].as_f64().unwrap_or(f64::NAN) / 1000.0);
            failed[i] += got["failures"].as_f64().unwrap_or(0.0);
        }
    }
    let hits = envoy
        .stat("dynamicmodulescustom.cache_lookup.lookup_hit")
        .unwrap_or(0);
    if hits == 0 {
        bail!("cache_lookup found no domain: the lookup modes measured nothing");
    }
    let rows = modes
        .iter()
        .enumerate()
        .map(|(i, name)| Row {
            mode: (*name).to_owned(),
            cells: vec![
                median(&rate[i]),
                median(&p50[i]),
                median(&p99[i]),
                failed[i],
            ],
        })
        .collect();
    Ok(vec![Table {
        id: "lookup".into(),
        title: "Connections through Envoy's tcp_proxy (one worker)".into(),
        columns: vec![
            "connections/s".into(),
            "p50 µs".into(),
            "p99 µs".into(),
            "failed".into(),
        ],
        rows,
        chart: Some((0, "connections/s / no lookup".into())),
        note: format!(
            "{} rounds × {} s, modes interleaved; 4 client threads, each a loop of connect + 1-byte exchange + close; cache_lookup hit {hits} times. The lookup's own cost is the third row against the second: the same redirect, the same listener but for the filter.",
            plan.rounds, plan.seconds
        ),
    }])
}
