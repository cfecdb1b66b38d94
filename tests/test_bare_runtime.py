"""``cluster-configs/cml-cluster.yaml`` as shipped, on runtimes with no Ray, as on CML.

A CML runtime image has Python and pip, but no Ray and no ray-cml-provider. Here both
runtimes the config names (a standard one for the head, a CUDA one for GPU workers) run a
plain Python with neither, and the config is used as shipped: only the workspace (host,
project, key) and the idle timeout (10 minutes, a timing, not a behaviour) are changed.

One test walks what a user does: ``ray up`` (the head builds its environment once, the
provider code comes shipped, not installed), two GPU tasks at the same moment (two GPU
workers start together: exactly one builds the workers' environment, the other waits for
it), scale to zero, ``ray down`` with nothing left, and a second cluster whose ``ray up``
reuses the environment without pip (and whose head, its provider code removed, makes
``ray up`` fail with one sentence).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from ray_cml_provider.demo.local_cluster import LocalCluster
from ray_cml_provider.emulator.harness import plain_python

pytestmark = pytest.mark.e2e

SHIPPED = Path(__file__).resolve().parent.parent / "cluster-configs" / "cml-cluster.yaml"
IDLE_TIMEOUT_S = 15
TWO_GPU_TASKS = """
import ray, time
ray.init()

@ray.remote(num_cpus=0)
class Arrivals:
    def __init__(self):
        self.count = 0

    def arrive(self):
        self.count += 1

    def seen(self):
        return self.count

arrivals = Arrivals.remote()

@ray.remote(num_gpus=1)
def where(arrivals):
    ray.get(arrivals.arrive.remote())
    deadline = time.monotonic() + 900
    while ray.get(arrivals.seen.remote()) < 2:  # until both tasks hold a GPU at once
        if time.monotonic() > deadline:
            raise TimeoutError("the other GPU task never started")
        time.sleep(0.2)
    return ray.get_runtime_context().get_node_id()

print("GPU tasks ran on", len(set(ray.get([where.remote(arrivals) for _ in range(2)]))), "nodes")
"""


def shipped_runtimes() -> dict[str, str]:
    config = yaml.safe_load(SHIPPED.read_text())
    return {
        name: node_type["node_config"]["runtime_identifier"]
        for name, node_type in config["available_node_types"].items()
    }


def test_the_stand_in_runtime_has_no_ray():
    probe = subprocess.run([plain_python(), "-c", "import ray"], capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'ray'" in probe.stderr
    assert len(set(shipped_runtimes().values())) == 2  # the head's and the GPU workers'


@pytest.mark.timeout(1200)
def test_the_shipped_config_runs_on_bare_runtimes(start_emulator, tmp_path):
    runtimes = shipped_runtimes()
    python = plain_python()
    emulator = start_emulator(
        *[a for rt in runtimes.values() for a in ("--runtime", f"{rt}={python}")]
    )

    def workspace_only(config: dict) -> None:
        config["provider"].update(
            host=emulator.url, project_id=emulator.project_id, api_key_env="CML_API_KEY"
        )
        config["idle_timeout_minutes"] = IDLE_TIMEOUT_S / 60

    cluster = LocalCluster(
        emulator, tmp_path / "work", config_path=SHIPPED, config_overrides=workspace_only
    )
    # What a CML session of the project pip-installed (CML puts it in /home/cdsw/.local).
    major_minor = subprocess.run(
        [python, "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    user_site = emulator.project_dir / ".local" / "lib" / f"python{major_minor}" / "site-packages"
    user_site.mkdir(parents=True)
    (user_site / "session_installed.py").write_text("WHERE = 'the session'\n")
    (user_site / "jsonschema").mkdir()  # also in the node environment, which must win
    (user_site / "jsonschema" / "__init__.py").write_text("")
    up = cluster.up()
    assert up.returncode == 0, up.stdout[-4000:]
    assert "environment .ray-cml/_envs/" in up.stdout and "built in" in up.stdout, up.stdout[-4000:]
    envs = emulator.project_dir / ".ray-cml" / "_envs"
    [head_env] = [p for p in envs.iterdir() if (p / "env.json").exists()]
    # The head's autoscaler imports the provider from the zip `ray up` shipped.
    lib = emulator.project_dir / ".ray-cml" / cluster.cluster_name / "lib"
    assert [p.name for p in lib.iterdir()][0].startswith("ray_cml_provider-")
    assert not list(head_env.glob("site/ray_cml_provider*"))

    seen = cluster.exec(
        '"$RAY_CML_PYTHON" -c "import session_installed, jsonschema; '
        'print(session_installed.WHERE, jsonschema.__file__)"'
    )
    assert seen.returncode == 0, seen.stdout[-3000:]
    assert "the session" in seen.stdout and "/.ray-cml/_envs/" in seen.stdout, seen.stdout

    script = tmp_path / "two_gpu_tasks.py"
    script.write_text(TWO_GPU_TASKS)
    emulator.reset_stats()
    ran = cluster.submit(script)
    assert ran.returncode == 0, ran.stdout[-4000:]
    assert "GPU tasks ran on 2 nodes" in ran.stdout, ran.stdout[-4000:]
    workers = cluster.workers()
    assert len(workers) == 2, [w.name for w in workers]
    creates = emulator.stats()["requests"]["POST /api/v2/projects/{project_id}/applications"]
    assert creates == 2
    # Ray's view asked of the head runs the shipped provider code with the head's Python.
    table = cluster.ray_cml("status", "--ray-view", "head", str(cluster.config_path))
    assert table.returncode == 0 and "Ray's view asked of the head" in table.stdout, table.stdout
    for worker in workers:
        assert re.search(rf"{worker.name[-8:]}\s+gpu_worker\s+\S+\s+(alive|idle)", table.stdout)

    # Exactly one build of the workers' environment (their runtime is not the head's).
    built = [
        json.loads((p / "env.json").read_text())
        for p in envs.iterdir()
        if (p / "env.json").exists()
    ]
    assert len(built) == 2, built
    worker_env = next(e for e in built if e["runtime"] == runtimes["gpu_worker"])
    worker_ids = {w.name.rsplit("-", 1)[-1] for w in workers}
    assert worker_env["built_by"] in worker_ids
    logs = [
        Path(p["log_path"]).read_text()
        for p in emulator.processes()
        if p["id"] in {w.id for w in workers}
    ]
    assert sum("building .ray-cml/_envs/" in log for log in logs) == 1, logs
    assert sum("after waiting" in log for log in logs) == 1, logs
    assert not list(envs.glob("*.lock")) and not list(envs.glob("*.build-*"))

    cluster.wait_for(
        lambda: not cluster.workers(), IDLE_TIMEOUT_S + 60, "the idle GPU workers to be deleted"
    )
    down = cluster.down()
    assert down.returncode == 0, down.stdout[-3000:]
    assert cluster.applications() == []
    assert not (emulator.project_dir / ".ray-cml" / cluster.cluster_name).exists()

    # A later cluster of the project reuses the environment, without pip. Its head cannot
    # import the provider (its zip removed before Ray starts): such a head would never
    # scale, so `ray up` says so in one sentence and fails.
    def without_provider_code(config: dict) -> None:
        workspace_only(config)
        config["head_setup_commands"] = ['rm -f "$RAY_CML_PROJECT_DIR"/.ray-cml/*/lib/*.zip']

    broken = LocalCluster(
        emulator,
        tmp_path / "broken",
        config_path=SHIPPED,
        cluster_name="broken",
        config_overrides=without_provider_code,
    )
    up = broken.up()
    assert "reused" in up.stdout and "built in" not in up.stdout, up.stdout[-4000:]
    assert up.returncode != 0
    assert "ray-cml: the head's autoscaler cannot load the provider" in up.stdout, up.stdout[-3000:]
    assert "Traceback" not in up.stdout
    assert broken.down().returncode == 0 and broken.applications() == []
