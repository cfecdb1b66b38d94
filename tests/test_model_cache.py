"""The project's model cache (``llm/model_cache.py``, ``ray-cml model``): filled once, never
half-seen, and a second fill fetches nothing."""

from __future__ import annotations

import json

import pytest

from ray_cml_provider.llm import model_cache
from ray_cml_provider.llm.model_cache import MARKER, ModelCacheError, fill
from ray_cml_provider.ops.model import main as model_main


@pytest.fixture
def model_folder(tmp_path):
    folder = tmp_path / "downloads" / "Tiny-Model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    return folder


def test_a_model_is_fetched_once_and_kept(tmp_path, model_folder):
    project = tmp_path / "project"
    path, fetched = fill(project, str(model_folder), log=lambda _: None)
    assert fetched and path == project / ".ray-cml" / "models" / "tiny-model"
    record = json.loads((path / MARKER).read_text())
    assert record["source"] == str(model_folder) and record["files"] == 2
    assert (path / "model.safetensors").read_bytes() == b"\0" * 1000
    stamp = (path / MARKER).stat().st_mtime_ns
    (model_folder / "model.safetensors").write_bytes(b"changed")  # the source moves on ...
    again, fetched = fill(project, str(model_folder), log=lambda _: None)
    assert (again, fetched) == (path, False)  # ... the cache is not fetched again
    assert (path / MARKER).stat().st_mtime_ns == stamp
    assert (path / "model.safetensors").read_bytes() == b"\0" * 1000
    assert [p.name for p in path.parent.iterdir()] == ["tiny-model"]  # nothing half-done


def test_a_folder_without_its_record_is_a_dead_fill_and_is_replaced(tmp_path, model_folder):
    project = tmp_path / "project"
    dead = project / ".ray-cml" / "models" / "tiny"
    dead.mkdir(parents=True)
    (dead / "model.safetensors").write_bytes(b"half")
    assert model_cache.cached(project, "tiny") is None
    path, fetched = fill(project, str(model_folder), name="tiny", log=lambda _: None)
    assert fetched and (path / MARKER).exists()
    assert (path / "model.safetensors").read_bytes() == b"\0" * 1000


def test_what_is_not_a_model_leaves_nothing_behind(tmp_path):
    project = tmp_path / "project"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelCacheError, match="no config.json"):
        fill(project, str(empty), log=lambda _: None)
    assert list((project / ".ray-cml" / "models").iterdir()) == []
    with pytest.raises(ModelCacheError, match="neither a folder nor a Hugging Face id"):
        fill(project, "not a model", log=lambda _: None)
    with pytest.raises(ModelCacheError, match="--name 'Bad Name'"):
        fill(project, str(empty), name="Bad Name", log=lambda _: None)


def test_outside_cml_the_project_dir_must_be_given(monkeypatch, tmp_path):
    monkeypatch.delenv("CDSW_PROJECT_ID", raising=False)
    with pytest.raises(ModelCacheError, match="run this in a CML session"):
        model_cache.project_root(None)
    assert model_cache.project_root(tmp_path) == tmp_path.resolve()


def test_the_command_prints_the_folder_for_model_source_and_lists_it(
    tmp_path, model_folder, capsys
):
    project = tmp_path / "project"
    args = ["pull", str(model_folder), "--project-dir", str(project)]
    assert model_main(args) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(project / ".ray-cml" / "models" / "tiny-model")
    assert "cached in" in err
    assert model_main(args) == 0
    assert "in the project's cache already" in capsys.readouterr().err
    assert model_main(["list", "--project-dir", str(project)]) == 0
    assert capsys.readouterr().out.startswith("tiny-model\t0.00 GB\t")
    assert model_main(["pull", "x/y", "--name", "UP"]) == 1
    assert capsys.readouterr().err.startswith("ray-cml model: ")
