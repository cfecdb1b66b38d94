"""Autostop with real Ray on the emulator: an idle cluster deletes itself (every application,
the head last) and says so in ``ray-cml status``; work keeps it alive; ``ray up`` brings it
back."""

from __future__ import annotations

import json
import threading
import time

import pytest

from ray_cml_provider.demo.local_cluster import LocalCluster
from tests.conftest import wait_until

pytestmark = pytest.mark.e2e

AUTOSTOP_MINUTES = 0.4  # 24 s: the head looks every 6 s
DRIVER = "python -c 'import ray, time; ray.init(); time.sleep({seconds})'"


@pytest.mark.timeout(600)
def test_an_idle_cluster_stops_itself_and_comes_back_with_ray_up(start_emulator, tmp_path):
    emulator = start_emulator()

    def with_autostop(config: dict) -> None:
        config["provider"]["autostop_minutes"] = AUTOSTOP_MINUTES
        # An idle GPU worker kept by min_workers is not work: it goes with the cluster.
        config["available_node_types"]["gpu_worker"]["min_workers"] = 1

    cluster = LocalCluster(
        emulator, tmp_path / "work", cluster_name="idle", config_overrides=with_autostop
    )
    up = cluster.up()
    assert up.returncode == 0, up.stdout[-3000:]
    [head] = cluster.nodes("head")
    cluster.wait_for(lambda: cluster.workers(), 120, "the min_workers GPU worker")
    [worker] = cluster.workers()

    # A connected driver is work: the cluster outlives its idle timeout while it runs.
    busy_s = AUTOSTOP_MINUTES * 60 * 1.5
    driver = threading.Thread(target=cluster.exec, args=(DRIVER.format(seconds=busy_s),))
    driver.start()
    started = time.monotonic()
    time.sleep(1.0)  # let the driver connect; the assertion below is about the long run
    while time.monotonic() - started < busy_s - 2:
        alive = {a.id for a in cluster.applications()}
        assert {head.id, worker.id} <= alive, "stopped while busy"
        time.sleep(1.0)
    driver.join(60)

    # Idle from now: gone after the timeout (+ a look or two), with a record of why.
    idle_from = time.monotonic()
    wait_until(lambda: cluster.applications() == [], 120, "the idle cluster to stop itself")
    took = time.monotonic() - idle_from
    assert took >= AUTOSTOP_MINUTES * 60 - 1, f"stopped after {took:.0f} s idle: too soon"
    shown = cluster.ray_cml("status", "--json", str(cluster.config_path))
    assert shown.returncode == 0, shown.stdout
    record = json.loads(shown.stdout)["autostopped"]
    assert record["head"] == head.name.rsplit("-", 1)[-1] and record["idle_minutes"] >= 0.39
    table = cluster.ray_cml("status", str(cluster.config_path)).stdout
    assert f"stopped idle at {record['stopped_at']} by its head" in table
    run = cluster.ray_cml("history", "--json", "--run", "latest", str(cluster.config_path))
    assert json.loads(run.stdout)["ended_by"] == "autostop", run.stdout[-2000:]

    # `ray up` of the same config brings it back; the record is history.
    again = cluster.up()
    assert again.returncode == 0, again.stdout[-3000:]
    [back] = cluster.nodes("head")
    status = json.loads(cluster.ray_cml("status", "--json", str(cluster.config_path)).stdout)
    assert status["autostopped"] is None
    assert back.id != head.id
    assert cluster.down().returncode == 0
    assert cluster.applications() == []
