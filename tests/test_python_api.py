"""The Python API with real Ray on the emulator: up (waiting for min_workers), a scale hint,
exec, status and down, in one script-like run."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import yaml

from ray_cml_provider import Cluster
from ray_cml_provider.api import ClusterError
from ray_cml_provider.emulator.processes import live_group_members
from ray_cml_provider.provider.ray_auth import session_line

pytestmark = pytest.mark.e2e

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "cluster-configs"


def gpu_workers_in_ray(cluster: Cluster) -> list[str]:
    return [
        n.node_id
        for n in cluster.status().nodes
        if n.node_type == "gpu_worker" and n.ray_state in ("alive", "idle")
    ]


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(1)
    return value


def test_a_bad_config_raises_one_line_before_any_api_call(tmp_path):
    config = yaml.safe_load((REPO_CONFIGS / "local-emulator.yaml").read_text())
    config["available_node_types"]["gpu_worker"]["node_config"]["nvidia_gpu"] = -1
    with pytest.raises(ClusterError, match=r"gpu_worker\.node_config\.nvidia_gpu: -1 is less"):
        Cluster(config)
    with pytest.raises(ClusterError, match="cannot read"):
        Cluster(tmp_path / "missing.yaml")
    good = Cluster(yaml.safe_load((REPO_CONFIGS / "local-emulator.yaml").read_text()))
    with pytest.raises(ClusterError, match="not a directory"):  # before any API call
        good.submit_job("python main.py", working_dir=tmp_path / "missing")


@pytest.mark.timeout(600)
def test_up_scale_hint_exec_status_down(start_emulator, monkeypatch):
    emulator = start_emulator()
    monkeypatch.setenv("CML_HOST", emulator.url)
    monkeypatch.setenv("CML_PROJECT_ID", emulator.project_id)
    monkeypatch.setenv("CML_API_KEY", emulator.api_key)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    config = yaml.safe_load((REPO_CONFIGS / "local-emulator.yaml").read_text())
    config["cluster_name"] = "api"
    config["available_node_types"]["gpu_worker"]["min_workers"] = 1
    cluster = Cluster(config)
    progress: list[str] = []

    status = cluster.up(progress=progress.append)
    assert len(gpu_workers_in_ray(cluster)) == 1  # up() waited for min_workers to join Ray
    assert status.head and re.match(
        r"http://127\.0\.0\.1:\d+/apps/ray-api-head-", status.dashboard_url
    )
    assert re.match(r"http://127\.\d+\.\d+\.\d+:\d+$", status.dashboard_address)
    assert progress[-4].startswith("cluster api is up after ")
    assert progress[-2] == f"  Ray token: first {session_line(status.auth_token_path)}"
    assert f'ray.init(address="{status.gcs_address}")' in progress[-1]
    assert cluster.gcs_address == status.gcs_address

    assert cluster.exec("echo on $RAY_CML_NODE_KIND").strip().endswith("on head")
    job = cluster.submit_job(["python", "-c", "print('from a job')"])
    assert job.wait(timeout_s=180) == "SUCCEEDED" and "from a job" in job.logs()

    cluster.request_resources(bundles=[{"GPU": 1}] * 2)  # warm a second GPU worker
    two = wait_for(lambda: len(gpu_workers_in_ray(cluster)) == 2, 120, "a second GPU worker")
    assert two
    pgids = {p["pgid"] for p in emulator.processes()}
    cluster.request_resources()  # cleared: back to min_workers once idle
    wait_for(lambda: len(gpu_workers_in_ray(cluster)) == 1, 120, "the extra worker to go")

    with cluster:  # a cluster used as a context manager is deleted on the way out
        pass
    assert cluster.status().nodes == []
    wait_for(lambda: emulator.processes() == [], 30, "engines to end")
    assert not any(live_group_members(pgid) for pgid in pgids)
