"""Before ``ray up``/``down`` touch anything: does the workspace take this config?

Also the one place that turns a CML error into a sentence with what to do about it; the
operator commands (``ray-cml status``, ``gc``, ``doctor``) print the same sentences.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray_cml_provider.cml import (
    CMLAuthenticationError,
    CMLClient,
    CMLConfigurationError,
    CMLConnectionError,
    CMLError,
    CMLNotFoundError,
    CMLPermissionError,
)
from ray_cml_provider.cml.settings import DEFAULT_API_KEY_ENV
from ray_cml_provider.errors import WorkspaceError
from ray_cml_provider.provider.lookup import prefetch_cluster_applications


def explain(exc: CMLError, key_env: str = DEFAULT_API_KEY_ENV) -> str:
    """One sentence: what went wrong with CML and what to do about it."""
    if isinstance(exc, CMLAuthenticationError):
        return (
            f"CML refused the API key ({exc.message}); check the key in ${key_env} "
            "(provider.api_key_env), or create one in CML under User Settings > API Keys"
        )
    if isinstance(exc, CMLPermissionError):
        return f"the API key may not do this ({exc}); use a key of a project collaborator"
    if isinstance(exc, CMLNotFoundError) and _is_project_path(exc.path):
        return f"{exc.message}; check provider.project_id (or CML_PROJECT_ID)"
    if isinstance(exc, CMLConnectionError):
        return f"cannot reach CML: {exc}; check provider.host (or CML_HOST) and your network"
    return f"cannot use the CML workspace: {exc}"


def _is_project_path(path: str) -> bool:
    """A 404 on ``/api/v2/projects/<id>`` or on its application list means the project is
    missing (a 404 on one application or file does not)."""
    parts = path.rstrip("/").split("/")
    return (len(parts) >= 2 and parts[-2] == "projects") or (
        len(parts) >= 3 and parts[-1] == "applications" and parts[-3] == "projects"
    )


# Workspaces this process found fit: a Ray command bootstraps its config more than once
# (`ray submit` copies the script, then runs it), each time a round trip to CML.
_fit: set[tuple] = set()


def check_workspace(cluster_config: dict[str, Any]) -> None:
    """The key works, the project exists, and every node type's runtime is one of the
    workspace's. Raises ``WorkspaceError`` (one sentence) for each problem."""
    provider = cluster_config["provider"]
    key_env = provider.get("api_key_env", DEFAULT_API_KEY_ENV)
    asked = (
        provider.get("host"),
        provider.get("project_id"),
        hashlib.sha256(os.environ.get(key_env, "").encode()).hexdigest(),  # the key, unkept
        frozenset(
            t["node_config"]["runtime_identifier"]
            for t in cluster_config["available_node_types"].values()
        ),
    )
    if asked in _fit:
        return
    try:
        with (
            CMLClient(
                host=provider.get("host"),
                project_id=provider.get("project_id"),
                api_key_env=key_env,
            ) as client,
            ThreadPoolExecutor(3) as pool,
        ):  # every Ray command waits on these two, then lists its cluster: asked beside
            project = pool.submit(client.get_project)
            listed = pool.submit(client.list_runtimes)
            if cluster_config.get("cluster_name"):
                pool.submit(prefetch_cluster_applications, client, cluster_config["cluster_name"])
            project.result()
            runtimes = {r.get("image_identifier") for r in listed.result()}
    except CMLConfigurationError as exc:
        raise WorkspaceError(str(exc)) from None
    except CMLError as exc:
        raise WorkspaceError(explain(exc, key_env)) from None
    for name, node_type in cluster_config["available_node_types"].items():
        runtime = node_type["node_config"]["runtime_identifier"]
        if runtime not in runtimes:
            raise WorkspaceError(
                f"available_node_types.{name}.node_config.runtime_identifier: "
                f"{runtime!r} is not a runtime of this workspace (list them with "
                "GET /api/v2/runtimes)"
            )
    _fit.add(asked)
