"""Soak: repeated scale-up / scale-down cycles under injected API faults, on the emulator.
Prints numbers; the test suite runs a short variant and checks them.

    .venv/bin/python bench/soak.py [--minutes 10] [--workers 2] [--fault-rate 0.25]
                                   [--start-delay-s 20]

Worker applications take ``--start-delay-s`` to start (their scripts run meanwhile, as on
CML, so raylets join before RUNNING). Each cycle pins a demand of N one-GPU bundles (the
autoscaler must create N GPU worker applications), waits for them, clears the demand and
waits until they are gone. A sampler lists the applications every second through its own
client. At the end: `ray status` must show nothing pending; `ray down`, then
the emulator is asked what is left.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from ray_cml_provider.cml import ApplicationStatus, CMLClient, RetryPolicy
from ray_cml_provider.contract import application_prefix
from ray_cml_provider.demo.local_cluster import LocalCluster
from ray_cml_provider.emulator.harness import RunningEmulator
from ray_cml_provider.emulator.processes import live_group_members

DEMAND = Path(__file__).with_name("set_gpu_demand.py")
# The bench's own clients retry through the faults it injects; their retry lines are noise.
logging.getLogger("ray_cml_provider.cml").setLevel(logging.ERROR)


class Sampler(threading.Thread):
    """Lists the cluster's applications every second: ids per name, most workers at once."""

    def __init__(self, emulator: RunningEmulator, cluster_name: str):
        super().__init__(daemon=True)
        self.cluster = cluster_name
        self.client = CMLClient(
            **emulator.client_settings(), retry=RetryPolicy(max_attempts=10, backoff_base_s=0.05)
        )
        self.prefix = application_prefix(cluster_name)
        self.ids_by_name: dict[str, set[str]] = defaultdict(set)
        self.max_workers = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(1.0):
            try:
                apps = self.client.list_applications({"name": self.prefix})
            except Exception:  # noqa: BLE001 - a failed sample is just skipped
                continue
            workers = [
                a for a in apps if a.name.startswith(application_prefix(self.cluster, "worker"))
            ]
            for app in apps:
                self.ids_by_name[app.name].add(app.id)
            self.max_workers = max(self.max_workers, len(workers))


def running_workers(cluster: LocalCluster) -> int:
    return sum(1 for w in cluster.workers() if w.status == ApplicationStatus.RUNNING)


def keep_autoscaler_log(cluster: LocalCluster) -> None:
    """A cycle that timed out or was slow: keep the head's autoscaler log (the node's
    temporary folder goes with the cluster) where the reader can find it."""
    monitor = cluster.exec("cat $RAY_TMPDIR/ray/session_latest/logs/monitor.log")
    kept = Path(tempfile.gettempdir()) / f"soak-monitor-{int(time.time())}.log"
    kept.write_text(monitor.stdout)
    print(f"soak: a cycle was slow; the autoscaler's log is in {kept}", file=sys.stderr)


def autoscaler_restarts(cluster: LocalCluster, emulator: RunningEmulator) -> int:
    """How often the head's watchdog restarted a stuck autoscaler; when it did, the head's
    log (with the stuck process's stacks) is kept where the reader can find it."""
    [head] = cluster.nodes("head")
    try:
        record = json.loads(
            cluster.client.download_file(
                f".ray-cml/{cluster.cluster_name}/nodes/"
                f"{head.name.rsplit('-', 1)[-1]}/autoscaler.json"
            )
        )
    except Exception:  # noqa: BLE001 - no record: no restart
        return 0
    engine = next(p for p in emulator.processes() if p["id"] == head.id)
    kept = Path(tempfile.gettempdir()) / f"soak-head-{int(time.time())}.log"
    kept.write_text(Path(engine["log_path"]).read_text(errors="replace"))
    print(f"soak: the autoscaler was restarted; the head's log is in {kept}", file=sys.stderr)
    return int(record.get("restarts", 0))


def soak(
    minutes: float,
    workers: int,
    fault_rate: float,
    latency_ms: float,
    drop_rate: float,
    max_cycles: int | None = None,
    start_delay_s: float = 20.0,
) -> dict:
    results: dict = {"cycles": 0, "slowest_scale_up_s": 0.0}
    with tempfile.TemporaryDirectory(prefix="soak-") as work, RunningEmulator() as emulator:
        emulator.set_faults(fault_rate=fault_rate, latency_ms=latency_ms, drop_rate=drop_rate)

        def edit(config: dict) -> None:  # Ray's own timeouts: nothing shortened here
            config["max_workers"] = workers
            config["available_node_types"]["gpu_worker"]["max_workers"] = workers

        cluster = LocalCluster(emulator, Path(work), cluster_name="soak", config_overrides=edit)
        # The bench's own view of CML retries harder than users would, so that counting
        # never fails because of the faults it injects.
        cluster.client = CMLClient(
            **emulator.client_settings(), retry=RetryPolicy(max_attempts=10, backoff_base_s=0.05)
        )
        if cluster.up().returncode != 0:
            sys.exit("ray up failed")
        emulator.set_faults(start_delay_s=start_delay_s)  # the workers' starts, not the head's
        sampler = Sampler(emulator, cluster.cluster_name)
        sampler.start()
        deadline = time.monotonic() + minutes * 60
        while time.monotonic() < deadline and (
            max_cycles is None or results["cycles"] < max_cycles
        ):
            try:
                cluster.submit(DEMAND, str(workers))
                took = cluster.wait_for(
                    lambda: running_workers(cluster) == workers, 300, "scale-up"
                )
                results["slowest_scale_up_s"] = max(results["slowest_scale_up_s"], took)
                if took > 60:  # v2 had to recover a lost launch: keep the evidence
                    keep_autoscaler_log(cluster)
                cluster.submit(DEMAND, "0")
                cluster.wait_for(lambda: not cluster.workers(), 300, "scale-down")
            except TimeoutError:
                keep_autoscaler_log(cluster)
                raise
            results["cycles"] += 1
        monitor = cluster.exec("cat $RAY_TMPDIR/ray/session_latest/logs/monitor.* 2>/dev/null")
        results["autoscaler_exceptions"] = monitor.stdout.count("Traceback")
        results["autoscaler_restarts"] = autoscaler_restarts(cluster, emulator)
        # After the last scale-down Ray must wait for nothing (no phantom pending instance).
        results["ray_status_pending"] = len(cluster.ray_status().pending)
        groups = [p["pgid"] for p in emulator.processes() if p.get("pgid")]
        down = cluster.down()
        sampler.stop.set()
        sampler.join()
        time.sleep(2)
        stats = emulator.stats()
        names = sampler.ids_by_name
        results.update(
            {
                "down_ok": down.returncode == 0,
                "applications_created": sum(len(ids) for ids in names.values()),
                "max_workers_at_once": sampler.max_workers,
                "duplicates": sum(len(ids) - 1 for ids in names.values() if len(ids) > 1),
                "orphan_applications": len(cluster.applications()),
                "applications_deleted": sum(len(ids) for ids in names.values())
                - len(cluster.applications()),
                "orphan_processes": sum(len(live_group_members(g)) for g in groups),
                "api_requests": stats["total"],
                "faults_injected": stats["faults_injected"],
                "answers_dropped": stats["answers_dropped"],
                "creates_sent": stats["requests"].get(
                    "POST /api/v2/projects/{project_id}/applications", 0
                ),
            }
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--fault-rate", type=float, default=0.25)
    parser.add_argument("--latency-ms", type=float, default=20)
    parser.add_argument("--drop-rate", type=float, default=0.02)
    parser.add_argument("--max-cycles", type=int)
    parser.add_argument("--start-delay-s", type=float, default=20.0)
    args = parser.parse_args()
    started = time.monotonic()
    results = soak(
        args.minutes,
        args.workers,
        args.fault_rate,
        args.latency_ms,
        args.drop_rate,
        args.max_cycles,
        args.start_delay_s,
    )
    results["wall_s"] = round(time.monotonic() - started)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
