"""``ray down`` of a head and N workers. Prints numbers; asserts nothing.

    .venv/bin/python bench/down_bench.py [--workers 1,20] [--runs 2]

Each run: a fresh emulator, ``ray up`` of the emulator config (a head running Ray), then N
worker applications created through the provider as the autoscaler would, but without
Ray on them (``start_commands: []``: 20 raylets do not fit 2 cores; ``ray down`` deletes
applications and never talks to a worker's Ray). Then ``ray down -y`` is timed, with the
CML API requests it made, and whether Ray on the head was stopped by ``ray stop`` (the
head's log says ``Stopped Ray on this node`` before its application went away).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import yaml
from ray.autoscaler.tags import NODE_KIND_WORKER, TAG_RAY_NODE_KIND, TAG_RAY_USER_NODE_TYPE

from ray_cml_provider.demo.local_cluster import LocalCluster
from ray_cml_provider.emulator.harness import RunningEmulator
from ray_cml_provider.provider.node_provider import CMLNodeProvider

WORKER_TAGS = {TAG_RAY_NODE_KIND: NODE_KIND_WORKER, TAG_RAY_USER_NODE_TYPE: "gpu_worker"}


def one_run(workers: int) -> dict[str, float | int | str]:
    with (
        tempfile.TemporaryDirectory(prefix="bench-") as work,
        RunningEmulator(extra_args=["--stop-grace-s", "1"]) as emulator,
    ):

        def room_for(config: dict) -> None:  # the autoscaler keeps what max_workers allows
            config["max_workers"] = workers
            config["available_node_types"]["gpu_worker"]["max_workers"] = workers

        cluster = LocalCluster(emulator, Path(work), cluster_name="down", config_overrides=room_for)
        if cluster.up().returncode != 0:
            return {"error": "ray up failed"}
        config = yaml.safe_load(cluster.config_path.read_text())
        os.environ.update(cluster.env)  # the provider reads CML_HOST, CML_API_KEY, ...
        provider = CMLNodeProvider(config["provider"], cluster.cluster_name)
        node_config = dict(config["available_node_types"]["gpu_worker"]["node_config"])
        node_config["nvidia_gpu"] = 0  # no GPU quota to think about; the same deletes
        node_config["_ray_cml"] = {"setup_commands": [], "start_commands": []}
        provider.create_node_with_resources_and_labels(
            node_config, WORKER_TAGS, workers, {"CPU": 1}, {}
        )
        [head] = cluster.nodes("head")
        head_log = Path(next(p for p in emulator.processes() if p["id"] == head.id)["log_path"])
        apps = len(cluster.applications())
        emulator.reset_stats()
        started = time.monotonic()
        down = cluster.down()
        took = time.monotonic() - started
        if down.returncode != 0 or cluster.applications():
            return {"error": f"ray down failed: {down.stdout[-500:]}"}
        return {
            "applications": apps,
            "down_s": took,
            "api_requests": emulator.stats()["total"],
            "ray_stopped": "Stopped Ray on this node" in head_log.read_text(errors="replace")
            or "Stopped Ray on this node" in down.stdout,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,20")
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    header = ["workers", "applications", "ray down s", "API requests"]
    print("  ".join(f"{h:>12}" for h in header) + "  ray stopped")
    for workers in [int(n) for n in args.workers.split(",")]:
        for _ in range(args.runs):
            row = one_run(workers)
            if "error" in row:
                print(f"{workers:>12}  error: {row['error']}", flush=True)
                continue
            print(
                f"{workers:>12}  {row['applications']:>12}  {row['down_s']:>12.1f}  "
                f"{row['api_requests']:>12}  {row['ray_stopped']}",
                flush=True,
            )


if __name__ == "__main__":
    main()
