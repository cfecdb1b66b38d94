"""The head's front door: one URL for the OpenAI API and the Ray dashboard.

CML publishes one port of an application, ``CDSW_APP_PORT``, at ``https://<subdomain>.<workspace
domain>``. On the head the node launcher runs this gateway there, and it routes each request:

- ``/v1/...`` (the OpenAI API of a Ray Serve LLM app) to Ray Serve's HTTP proxy on the head;
- everything else to the Ray dashboard, which listens on a port of its own.

Streamed answers (``"stream": true``, server-sent events) pass chunk by chunk, and a WebSocket
upgrade is spliced through.

Who may call. With CML's login in front (the default) CML lets in only people who may see the
project, so the gateway checks nothing itself (the dashboard still asks for Ray's token). With
``bypass_authentication`` on the head's ``node_config`` CML lets anyone in, and this gateway
is the lock. Every request needs a key of the cluster, as ``Authorization: Bearer <key>``:

- ``/v1/...`` opens with the cluster's *endpoint key* (``ray-cml endpoint-key``), the one to
  hand to whoever calls the model, or with Ray's token;
- anything else opens with Ray's token only (also accepted as ``X-Ray-Authorization`` or
  Ray's dashboard cookie): the dashboard's job API runs code, and the endpoint key must not.

Keys are compared in constant time; a refused request gets 401 and never reaches Ray. An
endpoint key is removed from the request it opened, so no part of Ray ever sees it.

Standard library only (it runs before anything is installed): asyncio, in a thread of the
node launcher. Connections to Ray are kept open and reused, so a request costs one hop on
the loopback (see ``bench/gateway_bench.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

MAX_HEAD_BYTES = 64 * 1024
BUFFER_BODY_UP_TO = 1024 * 1024  # see read_whole
CLIENT_IDLE_S = 300.0
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
}
RAY_TOKEN_COOKIE = "ray-authentication-token"


@dataclass
class Keys:
    """Where the keys are (files in the project); read when first needed, then kept.

    ``endpoint_key_file`` set means CML's login is bypassed: every request needs a key.
    """

    endpoint_key_file: Path | None = None
    ray_token_file: Path | None = None
    _cache: dict[Path, bytes] = field(default_factory=dict)

    @property
    def locked(self) -> bool:
        return self.endpoint_key_file is not None

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


@dataclass
class Upstream:
    host: str
    port: int
    name: str  # for error messages: "Ray Serve's HTTP proxy", "the Ray dashboard"
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = field(default_factory=list)

    async def connect(
        self, reuse: bool = True
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        while reuse and self.idle:
            reader, writer = self.idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer, True
            writer.close()
        reader, writer = await asyncio.open_connection(self.host, self.port, limit=MAX_HEAD_BYTES)
        return reader, writer, False

    def give_back(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self.idle) < 64:
            self.idle.append((reader, writer))
        else:
            writer.close()


class BadRequest(Exception):
    pass


@dataclass
class Message:
    """An HTTP/1.1 request or response head."""

    start: str
    headers: list[tuple[str, str]]

    def get(self, name: str) -> str:
        name = name.lower()
        return ", ".join(v for k, v in self.headers if k.lower() == name)

    def tokens(self, name: str) -> set[str]:
        return {t.strip().lower() for t in self.get(name).split(",") if t.strip()}

    def encode(self, extra: list[tuple[str, str]] = ()) -> bytes:
        lines = [self.start, *(f"{k}: {v}" for k, v in [*self.headers, *extra])]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def read_head(reader: asyncio.StreamReader) -> Message | None:
    """The next message head, or None at a clean end of the connection."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        raise BadRequest("the connection ended inside a message head") from None
    except asyncio.LimitOverrunError:
        raise BadRequest(f"a message head is over {MAX_HEAD_BYTES} bytes") from None
    lines = raw.decode("latin-1").split("\r\n")
    while lines and not lines[0]:  # stray CRLFs between requests are allowed
        lines.pop(0)
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest(f"a malformed header line: {line[:80]!r}")
        headers.append((name, value.strip()))
    return Message(lines[0], headers)


def body_framing(message: Message) -> tuple[str, int]:
    """("chunked", 0), ("length", n), or ("none", 0) for a request without a body."""
    if "chunked" in message.tokens("transfer-encoding"):
        return "chunked", 0
    length = message.get("content-length")
    if length:
        try:
            value = int(length)
        except ValueError:
            raise BadRequest(f"Content-Length {length!r} is not a number") from None
        if value < 0 or "," in length:
            raise BadRequest(f"Content-Length {length!r} is not valid")
        return "length", value
    return "none", 0


def read_whole(framing: tuple[str, int]) -> bool:
    """Whether a request body is small enough to read into memory first: no body, or a
    Content-Length up to ``BUFFER_BODY_UP_TO``. Such a request can be sent again on a fresh
    connection, and a refused one is read to its end, so the connection stays usable."""
    kind, length = framing
    return kind == "none" or (kind == "length" and length <= BUFFER_BODY_UP_TO)


async def copy_body(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter | None, framing: tuple[str, int]
) -> None:
    """Copy one body (or discard it, ``writer`` None), flushing each piece as it comes: a
    streamed answer reaches the caller token by token."""
    kind, length = framing
    if kind == "length":
        while length:
            data = await reader.read(min(length, 65536))
            if not data:
                raise ConnectionError("the connection ended inside a body")
            length -= len(data)
            if writer:
                writer.write(data)
                await writer.drain()
    elif kind == "chunked":
        while True:
            line = await reader.readuntil(b"\r\n")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise BadRequest("a malformed chunk size") from None
            if size == 0:
                trailer = line
                while True:  # trailers, then the empty line
                    more = await reader.readuntil(b"\r\n")
                    trailer += more
                    if more == b"\r\n":
                        break
                if writer:
                    writer.write(trailer)
                    await writer.drain()
                return
            data = line + await reader.readexactly(size + 2)
            if writer:
                writer.write(data)
                await writer.drain()
    elif kind == "until-close":
        while data := await reader.read(65536):
            if writer:
                writer.write(data)
                await writer.drain()


async def splice(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
) -> None:
    async def one_way(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()

    await asyncio.gather(one_way(a[0], b[1]), one_way(b[0], a[1]))


def _bearer(value: str) -> bytes | None:
    scheme, _, credential = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        return None
    return credential.strip().encode("latin-1", "replace")


def _cookie(message: Message, name: str) -> bytes | None:
    for part in message.get("cookie").replace(",", ";").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name and value:
            return value.encode("latin-1", "replace")
    return None


def _same(offered: bytes | None, expected: bytes | None) -> bool:
    return bool(offered and expected and hmac.compare_digest(offered, expected))


class Gateway:
    """Route requests on the application's port; see the module's docstring."""

    def __init__(
        self,
        serve: Upstream,
        dashboard: Upstream,
        keys: Keys,
        log: Callable[[str], None] = print,
    ) -> None:
        self.serve = serve
        self.dashboard = dashboard
        self.keys = keys
        self.log = log
        self.refused = 0  # requests answered 401 (tests and the status page read it)

    # ---------------------------------------------------------------- decisions

    @staticmethod
    def is_api(target: str) -> bool:
        path = target.split("?", 1)[0]
        return path == "/v1" or path.startswith("/v1/")

    def admit(self, request: Message, api: bool) -> tuple[bool, bool]:
        """(allowed, strip the Authorization header) for one request."""
        if not self.keys.locked:
            return True, False
        offered = _bearer(request.get("authorization"))
        token = self.keys.ray_token()
        if _same(offered, token):
            return True, False  # Ray checks its own token again
        if api and _same(offered, self.keys.endpoint_key()):
            return True, True
        if not api:
            other = _bearer(request.get("x-ray-authorization")) or _cookie(
                request, RAY_TOKEN_COOKIE
            )
            if _same(other, token):
                return True, False
        return False, False

    # ---------------------------------------------------------------- serving

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = (writer.get_extra_info("peername") or ("?",))[0]
        try:
            while await self.one_request(reader, writer, peer):
                pass
        except BadRequest as exc:
            await self.answer(writer, 400, f"bad request: {exc}", close=True)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError, OSError):
            pass
        finally:
            writer.close()

    async def answer(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        message: str,
        close: bool = False,
        extra: list[tuple[str, str]] = (),
    ) -> None:
        reasons = {400: "Bad Request", 401: "Unauthorized", 502: "Bad Gateway"}
        body = json.dumps({"error": message}).encode()
        head = Message(
            f"HTTP/1.1 {status} {reasons.get(status, 'Error')}",
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                *extra,
                *([("Connection", "close")] if close else []),
            ],
        )
        with contextlib.suppress(OSError):
            writer.write(head.encode() + body)
            await writer.drain()

    async def one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> bool:
        """Serve one request; False when the connection is to be closed."""
        request = await asyncio.wait_for(read_head(reader), CLIENT_IDLE_S)
        if request is None:
            return False
        try:
            method, target, version = request.start.split(" ")
        except ValueError:
            raise BadRequest(f"a malformed request line: {request.start[:80]!r}") from None
        framing = body_framing(request)
        api = self.is_api(target)
        keep_alive = (
            "close" not in request.tokens("connection")
            if version == "HTTP/1.1"
            else "keep-alive" in request.tokens("connection")
        )
        allowed, strip_key = self.admit(request, api)
        if not allowed:
            self.refused += 1
            stays_open = keep_alive and read_whole(framing)
            if read_whole(framing):  # read what was sent: the caller sees the answer, not a reset
                await copy_body(reader, None, framing)
            what = "the endpoint key or Ray's token" if api else "Ray's token"
            await self.answer(
                writer,
                401,
                f"this URL needs {what}: send 'Authorization: Bearer <key>'",
                close=not stays_open,
                extra=[("WWW-Authenticate", 'Bearer realm="ray-cml"')],
            )
            return stays_open
        if "100-continue" in request.tokens("expect"):
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        upgrade = "upgrade" in request.tokens("connection") and request.get("upgrade")
        drop = HOP_BY_HOP | {"expect"} | ({"authorization"} if strip_key else set())
        drop |= {h.lower() for h in request.get("connection").split(",") if h.strip()}
        headers = [(k, v) for k, v in request.headers if k.lower() not in drop]
        headers.append(("X-Forwarded-For", peer))
        headers.append(("Connection", "Upgrade") if upgrade else ("Connection", "keep-alive"))
        if upgrade:
            headers.append(("Upgrade", request.get("upgrade")))
        outgoing = Message(f"{method} {target} HTTP/1.1", headers).encode()
        body: bytes | None = None  # None: streamed to the upstream as it comes
        if read_whole(framing):
            body = await reader.readexactly(framing[1])
        upstream = self.serve if api else self.dashboard
        for attempt in (1, 2):
            try:
                up_reader, up_writer, reused = await upstream.connect(reuse=attempt == 1)
            except OSError:
                stays_open = keep_alive and body is not None  # else the body is still unread
                await self.answer(
                    writer,
                    502,
                    f"{upstream.name} does not answer on the head yet "
                    f"({upstream.host}:{upstream.port})",
                    close=not stays_open,
                )
                return stays_open
            try:
                up_writer.write(outgoing + (body or b""))
                if body is None:
                    await copy_body(reader, up_writer, framing)
                await up_writer.drain()
                response = await read_head(up_reader)
                while response and response.start.split(" ")[1:2] in (["100"], ["102"], ["103"]):
                    response = await read_head(up_reader)  # interim answers: ours went already
                if response is None:
                    raise ConnectionResetError("closed before answering")
                break
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                up_writer.close()
                if not (reused and body is not None and attempt == 1):
                    self.log(f"gateway: {upstream.name} failed a {method}: {exc!r}")
                    await self.answer(writer, 502, f"{upstream.name} failed: {exc}", close=True)
                    return False
        status = response.start.split(" ")[1] if " " in response.start else ""
        if status == "101":
            writer.write(response.encode())
            await writer.drain()
            await splice((reader, writer), (up_reader, up_writer))
            up_writer.close()
            return False
        if method == "HEAD" or status in ("204", "304"):
            out_framing: tuple[str, int] = ("none", 0)
        elif "chunked" in response.tokens("transfer-encoding"):
            out_framing = ("chunked", 0)
        elif response.get("content-length"):
            out_framing = ("length", int(response.get("content-length")))
        else:
            out_framing = ("until-close", 0)
        upstream_keeps = "close" not in response.tokens("connection") and out_framing[0] != (
            "until-close"
        )
        client_keeps = keep_alive and out_framing[0] != "until-close"
        drop = (HOP_BY_HOP - {"upgrade"}) | {
            h.lower() for h in response.get("connection").split(",") if h.strip()
        }
        response.headers = [(k, v) for k, v in response.headers if k.lower() not in drop]
        response.headers.append(("Connection", "keep-alive" if client_keeps else "close"))
        writer.write(response.encode())
        try:
            await copy_body(up_reader, writer, out_framing)
        except (ConnectionError, asyncio.IncompleteReadError):
            up_writer.close()
            return False
        if upstream_keeps:
            upstream.give_back(up_reader, up_writer)
        else:
            up_writer.close()
        return client_keeps


class RunningGateway:
    """The gateway on its own event loop in a daemon thread."""

    def __init__(self, gateway: Gateway, host: str, port: int) -> None:
        self.gateway = gateway
        self.loop = asyncio.new_event_loop()
        self.server: asyncio.AbstractServer | None = None
        self.server = self.loop.run_until_complete(
            asyncio.start_server(gateway.handle, host, port, limit=MAX_HEAD_BYTES, backlog=256)
        )
        self.port = self.server.sockets[0].getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, name="gateway", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Close the port and every open connection, then end the loop's thread."""

        async def close() -> None:
            if self.server:
                self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for upstream in (self.gateway.serve, self.gateway.dashboard):
                for _, writer in upstream.idle:
                    writer.close()
                upstream.idle.clear()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
