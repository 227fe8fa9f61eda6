#!/usr/bin/env python3
"""Sends the very same hand-built DNS query bytes over UDP to a server
directly and to an address the kernel redirects to the gateway, and reports
whether the two replies are byte-identical (the gateway must pass through
what it does not own untouched, DNSSEC/EDNS included).

  dns_compare.py --direct IP:PORT --via IP:PORT --name NAME --type A [--type MX ...]

Types: A AAAA MX TXT SRV HTTPS(65) PTR ... or a number. Each query has one
random ID (fixed for the run), RD=1 and one EDNS0 OPT record (UDP size
1232, DO=1). Each side gets its own unconnected socket (recvfrom, so a
redirected reply's source address is visible), 3 s timeout, 2 tries.
One JSON line per type:
  {"type", "qtype", "direct_hex", "via_hex", "identical", "rcode",
   "ancount", "has_opt", "direct_reply_from", "via_reply_from", "from_ok"}
rcode/ancount/has_opt describe the via reply (the direct one if via is
missing); *_hex and *_reply_from ("IP:PORT", "[IPv6]:PORT") are null when
no reply came. from_ok: each reply came from exactly the address it was sent
to. Note a server that rotates RRsets (dnsmasq does) makes multi-record
answers differ between two asks even without a gateway in between.
Exit 0 if every pair is byte-identical and from_ok, 1 otherwise.
"""
import argparse
import json
import random
import socket
import struct

TYPES = {"A": 1, "NS": 2, "CNAME": 5, "SOA": 6, "PTR": 12, "MX": 15, "TXT": 16,
         "AAAA": 28, "SRV": 33, "DS": 43, "DNSKEY": 48, "SVCB": 64, "HTTPS": 65,
         "ANY": 255, "CAA": 257}


def fmt(addr):
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


def endpoint(text):
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    return (host, int(port)), (socket.AF_INET6 if ":" in host else socket.AF_INET)


def build_query(qid, name, qtype):
    header = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 1)  # RD, QD=1, AR=1
    labels = [l for l in name.rstrip(".").split(".") if l]
    qname = b"".join(bytes([len(l)]) + l.encode() for l in labels) + b"\0"
    opt = b"\0" + struct.pack(">HHIH", 41, 1232, 0x00008000, 0)  # OPT, size, DO
    return header + qname + struct.pack(">HH", qtype, 1) + opt


def skip_name(msg, i):
    while True:
        n = msg[i]
        if n & 0xC0 == 0xC0:
            return i + 2
        if n == 0:
            return i + 1
        i += 1 + n


def summary(msg):
    """(rcode, ancount, has_opt) of a reply; has_opt None if unparsable."""
    qid, flags, qd, an, ns, ar = struct.unpack(">HHHHHH", msg[:12])
    try:
        i = 12
        for _ in range(qd):
            i = skip_name(msg, i) + 4
        has_opt = False
        for k in range(an + ns + ar):
            i = skip_name(msg, i)
            rtype, _, _, rdlen = struct.unpack(">HHIH", msg[i:i + 10])
            has_opt |= k >= an + ns and rtype == 41
            i += 10 + rdlen
    except (IndexError, struct.error):
        has_opt = None
    return flags & 0xF, an, has_opt


def ask(target, family, query):
    """Returns (reply bytes, "ip:port" it came from) or (None, None)."""
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.settimeout(3.0)
    try:
        for _ in range(2):
            s.sendto(query, target)
            try:
                while True:
                    data, src = s.recvfrom(65535)
                    if data[:2] == query[:2]:
                        return data, fmt(src)
            except socket.timeout:
                continue
    finally:
        s.close()
    return None, None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--direct", required=True)
    p.add_argument("--via", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--type", action="append", required=True)
    a = p.parse_args()
    direct, dfam = endpoint(a.direct)
    via, vfam = endpoint(a.via)
    qid = random.randrange(1, 0x10000)
    ok = True
    for t in a.type:
        qtype = int(t) if t.isdigit() else TYPES[t.upper()]
        query = build_query(qid, a.name, qtype)
        d, dfrom = ask(direct, dfam, query)
        v, vfrom = ask(via, vfam, query)
        ref = v if v is not None else d
        rcode, ancount, has_opt = summary(ref) if ref is not None else (None, None, None)
        identical = d is not None and d == v
        from_ok = dfrom == fmt(direct) and vfrom == fmt(via)
        ok &= identical and from_ok
        print(json.dumps({
            "type": t, "qtype": qtype,
            "direct_hex": d.hex() if d is not None else None,
            "via_hex": v.hex() if v is not None else None,
            "identical": identical, "rcode": rcode, "ancount": ancount, "has_opt": has_opt,
            "direct_reply_from": dfrom, "via_reply_from": vfrom, "from_ok": from_ok,
        }), flush=True)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
