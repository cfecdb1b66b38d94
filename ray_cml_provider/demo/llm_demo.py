"""The vLLM demo, offline: the CPU twin of the Serve LLM app on an emulated cluster.

Starts the emulator with the vLLM environment's Python, ``ray up``, deploys
``vllm_app_cpu.yaml`` with zero replicas, sends one chat completion (the autoscaler creates
a worker application, vLLM starts there, the answer comes back), waits until the idle worker
is given back, and ``ray down``. Run ``make model`` first (or ``make demo-llm``).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import requests

from ray_cml_provider.demo.local_cluster import DEMO_CONFIGS, LocalCluster
from ray_cml_provider.demo.steps import Steps, show_applications
from ray_cml_provider.emulator.harness import RunningEmulator
from ray_cml_provider.llm.serve_configs import load, with_model_source


def run_llm_demo(vllm_python: Path, model_dir: Path) -> int:
    if not vllm_python.exists() or not (model_dir / "config.json").exists():
        print("demo: run 'make model' first (the vLLM environment and the model)", file=sys.stderr)
        return 1
    steps = Steps()
    steps.step("starting the CML emulator (engines run the vLLM environment)")
    with (
        tempfile.TemporaryDirectory(prefix="ray-cml-llm-") as work,
        RunningEmulator(extra_args=["--python", str(vllm_python)]) as emulator,
    ):
        cluster = LocalCluster(emulator, Path(work))
        steps.step("ray up local-emulator.yaml")
        up = cluster.up()
        if up.returncode != 0:
            return steps.failed(up, "ray up")
        show_applications(steps, cluster)
        head_ip = cluster.head_ip()

        steps.step("serve deploy vllm_app_cpu.yaml (min_replicas 0: no worker yet)")
        config = with_model_source(load(DEMO_CONFIGS / "vllm_app_cpu.yaml"), model_dir)
        deploy = cluster.serve_deploy(config, "vllm_app_cpu.yaml")
        if deploy.returncode != 0:
            return steps.failed(deploy, "serve deploy")
        cluster.wait_for_serve_app("llm")  # as `serve status` would show: routes answer now
        show_applications(steps, cluster)

        steps.step(f"POST http://{head_ip}:8000/v1/chat/completions (cold start from zero)")
        started = time.monotonic()
        answer = requests.post(
            f"http://{head_ip}:8000/v1/chat/completions",
            json={
                "model": "smollm2-135m-instruct",
                "max_tokens": 32,
                "messages": [{"role": "user", "content": "Say hello to CML."}],
            },
            timeout=900,
        )
        answer.raise_for_status()
        text = answer.json()["choices"][0]["message"]["content"]
        steps.say(f"answer after {time.monotonic() - started:.0f} s: {text!r}")
        show_applications(steps, cluster)

        steps.step("no traffic: the replica scales to zero, the worker is given back")
        waited = cluster.wait_for(lambda: not cluster.workers(), 300, "the worker to go")
        steps.say(f"worker application deleted after {waited:.0f} s")

        steps.step("ray down")
        cluster.down()
        show_applications(steps, cluster)
        survivors = emulator.stop()
        steps.say("no process left behind" if not survivors else f"killed {survivors}")
    return 0 if not survivors else 1
