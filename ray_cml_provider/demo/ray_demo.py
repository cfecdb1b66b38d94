"""The main job, offline: a Ray cluster on the CML emulator that grows a GPU worker and
gives it back.

1. start the bundled CML emulator (a fresh project in a temporary folder);
2. ``ray up`` with ``cluster-configs/local-emulator.yaml``: a CPU-only head application;
3. ``ray submit`` a task that needs one GPU: the autoscaler creates a GPU worker application;
4. ``ray exec ... ray status`` while the worker is there;
5. wait until the idle worker's application is deleted (scale to zero);
6. ``ray down``: every application of the cluster is deleted; the emulator stops.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ray_cml_provider.demo.local_cluster import LocalCluster
from ray_cml_provider.demo.steps import Steps, show_applications
from ray_cml_provider.emulator.harness import RunningEmulator

GPU_TASK = Path(__file__).with_name("gpu_task.py")


def show_status(steps: Steps, cluster: LocalCluster) -> None:
    """What ``ray-cml status CONFIG`` prints: CML's and Ray's view of every node."""
    result = cluster.ray_cml("status", str(cluster.config_path))
    for line in result.stdout.splitlines():
        steps.say(line)


def run_ray_demo(config: Path, verbose: bool) -> int:
    steps = Steps()

    def echo(line: str) -> None:
        if verbose:
            print(f"      | {line}", flush=True)
        elif "ray-cml: " in line:  # the provider's progress: what ray up is waiting for
            steps.say(line[line.index("ray-cml: ") :])

    steps.step("starting the CML emulator")
    with tempfile.TemporaryDirectory(prefix="ray-cml-demo-") as workdir, RunningEmulator() as emu:
        steps.say(f"{emu.url} (project files in {emu.project_dir})")
        cluster = LocalCluster(emu, Path(workdir), config_path=config, echo=echo)

        steps.step(f"ray up {config.name}: the head application (no GPUs)")
        result = cluster.up()
        if result.returncode != 0:
            return steps.failed(result, "ray up")
        show_status(steps, cluster)

        steps.step("ray submit: a task that needs 1 GPU; the autoscaler adds a GPU worker")
        result = cluster.submit(GPU_TASK)
        for line in result.stdout.splitlines():
            if "GPU task ran on" in line or ("Adding" in line and "ip=" not in line):
                steps.say(line.strip())
        if result.returncode != 0:
            return steps.failed(result)
        show_status(steps, cluster)

        steps.step("ray exec 'ray status' on the head")
        status = cluster.exec("ray status")
        for line in status.stdout.splitlines():
            if line.strip() and not line.startswith("20"):  # skip Ray's own log lines
                steps.say(line)

        steps.step("waiting for the idle GPU worker to be given back (scale to zero)")
        waited = cluster.wait_for(lambda: not cluster.workers(), 180, "the worker to go")
        steps.say(f"worker application deleted after {waited:.0f} s")
        show_applications(steps, cluster)

        steps.step("ray down: every application of the cluster is deleted")
        result = cluster.down()
        if result.returncode != 0:
            return steps.failed(result)
        show_applications(steps, cluster)

        steps.step("stopping the emulator")
        survivors = emu.stop()
        steps.say("no process left behind" if not survivors else f"killed leftovers {survivors}")
    return 0 if not survivors else 1
