//! DNS wire format: classifying queries and building answers (hickory-proto).
//!
//! Every answer echoes the query's ID, question and RD bit and sets QR, AA
//! and RA. An EDNS OPT record in the query is answered with an OPT record
//! (version 0, the query's DO bit, a 1232-byte payload size). Negative
//! answers (NODATA) carry the zone's SOA in the authority section, its TTL
//! and MINIMUM being the configured TTL (RFC 2308).

use std::net::Ipv4Addr;

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, ResponseCode},
    rr::{
        rdata::{A, SOA},
        DNSClass, Name, RData, Record, RecordType,
    },
};

/// Size of the fixed DNS header.
const HEADER_LEN: usize = 12;

/// UDP payload size advertised in answers that carry EDNS.
pub const EDNS_PAYLOAD: u16 = 1232;

/// SOA MNAME of negative answers.
pub const SOA_MNAME: &str = "ns.dns-gateway.invalid.";

/// SOA RNAME of negative answers.
pub const SOA_RNAME: &str = "hostmaster.dns-gateway.invalid.";

/// What a datagram turned out to be.
#[derive(Debug)]
pub enum Inspection {
    /// Not a standard query with exactly one question (a response, another
    /// opcode, zero or several questions): left to the next filter.
    NotStandard(String),
    /// Not parseable as a DNS message.
    Malformed(String),
    /// A standard query with one question.
    Query(Query),
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
    if flags & 0x80 != 0 {
        return Inspection::NotStandard("a response (QR set)".to_owned());
    }
    if opcode != 0 {
        return Inspection::NotStandard(format!("opcode {opcode}"));
    }
    if qdcount != 1 {
        return Inspection::NotStandard(format!("{qdcount} questions"));
    }
    let message = match Message::from_vec(bytes) {
        Ok(message) => message,
        Err(e) => return Inspection::Malformed(e.to_string()),
    };
    let Some(question) = message.queries().first() else {
        return Inspection::Malformed("no question after parsing".to_owned());
    };
    let qtype = question.query_type();
    let class_in = question.query_class() == DNSClass::IN;
    let name = crate::matcher::normalize(&question.name().to_ascii());
    Inspection::Query(Query {
        message,
        name,
        qtype,
        class_in,
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

    #[test]
    fn classification() {
        assert!(matches!(inspect(&[1, 2, 3]), Inspection::Malformed(_)));
        let mut header_only = query_bytes("a.com.", RecordType::A, false);
        header_only.truncate(HEADER_LEN);
        assert!(matches!(inspect(&header_only), Inspection::Malformed(_)));
        let mut cut = query_bytes("a.com.", RecordType::A, false);
        cut.truncate(cut.len() - 3);
        assert!(matches!(inspect(&cut), Inspection::Malformed(_)));

        let mut response = query_bytes("a.com.", RecordType::A, false);
        response[2] |= 0x80;
        assert!(matches!(inspect(&response), Inspection::NotStandard(_)));
        let mut notify = query_bytes("a.com.", RecordType::A, false);
        notify[2] |= 4 << 3;
        assert!(matches!(inspect(&notify), Inspection::NotStandard(_)));
        let mut two = query_bytes("a.com.", RecordType::A, false);
        two[5] = 2;
        assert!(matches!(inspect(&two), Inspection::NotStandard(_)));

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
            let _ = inspect(&bytes);
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
