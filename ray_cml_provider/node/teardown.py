"""The head deletes its own cluster: autostop (idle) and ``ray-cml job submit --down`` (the
job ended) end the same way, whoever is watching from outside."""

from __future__ import annotations

from collections.abc import Callable

from ray_cml_provider.contract import HEAD
from ray_cml_provider.node.context import NodeContext, log
from ray_cml_provider.node.processes import stop_ray_of_this_node
from ray_cml_provider.node.project_api import ProjectAPIError


def delete_the_cluster(
    ctx: NodeContext, why: str, before_stop: Callable[[str], None] = lambda why: None
) -> None:
    """Stop Ray here (its autoscaler would replace the workers deleted next), then delete
    every application of the cluster, this head last. ``before_stop(why)`` runs first,
    while Ray still answers (the history's last snapshot)."""
    log(f"{why}: deleting the cluster")
    try:
        before_stop(why)
    except Exception as exc:  # never in the way of deleting the cluster
        log(f"{why}: before stopping Ray: {exc!r}")
    stop_ray_of_this_node(grace_s=5, ray_tmp_dir=ctx.tmp_dir)
    try:
        others = ctx.cluster_applications()
    except ProjectAPIError as exc:
        log(f"{why}: could not list the cluster's applications: {exc}")
        others = []
    # Workers first, by the ids just listed (no second lookup per name).
    for app_id, name, _node in sorted(others, key=lambda app: app[2].kind == HEAD):
        if name != ctx.spec.app_name:
            try:
                log(f"{why}: deleting application {name} ({app_id})")
                ctx.api.delete_application(app_id)
            except ProjectAPIError as exc:
                log(f"{why}: could not delete {name}: {exc}")
    ctx.delete_own_application()
