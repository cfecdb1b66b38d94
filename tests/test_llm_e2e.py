"""Serve LLM on an emulated cluster: the GPU app's replica shape launches a GPU worker, and
the CPU twin answers chat completions with REAL vLLM from a worker the autoscaler creates
for it, then gives back. Callers outside the cluster reach it at the head's URL (through
the emulator's play of CML's proxy), with the endpoint key when CML's login is bypassed,
and the weights come from the project's model cache, filled once."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
from pathlib import Path
from urllib.parse import urlparse

import pytest
import requests

from ray_cml_provider.cml import ApplicationStatus
from ray_cml_provider.demo.local_cluster import LocalCluster
from ray_cml_provider.llm import MODEL_NAME as MODEL
from ray_cml_provider.llm.model_cache import MARKER, fill
from ray_cml_provider.llm.openai_calls import stream_chat
from ray_cml_provider.llm.preflight import replica_bundles
from ray_cml_provider.llm.replica_start import CACHE_DIR, newest_version
from ray_cml_provider.llm.serve_configs import in_project, load
from ray_cml_provider.provider.node_provider import decode_tags
from tests.conftest import wait_until

CONFIGS = Path(__file__).resolve().parent.parent / "cluster-configs"
VLLM_PYTHON = os.environ.get("RAY_CML_VLLM_PYTHON")
MODEL_DIR = os.environ.get("RAY_CML_MODEL_DIR")
PROMETHEUS = os.environ.get("RAY_CML_PROMETHEUS")

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

    # The head's URL bypasses CML's login, so callers need the endpoint key (the way through
    # CML's login, with X-Endpoint-Key, is test_head_recovery's). The head runs Prometheus.
    def public_with_prometheus(config: dict) -> None:
        config["available_node_types"]["head"]["node_config"]["bypass_authentication"] = True
        if PROMETHEUS:  # as a runtime that has one, or a binary in the project, would
            config["provider"]["prometheus"] = PROMETHEUS

    cluster = LocalCluster(
        emulator,
        tmp_path / "one",
        cluster_name="llm",
        config_overrides=public_with_prometheus,
    )
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
    what_the_model_does(cluster, url, key)

    the_heads_prometheus_serves_the_dashboard(cluster)

    cluster.wait_for(lambda: not cluster.workers(), 300, "the idle vLLM worker to be deleted")
    assert cluster.down().returncode == 0
    assert cluster.applications() == []
    # The replica's start callback kept vLLM's cache in the project, whole, for the next
    # replica of any cluster of the project (the model's info, found once per project).
    [key] = (emulator.project_dir / CACHE_DIR / MODEL).iterdir()
    published = newest_version(key)
    assert "-cpu-" in key.name and published is not None
    assert any(p.is_file() for p in published.rglob("*"))
    # Another cluster of the project would load the same weights: they are not fetched again.
    record = (cache / MARKER).stat().st_mtime_ns
    assert fill(emulator.project_dir, MODEL_DIR, log=print) == (cache, False)
    assert (cache / MARKER).stat().st_mtime_ns == record


LONG_PROMPT = "Summarise this in one line: " + "the cluster grows GPU workers for its model. " * 30


def what_the_model_does(cluster: LocalCluster, url: str, key: str) -> None:
    """Under a steady load, ``ray-cml top --json`` reports what the client measures (within
    20%: requests per second, time to first token, generated tokens per second), and the
    head's ``/metrics`` holds Serve's and vLLM's series, for the metrics key only."""
    answers: list = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            answers.append(stream_chat(f"{url}/v1", MODEL, LONG_PROMPT, key=key, max_tokens=32))

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(answers) >= 3, 120, "the steady load")
        steady_from = len(answers)
        top = cluster.ray_cml("top", "--json", str(cluster.config_path), timeout_s=240)
        steady = answers[steady_from:]
    finally:
        stop.set()
        thread.join(120)
    assert top.returncode == 0, top.stderr[-3000:]
    report = json.loads(top.stdout)
    assert all(a.status == 200 for a in steady) and len(steady) >= 5, len(steady)
    elapsed = steady[-1].done_at - steady[0].sent_at
    client = {
        "requests_per_s": len(steady) / elapsed,
        "ttft_s": sum(a.first_token_s for a in steady) / len(steady),
        "generated_tokens_per_s": sum(a.completion_tokens for a in steady) / elapsed,
    }
    [model] = [m for m in report["models"] if m["model"] == MODEL]
    # Every request passes Serve LLM's ingress once (then its model's server).
    [ingress] = [d for d in report["deployments"] if d["deployment"] == "OpenAiIngress"]
    servers = [d for d in report["deployments"] if d["deployment"].startswith("LLMServer")]
    shown = {
        "requests_per_s": ingress["requests_per_s"],
        "ttft_s": report["door"]["first_token_mean_s"],
        "generated_tokens_per_s": model["generated_tokens_per_s"],
    }
    print(f"client {client}\ntop    {shown}, the engine's own: {model['ttft_mean_s']:.3f} s")
    assert 0 < model["ttft_mean_s"] <= shown["ttft_s"]  # the engine's part of it
    for figure, measured in client.items():
        assert shown[figure] == pytest.approx(measured, rel=0.2), (figure, shown, client)
    assert servers and sum(d["replicas_healthy"] for d in servers) >= 1, report["deployments"]
    assert any(n["node_type"] == "llm_cpu_worker" for n in report["nodes"])
    assert any("Adding" in d for d in report["decisions"]), report["decisions"]

    metrics_key = cluster.ray_cml("metrics-key", str(cluster.config_path)).stdout.strip()
    scrape = requests.get(f"{url}/metrics", headers={"Authorization": f"Bearer {metrics_key}"})
    assert scrape.status_code == 200
    assert "ray_serve_deployment_request_counter_total{" in scrape.text
    assert "ray_vllm_generation_tokens_total{" in scrape.text
    assert 'ray_cml_node_type="llm_cpu_worker"' in scrape.text
    for refused in ({}, {"Authorization": f"Bearer {key}"}):  # the endpoint key reads no figures
        assert requests.get(f"{url}/metrics", headers=refused, timeout=30).status_code == 401
    a_prometheus_scrapes(
        f"{url}/metrics",
        metrics_key,
        ["ray_serve_deployment_request_counter_total", "ray_vllm_generation_tokens_total"],
    )


def prometheus_holds(prometheus: str, name: str) -> bool:
    """Whether the Prometheus at ``prometheus`` has samples of ``name``."""
    try:
        answer = requests.get(
            f"{prometheus}/api/v1/query", params={"query": f"count({name})"}, timeout=5
        ).json()
    except (requests.RequestException, ValueError):
        return False
    return bool(answer.get("data", {}).get("result"))


def the_heads_prometheus_serves_the_dashboard(cluster: LocalCluster) -> None:
    """``provider.prometheus``: the head runs it on Ray's discovery of every node's export;
    Ray's dashboard finds it, and it holds Serve's and vLLM's series."""
    if not PROMETHEUS:
        print("no Prometheus here (RAY_CML_PROMETHEUS): `make test` provides one")
        return
    report = status_json(cluster)
    health = requests.get(
        f"{report['dashboard_address']}/api/prometheus_health",
        headers=cluster.auth_headers(),
        timeout=30,
    )
    assert health.status_code == 200 and "prometheus running" in health.text, health.text
    host = cluster.exec("echo $RAY_PROMETHEUS_HOST").stdout.strip().splitlines()[-1]
    assert host.startswith("http://127.0.0.1:"), host  # the head's loopback only
    for name in ("ray_serve_deployment_request_counter_total", "ray_vllm_generation_tokens_total"):
        wait_until(lambda name=name: prometheus_holds(host, name), 90, f"the head's {name}")


def a_prometheus_scrapes(metrics_url: str, metrics_key: str, series: list[str]) -> None:
    """A real Prometheus (make test unpacks Debian's) scrapes the head's URL through the
    emulator's play of CML's proxy with the metrics key, as docs/observability.md says, and
    holds the series."""
    if not PROMETHEUS:
        print("no Prometheus here (RAY_CML_PROMETHEUS): `make test` provides one")
        return
    target = urlparse(metrics_url)
    with tempfile.TemporaryDirectory(prefix="prom-") as work:
        key_file = Path(work) / "metrics_key"
        key_file.write_text(metrics_key)
        config = {
            "global": {"scrape_interval": "2s", "scrape_timeout": "2s"},
            "scrape_configs": [
                {
                    "job_name": "ray-cml",
                    "scheme": target.scheme,
                    "metrics_path": target.path,
                    "authorization": {"credentials_file": str(key_file)},
                    "static_configs": [{"targets": [target.netloc]}],
                }
            ],
        }
        (Path(work) / "prometheus.yml").write_text(json.dumps(config))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        prometheus = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={work}/prometheus.yml",
                f"--storage.tsdb.path={work}/data",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            for name in series:
                wait_until(
                    lambda name=name: prometheus_holds(f"http://127.0.0.1:{port}", name),
                    90,
                    f"Prometheus holding {name}",
                )
        finally:
            os.killpg(prometheus.pid, signal.SIGTERM)
            prometheus.wait(30)


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
