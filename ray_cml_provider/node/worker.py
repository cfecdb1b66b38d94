"""A worker node: it starts its own Ray, watches its head, and leaves when the head is gone.

The autoscaler's updaters are disabled for CML (no SSH), so a worker runs the cluster's
setup commands and ``worker_start_ray_commands`` itself, with its type's exact resources
(``RAY_OVERRIDE_RESOURCES``, set by the provider). It exits, deleting its own application,
once the head has been unreachable for ``head_lost_timeout_s``: a dead head never leaves
GPU applications running. With head recovery, a worker whose head went away watches the
head's ``node.json`` and, when a new address answers, starts its Ray again against it (the
same node, the same resources): it rejoins.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from ray_cml_provider.contract import NodeFolder, NodeInfo, NodeSpec
from ray_cml_provider.node.commands import Abandoned, Commands, command_failure
from ray_cml_provider.node.context import NodeContext, log
from ray_cml_provider.node.mailbox import Mailbox
from ray_cml_provider.node.processes import stop_ray_of_this_node

POLL_S = 0.2
HEAD_CHECK_S = 2.0
NEW_HEAD_CHECK_S = 3.0  # how often a worker whose head is gone looks for its new address


class HeadGone(Exception):
    """The worker's head has been unreachable for longer than the configured time."""


def reachable(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=2):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class HeadAddress:
    ip: str
    gcs_port: int
    app_port: int = 0  # 0: not known (a head from before workers were told it)

    def answers(self) -> bool:
        """The head's GCS answers, and (when known) its application port. Ray's GCS listens
        on every address of its machine, so on one machine (the emulator) another cluster's
        new head can take a dead head's GCS port; the application port is bound to the
        head's own address only, so it answers for this head alone."""
        if not reachable(self.ip, self.gcs_port):
            return False
        return not self.app_port or reachable(self.ip, self.app_port)

    @property
    def ray_env(self) -> dict[str, str]:
        return {
            NodeSpec.var("head_ip"): self.ip,
            NodeSpec.var("head_gcs_port"): str(self.gcs_port),
        }


class HeadWatch:
    """Where the worker's head is, and since when it has been unreachable."""

    def __init__(self, ctx: NodeContext):
        self.ctx = ctx
        spec = ctx.spec
        self.address = HeadAddress(spec.head_ip, spec.head_gcs_port or 6379, spec.head_app_port)
        self.lost_since: float | None = None
        self._next_check = 0.0
        self._next_new_address_check = 0.0

    def gone_too_long(self) -> bool:
        """Check the head's GCS port every few seconds; True once it has been unreachable
        for longer than ``head_lost_timeout_s``."""
        now = time.monotonic()
        if now < self._next_check:
            return False
        self._next_check = now + HEAD_CHECK_S
        if self.address.answers():
            self.lost_since = None
            return False
        if self.lost_since is None:
            self.lost_since = now
            log("the head is unreachable")
        return now - self.lost_since > self.ctx.spec.head_lost_timeout_s

    def new_address(self) -> HeadAddress | None:
        """With head recovery, while the head is unreachable: the address its restarted
        application published, once its GCS answers there (every few seconds, one API
        call, or the mount without one); None while there is none."""
        spec, now = self.ctx.spec, time.monotonic()
        if not (spec.head_recovery and spec.head_node_id and self.lost_since is not None):
            return None
        if now < self._next_new_address_check:
            return None
        self._next_new_address_check = now + NEW_HEAD_CHECK_S
        head = NodeFolder(spec.cluster_dir, spec.head_node_id)
        data = self.ctx.read(head.info)
        try:
            info = NodeInfo.from_json(data or b"")
        except ValueError:
            return None
        address = HeadAddress(info.ip, info.gcs_port, info.app_port)
        if address == self.address or not address.answers():
            return None
        return address

    def moved_to(self, address: HeadAddress) -> None:
        self.address = address
        self.lost_since = None


class Worker:
    def __init__(self, ctx: NodeContext, commands: Commands, mailbox: Mailbox):
        self.ctx = ctx
        self.commands = commands
        self.mailbox = mailbox
        self.head = HeadWatch(ctx)

    def run(self) -> int:
        """Start Ray; then serve the mailbox and watch the head until it is gone (also while
        Ray starts: a head that goes away then is left just the same)."""
        try:
            if not self.start_ray(self.ctx.spec.setup_commands + self.ctx.spec.start_commands):
                stop_ray_of_this_node(ray_tmp_dir=self.ctx.tmp_dir)
                return 1
            self.ctx.state = "running Ray"
            log("Ray started; watching the head")
            while True:
                self.mailbox.serve_once()
                if self.head.gone_too_long():
                    raise HeadGone()
                moved = self.head.new_address()
                if moved:
                    self.rejoin(moved)
                time.sleep(POLL_S)
        except HeadGone:
            log(f"the head has been gone over {self.ctx.spec.head_lost_timeout_s:.0f} s: leaving")
            stop_ray_of_this_node(ray_tmp_dir=self.ctx.tmp_dir)
            self.ctx.delete_own_application()
            return 0

    def start_ray(self, commands: list[str]) -> bool:
        """Run ``commands`` against the head; False, with ``failure.txt`` published (the
        provider shows it in ``ray status`` and monitor.log), when one fails. Raises
        ``HeadGone`` when the head goes away meanwhile."""
        if self.commands.environment.error:
            self.ctx.publish(self.ctx.folder.failure, self.commands.environment.error.encode())
            return False
        self.ctx.state = "starting Ray"
        ray_env = {
            **self.head.address.ray_env,
            "RAY_CLOUD_INSTANCE_ID": self.ctx.spec.node_id,  # Ray's: the node's cloud id
        }
        log_path = self.ctx.mount(self.ctx.folder.setup_log)
        for command in commands:
            log(f"$ {command}")
            try:
                code = self.commands.run(
                    command, ray_env, log_path, give_up=self.head.gone_too_long
                )
            except Abandoned:
                raise HeadGone() from None
            if code != 0:
                log(f"command failed with exit status {code}; see {log_path}")
                failure = command_failure(command, code, log_path)
                self.ctx.publish(self.ctx.folder.failure, failure.encode(), overwrite=True)
                return False
        return True

    def rejoin(self, address: HeadAddress) -> None:
        """Start this worker's Ray again against the restarted head: the same node (cloud
        instance id) with the same resources. Raises ``HeadGone`` when that fails."""
        log(f"the head is back at {address.ip}:{address.gcs_port}: starting Ray again against it")
        self.ctx.state = "rejoining the restarted head"
        stop_ray_of_this_node(grace_s=5, ray_tmp_dir=self.ctx.tmp_dir)
        self.head.moved_to(address)
        if not self.start_ray(self.ctx.spec.start_commands):
            raise HeadGone()
        self.ctx.state = "running Ray"
        log("Ray started again; watching the head")
