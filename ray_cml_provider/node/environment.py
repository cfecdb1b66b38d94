"""The cluster's Python environment on a CML node: built once per project, then shared.

Standard library only: it runs inside the node launcher, before anything is installed. A
CML runtime has Python and pip but no Ray. The packages a node type needs (Ray pinned to the
version that ran ``ray up``, and what ``pip_packages`` adds) are installed with ``pip
install --target`` into the project filesystem, once per (runtime, Python, package set), and
every later node of every cluster of the project uses that folder as it is:

    .ray-cml/_envs/<key>/               a finished environment: site/ (+ site/bin), env.json
    .ray-cml/_envs/<key>.lock/          the builder's lock, owner.json rewritten every 10 s
    .ray-cml/_envs/<key>.build-<node>/  where the builder installs; renamed into place whole
    .ray-cml/_envs/<key>.failed.json    the last failed build: pip's last lines

- One builder: ``mkdir`` of the lock is atomic, on NFS too. Nodes that start meanwhile wait
  for ``<key>/env.json`` instead of running pip into the same place.
- Nothing half-built is trusted: the environment appears by one ``rename`` of a complete
  folder, after pip succeeded.
- A builder that died does not block the others: a lock whose heartbeat is older than
  ``STALE_LOCK_S`` is taken over.
- A failed build is reported, with pip's last lines, to the nodes that waited for it and to
  those starting within ``FAILED_BUILD_HOLD_S``; a node that starts later tries again (the
  cause may have been the network). Deleting the ``.failed.json`` allows it at once.
- Waiting uses the files' contents, not directory listings, and polls: on NFS a file another
  engine wrote may show up to ``acdirmin`` (30 s) late, which costs a wait, never a mistake.

The folder goes on ``PYTHONPATH`` (before the user site, so it overrides what the project's
sessions installed in ``~/.local``, which stays visible for everything else) and its ``bin``
on ``PATH``. A runtime that already has the Ray asked for, when nothing else is asked, needs
no environment at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

if __package__:  # imported from the package (the bootstrap's tests, the launcher)
    from ray_cml_provider.node.dirlock import DirLock, read_json_object
else:  # uploaded next to bootstrap.py in the cluster's folder
    from node_dirlock import DirLock, read_json_object

ENVS_DIR = ".ray-cml/_envs"
HEARTBEAT_S = 10.0
STALE_LOCK_S = 90.0
# A failed build is reported, not retried, by nodes starting this soon after it: a GPU
# worker relaunched by Ray after a failed build would otherwise run pip again, and again.
FAILED_BUILD_HOLD_S = 300.0
WAIT_POLL_S = 1.0
PIP_TAIL_LINES = 15
RAY_REQUIREMENT = re.compile(r"^\s*ray\s*(\[[^\]]*\])?\s*==\s*(?P<version>\S+)\s*$", re.I)


class NodeEnvironmentError(Exception):
    """The node's environment could not be made ready; the message says why, in full."""


@dataclass
class Environment:
    site: Path | None  # None: the runtime itself has what the node needs
    summary: str  # one line for logs and for `ray up`

    @property
    def bin(self) -> Path | None:
        return self.site / "bin" if self.site else None


def python_tag() -> str:
    """What makes an environment usable by an interpreter: implementation, minor, machine."""
    major, minor = sys.version_info[:2]
    return f"{sys.implementation.name}{major}.{minor}-{platform.machine()}"


def environment_key(runtime: str, packages: list[str]) -> str:
    spec = {"runtime": runtime, "python": python_tag(), "packages": sorted(packages)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def ray_pin(packages: list[str]) -> str:
    """The Ray version the packages pin (the provider always pins one), else ''."""
    for requirement in packages:
        match = RAY_REQUIREMENT.match(requirement)
        if match:
            return match["version"]
    return ""


def runtime_has(packages: list[str]) -> str:
    """The runtime's own Ray version when it is all the node needs, else ''."""
    wanted = ray_pin(packages)
    if not wanted or any(not RAY_REQUIREMENT.match(p) for p in packages):
        return ""
    try:
        return wanted if version("ray") == wanted else ""
    except PackageNotFoundError:
        return ""


class EnvironmentBuild:
    """Make the environment for ``packages`` ready in ``project_dir``, building it at most once."""

    def __init__(
        self,
        project_dir: Path,
        runtime: str,
        packages: list[str],
        node_id: str,
        log: Callable[[str], None],
    ):
        self.packages = packages
        self.runtime = runtime
        self.node_id = node_id
        self.log = log
        self.key = environment_key(runtime, packages)
        self.envs = project_dir / ENVS_DIR
        self.final = self.envs / self.key
        self.lock = DirLock(self.envs / f"{self.key}.lock", self._holder_gone)
        self.failed = self.envs / f"{self.key}.failed.json"
        self.relative = f"{ENVS_DIR}/{self.key}"

    # -------------------------------------------------------------- the one entry point

    def ensure(self) -> Environment:
        if runtime_has(self.packages):
            return Environment(None, f"the runtime already has Ray {ray_pin(self.packages)}")
        self.envs.mkdir(parents=True, exist_ok=True)
        started = time.time()
        next_note = 0.0
        while True:
            if self._ready():
                waited = time.time() - started
                how = f"after waiting {waited:.0f} s for its build" if waited >= 1 else "reused"
                return Environment(self.final / "site", f"environment {self.relative} {how}")
            failure = read_json_object(self.failed)
            if failure and failure.get("at", 0) >= started - FAILED_BUILD_HOLD_S:
                raise NodeEnvironmentError(self._failure_message(failure))
            if self.lock.take(self._owner()):
                if self.lock.took_over_from is not None:
                    who = self.lock.took_over_from.get("node", "a node")
                    self.log(f"{who} stopped building {self.relative} (no heartbeat): taking over")
                return self._build_holding_lock()
            owner = self.lock.owner()
            if time.monotonic() >= next_note:
                next_note = time.monotonic() + 15
                who = (owner or {}).get("node", "another node")
                self.log(
                    f"waiting for {who} to build {self.relative} "
                    f"({time.time() - started:.0f} s): {' '.join(self.packages)}"
                )
            time.sleep(WAIT_POLL_S)

    # -------------------------------------------------------------- state on the filesystem

    def _ready(self) -> bool:
        return read_json_object(self.final / "env.json") is not None

    def _owner(self) -> dict:
        return {"node": self.node_id, "pid": os.getpid(), "at": time.time()}

    @staticmethod
    def _holder_gone(owner: dict | None, age_s: float) -> bool:
        """A builder is gone when its heartbeat is older than ``STALE_LOCK_S`` (its pid
        means nothing here: it may run on another engine)."""
        since = time.time() - float(owner.get("at", 0)) if owner else age_s
        return since > STALE_LOCK_S

    # -------------------------------------------------------------- building

    def _build_holding_lock(self) -> Environment:
        stop = threading.Event()

        def heartbeat() -> None:
            while not stop.wait(HEARTBEAT_S):
                self.lock.write_owner(self._owner())

        threading.Thread(target=heartbeat, name="env-heartbeat", daemon=True).start()
        try:
            if self._ready():  # finished between our look and our lock
                return Environment(self.final / "site", f"environment {self.relative} reused")
            return self._build()
        finally:
            stop.set()
            self.lock.release()

    def _build(self) -> Environment:
        for leftover in self.envs.glob(f"{self.key}.build-*"):
            shutil.rmtree(leftover, ignore_errors=True)  # a dead builder's: we hold the lock
        self.failed.unlink(missing_ok=True)
        work = self.envs / f"{self.key}.build-{self.node_id}"
        work.mkdir()
        pip_log = work / "pip.log"
        self.log(f"building {self.relative} with pip: {' '.join(self.packages)}")
        started = time.monotonic()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_USER")}
        command = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--target",
            str(work / "site"),
            "--disable-pip-version-check",
            "--no-input",
            "--progress-bar",
            "off",
            *self.packages,
        ]
        with open(pip_log, "wb") as out:
            code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        seconds = time.monotonic() - started
        problem = "" if code == 0 else f"pip exited with status {code}"
        if not problem:
            problem = self._check_ray(work / "site")
        if problem:
            tail = pip_log.read_text(errors="replace").splitlines()[-PIP_TAIL_LINES:]
            failure = {
                "at": time.time(),
                "node": self.node_id,
                "packages": self.packages,
                "problem": problem,
                "pip_tail": tail,
            }
            tmp = self.envs / f"{self.key}.failed.{self.node_id}.tmp"
            tmp.write_text(json.dumps(failure))
            tmp.replace(self.failed)
            shutil.rmtree(work, ignore_errors=True)
            raise NodeEnvironmentError(self._failure_message(failure))
        info = {
            "packages": self.packages,
            "runtime": self.runtime,
            "python": python_tag(),
            "built_by": self.node_id,
            "build_s": round(seconds, 1),
            "at": time.time(),
        }
        (work / "env.json").write_text(json.dumps(info, indent=1))
        work.rename(self.final)
        return Environment(
            self.final / "site", f"environment {self.relative} built in {seconds:.0f} s"
        )

    def _check_ray(self, site: Path) -> str:
        """'' when the environment has the pinned Ray, else the problem in one sentence."""
        wanted = ray_pin(self.packages)
        found = sorted(p.name for p in site.glob("ray-*.dist-info"))
        versions = [name[len("ray-") : -len(".dist-info")] for name in found]
        if wanted and versions != [wanted]:
            return f"the environment has Ray {', '.join(versions) or 'missing'}, not {wanted}"
        return ""

    def _failure_message(self, failure: dict) -> str:
        tail = "\n".join(f"    {line}" for line in failure.get("pip_tail", []))
        return (
            f"ray-cml: the node environment {self.relative} could not be built on node "
            f"{failure.get('node', '?')}: {failure.get('problem', 'pip failed')} while "
            f"installing {' '.join(failure.get('packages', self.packages))}. Nodes report "
            f"this for {FAILED_BUILD_HOLD_S / 60:.0f} minutes, then try again (delete "
            f"{ENVS_DIR}/{self.failed.name} to try at once). pip's last lines:\n{tail}"
        )
