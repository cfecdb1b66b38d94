"""The soak's short variant: one full scale-up / scale-down cycle of 2 GPU workers that take
20 s to start, with a quarter of the CML API requests failing (429/503), latency, and some
answers lost."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.soak

SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak.py"


def load_soak():
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(900)
def test_one_cycle_under_api_faults_leaves_no_duplicate_and_no_orphan():
    results = load_soak().soak(
        minutes=10,
        workers=2,
        fault_rate=0.25,
        latency_ms=10,
        drop_rate=0.02,
        max_cycles=1,
        start_delay_s=20,
    )
    print(results)
    assert results["cycles"] == 1  # scaled to 2 workers and back to 0 despite the faults
    assert results["max_workers_at_once"] == 2
    assert results["duplicates"] == 0
    assert results["ray_status_pending"] == 0  # nothing left waiting in Ray's view
    assert results["orphan_applications"] == 0 and results["orphan_processes"] == 0
    assert results["down_ok"]
    assert results["faults_injected"] > 0
