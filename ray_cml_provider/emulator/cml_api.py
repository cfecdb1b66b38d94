"""The CML API v2 handlers: runtimes, the project, applications and project files.

Each handler validates its request (``validation``), asks the workspace model (``state``)
or the project filesystem (``project_files``) and returns a CML-shaped ``Response``. The
project id in the path is checked once, by the server, before any of them runs.
"""

from __future__ import annotations

from ray_cml_provider.emulator import validation
from ray_cml_provider.emulator.errors import invalid
from ray_cml_provider.emulator.listing import page_of
from ray_cml_provider.emulator.multipart import parse_multipart
from ray_cml_provider.emulator.project_files import ProjectFiles
from ray_cml_provider.emulator.routing import Request, Response, Router
from ray_cml_provider.emulator.state import WorkspaceState

PROJECT = "/api/v2/projects/{project_id}"
APP = PROJECT + "/applications/{application_id}"


class CMLHandlers:
    def __init__(self, state: WorkspaceState, files: ProjectFiles):
        self.state = state
        self.files = files

    def register(self, router: Router) -> None:
        route = router.add
        route("GET", "/api/v2/runtimes", self.list_runtimes)
        route("GET", PROJECT, self.get_project)
        route("GET", PROJECT + "/applications", self.list_applications)
        route("POST", PROJECT + "/applications", self.create_application)
        route("POST", APP + ":stop", self.stop_application)
        route("POST", APP + ":restart", self.restart_application)
        route("GET", APP, self.get_application)
        route("PATCH", APP, self.update_application)
        route("DELETE", APP, self.delete_application)
        route("POST", PROJECT + "/files", self.upload_files)
        route("POST", PROJECT + "/files/{path}:download", self.download_file)
        route("GET", PROJECT + "/files", self.list_files)
        route("GET", PROJECT + "/files/{path}", self.list_files)
        route("DELETE", PROJECT + "/files/{path}", self.delete_file)

    # ------------------------------------------------------------------ runtimes, project

    def list_runtimes(self, request: Request) -> Response:
        search = validation.search_filter(request.query.get("search_filter", ""))
        runtimes = [
            r
            for r in self.state.runtimes
            if all(str(v).lower() in str(r.get(k, "")).lower() for k, v in search.items())
        ]
        return Response(body={"runtimes": runtimes, "next_page_token": ""})

    def get_project(self, request: Request) -> Response:
        return Response(body=self.state.project())

    # ------------------------------------------------------------------ applications

    def list_applications(self, request: Request) -> Response:
        query = request.query
        search = validation.search_filter(query.get("search_filter", ""), validation.FILTER_KEYS)
        sort = validation.sort_keys(query.get("sort", ""))
        size = validation.page_size(query.get("page_size", ""))
        offset = validation.page_offset(query.get("page_token", ""))
        return Response(body=page_of(self.state.applications(), search, sort, size, offset))

    def create_application(self, request: Request) -> Response:
        fields = validation.application_fields(request.json(), True, self.state.runtime_ids)
        return Response(body=self.state.create(fields))

    def get_application(self, request: Request) -> Response:
        return Response(body=self.state.get(request.params["application_id"]))

    def update_application(self, request: Request) -> Response:
        changes = validation.application_fields(request.json(), False, self.state.runtime_ids)
        return Response(body=self.state.update(request.params["application_id"], changes))

    def delete_application(self, request: Request) -> Response:
        self.state.delete(request.params["application_id"])
        return Response(body={})

    def stop_application(self, request: Request) -> Response:
        return Response(body=self.state.stop(request.params["application_id"]))

    def restart_application(self, request: Request) -> Response:
        return Response(body=self.state.restart(request.params["application_id"]))

    # ------------------------------------------------------------------ files

    def upload_files(self, request: Request) -> Response:
        parts = parse_multipart(request.headers.get("Content-Type", ""), request.body)
        if not parts:
            raise invalid("upload needs multipart/form-data with one field per file")
        for destination, data in parts:
            self.files.upload(destination, data)
        return Response(body={})

    def list_files(self, request: Request) -> Response:
        return Response(body={"files": self.files.list(request.params.get("path", ""))})

    def download_file(self, request: Request) -> Response:
        return Response(raw=self.files.read(request.params["path"]))

    def delete_file(self, request: Request) -> Response:
        self.files.delete(request.params["path"])
        return Response(body={})
