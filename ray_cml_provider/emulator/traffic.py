"""What happens to CML API requests on their way: injected faults, and counters of every
request (by method and route) that tests and benchmarks read to measure API traffic, with a
bounded trace of when each ran and whose key it carried (the operator's or an engine's):
from it a bench tells requests made one after another from ones that overlapped."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

from ray_cml_provider.emulator.errors import ApiError


@dataclass
class Faults:
    """Injected faults: a share of CML API requests answered 429/503 before any work
    (``rate``), a share whose answer is lost AFTER the work is done (``drop_rate``: the
    connection closes with no response, as when a gateway times out), and added latency."""

    rate: float = 0.0
    latency_ms: float = 0.0
    seed: int | None = None
    drop_rate: float = 0.0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()

    def pick(self) -> ApiError | None:
        with self._lock:
            if self.rate <= 0 or self._rng.random() >= self.rate:
                return None
            if self._rng.random() < 0.5:
                return ApiError(429, "rate limit exceeded (injected by the emulator)")
            return ApiError(503, "service unavailable (injected by the emulator)")

    def drop_answer(self) -> bool:
        with self._lock:
            return self.drop_rate > 0 and self._rng.random() < self.drop_rate


TRACE_LIMIT = 50_000  # the newest requests kept in the trace (a few MB at most)


class Stats:
    """Counts of CML API requests by method and path template, for tests and benchmarks,
    and the trace: ``[started (epoch s), seconds, "METHOD template", caller]`` per request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.requests: Counter[str] = Counter()
            self.statuses: Counter[str] = Counter()
            self.faults_injected = 0
            self.answers_dropped = 0
            self.trace: deque[tuple[float, float, str, str]] = deque(maxlen=TRACE_LIMIT)

    def record(
        self,
        method: str,
        template: str,
        status: int,
        injected: bool,
        dropped: bool = False,
        started: float | None = None,
        caller: str = "",
    ) -> None:
        """``started``: when the request arrived (``time.time()``), latency included;
        ``caller``: ``operator``, ``engine`` or empty (refused before its key was read)."""
        with self._lock:
            if started is not None:
                took = time.time() - started
                self.trace.append((started, took, f"{method} {template}", caller))
            self.requests[f"{method} {template}"] += 1
            self.statuses[str(status)] += 1
            self.faults_injected += int(injected)
            self.answers_dropped += int(dropped)

    def snapshot(self, with_trace: bool = False) -> dict[str, Any]:
        with self._lock:
            extra = {"trace": [list(entry) for entry in self.trace]} if with_trace else {}
            return extra | {
                "total": sum(self.requests.values()),
                "requests": dict(self.requests),
                "statuses": dict(self.statuses),
                "faults_injected": self.faults_injected,
                "answers_dropped": self.answers_dropped,
            }
