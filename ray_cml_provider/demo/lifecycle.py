"""The main job, runnable offline: the emulator and one application's whole life.

Starts the bundled CML emulator, uploads a small web app into the project, creates it as a
CML application through the API client, waits for it to run, calls it on its own engine
address, stops it, deletes it, and stops the emulator, printing each step with its timing.
(The full ``ray up`` demo replaces this once the node provider lands.)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import requests

from ray_cml_provider.cml import ApplicationStatus, CMLClient, CMLError
from ray_cml_provider.emulator.harness import RunningEmulator

APP_SCRIPT = Path(__file__).with_name("web_app.py")


def _step(message: str) -> float:
    print(f"==> {message}", flush=True)
    return time.monotonic()


def _done(started: float, detail: str = "") -> None:
    suffix = f": {detail}" if detail else ""
    print(f"    done in {time.monotonic() - started:.2f} s{suffix}", flush=True)


def _wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.2)


def run_lifecycle_demo() -> int:
    started = _step("starting the CML emulator")
    with RunningEmulator() as emulator:
        _done(started, f"{emulator.url}, project dir {emulator.project_dir}")
        client = CMLClient(**emulator.client_settings())

        started = _step("uploading demo_app.py to the project filesystem")
        client.upload_file("demo_app.py", APP_SCRIPT.read_bytes(), overwrite=True)
        _done(started, ", ".join(f.path for f in client.list_files()))

        started = _step("creating the application 'ray-cml-demo' (1 vCPU, 1 GB)")
        runtime = client.list_runtimes()[0]["image_identifier"]
        app = client.create_application(
            {
                "name": "ray-cml-demo",
                "subdomain": "ray-cml-demo",
                "description": "ray-cml-provider lifecycle demo",
                "script": "demo_app.py",
                "cpu": 1,
                "memory": 1,
                "runtime_identifier": runtime,
            }
        )
        _done(started, f"id {app.id}, status {app.status}")

        started = _step("waiting for it to run")
        _wait_for(
            lambda: client.get_application(app.id).status == ApplicationStatus.RUNNING,
            60,
            "APPLICATION_RUNNING",
        )
        engine = next(p for p in emulator.processes() if p["id"] == app.id)
        _done(started, f"RUNNING on {engine['ip_address']}:{engine['app_port']}")

        started = _step("calling the application on its engine address")
        url = f"http://{engine['ip_address']}:{engine['app_port']}/"
        _wait_for(lambda: _answers(url), 30, f"{url} to answer")
        _done(started, requests.get(url, timeout=5).text)

        started = _step("stopping it")
        client.stop_application(app.id)
        _wait_for(
            lambda: client.get_application(app.id).status == ApplicationStatus.STOPPED,
            60,
            "APPLICATION_STOPPED",
        )
        _done(started, "APPLICATION_STOPPED")

        started = _step("deleting it")
        client.delete_application(app.id)
        _done(started, f"{len(client.list_applications())} applications left")

        started = _step("stopping the emulator")
        survivors = emulator.stop()
        _done(started, "no process left behind" if not survivors else f"killed {survivors}")
    return 0 if not survivors else 1


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).ok
    except requests.RequestException:
        return False


def main() -> int:
    try:
        return run_lifecycle_demo()
    except (CMLError, TimeoutError, RuntimeError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
