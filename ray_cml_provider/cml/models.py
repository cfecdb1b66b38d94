"""Typed views of the CML API v2 objects this project reads.

CML omits fields that are at their default and sends int64 values as strings; these
parsers read every field with a default and a tolerant conversion, so a sparse or
stringly-typed answer never breaks a caller.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class ApplicationStatus:
    """The ``status`` values of a CML application (upper case, as the API returns them)."""

    STARTING = "APPLICATION_STARTING"
    RUNNING = "APPLICATION_RUNNING"
    STOPPING = "APPLICATION_STOPPING"
    STOPPED = "APPLICATION_STOPPED"
    FAILED = "APPLICATION_FAILED"
    UNKNOWN = "APPLICATION_UNKNOWN"

    ALL = (STARTING, RUNNING, STOPPING, STOPPED, FAILED, UNKNOWN)
    # Starting or running: the application exists as a workload (and may hold resources).
    LIVE = (STARTING, RUNNING)


def _float(value: Any, default: float = 0.0) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return default


def parse_timestamp(value: str) -> float | None:
    """An RFC 3339 time from the API as epoch seconds; None when absent or unreadable."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def seconds_since(timestamp: str, now: float | None = None) -> float:
    """How long ago an API timestamp was (0 when absent, unreadable or in the future)."""
    then = parse_timestamp(timestamp)
    if then is None:
        return 0.0
    return max(0.0, (time.time() if now is None else now) - then)


def parse_environment(value: Any) -> dict[str, str]:
    """CML sends ``environment`` as a map but returns it as a JSON string: accept both."""
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(value, str) and value.strip():
        try:
            decoded = json.loads(value)
        except ValueError:
            return {}
        if isinstance(decoded, dict):
            return {str(k): str(v) for k, v in decoded.items()}
    return {}


@dataclass(frozen=True)
class Application:
    """A CML application. ``environment`` is left out of the repr: it may hold tokens."""

    id: str
    name: str = ""
    subdomain: str = ""
    description: str = ""
    script: str = ""
    status: str = ApplicationStatus.UNKNOWN
    cpu: float = 0.0
    memory: float = 0.0
    nvidia_gpu: int = 0
    runtime_identifier: str = ""
    created_at: str = ""
    running_at: str = ""
    stopped_at: str = ""
    environment: dict[str, str] = field(default_factory=dict, repr=False)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> Application:
        return cls(
            id=str(data.get("id", "")),
            name=data.get("name") or "",
            subdomain=data.get("subdomain") or "",
            description=data.get("description") or "",
            script=data.get("script") or "",
            status=data.get("status") or ApplicationStatus.UNKNOWN,
            cpu=_float(data.get("cpu")),
            memory=_float(data.get("memory")),
            nvidia_gpu=_int(data.get("nvidia_gpu")),
            runtime_identifier=data.get("runtime_identifier") or "",
            created_at=data.get("created_at") or "",
            running_at=data.get("running_at") or "",
            stopped_at=data.get("stopped_at") or "",
            environment=parse_environment(data.get("environment")),
            raw=dict(data),
        )


@dataclass(frozen=True)
class ProjectFile:
    """One entry of a project-files listing; ``path`` is relative to the project root."""

    path: str
    is_dir: bool
    file_size: int

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> ProjectFile:
        return cls(
            path=data.get("path") or "",
            is_dir=bool(data.get("is_dir", False)),
            file_size=_int(data.get("file_size")),
        )
