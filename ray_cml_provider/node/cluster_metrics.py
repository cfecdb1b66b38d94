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

Parsing and writing every export costs the head's CPU (~0.4 s for a few workers), so neither
the scrapers' rhythm nor the families they ask for (``?family=``) may set the head's:

- one fetch of the exports is a *snapshot*, shared by every scraper and every family set.
  Its texts are cut, without parsing, into blocks, one per metric family (where the family's
  ``# HELP``/``# TYPE`` lines start, the parser's own rule), gathered by family across the
  exports;
- a family is parsed and written (with its nodes' labels) at most once per snapshot, when a
  scrape first asks for it, and its bytes are kept. An answer is a selection of families by
  name prefix and a join of their bytes: however a scraper varies ``?family=``, a snapshot
  costs at most one parse and one write of everything, and a scraper that needs a few figures
  often (``ray-cml top``) costs the head those few;
- scrapers that ask at once share one fetch, and one CPU job (cutting a fetch, or parsing and
  writing families) runs at a time, in a thread beside the event loop that serves ``/v1``;
  a job that took ``t`` puts the next fetch ``t / CPU_SHARE`` after its start, and until
  then a scraper is answered from the newest snapshot.

Scrapers in a loop, one or many, with any families, thus cost the head at most a quarter of
a core, plus, for each answer, the selection of its families and the copy of its bytes.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.core import Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ray_cml_provider.contract import NodeInfo

DISCOVERY_FILE = "prom_metrics_service_discovery.json"
NODES_FRESH_S = 30.0  # how long the node map read from node.json files is kept
EXPORT_MOST_BYTES = 32 * 1024 * 1024  # one node's export; a bigger one is left out
CPU_SHARE = 0.25  # of one core, at most, for rendering /metrics, however often it is asked
# A snapshot answers every scrape for this long at least; short, because a scraper dates
# what it gets by its own clock (``ray-cml top`` divides by it: an old snapshot skews rates).
FETCH_FRESH_S = 0.1
MOST_KEPT = 16  # answers kept per snapshot, by the families asked for (least recent out first)
KEPT_MOST_BYTES = 64 * 1024 * 1024  # ... and all of them together at most this big
UP = "ray_cml_scrape_up"
# A line that may start a metric family: ``# HELP name ...`` or ``# TYPE name type``.
HEADER = re.compile(r"^[ \t]*#[ \t]+(HELP|TYPE)[ \t]+(\S+)[ \t]*(\S*)", re.MULTILINE)
# The names a family's samples take besides its own, by its type (what ?family= matches).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
    "summary": ("_count", "_sum", "_created"),
    "info": ("_info",),
}


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


@dataclass
class Family:
    """One metric family in a snapshot: its blocks in the exports' texts, and its exposition
    once written."""

    names: set[str]  # its name and its samples' names: what ``?family=`` prefixes match
    blocks: list[tuple[int, int, int]] = field(default_factory=list)  # (export, start, end)
    written: bytes | None = None


class Snapshot:
    """One fetch of every export: cut into families at once, each family parsed and written
    when first asked for (``write``), and answers joined from them (``answer``)."""

    def __init__(
        self,
        targets: list[str],
        texts: list[str],
        node_of: Callable[[str], NodeLabels],
        taken_at: float = 0.0,
    ):
        self.taken_at = taken_at
        self.texts = texts
        self.labels = [
            {**node_of(target.rsplit(":", 1)[0]).as_labels(), "instance": target}
            for target in targets
        ]
        self.families: dict[str, Family] = {}  # by name, in the order the exports show them
        for export, text in enumerate(texts):
            self._cut(export, text)
        up = Metric(UP, "1 when the node's export answered this scrape", "gauge")
        for labels, text in zip(self.labels, texts, strict=True):
            up.add_sample(UP, labels, float(bool(text)))
        self.up = generate_latest(_Fixed([up]))
        self.parsed = 0  # blocks parsed so far
        self.answers: OrderedDict[tuple[str, ...], bytes] = OrderedDict()
        self._kept_bytes = 0

    def _cut(self, export: int, text: str) -> None:
        """Gather ``text``'s blocks by family, without parsing it: a family starts at a
        ``# HELP``/``# TYPE`` line naming another one than the lines before (so a block never
        cuts a family, though it may hold a few, which parsing it finds)."""
        starts: list[list] = []  # [start, name, type]
        for header in HEADER.finditer(text):
            name = header[2].strip('"')
            if not starts or name != starts[-1][1]:
                starts.append([header.start(), name, ""])
            if header[1] == "TYPE":
                starts[-1][2] = header[3]
        first = starts[0][0] if starts else len(text)
        if text[:first].strip():  # samples before any header: untyped, named by the first
            names = [
                (line.split("{", 1)[0].split() or [""])[0]
                for line in text[:first].splitlines()
                if line.strip() and not line.lstrip().startswith("#")
            ] or [""]
            self._block(export, 0, first, names[0], "", tuple(names))
        ends = [start for start, _, _ in starts[1:]] + [len(text)]
        for (start, name, kind), end in zip(starts, ends, strict=False):
            self._block(export, start, end, name, kind)

    def _block(
        self, export: int, start: int, end: int, name: str, kind: str, names: tuple[str, ...] = ()
    ) -> None:
        key = name[: -len("_total")] if kind == "counter" and name.endswith("_total") else name
        family = self.families.get(key)
        if family is None:
            family = self.families[key] = Family({key})
        family.names.add(name)
        family.names.update(names)
        family.names.update(key + suffix for suffix in SUFFIXES.get(kind, ()))
        family.blocks.append((export, start, end))

    def pick(self, prefixes: tuple[str, ...]) -> list[Family]:
        """The families whose name, or a sample's name, starts with one of ``prefixes``
        (all of them without)."""
        if not prefixes:
            return list(self.families.values())
        return [
            family
            for family in self.families.values()
            if any(name.startswith(prefixes) for name in family.names)
        ]

    def write(self, families: list[Family]) -> None:
        """Parse the blocks of those of ``families`` not written yet, label each sample with
        its node (the export's own labels of the same name give way), and write them."""
        for family in families:
            if family.written is not None:
                continue
            merged: dict[str, Metric] = {}
            for export, start, end in family.blocks:
                self.parsed += 1
                try:
                    parsed = list(text_string_to_metric_families(self.texts[export][start:end]))
                except (ValueError, IndexError):
                    continue  # not Prometheus' text format: left out, ray_cml_scrape_up says 1
                labels = self.labels[export]
                for one in parsed:
                    into = merged.get(one.name)
                    if into is None:
                        into = Metric(one.name, one.documentation, one.type, one.unit)
                        merged[one.name] = into
                    into.samples.extend(
                        s._replace(labels={**s.labels, **labels}) for s in one.samples
                    )
            family.written = generate_latest(_Fixed(list(merged.values())))

    def answer(self, prefixes: tuple[str, ...], families: list[Family]) -> bytes:
        """The exposition of ``families`` (written) and ``ray_cml_scrape_up``, kept as the
        answer to ``prefixes`` (``MOST_KEPT`` answers at most, ``KEPT_MOST_BYTES`` in all)."""
        body = b"".join([*(family.written or b"" for family in families), self.up])
        if prefixes not in self.answers and len(body) <= KEPT_MOST_BYTES:
            self.answers[prefixes] = body
            self._kept_bytes += len(body)
            while len(self.answers) > MOST_KEPT or self._kept_bytes > KEPT_MOST_BYTES:
                self._kept_bytes -= len(self.answers.popitem(last=False)[1])
        return body

    def kept(self, prefixes: tuple[str, ...]) -> bytes | None:
        body = self.answers.get(prefixes)
        if body is not None:
            self.answers.move_to_end(prefixes)
        return body


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
        self.fetches = 0  # of every export: one per snapshot
        # Sharing the work between scrapers (the module's docstring).
        self._snapshot: Snapshot | None = None
        self._fetching: asyncio.Task | None = None
        self._next_fetch_at = 0.0
        self._lock: asyncio.Lock | None = None
        self._jobs: set[asyncio.Task] = set()

    def targets(self) -> list[str]:
        """``host:port`` of every export the head's Ray lists now ([] before Ray runs)."""
        try:
            groups = json.loads(self.discovery_file.read_text())
        except (OSError, ValueError):
            return []
        return sorted(
            {t for group in groups if isinstance(group, dict) for t in group.get("targets", [])}
        )

    async def render(self, session: aiohttp.ClientSession, families: tuple[str, ...] = ()) -> bytes:
        """The exposition; with ``families``, only the metric families whose name (or a
        sample's name: ``x_total``, ``x_bucket``...) starts with one of them, and
        ``ray_cml_scrape_up``: a scraper that needs a few figures often (``ray-cml top``)
        costs the head those few. Every family set is answered from the newest snapshot,
        whose families are each parsed once, whoever asks: no scraper is refused."""
        prefixes = tuple(sorted(set(families)))
        snapshot = await self._newest(session)
        kept = snapshot.kept(prefixes)
        if kept is not None:
            return kept
        picked = snapshot.pick(prefixes)
        if any(family.written is None for family in picked):
            await asyncio.shield(self._job(self._write(snapshot, picked)))
        return snapshot.answer(prefixes, picked)

    async def _newest(self, session: aiohttp.ClientSession) -> Snapshot:
        """The newest snapshot, or a new one once the spacing and ``FETCH_FRESH_S`` are over
        (fetched once for every scraper that asks meanwhile)."""
        snapshot = self._snapshot
        if snapshot is not None:
            fresh_until = max(self._next_fetch_at, snapshot.taken_at + FETCH_FRESH_S)
            if time.monotonic() < fresh_until:
                return snapshot
        if self._fetching is None:
            self._fetching = self._job(self._take(session))
        return await asyncio.shield(self._fetching)

    def _job(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task:
        """``work`` in a task of its own: a scraper that leaves does not stop it halfway."""
        task = asyncio.ensure_future(work)
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        return task

    async def _take(self, session: aiohttp.ClientSession) -> Snapshot:
        try:
            started = time.monotonic()
            targets, texts = await self._exports(session)
            fetched = time.monotonic() - started
            async with self._one_at_a_time():
                cut_at = time.monotonic()
                loop = asyncio.get_running_loop()
                try:
                    snapshot = await loop.run_in_executor(
                        None, Snapshot, targets, texts, self.node_of, started
                    )
                finally:
                    self._charge(started, fetched + time.monotonic() - cut_at)
            self._snapshot = snapshot
            return snapshot
        finally:
            self._fetching = None

    async def _write(self, snapshot: Snapshot, families: list[Family]) -> None:
        async with self._one_at_a_time():
            missing = [family for family in families if family.written is None]
            if missing:  # unless a job before this one wrote them
                started = time.monotonic()
                loop = asyncio.get_running_loop()
                try:
                    await loop.run_in_executor(None, snapshot.write, missing)
                finally:
                    self._charge(started, time.monotonic() - started)

    def _charge(self, started: float, spent: float) -> None:
        """A job that took ``spent``: the next fetch waits until the head's CPU spent on
        ``/metrics`` is back under ``CPU_SHARE``."""
        self._next_fetch_at = max(self._next_fetch_at, started) + spent / CPU_SHARE

    def _one_at_a_time(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()  # made on the gateway's loop, at its first scrape
        return self._lock

    async def _exports(self, session: aiohttp.ClientSession) -> tuple[list[str], list[str]]:
        """Every export's text, and this process's own."""
        targets = self.targets()
        texts = list(await asyncio.gather(*(self._fetch(session, t) for t in targets)))
        self.fetches += 1
        if self.own is not None:
            ip, exposition = self.own
            targets.append(f"{ip}:gateway")
            texts.append(exposition())
        return targets, texts

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


class _Fixed:
    """A collector that yields the families it was given."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self):
        return iter(self.families)
