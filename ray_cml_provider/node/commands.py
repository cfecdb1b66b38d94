"""How a node runs a command: the cluster's ``ray up``/``exec``/``submit`` commands, a
worker's setup and start commands, a recovering head's ``ray start``.

Every command runs in bash with ``HOME`` set to the cluster's own folder (so
``~/ray_bootstrap_config.yaml`` of two clusters in one project never collide), its own
``RAY_TMPDIR``, and the ``ray`` shim first on PATH. CML's own convention is kept:
``PYTHONUSERBASE`` stays the project's ``~/.local``, so what the project's sessions
``pip install``-ed stays visible (the node environment, first on ``PYTHONPATH``, wins where
both have a package). The provider code ``ray up`` shipped comes before both.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from ray_cml_provider.contract import CommandVar, NodeSpec, Request, gcs_state_path
from ray_cml_provider.node import bootstrap
from ray_cml_provider.node.context import NodeContext
from ray_cml_provider.node.ports import NodePorts, PortReservation
from ray_cml_provider.node.preparation import NodeEnvironment

POLL_S = 0.2


class Abandoned(Exception):
    """A command was ended because the condition it was run under no longer holds."""


class Commands:
    def __init__(
        self,
        ctx: NodeContext,
        environment: NodeEnvironment,
        ports: NodePorts,
        reservation: PortReservation,
        ray_env: dict[str, str] | None = None,
    ):
        self.ctx = ctx
        self.environment = environment
        self.ports = ports
        self.reservation = reservation
        # Variables for Ray that a node_config's own may override (the head's Prometheus).
        self.ray_env = ray_env or {}

    # -------------------------------------------------------------- running

    def run(
        self,
        command: str,
        extra_env: dict[str, str],
        output: Path,
        give_up: Callable[[], bool] = lambda: False,
    ) -> int:
        """Run ``command`` in bash, appending its output to ``output``; its exit status.
        Raises ``Abandoned`` (the command killed) once ``give_up()`` says so: a worker's
        ``ray start`` against a dead head could otherwise wait a long time."""
        if "ray start" in command:
            self.reservation.release()  # this node's Ray binds its ports now
        output.parent.mkdir(parents=True, exist_ok=True)
        with open(output, "ab") as out:
            process = subprocess.Popen(
                ["/bin/bash", "-c", command],
                cwd=str(self.ctx.project_dir),
                env=self.env(extra_env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            while True:
                try:
                    return process.wait(timeout=POLL_S)
                except subprocess.TimeoutExpired:
                    if give_up():
                        process.kill()
                        process.wait()
                        raise Abandoned(command) from None

    def answer(self, request: Request, output: Path) -> int:
        """A mailbox request's exit status, its output written to ``output``."""
        if request.report == Request.ENVIRONMENT_REPORT:
            code, text = self.environment.report()
            output.write_text(text)
            return code
        if self.environment.error and not request.is_ray_stop:
            output.write_text(self.environment.error + "\n")
            return 1
        code = self.write_files(request.files, output)
        if code == 0 and request.cmd:
            code = self.run(request.cmd, request.env, output)
        return code

    def write_files(self, files: list[dict], output: Path) -> int:
        """Write the files a request carries (``~`` is the cluster's HOME): how file mounts
        reach a node without waiting for NFS to show a staged copy."""
        home = self.ctx.home
        try:
            for item in files:
                path = item["path"]
                if path == "~" or path.startswith("~/"):
                    path = str(home) + path[1:]
                target = Path(path) if path.startswith("/") else home / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(base64.b64decode(item["data"]))
                if item.get("mode"):
                    target.chmod(int(item["mode"]) & 0o777)
            return 0
        except (OSError, KeyError, ValueError, TypeError) as exc:
            with open(output, "a") as out:
                out.write(f"ray-cml: could not write the files of the request: {exc}\n")
            return 1

    # -------------------------------------------------------------- the environment

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """A command's variables: the launcher's, the node's ports and folders, the shipped
        code and the node environment on ``PYTHONPATH``, Ray's authentication last."""
        ctx, extra = self.ctx, extra or {}
        env = {**self.ray_env, **ctx.env}
        site = self.environment.site
        # The provider code `ray up` shipped (the request's: a newer `ray up` ships newer
        # code), then the node environment, then what was there.
        shipped = extra.get(NodeSpec.var("provider_zip")) or ctx.spec.provider_zip
        python_path = [self.shipped_code(shipped)] if shipped else []
        python_path += [str(site)] if site else []
        python_path += [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []
        bin_dirs = [str(ctx.mount(ctx.folder.bin))]  # the shim first
        bin_dirs += [str(site / "bin")] if site else []
        # Ray Client's proxier forks one server per client; with gRPC's fork handlers on,
        # that server often dies at birth ("Starting Ray client server failed"; Ray issue
        # 63202, seen here in 2 of 5 connections). Without them it starts every time. A
        # node_config environment that sets the variable keeps its own value.
        env.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
        env.update(
            {
                "HOME": str(ctx.home),
                # CML's convention: what sessions `pip install`-ed lives in ~/.local of the
                # project; moving HOME must not hide it.
                "PYTHONUSERBASE": ctx.env.get("PYTHONUSERBASE") or str(ctx.project_dir / ".local"),
                "RAY_TMPDIR": ctx.tmp_dir,
                CommandVar.GCS_PORT: str(self.ports.gcs),
                CommandVar.CLIENT_PORT: str(self.ports.client),
                CommandVar.AGENT_PORT: str(self.ports.agent),
                CommandVar.DASHBOARD_PORT: str(self.ports.dashboard),
                CommandVar.PROJECT_DIR: str(ctx.project_dir),
                CommandVar.PYTHON: sys.executable,  # the runtime's: what `ray` runs with
                CommandVar.LAUNCHER_PGID: str(os.getpgrp()),
                CommandVar.LAUNCHER_PID: str(os.getpid()),
                **self.gcs_storage_env(),
                "PATH": os.pathsep.join(
                    [*bin_dirs, str(ctx.project_dir / ".local" / "bin"), ctx.env.get("PATH", "")]
                ),
            }
        )
        env.update(extra)
        for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            env.pop(name, None)  # only the cluster's own setting counts (set last)
        env.update(self.ray_auth_env())
        if python_path:
            env["PYTHONPATH"] = os.pathsep.join(python_path)
        return env

    def shipped_code(self, relative: str) -> str:
        """Where a command imports the provider code ``ray up`` shipped from: the project's
        copy, or one fetched through the API while NFS does not show it here yet."""
        ctx = self.ctx
        try:
            tmp = Path(ctx.tmp_dir)
            return str(bootstrap.shipped_code(relative, ctx.project_dir, tmp, ctx.api, 0))
        except RuntimeError:
            return str(ctx.mount(relative))

    def gcs_storage_env(self) -> dict[str, str]:
        """On a head with recovery, Ray's GCS keeps its state in the cluster's folder of the
        project filesystem (RocksDB, no Redis): a restarted head's GCS starts from it."""
        spec = self.ctx.spec
        if not (spec.head_recovery and spec.is_head):
            return {}
        return {
            "RAY_gcs_storage": "rocksdb",
            "RAY_gcs_storage_path": str(self.ctx.mount(gcs_state_path(spec.cluster))),
        }

    def ray_auth_env(self) -> dict[str, str]:
        """Ray's authentication for every command: the token's file, or explicitly none (so
        that no ``~/.ray/auth_token`` lying around decides it)."""
        if self.ctx.token_path is None:
            return {"RAY_AUTH_MODE": "disabled"}
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.ctx.token_path)}


def command_failure(command: str, code: int, log_path: Path) -> str:
    """What ``failure.txt`` says of a command that failed: the command, its exit status and
    the last lines of its log (the provider shows it in ``ray status`` and ``ray up``)."""
    try:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
    except OSError:
        tail = []
    return f"`{command}` failed with exit status {code}:\n" + "\n".join(tail)
