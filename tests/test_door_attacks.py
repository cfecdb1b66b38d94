"""The head's gateway attacked as a workspace engine would, dialling its port directly with no
credential or only a model caller's key: each class of hole found in the door's second
review (issue 36) is a test here, against the real gateway and real upstream servers.
The same attacks against a real head on the emulator are in ``test_door_under_attack``."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import json
import logging
import os
import socket
import threading
import time

import pytest
from aiohttp import web

from ray_cml_provider.node.gateway import Gateway, Keys, Limits, RunningGateway, Upstream
from tests.test_node_gateway import (
    ENDPOINT_KEY,
    METRICS_KEY,
    RAY_TOKEN,
    Recorder,
    bearer,
    call,
    gateway_on,
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
        # In-flight handlers (a slow answer) get 1 s at the end, not aiohttp's 60.
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
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
        if "slow" in request.path:  # a model thinking: ?s=seconds
            await asyncio.sleep(float(request.query.get("s", "30")))
        return web.json_response({"path": request.raw_path})

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def upstream():
    server = AiohttpUpstream()
    yield server
    server.close()


def door(upstream: AiohttpUpstream, keys: Keys, limits: Limits | None = None, log=None):
    """The gateway with ``upstream`` as both Serve and the dashboard."""
    return gateway_on(upstream, upstream, keys, limits, log=log)


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


def test_serve_sees_a_v1_request_only_once_its_body_has_come(tmp_path):
    """A keyed caller trickling its body holds no connection to Serve, nor a place in its
    queue: the gateway reads /v1 bodies of a known length whole first (up to
    whole_api_body_bytes, and held_bodies_bytes for all of them)."""
    serve, dashboard = Recorder("serve"), Recorder("dashboard")
    try:
        with gateway_on(serve, dashboard, key_files(tmp_path, locked=True)) as running:
            sock = socket.create_connection(("127.0.0.1", running.port), timeout=10)
            body = b"x" * 200_000
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                + bearer_line(ENDPOINT_KEY)
                + b"Content-Length: %d\r\n\r\n" % len(body)
                + body[:100_000]
            )
            wait_until_busy(running, 1)
            assert serve.seen == []  # half the body came: nothing of it went on
            sock.sendall(body[100_000:])
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200")
            [seen] = serve.seen
            assert len(seen["body"]) == len(body)
            deadline = time.monotonic() + 5  # let go once the answer is relayed
            while running.gateway.bodies_held:
                assert time.monotonic() < deadline, running.gateway.bodies_held
                time.sleep(0.05)
            sock.close()
    finally:
        for server in (serve, dashboard):
            server.shutdown()
            server.server_close()


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
    limits = Limits(max_connections=4, idle_s=30.0, crowded_idle_s=1.0)
    with door(upstream, key_files(tmp_path, locked=True), limits) as running:
        silent = [socket.create_connection(("127.0.0.1", running.port)) for _ in range(4)]
        owner_answers_in(running.port, 2.0)  # evicts the longest-silent one
        assert running.full >= 1
        # Over a quarter full (2 of 4, the kept one included): connections that never sent a
        # head go after crowded_idle_s, while a kept-alive one that did stays.
        kept = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
        assert call(kept, "GET", "/v1/models", None, bearer(ENDPOINT_KEY))[0] == 200
        assert all(closed_within(sock, 4) for sock in silent)
        assert call(kept, "GET", "/v1/models", None, bearer(ENDPOINT_KEY))[0] == 200
        for sock in silent:
            sock.close()


@pytest.mark.parametrize("locked", [False, True], ids=["login-no-credential", "locked-key"])
def test_busy_strangers_make_room_for_the_owner_and_never_take_his_connection(
    upstream, tmp_path, locked
):
    """Heads announcing a body that never comes keep their connections busy for idle_s:
    past the cap, one of them makes room for the owner; the owner's kept-alive connection
    is never the one closed for a stranger."""
    cap = 16
    limits = Limits(max_connections=cap, crowded_idle_s=1.0)
    credential = b"X-Endpoint-Key: " + ENDPOINT_KEY.encode() + b"\r\n" if locked else b""
    path = b"/v1/x" if locked else b"/api/x"
    head = b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n" + credential + b"Content-Length: 5\r\n\r\n"
    with door(upstream, key_files(tmp_path, locked=locked), limits) as running:
        kept = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
        assert call(kept, "GET", "/api/jobs/", None, bearer(RAY_TOKEN))[0] == 200
        strangers = []
        for _ in range(cap):
            sock = socket.create_connection(("127.0.0.1", running.port), timeout=10)
            sock.sendall(head)
            strangers.append(sock)
        wait_until_busy(running, cap - 1)
        owner_answers_in(running.port, 2.0)
        assert call(kept, "GET", "/api/jobs/", None, bearer(RAY_TOKEN))[0] == 200
        assert running.book.counts["evicted"] >= 1
        for sock in strangers:
            sock.close()


def test_a_busy_owner_is_never_evicted_the_newcomer_is(upstream, tmp_path):
    limits = Limits(max_connections=4, idle_s=30.0)
    with door(upstream, key_files(tmp_path, locked=True), limits) as running:
        answers: list[int] = []

        def slow_owner() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=20)
            conn.request("GET", "/api/slow?s=3", headers=bearer(RAY_TOKEN))
            answers.append(conn.getresponse().status)

        owners = [threading.Thread(target=slow_owner) for _ in range(4)]
        for thread in owners:
            thread.start()
        wait_until_busy(running, 4)
        extra = socket.create_connection(("127.0.0.1", running.port), timeout=5)
        assert closed_within(extra, 5)
        assert running.book.counts["refused_full"] >= 1
        for thread in owners:
            thread.join(20)
        assert answers == [200] * 4


def wait_until_busy(running: RunningGateway, count: int) -> None:
    """Until ``count`` connections have a request in flight (no sleep standing in for it)."""
    deadline = time.monotonic() + 10
    while sum(1 for c in list(running.book.callers.values()) if c.state != "waiting") < count:
        assert time.monotonic() < deadline, "the requests did not reach the gateway"
        time.sleep(0.05)


def test_blank_lines_are_no_request_head(upstream, tmp_path):
    """llhttp skips blank lines before a request line: a connection that sent only those
    still waits for its head (evicted and swept as such), and what follows is counted."""
    cap = 16
    limits = Limits(max_connections=cap, crowded_idle_s=1.0, max_head_bytes=64 * 1024)
    with door(upstream, key_files(tmp_path, locked=True), limits) as running:
        blanks = [socket.create_connection(("127.0.0.1", running.port)) for _ in range(cap)]
        for sock in blanks:
            sock.sendall(b"\r\n\r\n")
        owner_answers_in(running.port, 2.0)
        sock = socket.create_connection(("127.0.0.1", running.port))
        with contextlib.suppress(OSError):
            sock.sendall(b"\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: x\r\n")
            for i in range(90):
                sock.sendall(b"X-%d: %s\r\n" % (i, b"a" * 16000))
        assert closed_within(sock, 5), "a 1.4 MB head was held (limit 64 kB)"
        for held in [sock, *blanks]:
            held.close()


def test_pipelined_heads_behind_a_request_count_against_the_head_limits(upstream, tmp_path):
    """While a keyed request waits on Serve, heads sent behind it on the same connection are
    counted like any head (aiohttp queues one at most): past max_head_bytes, closed."""
    limits = Limits(max_head_bytes=64 * 1024, head_budget_bytes=1024 * 1024)
    with door(upstream, key_files(tmp_path, locked=True), limits) as running:
        sock = socket.create_connection(("127.0.0.1", running.port), timeout=5)
        key = b"X-Endpoint-Key: " + ENDPOINT_KEY.encode() + b"\r\n"
        sock.sendall(b"GET /v1/slow?s=5 HTTP/1.1\r\nHost: x\r\n" + key + b"\r\n")
        wait_until_busy(running, 1)
        fields = b"".join(b"X-%d: %s\r\n" % (i, b"a" * 16000) for i in range(60))
        head = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n"
        sent = 0
        with contextlib.suppress(OSError):
            for _ in range(20):
                sock.sendall(head)
                sent += len(head)
        assert closed_within(sock, 5), f"{sent} bytes of pipelined heads were held"
        assert running.book.counts["head_too_big"] >= 1
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


def test_a_websocket_without_a_credential_ends_and_one_unanswered_is_cut(upstream, tmp_path):
    """Behind CML's login a caller without a credential holds one of its few connections to
    Ray while its websocket lasts: public_answer_s at most; and a caller that answers no
    ping is cut."""
    limits = Limits(idle_s=2.0, public_answer_s=1.0)
    handshake = (
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
        + base64.b64encode(os.urandom(16))
        + b"\r\n"
    )
    for locked, credential in ((False, b""), (True, bearer_line(RAY_TOKEN))):
        with door(upstream, key_files(tmp_path, locked=locked), limits) as running:
            sock = socket.create_connection(("127.0.0.1", running.port), timeout=5)
            sock.sendall(handshake + credential + b"\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 101")
            assert closed_within(sock, 6), ("a silent websocket outlived its limits", locked)
            sock.close()


def bearer_line(key: str) -> bytes:
    return b"Authorization: Bearer " + key.encode() + b"\r\n"


# ------------------------------------------------------------------ 6. the log and the keys


@pytest.mark.parametrize(
    "path,headers",
    [
        ("/chat/completions", {"Authorization": f"Bearer {ENDPOINT_KEY}"}),  # base URL w/o /v1
        ("/metrics/", {"Authorization": f"Bearer {METRICS_KEY}"}),
        ("/api/x", {"X-Metrics-Key": METRICS_KEY}),
        ("/v1/models", {"X-Endpoint-Key": ENDPOINT_KEY, "X-Metrics-Key": METRICS_KEY}),
    ],
)
def test_the_callers_keys_reach_neither_serve_nor_the_dashboard(tmp_path, path, headers):
    serve, dashboard = Recorder("serve"), Recorder("dashboard")
    try:
        with gateway_on(serve, dashboard, key_files(tmp_path, locked=False)) as running:
            conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=5)
            assert call(conn, "GET", path, None, headers)[0] == 200
        seen = json.dumps(dashboard.seen + serve.seen)
        assert len(dashboard.seen + serve.seen) == 1
        assert ENDPOINT_KEY not in seen and METRICS_KEY not in seen, seen
    finally:
        for server in (serve, dashboard):
            server.shutdown()
            server.server_close()


def test_a_refused_header_line_puts_no_key_in_the_log(upstream, tmp_path):
    lines: list[str] = []
    with door(upstream, key_files(tmp_path, locked=True), log=lines.append) as running:
        for bad, secret in (
            (b"X-Endpoint-Key : ", ENDPOINT_KEY),
            (b"Authorization: Bearer \x01", RAY_TOKEN),
        ):
            request = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + bad + secret.encode()
            raw(running.port, request + b"\r\n\r\n", 2)
    assert not any(ENDPOINT_KEY in line or RAY_TOKEN in line for line in lines), lines


def test_callers_hanging_up_mid_body_cannot_flood_the_log(upstream, tmp_path):
    """Each relay cut by its caller is a line the gateway writes itself: limited like
    aiohttp's (30 a minute)."""
    lines: list[str] = []
    with door(upstream, key_files(tmp_path, locked=False), log=lines.append) as running:
        for _ in range(60):
            sock = socket.create_connection(("127.0.0.1", running.port))
            sock.sendall(
                b"POST /api/x HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n" + b"a" * 70000
            )
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
            sock.close()  # a reset, mid-body
        owner_answers_in(running.port, 2.0)
    assert len(lines) <= 31, f"{len(lines)} lines for 60 requests"


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
