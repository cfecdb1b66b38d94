"""What CML's API latency costs the cluster's life. Prints numbers; asserts nothing.

    .venv/bin/python bench/api_latency_bench.py [--latency-ms 0 100 300] [--runs 1]

CML's API answers in about 100 to 300 ms; the emulator in about 1 ms. For each latency, a
fresh emulator adds it to every API request (``--latency-ms``: the laptop's calls and the
head's alike), and one cluster (real Ray, ``local-emulator.yaml``) goes through its life:

1. ``ray up``;
2. a GPU scale-up: ``ray submit`` of a script that asks for one GPU, until it returns (the
   worker created, its raylet joined, the task run), with the probe's demand -> join;
3. idle removal: from the GPU task's end until the worker's application is gone
   (``idle_timeout_minutes`` of the config, 15 s, is in it);
4. ``ray down``.

Each phase prints its wall time, the API requests it made (the laptop's, with the operator's
key, and the nodes', with their engines' keys), and the ratio to the first latency's figure;
"round trips" is (time - time at 0 ms) / latency: how many requests the phase waited on
one after another. ``--routes`` also lists each phase's requests by route and caller, with
the time that caller had a request in flight (the emulator's trace).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

from ray_cml_provider.demo.local_cluster import LocalCluster
from ray_cml_provider.emulator.harness import RunningEmulator

PROBE = Path(__file__).with_name("gpu_join_probe.py")
PHASES = ("ray up", "scale-up (ray submit)", "  demand -> joined", "idle removal", "ray down")


def in_flight(trace: list[list], caller: str) -> float:
    """Seconds during which ``caller`` had at least one request in flight."""
    spans = sorted((t[0], t[0] + t[1]) for t in trace if t[3] == caller)
    total, end = 0.0, float("-inf")
    for start, stop in spans:
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def describe(phase: str, trace: list[list]) -> str:
    lines = [f"  {phase}:"]
    for caller in ("operator", "engine"):
        routes = Counter(t[2] for t in trace if t[3] == caller)
        if routes:
            lines.append(
                f"    {caller}: {sum(routes.values())} requests, "
                f"{in_flight(trace, caller):.1f} s with one in flight"
            )
            lines += [f"      {n:5d}  {route}" for route, n in routes.most_common(12)]
    return "\n".join(lines)


Figures = dict[str, tuple[float, int | None]]


def one_life(
    latency_ms: float, routes: list[str], save: Path | None = None, scale: bool = True
) -> Figures:
    """The phases' (seconds, API requests) for one cluster at ``latency_ms``; with the
    requests of each phase described in ``routes``, and their traces written under ``save``.
    Without ``scale``: ``ray up`` and ``ray down`` only."""
    figures: Figures = {}
    with (
        tempfile.TemporaryDirectory(prefix="bench-") as work,
        RunningEmulator(extra_args=["--latency-ms", str(latency_ms)]) as emulator,
    ):
        cluster = LocalCluster(emulator, Path(work), cluster_name="lat")

        def timed(phase: str, action, ok) -> object:
            emulator.reset_stats()
            started = time.monotonic()
            result = action()
            stats = emulator.stats(trace=True)
            figures[phase] = (time.monotonic() - started, stats["total"])
            routes.append(describe(phase, stats["trace"]))
            if save:
                name = f"{latency_ms:g}ms-{phase.split()[0]}-{phase.split()[-1]}.json"
                (save / name.replace("(", "").replace(")", "")).write_text(
                    json.dumps(stats["trace"])
                )
            if not ok(result):
                output = getattr(result, "stdout", "")[-3000:]
                raise SystemExit(f"{phase} failed at {latency_ms:g} ms:\n{output}")
            return result

        try:
            timed("ray up", cluster.up, lambda r: r.returncode == 0)
            if not scale:
                return figures
            ran = timed(
                "scale-up (ray submit)", lambda: cluster.submit(PROBE), lambda r: r.returncode == 0
            )
            line = next(x for x in ran.stdout.splitlines() if x.startswith("BENCH "))
            probe = json.loads(line[len("BENCH ") :])
            figures["  demand -> joined"] = (probe["t_join"] - probe["t_demand"], None)
            emulator.reset_stats()
            cluster.wait_for(lambda: not cluster.workers(), 300, "the idle worker removed")
            stats = emulator.stats(trace=True)
            figures["idle removal"] = (time.time() - probe["t_done"], stats["total"])
            routes.append(describe("idle removal", stats["trace"]))
        finally:
            timed("ray down", cluster.down, lambda r: r.returncode == 0)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[0, 100, 300])
    parser.add_argument("--runs", type=int, default=1, help="lives per latency (median shown)")
    parser.add_argument(
        "--routes", action="store_true", help="each phase's requests by route and caller"
    )
    parser.add_argument(
        "--save-traces", type=Path, help="write each phase's request trace (JSON) here"
    )
    parser.add_argument(
        "--up-down-only", action="store_true", help="ray up and ray down only (no scale-up)"
    )
    args = parser.parse_args()
    phases = ("ray up", "ray down") if args.up_down_only else PHASES
    if args.save_traces:
        args.save_traces.mkdir(parents=True, exist_ok=True)
    results: dict[float, Figures] = {}
    # The latencies take turns, run by run: a slow spell of this machine (2 cores, a Ray per
    # node) then falls on all of them, not on one latency's runs.
    routes_at: dict[float, list[str]] = {latency: [] for latency in args.latency_ms}
    lives_at: dict[float, list[Figures]] = {latency: [] for latency in args.latency_ms}
    for run in range(1, args.runs + 1):
        for latency in args.latency_ms:
            life = one_life(latency, routes_at[latency], args.save_traces, not args.up_down_only)
            lives_at[latency].append(life)
            figures = ", ".join(f"{phase.strip()} {life[phase][0]:.1f} s" for phase in phases)
            print(f"run {run}, latency {latency:g} ms: {figures}", flush=True)
    for latency in args.latency_ms:
        routes, lives = routes_at[latency], lives_at[latency]
        if args.routes:
            print(f"latency {latency:g} ms, the first run's requests:")
            described = [phase for phase in phases if not phase.startswith(" ")]
            print("\n".join(routes[: len(described)]))
        results[latency] = {
            phase: (
                statistics.median(life[phase][0] for life in lives),
                lives[0][phase][1],
            )
            for phase in phases
        }
        each = "; ".join(
            f"{phase.strip()} " + " ".join(f"{life[phase][0]:.1f}" for life in lives)
            for phase in phases
        )
        print(f"latency {latency:g} ms: done (each run, s: {each})", flush=True)
    base = args.latency_ms[0]
    print(f"\nCML API latency and the cluster's life ({args.runs} run(s) each, median):")
    print(
        f"  {'phase':<24}{'latency':>9}{'seconds':>9}{'requests':>10}{'x base':>8}"
        f"{'round trips':>13}"
    )
    for phase in phases:
        for latency in args.latency_ms:
            seconds, requests_made = results[latency][phase]
            ratio = seconds / results[base][phase][0]
            trips = (
                f"{(seconds - results[base][phase][0]) / (latency / 1000):13.0f}"
                if latency > base
                else f"{'':>13}"
            )
            print(
                f"  {phase:<24}{latency:>7g}ms{seconds:9.1f}"
                f"{requests_made if requests_made is not None else '':>10}{ratio:8.2f}{trips}"
            )


if __name__ == "__main__":
    main()
