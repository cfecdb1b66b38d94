"""Head recovery under a running Serve application. Prints numbers; asserts nothing.

    .venv/bin/python bench/head_recovery_bench.py [--runs 2] [--restart-delay-s 0]
                                                  [--start-delay-s 8] [--head-lost-timeout-s S]
                                                  [--app echo|vllm]

Each run: a fresh emulator that restarts a FAILED application after ``--restart-delay-s``
(CML: 300 s by default) and plays ``--start-delay-s`` of application start (the emulator's
default, 8 s); ``ray up`` of a cluster with ``provider.head_recovery: true``; the echo Serve
application (``ray_cml_provider/demo/echo_app.py``, one replica on a GPU worker); then the
head's engine is killed (``:crash``, as a node failure) and the clock runs until the
application answers again through the head's URL, as an outside caller sees it. ``--app
vllm`` serves the CPU twin of the vLLM app instead (real vLLM; needs RAY_CML_VLLM_PYTHON
and RAY_CML_MODEL_DIR, as ``make test`` sets them): the crash comes once its replica has
answered, and the clock runs until a chat completion answers again.

Columns: the head application back (RUNNING), the worker's Ray rejoined the new head,
the endpoint answering; applications created during recovery (0: nothing replaced or
duplicated) and the cluster's applications afterwards (head + worker = 2). Workers wait
``--head-lost-timeout-s`` for the head (default: the restart delay + 180 s); shorter than
the restart delay, they delete themselves and the recovered autoscaler replaces them
(``created`` 1, ``worker_rejoined_s`` empty).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import tempfile
import time
from pathlib import Path

import requests

from ray_cml_provider.demo.echo_app import serve_config
from ray_cml_provider.demo.local_cluster import LocalCluster
from ray_cml_provider.emulator.harness import RunningEmulator
from ray_cml_provider.llm import MODEL_NAME
from ray_cml_provider.llm.model_cache import fill
from ray_cml_provider.llm.serve_configs import in_project, load

VLLM_APP = Path(__file__).resolve().parent.parent / "cluster-configs" / "vllm_app_cpu.yaml"

CREATE = "POST /api/v2/projects/{project_id}/applications"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_run(
    restart_delay_s: float, start_delay_s: float, head_lost_timeout_s: float, app: str
) -> dict[str, float | str]:
    serve_port = free_port() if app == "echo" else 8000  # the vLLM config's own port
    emulator_args = ["--restart-failed", "1", "--restart-delay-s", str(restart_delay_s)]
    emulator_args += ["--start-delay-s", str(start_delay_s), "--stop-grace-s", "1"]
    if app == "vllm":
        emulator_args += ["--python", os.environ["RAY_CML_VLLM_PYTHON"]]
    with (
        tempfile.TemporaryDirectory(prefix="bench-") as work,
        RunningEmulator(extra_args=emulator_args) as emulator,
    ):

        def with_recovery(config: dict) -> None:
            config["provider"]["head_recovery"] = True
            config["provider"]["head_lost_timeout_s"] = head_lost_timeout_s
            head = config["available_node_types"]["head"]["node_config"]
            head["environment"]["RAY_CML_SERVE_PORT"] = str(serve_port)

        cluster = LocalCluster(
            emulator, Path(work), cluster_name="bench", config_overrides=with_recovery
        )
        try:
            if cluster.up().returncode != 0:
                return {"error": "ray up failed"}
            if app == "echo":
                config, name = serve_config(port=serve_port), "echo"
            else:
                fill(emulator.project_dir, os.environ["RAY_CML_MODEL_DIR"], log=lambda _: None)
                config, name = in_project(load(VLLM_APP), emulator.project_dir), "llm"
            if cluster.serve_deploy(config).returncode != 0:
                return {"error": "serve deploy failed"}
            cluster.wait_for_serve_app(name, 300)
            [head] = cluster.nodes("head")
            base = f"{emulator.url}/apps/{head.subdomain}/v1"
            key = cluster.ray_cml("endpoint-key", str(cluster.config_path)).stdout.strip()
            login = {"Authorization": f"Bearer {emulator.api_key}", "X-Endpoint-Key": key}

            def answers() -> bool:
                try:
                    if app == "echo":
                        reply = requests.get(f"{base}/echo", headers=login, timeout=5)
                    else:
                        chat = {"model": MODEL_NAME, "max_tokens": 1}
                        chat["messages"] = [{"role": "user", "content": "Hi"}]
                        reply = requests.post(
                            f"{base}/chat/completions", json=chat, headers=login, timeout=30
                        )
                except requests.RequestException:
                    return False
                return reply.status_code == 200

            cluster.wait_for(answers, 400, f"the {name} app through the head's URL")
            [worker] = cluster.workers()
            emulator.reset_stats()
            crashed = time.monotonic()
            emulator.crash(head.id)
            marks: dict[str, float] = {}
            went_down = False
            worker_log = Path(
                next(p for p in emulator.processes() if p["id"] == worker.id)["log_path"]
            )
            deadline = crashed + restart_delay_s + 600
            wanted = {"head_running_s", "answers_s"}
            while not wanted <= marks.keys() and time.monotonic() < deadline:
                now = time.monotonic() - crashed
                if "head_running_s" not in marks:
                    status = next(a for a in cluster.applications() if a.id == head.id).status
                    if status != "APPLICATION_RUNNING":
                        went_down = True  # CML's status lags the crash by a reconcile
                    elif went_down:
                        marks["head_running_s"] = now
                if "worker_rejoined_s" not in marks and re.search(
                    "Ray started again", worker_log.read_text(errors="replace")
                ):
                    marks["worker_rejoined_s"] = now
                if "answers_s" not in marks and answers():
                    marks["answers_s"] = now
                time.sleep(0.25)
            return {
                **marks,
                "created": emulator.stats()["requests"].get(CREATE, 0),
                "applications": len(cluster.applications()),
            }
        except TimeoutError as exc:
            return {"error": str(exc)}
        finally:
            cluster.down()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--restart-delay-s", type=float, default=0.0)
    parser.add_argument("--start-delay-s", type=float, default=8.0)
    parser.add_argument("--head-lost-timeout-s", type=float)
    parser.add_argument("--app", choices=["echo", "vllm"], default="echo")
    args = parser.parse_args()
    head_lost_s = args.head_lost_timeout_s or args.restart_delay_s + 180
    columns = ["head_running_s", "worker_rejoined_s", "answers_s", "created", "applications"]
    print(
        f"restart delay {args.restart_delay_s:g} s, start delay {args.start_delay_s:g} s, "
        f"head_lost_timeout_s {head_lost_s:g}, app {args.app}"
    )
    print("run  " + "  ".join(f"{c:>17}" for c in columns))
    for run in range(1, args.runs + 1):
        row = one_run(args.restart_delay_s, args.start_delay_s, head_lost_s, args.app)
        if "error" in row:
            print(f"{run:>3}  error: {row['error']}")
            continue
        cells = [row.get(c, float("nan")) for c in columns]
        print(
            f"{run:>3}  "
            + "  ".join(f"{c:>17.1f}" if isinstance(c, float) else f"{c:>17}" for c in cells)
        )


if __name__ == "__main__":
    main()
