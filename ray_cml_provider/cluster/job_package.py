"""``ray-cml job submit --working-dir DIR``: the job's directory through the project's files.

Ray's own way (``ray job submit --working-dir``) zips the directory on the submitter and
uploads it into the cluster's GCS: capped by Ray's gRPC message size (512 MiB) and held in
the head's memory. Here the same zip, made by Ray's own packaging code (so ``.gitignore``,
``.rayignore``, ``excludes`` and Ray's default excludes apply exactly as with Ray), goes
through CML's files API into the cluster's folder (``contract.job_package_path``), and the
job's ``runtime_env`` names it as ``file://<project>/...``: Ray's runtime env agent on each
node unpacks it from the project filesystem. The head answers that URI once the package is
on its mount (``node/job_package.py``). The name is the content's hash: an unchanged
directory is uploaded once, and a node's cache of an older one is never used for a newer.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from ray_cml_provider.cluster.jobs import JobError, ask_head
from ray_cml_provider.cml import CMLClient, CMLNotFoundError
from ray_cml_provider.contract import Request, job_package_path

IGNORE_GITIGNORE = "RAY_RUNTIME_ENV_IGNORE_GITIGNORE"  # Ray's switch, honoured as Ray does


def local_working_dir(runtime_env: dict[str, Any]) -> Path | None:
    """The runtime env's ``working_dir`` when it is a local directory (not a URI)."""
    value = runtime_env.get("working_dir")
    if not value or "://" in str(value):
        return None
    path = Path(str(value)).expanduser()
    if not path.is_dir():
        raise JobError(f"working_dir {value}: not a directory")
    return path.resolve()


def pack(directory: Path, runtime_env: dict[str, Any]) -> tuple[str, bytes]:
    """The package's name (``_ray_pkg_<hash>.zip``) and its bytes, made by Ray's packaging
    with one top-level folder (what Ray expects of a remote zip)."""
    from ray._private.runtime_env.packaging import create_package
    from ray._private.runtime_env.working_dir import upload_working_dir_if_needed

    include_gitignore = os.environ.get(IGNORE_GITIGNORE, "0") != "1"
    packed: dict[str, bytes] = {}

    def into_memory(working_dir: str, excludes: list | None = None, is_file: bool = False):
        with tempfile.TemporaryDirectory(prefix="ray-cml-job-") as tmp:
            target = Path(tmp) / "package.zip"
            create_package(
                working_dir,
                target,
                include_gitignore=include_gitignore,
                include_parent_dir=True,
                excludes=excludes or [],
            )
            packed["data"] = target.read_bytes()

    packaging_log = logging.getLogger("ray._private.runtime_env.packaging")
    level = packaging_log.level
    packaging_log.setLevel(logging.WARNING)  # not a line per ignored file on the console
    try:
        env = upload_working_dir_if_needed(
            {**runtime_env, "working_dir": str(directory)}, include_gitignore, upload_fn=into_memory
        )
    finally:
        packaging_log.setLevel(level)
    return str(env["working_dir"]).rsplit("/", 1)[-1], packed["data"]


def ship_working_dir(
    runtime_env: dict[str, Any],
    client: CMLClient,
    cluster: str,
    head_id: str,
    say=lambda line: None,
) -> dict[str, Any]:
    """``runtime_env`` with a local ``working_dir`` replaced by its package's ``file://``
    URI on the cluster's nodes (uploaded unless the project has it already)."""
    directory = local_working_dir(runtime_env)
    if directory is None:
        return runtime_env
    package, data = pack(directory, runtime_env)
    relative = job_package_path(cluster, package)
    if already_in_project(client, relative):
        say(f"working dir {directory}: unchanged, {package} is in the project")
    else:
        say(f"working dir {directory}: {len(data) / 1e6:.1f} MB into the project ({package})")
        client.upload_file(relative, data, overwrite=True)
    request = Request(report=Request.JOB_PACKAGE, env={"package": package})
    uri = ask_head(client, cluster, head_id, request, "--working-dir")
    return {**runtime_env, "working_dir": uri}


def already_in_project(client: CMLClient, relative: str) -> bool:
    folder, name = relative.rsplit("/", 1)
    try:
        return any(f.path.rsplit("/", 1)[-1] == name for f in client.list_files(folder))
    except CMLNotFoundError:
        return False
