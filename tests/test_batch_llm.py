"""Batch LLM inference as a CML Job: the documented recipe (``cluster-configs/batch``) run by
the emulator's CML Jobs with the environment CML gives a job. The job brings a cluster up,
ships the batch's folder through the project, runs Ray Data's LLM processor with REAL vLLM
(the CPU twin) on a GPU worker the autoscaler adds for it, writes one answer per prompt back
to the project, and leaves no application once the batch ended."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from ray_cml_provider.demo.local_cluster import LocalCluster
from ray_cml_provider.llm import MODEL_NAME
from ray_cml_provider.llm.model_cache import MODELS_DIR, fill
from ray_cml_provider.provider.node_provider import decode_tags

CONFIGS = Path(__file__).resolve().parent.parent / "cluster-configs"
VLLM_PYTHON = os.environ.get("RAY_CML_VLLM_PYTHON")
MODEL_DIR = os.environ.get("RAY_CML_MODEL_DIR")
PROMPTS = [
    "Name a colour.",
    "What is two plus two?",
    "Name a fruit.",
    "Say hello in French.",
    "Name an animal that swims.",
    "What is the capital of Italy?",
]


def with_a_roomier_gpu_worker(config: dict) -> None:
    # A real GPU worker has several CPUs: the engine's and the light stages' fit on it.
    config["available_node_types"]["gpu_worker"]["node_config"]["cpu"] = 3


@pytest.mark.llm
@pytest.mark.skipif(
    not (VLLM_PYTHON and MODEL_DIR),
    reason="needs the vLLM environment and model (make test prepares both)",
)
@pytest.mark.timeout(1200)
def test_a_cml_job_runs_batch_inference_on_a_cluster_made_for_it(start_emulator, tmp_path):
    emulator = start_emulator("--python", VLLM_PYTHON)
    project = emulator.project_dir
    fill(project, MODEL_DIR, log=print)  # the project's model cache (ray-cml model pull)
    # What the project holds: this repository's batch folder, a cluster YAML, the prompts.
    shutil.copytree(CONFIGS / "batch", project / "cluster-configs" / "batch")
    cluster = LocalCluster(
        emulator,
        project / "cluster-configs",
        cluster_name="nightly",
        config_overrides=with_a_roomier_gpu_worker,
    )
    (project / "data").mkdir()
    rows = [{"prompt": prompt, "n": n} for n, prompt in enumerate(PROMPTS)]
    (project / "data" / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    jobs = f"{emulator.url}/api/v2/projects/{emulator.project_id}/jobs"
    login = {"Authorization": f"Bearer {emulator.api_key}"}
    arguments = (
        "--cluster cluster-configs/nightly.yaml"
        f" --model {MODELS_DIR}/{MODEL_NAME} --prompts data/prompts.jsonl"
        " --out data/answers.jsonl --cpu-twin --max-tokens 12"
    )
    job = requests.post(
        jobs,
        headers=login,
        json={
            "name": "nightly batch",
            "script": "cluster-configs/batch/cml_job.py",
            "arguments": arguments,
            "runtime_identifier": cluster.client.list_runtimes()[0]["image_identifier"],
            "cpu": 1,
            "memory": 2,
        },
        timeout=10,
    ).json()
    run = requests.post(f"{jobs}/{job['id']}/runs", headers=login, json={}, timeout=10).json()

    # While it runs: which workers the cluster gets.
    seen_types: set[str] = set()
    deadline = time.monotonic() + 1000
    while time.monotonic() < deadline:
        status = requests.get(f"{jobs}/{job['id']}/runs/{run['id']}", headers=login, timeout=10)
        if status.json()["status"] in ("ENGINE_SUCCEEDED", "ENGINE_FAILED", "ENGINE_STOPPED"):
            break
        for worker in cluster.workers():
            seen_types.add((decode_tags(worker.description) or {}).get("ray-user-node-type", ""))
        time.sleep(2)
    log = (emulator.log_dir / f"{run['id']}.log").read_text()
    assert status.json()["status"] == "ENGINE_SUCCEEDED", log[-5000:]

    answers = [json.loads(line) for line in (project / "data" / "answers.jsonl").open()]
    assert sorted(a["n"] for a in answers) == list(range(len(PROMPTS)))  # one per prompt
    assert all(a["prompt"] == PROMPTS[a["n"]] and a["answer"].strip() for a in answers)
    assert f"{len(PROMPTS)}/{len(PROMPTS)} prompts answered" in log  # progress, in the job log
    assert "gpu_worker" in seen_types, seen_types  # the engine's GPU brought a GPU worker
    assert "cluster nightly deleted" in log
    assert cluster.applications() == []  # the cluster went with the batch, workers and all
    shown = cluster.ray_cml("history", "--json", "--run", "latest", str(cluster.config_path))
    record = json.loads(shown.stdout)
    assert record["ended_by"].endswith("succeeded (job submit --down)")
    assert "gpu_worker" in {node["node_type"] for node in record["nodes"]}


def test_bad_prompts_are_one_line_before_any_engine(tmp_path):
    batch = CONFIGS / "batch" / "batch_llm.py"
    (tmp_path / "bad.jsonl").write_text('{"prompt": "fine"}\n{"no": "prompt"}\n')
    (tmp_path / "broken.jsonl").write_text('{"prompt": "fine"}\n{broken\n')
    cases = {
        "bad.jsonl": "bad.jsonl:2: each line must be a JSON object with a 'prompt'",
        "broken.jsonl": "broken.jsonl:2: not JSON",
        "missing.jsonl": "missing.jsonl: No such file or directory",
    }
    for prompts, message in cases.items():
        ran = subprocess.run(
            [sys.executable, str(batch), "--model", "m", "--prompts", prompts, "--out", "o"],
            env={**os.environ, "RAY_CML_PROJECT_DIR": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert ran.returncode == 1 and message in ran.stderr, ran.stderr[-2000:]
        assert "Traceback" not in ran.stderr
    assert not (tmp_path / "o").exists()
