#!/usr/bin/env python3
"""Checks that only the gateway's DNS listener can answer for a
nameserver: an unconnected UDP socket (as musl's resolver uses) sends a
query to NAMESERVER:53 (the kernel redirects it to the gateway), while
another socket bound on a free UDP port of the proxy's address (the TCP
listener's port, SPOOF_PORT) sends it a forged datagram. Prints the
source address each datagram appeared to come from, one JSON line each:
the gateway's answer must show the nameserver, the forged one its real
origin.

  spoof_check.py NAMESERVER PROXY_ADDR SPOOF_PORT NAME
"""
import json
import socket
import struct
import sys


def query(name):
    header = struct.pack(">HHHHHH", 0x5151, 0x0100, 1, 0, 0, 0)
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return header + qname + struct.pack(">HH", 1, 1)


def main():
    nameserver, proxy, spoof_port, name = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    family = socket.AF_INET6 if ":" in nameserver else socket.AF_INET
    victim = socket.socket(family, socket.SOCK_DGRAM)
    victim.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
    victim.settimeout(5)
    victim.sendto(query(name), (nameserver, 53))
    forger = socket.socket(socket.AF_INET6 if ":" in proxy else socket.AF_INET, socket.SOCK_DGRAM)
    forger.bind((proxy, spoof_port))
    port = victim.getsockname()[1]
    target = "::1" if ":" in proxy else "127.0.0.1"
    forger.sendto(b"\x51\x51\x81\x80" + b"\0" * 8, (target, port))
    for _ in range(2):
        data, source = victim.recvfrom(4096)
        kind = "forged" if data[2:4] == b"\x81\x80" and len(data) == 12 else "answer"
        print(json.dumps({"kind": kind, "from": [source[0], source[1]]}), flush=True)


if __name__ == "__main__":
    main()
