"""``ray-cml status CONFIG``: one table joining what CML says and what Ray says.

CML's side (one list call, plus each node's ``node.json``) works from anywhere the API
does. Ray's side comes from the head's GCS: directly when this machine can reach it (inside
CML, or on the emulator), else by running ``ops.ray_view`` on the head through the command
mailbox (from a laptop). With Ray's view an application Ray does not know is flagged as a
stray; without it only what CML alone can tell is shown. The direct view reads the cluster's
Ray token through the files API into a child process (``ops/ray_view.py``); the table shows
where a session of the project finds the token, never the token.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ray_cml_provider.cml import Application, ApplicationStatus, CMLClient, CMLError
from ray_cml_provider.cml.models import parse_timestamp, seconds_since
from ray_cml_provider.ops.workspace import (
    OperatorError,
    application_url,
    client_for,
    node_infos,
    reachable,
    report_failure,
)
from ray_cml_provider.provider.config import ClusterConfigError, load_cluster_config
from ray_cml_provider.provider.naming import (
    TAG_USER_NODE_TYPE,
    application_prefix,
    cluster_dir,
    parse_application,
    parse_ledger_entry,
)
from ray_cml_provider.provider.ray_auth import (
    DISABLED,
    DISABLED_WARNING,
    TOKEN,
    read_token,
    session_line,
)

RAY_VIEW_MODES = ("auto", "direct", "head", "none")
DEFAULT_JOIN_GRACE_S = 900.0  # a running application not in Ray yet is "joining" this long


@dataclass
class NodeStatus:
    """One row: a CML application (or a launch Ray asked for that has none yet)."""

    node_id: str
    node_type: str
    kind: str  # head | worker | "" (not one of ours)
    cml_status: str  # RUNNING, STARTING, ... ("" for a launch not created yet)
    ray_state: str  # alive | idle | joining | pending | dead | unknown | not in Ray
    idle_s: float = 0.0
    cpu: float = 0.0
    memory: float = 0.0
    gpus: int = 0
    age_s: float = 0.0
    ip: str = ""
    url: str = ""
    application: str = ""
    application_id: str = ""
    stray: bool = False
    note: str = ""


@dataclass
class ClusterStatus:
    cluster: str
    host: str
    project_id: str
    nodes: list[NodeStatus] = field(default_factory=list)
    ray_view: str = ""  # "direct", "head", or "" when Ray's view is not available
    ray_view_note: str = ""
    failed_launches: list[dict[str, Any]] = field(default_factory=list)
    gpus_held: int = 0
    gpus_requested: int = 0
    gpu_hours: float = 0.0
    dashboard_url: str = ""
    gcs_address: str = ""
    client_address: str = ""
    ray_auth: str = ""  # "token" | "disabled" (the head's), "" without a running head
    auth_token_path: str = ""  # the token's file, as the project's engines see it

    @property
    def head(self) -> NodeStatus | None:
        return next((n for n in self.nodes if n.kind == "head" and not n.stray), None)

    @property
    def strays(self) -> list[NodeStatus]:
        return [n for n in self.nodes if n.stray]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["strays"] = [n.node_id for n in self.strays]
        data["head"] = self.head.node_id if self.head else None
        return data


# ---------------------------------------------------------------------------- collecting


def collect_status(
    config: dict[str, Any],
    client: CMLClient,
    ray_view: str = "auto",
    join_grace_s: float = DEFAULT_JOIN_GRACE_S,
) -> ClusterStatus:
    cluster = config["cluster_name"]
    now = time.time()
    report = ClusterStatus(cluster, client.settings.host, client.settings.project_id or "")
    prefix = application_prefix(cluster)
    apps = client.list_applications({"name": prefix})
    ours: list[tuple[Application, str, str, str]] = []  # app, node id, kind, node type
    for app in apps:
        if not app.name.startswith(prefix):
            continue
        parsed = parse_application(app.name, app.description)
        if parsed is None:
            report.nodes.append(_foreign_row(app, now))
        elif parsed[0].cluster == cluster:
            name, tags = parsed
            ours.append((app, name.node_id, name.kind, tags.get(TAG_USER_NODE_TYPE, "")))
    live_ids = [node_id for app, node_id, _, _ in ours if app.status in ApplicationStatus.LIVE]
    infos = node_infos(client, cluster, live_ids)

    view = None
    head = next((o for o in ours if o[2] == "head" and o[0].status in ApplicationStatus.LIVE), None)
    if head and head[1] in infos:
        info = infos[head[1]]
        report.gcs_address = f"{info['ip']}:{info['gcs_port']}"
        if info.get("client_port"):
            report.client_address = f"ray://{info['ip']}:{info['client_port']}"
        report.ray_auth = info.get("ray_auth", DISABLED)
        report.auth_token_path = info.get("auth_token_path", "")
        report.dashboard_url = application_url(report.host, head[0], info)
        view = _ray_view(config, client, head[1], report, ray_view)

    for app, node_id, kind, node_type in ours:
        info = infos.get(node_id) or {}
        row = NodeStatus(
            node_id=node_id,
            node_type=node_type,
            kind=kind,
            cml_status=app.status.removeprefix("APPLICATION_"),
            ray_state="unknown",
            cpu=app.cpu,
            memory=app.memory,
            gpus=app.nvidia_gpu,
            age_s=seconds_since(app.created_at, now),
            ip=info.get("ip", ""),
            url=application_url(report.host, app, info or None)
            if app.status in ApplicationStatus.LIVE
            else "",
            application=app.name,
            application_id=app.id,
        )
        _join_ray_state(row, app, view, join_grace_s, now)
        report.nodes.append(row)
    if view is not None:
        for launch in view["pending_launches"]:
            for _ in range(launch["count"]):
                report.nodes.append(
                    NodeStatus("-", launch["node_type"], "worker", "", "pending", note="requested")
                )
        report.failed_launches = view["failed_launches"]
    report.nodes.sort(key=lambda n: (n.kind != "head", n.stray, n.node_type, -n.age_s))
    _gpu_totals(report, ours, client, now)
    return report


def _foreign_row(app: Application, now: float) -> NodeStatus:
    match = re.search(r"-([0-9a-f]{8})$", app.name)
    return NodeStatus(
        node_id=match.group(1) if match else "?",
        node_type="?",
        kind="",
        cml_status=app.status.removeprefix("APPLICATION_"),
        ray_state="not in Ray",
        cpu=app.cpu,
        memory=app.memory,
        gpus=app.nvidia_gpu,
        age_s=seconds_since(app.created_at, now),
        application=app.name,
        application_id=app.id,
        stray=True,
        note="has the cluster's name but no ray-cml node tags (not created by ray-cml)",
    )


def _join_ray_state(
    row: NodeStatus, app: Application, view: dict | None, join_grace_s: float, now: float
) -> None:
    if app.status not in ApplicationStatus.LIVE:
        row.ray_state = "-"
        row.stray = True
        row.note = "not running: Ray's autoscaler or `ray down` deletes it"
        return
    if view is None:
        return
    ray_node = view["nodes"].get(row.node_id)
    if ray_node and ray_node["state"] != "dead":
        row.ray_state = ray_node["state"]
        row.idle_s = ray_node["idle_s"]
        return
    running_for = seconds_since(app.running_at, now)
    if app.status == ApplicationStatus.STARTING or running_for < join_grace_s:
        row.ray_state = "joining" if app.status == ApplicationStatus.RUNNING else "pending"
        return
    row.ray_state = "dead" if ray_node else "not in Ray"
    row.stray = True
    row.note = f"running for {_duration(running_for)} but not a live Ray node"


def _ray_view(
    config: dict, client: CMLClient, head_id: str, report: ClusterStatus, mode: str
) -> dict | None:
    if mode == "none":
        report.ray_view_note = "not asked (--cml-only)"
        return None
    ip, port = report.gcs_address.rsplit(":", 1)
    direct_error = ""
    if mode in ("auto", "direct"):
        if reachable(ip, int(port)):
            try:
                from ray_cml_provider.ops.ray_view import read_ray_view_from_here

                token = read_token(client, report.cluster) if report.ray_auth == TOKEN else None
                view = read_ray_view_from_here(report.gcs_address, token)
                report.ray_view = "direct"
                return view
            except Exception as exc:  # Ray's GCS client raises several types
                direct_error = f"the head's GCS at {report.gcs_address} did not answer ({exc})"
        else:
            direct_error = f"the head's GCS at {report.gcs_address} is not reachable from here"
        if mode == "direct":
            report.ray_view_note = direct_error
            return None
    try:
        view = _ray_view_through_head(config, head_id)
    except Exception as exc:
        report.ray_view_note = "; ".join(
            filter(None, [direct_error, f"asking the head failed ({exc})"])
        )
        return None
    report.ray_view = "head"
    return view


def _ray_view_through_head(config: dict, head_id: str) -> dict:
    """Run ``ops.ray_view`` on the head through the mailbox (the way ``ray exec`` does)."""
    from ray_cml_provider.provider.command_runner import CMLCommandRunner
    from ray_cml_provider.provider.node_provider import CMLNodeProvider

    provider = CMLNodeProvider(config["provider"], config["cluster_name"])
    runner = CMLCommandRunner(provider, head_id)
    output = runner.run(
        '"${RAY_CML_PYTHON:-python}" -m ray_cml_provider.ops.ray_view '
        "$CDSW_IP_ADDRESS:$RAY_CML_GCS_PORT",
        with_output=True,
    )
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no answer from the head: {output[-200:]!r}")


def _gpu_totals(report: ClusterStatus, ours: list, client: CMLClient, now: float) -> None:
    """GPUs held now, and GPU-hours since the cluster started: the ledger of deleted GPU
    nodes (written by the provider) plus the applications that exist now."""
    recorded: set[str] = set()
    hours = 0.0
    try:
        entries = client.list_files(f"{cluster_dir(report.cluster)}/ledger")
    except CMLError:
        entries = []
    for entry in entries:
        parsed = parse_ledger_entry(entry.path.rsplit("/", 1)[-1])
        if parsed:
            node_id, gpus, start, end = parsed
            recorded.add(node_id)
            hours += gpus * max(0.0, end - start) / 3600
    for app, node_id, _, _ in ours:
        if app.status == ApplicationStatus.RUNNING:
            report.gpus_held += app.nvidia_gpu
        elif app.status == ApplicationStatus.STARTING:
            report.gpus_requested += app.nvidia_gpu
        start = parse_timestamp(app.running_at)
        if node_id in recorded or not app.nvidia_gpu or start is None:
            continue
        end = (
            now if app.status in ApplicationStatus.LIVE else parse_timestamp(app.stopped_at) or now
        )
        hours += app.nvidia_gpu * max(0.0, end - start) / 3600
    report.gpu_hours = round(hours, 6)


# ---------------------------------------------------------------------------- rendering


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def render(report: ClusterStatus) -> str:
    source = {
        "direct": f"Ray's view from the head's GCS ({report.gcs_address})",
        "head": "Ray's view asked of the head through the project files",
        "": f"Ray's view: unavailable ({report.ray_view_note or 'no running head'})",
    }[report.ray_view]
    lines = [f"cluster {report.cluster} in project {report.project_id} on {report.host}", source]
    if not report.nodes:
        lines.append("no applications: the cluster is down")
        return "\n".join(lines)
    header = ("NODE", "TYPE", "CML", "RAY", "CPU", "MEM", "GPU", "AGE", "URL")
    rows = [header]
    for n in report.nodes:
        ray = n.ray_state + (f" {_duration(n.idle_s)}" if n.ray_state == "idle" else "")
        rows.append(
            (
                n.node_id + (" *" if n.stray else ""),
                n.node_type or "-",
                n.cml_status or "-",
                ray,
                f"{n.cpu:g}" if n.cml_status else "-",
                f"{n.memory:g}G" if n.cml_status else "-",
                str(n.gpus) if n.cml_status else "-",
                _duration(n.age_s) if n.cml_status else "-",
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
    if report.dashboard_url:
        lines.append(f"dashboard: {report.dashboard_url}")
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
