"""The head's gateway (``node_gateway``) against two real HTTP servers standing in for Ray
Serve's proxy and the dashboard: routing, streaming, keep-alive, and the lock it puts on the
URL when CML's login is bypassed."""

from __future__ import annotations

import http.client
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ray_cml_provider.node_gateway import Gateway, Keys, RunningGateway, Upstream

ENDPOINT_KEY = "endpoint-key-0123456789"
RAY_TOKEN = "ray-token-abcdef"


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


def open_gateway(serve: Recorder, dashboard: Recorder, keys: Keys) -> RunningGateway:
    gateway = Gateway(
        Upstream("127.0.0.1", serve.port, "Ray Serve's HTTP proxy"),
        Upstream("127.0.0.1", dashboard.port, "the Ray dashboard"),
        keys,
        log=lambda _: None,
    )
    return RunningGateway(gateway, "127.0.0.1", 0)


@pytest.fixture
def locked_keys(tmp_path) -> Keys:
    (tmp_path / "endpoint_key").write_text(ENDPOINT_KEY + "\n")
    (tmp_path / "token").write_text(RAY_TOKEN)
    return Keys(tmp_path / "endpoint_key", tmp_path / "token")


def call(conn: http.client.HTTPConnection, method: str, path: str, body=None, headers=None):
    conn.request(method, path, body=body, headers=headers or {})
    answer = conn.getresponse()
    data = answer.read()
    return answer.status, (json.loads(data) if data else None), answer


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_routes_v1_to_serve_and_the_rest_to_the_dashboard_on_one_connection(upstreams):
    serve, dashboard = upstreams
    running = open_gateway(serve, dashboard, Keys())
    try:
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
        status, seen, _ = call(conn, "GET", "/v1/models?x=1")
        assert (status, seen["upstream"], seen["path"]) == (200, "serve", "/v1/models?x=1")
        body = json.dumps({"model": "m", "messages": []})
        status, seen, _ = call(
            conn, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"}
        )
        assert (seen["upstream"], seen["method"], seen["body"]) == ("serve", "POST", body)
        status, seen, _ = call(conn, "GET", "/api/serve/applications/")
        assert (status, seen["upstream"]) == (200, "dashboard")
        status, seen, _ = call(conn, "GET", "/v1beta")  # not the API's prefix
        assert seen["upstream"] == "dashboard"
        conn.close()
        # Behind CML's login nothing is asked for, and what callers send reaches Ray as sent.
        assert all("authorization" not in s["headers"] for s in serve.seen + dashboard.seen)
        assert running.gateway.refused == 0
    finally:
        running.stop()


def test_a_streamed_answer_arrives_event_by_event(upstreams):
    serve, dashboard = upstreams
    running = open_gateway(serve, dashboard, Keys())
    try:
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
        conn.request("POST", "/v1/chat/stream", body="{}")
        answer = conn.getresponse()
        assert answer.status == 200
        # The upstream holds the rest back until the first event got through the gateway.
        assert answer.read1(4096).startswith(b"data: first")
        serve.release_stream.set()
        assert b"[DONE]" in answer.read()
    finally:
        running.stop()


def test_locked_url_refuses_callers_without_a_key_before_ray_sees_them(upstreams, locked_keys):
    serve, dashboard = upstreams
    running = open_gateway(serve, dashboard, locked_keys)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
        job = json.dumps({"entrypoint": "touch /tmp/pwned"})
        for method, path, body, headers in [
            ("GET", "/v1/models", None, {}),
            ("POST", "/v1/chat/completions", "{}", bearer("wrong")),
            ("GET", "/", None, {}),
            ("POST", "/api/jobs/", job, {}),  # Ray's job submission: it runs code
            ("POST", "/api/jobs/", job, bearer(ENDPOINT_KEY)),  # the model's key: not jobs
            ("GET", "/api/serve/applications/", None, bearer(ENDPOINT_KEY)),
            ("POST", "/api/jobs/", job, {"X-Ray-Authorization": f"Bearer {ENDPOINT_KEY}"}),
            ("GET", "/v1/models", None, {"Authorization": ENDPOINT_KEY}),  # no scheme
        ]:
            status, answer, response = call(conn, method, path, body, headers)
            assert status == 401, (method, path, headers)
            assert response.getheader("WWW-Authenticate") == 'Bearer realm="ray-cml"'
            assert "Bearer" in answer["error"]
        assert serve.seen == [] and dashboard.seen == []
        assert running.gateway.refused == 8
    finally:
        running.stop()


def test_the_endpoint_key_opens_the_api_and_rays_token_opens_everything(upstreams, locked_keys):
    serve, dashboard = upstreams
    running = open_gateway(serve, dashboard, locked_keys)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
        status, seen, _ = call(conn, "GET", "/v1/models", None, bearer(ENDPOINT_KEY))
        assert (status, seen["upstream"]) == (200, "serve")
        assert "authorization" not in seen["headers"]  # the key never reaches Ray
        # One connection carries many callers (CML's proxy pools them): each request is judged.
        status, _, _ = call(conn, "GET", "/v1/models")
        assert status == 401
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
    finally:
        running.stop()


def test_keys_not_on_the_mount_yet_keep_the_url_locked(upstreams, tmp_path):
    serve, dashboard = upstreams
    keys = Keys(tmp_path / "endpoint_key", tmp_path / "token")  # neither file exists yet
    running = open_gateway(serve, dashboard, keys)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
        assert call(conn, "GET", "/v1/models", None, bearer(""))[0] == 401
        assert call(conn, "GET", "/v1/models", None, bearer("anything"))[0] == 401
        (tmp_path / "endpoint_key").write_text(ENDPOINT_KEY)
        assert call(conn, "GET", "/v1/models", None, bearer(ENDPOINT_KEY))[0] == 200
    finally:
        running.stop()


def test_an_upstream_that_is_not_up_yet_gets_a_502_naming_it(upstreams):
    serve, dashboard = upstreams
    serve.shutdown()
    serve.server_close()
    running = open_gateway(serve, dashboard, Keys())
    try:
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
        status, answer, _ = call(conn, "GET", "/v1/models")
        assert status == 502
        assert "Ray Serve's HTTP proxy does not answer on the head yet" in answer["error"]
        status, seen, _ = call(conn, "GET", "/")  # the same connection still serves
        assert (status, seen["upstream"]) == (200, "dashboard")
    finally:
        running.stop()


def test_a_malformed_request_gets_400(upstreams):
    serve, dashboard = upstreams
    running = open_gateway(serve, dashboard, Keys())
    try:
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=10)
        conn.putrequest("POST", "/v1/x", skip_accept_encoding=True)
        conn.putheader("Content-Length", "nope")
        conn.endheaders()
        answer = conn.getresponse()
        assert answer.status == 400 and b"Content-Length" in answer.read()
        assert serve.seen == []
    finally:
        running.stop()
