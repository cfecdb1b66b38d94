"""A tiny Ray Serve application on a GPU worker: what head recovery's test and bench serve.

Its one deployment asks for a (logical) GPU, so the autoscaler adds a GPU worker for it and
the replica lives off the head; it answers which node and engine served the request. Ray is
imported only where Serve builds the application, so the config helper is cheap to import.
"""

from __future__ import annotations

import os
from typing import Any

IMPORT_PATH = "ray_cml_provider.demo.echo_app:build"


def build(args: dict[str, Any]) -> Any:
    """Serve's application builder (``import_path``); ``args``: ``{"gpus": 0}`` puts the
    replica on the head instead (a test of the head alone)."""
    import ray
    from ray import serve

    @serve.deployment(ray_actor_options={"num_gpus": args.get("gpus", 1), "num_cpus": 0})
    class Echo:
        async def __call__(self, request) -> dict:
            return {
                "echo": request.query_params.get("say", ""),
                "node": ray.get_runtime_context().get_node_id(),
                "engine_ip": os.environ.get("CDSW_IP_ADDRESS", ""),
            }

    return Echo.bind()


def serve_config(port: int = 8000, route_prefix: str = "/v1/echo", gpus: int = 1) -> dict[str, Any]:
    """The ``serve deploy`` config of this application behind the head's gateway, which
    sends ``/v1`` to Serve's proxy on the head's loopback, ``port`` (``RAY_CML_SERVE_PORT``):
    nothing but the gateway reaches it."""
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": "echo",
                "route_prefix": route_prefix,
                "import_path": IMPORT_PATH,
                "args": {"gpus": gpus},
            }
        ],
    }
