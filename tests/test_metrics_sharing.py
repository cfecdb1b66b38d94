"""/metrics under many family sets: one fetch and one parse of each export per snapshot,
shared by every ``?family=`` set, so a holder of the metrics key who varies the families
cannot keep the owner's scrape out nor make the head parse the exports again and again
(``ray_cml_provider/node/cluster_metrics.py``)."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ray_cml_provider.node import cluster_metrics
from ray_cml_provider.node.cluster_metrics import UNKNOWN, ClusterMetrics, NodeMap, Snapshot
from ray_cml_provider.node.gateway import Gateway, RunningGateway, Upstream
from tests.test_node_gateway import (
    METRICS_KEY,
    RAY_TOKEN,
    Exporter,
    Recorder,
    bearer,
    key_files,
)

OWNER_WITHIN_S = 2.0  # the owner's scrape, however a scraper varies ?family=


def gauges(count: int, samples: int, value: float = 1.0) -> str:
    """``count`` gauge families ``m0``... of ``samples`` samples each (names that a short
    prefix, ``m``, matches all of)."""
    return "".join(
        f"# HELP m{i} A figure.\n# TYPE m{i} gauge\n"
        + "".join(f'm{i}{{a="{j}"}} {value}\n' for j in range(samples))
        for i in range(count)
    )


MIXED = (
    "# HELP ray_serve_requests_total Requests.\n"
    "# TYPE ray_serve_requests_total counter\n"
    'ray_serve_requests_total{route="/v1"} 3.0\n'
    "# HELP ray_vllm_latency_s Latency.\n"
    "# TYPE ray_vllm_latency_s histogram\n"
    'ray_vllm_latency_s_bucket{le="1.0"} 1.0\n'
    'ray_vllm_latency_s_bucket{le="+Inf"} 2.0\n'
    "ray_vllm_latency_s_count 2.0\n"
    "ray_vllm_latency_s_sum 1.5\n"
    "# HELP ray_node_cpu_utilization CPU.\n"
    "# TYPE ray_node_cpu_utilization gauge\n"
    'ray_node_cpu_utilization{ip="a"} 12.5\n'
)


@pytest.fixture
def parses(monkeypatch) -> list[int]:
    """How many texts the parser was given (one a block, a family's lines in one export)."""
    calls: list[int] = []
    parse = cluster_metrics.text_string_to_metric_families

    def counted(text: str):
        calls.append(len(text))
        return parse(text)

    monkeypatch.setattr(cluster_metrics, "text_string_to_metric_families", counted)
    return calls


def families_of(body: bytes) -> dict:
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


async def rendered(metrics: ClusterMetrics, *family_sets: tuple[str, ...]) -> list[bytes]:
    async with aiohttp.ClientSession() as session:
        return [await metrics.render(session, families) for families in family_sets]


def test_a_filtered_answer_comes_from_the_shared_parse(tmp_path, parses):
    """Each family of each export is parsed once per fetch, whichever family sets ask for it
    and in whatever order; a filtered answer is a selection of the families already parsed
    (the same bytes as in the full answer), with ray_cml_scrape_up."""
    exports = [Exporter("127.0.0.1", MIXED), Exporter("127.0.0.1", gauges(20, 3))]
    discovery = tmp_path / "discovery.json"
    discovery.write_text(json.dumps([{"targets": [e.target for e in exports]}]))
    try:
        metrics = ClusterMetrics(discovery, NodeMap(tmp_path / "nodes"), timeout_s=2)
        filtered, full, again, short = asyncio.run(
            rendered(metrics, ("ray_node_cpu",), (), ("ray_node_cpu",), ("m", "ray_"))
        )
        blocks = 3 + 20  # MIXED's three families, and the twenty gauges
        # The filtered answer, asked first, parsed its family's block only; the full one
        # parsed the others, nothing twice; then nothing more, for any family set.
        assert len(parses) == blocks, len(parses)
        assert metrics.fetches == 1 and [e.fetched for e in exports] == [1, 1]
        assert again == filtered and families_of(short).keys() == families_of(full).keys()
        picked = families_of(filtered)
        assert picked.keys() == {"ray_node_cpu_utilization", "ray_cml_scrape_up"}
        assert [line for line in full.splitlines() if b"ray_node_cpu" in line] == [
            line for line in filtered.splitlines() if b"ray_node_cpu" in line
        ]
        assert len(picked["ray_cml_scrape_up"].samples) == 2
        # Another family set, fresh metrics: those asked for first, the rest once, later.
        parses.clear()
        metrics = ClusterMetrics(discovery, NodeMap(tmp_path / "nodes"), timeout_s=2)
        (ten,) = asyncio.run(rendered(metrics, ("m1",)))  # m1, m10...m19
        assert len(parses) == 11 and set(families_of(ten)) == {
            "m1",
            *(f"m1{i}" for i in range(10)),
            "ray_cml_scrape_up",
        }
    finally:
        for e in exports:
            e.close()


def test_many_family_sets_at_once_share_one_fetch_and_one_parse(tmp_path, parses):
    """100 scrapes at once, each with its own family set, each matching nearly everything by
    prefix: one fetch, each block parsed once, every answer complete."""
    export = Exporter("127.0.0.1", gauges(100, 5))
    discovery = tmp_path / "discovery.json"
    discovery.write_text(json.dumps([{"targets": [export.target]}]))

    async def at_once(metrics: ClusterMetrics) -> list[bytes]:
        async with aiohttp.ClientSession() as session:
            sets = [("m", f"x{i}") if i % 2 else (f"m{i % 10}", "m") for i in range(100)]
            return await asyncio.gather(*(metrics.render(session, s) for s in sets))

    try:
        metrics = ClusterMetrics(discovery, NodeMap(tmp_path / "nodes"), timeout_s=2)
        answers = asyncio.run(at_once(metrics))
        assert export.fetched == 1 and metrics.fetches == 1
        assert len(parses) == 100, len(parses)
        assert len(set(answers)) == 1 and len(families_of(answers[0])) == 101
    finally:
        export.close()


def test_a_family_prefix_picks_whole_families_by_their_samples_names_too():
    """``x_total``, ``x_bucket``... pick family ``x`` whole, typed as the export types it."""
    snapshot = Snapshot(["10.0.0.2:8080"], [MIXED], lambda ip: UNKNOWN)
    for prefixes, names in (
        (("ray_vllm_latency_s_bucket",), {"ray_vllm_latency_s"}),
        (("ray_serve_requests_total",), {"ray_serve_requests"}),
        (("ray_serve_requests",), {"ray_serve_requests"}),
        (("ray_vllm_", "ray_node_"), {"ray_vllm_latency_s", "ray_node_cpu_utilization"}),
        (("nothing",), set()),
    ):
        picked = snapshot.pick(prefixes)
        snapshot.write(picked)
        answer = families_of(snapshot.answer(prefixes, picked))
        assert answer.keys() == names | {"ray_cml_scrape_up"}, prefixes
    assert answer["ray_cml_scrape_up"].samples[0].value == 1.0
    histogram = families_of(snapshot.answer((), snapshot.pick(("ray_vllm",))))
    assert histogram["ray_vllm_latency_s"].type == "histogram"
    assert snapshot.parsed == 3  # each family once, for every prefix above


def test_answers_kept_per_family_set_are_bounded():
    snapshot = Snapshot(["10.0.0.2:8080"], [gauges(40, 2)], lambda ip: UNKNOWN)
    for i in range(40):
        prefixes = (f"m{i}",)
        picked = snapshot.pick(prefixes)
        snapshot.write(picked)
        snapshot.answer(prefixes, picked)
    assert len(snapshot.answers) == cluster_metrics.MOST_KEPT
    assert snapshot.kept(("m39",)) is not None and snapshot.kept(("m0",)) is None
    assert snapshot.parsed == 40


def test_a_new_fetch_follows_once_the_snapshot_is_old(tmp_path):
    """Family sets do not keep a snapshot alive: past its freshness a scrape fetches again."""
    export = Exporter("127.0.0.1", gauges(3, 2, value=1.0))
    discovery = tmp_path / "discovery.json"
    discovery.write_text(json.dumps([{"targets": [export.target]}]))

    async def twice(metrics: ClusterMetrics) -> tuple[bytes, bytes]:
        async with aiohttp.ClientSession() as session:
            first = await metrics.render(session, ("m1",))
            export.text = gauges(3, 2, value=7.0)
            await asyncio.sleep(cluster_metrics.FETCH_FRESH_S + 0.2)
            return first, await metrics.render(session, ("m1", "m2"))

    try:
        metrics = ClusterMetrics(discovery, NodeMap(tmp_path / "nodes"), timeout_s=2)
        first, second = asyncio.run(twice(metrics))
        assert families_of(first)["m1"].samples[0].value == 1.0
        assert families_of(second)["m1"].samples[0].value == 7.0
        assert export.fetched == 2
    finally:
        export.close()


def test_f7_many_family_sets_cannot_keep_the_owners_scrape_out(tmp_path, parses):
    """A holder of the metrics key scrapes in a loop from 6 threads, every scrape with a family
    set of its own (``m``, ``m1``, ``m12``... each matching nearly every family by prefix),
    while the owner (Ray's token) scrapes everything: each of the owner's scrapes is answered
    (200) within OWNER_WITHIN_S; the export is fetched at most once per FETCH_FRESH_S, and
    each of its families parsed at most once per fetch."""
    export = Exporter("127.0.0.1", gauges(300, 40))
    discovery = tmp_path / "discovery.json"
    discovery.write_text(json.dumps([{"targets": [export.target]}]))
    metrics = ClusterMetrics(discovery, NodeMap(tmp_path / "nodes"), timeout_s=2)
    upstream = Recorder("serve")
    gateway = Gateway(
        Upstream("127.0.0.1", upstream.port, "s"),
        Upstream("127.0.0.1", upstream.port, "d"),
        key_files(tmp_path, locked=True),
        log=lambda _: None,
        metrics=metrics,
    )
    running = RunningGateway(gateway, "127.0.0.1", 0)
    seconds = 3.0
    until = time.monotonic() + seconds
    attacker: list[int] = []

    def scrape(key: str, query: str = "") -> tuple[int, float, bytes]:
        started = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=30)
        try:
            conn.request("GET", "/metrics" + query, headers=bearer(key))
            answer = conn.getresponse()
            return answer.status, time.monotonic() - started, answer.read()
        finally:
            conn.close()

    def attack(thread: int) -> None:
        n = 0
        while time.monotonic() < until:
            n += 1
            prefix = f"m{thread}{n}"[: 1 + n % 4]  # m, m3, m31, m312...: nearly all of them
            attacker.append(scrape(METRICS_KEY, f"?family={prefix}&family=x{thread}_{n}")[0])

    threads = [threading.Thread(target=attack, args=(t,)) for t in range(6)]
    owner: list[tuple[int, float]] = []
    try:
        started = time.monotonic()
        for thread in threads:
            thread.start()
        time.sleep(0.2)
        while time.monotonic() < until:
            status, took, body = scrape(RAY_TOKEN)
            owner.append((status, took))
            time.sleep(0.1)
        for thread in threads:
            thread.join(30)
        elapsed = time.monotonic() - started
    finally:
        running.close()
        upstream.shutdown()
        upstream.server_close()
        export.close()
    assert owner and all(s == 200 and t < OWNER_WITHIN_S for s, t in owner), owner
    assert len(families_of(body)) == 301  # everything, and ray_cml_scrape_up
    assert len(attacker) > 20 and set(attacker) == {200}, set(attacker)
    most_fetches = elapsed / cluster_metrics.FETCH_FRESH_S + 2
    assert 1 <= export.fetched == metrics.fetches <= most_fetches, (export.fetched, elapsed)
    assert len(parses) <= 300 * export.fetched, (len(parses), export.fetched)
