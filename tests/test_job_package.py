"""A job's working dir through the project's files (``ray-cml job submit --working-dir``):
the head's answer for a package, whatever NFS shows it yet, and the requests it refuses."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

from ray_cml_provider.cluster.job_package import local_working_dir, pack
from ray_cml_provider.cluster.jobs import JobError
from ray_cml_provider.cml import CMLClient
from ray_cml_provider.contract import Request, cluster_dir, job_package_path
from ray_cml_provider.node.context import NodeContext
from ray_cml_provider.node.job_package import JobPackageError, package_uri
from tests.test_node_launcher import launcher

PACKAGE = "_ray_pkg_0123456789abcdef.zip"


def node_context(emulator, kind: str = "head") -> NodeContext:
    env = {
        "RAY_CML_CLUSTER": "c1",
        "RAY_CML_NODE_ID": "0123abcd",
        "RAY_CML_NODE_KIND": kind,
        "RAY_CML_DIR": cluster_dir("c1"),
        "CDSW_IP_ADDRESS": "127.0.0.1",
        "CDSW_API_URL": f"{emulator.url}/api/v1",
        "CDSW_PROJECT_ID": emulator.project_id,
        "CDSW_APIV2_KEY": emulator.api_key,
    }
    return NodeContext(env, project_dir=emulator.project_dir)


def test_the_head_answers_the_packages_uri_even_before_nfs_shows_it(start_emulator):
    emulator = start_emulator("--file-delay-s", "600")  # the API's writes reach engines late
    client = CMLClient(**emulator.client_settings())
    relative = job_package_path("c1", PACKAGE)
    client.upload_file(relative, b"zip bytes")
    on_mount = emulator.project_dir / relative
    assert not on_mount.exists()  # NFS has not shown it yet

    uri = package_uri(node_context(emulator), PACKAGE, mount_wait_s=0.2)
    assert uri == on_mount.resolve().as_uri()
    assert on_mount.read_bytes() == b"zip bytes"  # fetched through the API, written whole
    assert [p.name for p in on_mount.parent.iterdir()] == [PACKAGE]  # no partial file left
    assert package_uri(node_context(emulator), PACKAGE, mount_wait_s=0) == uri  # on the mount


def test_the_head_refuses_what_is_not_a_package_of_its_cluster(emulator):
    ctx = node_context(emulator)
    for name in ("../../../etc/passwd", "_ray_pkg_0123456789abcdef.zip/../x", "_ray_pkg_z.zip", ""):
        with pytest.raises(JobPackageError, match="not a job package name"):
            package_uri(ctx, name, mount_wait_s=0)
    with pytest.raises(JobPackageError, match="could not be read through CML's API"):
        package_uri(ctx, PACKAGE, mount_wait_s=0)  # never uploaded


def test_a_worker_takes_neither_of_job_submits_requests(tmp_path, monkeypatch):
    worker = launcher(tmp_path, monkeypatch)  # a worker's launcher
    output = tmp_path / "out"
    for request in (
        Request(report=Request.JOB_PACKAGE, env={"package": PACKAGE}),
        Request(report=Request.DOWN_AFTER_JOB, env={"job": "raycml_1"}),
        Request(report=Request.DOWN_AFTER_JOB, env={}),
    ):
        assert worker.answer(request, output) == 2
        assert output.read_text().startswith("ray-cml: only a head")


def test_the_working_dir_is_rays_own_package_with_rays_ignore_rules(tmp_path):
    folder = tmp_path / "job"
    (folder / "pkg").mkdir(parents=True)
    (folder / "main.py").write_text("print('hi')\n")
    (folder / "pkg" / "helper.py").write_text("VALUE = 1\n")
    (folder / "notes.log").write_text("kept out by excludes\n")
    (folder / ".gitignore").write_text("big/\n")
    (folder / "big").mkdir()
    (folder / "big" / "blob.bin").write_bytes(b"x" * 1000)

    name, data = pack(folder, {"excludes": ["*.log"]})
    assert name.startswith("_ray_pkg_") and name.endswith(".zip")
    members = set(zipfile.ZipFile(io.BytesIO(data)).namelist())
    assert members == {"job/main.py", "job/pkg/helper.py", "job/.gitignore"}  # one top folder
    assert pack(folder, {"excludes": ["*.log"]})[0] == name  # named by its content
    (folder / "main.py").write_text("print('changed')\n")
    assert pack(folder, {"excludes": ["*.log"]})[0] != name

    assert local_working_dir({"working_dir": "s3://bucket/pkg.zip"}) is None  # Ray's, as is
    assert local_working_dir({}) is None
    assert local_working_dir({"working_dir": str(folder)}) == folder.resolve()
    with pytest.raises(JobError, match="not a directory"):
        local_working_dir({"working_dir": str(folder / "main.py")})
    with pytest.raises(JobError, match="not a directory"):
        local_working_dir({"working_dir": str(Path(tmp_path) / "missing")})
