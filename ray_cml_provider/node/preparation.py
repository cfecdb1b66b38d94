"""A node's set-up: its Python environment as the bootstrap left it, the cluster's secrets
made owner-only, the ``ray`` shim, and ``node.json`` published for the provider."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ray_cml_provider.contract import Handoff, NodeInfo
from ray_cml_provider.node import bootstrap, environment
from ray_cml_provider.node.context import NodeContext, log
from ray_cml_provider.node.ports import NodePorts

# How long a node waits for the cluster's token to show on the project's mount (NFS).
TOKEN_WAIT_S = 120.0


class NoToken(Exception):
    """The cluster asks for Ray's token authentication but its token file is not there."""


class NodeEnvironment:
    """The node's Python environment (``node/environment.py``): what the bootstrap made, or
    why it could not; ``retry`` tries again (``ray up`` again asks for it)."""

    def __init__(self, ctx: NodeContext, on_ready: Callable[[], None] = lambda: None):
        self.ctx = ctx
        self.on_ready = on_ready  # the head opens its gateway once the environment is there
        handoff = Handoff.from_env(ctx.env)
        self.error = handoff.error
        self.environment = (
            None
            if self.error
            else environment.Environment(
                Path(handoff.site) if handoff.site else None,
                handoff.summary or "no packages asked for",
            )
        )
        # The node's commands get the runtime's own PYTHONPATH back (the shipped code and
        # the environment go in front of it again, per command).
        ctx.env["PYTHONPATH"] = handoff.runtime_pythonpath
        for name in Handoff.variables():
            ctx.env.pop(name, None)
        if not ctx.env["PYTHONPATH"]:
            del ctx.env["PYTHONPATH"]
        self._lock = threading.Lock()

    @property
    def site(self) -> Path | None:
        return self.environment.site if self.environment else None

    def retry(self) -> bool:
        """Build again when the bootstrap's build failed (``environment`` says when a failed
        build may be tried again); once it works this process imports from it too (the
        gateway needs aiohttp). False, with the reason in ``error``, while it fails."""
        with self._lock:
            if not self.error:
                return True
            made, error = bootstrap.prepare_environment(self.ctx.spec, self.ctx.project_dir)
            log(error or made.summary)
            self.error = error
            if error:
                return False
            self.environment = made
            if made.site and str(made.site) not in sys.path:
                sys.path.insert(0, str(made.site))
        self.on_ready()
        return True

    def report(self) -> tuple[int, str]:
        """What ``ray up``'s first contact (``Request.report``) answers: the summary and the
        Ray version commands see, or the failure."""
        if not self.retry():
            return 1, self.error + "\n"
        summary, ray_version = self.ready()
        return 0, f"{summary}\nRAY_VERSION={ray_version}\n"

    def ready(self) -> tuple[str, str]:
        """(summary, Ray version) of the environment as it is; ("", "") while it failed."""
        if self.error or self.environment is None:
            return "", ""
        return self.environment.summary, environment.ray_pin(self.ctx.spec.pip_packages)


def previous_life(ctx: NodeContext) -> NodeInfo | None:
    """What the node published in its last life, when CML restarted its FAILED application
    (None on a first start)."""
    data = ctx.mount(ctx.folder.info)
    try:
        return NodeInfo.from_json(data.read_bytes())
    except (OSError, ValueError):
        return NodeInfo(ctx.spec.node_id, ctx.spec.kind, "", 0) if data.exists() else None


def secure_secrets(ctx: NodeContext) -> None:
    """Wait for the cluster's token (and, on a head, its endpoint key) to show on the mount
    (``ray up`` wrote them through the API before creating the node), then make them
    owner-only. Raises ``NoToken``."""
    files = [path for path in (ctx.token_path, ctx.endpoint_key_path, ctx.metrics_key_path) if path]
    if not files:
        return
    started = time.monotonic()
    next_note = started + 15
    while not all(path.is_file() for path in files):
        missing = next(path for path in files if not path.is_file())
        waited = time.monotonic() - started
        if waited > TOKEN_WAIT_S:
            what = {ctx.token_path: "Ray token", ctx.endpoint_key_path: "endpoint key"}.get(
                missing, "metrics key"
            )
            raise NoToken(
                f"ray-cml: the cluster's {what} ({missing}) is not in the project after "
                f"{waited:.0f} s; `ray down` and `ray up` make a new one"
            )
        if time.monotonic() > next_note:
            next_note = time.monotonic() + 15
            log(f"waiting for {missing.name} to show here ({waited:.0f} s)")
        time.sleep(1.0)
    try:  # another node may be doing the same now
        files[0].parent.chmod(0o700)
        for path in files:
            path.chmod(0o600)
    except OSError:
        pass


def write_ray_shim(ctx: NodeContext) -> None:
    """``ray`` first on every command's PATH: ``ray stop`` stops only this node's Ray (the
    bootstrap's ``stop-ray``: no environment needed), ``ray start`` keeps the node's files
    in its own ``RAY_TMPDIR``."""
    shim_dir = ctx.mount(ctx.folder.bin)
    shim_dir.mkdir(parents=True, exist_ok=True)
    shim = shim_dir / "ray"
    shim.write_text(
        "#!/bin/bash\n"
        "# ray-cml: 'ray stop' stops only this node's Ray, never other processes here.\n"
        'if [ "$1" = "stop" ]; then\n'
        f'  exec "{sys.executable}" "{bootstrap_script(ctx)}" stop-ray\n'
        "fi\n"
        f'PATH="${{PATH#{shim_dir}:}}"\n'
        "# ray-cml: 'ray start' keeps the node's files in its own RAY_TMPDIR. Ray would put a\n"
        "# worker's in the head's path, where nodes sharing a host (the emulator) race for\n"
        "# the same socket names.\n"
        'if [ "$1" = "start" ] && [[ " $* " != *" --temp-dir"* ]]; then\n'
        "  shift\n"
        '  exec ray start --temp-dir="$RAY_TMPDIR/ray" "$@"\n'
        "fi\n"
        'exec ray "$@"\n'
    )
    shim.chmod(0o755)


def bootstrap_script(ctx: NodeContext) -> Path:
    """The application's script (``bootstrap.py`` in the cluster's folder, next to the
    modules it imports); the package's own copy when there is none (tests)."""
    uploaded = ctx.mount(f"{ctx.spec.cluster_dir}/bootstrap.py")
    return uploaded if uploaded.exists() else Path(bootstrap.__file__).resolve()


def prepare(ctx: NodeContext, ports: NodePorts, ready: tuple[str, str] = ("", "")) -> None:
    """Secrets, folders, the shim, then ``node.json``: the node is reachable from now on;
    ``ready``: its environment's (summary, Ray version) when it is ready. Raises
    ``NoToken``."""
    secure_secrets(ctx)
    for folder in (ctx.folder.inbox, ctx.folder.outbox):
        ctx.mount(folder).mkdir(parents=True, exist_ok=True)
    ctx.home.mkdir(parents=True, exist_ok=True)
    write_ray_shim(ctx)
    spec = ctx.spec
    info = NodeInfo(
        node_id=spec.node_id,
        kind=spec.kind,
        node_type=spec.node_type,
        ip=ctx.ip,
        gcs_port=ports.gcs,
        client_port=ports.client,
        app_port=ctx.app_port,
        dashboard_port=ports.dashboard,
        serve_port=spec.serve_port if spec.is_head else 0,
        endpoint_locked=ctx.endpoint_key_path is not None,
        ray_auth="token" if ctx.token_path else "disabled",
        auth_token_path=str(ctx.token_path or ""),
        pid=os.getpid(),
        started_at=time.time(),
        life=ctx.life,
        prometheus_port=ports.prometheus,
        environment=ready[0],
        ray_version=ready[1],
    )
    ctx.publish(ctx.folder.info, info.to_json(), overwrite=ctx.life > 1)
    log(f"{spec.kind} node {spec.node_id} of cluster {spec.cluster} on {ctx.ip}")
