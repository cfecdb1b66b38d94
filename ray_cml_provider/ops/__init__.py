"""The operator commands (``ray-cml init|doctor|status|token|endpoint-key|model|gc``): each
parses its arguments, asks the ``cluster`` library or the provider, and renders the answer.

A command that cannot go on says why in one ``ray-cml:`` line (``report_failure``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from ray_cml_provider.cluster.workspace import OperatorError, client_for, key_env_of
from ray_cml_provider.cml import CMLClient, CMLError
from ray_cml_provider.provider.config import ClusterConfigError, load_cluster_config
from ray_cml_provider.provider.workspace_check import explain


def report_failure(exc: Exception, provider_config: dict[str, Any]) -> int:
    """An operator command that cannot go on: one ``ray-cml:`` line on stderr (a CML error
    explained with what to do), and exit status 1. Never a traceback."""
    message = explain(exc, key_env_of(provider_config)) if isinstance(exc, CMLError) else exc
    print(f"ray-cml: {message}", file=sys.stderr)
    return 1


def print_cluster_secret(
    argv: list[str] | None,
    prog: str,
    description: str,
    read: Callable[[CMLClient, str], str | None],
    missing: str,
) -> int:
    """``PROG CONFIG``: print one secret of the cluster (read with the user's key through the
    files API, into memory), or say in one line why there is none (``missing``, formatted
    with ``cluster``)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("config", help="the cluster YAML")
    args = parser.parse_args(argv)
    config: dict = {"provider": {}}
    try:
        config = load_cluster_config(args.config)
        with client_for(config["provider"]) as client:
            secret = read(client, config["cluster_name"])
    except (ClusterConfigError, OperatorError, CMLError) as exc:
        return report_failure(exc, config["provider"])
    if secret is None:
        print(f"ray-cml: {missing.format(cluster=config['cluster_name'])}", file=sys.stderr)
        return 1
    print(secret)
    return 0
