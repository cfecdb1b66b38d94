"""The whole cluster's metrics at one URL: what the head's gateway serves at ``/metrics``.

Every Ray node exports its figures in Prometheus' text format (Ray's, Serve's ``ray_serve_*``
and, when the LLM config logs engine metrics, vLLM's ``ray_vllm:*``), each on a port of its
own; the head's Ray keeps the list of them current in its session folder
(``prom_metrics_service_discovery.json``, the file Prometheus' file discovery reads). On CML
only the head's application port is reachable from outside, so the head gathers them: one
scrape of ``/metrics`` fetches every export listed there at once, parses each with
``prometheus_client``'s parser, adds the node's labels (``ray_cml_node``,
``ray_cml_node_kind``, ``ray_cml_node_type``, from the nodes' ``node.json``) and writes one
exposition with ``prometheus_client`` again. ``ray_cml_scrape_up`` says which exports
answered.

A scrape costs the head's CPU (parsing every export: ~0.5 s for a few workers), so the
scraper's rhythm must not be the head's: scrapers that ask at once share one render (and
one fetch of the exports), one render runs at a time, and after a render that took ``t`` the
next one waits ``t / CPU_SHARE``; meanwhile a scraper gets the newest answer there is. One
scraper in a loop, or many, thus costs at most a quarter of a core, and the parsing runs in
a thread beside the event loop that serves ``/v1``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from prometheus_client.core import Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from ray_cml_provider.contract import NodeInfo

DISCOVERY_FILE = "prom_metrics_service_discovery.json"
NODES_FRESH_S = 30.0  # how long the node map read from node.json files is kept
EXPORT_MOST_BYTES = 32 * 1024 * 1024  # one node's export; a bigger one is left out
CPU_SHARE = 0.25  # of one core, at most, for rendering /metrics, however often it is asked
FETCH_FRESH_S = 0.5  # the exports fetched for one render serve others started this soon
MOST_WAITING = 16  # scrapers waiting for a render; past that, refused (503) until one ends
MOST_KEPT = 16  # answers kept, by the families asked for


@dataclass(frozen=True)
class NodeLabels:
    node_id: str
    kind: str
    node_type: str

    def as_labels(self) -> dict[str, str]:
        return {
            "ray_cml_node": self.node_id,
            "ray_cml_node_kind": self.kind,
            "ray_cml_node_type": self.node_type,
        }


UNKNOWN = NodeLabels("", "", "")


class NodeMap:
    """The cluster's nodes by address, from their ``node.json`` on the mount (read again
    every ``NODES_FRESH_S``)."""

    def __init__(self, nodes_dir: Path):
        self.nodes_dir = nodes_dir
        self._by_ip: dict[str, NodeLabels] = {}
        self._read_at = 0.0

    def __call__(self, ip: str) -> NodeLabels:
        if time.monotonic() - self._read_at > NODES_FRESH_S or ip not in self._by_ip:
            self._refresh()
        return self._by_ip.get(ip, UNKNOWN)

    def _refresh(self) -> None:
        by_ip = {}
        for path in self.nodes_dir.glob("*/node.json"):
            try:
                info = NodeInfo.from_json(path.read_bytes())
            except (OSError, ValueError):
                continue
            by_ip[info.ip] = NodeLabels(info.node_id, info.kind, info.node_type)
        self._by_ip, self._read_at = by_ip, time.monotonic()


class ClusterMetrics:
    """Gather every live node's export into one exposition."""

    def __init__(
        self,
        discovery_file: Path,
        node_of: Callable[[str], NodeLabels],
        timeout_s: float = 5.0,
        own: tuple[str, Callable[[], str]] | None = None,
    ):
        self.discovery_file = discovery_file
        self.node_of = node_of
        self.timeout_s = timeout_s
        # This process's own figures (the gateway's): (the head's ip, their exposition).
        self.own = own
        # Sharing renders between scrapers (the module's docstring).
        self._answers: OrderedDict[tuple[str, ...], bytes] = OrderedDict()
        self._rendering: dict[tuple[str, ...], asyncio.Future] = {}
        self._waiting = 0
        self._next_render_at = 0.0
        self._lock: asyncio.Lock | None = None
        self._fetched: tuple[list[str], list[str]] = ([], [])
        self._fetched_at = float("-inf")

    def targets(self) -> list[str]:
        """``host:port`` of every export the head's Ray lists now ([] before Ray runs)."""
        try:
            groups = json.loads(self.discovery_file.read_text())
        except (OSError, ValueError):
            return []
        return sorted(
            {t for group in groups if isinstance(group, dict) for t in group.get("targets", [])}
        )

    async def render(
        self, session: aiohttp.ClientSession, families: tuple[str, ...] = ()
    ) -> bytes | None:
        """The exposition; with ``families``, only those metric families (by name, or by
        sample name: ``x_total``, ``x_bucket``...), picked before parsing, so a scraper
        that needs a few figures often (``ray-cml top``) costs the head little. None when
        too many scrapers wait already (the gateway answers 503)."""
        key = tuple(sorted(set(families)))
        kept = self._answers.get(key)
        if kept is not None and time.monotonic() < self._next_render_at:
            return kept  # the newest there is: rendering again now would be over the share
        pending = self._rendering.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        if self._waiting >= MOST_WAITING:
            return None
        self._waiting += 1
        future = asyncio.get_running_loop().create_future()
        self._rendering[key] = future
        body = None
        try:
            async with self._one_at_a_time():
                await asyncio.sleep(max(0.0, self._next_render_at - time.monotonic()))
                started = time.monotonic()
                body = await self._render(session, key)
                spent = time.monotonic() - started
                self._next_render_at = time.monotonic() + spent * (1 / CPU_SHARE - 1)
            self._answers[key] = body
            self._answers.move_to_end(key)
            while len(self._answers) > MOST_KEPT:
                self._answers.popitem(last=False)
            return body
        finally:
            self._waiting -= 1
            del self._rendering[key]
            future.set_result(body)

    def _one_at_a_time(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()  # made on the gateway's loop, at its first scrape
        return self._lock

    async def _render(self, session: aiohttp.ClientSession, families: tuple[str, ...]) -> bytes:
        targets, texts = await self._exports(session)
        # Parsing and writing a few hundred kB takes tens of milliseconds: off the event loop
        # that serves /v1 and the dashboard.
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.assemble_only, targets, texts, families)

    async def _exports(self, session: aiohttp.ClientSession) -> tuple[list[str], list[str]]:
        """Every export's text (and this process's own), fetched at most once per
        ``FETCH_FRESH_S``."""
        if time.monotonic() - self._fetched_at > FETCH_FRESH_S:
            targets = self.targets()
            texts = list(await asyncio.gather(*(self._fetch(session, t) for t in targets)))
            self._fetched, self._fetched_at = (targets, texts), time.monotonic()
        targets, texts = self._fetched
        targets, texts = list(targets), list(texts)
        if self.own is not None:
            ip, exposition = self.own
            targets.append(f"{ip}:gateway")
            texts.append(exposition())
        return targets, texts

    def assemble_only(
        self, targets: list[str], texts: list[str], families: tuple[str, ...]
    ) -> bytes:
        answered = [bool(text) for text in texts]
        if families:
            texts = [only(text, families) for text in texts]
        return self.assemble(targets, texts, answered)

    def assemble(
        self, targets: list[str], texts: list[str], answered: list[bool] | None = None
    ) -> bytes:
        """One exposition of the exports' texts, each sample labelled with its node."""
        answered = answered if answered is not None else [bool(text) for text in texts]
        families: dict[str, Metric] = {}
        up = Metric("ray_cml_scrape_up", "1 when the node's export answered this scrape", "gauge")
        for target, text, ok in zip(targets, texts, answered, strict=True):
            labels = self.node_of(target.rsplit(":", 1)[0]).as_labels()
            up.add_sample("ray_cml_scrape_up", {**labels, "instance": target}, float(ok))
            if text:
                self._merge(families, text, {**labels, "instance": target})
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Fixed([*families.values(), up]))
        return generate_latest(registry)

    async def _fetch(self, session: aiohttp.ClientSession, target: str) -> str:
        try:
            timeout = aiohttp.ClientTimeout(total=self.timeout_s)
            plain = {"Accept-Encoding": "identity"}  # the session does not decompress
            url = f"http://{target}/metrics"
            async with session.get(url, timeout=timeout, headers=plain) as answer:
                if answer.status != 200:
                    return ""
                body = bytearray()
                async for chunk in answer.content.iter_chunked(1 << 16):
                    body += chunk
                    if len(body) > EXPORT_MOST_BYTES:
                        return ""
                return body.decode("utf-8", "replace")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return ""

    @staticmethod
    def _merge(families: dict[str, Metric], text: str, labels: dict[str, str]) -> None:
        """Add one export's families, each sample with the node's labels (the export's own
        labels of the same name give way)."""
        try:
            parsed = list(text_string_to_metric_families(text))
        except ValueError:
            return  # not Prometheus' text format: left out, ray_cml_scrape_up still says 1
        for family in parsed:
            merged = families.get(family.name)
            if merged is None:
                merged = Metric(family.name, family.documentation, family.type, family.unit)
                families[family.name] = merged
            for sample in family.samples:
                merged.samples.append(sample._replace(labels={**sample.labels, **labels}))


def only(text: str, families: tuple[str, ...]) -> str:
    """The lines of ``families`` in an exposition: their samples and their ``# HELP`` and
    ``# TYPE`` lines (a line's metric name ends at ``{`` or a space)."""
    kept = []
    for line in text.splitlines():
        if line.startswith("# "):
            parts = line.split(" ", 3)
            name = parts[2] if len(parts) > 2 else ""
        else:
            name = line.split("{", 1)[0].split(" ", 1)[0]
        if name.startswith(families):
            kept.append(line)
    return "\n".join(kept) + "\n" if kept else ""


class _Fixed:
    """A collector that yields the families it was given."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self):
        return iter(self.families)
