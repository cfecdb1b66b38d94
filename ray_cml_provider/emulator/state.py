"""The emulator's model of a CML workspace: one project, its applications, their quota.

This module knows nothing about HTTP (``server``, ``cml_api``) and trusts its input: requests
are checked by ``validation`` before they reach it, and lists are filtered and paged by
``listing``. It answers with CML-shaped dicts. A reconciler thread moves
applications through CML's states by watching their real processes:

    STARTING (waits here, with no process, for ``schedule_delay_s`` and while over quota:
              CML scheduling the engine, adding a GPU node, pulling the runtime image)
      -> process started; after ``start_delay_s`` alive -> RUNNING (the script runs while
         still STARTING, as on CML, which reports RUNNING only once it sees the engine up)
    RUNNING -> process exits non-zero -> FAILED; exits 0 -> STOPPED
    :stop -> STOPPING (SIGTERM to the group, SIGKILL after the grace) -> STOPPED
    :restart -> (stop as above) -> STARTING
    delete -> forgotten at once; its processes are killed in the background
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import string
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ray_cml_provider.emulator.errors import ApiError, invalid, not_found
from ray_cml_provider.emulator.processes import (
    EngineProcess,
    LoopbackAllocator,
    Resources,
    base_environment,
    end_engines,
    start_engine,
)
from ray_cml_provider.emulator.project_files import ProjectFiles

STARTING = "APPLICATION_STARTING"
RUNNING = "APPLICATION_RUNNING"
STOPPING = "APPLICATION_STOPPING"
STOPPED = "APPLICATION_STOPPED"
FAILED = "APPLICATION_FAILED"

# Seconds an application's script runs while CML still says STARTING. Real starts take tens
# of seconds to minutes; 8 s here is enough for a worker's raylet to join Ray before its
# application is RUNNING (its `ray start` takes about 5 s on 2 cores): the window every test
# and the demo must cross.
DEFAULT_START_DELAY_S = 8.0

DEFAULT_RUNTIMES = [
    {
        "image_identifier": "docker.repository.cloudera.com/cloudera/cdsw/"
        f"ml-runtime-pbj-workbench-python{version}-standard:2025.09.1-b5",
        "editor": "PBJ Workbench",
        "kernel": f"Python {version}",
        "edition": "Standard",
        "full_version": "2025.09.1-b5",
        "status": "ENABLED",
    }
    for version in ("3.10", "3.11", "3.12")
] + [
    {
        "image_identifier": "docker.repository.cloudera.com/cloudera/cdsw/"
        "ml-runtime-pbj-workbench-python3.11-cuda:2025.09.1-b5",
        "editor": "PBJ Workbench",
        "kernel": "Python 3.11",
        "edition": "Nvidia GPU",
        "full_version": "2025.09.1-b5",
        "status": "ENABLED",
    }
]


def custom_runtime(image_identifier: str) -> dict[str, str]:
    """A runtime given with ``--runtime`` that is not one of the defaults, as CML lists it."""
    version = re.search(r"python(\d+\.\d+)", image_identifier)
    return {
        "image_identifier": image_identifier,
        "editor": "PBJ Workbench",
        "kernel": f"Python {version[1] if version else '3'}",
        "edition": "Custom",
        "full_version": image_identifier.rsplit(":", 1)[-1],
        "status": "ENABLED",
    }


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_cml_id() -> str:
    """An id in CML's style: four groups of four lower-case letters and digits."""
    alphabet = string.ascii_lowercase + string.digits
    return "-".join("".join(secrets.choice(alphabet) for _ in range(4)) for _ in range(4))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Quota:
    """Limits over every engine of the workspace; ``None`` is unlimited."""

    max_cpu: float | None = None
    max_memory: float | None = None
    max_gpus: int | None = None

    def admits(self, used: Resources, extra: Resources) -> bool:
        total = used + extra
        return (
            (self.max_cpu is None or total.cpu <= self.max_cpu + 1e-9)
            and (self.max_memory is None or total.memory <= self.max_memory + 1e-9)
            and (self.max_gpus is None or total.gpus <= self.max_gpus)
        )


@dataclass
class EmulatorConfig:
    project_dir: Path
    log_dir: Path
    api_url: str  # e.g. http://127.0.0.1:PORT, what engines use to call back
    project_id: str = "emul-ator-proj-0001"
    project_name: str = "ray-on-cml"
    python: str = ""
    # Runtime image id -> the interpreter its engines run (a runtime not named here runs
    # ``python``). A CML runtime is an image with Python and pip but no Ray: a plain
    # interpreter plays one, and two node types may run two runtimes.
    runtime_pythons: dict[str, str] = field(default_factory=dict)
    start_delay_s: float = DEFAULT_START_DELAY_S
    schedule_delay_s: float = 0.0
    stop_grace_s: float = 5.0
    # CML restarts a FAILED application (by default 3 times, 5 minutes apart).
    restart_failed: int = 0
    restart_delay_s: float = 300.0
    shared_memory_mb: int = 64
    ip_block: int = 0  # engines get 127.<ip_block>.x.y
    quota: Quota = field(default_factory=Quota)
    username: str = "emulator-user"
    # An administrator's setting on CML: no application may bypass CML's login.
    forbid_unauthenticated_apps: bool = False


@dataclass
class Application:
    seq: int
    fields: dict[str, Any]
    process: EngineProcess | None = None
    restart_requested: bool = False
    failed_restarts: int = 0
    restart_at: float | None = None  # when CML will restart this FAILED application
    engine_key: str | None = None
    waiting_for: str = ""  # STARTING with no process: "schedule" or "quota" (for tests)
    starting_since: float = field(default_factory=time.monotonic)

    @property
    def id(self) -> str:
        return self.fields["id"]

    @property
    def status(self) -> str:
        return self.fields["status"]

    def set_status(self, status: str) -> None:
        stamp = now_rfc3339()
        self.fields["status"] = status
        self.fields["updated_at"] = stamp
        timestamp_field = {
            STARTING: "starting_at",
            RUNNING: "running_at",
            STOPPED: "stopped_at",
            FAILED: "stopped_at",
        }.get(status)
        if timestamp_field:
            self.fields[timestamp_field] = stamp
        if status == STARTING:
            self.starting_since = time.monotonic()

    def requested(self) -> Resources:
        return Resources(
            float(self.fields["cpu"]), float(self.fields["memory"]), int(self.fields["nvidia_gpu"])
        )

    def to_api(self) -> dict[str, Any]:
        out = dict(self.fields)
        out["environment"] = json.dumps(self.fields["environment"])
        for int64_field in ("accelerator_label_id", "resource_profile_id", "resource_group_id"):
            if int64_field in out:
                out[int64_field] = str(out[int64_field])
        return out


class WorkspaceState:
    """Applications of one project, their processes and the workspace quota. Thread-safe."""

    def __init__(
        self,
        config: EmulatorConfig,
        on_engine_key: Callable[[str, bool], None],
        files: ProjectFiles | None = None,
    ):
        self.config = config
        self.files = files  # the project filesystem: its delayed writes land on each tick
        self.runtimes = list(DEFAULT_RUNTIMES)
        known = {r["image_identifier"] for r in self.runtimes}
        self.runtimes += [custom_runtime(i) for i in config.runtime_pythons if i not in known]
        self._apps: dict[str, Application] = {}
        self._deleted_processes: list[EngineProcess] = []
        self._seq = 0
        self._lock = threading.RLock()
        self._ips = LoopbackAllocator(block=config.ip_block)
        self._on_engine_key = on_engine_key  # (key, valid) -> registers/revokes an engine key
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.created_at = now_rfc3339()
        # Other engines of the project (``jobs.JobRuns``): reconciled and shut down with it.
        self.workloads: list[Any] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self, interval_s: float = 0.1) -> None:
        self._thread = threading.Thread(
            target=self._run_reconciler, args=(interval_s,), name="reconciler", daemon=True
        )
        self._thread.start()

    def shutdown(self, grace_s: float = 3.0) -> None:
        """Stop reconciling and end every process group this emulator started."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        with self._lock:
            processes = [a.process for a in self._apps.values() if a.process]
            end_engines(processes + self._deleted_processes, grace_s)
        for workload in self.workloads:
            workload.shutdown(grace_s)

    # ------------------------------------------------------------------ project

    def check_project(self, project_id: str) -> None:
        if project_id != self.config.project_id:
            raise not_found(f"project {project_id!r} not found")

    def project(self) -> dict[str, Any]:
        return {
            "id": self.config.project_id,
            "name": self.config.project_name,
            "summary": "Project emulated by ray-cml-provider",
            "owner": {"username": self.config.username},
            "created_at": self.created_at,
            "updated_at": self.created_at,
            "shared_memory_limit": self.config.shared_memory_mb,
            "default_engine_type": "ml_runtime",
        }

    # ------------------------------------------------------------------ applications

    @property
    def runtime_ids(self) -> set[str]:
        return {r["image_identifier"] for r in self.runtimes}

    def create(self, fields: dict[str, Any]) -> dict[str, Any]:
        """A new application from validated fields (``validation.application_fields``)."""
        fields = dict(fields)
        self._check_login_bypass(fields)
        with self._lock:
            self._check_subdomain_free(fields["subdomain"], except_id=None)
            self._seq += 1
            stamp = now_rfc3339()
            fields.update(
                id=new_cml_id(),
                status=STARTING,
                creator={
                    "username": self.config.username,
                    "name": "Emulator User",
                    "email": f"{self.config.username}@example.com",
                },
                created_at=stamp,
                updated_at=stamp,
                starting_at=stamp,
            )
            app = Application(self._seq, fields)
            self._apps[app.id] = app
            return app.to_api()

    def get(self, app_id: str) -> dict[str, Any]:
        with self._lock:
            return self._app(app_id).to_api()

    def engine_for_subdomain(
        self, subdomain: str
    ) -> tuple[dict[str, Any], tuple[str, int] | None] | None:
        """(fields, (engine IP, app port) or None) of the application at ``subdomain``."""
        with self._lock:
            for app in self._apps.values():
                if app.fields["subdomain"] == subdomain:
                    process = app.process
                    engine = (process.ip_address, process.app_port) if process else None
                    return dict(app.fields), engine
        return None

    def applications(self) -> list[dict[str, Any]]:
        """Every application, CML-shaped, in creation order."""
        with self._lock:
            return [a.to_api() for a in sorted(self._apps.values(), key=lambda a: a.seq)]

    def update(self, app_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Validated changes (``validation.application_fields``) to one application."""
        self._check_login_bypass(changes)
        with self._lock:
            app = self._app(app_id)
            if "subdomain" in changes:
                self._check_subdomain_free(changes["subdomain"], except_id=app_id)
            app.fields.update(changes)
            app.fields["updated_at"] = now_rfc3339()
            return app.to_api()

    def delete(self, app_id: str) -> None:
        with self._lock:
            app = self._app(app_id)
            del self._apps[app_id]
            if app.process:
                app.process.terminate(self.config.stop_grace_s)
                self._deleted_processes.append(app.process)
            self._revoke_engine_key(app)

    def stop(self, app_id: str) -> dict[str, Any]:
        with self._lock:
            app = self._app(app_id)
            app.restart_requested = False
            app.restart_at = None
            if app.process:
                app.process.terminate(self.config.stop_grace_s)
                app.set_status(STOPPING)
            elif app.status in (STARTING, STOPPING):
                app.set_status(STOPPED)
            return app.to_api()

    def restart(self, app_id: str) -> dict[str, Any]:
        with self._lock:
            app = self._app(app_id)
            if app.process:
                app.process.terminate(self.config.stop_grace_s)
                app.restart_requested = True
                app.set_status(STOPPING)
            elif app.status != STARTING:
                app.restart_at = None
                app.set_status(STARTING)
            return app.to_api()

    def crash(self, app_id: str) -> dict[str, Any]:
        """Kill every process of the application at once, as a node failure would."""
        with self._lock:
            app = self._app(app_id)
            if not app.process:
                raise invalid(f"application {app_id!r} has no running process to crash")
            app.process.kill()
            return app.to_api()

    def process_info(self) -> list[dict[str, Any]]:
        """For tests: the local process behind each application (not part of CML's API)."""
        with self._lock:
            return [
                {
                    "id": app.id,
                    "name": app.fields["name"],
                    "status": app.status,
                    "pgid": app.process.pgid if app.process else None,
                    "ip_address": app.process.ip_address if app.process else None,
                    "app_port": app.process.app_port if app.process else None,
                    "log_path": str(self.config.log_dir / f"{app.id}.log"),
                    "waiting_for": app.waiting_for,
                    "restarts": app.failed_restarts,
                    "restart_pending": app.restart_at is not None,
                }
                for app in sorted(self._apps.values(), key=lambda a: a.seq)
            ] + [
                {"id": None, "status": "DELETED", "pgid": p.pgid, "ip_address": p.ip_address}
                for p in self._deleted_processes
            ]

    # ------------------------------------------------------------------ reconciler

    def _run_reconciler(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.reconcile()
            except Exception as exc:  # keep the emulator alive; show what went wrong
                print(f"emulator: reconcile error: {exc!r}", flush=True)

    def reconcile(self) -> None:
        if self.files:
            self.files.apply_due()
        with self._lock:
            for process in list(self._deleted_processes):
                process.enforce_deadline()
                if not process.group_alive():
                    self._deleted_processes.remove(process)
            for app in sorted(self._apps.values(), key=lambda a: a.seq):
                self._reconcile_app(app)
        for workload in self.workloads:
            workload.reconcile()

    def _reconcile_app(self, app: Application) -> None:
        process = app.process
        if app.status == FAILED and app.restart_at and time.monotonic() >= app.restart_at:
            app.restart_at = None
            app.failed_restarts += 1
            app.set_status(STARTING)
        if process is None:
            app.waiting_for = ""
            if app.status != STARTING:
                return
            if time.monotonic() - app.starting_since < self.config.schedule_delay_s:
                app.waiting_for = "schedule"
            elif not self.config.quota.admits(self._reserved(), app.requested()):
                app.waiting_for = "quota"
            else:
                self._start_process(app)
            return
        if app.status == STOPPING:
            process.enforce_deadline()
            if not process.group_alive():
                app.process = None
                self._revoke_engine_key(app)
                app.set_status(STARTING if app.restart_requested else STOPPED)
                app.restart_requested = False
            return
        exit_code = process.leader_exit_code()
        if exit_code is not None:
            # The engine's main process ended: like a pod, everything in it goes too.
            process.kill()
            app.process = None
            self._revoke_engine_key(app)
            app.set_status(STOPPED if exit_code == 0 else FAILED)
            if exit_code != 0 and app.failed_restarts < self.config.restart_failed:
                app.restart_at = time.monotonic() + self.config.restart_delay_s
            return
        if app.status == STARTING and (
            time.monotonic() - process.started_monotonic >= self.config.start_delay_s
        ):
            app.set_status(RUNNING)

    def _reserved(self) -> Resources:
        total = Resources()
        for app in self._apps.values():
            if app.process:
                total = total + app.process.reserved
        for process in self._deleted_processes:
            total = total + process.reserved
        return total

    def _start_process(self, app: Application) -> None:
        cfg = self.config
        ip_address, app.engine_key = self.new_engine()
        app_port = free_port()
        python = self.python_of(app.fields["runtime_identifier"])
        env = self.engine_environment(python, app.fields, ip_address, app.engine_key)
        env.update(
            {
                "CDSW_APP_ID": app.id,
                "CDSW_APP_PORT": str(app_port),
                "CDSW_READONLY_PORT": str(free_port()),
            }
        )
        log_path = cfg.log_dir / f"{app.id}.log"
        if self.files:
            self.files.flush()  # a starting engine mounts the project afresh: it sees it all
        try:
            app.process = start_engine(
                script_path=cfg.project_dir / app.fields["script"],
                python=python,
                cwd=cfg.project_dir,
                env=env,
                log_path=log_path,
                ip_address=ip_address,
                app_port=app_port,
                reserved=app.requested(),
            )
        except OSError as exc:
            with open(log_path, "a") as log:
                log.write(f"emulator: could not start the engine: {exc}\n")
            self._revoke_engine_key(app)
            app.set_status(FAILED)

    def python_of(self, runtime_identifier: str) -> str:
        """The interpreter that plays ``runtime_identifier``'s image."""
        return self.config.runtime_pythons.get(runtime_identifier, self.config.python)

    def engine_environment(
        self, python: str, fields: dict[str, Any], ip_address: str, engine_key: str
    ) -> dict[str, str]:
        """What CML gives every engine of the project (application, job or session): a clean
        environment, the workload's own ``environment``, then the ``CDSW_*`` variables."""
        cfg = self.config
        env = base_environment(python)
        env.update(fields.get("environment") or {})
        env.update(
            {
                "HOME": str(cfg.project_dir),
                "PYTHONUNBUFFERED": "1",
                "CDSW_PROJECT": cfg.project_name,
                "CDSW_PROJECT_ID": cfg.project_id,
                "CDSW_ENGINE_ID": new_cml_id().replace("-", "")[:12],
                "CDSW_DOMAIN": cfg.api_url.split("://", 1)[-1],
                "CDSW_API_URL": cfg.api_url + "/api/v1",
                "CDSW_APIV2_KEY": engine_key,
                "CDSW_IP_ADDRESS": ip_address,
                "CDSW_CPU_MILLICORES": str(int(float(fields["cpu"]) * 1000)),
                "CDSW_MEMORY_MB": str(int(float(fields["memory"]) * 1024)),
                "CDSW_NVIDIA_GPU": str(fields.get("nvidia_gpu") or 0),
            }
        )
        return env

    def new_engine(self) -> tuple[str, str]:
        """A fresh engine's loopback address and API key (valid until ``revoke_key``)."""
        key = "engine-" + secrets.token_urlsafe(24)
        self._on_engine_key(key, True)
        return self._ips.allocate(), key

    def revoke_key(self, engine_key: str) -> None:
        self._on_engine_key(engine_key, False)

    def _revoke_engine_key(self, app: Application) -> None:
        if app.engine_key:
            self.revoke_key(app.engine_key)
            app.engine_key = None

    # ------------------------------------------------------------------ validation

    def _app(self, app_id: str) -> Application:
        try:
            return self._apps[app_id]
        except KeyError:
            raise not_found(f"application {app_id!r} not found") from None

    def _check_login_bypass(self, fields: dict[str, Any]) -> None:
        if fields.get("bypass_authentication") and self.config.forbid_unauthenticated_apps:
            raise ApiError(
                403,
                "unauthenticated access to applications is disabled for this workspace: "
                "bypass_authentication is not allowed",
            )

    def _check_subdomain_free(self, subdomain: str, except_id: str | None) -> None:
        for other in self._apps.values():
            if other.fields["subdomain"] == subdomain and other.id != except_id:
                raise ApiError(409, f"subdomain {subdomain!r} is already in use")
