"""Failure handling with real Ray on the emulator: an interrupted `ray up`, and GPU workers
asked beyond the workspace's quota."""

from __future__ import annotations

import os
import signal
import time

import pytest

from ray_cml_provider.cml import ApplicationStatus
from ray_cml_provider.demo.local_cluster import LocalCluster
from ray_cml_provider.demo.ray_demo import GPU_TASK

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(600)
def test_an_interrupted_ray_up_is_adopted_by_the_next_and_removed_by_down(start_emulator, tmp_path):
    emulator = start_emulator()
    cluster = LocalCluster(emulator, tmp_path / "work", cluster_name="ctrlc")
    interrupted = cluster.start_ray("up", "-y", "--no-config-cache", str(cluster.config_path))
    try:
        cluster.wait_for(lambda: cluster.applications(), 60, "the head application")
        time.sleep(1.0)  # the head is starting: Ctrl-C now
        os.killpg(interrupted.pid, signal.SIGINT)
        interrupted.wait(60)
    finally:
        if interrupted.poll() is None:
            os.killpg(interrupted.pid, signal.SIGKILL)
    assert len(cluster.applications()) == 1

    again = cluster.up()
    assert again.returncode == 0, again.stdout[-3000:]
    heads = [a for a in cluster.applications() if a.status == ApplicationStatus.RUNNING]
    assert len(heads) == 1 and len(cluster.applications()) == 1, "one head, adopted or replaced"

    down = cluster.down()
    assert down.returncode == 0
    assert cluster.applications() == []


@pytest.mark.timeout(600)
def test_gpu_workers_beyond_quota_time_out_are_reported_and_not_retried_hot(
    start_emulator, tmp_path
):
    emulator = start_emulator("--max-gpus", "0")

    def short_launch_timeout(config: dict) -> None:
        config["provider"]["launch_timeout_s"] = 20  # the head starts in 8 s

    cluster = LocalCluster(
        emulator, tmp_path / "work", cluster_name="quota", config_overrides=short_launch_timeout
    )
    assert cluster.up().returncode == 0
    waiting = cluster.start_ray(
        "submit", "--no-config-cache", str(cluster.config_path), str(GPU_TASK)
    )
    try:
        cluster.wait_for(lambda: cluster.workers(), 60, "a GPU worker to be asked for")
        [worker] = cluster.workers()
        assert worker.status == ApplicationStatus.STARTING  # over quota: no engine
        cluster.wait_for(
            lambda: worker.id not in [w.id for w in cluster.workers()],
            60,
            "the stuck worker to be deleted",
        )
        # The autoscaler asks again: one new application, which waits out its own launch
        # timeout in STARTING (a hot loop would have created several by now).
        emulator.reset_stats()

        def others() -> list:
            return [w for w in cluster.workers() if w.id != worker.id]

        cluster.wait_for(lambda: bool(others()), 120, "the autoscaler to ask again")
        retry = others()
        creates = emulator.stats()["requests"].get(
            "POST /api/v2/projects/{project_id}/applications", 0
        )
        assert creates <= 1 and len(retry) == 1, f"{creates} creates: a hot retry loop"
        assert retry[0].status == ApplicationStatus.STARTING
        # The autoscaler got the provider's NodeLaunchException with CML's reason, and
        # `ray status` (the head still serves while a launch waits) shows it.
        monitor = cluster.exec("cat $RAY_TMPDIR/ray/session_latest/logs/monitor.*")
        assert "Failed to launch 1 nodes of type gpu_worker" in monitor.stdout
        assert "over the workspace's quota" in monitor.stdout
        status = cluster.ray_status()
        assert status.returncode == 0
        assert any("gpu_worker" in line for line in status.recent_failures), status.text
    finally:
        os.killpg(waiting.pid, signal.SIGKILL)
        waiting.wait()
    assert cluster.down().returncode == 0
    assert cluster.applications() == []


@pytest.mark.timeout(600)
def test_a_worker_that_fails_while_starting_is_a_launch_failure_in_ray_status(
    start_emulator, tmp_path
):
    """The worker's start command fails while CML still says STARTING (its Ray never ran):
    the application FAILED, is deleted, and `ray status` lists the failed launch."""
    emulator = start_emulator("--start-delay-s", "10")

    def failing_worker_start(config: dict) -> None:
        config["worker_start_ray_commands"] = ["echo cannot start Ray here; exit 3"]

    cluster = LocalCluster(
        emulator, tmp_path / "work", cluster_name="fails", config_overrides=failing_worker_start
    )
    assert cluster.up().returncode == 0
    waiting = cluster.start_ray(
        "submit", "--no-config-cache", str(cluster.config_path), str(GPU_TASK)
    )

    def failure_listed() -> str:
        failures = "\n".join(cluster.ray_status().recent_failures)
        return failures if "gpu_worker: LaunchFailed" in failures else ""

    try:
        cluster.wait_for(failure_listed, 120, "the failed launch in ray status")

        def reason_logged() -> bool:
            monitor = cluster.exec("cat $RAY_TMPDIR/ray/session_latest/logs/monitor.*")
            return "ended as APPLICATION_FAILED while starting" in monitor.stdout

        cluster.wait_for(reason_logged, 60, "the reason in the autoscaler's log")
    finally:
        os.killpg(waiting.pid, signal.SIGKILL)
        waiting.wait()
    assert cluster.down().returncode == 0
    assert cluster.applications() == []
