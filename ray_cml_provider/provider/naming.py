"""How a Ray node is written down on the CML side, in one place.

The provider writes these names and records; ``ray-cml status`` and ``ray-cml gc`` read
them back, so every application this project creates can be found again by its cluster.

- application name: ``ray-<cluster>-<head|worker>-<node id>`` (node id: 8 hex digits);
- Ray's tags: JSON in the application's ``description``, after ``TAGS_PREFIX``;
- the cluster's folder in the project: ``.ray-cml/<cluster>`` (launcher, home, mailboxes),
  and in it Ray's token, ``auth/token`` (see ``provider/ray_auth.py``), and each node's
  folder, ``nodes/<id>``, where its launcher publishes ``node.json`` (address, ports) and,
  when it gives up, ``failure.txt``;
- the GPU ledger: one empty file per deleted GPU node, ``ledger/<id>_<gpus>_<start>_<end>``
  in the cluster's folder, so GPU-hours since the cluster started survive scale-down with
  one list call to read them all.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

# Ray's tag keys (ray.autoscaler.tags), spelled out so readers of the names need no Ray.
TAG_CLUSTER_NAME = "ray-cluster-name"
TAG_USER_NODE_TYPE = "ray-user-node-type"

TAGS_PREFIX = "ray-cml node "
CLUSTERS_DIR = ".ray-cml"
NODE_NAME = re.compile(
    r"ray-(?P<cluster>[a-z0-9]+(?:-[a-z0-9]+)*)-(?P<kind>head|worker)-(?P<id>[0-9a-f]{8})"
)
# A node's variables. The provider sets APPLICATION_ENV on the node's application (a
# node_config may set RAY_CML_GCS_PORT_PREFERRED); the node's launcher reads them and gives
# every command it runs COMMAND_ENV too; the bootstrap hands the launcher BOOTSTRAP_ENV. The
# node side spells the names out: tests/test_node_launcher.py keeps it, the provider and these
# lists in step.
APPLICATION_ENV = (
    "RAY_CML_CLUSTER",  # the cluster's name
    "RAY_CML_NODE_ID",  # this node's id (also RAY_CLOUD_INSTANCE_ID)
    "RAY_CML_NODE_KIND",  # head | worker
    "RAY_CML_APP_NAME",  # its application's name (a worker deletes itself by it)
    "RAY_CML_DIR",  # the cluster's folder, relative to the project
    "RAY_CML_HEAD_LOST_TIMEOUT_S",  # a worker leaves once its head is gone this long
    "RAY_CML_PIP_PACKAGES",  # JSON list: the node environment's packages
    "RAY_CML_RUNTIME",  # the runtime's image (part of the environment's key)
    "RAY_CML_AUTH_TOKEN_FILE",  # the cluster's Ray token file (provider/ray_auth.py)
    "RAY_CML_PROVIDER_ZIP",  # the shipped provider code the launcher runs (shipping.py)
    "RAY_CML_SETUP_COMMANDS",  # worker: JSON list, run before Ray starts
    "RAY_CML_START_COMMANDS",  # worker: JSON list, worker_start_ray_commands
    "RAY_CML_GCS_PORT_PREFERRED",  # head: the GCS port when free (default 6379)
    "RAY_CML_ENDPOINT_KEY_FILE",  # head: the endpoint key's file (provider/endpoint.py)
    "RAY_CML_LOGIN_BYPASSED",  # head: "1" when its URL is outside CML's login
    "RAY_CML_GATEWAY_IDLE_S",  # head: seconds a silent caller keeps a connection (60)
    "RAY_CML_AUTOSCALER_STUCK_S",  # head: no autoscaler update this long: restart it (60)
    "RAY_CML_SERVE_PORT",  # head: Serve's HTTP proxy, behind the URL's /v1 (default 8000)
    "RAY_CML_AUTOSTOP_MINUTES",  # head: stop the cluster after this many idle minutes
    "RAY_CML_HEAD_RECOVERY",  # "1": a restarted head recovers; workers follow it (both kinds)
    "RAY_CML_HEAD_NODE_ID",  # worker: the head's node id (whose node.json says where it is)
)
BOOTSTRAP_ENV = (  # node_bootstrap.HANDOFF
    "RAY_CML_NODE_SITE",
    "RAY_CML_ENVIRONMENT_SUMMARY",
    "RAY_CML_ENVIRONMENT_ERROR",
    "RAY_CML_RUNTIME_PYTHONPATH",
)
COMMAND_ENV = (
    "RAY_CML_GCS_PORT",
    "RAY_CML_CLIENT_PORT",
    "RAY_CML_AGENT_PORT",
    "RAY_CML_DASHBOARD_PORT",  # head: the dashboard's (the application's port is the gateway)
    "RAY_CML_PROJECT_DIR",
    "RAY_CML_PYTHON",  # the runtime's interpreter, the one `ray` runs with
    "RAY_CML_LAUNCHER_PGID",  # what the `ray stop` shim stops
    "RAY_CML_LAUNCHER_PID",
)

LEDGER_ENTRY = re.compile(r"(?P<id>[0-9a-f]+)_(?P<gpus>\d+)_(?P<start>\d+)_(?P<end>\d+)")


def cluster_dir(cluster_name: str) -> str:
    """The cluster's folder in the project filesystem, relative to the project root."""
    return f"{CLUSTERS_DIR}/{cluster_name}"


def auth_token_path(cluster_name: str) -> str:
    """The cluster's Ray token, relative to the project root (``provider/ray_auth.py``)."""
    return f"{cluster_dir(cluster_name)}/auth/token"


def node_dir(cluster_name: str, node_id: str) -> str:
    """A node's folder in the cluster's: its mailbox, ``node.json`` and ``failure.txt``."""
    return f"{cluster_dir(cluster_name)}/nodes/{node_id}"


def node_info_path(cluster_name: str, node_id: str) -> str:
    """Where the node's launcher publishes its address and ports (``node.json``)."""
    return f"{node_dir(cluster_name, node_id)}/node.json"


def node_failure_path(cluster_name: str, node_id: str) -> str:
    """Where a launcher that gave up says why (pip's last lines, a missing token...)."""
    return f"{node_dir(cluster_name, node_id)}/failure.txt"


def application_prefix(cluster_name: str = "", kind: str = "") -> str:
    """What the names of the cluster's applications (of ``kind``) start with: the name
    filter of a list call. CML's filter matches substrings, so a match is re-checked with
    ``parse_application``. Without a cluster: every application of this project's."""
    if not cluster_name:
        return "ray-"
    return f"ray-{cluster_name}-" + (f"{kind}-" if kind else "")


def application_name(cluster_name: str, kind: str, node_id: str) -> str:
    return f"{application_prefix(cluster_name, kind)}{node_id}"


def encode_tags(tags: dict[str, str]) -> str:
    return TAGS_PREFIX + json.dumps(tags, sort_keys=True, separators=(",", ":"))


def decode_tags(description: str) -> dict[str, str] | None:
    if not description.startswith(TAGS_PREFIX):
        return None
    try:
        tags = json.loads(description[len(TAGS_PREFIX) :])
    except ValueError:
        return None
    return tags if isinstance(tags, dict) else None


@dataclass(frozen=True)
class NodeName:
    cluster: str
    kind: str  # "head" or "worker"
    node_id: str


def parse_application(name: str, description: str) -> tuple[NodeName, dict[str, str]] | None:
    """This project's node, or None for any other application.

    A name can be read two ways when cluster names contain hyphens, so the cluster is the
    one the tags name, and the name must be exactly what the provider would have written.
    """
    match = NODE_NAME.fullmatch(name)
    tags = decode_tags(description)
    if not match or tags is None:
        return None
    cluster = tags.get(TAG_CLUSTER_NAME, "")
    if name != application_name(cluster, match["kind"], match["id"]):
        return None
    return NodeName(cluster, match["kind"], match["id"]), tags


def ledger_entry(node_id: str, gpus: int, start_s: float, end_s: float) -> str:
    return f"{node_id}_{gpus}_{int(start_s)}_{int(end_s)}"


def parse_ledger_entry(file_name: str) -> tuple[str, int, float, float] | None:
    match = LEDGER_ENTRY.fullmatch(file_name)
    if not match:
        return None
    return match["id"], int(match["gpus"]), float(match["start"]), float(match["end"])


def endpoint_key_path(cluster_name: str) -> str:
    """The key callers of the head's URL send when it bypasses CML's login
    (``provider/endpoint.py``), relative to the project root."""
    return f"{cluster_dir(cluster_name)}/auth/endpoint_key"


def gcs_state_path(cluster_name: str) -> str:
    """Where a head with ``provider.head_recovery`` keeps its GCS state (RocksDB), so that
    a restarted head starts Ray again from it (``NodeLauncher.restart_head_ray``)."""
    return f"{cluster_dir(cluster_name)}/gcs"


def autoscaler_record_path(cluster_name: str, head_id: str) -> str:
    """What the head's watchdog publishes when it restarted a stuck autoscaler
    (``node_watchdog``)."""
    return f"{node_dir(cluster_name, head_id)}/autoscaler.json"


def autostop_record_path(cluster_name: str) -> str:
    """What a head that stopped its idle cluster leaves behind (``node_launcher.autostop``)."""
    return f"{cluster_dir(cluster_name)}/autostopped.json"
