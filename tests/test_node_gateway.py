"""The head's gateway (``node_gateway``) against two real HTTP servers standing in for Ray
Serve's proxy and the dashboard: routing, streaming, keep-alive, the keys, and every attack
on the door we know of (smuggling, stalls, floods, malformed bytes, unasked upgrades), each
kept as a test. The same attacks against a real head are in ``test_provider_contract``."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ray_cml_provider.node.gateway import Gateway, Keys, Limits, RunningGateway, Upstream

ENDPOINT_KEY = "endpoint-key-0123456789"
RAY_TOKEN = "ray-token-abcdef"
METRICS_KEY = "metrics-key-987654"


class Recorder(ThreadingHTTPServer):
    """An upstream that answers every request with what it received, as JSON."""

    daemon_threads = True

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: list[dict] = []
        self.release_stream = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode() if length else ""
                seen = {
                    "upstream": outer.name,
                    "method": self.command,
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": body,
                }
                outer.seen.append(seen)
                if self.path.endswith("/stream"):
                    return self._stream()
                payload = json.dumps(seen).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _stream(self) -> None:
                """Two server-sent events; the second only once the test saw the first."""
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for event in (b"data: first\n\n", None, b"data: [DONE]\n\n"):
                    if event is None:
                        assert outer.release_stream.wait(10)
                        continue
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")

            def do_HEAD(self) -> None:  # noqa: N802 - the name http.server calls
                outer.seen.append({"upstream": outer.name, "method": "HEAD", "path": self.path})
                self.send_response(200)
                self.send_header("Content-Length", "42")
                self.end_headers()

            do_GET = do_POST = do_PUT = do_DELETE = _any

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server_address[1]


@pytest.fixture
def upstreams():
    serve, dashboard = Recorder("serve"), Recorder("dashboard")
    yield serve, dashboard
    for server in (serve, dashboard):
        server.release_stream.set()
        server.shutdown()
        server.server_close()


class Logged(list):
    def __call__(self, line: str) -> None:
        self.append(line)


@contextlib.contextmanager
def gateway_on(
    serve: Recorder,
    dashboard: Recorder,
    keys: Keys,
    limits: Limits | None = None,
    log=None,
    metrics=None,
    figures=None,
):
    """A gateway in front of the two recorders, closed after the ``with``."""
    gateway = Gateway(
        Upstream("127.0.0.1", serve.port, "Ray Serve's HTTP proxy"),
        Upstream("127.0.0.1", dashboard.port, "the Ray dashboard"),
        keys,
        log=log if log is not None else (lambda _: None),
        limits=limits,
        metrics=metrics,
        figures=figures,
    )
    running = RunningGateway(gateway, "127.0.0.1", 0)
    try:
        yield running
    finally:
        running.close()


def key_files(tmp_path, locked: bool) -> Keys:
    (tmp_path / "endpoint_key").write_text(ENDPOINT_KEY + "\n")
    (tmp_path / "token").write_text(RAY_TOKEN)
    (tmp_path / "metrics_key").write_text(METRICS_KEY)
    return Keys(
        tmp_path / "endpoint_key",
        tmp_path / "token",
        locked=locked,
        metrics_key_file=tmp_path / "metrics_key",
    )


@pytest.fixture
def locked_keys(tmp_path) -> Keys:
    """CML's login bypassed: every request needs a key."""
    return key_files(tmp_path, locked=True)


@pytest.fixture
def login_keys(tmp_path) -> Keys:
    """Behind CML's login (which a direct connection to the port walks around)."""
    return key_files(tmp_path, locked=False)


def call(conn: http.client.HTTPConnection, method: str, path: str, body=None, headers=None):
    conn.request(method, path, body=body, headers=headers or {})
    answer = conn.getresponse()
    data = answer.read()
    return answer.status, (json.loads(data) if data else None), answer


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


BAD_REQUEST = (b"HTTP/1.1 400", b"HTTP/1.0 400")  # aiohttp's parser answers in 1.0


def raw(port: int, data: bytes, wait_s: float = 5.0) -> bytes:
    """Send ``data`` as it is; what comes back until the gateway closes (or ``wait_s``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(data)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return received


def test_routes_v1_to_serve_and_the_rest_to_the_dashboard_on_one_connection(upstreams, login_keys):
    serve, dashboard = upstreams
    with gateway_on(serve, dashboard, login_keys) as running:
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
        key = bearer(ENDPOINT_KEY)
        status, seen, _ = call(conn, "GET", "/v1/models?x=1", None, key)
        assert (status, seen["upstream"], seen["path"]) == (200, "serve", "/v1/models?x=1")
        body = json.dumps({"model": "m", "messages": []})
        status, seen, _ = call(
            conn, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json", **key}
        )
        assert (seen["upstream"], seen["method"], seen["body"]) == ("serve", "POST", body)
        # Behind CML's login the dashboard's side is the dashboard's to judge.
        status, seen, _ = call(conn, "GET", "/api/serve/applications/")
        assert (status, seen["upstream"]) == (200, "dashboard")
        status, seen, _ = call(conn, "GET", "/v1beta")  # not the API's prefix
        assert seen["upstream"] == "dashboard"
        status, _, answer = call(conn, "HEAD", "/", None)
        assert (status, answer.getheader("Content-Length")) == (200, "42")
        conn.close()
        assert running.gateway.refused == 0


def test_v1_asks_for_the_key_behind_cmls_login_too(upstreams, login_keys):
    """A direct connection to the head's port never passed CML's login: /v1 needs the key,
    in the header CML's proxy leaves alone as well as in Authorization."""
    serve, dashboard = upstreams
    with gateway_on(serve, dashboard, login_keys) as running:
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
        assert call(conn, "GET", "/v1/models")[0] == 401
        assert call(conn, "GET", "/v1/models", None, bearer("wrong"))[0] == 401
        status, seen, _ = call(conn, "GET", "/v1/models", None, {"X-Endpoint-Key": ENDPOINT_KEY})
        assert (status, seen["upstream"]) == (200, "serve")
        assert running.gateway.refused == 2


def test_a_streamed_answer_arrives_event_by_event(upstreams, login_keys):
    serve, dashboard = upstreams
    with gateway_on(serve, dashboard, login_keys) as running:
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
        conn.request("POST", "/v1/chat/stream", body="{}", headers=bearer(ENDPOINT_KEY))
        answer = conn.getresponse()
        assert answer.status == 200
        # The upstream holds the rest back until the first event got through the gateway.
        assert answer.read1(4096).startswith(b"data: first")
        serve.release_stream.set()
        assert b"[DONE]" in answer.read()


def test_locked_url_refuses_callers_without_a_key_before_ray_sees_them(upstreams, locked_keys):
    serve, dashboard = upstreams
    with gateway_on(serve, dashboard, locked_keys) as running:
        job = json.dumps({"entrypoint": "touch /tmp/pwned"})
        for method, path, body, headers in [
            ("GET", "/v1/models", None, {}),
            ("POST", "/v1/chat/completions", "{}", bearer("wrong")),
            ("GET", "/", None, {}),
            ("POST", "/api/jobs/", job, {}),  # Ray's job submission: it runs code
            ("POST", "/api/jobs/", job, bearer(ENDPOINT_KEY)),  # the model's key: not jobs
            ("POST", "/api/jobs/", job, {"X-Endpoint-Key": ENDPOINT_KEY}),
            ("GET", "/api/serve/applications/", None, bearer(ENDPOINT_KEY)),
            ("POST", "/api/jobs/", job, {"X-Ray-Authorization": f"Bearer {ENDPOINT_KEY}"}),
            ("GET", "/v1/models", None, {"Authorization": ENDPOINT_KEY}),  # no scheme
        ]:
            # A refused request's connection is closed: each on its own.
            conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
            status, answer, response = call(conn, method, path, body, headers)
            assert status == 401, (method, path, headers)
            assert response.getheader("WWW-Authenticate") == 'Bearer realm="ray-cml"'
            assert "Bearer" in answer["error"]
            conn.close()
        assert serve.seen == [] and dashboard.seen == []
        assert running.gateway.refused == 9


def test_the_endpoint_key_opens_the_api_and_rays_token_opens_everything(upstreams, locked_keys):
    serve, dashboard = upstreams
    with gateway_on(serve, dashboard, locked_keys) as running:
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
        status, seen, _ = call(conn, "GET", "/v1/models", None, bearer(ENDPOINT_KEY))
        assert (status, seen["upstream"]) == (200, "serve")
        status, seen, _ = call(conn, "POST", "/api/jobs/", "{}", bearer(RAY_TOKEN))
        assert (status, seen["upstream"]) == (200, "dashboard")
        assert seen["headers"]["authorization"] == f"Bearer {RAY_TOKEN}"  # Ray checks it too
        status, seen, _ = call(
            conn, "GET", "/api/jobs/", None, {"X-Ray-Authorization": f"Bearer {RAY_TOKEN}"}
        )
        assert (status, seen["upstream"]) == (200, "dashboard")
        status, seen, _ = call(
            conn, "GET", "/", None, {"Cookie": f"other=1; ray-authentication-token={RAY_TOKEN}"}
        )
        assert (status, seen["upstream"]) == (200, "dashboard")
        status, seen, _ = call(conn, "GET", "/v1/models", None, bearer(RAY_TOKEN))
        assert (status, seen["upstream"]) == (200, "serve")
        # One connection carries many callers (CML's proxy pools them): each request is judged.
        assert call(conn, "GET", "/v1/models")[0] == 401


def test_neither_key_nor_rays_token_ever_reaches_serve(upstreams, locked_keys):
    serve, dashboard = upstreams
    with gateway_on(serve, dashboard, locked_keys) as running:
        spellings = [
            bearer(ENDPOINT_KEY),
            {"X-Endpoint-Key": ENDPOINT_KEY},
            bearer(RAY_TOKEN),
            {"X-Ray-Authorization": f"Bearer {RAY_TOKEN}"},
            {**bearer(ENDPOINT_KEY), "Cookie": f"a=1; ray-authentication-token={RAY_TOKEN}"},
            {"X-Endpoint-Key": ENDPOINT_KEY, "X-Ray-Authorization": f"Bearer {RAY_TOKEN}"},
        ]
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
        for headers in spellings:
            assert call(conn, "POST", "/v1/chat/completions", "{}", headers)[0] == 200
        assert len(serve.seen) == len(spellings)
        for seen in serve.seen:
            text = json.dumps(seen["headers"])
            assert ENDPOINT_KEY not in text and RAY_TOKEN not in text, seen["headers"]
        assert serve.seen[4]["headers"]["cookie"] == "a=1"  # the caller's own cookie stays


def test_keys_not_on_the_mount_yet_keep_the_url_locked(upstreams, tmp_path):
    serve, dashboard = upstreams
    keys = Keys(tmp_path / "endpoint_key", tmp_path / "token", locked=True)  # not there yet
    with gateway_on(serve, dashboard, keys) as running:
        for offered in ("", "anything"):
            conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
            assert call(conn, "GET", "/v1/models", None, bearer(offered))[0] == 401
        (tmp_path / "endpoint_key").write_text(ENDPOINT_KEY)
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
        assert call(conn, "GET", "/v1/models", None, bearer(ENDPOINT_KEY))[0] == 200


def test_an_upstream_that_is_not_up_yet_gets_a_502_naming_it(upstreams, login_keys):
    serve, dashboard = upstreams
    serve.shutdown()
    serve.server_close()
    with gateway_on(serve, dashboard, login_keys) as running:
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
        status, answer, _ = call(conn, "GET", "/v1/models", None, bearer(ENDPOINT_KEY))
        assert status == 502
        assert "Ray Serve's HTTP proxy does not answer on the head yet" in answer["error"]
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
        status, seen, _ = call(conn, "GET", "/")
        assert (status, seen["upstream"]) == (200, "dashboard")


# ------------------------------------------------------------------------- attacks


def test_smuggling_through_a_connection_header_is_refused_and_no_caller_gets_foreign_answers(
    upstreams, locked_keys
):
    """The attack that worked on the hand-written gateway: a body framed by Content-Length,
    then Content-Length dropped as 'hop-by-hop' because Connection named it, so the body
    became a second request on a connection shared with other callers."""
    serve, dashboard = upstreams
    with gateway_on(serve, dashboard, locked_keys) as running:
        hidden = b"GET /v1/SMUGGLED HTTP/1.1\r\nHost: x\r\n\r\n"
        for named in (b"content-length", b"transfer-encoding", b"authorization", b"cookie"):
            attack = (
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                b"Authorization: Bearer " + ENDPOINT_KEY.encode() + b"\r\n"
                b"Connection: keep-alive, " + named + b"\r\n"
                b"Content-Length: %d\r\n\r\n" % len(hidden) + hidden
            )
            assert raw(running.port, attack).startswith(BAD_REQUEST), named
        # Framing that disagrees with itself is the parser's to refuse (llhttp).
        for attack in (
            b"POST /v1/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            % ENDPOINT_KEY.encode(),
            b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 40\r\n\r\nabc",
            b"POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
        ):
            assert raw(running.port, attack).startswith(BAD_REQUEST), attack
        # Callers on their own connections get their own answers, as often as they ask.
        for i in range(20):
            conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
            status, seen, _ = call(conn, "GET", f"/v1/mine-{i}", None, bearer(ENDPOINT_KEY))
            assert (status, seen["path"]) == (200, f"/v1/mine-{i}")
        assert not any("SMUGGLED" in seen["path"] for seen in serve.seen + dashboard.seen)


def test_stalled_callers_are_closed_and_do_not_delay_others(upstreams, locked_keys):
    serve, dashboard = upstreams
    stalled = []
    with gateway_on(serve, dashboard, locked_keys, Limits(idle_s=2.0)) as running:
        key = ENDPOINT_KEY.encode()
        openings = [
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\n",  # a head that never ends
            b"POST /v1/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            b"Content-Length: 1000\r\n\r\nabc" % key,  # a body that stops, with the key
            b"POST /v1/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Authorization: Bearer %s\r\n\r\nffffffffff\r\nabc" % key,  # a huge chunk, stalled
            b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n",  # refused
            b"",  # nothing at all
        ]
        for i in range(100):
            sock = socket.create_connection(("127.0.0.1", running.port), timeout=10)
            sock.sendall(openings[i % len(openings)])
            stalled.append(sock)
        started = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
        assert call(conn, "GET", "/v1/models", None, bearer(ENDPOINT_KEY))[0] == 200
        assert time.monotonic() - started < 2.0
        deadline = time.monotonic() + 10
        for sock in stalled:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                while sock.recv(65536):
                    pass  # an answer (a 401 or 408) may come first; then the close
            except ConnectionResetError:
                pass
        assert time.monotonic() - started < 6.0  # idle_s after they fell silent, and a bit
        assert running.open_connections() <= 1
        # Only the keyed caller whose body streams (chunked) reached Serve, on a connection
        # of its own that ended with the body; small bodies are read whole first.
        partial = [s for s in serve.seen if s["path"] == "/v1/x"]
        assert all(s["headers"].get("transfer-encoding") == "chunked" for s in partial)
    for sock in stalled:
        sock.close()


def test_bodies_over_the_cap_are_refused_without_reading_them(upstreams, locked_keys):
    serve, dashboard = upstreams
    limits = Limits(max_api_body_bytes=1000, replay_body_bytes=100)
    with gateway_on(serve, dashboard, locked_keys, limits) as running:
        key = ENDPOINT_KEY.encode()
        declared = (
            b"POST /v1/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            b"Content-Length: 5000\r\n\r\n" % key
        )
        assert raw(running.port, declared).startswith(b"HTTP/1.1 413")
        chunked = (
            b"POST /v1/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" % key + b"400\r\n" + b"a" * 1024 + b"\r\n"
        ) * 1
        answer = raw(running.port, chunked + b"400\r\n" + b"b" * 1024 + b"\r\n0\r\n\r\n")
        assert answer == b"" or answer.startswith(b"HTTP/1.1 413")  # cut while it streamed
        # A refused request's big body is not waited for: the answer comes at once.
        started = time.monotonic()
        refused = b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n"
        assert raw(running.port, refused).startswith(b"HTTP/1.1 401")
        assert time.monotonic() - started < 2


def test_malformed_input_is_answered_without_a_traceback_or_raw_bytes_in_the_log(
    upstreams, locked_keys
):
    serve, dashboard = upstreams
    log = Logged()
    key = b"Authorization: Bearer " + ENDPOINT_KEY.encode() + b"\r\n"
    with gateway_on(serve, dashboard, locked_keys, Limits(idle_s=1.0), log=log) as running:
        for attack in [
            b"\r\n\r\n",
            b"GARBAGE\r\n\r\n",
            b"G\x1bET\x07 /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nBad Header: x\r\n\r\n",
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + b"X: " + b"a" * 70000 + b"\r\n\r\n",
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + b"H: v\r\n" * 500 + b"\r\n",
            b"POST /v1/x HTTP/1.1\r\nHost: x\r\n" + key + b"Content-Length: nope\r\n\r\n",
            b"POST /v1/x HTTP/1.1\r\nHost: x\r\n" + key + b"Content-Length: -5\r\n\r\n",
            b"POST /v1/x HTTP/1.1\r\nHost: x\r\n"
            + key
            + b"Transfer-Encoding: chunked\r\n\r\n-5\r\nabc\r\n0\r\n\r\n",
            b"POST /v1/x HTTP/1.1\r\nHost: x\r\n"
            + key
            + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"
            + b"T: x\r\n" * 2000
            + b"\r\n",
            b"GET /v1/\x00models HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /v1/models HTTP/9.9\r\nHost: x\r\n\r\n",
        ]:
            answer = raw(running.port, attack)
            assert answer == b"" or answer.startswith((b"HTTP/1.1 4", b"HTTP/1.0 4")), attack
        text = "\n".join(log)
        assert "Traceback" not in text
        assert all(c.isprintable() for line in log for c in line), log
        assert [s for s in serve.seen if s["path"] == "/v1/x"] == []


def test_an_upgrade_nobody_asked_for_is_not_spliced(tmp_path, login_keys):
    """An upstream that answers 101 to a plain request must not get a raw tunnel."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def switch_protocols() -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            sock.recv(65536)
            sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: evil\r\n\r\nRAW")
            sock.close()

    threading.Thread(target=switch_protocols, daemon=True).start()
    dashboard = Recorder("dashboard")
    gateway = Gateway(
        Upstream("127.0.0.1", listener.getsockname()[1], "Ray Serve's HTTP proxy"),
        Upstream("127.0.0.1", dashboard.port, "the Ray dashboard"),
        login_keys,
        log=lambda _: None,
    )
    running = RunningGateway(gateway, "127.0.0.1", 0)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
        status, answer, _ = call(conn, "GET", "/v1/models", None, bearer(ENDPOINT_KEY))
        assert status == 502 and "switched protocols" in answer["error"]
    finally:
        running.close()
        listener.close()
        dashboard.shutdown()
        dashboard.server_close()


def test_a_websocket_reaches_the_dashboard_only_with_rays_token(locked_keys):
    """The dashboard's websockets (log streams) pass, spliced by aiohttp on both sides."""
    import asyncio

    import aiohttp
    from aiohttp import web

    async def echo(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            await ws.send_str("echo " + message.data)
        return ws

    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_get("/ws", echo)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    threading.Thread(target=loop.run_forever, daemon=True).start()
    gateway = Gateway(
        Upstream("127.0.0.1", 9, "Ray Serve's HTTP proxy"),
        Upstream("127.0.0.1", port, "the Ray dashboard"),
        locked_keys,
        log=lambda _: None,
    )
    running = RunningGateway(gateway, "127.0.0.1", 0)

    async def client(headers) -> str:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{running.port}/ws"
            async with session.ws_connect(url, headers=headers) as ws:
                await ws.send_str("hi")
                return (await ws.receive(timeout=10)).data

    try:
        assert asyncio.run(client(bearer(RAY_TOKEN))) == "echo hi"
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            asyncio.run(client(bearer(ENDPOINT_KEY)))
        assert refused.value.status == 401
    finally:
        running.close()
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)


def test_the_gateway_bench_runs_and_prints_its_figures():
    """A smoke run of ``bench/gateway_bench.py`` (tiny sizes), so the bench cannot rot."""
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parent.parent / "bench" / "gateway_bench.py"
    run = subprocess.run(
        [sys.executable, str(bench), "--requests", "50", "--locked"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "hop (p50 difference):" in run.stdout and "events/s" in run.stdout


class Exporter(ThreadingHTTPServer):
    """A node's metrics export (Prometheus' text format), as Ray's agent serves it."""

    daemon_threads = True

    def __init__(self, ip: str, text: str) -> None:
        outer = self
        self.text = text
        self.fetched = 0  # how often it was asked for

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                outer.fetched += 1
                body = outer.text.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__((ip, 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def target(self) -> str:
        return f"{self.server_address[0]}:{self.server_address[1]}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


def export(node: str, requests: float) -> str:
    return (
        "# HELP ray_serve_num_http_requests_total The number of HTTP requests processed.\n"
        "# TYPE ray_serve_num_http_requests_total counter\n"
        f'ray_serve_num_http_requests_total{{route="/v1",SessionName="s"}} {requests}\n'
        "# HELP ray_node_cpu_utilization Total CPU usage.\n"
        "# TYPE ray_node_cpu_utilization gauge\n"
        f'ray_node_cpu_utilization{{ip="{node}"}} 12.5\n'
    )


def test_metrics_gathers_every_nodes_export_with_its_labels_for_the_metrics_key(
    upstreams, locked_keys, tmp_path
):
    """/metrics: every export the head's Ray lists, in one exposition, each sample labelled
    with its node; the metrics key (either spelling) or Ray's token opens it, the endpoint
    key does not; an export that does not answer is ray_cml_scrape_up 0."""
    from prometheus_client.parser import text_string_to_metric_families

    from ray_cml_provider.contract import NodeFolder, NodeInfo
    from ray_cml_provider.node.cluster_metrics import ClusterMetrics, NodeMap
    from ray_cml_provider.node.door_figures import DoorFigures

    head, worker = Exporter("127.0.0.1", export("head", 3)), Exporter("127.0.0.2", export("w", 5))
    gone = socket.socket()
    gone.bind(("127.0.0.1", 0))  # bound, never listening: refused
    discovery = tmp_path / "discovery.json"
    targets = [head.target, worker.target, f"127.0.0.1:{gone.getsockname()[1]}"]
    discovery.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": targets}]))
    for node_id, kind, node_type, ip in (
        ("aaaa0001", "head", "head", "127.0.0.1"),
        ("bbbb0002", "worker", "gpu_worker", "127.0.0.2"),
    ):
        path = tmp_path / NodeFolder.of("c", node_id).info
        path.parent.mkdir(parents=True)
        path.write_bytes(NodeInfo(node_id, kind, ip, 6379, node_type=node_type).to_json())
    nodes = NodeMap(tmp_path / ".ray-cml" / "c" / "nodes")
    serve, dashboard = upstreams
    figures = DoorFigures()
    metrics = ClusterMetrics(discovery, nodes, timeout_s=2, own=("127.0.0.1", figures.exposition))
    try:
        with gateway_on(serve, dashboard, locked_keys, metrics=metrics, figures=figures) as running:
            conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
            serve.release_stream.set()
            conn.request("GET", "/v1/stream", headers=bearer(ENDPOINT_KEY))  # a streamed answer
            assert conn.getresponse().read().count(b"data: ") == 2
            for refused in ({}, bearer(ENDPOINT_KEY), bearer("guess")):
                conn.request("GET", "/metrics", headers=refused)
                answer = conn.getresponse()
                assert answer.status == 401 and b"metrics key" in answer.read()
            for opens in (bearer(METRICS_KEY), {"X-Metrics-Key": METRICS_KEY}, bearer(RAY_TOKEN)):
                conn.request("GET", "/metrics", headers=opens)
                answer = conn.getresponse()
                body = answer.read().decode()
                assert answer.status == 200, body
                assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            conn.request("GET", "/metrics?family=ray_node_cpu", headers=bearer(METRICS_KEY))
            only = conn.getresponse().read().decode()
            conn.request("POST", "/metrics", body=b"x", headers=bearer(METRICS_KEY))
            answer = conn.getresponse()
            assert answer.status == 405
            answer.read()
            assert dashboard.seen == []  # /metrics is served by the gateway itself
    finally:
        for server in (head, worker):
            server.shutdown()
            server.server_close()
        gone.close()
    families = {f.name: f for f in text_string_to_metric_families(body)}
    requests = {
        s.labels["ray_cml_node"]: (s.labels, s.value)
        for s in families["ray_serve_num_http_requests"].samples
    }
    assert requests["aaaa0001"][1] == 3 and requests["bbbb0002"][1] == 5
    labels = requests["bbbb0002"][0]
    assert labels["ray_cml_node_type"] == "gpu_worker" and labels["ray_cml_node_kind"] == "worker"
    assert labels["route"] == "/v1" and labels["instance"] == worker.target
    assert len(families["ray_node_cpu_utilization"].samples) == 2
    up = {s.labels["instance"]: s.value for s in families["ray_cml_scrape_up"].samples}
    assert up == {head.target: 1.0, worker.target: 1.0, targets[2]: 0.0, "127.0.0.1:gateway": 1.0}
    # Asked for one family (ray-cml top asks for the few it shows): that one, picked before
    # parsing, and whether each export answered.
    picked = {f.name for f in text_string_to_metric_families(only)}
    assert picked == {"ray_node_cpu_utilization", "ray_cml_scrape_up"}, only
    assert only.count("ray_cml_scrape_up{") == 4 and " 0.0" in only
    # The gateway's own figures, as the head's: the streamed answer, the refusals.
    answered = {
        (s.labels["route"], s.labels["status"]): s.value
        for s in families["ray_cml_gateway_requests"].samples
        if s.name.endswith("_total")
    }
    assert answered[("v1", "200")] == 1 and answered[("metrics", "401")] == 3
    streamed = [
        s
        for s in families["ray_cml_gateway_first_byte_seconds"].samples
        if s.name.endswith("_count") and s.labels["streamed"] == "true"
    ]
    assert [s.value for s in streamed] == [1.0] and streamed[0].labels["ray_cml_node"] == "aaaa0001"
