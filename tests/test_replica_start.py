"""The replica-start callback of the shipped Serve configs (``llm/replica_start.py``), in
its parts: what counts as a model the project holds, and how vLLM's cache is published to
the project (whole or not at all). The LLM end-to-end test runs it in real replicas."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from ray_cml_provider.llm import replica_start
from ray_cml_provider.llm.model_cache import MARKER, MODELS_DIR
from ray_cml_provider.llm.replica_start import (
    CACHE_DIR,
    ProjectReplicaStart,
    newest_version,
    project_model,
    publish,
    publish_when_quiet,
)
from tests.conftest import wait_until


def a_model(root: Path, name: str = "m", complete: bool = True) -> Path:
    folder = root / MODELS_DIR / name
    folder.mkdir(parents=True)
    if complete:
        (folder / MARKER).write_text("{}")
    return folder


def test_only_a_complete_folder_of_the_projects_model_cache_is_the_projects(tmp_path):
    folder = a_model(tmp_path)
    assert project_model(str(folder)) == (tmp_path, folder)
    assert project_model(str(a_model(tmp_path, "half", complete=False))) is None
    elsewhere = tmp_path / "elsewhere" / "m"
    elsewhere.mkdir(parents=True)
    (elsewhere / MARKER).write_text("{}")
    assert project_model(str(elsewhere)) is None
    assert project_model("Qwen/Qwen2.5-7B-Instruct") is None
    assert project_model("") is None


def test_each_publication_is_a_whole_new_version_and_old_ones_go(tmp_path):
    local = tmp_path / "local"
    (local / "torch_compile_cache" / "abc").mkdir(parents=True)
    (local / "torch_compile_cache" / "abc" / "artifact").write_text("one")
    shared = tmp_path / "project" / CACHE_DIR / "m" / "key"
    first = publish(local, shared)
    assert newest_version(shared) == first
    assert (first / "torch_compile_cache" / "abc" / "artifact").read_text() == "one"
    (local / "modelinfos.json").write_text("{}")
    second = publish(local, shared)  # within the same second: still the newer one
    assert newest_version(shared) == second and (second / "modelinfos.json").exists()
    third = publish(local, shared, keep=2)
    assert sorted(p.name for p in shared.iterdir()) == [second.name, third.name]
    assert newest_version(tmp_path / "nowhere") is None


def test_a_copy_left_half_done_by_a_replica_that_died_is_never_read_and_goes_later(tmp_path):
    shared = tmp_path / "shared" / "key"
    half = shared / f".{time.time_ns():020d}-dead00.tmp"
    (half / "torch_compile_cache").mkdir(parents=True)
    assert newest_version(shared) is None  # a reader never starts from half a cache
    local = tmp_path / "local"
    local.mkdir()
    (local / "modelinfos.json").write_text("{}")
    publish(local, shared)
    assert half.exists()  # it may still be copying: kept for a while
    long_ago = time.time() - replica_start.STALE_STAGING_S - 60
    os.utime(half, (long_ago, long_ago))
    newest = publish(local, shared)
    assert not half.exists() and newest_version(shared) == newest


def test_a_cache_is_published_once_quiet_again_when_it_changes_and_never_while_empty(
    tmp_path,
):
    empty, shared = tmp_path / "empty", tmp_path / "shared" / "key"
    empty.mkdir()
    publish_when_quiet(empty, shared, quiet_s=0.3, watch_s=0.6)
    assert not shared.exists()

    local = tmp_path / "local"
    local.mkdir()
    (local / "restored.json").write_text("{}")  # what the project's cache filled it with
    writer = threading.Thread(
        target=publish_when_quiet, args=(local, shared, 0.3, 4.0), daemon=True
    )
    writer.start()
    time.sleep(0.5)
    assert not shared.exists()  # nothing new: nothing to publish
    (local / "early.json").write_text("{}")  # vLLM's model inspection ...
    wait_until(lambda: newest_version(shared), timeout_s=5, what="the first version")
    early = newest_version(shared)
    time.sleep(1.1)
    (local / "compiled.bin").write_text("x")  # ... a minute of compiling later
    wait_until(lambda: newest_version(shared) != early, timeout_s=5, what="a newer version")
    assert (newest_version(shared) / "compiled.bin").exists()
    writer.join(10)


@pytest.fixture
def replica_env(tmp_path, monkeypatch):
    monkeypatch.setattr(replica_start, "device_key", lambda: "0.0-cpu-test")
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "node-tmp"))
    (tmp_path / "node-tmp").mkdir()
    monkeypatch.delenv("VLLM_CACHE_ROOT", raising=False)
    yield
    os.environ.pop("VLLM_CACHE_ROOT", None)


def start(source: str, **kwargs) -> ProjectReplicaStart:
    config = SimpleNamespace(model_loading_config=SimpleNamespace(model_source=source))
    callback = ProjectReplicaStart(config, ctx_kwargs={"runtime_env": {}}, **kwargs)
    asyncio.run(callback.on_before_node_init())
    return callback


def test_a_project_model_skips_the_download_task_and_gets_the_projects_cache(tmp_path, replica_env):
    folder = a_model(tmp_path)
    shared = tmp_path / CACHE_DIR / "m" / "0.0-cpu-test" / f"{time.time_ns():020d}-abcdef"
    (shared / "modelinfos").mkdir(parents=True)
    (shared / "modelinfos" / "Llama.json").write_text("{}")
    callback = start(str(folder))
    assert callback.ctx.run_init_node is False
    local = Path(os.environ["VLLM_CACHE_ROOT"])
    assert local.parent == tmp_path / "node-tmp"  # the node's disk, not the project's
    assert (local / "modelinfos" / "Llama.json").exists()
    assert callback.ctx.runtime_env["env_vars"]["VLLM_CACHE_ROOT"] == str(local)


def test_any_other_source_is_downloaded_as_serve_llm_does(tmp_path, replica_env):
    callback = start("Qwen/Qwen2.5-7B-Instruct")  # not in a CML project here: no cache
    assert callback.ctx.run_init_node is True
    assert "VLLM_CACHE_ROOT" not in os.environ
