"""``ray-cml job submit --working-dir``, on the head: the job's package, where every node
reads it.

The submitter uploads the working directory as Ray's own zip through CML's files API into
the cluster's folder (``contract.job_package_path``), then asks the head, through its mailbox
(``Request.JOB_PACKAGE``), for the package's ``file://`` URI. The job's ``runtime_env`` names
that URI as its ``working_dir``: Ray's runtime env agent on each node unpacks it from the
project filesystem, so the directory never goes through the GCS (Ray's own upload of a local
``working_dir`` is capped by its gRPC message size, 512 MiB).

A file uploaded through the API may reach an engine's NFS mount only later; the head waits
for it a little, then fetches it through the API and writes it into the project itself (the
engines of a project share one filesystem: what the head writes, the workers see).
"""

from __future__ import annotations

import time
from pathlib import Path

from ray_cml_provider.contract import job_package_path
from ray_cml_provider.node.context import NodeContext, log
from ray_cml_provider.node.project_api import ProjectAPIError

MOUNT_WAIT_S = 5.0


class JobPackageError(RuntimeError):
    """The package is not in the project and could not be fetched: one line for the user."""


def package_uri(ctx: NodeContext, package: str, mount_wait_s: float = MOUNT_WAIT_S) -> str:
    """The ``file://`` URI of ``package`` (a ``_ray_pkg_<hash>.zip`` name) on this cluster's
    nodes, once it is on the project's mount. Raises ``JobPackageError``."""
    try:
        relative = job_package_path(ctx.spec.cluster, package)
    except ValueError as exc:
        raise JobPackageError(str(exc)) from None
    on_mount = ctx.mount(relative)
    deadline = time.monotonic() + mount_wait_s
    while not on_mount.is_file() and time.monotonic() < deadline:
        time.sleep(0.5)
    if not on_mount.is_file():
        fetch_into_project(ctx, relative, on_mount)
    return on_mount.resolve().as_uri()


def fetch_into_project(ctx: NodeContext, relative: str, on_mount: Path) -> None:
    """Write the package onto the mount from CML's files API (never half-written: a
    temporary name, then a rename; the same content whoever writes it)."""
    if not ctx.api.available:
        raise JobPackageError(f"{relative} is not in the project and CML's API is not reachable")
    try:
        data = ctx.api.download(relative)
    except (ProjectAPIError, OSError) as exc:
        raise JobPackageError(f"{relative} could not be read through CML's API: {exc}") from None
    on_mount.parent.mkdir(parents=True, exist_ok=True)
    partial = on_mount.with_name(f".{on_mount.name}.{ctx.spec.node_id}.tmp")
    partial.write_bytes(data)
    partial.replace(on_mount)
    log(f"job package {on_mount.name} fetched through the API ({len(data)} bytes)")
