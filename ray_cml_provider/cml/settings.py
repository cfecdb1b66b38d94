"""Where the client finds its host, project and API key.

Order, for each setting: an explicit argument, then the user's environment (``CML_HOST``,
``CML_PROJECT_ID``, the key in the variable the caller names, ``CML_API_KEY`` by default),
then what CML itself injects into every session, job and application (``CDSW_API_URL`` /
``CDSW_DOMAIN``, ``CDSW_PROJECT_ID``, ``CDSW_APIV2_KEY``). So the same code works from a
laptop with explicit settings and inside CML with none.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from ray_cml_provider.cml.errors import CMLConfigurationError

DEFAULT_API_KEY_ENV = "CML_API_KEY"


class Secret:
    """A string that never shows itself in a repr, a log line or an f-string."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __bool__(self) -> bool:
        return bool(self._value)


@dataclass(frozen=True)
class CMLSettings:
    """Resolved connection settings. ``host`` is a base URL such as ``https://ml.example.com``."""

    host: str
    api_key: Secret = field(repr=False)
    project_id: str | None = None

    @classmethod
    def resolve(
        cls,
        host: str | None = None,
        project_id: str | None = None,
        api_key: str | None = None,
        api_key_env: str = DEFAULT_API_KEY_ENV,
        env: Mapping[str, str] | None = None,
        require_project: bool = True,
    ) -> CMLSettings:
        """Resolve every setting, or raise one sentence naming the three ways to give it."""
        env = os.environ if env is None else env
        resolved_host = host or env.get("CML_HOST") or _host_from_cml_engine(env)
        if not resolved_host:
            raise CMLConfigurationError(
                "No CML host: pass host (provider key 'host'), set CML_HOST, or run inside "
                "CML where CDSW_DOMAIN is set."
            )
        resolved_project = project_id or env.get("CML_PROJECT_ID") or env.get("CDSW_PROJECT_ID")
        if require_project and not resolved_project:
            raise CMLConfigurationError(
                "No CML project: pass project_id (provider key 'project_id'), set "
                "CML_PROJECT_ID, or run inside CML where CDSW_PROJECT_ID is set."
            )
        resolved_key = api_key or env.get(api_key_env) or env.get("CDSW_APIV2_KEY")
        if not resolved_key:
            raise CMLConfigurationError(
                f"No CML API key: pass api_key, set {api_key_env}, or run inside CML where "
                "CDSW_APIV2_KEY is set."
            )
        return cls(
            host=normalize_host(resolved_host),
            api_key=Secret(resolved_key),
            project_id=resolved_project or None,
        )


def normalize_host(host: str) -> str:
    """Make a base URL: add ``https://`` if no scheme, drop ``/api/v1``, ``/api/v2``, ``/``."""
    host = host.strip().rstrip("/")
    if "://" not in host:
        host = "https://" + host
    for suffix in ("/api/v1", "/api/v2"):
        if host.endswith(suffix):
            host = host[: -len(suffix)]
    return host.rstrip("/")


def _host_from_cml_engine(env: Mapping[str, str]) -> str | None:
    # CDSW_API_URL carries the scheme (https on CML, http on the local emulator), so it is
    # preferred over rebuilding the URL from CDSW_DOMAIN.
    if env.get("CDSW_API_URL"):
        return env["CDSW_API_URL"]
    if env.get("CDSW_DOMAIN"):
        return "https://" + env["CDSW_DOMAIN"]
    return None
