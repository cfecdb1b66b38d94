"""Start the emulator as a child process and talk to its test-control endpoints.

Used by the demo, the tests and the benchmarks: one place that knows how to start it on a
free port, read its address from the first line, and stop it so that no application
process outlives it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from ray_cml_provider.emulator.processes import live_group_members, signal_group

READY_PREFIX = "CML emulator listening on "


def plain_python() -> str:
    """A Python with pip and without Ray, to play a CML runtime image: the interpreter this
    virtualenv was made from (the same version as the machine running ``ray up``, as Ray
    needs), or ``$RAY_CML_PLAIN_PYTHON``."""
    major, minor = sys.version_info[:2]
    default = Path(sys.base_prefix) / "bin" / f"python{major}.{minor}"
    return os.environ.get("RAY_CML_PLAIN_PYTHON") or str(default)


class RunningEmulator:
    """A started emulator. Use as a context manager, or call ``stop()``."""

    def __init__(
        self,
        project_dir: str | os.PathLike[str] | None = None,
        api_key: str | None = None,
        extra_args: list[str] | None = None,
        python: str = sys.executable,
        log_dir: str | os.PathLike[str] | None = None,
        startup_timeout_s: float = 30.0,
    ):
        self.api_key = api_key or "emulator-" + secrets.token_urlsafe(16)
        # Folders made here are removed on stop; folders the caller gave are kept.
        self._made_dirs = [
            Path(tempfile.mkdtemp(prefix=prefix))
            for given, prefix in ((project_dir, "cml-project-"), (log_dir, "cml-logs-"))
            if given is None
        ]
        self.project_dir = Path(project_dir) if project_dir else self._made_dirs[0]
        self.log_dir = Path(log_dir) if log_dir else self._made_dirs[-1]
        self.project_id = "emul-ator-proj-0001"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.output_path = self.log_dir / "emulator.out"
        self._survivors: list[int] | None = None
        command = [
            python,
            "-m",
            "ray_cml_provider.emulator",
            "--port",
            "0",
            "--project-dir",
            str(self.project_dir),
            "--log-dir",
            str(self.log_dir),
            "--project-id",
            self.project_id,
            *(extra_args or []),
        ]
        env = dict(os.environ)
        env["CML_EMULATOR_API_KEY"] = self.api_key  # not on the command line, not in ps
        env["PYTHONUNBUFFERED"] = "1"
        self._output = open(self.output_path, "w+")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        self.url = self._wait_for_address(startup_timeout_s)

    def _wait_for_address(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            first_line = self.output_path.read_text().split("\n", 1)[0]
            if first_line.startswith(READY_PREFIX) and "\n" in self.output_path.read_text():
                return first_line[len(READY_PREFIX) :].strip()
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        output = self.output_path.read_text()
        self.stop()
        raise RuntimeError(f"the CML emulator did not start:\n{output}")

    # -------------------------------------------------------------- test control

    def client_settings(self) -> dict[str, str]:
        return {"host": self.url, "project_id": self.project_id, "api_key": self.api_key}

    def stats(self, trace: bool = False) -> dict[str, Any]:
        """Request counts; with ``trace``, also ``[started, seconds, request, caller]`` of each."""
        params = {"trace": "1"} if trace else {}
        return requests.get(f"{self.url}/_emulator/stats", params=params, timeout=30).json()

    def reset_stats(self) -> None:
        requests.post(f"{self.url}/_emulator/stats:reset", timeout=10).raise_for_status()

    def set_faults(
        self,
        fault_rate: float | None = None,
        latency_ms: float | None = None,
        drop_rate: float | None = None,
        start_delay_s: float | None = None,
        schedule_delay_s: float | None = None,
        file_delay_s: float | None = None,
    ) -> None:
        body = {
            k: v
            for k, v in (
                ("fault_rate", fault_rate),
                ("latency_ms", latency_ms),
                ("drop_rate", drop_rate),
                ("start_delay_s", start_delay_s),
                ("schedule_delay_s", schedule_delay_s),
                ("file_delay_s", file_delay_s),
            )
            if v is not None
        }
        requests.post(f"{self.url}/_emulator/faults", json=body, timeout=10).raise_for_status()

    def processes(self) -> list[dict[str, Any]]:
        """The local process group behind each application (and deleted ones still dying)."""
        return requests.get(f"{self.url}/_emulator/applications", timeout=10).json()["applications"]

    def crash(self, application_id: str) -> None:
        requests.post(
            f"{self.url}/_emulator/applications/{application_id}:crash", timeout=10
        ).raise_for_status()

    # -------------------------------------------------------------- shutdown

    def stop(self, timeout_s: float = 20.0) -> list[int]:
        """Stop the emulator; return the pids of application processes still alive after it.

        The emulator ends its applications' process groups itself; whatever survives that
        (a bug) is killed here and reported, so no test leaves processes behind.
        """
        if self._survivors is not None:
            return self._survivors
        try:
            groups = [p["pgid"] for p in self.processes() if p.get("pgid")]
        except (requests.RequestException, ValueError):
            groups = []
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout_s)
        signal_group(self.process.pid, signal.SIGKILL)
        self.process.wait()
        survivors = [pid for pgid in groups for pid in live_group_members(pgid)]
        for pgid in groups:
            signal_group(pgid, signal.SIGKILL)
        self._output.close()
        for folder in self._made_dirs:
            shutil.rmtree(folder, ignore_errors=True)
        self._survivors = survivors
        return survivors

    def __enter__(self) -> RunningEmulator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
