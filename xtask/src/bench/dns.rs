//! DNS: the answer path users pay for, in one Envoy with one worker.
//!
//! * `dns_gateway` answers names of a wildcard from its VIP table (backed,
//!   as under `gateway run`, by the pinned VIP map: every answer checks
//!   the map, so another Envoy's reclaim is never missed);
//! * Envoy's `dns_filter` answers the same names from an inline table;
//! * `dns_reflector` returns each query as its own (empty) answer without
//!   parsing: the ceiling of a UDP listener filter in this Envoy;
//! * relay: names `dns_gateway` does not handle, passed on by udp_proxy
//!   to a resolver (the benchmark's UDP responder).
//!
//! The maximum rate comes from dnsperf; the latency from the benchmark's
//! own client offering half of each mode's maximum at a steady pace.

use std::process::Command;

use anyhow::{bail, Context as _, Result};
use gateway_common::contract::{DNS_GATEWAY_FILTER, DNS_REFLECTOR_FILTER};
use serde_json::{json, Value};

use super::{
    env::{self, BenchEnvoy, Env, Gate},
    report::{median, Row, Table},
    Plan,
};

/// Names the benchmark asks for.
const NAMES: u32 = 200;
const ZONE: &str = "bench.example";
const OTHER_ZONE: &str = "other.example";

fn udp_listener(name: &str, port: u16, filters: Vec<Value>) -> Value {
    json!({
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port, "protocol": "UDP"}},
        "listener_filters": filters,
    })
}

fn module(name: &str, config: Value) -> Value {
    json!({"name": "envoy.filters.udp_listener.dynamic_modules", "typed_config": env::module_filter("udp", name, &config)})
}

fn udp_proxy() -> Value {
    json!({
        "name": "envoy.filters.udp_listener.udp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.UdpProxyConfig",
            "stat_prefix": "relay",
            "idle_timeout": "5s",
            "matcher": {"on_no_match": {"action": {"name": "route", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.udp.udp_proxy.v3.Route",
                "cluster": "relay",
            }}}},
        },
    })
}

/// The VIP `dns_gateway` gives the i-th name (sequential from .1).
fn vip_of(i: u32) -> String {
    format!("10.30.0.{}", i + 1)
}

fn dns_filter() -> Value {
    let domains: Vec<Value> = (0..NAMES)
        .map(|i| json!({"name": format!("n{i}.{ZONE}"), "endpoint": {"address_list": {"address": [vip_of(i)]}}}))
        .collect();
    json!({
        "name": "envoy.filters.udp_listener.dns_filter",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.udp.dns_filter.v3.DnsFilterConfig",
            "stat_prefix": "inline",
            "server_config": {"inline_dns_table": {"virtual_domains": domains}},
        },
    })
}

/// dnsperf's "Queries per second" against `port` for names of `zone`.
fn dnsperf(port: u16, zone: &str, seconds: f64) -> Result<f64> {
    let data = std::env::temp_dir().join(tests::unique_name("gwbench-names"));
    let lines: String = (0..NAMES).map(|i| format!("n{i}.{zone} A\n")).collect();
    std::fs::write(&data, lines)?;
    let out = Command::new("dnsperf")
        .args(["-s", "127.0.0.1", "-p", &port.to_string(), "-d"])
        .arg(&data)
        .args([
            "-l",
            &format!("{}", seconds.ceil() as u64),
            "-c",
            "1",
            "-T",
            "1",
            "-q",
            "128",
        ])
        .output()
        .context("running dnsperf (Debian package dnsperf)")?;
    let _ = std::fs::remove_file(&data);
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "dnsperf failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let qps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Queries per second:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("no query rate in dnsperf's output:\n{text}"))?;
    let lost = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Queries lost:"))
        .unwrap_or("?")
        .trim()
        .to_owned();
    eprintln!("  dnsperf :{port} {zone}: {qps:.0} q/s (lost {lost})");
    Ok(qps)
}

/// The DNS comparison.
pub fn run(plan: &Plan, env: &Env) -> Result<Vec<Table>> {
    // The pinned maps of a gateway, as `gateway run` gives its Envoy.
    let gate = Gate::attach("10.30.0.0/24", env::UDP, env::ECHO)?;
    let gateway = json!({
        "base_ip": "10.30.0.0", "prefix_len": 24, "ttl": 300,
        "max_new_vips_per_second": 100000, "new_vip_burst": 100000,
        "pin_dir": gate.pin_dir().to_string_lossy(),
        "require_pinned_maps": true,
        "domains": [{"domain": format!("*.{ZONE}"), "metadata": {"cluster": "echo"}}],
    });
    let ports: Vec<u16> = (0..5).map(|_| env::free_port()).collect::<Result<_>>()?;
    let (admin, p_gateway, p_filter, p_reflector, p_relay) =
        (ports[0], ports[1], ports[2], ports[3], ports[4]);
    let bootstrap = json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [
                udp_listener("gateway", p_gateway, vec![module(DNS_GATEWAY_FILTER, gateway.clone()), udp_proxy()]),
                udp_listener("dns_filter", p_filter, vec![dns_filter()]),
                udp_listener("reflector", p_reflector, vec![module(DNS_REFLECTOR_FILTER, json!({}))]),
                udp_listener("relay", p_relay, vec![module(DNS_GATEWAY_FILTER, gateway), udp_proxy()]),
            ],
            "clusters": [env::static_cluster("relay", env::UDP)],
        },
    });
    let envoy = BenchEnvoy::start(env, &bootstrap, admin)?;
    // Warm up: every name gets its VIP (in name order, so that the inline
    // table holds the same addresses).
    warm_up(p_gateway)?;
    let modes = [
        ("dns_gateway (matched names)", p_gateway, ZONE),
        ("dns_filter inline table", p_filter, ZONE),
        ("dns_reflector (ceiling)", p_reflector, ZONE),
        ("relay of unmatched names", p_relay, OTHER_ZONE),
    ];
    let mut max: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    for round in 0..plan.rounds {
        for i in super::rotated(modes.len(), round) {
            let (_, port, zone) = modes[i];
            max[i].push(dnsperf(port, zone, plan.seconds)?);
        }
    }
    // Latency at one offered rate for every mode: half of dns_gateway's
    // maximum (the load its target is stated at).
    let rate = (median(&max[0]) / 2.0).max(100.0) as u32;
    let mut p50: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut p99: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    let mut answered: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    for round in 0..plan.rounds {
        for i in super::rotated(modes.len(), round) {
            let (_, port, zone) = modes[i];
            let got = env::client_json(None, &args(port, rate, plan.seconds, NAMES, zone))?;
            let sent = got["sent"].as_f64().unwrap_or(0.0);
            p50[i].push(got["p50_ns"].as_f64().unwrap_or(f64::NAN) / 1000.0);
            p99[i].push(got["p99_ns"].as_f64().unwrap_or(f64::NAN) / 1000.0);
            answered[i].push(got["answered"].as_f64().unwrap_or(0.0) / sent.max(1.0));
        }
    }
    let rows = modes
        .iter()
        .enumerate()
        .map(|(i, (name, _, _))| Row {
            mode: (*name).to_owned(),
            cells: vec![
                median(&max[i]),
                median(&p50[i]),
                median(&p99[i]),
                median(&answered[i]),
            ],
        })
        .collect();
    let answers = envoy
        .stat("dynamicmodulescustom.dns_gateway.queries")
        .unwrap_or(0);
    Ok(vec![Table {
        id: "dns".into(),
        title: "DNS in Envoy (one worker)".into(),
        columns: vec![
            "max queries/s (dnsperf)".into(),
            format!("p50 µs at {rate} q/s"),
            format!("p99 µs at {rate} q/s"),
            format!("answered at {rate} q/s"),
        ],
        rows,
        chart: Some((0, "query rate / dns_gateway".into())),
        note: format!(
            "{} rounds, modes interleaved; dnsperf: 1 client, 128 queries outstanding, {NAMES} names, {} s per run; latency: the benchmark's client offering half of dns_gateway's median maximum to every mode for {} s (a lost query counts in 'answered', not in the percentiles). dns_gateway counted {answers} queries.",
            plan.rounds, plan.seconds.ceil(), plan.seconds
        ),
    }])
}

/// Asks `dns_gateway` for every name once, in order, so that the i-th
/// name holds the i-th VIP (as the inline table says).
fn warm_up(port: u16) -> Result<()> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    socket.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
    let mut buf = [0u8; 512];
    for i in 0..NAMES {
        let query = super::net::dns_query(i as u16, &format!("n{i}.{ZONE}"));
        let vip: std::net::Ipv4Addr = vip_of(i).parse()?;
        let answered = (0..3).any(|_| {
            socket.send_to(&query, ("127.0.0.1", port)).is_ok()
                && socket.recv_from(&mut buf).is_ok_and(|(n, _)| {
                    n > 16 && buf[3] & 0x0f == 0 && buf[n - 4..n] == vip.octets()
                })
        });
        if !answered {
            bail!("dns_gateway did not answer n{i}.{ZONE} with {vip}");
        }
    }
    Ok(())
}

fn args(port: u16, rate: u32, seconds: f64, names: u32, zone: &str) -> Vec<String> {
    [
        "dns".to_owned(),
        "--target".into(),
        format!("127.0.0.1:{port}"),
        "--rate".into(),
        rate.to_string(),
        "--seconds".into(),
        seconds.to_string(),
        "--names".into(),
        names.to_string(),
        "--zone".into(),
        zone.to_owned(),
    ]
    .to_vec()
}
