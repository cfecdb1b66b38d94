"""The ports a node gives Ray: chosen once, never chosen by another node of the same machine.

On CML each engine has its own address and every port is free. On the emulator all engines
share one machine, and Ray's GCS listens on every address: two heads starting at the same
moment could both see 6379 free, and the second ``ray start`` would fail. So a chosen port
is (1) bound here (not listening, no ``SO_REUSEADDR``: nobody else can bind it) until just
before this node's ``ray start``, and (2) claimed in the machine's ``/tmp`` (a ``DirLock``
per port holding the claimer's pid) for as long as this process lives, so the moment between
releasing the socket and Ray binding it is not a window for another node. A claim whose
process has ended is taken over. On CML, /tmp is the engine's own and nothing is contended.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from ray_cml_provider.node.dirlock import DirLock, pid_alive

CLAIMS_DIR = Path("/tmp/ray-cml-ports")
FRESH_CLAIM_S = 10.0  # a claim without its pid yet is being written, not abandoned


@dataclass(frozen=True)
class NodePorts:
    """What this node's Ray listens on (``CommandVar``: the start commands use them)."""

    gcs: int
    client: int
    agent: int
    dashboard: int  # the head's dashboard, behind the gateway; 0 on a worker
    prometheus: int = 0  # the head's Prometheus, when it runs one (node/prometheus.py)


class PortReservation:
    def __init__(self, claims_dir: Path = CLAIMS_DIR) -> None:
        self._held: list[socket.socket] = []
        self.claims_dir = claims_dir

    def choose(self, gcs_preferred: int, head: bool, prometheus: bool = False) -> NodePorts:
        return NodePorts(
            gcs=self.take(gcs_preferred),
            client=self.take(10001),
            agent=self.take(52365),
            dashboard=self.take(8265) if head else 0,
            prometheus=self.take(9090) if head and prometheus else 0,
        )

    def take(self, preferred: int) -> int:
        """``preferred`` if nobody holds or claims it here, else a free port."""
        for port in (preferred, 0, 0, 0):
            sock = socket.socket()
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                sock.close()
                continue
            if self._claim(sock.getsockname()[1]):
                self._held.append(sock)
                return sock.getsockname()[1]
            sock.close()
        raise RuntimeError("no free port")

    def _claim(self, port: int) -> bool:
        claim = DirLock(self.claims_dir / str(port), _claimer_gone)
        try:
            return claim.take({"pid": os.getpid(), "at": time.time()})
        except OSError:
            return True  # no claims folder here: the socket alone holds the port

    def release(self) -> None:
        """Close the sockets (this node's Ray binds the ports now); the claims stay."""
        for sock in self._held:
            sock.close()
        self._held.clear()


def _claimer_gone(owner: dict | None, age_s: float) -> bool:
    if owner is None:
        return age_s > FRESH_CLAIM_S
    pid = int(owner.get("pid") or 0)
    return pid <= 0 or not pid_alive(pid)
