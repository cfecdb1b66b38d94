"""What the emulator accepts in a request, and the 400 it answers otherwise (CML's rules as
far as the provider and the docs show them). No state: the HTTP handlers validate, the
workspace model (``state``) only ever sees well-formed values."""

from __future__ import annotations

import json
import re
from pathlib import PurePosixPath
from typing import Any

from ray_cml_provider.emulator.errors import invalid

DEFAULT_PAGE_SIZE = 10
MAX_PAGE_SIZE = 1000
SUBDOMAIN_PATTERN = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
FILTER_KEYS = {
    "name",
    "description",
    "script",
    "subdomain",
    "status",
    "kernel",
    "bypass_authentication",
    "creator.username",
    "creator.name",
    "creator.email",
}
SORT_KEYS = {"name", "created_at", "updated_at", "status", "subdomain"}
UPDATABLE = {
    "name",
    "subdomain",
    "description",
    "script",
    "cpu",
    "memory",
    "nvidia_gpu",
    "environment",
    "kernel",
    "runtime_identifier",
    "runtime_addon_identifiers",
    "bypass_authentication",
    "accelerator_label_id",
    "resource_profile_id",
    "resource_group_id",
}
CREATE_DEFAULTS: dict[str, Any] = {
    "name": "",
    "subdomain": "",
    "description": "",
    "script": "",
    "cpu": 1.0,
    "memory": 2.0,
    "nvidia_gpu": 0,
    "environment": {},
    "kernel": "",
    "runtime_identifier": "",
    "runtime_addon_identifiers": [],
    "bypass_authentication": False,
}


def application_fields(body: Any, creating: bool, runtimes: set[str]) -> dict[str, Any]:
    """The fields of a create (defaults filled in) or an update (only those given), checked;
    ``runtimes`` are the image identifiers the workspace has enabled."""
    if not isinstance(body, dict):
        raise invalid("request body must be a JSON object")
    unknown = set(body) - UPDATABLE - ({"id"} if not creating else set())
    if unknown:
        raise invalid(f"unknown field(s): {', '.join(sorted(unknown))}")
    fields: dict[str, Any] = dict(CREATE_DEFAULTS, environment={}) if creating else {}
    fields.update({k: v for k, v in body.items() if k != "id"})
    required = ("name", "subdomain", "script", "runtime_identifier") if creating else ()
    for key in required:
        if not isinstance(fields.get(key), str) or not fields[key].strip():
            raise invalid(f"{key} is required")
    if "subdomain" in fields:
        sub = fields["subdomain"]
        if not isinstance(sub, str) or len(sub) > 63 or not SUBDOMAIN_PATTERN.match(sub):
            raise invalid(
                f"subdomain {sub!r} is invalid: use lower-case letters, digits and "
                "single hyphens, at most 63 characters"
            )
    check_engine_fields(fields, runtimes)
    return fields


def search_filter(raw: str, known_keys: set[str] | None = None) -> dict[str, Any]:
    """``search_filter``: a JSON object (of ``known_keys`` only, when given)."""
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        raise invalid(f"search_filter is not a JSON object: {raw!r}") from None
    if not isinstance(value, dict):
        raise invalid(f"search_filter is not a JSON object: {raw!r}")
    for key in value:
        if known_keys is not None and key not in known_keys:
            raise invalid(f"search_filter: unknown key {key!r}")
    return value


def sort_keys(raw: str) -> list[tuple[str, bool]]:
    """``sort``: ``name,-created_at`` -> [(field, descending), ...], most significant first."""
    keys = []
    for key in (k.strip() for k in raw.split(",")):
        if not key:
            continue
        name = key.lstrip("+-")
        if name not in SORT_KEYS:
            raise invalid(f"sort: unknown field {name!r}")
        keys.append((name, key.startswith("-")))
    return keys


def page_size(raw: str) -> int:
    if not raw:
        return DEFAULT_PAGE_SIZE
    if not raw.isdigit() or int(raw) < 1:
        raise invalid(f"page_size must be a positive integer, got {raw!r}")
    return min(int(raw), MAX_PAGE_SIZE)


def page_offset(token: str) -> int:
    """The offset a ``page_token`` (from ``page_token_for``) stands for."""
    if not token:
        return 0
    if not (token.startswith("o") and token[1:].isdigit()):
        raise invalid(f"invalid page_token {token!r}")
    return int(token[1:])


def page_token_for(offset: int) -> str:
    return f"o{offset}"


def check_engine_fields(fields: dict[str, Any], runtimes: set[str]) -> None:
    """What every engine's request may say (an application's, a job's), where it says it:
    resources, environment, script, runtime."""
    for key in ("cpu", "memory"):
        if key in fields:
            value = fields[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise invalid(f"{key} must be a positive number, got {value!r}")
    if "nvidia_gpu" in fields:
        gpus = fields["nvidia_gpu"]
        if isinstance(gpus, str) and gpus.isdigit():
            gpus = fields["nvidia_gpu"] = int(gpus)
        if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0:
            raise invalid(f"nvidia_gpu must be a non-negative integer, got {gpus!r}")
    if "environment" in fields:
        env = fields["environment"]
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise invalid("environment must be a map of strings to strings")
    if "script" in fields and fields["script"].startswith("/"):
        raise invalid("script must be a path relative to the project root")
    if fields.get("runtime_identifier") and fields["runtime_identifier"] not in runtimes:
        raise invalid(
            f"runtime_identifier {fields['runtime_identifier']!r} is not an enabled "
            "runtime of this workspace (see GET /api/v2/runtimes)"
        )


def job_fields(body: Any, runtimes: set[str]) -> dict[str, Any]:
    """A new CML Job's fields (``jobs.JobRuns``), defaults filled in, checked as an
    application's are; its script must stay inside the project, and its ``environment`` may
    come as a JSON string, as CML returns it."""
    if not isinstance(body, dict):
        raise invalid("a job is a JSON object")
    fields: dict[str, Any] = {
        "name": body.get("name"),
        "script": body.get("script"),
        "runtime_identifier": body.get("runtime_identifier", ""),
        "arguments": str(body.get("arguments") or ""),
        "environment": body.get("environment") or {},
        "cpu": body.get("cpu", 1),
        "memory": body.get("memory", 2),
        "nvidia_gpu": body.get("nvidia_gpu", 0),
    }
    for key in ("name", "script"):
        if not isinstance(fields[key], str) or not fields[key].strip():
            raise invalid(f"{key} is required")
    if ".." in PurePosixPath(fields["script"]).parts:
        raise invalid(f"script {fields['script']!r} must be a path inside the project")
    if isinstance(fields["environment"], str):
        try:
            fields["environment"] = json.loads(fields["environment"] or "{}")
        except ValueError:
            raise invalid("environment is not a JSON object") from None
    if not fields["runtime_identifier"]:
        raise invalid("runtime_identifier is required")
    check_engine_fields(fields, runtimes)
    return fields
