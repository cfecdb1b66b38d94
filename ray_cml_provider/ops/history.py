"""``ray-cml history``: what past clusters did, after they are gone.

Each run of a cluster (one life of its head's Ray: from ``ray up`` to ``ray down``,
autostop, or a head lost) leaves a record in the project, written by the head while it ran
and at its end. Without ``--run`` this lists the runs kept (of the YAML's cluster, or of
every cluster of the project); with ``--run NAME`` (or ``latest``) it shows one: its nodes
and GPU-hours, its Ray jobs with the tail of their logs, the commands ``ray up``/``exec``/
``submit`` ran on the head with the tail of their output, the Serve applications' last
status, the autoscaler's decisions, and the last ``ray-cml top`` figures. ``--json`` prints
the record itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from ray_cml_provider.cluster.history import HistoryError, find_run, list_runs, read_run
from ray_cml_provider.cluster.status import format_duration
from ray_cml_provider.cluster.workspace import OperatorError, client_for
from ray_cml_provider.cml import CMLError
from ray_cml_provider.contract import HistoryRecord
from ray_cml_provider.figures import TopReport
from ray_cml_provider.ops import report_failure
from ray_cml_provider.ops.top import render_figures, table
from ray_cml_provider.provider.config import ClusterConfigError, load_cluster_config

LOG_LINES_SHOWN = 20


def when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) if epoch else "-"


def ended(record: HistoryRecord) -> str:
    if record.is_open:
        return "running (or lost: its head left no final snapshot yet)"
    return f"{when(record.ended_at)} ({record.ended_by})"


def render_list(records: list[HistoryRecord]) -> str:
    rows = []
    for r in records:
        failed = sum(1 for j in r.jobs if j.get("status") == "FAILED")
        rows.append(
            (
                r.cluster,
                r.run,
                when(r.started_at),
                format_duration((r.ended_at or r.updated_at) - r.started_at),
                r.ended_by or "(open)",
                f"{len(r.jobs)}" + (f" ({failed} failed)" if failed else ""),
                str(len(r.nodes)),
                f"{r.gpu_hours:.2f}",
            )
        )
    header = ("CLUSTER", "RUN", "STARTED", "LASTED", "ENDED BY", "JOBS", "NODES", "GPU-HOURS")
    lines = table(header, rows)
    lines.append("ray-cml history [CONFIG] --run RUN (or latest) shows one")
    return "\n".join(lines)


def _indented(text: str, lines: int = LOG_LINES_SHOWN) -> list[str]:
    kept = text.rstrip("\n").splitlines()[-lines:]
    return [f"    | {line}" for line in kept] or ["    | (no output)"]


def render_run(record: HistoryRecord) -> str:
    lines = [
        f"cluster {record.cluster}, run {record.run} (head {record.head})",
        f"started {when(record.started_at)}, ended {ended(record)}",
        f"GPU-hours {record.gpu_hours:.2f}",
    ]
    lines += ["", "NODES"]
    lines += table(
        ("NODE", "KIND", "TYPE", "GPUS", "STARTED", "ENDED", "LIVED", "GPU-HOURS"),
        [
            (
                n.get("node_id", "?"),
                n.get("kind", ""),
                n.get("node_type") or "-",
                str(n.get("gpus", 0)),
                when(n.get("started_at", 0)),
                when(n.get("ended_at", 0)) if n.get("ended_at") else "(at the end)",
                format_duration(
                    (n.get("ended_at") or record.ended_at or record.updated_at)
                    - (n.get("started_at") or record.started_at)
                ),
                f"{n.get('gpu_hours', 0):.2f}",
            )
            for n in record.nodes
        ],
    )
    if record.jobs:
        lines += ["", "RAY JOBS"]
        for job in record.jobs:
            took = ""
            if job.get("start_time") and job.get("end_time"):
                took = f", {format_duration(job['end_time'] - job['start_time'])}"
            lines.append(
                f"  {job.get('id', '?')}  {job.get('status', '?')}{took}  "
                f"{job.get('entrypoint', '')}"
            )
            if job.get("message") and job.get("status") != "SUCCEEDED":
                lines.append(f"    {job['message'].splitlines()[-1][:200]}")
            if job.get("log_tail"):
                lines += _indented(job["log_tail"])
    if record.commands:
        lines += ["", "COMMANDS ON THE HEAD (ray up / exec / submit)"]
        for command in record.commands:
            first = (str(command.get("cmd", "")).splitlines() or [""])[0]
            lines.append(
                f"  {when(command.get('started_at', 0))}  exit {command.get('exit_status', '?')}"
                f"  {first[:160]}"
            )
            lines += _indented(command.get("output_tail", ""), 5)
    if record.serve:
        lines += ["", "SERVE (last status)"]
        for name, app in record.serve.items():
            lines.append(f"  {name}: {app.get('status', '?')} {app.get('message', '')}".rstrip())
            for dep_name, dep in (app.get("deployments") or {}).items():
                lines.append(
                    f"    {dep_name}: {dep.get('status', '?')}, "
                    f"{dep.get('replicas_running', 0)}/{dep.get('replicas', 0)} replicas running"
                )
    if record.autoscaler:
        lines += ["", "AUTOSCALER", *(f"  {line}" for line in record.autoscaler)]
    if record.top:
        top = TopReport.from_dict(record.top)
        figures = render_figures(top)
        if figures:
            to = when(record.top.get("at", 0))
            lines += ["", f"LAST FIGURES (over {top.window_s:.0f} s, to {to})"]
            lines += figures
    if record.notes:
        lines += ["", "NOT RECORDED", *(f"  {note}" for note in record.notes)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ray-cml history", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "config",
        nargs="?",
        help="a cluster YAML: its workspace, project and cluster (else CML_HOST, "
        "CML_PROJECT_ID, and every cluster of the project)",
    )
    parser.add_argument("--cluster", help="only this cluster (overrides the YAML's)")
    parser.add_argument("--run", help="show this run (its name, a unique beginning, or latest)")
    parser.add_argument("--json", action="store_true", help="print as JSON")
    args = parser.parse_args(argv)
    provider: dict[str, Any] = {}
    cluster = args.cluster
    try:
        if args.config:
            config = load_cluster_config(args.config)
            provider, cluster = config["provider"], cluster or config["cluster_name"]
        with client_for(provider) as client:
            if args.run:
                record = read_run(client, find_run(client, cluster, args.run))
                print(record.to_json().decode() if args.json else render_run(record))
                return 0
            records, unreadable = [], []
            for ref in list_runs(client, cluster):
                try:
                    records.append(read_run(client, ref))
                except (HistoryError, CMLError) as exc:  # one bad record hides no other
                    unreadable.append(str(exc))
    except (ClusterConfigError, OperatorError, CMLError) as exc:  # HistoryError too
        return report_failure(exc, provider)
    if args.json:
        print(json.dumps([json.loads(r.to_json()) for r in records]))
    elif not records:
        where = f" of cluster {cluster}" if cluster else ""
        print(f"no history{where} in the project yet: a cluster's head writes it while it runs")
    else:
        print(render_list(records))
    for problem in unreadable:
        print(f"ray-cml: skipped {problem}", file=sys.stderr)
    return 0
