"""The benches cannot rot: each one starts and explains itself, and the ones that can run in
seconds here run at tiny sizes and print their figures (``gateway_bench``'s is in
``test_node_gateway.py``, ``soak``'s in ``test_soak.py``). They assert nothing about speed:
speed is measured by running them, not in tests."""

from __future__ import annotations

import subprocess
import sys
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
    ran = run_bench("metrics_bench.py", "--workers", "1", "--scrapes", "2", timeout=120)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "per scrape:" in ran.stdout and "% of one core" in ran.stdout, ran.stdout
