#!/usr/bin/env python3
"""A TCP client that binds a chosen local port first (as an attacker
reusing a victim's port would), connects, optionally sends a line, and
reports what happened as one JSON line.

  bound_client.py --bind-port P --connect HOST:PORT [--send TEXT]
                  [--timeout S] [--retry-seconds S]
"""
import argparse
import errno
import json
import socket
import time


def attempt(a, host, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.settimeout(a.timeout)
    s.bind(("0.0.0.0", a.bind_port))
    s.connect((host, port))
    local = s.getsockname()
    if a.send:
        s.sendall(a.send.encode().decode("unicode_escape").encode())
    received = b""
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            received += chunk
    except socket.timeout:
        pass
    except OSError:
        pass
    s.close()
    return {"connected": True, "local": f"{local[0]}:{local[1]}", "received": received.decode(errors="replace")}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bind-port", type=int, required=True)
    p.add_argument("--connect", required=True)
    p.add_argument("--send", default="")
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--retry-seconds", type=float, default=0.0)
    a = p.parse_args()
    host, port = a.connect.rsplit(":", 1)
    deadline = time.monotonic() + a.retry_seconds
    while True:
        try:
            result = attempt(a, host, int(port))
            break
        except OSError as e:
            retriable = e.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL)
            if retriable and time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            result = {"connected": False, "error": f"{type(e).__name__}: {e}", "errno": e.errno}
            break
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
