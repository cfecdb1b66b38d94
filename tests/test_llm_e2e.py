"""Serve LLM on an emulated cluster: the GPU app's replica shape launches a GPU worker, and
the CPU twin answers chat completions with REAL vLLM from a worker the autoscaler creates
for it, then gives back. Callers outside the cluster reach it at the head's URL (through
the emulator's play of CML's proxy), with the endpoint key when CML's login is bypassed,
and two clusters of one project load the weights from the project's model cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import requests

from ray_cml_provider.cml import ApplicationStatus
from ray_cml_provider.demo.local_cluster import LocalCluster
from ray_cml_provider.llm import MODEL_NAME as MODEL
from ray_cml_provider.llm.model_cache import MARKER, fill
from ray_cml_provider.llm.openai_calls import stream_chat
from ray_cml_provider.llm.preflight import replica_bundles
from ray_cml_provider.llm.serve_configs import in_project, load
from ray_cml_provider.provider.node_provider import decode_tags

CONFIGS = Path(__file__).resolve().parent.parent / "cluster-configs"
VLLM_PYTHON = os.environ.get("RAY_CML_VLLM_PYTHON")
MODEL_DIR = os.environ.get("RAY_CML_MODEL_DIR")

PLACEMENT_PROBE = """
import ray
from ray.util.placement_group import placement_group, remove_placement_group

ray.init(address="auto")
pg = placement_group({bundles!r}, strategy={strategy!r})
ray.get(pg.ready(), timeout=300)
print("placed replica shape on", sorted({{n["NodeManagerAddress"] for n in ray.nodes()
      if n["Alive"] and n["Resources"].get("GPU")}}), flush=True)
remove_placement_group(pg)
"""


def node_type(app) -> str:
    return (decode_tags(app.description) or {}).get("ray-user-node-type", "")


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_gpu_apps_replica_shape_makes_the_autoscaler_launch_the_gpu_worker(
    start_emulator, tmp_path
):
    llm = load(CONFIGS / "vllm_app.yaml")["applications"][0]["args"]["llm_configs"][0]
    bundles, strategy = replica_bundles(llm)
    probe = tmp_path / "replica_shape.py"
    probe.write_text(PLACEMENT_PROBE.format(bundles=bundles, strategy=strategy))
    cluster = LocalCluster(start_emulator(), tmp_path / "work", cluster_name="shape")
    assert cluster.up().returncode == 0
    result = cluster.submit(probe)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "placed replica shape on" in result.stdout
    [worker] = cluster.workers()
    assert node_type(worker) == "gpu_worker" and worker.nvidia_gpu == 1
    assert cluster.down().returncode == 0
    assert cluster.applications() == []


@pytest.mark.llm
@pytest.mark.skipif(
    not (VLLM_PYTHON and MODEL_DIR),
    reason="needs the vLLM environment and model (make test prepares both)",
)
@pytest.mark.timeout(1500)
def test_real_vllm_answers_outside_callers_at_the_heads_url_from_the_projects_model_cache(
    start_emulator, tmp_path
):
    emulator = start_emulator("--python", VLLM_PYTHON)
    cache, fetched = fill(emulator.project_dir, MODEL_DIR, log=print)  # once per project
    assert fetched
    serve_config = in_project(load(CONFIGS / "vllm_app_cpu.yaml"), emulator.project_dir)
    llm = serve_config["applications"][0]["args"]["llm_configs"][0]
    assert llm["model_loading_config"]["model_source"] == str(cache)

    # Cluster one: its head's URL bypasses CML's login, so callers need the endpoint key.
    def public(config: dict) -> None:
        config["available_node_types"]["head"]["node_config"]["bypass_authentication"] = True

    cluster = LocalCluster(emulator, tmp_path / "one", cluster_name="llm", config_overrides=public)
    deployed(cluster, serve_config)
    assert cluster.workers() == [], "zero replicas: no worker before the first request"
    url = status_json(cluster)["dashboard_url"]
    assert url.startswith(f"{emulator.url}/apps/ray-llm-head-")
    key = cluster.ray_cml("endpoint-key", str(cluster.config_path)).stdout.strip()
    assert len(key) >= 40

    marker = tmp_path / "ran-on-the-head"
    job = {"entrypoint": f"touch {marker}"}
    for headers in ({}, {"Authorization": f"Bearer {key}"}):  # the job route: never with the key
        assert (
            requests.post(f"{url}/api/jobs/", json=job, headers=headers, timeout=30).status_code
            == 401
        )
    refused = stream_chat(f"{url}/v1", MODEL, "Name a colour.", timeout_s=60)
    assert refused.status == 401 and "Bearer" in refused.error
    assert cluster.workers() == [], "a refused caller starts nothing"

    answer = stream_chat(f"{url}/v1", MODEL, "Name a colour.", key=key, max_tokens=16)
    assert answer.status == 200, answer.error
    assert answer.text.strip() and len(answer.pieces) > 1  # streamed, piece by piece
    assert answer.fingerprint.startswith("vllm-")
    [worker] = cluster.workers()
    assert node_type(worker) == "llm_cpu_worker"
    assert worker.status == ApplicationStatus.RUNNING
    print(f"cold start to the first token: {answer.first_token_s:.0f} s; {answer.text!r}")
    whole = requests.post(
        f"{url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]},
        timeout=300,
    )
    assert whole.status_code == 200 and whole.json()["usage"]["completion_tokens"] > 0
    assert not marker.exists()

    cluster.wait_for(lambda: not cluster.workers(), 300, "the idle vLLM worker to be deleted")
    assert cluster.down().returncode == 0
    assert cluster.applications() == []

    # Cluster two of the same project, behind CML's login: the weights are not fetched again.
    record = (cache / MARKER).stat().st_mtime_ns
    cached_files = sorted(p.relative_to(cache.parent) for p in cache.parent.rglob("*"))
    assert fill(emulator.project_dir, MODEL_DIR, log=print) == (cache, False)
    second = LocalCluster(emulator, tmp_path / "two", cluster_name="llm2")
    deployed(second, serve_config)
    url = status_json(second)["dashboard_url"]
    assert stream_chat(f"{url}/v1", MODEL, "Hi", timeout_s=60).status == 401  # CML's login
    login = {"Authorization": f"Bearer {emulator.api_key}"}  # CML's proxy takes it
    assert stream_chat(f"{url}/v1", MODEL, "Hi", timeout_s=60, headers=login).status == 401
    second_key = second.ray_cml("endpoint-key", str(second.config_path)).stdout.strip()
    answer = stream_chat(
        f"{url}/v1",
        MODEL,
        "Name a fruit.",
        max_tokens=8,
        headers={**login, "X-Endpoint-Key": second_key},
    )
    assert answer.status == 200 and answer.text.strip(), answer.error
    assert (cache / MARKER).stat().st_mtime_ns == record
    assert sorted(p.relative_to(cache.parent) for p in cache.parent.rglob("*")) == cached_files
    assert second.down().returncode == 0
    assert second.applications() == []


def deployed(cluster: LocalCluster, serve_config: dict) -> None:
    """``ray up`` and ``serve deploy``, then wait as a user watching ``serve status`` does."""
    up = cluster.up()
    assert up.returncode == 0, up.stdout[-3000:]
    deploy = cluster.serve_deploy(serve_config, "vllm_app_cpu.yaml")
    assert deploy.returncode == 0, deploy.stdout[-3000:]
    cluster.wait_for_serve_app("llm")  # the routes answer only once the app is RUNNING


def status_json(cluster: LocalCluster) -> dict:
    shown = cluster.ray_cml("status", "--json", "--cml-only", str(cluster.config_path))
    assert shown.returncode == 0, shown.stdout[-2000:]
    return json.loads(shown.stdout)
