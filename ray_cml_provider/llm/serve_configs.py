"""Small helpers for the bundled Serve configs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text())


CML_PROJECT_ROOT = "/home/cdsw"


def in_project(serve_config: dict[str, Any], project_root: Path) -> dict[str, Any]:
    """A copy whose ``model_source`` folders under ``/home/cdsw`` (the project's model cache on
    CML) point into ``project_root`` instead: the emulator's project folder."""
    config = copy.deepcopy(serve_config)
    for app in config.get("applications", []):
        for llm in (app.get("args") or {}).get("llm_configs") or []:
            source = llm["model_loading_config"]["model_source"]
            if source.startswith(CML_PROJECT_ROOT + "/"):
                relative = source[len(CML_PROJECT_ROOT) + 1 :]
                llm["model_loading_config"]["model_source"] = str(Path(project_root) / relative)
    return config
