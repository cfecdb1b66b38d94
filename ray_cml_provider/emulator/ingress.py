"""CML's application proxy, played: an application's URL and the login in front of it.

On CML an application is served at ``https://<subdomain>.<workspace domain>``: CML's proxy
forwards to the engine's ``CDSW_APP_PORT``, and lets in only people logged in to CML unless
the application was created with ``bypass_authentication``. A loopback emulator has no DNS
for subdomains, so here the URL is ``<emulator>/apps/<subdomain>/``: the prefix is removed
before the request reaches the engine, as CML's host name is.

The emulated login is the operator's API key, as ``Authorization: Bearer`` or the cookie
``cml_login`` (CML itself takes its SSO session); it is removed before forwarding, so an
engine never sees it. A workspace that forbids applications without the login
(``--forbid-unauthenticated-apps``) refuses to create or update one with
``bypass_authentication`` (``validation``).

Answers stream through piece by piece (server-sent events from an LLM included).
"""

from __future__ import annotations

import http.client
import json
from http.server import BaseHTTPRequestHandler

from ray_cml_provider.emulator.state import RUNNING, WorkspaceState

APPS_PREFIX = "/apps/"
LOGIN_COOKIE = "cml_login"
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
}


def application_url(api_url: str, subdomain: str) -> str:
    return f"{api_url.rstrip('/')}{APPS_PREFIX}{subdomain}"


class Ingress:
    def __init__(self, state: WorkspaceState, api_key: str) -> None:
        self.state = state
        self.api_key = api_key

    def logged_in(self, handler: BaseHTTPRequestHandler) -> bool:
        value = handler.headers.get("Authorization", "")
        if value.startswith("Bearer ") and value[7:].strip() == self.api_key:
            return True
        for part in (handler.headers.get("Cookie") or "").split(";"):
            key, _, cookie = part.strip().partition("=")
            if key == LOGIN_COOKIE and cookie == self.api_key:
                return True
        return False

    def forward(self, handler: BaseHTTPRequestHandler) -> None:
        rest = handler.path[len(APPS_PREFIX) :]
        subdomain, slash, tail = rest.partition("/")
        subdomain, mark, query = subdomain.partition("?")
        target = "/" + (tail if slash else "") + (f"?{query}" if mark else "")
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        found = self.state.engine_for_subdomain(subdomain)
        if found is None:
            return self._answer(handler, 404, f"no application is served at {subdomain!r}")
        fields, engine = found
        bypass = fields.get("bypass_authentication", False)
        logged_in = self.logged_in(handler)
        if not bypass and not logged_in:
            return self._answer(
                handler, 401, "sign in to CML to open this application (emulated CML login)"
            )
        if fields["status"] != RUNNING or engine is None:
            return self._answer(handler, 503, f"the application is {fields['status']}")
        headers = {
            k: v
            for k, v in handler.headers.items()
            if k.lower() not in HOP_BY_HOP
            and not (not bypass and k.lower() == "authorization" and logged_in)
        }
        headers["Content-Length"] = str(len(body))
        connection = http.client.HTTPConnection(engine[0], engine[1], timeout=3600)
        try:
            connection.request(handler.command, target, body=body, headers=headers)
            answer = connection.getresponse()
        except OSError as exc:
            connection.close()
            return self._answer(handler, 502, f"the application did not answer: {exc}")
        try:
            handler.send_response(answer.status, answer.reason)
            for key, value in answer.getheaders():
                if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                    handler.send_header(key, value)
            if handler.command == "HEAD" or answer.status in (204, 304):  # no body, ever
                handler.end_headers()
                return
            handler.send_header("Transfer-Encoding", "chunked")
            handler.end_headers()
            while piece := answer.read1(65536):
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                handler.wfile.flush()
            handler.wfile.write(b"0\r\n\r\n")
        except OSError:
            handler.close_connection = True
        finally:
            connection.close()

    @staticmethod
    def _answer(handler: BaseHTTPRequestHandler, status: int, message: str) -> None:
        payload = json.dumps({"message": message, "code": status}).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)
