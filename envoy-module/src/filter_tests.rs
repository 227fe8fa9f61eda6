//! Filter logic driven through fake Envoy handles.

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    sync::{atomic::Ordering, Arc, Mutex},
    time::Duration,
};

use hickory_proto::{
    op::{Message, ResponseCode},
    rr::{RData, RecordType},
};

use crate::{
    api::{
        CounterId, CounterRegistry, Counters, NetworkFilterConfig, NetworkFilterHandle,
        NetworkStatus, Timer, UdpFilterHandle, UdpListenerFilterConfig, UdpStatus,
    },
    cache_lookup::CacheLookupConfig,
    config::{parse_cache_lookup, parse_dns_gateway},
    dns::tests::query_bytes,
    dns_gateway::DnsGatewayConfig,
    state::{tests::FakeMaps, GatewayState},
};

/// Hands out counter ids and remembers their names.
#[derive(Default)]
struct FakeRegistry {
    names: Vec<String>,
}

impl CounterRegistry for FakeRegistry {
    fn define_counter(&mut self, name: &str) -> Option<CounterId> {
        self.names.push(name.to_owned());
        Some(CounterId(self.names.len() - 1))
    }
}

#[derive(Default)]
struct FakeUdp {
    datagram: Vec<u8>,
    sent: Vec<(Vec<u8>, SocketAddr)>,
    counters: HashMap<usize, u64>,
}

impl UdpFilterHandle for FakeUdp {
    fn datagram(&self) -> Vec<u8> {
        self.datagram.clone()
    }
    fn peer_address(&self) -> Option<SocketAddr> {
        Some("127.0.0.1:5555".parse().unwrap())
    }
    fn local_address(&self) -> Option<SocketAddr> {
        Some("127.0.0.1:15053".parse().unwrap())
    }
    fn send_datagram(&mut self, data: &[u8], to: SocketAddr) -> bool {
        self.sent.push((data.to_vec(), to));
        true
    }
    fn increment_counter(&mut self, id: CounterId, value: u64) {
        *self.counters.entry(id.0).or_default() += value;
    }
}

struct FakeNet {
    local: SocketAddr,
    remote: SocketAddr,
    state: BTreeMap<String, String>,
    typed: BTreeMap<String, String>,
    closed: bool,
    counters: HashMap<usize, u64>,
    /// The read buffer of the running `on_read` (client → filters after).
    read: Vec<u8>,
    /// The write buffer of the running `on_write` (upstream → client).
    write: Vec<u8>,
    /// What reached the client: the module's own writes and released
    /// write buffers, in order.
    to_client: Vec<u8>,
    /// Whether tcp_proxy has its upstream (the tunnel is up).
    upstream_ready: bool,
    /// Timers armed: (delay, event).
    timers: Vec<(std::time::Duration, u64)>,
}

impl FakeNet {
    fn new(local: &str, remote: &str) -> Self {
        Self {
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            state: BTreeMap::new(),
            typed: BTreeMap::new(),
            closed: false,
            counters: HashMap::new(),
            read: Vec::new(),
            write: Vec::new(),
            to_client: Vec::new(),
            upstream_ready: false,
            timers: Vec::new(),
        }
    }
}

impl NetworkFilterHandle for FakeNet {
    fn local_address(&self) -> Option<SocketAddr> {
        Some(self.local)
    }
    fn remote_address(&self) -> Option<SocketAddr> {
        Some(self.remote)
    }
    fn set_filter_state_bytes(&mut self, key: &str, value: &str) -> bool {
        self.state.insert(key.to_owned(), value.to_owned());
        true
    }
    fn set_filter_state_typed(&mut self, key: &str, value: &str) -> bool {
        self.typed.insert(key.to_owned(), value.to_owned());
        true
    }
    fn close(&mut self) {
        self.closed = true;
    }
    fn increment_counter(&mut self, id: CounterId, value: u64) {
        *self.counters.entry(id.0).or_default() += value;
    }
    fn read_buffer(&self) -> Vec<u8> {
        self.read.clone()
    }
    fn drain_read_buffer(&mut self, length: usize) {
        self.read.drain(..length.min(self.read.len()));
    }
    fn append_read_buffer(&mut self, data: &[u8]) {
        self.read.extend_from_slice(data);
    }
    fn write_buffer(&self) -> Vec<u8> {
        self.write.clone()
    }
    fn drain_write_buffer(&mut self, length: usize) {
        self.write.drain(..length.min(self.write.len()));
    }
    fn append_write_buffer(&mut self, data: &[u8]) {
        self.write.extend_from_slice(data);
    }
    fn write_to_client(&mut self, data: &[u8]) -> bool {
        self.to_client.extend_from_slice(data);
        true
    }
    fn has_upstream_host(&self) -> bool {
        self.upstream_ready
    }
    fn start_timer(&mut self, delay: std::time::Duration, event: u64) -> Option<Timer> {
        self.timers.push((delay, event));
        Some(Timer::new(()))
    }
}

fn counter(registry: &FakeRegistry, counters: &HashMap<usize, u64>, name: &str) -> u64 {
    let id = registry
        .names
        .iter()
        .position(|n| n == name)
        .unwrap_or_else(|| panic!("no counter {name}"));
    counters.get(&id).copied().unwrap_or(0)
}

const CONFIG: &str = r#"{"base_ip":"10.10.0.0","prefix_len":29.0,"ttl":42,
    "debug_panic_on_domain":"panic.test",
    "domains":[{"domain":"*.aws.com","metadata":{"cluster":"cluster_1","auth_token":"abc123"}},
               {"domain":"example.com","metadata":{"cluster":"cluster_2","auth_token":"def456"}},
               {"domain":"*.test","metadata":{}}]}"#;

struct Gateway {
    state: Arc<GatewayState>,
    maps: Arc<FakeMaps>,
    dns: DnsGatewayConfig,
    registry: FakeRegistry,
}

fn gateway() -> Gateway {
    gateway_with(CONFIG)
}

fn gateway_with(config: &str) -> Gateway {
    let maps = Arc::new(FakeMaps::default());
    let state = Arc::new(
        GatewayState::new(Path::new("/pins"), maps.clone()).with_reopen_interval(Duration::ZERO),
    );
    let mut registry = FakeRegistry::default();
    let dns = DnsGatewayConfig::new(
        parse_dns_gateway(config.as_bytes()).unwrap(),
        state.clone(),
        Counters::define(&mut registry),
    )
    .unwrap();
    Gateway {
        state,
        maps,
        dns,
        registry,
    }
}

fn ask(
    gw: &Gateway,
    handle: &mut FakeUdp,
    name: &str,
    qtype: RecordType,
) -> (UdpStatus, Option<Message>) {
    handle.datagram = query_bytes(name, qtype, false);
    handle.sent.clear();
    let status = gw.dns.new_filter().on_data(handle);
    let answer = handle
        .sent
        .first()
        .map(|(bytes, _)| Message::from_vec(bytes).unwrap());
    (status, answer)
}

fn a_of(answer: &Message) -> Ipv4Addr {
    match answer.answers()[0].data() {
        RData::A(a) => a.0,
        other => panic!("not an A record: {other:?}"),
    }
}

#[test]
fn matched_names_are_answered_with_stable_vips_across_workers() {
    let gw = gateway();
    let mut h = FakeUdp::default();
    let (status, answer) = ask(&gw, &mut h, "one.s3.aws.com.", RecordType::A);
    assert_eq!(status, UdpStatus::StopIteration);
    let answer = answer.expect("an answer was sent");
    assert_eq!(a_of(&answer), Ipv4Addr::new(10, 10, 0, 1));
    assert_eq!(answer.answers()[0].ttl(), 42);
    assert_eq!(
        h.sent[0].1,
        "127.0.0.1:5555".parse().unwrap(),
        "answer goes to the peer"
    );
    let (_, two) = ask(&gw, &mut h, "TWO.s3.aws.com.", RecordType::A);
    assert_eq!(a_of(&two.unwrap()), Ipv4Addr::new(10, 10, 0, 2));
    // Another worker's filter instance sees the same table.
    let (_, again) = ask(&gw, &mut h, "one.s3.aws.com.", RecordType::A);
    assert_eq!(a_of(&again.unwrap()), Ipv4Addr::new(10, 10, 0, 1));
    let (_, exact) = ask(&gw, &mut h, "example.com.", RecordType::A);
    assert_eq!(a_of(&exact.unwrap()), Ipv4Addr::new(10, 10, 0, 3));
    assert_eq!(counter(&gw.registry, &h.counters, "answered"), 4);
    assert_eq!(counter(&gw.registry, &h.counters, "allocations"), 3);
    assert_eq!(counter(&gw.registry, &h.counters, "queries"), 4);
}

#[test]
fn unmatched_and_non_standard_queries_continue() {
    let gw = gateway();
    let mut h = FakeUdp::default();
    for name in ["github.com.", "aws.com.", "example.com.evil.org."] {
        let (status, answer) = ask(&gw, &mut h, name, RecordType::A);
        assert_eq!(status, UdpStatus::Continue, "{name}");
        assert!(answer.is_none());
    }
    assert_eq!(counter(&gw.registry, &h.counters, "passed_on"), 3);
    assert!(h.sent.is_empty());
    assert!(
        gw.state.entries().is_empty(),
        "nothing allocated for names we pass on"
    );
}

#[test]
fn other_types_get_nodata_with_soa() {
    let gw = gateway();
    let mut h = FakeUdp::default();
    let (status, answer) = ask(&gw, &mut h, "bucket.aws.com.", RecordType::AAAA);
    assert_eq!(status, UdpStatus::StopIteration);
    let answer = answer.unwrap();
    assert_eq!(answer.response_code(), ResponseCode::NoError);
    assert!(answer.answers().is_empty());
    assert_eq!(answer.name_servers()[0].name().to_ascii(), "aws.com.");
    assert_eq!(answer.name_servers()[0].ttl(), 42);
    assert_eq!(counter(&gw.registry, &h.counters, "nodata"), 1);
    assert!(gw.state.entries().is_empty(), "no VIP for a AAAA query");
}

#[test]
fn responses_are_never_answered_nor_passed_on() {
    let gw = gateway();
    let mut h = FakeUdp::default();
    for name in ["one.aws.com.", "github.com."] {
        let mut response = query_bytes(name, RecordType::A, false);
        response[2] |= 0x80;
        h.datagram = response;
        assert_eq!(
            gw.dns.new_filter().on_data(&mut h),
            UdpStatus::StopIteration,
            "{name}"
        );
    }
    assert!(h.sent.is_empty());
    assert_eq!(counter(&gw.registry, &h.counters, "responses_dropped"), 2);
    assert_eq!(counter(&gw.registry, &h.counters, "passed_on"), 0);
}

#[test]
fn bad_queries_get_formerr_or_notimp_and_short_ones_are_dropped() {
    let gw = gateway();
    let mut h = FakeUdp::default();
    let mut truncated = query_bytes("one.aws.com.", RecordType::A, false);
    truncated.truncate(truncated.len() - 2);
    let mut notify = query_bytes("one.aws.com.", RecordType::A, false);
    notify[2] |= 4 << 3;
    let mut zeros = vec![0; 12 + 3];
    zeros[5] = 1; // one question, so it must be parsed
    let cases: [(Vec<u8>, Option<ResponseCode>); 5] = [
        (vec![], None),
        (vec![0x12, 0x34, 0x01], None),
        (truncated, Some(ResponseCode::FormErr)),
        (zeros, Some(ResponseCode::FormErr)),
        (notify, Some(ResponseCode::NotImp)),
    ];
    for (datagram, expected) in cases {
        h.datagram = datagram.clone();
        h.sent.clear();
        assert_eq!(
            gw.dns.new_filter().on_data(&mut h),
            UdpStatus::StopIteration
        );
        let answer = h
            .sent
            .first()
            .map(|(bytes, _)| Message::from_vec(bytes).unwrap());
        assert_eq!(
            answer.as_ref().map(|a| a.response_code()),
            expected,
            "{datagram:?}"
        );
        if let Some(answer) = answer {
            assert_eq!(answer.id(), u16::from_be_bytes([datagram[0], datagram[1]]));
        }
    }
    assert_eq!(counter(&gw.registry, &h.counters, "malformed"), 2);
    assert_eq!(counter(&gw.registry, &h.counters, "formerr"), 2);
    assert_eq!(counter(&gw.registry, &h.counters, "notimp"), 1);
    assert!(gw.state.entries().is_empty());
}

#[test]
fn a_flood_of_new_names_is_capped_and_known_names_keep_working() {
    let config = CONFIG.replace(
        r#""ttl":42,"#,
        r#""ttl":42,"max_new_vips_per_second":1,"new_vip_burst":2,"#,
    );
    let gw = gateway_with(&config);
    let mut h = FakeUdp::default();
    let (_, first) = ask(&gw, &mut h, "known.aws.com.", RecordType::A);
    let vip = a_of(&first.unwrap());
    let mut refused = 0;
    for i in 0..5 {
        let (_, answer) = ask(&gw, &mut h, &format!("flood{i}.aws.com."), RecordType::A);
        if answer.unwrap().response_code() == ResponseCode::ServFail {
            refused += 1;
        }
    }
    assert_eq!(refused, 4, "one token was left after the first name");
    assert_eq!(counter(&gw.registry, &h.counters, "rate_limited"), 4);
    let (_, again) = ask(&gw, &mut h, "known.aws.com.", RecordType::A);
    assert_eq!(a_of(&again.unwrap()), vip, "known names are not capped");
    assert_eq!(gw.state.entries().len(), 2);
}

#[test]
fn exhaustion_answers_servfail() {
    let gw = gateway(); // a /29: six VIPs
    let mut h = FakeUdp::default();
    for i in 0..6 {
        let (_, answer) = ask(&gw, &mut h, &format!("n{i}.aws.com."), RecordType::A);
        assert_eq!(answer.unwrap().response_code(), ResponseCode::NoError);
    }
    let (status, answer) = ask(&gw, &mut h, "n6.aws.com.", RecordType::A);
    assert_eq!(status, UdpStatus::StopIteration);
    assert_eq!(answer.unwrap().response_code(), ResponseCode::ServFail);
    assert_eq!(counter(&gw.registry, &h.counters, "exhausted"), 1);
    let vips: Vec<_> = gw
        .state
        .entries()
        .into_iter()
        .map(|(vip, _)| vip.octets()[3])
        .collect();
    assert_eq!(vips, [1, 2, 3, 4, 5, 6], "never .0 or .7");
}

#[test]
fn a_panic_drops_the_query_and_is_counted() {
    let gw = gateway();
    let mut h = FakeUdp {
        datagram: query_bytes("panic.test.", RecordType::A, false),
        ..Default::default()
    };
    let mut filter = gw.dns.new_filter();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| filter.on_data(&mut h)));
    assert_eq!(
        result.expect("the filter catches its own panic"),
        UdpStatus::StopIteration,
        "fails closed: never passed on"
    );
    assert!(h.sent.is_empty());
    assert_eq!(counter(&gw.registry, &h.counters, "panics"), 1);
    // The filter keeps serving.
    let (_, answer) = ask(&gw, &mut h, "one.aws.com.", RecordType::A);
    assert!(answer.is_some());
}

fn cache_lookup(gw: &Gateway, config: &str) -> (CacheLookupConfig, FakeRegistry) {
    let mut registry = FakeRegistry::default();
    let settings = parse_cache_lookup(config.as_bytes()).unwrap();
    let counters = Counters::define(&mut registry);
    let by_cluster =
        crate::cache_lookup::define_cluster_counters(&settings.clusters, &mut registry);
    let config =
        CacheLookupConfig::with_cluster_counters(settings, gw.state.clone(), counters, by_cluster);
    (config, registry)
}

#[test]
fn a_tunnel_not_up_by_the_connect_response_timeout_is_closed_and_counted_per_cluster() {
    let gw = gateway();
    let mut h = FakeUdp::default();
    ask(&gw, &mut h, "one.s3.aws.com.", RecordType::A);
    ask(&gw, &mut h, "example.com.", RecordType::A);
    let (config, registry) = cache_lookup(
        &gw,
        r#"{"connect_response_timeout_ms":1500,"clusters":["cluster_1","cluster_2"]}"#,
    );
    // (VIP, tunnel up when the deadline passes, closed, cluster counted)
    for (vip, up, closed, cluster) in [
        ("10.10.0.1:443", false, true, "cluster_1"),
        ("10.10.0.2:443", false, true, "cluster_2"),
        ("10.10.0.1:443", true, false, "cluster_1"),
    ] {
        let mut conn = FakeNet::new(vip, "127.0.0.1:40000");
        let mut filter = config.new_filter();
        assert_eq!(filter.on_new_connection(&mut conn), NetworkStatus::Continue);
        assert_eq!(
            conn.timers,
            [(std::time::Duration::from_millis(1500), 1)],
            "{vip}"
        );
        conn.upstream_ready = up;
        filter.on_scheduled(&mut conn, 1);
        assert_eq!(conn.closed, closed, "{vip} up={up}");
        let timeouts = |name: &str| counter(&registry, &conn.counters, name);
        assert_eq!(
            timeouts("cache_lookup.connect_response_timeout"),
            u64::from(closed)
        );
        assert_eq!(
            timeouts(&format!("cache_lookup.connect_response_timeout.{cluster}")),
            u64::from(closed)
        );
    }
    // Unknown events do nothing; without the setting no timer is armed.
    let mut conn = FakeNet::new("10.10.0.1:443", "127.0.0.1:40000");
    let (plain, _) = cache_lookup(&gw, "{}");
    let mut filter = plain.new_filter();
    filter.on_new_connection(&mut conn);
    filter.on_scheduled(&mut conn, 7);
    assert!(conn.timers.is_empty() && !conn.closed);
}

#[test]
fn cache_lookup_sets_domain_and_metadata_from_the_local_address() {
    let gw = gateway();
    let mut h = FakeUdp::default();
    ask(&gw, &mut h, "one.s3.aws.com.", RecordType::A);
    ask(&gw, &mut h, "example.com.", RecordType::A);
    let (config, registry) = cache_lookup(&gw, "{}");
    for (vip, domain, cluster, token, port) in [
        (
            "10.10.0.1:443",
            "one.s3.aws.com",
            "cluster_1",
            "abc123",
            "443",
        ),
        ("10.10.0.2:80", "example.com", "cluster_2", "def456", "80"),
    ] {
        let mut conn = FakeNet::new(vip, "127.0.0.1:40000");
        assert_eq!(
            config.new_filter().on_new_connection(&mut conn),
            NetworkStatus::Continue
        );
        assert_eq!(
            conn.state,
            BTreeMap::from([
                ("envoy.dns_gateway.domain".to_owned(), domain.to_owned()),
                (
                    "envoy.dns_gateway.metadata.auth_token".to_owned(),
                    token.to_owned()
                ),
                (
                    "envoy.dns_gateway.metadata.cluster".to_owned(),
                    cluster.to_owned()
                ),
                ("envoy.dns_gateway.port".to_owned(), port.to_owned()),
            ])
        );
        assert!(conn.typed.is_empty(), "typed cluster only on request");
        assert_eq!(
            counter(&registry, &conn.counters, "cache_lookup.lookup_hit"),
            1
        );
    }
}

#[test]
fn cache_lookup_prefers_the_pinned_original_destination_and_reopens_on_miss() {
    let gw = gateway();
    let mut h = FakeUdp::default();
    ask(&gw, &mut h, "one.s3.aws.com.", RecordType::A);
    let (config, registry) = cache_lookup(&gw, r#"{"set_tcp_proxy_cluster":true}"#);
    let client: SocketAddr = "127.0.0.1:40001".parse().unwrap();
    let mut conn = FakeNet::new("127.0.0.1:15001", &client.to_string());
    // No map yet: a miss after one reopen.
    assert_eq!(
        config.new_filter().on_new_connection(&mut conn),
        NetworkStatus::Continue
    );
    assert_eq!(
        counter(&registry, &conn.counters, "cache_lookup.lookup_miss"),
        1
    );
    assert!(conn.state.is_empty());
    let opens = gw.maps.orig_dst_opens.load(Ordering::SeqCst);
    assert_eq!(
        opens, 2,
        "opened once, reopened once before declaring the miss"
    );
    // The loader (re)creates the map: the next connection's reopen finds it.
    *gw.maps.orig_dst.lock().unwrap() = Some(Arc::new(Mutex::new(HashMap::from([(
        client,
        "10.10.0.1:443".parse().unwrap(),
    )]))));
    let mut conn = FakeNet::new("127.0.0.1:15001", &client.to_string());
    assert_eq!(
        config.new_filter().on_new_connection(&mut conn),
        NetworkStatus::Continue
    );
    assert_eq!(conn.state["envoy.dns_gateway.domain"], "one.s3.aws.com");
    // The port the client dialled, not the listener's (127.0.0.1:15001).
    assert_eq!(conn.state["envoy.dns_gateway.port"], "443");
    assert_eq!(conn.typed["envoy.tcp_proxy.cluster"], "cluster_1");
    assert_eq!(gw.maps.orig_dst_opens.load(Ordering::SeqCst), opens + 1);
}

#[test]
fn pinned_map_mode_gives_each_record_to_one_connection_and_nothing_to_others() {
    let gw = gateway();
    let mut h = FakeUdp::default();
    ask(&gw, &mut h, "one.s3.aws.com.", RecordType::A);
    let client: SocketAddr = "127.0.0.1:40009".parse().unwrap();
    *gw.maps.orig_dst.lock().unwrap() = Some(Arc::new(Mutex::new(HashMap::from([(
        client,
        "10.10.0.1:443".parse().unwrap(),
    )]))));
    let (config, registry) = cache_lookup(
        &gw,
        r#"{"destination_from":"pinned_map","on_miss":"close"}"#,
    );
    let mut first = FakeNet::new("127.0.0.1:15001", &client.to_string());
    assert_eq!(
        config.new_filter().on_new_connection(&mut first),
        NetworkStatus::Continue
    );
    assert_eq!(
        first.state["envoy.dns_gateway.metadata.auth_token"],
        "abc123"
    );
    // The same client address again (a reused port): the record is gone.
    let mut reused = FakeNet::new("127.0.0.1:15001", &client.to_string());
    assert_eq!(
        config.new_filter().on_new_connection(&mut reused),
        NetworkStatus::StopIteration
    );
    assert!(reused.closed && reused.state.is_empty());
    // A connection whose local address is a VIP is not trusted in this
    // mode: only what the kernel recorded counts.
    let mut direct = FakeNet::new("10.10.0.1:443", "127.0.0.1:40010");
    assert_eq!(
        config.new_filter().on_new_connection(&mut direct),
        NetworkStatus::StopIteration
    );
    assert!(direct.closed && direct.state.is_empty());
    assert_eq!(
        counter(&registry, &direct.counters, "cache_lookup.not_redirected")
            + counter(&registry, &reused.counters, "cache_lookup.not_redirected"),
        2
    );
}

#[test]
fn cache_lookup_miss_continues_or_closes() {
    let gw = gateway();
    let (keep, registry) = cache_lookup(&gw, "");
    let mut conn = FakeNet::new("10.10.0.5:443", "127.0.0.1:40002");
    assert_eq!(
        keep.new_filter().on_new_connection(&mut conn),
        NetworkStatus::Continue
    );
    assert!(!conn.closed && conn.state.is_empty());
    assert_eq!(
        counter(&registry, &conn.counters, "cache_lookup.lookup_miss"),
        1
    );

    let (close, registry) = cache_lookup(&gw, r#"{"on_miss":"close"}"#);
    let mut conn = FakeNet::new("10.10.0.5:443", "127.0.0.1:40003");
    assert_eq!(
        close.new_filter().on_new_connection(&mut conn),
        NetworkStatus::StopIteration
    );
    assert!(conn.closed);
    assert_eq!(counter(&registry, &conn.counters, "cache_lookup.closed"), 1);
}

#[test]
fn module_entry_points_reject_unknown_filters_and_bad_configs() {
    let mut registry = FakeRegistry::default();
    let err = crate::new_udp_listener_filter_config("dns_gw", b"{}", &mut registry)
        .err()
        .unwrap();
    assert!(err.contains("filter_name"), "{err}");
    let err =
        crate::new_udp_listener_filter_config("dns_gateway", br#"{"base_ip":"x"}"#, &mut registry)
            .err()
            .unwrap();
    assert!(err.starts_with("dns_gateway: base_ip:"), "{err}");
    let err = crate::new_network_filter_config("cache_lookup", br#"{"on_miss":1}"#, &mut registry)
        .err()
        .unwrap();
    assert!(err.starts_with("cache_lookup: on_miss:"), "{err}");
    assert!(crate::new_network_filter_config("cache_lookup", b"", &mut registry).is_ok());
}

const CONFIG_V6: &str = r#"{"base_ip":"10.10.0.0","prefix_len":29.0,"ttl":42,
    "vip_ipv6_prefix":"fd00:6a7e::/96",
    "domains":[{"domain":"*.aws.com","metadata":{"cluster":"cluster_1"}}]}"#;

#[test]
fn with_an_ipv6_range_aaaa_gets_the_ipv6_vip_of_the_same_name() {
    // (config, qtype, expected answer)
    let cases = [
        (CONFIG_V6, RecordType::A, Some("10.10.0.1")),
        (CONFIG_V6, RecordType::AAAA, Some("fd00:6a7e::a0a:1")),
        (CONFIG, RecordType::AAAA, None),
    ];
    for (config, qtype, expected) in cases {
        let gw = gateway_with(config);
        let mut h = FakeUdp::default();
        let (_, answer) = ask(&gw, &mut h, "one.s3.aws.com.", qtype);
        let answer = answer.expect("answered");
        let got = answer.answers().first().map(|r| match r.data() {
            RData::A(a) => a.0.to_string(),
            RData::AAAA(a) => a.0.to_string(),
            other => panic!("unexpected {other:?}"),
        });
        assert_eq!(got.as_deref(), expected, "{qtype}");
    }
    // A and AAAA stand for one name: one allocation.
    let gw = gateway_with(CONFIG_V6);
    let mut h = FakeUdp::default();
    ask(&gw, &mut h, "one.s3.aws.com.", RecordType::AAAA);
    ask(&gw, &mut h, "one.s3.aws.com.", RecordType::A);
    assert_eq!(gw.state.entries().len(), 1);
}

#[test]
fn cache_lookup_maps_an_ipv6_client_and_an_ipv6_vip_to_the_domain() {
    let gw = gateway_with(CONFIG_V6);
    let mut h = FakeUdp::default();
    ask(&gw, &mut h, "one.s3.aws.com.", RecordType::AAAA);
    let client: SocketAddr = "[::1]:40100".parse().unwrap();
    *gw.maps.orig_dst.lock().unwrap() = Some(Arc::new(Mutex::new(HashMap::from([(
        client,
        "[fd00:6a7e::a0a:1]:8443".parse().unwrap(),
    )]))));
    let (config, _) = cache_lookup(
        &gw,
        r#"{"destination_from":"pinned_map","on_miss":"close"}"#,
    );
    let mut conn = FakeNet::new("[::1]:15001", &client.to_string());
    assert_eq!(
        config.new_filter().on_new_connection(&mut conn),
        NetworkStatus::Continue
    );
    assert_eq!(conn.state["envoy.dns_gateway.domain"], "one.s3.aws.com");
    assert_eq!(conn.state["envoy.dns_gateway.port"], "8443");
}

fn framed(message: &[u8]) -> Vec<u8> {
    crate::dns_tcp::frame(message).unwrap()
}

fn dns_tcp(gw: &Gateway) -> (Box<dyn crate::api::NetworkFilter>, FakeRegistry) {
    let mut registry = FakeRegistry::default();
    let udp = DnsGatewayConfig::new(
        parse_dns_gateway(CONFIG.as_bytes()).unwrap(),
        gw.state.clone(),
        Counters::define(&mut registry),
    )
    .unwrap();
    (
        crate::dns_tcp::DnsTcpConfig::new(udp).new_filter(),
        registry,
    )
}

fn tcp_answers(bytes: &[u8]) -> Vec<Message> {
    let mut buffer = bytes.to_vec();
    let frames = crate::dns_tcp::take_frames(&mut buffer);
    assert!(buffer.is_empty(), "only whole frames reach the client");
    frames
        .iter()
        .map(|f| Message::from_vec(&f[2..]).unwrap())
        .collect()
}

#[test]
fn dns_over_tcp_answers_matched_names_and_relays_the_rest_in_whole_frames() {
    let gw = gateway();
    let (mut filter, registry) = dns_tcp(&gw);
    let mut conn = FakeNet::new("127.0.0.1:15053", "127.0.0.1:40200");
    let matched = framed(&query_bytes("one.s3.aws.com.", RecordType::A, false));
    let unmatched = framed(&query_bytes("github.com.", RecordType::MX, true));
    let exact = framed(&query_bytes("example.com.", RecordType::A, false));
    // Three pipelined queries, split mid-frame across two reads.
    let stream: Vec<u8> = [matched.clone(), unmatched.clone(), exact.clone()].concat();
    let cut = matched.len() + 5;
    conn.read = stream[..cut].to_vec();
    assert_eq!(
        filter.on_read(&mut conn, false),
        NetworkStatus::StopIteration
    );
    assert!(
        conn.read.is_empty(),
        "a partial unmatched frame is held back"
    );
    conn.read = stream[cut..].to_vec();
    assert_eq!(filter.on_read(&mut conn, false), NetworkStatus::Continue);
    assert_eq!(
        conn.read, unmatched,
        "only the unmatched query goes on, whole"
    );
    let answers = tcp_answers(&conn.to_client);
    let names: Vec<String> = answers
        .iter()
        .map(|a| a.queries()[0].name().to_ascii())
        .collect();
    assert_eq!(names, ["one.s3.aws.com.", "example.com."]);
    assert_eq!(a_of(&answers[0]), Ipv4Addr::new(10, 10, 0, 1));
    assert_eq!(counter(&registry, &conn.counters, "queries"), 3);
    assert_eq!(counter(&registry, &conn.counters, "passed_on"), 1);

    // The resolver's answer comes back in two pieces: released only whole.
    let reply = framed(&[0xab; 40]);
    conn.to_client.clear();
    conn.write = reply[..10].to_vec();
    assert_eq!(filter.on_write(&mut conn, false), NetworkStatus::Continue);
    assert!(conn.write.is_empty(), "half a frame is held");
    // A matched answer written meanwhile is not split by it.
    conn.read = matched.clone();
    filter.on_read(&mut conn, false);
    conn.write = reply[10..].to_vec();
    filter.on_write(&mut conn, false);
    assert_eq!(conn.write, reply, "the whole frame is released");
    assert_eq!(tcp_answers(&conn.to_client).len(), 1);
}

#[test]
fn dns_over_tcp_refuses_garbage_and_never_answers_responses() {
    let gw = gateway();
    let (mut filter, registry) = dns_tcp(&gw);
    let mut conn = FakeNet::new("127.0.0.1:15053", "127.0.0.1:40201");
    let mut response = query_bytes("one.s3.aws.com.", RecordType::A, false);
    response[2] |= 0x80;
    let mut bad_opcode = query_bytes("one.s3.aws.com.", RecordType::A, false);
    bad_opcode[2] |= 0x10;
    conn.read = [framed(&response), framed(&bad_opcode), framed(&[1, 2, 3])].concat();
    assert_eq!(
        filter.on_read(&mut conn, false),
        NetworkStatus::StopIteration
    );
    let answers = tcp_answers(&conn.to_client);
    assert_eq!(answers.len(), 1, "only the bad opcode is answered (NOTIMP)");
    assert_eq!(answers[0].response_code(), ResponseCode::NotImp);
    assert_eq!(counter(&registry, &conn.counters, "responses_dropped"), 1);
    assert_eq!(counter(&registry, &conn.counters, "malformed"), 1);
    assert!(conn.read.is_empty(), "nothing relayed");
}

#[test]
fn dns_over_tcp_closes_a_connection_past_its_query_limit() {
    let gw = gateway();
    let (mut filter, registry) = dns_tcp(&gw);
    let mut conn = FakeNet::new("127.0.0.1:15053", "127.0.0.1:40202");
    let one = framed(&query_bytes("one.s3.aws.com.", RecordType::A, false));
    let limit = crate::dns_tcp::MAX_QUERIES_PER_CONNECTION as usize;
    conn.read = one.repeat(limit);
    assert_eq!(
        filter.on_read(&mut conn, false),
        NetworkStatus::StopIteration
    );
    assert!(!conn.closed, "{limit} queries are fine");
    assert_eq!(tcp_answers(&conn.to_client).len(), limit);
    conn.read = one.repeat(5);
    filter.on_read(&mut conn, false);
    assert!(conn.closed, "one more closes the connection");
    assert_eq!(
        tcp_answers(&conn.to_client).len(),
        limit,
        "and is not answered"
    );
    assert_eq!(counter(&registry, &conn.counters, "tcp_query_limit"), 1);
}

#[test]
fn cache_lookup_maps_only_ipv6_vips_of_the_configured_range() {
    let gw = gateway_with(CONFIG_V6);
    let mut h = FakeUdp::default();
    ask(&gw, &mut h, "one.s3.aws.com.", RecordType::AAAA);
    // (recorded destination, domain found?)
    let cases = [
        ("[fd00:6a7e::a0a:1]:443", true),
        ("[::ffff:10.10.0.1]:443", true),
        ("10.10.0.1:443", true),
        ("[fd00:6a7f::a0a:1]:443", false),
        ("[2001:db8::a0a:1]:443", false),
    ];
    for (i, (destination, found)) in cases.into_iter().enumerate() {
        let client: SocketAddr = format!("[::1]:{}", 40300 + i).parse().unwrap();
        *gw.maps.orig_dst.lock().unwrap() = Some(Arc::new(Mutex::new(HashMap::from([(
            client,
            destination.parse().unwrap(),
        )]))));
        let (config, _) = cache_lookup(
            &gw,
            r#"{"destination_from":"pinned_map","on_miss":"close"}"#,
        );
        let mut conn = FakeNet::new("[::1]:15001", &client.to_string());
        config.new_filter().on_new_connection(&mut conn);
        assert_eq!(
            conn.state.contains_key("envoy.dns_gateway.domain"),
            found,
            "{destination}"
        );
        assert_eq!(conn.closed, !found, "{destination}");
    }
}

#[test]
fn a_full_pool_answers_servfail_or_passes_on_as_configured() {
    // (on_exhausted, status for a name over capacity)
    let cases = [
        ("", UdpStatus::StopIteration),
        (r#","on_exhausted":"servfail""#, UdpStatus::StopIteration),
        (r#","on_exhausted":"pass""#, UdpStatus::Continue),
    ];
    for (policy, expected) in cases {
        let config = format!(
            r#"{{"base_ip":"10.10.0.0","prefix_len":30{policy},
            "domains":[{{"domain":"*.aws.com","metadata":{{}}}}]}}"#
        );
        let gw = gateway_with(&config);
        let mut h = FakeUdp::default();
        ask(&gw, &mut h, "a.aws.com.", RecordType::A);
        ask(&gw, &mut h, "b.aws.com.", RecordType::A);
        let (status, answer) = ask(&gw, &mut h, "c.aws.com.", RecordType::A);
        assert_eq!(status, expected, "{policy}");
        if expected == UdpStatus::StopIteration {
            assert_eq!(answer.unwrap().response_code(), ResponseCode::ServFail);
        }
        assert_eq!(counter(&gw.registry, &h.counters, "exhausted"), 1);
    }
    assert!(parse_dns_gateway(
        br#"{"base_ip":"10.10.0.0","prefix_len":30,"on_exhausted":"maybe","domains":[]}"#
    )
    .unwrap_err()
    .contains("on_exhausted"));
}
