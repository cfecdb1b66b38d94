"""Benchmarks of the provider on the CML emulator. Prints numbers; asserts nothing.

    .venv/bin/python bench/scale_bench.py [--runs N] [--sizes 1,10,50]

1. `ray up` and `ray down` wall times (real Ray, local-emulator.yaml).
2. Time from GPU demand to the new worker's raylet joining, split into: autoscaler decision
   + create call (demand -> application created), then the raylet joining (created -> joined);
   and CML's start (created -> RUNNING) beside it: an application's script runs while CML
   says STARTING, so its raylet usually joins before RUNNING.
3. CML API calls per autoscaler update at steady state: measured on the real cluster with one
   worker, and for 1, 10 and 50 workers with light nodes (real node launchers, no Ray),
   driving the provider the way the autoscaler does each update.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from ray.autoscaler.tags import NODE_KIND_HEAD, TAG_RAY_NODE_KIND, TAG_RAY_USER_NODE_TYPE

from ray_cml_provider.demo.local_cluster import LocalCluster
from ray_cml_provider.emulator.harness import RunningEmulator
from ray_cml_provider.provider.node_provider import CMLNodeProvider

PROBE = Path(__file__).with_name("gpu_join_probe.py")
DEMAND = Path(__file__).with_name("set_gpu_demand.py")
LIST_CALL = "GET /api/v2/projects/{project_id}/applications"
UPDATE_INTERVAL_S = 5  # Ray's AUTOSCALER_UPDATE_INTERVAL_S


def epoch(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def real_cluster(runs: int, window_s: float) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-") as work, RunningEmulator() as emulator:
        cluster = LocalCluster(emulator, Path(work), cluster_name="bench")
        started = time.monotonic()
        up = cluster.up()
        up_s = time.monotonic() - started
        if up.returncode != 0:
            sys.exit("ray up failed:\n" + up.stdout[-3000:])
        print(f"ray up wall time:                         {up_s:6.1f} s")

        splits = []
        for run in range(runs):
            if run:
                cluster.wait_for(lambda: not cluster.workers(), 300, "scale to zero")
            result = cluster.submit(PROBE)
            line = next(x for x in result.stdout.splitlines() if x.startswith("BENCH "))
            probe = json.loads(line[len("BENCH ") :])
            # The raylet joins while CML still says STARTING: wait for RUNNING to time it.
            cluster.wait_for(
                lambda: any(w.raw.get("running_at") for w in cluster.workers()),
                300,
                "the worker's application RUNNING",
            )
            raw = next(w.raw for w in cluster.workers() if w.raw.get("running_at"))
            created, running = epoch(raw["created_at"]), epoch(raw["running_at"])
            splits.append(
                {
                    "decision+create": created - probe["t_demand"],
                    "created->joined": probe["t_join"] - created,
                    "created->RUNNING": running - created,
                    "total": probe["t_join"] - probe["t_demand"],
                }
            )
        print(f"GPU demand -> worker raylet joined ({runs} run(s), median):")
        for part in ("decision+create", "created->joined", "created->RUNNING", "total"):
            values = [s[part] for s in splits]
            print(
                f"  {part:<16} {statistics.median(values):6.1f} s   "
                f"(runs: {', '.join(f'{v:.1f}' for v in values)})"
            )

        # Steady state with a worker: pin one GPU so the worker stays, then count calls.
        cluster.submit(DEMAND, "1")
        cluster.wait_for(lambda: len(cluster.workers()) == 1, 300, "the pinned worker")
        time.sleep(min(10.0, window_s))  # settle: the worker's own start calls are over
        emulator.reset_stats()
        time.sleep(window_s)
        calls = emulator.stats()["requests"]
        lists = calls.get(LIST_CALL, 0)
        other = sum(v for k, v in calls.items() if k != LIST_CALL)
        print(
            f"steady state, head + {len(cluster.workers())} worker, {window_s:g} s: {lists} list "
            f"calls (~{lists / (window_s / UPDATE_INTERVAL_S):.1f} per 5 s update), "
            f"{other} other calls"
        )

        started = time.monotonic()
        down = cluster.down()
        print(
            f"ray down wall time:                       {time.monotonic() - started:6.1f} s"
            f"{'' if down.returncode == 0 else ' (FAILED)'}"
        )


def light_nodes(sizes: list[int], updates: int = 5) -> None:
    print(f"API calls per autoscaler update, light nodes ({updates} updates each):")
    for size in sizes:
        with RunningEmulator() as emulator:
            os.environ["BENCH_CML_API_KEY"] = emulator.api_key
            provider = CMLNodeProvider(
                {
                    "type": "external",
                    "module": "m",
                    "host": emulator.url,
                    "project_id": emulator.project_id,
                    "api_key_env": "BENCH_CML_API_KEY",
                    "poll_interval_s": 0.5,
                    "head_lost_timeout_s": 3600,
                    "launch_timeout_s": 300,
                },
                f"light{size}",
            )
            runtime = provider.client.list_runtimes()[0]["image_identifier"]
            base = {"cpu": 1, "memory": 1, "runtime_identifier": runtime}
            provider.create_node(
                base, {TAG_RAY_NODE_KIND: NODE_KIND_HEAD, TAG_RAY_USER_NODE_TYPE: "head"}, 1
            )
            started = time.monotonic()
            provider.create_node_with_resources_and_labels(
                {**base, "nvidia_gpu": 1, "_ray_cml": {"setup_commands": [], "start_commands": []}},
                {TAG_RAY_NODE_KIND: "worker", TAG_RAY_USER_NODE_TYPE: "gpu_worker"},
                size,
                {"GPU": 1},
                {},
            )
            create_s = time.monotonic() - started
            for node_id in provider.non_terminated_nodes({}):
                provider.internal_ip(node_id)
            emulator.reset_stats()
            for _ in range(updates):  # what one autoscaler update asks of the provider
                for node_id in provider.non_terminated_nodes({}):
                    provider.node_tags(node_id)
                    provider.is_running(node_id)
                    provider.internal_ip(node_id)
            calls = emulator.stats()["total"]
            started = time.monotonic()
            provider.terminate_nodes(provider.nodes_for_teardown({}))
            delete_s = time.monotonic() - started
            print(
                f"  {size:>3} workers: {calls / updates:.1f} API calls per update "
                f"(create {size} concurrently: {create_s:.1f} s to RUNNING; "
                f"delete all: {delete_s:.1f} s)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--sizes", default="1,10,50")
    parser.add_argument("--skip-ray", action="store_true", help="light-node part only")
    parser.add_argument(
        "--window-s", type=float, default=30.0, help="steady-state window for counting calls"
    )
    args = parser.parse_args()
    if not args.skip_ray:
        real_cluster(args.runs, args.window_s)
    light_nodes([int(s) for s in args.sizes.split(",")])


if __name__ == "__main__":
    main()
