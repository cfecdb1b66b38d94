"""A client for the workspace a cluster YAML's provider section names, with the patience of
an interactive command (CML errors are explained by ``provider.workspace_check.explain``)."""

from __future__ import annotations

from typing import Any

from ray_cml_provider.cml import CMLClient, CMLConfigurationError, RetryPolicy
from ray_cml_provider.cml.settings import DEFAULT_API_KEY_ENV
from ray_cml_provider.errors import RayCMLError

# An operator command answers in seconds or says why; the provider keeps its patient policy.
INTERACTIVE_RETRY = RetryPolicy(max_attempts=3, backoff_base_s=0.5, backoff_cap_s=2.0)


class OperatorError(RayCMLError):
    """A problem the command reports as one line (no traceback) and exits non-zero."""


def key_env_of(provider_config: dict[str, Any]) -> str:
    return provider_config.get("api_key_env", DEFAULT_API_KEY_ENV)


def client_for(provider_config: dict[str, Any]) -> CMLClient:
    """A client for the workspace a cluster YAML's provider section names."""
    try:
        return CMLClient(
            host=provider_config.get("host"),
            project_id=provider_config.get("project_id"),
            api_key_env=key_env_of(provider_config),
            retry=INTERACTIVE_RETRY,
            timeout_s=15.0,
        )
    except CMLConfigurationError as exc:
        raise OperatorError(str(exc)) from None
