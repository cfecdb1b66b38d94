"""Ray's token authentication, on for every cluster: where the token lives and who reads it.

A CML workspace's network is shared by every user's sessions, jobs and applications, and
every node of a cluster holds a CML API key scoped to the cluster's owner. Ray 2.60 can ask
for a shared secret at each of its entry points (the GCS and Ray's other gRPC services, the
dashboard's HTTP API and its job API, Ray Client); without one, whoever finds the head's
address runs code there, and with it the owner's key. So every cluster gets a token:

- ``ray up`` creates it with the head (``secrets.token_hex(32)``, Ray's own format), or keeps
  the one the cluster's folder already holds: ``.ray-cml/<cluster>/auth/token``, written
  through the files API. ``ray down`` deletes it with the folder.
- Each node's launcher makes that file owner-only (0600, its folder 0700) and gives every
  command ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` (the file). What CML keeps
  about an application (environment, description) names the file, never the token.
- A CML session of the project uses the same file: the line ``ray up`` and ``ray-cml
  status`` print. This machine reads the token through the files API only where it must
  speak to Ray itself (``ray-cml status``'s direct view, ``ray-cml token``), into memory.

``provider.ray_auth_mode: disabled`` turns it off, with a warning. A cluster keeps the mode
its head was created with: workers follow their head, until ``ray down``.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

from ray_cml_provider.cml import CMLClient
from ray_cml_provider.contract import NodeSpec, auth_token_path
from ray_cml_provider.provider.cluster_files import ensure_file, read_file

TOKEN, DISABLED = "token", "disabled"
MODES = (TOKEN, DISABLED)
RAY_AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")

DISABLED_WARNING = (
    "provider.ray_auth_mode is 'disabled': Ray's ports (GCS, Ray Client, the dashboard and "
    "its job API) run code for anyone who can reach them, on CML every engine of every user "
    "of the workspace, and that code can use this cluster's CML API key "
    "(see docs/security.md)"
)


def configured_mode(provider_config: dict[str, Any]) -> str:
    return provider_config.get("ray_auth_mode", TOKEN)


def cluster_mode(provider_config: dict[str, Any]) -> str:
    """The mode of the nodes a provider creates: inside the head, the head's own (a config
    changed under a running cluster must not start workers that cannot join); elsewhere,
    the config's."""
    here = NodeSpec.from_env(os.environ)
    if here.is_head:
        return TOKEN if here.auth_token_file else DISABLED
    return configured_mode(provider_config)


def node_spec_fields(cluster_name: str, mode: str) -> dict[str, str]:
    """What a node's application is told: where the token is, when there is one."""
    return {"auth_token_file": auth_token_path(cluster_name)} if mode == TOKEN else {}


def ensure_token(client: CMLClient, cluster_name: str) -> bool:
    """Give the cluster a token unless its folder holds one already; True when created."""
    return ensure_file(client, auth_token_path(cluster_name), lambda: secrets.token_hex(32))


def read_token(client: CMLClient, cluster_name: str) -> str | None:
    """The cluster's token, or None when it has none (auth disabled, or the cluster is down)."""
    return read_file(client, auth_token_path(cluster_name))


def client_env(token: str | None, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a Ray client process started on this machine: ``base`` (default:
    this process's) with the token in memory, or with no token for a cluster without one.
    Ray's token loader is process-wide state: a child process keeps it out of this one."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in RAY_AUTH_ENV}
    if token:
        env.update(RAY_AUTH_MODE=TOKEN, RAY_AUTH_TOKEN=token)
    return env


def session_line(token_path: str) -> str:
    """What a CML session of the project runs before ``ray.init``, ``ray job`` or ``serve``."""
    return f"export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token_path}"
