"""The node environment (``node_env``): built once per project, never half-trusted.

These run the real builder with the real pip, offline: the package is a tiny wheel made
here, found through pip's own ``PIP_FIND_LINKS``/``PIP_NO_INDEX`` settings. Nodes are
threads of this process: the lock is ``mkdir`` on the shared folder, for threads as for
engines. The end-to-end case (two GPU workers of a bare runtime) is in test_bare_runtime.py.
"""

from __future__ import annotations

import json
import threading
import time
import zipfile
from pathlib import Path

import pytest

from ray_cml_provider.node import environment as node_env
from ray_cml_provider.node.environment import EnvironmentBuild, NodeEnvironmentError
from tests.conftest import wait_until

PACKAGES = ["tiny-pkg==1.0"]


@pytest.fixture
def offline_index(tmp_path, monkeypatch) -> Path:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    dist = "tiny_pkg-1.0.dist-info"
    files = {
        "tiny_pkg/__init__.py": "VALUE = 1\n",
        f"{dist}/METADATA": "Metadata-Version: 2.1\nName: tiny-pkg\nVersion: 1.0\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(wheels / "tiny_pkg-1.0-py3-none-any.whl", "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    return wheels


def build(project: Path, node: str, logs: list[str], packages=PACKAGES) -> EnvironmentBuild:
    return EnvironmentBuild(
        project, "runtime-a", packages, node, lambda m: logs.append(f"{node}: {m}")
    )


def test_nodes_starting_together_build_once_and_share_it(tmp_path, offline_index):
    project, logs = tmp_path / "project", []
    results: dict[str, object] = {}

    def node(name: str) -> None:
        results[name] = build(project, name, logs).ensure()

    threads = [threading.Thread(target=node, args=(f"node{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sum("building" in line for line in logs) == 1, logs
    sites = {str(env.site) for env in results.values()}
    assert len(sites) == 1
    site = Path(sites.pop())
    assert (site / "tiny_pkg" / "__init__.py").exists()
    info = json.loads((site.parent / "env.json").read_text())
    assert info["packages"] == PACKAGES and info["built_by"] in results
    envs = project / node_env.ENVS_DIR
    assert sorted(p.name for p in envs.iterdir()) == [site.parent.name]  # no lock, no leftovers
    later: list[str] = []
    assert "reused" in build(project, "node9", later).ensure().summary and later == []


def test_a_dead_builder_neither_blocks_nor_leaves_half_an_environment(
    tmp_path, offline_index, monkeypatch
):
    project, logs = tmp_path / "project", []
    dead = build(project, "dead", logs)
    dead.envs.mkdir(parents=True)
    dead.lock.path.mkdir()
    dead.lock.write_owner({"node": "dead", "at": time.time() - 999})
    half = dead.envs / f"{dead.key}.build-dead" / "site"
    half.mkdir(parents=True)
    (half / "half_installed.py").write_text("")

    env = build(project, "alive", logs).ensure()
    assert any("dead stopped building" in line and "taking over" in line for line in logs), logs
    assert not (env.site / "half_installed.py").exists()
    assert not list(dead.envs.glob("*.build-*")) and not dead.lock.path.exists()


def test_a_failed_build_is_reported_with_pips_lines_and_trusted_by_nobody(tmp_path, offline_index):
    project, logs = tmp_path / "project", []
    missing = ["no-such-package-xyz==1.0"]
    with pytest.raises(NodeEnvironmentError) as failed:
        build(project, "builder", logs, missing).ensure()
    message = str(failed.value)
    assert "could not be built on node builder" in message and "pip's last lines" in message
    assert "no-such-package-xyz" in message
    envs = project / node_env.ENVS_DIR
    key = node_env.environment_key("runtime-a", missing)
    assert sorted(p.name for p in envs.iterdir()) == [f"{key}.failed.json"]

    # A node starting soon after (a worker Ray relaunched) reports it without running pip.
    later: list[str] = []
    with pytest.raises(NodeEnvironmentError, match="Nodes report this for 5 minutes"):
        build(project, "relaunched", later, missing).ensure()
    assert not any("building" in line for line in later)


def test_nodes_that_waited_for_a_failed_build_report_it_instead_of_retrying(tmp_path):
    project, logs = tmp_path / "project", []
    holder = build(project, "holder", logs)
    holder.envs.mkdir(parents=True)
    assert holder.lock.take(holder._owner())
    errors: list[str] = []

    def waiter() -> None:
        try:
            build(project, "waiter", logs).ensure()
        except NodeEnvironmentError as exc:
            errors.append(str(exc))

    thread = threading.Thread(target=waiter)
    thread.start()
    wait_until(lambda: any("waiter: waiting for holder" in line for line in logs), 20)
    # ... and now the holder's build fails.
    failure = {
        "at": time.time(),
        "node": "holder",
        "packages": PACKAGES,
        "problem": "pip exited with status 1",
        "pip_tail": ["ERROR: boom"],
    }
    holder.failed.write_text(json.dumps(failure))
    holder.lock.release()
    thread.join(30)
    assert errors and "ERROR: boom" in errors[0] and "on node holder" in errors[0]
    assert not any("building" in line for line in logs)
