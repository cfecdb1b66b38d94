"""``ray-cml gc``: find and delete applications whose cluster has no live head.

A worker deletes itself when its head is gone, and ``ray down`` deletes a whole cluster;
this is the net under both: a laptop that crashed mid-``ray up``, a head stopped from CML's
UI, a worker that was SIGKILLed before it could clean up. It scans every application of
the project, keeps the ones this project created (the name *and* the node tags must match,
so nobody else's application is touched), groups them by cluster, and reports each cluster
whose head application is neither STARTING nor RUNNING. Nothing is deleted without
``--yes``; then the applications go, and the cluster's folder in the project with them;
its history stays (``ray-cml history``), its open run marked as ended by a lost head.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Any

from ray_cml_provider.cluster.history import close_open_runs
from ray_cml_provider.cluster.workspace import OperatorError, client_for
from ray_cml_provider.cml import Application, ApplicationStatus, CMLClient, CMLError
from ray_cml_provider.contract import (
    CLUSTERS_DIR,
    HEAD,
    application_prefix,
    cluster_dir,
)
from ray_cml_provider.ops import report_failure
from ray_cml_provider.provider.config import ClusterConfigError, load_cluster_config
from ray_cml_provider.provider.lookup import cluster_applications


@dataclass
class ClusterApps:
    cluster: str
    applications: list[Application] = field(default_factory=list)
    heads: list[Application] = field(default_factory=list)

    @property
    def live_head(self) -> Application | None:
        return next((a for a in self.heads if a.status in ApplicationStatus.LIVE), None)


def find_orphans(client: CMLClient, cluster: str | None = None) -> list[ClusterApps]:
    """Clusters (with all their applications) that have no STARTING or RUNNING head."""
    clusters: dict[str, ClusterApps] = {}
    for own in cluster_applications(client, cluster or "").nodes:
        group = clusters.setdefault(own.cluster, ClusterApps(own.cluster))
        group.applications.append(own.app)
        if own.kind == HEAD:
            group.heads.append(own.app)
    return [c for _, c in sorted(clusters.items()) if c.live_head is None]


def delete_orphans(client: CMLClient, orphans: list[ClusterApps]) -> list[str]:
    """Delete every listed application, then each cluster's folder; returns problems."""
    problems = []
    for group in orphans:
        for app in group.applications:
            try:
                client.delete_application(app.id, missing_ok=True)
            except CMLError as exc:
                problems.append(f"{app.name}: {exc}")
        if not any(p.startswith(application_prefix(group.cluster)) for p in problems):
            try:
                client.delete_file(cluster_dir(group.cluster), missing_ok=True)
            except CMLError as exc:
                problems.append(f"{CLUSTERS_DIR}/{group.cluster}: {exc}")
        # Its history stays; a run its lost head left open is marked as ended there.
        try:
            close_open_runs(client, group.cluster, "head lost (collected by ray-cml gc)")
        except CMLError as exc:
            problems.append(f"{CLUSTERS_DIR}/_history/{group.cluster}: {exc}")
    return problems


def _report(orphans: list[ClusterApps]) -> dict[str, Any]:
    return {
        "clusters": [
            {
                "cluster": group.cluster,
                "applications": [
                    {
                        "name": a.name,
                        "id": a.id,
                        "status": a.status,
                        "nvidia_gpu": a.nvidia_gpu,
                    }
                    for a in group.applications
                ],
            }
            for group in orphans
        ]
    }


def main(argv: list[str] | None = None) -> int:
    """``ray-cml gc``: list (and with --yes delete) applications whose cluster's head is gone."""
    parser = argparse.ArgumentParser(prog="ray-cml gc", description=__doc__)
    parser.add_argument(
        "config",
        nargs="?",
        help="a cluster YAML: its workspace and project (else CML_HOST, CML_PROJECT_ID)",
    )
    parser.add_argument("--cluster", help="only this cluster name")
    parser.add_argument("--yes", action="store_true", help="delete what is found")
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    args = parser.parse_args(argv)
    provider: dict[str, Any] = {}
    try:
        if args.config:
            provider = load_cluster_config(args.config)["provider"]
        with client_for(provider) as client:
            orphans = find_orphans(client, args.cluster)
            problems = delete_orphans(client, orphans) if args.yes and orphans else []
    except (ClusterConfigError, OperatorError, CMLError) as exc:
        return report_failure(exc, provider)
    if args.json:
        print(json.dumps({**_report(orphans), "deleted": bool(args.yes), "problems": problems}))
    elif not orphans:
        print("nothing to collect: every ray-cml application belongs to a cluster with a live head")
    else:
        verb = "deleted" if args.yes else "would delete"
        for group in orphans:
            gpus = sum(a.nvidia_gpu for a in group.applications)
            print(
                f"cluster {group.cluster}: no live head; {verb} {len(group.applications)} "
                f"application(s) holding {gpus} GPU(s) and {CLUSTERS_DIR}/{group.cluster}/"
            )
            for app in group.applications:
                print(f"  {app.name}  {app.status.removeprefix('APPLICATION_')}  {app.id}")
        if not args.yes:
            print("run again with --yes to delete them")
        for problem in problems:
            print(f"ray-cml: could not delete {problem}", file=sys.stderr)
    return 1 if problems else 0
