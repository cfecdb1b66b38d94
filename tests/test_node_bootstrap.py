"""The bootstrap stage (``node_bootstrap``) in-process: the status page every node shows on
its application's port before (and, on a worker, instead of) the gateway, attacked like the
gateway, and what the bootstrap hands the launcher it execs."""

from __future__ import annotations

import http.client
import os
import socket
import time
from pathlib import Path

import pytest

from ray_cml_provider.node import bootstrap as node_bootstrap
from ray_cml_provider.node.bootstrap import StatusPage, launcher_environment
from ray_cml_provider.node.environment import Environment


@pytest.fixture
def page():
    running = StatusPage(
        "127.0.0.1", 0, lambda: "ray-cml head node 1 of cluster c: starting", timeout_s=1.0, most=4
    )
    yield running
    running.close()


def port_of(page: StatusPage) -> int:
    return page.server.server_address[1]


def test_cmls_poll_gets_the_state_and_everything_else_a_503_to_retry(page):
    conn = http.client.HTTPConnection("127.0.0.1", port_of(page), timeout=5)
    conn.request("GET", "/")
    answer = conn.getresponse()
    assert answer.status == 200 and b"starting" in answer.read()
    for method, path in (("GET", "/v1/models"), ("POST", "/api/jobs/"), ("PUT", "/")):
        conn = http.client.HTTPConnection("127.0.0.1", port_of(page), timeout=5)
        conn.request(method, path, body=b"x" * 10)
        answer = conn.getresponse()
        assert (answer.status, answer.getheader("Retry-After")) == (503, "5")
        assert answer.getheader("Connection") == "close"


def test_a_silent_caller_is_dropped_and_a_flood_is_closed_at_once(page):
    silent = [socket.create_connection(("127.0.0.1", port_of(page)), timeout=5) for _ in range(4)]
    try:
        # Every slot is held: the next connection is closed without an answer ...
        extra = socket.create_connection(("127.0.0.1", port_of(page)), timeout=5)
        extra.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert extra.recv(100) == b""
        extra.close()
        # ... and once the silent ones are dropped (timeout_s), the page answers again.
        started = time.monotonic()
        for sock in silent:
            assert sock.recv(100) == b""
        assert time.monotonic() - started < 4
        time.sleep(0.2)  # the handler threads give their slots back after closing
        conn = http.client.HTTPConnection("127.0.0.1", port_of(page), timeout=5)
        conn.request("GET", "/")
        assert conn.getresponse().status == 200
    finally:
        for sock in silent:
            sock.close()


def test_a_large_body_is_not_read_and_bad_bytes_get_no_traceback(page, capfd):
    with socket.create_connection(("127.0.0.1", port_of(page)), timeout=5) as sock:
        # The answer comes without waiting for the announced body (which is never read).
        sock.sendall(b"POST /x HTTP/1.1\r\nContent-Length: 100000000\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 503")
    for bad in (b"\r\n\r\n", b"G\x1bT / HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\r\nX\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", port_of(page)), timeout=5) as sock:
            sock.sendall(bad)
            sock.recv(1000)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "\x1b" not in out + err


def test_the_launcher_runs_with_the_shipped_code_then_the_environment_first(tmp_path):
    code = tmp_path / "lib" / "ray_cml_provider-abc.zip"
    site = tmp_path / "_envs" / "key"
    env = {"PYTHONPATH": "/runtime/own", "RAY_CML_NODE_ID": "n1", "RAY_CML_NODE_SITE": "stale"}
    child = launcher_environment(env, code, Environment(site, "reused"), "")
    assert child["PYTHONPATH"].split(os.pathsep) == [str(code), str(site), "/runtime/own"]
    assert child["RAY_CML_RUNTIME_PYTHONPATH"] == "/runtime/own"
    assert (child["RAY_CML_NODE_SITE"], child["RAY_CML_ENVIRONMENT_SUMMARY"]) == (
        str(site),
        "reused",
    )
    failed = launcher_environment(env, code, None, "pip said no\n" * 2000)
    assert failed["PYTHONPATH"].split(os.pathsep) == [str(code), "/runtime/own"]
    assert len(failed["RAY_CML_ENVIRONMENT_ERROR"]) == node_bootstrap.ERROR_MOST


def test_the_launcher_gets_the_runtimes_pythonpath_back_for_commands(tmp_path, monkeypatch):
    from ray_cml_provider.contract import Handoff, Request
    from ray_cml_provider.node.launcher import NodeLauncher

    monkeypatch.chdir(tmp_path)
    env = launcher_environment(
        {
            "RAY_CML_CLUSTER": "c1",
            "RAY_CML_NODE_ID": "0123abcd",
            "RAY_CML_DIR": ".ray-cml/c1",
            "CDSW_IP_ADDRESS": "127.0.0.1",
            "PYTHONPATH": "/runtime/own",
        },
        Path("/code.zip"),
        None,
        "ray-cml: pip failed",
    )
    node = NodeLauncher(env)
    assert node.environment.error == "ray-cml: pip failed"
    assert node.ctx.env["PYTHONPATH"] == "/runtime/own"
    assert not any(name in node.ctx.env for name in Handoff.variables())
    assert node.commands.answer(Request(cmd="true"), tmp_path / "out") == 1  # no environment
    assert "pip failed" in (tmp_path / "out").read_text()
