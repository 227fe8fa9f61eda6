#!/usr/bin/env python3
"""Watches the far end of the test namespace's "uplink" (a veth pair whose
near end carries the default route) and records every IPv4 packet that
would have left the machine: its destination, and for DNS to port 53 the
name asked. The chaos soak counts from it what escaped the gateway.
Writes its JSON summary to OUT on SIGTERM.

  uplink_watch.py IFACE OUT
"""
import json
import signal
import socket
import struct
import sys


def qname(payload):
    at, labels = 12, []
    while at < len(payload) and payload[at] != 0 and len(labels) < 64:
        n = payload[at]
        labels.append(payload[at + 1:at + 1 + n].decode(errors="replace"))
        at += 1 + n
    return ".".join(labels)


def main():
    iface, out = sys.argv[1], sys.argv[2]
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
    s.bind((iface, 0))
    seen = {"packets": 0, "destinations": {}, "dns_names": {}}

    def finish(*_):
        with open(out, "w") as f:
            json.dump(seen, f)
        sys.exit(0)

    signal.signal(signal.SIGTERM, finish)
    with open(out, "w") as f:
        json.dump(seen, f)
    while True:
        frame = s.recv(65535)
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        proto, dst = ip[9], socket.inet_ntoa(ip[16:20])
        seen["packets"] += 1
        seen["destinations"][dst] = seen["destinations"].get(dst, 0) + 1
        if proto == 17 and len(ip) >= ihl + 8:
            dport = struct.unpack(">H", ip[ihl + 2:ihl + 4])[0]
            if dport == 53:
                name = qname(ip[ihl + 8:])
                seen["dns_names"][name] = seen["dns_names"].get(name, 0) + 1


if __name__ == "__main__":
    main()
