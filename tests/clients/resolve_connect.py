#!/usr/bin/env python3
"""An unmodified Python application for the tests: it resolves a name with
the stdlib (libc getaddrinfo underneath), connects over TCP to the FIRST
address and does one plain HTTP/1.1 GET. Run inside a gated cgroup, it
shows what ordinary Python code gets from the gateway.

  resolve_connect.py inet NAME PORT     socket.getaddrinfo(AF_INET, SOCK_STREAM)
  resolve_connect.py unspec NAME PORT   socket.getaddrinfo(AF_UNSPEC, SOCK_STREAM)
  resolve_connect.py asyncio NAME PORT  loop.getaddrinfo + asyncio.open_connection

stdout, one item a line (same format as resolve_connect.c):
  addr IP / connected IP PORT (getpeername) / body: then the body bytes
  verbatim / error: REASON
Exit 0 on success, 2 if resolution fails, 3 if connect/HTTP fails; a
9 s watchdog thread (plus startup) keeps the whole run under 10 s.
"""
import asyncio
import os
import socket
import sys
import threading

phase = 2


def out(text):
    sys.stdout.buffer.write(text if isinstance(text, bytes) else text.encode())
    sys.stdout.buffer.flush()


def fail(code, reason):
    out(f"error: {reason}\n")
    sys.exit(code)


def on_timeout():
    # A thread, not SIGALRM: a Python signal handler cannot run while the
    # main thread is blocked inside libc getaddrinfo.
    os.write(1, b"error: timeout\n")
    os._exit(phase)


def report_addrs(infos):
    seen = []
    for info in infos:
        if info[4][0] not in seen:
            seen.append(info[4][0])
    out("".join(f"addr {a}\n" for a in seen))


def request(name):
    return f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode()


def body_of(response):
    end = response.find(b"\r\n\r\n")
    if end < 0:
        fail(3, "http: no end of headers in response" if response else "http: empty response")
    return response[end + 4:]


def sync_mode(family, name, port):
    global phase
    try:
        infos = socket.getaddrinfo(name, port, family, socket.SOCK_STREAM)
    except OSError as e:
        fail(2, f"getaddrinfo: {e}")
    report_addrs(infos)
    phase = 3
    fam, typ, proto, _, addr = infos[0]
    try:
        s = socket.socket(fam, typ, proto)
        s.settimeout(5)
        s.connect(addr)
        peer = s.getpeername()
        out(f"connected {peer[0]} {peer[1]}\n")
        s.sendall(request(name))
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
        s.close()
    except OSError as e:
        fail(3, f"tcp: {e}")
    out(b"body:\n" + body_of(b"".join(chunks)))


async def asyncio_mode(name, port):
    global phase
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except OSError as e:
        fail(2, f"getaddrinfo: {e}")
    report_addrs(infos)
    phase = 3
    try:
        reader, writer = await asyncio.open_connection(infos[0][4][0], port)
        peer = writer.get_extra_info("peername")
        out(f"connected {peer[0]} {peer[1]}\n")
        writer.write(request(name))
        await writer.drain()
        response = await reader.read()
        writer.close()
    except OSError as e:
        fail(3, f"tcp: {e}")
    out(b"body:\n" + body_of(response))


def main():
    if len(sys.argv) != 4 or sys.argv[1] not in ("inet", "unspec", "asyncio"):
        sys.stderr.write("usage: resolve_connect.py <inet|unspec|asyncio> NAME PORT\n")
        sys.exit(64)
    mode, name, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    watchdog = threading.Timer(9, on_timeout)  # + startup stays under 10 s
    watchdog.daemon = True
    watchdog.start()
    if mode == "asyncio":
        asyncio.run(asyncio_mode(name, port))
    else:
        sync_mode(socket.AF_INET if mode == "inet" else socket.AF_UNSPEC, name, port)


if __name__ == "__main__":
    main()
