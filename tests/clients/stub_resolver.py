#!/usr/bin/env python3
"""A stub DNS resolver for names the gateway does not own (the fallback),
over UDP and TCP on one port: A records from --record NAME=IP, NXDOMAIN
for everything else, NODATA for other types of known names. With --log,
every query it answers is appended to FILE as one JSON line
{"name", "type", "proto": "udp"|"tcp"}, before the answer is sent.

  stub_resolver.py --port 5353 --record github.com=192.0.2.10 [--log FILE]
"""
import argparse
import json
import socket
import socketserver
import struct
import threading


def parse_question(msg):
    """Returns (qname, qtype, end offset of the question) or None."""
    if len(msg) < 12 or struct.unpack("!H", msg[4:6])[0] != 1:
        return None
    labels, i = [], 12
    while i < len(msg):
        n = msg[i]
        if n == 0:
            i += 1
            break
        if n & 0xC0 or i + 1 + n > len(msg):
            return None
        labels.append(msg[i + 1:i + 1 + n].decode("ascii", "replace").lower())
        i += 1 + n
    if i + 4 > len(msg):
        return None
    qtype = struct.unpack("!H", msg[i:i + 2])[0]
    return ".".join(labels), qtype, i + 4


def answer(msg, records):
    q = parse_question(msg)
    if q is None:
        return None
    name, qtype, end = q
    qid = msg[:2]
    rd = msg[2] & 0x01
    question = msg[12:end]
    ip = records.get(name)
    if ip is None:
        flags = struct.pack("!BB", 0x80 | rd, 0x80 | 3)  # NXDOMAIN
        return qid + flags + struct.pack("!HHHH", 1, 0, 0, 0) + question
    flags = struct.pack("!BB", 0x84 | rd, 0x80)
    if qtype != 1:
        return qid + flags + struct.pack("!HHHH", 1, 0, 0, 0) + question
    rr = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(ip)
    return qid + flags + struct.pack("!HHHH", 1, 1, 0, 0) + question + rr


_log_lock = threading.Lock()


def log_query(log_path, msg, proto):
    """Appends the question of `msg` to `log_path` (if any) as a JSON line."""
    if not log_path:
        return
    q = parse_question(msg)
    if q is None:
        return
    record = {"name": q[0], "type": q[1], "proto": proto}
    with _log_lock, open(log_path, "a") as f:
        f.write(json.dumps(record) + "\n")


def serve_udp(sock, records, log_path):
    while True:
        msg, src = sock.recvfrom(4096)
        reply = answer(msg, records)
        if reply:
            log_query(log_path, msg, "udp")
            sock.sendto(reply, src)


def make_tcp_handler(records, log_path):
    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            while True:
                head = self.request.recv(2)
                if len(head) < 2:
                    return
                n = struct.unpack("!H", head)[0]
                msg = b""
                while len(msg) < n:
                    chunk = self.request.recv(n - len(msg))
                    if not chunk:
                        return
                    msg += chunk
                reply = answer(msg, records)
                if reply:
                    log_query(log_path, msg, "tcp")
                    self.request.sendall(struct.pack("!H", len(reply)) + reply)

    return Handler


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--record", action="append", default=[])
    p.add_argument("--log")
    a = p.parse_args()
    records = dict(r.lower().split("=", 1) for r in a.record)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((a.host, a.port))
    threading.Thread(target=serve_udp, args=(udp, records, a.log), daemon=True).start()
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer.daemon_threads = True
    tcp = socketserver.ThreadingTCPServer((a.host, a.port), make_tcp_handler(records, a.log))
    print(f"stub resolver on {a.host}:{a.port} (udp+tcp): {records}", flush=True)
    tcp.serve_forever()


if __name__ == "__main__":
    main()
