"""The bootstrap stage (``node_bootstrap``) in-process: the status page every node shows on
its application's port before (and, on a worker, instead of) the gateway, attacked like the
gateway, and what the bootstrap hands the launcher it execs."""

from __future__ import annotations

import contextlib
import http.client
import os
import select
import socket
import threading
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


@pytest.fixture
def page_of_8():
    """A page like a node's (``most`` callers at once, ``timeout_s`` for a whole request),
    smaller and quicker."""
    running = StatusPage("127.0.0.1", 0, lambda: "starting", timeout_s=1.0, most=8)
    yield running
    running.close()


def port_of(page: StatusPage) -> int:
    return page.server.server_address[1]


class Trickle:
    """An attacker: connections that each send one byte every ``every_s`` and never a whole
    request. ``hold`` of them are kept open (one is opened again as soon as the page cuts it);
    with ``flood``, one more is opened every turn too, as fast as this thread can."""

    def __init__(self, port: int, hold: int, every_s: float, flood: bool = False):
        self.port, self.hold, self.every_s, self.flood = port, hold, every_s, flood
        self.opened = 0
        self.holding = threading.Event()  # `hold` connections were open, each with a byte sent
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, name="trickle", daemon=True)
        self.thread.start()

    def run(self) -> None:
        conns: list[socket.socket] = []
        next_byte = time.monotonic() + self.every_s
        while not self.stop.is_set():
            while len(conns) < self.hold:
                conns.append(self.connect())
            if self.flood and len(conns) < 4 * self.hold:
                conns.append(self.connect())
            self.holding.set()
            wait = 0 if self.flood else max(0.0, next_byte - time.monotonic())
            for cut in select.select(conns, [], [], wait)[0]:  # the page ended these
                conns.remove(cut)
                cut.close()
            if time.monotonic() >= next_byte:
                next_byte += self.every_s
                for conn in conns:
                    with contextlib.suppress(OSError):  # cut: the next turn opens another
                        conn.sendall(b"G")
        for conn in conns:
            conn.close()

    def connect(self) -> socket.socket:
        conn = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        conn.sendall(b"G")  # the first byte of a request line that never ends
        self.opened += 1
        return conn

    def end(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def poll_answered_within(port: int, within_s: float) -> float:
    """Seconds until CML's poll (``GET /``, made again at once when it is cut) got its 200;
    the test fails past ``within_s``."""
    started = time.monotonic()
    while (left := within_s - (time.monotonic() - started)) > 0:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=left)
        try:
            conn.request("GET", "/")
            if conn.getresponse().status == 200:
                return time.monotonic() - started
        except (OSError, http.client.HTTPException):
            pass  # cut or turned away: CML polls again
        finally:
            conn.close()
    pytest.fail(f"CML's poll got no answer in {within_s} s")


def cmls_polls(port: int, for_s: float, within_s: float) -> list[float]:
    """CML's status poll, made every tenth of a second for ``for_s``: the seconds each took to
    be answered (``poll_answered_within``)."""
    waits = []
    started = time.monotonic()
    while time.monotonic() - started < for_s:
        waits.append(poll_answered_within(port, within_s))
        time.sleep(0.1)
    return waits


def wait_until(condition, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


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


def test_silent_callers_are_dropped_and_a_full_page_cuts_its_oldest_caller(page):
    silent = [socket.create_connection(("127.0.0.1", port_of(page)), timeout=5) for _ in range(4)]
    try:
        # Every slot is held: the next caller is let in, and the oldest cut for it ...
        conn = http.client.HTTPConnection("127.0.0.1", port_of(page), timeout=5)
        conn.request("GET", "/")
        assert conn.getresponse().status == 200
        assert silent[0].recv(100) == b""
        # ... and the others are dropped at their deadline (timeout_s).
        started = time.monotonic()
        for sock in silent[1:]:
            assert sock.recv(100) == b""
        assert time.monotonic() - started < 4
    finally:
        for sock in silent:
            sock.close()


def test_a_trickling_caller_is_cut_at_its_deadline_not_kept_by_each_byte(page):
    with socket.create_connection(("127.0.0.1", port_of(page)), timeout=5) as sock:
        sock.settimeout(0.2)  # a byte every fifth of the page's timeout_s (1 s)
        started = time.monotonic()
        while time.monotonic() - started < 5:
            try:
                sock.sendall(b"G")
                if sock.recv(100) == b"":
                    break
            except TimeoutError:
                continue  # still open: another byte
            except OSError:
                break
        held = time.monotonic() - started
    assert held < 2.0  # the deadline (1 s), a server turn late at most, on a busy machine


def polls_under_attack(page, flood: bool) -> tuple[list[float], int]:
    """CML's poll for 2.5 s while 8 tricklers hold the 8 slots (and, with ``flood``, open
    new ones all the time): each poll's wait, and how many connections the attacker opened."""
    attack = Trickle(port_of(page), hold=8, every_s=0.25, flood=flood)
    try:
        assert attack.holding.wait(5)
        waits = cmls_polls(port_of(page), for_s=2.5, within_s=1.0)
        return waits, attack.opened
    finally:
        attack.end()


def test_callers_trickling_into_every_slot_cannot_keep_cmls_poll_out(page_of_8):
    # 8 callers take the 8 slots and send a byte every quarter of timeout_s (1 s), opening
    # another as soon as one is cut. CML's poll, for more than two deadlines, is answered within
    # timeout_s every time (at once, in fact: it takes the oldest caller's slot).
    waits, opened = polls_under_attack(page_of_8, flood=False)
    assert max(waits) < 1.0 and opened >= 16, (waits, opened)  # cut at deadlines, and back


def test_an_attacker_opening_new_trickling_callers_cannot_keep_cmls_poll_out(page_of_8, capfd):
    threads = threading.active_count()
    waits, opened = polls_under_attack(page_of_8, flood=True)
    assert max(waits) < 1.0 and opened > 100, (waits, opened)  # each slot taken a dozen times
    # Every cut caller's thread ends: nothing is left behind per connection, nor in the log.
    assert wait_until(lambda: threading.active_count() <= threads, 5)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "GGG" not in out + err


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
