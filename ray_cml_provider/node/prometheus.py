"""A Prometheus on the head, when one is there, so that Ray's dashboard shows its metrics.

The dashboard's metric views ask the Prometheus at ``RAY_PROMETHEUS_HOST`` (read when the
head's Ray starts). Ray can download one (``ray metrics launch-prometheus``), but a CML
engine usually cannot reach GitHub, so the head only runs a binary that is already there:
``provider.prometheus`` names it (a path, absolute or in the project), or, by default
(``auto``), the ``prometheus`` on the head's ``PATH`` (a runtime that has it, or the
project's ``~/.local/bin``); ``off`` never runs one. Without one the dashboard's metric
views stay empty, ``ray up`` says so once, and ``ray-cml top`` shows the figures.

It runs on Ray's own configuration (``session_latest/metrics/prometheus/prometheus.yml``:
file-based discovery of every node's export, kept current by the head), listens on the
head's loopback only (its HTTP API has no authentication; the dashboard is its only
client), keeps its data in the node's temporary folder, at most ``RETENTION`` of it, and is
started with the head's Ray and ended with it (``ray stop`` ends the launcher's process
group, this process included).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

from ray_cml_provider.node.context import NodeContext, log

RETENTION = ("--storage.tsdb.retention.time=1d", "--storage.tsdb.retention.size=256MB")
CONFIG_WAIT_S = 30.0


def find_binary(ctx: NodeContext, path_var: str) -> str | None:
    """The binary ``provider.prometheus`` names (``auto``: on ``path_var``); None for none."""
    wanted = ctx.spec.prometheus
    if wanted == "off":
        return None
    if wanted in ("", "auto"):
        return shutil.which("prometheus", path=path_var)
    candidate = Path(wanted) if wanted.startswith("/") else ctx.project_dir / wanted
    if os.access(candidate, os.X_OK) and candidate.is_file():
        return str(candidate)
    log(f"prometheus: provider.prometheus names {wanted}, which is not an executable here")
    return None


class HeadPrometheus:
    def __init__(self, ctx: NodeContext, binary: str, port: int):
        self.ctx = ctx
        self.binary = binary
        self.port = port
        self.process: subprocess.Popen | None = None
        self.session: Path | None = None  # the Ray session it serves
        self.lock = threading.Lock()

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ray_env(self) -> dict[str, str]:
        """What the head's ``ray start`` needs for the dashboard to find it."""
        return {"RAY_PROMETHEUS_HOST": self.address, "RAY_PROMETHEUS_NAME": "Prometheus"}

    def start(self) -> None:
        """After the head's Ray started: run Prometheus on that Ray's configuration. One at a
        time; a Prometheus of an earlier Ray (its session) is ended first."""
        with self.lock:
            session = (Path(self.ctx.tmp_dir) / "ray" / "session_latest").resolve()
            running = self.process is not None and self.process.poll() is None
            if running and self.session == session:
                return
            if running:
                self.process.kill()
                self.process.wait()
            config = session / "metrics" / "prometheus" / "prometheus.yml"
            deadline = time.monotonic() + CONFIG_WAIT_S
            while not config.exists() and time.monotonic() < deadline:
                time.sleep(0.5)  # the dashboard writes it as it starts
            if not config.exists():
                log(f"prometheus: Ray wrote no {config}: not started")
                return
            data = Path(self.ctx.tmp_dir) / "prometheus"
            data.mkdir(parents=True, exist_ok=True)
            with open(data / "prometheus.log", "ab") as output:  # the child keeps its own
                self.process = subprocess.Popen(
                    [
                        self.binary,
                        f"--config.file={config}",
                        f"--storage.tsdb.path={data}",
                        f"--web.listen-address=127.0.0.1:{self.port}",
                        *RETENTION,
                    ],
                    cwd=str(data),
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                )
            self.session = session
            log(f"prometheus: {self.binary} on {self.address} (pid {self.process.pid})")
