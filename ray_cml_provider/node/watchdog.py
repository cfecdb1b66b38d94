"""A stuck autoscaler cannot go unnoticed: the head watches its own (standard library).

Ray's autoscaler runs on the head as one process (``monitor.py``) that loops: read the
cluster, decide, launch and terminate, sleep. If one update never ends (a call without a
time limit, a lock never let go), GPU demand is ignored and idle GPU workers are never
given back, with no error anywhere. So:

- **the autoscaler beats.** Our provider, loaded inside that process, touches
  ``$RAY_TMPDIR/autoscaler.heartbeat`` each time the main loop asks it for the cluster's
  nodes (``beat``, once per update), and installs ``faulthandler`` on ``SIGUSR1`` to write
  every thread's stack to ``$RAY_TMPDIR/autoscaler-stacks.txt`` (``install_stack_dump``);
- **the head's launcher watches** (``AutoscalerWatchdog``): an autoscaler that has not
  beaten for ``stuck_s`` (a few loop intervals; ``RAY_CML_AUTOSCALER_STUCK_S``, 60 by
  default) has its stacks dumped into the head's log, a line written into its own
  ``monitor.log``, and is restarted with the same command line and environment (autoscaler
  v2 rebuilds its state from the provider, which keeps it in CML). The launcher publishes a
  record that ``ray-cml status`` shows.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ray_cml_provider.contract import NodeSpec
from ray_cml_provider.node.processes import Proc

HEARTBEAT_FILE = "autoscaler.heartbeat"
STACKS_FILE = "autoscaler-stacks.txt"
DEFAULT_STUCK_S = 60.0
_dump_target = None  # the open stacks file: it must outlive the registration


def _inside_the_heads_autoscaler() -> Path | None:
    """The node's Ray folder when this process is the head's autoscaler, else None."""
    tmp = os.environ.get("RAY_TMPDIR", "")
    if not NodeSpec.from_env(os.environ).is_head or not tmp:
        return None
    if Path(sys.argv[0] if sys.argv else "").name != "monitor.py":
        return None
    return Path(tmp)


def install_stack_dump() -> None:
    """In the head's autoscaler: ``SIGUSR1`` writes every thread's stack to the stacks file
    (``faulthandler`` runs in C, so it answers while Python is stuck)."""
    global _dump_target
    folder = _inside_the_heads_autoscaler()
    if folder is None or _dump_target is not None:
        return
    with contextlib.suppress(OSError, ValueError, RuntimeError):
        _dump_target = open(folder / STACKS_FILE, "a")  # noqa: SIM115 - kept open on purpose
        faulthandler.register(signal.SIGUSR1, file=_dump_target, all_threads=True)


def beat() -> None:
    """In the head's autoscaler's main loop: one update got as far as reading the nodes."""
    folder = _inside_the_heads_autoscaler()
    if folder is None or threading.current_thread() is not threading.main_thread():
        return
    with contextlib.suppress(OSError):
        (folder / HEARTBEAT_FILE).touch()


@dataclass
class Restart:
    """What the watchdog did, for the head's log, ``monitor.log`` and ``ray-cml status``."""

    pid: int
    stalled_s: float
    stacks: str
    at: float = field(default_factory=time.time)


class AutoscalerWatchdog:
    """Run ``check`` every few seconds on the head: see the module's docstring."""

    def __init__(
        self,
        ray_tmp_dir: str,
        pgid: int,
        stuck_s: float,
        log: Callable[[str], None],
        find_processes: Callable[[int, str], list[int]],
    ) -> None:
        self.folder = Path(ray_tmp_dir)
        self.pgid = pgid
        self.stuck_s = stuck_s
        self.log = log
        self.find_processes = find_processes
        self.first_seen: dict[int, float] = {}
        self.restarted: list[subprocess.Popen] = []  # reaped as they end
        self.restarts = 0

    def monitor_pid(self) -> int | None:
        """The autoscaler of this node (Ray's ``monitor.py`` naming this node's Ray folder)."""
        for pid in self.find_processes(self.pgid, str(self.folder)):
            argv = Proc(pid, 0, 0, 0).argv()
            if any(a.endswith("/monitor.py") for a in argv) and any(
                a.startswith("--logs-dir") for a in argv
            ):
                return pid
        return None

    def check(self) -> Restart | None:
        """Restart the autoscaler if it has not beaten for ``stuck_s``; what was done."""
        self.restarted = [p for p in self.restarted if p.poll() is None]
        pid = self.monitor_pid()
        if pid is None:
            return None
        now = time.time()
        seen = self.first_seen.setdefault(pid, now)
        try:
            beaten = (self.folder / HEARTBEAT_FILE).stat().st_mtime
        except OSError:
            beaten = 0.0
        stalled_s = now - max(seen, beaten)
        if stalled_s < self.stuck_s:
            return None
        return self.restart(pid, stalled_s)

    def restart(self, pid: int, stalled_s: float) -> Restart:
        stacks = self.dump_stacks(pid)
        try:
            argv = Proc(pid, 0, 0, 0).argv()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError as exc:
            self.log(f"watchdog: cannot read the stuck autoscaler {pid}: {exc}")
            return Restart(pid, stalled_s, stacks)
        env = dict(item.decode().split("=", 1) for item in environ if b"=" in item)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:  # reaped, too
            time.sleep(0.1)
        self.restarts += 1
        note = (
            f"ray-cml: the autoscaler (pid {pid}) finished no update for {stalled_s:.0f} s: "
            f"its stacks are in the head application's log; restarted it (restart "
            f"{self.restarts})"
        )
        self.write_monitor_log(argv, note)
        self.log(f"watchdog: {note}")
        process = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.restarted.append(process)
        self.first_seen[process.pid] = time.time()
        return Restart(pid, stalled_s, stacks)

    def dump_stacks(self, pid: int) -> str:
        """Ask the autoscaler for its stacks (``SIGUSR1``) and log what it wrote."""
        target = self.folder / STACKS_FILE
        start = target.stat().st_size if target.exists() else 0
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + 3
        stacks, seen = "", None
        while time.monotonic() < deadline and (not stacks.strip() or stacks != seen):
            seen = stacks  # read until the dump has come and stopped growing
            time.sleep(0.2)
            with contextlib.suppress(OSError), open(target, "rb") as handle:
                handle.seek(start)
                stacks = handle.read().decode(errors="replace")
        if stacks.strip():
            self.log(f"watchdog: the stuck autoscaler's stacks (pid {pid}):\n{stacks.rstrip()}")
        else:
            self.log(f"watchdog: the stuck autoscaler (pid {pid}) wrote no stacks")
        return stacks

    @staticmethod
    def write_monitor_log(argv: list[str], line: str) -> None:
        logs = next((a.split("=", 1)[1] for a in argv if a.startswith("--logs-dir=")), "")
        if logs:
            with contextlib.suppress(OSError), open(Path(logs) / "monitor.log", "a") as out:
                out.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} WARNING {line}\n")
