"""The project filesystem as NFS: what a file-visibility delay costs. Prints numbers; asserts
nothing.

    .venv/bin/python bench/file_delay_bench.py [--delays 0,3,30]

On CML, /home/cdsw is NFS and clients cache directory attributes (Linux's acdirmin is 30 s):
a file written on one side may reach the other that much later. For each delay, a fresh
emulator with ``--file-delay-s DELAY`` and ``local-emulator.yaml`` (runtimes with Ray, so the
delay is all that changes) measures ``ray up``, ``ray exec 'true'``, a GPU worker's join
(bench/gpu_join_probe.py: task submitted -> raylet alive) and ``ray-cml status``.

The design's claim: every file the provider must read is published through the files API
(which reads its own writes at once) and requests are also polled through the API, so the
added time is a small multiple of the delay at most, not one delay per command ``ray up``
runs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

from ray_cml_provider.demo.local_cluster import LocalCluster
from ray_cml_provider.emulator.harness import RunningEmulator

PROBE = Path(__file__).with_name("gpu_join_probe.py")


def timed(action) -> tuple[float, object]:
    started = time.monotonic()
    result = action()
    return time.monotonic() - started, result


def one_run(delay_s: float) -> dict[str, float]:
    with (
        tempfile.TemporaryDirectory(prefix="bench-") as work,
        RunningEmulator(extra_args=["--file-delay-s", str(delay_s)]) as emulator,
    ):
        cluster = LocalCluster(emulator, Path(work), cluster_name="nfs")
        row: dict[str, float] = {}
        try:
            row["ray up"], up = timed(cluster.up)
            if up.returncode != 0:
                raise SystemExit(f"ray up failed at delay {delay_s}:\n{up.stdout[-3000:]}")
            row["ray exec"], done = timed(lambda: cluster.exec("true"))
            assert done.returncode == 0, done.stdout[-2000:]
            ran = cluster.submit(PROBE)
            times = json.loads(re.search(r"BENCH (\{.*\})", ran.stdout).group(1))
            row["worker join"] = times["t_join"] - times["t_demand"]
            row["ray-cml status"], status = timed(
                lambda: cluster.ray_cml("status", str(cluster.config_path))
            )
            assert status.returncode == 0, status.stdout[-2000:]
        finally:
            cluster.down()
        return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delays", default="0,3,30")
    args = parser.parse_args()
    delays = [float(d) for d in args.delays.split(",")]
    rows = {}
    for delay in delays:
        rows[delay] = one_run(delay)
        print(f"delay {delay:g} s: {rows[delay]}", flush=True)
    columns = list(rows[delays[0]])
    print(f"\n{'file delay s':<14}" + "".join(f"{c + ' s':>18}" for c in columns))
    for delay, row in rows.items():
        print(f"{delay:<14g}" + "".join(f"{row[c]:>18.1f}" for c in columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
