"""The history of clusters that are gone, as the heads left it in the project
(``.ray-cml/_history/<cluster>/<run>.json``, written by ``node/history.py``).

Read with the user's key through the files API, so it works from a laptop as from CML. Used
by ``ray-cml history`` (``ops/history.py``) and by ``ray-cml gc``, which marks the open runs
of a cluster it collects as ended by a lost head.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from ray_cml_provider.cluster.workspace import OperatorError
from ray_cml_provider.cml import CMLClient, CMLError, CMLNotFoundError
from ray_cml_provider.contract import HISTORY_RUN, HistoryRecord, history_dir
from ray_cml_provider.node.history import close_open_run


class HistoryError(OperatorError):
    """No such run, or a record that cannot be read: one line, exit status 1."""


@dataclass
class RunRef:
    cluster: str
    run: str

    @property
    def path(self) -> str:
        return f"{history_dir(self.cluster)}/{self.run}.json"


def list_runs(client: CMLClient, cluster: str | None = None) -> list[RunRef]:
    """Every run kept in the project (of ``cluster``), oldest first."""
    if cluster:
        clusters = [cluster]
    else:
        try:
            clusters = [f.path.rsplit("/", 1)[-1] for f in client.list_files(history_dir())]
        except CMLNotFoundError:
            return []
    runs = []
    for name in sorted(clusters):
        try:
            files = client.list_files(history_dir(name))
        except CMLNotFoundError:
            continue
        for entry in files:
            stem = entry.path.rsplit("/", 1)[-1].removesuffix(".json")
            if HISTORY_RUN.fullmatch(stem) and not entry.is_dir:
                runs.append(RunRef(name, stem))
    return sorted(runs, key=lambda r: (r.run[:16], r.cluster))


def read_run(client: CMLClient, ref: RunRef) -> HistoryRecord:
    try:
        return HistoryRecord.from_json(client.download_file(ref.path))
    except CMLNotFoundError:
        raise HistoryError(f"no run {ref.run} of cluster {ref.cluster} in the project") from None
    except ValueError as exc:
        raise HistoryError(f"{ref.path} is not a history record: {exc}") from None


def find_run(client: CMLClient, cluster: str | None, run: str) -> RunRef:
    """The run named ``run`` (or a unique beginning of its name), or the newest for
    ``latest``."""
    runs = list_runs(client, cluster)
    where = f" of cluster {cluster}" if cluster else ""
    if not runs:
        raise HistoryError(f"no history{where} in the project yet")
    if run == "latest":
        return runs[-1]
    matches = [r for r in runs if r.run.startswith(run)]
    if len(matches) != 1:
        found = "no run" if not matches else f"{len(matches)} runs"
        raise HistoryError(f"{found}{where} named {run!r} (`ray-cml history` lists them)")
    return matches[0]


def close_open_runs(client: CMLClient, cluster: str, ended_by: str) -> int:
    """Mark the cluster's runs that are still open as ended (their head is gone); how many."""

    def read(path: str) -> bytes | None:
        with contextlib.suppress(CMLNotFoundError):
            return client.download_file(path)
        return None

    closed = 0
    for ref in list_runs(client, cluster):
        try:
            closed += close_open_run(read, client.upload_file, ref.path, ended_by)
        except CMLError:
            continue
    return closed


def job_in_history(client: CMLClient, cluster: str, head_id: str, job_id: str) -> dict | None:
    """Ray job ``job_id`` as the last run of the head ``head_id`` kept it ({status,
    log_tail, ...}), or None. ``job submit --down`` reads a job's end here when the head
    deleted the cluster before its submitter read it (the head writes the run's last
    snapshot, every job's status and log tail, before it deletes anything)."""
    try:
        runs = [ref for ref in list_runs(client, cluster) if ref.run.endswith(f"-{head_id}")]
        for ref in reversed(runs):
            for job in read_run(client, ref).jobs:
                if isinstance(job, dict) and job.get("id") == job_id:
                    return job
    except (HistoryError, CMLError):
        return None
    return None
