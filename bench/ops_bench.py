"""What the operator commands cost: wall time and CML API requests of ``ray-cml status`` in
each mode (CML only, Ray's view from the GCS directly, Ray's view through the head's
mailbox) and of ``ray-cml doctor``, on a real cluster (head + 1 GPU worker) on the emulator.

    .venv/bin/python bench/ops_bench.py [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from ray_cml_provider.demo.local_cluster import LocalCluster
from ray_cml_provider.emulator.harness import RunningEmulator

SET_GPU_DEMAND = Path(__file__).resolve().parent / "set_gpu_demand.py"


def measure(emulator: RunningEmulator, cluster: LocalCluster, runs: int, *args: str) -> str:
    times, requests = [], []
    for _ in range(runs):
        emulator.reset_stats()
        started = time.monotonic()
        result = cluster.ray_cml(*args, str(cluster.config_path))
        times.append(time.monotonic() - started)
        assert result.returncode in (0, 1), result.stdout
        requests.append(emulator.stats()["total"])
    return (
        f"{' '.join(args):<34} median {statistics.median(times):5.2f} s"
        f"  (min {min(times):.2f}, max {max(times):.2f})"
        f"  API requests {statistics.median(requests):.0f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir, RunningEmulator() as emulator:
        cluster = LocalCluster(emulator, Path(workdir), cluster_name="opsbench")
        if cluster.up().returncode != 0:
            print("ray up failed")
            return 1
        try:
            cluster.submit(SET_GPU_DEMAND, "1")
            cluster.wait_for(
                lambda: any(a.status.endswith("RUNNING") for a in cluster.workers()),
                120,
                "the GPU worker",
            )
            time.sleep(5)  # let it join Ray
            print(f"cluster: head + 1 GPU worker on the emulator; {args.runs} runs each")
            for mode in (["--cml-only"], ["--ray-view", "direct"], ["--ray-view", "head"]):
                print(measure(emulator, cluster, args.runs, "status", "--json", *mode))
            print(measure(emulator, cluster, args.runs, "doctor"))
            print(measure(emulator, cluster, args.runs, "gc"))
        finally:
            cluster.down()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
