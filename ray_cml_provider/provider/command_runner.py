"""Running commands on a CML application without SSH: a mailbox in the project filesystem.

``ray up``, ``ray exec``, ``ray submit`` and ``ray down`` drive nodes through a command
runner. CML engines have no SSH, but every engine of a project mounts the same filesystem,
which the API can write and read from anywhere. So a command is a JSON file posted to
``<cluster dir>/nodes/<node id>/inbox/``; the node's launcher runs it and writes
``outbox/<name>.out`` and ``outbox/<name>.rc``, which this runner polls for and prints.
File mounts travel inside the request (``files``), and a file comes back as a command's
output: nothing waits for NFS to show a staged copy on the other side.

The first contact with a node asks for its environment report (``report: environment``):
``ray up`` shows how the node's packages were made ready, a failed build ends ``ray up``
with pip's last lines, and a node whose Ray differs from this one is one clear error.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from ray.autoscaler._private.command_runner import ProcessRunnerError
from ray.autoscaler.command_runner import CommandRunnerInterface

from ray_cml_provider.cml import TRANSIENT_ERRORS, CMLError, CMLNotFoundError
from ray_cml_provider.node_launcher import HEAD_START
from ray_cml_provider.provider.addresses import application_url
from ray_cml_provider.provider.naming import node_dir, node_info_path
from ray_cml_provider.provider.packages import local_ray_version
from ray_cml_provider.provider.ray_auth import (
    DISABLED,
    DISABLED_WARNING,
    TOKEN,
    configured_mode,
    session_line,
)

ATTACH_HINT = (
    "ray attach is not available on CML (applications have no SSH). Use "
    "'ray exec CONFIG \"COMMAND\"' for one command, 'ray submit CONFIG script.py' for a "
    "script, or open a terminal in a CML session of the same project."
)
MAX_COMMAND_WAIT_S = 3600.0
# Node environments not worth a line on every `ray exec` (nothing was installed).
TRIVIAL_ENVIRONMENTS = ("the runtime already has Ray", "no packages asked for")
ENV_FAILED = 86  # exit status of a command that could not run: the node has no environment
# What `ray attach` asks a runner to run: an interactive shell, which a mailbox cannot carry.
ATTACH_COMMANDS = {"$SHELL", "tmux new", "tmux attach || tmux new", "screen -L", "screen -L -xRR"}


class CMLCommandRunner(CommandRunnerInterface):
    def __init__(self, provider: Any, node_id: str, log_prefix: str = ""):
        self.provider = provider
        self.client = provider.client
        self.node_id = node_id
        self.log_prefix = log_prefix
        self.node_dir = node_dir(provider.cluster_name, node_id)
        self.node_info = node_info_path(provider.cluster_name, node_id)

    # ------------------------------------------------------------------ commands

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
            print(ATTACH_HINT, file=sys.stderr)
            sys.exit(2)
        if cmd.strip() != "ray stop":  # the node's shim stops Ray with no environment
            self._wait_for_launcher()
        env = {
            k: v if isinstance(v, str) else json.dumps(v)
            for k, v in (environment_variables or {}).items()
        }
        code, output = self._request({"cmd": cmd, "env": env})
        text = output.decode("utf-8", "replace")
        if not with_output and text:
            sys.stdout.write(text)
            sys.stdout.flush()
        if code == 0 and HEAD_START.search(cmd):
            self._check_head_loads_provider()
            _note(self._how_to_connect())
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

    def _request(self, request: dict[str, Any]) -> tuple[int, bytes]:
        """Post one request to the node's inbox; wait for and return (exit status, output)."""
        name = f"{time.time_ns()}-{secrets.token_hex(3)}"
        request = {**request, "env": {**request.get("env", {}), **self._shipped_env()}}
        self.client.upload_file(f"{self.node_dir}/inbox/{name}.json", json.dumps(request))
        code = self._wait_for_exit_code(name)
        try:
            output = self.client.download_file(f"{self.node_dir}/outbox/{name}.out")
        except CMLNotFoundError:
            output = b""  # the command printed nothing
        self.client.delete_file(f"{self.node_dir}/inbox/{name}.json", missing_ok=True)
        for suffix in (".out", ".rc"):
            self.client.delete_file(f"{self.node_dir}/outbox/{name}{suffix}", missing_ok=True)
        return code, output

    def _shipped_env(self) -> dict[str, str]:
        """Where this provider's own code lies in the project (``ray up`` shipped it)."""
        return {"RAY_CML_PROVIDER_ZIP": self.provider.ship_code()}

    def _wait_for_launcher(self) -> None:
        """Like waiting for SSH: until the node's launcher has published itself and made its
        Python environment ready (once per node and process)."""
        if self.node_id in self.provider.ready_nodes:
            return
        self._wait_for_node_json()
        started = time.monotonic()
        code, output = self._request({"report": "environment"})
        text = output.decode("utf-8", "replace").strip()
        if code != 0:
            print(text, file=sys.stderr, flush=True)
            sys.exit(ENV_FAILED)
        summary, _, version = text.rpartition("RAY_VERSION=")
        local = local_ray_version()
        if version.strip() and local and version.strip() != local:
            print(
                f"ray-cml: node {self.node_id} runs Ray {version.strip()}, but this machine "
                f"runs Ray {local}: use Ray {local} here, or let the cluster's pip_packages "
                "pin it (leave ray's version out)",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(ENV_FAILED)
        waited = time.monotonic() - started
        if waited >= 1 or not summary.startswith(TRIVIAL_ENVIRONMENTS):
            _note(f"node {self.node_id}: {summary.strip()} ({waited:.0f} s)")
        self.provider.ready_nodes.add(self.node_id)

    def _wait_for_node_json(self) -> None:
        started = time.monotonic()
        deadline = started + self.provider.launch_timeout_s
        next_note = started + 5
        while True:
            try:
                self.client.list_files(self.node_info)
                return
            except CMLError:
                if time.monotonic() > deadline:
                    raise
            if time.monotonic() > next_note:
                next_note = time.monotonic() + 15
                _note(
                    f"waiting for the node launcher of {self.node_id} to start "
                    f"({time.monotonic() - started:.0f} s)"
                )
            time.sleep(1.0)

    def _wait_for_exit_code(self, name: str) -> int:
        """Poll the outbox (one list call per poll, backing off to 2 s) for ``name.rc``."""
        delay, started = 0.2, time.monotonic()
        next_liveness_check = started + 10
        next_note = started + 15
        outbox = f"{self.node_dir}/outbox"
        while time.monotonic() - started < MAX_COMMAND_WAIT_S:
            try:
                if any(f.path.endswith(f"/{name}.rc") for f in self.client.list_files(outbox)):
                    return int(self.client.download_file(f"{outbox}/{name}.rc").strip() or 1)
            except TRANSIENT_ERRORS:
                pass  # CML kept failing past the client's retries: this is a poll, poll again
            if time.monotonic() > next_note:
                next_note = time.monotonic() + 15
                _note(f"still running on {self.node_id} ({time.monotonic() - started:.0f} s)")
            if time.monotonic() > next_liveness_check:
                next_liveness_check = time.monotonic() + 10
                if self.node_id not in self.provider.non_terminated_nodes({}):
                    raise ProcessRunnerError("the node went away", "node_terminated", code=255)
            time.sleep(delay)
            delay = min(delay * 1.5, 2.0)
        raise ProcessRunnerError("command timed out", "command_timeout", code=124)

    # ------------------------------------------------------------------ files

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
        self._wait_for_launcher()
        code, output = self._request({"files": files})
        if code != 0:
            raise ProcessRunnerError(
                output.decode("utf-8", "replace").strip() or "copying files failed",
                "ssh_command_failed",
                code=code,
                command=f"rsync {source} {target}",
            )

    def run_rsync_down(self, source: str, target: str, options: Any = None) -> None:
        """Fetch ``source`` from the node: it comes back as the output of ``cat``."""
        self._wait_for_launcher()
        code, data = self._request({"cmd": f"cat {_remote(source)}"})
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

    def _check_head_loads_provider(self) -> None:
        """The head's autoscaler imports this provider with the head's Python and paths; try
        the same import there, so a head that could never scale fails ``ray up`` now."""
        module = type(self.provider).__module__
        code, output = self._request({"cmd": f'"$RAY_CML_PYTHON" -c "import {module}"'})
        if code != 0:
            lines = output.decode("utf-8", "replace").strip().splitlines() or ["no output"]
            print(
                f"ray-cml: the head's autoscaler cannot load the provider ({module}): {lines[-1]}",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(ENV_FAILED)

    def _how_to_connect(self) -> str:
        """After the head's ``ray start``: where the dashboard is and how to connect."""
        try:
            info = json.loads(self.client.download_file(self.node_info))
            app = self.provider.application(self.node_id)
        except (CMLError, KeyError, ValueError):
            return "the head's Ray started; `ray-cml status CONFIG` shows the cluster"
        url = application_url(self.client.settings.host, app)
        gcs = f"{info['ip']}:{info['gcs_port']}"
        dashboard = f"http://{info['ip']}:{info.get('dashboard_port') or info['app_port']}"
        lines = [
            f"the head's Ray started on {info['ip']}",
            f"  URL:         {url} (the dashboard, and Serve's OpenAI API on /v1)",
        ]
        if info.get("ray_auth") == TOKEN:
            lines += [
                "  Ray token:   every Ray port asks for it; in a CML session of this project run",
                f"               {session_line(info['auth_token_path'])}",
                "               (elsewhere, or in the dashboard: ray-cml token CONFIG prints it)",
            ]
        lines.append(f'  from a CML session of this project: ray.init(address="{gcs}")')
        if info.get("client_port"):
            lines.append(f'  Ray Client:  ray.init("ray://{info["ip"]}:{info["client_port"]}")')
        lines += [
            f"  Ray Jobs:    ray job submit --address {dashboard} -- python my_script.py",
            f"  Serve:       serve deploy my_app.yaml -a {dashboard}"
            " (http_options.host: 127.0.0.1: only the head's gateway reaches it)",
            f"  OpenAI API:  {url}/v1 and, in the project, http://{info['ip']}:{info['app_port']}/v1,"
            " with the key `ray-cml endpoint-key CONFIG` prints",
            "  the cluster: ray-cml status CONFIG (nodes as CML and Ray see them)",
        ]
        running = info.get("ray_auth", DISABLED)
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


def _note(message: str) -> None:
    """Progress for the person running ``ray up``/``exec``: on stderr, never mixed into a
    command's captured output."""
    print(f"ray-cml: {message}", file=sys.stderr, flush=True)


def _remote(path: str) -> str:
    """Quote a remote path but keep a leading ``~`` for the node's shell to expand."""
    if path.startswith("~/"):
        return "~/" + shlex.quote(path[2:])
    return shlex.quote(path)
