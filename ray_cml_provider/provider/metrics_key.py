"""The cluster's metrics key: what a scraper (Prometheus, ``ray-cml top``) sends to the
head's ``/metrics``, which serves every live node's Ray, Serve and vLLM figures.

It reads figures only: it opens neither ``/v1`` (the endpoint key's: calling a model costs
GPU time) nor the dashboard or its job API (Ray's token's: they run code). Like the other
keys it is a file in the cluster's ``auth`` folder, created by ``ray up``, never in an
application's environment (the head is told the file), printed only by ``ray-cml
metrics-key``, and deleted with the cluster's folder by ``ray down``.
"""

from __future__ import annotations

import secrets

from ray_cml_provider.cml import CMLClient
from ray_cml_provider.contract import metrics_key_path
from ray_cml_provider.provider.cluster_files import ensure_file, read_file


def node_spec_fields(cluster_name: str) -> dict[str, str]:
    """What the head's application is told (``contract.NodeSpec``): the key's file."""
    return {"metrics_key_file": metrics_key_path(cluster_name)}


def ensure_metrics_key(client: CMLClient, cluster_name: str) -> bool:
    """Give the cluster a metrics key unless it has one; True when created."""
    return ensure_file(client, metrics_key_path(cluster_name), lambda: secrets.token_urlsafe(32))


def read_metrics_key(client: CMLClient, cluster_name: str) -> str | None:
    return read_file(client, metrics_key_path(cluster_name))
