//! The fast path of the commonest query: one question of type A or AAAA,
//! class IN, for a plain host name, with at most an EDNS OPT record. It is
//! read and answered straight from the wire, without building hickory
//! messages; anything else (and any answer that would not fit the client's
//! UDP size) goes the general way through [`crate::dns`]. The answers are
//! byte for byte those of the general path (tested on a table of queries
//! and by the `dns_message` fuzz target).

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::dns::{EDNS_PAYLOAD, MIN_UDP_SIZE};

const HEADER_LEN: usize = 12;
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;

/// A query the fast path can answer.
#[derive(Debug)]
pub struct FastQuery<'a> {
    bytes: &'a [u8],
    /// End of the question section.
    question_end: usize,
    /// The question name, normalised like the general path's.
    pub name: String,
    /// A or AAAA.
    pub qtype: u16,
    /// The client's EDNS: its DO bit, when it sent an OPT record.
    edns_do: Option<bool>,
    /// The largest UDP answer the client accepts.
    max_udp_size: usize,
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*bytes.get(at)?, *bytes.get(at + 1)?]))
}

/// Reads `bytes` as a query the fast path answers; `None` for anything
/// else (the general path then decides).
pub fn parse(bytes: &[u8]) -> Option<FastQuery<'_>> {
    if bytes.len() < HEADER_LEN
        || bytes[2] & 0xf8 != 0 // QR=0, opcode 0
        || u16_at(bytes, 4)? != 1
        || u16_at(bytes, 6)? != 0
        || u16_at(bytes, 8)? != 0
        || u16_at(bytes, 10)? > 1
    {
        return None;
    }
    // The name: plain labels of letters, digits, '-' and '_', no
    // compression, written with a trailing dot as the general path does.
    let mut at = HEADER_LEN;
    let mut text = String::with_capacity(64);
    loop {
        let len = usize::from(*bytes.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        let label = bytes.get(at..at + len)?;
        if !label
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
        {
            return None;
        }
        text.push_str(std::str::from_utf8(label).ok()?);
        text.push('.');
        at += len;
    }
    if text.is_empty() || at - HEADER_LEN > 255 {
        return None;
    }
    let qtype = u16_at(bytes, at)?;
    if !(qtype == TYPE_A || qtype == TYPE_AAAA) || u16_at(bytes, at + 2)? != CLASS_IN {
        return None;
    }
    let question_end = at + 4;
    let name = crate::matcher::normalize(&text)?;
    let (edns_do, max_udp_size) = if u16_at(bytes, 10)? == 1 {
        // The OPT record: root owner, type 41, class = payload size, TTL =
        // extended rcode, version 0, flags; options are read past.
        let opt = question_end;
        if *bytes.get(opt)? != 0 || u16_at(bytes, opt + 1)? != TYPE_OPT {
            return None;
        }
        let payload = u16_at(bytes, opt + 3)?;
        let (ext_rcode, version) = (*bytes.get(opt + 5)?, *bytes.get(opt + 6)?);
        let flags = u16_at(bytes, opt + 7)?;
        let rdlength = usize::from(u16_at(bytes, opt + 9)?);
        // Options (a cookie, say) are not echoed: the general path does
        // not echo them either. They must be well formed as the general
        // path reads them (it refuses a malformed one with FORMERR); a
        // client subnet option, which it parses, is left to it.
        if ext_rcode != 0 || version != 0 || opt + 11 + rdlength != bytes.len() {
            return None;
        }
        let mut option = opt + 11;
        while option < bytes.len() {
            let code = u16_at(bytes, option)?;
            let len = usize::from(u16_at(bytes, option + 2)?);
            if code == 8 || option + 4 + len > bytes.len() {
                return None;
            }
            option += 4 + len;
        }
        (
            Some(flags & 0x8000 != 0),
            usize::from(payload).max(MIN_UDP_SIZE),
        )
    } else {
        if question_end != bytes.len() {
            return None;
        }
        (None, MIN_UDP_SIZE)
    };
    Some(FastQuery {
        bytes,
        question_end,
        name,
        qtype,
        edns_do,
        max_udp_size,
    })
}

impl FastQuery<'_> {
    /// The authoritative answer with one record of `rdata` (4 bytes for A,
    /// 16 for AAAA); `None` when it would not fit the client's UDP size
    /// (the general path then sends a truncated answer).
    fn answer(&self, rdata: &[u8], ttl: u32, udp: bool) -> Option<Vec<u8>> {
        let q = self.bytes;
        let mut out = Vec::with_capacity(self.question_end + 16 + rdata.len() + 11);
        out.extend_from_slice(&q[..2]);
        // QR=1, opcode 0, AA=1, TC=0, RD as asked.
        out.push(0x84 | (q[2] & 0x01));
        // RA=1, Z=0, AD=0, CD as asked, NOERROR.
        out.push(0x80 | (q[3] & 0x10));
        out.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, u8::from(self.edns_do.is_some())]);
        out.extend_from_slice(&q[HEADER_LEN..self.question_end]);
        // The owner: a pointer to the question's name.
        out.extend_from_slice(&[0xc0, 0x0c]);
        out.extend_from_slice(&self.qtype.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        out.extend_from_slice(rdata);
        if let Some(dnssec_ok) = self.edns_do {
            out.push(0);
            out.extend_from_slice(&TYPE_OPT.to_be_bytes());
            out.extend_from_slice(&EDNS_PAYLOAD.to_be_bytes());
            out.extend_from_slice(&[0, 0, if dnssec_ok { 0x80 } else { 0 }, 0, 0, 0]);
        }
        (!udp || out.len() <= self.max_udp_size).then_some(out)
    }

    /// The answer `name → vip` for an A query (`udp`: `None` when it
    /// exceeds the client's UDP size).
    pub fn a_answer(&self, vip: Ipv4Addr, ttl: u32, udp: bool) -> Option<Vec<u8>> {
        self.answer(&vip.octets(), ttl, udp)
    }

    /// The answer `name → vip` for an AAAA query.
    pub fn aaaa_answer(&self, vip: Ipv6Addr, ttl: u32, udp: bool) -> Option<Vec<u8>> {
        self.answer(&vip.octets(), ttl, udp)
    }
}

#[cfg(test)]
mod tests {
    use hickory_proto::rr::RecordType;

    use super::*;
    use crate::dns::{self, tests::query_bytes, Inspection};

    /// (name, type, EDNS, header tweak) → the fast answer equals the
    /// general path's, byte for byte.
    #[test]
    fn fast_answers_equal_the_general_path() {
        let vip = Ipv4Addr::new(10, 10, 0, 7);
        let vip6: Ipv6Addr = "fd00:6a7e::a0a:7".parse().unwrap();
        // The tweak gets the query and the offset of its OPT record (the
        // end of the question).
        type Tweak = fn(&mut Vec<u8>, usize);
        let cases: &[(&str, RecordType, bool, Tweak)] = &[
            ("one.s3.aws.com.", RecordType::A, false, |_, _| {}),
            ("One.S3.AWS.com.", RecordType::A, false, |_, _| {}),
            ("one.s3.aws.com.", RecordType::A, true, |_, _| {}),
            ("x-1_y.example.com.", RecordType::AAAA, true, |_, _| {}),
            ("one.s3.aws.com.", RecordType::A, false, |q, _| {
                q[2] &= !0x01
            }), // RD off
            ("one.s3.aws.com.", RecordType::A, true, |q, _| q[3] |= 0x10), // CD on
            ("one.s3.aws.com.", RecordType::A, true, |q, opt| {
                q[opt + 7] &= 0x7f
            }), // DO off
            ("one.s3.aws.com.", RecordType::A, true, |q, opt| {
                q[opt + 3] = 0x01; // payload 256: the answer still fits 512
                q[opt + 4] = 0x00;
            }),
            ("one.s3.aws.com.", RecordType::A, true, |q, opt| {
                // No options.
                q.truncate(opt + 11);
                q[opt + 9] = 0;
                q[opt + 10] = 0;
            }),
        ];
        for (name, qtype, edns, tweak) in cases {
            let mut bytes = query_bytes(name, *qtype, *edns);
            let opt = 12 + name.len() + 1 + 4;
            tweak(&mut bytes, opt);
            let fast = parse(&bytes).unwrap_or_else(|| panic!("{name} {qtype:?} not fast"));
            let Inspection::Query(general) = dns::inspect(&bytes) else {
                panic!("{name} is no query");
            };
            assert_eq!(Some(fast.name.clone()), general.name, "{name}");
            let (fast_answer, general_answer) = if *qtype == RecordType::AAAA {
                (
                    fast.aaaa_answer(vip6, 300, true),
                    dns::aaaa_answer(&general, vip6, 300),
                )
            } else {
                (
                    fast.a_answer(vip, 300, true),
                    dns::a_answer(&general, vip, 300),
                )
            };
            let general_answer = dns::fit_udp(&general, general_answer.unwrap()).unwrap();
            assert_eq!(
                fast_answer.unwrap(),
                general_answer,
                "{name} {qtype:?} edns={edns}"
            );
        }
    }

    /// Queries the fast path leaves to the general one.
    #[test]
    fn anything_unusual_takes_the_general_path() {
        let plain = query_bytes("one.s3.aws.com.", RecordType::A, false);
        let cases: &[(&str, Vec<u8>)] = &[
            ("MX", query_bytes("one.s3.aws.com.", RecordType::MX, false)),
            ("a response", {
                let mut q = plain.clone();
                q[2] |= 0x80;
                q
            }),
            ("opcode 2", {
                let mut q = plain.clone();
                q[2] |= 0x10;
                q
            }),
            ("two questions", {
                let mut q = plain.clone();
                q[5] = 2;
                q
            }),
            ("an answer section", {
                let mut q = plain.clone();
                q[7] = 1;
                q
            }),
            ("trailing bytes", {
                let mut q = plain.clone();
                q.push(0);
                q
            }),
            ("class CH", {
                let mut q = plain.clone();
                let n = q.len();
                q[n - 1] = 3;
                q
            }),
            (
                "a space in a label",
                query_bytes("one.s3.aws.com.", RecordType::A, false)
                    .into_iter()
                    .map(|b| if b == b'n' { b' ' } else { b })
                    .collect(),
            ),
            ("truncated", plain[..plain.len() - 3].to_vec()),
            ("an OPT option cut short", {
                let mut q = query_bytes("one.s3.aws.com.", RecordType::A, true);
                let n = q.len();
                q.truncate(n - 3); // 12-byte option → 9 bytes left of it
                let opt = 12 + 16 + 4;
                q[opt + 10] -= 3;
                q
            }),
            ("an OPT option of 3 bytes", {
                let mut q = query_bytes("one.s3.aws.com.", RecordType::A, true);
                let opt = 12 + 16 + 4;
                q.truncate(opt + 11);
                q.extend_from_slice(&[0, 10, 0]);
                q[opt + 10] = 3;
                q
            }),
            ("a client subnet option", {
                let mut q = query_bytes("one.s3.aws.com.", RecordType::A, true);
                let opt = 12 + 16 + 4;
                q.truncate(opt + 11);
                q.extend_from_slice(&[0, 8, 0, 4, 0, 3, 0, 0]);
                q[opt + 10] = 8;
                q
            }),
            ("header only", plain[..12].to_vec()),
        ];
        for (what, bytes) in cases {
            assert!(parse(bytes).is_none(), "{what} must take the general path");
        }
    }
}
