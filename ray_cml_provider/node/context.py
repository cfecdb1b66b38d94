"""What every part of a node's launcher shares: who the node is, where its files are, and how
it tells the provider side something (``publish``).

The project filesystem is NFS on CML: a file written on one side may reach the other only
after the client's attribute cache expires (30 s and more). So what the provider must read
(``node.json``, command results, a failure) is published through CML's files API, which
reads its own writes at once, and falls back to the mount only when the API cannot be
reached.
"""

from __future__ import annotations

import contextlib
import socket
import time
from pathlib import Path

from ray_cml_provider.contract import NodeName, NodeSpec, application_prefix, parse_application
from ray_cml_provider.node.project_api import ProjectAPI, ProjectAPIError

PUBLISH_TRIES = 3
DELETE_SELF_TRIES = 5


def log(message: str) -> None:
    print(f"[ray-cml launcher {time.strftime('%H:%M:%S')}] {message}", flush=True)


class NodeContext:
    """The node's identity (``NodeSpec``), folders, address and API; ``state`` is the line
    the status page on the application's port shows."""

    def __init__(self, env: dict[str, str], project_dir: Path | None = None):
        self.env = env  # the launcher's variables: every command starts from them
        self.spec = NodeSpec.from_env(env)
        self.project_dir = project_dir or Path.cwd()
        self.folder = self.spec.folder  # relative to the project: what the files API takes
        self.ip = env.get("CDSW_IP_ADDRESS") or socket.gethostbyname(socket.gethostname())
        self.app_port = int(env.get("CDSW_APP_PORT") or 0)
        self.tmp_dir = f"/tmp/rcml-{self.spec.node_id}"
        self.home = self.mount(f"{self.spec.cluster_dir}/home")  # every command's HOME
        # Ray's token and the endpoint key: files, never values (provider/ray_auth.py).
        self.token_path = (
            self.mount(self.spec.auth_token_file) if self.spec.auth_token_file else None
        )
        key_file = self.spec.endpoint_key_file
        self.endpoint_key_path = self.mount(key_file) if key_file else None
        metrics_file = self.spec.metrics_key_file
        self.metrics_key_path = self.mount(metrics_file) if metrics_file else None
        self.api = ProjectAPI(env, log)
        self.state = "starting"
        self.life = 1  # which start of this node's application (a restart: 2, ...)

    def mount(self, relative: str) -> Path:
        """Where a project path is on this engine's mount of the project filesystem."""
        return self.project_dir / relative

    def publish(self, relative: str, data: bytes, overwrite: bool = False) -> None:
        """Write a project file for the provider side: through the files API, which the
        provider reads back at once; on the mount when the API cannot be reached. CML never
        overwrites a file: ``overwrite`` (and any second try, whose first may have landed)
        deletes the old one first."""
        if self.api.available:
            for attempt in range(PUBLISH_TRIES):
                try:
                    if overwrite or attempt:
                        self.api.delete(relative)
                    self.api.upload(relative, data)
                    return
                except ProjectAPIError as exc:
                    log(f"could not publish {relative.rsplit('/', 1)[-1]} through the API ({exc})")
                    time.sleep(1 + attempt)
        target = self.mount(relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(target)

    def remove(self, relative: str) -> None:
        """Delete a project file: through the API, which reaches one the mount does not show
        yet (NFS), and on the mount; one that is not there is fine."""
        if self.api.available:
            with contextlib.suppress(ProjectAPIError):
                self.api.delete(relative)
        with contextlib.suppress(OSError):
            self.mount(relative).unlink(missing_ok=True)

    def read(self, relative: str) -> bytes | None:
        """A project file: through the API first (it reads its own writes), then the mount."""
        if self.api.available:
            with contextlib.suppress(ProjectAPIError):
                return self.api.download(relative)
        try:
            return self.mount(relative).read_bytes()
        except OSError:
            return None

    def delete_application(self, name: str) -> None:
        """Delete one application of the cluster (this node's own too), trying for a while:
        a lost cluster must leave nothing billing."""
        for _ in range(DELETE_SELF_TRIES):
            try:
                self.api.delete_application_named(name)
                return
            except ProjectAPIError as exc:
                log(f"could not delete application {name} yet: {exc}")
                time.sleep(3)

    def delete_own_application(self) -> None:
        self.delete_application(self.spec.app_name)

    def cluster_applications(self) -> list[tuple[str, str, NodeName]]:
        """(id, name, node) of every application of this cluster."""
        return [(app_id, app["name"], node) for app_id, node, _, app in self.cluster_nodes()]

    def cluster_nodes(
        self, api: ProjectAPI | None = None
    ) -> list[tuple[str, NodeName, dict[str, str], dict]]:
        """(id, node, tags, CML's application) of every application of this cluster, read
        as the provider reads them (``parse_application``: cluster ``c`` is not ``c-2``)."""
        found = []
        for app in (api or self.api).applications(application_prefix(self.spec.cluster)):
            parsed = parse_application(app["name"], str(app.get("description", "")))
            if parsed and parsed[0].cluster == self.spec.cluster:
                found.append((str(app["id"]), parsed[0], parsed[1], app))
        return found
