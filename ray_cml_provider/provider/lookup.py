"""One way to find a cluster's applications: one list call, each name and description read
back with ``contract.parse_application``. The provider, ``ray-cml status``, ``gc``,
``doctor`` and the local-cluster harness all list through here."""

from __future__ import annotations

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
