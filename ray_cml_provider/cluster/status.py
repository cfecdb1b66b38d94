"""A cluster's status: what CML says and what Ray says, joined node by node.

CML's side (one list call, plus each node's ``node.json``) works from anywhere the API
does. Ray's side comes from the head's GCS: directly when this machine can reach it (inside
CML, or on the emulator), else by running ``cluster.ray_view`` on the head through the command
mailbox (from a laptop). With Ray's view an application Ray does not know is flagged as a
stray; without it only what CML alone can tell is shown. The direct view reads the cluster's
Ray token through the files API into a child process (``cluster/ray_view.py``); the report
says where a session of the project finds the token, never the token.

Used by ``ray-cml status`` (``ops/status.py`` renders it) and ``Cluster.status()``.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ray_cml_provider.cml import Application, ApplicationStatus, CMLClient, CMLError
from ray_cml_provider.cml.models import parse_timestamp, seconds_since
from ray_cml_provider.contract import (
    AutoscalerRecord,
    AutostopRecord,
    CommandVar,
    LedgerEntry,
    NodeFolder,
    Request,
    autostop_record_path,
    ledger_dir,
)
from ray_cml_provider.provider.addresses import application_url, node_infos, reachable
from ray_cml_provider.provider.cluster_files import read_file
from ray_cml_provider.provider.lookup import ClusterApplication, cluster_applications
from ray_cml_provider.provider.mailbox import NodeMailbox
from ray_cml_provider.provider.ray_auth import TOKEN, read_token

RAY_VIEW_MODES = ("auto", "direct", "head", "none")
THROUGH_HEAD_TIMEOUT_S = 120.0
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
    dashboard_url: str = ""  # the head application's URL (its gateway: dashboard and /v1)
    dashboard_address: str = ""  # the dashboard itself, for CML sessions of the project
    gateway_address: str = ""  # the head's gateway on its engine's address, for the project
    endpoint_locked: bool = False  # the URL bypasses CML's login and asks for the endpoint key
    autostopped: dict[str, Any] | None = None  # the head's record, when it stopped idle
    # The head's watchdog restarted a stuck autoscaler: restarts, last_restart_at, stalled_s.
    autoscaler_restarts: dict[str, Any] | None = None
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
    listing = cluster_applications(client, cluster)
    report.nodes += [_foreign_row(app, now) for app in listing.unrecognised]
    ours = listing.nodes
    if not ours:  # down: by `ray down`, or stopped by its head when idle (autostop)
        record = read_file(client, autostop_record_path(cluster))
        with contextlib.suppress(ValueError, TypeError):
            report.autostopped = asdict(AutostopRecord.from_json(record)) if record else None
    live_ids = [own.node_id for own in ours if own.live]
    infos = node_infos(client, cluster, live_ids)

    view = None
    head = listing.live_head
    if head and head.node_id in infos:
        info = infos[head.node_id]
        report.gcs_address = f"{info.ip}:{info.gcs_port}"
        if info.client_port:
            report.client_address = f"ray://{info.ip}:{info.client_port}"
        report.ray_auth = info.ray_auth
        report.auth_token_path = info.auth_token_path
        report.dashboard_url = application_url(report.host, head.app)
        report.endpoint_locked = info.endpoint_locked
        folder = NodeFolder.of(cluster, head.node_id)
        restarts = read_file(client, folder.autoscaler)
        with contextlib.suppress(ValueError, TypeError):
            if restarts:
                restarted = asdict(AutoscalerRecord.from_json(restarts))
                restarted.pop("stacks")
                report.autoscaler_restarts = restarted
        if info.dashboard_port:
            report.dashboard_address = f"http://{info.ip}:{info.dashboard_port}"
        if info.app_port:
            report.gateway_address = f"http://{info.ip}:{info.app_port}"
        view = _ray_view(config, client, head.node_id, report, ray_view)

    for own in ours:
        app = own.app
        info = infos.get(own.node_id)
        row = NodeStatus(
            node_id=own.node_id,
            node_type=own.node_type,
            kind=own.kind,
            cml_status=app.status.removeprefix("APPLICATION_"),
            ray_state="unknown",
            cpu=app.cpu,
            memory=app.memory,
            gpus=app.nvidia_gpu,
            age_s=seconds_since(app.created_at, now),
            ip=info.ip if info else "",
            url=application_url(report.host, app) if own.live else "",
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
    row.note = f"running for {format_duration(running_for)} but not a live Ray node"


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
                from ray_cml_provider.cluster.ray_view import read_ray_view_from_here

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
        view = _ray_view_through_head(client, report.cluster, head_id)
    except Exception as exc:
        report.ray_view_note = "; ".join(
            filter(None, [direct_error, f"asking the head failed ({exc})"])
        )
        return None
    report.ray_view = "head"
    return view


def _ray_view_through_head(client: CMLClient, cluster: str, head_id: str) -> dict:
    """Run ``cluster.ray_view`` on the head through its mailbox (the way ``ray exec`` does)."""
    mailbox = NodeMailbox(client, NodeFolder.of(cluster, head_id), progress=lambda _: None)
    command = (
        f'"${{{CommandVar.PYTHON}:-python}}" -m ray_cml_provider.cluster.ray_view '
        f"$CDSW_IP_ADDRESS:${CommandVar.GCS_PORT}"
    )
    result = mailbox.ask(Request(cmd=command), timeout_s=THROUGH_HEAD_TIMEOUT_S)
    output = result.output.decode("utf-8", "replace")
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no answer from the head: {output[-200:]!r}")


def _gpu_totals(
    report: ClusterStatus, ours: list[ClusterApplication], client: CMLClient, now: float
) -> None:
    """GPUs held now, and GPU-hours since the cluster started: the ledger of deleted GPU
    nodes (written by the provider) plus the applications that exist now."""
    recorded: set[str] = set()
    hours = 0.0
    try:
        entries = client.list_files(ledger_dir(report.cluster))
    except CMLError:
        entries = []
    for entry in entries:
        parsed = LedgerEntry.parse(entry.path.rsplit("/", 1)[-1])
        if parsed:
            recorded.add(parsed.node_id)
            hours += parsed.gpus * max(0.0, parsed.end_s - parsed.start_s) / 3600
    for own in ours:
        app, node_id = own.app, own.node_id
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


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``: how the table and the notes show a length of time."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
