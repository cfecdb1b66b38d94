"""Test-control endpoints under ``/_emulator/``: NOT part of CML. They let tests and
benchmarks read request counts (and, with ``?trace=1``, when each request ran), change faults
and start delays at run time, see the local process behind each application and crash one.
They need no API key and are not counted."""

from __future__ import annotations

from ray_cml_provider.emulator.project_files import ProjectFiles
from ray_cml_provider.emulator.routing import Request, Response, Router
from ray_cml_provider.emulator.state import WorkspaceState
from ray_cml_provider.emulator.traffic import Faults, Stats


class ControlHandlers:
    def __init__(self, state: WorkspaceState, files: ProjectFiles, faults: Faults, stats: Stats):
        self.state = state
        self.files = files
        self.faults = faults
        self.stats = stats

    def register(self, router: Router) -> None:
        router.add("GET", "/_emulator/stats", self.get_stats)
        router.add("POST", "/_emulator/stats:reset", self.reset_stats)
        router.add("POST", "/_emulator/faults", self.set_faults)
        router.add("GET", "/_emulator/applications", self.list_processes)
        router.add("POST", "/_emulator/applications/{application_id}:crash", self.crash)

    def get_stats(self, request: Request) -> Response:
        return Response(body=self.stats.snapshot(with_trace=request.query.get("trace") == "1"))

    def reset_stats(self, request: Request) -> Response:
        self.stats.reset()
        return Response(body={})

    def set_faults(self, request: Request) -> Response:
        body = request.json()
        if "fault_rate" in body:
            self.faults.rate = float(body["fault_rate"])
        if "latency_ms" in body:
            self.faults.latency_ms = float(body["latency_ms"])
        if "drop_rate" in body:
            self.faults.drop_rate = float(body["drop_rate"])
        # Start delays apply to applications not yet RUNNING too.
        for delay in ("start_delay_s", "schedule_delay_s"):
            if delay in body:
                setattr(self.state.config, delay, float(body[delay]))
        if "file_delay_s" in body:
            self.files.visibility_delay_s = float(body["file_delay_s"])
        return Response(
            body={
                "fault_rate": self.faults.rate,
                "latency_ms": self.faults.latency_ms,
                "drop_rate": self.faults.drop_rate,
                "start_delay_s": self.state.config.start_delay_s,
                "schedule_delay_s": self.state.config.schedule_delay_s,
                "file_delay_s": self.files.visibility_delay_s,
            }
        )

    def list_processes(self, request: Request) -> Response:
        return Response(body={"applications": self.state.process_info()})

    def crash(self, request: Request) -> Response:
        return Response(body=self.state.crash(request.params["application_id"]))
