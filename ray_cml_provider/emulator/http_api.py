"""The emulator's HTTP layer: CML API v2 routes, bearer auth, injected faults, counters.

Routes under ``/api/v2`` speak CML's shapes. Routes under ``/_emulator/`` are NOT part of
CML: they let tests and benchmarks read request counts, change faults at run time, see the
local process behind each application and crash one. They need no API key.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from ray_cml_provider.emulator.errors import ApiError, invalid
from ray_cml_provider.emulator.project_files import ProjectFiles
from ray_cml_provider.emulator.state import WorkspaceState

PROJECT = "/api/v2/projects/{project_id}"
APP = PROJECT + "/applications/{application_id}"
DEFAULT_PAGE_SIZE = 10
MAX_PAGE_SIZE = 1000


@dataclass
class Request:
    method: str
    template: str
    params: dict[str, str]
    query: dict[str, str]
    headers: Message
    body: bytes

    def json(self) -> Any:
        if not self.body:
            return {}
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise invalid(f"request body is not valid JSON: {exc}") from None


@dataclass
class Response:
    status: int = 200
    body: Any = None
    raw: bytes | None = None
    headers: dict[str, str] | None = None
    dropped: bool = False  # done, but the client gets no answer


@dataclass
class Faults:
    """Injected faults: a share of CML API requests answered 429/503 before any work
    (``rate``), a share whose answer is lost AFTER the work is done (``drop_rate``: the
    connection closes with no response, as when a gateway times out), and added latency."""

    rate: float = 0.0
    latency_ms: float = 0.0
    seed: int | None = None
    drop_rate: float = 0.0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()

    def pick(self) -> ApiError | None:
        with self._lock:
            if self.rate <= 0 or self._rng.random() >= self.rate:
                return None
            if self._rng.random() < 0.5:
                return ApiError(429, "rate limit exceeded (injected by the emulator)")
            return ApiError(503, "service unavailable (injected by the emulator)")

    def drop_answer(self) -> bool:
        with self._lock:
            return self.drop_rate > 0 and self._rng.random() < self.drop_rate


class Stats:
    """Counts of CML API requests by method and path template, for tests and benchmarks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.requests: Counter[str] = Counter()
            self.statuses: Counter[str] = Counter()
            self.faults_injected = 0
            self.answers_dropped = 0

    def record(
        self, method: str, template: str, status: int, injected: bool, dropped: bool = False
    ) -> None:
        with self._lock:
            self.requests[f"{method} {template}"] += 1
            self.statuses[str(status)] += 1
            self.faults_injected += int(injected)
            self.answers_dropped += int(dropped)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "total": sum(self.requests.values()),
                "requests": dict(self.requests),
                "statuses": dict(self.statuses),
                "faults_injected": self.faults_injected,
                "answers_dropped": self.answers_dropped,
            }


Handler = Callable[[Request], Response]


class EmulatorAPI:
    """Routes requests to the workspace model and renders CML-shaped answers."""

    def __init__(self, state: WorkspaceState, files: ProjectFiles, api_key: str, faults: Faults):
        self.state = state
        self.files = files
        self.faults = faults
        self.stats = Stats()
        self._keys = {api_key}
        self._keys_lock = threading.Lock()
        self._routes: list[tuple[str, str, re.Pattern[str], Handler]] = []
        route = self._add_route
        route("GET", "/api/v2/runtimes", self.list_runtimes)
        route("GET", PROJECT, self.get_project)
        route("GET", PROJECT + "/applications", self.list_applications)
        route("POST", PROJECT + "/applications", self.create_application)
        route("POST", APP + ":stop", self.stop_application)
        route("POST", APP + ":restart", self.restart_application)
        route("GET", APP, self.get_application)
        route("PATCH", APP, self.update_application)
        route("DELETE", APP, self.delete_application)
        route("POST", PROJECT + "/files", self.upload_files)
        route("POST", PROJECT + "/files/{path}:download", self.download_file)
        route("GET", PROJECT + "/files", self.list_files)
        route("GET", PROJECT + "/files/{path}", self.list_files)
        route("DELETE", PROJECT + "/files/{path}", self.delete_file)
        route("GET", "/_emulator/stats", self.get_stats)
        route("POST", "/_emulator/stats:reset", self.reset_stats)
        route("POST", "/_emulator/faults", self.set_faults)
        route("GET", "/_emulator/applications", self.list_processes)
        route("POST", "/_emulator/applications/{application_id}:crash", self.crash_application)

    def set_engine_key(self, key: str, valid: bool) -> None:
        """Register (or revoke) the key the emulator injected into one application."""
        with self._keys_lock:
            (self._keys.add if valid else self._keys.discard)(key)

    # ------------------------------------------------------------------ dispatch

    def _add_route(self, method: str, template: str, handler: Handler) -> None:
        pattern = re.escape(template)
        pattern = pattern.replace(re.escape("{path}"), "(?P<path>.*?)")
        pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/:]+)", pattern)
        self._routes.append((method, template, re.compile(f"^{pattern}/?$"), handler))

    def handle(self, method: str, raw_path: str, headers: Message, body: bytes) -> Response:
        split = urlsplit(raw_path)
        template, handler, params = "<unmatched>", None, {}
        for route_method, route_template, pattern, route_handler in self._routes:
            match = pattern.match(split.path)
            if match and route_method == method:
                template, handler = route_template, route_handler
                params = {k: unquote(v) for k, v in match.groupdict().items()}
                break
        is_cml_api = split.path.startswith("/api/")
        injected = False
        try:
            if is_cml_api:
                if self.faults.latency_ms:
                    time.sleep(self.faults.latency_ms / 1000)
                fault = self.faults.pick()
                if fault:
                    injected = True
                    raise fault
                self._authenticate(headers)
            if handler is None:
                raise ApiError(404, f"no route for {method} {split.path}")
            query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
            response = handler(Request(method, template, params, query, headers, body))
        except ApiError as exc:
            response = Response(exc.status, exc.body())
            if exc.status == 429:
                response.headers = {"Retry-After": "1"}
        except Exception as exc:  # a bug in the emulator: answer like a server would
            response = Response(500, ApiError(500, f"internal error: {exc!r}").body())
        if is_cml_api:  # test-control traffic would only blur the counts
            if 200 <= response.status < 300 and self.faults.drop_answer():
                response.dropped = True
            self.stats.record(method, template, response.status, injected, response.dropped)
        return response

    def _authenticate(self, headers: Message) -> None:
        value = headers.get("Authorization", "")
        token = value[7:].strip() if value.startswith("Bearer ") else ""
        with self._keys_lock:
            ok = token in self._keys
        if not ok:
            raise ApiError(401, "Unauthorized: missing or invalid API key")

    # ------------------------------------------------------------------ CML API

    def list_runtimes(self, request: Request) -> Response:
        runtimes = self.state.runtimes
        search = _search_filter(request)
        runtimes = [
            r
            for r in runtimes
            if all(str(v).lower() in str(r.get(k, "")).lower() for k, v in search.items())
        ]
        return Response(body={"runtimes": runtimes, "next_page_token": ""})

    def get_project(self, request: Request) -> Response:
        self.state.check_project(request.params["project_id"])
        return Response(body=self.state.project())

    def list_applications(self, request: Request) -> Response:
        self.state.check_project(request.params["project_id"])
        page_size = _page_size(request)
        body = self.state.list(
            _search_filter(request),
            request.query.get("sort", ""),
            page_size,
            request.query.get("page_token", ""),
        )
        return Response(body=body)

    def create_application(self, request: Request) -> Response:
        self.state.check_project(request.params["project_id"])
        return Response(body=self.state.create(request.json()))

    def get_application(self, request: Request) -> Response:
        self.state.check_project(request.params["project_id"])
        return Response(body=self.state.get(request.params["application_id"]))

    def update_application(self, request: Request) -> Response:
        self.state.check_project(request.params["project_id"])
        return Response(body=self.state.update(request.params["application_id"], request.json()))

    def delete_application(self, request: Request) -> Response:
        self.state.check_project(request.params["project_id"])
        self.state.delete(request.params["application_id"])
        return Response(body={})

    def stop_application(self, request: Request) -> Response:
        self.state.check_project(request.params["project_id"])
        return Response(body=self.state.stop(request.params["application_id"]))

    def restart_application(self, request: Request) -> Response:
        self.state.check_project(request.params["project_id"])
        return Response(body=self.state.restart(request.params["application_id"]))

    def upload_files(self, request: Request) -> Response:
        self.state.check_project(request.params["project_id"])
        parts = parse_multipart(request.headers.get("Content-Type", ""), request.body)
        if not parts:
            raise invalid("upload needs multipart/form-data with one field per file")
        for destination, data in parts:
            self.files.upload(destination, data)
        return Response(body={})

    def list_files(self, request: Request) -> Response:
        self.state.check_project(request.params["project_id"])
        return Response(body={"files": self.files.list(request.params.get("path", ""))})

    def download_file(self, request: Request) -> Response:
        self.state.check_project(request.params["project_id"])
        return Response(raw=self.files.read(request.params["path"]))

    def delete_file(self, request: Request) -> Response:
        self.state.check_project(request.params["project_id"])
        self.files.delete(request.params["path"])
        return Response(body={})

    # ------------------------------------------------------------------ /_emulator/

    def get_stats(self, request: Request) -> Response:
        return Response(body=self.stats.snapshot())

    def reset_stats(self, request: Request) -> Response:
        self.stats.reset()
        return Response(body={})

    def set_faults(self, request: Request) -> Response:
        body = request.json()
        if "fault_rate" in body:
            self.faults.rate = float(body["fault_rate"])
        if "latency_ms" in body:
            self.faults.latency_ms = float(body["latency_ms"])
        if "drop_rate" in body:
            self.faults.drop_rate = float(body["drop_rate"])
        # Start delays apply to applications not yet RUNNING too.
        for delay in ("start_delay_s", "schedule_delay_s"):
            if delay in body:
                setattr(self.state.config, delay, float(body[delay]))
        if "file_delay_s" in body:
            self.files.visibility_delay_s = float(body["file_delay_s"])
        return Response(
            body={
                "fault_rate": self.faults.rate,
                "latency_ms": self.faults.latency_ms,
                "drop_rate": self.faults.drop_rate,
                "start_delay_s": self.state.config.start_delay_s,
                "schedule_delay_s": self.state.config.schedule_delay_s,
                "file_delay_s": self.files.visibility_delay_s,
            }
        )

    def list_processes(self, request: Request) -> Response:
        return Response(body={"applications": self.state.process_info()})

    def crash_application(self, request: Request) -> Response:
        return Response(body=self.state.crash(request.params["application_id"]))


def _search_filter(request: Request) -> dict[str, Any]:
    raw = request.query.get("search_filter", "")
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        raise invalid(f"search_filter is not a JSON object: {raw!r}") from None
    if not isinstance(value, dict):
        raise invalid(f"search_filter is not a JSON object: {raw!r}")
    return value


def _page_size(request: Request) -> int:
    raw = request.query.get("page_size", "")
    if not raw:
        return DEFAULT_PAGE_SIZE
    if not raw.isdigit() or int(raw) < 1:
        raise invalid(f"page_size must be a positive integer, got {raw!r}")
    return min(int(raw), MAX_PAGE_SIZE)


def parse_multipart(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """(field name, bytes) of each part of a multipart/form-data body."""
    header = Message()
    header["Content-Type"] = content_type
    boundary = header.get_param("boundary")
    if header.get_content_type() != "multipart/form-data" or not isinstance(boundary, str):
        raise invalid("upload must be multipart/form-data")
    parts = []
    for chunk in body.split(b"--" + boundary.encode())[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, data = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        data = data.removesuffix(b"\r\n")
        disposition = Message()
        for line in head.decode("utf-8", "replace").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-disposition":
                disposition["Content-Disposition"] = value.strip()
        field = disposition.get_param("name", header="content-disposition")
        if isinstance(field, str) and field:
            parts.append((field, data))
    return parts


def make_http_server(
    api: EmulatorAPI, host: str, port: int, verbose: bool = False
) -> ThreadingHTTPServer:
    class CMLRequestHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out in separate writes
        server_version = "CMLEmulator/1"

        def _dispatch(self) -> None:
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

        def log_message(self, format: str, *args: Any) -> None:
            if verbose:
                super().log_message(format, *args)

    server = ThreadingHTTPServer((host, port), CMLRequestHandler)
    server.daemon_threads = True
    return server
