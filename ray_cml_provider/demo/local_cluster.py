"""Drive Ray's own CLI against a cluster config on a running emulator.

Shared by the demo, the end-to-end tests and the benchmarks, so all three exercise exactly
what a user types: ``ray up``, ``ray submit``, ``ray exec``, ``ray down``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests
import yaml

from ray_cml_provider.cml import Application, CMLClient
from ray_cml_provider.contract import (
    NodeName,
)
from ray_cml_provider.emulator.harness import RunningEmulator
from ray_cml_provider.emulator.processes import signal_group
from ray_cml_provider.provider.lookup import cluster_applications
from ray_cml_provider.provider.ray_auth import read_token

# The cluster YAMLs the demos use ship in the package (cluster-configs/ links to them).
DEMO_CONFIGS = Path(__file__).resolve().parent / "configs"


RAY_STATUS_SECTIONS = ("Active:", "Idle:", "Pending:", "Recent failures:", "Resources")


@dataclass(frozen=True)
class RayStatus:
    """``ray status`` as printed on the head, read by section."""

    text: str
    returncode: int = 0

    def section(self, header: str) -> list[str]:
        """The entries under ``header`` (``"Pending:"``, ``"Recent failures:"``, ...) up to
        the next section; Ray's placeholders such as ``(no pending nodes)`` are not entries."""
        if header not in self.text:
            return []
        body = self.text.split(header, 1)[1]
        ends = [body.find(h) for h in RAY_STATUS_SECTIONS if h != header and h in body]
        body = body[: min(ends)] if ends else body
        return [
            line.strip()
            for line in body.splitlines()
            if line.strip() and not line.strip().startswith(("(", "-"))
        ]

    @property
    def pending(self) -> list[str]:
        return self.section("Pending:")

    @property
    def recent_failures(self) -> list[str]:
        return self.section("Recent failures:")


class LocalCluster:
    """One cluster config on one emulator; ``config_overrides`` edit a private copy of it."""

    def __init__(
        self,
        emulator: RunningEmulator,
        workdir: Path,
        config_path: Path = DEMO_CONFIGS / "local-emulator.yaml",
        cluster_name: str | None = None,
        config_overrides: Callable[[dict], None] | None = None,
        echo: Callable[[str], None] | None = None,
        extra_env: dict[str, str] | None = None,
    ):
        self.emulator = emulator
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = yaml.safe_load(Path(config_path).read_text())
        if cluster_name:
            config["cluster_name"] = cluster_name
        if config_overrides:
            config_overrides(config)
        self.cluster_name = config["cluster_name"]
        self.config_path = self.workdir / f"{self.cluster_name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.client = CMLClient(**emulator.client_settings())
        self.echo = echo
        bin_dir = str(Path(sys.executable).parent)
        self.env = dict(os.environ)
        self.env.update(
            {
                "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
                "CML_HOST": emulator.url,
                "CML_PROJECT_ID": emulator.project_id,
                "CML_API_KEY": emulator.api_key,
                "RAY_USAGE_STATS_ENABLED": "0",
                "PYTHONUNBUFFERED": "1",
                **(extra_env or {}),
            }
        )

    # ------------------------------------------------------------------ Ray's CLI

    def ray(self, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
        """Run ``ray ARGS... CONFIG``-style commands; output is returned (and echoed)."""
        return self._run(["ray", *args], timeout_s)

    def ray_cml(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
        """Run this project's ``ray-cml ARGS...`` (status, gc, doctor) the same way."""
        return self._run(["ray-cml", *args], timeout_s)

    def _run(self, command: list[str], timeout_s: float) -> subprocess.CompletedProcess:
        process = subprocess.Popen(
            command,
            cwd=self.workdir,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        watchdog = threading.Timer(timeout_s, signal_group, (process.pid, signal.SIGKILL))
        watchdog.start()
        lines = []
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if self.echo:
                self.echo(line.rstrip("\n"))
        code = process.wait()
        watchdog.cancel()
        return subprocess.CompletedProcess(command, code, "".join(lines), "")

    def start_ray(self, *args: str) -> subprocess.Popen:
        """Start ``ray ARGS...`` without waiting (its own process group, output discarded),
        for tests that interrupt it or leave it waiting."""
        return subprocess.Popen(
            ["ray", *args],
            cwd=self.workdir,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def up(self) -> subprocess.CompletedProcess:
        return self.ray("up", "-y", "--no-config-cache", str(self.config_path))

    def down(self) -> subprocess.CompletedProcess:
        return self.ray("down", "-y", str(self.config_path))

    def exec(self, command: str) -> subprocess.CompletedProcess:
        return self.ray("exec", "--no-config-cache", str(self.config_path), command)

    def ray_status(self) -> RayStatus:
        """``ray exec CONFIG 'ray status'``: what Ray's autoscaler says on the head."""
        result = self.exec("ray status")
        return RayStatus(result.stdout, result.returncode)

    def submit(self, script: Path, *args: str) -> subprocess.CompletedProcess:
        return self.ray("submit", "--no-config-cache", str(self.config_path), str(script), *args)

    def serve_deploy(self, serve_config: dict, name: str = "serve_app.yaml"):
        """What a user does on CML: copy the Serve config to the head and ``serve deploy`` it
        there, against the head's dashboard."""
        local = self.workdir / name
        local.write_text(yaml.safe_dump(serve_config, sort_keys=False))
        copied = self.ray("rsync-up", str(self.config_path), str(local), f"~/{name}")
        if copied.returncode != 0:
            return copied
        return self.exec(
            f"serve deploy ~/{name} -a http://$CDSW_IP_ADDRESS:$RAY_CML_DASHBOARD_PORT"
        )

    def wait_for_serve_app(self, name: str = "default", timeout_s: float = 300) -> None:
        """Wait until Serve reports application ``name`` RUNNING, as a user watches
        ``serve status``: its routes answer only from then on (before, the proxy says 404)."""
        [head] = self.nodes("head")
        engine = next(p for p in self.emulator.processes() if p["id"] == head.id)
        url = f"http://{engine['ip_address']}:{engine['app_port']}/api/serve/applications/"

        headers = self.auth_headers()

        def running() -> bool:
            try:
                answer = requests.get(url, headers=headers, timeout=10)
                apps = answer.json().get("applications", {})
            except (requests.RequestException, ValueError):
                return False
            return apps.get(name, {}).get("status") == "RUNNING"

        self.wait_for(running, timeout_s, f"the Serve application {name!r} to be RUNNING")

    # ------------------------------------------------------------------ Ray's token

    def ray_token(self) -> str | None:
        """The cluster's Ray token, read through the files API (None: auth is off)."""
        return read_token(self.client, self.cluster_name)

    def auth_headers(self) -> dict[str, str]:
        """For the dashboard's HTTP API, which asks for the token like every Ray port."""
        token = self.ray_token()
        return {"Authorization": f"Bearer {token}"} if token else {}

    # ------------------------------------------------------------------ what CML says

    def head_ip(self) -> str:
        """The head engine's address (the emulator knows it; CML's API does not)."""
        [head] = self.nodes("head")
        return next(p for p in self.emulator.processes() if p["id"] == head.id)["ip_address"]

    def applications(self) -> list[Application]:
        """Every application of this cluster, whatever its status (exactly this cluster:
        ``ray-c-`` would also match cluster ``c-2``'s names)."""
        return [app for app, _ in self._nodes()]

    def nodes(self, kind: str) -> list[Application]:
        """The cluster's applications of one kind: ``head`` or ``worker``."""
        return [app for app, node in self._nodes() if node.kind == kind]

    def _nodes(self) -> list[tuple[Application, NodeName]]:
        listing = cluster_applications(self.client, self.cluster_name)
        return [(own.app, own.node) for own in listing.nodes]

    def workers(self) -> list[Application]:
        return self.nodes("worker")

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float, what: str) -> float:
        started = time.monotonic()
        while not predicate():
            if time.monotonic() - started > timeout_s:
                raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
            time.sleep(0.5)
        return time.monotonic() - started
