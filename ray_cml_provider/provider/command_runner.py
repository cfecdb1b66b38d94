"""Running commands on a CML application without SSH: through the node's mailbox.

``ray up``, ``ray exec``, ``ray submit`` and ``ray down`` drive nodes through a command
runner. CML engines have no SSH, so every command is a ``Request`` posted to the node's
mailbox in the project filesystem (``provider/mailbox.py``), and its ``Result`` printed.
File mounts travel inside the request (``files``), and a file comes back as a command's
output: nothing waits for NFS to show a staged copy on the other side.

The first contact with a node reads its environment from its ``node.json`` (or, when the
build had failed, asks for its report, ``report: environment``, and the node tries again):
``ray up`` shows how the node's packages were made ready, a failed build ends ``ray up``
with pip's last lines, and a node whose Ray differs from this one is one clear error.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from ray.autoscaler._private.command_runner import ProcessRunnerError
from ray.autoscaler.command_runner import CommandRunnerInterface

from ray_cml_provider.cml import CMLError
from ray_cml_provider.contract import CommandVar, NodeFolder, NodeInfo, NodeSpec, Request
from ray_cml_provider.errors import (
    NodeGone,
    NodeNotReady,
    RayCMLError,
    Unsupported,
    ends_command,
)
from ray_cml_provider.provider.addresses import application_url
from ray_cml_provider.provider.mailbox import NodeMailbox, note
from ray_cml_provider.provider.packages import local_ray_version
from ray_cml_provider.provider.ray_auth import (
    DISABLED,
    DISABLED_WARNING,
    TOKEN,
    configured_mode,
    session_line,
)

T = TypeVar("T")
ATTACH_HINT = (
    "ray attach is not available on CML (applications have no SSH). Use "
    "'ray exec CONFIG \"COMMAND\"' for one command, 'ray submit CONFIG script.py' for a "
    "script, or open a terminal in a CML session of the same project."
)
# Node environments not worth a line on every `ray exec` (nothing was installed).
TRIVIAL_ENVIRONMENTS = ("the runtime already has Ray", "no packages asked for")
# What `ray attach` asks a runner to run: an interactive shell, which a mailbox cannot carry.
ATTACH_COMMANDS = {"$SHELL", "tmux new", "tmux attach || tmux new", "screen -L", "screen -L -xRR"}
# What Ray's updater runs (run_env="host") to learn that a node takes commands.
READY_PROBE = "uptime"


class CMLCommandRunner(CommandRunnerInterface):
    def __init__(self, provider: Any, node_id: str, log_prefix: str = ""):
        self.provider = provider
        self.client = provider.client
        self.node_id = node_id
        self.log_prefix = log_prefix
        self.mailbox = NodeMailbox(
            provider.client,
            NodeFolder.of(provider.cluster_name, node_id),
            still_there=lambda: node_id in provider.non_terminated_nodes({}),
        )

    # ------------------------------------------------------------------ commands

    @ends_command
    def run(
        self,
        cmd: str | None = None,
        timeout: int = 120,
        exit_on_fail: bool = False,
        port_forward: Any = None,
        with_output: bool = False,
        environment_variables: dict[str, object] | None = None,
        run_env: str = "auto",
        ssh_options_override_ssh_key: str = "",
        shutdown_after_run: bool = False,
    ) -> str:
        if cmd is None or cmd.strip() in ATTACH_COMMANDS:
            raise Unsupported(ATTACH_HINT)
        if cmd.strip() == READY_PROBE and run_env == "host":
            # Ray's "is SSH up yet?" probe before it sets a node up. On this transport the
            # answer is the launcher's own record, node.json, which _wait_for_launcher waits
            # for: sending `uptime` through the mailbox as well would only add its round
            # trips (~1 s of `ray up` at CML's 300 ms a request).
            self._wait_for_launcher()
            return ""
        if cmd.strip() != "ray stop":  # the node's shim stops Ray with no environment
            self._wait_for_launcher()
        env = {
            k: v if isinstance(v, str) else json.dumps(v)
            for k, v in (environment_variables or {}).items()
        }
        request = Request(cmd=cmd, env=env, history=True)
        # The head's import check runs beside its `ray start` (the node runs each request in
        # a thread of its own): one command's round trips less for `ray up` to wait on.
        import_check = (
            _in_background(partial(self._answer, self._post_import_check()))
            if request.starts_head
            else None
        )
        # and where to connect is read meanwhile.
        head_info = _in_background(self.mailbox.node_info) if request.starts_head else None
        code, output = self._request(request)
        text = output.decode("utf-8", "replace")
        if not with_output and text:
            sys.stdout.write(text)
            sys.stdout.flush()
        if code == 0 and import_check and head_info:
            self._check_head_loads_provider(import_check)
            note(self._how_to_connect(head_info))
        if code != 0:
            if exit_on_fail:
                if with_output and text:
                    sys.stdout.write(text)
                sys.exit(code)
            raise ProcessRunnerError(
                f"Command failed with exit status {code}",
                "ssh_command_failed",
                code=code,
                command=cmd,
            )
        return text if with_output else ""

    def _request(self, request: Request) -> tuple[int, bytes]:
        """Ask the node; (exit status, output). A node gone meanwhile is Ray's failure."""
        return self._answer(self._post(request))

    def _post(self, request: Request) -> str:
        """Post ``request`` to the node without waiting; its name, for ``_answer``."""
        if request.cmd:  # a command may run the provider's code: it is told where it lies
            request.env = {**request.env, **self._shipped_env()}
        return self.mailbox.post(request)

    def _answer(self, name: str) -> tuple[int, bytes]:
        """The posted request's (exit status, output)."""
        try:
            result = self.mailbox.wait_for_result(name)
        except NodeGone as exc:
            raise ProcessRunnerError(str(exc), "node_terminated", code=255) from None
        except RayCMLError as exc:  # timed out
            raise ProcessRunnerError(str(exc), "command_timeout", code=exc.exit_code) from None
        return result.exit_status, result.output

    def _shipped_env(self) -> dict[str, str]:
        """Where this provider's own code lies in the project (``ray up`` shipped it)."""
        return {NodeSpec.var("provider_zip"): self.provider.ship_code()}

    def _wait_for_launcher(self) -> None:
        """Like waiting for SSH: until the node's launcher has published itself and made its
        Python environment ready (once per node and process)."""
        if self.node_id in self.provider.ready_nodes:
            return
        # Where the provider's code lies is looked up meanwhile: at CML's 100-300 ms a
        # request, `ray up` and `ray submit` would otherwise wait on it too.
        _in_background(self.provider.ship_code)
        started = time.monotonic()
        info = self.mailbox.wait_for_launcher(self.provider.launch_timeout_s)
        if info.environment:  # ready when the launcher started: node.json says it
            summary, version = info.environment, info.ray_version
        else:  # not ready then: the node tries again, and says why it fails
            code, output = self._request(Request(report=Request.ENVIRONMENT_REPORT))
            text = output.decode("utf-8", "replace").strip()
            if code != 0:
                raise NodeNotReady(text)
            summary, _, version = text.rpartition("RAY_VERSION=")
        local = local_ray_version()
        if version.strip() and local and version.strip() != local:
            raise NodeNotReady(
                f"node {self.node_id} runs Ray {version.strip()}, but this machine "
                f"runs Ray {local}: use Ray {local} here, or let the cluster's pip_packages "
                "pin it (leave ray's version out)"
            )
        waited = time.monotonic() - started
        if waited >= 1 or not summary.startswith(TRIVIAL_ENVIRONMENTS):
            note(f"node {self.node_id}: {summary.strip()} ({waited:.0f} s)")
        self.provider.ready_nodes.add(self.node_id)

    # ------------------------------------------------------------------ files

    @ends_command
    def run_rsync_up(self, source: str, target: str, options: Any = None) -> None:
        """Copy ``source`` (a file or a folder) to ``target`` on the node, in the request."""
        source_path = Path(os.path.expanduser(source))
        if source_path.is_dir():
            paths = sorted(p for p in source_path.rglob("*") if p.is_file())
            pairs = [
                (p, f"{target.rstrip('/')}/{p.relative_to(source_path).as_posix()}") for p in paths
            ]
        else:
            pairs = [(source_path, target)]
        files = [
            {
                "path": remote,
                "data": base64.b64encode(path.read_bytes()).decode(),
                "mode": path.stat().st_mode & 0o777,
            }
            for path, remote in pairs
        ]
        # A copy is harmless on any node, so it is posted while the node is first checked
        # (`ray submit`'s script is its first contact): one round trip less to wait on.
        posted = _in_background(partial(self._post, Request(files=files)))
        self._wait_for_launcher()
        code, output = self._answer(posted.result())
        if code != 0:
            raise ProcessRunnerError(
                output.decode("utf-8", "replace").strip() or "copying files failed",
                "ssh_command_failed",
                code=code,
                command=f"rsync {source} {target}",
            )

    @ends_command
    def run_rsync_down(self, source: str, target: str, options: Any = None) -> None:
        """Fetch ``source`` from the node: it comes back as the output of ``cat``."""
        self._wait_for_launcher()
        code, data = self._request(Request(cmd=f"cat {_remote(source)}"))
        if code != 0:
            raise ProcessRunnerError(
                f"cannot read {source} on node {self.node_id}",
                "ssh_command_failed",
                code=code,
                command=f"cat {source}",
            )
        target_path = Path(os.path.expanduser(target))
        if target_path.is_dir():
            target_path = target_path / Path(source).name
        target_path.write_bytes(data)

    def _post_import_check(self) -> str:
        """Ask the head to import this provider with its Python and paths, as its autoscaler
        will (``_check_head_loads_provider`` reads the answer)."""
        module = type(self.provider).__module__
        return self._post(Request(cmd=f'"${CommandVar.PYTHON}" -c "import {module}"'))

    def _check_head_loads_provider(self, import_check: Future[tuple[int, bytes]]) -> None:
        """A head that could never scale fails ``ray up`` now, not at its first scale-up."""
        code, output = import_check.result()
        if code != 0:
            lines = output.decode("utf-8", "replace").strip().splitlines() or ["no output"]
            module = type(self.provider).__module__
            raise NodeNotReady(
                f"the head's autoscaler cannot load the provider ({module}): {lines[-1]}"
            )

    def _how_to_connect(self, head_info: Future[NodeInfo]) -> str:
        """After the head's ``ray start``: where the dashboard is and how to connect."""
        try:
            info = head_info.result()
            app = self.provider.application(self.node_id)
        except (CMLError, KeyError):
            return "the head's Ray started; `ray-cml status CONFIG` shows the cluster"
        url = application_url(self.client.settings.host, app)
        gcs = f"{info.ip}:{info.gcs_port}"
        dashboard = f"http://{info.ip}:{info.dashboard_port or info.app_port}"
        lines = [
            f"the head's Ray started on {info.ip}",
            f"  URL:         {url} (the dashboard, and Serve's OpenAI API on /v1)",
        ]
        if info.ray_auth == TOKEN:
            lines += [
                "  Ray token:   every Ray port asks for it; in a CML session of this project run",
                f"               {session_line(info.auth_token_path)}",
                "               (elsewhere, or in the dashboard: ray-cml token CONFIG prints it)",
            ]
        lines.append(f'  from a CML session of this project: ray.init(address="{gcs}")')
        if info.client_port:
            lines.append(f'  Ray Client:  ray.init("ray://{info.ip}:{info.client_port}")')
        lines += [
            f"  Ray Jobs:    ray job submit --address {dashboard} -- python my_script.py",
            f"  Serve:       serve deploy my_app.yaml -a {dashboard}"
            " (http_options.host: 127.0.0.1: only the head's gateway reaches it)",
            f"  OpenAI API:  {url}/v1 and, in the project, http://{info.ip}:{info.app_port}/v1,"
            " with the key `ray-cml endpoint-key CONFIG` prints",
            "  the cluster: ray-cml status CONFIG (nodes as CML and Ray see them)",
            "  metrics:     ray-cml top CONFIG (live); ray-cml history CONFIG (after)",
            "               "
            + (
                "a Prometheus on the head keeps every node's metrics for Ray's dashboard"
                if info.prometheus_port
                else "no Prometheus on the head for Ray's dashboard (provider.prometheus names one)"
            ),
        ]
        running = info.ray_auth
        configured = configured_mode(self.provider.provider_config)
        if running == DISABLED:
            lines.append(f"WARNING: {DISABLED_WARNING}")
        if running != configured:
            lines.append(
                f"note: the running head has Ray authentication {running!r}; "
                f"provider.ray_auth_mode {configured!r} "
                "applies from the next `ray down` and `ray up`"
            )
        return "\n".join(lines)

    def remote_shell_command_str(self) -> str:
        return f"echo {shlex.quote(ATTACH_HINT)}"

    def run_init(self, *, as_head: bool, file_mounts: dict[str, str], sync_run_yet: bool):
        return None


def _in_background(call: Callable[[], T]) -> Future[T]:
    """``call`` in a daemon thread of its own; its outcome in the future (a failure is kept
    there, not printed: whoever needs the result sees it, or calls again). Not a
    ``ThreadPoolExecutor``: its threads are joined at exit, and an import check still
    polling after `ray start` failed would hold `ray up`'s exit for as long as it polls."""
    future: Future[T] = Future()

    def run() -> None:
        try:
            future.set_result(call())
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, name="ray-cml-runner", daemon=True).start()
    return future


def _remote(path: str) -> str:
    """Quote a remote path but keep a leading ``~`` for the node's shell to expand."""
    if path.startswith("~/"):
        return "~/" + shlex.quote(path[2:])
    return shlex.quote(path)
