"""The head's watchdog (``node_watchdog``) against a real process that plays Ray's autoscaler:
it beats while its loop runs, then gets stuck in a call; the watchdog dumps its stacks,
writes the event into its ``monitor.log``, and starts it again with the same command line."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from ray_cml_provider.node import watchdog as node_watchdog
from ray_cml_provider.node.watchdog import HEARTBEAT_FILE, AutoscalerWatchdog
from tests.conftest import wait_until

FAKE_MONITOR = """
import sys, time
from ray_cml_provider.node import watchdog as node_watchdog

node_watchdog.install_stack_dump()

def stuck_in_a_call_that_never_returns():
    time.sleep(3600)

for _ in range(int(sys.argv[2].split("=")[1])):
    node_watchdog.beat()
    time.sleep(0.2)
stuck_in_a_call_that_never_returns()
"""


def test_a_stuck_autoscaler_is_dumped_noted_and_restarted(tmp_path):
    monitor = tmp_path / "autoscaler" / "monitor.py"  # the name Ray's autoscaler runs as
    monitor.parent.mkdir()
    monitor.write_text(FAKE_MONITOR)
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {
        **os.environ,
        "RAY_CML_NODE_KIND": "head",
        "RAY_TMPDIR": str(tmp_path),
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    argv = [sys.executable, "-u", str(monitor), f"--logs-dir={logs}", "--beats=10"]
    first = subprocess.Popen(argv, env=env)
    processes = {first.pid}
    lines: list[str] = []
    watchdog = AutoscalerWatchdog(
        str(tmp_path), os.getpgrp(), 1.0, lines.append, lambda pgid, tmp: sorted(processes)
    )
    try:
        wait_until(lambda: (tmp_path / HEARTBEAT_FILE).exists(), 20, "the first beat")
        assert watchdog.monitor_pid() == first.pid
        assert watchdog.check() is None  # beating
        restart = wait_until(watchdog.check, 30, "the watchdog to find it stuck")
        assert restart.pid == first.pid and restart.stalled_s >= 1.0
        assert "stuck_in_a_call_that_never_returns" in restart.stacks  # every thread's stack
        assert any("stuck autoscaler's stacks" in line for line in lines)
        first.wait(10)  # killed
        [again] = watchdog.restarted
        processes = {again.pid}
        started = wait_until(
            lambda: Path(f"/proc/{again.pid}/cmdline").read_bytes(), 10, "the new autoscaler"
        )
        assert started.split(b"\0")[:-1] == [a.encode() for a in argv]
        note = (logs / "monitor.log").read_text()
        assert "finished no update for" in note and "restarted it (restart 1)" in note
        assert watchdog.check() is None  # a new process gets the whole bound again
    finally:
        for pid in processes | {first.pid}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for process in [first, *watchdog.restarted]:
            process.wait(10)


def test_only_the_heads_autoscaler_beats(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.setenv("RAY_CML_NODE_KIND", "head")
    node_watchdog.beat()  # this process is pytest, not monitor.py
    assert not (tmp_path / HEARTBEAT_FILE).exists()
    monkeypatch.setattr(sys, "argv", ["/x/ray/autoscaler/v2/monitor.py"])
    node_watchdog.beat()
    assert (tmp_path / HEARTBEAT_FILE).exists()
    monkeypatch.setenv("RAY_CML_NODE_KIND", "worker")
    (tmp_path / HEARTBEAT_FILE).unlink()
    node_watchdog.beat()
    assert not (tmp_path / HEARTBEAT_FILE).exists()
