"""``ray-cml endpoint-key CONFIG``: print the cluster's endpoint key, which callers of the head's
URL send when the head bypasses CML's login (``provider/endpoint.py``)::

    export RAY_CML_ENDPOINT_KEY=$(ray-cml endpoint-key cluster.yaml)
    curl https://<head URL>/v1/models -H "Authorization: Bearer $RAY_CML_ENDPOINT_KEY"

Nothing else prints it. It opens the OpenAI API (``/v1``) only, never the dashboard or its
job API (those need Ray's token).
"""

from __future__ import annotations

from ray_cml_provider.ops import print_cluster_secret
from ray_cml_provider.provider.endpoint import read_endpoint_key


def main(argv: list[str] | None = None) -> int:
    return print_cluster_secret(
        argv,
        "ray-cml endpoint-key",
        "Print the key callers of the head's URL send (Authorization: Bearer), when the "
        "head bypasses CML's login.",
        read_endpoint_key,
        "cluster {cluster!r} has no endpoint key: it is down, or its head keeps CML's login "
        "(no bypass_authentication on its node_config)",
    )
