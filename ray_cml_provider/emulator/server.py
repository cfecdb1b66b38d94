"""The emulator's HTTP server: one dispatcher in front of the CML handlers (``cml_api``)
and the test-control handlers (``control``).

For a CML API request (``/api/...``) the dispatcher adds the injected latency, may answer
an injected 429/503 instead, checks the bearer key (the operator's, or one the emulator gave
an application's engine), checks the project id of the path once, runs the handler and
counts the request; it may then drop a successful answer (``Faults.drop_rate``). Requests
to ``/apps/<subdomain>/`` are an application's URL: ``ingress`` forwards them.

The listening socket takes a backlog of ``LISTEN_BACKLOG`` connections: with the standard
library's default of 5, a burst of concurrent clients (16 creating applications at once)
saw connections reset before the server's threads could accept them.
"""

from __future__ import annotations

import json
import threading
import time
from email.message import Message
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ray_cml_provider.emulator.cml_api import CMLHandlers
from ray_cml_provider.emulator.control import ControlHandlers
from ray_cml_provider.emulator.errors import ApiError
from ray_cml_provider.emulator.ingress import APPS_PREFIX, Ingress
from ray_cml_provider.emulator.jobs import JobRuns
from ray_cml_provider.emulator.project_files import ProjectFiles
from ray_cml_provider.emulator.routing import Request, Response, Router
from ray_cml_provider.emulator.state import WorkspaceState
from ray_cml_provider.emulator.traffic import Faults, Stats

LISTEN_BACKLOG = 256


class EmulatorAPI:
    """Everything behind the socket: routes, auth, faults, counters. Callable in-process."""

    def __init__(self, state: WorkspaceState, files: ProjectFiles, api_key: str, faults: Faults):
        self.state = state
        self.files = files
        self.faults = faults
        self.stats = Stats()
        self._keys = {api_key}
        self._operator_key = api_key
        self.ingress = Ingress(state, api_key)  # application URLs: /apps/<subdomain>/
        self._keys_lock = threading.Lock()
        self.router = Router()
        CMLHandlers(state, files).register(self.router)
        self.jobs = JobRuns(state)  # CML Jobs: a script run once per run, in an engine
        self.jobs.register(self.router)
        ControlHandlers(state, files, faults, self.stats).register(self.router)

    def set_engine_key(self, key: str, valid: bool) -> None:
        """Register (or revoke) the key the emulator injected into one application."""
        with self._keys_lock:
            (self._keys.add if valid else self._keys.discard)(key)

    def handle(self, method: str, raw_path: str, headers: Message, body: bytes) -> Response:
        split = urlsplit(raw_path)
        route, params = self.router.match(method, split.path)
        template = route.template if route else "<unmatched>"
        is_cml_api = split.path.startswith("/api/")
        injected, arrived, caller = False, time.time(), ""
        try:
            if is_cml_api:
                if self.faults.latency_ms:
                    time.sleep(self.faults.latency_ms / 1000)
                fault = self.faults.pick()
                if fault:
                    injected = True
                    raise fault
                caller = self._authenticate(headers)
            if route is None:
                raise ApiError(404, f"no route for {method} {split.path}")
            if "project_id" in params:
                self.state.check_project(params["project_id"])
            query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
            response = route.handler(Request(method, template, params, query, headers, body))
        except ApiError as exc:
            response = Response(exc.status, exc.body())
            if exc.status == 429:
                response.headers = {"Retry-After": "1"}
        except Exception as exc:  # a bug in the emulator: answer like a server would
            response = Response(500, ApiError(500, f"internal error: {exc!r}").body())
        if is_cml_api:  # test-control traffic would only blur the counts
            if 200 <= response.status < 300 and self.faults.drop_answer():
                response.dropped = True
            self.stats.record(
                method, template, response.status, injected, response.dropped, arrived, caller
            )
        return response

    def _authenticate(self, headers: Message) -> str:
        """Whose key the request carries: ``operator`` (the workspace user's) or ``engine``
        (one the emulator gave an application or a job run)."""
        value = headers.get("Authorization", "")
        token = value[7:].strip() if value.startswith("Bearer ") else ""
        with self._keys_lock:
            ok = token in self._keys
        if not ok:
            raise ApiError(401, "Unauthorized: missing or invalid API key")
        return "operator" if token == self._operator_key else "engine"


class EmulatorHTTPServer(ThreadingHTTPServer):
    request_queue_size = LISTEN_BACKLOG
    daemon_threads = True


def make_http_server(
    api: EmulatorAPI, host: str, port: int, verbose: bool = False
) -> EmulatorHTTPServer:
    class CMLRequestHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out in separate writes
        server_version = "CMLEmulator/1"

        def _dispatch(self) -> None:
            if self.path.startswith(APPS_PREFIX):
                api.ingress.forward(self)
                return
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            response = api.handle(self.command, self.path, self.headers, body)
            if response.dropped:
                self.close_connection = True  # the work is done; the answer never leaves
                return
            if response.raw is not None:
                payload, content_type = response.raw, "application/octet-stream"
            else:
                payload = json.dumps(response.body if response.body is not None else {}).encode()
                content_type = "application/json"
            self.send_response(response.status, HTTPStatus(response.status).phrase)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            for name, value in (response.headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _dispatch

        def _application_only(self) -> None:
            if self.path.startswith(APPS_PREFIX):
                api.ingress.forward(self)
            else:
                self.send_error(405)

        do_HEAD = do_OPTIONS = _application_only

        def log_message(self, format: str, *args: Any) -> None:
            if verbose:
                super().log_message(format, *args)

    return EmulatorHTTPServer((host, port), CMLRequestHandler)
