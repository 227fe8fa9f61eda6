#!/usr/bin/env python3
"""Sends several DNS queries over ONE TCP connection in a single write
(pipelined, RFC 7766 §6.2.1.1) and reads one answer per query, in
whatever order they come back; the tests use it to show that the
gateway's DNS-over-TCP listener answers matched names itself and relays
the others to the fallback without mixing the frames up.

  tcp_pipeline.py SERVER:PORT NAME[/TYPE] [NAME[/TYPE] ...]

Prints one JSON line per answer: {"id", "name", "rcode", "answers": [...]}
(A and AAAA as text, other types as their type number). Exit 0 when every
query got exactly one answer with its ID, 1 otherwise. 10 s at most.
"""
import ipaddress
import json
import random
import socket
import struct
import sys

TYPES = {"A": 1, "AAAA": 28, "MX": 15, "TXT": 16, "SRV": 33}


def query(qid, name, qtype):
    header = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.strip(".").split(".")) + b"\0"
    return header + qname + struct.pack(">HH", qtype, 1)


def skip_name(msg, at):
    while True:
        n = msg[at]
        if n & 0xC0 == 0xC0:
            return at + 2
        at += 1 + n
        if n == 0:
            return at


def parse(msg):
    qid, flags, qd, an = struct.unpack(">HHHH", msg[:8])
    at = 12
    for _ in range(qd):
        at = skip_name(msg, at) + 4
    answers = []
    for _ in range(an):
        at = skip_name(msg, at)
        rtype, _, _, rdlen = struct.unpack(">HHIH", msg[at:at + 10])
        rdata = msg[at + 10:at + 10 + rdlen]
        at += 10 + rdlen
        if rtype == 1:
            answers.append(str(ipaddress.IPv4Address(rdata)))
        elif rtype == 28:
            answers.append(str(ipaddress.IPv6Address(rdata)))
        else:
            answers.append(rtype)
    return qid, flags & 0x0F, answers


def recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("connection closed early")
        data += chunk
    return data


def main():
    if len(sys.argv) < 3:
        sys.stderr.write(__doc__)
        return 2
    host, port = sys.argv[1].rsplit(":", 1)
    asked = {}
    stream = b""
    for spec in sys.argv[2:]:
        name, _, qtype = spec.partition("/")
        qid = random.randrange(1, 65536)
        while qid in asked:
            qid = random.randrange(1, 65536)
        asked[qid] = name
        msg = query(qid, name, TYPES.get(qtype or "A", 1))
        stream += struct.pack(">H", len(msg)) + msg
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect((host.strip("[]"), int(port)))
    sock.sendall(stream)
    seen = set()
    ok = True
    for _ in asked:
        length = struct.unpack(">H", recv_exact(sock, 2))[0]
        qid, rcode, answers = parse(recv_exact(sock, length))
        ok &= qid in asked and qid not in seen
        seen.add(qid)
        print(json.dumps({"id": qid, "name": asked.get(qid), "rcode": rcode, "answers": answers}), flush=True)
    return 0 if ok and seen == set(asked) else 1


if __name__ == "__main__":
    sys.exit(main())
