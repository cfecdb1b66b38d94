"""``ray-cml token CONFIG``: print the cluster's Ray token, for a Ray client outside CML's
sessions (every Ray port of the cluster asks for it; see ``provider/ray_auth.py``)::

    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(ray-cml token cluster.yaml)
    ray job submit --address http://HEAD:PORT -- python my_script.py

Nothing else prints the token: it is read through the files API with your key, as any file
of the project could be. In a CML session of the project use the file itself (the line
``ray up`` and ``ray-cml status`` print).
"""

from __future__ import annotations

import argparse
import sys

from ray_cml_provider.cluster.workspace import OperatorError, client_for
from ray_cml_provider.cml import CMLError
from ray_cml_provider.ops import report_failure
from ray_cml_provider.provider.config import ClusterConfigError, load_cluster_config
from ray_cml_provider.provider.ray_auth import read_token


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ray-cml token",
        description="Print the cluster's Ray token (every Ray port of the cluster asks for it).",
    )
    parser.add_argument("config", help="the cluster YAML")
    args = parser.parse_args(argv)
    config: dict = {"provider": {}}
    try:
        config = load_cluster_config(args.config)
        with client_for(config["provider"]) as client:
            token = read_token(client, config["cluster_name"])
    except (ClusterConfigError, OperatorError, CMLError) as exc:
        return report_failure(exc, config["provider"])
    if token is None:
        print(
            f"ray-cml: cluster {config['cluster_name']!r} has no Ray token: it is down, or "
            "its head was created with provider.ray_auth_mode: disabled",
            file=sys.stderr,
        )
        return 1
    print(token)
    return 0
