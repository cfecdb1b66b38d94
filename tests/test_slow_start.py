"""Slow application starts, as on real CML, with real Ray on both autoscalers.

CML takes tens of seconds to minutes to start an application, and the node launcher (the
application's script) starts Ray while CML still says STARTING. These tests check that a
GPU worker Ray asked for joins, runs the task, and is deleted again once idle, with
``ray status`` clean afterwards (nothing pending, no failed launch), when:

- the script runs for 20 s while STARTING (the raylet joins long before RUNNING, and the
  start outlasts ``launch_timeout_s``: a node in Ray is not a failed launch), on autoscaler
  v2 and v1;
- the application waits in STARTING with no process for longer than autoscaler v2's
  REQUESTED->ALLOCATED and ALLOCATED->RAY_RUNNING timeouts (shortened here through their
  RAY_AUTOSCALER_RECONCILE_* variables), so v2 launches the request again meanwhile.
"""

from __future__ import annotations

import re
import time

import pytest

from ray_cml_provider.cml import ApplicationStatus
from ray_cml_provider.demo.local_cluster import LocalCluster, RayStatus
from ray_cml_provider.demo.ray_demo import GPU_TASK
from tests.conftest import wait_until

pytestmark = pytest.mark.e2e

IDLE_TIMEOUT_S = 15  # idle_timeout_minutes: 0.25 in local-emulator.yaml
UPDATE_S = 5  # the autoscaler's loop
V2_TIMEOUTS = {
    "RAY_AUTOSCALER_RECONCILE_REQUEST_STATUS_TIMEOUT_S": "10",
    "RAY_AUTOSCALER_RECONCILE_ALLOCATE_STATUS_TIMEOUT_S": "10",
}


def assert_ray_status_clean(cluster: LocalCluster, worker_id: str) -> None:
    """``ray status`` on the head settles, within a few autoscaler loops of the scale-down
    (it is published once per loop), on nothing pending and no failed launch. Autoscaler v2
    lists every Ray node that ended under "Recent failures" as NodeTerminated; the one
    allowed there is the worker it scaled down itself."""

    def settled() -> RayStatus | None:
        status = cluster.ray_status()
        assert status.returncode == 0, status.text[-3000:]
        return status if "Pending:" in status.text and not status.pending else None

    status = wait_until(settled, 6 * UPDATE_S, "ray status with nothing pending")
    failures = "\n".join(status.recent_failures)
    assert "LaunchFailed" not in failures, status.text
    ended = set(re.findall(r"NodeTerminated \(instance_id: (\w+)\)", failures))
    assert ended <= {worker_id}, status.text


def run_gpu_task_and_wait_for_scale_to_zero(cluster: LocalCluster) -> dict:
    """Submit a 1-GPU task; return the worker's node id, and how long it took to be used and
    to be given back.

    A slow start must leave exactly one worker application, whose Ray ran the task, and it
    must be deleted within the idle timeout plus a few autoscaler loops of the task's end.
    """
    started = time.monotonic()
    submitted = cluster.submit(GPU_TASK)
    demand_ended = time.monotonic()
    assert submitted.returncode == 0, submitted.stdout[-3000:]
    workers = cluster.workers()
    assert len(workers) == 1, f"one worker for one task, not {[w.name for w in workers]}"
    [worker] = workers
    # Ray may have run the task while CML still said STARTING: its raylet joined early.
    assert worker.status in ApplicationStatus.LIVE
    worker_ip = next(p for p in cluster.emulator.processes() if p["id"] == worker.id)
    ran_on = re.search(r"GPU task ran on \{'node_ip': '([\d.]+)'", submitted.stdout)
    assert ran_on and ran_on.group(1) == worker_ip["ip_address"]
    # Given back within the idle timeout and a few loops (v2 drains before it terminates).
    limit = IDLE_TIMEOUT_S + 8 * UPDATE_S
    cluster.wait_for(lambda: not cluster.workers(), limit, "the idle worker to be deleted")
    return {
        "worker_id": worker.name.rsplit("-", 1)[-1],
        "task_s": demand_ended - started,
        "given_back_s": time.monotonic() - demand_ended,
    }


@pytest.mark.timeout(900)
@pytest.mark.parametrize("autoscaler", ["v2", "v1"])
def test_a_worker_whose_ray_joins_while_starting_scales_up_and_to_zero(
    start_emulator, tmp_path, autoscaler
):
    emulator = start_emulator()
    env = {"RAY_UP_enable_autoscaler_v2": "0"} if autoscaler == "v1" else {}

    def short_launch_timeout(config: dict) -> None:
        # Shorter than the start: a node whose Ray joined is kept while CML says STARTING.
        config["provider"]["launch_timeout_s"] = 14

    cluster = LocalCluster(
        emulator,
        tmp_path / "work",
        cluster_name=f"slow-{autoscaler}",
        extra_env=env,
        config_overrides=short_launch_timeout,
    )
    up = cluster.up()
    assert up.returncode == 0, up.stdout[-3000:]
    emulator.set_faults(start_delay_s=20)  # the workers' starts; the head started in 8 s

    worker = run_gpu_task_and_wait_for_scale_to_zero(cluster)
    assert_ray_status_clean(cluster, worker["worker_id"])
    monitor = cluster.exec("cat $RAY_TMPDIR/ray/session_latest/logs/monitor.*").stdout
    assert "runs Ray while CML still says STARTING" in monitor
    assert "APPLICATION_STARTING after" not in monitor

    down = cluster.down()
    assert down.returncode == 0, down.stdout[-3000:]
    assert cluster.applications() == []


@pytest.mark.timeout(900)
def test_a_start_longer_than_v2_timeouts_is_one_instance_from_creation_to_deletion(
    start_emulator, tmp_path
):
    emulator = start_emulator()

    def shorten_v2_timeouts(config: dict) -> None:
        head = config["available_node_types"]["head"]["node_config"]
        head.setdefault("environment", {}).update(V2_TIMEOUTS)

    cluster = LocalCluster(
        emulator, tmp_path / "work", cluster_name="slow-long", config_overrides=shorten_v2_timeouts
    )
    up = cluster.up()
    assert up.returncode == 0, up.stdout[-3000:]
    # From now on an application waits 30 s with no process (scheduling, a GPU node being
    # added, the image pulled), longer than both v2 timeouts, before its script starts.
    emulator.set_faults(schedule_delay_s=30)
    emulator.reset_stats()

    timings = run_gpu_task_and_wait_for_scale_to_zero(cluster)
    assert timings["task_s"] >= 30, timings  # nothing ran before the application's script
    creates = emulator.stats()["requests"].get("POST /api/v2/projects/{project_id}/applications")
    assert creates == 1, f"v2 launched the request again: {creates} applications created"
    monitor = cluster.exec("cat $RAY_TMPDIR/ray/session_latest/logs/monitor.*")
    assert "asked again" in monitor.stdout, "v2 should have re-launched the slow request"
    assert_ray_status_clean(cluster, timings["worker_id"])

    down = cluster.down()
    assert down.returncode == 0, down.stdout[-3000:]
    assert cluster.applications() == []
