"""What the head's history costs the head. Prints numbers; asserts nothing.

    .venv/bin/python bench/history_bench.py [--jobs 50] [--snapshots 10] [--every-s 60]

The head's ``Historian`` (``node/history.py``) runs in this process against a real emulator
(CML's files and applications API) and a stand-in for Ray's dashboard on loopback that
answers the Jobs API (``--jobs`` finished jobs, each with a log of a few hundred lines), the
Serve API and a ``/metrics`` of the size ``ray-cml top`` asks for. It takes ``--snapshots``
periodic snapshots and a last one; the CPU time of this process per snapshot becomes its
share of one core at one snapshot every ``--every-s`` seconds, and the last snapshot's wall
time is what ``ray stop`` (``ray down``'s first step) waits for.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ray_cml_provider.contract import auth_token_path, cluster_dir, metrics_key_path
from ray_cml_provider.emulator.harness import RunningEmulator
from ray_cml_provider.node.context import NodeContext
from ray_cml_provider.node.history import Historian


def stand_in_dashboard(jobs: int) -> ThreadingHTTPServer:
    now_ms = int(time.time() * 1000)
    listed = [
        {
            "type": "SUBMISSION",
            "submission_id": f"raysubmit_{n:04d}",
            "entrypoint": f"python step_{n}.py --rows 100000",
            "status": "SUCCEEDED",
            "start_time": now_ms + n,
            "end_time": now_ms + n + 1,
        }
        for n in range(jobs)
    ]
    log = "\n".join(f"step {i}: processed 1000 rows in 0.25 s" for i in range(400))
    app = {"status": "RUNNING", "deployments": {"Echo": {"status": "HEALTHY", "replicas": []}}}
    metrics_lines = [
        f'ray_serve_deployment_request_counter_total{{application="a",deployment="D{i}"}} 1'
        for i in range(50)
    ]
    answers = {
        "/api/jobs/": json.dumps(listed),
        "/api/serve/applications/": json.dumps({"applications": {"echo": app}}),
        "/metrics": "\n".join(metrics_lines) + "\n",
    }

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            path = self.path.split("?")[0]
            body = json.dumps({"logs": log}) if path.endswith("/logs") else answers.get(path)
            if body is None:
                self.send_error(404)
                return
            data = body.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=50, help="finished Ray jobs on the head")
    parser.add_argument("--snapshots", type=int, default=10, help="periodic snapshots taken")
    parser.add_argument("--every-s", type=float, default=60.0, help="the head's period")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="history-bench-") as work:
        project = Path(work) / "project"
        project.mkdir()
        with RunningEmulator(project_dir=project, log_dir=Path(work) / "logs") as emulator:
            for path in (auth_token_path("bench"), metrics_key_path("bench")):
                (project / path).parent.mkdir(parents=True, exist_ok=True)
                (project / path).write_text("k" * 64)
            server = stand_in_dashboard(args.jobs)
            port = server.server_address[1]
            env = {
                "RAY_CML_CLUSTER": "bench",
                "RAY_CML_NODE_ID": "0123abcd",
                "RAY_CML_NODE_KIND": "head",
                "RAY_CML_DIR": cluster_dir("bench"),
                "RAY_CML_AUTH_TOKEN_FILE": auth_token_path("bench"),
                "RAY_CML_METRICS_KEY_FILE": metrics_key_path("bench"),
                "CDSW_IP_ADDRESS": "127.0.0.1",
                "CDSW_APP_PORT": str(port),
                "CDSW_API_URL": f"{emulator.url}/api/v1",
                "CDSW_PROJECT_ID": emulator.project_id,
                "CDSW_APIV2_KEY": emulator.api_key,
            }
            historian = Historian(NodeContext(env, project_dir=project), port)
            historian.begin()  # its first snapshot runs in a thread: reads every job's log
            deadline = time.monotonic() + 120
            while not list(project.glob(".ray-cml/_history/bench/*.json")):
                if time.monotonic() > deadline:
                    raise SystemExit("the first snapshot was not written within 120 s")
                time.sleep(0.1)
            cpu = []
            for _ in range(args.snapshots):
                started = time.process_time()
                historian.snapshot()
                cpu.append(time.process_time() - started)
            started, wall = time.process_time(), time.monotonic()
            historian.end("ray stop")
            last_cpu, last_wall = time.process_time() - started, time.monotonic() - wall
            server.shutdown()
            records = list(project.glob(".ray-cml/_history/bench/*.json"))
            size = records[0].stat().st_size if records else 0
    per = statistics.median(cpu)
    print(
        f"{args.jobs} jobs: a periodic snapshot takes {per * 1000:.0f} ms of CPU (median of "
        f"{args.snapshots}): at one every {args.every_s:g} s, "
        f"{100 * per / args.every_s:.2f}% of one core"
    )
    print(
        f"the last snapshot (what `ray stop` waits for): {last_wall * 1000:.0f} ms, "
        f"{last_cpu * 1000:.0f} ms of CPU; the record: {size / 1024:.1f} kB"
    )


if __name__ == "__main__":
    main()
