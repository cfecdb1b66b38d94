"""The head keeps its cluster's history in the project, so it outlives the cluster.

A *run* is one life of the head's Ray: it begins when ``ray up``'s ``ray start --head``
worked (or a restarted head started Ray again) and ends when ``ray stop`` reaches the head
(what ``ray down`` sends first, and ``ray up`` before it starts Ray again), or when autostop
stops the cluster. Its record (``contract.HistoryRecord``) is written to
``.ray-cml/_history/<cluster>/<run>.json``, outside the cluster's folder that ``ray down``
deletes, every ``history_every_s`` (60 s) and once more at the end, so a head lost without
warning still leaves its last minute. What a record holds, and where it comes from:

- **jobs**: Ray's Jobs API on the head's dashboard (entrypoint, status, times; the tail of a
  job's logs once it ended, and of every job at the end of the run);
- **commands**: what ``ray up``/``exec``/``submit`` ran on the head and the tail of its
  output (a ``ray submit`` driver's output lives only there);
- **serve**: each Serve application's and deployment's last status;
- **autoscaler**: its decisions, read from ``monitor.log`` as it grows (adding and removing
  nodes, with Ray's reason);
- **nodes**: every application of the run, its type, GPUs, lifetime and GPU-hours (CML's
  listing, and the GPU ledger for the nodes deleted since);
- **top**: ``ray-cml top``'s figures over the last interval (two scrapes of the head's own
  ``/metrics``, through its gateway and the metrics key).

Bounded by construction: at most ``MAX_JOBS`` jobs with ``TAIL_BYTES`` of log each,
``MAX_COMMANDS`` commands, ``MAX_EVENTS`` decisions, ``MAX_NODES`` nodes (well under a
megabyte), and ``MAX_RUNS`` runs per cluster. Every secret the head holds (Ray's token, the
endpoint and metrics keys, the engine's API key) is replaced by ``[redacted]``, also in the
forms a log gives it (base64, hex, escaped, split, cut: ``redaction.py``): in each text from
Ray, CML or a command as it enters the record, before any cut (a secret cut first leaves
most of itself, which a search for the whole would miss), and again in the whole record as
it is written. Starting a run marks the cluster's runs left open (a head lost or restarted)
as ended, with the time of their last snapshot; ``ray-cml gc`` does the same for a cluster
it collects.

Standard library at import time (``launcher.py``'s rule); the figures' arithmetic
(``figures.py``, on ``prometheus_client``) is imported when first needed, in the node's
environment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from ray_cml_provider.contract import (
    TAG_USER_NODE_TYPE,
    HistoryRecord,
    LedgerEntry,
    Request,
    history_dir,
    history_run_name,
    ledger_dir,
)
from ray_cml_provider.node.context import NodeContext, log
from ray_cml_provider.node.dashboard import MOST_BYTES, TIMEOUT_S, Dashboard
from ray_cml_provider.node.project_api import ProjectAPI, ProjectAPIError, Retries
from ray_cml_provider.node.redaction import Redactor

MAX_JOBS = 50
MAX_COMMANDS = 50
MAX_EVENTS = 200
MAX_NODES = 500
MAX_SERVE = 20  # applications, and deployments of each
MAX_RUNS = 20
TAIL_LINES = 100
TAIL_BYTES = 8192
COMMAND_TAIL_BYTES = 4096
READ_AT_ONCE = 4 << 20  # of monitor.log
# The history's calls to CML: short, as the last snapshot is what `ray stop` waits for.
HISTORY_RETRIES = Retries(attempts=2, backoff_s=0.5, backoff_max_s=1.0, timeout_s=10.0)
SNAPSHOT_BUDGET_S = 30.0  # what one snapshot may take (a job's log read after it, next time)
# What monitor.log says when the autoscaler decides (ray.autoscaler.v2.event_logger, v1's
# StandardAutoscaler), and when a launch failed.
DECISIONS = ("Adding", "Removing", "Terminating", "Resized to", "failed to launch", "ray-cml:")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def tail(text: str, lines: int = TAIL_LINES, most: int = TAIL_BYTES) -> str:
    """The last ``lines`` lines of ``text``, and at most ``most`` characters of them."""
    kept = "\n".join(text.rstrip("\n").splitlines()[-lines:])
    return kept[-most:]


def decision(line: str, redact: Callable[[str], str]) -> str | None:
    """``2026-12-03 10:57:52,850\tINFO event_logger.py:77 -- Adding 2 node(s) of type gpu.``
    -> ``2026-12-03 10:57:52 Adding 2 node(s) of type gpu.``; None for other lines. Redacted
    before it is cut to 300 characters: cut first, a secret across the cut would be missed."""
    when, sep, what = line.partition(" -- ")
    text = what if sep else line
    if not any(mark in text for mark in DECISIONS):
        return None
    return redact(f"{when[:19]} {text.strip()}" if sep else text.strip())[:300]


def scrubbed(value: Any, redact: Callable[[str], str]) -> Any:
    """``value`` (a record as ``dataclasses.asdict`` gives it) with every text in it, keys
    too, redacted: a Serve application's name is Ray's text as much as its message."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {scrubbed(k, redact): scrubbed(v, redact) for k, v in value.items()}
    if isinstance(value, list):
        return [scrubbed(v, redact) for v in value]
    return value


def _epoch(timestamp: str | None) -> float:
    """CML's RFC 3339 time as seconds since the epoch (0.0 when absent or unreadable)."""
    try:
        return datetime.fromisoformat(str(timestamp).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


class MonitorLog:
    """The autoscaler's decisions, read from ``monitor.log`` as it grows (a new Ray session
    is a new file, and a rotated one starts again: read from its start)."""

    def __init__(self, path: Path):
        self.path = path
        self.file: str = ""
        self.offset = 0

    def new_decisions(self, redact: Callable[[str], str]) -> list[str]:
        try:
            real = str(self.path.resolve(strict=True))
            size = os.stat(real).st_size
        except OSError:
            return []
        if real != self.file or size < self.offset:
            self.file, self.offset = real, 0
        try:
            with open(real, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read(READ_AT_ONCE)
        except OSError:
            return []
        complete = data[: data.rfind(b"\n") + 1]  # a line being written waits for next time
        if not complete and len(data) == READ_AT_ONCE:
            complete = data  # one line longer than a read: not a decision, passed over
        self.offset += len(complete)
        lines = complete.decode("utf-8", "replace").splitlines()
        found = (decision(line, redact) for line in lines)
        return [line for line in found if line]


class Historian:
    """The head's history of its cluster (see the module's docstring).

    Two locks: ``lock`` for the run and its snapshots (one at a time), ``commands_lock`` for
    the commands the mailbox reports, so that answering a command never waits on a snapshot.
    The history's own calls to CML are short (``HISTORY_RETRIES``): the last snapshot is
    what ``ray stop`` waits for."""

    def __init__(
        self, ctx: NodeContext, dashboard_port: int, clock: Callable[[], float] = time.time
    ):
        self.ctx = ctx
        self.dashboard = Dashboard(f"http://{ctx.ip}:{dashboard_port}", ctx.token_path)
        self.gateway = f"http://{ctx.ip}:{ctx.app_port}"
        self.clock = clock
        self.api = ProjectAPI(ctx.env, log, HISTORY_RETRIES)
        self.lock = threading.RLock()
        self.commands_lock = threading.Lock()
        self.record: HistoryRecord | None = None
        self.commands: list[dict] = []  # before the run begins too: ray up's setup
        self.nodes: dict[str, dict] = {}
        self.jobs: dict[str, dict] = {}
        self.monitor_log = MonitorLog(Path(ctx.tmp_dir) / "ray/session_latest/logs/monitor.log")
        self.last_scrape = None  # figures.Scrape
        self.secret_values: dict[Path | str, str] = {}  # every secret read, kept
        self.redactor_of: tuple[tuple[str, ...], Redactor] = ((), Redactor([]))

    # -------------------------------------------------------------- the run's life

    def begin(self) -> None:
        """The head's Ray started: a new run. Runs left open before it are closed, and its
        first snapshot taken, in a thread (the caller is answering ``ray up``)."""
        with self.lock:
            if self.record is not None:  # its Ray stopped unseen (`ray stop --force`, ...)
                self.close_without_reading("Ray started again")
            now = self.clock()
            self.record = HistoryRecord(
                cluster=self.ctx.spec.cluster,
                run=history_run_name(now, self.ctx.spec.node_id),
                head=self.ctx.spec.node_id,
                started_at=now,
            )
            self.nodes, self.jobs, self.last_scrape = {}, {}, None
            self.monitor_log = MonitorLog(self.monitor_log.path)
            with self.commands_lock:  # ray up's commands just before Ray started belong to it
                self.commands = [c for c in self.commands if c["ended_at"] >= now - 600]
            log(f"history: run {self.record.run} began")
        threading.Thread(target=self.first_snapshot, name="history-begin", daemon=True).start()

    def first_snapshot(self) -> None:
        try:
            self.close_earlier_runs()
        except Exception as exc:  # the history must never take the head down
            log(f"history: could not close the earlier runs: {exc!r}")
        try:
            self.snapshot()
        except Exception as exc:
            log(f"history: snapshot failed: {exc!r}")

    def end(self, ended_by: str) -> None:
        """Ray stops here: the run's last snapshot, with every job's log tail."""
        with self.lock:
            record = self.record
            if record is None:
                return
            try:
                self.snapshot(ended_by=ended_by)
            finally:
                log(f"history: run {record.run} ended ({ended_by})")
                self.record = None
                with self.commands_lock:
                    self.commands = []

    def close_without_reading(self, ended_by: str) -> None:
        """End the run as its last snapshot left it: what runs now is another Ray."""
        record, self.record = self.record, None
        if record is None:
            return
        record.ended_at, record.ended_by = record.updated_at or record.started_at, ended_by
        record.notes.append("no final snapshot: the figures are those of the last one")
        try:
            self.publish(record)
        except Exception as exc:
            log(f"history: could not close run {record.run}: {exc!r}")

    def remember(self, request: Request, code: int, output: bytes, started_at: float) -> None:
        """A command ``ray up``/``exec``/``submit`` ran (``Request.history``)."""
        if not request.cmd or not request.history:
            return
        redact = self.redactor().redact
        text = output.decode("utf-8", "replace")
        row = {
            "cmd": redact(request.cmd)[:1000],
            "started_at": round(started_at, 3),
            "ended_at": round(self.clock(), 3),
            "exit_status": code,
            "output_tail": tail(redact(text), 50, COMMAND_TAIL_BYTES),
        }
        with self.commands_lock:
            self.commands.append(row)
            del self.commands[:-MAX_COMMANDS]

    def watch(self) -> None:
        """In a thread: a snapshot every ``history_every_s`` while a run goes on."""
        every = max(5.0, self.ctx.spec.history_every_s)
        while True:
            time.sleep(every)
            if self.record is not None:
                try:
                    self.snapshot()
                except Exception as exc:  # the history must never take the head down
                    log(f"history: snapshot failed: {exc!r}")

    # -------------------------------------------------------------- one snapshot

    def snapshot(self, ended_by: str = "") -> None:
        with self.lock:
            record = self.record
            if record is None:
                return
            notes: list[str] = []
            final = bool(ended_by)
            # `ray stop` waits for the last snapshot: bounded, whatever the dashboard does.
            deadline = time.monotonic() + SNAPSHOT_BUDGET_S
            for part, read in (
                ("jobs", lambda: self.read_jobs(record, final, deadline)),
                ("serve", lambda: self.read_serve(record)),
                ("autoscaler", lambda: self.read_decisions(record)),
                ("nodes", lambda: self.read_nodes(record)),
                ("top", lambda: self.read_figures(record)),
            ):
                if time.monotonic() > deadline:
                    notes.append(f"{part}: not read (the snapshot ran out of time)")
                    continue
                try:
                    left = read()
                    if left:
                        notes.append(f"{part}: {left} job log(s) not read (out of time)")
                except Exception as exc:  # each part on its own: the others still count
                    notes.append(self.redactor().redact(f"{part}: {exc}")[:300])
            now = self.clock()
            jobs = sorted(self.jobs.values(), key=lambda j: j.get("start_time") or 0)
            record.jobs = [{k: v for k, v in j.items() if k != "_logs_at"} for j in jobs]
            with self.commands_lock:
                record.commands = list(self.commands)
            record.nodes = self.node_rows(record, now)
            record.gpu_hours = round(sum(n["gpu_hours"] for n in record.nodes), 6)
            record.notes = notes
            record.updated_at = now
            if final:
                record.ended_at, record.ended_by = now, ended_by
            self.publish(record)

    def publish(self, record: HistoryRecord) -> None:
        """Write the record, every secret replaced; not at all while a secret the head holds
        cannot be read (it could not be looked for). Each text was redacted as it came in;
        here every text of the record is, again, and then the JSON as a whole (a secret in
        the forms only JSON gives it). Should that last pass ever leave the JSON unreadable,
        the record is not written rather than written broken."""
        redact = self.redactor().redact
        missing = [str(p) for p in self.secret_files() if p not in self.secret_values]
        if missing:
            log(f"history: not written: cannot read {', '.join(missing)} to keep it out")
            return
        fields = scrubbed(dataclasses.asdict(record), redact)
        text = redact(json.dumps(fields, ensure_ascii=False))
        try:
            json.loads(text)
        except ValueError:
            log("history: not written: redacting the record left it unreadable")
            return
        data = text.encode()
        path = f"{history_dir(record.cluster)}/{record.run}.json"
        try:
            self.api.delete(path)
            self.api.upload(path, data)
        except ProjectAPIError as exc:
            log(f"history: through the API: {exc}; writing on the mount")
            target = self.ctx.mount(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_bytes(data)
            tmp.replace(target)

    def secret_files(self) -> list[Path]:
        ctx = self.ctx
        return [p for p in (ctx.token_path, ctx.endpoint_key_path, ctx.metrics_key_path) if p]

    def secrets(self) -> list[str]:
        """Every secret this head holds or held, as text (replaced wherever it appears)."""
        self.secret_values["CDSW_APIV2_KEY"] = self.ctx.env.get("CDSW_APIV2_KEY", "")
        for path in self.secret_files():
            with contextlib.suppress(OSError):
                value = path.read_text().strip()
                if value:
                    self.secret_values[path] = value
        return [s for s in self.secret_values.values() if len(s) >= 8]

    def redactor(self) -> Redactor:
        """The ``Redactor`` of the secrets as they are now, made again only when they
        change (a key rotated, a file read at last)."""
        secrets = tuple(sorted(set(self.secrets())))
        if secrets != self.redactor_of[0]:
            self.redactor_of = (secrets, Redactor(secrets))
        return self.redactor_of[1]

    # -------------------------------------------------------------- the parts

    def read_jobs(self, record: HistoryRecord, final: bool, deadline: float) -> int:
        """Ray's jobs of this run; a job's log tail once it ended (every job's at the end of
        the run). How many logs were left for lack of time."""
        left, redact = 0, self.redactor().redact
        listed = self.dashboard.get("/api/jobs/")
        listed = [j for j in listed if isinstance(j, dict)] if isinstance(listed, list) else []
        # A recovered head's GCS still lists the jobs of runs before this one.
        ours = [
            j
            for j in listed
            if not j.get("end_time") or j["end_time"] / 1000 + 1 >= record.started_at
        ]
        newest = sorted(ours, key=lambda j: j.get("start_time") or 0)[-MAX_JOBS:]
        jobs: dict[str, dict] = {}
        for job in newest:  # (older ones were kept before, or are not kept at all)
            key = str(job.get("submission_id") or job.get("job_id") or "")
            if not key:
                continue
            kept = self.jobs.get(key, {})
            status = str(job.get("status", ""))
            row = {
                "id": key,
                "type": str(job.get("type", "")),
                "entrypoint": redact(str(job.get("entrypoint", "")))[:1000],
                "status": status,
                "message": redact(str(job.get("message") or ""))[-1000:],
                "start_time": (job.get("start_time") or 0) / 1000,
                "end_time": (job.get("end_time") or 0) / 1000,
                "log_tail": kept.get("log_tail", ""),
            }
            fetched = kept.get("_logs_at") == status
            wanted = job.get("submission_id") and (status in TERMINAL or final)
            if wanted and not fetched and time.monotonic() >= deadline:
                left += 1
            elif wanted and not fetched:
                with contextlib.suppress(OSError, ValueError):
                    logs = self.dashboard.get(f"/api/jobs/{urllib.parse.quote(key)}/logs")
                    text = str((logs or {}).get("logs", ""))
                    row["log_tail"] = tail(redact(text))
                    row["_logs_at"] = status
            elif fetched:
                row["_logs_at"] = status
            jobs[key] = row
        self.jobs = jobs
        return left

    def read_serve(self, record: HistoryRecord) -> None:
        """Each application's and deployment's status, and its message redacted before it is
        cut to 300 characters."""
        redact = self.redactor().redact
        answer = self.dashboard.get("/api/serve/applications/")
        apps = (answer or {}).get("applications") or {}
        serve = {}
        for name, app in list(apps.items())[:MAX_SERVE]:
            deployments = {}
            for dep_name, dep in list((app.get("deployments") or {}).items())[:MAX_SERVE]:
                replicas = dep.get("replicas") or []
                deployments[dep_name] = {
                    "status": dep.get("status", ""),
                    "message": redact(str(dep.get("message") or ""))[:300],
                    "replicas": len(replicas),
                    "replicas_running": sum(1 for r in replicas if r.get("state") == "RUNNING"),
                }
            serve[name] = {
                "status": app.get("status", ""),
                "message": redact(str(app.get("message") or ""))[:300],
                "route_prefix": app.get("route_prefix"),
                "deployments": deployments,
            }
        record.serve = serve

    def read_decisions(self, record: HistoryRecord) -> None:
        record.autoscaler += self.monitor_log.new_decisions(self.redactor().redact)
        del record.autoscaler[:-MAX_EVENTS]

    def read_nodes(self, record: HistoryRecord) -> None:
        """Every node of the run: CML's applications now, the ledger's deleted GPU nodes,
        and the ones seen before that are gone now (ended when last seen)."""
        now = self.clock()
        seen = set()
        for app_id, node, tags, app in self.ctx.cluster_nodes(self.api):
            live = app.get("status") in ("APPLICATION_RUNNING", "APPLICATION_STARTING")
            ended = 0.0 if live else (_epoch(app.get("stopped_at")) or now)
            if ended and ended < record.started_at:
                continue  # a stopped application still listed: of an earlier run
            seen.add(node.node_id)
            row = self.nodes.setdefault(node.node_id, {"node_id": node.node_id})
            row.update(
                kind=node.kind,
                node_type=tags.get(TAG_USER_NODE_TYPE, row.get("node_type", "")),
                gpus=int(app.get("nvidia_gpu") or 0),
                started_at=_epoch(app.get("running_at")) or _epoch(app.get("created_at")),
                ended_at=ended,
                application_id=app_id,
            )
        for name in self.api.list_names(ledger_dir(record.cluster)):
            entry = LedgerEntry.parse(name)
            # (whole seconds in the ledger: a node gone in the run's first second counts)
            if entry is None or entry.end_s + 1 < record.started_at:
                continue
            row = self.nodes.setdefault(entry.node_id, {"node_id": entry.node_id})
            row.update(gpus=entry.gpus, started_at=entry.start_s, ended_at=entry.end_s)
            row.setdefault("kind", "worker")
            if entry.node_type:
                row["node_type"] = entry.node_type
            seen.add(entry.node_id)
        for node_id, row in self.nodes.items():
            if node_id in seen:
                row["last_seen"] = now
            elif not row.get("ended_at"):
                row["ended_at"] = row.get("last_seen", now)
        for node_id in sorted(self.nodes, key=lambda k: self.nodes[k].get("started_at", 0))[
            : max(0, len(self.nodes) - MAX_NODES)
        ]:
            del self.nodes[node_id]

    def node_rows(self, record: HistoryRecord, now: float) -> list[dict]:
        """Each node's part of the run: its time before the run began is another run's."""
        rows = []
        for row in self.nodes.values():
            start = max(row.get("started_at") or record.started_at, record.started_at)
            end = row.get("ended_at") or 0.0
            hours = row.get("gpus", 0) * max(0.0, (end or now) - start) / 3600
            rows.append(
                {
                    "node_id": row["node_id"],
                    "kind": row.get("kind", ""),
                    "node_type": row.get("node_type", ""),
                    "gpus": row.get("gpus", 0),
                    "started_at": row.get("started_at") or 0.0,
                    "ended_at": end,
                    "gpu_hours": round(hours, 6),
                }
            )
        return sorted(rows, key=lambda r: (r["kind"] != "head", r["started_at"]))

    def read_figures(self, record: HistoryRecord) -> None:
        """``ray-cml top``'s figures between this snapshot's scrape and an earlier one at
        least ``MIN_WINDOW_S`` before (Ray refreshes a figure every 10 s: a shorter window,
        as a last snapshot right after a periodic one, would read nothing)."""
        path = self.ctx.metrics_key_path
        if path is None or not self.ctx.app_port:
            return
        from ray_cml_provider import figures  # the node's environment: prometheus_client

        key = path.read_text().strip()
        query = "&".join(f"family={f}" for f in figures.FAMILIES)
        asked = urllib.request.Request(
            f"{self.gateway}/metrics?{query}", headers={"Authorization": f"Bearer {key}"}
        )
        with urllib.request.urlopen(asked, timeout=TIMEOUT_S) as answer:
            text = answer.read(MOST_BYTES).decode("utf-8", "replace")
        scrape = figures.Scrape.parse(text)
        previous = self.last_scrape
        if previous is None:
            self.last_scrape = scrape
            return
        if scrape.at - previous.at < figures.MIN_WINDOW_S:
            return  # the earlier scrape stays the window's start
        self.last_scrape = scrape
        timeline = figures.Timeline([previous, scrape])
        report = figures.TopReport(record.cluster, timeline.span_s)
        report.door = figures.door_figures(timeline)
        report.deployments = figures.serve_figures(timeline)
        report.models = figures.model_figures(timeline)
        record.top = {**report.to_dict(), "at": scrape.at}

    # -------------------------------------------------------------- earlier runs

    def close_earlier_runs(self) -> None:
        """Runs of this cluster left open (their head was lost, or restarted by CML) are
        marked ended at their last snapshot; with this run, the newest ``MAX_RUNS`` stay."""
        folder = history_dir(self.ctx.spec.cluster)
        current = f"{self.record.run}.json" if self.record else ""
        names = sorted(
            n for n in self.api.list_names(folder) if n.endswith(".json") and n != current
        )
        kept = names[-(MAX_RUNS - 1) :] if MAX_RUNS > 1 else []
        for name in names[: len(names) - len(kept)]:
            self.api.delete(f"{folder}/{name}")

        def write(path: str, data: bytes, overwrite: bool = False) -> None:
            self.api.delete(path)
            self.api.upload(path, data)

        for name in kept:
            close_open_run(self.read, write, f"{folder}/{name}", "head lost")

    def read(self, path: str) -> bytes | None:
        try:
            return self.api.download(path)
        except ProjectAPIError:
            return None


def close_open_run(
    read: Callable[[str], bytes | None],
    write: Callable[..., None],
    path: str,
    ended_by: str,
) -> bool:
    """Mark the run at ``path`` ended at its last snapshot when it is still open; whether it
    was. (The head does it for its cluster's earlier runs; ``ray-cml gc`` for a cluster it
    collects.)"""
    data = read(path)
    if not data:
        return False
    try:
        record = HistoryRecord.from_json(data)
    except ValueError:
        return False
    if not record.is_open:
        return False
    record.ended_at = record.updated_at or record.started_at
    record.ended_by = ended_by
    record.notes.append("no final snapshot: the figures are those of the last one")
    write(path, record.to_json(), overwrite=True)
    return True
