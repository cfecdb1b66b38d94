"""What the head's ``/metrics`` costs the head. Prints numbers; asserts nothing.

    .venv/bin/python bench/metrics_bench.py [--workers 3] [--scrapes 20] [--every-s 15]

The gateway runs in a process of its own, as on the head, with ``/metrics`` over exports
that stand in for a cluster's (measured on the emulator with the echo app: the head's
agent exports ~520 kB, each worker's ~180 kB, plus the autoscaler's and the dashboard's;
``--workers`` sets how many workers). One scraper asks ``/metrics`` ``--scrapes`` times;
the gateway process's CPU time per scrape (``/proc/<pid>/stat``) becomes its share of one
core when a Prometheus scrapes every ``--every-s`` seconds. The target is under 2%. (The
gateway spaces fetches to a quarter of a core and keeps each for at least 0.1 s, giving the
newest answer in between: each scrape here waits for the next fetch.) Then ``/metrics`` as
a lever: 8 callers of ``/v1`` (an upstream standing in for Serve) for ``--load-s`` seconds,
alone and while one scraper asks ``/metrics`` in a loop: their p50, and the gateway's share
of a core meanwhile.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from gateway_bench import UPSTREAM  # Serve's stand-in (this folder is on sys.path)

from ray_cml_provider.figures import FAMILIES, SCRAPE_EVERY_S

EXPORTER = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

node, size_kb = sys.argv[1], int(sys.argv[2])
lines = [
    "# TYPE ray_node_cpu_utilization gauge\n",
    f'ray_node_cpu_utilization{{NodeAddress="{node}"}} 12.5\n',
    "# TYPE ray_serve_deployment_request_counter_total counter\n",
    f'ray_serve_deployment_request_counter_total{{application="a",deployment="D"}} 42\n',
]
i = 0
while sum(map(len, lines)) < size_kb * 1024:
    family = f"ray_bench_family_{i % 400}"
    lines.append(f"# HELP {family} A figure.\n# TYPE {family} gauge\n")
    for j in range(8):
        lines.append(f'{family}{{Component="raylet",NodeAddress="{node}",le="{j}"}} {i * 1.5}\n')
    i += 1
body = "".join(lines).encode()

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
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
from ray_cml_provider.node.cluster_metrics import ClusterMetrics, NodeMap
from ray_cml_provider.node.gateway import Gateway, Keys, RunningGateway, Upstream

discovery, key_file, nodes = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
serve_port = int(sys.argv[4])
metrics = ClusterMetrics(discovery, NodeMap(nodes))
gateway = Gateway(Upstream("127.0.0.1", serve_port, "serve"), Upstream("127.0.0.1", 9, "dash"),
                  Keys(endpoint_key_file=key_file, metrics_key_file=key_file),
                  log=lambda m: None, metrics=metrics)
running = RunningGateway(gateway, "127.0.0.1", 0)
print(running.port, flush=True)
threading.Event().wait()
"""

KEY = "bench-metrics-key-0123456789abcdef"
HEAD_KB, WORKER_KB, SMALL_KB = 520, 180, 30


def start(code: str, *args: str) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True
    )
    return process, int(process.stdout.readline())


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scrape(conn, pid: int, path: str, n: int) -> tuple[list[float], list[float], int]:
    """(wall seconds, the gateway's CPU seconds, the answer's size) of ``n`` scrapes, each
    after the gateway's spacing of renders (a quarter of a core: 3x the last render)."""
    walls, cpus, size = [], [], 0
    for i in range(n + 2):
        before, started = cpu_s(pid), time.perf_counter()
        conn.request("GET", path, headers={"Authorization": f"Bearer {KEY}"})
        answer = conn.getresponse()
        body = answer.read()
        assert answer.status == 200, answer.status
        wall = time.perf_counter() - started
        if i >= 2:  # warm-up first
            walls.append(wall)
            cpus.append(cpu_s(pid) - before)
            size = len(body)
        time.sleep(max(4 * wall, 0.6))  # past the spacing, and a snapshot's freshness
    return walls, cpus, size


def v1_p50_ms(port: int, seconds: float, callers: int = 8) -> float:
    """The p50 of ``callers`` callers of /v1 asking back to back for ``seconds``."""
    times: list[float] = []
    until = time.monotonic() + seconds

    def call() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while time.monotonic() < until:
            started = time.perf_counter()
            conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
            conn.getresponse().read()
            times.append(time.perf_counter() - started)
        conn.close()

    threads = [threading.Thread(target=call) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statistics.median(times) * 1000


def scraping_in_a_loop(port: int, until: float) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    while time.monotonic() < until:
        conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {KEY}"})
        conn.getresponse().read()
    conn.close()


def under_load(port: int, pid: int, seconds: float) -> tuple[float, float, float, float]:
    """/v1's p50 alone, then with one scraper in a loop, and the gateway's CPU share in each."""
    before, started = cpu_s(pid), time.monotonic()
    alone = v1_p50_ms(port, seconds)
    alone_share = (cpu_s(pid) - before) / (time.monotonic() - started)
    scraper = threading.Thread(target=scraping_in_a_loop, args=(port, time.monotonic() + seconds))
    before, started = cpu_s(pid), time.monotonic()
    scraper.start()
    with_scraper = v1_p50_ms(port, seconds)
    share = (cpu_s(pid) - before) / (time.monotonic() - started)
    scraper.join()
    return alone, alone_share, with_scraper, share


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--scrapes", type=int, default=20)
    parser.add_argument("--every-s", type=float, default=15.0)
    parser.add_argument("--load-s", type=float, default=5.0)
    args = parser.parse_args()
    sizes = [HEAD_KB, SMALL_KB, SMALL_KB] + [WORKER_KB] * args.workers
    processes = []
    try:
        targets = []
        for i, size in enumerate(sizes):
            process, port = start(EXPORTER, f"10.0.0.{i + 2}", str(size))
            processes.append(process)
            targets.append(f"127.0.0.1:{port}")
        with tempfile.TemporaryDirectory() as work:
            discovery = Path(work) / "discovery.json"
            discovery.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": targets}]))
            (Path(work) / "key").write_text(KEY)
            (Path(work) / "nodes").mkdir()
            serve, serve_port = start(UPSTREAM)
            processes.append(serve)
            gateway, port = start(
                GATEWAY,
                str(discovery),
                str(Path(work) / "key"),
                str(Path(work) / "nodes"),
                str(serve_port),
            )
            processes.append(gateway)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            walls, cpus, size = scrape(conn, gateway.pid, "/metrics", args.scrapes)
            top_path = "/metrics?" + "&".join(f"family={f}" for f in FAMILIES)
            _, top_cpus, _ = scrape(conn, gateway.pid, top_path, args.scrapes)
            conn.close()
            alone, alone_share, with_scraper, share = under_load(port, gateway.pid, args.load_s)
    finally:
        for process in processes:
            process.kill()
            process.wait()
    exports_kb = sum(sizes)
    cpu = statistics.median(cpus)
    wall = statistics.median(walls)
    print(f"exports: {len(sizes)} ({exports_kb} kB), one /metrics answer: {size / 1024:.0f} kB")
    print(f"per scrape: wall {wall * 1000:.0f} ms, gateway CPU {cpu * 1000:.0f} ms")
    print(f"scraped every {args.every_s:g} s: {100 * cpu / args.every_s:.2f}% of one core")
    top_cpu = statistics.median(top_cpus)
    print(
        f"ray-cml top's scrape (its families only): gateway CPU {top_cpu * 1000:.0f} ms, every "
        f"{SCRAPE_EVERY_S:g} s while top runs: {100 * top_cpu / SCRAPE_EVERY_S:.1f}% of one core"
    )
    print(
        f"/metrics as a lever: 8 /v1 callers' p50 {alone:.1f} ms alone (the gateway at "
        f"{100 * alone_share:.0f}% of one core), {with_scraper:.1f} ms with a scraper in a loop "
        f"({100 * share:.0f}%)"
    )


if __name__ == "__main__":
    main()
