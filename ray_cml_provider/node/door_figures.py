"""What the head's gateway sees of its callers, in Prometheus' terms (``prometheus_client``):
the requests it answered per route and status, and how long each took to its answer's first
byte. On a streamed ``/v1`` answer (server-sent events) the first byte is the first token's
event, so ``ray_cml_gateway_first_byte_seconds{streamed="true"}`` is the time to first token
as callers see it at the head's door: the engine's own figure (vLLM's) plus Serve's routing.
The head's ``/metrics`` serves these beside the nodes' exports."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

# From 5 ms to 2 minutes (a cold start).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5, 10, 30, 120)


class DoorFigures:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ray_cml_gateway_requests",
            "Requests the head's gateway answered, by route and status",
            ("route", "status"),
            registry=self.registry,
        )
        self.first_byte = Histogram(
            "ray_cml_gateway_first_byte_seconds",
            "From a request's arrival at the head's gateway to the first byte of its answer's "
            "body; streamed=true: a server-sent event stream (the first token)",
            ("route", "streamed"),
            buckets=BUCKETS,
            registry=self.registry,
        )

    def answered(self, route: str, status: int) -> None:
        self.requests.labels(route, str(status)).inc()

    def first_byte_after(self, route: str, streamed: bool, seconds: float) -> None:
        self.first_byte.labels(route, "true" if streamed else "false").observe(seconds)

    def exposition(self) -> str:
        return generate_latest(self.registry).decode()
