"""The node's CML API v2 client: the few calls a node makes, with its engine's own key.

Standard library only: the bootstrap uses it before anything is installed, and a node whose
environment could not be made keeps using it (to publish why, and to answer ``ray stop``).
The provider side's client (``ray_cml_provider.cml``, on ``requests``) is the full one; this
one covers the project's files and deleting the node's own applications, with the same kind
of typed errors and a retry policy of its own.

Through the API rather than the project's NFS mount go what the provider must see at once
(CML's files API reads its own writes; a mount may show them 30 s and more later):
``node.json``, command results, a worker's failure; and a node deletes applications with it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass


class ProjectAPIError(OSError):
    """A call failed: ``status`` is the HTTP status, or None when no answer came."""

    def __init__(self, method: str, path: str, reason: str, status: int | None = None):
        self.method, self.path, self.status = method, path, status
        super().__init__(f"{method} {path}: {reason}")


class NotFound(ProjectAPIError):
    """404: the file, folder or application is not there."""


@dataclass(frozen=True)
class Retries:
    """How often a call is tried while CML is busy (429, 5xx) or unreachable. A request that
    may have taken effect (an upload whose answer was lost) is not sent again."""

    attempts: int = 4
    backoff_s: float = 0.5
    backoff_max_s: float = 8.0
    timeout_s: float = 30.0

    def delay(self, attempt: int) -> float:
        return min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1)


BUSY = {429, 502, 503, 504}


class ProjectAPI:
    """The project's files and deleting applications, with the engine's key
    (``CDSW_APIV2_KEY``). Every error is a ``ProjectAPIError`` (an ``OSError``)."""

    def __init__(
        self, env: dict[str, str], log: Callable[[str], None], retries: Retries = Retries()
    ):
        self.log = log
        self.retries = retries
        api = env.get("CDSW_API_URL", "").rsplit("/api/", 1)[0] or (
            "https://" + env.get("CDSW_DOMAIN", "")
        )
        project = urllib.parse.quote(env.get("CDSW_PROJECT_ID", ""), safe="")
        self.base = f"{api}/api/v2/projects/{project}"
        self.available = bool(env.get("CDSW_APIV2_KEY") and env.get("CDSW_PROJECT_ID"))
        self._headers = {
            "Authorization": f"Bearer {env.get('CDSW_APIV2_KEY', '')}",
            "Accept": "application/json",
        }

    # -------------------------------------------------------------- transport

    def _call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        may_repeat: bool = True,
        **headers: str,
    ) -> bytes:
        """One call, tried again while CML is busy; ``may_repeat`` False: not after a lost
        answer (the request may have taken effect)."""
        for attempt in range(1, self.retries.attempts + 1):
            try:
                return self._send(method, path, body, headers)
            except NotFound:
                raise
            except ProjectAPIError as exc:
                lost = exc.status is None
                retry = exc.status in BUSY or (lost and may_repeat)
                if not retry or attempt == self.retries.attempts:
                    raise
                time.sleep(self.retries.delay(attempt))
        raise AssertionError("unreachable")

    def _send(self, method: str, path: str, body: bytes | None, headers: dict) -> bytes:
        request = urllib.request.Request(
            self.base + path, data=body, method=method, headers={**self._headers, **headers}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.retries.timeout_s) as answer:
                return answer.read()
        except urllib.error.HTTPError as exc:
            kind = NotFound if exc.code == 404 else ProjectAPIError
            raise kind(method, path, f"HTTP {exc.code} {_message(exc)}", exc.code) from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            # Refused, reset, timed out, or an answer cut off (a gateway dropping it).
            raise ProjectAPIError(method, path, repr(exc)) from None

    def _json(self, method: str, path: str) -> dict:
        try:
            data = json.loads(self._call(method, path))
        except ValueError as exc:
            raise ProjectAPIError(method, path, f"not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise ProjectAPIError(method, path, "not a JSON object")
        return data

    # -------------------------------------------------------------- files

    def list_names(self, folder: str) -> list[str]:
        """Names in ``folder``; [] when it does not exist."""
        try:
            data = self._json("GET", "/files/" + urllib.parse.quote(folder))
        except NotFound:
            return []
        return [entry["path"].rsplit("/", 1)[-1] for entry in data.get("files") or []]

    def download(self, path: str) -> bytes:
        return self._call("POST", "/files/" + urllib.parse.quote(path) + ":download")

    def upload(self, path: str, data: bytes) -> None:
        boundary = "ray-cml-" + os.urandom(8).hex()
        name = path.rsplit("/", 1)[-1]
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{path}"; '
                f'filename="{name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
            ).encode()
            + data
            + f"\r\n--{boundary}--\r\n".encode()
        )
        content_type = f"multipart/form-data; boundary={boundary}"
        self._call("POST", "/files", body, may_repeat=False, **{"Content-Type": content_type})

    def delete(self, path: str) -> None:
        """Delete a project file; nothing when it is not there."""
        with contextlib.suppress(NotFound):
            self._call("DELETE", "/files/" + urllib.parse.quote(path))

    # -------------------------------------------------------------- applications

    def applications(self, prefix: str) -> list[dict]:
        """The project's applications whose name starts with ``prefix``, as CML gives them
        (every page; CML's name filter matches substrings: checked here)."""
        found, token = [], ""
        while True:
            query = urllib.parse.urlencode(
                {
                    "search_filter": json.dumps({"name": prefix}),
                    "page_size": 100,
                    "page_token": token,
                }
            )
            data = self._json("GET", f"/applications?{query}")
            for app in data.get("applications") or []:
                if str(app.get("name", "")).startswith(prefix) and app.get("id"):
                    found.append(app)
            token = data.get("next_page_token") or ""
            if not token:
                return found

    def delete_application(self, app_id: str) -> None:
        """Delete one application; nothing when it is already gone."""
        with contextlib.suppress(NotFound):
            self._call("DELETE", f"/applications/{urllib.parse.quote(app_id)}")

    def delete_application_named(self, name: str) -> None:
        for app in self.applications(name):
            if app["name"] == name:
                self.log(f"deleting application {name} ({app['id']})")
                self.delete_application(str(app["id"]))


def _message(exc: urllib.error.HTTPError) -> str:
    """The server's own message, when its answer carries one (CML: ``{"message": ...}``)."""
    try:
        body = json.loads(exc.read(4096) or b"{}")
    except (OSError, ValueError):
        return ""
    return str(body.get("message", ""))[:300] if isinstance(body, dict) else ""
