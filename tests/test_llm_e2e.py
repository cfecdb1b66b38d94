"""Serve LLM on an emulated cluster: the GPU app's replica shape launches a GPU worker, and
the CPU twin answers chat completions with REAL vLLM from a worker the autoscaler creates
for it, then gives back."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import requests

from ray_cml_provider.cml import ApplicationStatus
from ray_cml_provider.demo.local_cluster import LocalCluster
from ray_cml_provider.llm.preflight import replica_bundles
from ray_cml_provider.llm.serve_configs import load, with_model_source
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
@pytest.mark.timeout(900)
def test_cpu_twin_serves_real_vllm_from_zero_and_scales_back_to_zero(start_emulator, tmp_path):
    emulator = start_emulator("--python", VLLM_PYTHON)
    cluster = LocalCluster(emulator, tmp_path / "work", cluster_name="llm")
    up = cluster.up()
    assert up.returncode == 0, up.stdout[-3000:]
    head_ip = cluster.head_ip()

    serve_config = with_model_source(load(CONFIGS / "vllm_app_cpu.yaml"), Path(MODEL_DIR))
    deploy = cluster.serve_deploy(serve_config, "vllm_app_cpu.yaml")
    assert deploy.returncode == 0, deploy.stdout[-3000:]
    cluster.wait_for_serve_app("llm")  # the routes answer only once the app is RUNNING
    assert cluster.workers() == [], "zero replicas: no worker before the first request"

    started = time.monotonic()
    answer = requests.post(
        f"http://{head_ip}:8000/v1/chat/completions",
        json={
            "model": "smollm2-135m-instruct",
            "max_tokens": 16,
            "messages": [{"role": "user", "content": "Name a colour."}],
        },
        timeout=600,
    )
    cold_start_s = time.monotonic() - started
    assert answer.status_code == 200, answer.text[-2000:]
    body = answer.json()
    text = body["choices"][0]["message"]["content"]
    assert text.strip(), body
    assert body["usage"]["completion_tokens"] > 0
    assert body["system_fingerprint"].startswith("vllm-")
    [worker] = cluster.workers()
    assert node_type(worker) == "llm_cpu_worker"
    assert worker.status == ApplicationStatus.RUNNING
    print(f"cold start to first answer: {cold_start_s:.0f} s; answer: {text!r}")

    cluster.wait_for(lambda: not cluster.workers(), 300, "the idle vLLM worker to be deleted")
    assert cluster.down().returncode == 0
    assert cluster.applications() == []
