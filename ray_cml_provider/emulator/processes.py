"""Real local processes that play CML application engines.

Each application runs as its own process group (``start_new_session=True``), so stopping,
crashing or deleting it reaches every process it started (Ray's raylet, GCS, agents...),
the way deleting a CML engine pod ends everything inside it. Each gets its own loopback
address, standing in for the pod IP.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ray_cml_provider.node.processes import live_processes

# What an engine inherits from the emulator's own environment. Everything else, the
# user's CML_API_KEY included, stays out: a CML engine starts from a clean environment.
PASSTHROUGH_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "TMPDIR", "SYSTEMROOT")


class LoopbackAllocator:
    """Hands out 127.B.0.2, 127.B.0.3, ... never reusing one, like fresh pod IPs (B is the
    emulator's ``--ip-block``, 0 by default)."""

    def __init__(self, block: int = 0):
        self._next = (block << 16) + 2

    def allocate(self) -> str:
        while True:
            n = self._next
            self._next += 1
            a, b, c = (n >> 16) & 0xFF, (n >> 8) & 0xFF, n & 0xFF
            if c not in (0, 255) and n < (1 << 24):
                return f"127.{a}.{b}.{c}"


@dataclass
class Resources:
    cpu: float = 0.0
    memory: float = 0.0
    gpus: int = 0

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.cpu + other.cpu, self.memory + other.memory, self.gpus + other.gpus)


@dataclass
class EngineProcess:
    """A started engine: the process group, its address and what it reserves of the quota."""

    popen: subprocess.Popen
    ip_address: str
    app_port: int
    log_path: Path
    reserved: Resources
    started_monotonic: float = field(default_factory=time.monotonic)
    kill_deadline: float | None = None

    @property
    def pgid(self) -> int:
        return self.popen.pid

    def leader_exit_code(self) -> int | None:
        return self.popen.poll()

    def group_alive(self) -> bool:
        self.popen.poll()  # reap the leader so it does not count as a member
        return bool(live_group_members(self.pgid))

    def terminate(self, grace_s: float) -> None:
        """SIGTERM the group now; ``enforce_deadline`` SIGKILLs it if it outlives the grace."""
        if self.kill_deadline is None:
            self.kill_deadline = time.monotonic() + grace_s
            signal_group(self.pgid, signal.SIGTERM)

    def kill(self) -> None:
        self.kill_deadline = time.monotonic()
        signal_group(self.pgid, signal.SIGKILL)
        self.popen.poll()

    def enforce_deadline(self) -> None:
        if self.kill_deadline is not None and time.monotonic() >= self.kill_deadline:
            signal_group(self.pgid, signal.SIGKILL)
            self.popen.poll()


def end_engines(processes: list[EngineProcess], grace_s: float) -> None:
    """SIGTERM every engine's group at once, wait up to ``grace_s`` for all, SIGKILL the rest."""
    for process in processes:
        process.terminate(grace_s)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(p.group_alive() for p in processes):
        time.sleep(0.05)
    for process in processes:
        process.kill()


def signal_group(pgid: int, sig: int) -> None:
    """Signal process group ``pgid`` and every other process of the session it leads: an
    engine is a pod, and Ray's workers move to process groups of their own (same session),
    so a group alone would let them outlive their engine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
    for pid in live_group_members(pgid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def live_group_members(pgid: int) -> list[int]:
    """Pids that are not zombies in process group ``pgid`` or in the session it leads
    (every engine and every command the tools start leads its own session)."""
    return [p.pid for p in live_processes() if pgid in (p.pgrp, p.session)]


def start_engine(
    *,
    script_path: Path,
    python: str,
    cwd: Path,
    env: dict[str, str],
    log_path: Path,
    ip_address: str,
    app_port: int,
    reserved: Resources,
) -> EngineProcess:
    """Start ``script_path`` as a new process group, its output appended to ``log_path``."""
    if script_path.suffix == ".sh":
        command = ["/bin/bash", str(script_path)]
    else:
        command = [python, str(script_path)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            command,
            cwd=str(cwd),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    return EngineProcess(popen, ip_address, app_port, log_path, reserved)


def base_environment(python: str = sys.executable) -> dict[str, str]:
    env = {name: os.environ[name] for name in PASSTHROUGH_ENV if name in os.environ}
    # Like a runtime image, the engine's interpreter (and its scripts: ray, pip) come first.
    bin_dir = str(Path(python).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "/usr/bin:/bin")])
    return env
