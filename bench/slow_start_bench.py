"""Scale to zero under slow application starts. Prints numbers; asserts nothing.

    .venv/bin/python bench/slow_start_bench.py [--delays 0,20,120] [--autoscalers v2,v1]
                                               [--mode start|schedule]

For each start delay and autoscaler: ``ray up`` on a fresh emulator (the head starts with
the emulator's default delay), then every later application takes DELAY seconds to start,
``ray submit`` of a 1-GPU task (the autoscaler creates a GPU worker application), and the
wait until that worker's application is deleted again. ``--mode start`` (default): the
script runs while CML says STARTING, so the raylet joins before RUNNING; ``--mode schedule``:
the application waits with no process (scheduling, a GPU node added, the image pulled).

Columns: scale-up (submit -> task done), given back (task done -> application deleted,
with idle_timeout_minutes 0.25 = 15 s), applications created, and what ``ray status`` shows
afterwards (given 30 s to settle): pending nodes and failed launches (both should be 0),
and ended nodes (v2 lists the worker it scaled down as NodeTerminated under "Recent
failures"; v1 does not).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from ray_cml_provider.demo.local_cluster import LocalCluster
from ray_cml_provider.demo.ray_demo import GPU_TASK
from ray_cml_provider.emulator.harness import RunningEmulator

CREATE = "POST /api/v2/projects/{project_id}/applications"


def one_run(delay_s: float, autoscaler: str, mode: str) -> dict[str, float | str]:
    env = {"RAY_UP_enable_autoscaler_v2": "0"} if autoscaler == "v1" else {}
    with tempfile.TemporaryDirectory(prefix="bench-") as work, RunningEmulator() as emulator:

        def patient(config: dict) -> None:
            config["provider"]["launch_timeout_s"] = 900  # as cml-cluster.yaml: past DELAY

        cluster = LocalCluster(
            emulator, Path(work), cluster_name="slow", extra_env=env, config_overrides=patient
        )
        try:
            if cluster.up().returncode != 0:
                return {"error": "ray up failed"}
            delay = {"start_delay_s" if mode == "start" else "schedule_delay_s": delay_s}
            emulator.set_faults(**delay)
            emulator.reset_stats()
            started = time.monotonic()
            submitted = cluster.submit(GPU_TASK)
            done = time.monotonic()
            if submitted.returncode != 0:
                return {"error": "ray submit failed"}
            cluster.wait_for(lambda: not cluster.workers(), 900, "scale to zero")
            given_back = time.monotonic() - done
            # `ray status` is published once per autoscaler loop: give it a few to settle.
            deadline = time.monotonic() + 30
            while True:
                status = cluster.ray_status()
                if not status.pending or time.monotonic() > deadline:
                    break
            return {
                "scale_up_s": done - started,
                "given_back_s": given_back,
                "creates": emulator.stats()["requests"].get(CREATE, 0),
                "pending": len(status.pending),
                "launch_failures": sum("LaunchFailed" in x for x in status.recent_failures),
                "ended": sum("NodeTerminated" in x for x in status.recent_failures),
            }
        except TimeoutError as exc:
            return {"error": str(exc)}
        finally:
            cluster.down()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delays", default="0,20,120")
    parser.add_argument("--autoscalers", default="v2,v1")
    parser.add_argument("--mode", choices=["start", "schedule"], default="start")
    args = parser.parse_args()
    print(f"mode: {args.mode} delay; idle timeout 15 s; autoscaler loop 5 s", flush=True)
    print(
        "delay  autoscaler  scale-up  given back  creates  pending  failed launches  ended nodes",
        flush=True,
    )
    for delay in [float(d) for d in args.delays.split(",")]:
        for autoscaler in args.autoscalers.split(","):
            result = one_run(delay, autoscaler, args.mode)
            if "error" in result:
                print(f"{delay:5.0f}  {autoscaler:10}  {result['error']}", flush=True)
                continue
            print(
                f"{delay:5.0f}  {autoscaler:10}  {result['scale_up_s']:6.1f} s  "
                f"{result['given_back_s']:8.1f} s  {result['creates']:7}  "
                f"{result['pending']:7}  {result['launch_failures']:15}  {result['ended']:11}",
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(main())
