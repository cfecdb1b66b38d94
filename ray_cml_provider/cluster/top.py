"""What the cluster and its models are doing now, from the head's ``/metrics``
(``node/cluster_metrics.py``) scraped every second over a window, and the cluster's status:
the figures ``ray-cml top`` shows (the arithmetic is ``figures.py``'s).

Only the families read are asked for (``/metrics?family=``), so a scrape costs the head
little. Each node's CPU and GPU use is joined with CML's view of it (type, age, GPUs) from
``cluster.status``; the autoscaler's last decisions come from the head's ``monitor.log``.
"""

from __future__ import annotations

import time

import requests

from ray_cml_provider.cluster.status import ClusterStatus, collect_status
from ray_cml_provider.cml import CMLClient, CMLError
from ray_cml_provider.contract import NodeFolder, Request
from ray_cml_provider.errors import RayCMLError
from ray_cml_provider.figures import (
    FAMILIES,
    MIN_WINDOW_S,
    SCRAPE_EVERY_S,
    NodeFigures,
    Scrape,
    Timeline,
    TopReport,
    door_figures,
    model_figures,
    node_use,
    serve_figures,
)
from ray_cml_provider.provider.addresses import reachable
from ray_cml_provider.provider.endpoint import bypasses_login
from ray_cml_provider.provider.mailbox import NodeMailbox
from ray_cml_provider.provider.metrics_key import read_metrics_key

METRICS_KEY_HEADER = "X-Metrics-Key"  # node/gateway.py's


def fetch(url: str, headers: dict[str, str], timeout_s: float = 15.0) -> Scrape:
    """One scrape of the head's ``/metrics`` (raises ``requests.RequestException``, or
    ``PermissionError`` when the key is refused)."""
    answer = requests.get(url, headers=headers, timeout=timeout_s)
    if answer.status_code == 401:
        raise PermissionError(f"{url}: the head refused the metrics key")
    answer.raise_for_status()
    return Scrape.parse(answer.text)


# ------------------------------------------------------------------------------ collecting

DECISIONS = ("Adding", "Terminating", "Removing", "TERMINATED", "failed to launch")
DECISIONS_SHOWN = 6


def metrics_routes(
    report: ClusterStatus, config: dict, key: str, client: CMLClient
) -> list[tuple[str, dict[str, str]]]:
    """Where to scrape, best first: the head's engine directly (a CML session of the project,
    the emulator), then the head's URL through CML's proxy (the metrics key as the bearer
    when the head bypasses CML's login; behind the login, the user's API key logs in and
    the metrics key goes in ``X-Metrics-Key``)."""
    routes = []
    if report.gateway_address:
        ip, port = report.gateway_address.removeprefix("http://").rsplit(":", 1)
        if reachable(ip, int(port)):
            routes.append((f"{report.gateway_address}/metrics", {"Authorization": f"Bearer {key}"}))
    if report.dashboard_url:
        head = config["available_node_types"][config["head_node_type"]]["node_config"]
        if bypasses_login(head):
            headers = {"Authorization": f"Bearer {key}"}
        else:
            login = client.settings.api_key.reveal() if client.settings.api_key else ""
            headers = {"Authorization": f"Bearer {login}", METRICS_KEY_HEADER: key}
        routes.append((f"{report.dashboard_url}/metrics", headers))
    return routes


def autoscaler_decisions(client: CMLClient, cluster: str, head_id: str) -> list[str]:
    """The autoscaler's last decisions, with their reasons, from the head's ``monitor.log``
    (through the head's mailbox: the log is on the head's disk)."""
    pattern = "|".join(DECISIONS)
    command = (
        f"grep -hE '{pattern}' \"$RAY_TMPDIR\"/ray/session_latest/logs/monitor.log "
        f"2>/dev/null | tail -n {DECISIONS_SHOWN}"
    )
    mailbox = NodeMailbox(client, NodeFolder.of(cluster, head_id), progress=lambda _: None)
    try:
        result = mailbox.ask(Request(cmd=command), timeout_s=60)
    except (RayCMLError, CMLError):
        return []
    return [_decision(line) for line in result.output.decode("utf-8", "replace").splitlines()]


def _decision(line: str) -> str:
    """``2026-12-03 10:57:52,850\tINFO event_logger.py:77 -- Adding 2 node(s)`` -> the time
    and what was decided."""
    when, _, what = line.partition(" -- ")
    return f"{when[11:19]} {what.strip()}" if what else line.strip()


def watch(url: str, headers: dict[str, str], window_s: float) -> Timeline:
    """Scrapes every ``SCRAPE_EVERY_S`` for ``window_s`` (at least two export periods)."""
    filtered = url + "?" + "&".join(f"family={f}" for f in FAMILIES)
    scrapes = [fetch(filtered, headers)]
    deadline = scrapes[0].at + max(window_s, MIN_WINDOW_S)
    while scrapes[-1].at < deadline:
        time.sleep(SCRAPE_EVERY_S)
        scrapes.append(fetch(filtered, headers))
    return Timeline(scrapes)


def collect_top(
    config: dict, client: CMLClient, interval_s: float = MIN_WINDOW_S, decisions: bool = True
) -> TopReport:
    """Scrapes over ``interval_s`` (``watch``), the cluster's status, the autoscaler's
    decisions."""
    cluster = config["cluster_name"]
    # Where the head is (CML's side only: Ray's view is read once, after the window).
    status = collect_status(config, client, ray_view="none")
    top = TopReport(cluster, interval_s)
    key = read_metrics_key(client, cluster)
    timeline = None
    if status.dashboard_url and key:
        for url, headers in metrics_routes(status, config, key, client):
            try:
                timeline = watch(url, headers, interval_s)
                break
            except (requests.RequestException, PermissionError) as exc:
                top.metrics_note = f"{url}: {exc}"
    elif status.dashboard_url:
        top.metrics_note = "the cluster has no metrics key: `ray up` again gives it one"
    else:
        top.metrics_note = "the cluster has no running head"
    if timeline is not None:
        top.window_s = timeline.span_s
        top.metrics_note = ""
        top.door = door_figures(timeline)
        top.deployments = serve_figures(timeline)
        top.models = model_figures(timeline)
    use = node_use(timeline.last) if timeline is not None else {}
    status = collect_status(config, client, ray_view="auto")  # the nodes at the window's end
    for row in status.nodes:
        if row.node_id == "-":
            top.pending_nodes.append(row.node_type)
            continue
        cpu, gpu = use.get(row.node_id, (None, None))
        top.nodes.append(
            NodeFigures(
                node_id=row.node_id,
                node_type=row.node_type,
                kind=row.kind,
                cml_status=row.cml_status,
                ray_state=row.ray_state,
                age_s=row.age_s,
                gpus=row.gpus,
                gpu_hours=row.gpus * row.age_s / 3600,
                cpu_use_percent=cpu,
                gpu_use_percent=gpu,
            )
        )
    head = next((n for n in top.nodes if n.kind == "head" and n.cml_status == "RUNNING"), None)
    if decisions and head is not None:
        top.decisions = autoscaler_decisions(client, cluster, head.node_id)
    return top
