#!/usr/bin/env python3
"""One worker of the chaos soak: resolves names through the system's
nameserver address (redirected to the gateway) with a hand-built query
over UDP, and opens connections to the VIPs it got, each carrying one HTTP
request whose answer (from the upstream proxy behind the tunnel) names the
cluster and the CONNECT target. A query or a connection refused or lost
while a part of the gateway restarts is retried, as a stub resolver or an
application would, within a budget. Prints one JSON summary line.

  chaos_client.py --server IP --queries N --connects M --seconds S \
      --matched name=cluster,… --unmatched name=answer,…
"""
import argparse
import json
import random
import socket
import struct
import time

RETRIES = 60          # per query or connection
RETRY_PAUSE = 0.1     # seconds between tries: a 6 s budget


def query(qid, name):
    header = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return header + qname + struct.pack(">HH", 1, 1)


def first_a(msg):
    qd, an = struct.unpack(">HH", msg[4:8])
    at = 12
    for _ in range(qd):
        while msg[at] != 0:
            if msg[at] & 0xC0 == 0xC0:
                at += 1
                break
            at += 1 + msg[at]
        at += 1 + 4
    for _ in range(an):
        if msg[at] & 0xC0 == 0xC0:
            at += 2
        else:
            while msg[at] != 0:
                at += 1 + msg[at]
            at += 1
        rtype, _, _, rdlen = struct.unpack(">HHIH", msg[at:at + 10])
        if rtype == 1 and rdlen == 4:
            return socket.inet_ntoa(msg[at + 10:at + 14])
        at += 10 + rdlen
    return None


def resolve(server, name, stats):
    for attempt in range(RETRIES):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(0.5)
        qid = random.randrange(65536)
        try:
            s.sendto(query(qid, name), (server, 53))
            while True:
                data, _ = s.recvfrom(2048)
                if struct.unpack(">H", data[:2])[0] == qid:
                    if attempt:
                        stats["dns_retried"] += 1
                    return first_a(data)
        except OSError:
            time.sleep(RETRY_PAUSE)
        finally:
            s.close()
    return None


def connect(vip, name, stats):
    for attempt in range(RETRIES):
        try:
            c = socket.create_connection((vip, 80), timeout=3)
            c.settimeout(3)
            c.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while True:
                chunk = c.recv(4096)
                if not chunk:
                    break
                data += chunk
            c.close()
            body = data.split(b"\r\n\r\n", 1)[-1].decode(errors="replace")
            if "CONNECT:" not in body:
                raise OSError("no tunnel answer")
            if attempt:
                stats["connect_retried"] += 1
            return body
        except OSError:
            time.sleep(RETRY_PAUSE)
    return None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--server", required=True)
    p.add_argument("--queries", type=int, required=True)
    p.add_argument("--connects", type=int, required=True)
    p.add_argument("--matched", required=True, help="name=cluster,…")
    p.add_argument("--unmatched", required=True, help="name=answer,…")
    p.add_argument("--seconds", type=float, default=0, help="spread the queries over this long")
    a = p.parse_args()
    pause = a.seconds / max(1, a.queries)
    matched = dict(x.split("=") for x in a.matched.split(","))
    unmatched = dict(x.split("=") for x in a.unmatched.split(","))
    stats = {"queries": 0, "answered": 0, "wrong_answer": 0, "unanswered": [],
             "connects": 0, "tunnelled": 0, "misrouted": [], "failed_connects": 0,
             "dns_retried": 0, "connect_retried": 0}
    vips = {}
    connects_every = max(1, a.queries // max(1, a.connects))
    for i in range(a.queries):
        if pause:
            time.sleep(pause)
        if random.random() < 0.5:
            name = random.choice(list(unmatched))
            got = resolve(a.server, name, stats)
            stats["queries"] += 1
            if got is None:
                stats["unanswered"].append(name)
            elif got != unmatched[name]:
                stats["wrong_answer"] += 1
            else:
                stats["answered"] += 1
        else:
            name = random.choice(list(matched))
            got = resolve(a.server, name, stats)
            stats["queries"] += 1
            if got is None:
                stats["unanswered"].append(name)
                continue
            stats["answered"] += 1
            if vips.setdefault(name, got) != got:
                stats["wrong_answer"] += 1
        if i % connects_every == 0 and stats["connects"] < a.connects:
            name = random.choice(list(matched))
            vip = vips.get(name) or resolve(a.server, name, stats)
            if vip is None:
                continue
            vips[name] = vip
            stats["connects"] += 1
            body = connect(vip, name, stats)
            if body is None:
                stats["failed_connects"] += 1
            elif body.splitlines()[0] != matched[name] or f"CONNECT: {name}:80" not in body:
                stats["misrouted"].append(body[:200])
            else:
                stats["tunnelled"] += 1
    stats["unanswered"] = stats["unanswered"][:20]
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
