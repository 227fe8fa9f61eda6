#!/usr/bin/env python3
"""An unmodified-application stand-in for the tests: plain socket calls,
one JSON line of what the application saw per probe.

  probe.py tcp HOST PORT            connect, send "ping", read the reply
  probe.py udp-sendto HOST PORT     sendto, recvfrom
  probe.py udp-connected HOST PORT  connect, send, recv, getpeername
"""
import json
import socket
import sys

TIMEOUT = 3.0


def tcp(host, port):
    s = socket.create_connection((host, port), timeout=TIMEOUT)
    peer, local = s.getpeername(), s.getsockname()
    s.sendall(b"ping")
    reply = s.recv(100).decode(errors="replace")
    return {"peer": f"{peer[0]}:{peer[1]}", "local": f"{local[0]}:{local[1]}", "reply": reply}


def udp_sendto(host, port):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(TIMEOUT)
    u.sendto(b"query", (host, port))
    data, src = u.recvfrom(512)
    return {"reply": data.decode(errors="replace"), "from": f"{src[0]}:{src[1]}"}


def udp_connected(host, port):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(TIMEOUT)
    u.connect((host, port))
    u.send(b"query")
    data, src = u.recvfrom(512)
    peer = u.getpeername()
    return {"reply": data.decode(errors="replace"), "from": f"{src[0]}:{src[1]}", "peer": f"{peer[0]}:{peer[1]}"}


def main():
    kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    probes = {"tcp": tcp, "udp-sendto": udp_sendto, "udp-connected": udp_connected}
    try:
        result = probes[kind](host, port)
        result["ok"] = True
    except OSError as e:
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
