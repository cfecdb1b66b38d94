"""``ray-cml job``: a Ray job that brings its cluster, reports its outcome, and with ``--down``
leaves nothing running, even when its submitter dies. Real Ray on the emulator."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess

import pytest

from ray_cml_provider.cluster.jobs import JobError, job_api
from ray_cml_provider.cluster.status import collect_status
from ray_cml_provider.demo.local_cluster import LocalCluster
from ray_cml_provider.provider.config import load_cluster_config
from tests.conftest import wait_until


def test_bad_input_is_one_sentence_before_any_call(tmp_path, capsys):
    from ray_cml_provider.ops import job

    # Options before or after the YAML; the entrypoint is what follows `--`, as written.
    for argv in (["submit", "c.yaml", "--down", "--"], ["submit", "--down", "c.yaml", "--"]):
        args = job.parse([*argv, "python", "-c", "print('--down')"])
        assert args.config == "c.yaml" and args.down
        assert args.entrypoint == ["python", "-c", "print('--down')"]

    config = tmp_path / "c.yaml"
    config.write_text("cluster_name: x\n")
    assert job.main(["submit", str(config), "--", "python", "x.py"]) == 1
    assert capsys.readouterr().err.startswith("ray-cml: ")  # the YAML, named, no traceback
    env = tmp_path / "env.yaml"
    env.write_text("- not\n- a mapping\n")
    args = argparse.Namespace(entrypoint=["python", "x.py"], runtime_env=str(env))
    with pytest.raises(job.OperatorError, match="not a mapping"):
        job.submit(args, {}, None)
    args.entrypoint = []
    with pytest.raises(job.OperatorError, match="nothing to run"):
        job.submit(args, {}, None)


WORKING_DIR_MAIN = """
import os, ray, helper
ray.init()

@ray.remote(num_gpus=1)
def on_a_gpu_worker():
    import helper  # the working dir is on every node, not only where the driver runs
    return helper.VALUE

print("driver:", helper.VALUE, "| ignored file shipped:", os.path.exists("secret.txt"))
print("worker:", ray.get(on_a_gpu_worker.remote()))
"""


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_a_job_brings_its_cluster_reports_its_outcome_and_down_leaves_nothing(
    start_emulator, tmp_path
):
    emulator = start_emulator()
    cluster = LocalCluster(emulator, tmp_path / "work", cluster_name="batch")
    config = str(cluster.config_path)
    workdir = tmp_path / "job"
    workdir.mkdir()
    (workdir / "main.py").write_text(WORKING_DIR_MAIN)
    (workdir / "helper.py").write_text("VALUE = 'from the working dir'\n")
    (workdir / "secret.txt").write_text("not for the cluster\n")
    (workdir / ".gitignore").write_text("secret.txt\n")  # Ray's packaging rules apply

    # No cluster yet: the job brings it up, runs in its working dir (shipped through the
    # project, on the head and on the GPU worker it scaled up) and succeeds: exit status 0.
    ok = cluster.ray_cml(
        "job", "submit", config, "--working-dir", str(workdir), "--", "python", "main.py",
        timeout_s=400,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stdout[-3000:]
    assert "is not running: ray up" in ok.stdout and "succeeded" in ok.stdout
    assert "driver: from the working dir | ignored file shipped: False" in ok.stdout
    assert "worker: from the working dir" in ok.stdout
    [package] = (emulator.project_dir / ".ray-cml" / "batch" / "jobs").iterdir()
    assert package.name.startswith("_ray_pkg_") and f"({package.name})" in ok.stdout
    [head] = cluster.nodes("head")
    listed = cluster.ray_cml("job", "list", "--json", config)
    [first] = json.loads(listed.stdout.splitlines()[-1])
    assert first["status"] == "SUCCEEDED"
    assert first["runtime_env"]["working_dir"] == package.resolve().as_uri()
    logs = cluster.ray_cml("job", "logs", config, first["submission_id"])
    assert logs.returncode == 0 and "worker: from the working dir" in logs.stdout

    # From a laptop the engine's own address does not answer: the Jobs API is reached at the
    # head's URL, through CML's login (the CML key) and the head's gateway (Ray's token).
    loaded = load_cluster_config(config)
    status = collect_status(loaded, cluster.client, ray_view="none")
    status.dashboard_address = "http://127.0.0.1:1"  # nothing listens: as from outside
    outside = job_api(status, loaded, cluster.client)
    assert outside.base == status.dashboard_url and "X-Ray-Authorization" in outside.headers
    assert [job["status"] for job in outside.list()] == ["SUCCEEDED"]
    outside.headers.pop("X-Ray-Authorization")
    with pytest.raises(JobError, match="HTTP 401"):  # CML's login alone runs no job
        outside.list()

    # --down on a job that fails, the submitter waiting: exit status 1, and nothing left.
    # The submitter looks every 30 s: the head, quicker, has deleted the cluster (and its
    # Jobs API) by then; the job's end and the rest of its log come from the history.
    failing = "print('step one'); raise SystemExit(3)"
    cluster.env["RAY_CML_JOB_FOLLOW_S"] = "30"
    failed = cluster.ray_cml("job", "submit", config, "--down", "--", "python", "-c", failing)
    del cluster.env["RAY_CML_JOB_FOLLOW_S"]
    assert failed.returncode == 1, failed.stdout[-3000:]
    assert "is running: the job goes to it" in failed.stdout and "step one" in failed.stdout
    job_id = re.search(r"job (raycml_[0-9a-f]+) submitted", failed.stdout).group(1)
    assert f"job {job_id} failed" in failed.stdout and "cluster batch deleted" in failed.stdout
    assert "the job's end from the cluster's history" in failed.stdout
    assert cluster.applications() == []
    record = latest_run(cluster, config)
    assert record["head"] == head.name.rsplit("-", 1)[-1]
    assert record["ended_by"] == f"job {job_id} failed (job submit --down)"

    # --down, and the submitter dies while the job runs: once the job ended (succeeded,
    # here) the head deletes the cluster it brought up.
    output = tmp_path / "submitter.out"
    marker = tmp_path / "job-started"
    code = f"import pathlib, time; pathlib.Path({str(marker)!r}).touch(); time.sleep(5)"
    with open(output, "w") as out:
        submitter = subprocess.Popen(
            ["ray-cml", "job", "submit", "--down", config, "--", "python", "-c", code],
            cwd=cluster.workdir,
            env=cluster.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    wait_until(
        lambda: "the head deletes the cluster once job" in output.read_text() and marker.exists(),
        300,
        "the job running and the head told to delete the cluster after it",
    )
    os.killpg(submitter.pid, signal.SIGKILL)
    submitter.wait()
    cluster.wait_for(lambda: cluster.applications() == [], 180, "the head to delete the cluster")
    cluster.wait_for(lambda: emulator.processes() == [], 30, "engines to end")
    assert re.fullmatch(
        r"job raycml_[0-9a-f]+ succeeded \(job submit --down\)",
        latest_run(cluster, config)["ended_by"],
    )


def latest_run(cluster: LocalCluster, config: str) -> dict:
    shown = cluster.ray_cml("history", "--json", "--run", "latest", config)
    assert shown.returncode == 0, shown.stderr[-2000:]
    return json.loads(shown.stdout)
