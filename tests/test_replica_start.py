"""The replica-start callback of the shipped Serve configs (``llm/replica_start.py``), in
its parts: what counts as a model the project holds, and how vLLM's cache is published to
the project (whole or not at all). The LLM end-to-end test runs it in real replicas."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from ray_cml_provider.llm import replica_start
from ray_cml_provider.llm.model_cache import MARKER, MODELS_DIR
from ray_cml_provider.llm.replica_start import (
    CACHE_DIR,
    ProjectReplicaStart,
    project_model,
    publish,
    publish_when_quiet,
)


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


def test_a_cache_is_published_whole_once_and_the_first_one_stays(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    (first / "torch_compile_cache" / "abc").mkdir(parents=True)
    (first / "torch_compile_cache" / "abc" / "artifact").write_text("one")
    (second / "x").mkdir(parents=True)
    shared = tmp_path / "project" / CACHE_DIR / "m" / "key"
    assert publish(first, shared)
    assert not publish(second, shared)
    assert (shared / "torch_compile_cache" / "abc" / "artifact").read_text() == "one"
    assert not (shared / "x").exists()
    assert [p.name for p in shared.parent.iterdir()] == ["key"]  # no staging folder left


def test_a_cache_is_published_once_quiet_and_never_while_empty(tmp_path):
    empty, shared = tmp_path / "empty", tmp_path / "shared" / "key"
    empty.mkdir()
    publish_when_quiet(empty, shared, quiet_s=0.3, watch_s=0.6)
    assert not shared.exists()
    written = tmp_path / "written"
    written.mkdir()
    (written / "modelinfos.json").write_text("{}")
    started = time.monotonic()
    publish_when_quiet(written, shared, quiet_s=0.3, watch_s=30)
    assert (shared / "modelinfos.json").exists() and time.monotonic() - started < 10


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
    shared = tmp_path / CACHE_DIR / "m" / "0.0-cpu-test"
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
