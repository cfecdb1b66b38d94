"""What answers on the application's port (``CDSW_APP_PORT``), the one port CML's proxy
exposes: on a head whose environment is ready, the gateway (``gateway.py``: ``/v1`` to Serve,
the rest to the dashboard, keys checked); otherwise (a worker, or a head whose environment
failed) the bootstrap's status page, since CML polls that port to learn the application is
up."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from ray_cml_provider.node import bootstrap
from ray_cml_provider.node.context import NodeContext, log
from ray_cml_provider.node.ports import NodePorts


class Door:
    def __init__(self, ctx: NodeContext, ports: NodePorts, environment_error: Callable[[], str]):
        self.ctx = ctx
        self.ports = ports
        self.environment_error = environment_error  # () -> str, '' when the environment is ready
        self.current = None  # the gateway or the status page
        self.gateway_open = False
        self._lock = threading.Lock()

    def open(self) -> None:
        """Open the best door there is now; the gateway once it can be (idempotent)."""
        if not self.ctx.app_port:
            return
        with self._lock:
            if self.gateway_open:
                return
            if self.current is not None:
                self.current.close()
                self.current = None
            if self.ctx.spec.is_head and not self.environment_error():
                self.current = self.open_gateway()
                self.gateway_open = self.current is not None
            if self.current is None:
                self.current = bootstrap.open_status_page(self.ctx.env, self.describe)

    def describe(self) -> str:
        """The status page's line."""
        failed = self.environment_error()
        state = "its Python environment failed" if failed else self.ctx.state
        return bootstrap.status_line(self.ctx.spec, state)

    @staticmethod
    def door_figures():
        """What callers see at the gateway (prometheus_client); None without it."""
        try:
            from ray_cml_provider.node.door_figures import DoorFigures
        except ImportError as exc:
            log(f"no gateway figures: {exc}")
            return None
        return DoorFigures()

    def cluster_metrics(self, figures):
        """Every live node's export, and the gateway's figures, at ``/metrics``
        (prometheus_client, from the environment); None, with one line in the log, without
        it."""
        try:
            from ray_cml_provider.node import cluster_metrics
        except ImportError as exc:
            log(f"no /metrics: {exc}")
            return None

        ctx = self.ctx
        session_dir = Path(ctx.tmp_dir) / "ray" / "session_latest"
        nodes = cluster_metrics.NodeMap(ctx.mount(f"{ctx.spec.cluster_dir}/nodes"))
        own = (ctx.ip, figures.exposition) if figures is not None else None
        return cluster_metrics.ClusterMetrics(
            session_dir / cluster_metrics.DISCOVERY_FILE, nodes, own=own
        )

    def open_gateway(self):
        """The gateway (aiohttp, from the node's environment); None, with one line in the log,
        when it cannot start."""
        try:
            from ray_cml_provider.node import gateway  # aiohttp: only in the environment
        except ImportError as exc:
            log(f"no gateway: {exc}; the node's environment needs ray[default]")
            return None
        ctx, spec, port = self.ctx, self.ctx.spec, self.ctx.app_port
        upstreams = {
            # Serve's proxy listens on the head's loopback only (the shipped Serve configs).
            "serve": gateway.Upstream("127.0.0.1", spec.serve_port, "Ray Serve's HTTP proxy"),
            "dashboard": gateway.Upstream(ctx.ip, self.ports.dashboard, "the Ray dashboard"),
        }
        keys = gateway.Keys(
            endpoint_key_file=ctx.endpoint_key_path,
            ray_token_file=ctx.token_path,
            locked=spec.login_bypassed,
            metrics_key_file=ctx.metrics_key_path,
        )
        figures = self.door_figures()
        running_gateway = gateway.Gateway(
            **upstreams,
            keys=keys,
            log=log,
            limits=gateway.Limits(
                idle_s=spec.gateway_idle_s, max_connections=spec.gateway_max_connections
            ),
            metrics=self.cluster_metrics(figures),
            figures=figures,
        )
        try:
            running = gateway.RunningGateway(running_gateway, ctx.ip, port)
        except OSError as exc:
            log(f"no gateway on port {port}: {exc}")
            return None
        outside = "without CML's login" if spec.login_bypassed else "behind CML's login"
        log(
            f"gateway on port {port} ({outside}): /v1 -> Serve 127.0.0.1:{spec.serve_port} "
            f"(endpoint key), the rest -> dashboard :{self.ports.dashboard}, "
            f"at most {running.max_connections} connections"
        )
        return running
