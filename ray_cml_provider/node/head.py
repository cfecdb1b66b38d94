"""The head node: the cluster's coordination (0 GPUs). ``ray up`` starts its Ray through the
mailbox; the head then keeps its door open, watches its autoscaler, and (when asked for)
recovers after CML restarted it and stops its cluster when idle."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from ray_cml_provider.contract import AutoscalerRecord, RecoveryRecord
from ray_cml_provider.node import watchdog
from ray_cml_provider.node.autostop import Autostop
from ray_cml_provider.node.commands import Commands
from ray_cml_provider.node.context import NodeContext, log
from ray_cml_provider.node.door import Door
from ray_cml_provider.node.history import Historian
from ray_cml_provider.node.mailbox import Mailbox
from ray_cml_provider.node.processes import node_processes, stop_ray_of_this_node
from ray_cml_provider.node.recovery import HeadRecovery

POLL_S = 0.2


class Head:
    def __init__(
        self,
        ctx: NodeContext,
        commands: Commands,
        mailbox: Mailbox,
        door: Door,
        recovery: HeadRecovery,
        historian: Historian,
        ray_started: Callable[[], None],
    ):
        self.ctx = ctx
        self.commands = commands
        self.mailbox = mailbox
        self.door = door
        self.recovery = recovery
        self.historian = historian
        self.ray_started = ray_started  # the history's new run, the head's Prometheus

    def run(self, recovering: RecoveryRecord | None) -> int:
        """Start the head's helpers, start Ray again when recovering, then serve the
        mailbox until the application is deleted (``ray down``). The history of each run of
        its Ray is kept by ``history.Historian``."""
        self.start_thread(self.watch_the_autoscaler, "autoscaler-watchdog")
        self.start_thread(self.historian.watch, "history")
        if self.ctx.spec.autostop_minutes:
            dashboard = f"http://{self.ctx.ip}:{self.commands.ports.dashboard}"
            autostop = Autostop(self.ctx, self.commands, dashboard, self.historian.end)
            self.start_thread(autostop.watch, "autostop")
        if recovering is not None:
            if not self.recovery.restart_ray(recovering):
                stop_ray_of_this_node(ray_tmp_dir=self.ctx.tmp_dir)
                return 1  # FAILED: CML restarts it again, or `ray down` removes it
            self.ray_started()
        self.ctx.state = "running Ray"
        while True:
            self.mailbox.serve_once()
            time.sleep(POLL_S)

    @staticmethod
    def start_thread(target, name: str) -> None:
        threading.Thread(target=target, name=name, daemon=True).start()

    def watch_the_autoscaler(self) -> None:
        """Restart an autoscaler that stopped updating (``watchdog``), and publish what was
        done for ``ray-cml status``."""
        stuck_s = self.ctx.spec.autoscaler_stuck_s
        dog = watchdog.AutoscalerWatchdog(
            self.ctx.tmp_dir, os.getpgrp(), stuck_s, log, node_processes
        )
        while True:
            time.sleep(min(5.0, stuck_s / 4))
            try:
                restart = dog.check()
            except Exception as exc:  # the watchdog must outlive anything it meets
                log(f"watchdog: {exc!r}")
                continue
            if restart is None:
                continue
            record = AutoscalerRecord(
                restarts=dog.restarts,
                last_restart_at=restart.at,
                stalled_s=round(restart.stalled_s, 1),
                stacks="\n".join(restart.stacks.splitlines()[:60]),
            )
            self.ctx.publish(self.ctx.folder.autoscaler, record.to_json(), overwrite=True)
