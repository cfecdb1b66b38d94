"""Autostop (``provider.autostop_minutes``): the head stops its cluster once it has been idle
that long (``cluster/idleness.py`` says what idle is). It leaves ``AutostopRecord`` in the
cluster's folder for ``ray-cml status`` and deletes every application of the cluster, itself
last; ``ray up`` brings the cluster back."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable

from ray_cml_provider.contract import AutostopRecord, autostop_record_path
from ray_cml_provider.node.commands import Commands
from ray_cml_provider.node.context import NodeContext, log
from ray_cml_provider.node.project_api import ProjectAPIError
from ray_cml_provider.node.teardown import delete_the_cluster

PROBE_TIMEOUT_S = 60


class Autostop:
    def __init__(
        self,
        ctx: NodeContext,
        commands: Commands,
        dashboard_url: str,
        before_stop: Callable[[str], None] = lambda why: None,
    ):
        self.ctx = ctx
        self.before_stop = before_stop  # the history's last snapshot, while Ray still runs
        self.commands = commands
        self.dashboard_url = dashboard_url
        self.after_s = ctx.spec.autostop_minutes * 60

    def watch(self) -> None:
        """In a thread: ask ``cluster.idleness`` every few seconds; once the cluster has been
        idle for ``after_s``, stop it. Any answer but "idle" (busy, or Ray not answering)
        starts the count again."""
        check_s = max(2.0, min(30.0, self.after_s / 4))
        idle_since: float | None = None
        log(f"autostop: the cluster stops after {self.after_s / 60:g} idle minute(s)")
        while True:
            time.sleep(check_s)
            if self.commands.environment.error:
                continue
            answer = self.probe()
            now = time.monotonic()
            if not answer.get("idle"):
                if idle_since is not None:
                    log(f"autostop: busy again ({'; '.join(answer.get('busy') or [])})")
                idle_since = None
                continue
            if idle_since is None:
                idle_since = now
                log("autostop: the cluster is idle")
            if now - idle_since >= self.after_s:
                self.stop_cluster(now - idle_since)
                return

    def probe(self) -> dict:
        """``cluster.idleness``'s answer, run in the node's environment."""
        try:
            probe = subprocess.run(
                [sys.executable, "-m", "ray_cml_provider.cluster.idleness"]
                + ["--dashboard", self.dashboard_url],
                env=self.commands.env(),
                capture_output=True,
                text=True,
                timeout=PROBE_TIMEOUT_S,
            )
            return json.loads(probe.stdout.strip().splitlines()[-1])
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            return {"idle": False, "busy": ["the idleness probe failed"]}

    def stop_cluster(self, idle_s: float) -> None:
        """Record why, stop Ray here (its autoscaler would replace workers), then delete every
        application of the cluster, this head last."""
        ctx = self.ctx
        log(f"autostop: idle for {idle_s:.0f} s: stopping the cluster")
        record = AutostopRecord(
            stopped_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            idle_minutes=round(idle_s / 60, 2),
            autostop_minutes=ctx.spec.autostop_minutes,
            head=ctx.spec.node_id,
        )
        try:
            ctx.api.upload(autostop_record_path(ctx.spec.cluster), record.to_json())
        except ProjectAPIError as exc:
            log(f"autostop: could not leave the record: {exc}")
        delete_the_cluster(ctx, "autostop", self.before_stop)
