"""This node's processes, and ``ray stop`` for this node alone (standard library).

It lives in the bootstrap stage (uploaded next to ``bootstrap.py``), because ``ray stop`` must
work on a node whose environment, or whose shipped code, is not there: ``ray down`` stops a
head whose environment failed, without waiting for one. The node's ``ray`` shim runs
``bootstrap.py stop-ray``; the launcher calls ``stop_ray_of_this_node`` itself.

``node_processes`` is the project's one walker of ``/proc``: the head's autoscaler watchdog
and the emulator (which ends an application's whole session) use it too. It is not psutil
because ``ray stop`` must run before any package is installed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

if __package__:  # imported from the package (the launcher, the emulator, tests)
    from ray_cml_provider.contract import CommandVar
else:  # uploaded next to bootstrap.py in the cluster's folder
    from node_contract import CommandVar


@dataclass(frozen=True)
class Proc:
    """A live process of this machine, as ``/proc/<pid>/stat`` shows it."""

    pid: int
    ppid: int
    pgrp: int
    session: int

    def cmdline(self) -> str:
        """The command line, arguments separated by NUL ('' once the process is gone)."""
        try:
            return Path(f"/proc/{self.pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return ""

    def argv(self) -> list[str]:
        return [a for a in self.cmdline().split("\0") if a]


def read_proc(pid: int) -> Proc | None:
    """The process ``pid``; None when it is gone or a zombie nobody reaped (``kill(pid, 0)``
    succeeds for those, which would make a finished process look alive forever)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Format: pid (comm) state ppid pgrp session ...; comm may hold spaces and parentheses.
    fields = stat[stat.rfind(")") + 2 :].split()
    if len(fields) < 4 or fields[0] == "Z":
        return None
    return Proc(pid, int(fields[1]), int(fields[2]), int(fields[3]))


def live_processes() -> Iterator[Proc]:
    """Every live process of this machine (Linux)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            proc = read_proc(int(entry.name))
            if proc is not None:
                yield proc


def _ancestors(pid: int) -> set[int]:
    chain: set[int] = set()
    while pid > 1 and pid not in chain:
        chain.add(pid)
        proc = read_proc(pid)
        if proc is None:
            break
        pid = proc.ppid
    return chain


def node_processes(pgid: int, ray_tmp_dir: str) -> list[int]:
    """This node's live processes: the launcher's process group, and the processes whose
    command line names the node's own Ray folder (Ray's workers, the Serve controller and
    replicas among them, each run in a process group of their own)."""
    marker = ray_tmp_dir.rstrip("/") + "/" if ray_tmp_dir else ""
    return [
        proc.pid
        for proc in live_processes()
        if proc.pgrp == pgid or (marker and marker in proc.cmdline())
    ]


def _stop_order(pid: int) -> int:
    """Ray's own ``ray stop`` order: the raylet first, its workers and Ray's other processes
    next, the GCS last. All at once, the raylet and the GCS each wait for the other to
    answer before they exit (10 s and more)."""
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return 1
    return {"raylet": 0, "gcs_server": 2}.get(name, 1)


def stop_ray_of_this_node(grace_s: float = 10.0, ray_tmp_dir: str | None = None) -> None:
    """``ray stop`` for one node: end the Ray processes of this node (``_node_processes``),
    in Ray's order (``_stop_order``), each step SIGTERM then, after its share of ``grace_s``,
    SIGKILL.

    Ray's own ``ray stop`` kills every Ray process on the machine, which in the emulator
    means other nodes and other clusters. Here what Ray started for this node is the
    launcher's process group and whatever names the node's Ray folder (``RAY_TMPDIR``):
    a Ray worker left behind would make the next ``ray start`` here refuse to run ("Ray is
    already running") and could keep a GPU's memory.

    The group is only the one ``RAY_CML_LAUNCHER_PGID`` names (the launcher sets it for
    itself and its commands): a caller's own group could be anything's (a test runner's
    workers share one), so without it only the processes naming the Ray folder are ended.
    """
    pgid = int(os.environ.get(CommandVar.LAUNCHER_PGID) or -1)  # -1: no process's group
    tmp_dir = ray_tmp_dir if ray_tmp_dir is not None else os.environ.get("RAY_TMPDIR", "")
    keep = _ancestors(os.getpid()) | {int(os.environ.get(CommandVar.LAUNCHER_PID, "0"))}
    left: list[int] = []
    for step in (0, 1, 2):
        targets = [
            pid
            for pid in node_processes(pgid, tmp_dir)
            if pid not in keep and _stop_order(pid) == step
        ]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in targets:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + (grace_s / 3 if sig == signal.SIGTERM else 2)
            while targets and time.monotonic() < deadline:
                time.sleep(0.05)
                targets = [pid for pid in node_processes(pgid, tmp_dir) if pid in targets]
            if not targets:
                break
        left += targets
    if tmp_dir and not left:
        # As Ray's `ray stop` does: forget the node's last cluster address. `ray start --head`
        # refuses to run while that address is "in use" by any process of the machine, and
        # on the emulator a worker's raylet on the same machine names the head's address.
        with contextlib.suppress(OSError):
            (Path(tmp_dir) / "ray" / "ray_current_cluster").unlink()
    print("Stopped Ray on this node." if not left else f"Could not stop pids {left}.")
