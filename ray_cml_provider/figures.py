"""The figures of a cluster and its models, from scrapes of the head's ``/metrics``
(``node/cluster_metrics.py``): what ``ray-cml top`` shows and a run's history keeps.

Counters become rates over a window (``Timeline``: each series between its own moves, as
Ray refreshes a process's figures every 10 s, not continuously); latency percentiles come
from the growth of each histogram's buckets (as Prometheus' ``histogram_quantile``), means
from its sum and count. Parsing is ``prometheus_client``'s. Series, by source:

- Serve (``ray_serve_deployment_*``): requests and errors per second, p50/p95 processing
  latency, replicas healthy, per application and deployment;
- vLLM through Serve LLM (``ray_vllm_*``, engine metrics on by default in Ray 2.60): time to
  first token p50/p95, prompt and generated tokens per second, requests running and
  waiting, KV-cache use, per model;
- the head's door (``ray_cml_gateway_*``): what callers of ``/v1`` see;
- Ray (``ray_node_*``): each node's CPU and GPU use.

Pure arithmetic on parsed text (no HTTP, no CML): the head's history
(``node/history.py``) computes the same figures as ``cluster/top.py``.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from prometheus_client.parser import text_string_to_metric_families

EXPORT_PERIOD_S = 10.0  # Ray refreshes a process's figures in its node's export this often
SCRAPE_EVERY_S = 1.0
MIN_WINDOW_S = 2 * EXPORT_PERIOD_S + 2  # every counter moves at least twice
# The families top reads: /metrics?family=... sends only these (cheap for the head).
FAMILIES = (
    "ray_serve_deployment_request_counter",
    "ray_serve_deployment_error_counter",
    "ray_serve_deployment_processing_latency_ms",
    "ray_serve_deployment_replica_healthy",
    "ray_vllm_",
    "ray_node_cpu_utilization",
    "ray_node_gpus_utilization",
    "ray_cml_gateway_",
)


Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Scrape:
    at: float
    series: Series  # (sample name, sorted labels) -> value

    @classmethod
    def parse(cls, text: str, at: float | None = None) -> Scrape:
        series: Series = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name.replace(":", "_"), tuple(sorted(sample.labels.items())))
                series[key] = sample.value
        return cls(time.time() if at is None else at, series)

    def select(self, name: str) -> Iterable[tuple[dict[str, str], float]]:
        for (sample, labels), value in self.series.items():
            if sample == name:
                yield dict(labels), value


@dataclass
class Timeline:
    """Scrapes taken one after another (``SCRAPE_EVERY_S``) over the window.

    Ray refreshes a process's figures in its node's export every ``EXPORT_PERIOD_S``, each
    process at its own moment, so a counter moves in steps. Its rate is measured between the
    first and the last scrape at which it moved: a whole number of its own refresh periods,
    known to a scrape's interval, whatever the moment the window started."""

    scrapes: list[Scrape]

    @property
    def span_s(self) -> float:
        return self.scrapes[-1].at - self.scrapes[0].at if len(self.scrapes) > 1 else 0.0

    @property
    def last(self) -> Scrape:
        return self.scrapes[-1]

    def keys(self, name: str) -> set[tuple[tuple[str, str], ...]]:
        return {labels for scrape in self.scrapes for (n, labels) in scrape.series if n == name}

    def steps(self, name: str, labels: tuple) -> tuple[int, int]:
        """The indexes between which the series ``name{labels}`` is measured: its first and
        last move (the whole timeline when it moved fewer than twice)."""
        values = [scrape.series.get((name, labels)) for scrape in self.scrapes]
        moves = [i for i in range(1, len(values)) if values[i] != values[i - 1]]
        if len(moves) < 2:
            return 0, len(values) - 1
        return moves[0], moves[-1]

    def growth(self, name: str, labels: tuple, between: tuple[int, int]) -> float:
        """How much the counter grew between two scrapes (from 0 when it was not there yet;
        a counter that went down was restarted: it grew by its new value)."""
        start = self.scrapes[between[0]].series.get((name, labels), 0.0)
        end = self.scrapes[between[1]].series.get((name, labels), start)
        return end - start if end >= start else end

    def seconds(self, between: tuple[int, int]) -> float:
        return self.scrapes[between[1]].at - self.scrapes[between[0]].at


def rates(timeline: Timeline, name: str, group: Iterable[str]) -> dict[tuple, float]:
    """Per second, the growth of each series of counter ``name`` between its own moves,
    summed by the ``group`` labels."""
    group = tuple(group)
    out: dict[tuple, float] = defaultdict(float)
    for labels in timeline.keys(name):
        between = timeline.steps(name, labels)
        seconds = timeline.seconds(between)
        as_dict = dict(labels)
        key = tuple(as_dict.get(g, "") for g in group)
        out[key] += timeline.growth(name, labels, between) / seconds if seconds > 0 else 0.0
    return dict(out)


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The ``q`` quantile from cumulative bucket counts (upper bound -> count), linear
    inside a bucket, as Prometheus' ``histogram_quantile``; None without observations."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower  # in the open bucket: its lower edge, as Prometheus does
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 0.0)
        lower, below = bound, count
    return lower


@dataclass
class Observed:
    """A histogram's observations in the window, per group: bucket counts, sum, count."""

    buckets: dict[float, float] = field(default_factory=dict)
    total: float = 0.0
    count: float = 0.0

    def quantiles(self, qs=(0.5, 0.95)) -> list[float | None]:
        return [quantile(q, self.buckets) for q in qs]

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None


def observed(timeline: Timeline, name: str, group: Iterable[str]) -> dict[tuple, Observed]:
    """The observations of histogram ``name`` in the window, by the ``group`` labels: each
    series' buckets, sum and count between the moves of its ``_count``."""
    group = tuple(group)
    out: dict[tuple, Observed] = defaultdict(Observed)
    for labels in timeline.keys(f"{name}_count"):
        between = timeline.steps(f"{name}_count", labels)
        as_dict = dict(labels)
        seen = out[tuple(as_dict.get(g, "") for g in group)]
        seen.count += timeline.growth(f"{name}_count", labels, between)
        seen.total += timeline.growth(f"{name}_sum", labels, between)
        for bucket in timeline.keys(f"{name}_bucket"):
            bucket_labels = dict(bucket)
            le = bucket_labels.pop("le", "+Inf")
            if tuple(sorted(bucket_labels.items())) != labels:
                continue
            bound = float(le)
            grown = timeline.growth(f"{name}_bucket", bucket, between)
            seen.buckets[bound] = seen.buckets.get(bound, 0.0) + grown
    return dict(out)


def latest(scrape: Scrape, name: str, group: Iterable[str], combine=sum) -> dict[tuple, float]:
    values: dict[tuple, list[float]] = defaultdict(list)
    group = tuple(group)
    for labels, value in scrape.select(name):
        values[tuple(labels.get(g, "") for g in group)].append(value)
    return {key: combine(vs) for key, vs in values.items()}


# ------------------------------------------------------------------------------ the report


@dataclass
class DeploymentFigures:
    application: str
    deployment: str
    replicas_healthy: int = 0
    replicas_unhealthy: int = 0
    requests_per_s: float = 0.0
    errors_per_s: float = 0.0
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None


@dataclass
class ModelFigures:
    model: str
    ttft_mean_s: float | None = None
    ttft_p50_s: float | None = None
    ttft_p95_s: float | None = None
    prompt_tokens_per_s: float = 0.0
    generated_tokens_per_s: float = 0.0
    requests_running: float = 0.0
    requests_waiting: float = 0.0
    kv_cache_use: float | None = None  # 0..1


@dataclass
class DoorFigures:
    """``/v1`` at the head's gateway: what callers see (``node/door_figures.py``)."""

    requests_per_s: float = 0.0
    errors_per_s: float = 0.0  # 5xx answers
    refused_per_s: float = 0.0  # 401 (no or a wrong key)
    first_token_mean_s: float | None = None  # streamed answers: to the first event
    first_token_p50_s: float | None = None
    first_token_p95_s: float | None = None


@dataclass
class NodeFigures:
    node_id: str
    node_type: str
    kind: str
    cml_status: str
    ray_state: str
    age_s: float
    gpus: int
    gpu_hours: float
    cpu_use_percent: float | None = None
    gpu_use_percent: float | None = None


@dataclass
class TopReport:
    cluster: str
    window_s: float
    door: DoorFigures | None = None
    deployments: list[DeploymentFigures] = field(default_factory=list)
    models: list[ModelFigures] = field(default_factory=list)
    nodes: list[NodeFigures] = field(default_factory=list)
    pending_nodes: list[str] = field(default_factory=list)
    decisions: list[str] = field(default_factory=list)  # the autoscaler's last, with reasons
    metrics_note: str = ""  # why figures are missing, when they are

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TopReport:
        """A report written by ``to_dict`` (a run's last figures, in its history)."""
        door = data.get("door")
        return cls(
            cluster=data.get("cluster", ""),
            window_s=data.get("window_s", 0.0),
            door=DoorFigures(**door) if door else None,
            deployments=[DeploymentFigures(**d) for d in data.get("deployments") or []],
            models=[ModelFigures(**m) for m in data.get("models") or []],
            nodes=[NodeFigures(**n) for n in data.get("nodes") or []],
            pending_nodes=list(data.get("pending_nodes") or []),
            decisions=list(data.get("decisions") or []),
            metrics_note=data.get("metrics_note", ""),
        )


def serve_figures(timeline: Timeline) -> list[DeploymentFigures]:
    where = ("application", "deployment")
    requests_ = rates(timeline, "ray_serve_deployment_request_counter_total", where)
    errors = rates(timeline, "ray_serve_deployment_error_counter_total", where)
    latency = observed(timeline, "ray_serve_deployment_processing_latency_ms", where)
    healthy: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])
    for labels, value in timeline.last.select("ray_serve_deployment_replica_healthy"):
        key = (labels.get("application", ""), labels.get("deployment", ""))
        healthy[key][0 if value >= 1 else 1] += 1
    figures = []
    for key in sorted(set(requests_) | set(healthy) | set(latency)):
        p50, p95 = latency[key].quantiles() if key in latency else (None, None)
        figures.append(
            DeploymentFigures(
                application=key[0],
                deployment=key[1],
                replicas_healthy=healthy[key][0] if key in healthy else 0,
                replicas_unhealthy=healthy[key][1] if key in healthy else 0,
                requests_per_s=requests_.get(key, 0.0),
                errors_per_s=errors.get(key, 0.0),
                latency_p50_ms=p50,
                latency_p95_ms=p95,
            )
        )
    return figures


def door_figures(timeline: Timeline) -> DoorFigures | None:
    if not timeline.keys("ray_cml_gateway_requests_total"):
        return None  # a head from before the gateway counted its callers
    answered = rates(timeline, "ray_cml_gateway_requests_total", ("route", "status"))
    v1 = {status: n for (route, status), n in answered.items() if route == "v1"}
    first_token = observed(timeline, "ray_cml_gateway_first_byte_seconds", ("route", "streamed"))
    streamed = first_token.get(("v1", "true"), Observed())
    p50, p95 = streamed.quantiles()
    return DoorFigures(
        requests_per_s=sum(v1.values()),
        errors_per_s=sum(n for status, n in v1.items() if status.startswith("5")),
        refused_per_s=v1.get("401", 0.0),
        first_token_mean_s=streamed.mean,
        first_token_p50_s=p50,
        first_token_p95_s=p95,
    )


def _vllm(name: str) -> str:
    return f"ray_vllm_{name}"


def model_figures(timeline: Timeline) -> list[ModelFigures]:
    by = ("model_name",)
    ttft = observed(timeline, _vllm("time_to_first_token_seconds"), by)
    prompt = rates(timeline, _vllm("prompt_tokens_total"), by)
    generated = rates(timeline, _vllm("generation_tokens_total"), by)
    last = timeline.last
    running = latest(last, _vllm("num_requests_running"), by)
    waiting = latest(last, _vllm("num_requests_waiting"), by)
    cache = latest(last, _vllm("kv_cache_usage_perc"), by, combine=max)
    cache = cache or latest(last, _vllm("gpu_cache_usage_perc"), by, combine=max)
    figures = []
    for key in sorted(set(ttft) | set(prompt) | set(generated) | set(running)):
        seen = ttft.get(key, Observed())
        p50, p95 = seen.quantiles()
        figures.append(
            ModelFigures(
                model=key[0],
                ttft_mean_s=seen.mean,
                ttft_p50_s=p50,
                ttft_p95_s=p95,
                prompt_tokens_per_s=prompt.get(key, 0.0),
                generated_tokens_per_s=generated.get(key, 0.0),
                requests_running=running.get(key, 0.0),
                requests_waiting=waiting.get(key, 0.0),
                kv_cache_use=cache.get(key),
            )
        )
    return figures


def node_use(last: Scrape) -> dict[str, tuple[float | None, float | None]]:
    """(CPU %, GPU %) per node id (``ray_cml_node``, added by the head's ``/metrics``)."""
    cpu = latest(last, "ray_node_cpu_utilization", ("ray_cml_node",), combine=max)
    gpu = latest(last, "ray_node_gpus_utilization", ("ray_cml_node",), combine=_mean)
    nodes = {k[0] for k in cpu} | {k[0] for k in gpu}
    return {n: (cpu.get((n,)), gpu.get((n,))) for n in nodes if n}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
