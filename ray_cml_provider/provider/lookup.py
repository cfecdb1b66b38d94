"""One way to find a cluster's applications: one list call, each name and description read
back with ``contract.parse_application``. The provider, ``ray-cml status``, ``gc``,
``doctor`` and the local-cluster harness all list through here."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from ray_cml_provider.cml import Application, ApplicationStatus, CMLClient
from ray_cml_provider.contract import (
    HEAD,
    TAG_USER_NODE_TYPE,
    NodeName,
    application_prefix,
    parse_application,
)


@dataclass(frozen=True)
class ClusterApplication:
    """An application of a cluster, with what its name and tags say about the node."""

    app: Application
    node: NodeName
    tags: dict[str, str]

    @property
    def node_id(self) -> str:
        return self.node.node_id

    @property
    def kind(self) -> str:
        return self.node.kind

    @property
    def cluster(self) -> str:
        return self.node.cluster

    @property
    def node_type(self) -> str:
        return self.tags.get(TAG_USER_NODE_TYPE, "")

    @property
    def live(self) -> bool:
        return self.app.status in ApplicationStatus.LIVE


@dataclass
class Listing:
    nodes: list[ClusterApplication] = field(default_factory=list)
    # Named like the cluster's applications, but not written by this provider.
    unrecognised: list[Application] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[ClusterApplication]:
        return [n for n in self.nodes if n.kind == kind]

    @property
    def live_head(self) -> ClusterApplication | None:
        return next((n for n in self.of_kind(HEAD) if n.live), None)


def cluster_applications(client: CMLClient, cluster: str = "", kind: str = "") -> Listing:
    """The applications of ``cluster`` (of ``kind``), whatever their status; without a
    cluster, every cluster's of the project. CML's name filter matches substrings, so
    ``ray-c-`` also finds cluster ``c-2``'s: each is checked against its tags."""
    listing = Listing()
    prefix = application_prefix(cluster, kind)
    for app in client.list_applications({"name": prefix}):
        if not app.name.startswith(prefix):
            continue
        parsed = parse_application(app.name, app.description)
        if parsed is None:
            listing.unrecognised.append(app)
        elif not cluster or parsed[0].cluster == cluster:
            listing.nodes.append(ClusterApplication(app, parsed[0], parsed[1]))
    return listing


# Ray's commands list their cluster right after bootstrapping the config (`ray down` without
# --yes asks its question first), whose workspace check asks CML two things side by side:
# the listing is asked beside them (one round trip less at CML's 100-300 ms), and the
# provider's first listing in this process takes it if still fresh (else lists again).
PREFETCH_FRESH_S = 2.0
_prefetched: dict[tuple, tuple[float, Listing]] = {}
_prefetched_lock = threading.Lock()


def _prefetch_key(client: CMLClient, cluster: str) -> tuple:
    settings = client.settings
    return (settings.host, settings.project_id, settings.api_key, cluster)


def prefetch_cluster_applications(client: CMLClient, cluster: str) -> None:
    """List ``cluster`` now, for this process's next ``take_prefetched`` (best effort: a
    failure leaves the provider to list it itself)."""
    asked = time.monotonic()
    try:
        listing = cluster_applications(client, cluster)
    except Exception:  # noqa: BLE001 - a prefetch never fails its caller
        return
    with _prefetched_lock:
        _prefetched[_prefetch_key(client, cluster)] = (asked, listing)


def take_prefetched(client: CMLClient, cluster: str) -> tuple[float, Listing] | None:
    """The prefetched listing of ``cluster`` and when it was asked (monotonic), once, if it
    was asked less than ``PREFETCH_FRESH_S`` ago."""
    with _prefetched_lock:
        found = _prefetched.pop(_prefetch_key(client, cluster), None)
    if found is None or time.monotonic() - found[0] > PREFETCH_FRESH_S:
        return None
    return found
