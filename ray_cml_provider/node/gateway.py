"""The head's front door: one URL for the OpenAI API and the Ray dashboard, on aiohttp.

CML publishes one port of an application, ``CDSW_APP_PORT``, at ``https://<subdomain>.<workspace
domain>``; and every engine of the workspace can open that port on the head's own address
directly, without CML's proxy or its login. On the head the node launcher runs this gateway
there, once the node's environment (which has ``ray[default]`` and so aiohttp) is ready. It
routes each request:

- ``/v1/...`` (the OpenAI API of a Ray Serve LLM app) to Ray Serve's HTTP proxy, which listens
  on the head's loopback only (the shipped Serve configs bind it to 127.0.0.1): nothing in
  the workspace reaches Serve except through here;
- everything else to the Ray dashboard, which listens on a port of its own.

Who may call:

- ``/v1/...`` always needs the cluster's *endpoint key* (``ray-cml endpoint-key``), as
  ``Authorization: Bearer <key>`` or ``X-Endpoint-Key: <key>`` (for a caller behind CML's
  login, whose proxy may take ``Authorization`` for itself), or Ray's token. A request that
  came through CML's proxy cannot be told from one that did not, so the login is not a key.
  Neither key reaches Serve: every credential header we accept is removed, and so is Ray's
  dashboard cookie.
- Everything else: with ``bypass_authentication`` on the head (``locked``), Ray's token only
  (``Authorization``, ``X-Ray-Authorization`` or Ray's dashboard cookie), which the dashboard
  then checks again; behind CML's login, what the dashboard itself asks (its API asks for
  Ray's token). The endpoint key, handed to the model's callers, never runs code.

Keys are compared in constant time; a refused request gets 401, is never forwarded, and its
connection is closed without reading its body.

HTTP itself is aiohttp's on both sides (its parser, llhttp, frames every request; its client
frames what goes to Ray): this module never reads or writes a message's framing. What it adds
are the rules a shared door needs, each tested in ``tests/test_node_gateway.py`` and
``tests/test_door_attacks.py``:

- only origin-form targets (``/path?query``) are relayed, to Serve's proxy or the dashboard,
  on a URL built from the gateway's own host and port: ``CONNECT``, absolute URLs and ``*``
  get 400, so the head is no pivot to its loopback or its network;
- a ``Connection`` header that names a framing or credential header is refused (400): hop-by-
  hop removal must not unframe a body or drop a key check;
- connections to Ray come from one pool per kind of caller (``Limits.pool_sizes``: Ray's
  token, the endpoint key, no credential), so callers without a credential cannot take the
  owner's or the model callers'; every wait is bounded: for a pooled connection
  (``pool_wait_s``, then 503), for Ray's answer (``answer_s``), for a caller to take the
  next bytes of it (``idle_s``, then the caller is cut);
- time limits: a caller that sends no complete request head for ``idle_s`` is closed, and so
  is one that stalls inside a body for ``idle_s`` or sends it slower than
  ``min_body_bytes_per_s`` on average;
- caps: header line and field sizes and header count (aiohttp's parser), a head's bytes and
  all unfinished heads' together, body size per route, and open connections, past which the
  idle and the anonymous make room (``connections.py``);
- an upgrade (WebSocket) only when the caller asked for one with a valid handshake, checked
  before Ray's side is opened; a ``101`` nobody asked for is a 502;
- ``/metrics`` renders shared between scrapers and spaced to a quarter of a core
  (``cluster_metrics.py``);
- no traceback and no raw control character in the log, whatever a caller sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import resource
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from ray_cml_provider.node.connections import (
    ConnectionBook,
    ConnectionLimits,
    GuardedServer,
    OneLineLog,
    printable,
)

if sys.version_info >= (3, 11):
    from asyncio import timeout as within
else:  # aiohttp's own dependency below 3.11
    from async_timeout import timeout as within

ENDPOINT_KEY_HEADER = "X-Endpoint-Key"
METRICS_KEY_HEADER = "X-Metrics-Key"
METRICS_PATH = "/metrics"
RAY_TOKEN_HEADER = "X-Ray-Authorization"
RAY_TOKEN_COOKIE = "ray-authentication-token"
# Headers that belong to one hop (RFC 9110 7.6.1), and the framing that aiohttp sets anew on
# each side.
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
    "transfer-encoding",
    "content-length",
    "host",
    "expect",
}
# A Connection header naming one of these would make a hop-by-hop removal change how a body
# is framed or what was authorised: such a request is refused.
PROTECTED = {
    "content-length",
    "transfer-encoding",
    "host",
    "authorization",
    RAY_TOKEN_HEADER.lower(),
    ENDPOINT_KEY_HEADER.lower(),
    METRICS_KEY_HEADER.lower(),
    "cookie",
}
# The websocket handshake's own headers: aiohttp makes them again for the upstream.
WEBSOCKET_HANDSHAKE = {
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "sec-websocket-accept",
    "sec-websocket-protocol",
}


@dataclass(frozen=True)
class Limits:
    """What one caller may cost the head. The defaults are the production ones; tests shrink
    the times."""

    idle_s: float = 60.0  # no complete request head, or no body bytes, for this long: closed
    crowded_idle_s: float = 5.0  # the same, a quarter full, for a connection that never spoke
    max_line_bytes: int = 16 * 1024  # request line, and each header field
    max_headers: int = 100
    max_head_bytes: int = 64 * 1024  # one request head, all of it
    head_budget_bytes: int = 64 * 1024 * 1024  # unfinished heads, all connections together
    max_api_body_bytes: int = 64 * 1024 * 1024  # /v1: prompts, embeddings inputs
    max_dashboard_body_bytes: int = 512 * 1024 * 1024  # a job's working_dir package
    min_body_bytes_per_s: int = 16 * 1024  # after idle_s, a body slower on average: cut
    max_body_s: float = 600.0  # a whole body, however fast its bytes come
    replay_body_bytes: int = 64 * 1024  # read first, so a stale pooled connection is retried
    # /v1 bodies (with a length) up to this are read whole before Serve sees the request:
    # a body trickled by a caller then holds no connection to Serve, nor a place in its queue.
    whole_api_body_bytes: int = 16 * 1024 * 1024
    held_bodies_bytes: int = 256 * 1024 * 1024  # all such bodies at once; past it they stream
    max_connections: int = 0  # 0: from the file limit (``connection_cap``)
    pool_wait_s: float = 5.0  # for a free connection to Ray; then 503, try again
    answer_s: float = 600.0  # Ray's answer to the owner or a keyed caller: headers, each read
    public_answer_s: float = 30.0  # the same for a caller without a credential
    # Connections to Ray by who asks: a caller without a credential cannot take the owner's or
    # the model callers' (``POOLS``).
    pool_sizes: tuple[tuple[str, int], ...] = (("owner", 64), ("api", 512), ("public", 32))


def connection_cap(reserve: int = 128, most: int = 8192) -> int:
    """How many callers may hold a connection at once: raise the soft file limit to the hard
    one, then leave room for Ray's side (each caller may hold one connection upstream too)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return max(16, min(most, (soft - reserve) // 2))


@dataclass
class Keys:
    """Where the keys are (files in the project); read when first needed, then kept.

    ``locked``: CML's login is bypassed, so the dashboard's side needs Ray's token too.
    """

    endpoint_key_file: Path | None = None
    ray_token_file: Path | None = None
    locked: bool = False
    metrics_key_file: Path | None = None
    _cache: dict[Path, bytes] = field(default_factory=dict)

    def _read(self, path: Path | None) -> bytes | None:
        if path is None:
            return None
        if path not in self._cache:
            try:
                value = path.read_bytes().strip()
            except OSError:
                return None  # not on the mount yet: refused until it is
            if value:
                self._cache[path] = value
        return self._cache.get(path)

    def endpoint_key(self) -> bytes | None:
        return self._read(self.endpoint_key_file)

    def ray_token(self) -> bytes | None:
        return self._read(self.ray_token_file)

    def metrics_key(self) -> bytes | None:
        return self._read(self.metrics_key_file)


@dataclass(frozen=True)
class Upstream:
    host: str
    port: int
    name: str  # for error messages: "Ray Serve's HTTP proxy", "the Ray dashboard"

    def url(self, target: Target) -> URL:
        """Ray's URL for a request: scheme, host and port are ours, never the caller's; the
        path and query go on exactly as sent (``encoded``: no dot-segment folding here, so
        what is judged is what is forwarded)."""
        return URL.build(
            scheme="http",
            host=self.host,
            port=self.port,
            path=target.path,
            query_string=target.query,
            encoded=True,
        )


@dataclass(frozen=True)
class Target:
    """An origin-form request target (``/path?query``), the only form forwarded."""

    path: str
    query: str

    @classmethod
    def of(cls, request: web.BaseRequest) -> Target:
        """Raises ``Refused`` for any other form: ``CONNECT host:port``, an absolute URL or
        ``*`` would each let a caller choose where the head dials."""
        raw = request.raw_path
        if request.method == "CONNECT" or not raw.startswith("/") or "#" in raw:
            raise Refused(400, "the request target must be a path (/...): nothing else is relayed")
        path, _, query = raw.partition("?")
        return cls(path, query)


def _bearer(value: str) -> bytes | None:
    scheme, _, credential = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        return None
    return credential.strip().encode("utf-8", "replace")


def _plain(value: str) -> bytes | None:
    value = value.strip()
    return value.encode("utf-8", "replace") if value else None


def _same(offered: bytes | None, expected: bytes | None) -> bool:
    return bool(offered and expected and hmac.compare_digest(offered, expected))


def _without_ray_cookie(value: str) -> str:
    parts = [p.strip() for p in value.split(";")]
    return "; ".join(p for p in parts if p and p.partition("=")[0].strip() != RAY_TOKEN_COOKIE)


API_KEY_NEEDED = (
    "this URL needs the endpoint key or Ray's token: send 'Authorization: Bearer <key>' "
    f"or '{ENDPOINT_KEY_HEADER}: <key>'"
)
TOKEN_NEEDED = "this URL needs Ray's token: send 'Authorization: Bearer <token>'"
METRICS_KEY_NEEDED = (
    "/metrics needs the metrics key (`ray-cml metrics-key`): send 'Authorization: Bearer "
    f"<key>' or '{METRICS_KEY_HEADER}: <key>'"
)
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
MAX_FAMILIES = 64  # ?family=... filters one /metrics answer takes
SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
SWEEP_EVERY_S = 1.0
WEBSOCKET_BYTES = 4 * 1024 * 1024  # one websocket message, each way (aiohttp's default)
PUBLIC_WEBSOCKET_BYTES = 1024 * 1024


class ClusterMetricsLike(Protocol):
    """What serves ``/metrics`` (``cluster_metrics.ClusterMetrics``)."""

    async def render(
        self, session: aiohttp.ClientSession, families: tuple[str, ...] = ()
    ) -> bytes: ...


class DoorFiguresLike(Protocol):
    """What counts the callers (``door_figures.DoorFigures``)."""

    def answered(self, route: str, status: int) -> None: ...

    def first_byte_after(self, route: str, streamed: bool, seconds: float) -> None: ...


class Refused(Exception):
    """A request the gateway answers itself, with ``status`` and ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Rules:
    """The door's decisions, no I/O: which route a request takes, whether its credential
    admits it, and which of its headers Ray gets."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys

    @staticmethod
    def route_of(raw_target: str) -> str:
        """``v1`` (Serve), ``metrics`` (the gateway itself) or ``dashboard``."""
        path = raw_target.split("?", 1)[0]
        if path == "/v1" or path.startswith("/v1/"):
            return "v1"
        return "metrics" if path == METRICS_PATH else "dashboard"

    def admit_scraper(self, request: web.BaseRequest) -> bool:
        """``/metrics``: the metrics key (figures only), or Ray's token."""
        headers = request.headers
        authorization = _bearer(headers.get("Authorization", ""))
        key, token = self.keys.metrics_key(), self.keys.ray_token()
        return (
            _same(authorization, key)
            or _same(_plain(headers.get(METRICS_KEY_HEADER, "")), key)
            or _same(authorization, token)
            or _same(_bearer(headers.get(RAY_TOKEN_HEADER, "")), token)
        )

    def caller(self, request: web.BaseRequest, api: bool) -> str | None:
        """Who asks, by the credential the request carries: ``owner`` (Ray's token), ``api``
        (the endpoint key, ``/v1`` only), ``public`` (none, for the dashboard behind CML's
        login); None when refused. It picks the request's pool of connections to Ray."""
        headers = request.headers
        token = self.keys.ray_token()
        authorization = _bearer(headers.get("Authorization", ""))
        ray_header = _bearer(headers.get(RAY_TOKEN_HEADER, ""))
        if _same(authorization, token) or _same(ray_header, token):
            return "owner"
        if api:
            key = self.keys.endpoint_key()
            keyed = _same(authorization, key) or _same(
                _plain(headers.get(ENDPOINT_KEY_HEADER, "")), key
            )
            return "api" if keyed else None
        cookie = request.cookies.get(RAY_TOKEN_COOKIE)
        if _same(cookie.encode("utf-8", "replace") if cookie else None, token):
            return "owner"
        # Behind CML's login the dashboard's API asks for Ray's token itself.
        return None if self.keys.locked else "public"

    def is_a_callers_key(self, authorization: str) -> bool:
        """Whether ``Authorization`` carries the endpoint or the metrics key (which only this
        door reads)."""
        offered = _bearer(authorization)
        return _same(offered, self.keys.endpoint_key()) or _same(offered, self.keys.metrics_key())

    @staticmethod
    def check_connection_header(request: web.BaseRequest) -> set[str]:
        """The lower-case names the caller's ``Connection`` header lists; raises ``Refused``
        when one is a framing or credential header."""
        named = {
            token.strip().lower()
            for value in request.headers.getall("Connection", [])
            for token in value.split(",")
            if token.strip()
        }
        if named & PROTECTED:
            raise Refused(400, "the Connection header may not name framing or credential headers")
        return named

    def outgoing_headers(self, request: web.BaseRequest, api: bool, named: set[str]) -> CIMultiDict:
        """The caller's headers as Ray gets them: no hop-by-hop or framing header (aiohttp
        frames anew); never the endpoint or metrics key, in any header we read them from;
        and on ``/v1`` not Ray's token either (the dashboard checks it again)."""
        drop = HOP_BY_HOP | named | {ENDPOINT_KEY_HEADER.lower(), METRICS_KEY_HEADER.lower()}
        if api:
            drop |= {"authorization", RAY_TOKEN_HEADER.lower()}
        headers = CIMultiDict()
        for name, value in request.headers.items():
            lower = name.lower()
            if lower in drop or lower in WEBSOCKET_HANDSHAKE:
                continue
            if lower == "authorization" and self.is_a_callers_key(value):
                continue  # e.g. an OpenAI client whose base URL lacks /v1
            if lower == "cookie" and api:
                value = _without_ray_cookie(value)
                if not value:
                    continue
            headers.add(name, value)
        if request.content_length is not None:
            headers["Content-Length"] = str(request.content_length)
        if request.host:
            headers["X-Forwarded-Host"] = request.host
        headers["X-Forwarded-For"] = request.remote or ""
        return headers


class Gateway:
    """Route and guard requests on the application's port; see the module's docstring."""

    def __init__(
        self,
        serve: Upstream,
        dashboard: Upstream,
        keys: Keys,
        log: Callable[[str], None] = print,
        limits: Limits | None = None,
        metrics: ClusterMetricsLike | None = None,
        figures: DoorFiguresLike | None = None,
    ) -> None:
        self.serve = serve
        self.dashboard = dashboard
        self.metrics = metrics  # the cluster's exports at /metrics (cluster_metrics.py)
        self.figures = figures  # what callers see at this door (door_figures.py)
        self.rules = Rules(keys)
        self.log = log
        self.limits = limits or Limits()
        self.refused = 0  # requests answered 401 (tests and the status page read it)
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self.bodies_held = 0  # bytes of /v1 bodies read whole, not yet sent on to Serve
        # Told who asks on each connection and where its request is (RunningGateway sets it).
        self.book: ConnectionBook | None = None

    # ---------------------------------------------------------------- serving

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        arrived = time.monotonic()
        route = self.rules.route_of(request.raw_path)
        response = await self.answer(request, route, arrived)
        if self.figures is not None:
            self.figures.answered(route, response.status)
        return response

    async def answer(self, request: web.BaseRequest, route: str, arrived: float):
        rules = self.rules
        api = route == "v1"
        book = self.book
        if book is not None and not request.body_exists:
            book.body_read(request.protocol)  # what comes next on it is a next request
        try:
            target = Target.of(request)
            named = rules.check_connection_header(request)
            if self.metrics is not None and route == "metrics":
                return await self.serve_metrics(request)
            caller = rules.caller(request, api)
            if caller is None:
                self.refused += 1
                raise Refused(401, API_KEY_NEEDED if api else TOKEN_NEEDED)
            if book is not None:
                book.identified(request.protocol, caller)
            limit = self.limits.max_api_body_bytes if api else self.limits.max_dashboard_body_bytes
            if (request.content_length or 0) > limit:
                raise Refused(413, f"the body is over {limit} bytes")
            upstream = self.serve if api else self.dashboard
            headers = rules.outgoing_headers(request, api, named)
            if _asks_websocket(request):
                return await self.relay_websocket(request, upstream, target, headers, caller)
            if request.headers.get("Expect", "").lower() == "100-continue":
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            call = Call(upstream, target, headers, caller, limit, route, arrived)
            return await self.forward(request, call)
        except Refused as refusal:
            return self.refusal(refusal)

    async def serve_metrics(self, request: web.BaseRequest) -> web.Response:
        if not self.rules.admit_scraper(request):
            self.refused += 1
            raise Refused(401, METRICS_KEY_NEEDED)
        if self.book is not None:
            self.book.identified(request.protocol, "scraper")
        if request.method not in ("GET", "HEAD") or request.body_exists:
            raise Refused(405, "/metrics answers GET only")
        families = tuple(f for f in request.query.getall("family", []) if f)[:MAX_FAMILIES]
        body = await self.metrics.render(self.session("scraper"), families)
        return web.Response(body=body, headers={"Content-Type": PROMETHEUS_TEXT})

    def refusal(self, refusal: Refused) -> web.Response:
        extra = {}
        if refusal.status == 401:
            extra["WWW-Authenticate"] = 'Bearer realm="ray-cml"'
        if refusal.status in (429, 503):
            extra["Retry-After"] = "1"
        response = web.json_response(
            {"error": refusal.message}, status=refusal.status, headers=extra
        )
        response.force_close()  # the body, if any, is never read
        return response

    async def forward(self, request: web.BaseRequest, call: Call) -> web.StreamResponse:
        limits = self.limits
        body: bytes | AsyncIterator[bytes] | None = None
        replayable = not request.body_exists
        stream = CallerBody(request, call.body_limit, limits.idle_s, limits.min_body_bytes_per_s)
        stream.limit_s = limits.max_body_s
        if self.book is not None:
            stream.on_end = lambda: self.book.body_read(request.protocol)
        held = 0
        if request.body_exists:
            length = request.content_length
            if length is not None and length <= limits.replay_body_bytes:
                body = b"".join([piece async for piece in stream])
                replayable = True
            elif length is not None and self.may_hold(call, length):
                held = length
                self.bodies_held += held
                try:
                    body = b"".join([piece async for piece in stream])
                except BaseException:
                    self.bodies_held -= held
                    raise
                replayable = True
            else:
                body = stream.__aiter__()
        try:
            return await self.relay(request, call, body, replayable, stream)
        finally:
            self.bodies_held -= held

    def may_hold(self, call: Call, length: int) -> bool:
        limits = self.limits
        return (
            call.route == "v1"
            and length <= limits.whole_api_body_bytes
            and self.bodies_held + length <= limits.held_bodies_bytes
        )

    async def relay(
        self,
        request: web.BaseRequest,
        call: Call,
        body: bytes | AsyncIterator[bytes] | None,
        replayable: bool,
        stream: CallerBody,
    ) -> web.StreamResponse:
        """The request to Ray (once more on a stale kept-alive connection, when its body can
        be sent again), then Ray's answer to the caller."""
        upstream = call.upstream
        for attempt in (1, 2):
            try:
                # Sending the body and Ray's answer's head, bounded as a whole.
                async with within(self.answer_s(call.caller)):
                    answer = await self.session(call.caller).request(
                        request.method,
                        upstream.url(call.target),
                        headers=call.headers,
                        data=body,
                        allow_redirects=False,
                        skip_auto_headers=SKIP_AUTO_HEADERS,
                    )
                break
            except Refused:
                raise
            except aiohttp.ConnectionTimeoutError:
                stream.raise_refusal()
                raise Refused(503, f"{upstream.name} is busy: try again shortly") from None
            except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
                stream.raise_refusal()
                seconds = self.answer_s(call.caller)
                raise Refused(504, f"{upstream.name} did not answer in {seconds:.0f} s") from None
            except aiohttp.ClientConnectorError:
                stream.raise_refusal()
                raise Refused(
                    502,
                    f"{upstream.name} does not answer on the head yet "
                    f"({upstream.host}:{upstream.port})",
                ) from None
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                # A kept-alive connection Ray had closed: once more, when the body can be sent
                # again.
                stream.raise_refusal()
                if attempt == 2 or not replayable:
                    self.log(f"gateway: {upstream.name} failed a request: {printable(exc)}")
                    raise Refused(502, f"{upstream.name} failed: {printable(exc)}") from None
            except aiohttp.ClientError as exc:
                stream.raise_refusal()
                self.log(f"gateway: {upstream.name} failed a request: {printable(exc)}")
                raise Refused(502, f"{upstream.name} failed: {printable(exc)}") from None
        async with answer:
            return await self.relay_answer(request, call, answer)

    async def relay_answer(
        self, request: web.BaseRequest, call: Call, answer: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        """Ray's answer to the caller as it comes. Every wait is bounded: Ray's next bytes by
        the pool's read limit, the caller's reading by ``idle_s`` (a caller that stops
        reading is cut, and with it the upstream connection it held)."""
        upstream = call.upstream
        if answer.status == 101:  # only websocket upgrades, and those go elsewhere
            raise Refused(502, f"{upstream.name} switched protocols unasked")
        response = web.StreamResponse(status=answer.status, reason=answer.reason)
        for name, value in answer.headers.items():
            if name.lower() not in HOP_BY_HOP:
                response.headers.add(name, value)
        if answer.content_length is not None and "Content-Encoding" not in answer.headers:
            response.content_length = answer.content_length
        idle_s = self.limits.idle_s
        streamed = answer.headers.get("Content-Type", "").startswith("text/event-stream")
        first = True
        try:
            async with within(idle_s):
                await response.prepare(request)
            async for piece in answer.content.iter_any():
                async with within(idle_s):
                    await response.write(piece)
                if first and self.figures is not None:
                    first = False
                    self.figures.first_byte_after(
                        call.route, streamed, time.monotonic() - call.arrived
                    )
            async with within(idle_s):
                await response.write_eof()
        except asyncio.TimeoutError:
            # Either side stalled (Ray's read limit, or a caller that stopped reading).
            if request.transport is not None:
                request.transport.abort()
            answer.close()
        except aiohttp.ClientError as exc:
            # The answer is cut: end the caller's connection so it cannot look whole.
            self.log(f"gateway: {upstream.name} broke off an answer: {printable(exc)}")
            if request.transport is not None:
                request.transport.close()
        return response

    async def relay_websocket(
        self,
        request: web.BaseRequest,
        upstream: Upstream,
        target: Target,
        headers: CIMultiDict,
        caller: str,
    ) -> web.StreamResponse:
        """A websocket spliced by aiohttp on both sides; the caller's handshake is checked
        before Ray's side is opened, and Ray's side is closed however the relay ends."""
        if not web.WebSocketResponse().can_prepare(request).ok:
            raise Refused(400, "not a valid websocket handshake")
        protocols = [
            p.strip()
            for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")
            if p.strip()
        ]
        try:
            async with within(self.answer_s(caller)):
                outward = await self.session(caller).ws_connect(
                    upstream.url(target), headers=headers, protocols=protocols
                )
        except aiohttp.WSServerHandshakeError as exc:
            raise Refused(502, f"{upstream.name} refused the upgrade ({exc.status})") from None
        except aiohttp.ConnectionTimeoutError:
            raise Refused(503, f"{upstream.name} is busy: try again shortly") from None
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise Refused(502, f"{upstream.name} does not answer: {printable(exc)}") from None
        if self.book is not None:
            self.book.upgraded(request.protocol)
        try:
            inward = web.WebSocketResponse(
                protocols=[outward.protocol] if outward.protocol else (),
                heartbeat=self.limits.idle_s / 2,  # a caller that answers no ping is gone
                # One message is held at a time each way: a caller without a credential
                # gets less room (the dashboard's websockets carry log lines).
                max_msg_size=PUBLIC_WEBSOCKET_BYTES if caller == "public" else WEBSOCKET_BYTES,
            )
            await inward.prepare(request)

            idle_s = self.limits.idle_s

            async def pump(source, sink) -> None:
                async for message in source:
                    async with within(idle_s):  # a side that stops reading is cut
                        if message.type == aiohttp.WSMsgType.TEXT:
                            await sink.send_str(message.data)
                        elif message.type == aiohttp.WSMsgType.BINARY:
                            await sink.send_bytes(message.data)
                        else:
                            break
                await sink.close()

            # A caller without a credential holds one of its kind's few connections to Ray:
            # for public_answer_s at most (the dashboard's websockets ask for Ray's token).
            lifetime = self.limits.public_answer_s if caller == "public" else None
            with contextlib.suppress(aiohttp.ClientError, ConnectionError, asyncio.TimeoutError):
                async with within(lifetime):
                    await asyncio.gather(pump(inward, outward), pump(outward, inward))
            return inward
        finally:
            await outward.close()

    def answer_s(self, caller: str) -> float:
        return self.limits.public_answer_s if caller == "public" else self.limits.answer_s

    def session(self, caller: str) -> aiohttp.ClientSession:
        """Kept-alive connections to Ray, one pool per kind of caller (``POOLS``): each
        request goes on whichever of its pool's is free, framed by aiohttp, so no caller's
        bytes frame another's, and callers without a credential can fill only their own."""
        session = self._sessions.get(caller)
        if session is None or session.closed:
            sizes = dict(self.limits.pool_sizes)
            size = sizes.get(caller, sizes["public"])
            read_s = self.answer_s(caller)
            session = self._sessions[caller] = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=size, keepalive_timeout=30),
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=self.limits.pool_wait_s, sock_connect=5, sock_read=read_s
                ),
                auto_decompress=False,  # bytes pass as Ray sent them
                cookie_jar=aiohttp.DummyCookieJar(),  # no caller's cookie outlives its request
            )
        return session

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()


@dataclass(frozen=True)
class Call:
    """One request on its way to Ray."""

    upstream: Upstream
    target: Target
    headers: CIMultiDict
    caller: str  # "owner", "api" or "public": whose pool it takes
    body_limit: int
    route: str  # for the figures: "v1" or "dashboard"
    arrived: float


class CallerBody:
    """The caller's body as it comes: each read bounded by ``idle_s``, the whole by
    ``limit``, and after the first ``idle_s`` an average of at least ``min_rate`` bytes a
    second (a body trickled a byte at a time would hold a connection to Ray for ever). A
    breach ends the body and is kept in ``refusal`` (aiohttp's client wraps what a body's
    iterator raises)."""

    def __init__(self, request: web.BaseRequest, limit: int, idle_s: float, min_rate: int):
        self.request = request
        self.limit = limit
        self.idle_s = idle_s
        self.min_rate = max(1, min_rate)
        self.limit_s = float("inf")  # the whole body, however it comes
        self.on_end: Callable[[], None] = lambda: None  # the body was read to its end
        self.refusal: Refused | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        seen = 0
        started = time.monotonic()
        while True:
            # The next bytes are due within idle_s, and by when the average rate says.
            due = min(started + self.idle_s + seen / self.min_rate, started + self.limit_s)
            wait_s = min(self.idle_s, due - time.monotonic())
            try:
                if wait_s <= 0:
                    raise asyncio.TimeoutError
                piece = await asyncio.wait_for(self.request.content.readany(), wait_s)
            except asyncio.TimeoutError:
                self.refusal = Refused(
                    408,
                    f"the body stalled (no bytes for {self.idle_s:.0f} s, under "
                    f"{self.min_rate} bytes/s, or over {self.limit_s:.0f} s in all)",
                )
                raise self.refusal from None
            if not piece:
                self.on_end()
                return
            seen += len(piece)
            if seen > self.limit:
                self.refusal = Refused(413, f"the body is over {self.limit} bytes")
                raise self.refusal
            yield piece

    def raise_refusal(self) -> None:
        if self.refusal is not None:
            raise self.refusal


def _asks_websocket(request: web.BaseRequest) -> bool:
    connection = {t.strip().lower() for t in request.headers.get("Connection", "").split(",")}
    return "upgrade" in connection and request.headers.get("Upgrade", "").lower() == "websocket"


class RunningGateway:
    """The gateway on its own event loop in a daemon thread (the launcher's other work is
    threads and subprocesses), its connections kept in a ``ConnectionBook``."""

    def __init__(self, gateway: Gateway, host: str, port: int) -> None:
        self.gateway = gateway
        limits = gateway.limits
        self.max_connections = limits.max_connections or connection_cap()
        one_line = OneLineLog(gateway.log)
        # Every line the gateway writes goes through the same limit as aiohttp's: a caller
        # that makes it log (a failed relay) must not fill the head's log either.
        gateway.log = one_line.line
        logger = logging.getLogger(f"ray_cml_provider.gateway.{id(self)}")
        logger.propagate = False
        logger.addHandler(one_line)
        self.book = ConnectionBook(
            ConnectionLimits(
                max_connections=self.max_connections,
                idle_s=limits.idle_s,
                crowded_idle_s=limits.crowded_idle_s,
                max_head_bytes=limits.max_head_bytes,
                head_budget_bytes=limits.head_budget_bytes,
            ),
            one_line.line,
        )
        gateway.book = self.book
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(one_line.loop_errors)
        server = GuardedServer(
            self.handle,
            book=self.book,
            loop=self.loop,
            keepalive_timeout=limits.idle_s,  # aiohttp's own timer stays, as a backstop
            max_line_size=limits.max_line_bytes,
            max_field_size=limits.max_line_bytes,
            max_headers=limits.max_headers,
            lingering_time=0,  # a refused body is not read
            auto_decompress=False,
            logger=logger,
            access_log=None,
        )
        self.runner = web.ServerRunner(
            server, handle_signals=False, access_log=None, shutdown_timeout=1.0
        )
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, host, port, backlog=512)
        self.loop.run_until_complete(site.start())
        self.port = self.runner.addresses[0][1]
        self.sweeper = self.loop.create_task(self.sweep())
        self.thread = threading.Thread(target=self.loop.run_forever, name="gateway", daemon=True)
        self.thread.start()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """The gateway's answer, with the book told when the request starts and ends."""
        self.book.serving(request.protocol)
        try:
            return await self.gateway.handle(request)
        finally:
            self.book.served(request.protocol)

    async def sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY_S)
            self.book.sweep()

    @property
    def full(self) -> int:
        """Connections closed because the door was full (to make room, or refused)."""
        return self.book.counts["evicted"] + self.book.counts["refused_full"]

    def open_connections(self) -> int:
        async def count() -> int:
            return len(self.runner.server.connections)

        return asyncio.run_coroutine_threadsafe(count(), self.loop).result(5)

    def close(self) -> None:
        """Close the port and every open connection, then end the loop's thread."""

        async def close() -> None:
            self.sweeper.cancel()
            await self.runner.cleanup()
            await self.gateway.close()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
