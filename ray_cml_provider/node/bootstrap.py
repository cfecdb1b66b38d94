"""The first thing every CML application of a Ray cluster runs: a tiny standard-library stage.

It is the application's ``script`` (``.ray-cml/<cluster>/bootstrap.py``, next to the other
standard-library modules it imports: ``shipping.LAUNCHER_FILES``), because it runs before
anything is installed: a CML runtime has Python and pip, not Ray. It

1. answers CML's poll on the application's port (``CDSW_APP_PORT``) at once: ``GET /`` gets a
   one-line "starting" page, anything else a 503 with ``Retry-After``; it proxies nothing
   and reads no body (``StatusPage``);
2. makes the node's Python environment ready (``node_env``: Ray and the type's
   ``pip_packages``, built once per project and shared; nothing when the runtime has them);
3. finds the provider code ``ray up`` shipped (``RAY_CML_PROVIDER_ZIP``), fetching it through
   the files API while NFS does not show it here yet;
4. replaces itself (``exec``, same process, same process group) with the node launcher,
   ``python -m ray_cml_provider.node.launcher``, run with the shipped code and the
   environment first on ``PYTHONPATH``: the launcher and the head's gateway then use real
   libraries (aiohttp, from ``ray[default]``).

``bootstrap.py stop-ray`` is the node's ``ray stop`` (``node_processes``): it needs neither
the environment nor the shipped code.

A failed environment does not stop the node here: the launcher starts anyway (it imports
nothing from the environment until it needs the gateway) and reports the failure as before,
to ``ray up`` for the head and in ``failure.txt`` for a worker; ``ray stop`` still works.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

if __package__:  # imported from the package (the launcher, tests)
    from ray_cml_provider.contract import Handoff, NodeSpec
    from ray_cml_provider.node import environment as node_env
    from ray_cml_provider.node import processes as node_processes
    from ray_cml_provider.node import project_api as node_api
else:  # uploaded next to this file in the cluster's folder (shipping.LAUNCHER_FILES)
    import node_api
    import node_env
    import node_processes
    from node_contract import Handoff, NodeSpec

LAUNCHER_MODULE = "ray_cml_provider.node.launcher"
ERROR_MOST = 8000  # characters of an environment failure carried to the launcher


def log(message: str) -> None:
    print(f"[ray-cml bootstrap {time.strftime('%H:%M:%S')}] {message}", flush=True)


class CallerSlots:
    """The connections a ``StatusPage`` serves, oldest first, each cut at its deadline:
    ``timeout_s`` after it came, for its whole request. A per-byte timeout is not enough: a
    caller sending one byte every few seconds would hold its slot for ever, and ``most`` of them
    would keep CML's poll out for the node's whole life. When all ``most`` slots are taken, the
    oldest caller is cut to let the new one in, so however fast callers come, a poll is let in
    at once; it sends its request as it connects, long before ``most`` later callers could push
    it out."""

    def __init__(self, most: int, timeout_s: float):
        self.most, self.timeout_s = most, timeout_s
        self.deadlines: dict[socket.socket, float] = {}  # in arrival, hence deadline, order
        self.lock = threading.Lock()

    def admit(self, conn: socket.socket) -> None:
        with self.lock:
            if len(self.deadlines) >= self.most:
                self.cut(next(iter(self.deadlines)))
            self.deadlines[conn] = time.monotonic() + self.timeout_s

    def cut_late(self) -> None:
        """Cut the callers past their deadline (each turn of the server's loop)."""
        now = time.monotonic()
        with self.lock:
            while self.deadlines and next(iter(self.deadlines.values())) <= now:
                self.cut(next(iter(self.deadlines)))

    def cut_all(self) -> None:
        """On close: no handler thread is left waiting on a caller."""
        with self.lock:
            while self.deadlines:
                self.cut(next(iter(self.deadlines)))

    def release(self, conn: socket.socket) -> None:
        """Forget a connection before it is closed: no cut then reaches a closed socket (whose
        descriptor may be another's by then)."""
        with self.lock:
            self.deadlines.pop(conn, None)

    def cut(self, conn: socket.socket) -> None:
        """End a caller (under the lock): its handler reads the end of the stream, answers
        nothing and ends; the slot is free at once."""
        del self.deadlines[conn]
        with contextlib.suppress(OSError):  # the caller has gone already
            conn.shutdown(socket.SHUT_RDWR)


class StatusPage:
    """What the application's port answers while no real door is open: ``GET /`` (CML's
    status poll) gets ``200`` and one line of state; anything else gets ``503`` with
    ``Retry-After``. Nothing is proxied and no body is read; a caller has ``timeout_s`` for its
    whole request, and at most ``most`` callers are served at once, the oldest cut to let a new
    one in (``CallerSlots``)."""

    def __init__(self, host: str, port: int, describe, timeout_s: float = 10.0, most: int = 64):
        page = self
        self.describe = describe  # () -> str, the line the page shows
        self.callers = CallerSlots(most, timeout_s)

        class Handler(BaseHTTPRequestHandler):
            timeout = timeout_s  # seconds a caller may stay silent (its deadline comes first)
            protocol_version = "HTTP/1.1"
            server_version, sys_version = "ray-cml", ""  # no versions to fingerprint

            def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
                if self.path.split("?", 1)[0] == "/":
                    self.answer(200, page.describe())
                else:
                    self.answer(503, "this node is not serving yet; try again shortly")

            def do_HEAD(self) -> None:  # noqa: N802
                self.answer(200 if self.path == "/" else 503, "", with_body=False)

            def not_yet(self) -> None:
                self.answer(503, "this node is not serving yet; try again shortly")

            do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = not_yet

            def answer(self, status: int, text: str, with_body: bool = True) -> None:
                body = (text + "\n").encode("utf-8", "replace")
                self.close_connection = True  # no body is read: the connection ends here
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                if status == 503:
                    self.send_header("Retry-After", "5")
                self.end_headers()
                if with_body:
                    self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass  # CML polls often, and callers' bytes do not belong in the log

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            # Callers beyond the slots queue in order: past a full queue the kernel drops a
            # connection attempt (a poll's too) and it is tried again a second or more later.
            request_queue_size = socket.SOMAXCONN

            def process_request(self, request, client_address) -> None:
                page.callers.admit(request)
                super().process_request(request, client_address)

            def shutdown_request(self, request) -> None:
                page.callers.release(request)
                super().shutdown_request(request)

            def service_actions(self) -> None:
                page.callers.cut_late()

            def handle_error(self, request, client_address) -> None:
                pass  # a caller that reset or was cut: no traceback in the node's log

        self.server = Server((host, port), Handler)
        self.thread = threading.Thread(
            target=self.server.serve_forever,
            kwargs={"poll_interval": min(0.5, timeout_s / 10)},  # how late a deadline may be
            name="status-page",
            daemon=True,
        )
        self.thread.start()

    def close(self) -> None:
        """Stop answering and free the port (the launcher's door binds it next)."""
        self.server.shutdown()
        self.server.server_close()
        self.callers.cut_all()


def status_line(spec: NodeSpec, state: str) -> str:
    """What the status page says of a node (the bootstrap's, then the launcher's)."""
    return (
        f"ray-cml {spec.kind} node {spec.node_id or '?'} of cluster {spec.cluster or '?'}: {state}"
    )


def open_status_page(env: dict[str, str], describe) -> StatusPage | None:
    port = int(env.get("CDSW_APP_PORT") or 0)
    if not port:
        return None
    host = env.get("CDSW_IP_ADDRESS") or "0.0.0.0"
    try:
        return StatusPage(host, port, describe)
    except OSError as exc:
        log(f"no status page on port {port}: {exc}")
        return None


def prepare_environment(spec: NodeSpec, project_dir: Path) -> tuple[object | None, str]:
    """(the node's ``node_env.Environment``, "") or (None, why it could not be made)."""
    try:
        if not spec.pip_packages:
            return node_env.Environment(None, "no packages asked for"), ""
        build = node_env.EnvironmentBuild(
            project_dir, spec.runtime, spec.pip_packages, spec.node_id, log
        )
        return build.ensure(), ""
    except node_env.NodeEnvironmentError as exc:
        return None, str(exc)
    except Exception as exc:  # an unexpected failure must still reach the user
        return None, f"ray-cml: preparing the node environment failed: {exc!r}"


def shipped_code(
    relative: str, project_dir: Path, tmp_dir: Path, api: node_api.ProjectAPI, wait_s: float
) -> Path:
    """The provider code ``ray up`` shipped (``relative`` to the project): the project's copy,
    or, while NFS does not show it here yet (a newer ``ray up`` just uploaded it), a copy
    fetched through the API into ``tmp_dir``. Its name is its digest: a copy is never stale.
    Tries for ``wait_s``; then raises ``RuntimeError``."""
    in_project = project_dir / relative
    local = tmp_dir / "lib" / Path(relative).name
    deadline = time.monotonic() + wait_s
    while True:
        if in_project.exists():
            return in_project
        if local.exists():
            return local
        if api.available:
            try:
                data = api.download(relative)
                local.parent.mkdir(parents=True, exist_ok=True)
                local.with_suffix(".tmp").write_bytes(data)
                local.with_suffix(".tmp").replace(local)
                return local
            except OSError as exc:
                log(f"cannot fetch {relative} yet: {exc}")
        if time.monotonic() >= deadline:
            raise RuntimeError(f"the provider code {relative} is not in the project")
        time.sleep(2)


def launcher_environment(
    env: dict[str, str], code: Path, environment, error: str
) -> dict[str, str]:
    """The launcher's process environment: the shipped code, then the node environment, first
    on ``PYTHONPATH``, and what it needs to know of this stage (``Handoff``)."""
    site = getattr(environment, "site", None) if environment is not None else None
    runtime_path = env.get("PYTHONPATH", "")
    child = {k: v for k, v in env.items() if k not in Handoff.variables()}
    handoff = Handoff(
        site=str(site or ""),
        summary=getattr(environment, "summary", "") or "",
        error=error[-ERROR_MOST:],
        runtime_pythonpath=runtime_path,
    )
    child.update(
        {
            **handoff.to_env(),
            "PYTHONPATH": os.pathsep.join(
                [
                    str(code),
                    *([str(site)] if site else []),
                    *([runtime_path] if runtime_path else []),
                ]
            ),
        }
    )
    return child


def main() -> int:
    if sys.argv[1:2] == ["stop-ray"]:  # the node's `ray stop` (the launcher's `ray` shim)
        node_processes.stop_ray_of_this_node()
        return 0
    env = dict(os.environ)
    spec = NodeSpec.from_env(env)
    project_dir = Path.cwd()
    state = {"now": "preparing its Python environment"}
    page = open_status_page(env, lambda: status_line(spec, state["now"]))
    api = node_api.ProjectAPI(env, log)
    environment, error = prepare_environment(spec, project_dir)
    log(error or environment.summary)
    state["now"] = "starting its launcher"
    try:
        if not spec.provider_zip:
            raise RuntimeError("the application names no provider code: `ray up` again")
        tmp_dir = Path(f"/tmp/rcml-{spec.node_id or 'node'}")
        code = shipped_code(spec.provider_zip, project_dir, tmp_dir, api, wait_s=120)
    except RuntimeError as exc:
        log(str(exc))
        if api.available:
            try:
                api.upload(spec.folder.failure, f"ray-cml: {exc}".encode())
            except OSError as upload_error:
                log(f"could not publish the failure: {upload_error}")
        return 1
    if page is not None:
        page.close()
    child = launcher_environment(env, code, environment, error)
    python = sys.executable
    os.execve(python, [python, "-m", LAUNCHER_MODULE], child)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
