"""CML API v2 client: applications, project files, runtimes and the project.

One object per (host, project, key). Thread-safe to the extent ``requests.Session`` is for
concurrent requests on one pool (the provider calls it from several autoscaler threads).
Knows nothing about Ray.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import requests

from ray_cml_provider.cml.errors import (
    CMLConfigurationError,
    CMLNotFoundError,
    CMLOutcomeUnknownError,
    CMLServerError,
)
from ray_cml_provider.cml.models import Application, ProjectFile
from ray_cml_provider.cml.settings import DEFAULT_API_KEY_ENV, CMLSettings
from ray_cml_provider.cml.transport import RetryPolicy, Transport, encode_search_filter

API_PREFIX = "/api/v2"
DEFAULT_PAGE_SIZE = 100


class CMLClient:
    """Typed access to the parts of CML API v2 that a Ray cluster needs."""

    def __init__(
        self,
        settings: CMLSettings | None = None,
        *,
        host: str | None = None,
        project_id: str | None = None,
        api_key: str | None = None,
        api_key_env: str = DEFAULT_API_KEY_ENV,
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = None,
        session: requests.Session | None = None,
        **transport_options: Any,
    ):
        self.settings = settings or CMLSettings.resolve(
            host=host,
            project_id=project_id,
            api_key=api_key,
            api_key_env=api_key_env,
            require_project=False,
        )
        self._transport = Transport(
            self.settings, timeout_s=timeout_s, retry=retry, session=session, **transport_options
        )

    def __repr__(self) -> str:
        return f"CMLClient(host={self.settings.host!r}, project_id={self.settings.project_id!r})"

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> CMLClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ----------------------------------------------------------------- project, runtimes

    def get_project(self) -> dict[str, Any]:
        return self._transport.request("GET", self._project_path())

    def list_runtimes(self, search_filter: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        return list(self._paginate(f"{API_PREFIX}/runtimes", "runtimes", search_filter, None))

    # ---------------------------------------------------------------------- applications

    def iter_applications(
        self,
        search_filter: dict[str, Any] | None = None,
        sort: str | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> Iterator[Application]:
        path = self._project_path("applications")
        for item in self._paginate(path, "applications", search_filter, sort, page_size):
            yield Application.from_api(item)

    def list_applications(
        self,
        search_filter: dict[str, Any] | None = None,
        sort: str | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> list[Application]:
        """Every application matching ``search_filter`` (CML matches by SUBSTRING), all pages."""
        return list(self.iter_applications(search_filter, sort, page_size))

    def find_applications_by_name(self, name: str) -> list[Application]:
        """Applications whose name is exactly ``name`` (the server filter is a substring)."""
        return [app for app in self.list_applications({"name": name}) if app.name == name]

    def get_application(self, application_id: str) -> Application:
        return Application.from_api(self._transport.request("GET", self._app_path(application_id)))

    def create_application(self, spec: dict[str, Any]) -> Application:
        """Create (and start) an application. Not retried once sent: see the class notes.

        Raises ``CMLOutcomeUnknownError`` when the answer was lost after sending.
        """
        data = self._transport.request(
            "POST",
            self._project_path("applications"),
            json_body=spec,
            idempotent=False,
            name_hint=spec.get("name"),
        )
        return Application.from_api(data)

    def create_application_once(self, spec: dict[str, Any]) -> Application:
        """Create an application exactly once, even when answers are lost on the way.

        ``spec['name']`` must be unique to this launch (the provider puts the node id in
        it): after a lost answer the name tells whether the create took effect.
        """
        name = spec.get("name")
        if not name:
            raise CMLConfigurationError("create_application_once needs a unique 'name' in the spec")
        last_error: CMLOutcomeUnknownError | None = None
        for _ in range(self._transport.retry.max_attempts):
            try:
                return self.create_application(spec)
            except CMLOutcomeUnknownError as exc:
                last_error = exc
                existing = self.find_applications_by_name(name)
                if existing:
                    return min(existing, key=lambda app: app.created_at)
        assert last_error is not None
        raise last_error

    def update_application(self, application_id: str, changes: dict[str, Any]) -> Application:
        """PATCH the given fields; CML applies most of them at the next restart."""
        data = self._transport.request("PATCH", self._app_path(application_id), json_body=changes)
        return (
            Application.from_api(data) if data.get("id") else self.get_application(application_id)
        )

    def delete_application(self, application_id: str, missing_ok: bool = False) -> bool:
        """Delete an application (stopping it first if it runs); False when ``missing_ok``
        and it was already gone."""
        return self._delete(self._app_path(application_id), missing_ok)

    def stop_application(self, application_id: str) -> None:
        self._transport.request("POST", self._app_path(application_id) + ":stop")

    def restart_application(self, application_id: str) -> None:
        self._transport.request("POST", self._app_path(application_id) + ":restart")

    # --------------------------------------------------------------------- project files

    def upload_file(self, path: str, content: bytes | str, overwrite: bool = False) -> None:
        """Write ``content`` at ``path`` (relative to the project root, /home/cdsw).

        CML never overwrites: an existing path makes it store ``name(1).ext`` instead. With
        ``overwrite=True`` the old file is deleted first, so the path gets the new content.
        """
        path = _clean_path(path)
        if not path:
            raise CMLConfigurationError("upload_file needs a file path, not the project root")
        if overwrite:
            self.delete_file(path, missing_ok=True)
        data = content.encode() if isinstance(content, str) else content
        filename = path.rsplit("/", 1)[-1]
        # An upload is not idempotent (a second one lands at name(1).ext). When its answer
        # is lost, look the path up and send again only if it is not there.
        last_error: CMLOutcomeUnknownError | None = None
        for _ in range(self._transport.retry.max_attempts):
            try:
                self._transport.request(
                    "POST",
                    self._project_path("files"),
                    files={path: (filename, data, "application/octet-stream")},
                    idempotent=False,
                    name_hint=path,
                )
                return
            except CMLOutcomeUnknownError as exc:
                last_error = exc
                if self._file_exists(path):
                    return
        assert last_error is not None
        raise last_error

    def _file_exists(self, path: str) -> bool:
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        try:
            return any(f.path == path for f in self.list_files(parent))
        except CMLNotFoundError:
            return False

    def list_files(self, path: str = "") -> list[ProjectFile]:
        data = self._transport.request("GET", self._files_path(path))
        return [ProjectFile.from_api(item) for item in data.get("files") or []]

    def download_file(self, path: str) -> bytes:
        return self._transport.request("POST", self._files_path(path) + ":download", raw=True)

    def delete_file(self, path: str, missing_ok: bool = False) -> None:
        """Delete a file or a folder (with its contents) of the project."""
        self._delete(self._files_path(path), missing_ok)

    # ------------------------------------------------------------------------- internals

    def _delete(self, path: str, missing_ok: bool) -> bool:
        try:
            self._transport.request("DELETE", path, gone_after_retry_is_success=True)
        except CMLNotFoundError:
            if not missing_ok:
                raise
            return False
        return True

    def _project_path(self, *parts: str) -> str:
        if not self.settings.project_id:
            raise CMLConfigurationError(
                "No CML project: pass project_id (provider key 'project_id'), set "
                "CML_PROJECT_ID, or run inside CML where CDSW_PROJECT_ID is set."
            )
        base = f"{API_PREFIX}/projects/{quote(self.settings.project_id, safe='')}"
        return "/".join([base, *parts])

    def _app_path(self, application_id: str) -> str:
        return self._project_path("applications", quote(application_id, safe=""))

    def _files_path(self, path: str) -> str:
        return self._project_path("files", quote(_clean_path(path), safe="/"))

    def _paginate(
        self,
        path: str,
        items_key: str,
        search_filter: dict[str, Any] | None,
        sort: str | None,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> Iterator[dict[str, Any]]:
        """Follow ``next_page_token`` to the end, re-sending the same filter and sort."""
        params: dict[str, Any] = {"page_size": page_size}
        encoded = encode_search_filter(search_filter)
        if encoded:
            params["search_filter"] = encoded
        if sort:
            params["sort"] = sort
        seen_tokens: set[str] = set()
        while True:
            data = self._transport.request("GET", path, params=params)
            yield from data.get(items_key) or []
            token = data.get("next_page_token") or ""
            if not token:
                return
            if token in seen_tokens:
                raise CMLServerError("GET", path, 200, f"pagination loops on token {token!r}")
            seen_tokens.add(token)
            params["page_token"] = token


def _clean_path(path: str) -> str:
    return path.strip().strip("/")
