"""What the operator commands share: a client from a cluster YAML and where a node can be
reached (CML errors are explained by ``provider.workspace_check.explain``).

CML's API has no IP address or URL field for an application; each node's launcher
publishes its address and ports in ``<cluster dir>/nodes/<id>/node.json``, and the URL of
an application is ``https://<subdomain>.<workspace domain>`` on CML.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlparse

from ray_cml_provider.cml import (
    Application,
    CMLClient,
    CMLConfigurationError,
    CMLError,
    RetryPolicy,
)
from ray_cml_provider.cml.settings import DEFAULT_API_KEY_ENV
from ray_cml_provider.provider.naming import node_info_path
from ray_cml_provider.provider.workspace_check import explain

# An operator command answers in seconds or says why; the provider keeps its patient policy.
INTERACTIVE_RETRY = RetryPolicy(max_attempts=3, backoff_base_s=0.5, backoff_cap_s=2.0)


class OperatorError(Exception):
    """A problem the command reports as one line (no traceback) and exits non-zero."""


def key_env_of(provider_config: dict[str, Any]) -> str:
    return provider_config.get("api_key_env", DEFAULT_API_KEY_ENV)


def report_failure(exc: Exception, provider_config: dict[str, Any]) -> int:
    """An operator command that cannot go on: one ``ray-cml:`` line on stderr (a CML error
    explained with what to do), and exit status 1. Never a traceback."""
    message = explain(exc, key_env_of(provider_config)) if isinstance(exc, CMLError) else exc
    print(f"ray-cml: {message}", file=sys.stderr)
    return 1


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


def is_local_host(host: str) -> bool:
    """True for the emulator (a loopback or IP host): applications are reached by IP."""
    name = urlparse(host).hostname or ""
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def node_infos(client: CMLClient, cluster: str, node_ids: list[str]) -> dict[str, dict]:
    """``node.json`` of each node that has published one (concurrently; missing -> absent)."""

    def fetch(node_id: str) -> tuple[str, dict | None]:
        try:
            data = client.download_file(node_info_path(cluster, node_id))
            return node_id, json.loads(data)
        except (CMLError, ValueError):
            return node_id, None

    if not node_ids:
        return {}
    with ThreadPoolExecutor(min(8, len(node_ids))) as pool:
        return {k: v for k, v in pool.map(fetch, node_ids) if v is not None}


def application_url(host: str, app: Application, info: dict | None) -> str:
    """Where the application's port is served: CML's proxy, or the engine on the emulator."""
    if is_local_host(host):
        if info and info.get("app_port"):
            return f"http://{info['ip']}:{info['app_port']}"
        return ""
    parsed = urlparse(host)
    return f"{parsed.scheme or 'https'}://{app.subdomain or app.name}.{parsed.hostname}"


def reachable(ip: str, port: int, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=timeout_s):
            return True
    except OSError:
        return False
