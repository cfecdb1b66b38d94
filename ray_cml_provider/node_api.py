"""The few CML API v2 calls a node makes, with its engine's own key (``CDSW_APIV2_KEY``).

Standard library only, like the node launcher that uses it. Through the API rather than the
project's NFS mount go what the provider must see at once (CML's files API reads its own
writes; a mount may show them 30 s and more later): ``node.json``, command results, a
worker's failure; and a worker deletes its own application with it.
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable


class ProjectAPI:
    """The few CML API v2 calls a node makes with its engine's key (``CDSW_APIV2_KEY``):
    the project's files, and deleting its own application. Errors are ``OSError``."""

    def __init__(self, env: dict[str, str], log: Callable[[str], None]):
        self.log = log
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

    def _call(self, method: str, path: str, body: bytes | None = None, **headers: str) -> bytes:
        request = urllib.request.Request(
            self.base + path, data=body, method=method, headers={**self._headers, **headers}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.read()
        except urllib.error.HTTPError as exc:
            raise OSError(f"{method} {path}: HTTP {exc.code}") from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            # Refused, reset, timed out, or an answer cut off (a gateway dropping it).
            raise OSError(f"{method} {path}: {exc!r}") from None

    def list_names(self, folder: str) -> list[str]:
        """Names in ``folder``; [] when it does not exist."""
        try:
            data = json.loads(self._call("GET", "/files/" + urllib.parse.quote(folder)))
        except OSError as exc:
            if "HTTP 404" in str(exc):
                return []
            raise
        except ValueError as exc:
            raise OSError(f"GET /files/{folder}: not JSON ({exc})") from None
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
        self._call(
            "POST", "/files", body, **{"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )

    def delete(self, path: str) -> None:
        """Delete a project file; nothing when it is not there."""
        try:
            self._call("DELETE", "/files/" + urllib.parse.quote(path))
        except OSError as exc:
            if "HTTP 404" not in str(exc):
                raise

    def application_names(self) -> list[str]:
        """Names of the project's applications (every page)."""
        names, token = [], ""
        while True:
            query = urllib.parse.urlencode({"page_size": 100, "page_token": token})
            try:
                data = json.loads(self._call("GET", f"/applications?{query}"))
            except ValueError as exc:
                raise OSError(f"GET /applications: unexpected answer ({exc!r})") from None
            names += [app.get("name", "") for app in data.get("applications") or []]
            token = data.get("next_page_token") or ""
            if not token:
                return names

    def delete_application_named(self, name: str) -> None:
        query = urllib.parse.urlencode({"search_filter": json.dumps({"name": name})})
        try:
            apps = json.loads(self._call("GET", f"/applications?{query}"))["applications"]
        except (ValueError, KeyError, TypeError) as exc:
            raise OSError(f"GET /applications: unexpected answer ({exc!r})") from None
        for app in apps:
            if app.get("name") == name:
                self.log(f"deleting my application {app['id']}")
                self._call("DELETE", f"/applications/{urllib.parse.quote(app['id'])}")
