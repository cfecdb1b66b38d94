"""How a Ray node is written down on the CML side, in one place.

The provider writes these names and records; ``ray-cml status`` and ``ray-cml gc`` read
them back, so every application this project creates can be found again by its cluster.

- application name: ``ray-<cluster>-<head|worker>-<node id>`` (node id: 8 hex digits);
- Ray's tags: JSON in the application's ``description``, after ``TAGS_PREFIX``;
- the cluster's folder in the project: ``.ray-cml/<cluster>`` (launcher, home, mailboxes),
  and in it Ray's token, ``auth/token`` (see ``provider/ray_auth.py``);
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
TAG_NODE_KIND = "ray-node-type"
TAG_USER_NODE_TYPE = "ray-user-node-type"

TAGS_PREFIX = "ray-cml node "
CLUSTERS_DIR = ".ray-cml"
NODE_NAME = re.compile(
    r"ray-(?P<cluster>[a-z0-9]+(?:-[a-z0-9]+)*)-(?P<kind>head|worker)-(?P<id>[0-9a-f]{8})"
)
LEDGER_ENTRY = re.compile(r"(?P<id>[0-9a-f]+)_(?P<gpus>\d+)_(?P<start>\d+)_(?P<end>\d+)")


def cluster_dir(cluster_name: str) -> str:
    """The cluster's folder in the project filesystem, relative to the project root."""
    return f"{CLUSTERS_DIR}/{cluster_name}"


def auth_token_path(cluster_name: str) -> str:
    """The cluster's Ray token, relative to the project root (``provider/ray_auth.py``)."""
    return f"{cluster_dir(cluster_name)}/auth/token"


def application_name(cluster_name: str, kind: str, node_id: str) -> str:
    return f"ray-{cluster_name}-{kind}-{node_id}"


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
