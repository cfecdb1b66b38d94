"""Ray's side of ``ray-cml status``: which nodes the GCS knows, idle how long, what is pending.

Read from the head's GCS (``ray.autoscaler.v2.sdk.get_cluster_status``, the source of
``ray status``), keyed by each node's cloud instance id, which is our node id. The GCS is
reachable from other engines of the workspace (and on the emulator, from this machine) but
not from a laptop; there ``ray-cml status`` runs this module on the head through the
command mailbox instead::

    python -m ray_cml_provider.cluster.ray_view HEAD_IP:GCS_PORT   # prints the view as JSON

The GCS asks for the cluster's Ray token (``provider/ray_auth.py``). Ray reads a token once
per process, from its environment, so this machine reads the view in a child process that
holds the token in its environment (``read_ray_view_from_here``), never in the caller's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from ray_cml_provider.provider.ray_auth import client_env


def read_ray_view(gcs_address: str, timeout_s: int = 10) -> dict[str, Any]:
    """``{"nodes": {node_id: {...}}, "pending_launches": [...], "failed_launches": [...]}``."""
    from ray.autoscaler.v2.sdk import get_cluster_status

    status = get_cluster_status(gcs_address, timeout=timeout_s)
    nodes: dict[str, dict[str, Any]] = {}
    for state, group in (
        ("alive", status.active_nodes),
        ("idle", status.idle_nodes),
        ("dead", status.failed_nodes),
    ):
        for node in group:
            usage = node.resource_usage
            nodes[node.instance_id or node.node_id or node.ip_address] = {
                "state": state,
                "idle_s": (usage.idle_time_ms / 1000.0) if usage and state == "idle" else 0.0,
                "node_type": node.ray_node_type_name,
                "ip": node.ip_address,
                "ray_node_id": node.node_id,
                "resources": node.total_resources(),
            }
    return {
        "nodes": nodes,
        "pending_launches": [
            {"node_type": r.ray_node_type_name, "count": r.count} for r in status.pending_launches
        ],
        "failed_launches": [
            {"node_type": r.ray_node_type_name, "count": r.count, "details": r.details or ""}
            for r in status.failed_launches
        ],
    }


def read_ray_view_from_here(
    gcs_address: str, token: str | None, timeout_s: float = 30.0
) -> dict[str, Any]:
    """``read_ray_view`` in a child process with the cluster's token (or none)."""
    # The package as this process has it, appended (never ahead of the standard library),
    # in case the caller put it on sys.path by hand.
    package_parent = str(Path(__file__).resolve().parents[2])
    code = (
        f"import sys; sys.path.append({package_parent!r}); "
        "from ray_cml_provider.cluster.ray_view import main; sys.exit(main())"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, gcs_address],
            env=client_env(token),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"no answer within {timeout_s:.0f} s") from None
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    raise RuntimeError(errors[-1] if errors else f"exit status {done.returncode}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(
            "usage: python -m ray_cml_provider.cluster.ray_view HEAD_IP:GCS_PORT", file=sys.stderr
        )
        return 2
    print(json.dumps(read_ray_view(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
