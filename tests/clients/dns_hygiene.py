#!/usr/bin/env python3
"""Sends hostile and odd DNS datagrams to a server and reports, as one JSON
line, what came back: a response (QR=1) sent to the server, other opcodes,
a flood of new names, and a known name after the flood.

  dns_hygiene.py --server HOST:PORT --zone aws.com --known NAME --flood N
"""
import argparse
import json
import random
import socket
import struct


def query(name, qid, opcode=0, qr=0):
    flags = (qr << 15) | (opcode << 11) | 0x0100  # RD
    header = struct.pack(">HHHHHH", qid, flags, 1, 0, 0, 0)
    qname = b"".join(bytes([len(l)]) + l.encode() for l in name.rstrip(".").split(".")) + b"\0"
    return header + qname + struct.pack(">HH", 1, 1)


def ask(sock, server, datagram, timeout):
    sock.settimeout(timeout)
    sock.sendto(datagram, server)
    try:
        data, _ = sock.recvfrom(4096)
    except socket.timeout:
        return None
    qid, flags, qd, an = struct.unpack(">HHHH", data[:8])
    answer = None
    if an and len(data) >= 4:
        answer = ".".join(str(b) for b in data[-4:])
    return {"id": qid, "qr": flags >> 15, "opcode": (flags >> 11) & 0xF, "rcode": flags & 0xF, "answer": answer}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--server", required=True)
    p.add_argument("--zone", required=True)
    p.add_argument("--known", required=True)
    p.add_argument("--flood", type=int, default=50)
    a = p.parse_args()
    host, port = a.server.rsplit(":", 1)
    server = (host, int(port))
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    out = {}
    out["known_before"] = ask(s, server, query(a.known, 1), 2.0)
    out["response_reply"] = ask(s, server, query(a.known, 2, qr=1), 1.0)
    out["opcodes"] = {str(op): ask(s, server, query(a.known, 10 + op, opcode=op), 2.0) for op in (1, 2, 4, 5)}
    rcodes = {}
    tag = random.randrange(1 << 30)
    for i in range(a.flood):
        r = ask(s, server, query(f"flood-{tag}-{i}.{a.zone}", 100 + i), 2.0)
        key = "timeout" if r is None else str(r["rcode"])
        rcodes[key] = rcodes.get(key, 0) + 1
    out["flood_rcodes"] = rcodes
    out["known_after"] = ask(s, server, query(a.known, 3), 2.0)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
