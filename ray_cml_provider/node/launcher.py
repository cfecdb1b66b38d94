"""What runs inside every CML application of a Ray cluster once the bootstrap made the node's
environment ready: the node launcher (``python -m ray_cml_provider.node.launcher``).

The bootstrap (``bootstrap.py``, standard library) answered CML's poll and prepared the
environment, then ``exec``-ed this module with the shipped provider code and that
environment first on ``PYTHONPATH``. This module and the parts it builds import only the
standard library at the top, so a node whose environment could not be made still starts,
reports why (to ``ray up`` for the head, in ``failure.txt`` for a worker), answers ``ray
stop``, and tries again when ``ray up`` asks; only the head's gateway imports aiohttp.

A node's life, as a short state machine (``run``):

1. **previous life?** CML restarted the FAILED application. A worker, or a head without
   recovery, removes itself (a node's identity is single-use: Ray and the provider already
   wrote it off). A head with recovery begins a new life (``recovery.py``).
2. **prepare**: the cluster's secrets owner-only, the ``ray`` shim, ``node.json`` published
   (``preparation.py``); the application's port answers (``door.py``).
3. **run as its kind**: a ``Worker`` starts its own Ray and watches its head (``worker.py``);
   a ``Head`` runs its helpers and waits for ``ray up``'s commands (``head.py``). Both serve
   the mailbox (``mailbox.py``) through which ``ray up``/``exec``/``submit``/``down`` reach
   them, and every command runs the same way (``commands.py``).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
from pathlib import Path

from ray_cml_provider.contract import CommandVar, Request, Result
from ray_cml_provider.node import prometheus
from ray_cml_provider.node.commands import Commands
from ray_cml_provider.node.context import NodeContext, log
from ray_cml_provider.node.door import Door
from ray_cml_provider.node.down_after_job import DownAfterJob
from ray_cml_provider.node.head import Head
from ray_cml_provider.node.history import Historian
from ray_cml_provider.node.job_package import JobPackageError, package_uri
from ray_cml_provider.node.mailbox import Mailbox
from ray_cml_provider.node.ports import PortReservation
from ray_cml_provider.node.preparation import NodeEnvironment, NoToken, prepare, previous_life
from ray_cml_provider.node.processes import stop_ray_of_this_node
from ray_cml_provider.node.recovery import HeadRecovery
from ray_cml_provider.node.worker import Worker


class NodeLauncher:
    """Builds the node's parts and runs its life."""

    def __init__(self, env: dict[str, str]):
        self.ctx = ctx = NodeContext(env)
        self.reservation = PortReservation()
        binary = prometheus.find_binary(ctx, self.search_path()) if ctx.spec.is_head else None
        self.ports = self.reservation.choose(
            ctx.spec.gcs_port_preferred, ctx.spec.is_head, prometheus=binary is not None
        )
        self.prometheus = (
            prometheus.HeadPrometheus(ctx, binary, self.ports.prometheus) if binary else None
        )
        self.environment = NodeEnvironment(ctx, on_ready=lambda: self.door.open())
        self.door = Door(ctx, self.ports, lambda: self.environment.error)
        self.commands = Commands(
            ctx,
            self.environment,
            self.ports,
            self.reservation,
            ray_env=self.prometheus.ray_env() if self.prometheus else None,
        )
        self.recovery = HeadRecovery(ctx, self.commands)
        self.historian = Historian(ctx, self.ports.dashboard) if ctx.spec.is_head else None
        self.down_after_job = (
            DownAfterJob(ctx, f"http://{ctx.ip}:{self.ports.dashboard}", self.historian.end)
            if self.historian is not None
            else None
        )
        self.mailbox = Mailbox(ctx, self.answer, answered=self.answered)

    def answer(self, request: Request, output: Path) -> int:
        """A mailbox request. On the head: ``job submit --down``'s request starts the
        watch on its job, ``--working-dir``'s gets its package's URI; ``ray stop`` ends the
        history's run first (the jobs and figures are read while Ray still runs)."""
        if request.report == Request.DOWN_AFTER_JOB:
            job = request.env.get("job", "")
            if self.down_after_job is None or not job:
                output.write_text("ray-cml: only a head deletes its cluster after a job\n")
                return 2
            output.write_text(self.down_after_job.watch(job) + "\n")
            return 0
        if request.report == Request.JOB_PACKAGE:
            if not self.ctx.spec.is_head:
                output.write_text("ray-cml: only a head takes a job's working directory\n")
                return 2
            try:
                output.write_text(package_uri(self.ctx, request.env.get("package", "")) + "\n")
                return 0
            except JobPackageError as exc:
                output.write_text(f"ray-cml: {exc}\n")
                return 1
        if self.historian is not None and request.is_ray_stop:
            try:
                self.historian.end("ray stop")
            except Exception as exc:  # never in the way of `ray stop`
                log(f"history: could not end the run: {exc!r}")
        return self.commands.answer(request, output)

    def answered(self, request: Request, result: Result, started_at: float) -> None:
        self.recovery.remember(request, result.exit_status)
        if self.historian is not None:
            self.historian.remember(request, result.exit_status, result.output, started_at)
        if result.exit_status == 0 and request.starts_head:
            self.head_ray_started()

    def head_ray_started(self) -> None:
        """The head's Ray runs (``ray up``'s start, or a recovering head's): its history
        begins a run, and its Prometheus starts (in a thread: it waits for Ray's config)."""
        if self.historian is not None:
            self.historian.begin()
        if self.prometheus is not None:
            threading.Thread(target=self.prometheus.start, daemon=True).start()

    def search_path(self) -> str:
        """Where the head looks for a ``prometheus``: the project's ``~/.local/bin``, then
        the runtime's ``PATH``."""
        local = self.ctx.project_dir / ".local" / "bin"
        return os.pathsep.join([str(local), self.ctx.env.get("PATH", "")])

    def run(self) -> int:
        ctx = self.ctx
        recovering = None
        previous = previous_life(ctx)
        if previous is not None:
            recovering = self.recovery.recorded_start()
            if recovering is None:
                log(f"node {ctx.spec.node_id} was restarted by CML after a failure: removing it")
                ctx.delete_own_application()
                return 0
            self.recovery.begin_new_life(previous, self.mailbox)
        try:
            prepare(ctx, self.ports, self.environment.ready())
        except NoToken as exc:
            log(str(exc))
            ctx.publish(ctx.folder.failure, str(exc).encode(), overwrite=True)
            return 1
        self.door.open()
        if ctx.spec.is_head:
            assert self.historian is not None
            parts = (self.commands, self.mailbox, self.door, self.recovery, self.historian)
            head = Head(ctx, *parts, ray_started=self.head_ray_started)
            return head.run(recovering)
        return Worker(ctx, self.commands, self.mailbox).run()


def main() -> int:
    # This node's processes are this group's (stop_ray_of_this_node ends the group it names).
    os.environ[CommandVar.LAUNCHER_PGID] = str(os.getpgrp())
    launcher = NodeLauncher(dict(os.environ))
    tmp_dir = launcher.ctx.tmp_dir

    def leave(signum: int, _frame: object) -> None:
        # The temporary folder first: CML (or the emulator) may SIGKILL us any moment now.
        shutil.rmtree(tmp_dir, ignore_errors=True)
        stop_ray_of_this_node(grace_s=1, ray_tmp_dir=tmp_dir)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, leave)
    code = launcher.run()
    shutil.rmtree(tmp_dir, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
