"""CML Jobs on the emulator: a job is a script; each run is an engine that runs it once.

Enough of CML API v2's jobs to run the recipe a user schedules on CML (docs: a CML Job that
runs a Ray batch job on a cluster made for it): create a job, run it, read the run, stop it.
A run's engine is a real process group with the environment CML gives a job's engine (the
project's ``CDSW_*`` variables and an API key of its own, valid while it runs; the job's
``arguments`` in ``JOB_ARGUMENTS``), in the project folder; its output goes to the
emulator's log folder as ``<run id>.log``. Run states follow CML's engine states:

    ENGINE_SCHEDULING -> ENGINE_RUNNING -> ENGINE_SUCCEEDED (exit 0) | ENGINE_FAILED
    :stop -> ENGINE_STOPPED (SIGTERM to the group, SIGKILL after the grace)

Schedules, dependencies between jobs, timeouts and attachments are not played.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from ray_cml_provider.emulator import validation
from ray_cml_provider.emulator.errors import not_found
from ray_cml_provider.emulator.processes import (
    EngineProcess,
    Resources,
    end_engines,
    start_engine,
)
from ray_cml_provider.emulator.routing import Request, Response, Router
from ray_cml_provider.emulator.state import WorkspaceState, new_cml_id, now_rfc3339

PROJECT = "/api/v2/projects/{project_id}"
JOB = PROJECT + "/jobs/{job_id}"
RUN = JOB + "/runs/{run_id}"

SCHEDULING = "ENGINE_SCHEDULING"
RUNNING = "ENGINE_RUNNING"
SUCCEEDED = "ENGINE_SUCCEEDED"
FAILED = "ENGINE_FAILED"
STOPPED = "ENGINE_STOPPED"
ENDED = (SUCCEEDED, FAILED, STOPPED)


@dataclass
class JobRun:
    fields: dict[str, Any]
    process: EngineProcess | None = None
    engine_key: str = ""
    stop_requested: bool = False

    @property
    def status(self) -> str:
        return self.fields["status"]

    def set_status(self, status: str) -> None:
        self.fields["status"] = status
        stamp = now_rfc3339()
        self.fields["updated_at"] = stamp
        if status == RUNNING:
            self.fields["running_at"] = stamp
        elif status in ENDED:
            self.fields["finished_at"] = stamp


class JobRuns:
    """The project's jobs and their runs; reconciled by the workspace's thread."""

    def __init__(self, state: WorkspaceState):
        self.state = state
        self.jobs: dict[str, dict[str, Any]] = {}
        self.runs: dict[str, JobRun] = {}
        self.lock = threading.RLock()
        state.workloads.append(self)

    def register(self, router: Router) -> None:
        route = router.add
        route("POST", PROJECT + "/jobs", self.create_job)
        route("GET", PROJECT + "/jobs", self.list_jobs)
        route("GET", JOB, self.get_job)
        route("DELETE", JOB, self.delete_job)
        route("POST", JOB + "/runs", self.create_run)
        route("GET", JOB + "/runs", self.list_runs)
        route("GET", RUN, self.get_run)
        route("POST", RUN + ":stop", self.stop_run)

    # ------------------------------------------------------------------ HTTP handlers

    def create_job(self, request: Request) -> Response:
        fields = validation.job_fields(request.json(), self.state.runtime_ids)
        stamp = now_rfc3339()
        fields.update(id=new_cml_id(), created_at=stamp, updated_at=stamp)
        with self.lock:
            self.jobs[fields["id"]] = fields
        return Response(body=fields)

    def list_jobs(self, request: Request) -> Response:
        with self.lock:
            return Response(body={"jobs": list(self.jobs.values()), "next_page_token": ""})

    def get_job(self, request: Request) -> Response:
        return Response(body=self.job(request.params["job_id"]))

    def delete_job(self, request: Request) -> Response:
        with self.lock:
            job = self.job(request.params["job_id"])
            for run in self.runs.values():
                if run.fields["job_id"] == job["id"] and run.status not in ENDED:
                    run.stop_requested = True
            del self.jobs[job["id"]]
        return Response(body={})

    def create_run(self, request: Request) -> Response:
        with self.lock:
            job = self.job(request.params["job_id"])
            stamp = now_rfc3339()
            run = JobRun(
                {
                    "id": new_cml_id(),
                    "job_id": job["id"],
                    "project_id": self.state.config.project_id,
                    "status": SCHEDULING,
                    "arguments": job["arguments"],
                    "environment": job["environment"],
                    "cpu": job["cpu"],
                    "memory": job["memory"],
                    "nvidia_gpu": job["nvidia_gpu"],
                    "runtime_identifier": job["runtime_identifier"],
                    "created_at": stamp,
                    "updated_at": stamp,
                    "scheduling_at": stamp,
                }
            )
            self.runs[run.fields["id"]] = run
            return Response(body=dict(run.fields))

    def list_runs(self, request: Request) -> Response:
        with self.lock:
            job = self.job(request.params["job_id"])
            runs = [dict(r.fields) for r in self.runs.values() if r.fields["job_id"] == job["id"]]
        return Response(body={"job_runs": runs, "next_page_token": ""})

    def get_run(self, request: Request) -> Response:
        with self.lock:
            return Response(body=dict(self.run(request).fields))

    def stop_run(self, request: Request) -> Response:
        with self.lock:
            run = self.run(request)
            if run.status not in ENDED:
                run.stop_requested = True
            return Response(body=dict(run.fields))

    # ------------------------------------------------------------------ the runs' engines

    def reconcile(self) -> None:
        with self.lock:
            for run in self.runs.values():
                self.reconcile_run(run)

    def reconcile_run(self, run: JobRun) -> None:
        if run.status == SCHEDULING:
            if run.stop_requested:
                run.set_status(STOPPED)
            else:
                self.start(run)
            return
        process = run.process
        if process is None or run.status in ENDED:
            return
        if run.stop_requested:
            process.terminate(self.state.config.stop_grace_s)
            process.enforce_deadline()
            if not process.group_alive():
                self.end(run, STOPPED)
            return
        exit_code = process.leader_exit_code()
        if exit_code is not None:
            process.kill()  # like a pod: what the script left behind goes with it
            self.end(run, SUCCEEDED if exit_code == 0 else FAILED)

    def start(self, run: JobRun) -> None:
        config = self.state.config
        fields = run.fields
        ip_address, run.engine_key = self.state.new_engine()
        python = self.state.python_of(fields["runtime_identifier"])
        env = self.state.engine_environment(python, fields, ip_address, run.engine_key)
        env.update({"CDSW_JOB_ID": fields["job_id"], "JOB_ARGUMENTS": fields["arguments"]})
        if self.state.files:
            self.state.files.flush()  # a starting engine mounts the project afresh
        job = self.jobs.get(fields["job_id"])
        log_path = config.log_dir / f"{fields['id']}.log"
        try:
            run.process = start_engine(
                script_path=config.project_dir / (job or {}).get("script", ""),
                python=python,
                cwd=config.project_dir,
                env=env,
                log_path=log_path,
                ip_address=ip_address,
                app_port=0,
                reserved=Resources(float(fields["cpu"]), float(fields["memory"])),
            )
        except OSError as exc:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a") as log:
                log.write(f"emulator: could not start the job's engine: {exc}\n")
            self.end(run, FAILED)
            return
        run.set_status(RUNNING)

    def end(self, run: JobRun, status: str) -> None:
        run.process = None
        if run.engine_key:
            self.state.revoke_key(run.engine_key)
            run.engine_key = ""
        run.set_status(status)

    def shutdown(self, grace_s: float) -> None:
        with self.lock:
            processes = [run.process for run in self.runs.values() if run.process]
        end_engines(processes, grace_s)

    # ------------------------------------------------------------------ lookups

    def job(self, job_id: str) -> dict[str, Any]:
        with self.lock:
            if job_id not in self.jobs:
                raise not_found(f"job {job_id!r} not found")
            return self.jobs[job_id]

    def run(self, request: Request) -> JobRun:
        job = self.job(request.params["job_id"])
        run = self.runs.get(request.params["run_id"])
        if run is None or run.fields["job_id"] != job["id"]:
            raise not_found(f"job run {request.params['run_id']!r} not found")
        return run
