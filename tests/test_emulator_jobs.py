"""CML Jobs on the emulator: each run of a job is a real engine running its script once,
with the environment CML gives a job's engine, ending as CML's run states say."""

from __future__ import annotations

import json

import pytest
import requests

from ray_cml_provider.emulator.processes import live_group_members
from tests.conftest import wait_until

pytestmark = pytest.mark.engines

EMULATOR_ARGS = ["--start-delay-s", "0.5"]

JOB_SCRIPT = r"""
import json, os, sys, time, urllib.request
project = os.environ["CDSW_PROJECT_ID"]
request = urllib.request.Request(
    os.environ["CDSW_API_URL"].replace("/api/v1", f"/api/v2/projects/{project}"),
    headers={"Authorization": "Bearer " + os.environ["CDSW_APIV2_KEY"]},
)
with urllib.request.urlopen(request) as answer:  # the engine's key works while it runs
    api = answer.status
with open(os.environ["OUT"], "w") as out:
    json.dump({"env": dict(os.environ), "cwd": os.getcwd(), "api": api, "pid": os.getpid()}, out)
mode = os.environ["JOB_ARGUMENTS"]
if mode == "sleep":
    time.sleep(600)
sys.exit(3 if mode == "fail" else 0)
"""


class Jobs:
    def __init__(self, emulator):
        self.base = f"{emulator.url}/api/v2/projects/{emulator.project_id}/jobs"
        self.headers = {"Authorization": f"Bearer {emulator.api_key}"}

    def call(self, method: str, path: str = "", **kwargs) -> requests.Response:
        return requests.request(
            method, self.base + path, headers=self.headers, timeout=10, **kwargs
        )

    def create(self, **fields) -> dict:
        answer = self.call("POST", json=fields)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def run(self, job_id: str) -> dict:
        return self.call("POST", f"/{job_id}/runs", json={}).json()

    def status(self, job_id: str, run_id: str) -> str:
        return self.call("GET", f"/{job_id}/runs/{run_id}").json()["status"]

    def wait(self, job_id: str, run_id: str, status: str, timeout_s: float = 30) -> None:
        wait_until(lambda: self.status(job_id, run_id) == status, timeout_s, status)


def test_a_job_run_is_an_engine_with_cmls_job_environment(emulator, client, runtime, tmp_path):
    jobs = Jobs(emulator)
    (emulator.project_dir / "jobs").mkdir()
    (emulator.project_dir / "jobs" / "job.py").write_text(JOB_SCRIPT)
    outputs = {mode: tmp_path / f"{mode}.json" for mode in ("ok", "fail", "sleep")}
    made = {
        mode: jobs.create(
            name=f"job-{mode}",
            script="jobs/job.py",
            runtime_identifier=runtime,
            cpu=1,
            memory=2,
            arguments=mode,
            environment={"OUT": str(out)},
        )
        for mode, out in outputs.items()
    }
    runs = {mode: jobs.run(job["id"]) for mode, job in made.items()}
    assert all(run["status"] == "ENGINE_SCHEDULING" for run in runs.values())
    jobs.wait(made["ok"]["id"], runs["ok"]["id"], "ENGINE_SUCCEEDED")
    jobs.wait(made["fail"]["id"], runs["fail"]["id"], "ENGINE_FAILED")

    dump = json.loads(outputs["ok"].read_text())
    env = dump["env"]
    assert dump["cwd"] == str(emulator.project_dir) and env["HOME"] == str(emulator.project_dir)
    assert dump["api"] == 200
    assert env["CDSW_JOB_ID"] == made["ok"]["id"] and env["JOB_ARGUMENTS"] == "ok"
    assert env["CDSW_PROJECT_ID"] == emulator.project_id
    assert env["CDSW_API_URL"] == emulator.url + "/api/v1"
    assert "CDSW_APP_PORT" not in env and "CML_API_KEY" not in env
    assert env["CDSW_APIV2_KEY"] != emulator.api_key  # the engine's own key
    project_url = f"{emulator.url}/api/v2/projects/{emulator.project_id}"
    revoked = requests.get(
        project_url, headers={"Authorization": f"Bearer {env['CDSW_APIV2_KEY']}"}, timeout=10
    )
    assert revoked.status_code == 401  # ended with its engine

    sleeping = (made["sleep"]["id"], runs["sleep"]["id"])
    wait_until(lambda: outputs["sleep"].exists(), 20, "the sleeping job's engine")
    assert jobs.status(*sleeping) == "ENGINE_RUNNING"
    pid = json.loads(outputs["sleep"].read_text())["pid"]
    stopped = jobs.call("POST", f"/{sleeping[0]}/runs/{sleeping[1]}:stop")
    assert stopped.status_code == 200
    jobs.wait(*sleeping, "ENGINE_STOPPED")
    assert not live_group_members(pid)  # its engine is gone, with all it started
    listed = jobs.call("GET", f"/{made['ok']['id']}/runs").json()["job_runs"]
    assert [r["status"] for r in listed] == ["ENGINE_SUCCEEDED"]


def test_bad_jobs_are_refused_with_the_field_named(emulator, runtime):
    jobs = Jobs(emulator)
    cases = {
        "script is required": {"name": "x", "runtime_identifier": runtime},
        "name is required": {"script": "a.py", "runtime_identifier": runtime},
        "inside the project": {"name": "x", "script": "../a.py", "runtime_identifier": runtime},
        "runtime_identifier": {"name": "x", "script": "a.py", "runtime_identifier": "nope"},
        "environment": {
            "name": "x",
            "script": "a.py",
            "runtime_identifier": runtime,
            "environment": {"A": 1},
        },
    }
    for message, body in cases.items():
        answer = jobs.call("POST", json=body)
        assert answer.status_code == 400 and message in answer.json()["message"], answer.text
    assert jobs.call("POST", "/nope/runs", json={}).status_code == 404
    unauthenticated = requests.get(jobs.base, timeout=10)
    assert unauthenticated.status_code == 401
    # A script that is not there: the run fails, nothing is left.
    job = jobs.create(name="missing", script="not/there.py", runtime_identifier=runtime)
    run = jobs.run(job["id"])
    jobs.wait(job["id"], run["id"], "ENGINE_FAILED")
