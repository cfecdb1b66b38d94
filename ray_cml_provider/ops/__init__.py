"""The operator commands (``ray-cml init|doctor|status|token|gc``): each parses its
arguments, asks the ``cluster`` library or the provider, and renders the answer.

A command that cannot go on says why in one ``ray-cml:`` line (``report_failure``)."""

from __future__ import annotations

import sys
from typing import Any

from ray_cml_provider.cluster.workspace import key_env_of
from ray_cml_provider.cml import CMLError
from ray_cml_provider.provider.workspace_check import explain


def report_failure(exc: Exception, provider_config: dict[str, Any]) -> int:
    """An operator command that cannot go on: one ``ray-cml:`` line on stderr (a CML error
    explained with what to do), and exit status 1. Never a traceback."""
    message = explain(exc, key_env_of(provider_config)) if isinstance(exc, CMLError) else exc
    print(f"ray-cml: {message}", file=sys.stderr)
    return 1
