"""``ray-cml endpoint-key CONFIG``: print the cluster's endpoint key, which callers of the head's
URL send when the head bypasses CML's login (``provider/endpoint.py``)::

    export RAY_CML_ENDPOINT_KEY=$(ray-cml endpoint-key cluster.yaml)
    curl https://<head URL>/v1/models -H "Authorization: Bearer $RAY_CML_ENDPOINT_KEY"

Nothing else prints it. It opens the OpenAI API (``/v1``) only, never the dashboard or its
job API (those need Ray's token).
"""

from __future__ import annotations

import argparse
import sys

from ray_cml_provider.cluster.workspace import OperatorError, client_for
from ray_cml_provider.cml import CMLError
from ray_cml_provider.ops import report_failure
from ray_cml_provider.provider.config import ClusterConfigError, load_cluster_config
from ray_cml_provider.provider.endpoint import read_endpoint_key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ray-cml endpoint-key",
        description="Print the key callers of the head's URL send (Authorization: Bearer), "
        "when the head bypasses CML's login.",
    )
    parser.add_argument("config", help="the cluster YAML")
    args = parser.parse_args(argv)
    config: dict = {"provider": {}}
    try:
        config = load_cluster_config(args.config)
        with client_for(config["provider"]) as client:
            key = read_endpoint_key(client, config["cluster_name"])
    except (ClusterConfigError, OperatorError, CMLError) as exc:
        return report_failure(exc, config["provider"])
    if key is None:
        print(
            f"ray-cml: cluster {config['cluster_name']!r} has no endpoint key: it is down, or "
            "its head keeps CML's login (no bypass_authentication on its node_config)",
            file=sys.stderr,
        )
        return 1
    print(key)
    return 0
