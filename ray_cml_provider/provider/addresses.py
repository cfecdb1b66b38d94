"""Where a node can be reached: its published address and the URL of its application.

CML's API has no IP address or URL field for an application; each node's launcher
publishes its address and ports in ``<cluster dir>/nodes/<id>/node.json``, and the URL of
an application is ``https://<subdomain>.<workspace domain>`` on CML. The emulator (a
loopback or IP host) has no DNS for subdomains: it serves the URL at
``<host>/apps/<subdomain>/`` (``emulator/ingress.py``).
"""

from __future__ import annotations

import ipaddress
import socket
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

from ray_cml_provider.cml import Application, CMLClient, CMLError
from ray_cml_provider.contract import NodeFolder, NodeInfo


def is_local_host(host: str) -> bool:
    """True for the emulator (a loopback or IP host): applications are reached by IP."""
    name = urlparse(host).hostname or ""
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def node_infos(client: CMLClient, cluster: str, node_ids: list[str]) -> dict[str, NodeInfo]:
    """``node.json`` of each node that has published one (concurrently; missing -> absent)."""

    def fetch(node_id: str) -> tuple[str, NodeInfo | None]:
        try:
            data = client.download_file(NodeFolder.of(cluster, node_id).info)
            return node_id, NodeInfo.from_json(data)
        except (CMLError, ValueError):
            return node_id, None

    if not node_ids:
        return {}
    with ThreadPoolExecutor(min(8, len(node_ids))) as pool:
        return {k: v for k, v in pool.map(fetch, node_ids) if v is not None}


def application_url(host: str, app: Application) -> str:
    """The application's URL: CML's proxy in front of its ``CDSW_APP_PORT``."""
    if is_local_host(host):
        return f"{host.rstrip('/')}/apps/{app.subdomain or app.name}"
    parsed = urlparse(host)
    return f"{parsed.scheme or 'https'}://{app.subdomain or app.name}.{parsed.hostname}"


def reachable(ip: str, port: int, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=timeout_s):
            return True
    except OSError:
        return False
