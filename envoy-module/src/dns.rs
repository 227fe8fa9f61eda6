//! DNS wire format: classifying queries and building answers (hickory-proto).
//!
//! Every answer echoes the query's ID, question and RD bit and sets QR, AA
//! and RA. An EDNS OPT record in the query is answered with an OPT record
//! (version 0, the query's DO bit, a 1232-byte payload size). Negative
//! answers (NODATA) carry the zone's SOA in the authority section, its TTL
//! and MINIMUM being the configured TTL (RFC 2308).

use std::net::{Ipv4Addr, Ipv6Addr};

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, ResponseCode},
    rr::{
        rdata::{A, AAAA, SOA},
        DNSClass, Name, RData, Record, RecordType,
    },
};

/// Size of the fixed DNS header.
const HEADER_LEN: usize = 12;

/// The UDP answer size every client accepts (RFC 1035).
pub const MIN_UDP_SIZE: usize = 512;

/// UDP payload size advertised in answers that carry EDNS.
pub const EDNS_PAYLOAD: u16 = 1232;

/// SOA MNAME of negative answers.
pub const SOA_MNAME: &str = "ns.dns-gateway.invalid.";

/// SOA RNAME of negative answers.
pub const SOA_RNAME: &str = "hostmaster.dns-gateway.invalid.";

/// What a datagram turned out to be.
#[derive(Debug)]
pub enum Inspection {
    /// A DNS response (QR set): never answered, so two DNS speakers can
    /// never answer each other's answers in a loop.
    Response,
    /// Shorter than a DNS header: nothing to echo, dropped.
    Malformed(String),
    /// A query with a header but something wrong: answered with only the
    /// header (`reply`, already encoded: the query's ID, opcode and RD, the
    /// rcode) — NOTIMP for an opcode other than QUERY, FORMERR for zero or
    /// several questions or an unparseable message.
    Refused {
        /// The reply to send.
        reply: Vec<u8>,
        /// NOTIMP or FORMERR.
        rcode: ResponseCode,
        /// What was wrong, for the log.
        why: String,
    },
    /// A standard query with one question.
    Query(Query),
}

/// A header-only reply to the query whose header is `header`: same ID,
/// opcode and RD bit, QR set, `rcode`, no sections.
pub fn header_reply(header: &[u8], rcode: ResponseCode) -> Vec<u8> {
    let mut reply = vec![0u8; HEADER_LEN];
    reply[..2].copy_from_slice(&header[..2]);
    // QR=1, the query's opcode (bits 3-6) and RD (bit 0); AA, TC cleared.
    reply[2] = 0x80 | (header[2] & 0x79);
    // RA=1, Z/AD/CD cleared, the rcode (low 4 bits).
    reply[3] = 0x80 | (u16::from(rcode) as u8 & 0x0f);
    reply
}

/// A parsed standard query.
#[derive(Debug)]
pub struct Query {
    message: Message,
    /// The question name, normalised (see [`crate::matcher::normalize`]);
    /// `None` when it is not a plain host name.
    pub name: Option<String>,
    /// The question type.
    pub qtype: RecordType,
    /// The question class is IN.
    pub class_in: bool,
    /// The largest UDP answer the client accepts: its EDNS payload size,
    /// at least 512 (RFC 6891), else 512 (RFC 1035).
    pub max_udp_size: usize,
}

impl Query {
    /// The message as parsed.
    pub fn message(&self) -> &Message {
        &self.message
    }
}

/// Classifies a datagram.
pub fn inspect(bytes: &[u8]) -> Inspection {
    if bytes.len() < HEADER_LEN {
        return Inspection::Malformed(format!(
            "{} bytes is shorter than a DNS header",
            bytes.len()
        ));
    }
    let flags = bytes[2];
    let opcode = (flags >> 3) & 0x0f;
    let qdcount = u16::from_be_bytes([bytes[4], bytes[5]]);
    let refuse = |rcode: ResponseCode, why: String| Inspection::Refused {
        reply: header_reply(bytes, rcode),
        rcode,
        why,
    };
    if flags & 0x80 != 0 {
        return Inspection::Response;
    }
    if opcode != 0 {
        return refuse(ResponseCode::NotImp, format!("opcode {opcode}"));
    }
    if qdcount != 1 {
        return refuse(ResponseCode::FormErr, format!("{qdcount} questions"));
    }
    let message = match Message::from_vec(bytes) {
        Ok(message) => message,
        Err(e) => return refuse(ResponseCode::FormErr, e.to_string()),
    };
    let Some(question) = message.queries().first() else {
        return refuse(
            ResponseCode::FormErr,
            "no question after parsing".to_owned(),
        );
    };
    let qtype = question.query_type();
    let class_in = question.query_class() == DNSClass::IN;
    let name = crate::matcher::normalize(&question.name().to_ascii());
    let max_udp_size = message.extensions().as_ref().map_or(MIN_UDP_SIZE, |e| {
        usize::from(e.max_payload()).max(MIN_UDP_SIZE)
    });
    Inspection::Query(Query {
        message,
        name,
        qtype,
        class_in,
        max_udp_size,
    })
}

fn response_to(query: &Message, authoritative: bool, rcode: ResponseCode) -> Message {
    let mut response = Message::new();
    response
        .set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_authoritative(authoritative)
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_checking_disabled(query.checking_disabled())
        .set_response_code(rcode);
    response.add_queries(query.queries().iter().cloned());
    if let Some(edns) = query.extensions() {
        let mut answer = Edns::new();
        answer.set_max_payload(EDNS_PAYLOAD).set_version(0);
        answer.set_dnssec_ok(edns.flags().dnssec_ok);
        response.set_edns(answer);
    }
    response
}

fn encode(message: &Message) -> Result<Vec<u8>, String> {
    message
        .to_vec()
        .map_err(|e| format!("encoding the answer: {e}"))
}

fn question_name(query: &Query) -> Result<Name, String> {
    query
        .message
        .queries()
        .first()
        .map(|q| q.name().clone())
        .ok_or_else(|| "query without question".to_owned())
}

/// An authoritative answer with one A record `name → vip`.
pub fn a_answer(query: &Query, vip: Ipv4Addr, ttl: u32) -> Result<Vec<u8>, String> {
    let mut response = response_to(&query.message, true, ResponseCode::NoError);
    response.add_answer(Record::from_rdata(
        question_name(query)?,
        ttl,
        RData::A(A(vip)),
    ));
    encode(&response)
}

/// An authoritative answer with one AAAA record `name → vip`.
pub fn aaaa_answer(query: &Query, vip: Ipv6Addr, ttl: u32) -> Result<Vec<u8>, String> {
    let mut response = response_to(&query.message, true, ResponseCode::NoError);
    response.add_answer(Record::from_rdata(
        question_name(query)?,
        ttl,
        RData::AAAA(AAAA(vip)),
    ));
    encode(&response)
}

/// `answer` as it may be sent over UDP: unchanged when it fits the
/// client's UDP size, else only the header and question with TC set, so
/// that the client retries over TCP (RFC 1035 4.2.1, RFC 7766).
pub fn fit_udp(query: &Query, answer: Vec<u8>) -> Result<Vec<u8>, String> {
    if answer.len() <= query.max_udp_size {
        return Ok(answer);
    }
    let mut response = response_to(&query.message, true, ResponseCode::NoError);
    response.set_truncated(true);
    encode(&response)
}

/// An authoritative NOERROR answer without records for the asked type,
/// with the SOA of `zone` (normalised, `""` for the root) in the authority
/// section.
pub fn nodata_answer(query: &Query, zone: &str, ttl: u32) -> Result<Vec<u8>, String> {
    let mut response = response_to(&query.message, true, ResponseCode::NoError);
    let owner = if zone.is_empty() {
        Name::root()
    } else {
        Name::from_ascii(format!("{zone}.")).map_err(|e| format!("SOA owner {zone:?}: {e}"))?
    };
    let mname = Name::from_ascii(SOA_MNAME).map_err(|e| e.to_string())?;
    let rname = Name::from_ascii(SOA_RNAME).map_err(|e| e.to_string())?;
    let soa = SOA::new(mname, rname, 1, 3600, 600, 86_400, ttl);
    response.add_name_server(Record::from_rdata(owner, ttl, RData::SOA(soa)));
    encode(&response)
}

/// An answer with `rcode` and no records (e.g. SERVFAIL when the VIP pool
/// is exhausted).
pub fn error_answer(query: &Query, rcode: ResponseCode) -> Result<Vec<u8>, String> {
    encode(&response_to(&query.message, false, rcode))
}

#[cfg(test)]
pub(crate) mod tests {
    use hickory_proto::{op::Query as Question, rr::rdata::opt::EdnsOption};

    use super::*;

    /// A query as a stub resolver would send it.
    pub(crate) fn query_bytes(name: &str, qtype: RecordType, edns: bool) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(0xbeef)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true);
        m.add_query(Question::query(Name::from_ascii(name).unwrap(), qtype));
        if edns {
            let mut e = Edns::new();
            e.set_max_payload(4096).set_dnssec_ok(true);
            e.options_mut()
                .insert(EdnsOption::Unknown(10, vec![1, 2, 3, 4, 5, 6, 7, 8]));
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    fn parse(bytes: &[u8]) -> Query {
        match inspect(bytes) {
            Inspection::Query(q) => q,
            other => panic!("not a query: {other:?}"),
        }
    }

    fn check_header(answer: &Message, rcode: ResponseCode) {
        assert_eq!(answer.id(), 0xbeef);
        assert_eq!(answer.message_type(), MessageType::Response);
        assert_eq!(answer.op_code(), OpCode::Query);
        assert!(answer.recursion_desired());
        assert!(answer.recursion_available());
        assert_eq!(answer.response_code(), rcode);
    }

    #[test]
    fn a_answer_echoes_id_question_flags_and_ttl() {
        let q = parse(&query_bytes("One.S3.aws.com.", RecordType::A, false));
        assert_eq!(q.name.as_deref(), Some("one.s3.aws.com"));
        let bytes = a_answer(&q, Ipv4Addr::new(10, 10, 0, 1), 300).unwrap();
        let answer = Message::from_vec(&bytes).unwrap();
        check_header(&answer, ResponseCode::NoError);
        assert!(answer.authoritative());
        assert_eq!(answer.queries(), q.message().queries());
        assert_eq!(answer.answers().len(), 1);
        let record = &answer.answers()[0];
        assert_eq!(record.name().to_ascii(), "One.S3.aws.com.");
        assert_eq!(record.ttl(), 300);
        assert_eq!(record.data(), &RData::A(A(Ipv4Addr::new(10, 10, 0, 1))));
        assert!(
            answer.extensions().is_none(),
            "no OPT without one in the query"
        );
    }

    #[test]
    fn nodata_carries_the_zone_soa() {
        let q = parse(&query_bytes("bucket.aws.com.", RecordType::AAAA, false));
        let bytes = nodata_answer(&q, "aws.com", 120).unwrap();
        let answer = Message::from_vec(&bytes).unwrap();
        check_header(&answer, ResponseCode::NoError);
        assert!(answer.authoritative());
        assert!(answer.answers().is_empty());
        assert_eq!(answer.name_servers().len(), 1);
        let soa = &answer.name_servers()[0];
        assert_eq!(soa.name().to_ascii(), "aws.com.");
        assert_eq!(soa.ttl(), 120);
        let RData::SOA(data) = soa.data() else {
            panic!("not an SOA: {soa:?}")
        };
        assert_eq!(data.minimum(), 120);
        assert_eq!(data.mname().to_ascii(), SOA_MNAME);
        let root = nodata_answer(&q, "", 5).unwrap();
        assert!(Message::from_vec(&root).unwrap().name_servers()[0]
            .name()
            .is_root());
    }

    #[test]
    fn aaaa_answer_carries_the_ipv6_vip() {
        let q = parse(&query_bytes("one.s3.aws.com.", RecordType::AAAA, false));
        let vip: Ipv6Addr = "fd00:6a7e::a0a:1".parse().unwrap();
        let answer = Message::from_vec(&aaaa_answer(&q, vip, 60).unwrap()).unwrap();
        check_header(&answer, ResponseCode::NoError);
        assert_eq!(answer.answers()[0].data(), &RData::AAAA(AAAA(vip)));
    }

    #[test]
    fn answers_too_big_for_the_client_are_truncated_with_tc() {
        // (EDNS in the query, client limit, answer size, truncated?)
        let cases = [
            (false, 512, 512, false),
            (false, 512, 513, true),
            (true, 4096, 4000, false),
            (true, 4096, 4097, true),
        ];
        for (edns, limit, size, truncated) in cases {
            let q = parse(&query_bytes("big.example.com.", RecordType::TXT, edns));
            assert_eq!(q.max_udp_size, limit);
            let out = fit_udp(&q, vec![0u8; size]).unwrap();
            if truncated {
                let answer = Message::from_vec(&out).unwrap();
                assert!(answer.truncated(), "TC set for {size} > {limit}");
                assert!(answer.answers().is_empty());
                assert_eq!(answer.queries(), q.message().queries());
                assert_eq!(answer.id(), 0xbeef);
            } else {
                assert_eq!(out.len(), size, "{size} <= {limit} is left alone");
            }
        }
    }

    #[test]
    fn edns_is_answered_with_opt() {
        let q = parse(&query_bytes("a.example.com.", RecordType::A, true));
        for bytes in [
            a_answer(&q, Ipv4Addr::new(10, 0, 0, 1), 60).unwrap(),
            nodata_answer(&q, "example.com", 60).unwrap(),
            error_answer(&q, ResponseCode::ServFail).unwrap(),
        ] {
            let answer = Message::from_vec(&bytes).unwrap();
            let edns = answer.extensions().as_ref().expect("OPT kept");
            assert_eq!(edns.max_payload(), EDNS_PAYLOAD);
            assert_eq!(edns.version(), 0);
            assert!(edns.flags().dnssec_ok, "DO bit echoed");
        }
    }

    #[test]
    fn servfail_is_not_authoritative() {
        let q = parse(&query_bytes("a.example.com.", RecordType::A, false));
        let answer = Message::from_vec(&error_answer(&q, ResponseCode::ServFail).unwrap()).unwrap();
        check_header(&answer, ResponseCode::ServFail);
        assert!(!answer.authoritative());
        assert!(answer.answers().is_empty());
    }

    /// What `inspect` should make of a datagram, for the table below.
    #[derive(Debug, PartialEq)]
    enum Expect {
        Drop,
        Response,
        Reply(ResponseCode),
        Query,
    }

    fn classify(bytes: &[u8]) -> Expect {
        match inspect(bytes) {
            Inspection::Malformed(_) => Expect::Drop,
            Inspection::Response => Expect::Response,
            Inspection::Refused { reply, rcode, .. } => {
                let parsed = Message::from_vec(&reply).expect("header reply parses");
                assert_eq!(parsed.id(), u16::from_be_bytes([bytes[0], bytes[1]]));
                assert_eq!(parsed.message_type(), MessageType::Response);
                assert_eq!(parsed.response_code(), rcode);
                assert_eq!(u8::from(parsed.op_code()), (bytes[2] >> 3) & 0x0f);
                Expect::Reply(rcode)
            }
            Inspection::Query(_) => Expect::Query,
        }
    }

    #[test]
    fn classification() {
        let q = || query_bytes("a.com.", RecordType::A, false);
        let edit = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = q();
            f(&mut b);
            b
        };
        let cases: Vec<(&str, Vec<u8>, Expect)> = vec![
            ("three bytes", vec![1, 2, 3], Expect::Drop),
            ("eleven bytes", vec![0; 11], Expect::Drop),
            ("a plain query", q(), Expect::Query),
            (
                "header only",
                edit(&|b| b.truncate(HEADER_LEN)),
                Expect::Reply(ResponseCode::FormErr),
            ),
            (
                "cut question",
                edit(&|b| b.truncate(b.len() - 3)),
                Expect::Reply(ResponseCode::FormErr),
            ),
            ("a response", edit(&|b| b[2] |= 0x80), Expect::Response),
            (
                "a response with opcode NOTIFY",
                edit(&|b| b[2] |= 0x80 | (4 << 3)),
                Expect::Response,
            ),
            (
                "opcode NOTIFY",
                edit(&|b| b[2] |= 4 << 3),
                Expect::Reply(ResponseCode::NotImp),
            ),
            (
                "opcode STATUS",
                edit(&|b| b[2] |= 2 << 3),
                Expect::Reply(ResponseCode::NotImp),
            ),
            (
                "opcode UPDATE",
                edit(&|b| b[2] |= 5 << 3),
                Expect::Reply(ResponseCode::NotImp),
            ),
            (
                "two questions",
                edit(&|b| b[5] = 2),
                Expect::Reply(ResponseCode::FormErr),
            ),
            (
                "no question",
                edit(&|b| b[5] = 0),
                Expect::Reply(ResponseCode::FormErr),
            ),
        ];
        for (what, bytes, expected) in cases {
            assert_eq!(classify(&bytes), expected, "{what}");
        }

        let mut odd = Message::new();
        odd.set_id(1).set_message_type(MessageType::Query);
        let name = Name::from_labels(vec![b"a b".as_slice(), b"com".as_slice()]).unwrap();
        odd.add_query(Question::query(name, RecordType::A));
        let odd = parse(&odd.to_vec().unwrap());
        assert_eq!(odd.name, None, "a label with a space is never matched");
        assert!(odd.class_in);
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for len in 0..600 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            if let Inspection::Refused { reply, .. } = inspect(&bytes) {
                assert_eq!(reply.len(), HEADER_LEN);
                assert_eq!(reply[2] & 0x80, 0x80, "a refusal is always a response");
            }
            let mut forced = bytes.clone();
            if forced.len() >= HEADER_LEN {
                forced[2] &= 0x07;
                forced[4] = 0;
                forced[5] = 1;
            }
            if let Inspection::Query(q) = inspect(&forced) {
                let _ = a_answer(&q, Ipv4Addr::LOCALHOST, 1);
                let _ = nodata_answer(&q, "x.com", 1);
            }
        }
    }
}
