"""The head's gateway attacked as a workspace engine would, dialling its port directly with no
credential or only a model caller's key: each class of hole found in the door's second
review (issue 36) is a test here, against the real gateway and real upstream servers.
The same attacks against a real head on the emulator are in ``test_door_under_attack``."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import socket
import threading
import time

import pytest
from aiohttp import web

from ray_cml_provider.node.gateway import Gateway, Keys, Limits, RunningGateway, Upstream
from tests.test_node_gateway import (
    ENDPOINT_KEY,
    RAY_TOKEN,
    Recorder,
    bearer,
    call,
    key_files,
    raw,
)

STREAM_MOST_BYTES = 256 * 1024 * 1024  # an answer that outlasts every socket buffer


class AiohttpUpstream:
    """An upstream on aiohttp in a thread of its own: an answer longer than any socket
    buffer (a dashboard's static file is 6.6 MB; a log stream has no end), a websocket that
    counts its handshakes, and an echo of the path."""

    def __init__(self) -> None:
        self.websockets = 0
        self.requests = 0
        self.loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_get("/big", self.big)
        app.router.add_get("/ws", self.ws)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        self.runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = self.runner.addresses[0][1]
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    async def big(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        answer = web.StreamResponse()
        await answer.prepare(request)
        chunk = b"x" * 65536
        for _ in range(STREAM_MOST_BYTES // len(chunk)):
            await answer.write(chunk)
        return answer

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        self.websockets += 1
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            await ws.send_str(message.data)
        return ws

    async def echo(self, request: web.Request) -> web.Response:
        self.requests += 1
        await request.read()
        return web.json_response({"path": request.raw_path})

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def upstream():
    server = AiohttpUpstream()
    yield server
    server.close()


@contextlib.contextmanager
def door(upstream: AiohttpUpstream, keys: Keys, limits: Limits | None = None, log=None):
    """The gateway with ``upstream`` as both Serve and the dashboard."""
    gateway = Gateway(
        Upstream("127.0.0.1", upstream.port, "Ray Serve's HTTP proxy"),
        Upstream("127.0.0.1", upstream.port, "the Ray dashboard"),
        keys,
        log=log if log is not None else (lambda _: None),
        limits=limits,
    )
    running = RunningGateway(gateway, "127.0.0.1", 0)
    try:
        yield running
    finally:
        running.close()


def owner_answers_in(port: int, seconds: float) -> None:
    """The owner (Ray's token, the dashboard's side) and a model caller (the endpoint key,
    /v1) each get their answer in under ``seconds``."""
    for path, key in (("/api/jobs/", RAY_TOKEN), ("/v1/models", ENDPOINT_KEY)):
        started = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=seconds + 5)
        status, _, _ = call(conn, "GET", path, None, bearer(key))
        took = time.monotonic() - started
        conn.close()
        assert status == 200 and took < seconds, (path, status, took)


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the gateway closes ``sock`` within ``seconds`` (whatever it sends first)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


# ------------------------------------------------------------------ 1. the pivot


def test_only_a_path_is_ever_relayed_never_a_host_the_caller_names(upstream, tmp_path):
    """CONNECT, absolute URLs, '*' and targets that would paste a host into Ray's URL are
    refused, behind CML's login (the default) as with it bypassed: a loopback service of
    the head answers none of them."""
    secret = Recorder("secret")  # a service on the head's loopback nobody should reach
    secret_target = f"127.0.0.1:{secret.port}"
    try:
        for locked in (False, True):
            with door(upstream, key_files(tmp_path, locked)) as running:
                token = b"Authorization: Bearer " + RAY_TOKEN.encode() + b"\r\n"
                for target in (
                    secret_target.encode(),
                    b"http://" + secret_target.encode() + b"/",
                    b"@" + secret_target.encode() + b"/",
                    b"*",
                    b"/#@" + secret_target.encode(),
                ):
                    for method in (b"CONNECT", b"GET", b"OPTIONS"):
                        attack = method + b" " + target + b" HTTP/1.1\r\nHost: x\r\n" + token
                        answer = raw(running.port, attack + b"\r\n", wait_s=3)
                        assert answer == b"" or answer.split(b" ")[1] in (b"400", b"401"), (
                            method,
                            target,
                            answer[:200],
                        )
        assert secret.seen == []
        assert upstream.requests == 0
    finally:
        secret.shutdown()
        secret.server_close()


# ------------------------------------------------------------------ 2. the pools


def test_callers_without_a_credential_cannot_take_the_owners_connections_to_ray(upstream, tmp_path):
    """Behind CML's login the dashboard's pages need no credential at the door. 40 such
    callers ask for a big file and never read it: they fill their own pool only; the owner
    and a keyed /v1 caller are answered at once, and a caller that stops reading is cut."""
    limits = Limits(idle_s=2.0, pool_wait_s=1.0)
    with door(upstream, key_files(tmp_path, locked=False), limits) as running:
        readers = []
        for _ in range(40):
            sock = socket.create_connection(("127.0.0.1", running.port), timeout=10)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            readers.append(sock)
        owner_answers_in(running.port, 2.0)
        # The public pool (32) is full: the rest wait at most pool_wait_s for a 503.
        started = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
        conn.request("GET", "/big")
        status = conn.getresponse().status
        assert status in (200, 503), status
        assert time.monotonic() - started < 2 * limits.pool_wait_s + 10
        # Callers that stopped reading are cut after idle_s, freeing their connections to Ray
        # (from the gateway's side: a reset sent into a full receive window never arrives).
        deadline = time.monotonic() + limits.idle_s + 5
        while running.open_connections() > 0:
            assert time.monotonic() < deadline, "callers that stopped reading were kept"
            time.sleep(0.1)
        for sock in readers:
            sock.close()
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
        status, _, answer = call(conn, "GET", "/api/version")
        assert status == 200


def test_a_body_trickled_a_byte_at_a_time_is_cut(upstream, tmp_path):
    """A keyed caller sends its body a byte every half second (never idle_s silent): under
    ``min_body_bytes_per_s`` after idle_s it is cut, and its connection to Ray let go."""
    limits = Limits(idle_s=1.0, min_body_bytes_per_s=100, replay_body_bytes=10)
    with door(upstream, key_files(tmp_path, locked=True), limits) as running:
        sock = socket.create_connection(("127.0.0.1", running.port), timeout=10)
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + ENDPOINT_KEY.encode()
            + b"\r\nContent-Length: 100000\r\n\r\n"
        )
        started = time.monotonic()
        cut = False
        while time.monotonic() - started < 10:
            try:
                sock.sendall(b"a")
            except OSError:
                cut = True
                break
            sock.settimeout(0.5)
            try:
                if sock.recv(65536) == b"":
                    cut = True
                    break
            except TimeoutError:
                pass
            except OSError:
                cut = True
                break
        assert cut, "the trickled body was never cut"
        assert time.monotonic() - started < 5  # idle_s, and the floor rate, and a bit
        sock.close()
        owner_answers_in(running.port, 2.0)


# ------------------------------------------------------------------ 3. memory


def test_unfinished_request_heads_are_bounded_per_connection_and_in_total(upstream, tmp_path):
    limits = Limits(max_head_bytes=64 * 1024, head_budget_bytes=256 * 1024)
    with door(upstream, key_files(tmp_path, locked=True), limits) as running:
        # One head growing past max_head_bytes (fields of 16 KB, within aiohttp's own caps).
        sock = socket.create_connection(("127.0.0.1", running.port), timeout=10)
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
        with contextlib.suppress(OSError):
            for i in range(8):
                sock.sendall(b"X-%d: %s\r\n" % (i, b"a" * 16000))
        assert closed_within(sock, 5), "a 128 kB head was held"
        sock.close()
        # Many connections, each within the per-connection bound: past the budget they go.
        held = []
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", running.port), timeout=10)
            with contextlib.suppress(OSError):
                sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
                for i in range(3):
                    sock.sendall(b"X-%d: %s\r\n" % (i, b"a" * 16000))
            held.append(sock)
        book = running.book
        over_budget = 20 - limits.head_budget_bytes // (40 * 1024)  # each holds ~40 kB
        deadline = time.monotonic() + 10
        while book.counts["head_too_big"] < 1 + over_budget:
            assert time.monotonic() < deadline, book.counts
            time.sleep(0.05)
        assert book.head_bytes_held <= limits.head_budget_bytes
        owner_answers_in(running.port, 2.0)  # a small head still gets in
        for sock in held:
            sock.close()


# ------------------------------------------------------------------ 4. the cap


def test_past_the_cap_silent_connections_make_room_for_the_owner(upstream, tmp_path):
    limits = Limits(max_connections=8, idle_s=30.0, crowded_idle_s=1.0)
    with door(upstream, key_files(tmp_path, locked=True), limits) as running:
        silent = [socket.create_connection(("127.0.0.1", running.port)) for _ in range(8)]
        owner_answers_in(running.port, 2.0)  # evicts the longest-silent one
        assert running.full >= 1
        # A quarter full: connections that never sent a head go after crowded_idle_s, while
        # a kept-alive one that did stays.
        kept = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
        assert call(kept, "GET", "/v1/models", None, bearer(ENDPOINT_KEY))[0] == 200
        assert all(closed_within(sock, 4) for sock in silent)
        assert call(kept, "GET", "/v1/models", None, bearer(ENDPOINT_KEY))[0] == 200
        for sock in silent:
            sock.close()


def test_the_newcomer_is_refused_only_when_every_connection_is_busy(upstream, tmp_path):
    limits = Limits(max_connections=4, idle_s=30.0)  # the bodies stay busy for the test
    with door(upstream, key_files(tmp_path, locked=True), limits) as running:
        busy = []
        for _ in range(4):  # keyed bodies still coming: busy, not idle
            sock = socket.create_connection(("127.0.0.1", running.port), timeout=10)
            sock.sendall(
                b"POST /v1/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + ENDPOINT_KEY.encode()
                + b"\r\nContent-Length: 100000\r\n\r\nabc"
            )
            busy.append(sock)
        deadline = time.monotonic() + 5
        while running.book.anonymous or running.book.known:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        extra = socket.create_connection(("127.0.0.1", running.port), timeout=5)
        assert closed_within(extra, 5)
        assert running.book.counts["refused_full"] >= 1
        for sock in busy:
            sock.close()


# ------------------------------------------------------------------ 5. websockets


def test_a_bad_websocket_handshake_never_opens_one_to_ray(upstream, tmp_path):
    with door(upstream, key_files(tmp_path, locked=True)) as running:
        token = b"Authorization: Bearer " + RAY_TOKEN.encode() + b"\r\n"
        for _ in range(30):
            answer = raw(
                running.port,
                b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                + token
                + b"Sec-WebSocket-Version: 13\r\n\r\n",  # no Sec-WebSocket-Key
                wait_s=3,
            )
            assert answer.split(b" ")[1] == b"400", answer[:200]
        assert upstream.websockets == 0


# ------------------------------------------------------------------ 6. the log


def test_a_flood_past_the_cap_writes_a_few_lines_and_no_traceback(upstream, tmp_path, caplog):
    lines: list[str] = []
    limits = Limits(max_connections=4)
    keys = key_files(tmp_path, locked=True)
    with (
        caplog.at_level(logging.DEBUG, logger="asyncio"),
        door(upstream, keys, limits, log=lines.append) as running,
    ):
        held = [socket.create_connection(("127.0.0.1", running.port)) for _ in range(4)]
        for _ in range(300):
            socket.create_connection(("127.0.0.1", running.port)).close()
        owner_answers_in(running.port, 2.0)
        for sock in held:
            sock.close()
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert 0 < len(lines) <= 6, lines
    assert not any("Traceback" in line for line in lines)


# ------------------------------------------------------------------ 9. /metrics


def test_concurrent_scrapes_share_one_render_and_one_fetch_of_the_exports(upstream, tmp_path):
    from ray_cml_provider.node.cluster_metrics import ClusterMetrics, NodeMap

    export = Recorder("export")  # answers each GET with JSON: not Prometheus' text, no matter
    discovery = tmp_path / "discovery.json"
    target = f"127.0.0.1:{export.port}"
    discovery.write_text(json.dumps([{"labels": {}, "targets": [target]}]))
    metrics = ClusterMetrics(discovery, NodeMap(tmp_path / "nodes"), timeout_s=2)
    keys = key_files(tmp_path, locked=True)
    gateway = Gateway(
        Upstream("127.0.0.1", upstream.port, "Ray Serve's HTTP proxy"),
        Upstream("127.0.0.1", upstream.port, "the Ray dashboard"),
        keys,
        log=lambda _: None,
        metrics=metrics,
    )
    running = RunningGateway(gateway, "127.0.0.1", 0)
    try:
        statuses: list[int] = []

        def scrape() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=20)
            statuses.append(call_metrics(conn))

        scrapers = [threading.Thread(target=scrape) for _ in range(30)]
        for thread in scrapers:
            thread.start()
        for thread in scrapers:
            thread.join(30)
        assert statuses.count(200) >= 16 and set(statuses) <= {200, 503}, statuses
        # 30 scrapers at once: the export was fetched a few times at most, not 30.
        assert 1 <= len(export.seen) <= 3, len(export.seen)
    finally:
        running.close()
        export.shutdown()
        export.server_close()


def call_metrics(conn: http.client.HTTPConnection) -> int:
    conn.request("GET", "/metrics", headers=bearer(RAY_TOKEN))
    answer = conn.getresponse()
    answer.read()
    return answer.status
