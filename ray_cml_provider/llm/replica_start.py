"""A model replica's start on CML, made shorter: Serve LLM's callback for the shipped configs.

Serve LLM calls an ``LLMConfig``'s callback (``callback_config.callback_class``) in the
replica's process before it starts vLLM. This one does two things there
(``bench/vllm_bench.py`` times each sub-stage of a replica's start):

1. **No download task for a model the project holds.** Serve LLM starts one Ray task per
   node of the replica to download the model there: a new worker process that imports vLLM
   (15 s of the CPU twin's 56 s cold start) to find that a folder in the project's
   filesystem needs no download. When ``model_source`` is such a folder, complete (its
   ``.ray-cml-model.json``), the task is skipped; any other source is downloaded as before.
2. **vLLM's caches kept once per project.** What vLLM caches on disk (``torch.compile``'s
   artifacts, its model inspection) lives in ``VLLM_CACHE_ROOT``; a node's disk is gone with
   its application, so every replica of every cluster would pay for it again. The replica
   gets a cache on its node's disk, filled from the newest version of the project's copy
   ``<project>/.ray-cml/cache/vllm/<model>/<vllm version>-<device>/<version>/``. Whenever
   the replica's cache has changed since and then stayed quiet for ``QUIET_S`` (vLLM writes
   it while its engine starts), it is published there as a new version: copied under a
   temporary name and renamed into place, so a reader never sees half a cache and two
   replicas never mix theirs; the newest ``KEEP_VERSIONS`` are kept. The key holds the
   model, vLLM's version and the device: artifacts made for one GPU model are not used on
   another.

3. **Serve LLM's telemetry actor asked for early.** When its engine is up, a replica reports to
   a detached actor on the head, created by the cluster's first replica: a process started
   then, while the replica waits (3 s of the twin's first cold start). Its creation is
   asked for here, before vLLM starts, so it is ready by then.

Every step is best effort: a failure is one line in the replica's log, never a failed
replica.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ray.llm._internal.common.callbacks.base import CallbackBase

from ray_cml_provider.llm.model_cache import (
    MARKER,
    MODELS_DIR,
    ModelCacheError,
    default_name,
    project_root,
)

logger = logging.getLogger("ray.serve")

CACHE_DIR = ".ray-cml/cache/vllm"
QUIET_S = 30.0  # the local cache unchanged this long: published (again if it changes)
WATCH_FOR_S = 1800.0  # how long a replica keeps watching its cache after its start
KEEP_VERSIONS = 2  # versions of the project's cache kept per key
STALE_STAGING_S = 3600.0  # a staging folder this old was left by a replica that ended


def project_model(source: str) -> tuple[Path, Path] | None:
    """(project root, model folder) when ``source`` is a complete folder of the project's
    model cache (``<project>/.ray-cml/models/<name>``), else None."""
    folder = Path(source)
    if not (folder.is_absolute() and (folder / MARKER).is_file()):
        return None
    if folder.parent.as_posix().endswith(MODELS_DIR):
        return folder.parents[2], folder
    return None


def device_key() -> str:
    """vLLM's version and the device its artifacts are for (``0.32.0-cpu-x86_64``,
    ``0.11.0-cuda-nvidia-a10g``), without initializing CUDA in this process."""
    import platform

    import vllm
    from vllm.platforms import current_platform

    try:
        name = current_platform.get_device_name(0)
    except Exception:  # a platform that cannot name its device: its kind is the key
        name = ""
    if current_platform.device_name == "cpu":
        name = platform.machine()
    raw = f"{vllm.__version__}-{current_platform.device_name}-{name}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-").lower()


def signature(folder: Path) -> frozenset[tuple[str, int, float]]:
    """What ``folder`` holds: each file's path, size and modification time."""
    found = set()
    for path in folder.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file():
                stat = path.stat()
                found.add((path.relative_to(folder).as_posix(), stat.st_size, stat.st_mtime))
    return frozenset(found)


def versions(shared: Path) -> list[Path]:
    """The complete versions of the project's cache, oldest first (staging folders start
    with a dot)."""
    if not shared.is_dir():
        return []
    return sorted(p for p in shared.iterdir() if p.is_dir() and not p.name.startswith("."))


def newest_version(shared: Path) -> Path | None:
    """The newest complete version of the project's cache."""
    found = versions(shared)
    return found[-1] if found else None


def publish(local: Path, shared: Path, keep: int = KEEP_VERSIONS) -> Path:
    """Copy ``local`` to a new version of ``shared`` all at once (under a temporary name,
    then renamed), and drop the oldest versions past ``keep`` and staging folders left by a
    replica that ended while it copied."""
    shared.mkdir(parents=True, exist_ok=True)
    # Named by the nanosecond it was made: versions sort by age, even two in one second.
    name = f"{time.time_ns():020d}-{secrets.token_hex(3)}"
    staging = shared / f".{name}.tmp"
    try:
        shutil.copytree(local, staging, symlinks=True)
        staging.rename(shared / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for old in versions(shared)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in shared.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > STALE_STAGING_S:
                shutil.rmtree(stale, ignore_errors=True)
    return shared / name


def publish_when_quiet(local: Path, shared: Path, quiet_s: float, watch_s: float) -> None:
    """Publish ``local`` each time it has changed since it was filled or last published and
    then stayed unchanged for ``quiet_s`` (vLLM writes it while its engine starts, sometimes
    with a minute of compiling between two writes: an early version is superseded by the
    next, never left as the project's last word)."""
    published = signature(local)  # what it was filled with is the project's already
    deadline = time.monotonic() + watch_s
    while time.monotonic() < deadline:
        time.sleep(min(5.0, quiet_s / 3))
        now = signature(local)
        if now == published or not now:
            continue
        if time.time() - max(mtime for _, _, mtime in now) < quiet_s:
            continue
        version = publish(local, shared)
        published = now
        logger.info("ray-cml: published vLLM's cache to the project: %s", version)


class ProjectReplicaStart(CallbackBase):
    """``callback_config.callback_class: ray_cml_provider.llm.replica_start:ProjectReplicaStart``
    (``callback_kwargs``: ``quiet_s``, seconds of quiet before the cache is published)."""

    def __init__(self, llm_config: Any, quiet_s: float = QUIET_S, **kwargs: Any):
        super().__init__(llm_config, **kwargs)
        self.quiet_s = float(quiet_s)

    async def on_before_node_init(self) -> None:
        source = str(self.llm_config.model_loading_config.model_source or "")
        found = project_model(source)
        if found:
            # Serve LLM's per-node task would only find the folder already here.
            self.ctx.run_init_node = False
            logger.info("ray-cml: the model is in the project (%s): no download task", source)
        _ask_for_telemetry_actor()
        try:
            root = found[0] if found else project_root(None)  # /home/cdsw in a CML engine
        except ModelCacheError:
            return  # no project here: nowhere to keep vLLM's cache
        try:
            self._use_project_cache(root, default_name(source))
        except Exception as exc:  # the replica starts without a kept cache
            logger.warning("ray-cml: vLLM's cache is not kept for this replica: %r", exc)

    def _use_project_cache(self, root: Path, model: str) -> None:
        shared = root / CACHE_DIR / model / device_key()
        local = Path(tempfile.mkdtemp(prefix="vllm-cache-", dir=_node_tmp()))
        version = newest_version(shared)
        if version is not None:
            shutil.copytree(version, local, symlinks=True, dirs_exist_ok=True)
            logger.info("ray-cml: vLLM's cache from the project: %s", version)
        threading.Thread(
            target=publish_when_quiet,
            args=(local, shared, self.quiet_s, WATCH_FOR_S),
            name="ray-cml-vllm-cache",
            daemon=True,
        ).start()
        # The engine's processes are started after this, with this environment (vLLM hands
        # its VLLM_* variables to Ray workers too).
        os.environ["VLLM_CACHE_ROOT"] = str(local)
        if self.ctx.runtime_env is not None:
            self.ctx.runtime_env.setdefault("env_vars", {})["VLLM_CACHE_ROOT"] = str(local)


def _ask_for_telemetry_actor() -> None:
    """Start creating the actor Serve LLM reports to once the engine is up (get-or-create:
    the same one it would make then); nothing waits on it here."""
    import ray

    if not ray.is_initialized():  # not in a replica: nothing to ask Ray for
        return
    try:
        from ray.llm._internal.serve.observability.usage_telemetry.usage import (
            _get_or_create_telemetry_agent,
        )

        _get_or_create_telemetry_agent()
    except Exception as exc:  # another Ray: Serve LLM makes it when it needs it
        logger.info("ray-cml: Serve LLM's telemetry actor not asked for early: %r", exc)


def _node_tmp() -> str | None:
    """The node's own temporary folder (Ray's, under the node's), not the project's."""
    return os.environ.get("RAY_TMPDIR") or None
