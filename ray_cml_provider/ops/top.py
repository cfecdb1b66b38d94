"""``ray-cml top CONFIG``: what the cluster and its models are doing, refreshed in the
terminal (``--json``: one report, for scripts). No Prometheus needed: the figures come from
the head's ``/metrics``, scraped every second over a window (``cluster/top.py`` says which
series and how), and the cluster's status.

    ray-cml top cluster.yaml                # refreshes every --interval seconds; Ctrl-C ends
    ray-cml top cluster.yaml --json         # one report after one interval
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from ray_cml_provider.cluster.status import format_duration
from ray_cml_provider.cluster.top import collect_top
from ray_cml_provider.cluster.workspace import OperatorError, client_for
from ray_cml_provider.cml import CMLError
from ray_cml_provider.figures import MIN_WINDOW_S, TopReport
from ray_cml_provider.ops import report_failure
from ray_cml_provider.provider.config import ClusterConfigError, load_cluster_config

CLEAR = "\x1b[H\x1b[2J"


def table(header: Sequence[str], rows: list[Sequence[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(str(cell).ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
        for row in [header, *rows]
    ]


def _num(value: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def render(top: TopReport) -> str:
    lines = [f"cluster {top.cluster}: rates over the last {top.window_s:.0f} s"]
    if top.metrics_note:
        lines.append(f"metrics: unavailable ({top.metrics_note})")
    lines += render_figures(top)
    lines += ["", "NODES"]
    lines += table(
        ("NODE", "TYPE", "CML", "RAY", "CPU", "GPU", "GPUS", "AGE", "GPU-HOURS"),
        [
            (
                n.node_id,
                n.node_type or "-",
                n.cml_status or "-",
                n.ray_state,
                _num(n.cpu_use_percent, "{:.0f}%"),
                _num(n.gpu_use_percent, "{:.0f}%"),
                str(n.gpus),
                format_duration(n.age_s),
                f"{n.gpu_hours:.2f}",
            )
            for n in top.nodes
        ],
    )
    if top.pending_nodes:
        lines.append(f"pending: {', '.join(top.pending_nodes)}")
    if top.decisions:
        lines += ["", "AUTOSCALER (last decisions)", *(f"  {d}" for d in top.decisions)]
    return "\n".join(lines)


def render_figures(top: TopReport) -> list[str]:
    """The callers', Serve's and the models' tables (also a past run's, in its history)."""
    lines: list[str] = []
    door = top.door
    if door is not None:
        lines += ["", "CALLERS AT THE HEAD'S /v1"]
        lines += table(
            ("REQ/S", "5XX/S", "401/S", "FIRST TOKEN MEAN", "P50", "P95"),
            [
                (
                    _num(door.requests_per_s, "{:.2f}"),
                    _num(door.errors_per_s, "{:.2f}"),
                    _num(door.refused_per_s, "{:.2f}"),
                    _num(door.first_token_mean_s, "{:.3f} s"),
                    _num(door.first_token_p50_s, "{:.3f} s"),
                    _num(door.first_token_p95_s, "{:.3f} s"),
                )
            ],
        )
    if top.deployments:
        lines += ["", "SERVE"]
        lines += table(
            ("APP/DEPLOYMENT", "REPLICAS", "REQ/S", "ERR/S", "P50 MS", "P95 MS"),
            [
                (
                    f"{d.application}/{d.deployment}",
                    f"{d.replicas_healthy}"
                    + (f" (+{d.replicas_unhealthy} not ready)" if d.replicas_unhealthy else ""),
                    _num(d.requests_per_s, "{:.2f}"),
                    _num(d.errors_per_s, "{:.2f}"),
                    _num(d.latency_p50_ms),
                    _num(d.latency_p95_ms),
                )
                for d in top.deployments
            ],
        )
    if top.models:
        lines += ["", "MODELS"]
        lines += table(
            (
                "MODEL",
                "TTFT P50",
                "TTFT P95",
                "PROMPT TOK/S",
                "GEN TOK/S",
                "RUNNING",
                "WAITING",
                "KV CACHE",
            ),
            [
                (
                    m.model,
                    _num(m.ttft_p50_s, "{:.3f} s"),
                    _num(m.ttft_p95_s, "{:.3f} s"),
                    _num(m.prompt_tokens_per_s),
                    _num(m.generated_tokens_per_s),
                    f"{m.requests_running:g}",
                    f"{m.requests_waiting:g}",
                    _num(None if m.kv_cache_use is None else 100 * m.kv_cache_use, "{:.0f}%"),
                )
                for m in top.models
            ],
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ray-cml top", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("config", help="the cluster YAML")
    parser.add_argument("--json", action="store_true", help="one report as JSON, then exit")
    parser.add_argument(
        "--interval",
        type=float,
        default=MIN_WINDOW_S,
        help=f"seconds each report covers (at least and by default {MIN_WINDOW_S:g}: Ray "
        "refreshes a process's figures every 10 s)",
    )
    parser.add_argument("--once", action="store_true", help="one table, then exit")
    args = parser.parse_args(argv)
    config: dict = {"provider": {}}
    try:
        config = load_cluster_config(args.config)
        with client_for(config["provider"]) as client:
            while True:
                top = collect_top(config, client, args.interval)
                if args.json:
                    print(json.dumps(top.to_dict(), indent=2))
                    return 0
                shown = render(top)
                print(shown if args.once or not sys.stdout.isatty() else CLEAR + shown, flush=True)
                if args.once:
                    return 0
    except KeyboardInterrupt:
        return 0
    except (ClusterConfigError, OperatorError, CMLError) as exc:
        return report_failure(exc, config["provider"])
