"""What Ray's token authentication costs: ``ray up``, a GPU worker's join and ``ray-cml
status``, with the token (the default) and without, in one run on one emulator. Prints
numbers; asserts nothing.

    .venv/bin/python bench/ray_auth_bench.py [--rounds 2] [--joins 2]

``cluster-configs/local-emulator.yaml``, ``provider.ray_auth_mode`` token or disabled. The
two modes alternate, round after round, so that a slower minute of the machine falls on
both. Join: from a 1-GPU task's submission to the new worker's raylet alive in Ray
(``bench/gpu_join_probe.py``, measured on the head), after a scale to zero each time; the
autoscaler's 5 s loop makes single joins vary by seconds, hence medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ray_cml_provider.demo.local_cluster import LocalCluster
from ray_cml_provider.emulator.harness import RunningEmulator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bare_runtime_bench import joins_from_zero, timed_up  # noqa: E402  (bench/ is not a package)

IDLE_TIMEOUT_S = 15
MODES = ("token", "disabled")


def one_cluster(emulator: RunningEmulator, work: Path, name: str, mode: str, joins: int) -> dict:
    def settings(config: dict) -> None:
        config["provider"]["ray_auth_mode"] = mode
        config["idle_timeout_minutes"] = IDLE_TIMEOUT_S / 60

    cluster = LocalCluster(emulator, work, cluster_name=name, config_overrides=settings)
    result: dict = {"joins": []}
    try:
        result["up_s"] = timed_up(cluster)
        if (cluster.ray_token() is not None) != (mode == "token"):
            raise SystemExit(f"cluster {name} should run with ray_auth_mode {mode}")
        started = time.monotonic()
        status = cluster.ray_cml("status", str(cluster.config_path))
        if status.returncode != 0 or "Ray's view from the head's GCS" not in status.stdout:
            raise SystemExit(f"ray-cml status did not read Ray's view:\n{status.stdout}")
        result["status_s"] = time.monotonic() - started
        result["joins"] = joins_from_zero(cluster, joins, IDLE_TIMEOUT_S)
    finally:
        cluster.down()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="clusters per mode")
    parser.add_argument("--joins", type=int, default=2, help="worker joins per cluster")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="bench-auth-") as work, RunningEmulator() as emulator:
        for round_number in range(args.rounds):
            for mode in MODES:
                name = f"auth-{mode[:3]}-{round_number}"
                result = one_cluster(emulator, Path(work), name, mode, args.joins)
                print(f"{name}: {result}", flush=True)
                results[mode].append(result)
    header = f"{'ray_auth_mode':<15}{'ray up s':>18}{'status s':>18}{'join s (median)':>17}"
    print(f"\n{header}   joins s")
    for mode, runs in results.items():
        ups = [r["up_s"] for r in runs]
        statuses = [r["status_s"] for r in runs]
        joins = [j for r in runs for j in r["joins"]]
        print(
            f"{mode:<15}"
            f"{' '.join(f'{u:.1f}' for u in ups):>18}"
            f"{' '.join(f'{s:.1f}' for s in statuses):>18}"
            f"{statistics.median(joins):>17.1f}   {' '.join(f'{j:.1f}' for j in joins)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
