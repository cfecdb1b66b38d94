"""Head recovery (``provider.head_recovery``): a head CML restarts starts Ray again from the
cluster's saved state, so Serve applications come back by themselves.

The head keeps its GCS state in the cluster's folder (RocksDB, ``Commands.gcs_storage_env``)
and records the ``ray start --head`` that ``ray up`` ran (``RecoveryRecord``). When CML
restarts the failed head, the new life (on a new address) answers what the old one left
unanswered, publishes its address, runs the cluster's setup commands and the recorded
start; workers find the new address in ``node.json`` and rejoin (``worker.py``).
"""

from __future__ import annotations

import shutil

from ray_cml_provider.contract import NodeInfo, RecoveryRecord, Request
from ray_cml_provider.node.commands import Commands, command_failure
from ray_cml_provider.node.context import NodeContext, log
from ray_cml_provider.node.mailbox import Mailbox
from ray_cml_provider.node.processes import stop_ray_of_this_node

START_TRIES = 3  # of the recorded `ray start --head`


class HeadRecovery:
    def __init__(self, ctx: NodeContext, commands: Commands):
        self.ctx = ctx
        self.commands = commands

    @property
    def enabled(self) -> bool:
        return self.ctx.spec.is_head and self.ctx.spec.head_recovery

    def remember(self, request: Request, code: int) -> None:
        """Keep the ``ray start --head`` that just worked (its command and the environment
        Ray's updater gave it): what a restarted head runs."""
        if self.enabled and code == 0 and request.starts_head:
            record = RecoveryRecord(request.cmd, request.env)
            self.ctx.publish(self.ctx.folder.recovery, record.to_json(), overwrite=True)

    def recorded_start(self) -> RecoveryRecord | None:
        """The ``ray start --head`` this head ran last, if recovery is on and there is one."""
        if not self.enabled:
            return None
        data = self.ctx.read(self.ctx.folder.recovery)
        try:
            return RecoveryRecord.from_json(data) if data else None
        except ValueError:
            return None

    def begin_new_life(self, previous: NodeInfo, mailbox: Mailbox) -> None:
        """Count the life, start from a clean Ray folder, and answer what the old life was
        running when it died."""
        self.ctx.life = previous.life + 1
        # On CML a restarted application is a new pod with an empty /tmp; on one machine
        # (the emulator) the old life's Ray files are still there: start clean.
        shutil.rmtree(self.ctx.tmp_dir, ignore_errors=True)
        mailbox.answer_unanswered("the head restarted while this command ran; it was not run again")
        node, life = self.ctx.spec.node_id, self.ctx.life
        log(f"head {node} restarted by CML (life {life}): recovering the cluster")

    def restart_ray(self, record: RecoveryRecord) -> bool:
        """The cluster's setup commands, then the recorded ``ray start --head`` on this new
        address; the GCS finds the cluster's state in its folder. False (with
        ``failure.txt``) when that fails."""
        ctx = self.ctx
        ctx.state = "recovering: preparing its Python environment"
        if not self.commands.environment.retry():
            ctx.publish(
                ctx.folder.failure, self.commands.environment.error.encode(), overwrite=True
            )
            return False
        ctx.state = "recovering: starting Ray from the cluster's saved state"
        log_path = ctx.mount(ctx.folder.recovery_log)
        steps = [(c, {}, 1) for c in ctx.spec.setup_commands]
        steps.append((record.cmd, record.env, START_TRIES))
        for command, extra, tries in steps:
            for attempt in range(1, tries + 1):
                log(f"$ {command}")
                code = self.commands.run(command, extra, log_path)
                if code == 0:
                    break
                log(f"recovery: `{command}` failed with exit status {code}: see {log_path}")
                if attempt == tries:
                    failure = "recovery: " + command_failure(command, code, log_path)
                    ctx.publish(ctx.folder.failure, failure.encode(), overwrite=True)
                    return False
                # Ray gives its raylet 30 s to register with the GCS; a recovering GCS on a
                # busy machine can take longer. Stop what started and try again.
                stop_ray_of_this_node(grace_s=5, ray_tmp_dir=ctx.tmp_dir)
        log("recovered: Ray runs again from the cluster's saved state")
        return True
