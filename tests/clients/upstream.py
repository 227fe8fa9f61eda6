#!/usr/bin/env python3
"""An upstream HTTP CONNECT proxy (header names recorded lower-case) in the role of the seed's upstream_1.py /
upstream_2.py: it accepts CONNECT, records the target and headers (stdout
and, with --log, one JSON line per request in a file), answers 200, then
answers the tunnelled HTTP request itself with a body naming the cluster.

  upstream.py --name cluster_1 --port 18001 [--log FILE]
"""
import argparse
import json
import socketserver
from http.server import BaseHTTPRequestHandler, HTTPServer


def make_handler(name, log_path):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):
            pass

        def do_CONNECT(self):
            headers = {k.lower(): v for k, v in self.headers.items()}
            record = {"cluster": name, "connect": self.path, "headers": headers}
            print(f"{name}: CONNECT {self.path} {json.dumps(headers)}", flush=True)
            if log_path:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            self.send_response(200)
            self.end_headers()
            self.wfile.flush()
            # Long enough for a test to hold a tunnel open across a reload.
            self.connection.settimeout(30)
            try:
                self.connection.recv(4096)
            except OSError:
                return
            body = f"{name}\nCONNECT: {self.path}\n" + "".join(f"{k}: {v}\n" for k, v in headers.items())
            response = (
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                f"X-Upstream: {name}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}"
            )
            self.connection.sendall(response.encode())
            self.close_connection = True

    return Handler


class Server(socketserver.ThreadingMixIn, HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--log")
    a = p.parse_args()
    server = Server((a.host, a.port), make_handler(a.name, a.log))
    print(f"{a.name}: listening on {a.host}:{a.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
