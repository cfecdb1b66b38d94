"""Shared fixtures: real emulators on free ports, cleaned up with a leak check."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ray_cml_provider.cml import CMLClient, RetryPolicy
from ray_cml_provider.emulator.harness import RunningEmulator

# A test engine: dumps its environment and cwd, then behaves as MODE says.
ENGINE_SCRIPT = r"""
import json, os, signal, subprocess, sys, time
app_id = os.environ["CDSW_APP_ID"]
with open(f"engine-{app_id}-{os.getpid()}.json", "w") as f:
    dump = {"env": dict(os.environ), "cwd": os.getcwd(), "pid": os.getpid()}
    json.dump({**dump, "executable": sys.executable}, f)
mode = os.environ.get("MODE", "sleep")
print(f"engine {app_id} up in mode {mode}", flush=True)
if mode == "exit":
    sys.exit(int(os.environ.get("EXIT_CODE", "0")))
if mode == "ignore_term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if mode == "spawn_child":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(f"child-{app_id}.pid", "w") as f:
        f.write(str(child.pid))
time.sleep(600)
"""


def ip_block_args() -> list[str]:
    """Under pytest-xdist each worker's emulators take their own loopback block (127.N.x.y),
    so clusters of tests running side by side never share an address or a Ray port."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    return ["--ip-block", str(int(worker.removeprefix("gw")) + 1)] if worker else []


FAST_RETRY = RetryPolicy(max_attempts=8, backoff_base_s=0.01, backoff_cap_s=0.05)


def wait_until(predicate: Callable[[], object], timeout_s: float = 20, what: str = "") -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what or predicate}")
        time.sleep(0.05)


def engine_dump(project_dir: Path, app_id: str) -> dict:
    """The environment dump of the newest engine process of ``app_id``."""
    dumps = sorted(project_dir.glob(f"engine-{app_id}-*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(dumps[-1].read_text()) if dumps else {}


@pytest.fixture
def start_emulator(request, tmp_path: Path) -> Callable[..., RunningEmulator]:
    """Start emulators with extra flags; on teardown stop them and fail on leftovers.

    Applications start as slowly as the emulator's default (8 s: a worker's raylet joins
    before RUNNING) unless the test module sets ``EMULATOR_ARGS``: modules whose engines run
    no Ray use a shorter, still non-zero, start. A test's own flags come last and win.
    """
    module_args = list(getattr(request.module, "EMULATOR_ARGS", []))
    started: list[RunningEmulator] = []

    def start(*extra_args: str, api_key: str | None = None) -> RunningEmulator:
        n = len(started)
        project_dir = tmp_path / f"project{n}"
        project_dir.mkdir()
        (project_dir / "engine.py").write_text(ENGINE_SCRIPT)
        emulator = RunningEmulator(
            project_dir=project_dir,
            log_dir=tmp_path / f"logs{n}",
            api_key=api_key,
            extra_args=["--stop-grace-s", "1", *ip_block_args(), *module_args, *extra_args],
        )
        started.append(emulator)
        return emulator

    yield start
    survivors = [pid for emulator in started for pid in emulator.stop()]
    assert not survivors, f"application processes outlived the emulator: {survivors}"


@pytest.fixture
def emulator(start_emulator) -> RunningEmulator:
    return start_emulator()


@pytest.fixture
def client(emulator: RunningEmulator) -> CMLClient:
    with CMLClient(**emulator.client_settings(), retry=FAST_RETRY) as cml:
        yield cml


@pytest.fixture
def runtime(client: CMLClient) -> str:
    return client.list_runtimes()[0]["image_identifier"]


def engine_app(name: str, runtime: str, mode: str = "sleep", **fields) -> dict:
    """The create body of an application running tests' engine.py in ``mode``."""
    env = {"MODE": mode, **fields.pop("environment", {})}
    return {
        "name": name,
        "subdomain": name,
        "script": "engine.py",
        "cpu": 1,
        "memory": 1,
        "runtime_identifier": runtime,
        "environment": env,
        **fields,
    }


@pytest.fixture
def make_app(client: CMLClient, runtime: str):
    """Create an application running tests' engine.py; keyword arguments override fields."""
    counter = iter(range(1000))

    def make(name: str | None = None, mode: str = "sleep", **fields):
        name = name or f"app-{next(counter)}"
        return client.create_application(engine_app(name, runtime, mode, **fields))

    return make


TIER_ORDER = ("llm", "soak", "e2e", "engines")  # the longest tests first
# Within a tier, the modules whose tests took longest in CI (pytest's --durations) first, so
# that the last test to start is a short one.
LONGEST_MODULES = (
    "test_llm_e2e",
    "test_batch_llm",
    "test_bare_runtime",
    "test_ray_e2e",
    "test_head_recovery",
    "test_autostop",
    "test_jobs",
    "test_wheel",
    "test_slow_start",
)


def pytest_collection_modifyitems(config, items):
    """Longest tiers first, so that parallel workers (make test runs pytest-xdist) do not
    finish the short tests together and then wait on one long test."""

    def tier(item) -> int:
        marks = {mark.name for mark in item.iter_markers()}
        return next((i for i, name in enumerate(TIER_ORDER) if name in marks), len(TIER_ORDER))

    def module_rank(item) -> int:
        name = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        return LONGEST_MODULES.index(name) if name in LONGEST_MODULES else len(LONGEST_MODULES)

    items.sort(key=lambda item: (tier(item), module_rank(item)))
