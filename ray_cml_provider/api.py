"""The Python API, for people who script clusters (the older CML launchers' cluster manager).

    from ray_cml_provider import Cluster

    cluster = Cluster("cluster-configs/cml-cluster.yaml")
    cluster.up()                                   # ray up, then wait for min_workers
    print(cluster.status().dashboard_url)          # what `ray-cml status` shows, as objects
    cluster.request_resources(bundles=[{"GPU": 1}] * 2)   # scale hint: hold 2 GPU workers
    cluster.request_resources()                    # clear it: idle workers go again
    job = cluster.submit_job("python embed.py")   # a Ray job (ray-cml job submit)
    print(job.wait(), job.logs())                 # SUCCEEDED, and what it printed
    cluster.down()

    with Cluster("cluster.yaml") as cluster:       # deleted on the way out, whatever happens
        cluster.submit_job(["python", "batch.py"], down_after=True).wait()

``up``/``down``/``exec`` are Ray's own ``ray.autoscaler.sdk`` (the code behind ``ray up``),
so a cluster made here is the same as one made with the CLI, and the other way round. The
CML credentials come from the config's provider section and the environment, as for
``ray up``. Failures raise ``ClusterError`` with the one-line reason.
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from ray_cml_provider.cluster.job_package import local_working_dir, ship_working_dir
from ray_cml_provider.cluster.jobs import (
    ENDED,
    JobAPI,
    JobError,
    delete_after,
    end_after_down,
    job_api,
)
from ray_cml_provider.cluster.status import ClusterStatus, collect_status
from ray_cml_provider.cluster.workspace import OperatorError, client_for
from ray_cml_provider.cml import CMLError
from ray_cml_provider.provider.config import (
    ClusterConfigError,
    load_cluster_config,
    validate_cluster_config,
)
from ray_cml_provider.provider.ray_auth import TOKEN, session_line
from ray_cml_provider.provider.workspace_check import explain


class ClusterError(RuntimeError):
    """A cluster operation failed; the message says why in one sentence."""


class Job:
    """A Ray job submitted by ``Cluster.submit_job``, through Ray's Jobs API on the head."""

    def __init__(self, api: JobAPI, job_id: str, kept: Callable[[], dict | None] | None = None):
        self.api = api
        self.id = job_id
        # With down_after: the job as the cluster's history kept it, for when the head has
        # deleted the cluster (and its Jobs API) before this handle looked.
        self._kept = kept
        self._ended: dict | None = None

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    @property
    def status(self) -> str:
        """Ray's status: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
        if self._ended:
            return str(self._ended.get("status"))
        try:
            return str(self.api.info(self.id).get("status"))
        except JobError as exc:
            self._ended = self._kept() if self._kept else None
            if self._ended is None:
                raise ClusterError(str(exc)) from None
            return str(self._ended.get("status"))

    def logs(self) -> str:
        """The job's log (once its cluster is gone: the end its history kept)."""
        if self._ended:
            return str(self._ended.get("log_tail", ""))
        return self._call(self.api.logs, self.id)

    def stop(self) -> bool:
        """Ask Ray to stop the job; whether it was still running."""
        return self._call(self.api.stop, self.id)

    def wait(self, timeout_s: float | None = None, poll_s: float = 1.0) -> str:
        """Wait until the job ended; its final status (``ClusterError`` after ``timeout_s``)."""
        started = time.monotonic()
        while (status := self.status) not in ENDED:
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                raise ClusterError(f"job {self.id} still {status} after {timeout_s:.0f} s")
            time.sleep(poll_s)
        return status

    @staticmethod
    def _call(function: Callable[..., Any], *args: Any) -> Any:
        try:
            return function(*args)
        except JobError as exc:
            raise ClusterError(str(exc)) from None


class Cluster:
    """One cluster YAML (a path, or the config as a dict) and the cluster it describes.
    Used as a context manager, the cluster is deleted (``down``) on the way out."""

    def __init__(self, config: str | os.PathLike[str] | dict[str, Any]):
        try:
            if isinstance(config, dict):
                validate_cluster_config(config)
                self.config = config
                handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - kept for the object's life
                    "w", prefix=f"ray-cml-{config['cluster_name']}-", suffix=".yaml", delete=False
                )
                with handle:
                    yaml.safe_dump(config, handle, sort_keys=False)
                self.config_path = Path(handle.name)
                weakref.finalize(self, self.config_path.unlink, missing_ok=True)
            else:
                self.config_path = Path(config)
                self.config = load_cluster_config(self.config_path)
        except ClusterConfigError as exc:
            raise ClusterError(str(exc)) from None

    @property
    def name(self) -> str:
        return self.config["cluster_name"]

    def __repr__(self) -> str:
        return f"Cluster({self.name!r}, config={str(self.config_path)!r})"

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.down()

    # ------------------------------------------------------------------ lifecycle

    def up(
        self,
        *,
        wait_for_workers: bool = True,
        timeout_s: float = 900.0,
        progress: Callable[[str], None] | None = print,
    ) -> ClusterStatus:
        """``ray up``; then wait until every worker type's ``min_workers`` joined Ray."""
        from ray.autoscaler import sdk

        started = time.monotonic()
        self._run(sdk.create_or_update_cluster, str(self.config_path), no_config_cache=True)
        status = self.status()
        if wait_for_workers:
            status = self._wait_for_min_workers(started, timeout_s, progress)
        if progress:
            progress(f"cluster {self.name} is up after {time.monotonic() - started:.1f} s")
            if status.dashboard_url:
                progress(f"  dashboard: {status.dashboard_url}")
            if status.ray_auth == TOKEN:
                progress(f"  Ray token: first {session_line(status.auth_token_path)}")
            if status.gcs_address:
                progress(f'  inside CML: ray.init(address="{status.gcs_address}")')
        return status

    def down(self) -> None:
        """``ray down``: every application of the cluster is deleted, failed ones included."""
        from ray.autoscaler import sdk

        self._run(sdk.teardown_cluster, str(self.config_path))

    def status(self, ray_view: str = "auto") -> ClusterStatus:
        """The cluster as CML and Ray see it (see ``ray-cml status``)."""
        try:
            with client_for(self.config["provider"]) as client:
                return collect_status(self.config, client, ray_view)
        except OperatorError as exc:
            raise ClusterError(str(exc)) from None
        except CMLError as exc:
            raise ClusterError(explain(exc)) from None

    def submit_job(
        self,
        entrypoint: str | list[str],
        runtime_env: dict[str, Any] | None = None,
        down_after: bool = False,
        working_dir: str | os.PathLike[str] | None = None,
    ) -> Job:
        """A Ray job on this cluster (``up`` first when its head is not running), as
        ``ray-cml job submit`` does; ``down_after``: the head deletes the cluster once the
        job ended, whatever becomes of this process; ``working_dir`` (or a local one in
        ``runtime_env``): a directory the job runs in, shipped through the project."""
        runtime_env = dict(runtime_env or {})
        if working_dir is not None:
            runtime_env["working_dir"] = str(working_dir)
        try:
            local_working_dir(runtime_env)  # a wrong folder fails before the cluster comes up
        except JobError as exc:
            raise ClusterError(str(exc)) from None
        if self.status(ray_view="none").head is None:
            self.up(wait_for_workers=False, progress=None)
        command = entrypoint if isinstance(entrypoint, str) else shlex.join(entrypoint)
        try:
            with client_for(self.config["provider"]) as client:
                status = collect_status(self.config, client, ray_view="none")
                api = job_api(status, self.config, client)
                head_id = status.head.node_id
                runtime_env = ship_working_dir(runtime_env, client, self.name, head_id)
                job_id = api.submit(command, runtime_env)
                if not down_after:
                    return Job(api, job_id)
                delete_after(client, self.name, head_id, job_id)
                return Job(api, job_id, kept=lambda: self._end_after_down(head_id, job_id))
        except (OperatorError, JobError) as exc:
            raise ClusterError(str(exc)) from None
        except CMLError as exc:
            raise ClusterError(explain(exc)) from None

    def _end_after_down(self, head_id: str, job_id: str) -> dict | None:
        with client_for(self.config["provider"]) as client:
            return end_after_down(client, self.name, head_id, job_id)

    def exec(self, command: str) -> str:
        """Run a shell command on the head (``ray exec``) and return its output."""
        from ray.autoscaler import sdk

        output = self._run(sdk.run_on_cluster, str(self.config_path), cmd=command, with_output=True)
        return output.decode() if isinstance(output, bytes) else (output or "")

    def request_resources(
        self, num_cpus: int | None = None, bundles: list[dict[str, float]] | None = None
    ) -> None:
        """Ask the autoscaler to hold capacity for this shape (Ray's ``request_resources``),
        e.g. GPU workers warm before a burst; called with nothing, clears the request.
        The request stays after this call returns, until it is replaced."""
        script = (
            "import json, ray\n"
            "from ray.autoscaler.sdk import request_resources\n"
            "ray.init(address='auto', log_to_driver=False)\n"
            f"request_resources(num_cpus={num_cpus!r}, "
            f"bundles=json.loads({json.dumps(json.dumps(bundles or []))}))\n"
            "print('ray-cml: resource request set')\n"
        )
        output = self.exec(f'"${{RAY_CML_PYTHON:-python}}" -c {shlex.quote(script)}')
        if "ray-cml: resource request set" not in output:
            raise ClusterError(f"the head did not take the request: {output[-300:]}")

    # ------------------------------------------------------------------ helpers

    @property
    def dashboard_url(self) -> str:
        return self.status(ray_view="none").dashboard_url

    @property
    def gcs_address(self) -> str:
        """``ray.init(address=...)`` from inside CML (another session or application)."""
        return self.status(ray_view="none").gcs_address

    def _wait_for_min_workers(
        self, started: float, timeout_s: float, progress: Callable[[str], None] | None
    ) -> ClusterStatus:
        head = self.config["head_node_type"]
        wanted = {
            name: int(node_type.get("min_workers", 0))
            for name, node_type in self.config["available_node_types"].items()
            if name != head and node_type.get("min_workers", 0)
        }
        last_line = ""
        while True:
            status = self.status()
            joined = {
                name: sum(
                    1
                    for n in status.nodes
                    if n.node_type == name and n.ray_state in ("alive", "idle")
                )
                for name in wanted
            }
            if all(joined[name] >= count for name, count in wanted.items()):
                return status
            line = ", ".join(f"{name} {joined[name]}/{count}" for name, count in wanted.items())
            if progress and line != last_line:
                progress(f"workers joining: {line} ({time.monotonic() - started:.0f} s)")
                last_line = line
            if time.monotonic() - started > timeout_s:
                raise ClusterError(f"workers did not join within {timeout_s:.0f} s ({line})")
            time.sleep(2.0)

    def _run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Ray's sdk ends the process on some failures (``sys.exit``): turn that into an
        exception a script can catch."""
        try:
            return function(*args, **kwargs)
        except SystemExit as exc:
            reason = exc.code if isinstance(exc.code, str) else f"exit status {exc.code}"
            raise ClusterError(f"{function.__name__} failed: {reason}") from None
