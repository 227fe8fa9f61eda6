//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz): the module's
//! DNS path (UDP datagrams and DNS-over-TCP streams) and its configuration
//! parsers, driven without Envoy. Each checks what must hold for any input:
//! no panic, and every reply a well-formed DNS message answering the
//! query's ID.

use std::sync::{Arc, OnceLock};

use hickory_proto::op::Message;

use crate::{
    api::Counters,
    config::{parse_cache_lookup, parse_dns_gateway},
    dns_gateway::{DnsGatewayConfig, Outcome, Shared},
    dns_tcp::take_frames,
    pinned::PinnedMaps,
    state::GatewayState,
};

/// The configuration the DNS targets run with: a wildcard, an exact name,
/// an IPv6 range, and a pool of 4,094 VIPs.
const CONFIG: &str = r#"{"base_ip":"10.10.0.0","prefix_len":20,"ttl":30,
    "vip_ipv6_prefix":"fd00:6a7e::/96","max_new_vips_per_second":100000,"new_vip_burst":100000,
    "domains":[{"domain":"*.aws.com","metadata":{"cluster":"c1"}},
               {"domain":"example.com","metadata":{"cluster":"c2"}}]}"#;

fn shared() -> &'static Arc<Shared> {
    static SHARED: OnceLock<Arc<Shared>> = OnceLock::new();
    SHARED.get_or_init(|| {
        crate::api::quiet_outside_envoy();
        let settings = parse_dns_gateway(CONFIG.as_bytes()).expect("the fuzz configuration");
        // A pin directory that does not exist: the table stays in memory.
        let state = Arc::new(GatewayState::new(
            std::path::Path::new("/nonexistent/fuzz-pins"),
            Arc::new(PinnedMaps),
        ));
        DnsGatewayConfig::new(settings, state, Counters::none())
            .expect("the fuzz configuration")
            .shared()
    })
}

fn check_reply(query: &[u8], outcome: Outcome, udp: bool) {
    if let Outcome::Reply(reply) = outcome {
        let parsed = Message::from_vec(&reply)
            .unwrap_or_else(|e| panic!("the module sent an unparseable reply ({e}): {reply:02x?}"));
        assert_eq!(
            parsed.id(),
            u16::from_be_bytes([query[0], query[1]]),
            "a reply must carry the query's ID"
        );
        if udp {
            // An answer never exceeds what the client accepts over UDP.
            let limit = match crate::dns::inspect(query) {
                crate::dns::Inspection::Query(q) => q.max_udp_size,
                _ => crate::dns::MIN_UDP_SIZE,
            };
            assert!(
                reply.len() <= limit,
                "{} bytes over a {limit}-byte UDP limit",
                reply.len()
            );
        }
    }
}

/// One datagram (or one TCP message when `udp` is false) through the DNS
/// path; a query the fast path takes must also get the general path's
/// exact answer.
pub fn dns_message(udp: bool, message: &[u8]) {
    let outcome = shared().decide(message, udp, &mut |_| {});
    check_reply(message, outcome, udp);
    same_answer_both_ways(message, udp);
}

/// The fast path's answer equals the general path's, byte for byte.
fn same_answer_both_ways(message: &[u8], udp: bool) {
    let Some(fast) = crate::dns_fast::parse(message) else {
        return;
    };
    let crate::dns::Inspection::Query(general) = crate::dns::inspect(message) else {
        panic!("the fast path took a message the general path does not see as a query");
    };
    assert_eq!(
        Some(&fast.name),
        general.name.as_ref(),
        "the two paths read different names"
    );
    let vip = std::net::Ipv4Addr::new(10, 10, 0, 9);
    let vip6: std::net::Ipv6Addr = "fd00:6a7e::a0a:9".parse().expect("literal");
    let (fast_answer, general_answer) = if fast.qtype == 28 {
        (
            fast.aaaa_answer(vip6, 30, udp),
            crate::dns::aaaa_answer(&general, vip6, 30),
        )
    } else {
        (
            fast.a_answer(vip, 30, udp),
            crate::dns::a_answer(&general, vip, 30),
        )
    };
    let general_answer = general_answer.expect("the general path answers a plain query");
    if let Some(fast_answer) = fast_answer {
        assert_eq!(
            fast_answer, general_answer,
            "the fast path answered differently"
        );
    }
}

/// A DNS-over-TCP byte stream: framed, then each message through the DNS
/// path; nothing may be lost or invented by the framing.
pub fn dns_tcp_stream(stream: &[u8]) {
    let mut buffer = stream.to_vec();
    let frames = take_frames(&mut buffer);
    let consumed: usize = frames.iter().map(Vec::len).sum();
    assert_eq!(consumed + buffer.len(), stream.len(), "framing lost bytes");
    for frame in frames {
        dns_message(false, &frame[2..]);
    }
}

/// Filter configurations as Envoy hands them over: must be accepted or
/// refused with a message, never panic.
pub fn filter_configs(bytes: &[u8]) {
    crate::api::quiet_outside_envoy();
    if let Err(e) = parse_dns_gateway(bytes) {
        assert!(!e.is_empty());
    }
    if let Err(e) = parse_cache_lookup(bytes) {
        assert!(!e.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::tests::query_bytes;
    use hickory_proto::rr::RecordType;

    /// Inputs the fuzz targets start from and that must stay harmless
    /// (the regression set: a crash the fuzzer finds is added here).
    #[test]
    fn the_fuzz_entry_points_hold_on_known_tricky_inputs() {
        let mut compression_loop = query_bytes("a.aws.com.", RecordType::A, false);
        // Point the question name at itself.
        compression_loop[12] = 0xc0;
        compression_loop[13] = 12;
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![0; 11],
            vec![0; 12],
            vec![0xff; 12],
            query_bytes("bucket.aws.com.", RecordType::A, true),
            query_bytes("bucket.aws.com.", RecordType::AAAA, false),
            query_bytes("example.com.", RecordType::ANY, true),
            query_bytes("github.com.", RecordType::MX, false),
            compression_loop,
        ];
        for case in &cases {
            dns_message(true, case);
            dns_message(false, case);
            let mut stream = (case.len() as u16).to_be_bytes().to_vec();
            stream.extend_from_slice(case);
            stream.extend_from_slice(&[0xff, 0xff, 1, 2, 3]);
            dns_tcp_stream(&stream);
            filter_configs(case);
        }
        for config in [
            &b"{}"[..],
            b"null",
            b"[]",
            b"{\"base_ip\":1e400}",
            CONFIG.as_bytes(),
        ] {
            filter_configs(config);
        }
    }
}
