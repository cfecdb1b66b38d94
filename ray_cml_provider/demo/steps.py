"""How the demos talk: numbered steps with the time since the start, and what CML shows."""

from __future__ import annotations

import re
import subprocess
import sys
import time

from ray_cml_provider.demo.local_cluster import LocalCluster

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


class Steps:
    def __init__(self) -> None:
        self.started = time.monotonic()

    def step(self, message: str) -> None:
        print(f"\n==> [{time.monotonic() - self.started:6.1f} s] {message}", flush=True)

    def say(self, message: str) -> None:
        print(f"    {ANSI_ESCAPE.sub('', message)}", flush=True)

    def failed(self, result: subprocess.CompletedProcess, what: str = "") -> int:
        """A command of the demo failed: the end of its output on stderr, ``what failed``
        when given, and the demo's exit status (1)."""
        print(result.stdout[-4000:], file=sys.stderr)
        if what:
            self.say(f"{what} failed")
        return 1


def show_applications(steps: Steps, cluster: LocalCluster) -> None:
    apps = cluster.applications()
    if not apps:
        steps.say("CML applications of the cluster: none")
    for app in apps:
        steps.say(
            f"CML application {app.name}: {app.status}, {app.cpu:g} vCPU, "
            f"{app.memory:g} GB, {app.nvidia_gpu} GPU"
        )
