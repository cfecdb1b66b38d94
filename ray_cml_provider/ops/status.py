"""``ray-cml status CONFIG``: one table joining what CML says and what Ray says.

The status itself is collected by ``cluster/status.py``; this module parses the command's
arguments and renders the report (a table, or ``--json`` for scripts). The table shows where
a session of the project finds the cluster's Ray token, never the token.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from ray_cml_provider.cluster.status import (
    RAY_VIEW_MODES,
    ClusterStatus,
    collect_status,
    format_duration,
)
from ray_cml_provider.cluster.workspace import OperatorError, client_for
from ray_cml_provider.cml import CMLError
from ray_cml_provider.ops import report_failure
from ray_cml_provider.provider.config import ClusterConfigError, load_cluster_config
from ray_cml_provider.provider.endpoint import how_to_call
from ray_cml_provider.provider.ray_auth import DISABLED, DISABLED_WARNING, TOKEN, session_line


def render(report: ClusterStatus) -> str:
    source = {
        "direct": f"Ray's view from the head's GCS ({report.gcs_address})",
        "head": "Ray's view asked of the head through the project files",
        "": f"Ray's view: unavailable ({report.ray_view_note or 'no running head'})",
    }[report.ray_view]
    lines = [f"cluster {report.cluster} in project {report.project_id} on {report.host}", source]
    if not report.nodes:
        stopped = report.autostopped
        if stopped:
            lines.append(
                f"no applications: stopped idle at {stopped.get('stopped_at')} by its head "
                f"(provider.autostop_minutes: {stopped.get('autostop_minutes'):g}); "
                "`ray up` brings it back"
            )
        else:
            lines.append("no applications: the cluster is down")
        return "\n".join(lines)
    header = ("NODE", "TYPE", "CML", "RAY", "CPU", "MEM", "GPU", "AGE", "URL")
    rows = [header]
    for n in report.nodes:
        ray = n.ray_state + (f" {format_duration(n.idle_s)}" if n.ray_state == "idle" else "")
        rows.append(
            (
                n.node_id + (" *" if n.stray else ""),
                n.node_type or "-",
                n.cml_status or "-",
                ray,
                f"{n.cpu:g}" if n.cml_status else "-",
                f"{n.memory:g}G" if n.cml_status else "-",
                str(n.gpus) if n.cml_status else "-",
                format_duration(n.age_s) if n.cml_status else "-",
                n.url or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for row in rows:
        lines.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    lines.append(
        f"GPUs held: {report.gpus_held}"
        + (f" (+{report.gpus_requested} starting)" if report.gpus_requested else "")
        + f"    GPU-hours since the cluster started: {report.gpu_hours:.2f}"
    )
    for n in report.strays:
        lines.append(f"* stray {n.application}: {n.note} (ray-cml gc / ray down remove it)")
    for launch in report.failed_launches:
        lines.append(f"failed launch: {launch['count']} {launch['node_type']}: {launch['details']}")
    restarts = report.autoscaler_restarts
    if restarts:
        at = time.strftime("%H:%M:%S", time.localtime(restarts.get("last_restart_at", 0)))
        lines.append(
            f"autoscaler: restarted {restarts.get('restarts')} time(s) by the head, last at {at}"
            f" after {restarts.get('stalled_s'):.0f} s without an update (its stacks are in the"
            " head application's log)"
        )
    if report.dashboard_url:
        lines.append(f"URL: {report.dashboard_url} (the Ray dashboard)")
        lines += how_to_call(report.dashboard_url, report.endpoint_locked, report.gateway_address)
    if report.dashboard_address:
        lines.append(f"dashboard from a CML session (ray job, serve): {report.dashboard_address}")
    if report.gcs_address:
        lines.append(
            f'connect from inside CML: ray.init(address="{report.gcs_address}")'
            + (f' or ray.init("{report.client_address}")' if report.client_address else "")
        )
    if report.ray_auth == TOKEN:
        line = session_line(report.auth_token_path)
        lines.append(f"Ray token: in a CML session of this project first {line}")
    elif report.ray_auth == DISABLED:
        lines.append(f"WARNING: Ray authentication is off: {DISABLED_WARNING}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- command


def main(argv: list[str] | None = None) -> int:
    """``ray-cml status CONFIG``: the cluster's nodes as CML and Ray see them."""
    parser = argparse.ArgumentParser(prog="ray-cml status", description=__doc__)
    parser.add_argument("config", help="the cluster YAML")
    parser.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    parser.add_argument(
        "--ray-view",
        choices=RAY_VIEW_MODES,
        default="auto",
        help="where Ray's view comes from: the head's GCS directly, through the head, "
        "either (auto), or not at all",
    )
    parser.add_argument(
        "--cml-only", action="store_const", dest="ray_view", const="none", help="= --ray-view none"
    )
    args = parser.parse_args(argv)
    config: dict[str, Any] = {"provider": {}}
    try:
        config = load_cluster_config(args.config)
        with client_for(config["provider"]) as client:
            report = collect_status(config, client, args.ray_view)
    except (ClusterConfigError, OperatorError, CMLError) as exc:
        return report_failure(exc, config["provider"])
    print(json.dumps(report.to_dict(), indent=2) if args.json else render(report))
    return 0
