"""A GPU worker's join time on a bare runtime: cold environment, warm one, per-node pip, and
Ray preinstalled, on the same machine in one run. Prints numbers; asserts nothing.

    .venv/bin/python bench/bare_runtime_bench.py [--joins 3]

``cluster-configs/cml-cluster.yaml`` as shipped (workspace and idle timeout changed) on
fresh emulators whose two runtimes run:

- preinstalled: this virtualenv's Python, which has Ray (the emulator's old default);
- bare: a plain Python with pip and no Ray (``plain_python()``), as a CML runtime. The first
  worker builds the workers' environment (cold), the next one after scale-to-zero reuses
  it (warm);
- per-node pip: bare, in the same project (warm environment), plus each worker
  pip-installing the same packages into a fresh place itself (``worker_setup_commands``),
  as a node did with ``setup_commands: pip install ...`` before the shared environment.

Join: from a 1-GPU task's submission to the new worker's raylet alive in Ray
(bench/gpu_join_probe.py, measured on the head); the autoscaler's 5 s loop makes single
joins vary by seconds, so warm and preinstalled joins are repeated (``--joins``, after a
scale to zero each) and their median is printed. Goal: warm within 2 s of preinstalled.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from ray_cml_provider.demo.local_cluster import LocalCluster
from ray_cml_provider.emulator.harness import RunningEmulator, plain_python
from ray_cml_provider.provider.packages import local_ray_version

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "cluster-configs"

SHIPPED = REPO_CONFIGS / "cml-cluster.yaml"
PROBE = Path(__file__).with_name("gpu_join_probe.py")
IDLE_TIMEOUT_S = 15


def runtimes() -> list[str]:
    config = yaml.safe_load(SHIPPED.read_text())
    return sorted(
        {t["node_config"]["runtime_identifier"] for t in config["available_node_types"].values()}
    )


def join_s(cluster: LocalCluster) -> float:
    ran = cluster.submit(PROBE)
    match = re.search(r"BENCH (\{.*\})", ran.stdout)
    if ran.returncode != 0 or not match:
        raise SystemExit(f"the probe failed:\n{ran.stdout[-3000:]}")
    times = json.loads(match.group(1))
    return times["t_join"] - times["t_demand"]


def timed_up(cluster: LocalCluster) -> float:
    """``ray up``'s wall time; a failed ``ray up`` ends the bench with its output."""
    started = time.monotonic()
    up = cluster.up()
    if up.returncode != 0:
        raise SystemExit(f"ray up failed:\n{up.stdout[-3000:]}")
    return time.monotonic() - started


def joins_from_zero(cluster: LocalCluster, count: int, idle_timeout_s: float) -> list[float]:
    """``count`` worker joins (``join_s``), each after the cluster scaled back to zero."""
    joins = []
    for _ in range(count):
        joins.append(join_s(cluster))
        cluster.wait_for(lambda: not cluster.workers(), idle_timeout_s + 90, "scale to zero")
    return joins


def scenario(
    python: str, joins: int, per_node_pip: bool = False, project_dir: Path | None = None
) -> dict[str, float]:
    extra = [a for rt in runtimes() for a in ("--runtime", f"{rt}={python}")]
    with (
        tempfile.TemporaryDirectory(prefix="bench-") as work,
        RunningEmulator(extra_args=extra, project_dir=project_dir) as emulator,
    ):

        def workspace(config: dict) -> None:
            config["provider"].update(
                host=emulator.url, project_id=emulator.project_id, api_key_env="CML_API_KEY"
            )
            config["idle_timeout_minutes"] = IDLE_TIMEOUT_S / 60
            if per_node_pip:
                packages = f'"ray[default,serve]=={local_ray_version()}"'
                config["worker_setup_commands"] = [
                    f'"$RAY_CML_PYTHON" -m pip install --quiet --target $RAY_TMPDIR/pip {packages}'
                ]

        cluster = LocalCluster(
            emulator, Path(work), config_path=SHIPPED, config_overrides=workspace
        )
        result: dict[str, float] = {}
        try:
            result["ray_up_s"] = timed_up(cluster)
            for n, joined_s in enumerate(joins_from_zero(cluster, joins, IDLE_TIMEOUT_S)):
                result[f"join{n + 1}_s"] = joined_s
        finally:
            cluster.down()
        return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--joins", type=int, default=3, help="warm and preinstalled joins")
    args = parser.parse_args()
    plain = plain_python()
    print(f"runtimes: preinstalled = {sys.executable}; bare = {plain}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-project-") as project:
        # The two bare scenarios share a project: the per-node pip one finds the workers'
        # environment built (warm), so its extra time is the node's own pip alone.
        bare = scenario(plain, 1 + args.joins, project_dir=Path(project))
        pip = scenario(plain, 1, per_node_pip=True, project_dir=Path(project))
    pre = scenario(sys.executable, args.joins)
    warm_keys = [f"join{n + 2}_s" for n in range(args.joins)]
    rows = [
        ("preinstalled Ray", pre["ray_up_s"], [pre[f"join{n + 1}_s"] for n in range(args.joins)]),
        ("bare, cold environment", bare["ray_up_s"], [bare["join1_s"]]),
        ("bare, warm environment", bare["ray_up_s"], [bare[k] for k in warm_keys]),
        ("bare, warm + per-node pip", pip["ray_up_s"], [pip["join1_s"]]),
    ]
    print(f"\n{'runtime':<26}{'ray up s':>10}{'join s (median)':>17}   joins s")
    for name, up_s, joins in rows:
        samples = " ".join(f"{j:.1f}" for j in joins)
        print(f"{name:<26}{up_s:>10.1f}{statistics.median(joins):>17.1f}   {samples}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
