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

from ray_cml_provider.demo.local_cluster import LocalCluster
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


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_a_job_brings_its_cluster_reports_its_outcome_and_down_leaves_nothing(
    start_emulator, tmp_path
):
    emulator = start_emulator()
    cluster = LocalCluster(emulator, tmp_path / "work", cluster_name="batch")
    config = str(cluster.config_path)

    # No cluster yet: the job brings it up; it succeeds: exit status 0.
    ok = cluster.ray_cml(
        "job", "submit", config, "--", "python", "-c", "print('all good')", timeout_s=400
    )
    assert ok.returncode == 0, ok.stdout[-3000:]
    assert "is not running: ray up" in ok.stdout and "all good" in ok.stdout
    assert "succeeded" in ok.stdout

    # On the running cluster, a job that fails: exit status 1; the cluster stays.
    failing = "print('step one'); raise SystemExit(3)"
    failed = cluster.ray_cml("job", "submit", config, "--", "python", "-c", failing)
    assert failed.returncode == 1, failed.stdout[-3000:]
    assert "is running: the job goes to it" in failed.stdout and "step one" in failed.stdout
    job_id = re.search(r"job (raycml_[0-9a-f]+) submitted", failed.stdout).group(1)
    assert f"job {job_id} failed" in failed.stdout
    [head] = cluster.applications()
    listed = cluster.ray_cml("job", "list", "--json", config)
    statuses = [j["status"] for j in json.loads(listed.stdout.splitlines()[-1])]
    assert statuses == ["SUCCEEDED", "FAILED"], listed.stdout
    logs = cluster.ray_cml("job", "logs", config, job_id)
    assert logs.returncode == 1 and "step one" in logs.stdout

    # --down, and the submitter dies while the job runs: once the job ended (failed, here)
    # the head deletes the cluster.
    output = tmp_path / "submitter.out"
    marker = tmp_path / "job-started"
    code = f"import pathlib, time; pathlib.Path({str(marker)!r}).touch(); time.sleep(5); 1 / 0"
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
        180,
        "the job running and the head told to delete the cluster after it",
    )
    os.killpg(submitter.pid, signal.SIGKILL)
    submitter.wait()
    cluster.wait_for(lambda: cluster.applications() == [], 180, "the head to delete the cluster")
    cluster.wait_for(lambda: emulator.processes() == [], 30, "engines to end")
    shown = cluster.ray_cml("history", "--json", "--run", "latest", config)
    record = json.loads(shown.stdout)
    assert record["head"] == head.name.rsplit("-", 1)[-1]
    assert re.fullmatch(r"job raycml_[0-9a-f]+ failed \(job submit --down\)", record["ended_by"])
