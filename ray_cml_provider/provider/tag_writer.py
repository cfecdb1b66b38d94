"""Nodes' tags written to CML in the background.

A node's tags live on the CML side (its application's description), so that every process
of the cluster sees them. Ray's updater sets them often (``waiting-for-ssh``, ``syncing-files``,
``setting-up``, ``up-to-date``): at CML's 100-300 ms a request, writing each in turn held
``ray up`` a second or more (``bench/api_latency_bench.py``). Like Ray's AWS provider, the
provider keeps the new tags at once for itself, and a writer thread sends them, the newest
set of each node only. They are written before the process ends (``flush`` at exit), and
a write CML refuses for a while is tried again.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections.abc import Callable

from ray_cml_provider.cml import CMLError, CMLNotFoundError

logger = logging.getLogger(__name__)

EXIT_FLUSH_S = 30.0  # how long a process ending waits for its tags to be written
MAX_BACKOFF_S = 10.0

_writers: weakref.WeakSet[TagWriter] = weakref.WeakSet()


class TagWriter:
    """``write(node_id, app_id, tags)`` sends one node's tags; ``put`` queues them."""

    def __init__(self, write: Callable[[str, str, dict[str, str]], None]):
        self._write = write
        self._pending: dict[str, tuple[str, dict[str, str]]] = {}  # node -> (app, tags)
        self._writing: dict[str, dict[str, str]] = {}  # being sent now
        self._written: dict[str, tuple[dict[str, str], float]] = {}  # and when it was done
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        _writers.add(self)

    def put(self, node_id: str, app_id: str, tags: dict[str, str]) -> None:
        with self._changed:
            self._pending[node_id] = (app_id, dict(tags))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="ray-cml-tag-writer", daemon=True
                )
                self._thread.start()
            self._changed.notify_all()

    def newer_than_listing(self, listed_at: float) -> dict[str, dict[str, str]]:
        """The tags of each node that a listing asked for at ``listed_at`` (monotonic) may
        not show: queued, being written, or written after it was asked for. Such a listing
        must not bring the old ones back."""
        with self._changed:
            late = {n: tags for n, (tags, at) in self._written.items() if at >= listed_at}
            queued = {n: tags for n, (_, tags) in self._pending.items()}
            return {**late, **self._writing, **queued}

    def forget(self, node_id: str) -> None:
        """The node is being deleted: its tags need not be written."""
        with self._changed:
            self._pending.pop(node_id, None)
            self._written.pop(node_id, None)

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued tag is written; False if time ran out."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self._pending or self._writing:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True

    def _run(self) -> None:
        backoff = 0.5
        while True:
            with self._changed:
                while not self._pending:
                    self._changed.wait()
                node_id, (app_id, tags) = next(iter(self._pending.items()))
                del self._pending[node_id]
                self._writing[node_id] = tags
            try:
                self._write(node_id, app_id, tags)
                with self._changed:
                    now = time.monotonic()
                    self._written[node_id] = (tags, now)
                    for old in [n for n, (_, at) in self._written.items() if now - at > 60]:
                        del self._written[old]
                backoff = 0.5
            except CMLNotFoundError:
                pass  # the application is gone: nothing to tag
            except CMLError as exc:
                logger.warning("writing the tags of node %s failed, will retry: %s", node_id, exc)
                with self._changed:
                    self._pending.setdefault(node_id, (app_id, tags))  # unless newer came
                time.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
            finally:
                with self._changed:
                    del self._writing[node_id]
                    self._changed.notify_all()


@atexit.register
def _flush_all() -> None:
    for writer in list(_writers):
        if not writer.flush(EXIT_FLUSH_S):
            logger.warning("some node tags were not written to CML in %.0f s", EXIT_FLUSH_S)
