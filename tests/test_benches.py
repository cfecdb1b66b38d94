"""The benches cannot rot: each one starts and explains itself, and the ones that can run in
seconds here run at tiny sizes and print their figures (``gateway_bench``'s is in
``test_node_gateway.py``, ``soak``'s in ``test_soak.py``). They assert nothing about speed:
speed is measured by running them, not in tests."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
# Scripts a bench sends to a head with `ray submit`: they run inside the benches.
PAYLOADS = {"gpu_join_probe.py", "set_gpu_demand.py"}
BENCHES = sorted(p.name for p in BENCH.glob("*.py") if p.name not in PAYLOADS)


def run_bench(name: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCH / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=BENCH.parent,
    )


def test_every_bench_starts_and_explains_itself():
    """Each bench imports what it uses (a renamed module breaks it here) and has --help."""
    assert len(BENCHES) >= 10
    started = {
        name: subprocess.Popen(
            [sys.executable, str(BENCH / name), "--help"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=BENCH.parent,
        )
        for name in BENCHES
    }
    for name, process in started.items():
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, f"{name}: {err[-2000:]}"
        assert out.startswith("usage:"), f"{name}: {out[:200]}"


def test_the_scale_bench_counts_api_calls_per_update():
    """Its light-node part (real node launchers, no Ray) at one worker."""
    ran = run_bench("scale_bench.py", "--skip-ray", "--sizes", "1", timeout=180)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "1 workers:" in ran.stdout and "API calls per update" in ran.stdout, ran.stdout


def test_the_history_bench_prints_what_a_snapshot_costs():
    ran = run_bench("history_bench.py", "--jobs", "5", "--snapshots", "2", timeout=120)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "% of one core" in ran.stdout and "what `ray stop` waits for" in ran.stdout


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_the_scale_bench_times_a_gpu_join_with_ray():
    """Its real-cluster part, once: ``ray up``, a GPU worker's join split by stage (the
    part that once crashed on a worker not RUNNING yet), steady-state calls, ``ray down``."""
    ran = run_bench("scale_bench.py", "--runs", "1", "--sizes", "1", "--window-s", "3", timeout=540)
    assert ran.returncode == 0, ran.stderr[-3000:]
    for figure in ("ray up wall time:", "created->joined", "steady state", "ray down wall time:"):
        assert figure in ran.stdout, ran.stdout


def test_the_metrics_bench_prints_the_heads_share_of_a_core():
    ran = run_bench(
        "metrics_bench.py", "--workers", "1", "--scrapes", "2", "--load-s", "1", timeout=120
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "per scrape:" in ran.stdout and "% of one core" in ran.stdout, ran.stdout
    assert "/metrics as a lever" in ran.stdout, ran.stdout


def test_the_vllm_bench_reads_a_replicas_start_from_its_logs(tmp_path):
    """``vllm_bench``'s sub-stages of a replica's start, read from lines a real run wrote (the
    bench itself needs vLLM and minutes; a reworded line must fail here, not go missing)."""
    spec = importlib.util.spec_from_file_location("vllm_bench", BENCH / "vllm_bench.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["vllm_bench"] = bench  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    replica = "worker-7a03-01000000-31215"
    files = {
        "python-core-worker-7a03_31215.log": "[2026-12-04 17:32:57,358 I 31215 31215] "
        "core_worker_process.cc:872: Constructing CoreWorkerProcess. pid: 31215",
        "worker-9999-01000000-4242.out": ":actor_name:ServeReplica:llm:OpenAiIngress",
        f"{replica}.out": """:job_id:01000000
:actor_name:ServeReplica:llm:LLMServer:smollm2-135m-instruct
(EngineCore pid=31395) INFO 12-04 17:33:16 [core.py:133] Initializing a V1 LLM engine (v0.32.0)
(VllmWorker-0 pid=31436) WARNING 12-04 17:33:23 [vllm.py:725] Model Runner V2 requires Triton
(Worker pid=31436) INFO 12-04 17:33:23 [cpu_model_runner.py:68] Starting to load model /m...
(Worker pid=31436) INFO 12-04 17:33:24 [default_loader.py:501] Loading weights took 0.89 seconds
(EngineCore pid=31395) INFO 12-04 17:33:26 [kv_cache_utils.py:2327] CPU KV cache size: 46,592
(EngineCore pid=31395) INFO 12-04 17:33:29 [core.py:402] init engine (profile, create kv cache, \
warmup model) took 3.37 s""",
        f"{replica}.err": """INFO 2026-12-04 17:33:03,297 llm_LLMServer:smollm2 ng3hyl0u -- \
ray-cml: the model is in the project (/m): no download task
INFO 2026-12-04 17:33:10,458 llm_LLMServer:smollm2 ng3hyl0u -- Using executor class: <class \
'vllm.v1.executor.multiproc_executor.MultiprocExecutor'>""",
        "serve/replica_llm_LLMServer_ng3hyl0u.log": "INFO 2026-12-04 17:33:02,956 "
        "llm_LLMServer:smollm2-135m-instruct ng3hyl0u -- Started initializing replica.",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text + "\n")
    sent = datetime(2026, 12, 4, 17, 32, 50).timestamp()
    stages = dict(bench.replica_stages(tmp_path, sent))
    found = {name: round(when - sent, 1) for name, when in stages.items() if when}
    assert found == {
        "replica: its process up (Ray connected)": 7.4,
        "replica: Serve LLM + vLLM imported": 13.0,
        "replica: engine config made": 20.5,
        "engine core: process up, imported": 26.0,
        "vLLM worker: process up, imported": 33.0,
        "vLLM: weights loading starts": 33.0,
        "vLLM: weights loaded": 34.0,
        "vLLM: memory profiled, KV cache made": 36.0,
        "vLLM: engine initialized (warm-up)": 39.0,
    }, found
    # Steps this run did not take (no download task, no compilation, no graphs on a CPU).
    assert set(stages) - set(found) == {
        "replica: node init task sent",
        "vLLM: torch.compile done",
        "vLLM: graphs captured",
    }


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_the_api_latency_bench_times_a_clusters_life_at_a_latency():
    """Its smallest run: `ray up` and `ray down` of one cluster at 20 ms a request,
    with the requests each made, by route and caller (the emulator's trace)."""
    ran = run_bench(
        "api_latency_bench.py",
        "--latency-ms",
        "20",
        "--up-down-only",
        "--routes",
        timeout=280,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    for figure in ("ray up", "ray down", "round trips", "operator:", "engine:"):
        assert figure in ran.stdout, ran.stdout
