//! The Envoy module in the real Envoy 1.40: DNS answers, the fallback,
//! filter state through tcp_proxy to CONNECT upstreams, counters, hostile
//! input, bad configs and panics. Every test runs in its own network
//! namespace with only `lo`, with the module's VIP table in process (the
//! pin directory given to the module does not exist), i.e. the seed's
//! iptables-style setup where the dialled VIP is the local address.
//!
//! Needs root, `.tools/bin/envoy`, `dig` and the module built first:
//! `cargo build -p envoy-module`.

use gateway_common::pinned::PinDir;
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    path::PathBuf,
    time::Duration,
};

use serde_json::{json, Value};
use tests::{
    enter_private_netns,
    envoy::{
        dig, envoy_prerequisites, seed_bootstrap, seed_dns_gateway_config, tcp_exchange,
        ConnectUpstream, Envoy, Ports, StubResolver,
    },
    prerequisites_met, unique_name, wait_for, Loader, TestCgroup,
};

/// What the stub resolver behind the fallback knows.
const FALLBACK_NAME: &str = "github.com";
const FALLBACK_ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

/// A pin directory that does not exist: the module keeps VIPs in process.
fn no_pins() -> PathBuf {
    PathBuf::from("/nonexistent").join(unique_name("envoy-module-pins"))
}

/// Envoy with the seed's listeners, the stub resolver and both upstreams.
struct Setup {
    envoy: Envoy,
    ports: Ports,
    resolver: StubResolver,
    upstreams: [ConnectUpstream; 2],
}

fn setup(dns_gateway: Value, cache_lookup: Value) -> Setup {
    setup_with(dns_gateway, cache_lookup, |_| {})
}

/// [`setup`] with a last edit of the bootstrap.
fn setup_with(dns_gateway: Value, cache_lookup: Value, edit: impl FnOnce(&mut Value)) -> Setup {
    enter_private_netns().expect("private network namespace");
    let ports = Ports::pick().expect("free ports");
    let resolver = StubResolver::start(ports.resolver, &[(FALLBACK_NAME, FALLBACK_ANSWER)])
        .expect("stub resolver");
    let upstreams = [
        ConnectUpstream::start("cluster_1", ports.upstream_1).expect("upstream 1"),
        ConnectUpstream::start("cluster_2", ports.upstream_2).expect("upstream 2"),
    ];
    let mut bootstrap = seed_bootstrap(&ports, &dns_gateway, &cache_lookup);
    edit(&mut bootstrap);
    let envoy = Envoy::start(&bootstrap, ports.admin).expect("Envoy starts");
    Setup {
        envoy,
        ports,
        resolver,
        upstreams,
    }
}

fn a_of(port: u16, name: &str) -> Vec<String> {
    dig(port, name, "A").expect("dig runs").a_records()
}

#[test]
fn dns_answers_sequential_vips_nodata_and_falls_back() {
    if !prerequisites_met(&envoy_prerequisites()) {
        return;
    }
    let s = setup(
        seed_dns_gateway_config("10.10.0.0", 24, &no_pins()),
        json!({}),
    );
    let port = s.ports.dns;

    let one = dig(port, "one.s3.aws.com", "A").unwrap();
    assert_eq!(one.status, "NOERROR", "{}", one.raw);
    assert_eq!(one.a_records(), ["10.10.0.1"], "{}", one.raw);
    assert_eq!(one.answers[0].1, 300, "default TTL");
    for flag in ["qr", "aa", "rd", "ra"] {
        assert!(
            one.flags.iter().any(|f| f == flag),
            "flag {flag} in {:?}",
            one.flags
        );
    }
    assert!(
        one.edns.as_deref().is_some_and(|e| e.contains("udp: 1232")),
        "dig's EDNS query gets an OPT back: {}",
        one.raw
    );
    assert_eq!(a_of(port, "two.s3.aws.com"), ["10.10.0.2"]);
    assert_eq!(
        a_of(port, "ONE.s3.aws.com."),
        ["10.10.0.1"],
        "same name, same VIP"
    );
    assert_eq!(a_of(port, "example.com"), ["10.10.0.3"]);
    assert_eq!(a_of(port, "bucket-1.aws.com"), ["10.10.0.4"]);

    let aaaa = dig(port, "one.s3.aws.com", "AAAA").unwrap();
    assert_eq!(aaaa.status, "NOERROR", "{}", aaaa.raw);
    assert!(aaaa.answers.is_empty(), "{}", aaaa.raw);
    assert_eq!(aaaa.authority.len(), 1, "{}", aaaa.raw);
    let (owner, ttl, rtype, _) = &aaaa.authority[0];
    assert_eq!(
        (owner.as_str(), *ttl, rtype.as_str()),
        ("aws.com.", 300, "SOA")
    );

    let fallback = dig(port, FALLBACK_NAME, "A").unwrap();
    assert_eq!(
        fallback.a_records(),
        [FALLBACK_ANSWER.to_string()],
        "{}",
        fallback.raw
    );
    assert!(s
        .resolver
        .queries()
        .unwrap()
        .iter()
        .any(|q| q.name == FALLBACK_NAME));
    // aws.com itself is not matched by *.aws.com: it goes to the fallback too.
    let apex = dig(port, "aws.com", "A").unwrap();
    assert_eq!(apex.status, "NXDOMAIN", "{}", apex.raw);

    let stats = s.envoy.stats().unwrap();
    let stat = |name: &str| {
        stats
            .get(&format!("dynamicmodulescustom.dns_gateway.{name}"))
            .copied()
    };
    assert_eq!(stat("answered"), Some(5));
    assert_eq!(stat("allocations"), Some(4));
    assert_eq!(stat("nodata"), Some(1));
    assert_eq!(stat("passed_on"), Some(2));
    assert_eq!(stat("queries"), Some(8));
    assert_eq!(stat("malformed"), Some(0));
    assert_eq!(stat("exhausted"), Some(0));
}

#[test]
fn tcp_connections_reach_the_domains_upstream_with_its_metadata() {
    if !prerequisites_met(&envoy_prerequisites()) {
        return;
    }
    // VIPs inside 127/8 are local addresses: connecting to one reaches
    // Envoy's 0.0.0.0 listener with the VIP as the local address, as an
    // iptables DNAT + original_dst would present it.
    let s = setup(
        seed_dns_gateway_config("127.10.0.0", 24, &no_pins()),
        json!({}),
    );
    assert_eq!(a_of(s.ports.dns, "one.s3.aws.com"), ["127.10.0.1"]);
    assert_eq!(a_of(s.ports.dns, "example.com"), ["127.10.0.2"]);
    let port = s.ports.tcp;

    let reply = tcp_exchange(SocketAddr::from(([127, 10, 0, 1], port))).unwrap();
    assert!(
        reply.starts_with("cluster_1\n"),
        "reply: {reply:?}\n{}",
        s.envoy.log()
    );
    assert!(
        reply.contains(&format!("CONNECT: one.s3.aws.com:{port}")),
        "{reply:?}"
    );
    let reply = tcp_exchange(SocketAddr::from(([127, 10, 0, 2], port))).unwrap();
    assert!(reply.starts_with("cluster_2\n"), "reply: {reply:?}");

    let [up1, up2] = &s.upstreams;
    let (r1, r2) = (up1.requests().unwrap(), up2.requests().unwrap());
    assert_eq!(r1.len(), 1, "{r1:?}");
    assert_eq!(r1[0].authority, format!("one.s3.aws.com:{port}"));
    assert_eq!(
        r1[0].headers.get("x-auth-token").map(String::as_str),
        Some("abc123")
    );
    assert_eq!(r2.len(), 1, "{r2:?}");
    assert_eq!(r2[0].authority, format!("example.com:{port}"));
    assert_eq!(
        r2[0].headers.get("x-auth-token").map(String::as_str),
        Some("def456")
    );

    // A VIP nobody was given: counted as a miss, no upstream sees it.
    let _ = tcp_exchange(SocketAddr::from(([127, 10, 0, 99], port)));
    let stats = s.envoy.stats().unwrap();
    assert_eq!(
        stats.get("dynamicmodulescustom.cache_lookup.lookup_hit"),
        Some(&2)
    );
    assert_eq!(
        stats.get("dynamicmodulescustom.cache_lookup.lookup_miss"),
        Some(&1)
    );
    assert_eq!(
        up1.requests().unwrap().len() + up2.requests().unwrap().len(),
        2
    );
}

#[test]
fn typed_cluster_state_works_and_on_miss_close_closes() {
    if !prerequisites_met(&envoy_prerequisites()) {
        return;
    }
    // Without the seed's set_filter_state filter: the typed filter state
    // alone selects the cluster.
    let s = setup_with(
        seed_dns_gateway_config("127.20.0.0", 24, &no_pins()),
        json!({"on_miss": "close", "set_tcp_proxy_cluster": true}),
        |bootstrap| {
            let filters =
                &mut bootstrap["static_resources"]["listeners"][1]["filter_chains"][0]["filters"];
            if let Some(list) = filters.as_array_mut() {
                list.retain(|f| f["name"] != "envoy.filters.network.set_filter_state");
                assert_eq!(list.len(), 2);
            }
        },
    );
    assert_eq!(a_of(s.ports.dns, "example.com"), ["127.20.0.1"]);
    let reply = tcp_exchange(SocketAddr::from(([127, 20, 0, 1], s.ports.tcp))).unwrap();
    assert!(
        reply.starts_with("cluster_2\n"),
        "reply: {reply:?}\n{}",
        s.envoy.log()
    );
    let missed =
        tcp_exchange(SocketAddr::from(([127, 20, 0, 50], s.ports.tcp))).unwrap_or_default();
    assert!(missed.is_empty(), "closed without data: {missed:?}");
    assert_eq!(
        s.envoy
            .stat("dynamicmodulescustom.cache_lookup.closed")
            .unwrap(),
        1
    );
    assert_eq!(
        s.upstreams[0].requests().unwrap().len() + s.upstreams[1].requests().unwrap().len(),
        1
    );
}

#[test]
fn garbage_datagrams_are_counted_and_envoy_keeps_serving() {
    if !prerequisites_met(&envoy_prerequisites()) {
        return;
    }
    let mut s = setup(
        seed_dns_gateway_config("10.10.0.0", 24, &no_pins()),
        json!({}),
    );
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = ("127.0.0.1", s.ports.dns);
    // Deterministically malformed: a truncated header, a header promising a
    // question that is not there, a label running past the end, a
    // compression pointer to itself.
    let header = |rest: &[u8]| {
        let mut d = vec![0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
        d.extend_from_slice(rest);
        d
    };
    let malformed = [
        vec![0x12, 0x34, 0x01],
        header(&[]),
        header(&[63, b'a', b'b']),
        header(&[0xc0, 0x0c, 0x00, 0x01, 0x00, 0x01]),
    ];
    for d in &malformed {
        socket.send_to(d, to).unwrap();
    }
    // Random bytes (whatever they parse as) and a datagram far beyond any
    // DNS message.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for len in [1usize, 13, 64, 300, 512, 1400] {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        socket.send_to(&bytes, to).unwrap();
    }
    socket.send_to(&header(&[0xc0; 9000]), to).unwrap();

    assert_eq!(
        a_of(s.ports.dns, "one.s3.aws.com"),
        ["10.10.0.1"],
        "still answering"
    );
    assert!(s.envoy.is_running());
    // Too short for a header: dropped. With a header: FORMERR (nothing
    // to loop on: a response is never answered).
    let counted = wait_for(
        "malformed and formerr counters",
        Duration::from_secs(5),
        || {
            let short = s.envoy.stat("dynamicmodulescustom.dns_gateway.malformed")?;
            let formerr = s.envoy.stat("dynamicmodulescustom.dns_gateway.formerr")?;
            Ok((short >= 1 && formerr >= 3).then_some((short, formerr)))
        },
    )
    .unwrap();
    assert!(counted.0 >= 1 && counted.1 >= 3, "{counted:?}");
    assert_eq!(
        a_of(s.ports.dns, FALLBACK_NAME),
        [FALLBACK_ANSWER.to_string()]
    );
}

#[test]
fn bad_filter_configs_are_rejected_naming_the_field() {
    if !prerequisites_met(&envoy_prerequisites()) {
        return;
    }
    enter_private_netns().unwrap();
    let ports = Ports::pick().unwrap();
    let good = seed_dns_gateway_config("10.10.0.0", 24, &no_pins());
    let (status, log) =
        tests::envoy::Envoy::validate(&seed_bootstrap(&ports, &good, &json!({}))).unwrap();
    assert!(status.success(), "the seed config validates:\n{log}");

    let mut cases: Vec<(Value, Value, &str)> = Vec::new();
    for (field, value) in [
        ("prefix_len", json!(31)),
        ("base_ip", json!("10.10.0.7")),
        ("ttl", json!(-5)),
        ("max_entries", json!(100_000)),
    ] {
        let mut bad = good.clone();
        bad[field] = value;
        cases.push((bad, json!({}), field));
    }
    let mut bad_domain = good.clone();
    bad_domain["domains"][1]["domain"] = json!("exa mple.com");
    cases.push((bad_domain, json!({}), "domains[1].domain"));
    cases.push((good.clone(), json!({"on_miss": "explode"}), "on_miss"));
    // Maps required (as under `gateway run`) but not pinned: refused, never
    // an in-process table that would hand VIPs out again.
    let mut required = good.clone();
    required["require_pinned_maps"] = json!(true);
    cases.push((required, json!({}), "pin_dir"));
    cases.push((
        good.clone(),
        json!({"require_pinned_maps": true}),
        "pin_dir",
    ));

    for (dns_gateway, cache_lookup, field) in cases {
        let (status, log) =
            tests::envoy::Envoy::validate(&seed_bootstrap(&ports, &dns_gateway, &cache_lookup))
                .unwrap();
        assert_eq!(
            status.code(),
            Some(1),
            "rejected, not crashed ({field}):\n{log}"
        );
        assert!(
            log.contains("rejecting") && log.contains(&format!(": {field}:")),
            "the log names {field}:\n{log}"
        );
    }

    // A running Envoy refuses to start with one, without crashing.
    let mut bad = good.clone();
    bad["prefix_len"] = json!(0);
    let err = match Envoy::start(&seed_bootstrap(&ports, &bad, &json!({})), ports.admin) {
        Ok(_) => panic!("Envoy started with prefix_len 0"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("prefix_len"), "{err}");
    assert!(
        !err.contains("Segmentation") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn a_panic_in_the_module_leaves_envoy_serving() {
    if !prerequisites_met(&envoy_prerequisites()) {
        return;
    }
    let mut config = seed_dns_gateway_config("10.10.0.0", 24, &no_pins());
    config["debug_panic_on_domain"] = json!("panic.aws.com");
    let mut s = setup(config, json!({}));
    // The filter catches the panic and drops the query (fails closed):
    // no answer, and the fallback never sees it.
    let answer = dig(s.ports.dns, "panic.aws.com", "A").unwrap();
    assert!(answer.a_records().is_empty(), "{}", answer.raw);
    assert!(s.envoy.is_running(), "Envoy survived:\n{}", s.envoy.log());
    assert!(s.envoy.log().contains("handling a datagram panicked"));
    let _ = dig(s.ports.dns, "panic.aws.com", "A");
    assert_eq!(a_of(s.ports.dns, "one.s3.aws.com"), ["10.10.0.1"]);
    assert_eq!(
        a_of(s.ports.dns, FALLBACK_NAME),
        [FALLBACK_ANSWER.to_string()]
    );
    assert!(s.envoy.is_running());
    assert!(!s
        .resolver
        .queries()
        .unwrap()
        .iter()
        .any(|q| q.name == "panic.aws.com"));
    assert!(
        s.envoy
            .stat("dynamicmodulescustom.dns_gateway.panics")
            .unwrap()
            >= 1
    );
}

/// Connects from inside `cgroup` to `host:port`, sends a line and prints
/// the body of the HTTP reply (plain socket calls, as an unmodified
/// application would).
fn connect_in_cgroup(cgroup: &TestCgroup, host: &str, port: u16) -> String {
    const CLIENT: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(b"hello\n")
data = b""
while True:
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
head, sep, body = data.partition(b"\r\n\r\n")
sys.stdout.write((body if sep and head.startswith(b"HTTP/") else data).decode())
"#;
    let port = port.to_string();
    let out = cgroup
        .run("python3", &["-c", CLIENT, host, &port])
        .expect("python3 runs");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn pinned_vip_map_persists_vips_and_redirected_connections_find_their_domain() {
    if !prerequisites_met(&envoy_prerequisites()) {
        return;
    }
    enter_private_netns().unwrap();
    let ports = Ports::pick().unwrap();
    let _resolver =
        StubResolver::start(ports.resolver, &[(FALLBACK_NAME, FALLBACK_ANSWER)]).unwrap();
    let up1 = ConnectUpstream::start("cluster_1", ports.upstream_1).unwrap();
    let _up2 = ConnectUpstream::start("cluster_2", ports.upstream_2).unwrap();
    let cgroup = TestCgroup::new().unwrap();
    let loader = Loader::attach(
        &cgroup,
        &["10.10.0.0/24"],
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, ports.dns),
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, ports.tcp),
    )
    .expect("gateway attach");
    let pins = PinDir::new(loader.pin_dir());
    let config = seed_dns_gateway_config("10.10.0.0", 24, loader.pin_dir());
    let bootstrap = seed_bootstrap(&ports, &config, &json!({}));

    let envoy = Envoy::start(&bootstrap, ports.admin).unwrap();
    assert_eq!(a_of(ports.dns, "one.s3.aws.com"), ["10.10.0.1"]);
    assert_eq!(
        pins.vips().unwrap().entries().unwrap(),
        [(Ipv4Addr::new(10, 10, 0, 1), "one.s3.aws.com".to_owned())],
        "every allocation is written to the pinned VIP map"
    );
    // An application in the gated cgroup dials the VIP: the kernel sends it
    // to Envoy and records the original destination; cache_lookup finds
    // the domain through the pinned map (the local address is Envoy's).
    let reply = connect_in_cgroup(&cgroup, "10.10.0.1", 443);
    assert!(
        reply.starts_with("cluster_1\n"),
        "reply {reply:?}\n{}",
        envoy.log()
    );
    let requests = up1.requests().unwrap();
    assert_eq!(requests.len(), 1);
    assert!(
        requests[0].authority.starts_with("one.s3.aws.com:"),
        "{requests:?}"
    );
    assert_eq!(
        requests[0].headers.get("x-auth-token").map(String::as_str),
        Some("abc123")
    );
    assert_eq!(
        envoy
            .stat("dynamicmodulescustom.cache_lookup.lookup_hit")
            .unwrap(),
        1
    );
    drop(envoy);

    // A restarted Envoy reloads the table: old names keep their VIPs, new
    // ones continue after the highest.
    let envoy = Envoy::start(&bootstrap, ports.admin).unwrap();
    assert!(envoy.log().contains("1 VIPs loaded"), "{}", envoy.log());
    assert_eq!(a_of(ports.dns, "two.s3.aws.com"), ["10.10.0.2"]);
    assert_eq!(a_of(ports.dns, "one.s3.aws.com"), ["10.10.0.1"]);
    assert_eq!(
        envoy
            .stat("dynamicmodulescustom.dns_gateway.allocations")
            .unwrap(),
        1
    );
    let reply = connect_in_cgroup(&cgroup, "10.10.0.1", 443);
    assert!(
        reply.starts_with("cluster_1\n"),
        "after restart: {reply:?}\n{}",
        envoy.log()
    );
    assert_eq!(pins.vips().unwrap().entries().unwrap().len(), 2);
}

#[test]
fn two_envoys_on_one_pin_directory_never_give_one_vip_two_names() {
    if !prerequisites_met(&envoy_prerequisites()) {
        return;
    }
    enter_private_netns().unwrap();
    let first_ports = Ports::pick().unwrap();
    let _resolver = StubResolver::start(first_ports.resolver, &[]).unwrap();
    let up1 = ConnectUpstream::start("cluster_1", first_ports.upstream_1).unwrap();
    let _up2 = ConnectUpstream::start("cluster_2", first_ports.upstream_2).unwrap();
    // A /30 (two VIPs), a 1 s TTL and reclaiming after 2 s idle.
    let cgroup = TestCgroup::new().unwrap();
    // The loader sends the gated cgroup's connections to the second Envoy.
    let mut second_ports = Ports::pick().unwrap();
    second_ports.resolver = first_ports.resolver;
    second_ports.upstream_1 = first_ports.upstream_1;
    second_ports.upstream_2 = first_ports.upstream_2;
    let loader = Loader::attach(
        &cgroup,
        &["10.10.0.0/30"],
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, first_ports.dns),
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, second_ports.tcp),
    )
    .expect("gateway attach");
    let mut config = seed_dns_gateway_config("10.10.0.0", 30, loader.pin_dir());
    config["ttl"] = json!(1);
    config["reclaim_idle_after"] = json!(2);
    let first = Envoy::start(
        &seed_bootstrap(&first_ports, &config, &json!({})),
        first_ports.admin,
    )
    .unwrap();
    let second = Envoy::start(
        &seed_bootstrap(&second_ports, &config, &json!({"on_miss": "close"})),
        second_ports.admin,
    )
    .unwrap();
    assert_eq!(a_of(first_ports.dns, "a.s3.aws.com"), ["10.10.0.1"]);
    assert_eq!(a_of(first_ports.dns, "b.s3.aws.com"), ["10.10.0.2"]);
    // The second Envoy learns a.s3.aws.com's VIP and keeps it in memory.
    assert_eq!(a_of(second_ports.dns, "a.s3.aws.com"), ["10.10.0.1"]);
    std::thread::sleep(Duration::from_millis(3200));
    // b is used again; the first Envoy reclaims a's VIP for c.
    assert_eq!(a_of(first_ports.dns, "b.s3.aws.com"), ["10.10.0.2"]);
    assert_eq!(
        a_of(first_ports.dns, "c.s3.aws.com"),
        ["10.10.0.1"],
        "{}",
        first.log()
    );
    // The second Envoy must not answer a with c's VIP from its memory
    // (nothing is idle now: SERVFAIL, no address).
    assert_eq!(
        a_of(second_ports.dns, "a.s3.aws.com"),
        Vec::<String>::new(),
        "{}",
        second.log()
    );
    let pins = PinDir::new(loader.pin_dir());
    assert_eq!(
        pins.vips().unwrap().entries().unwrap(),
        [
            (Ipv4Addr::new(10, 10, 0, 1), "c.s3.aws.com".to_owned()),
            (Ipv4Addr::new(10, 10, 0, 2), "b.s3.aws.com".to_owned()),
        ]
    );
    // A connection to the VIP through the second Envoy tunnels to c, with
    // c's name: never to a, which the second Envoy once knew there.
    let reply = connect_in_cgroup(&cgroup, "10.10.0.1", 443);
    assert!(
        reply.starts_with("cluster_1\n"),
        "{reply:?}\n{}",
        second.log()
    );
    let requests = up1.requests().unwrap();
    assert!(
        requests
            .last()
            .is_some_and(|r| r.authority.starts_with("c.s3.aws.com:")),
        "{requests:?}"
    );
    drop(first);
}
