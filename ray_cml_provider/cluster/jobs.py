"""Ray jobs on a cluster, from wherever ``ray-cml`` runs: a laptop, a CML session, a CML job.

Through Ray's Jobs REST API (the one ``ray job submit`` and ``JobSubmissionClient`` speak) on
the head's dashboard, by the best way in (``job_api``): the dashboard's own address when this
machine reaches it (inside the project, or the emulator), else the head's URL through CML's
proxy and the head's gateway. Ray's token goes as ``Authorization`` where nothing else
claims it, and as ``X-Ray-Authorization`` behind CML's login, whose ``Authorization`` is the
user's CML key. The token is read through the files API into memory; it is never printed.
"""

from __future__ import annotations

import secrets
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import requests

from ray_cml_provider.cluster.history import job_in_history
from ray_cml_provider.cluster.status import ClusterStatus
from ray_cml_provider.cml import CMLClient
from ray_cml_provider.contract import NodeFolder, Request
from ray_cml_provider.errors import RayCMLError
from ray_cml_provider.provider.addresses import reachable
from ray_cml_provider.provider.endpoint import bypasses_login
from ray_cml_provider.provider.lookup import cluster_applications
from ray_cml_provider.provider.mailbox import NodeMailbox
from ray_cml_provider.provider.ray_auth import TOKEN, read_token

ENDED = ("SUCCEEDED", "FAILED", "STOPPED")
NO_AGENT = "No available agent to submit job"  # Ray's job server, seconds after `ray up`
AGENT_WAIT_S = 180.0
DOWN_WAIT_S = 600.0  # how long a --down submitter waits for the head to delete the cluster


class JobError(RayCMLError):
    """The Jobs API refused or could not be reached: one line, exit status 1."""


@dataclass
class JobAPI:
    """Where the head's Jobs API answers this machine, and with which headers."""

    base: str
    headers: dict[str, str]
    timeout_s: float = 30.0

    def call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        url = f"{self.base}{path}"
        try:
            answer = requests.request(
                method, url, headers=self.headers, timeout=self.timeout_s, **kwargs
            )
        except requests.RequestException as exc:
            raise JobError(f"{method} {path}: the head's Jobs API did not answer ({exc})") from None
        if answer.status_code >= 400:
            message = answer.text.strip().splitlines()[-1:] or [""]
            raise JobError(f"{method} {path}: HTTP {answer.status_code} {message[0][:300]}")
        return answer

    # -------------------------------------------------------------- Ray's Jobs REST API

    def submit(
        self,
        entrypoint: str,
        runtime_env: dict | None = None,
        submission_id: str | None = None,
        wait_for_agent_s: float = AGENT_WAIT_S,
    ) -> str:
        """The job's submission id; waits while Ray's job server has no agent yet."""
        body = {
            "entrypoint": entrypoint,
            "submission_id": submission_id or f"raycml_{secrets.token_hex(6)}",
            "runtime_env": runtime_env or {},
            "metadata": {"submitted_by": "ray-cml job submit"},
        }
        deadline = time.monotonic() + wait_for_agent_s
        while True:
            try:
                return str(self.call("POST", "/api/jobs/", json=body).json()["submission_id"])
            except JobError as exc:
                if NO_AGENT not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(2.0)

    def info(self, job_id: str) -> dict:
        return self.call("GET", f"/api/jobs/{urllib.parse.quote(job_id)}").json()

    def logs(self, job_id: str) -> str:
        return str(self.call("GET", f"/api/jobs/{urllib.parse.quote(job_id)}/logs").json()["logs"])

    def stop(self, job_id: str) -> bool:
        answer = self.call("POST", f"/api/jobs/{urllib.parse.quote(job_id)}/stop")
        return bool(answer.json().get("stopped"))

    def list(self) -> list[dict]:
        listed = self.call("GET", "/api/jobs/").json()
        return sorted(listed, key=lambda job: job.get("start_time") or 0)

    def follow(
        self, job_id: str, every_s: float = 1.0, on_status: Callable[[str], None] = print
    ) -> Iterator[str]:
        """The job's log as it grows (each new part once), until it ended; ``on_status`` is
        told each new status."""
        shown, status = 0, ""
        while True:
            info = self.info(job_id)
            if info.get("status") != status:
                status = str(info.get("status"))
                on_status(status)
            text = self.logs(job_id)
            if len(text) > shown:
                yield text[shown:]
                shown = len(text)
            if status in ENDED:
                return
            time.sleep(every_s)


def job_api(status: ClusterStatus, config: dict, client: CMLClient) -> JobAPI:
    """The head's Jobs API by the best way in from here (see the module's docstring)."""
    token = read_token(client, status.cluster) if status.ray_auth == TOKEN else None
    if status.dashboard_address:
        ip, port = status.dashboard_address.removeprefix("http://").rsplit(":", 1)
        if reachable(ip, int(port)):
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            return JobAPI(status.dashboard_address, headers)
    if not status.dashboard_url:
        raise JobError(f"cluster {status.cluster} has no running head")
    head = config["available_node_types"][config["head_node_type"]]["node_config"]
    headers = {}
    if not bypasses_login(head) and client.settings.api_key:
        headers["Authorization"] = f"Bearer {client.settings.api_key.reveal()}"  # CML's login
    if token:
        headers["X-Ray-Authorization"] = f"Bearer {token}"
    return JobAPI(status.dashboard_url, headers)


def delete_after(client: CMLClient, cluster: str, head_id: str, job_id: str) -> str:
    """Ask the head to delete the cluster once ``job_id`` ended; the head's answer."""
    request = Request(report=Request.DOWN_AFTER_JOB, env={"job": job_id})
    return ask_head(client, cluster, head_id, request, "--down")


def ask_head(client: CMLClient, cluster: str, head_id: str, request: Request, what: str) -> str:
    """One of ``job submit``'s requests to the head's mailbox; the head's answer, or
    ``JobError`` naming the option (``what``) the head did not take."""
    mailbox = NodeMailbox(client, NodeFolder.of(cluster, head_id), progress=lambda _: None)
    result = mailbox.ask(request, 120)
    answer = result.output.decode("utf-8", "replace").strip()
    if result.exit_status != 0:
        raise JobError(f"the head did not take {what}: {answer or result.exit_status}")
    return answer


def wait_until_deleted(client: CMLClient, cluster: str, timeout_s: float = DOWN_WAIT_S) -> bool:
    """Wait while the head deletes the cluster (``--down``); whether it is gone."""
    deadline = time.monotonic() + timeout_s
    while cluster_applications(client, cluster).nodes:
        if time.monotonic() > deadline:
            return False
        time.sleep(2.0)
    return True


def end_after_down(client: CMLClient, cluster: str, head_id: str, job_id: str) -> dict | None:
    """A ``--down`` job's end ({status, log_tail, ...}) once the head deleted the cluster,
    from the run's history (written before anything is deleted); None if not known. For a
    submitter the head was quicker than: the Jobs API went with the cluster."""
    wait_until_deleted(client, cluster)
    job = job_in_history(client, cluster, head_id, job_id)
    return job if job and job.get("status") in ENDED else None
