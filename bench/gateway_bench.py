"""What the head's gateway (``node/gateway.py``) adds to a request. Prints numbers; asserts nothing.

    .venv/bin/python bench/gateway_bench.py [--requests 2000] [--locked]

An upstream HTTP/1.1 server (standard library, keep-alive) stands in for Ray Serve's proxy,
in a process of its own; the gateway runs in another, as on the head. One client sends the
same small request over one kept-alive connection, first straight to the upstream, then
through the gateway, and prints the latency percentiles of each and the hop (the difference
of the medians). Then a streamed answer of 256 events: events per second both ways.
``--locked`` puts the endpoint key in front (every request is checked).
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

UPSTREAM = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # as uvicorn (Serve's proxy): no 40 ms delayed-ACK stalls
    def do_GET(self):
        if self.path.startswith("/v1/stream"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(256):
                event = b'data: {"choices":[{"delta":{"content":"tok"}}]}\n\n'
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            return
        body = b'{"object":"list","data":[{"id":"m"}]}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass

server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""

GATEWAY = r"""
import sys, threading
from pathlib import Path
from ray_cml_provider.node.gateway import Gateway, Keys, RunningGateway, Upstream

upstream_port, key_file, locked = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
keys = Keys(Path(key_file), None, locked=locked)
gateway = Gateway(Upstream("127.0.0.1", upstream_port, "upstream"),
                  Upstream("127.0.0.1", upstream_port, "upstream"), keys, log=lambda m: None)
running = RunningGateway(gateway, "127.0.0.1", 0)
print(running.port, flush=True)
threading.Event().wait()
"""

KEY = "bench-endpoint-key-0123456789abcdef"


def start(code: str, *args: str) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True
    )
    return process, int(process.stdout.readline())


def latencies(port: int, n: int, headers: dict[str, str]) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port)
    out = []
    for i in range(n + 200):
        started = time.perf_counter()
        conn.request("GET", "/v1/models", headers=headers)
        answer = conn.getresponse()
        answer.read()
        assert answer.status == 200, answer.status
        if i >= 200:  # warm-up first
            out.append((time.perf_counter() - started) * 1000)
    conn.close()
    return out


def events_per_s(port: int, headers: dict[str, str], rounds: int = 20) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port)
    events = 0
    started = time.perf_counter()
    for _ in range(rounds):
        conn.request("GET", "/v1/stream", headers=headers)
        answer = conn.getresponse()
        events += answer.read().count(b"data: ")
    conn.close()
    return events / (time.perf_counter() - started)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--locked", action="store_true", help="require the endpoint key")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        key_file = str(Path(tmp) / "endpoint_key")
        Path(key_file).write_text(KEY)
        upstream, upstream_port = start(UPSTREAM)
        env_path = str(Path(__file__).resolve().parent.parent)
        os.environ["PYTHONPATH"] = os.pathsep.join([env_path, os.environ.get("PYTHONPATH", "")])
        gateway, gateway_port = start(
            GATEWAY, str(upstream_port), key_file, "1" if args.locked else "0"
        )
        headers = {"Authorization": f"Bearer {KEY}"}  # /v1 asks for the key in both modes
        try:
            direct = latencies(upstream_port, args.requests, headers)
            through = latencies(gateway_port, args.requests, headers)
            direct_events = events_per_s(upstream_port, headers)
            through_events = events_per_s(gateway_port, headers)
        finally:
            for process in (gateway, upstream):
                process.kill()
                process.wait()
    mode = "locked (endpoint key checked)" if args.locked else "behind CML's login"
    print(f"gateway hop, {args.requests} requests over one kept-alive connection, {mode}:")
    print(f"  {'':<18}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}")
    for name, values in (("direct", direct), ("through gateway", through)):
        print(f"  {name:<18}{pct(values, 50):9.3f}{pct(values, 90):9.3f}{pct(values, 99):9.3f}")
    print(f"  hop (p50 difference): {pct(through, 50) - pct(direct, 50):.3f} ms")
    print("streamed answer (256 server-sent events each):")
    print(f"  direct {direct_events:,.0f} events/s, through gateway {through_events:,.0f} events/s")


if __name__ == "__main__":
    main()
