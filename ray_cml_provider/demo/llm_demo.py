"""The vLLM demo, offline: the CPU twin of the Serve LLM app on an emulated cluster.

Starts the emulator with the vLLM environment's Python, puts the model in the project's
model cache (``ray-cml model pull``), ``ray up`` with the head's URL open to callers outside
CML (``bypass_authentication``: the endpoint key is then asked for), deploys
``vllm_app_cpu.yaml`` with zero replicas, shows a caller without the key refused, streams
one chat completion with it (the autoscaler creates a worker application, vLLM starts there,
the tokens come back through the head's URL), waits until the idle worker is given back,
and ``ray down``. Run ``make model`` first (or ``make demo-llm``).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from ray_cml_provider.demo.local_cluster import DEMO_CONFIGS, LocalCluster
from ray_cml_provider.demo.steps import Steps, show_applications
from ray_cml_provider.emulator.harness import RunningEmulator
from ray_cml_provider.llm import MODEL_NAME
from ray_cml_provider.llm.model_cache import fill
from ray_cml_provider.llm.openai_calls import stream_chat
from ray_cml_provider.llm.serve_configs import in_project, load


def open_to_callers_outside(config: dict) -> None:
    config["available_node_types"]["head"]["node_config"]["bypass_authentication"] = True


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
        steps.step("ray-cml model pull: the weights go to the project's model cache, once")
        cache, _ = fill(emulator.project_dir, str(model_dir), log=steps.say)
        cluster = LocalCluster(emulator, Path(work), config_overrides=open_to_callers_outside)
        steps.step("ray up local-emulator.yaml (head URL without CML's login: a key is asked)")
        up = cluster.up()
        if up.returncode != 0:
            return steps.failed(up, "ray up")
        show_applications(steps, cluster)

        steps.step("serve deploy vllm_app_cpu.yaml (min_replicas 0: no worker yet)")
        config = in_project(load(DEMO_CONFIGS / "vllm_app_cpu.yaml"), emulator.project_dir)
        deploy = cluster.serve_deploy(config, "vllm_app_cpu.yaml")
        if deploy.returncode != 0:
            return steps.failed(deploy, "serve deploy")
        cluster.wait_for_serve_app("llm")  # as `serve status` would show: routes answer now
        status = cluster.ray_cml("status", "--json", "--cml-only", str(cluster.config_path))
        url = json.loads(status.stdout)["dashboard_url"]
        key = cluster.ray_cml("endpoint-key", str(cluster.config_path)).stdout.strip()
        steps.say(f"the head's URL: {url} (OpenAI API at {url}/v1)")

        steps.step("a caller without the endpoint key")
        refused = stream_chat(f"{url}/v1", MODEL_NAME, "Say hello.", timeout_s=60)
        steps.say(f"HTTP {refused.status}: {refused.error.strip()}")

        steps.step(f"POST {url}/v1/chat/completions with the key, streamed (cold start)")
        print("    ", end="", flush=True)
        answer = stream_chat(
            f"{url}/v1",
            MODEL_NAME,
            "Say hello to CML.",
            key=key,
            on_piece=lambda piece: print(piece, end="", flush=True),
        )
        print(flush=True)
        if answer.status != 200:
            steps.say(f"HTTP {answer.status}: {answer.error}")
            return 1
        steps.say(
            f"first token after {answer.first_token_s:.0f} s from zero replicas, "
            f"{len(answer.pieces)} pieces in {answer.done_at - answer.sent_at:.0f} s"
        )
        show_applications(steps, cluster)

        steps.step("no traffic: the replica scales to zero, the worker is given back")
        waited = cluster.wait_for(lambda: not cluster.workers(), 300, "the worker to go")
        steps.say(f"worker application deleted after {waited:.0f} s")

        steps.step("ray down")
        cluster.down()
        show_applications(steps, cluster)
        steps.say(f"the model stays in the project's cache for the next cluster: {cache}")
        survivors = emulator.stop()
        steps.say("no process left behind" if not survivors else f"killed {survivors}")
    return 0 if not survivors else 1
