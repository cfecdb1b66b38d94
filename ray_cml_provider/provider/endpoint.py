"""The cluster's endpoint: the head application's URL, where the OpenAI API and the dashboard
are served (the head's gateway, ``node/gateway.py``, routes ``/v1`` to Ray Serve).

By default CML's login guards that URL: only people who may see the project get in, by
browser. Programs outside CML cannot log in, so ``bypass_authentication: true`` on the head's
``node_config`` asks CML to let every caller through, and the gateway becomes the lock:

- ``ray up`` gives the cluster an *endpoint key* (``secrets.token_urlsafe(32)``), a file in
  the cluster's ``auth`` folder next to Ray's token (owner-only on the nodes; the project's
  collaborators can read it, as they can read every project file). It is never the CML key,
  never in an application's environment (the head is told the file), and printed only by
  ``ray-cml endpoint-key``. ``ray down`` deletes it with the cluster's folder.
- ``/v1/...`` then needs ``Authorization: Bearer <endpoint key>``; everything else (the
  dashboard, its job API) needs Ray's token, so the key handed to the model's callers never
  runs code. That is why the setting requires ``ray_auth_mode: token``.
"""

from __future__ import annotations

import secrets
from typing import Any

from ray_cml_provider.cml import CMLClient
from ray_cml_provider.cml.errors import CMLAPIError
from ray_cml_provider.contract import endpoint_key_path
from ray_cml_provider.provider.cluster_files import ensure_file, read_file


def bypasses_login(head_node_config: dict[str, Any]) -> bool:
    return bool(head_node_config.get("bypass_authentication"))


def node_spec_fields(cluster_name: str, locked: bool) -> dict[str, Any]:
    """What the head's application is told (``contract.NodeSpec``): the key's file (never the
    key), and whether its URL is outside CML's login (then the dashboard's side asks for
    Ray's token too)."""
    return {"endpoint_key_file": endpoint_key_path(cluster_name), "login_bypassed": locked}


def ensure_endpoint_key(client: CMLClient, cluster_name: str) -> bool:
    """Give the cluster an endpoint key unless it has one; True when created."""
    return ensure_file(client, endpoint_key_path(cluster_name), lambda: secrets.token_urlsafe(32))


def read_endpoint_key(client: CMLClient, cluster_name: str) -> str | None:
    return read_file(client, endpoint_key_path(cluster_name))


def refused_bypass(exc: Exception, head_type: str) -> str | None:
    """One sentence when CML refused an application without its login, else None."""
    if isinstance(exc, CMLAPIError) and exc.status in (400, 403):
        text = str(exc).lower()
        if "unauthenticated" in text or "bypass" in text or exc.status == 403:
            return (
                f"available_node_types.{head_type}.node_config.bypass_authentication: this "
                "workspace "
                "does not allow applications without CML's login (an administrator's setting); "
                "remove the setting to keep the head's URL behind the login. "
                f"CML said: {exc}"
            )
    return None


def how_to_call(url: str, locked: bool, inside: str = "") -> list[str]:
    """Lines that show how to call the cluster's OpenAI API: at the head's URL, and from the
    project at the head's gateway (``inside``). Every call needs the endpoint key."""
    key = 'api_key=os.environ["RAY_CML_ENDPOINT_KEY"]'
    lines = [
        f"OpenAI API: {url}/v1 (with the endpoint key; "
        + (
            "CML's login is bypassed)"
            if locked
            else "behind CML's login too: send the key as X-Endpoint-Key there)"
        ),
        "  export RAY_CML_ENDPOINT_KEY=$(ray-cml endpoint-key CONFIG)",
    ]
    if locked:
        lines += [
            f'  curl {url}/v1/models -H "Authorization: Bearer $RAY_CML_ENDPOINT_KEY"',
            f'  openai.OpenAI(base_url="{url}/v1", {key})',
        ]
    if inside:
        lines.append(
            f'  from a CML session of this project: openai.OpenAI(base_url="{inside}/v1", {key})'
        )
    return lines
