"""What runs inside every CML application of a Ray cluster: the node launcher.

Standard library only: it starts before anything is installed (it is the application's
``script``, copied into the project by the provider). It

- publishes the node's address (``nodes/<id>/node.json`` in the cluster's folder of the
  shared project filesystem), so the provider can answer ``internal_ip``;
- runs the commands the laptop's ``ray up``/``exec``/``submit``/``down`` post into
  ``nodes/<id>/inbox/`` and writes their output and exit status to ``outbox/`` (CML has no
  SSH: the project filesystem is the channel);
- on a worker, runs the cluster's setup and ``worker_start_ray_commands`` itself (the
  autoscaler's updaters are disabled) with the type's exact resources;
- keeps the application alive, and on a worker exits (deleting its own application) once
  the head has been unreachable for ``RAY_CML_HEAD_LOST_TIMEOUT_S``, so a dead head never
  leaves GPU applications running;
- on a worker, answers HTTP on the application's port (``CDSW_APP_PORT``) with the node's
  state from its first second: CML polls that port to learn the application is up (the
  head's dashboard answers there), so a worker that answered nothing might never be RUNNING.

Every command runs with ``HOME`` set to the cluster's own folder (so ``~/ray_bootstrap_config
.yaml`` of two clusters in one project never collide), its own ``RAY_TMPDIR``, and a ``ray``
shim first on PATH whose ``ray stop`` stops only this node's Ray processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

POLL_S = 0.2
HEAD_CHECK_S = 2.0


class HeadGone(Exception):
    """The worker's head has been unreachable for longer than the configured time."""


def log(message: str) -> None:
    print(f"[ray-cml launcher {time.strftime('%H:%M:%S')}] {message}", flush=True)


def port_or_free(preferred: int) -> int:
    """``preferred`` if nothing listens on it here, else a free port (several nodes may share
    one host in the emulator; on CML each engine has its own)."""
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RuntimeError("no free port")


class NodeLauncher:
    def __init__(self, env: dict[str, str]):
        self.env = env
        self.project_dir = Path.cwd()
        self.cluster = env["RAY_CML_CLUSTER"]
        self.node_id = env["RAY_CML_NODE_ID"]
        self.kind = env.get("RAY_CML_NODE_KIND", "worker")
        self.cluster_dir = self.project_dir / env["RAY_CML_DIR"]
        self.node_dir = self.cluster_dir / "nodes" / self.node_id
        self.inbox = self.node_dir / "inbox"
        self.outbox = self.node_dir / "outbox"
        self.home = self.cluster_dir / "home"
        self.ip = env.get("CDSW_IP_ADDRESS") or socket.gethostbyname(socket.gethostname())
        self.gcs_port = port_or_free(int(env.get("RAY_CML_GCS_PORT_PREFERRED", "6379")))
        self.client_port = port_or_free(10001)
        self.agent_port = port_or_free(52365)
        self.head_lost_timeout_s = float(env.get("RAY_CML_HEAD_LOST_TIMEOUT_S", "60"))
        self.tmp_dir = f"/tmp/rcml-{self.node_id}"
        self.done: set[str] = set()  # commands already run (each runs once)
        self.state = "starting"  # what the status page on the application's port says
        self._head_lost_since: float | None = None
        self._next_head_check = 0.0

    # ------------------------------------------------------------------ set-up

    def previous_life(self) -> bool:
        """True when this node already ran once: CML restarted its FAILED application.

        A node's identity is single-use. Ray and the provider have already written the old
        life off, so a restarted node must not rejoin as a zombie: it removes itself.
        """
        return (self.node_dir / "node.json").exists()

    def prepare(self) -> None:
        for folder in (self.inbox, self.outbox, self.home, self.node_dir / "bin"):
            folder.mkdir(parents=True, exist_ok=True)
        shim_dir = self.node_dir / "bin"
        shim = shim_dir / "ray"
        shim.write_text(
            "#!/bin/bash\n"
            "# ray-cml: 'ray stop' stops only this node's Ray, never other processes here.\n"
            'if [ "$1" = "stop" ]; then\n'
            f'  exec "{sys.executable}" "{Path(__file__).resolve()}" stop-ray\n'
            "fi\n"
            f'PATH="${{PATH#{shim_dir}:}}" exec ray "$@"\n'
        )
        shim.chmod(0o755)
        info = {
            "node_id": self.node_id,
            "kind": self.kind,
            "ip": self.ip,
            "gcs_port": self.gcs_port,
            "client_port": self.client_port,
            # The one port CML's proxy exposes (the application's URL); the head's dashboard.
            "app_port": int(self.env.get("CDSW_APP_PORT") or 0),
            "pid": os.getpid(),
            "started_at": time.time(),
        }
        tmp = self.node_dir / "node.json.tmp"
        tmp.write_text(json.dumps(info))
        tmp.replace(self.node_dir / "node.json")
        log(f"{self.kind} node {self.node_id} of cluster {self.cluster} on {self.ip}")

    def command_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(self.env)
        env.update(
            {
                "HOME": str(self.home),
                "RAY_TMPDIR": self.tmp_dir,
                "RAY_CML_GCS_PORT": str(self.gcs_port),
                "RAY_CML_CLIENT_PORT": str(self.client_port),
                "RAY_CML_AGENT_PORT": str(self.agent_port),
                "RAY_CML_PROJECT_DIR": str(self.project_dir),
                "RAY_CML_LAUNCHER_PGID": str(os.getpgrp()),
                "RAY_CML_LAUNCHER_PID": str(os.getpid()),
                # The shim first; then what `pip install --user` puts in the cluster's HOME.
                "PATH": os.pathsep.join(
                    [
                        str(self.node_dir / "bin"),
                        str(self.home / ".local" / "bin"),
                        self.env.get("PATH", ""),
                    ]
                ),
            }
        )
        env.update(extra or {})
        return env

    # ------------------------------------------------------------------ commands

    def run_command(
        self, command: str, extra_env: dict[str, str], output: Path, watch_head: bool = False
    ) -> int:
        """Run ``command`` in bash. With ``watch_head``, give up once the head is gone: a
        worker's ``ray start`` against a dead head could otherwise wait a long time."""
        with open(output, "ab") as out:
            process = subprocess.Popen(
                ["/bin/bash", "-c", command],
                cwd=str(self.project_dir),
                env=self.command_env(extra_env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            while True:
                try:
                    return process.wait(timeout=POLL_S)
                except subprocess.TimeoutExpired:
                    if watch_head and self.head_gone_too_long():
                        process.kill()
                        process.wait()
                        raise HeadGone() from None

    def head_gone_too_long(self) -> bool:
        """Check the head's GCS port every few seconds; True once it has been unreachable
        for longer than ``RAY_CML_HEAD_LOST_TIMEOUT_S``."""
        now = time.monotonic()
        if now < self._next_head_check:
            return False
        self._next_head_check = now + HEAD_CHECK_S
        if self.head_reachable():
            self._head_lost_since = None
            return False
        if self._head_lost_since is None:
            self._head_lost_since = now
            log("the head is unreachable")
        return now - self._head_lost_since > self.head_lost_timeout_s

    def serve_inbox_once(self) -> None:
        """Start each new command in its own thread: a long one (a `ray submit` waiting for
        a GPU) must not hold up the next (a `ray exec 'ray status'`)."""
        for request in sorted(self.inbox.glob("*.json")):
            name = request.stem
            if name in self.done:
                continue  # the runner deletes the request once it has read the result
            try:
                spec = json.loads(request.read_text())
            except (OSError, ValueError):
                continue  # still being written
            self.done.add(name)
            threading.Thread(target=self.run_request, args=(name, spec), daemon=True).start()

    def run_request(self, name: str, spec: dict) -> None:
        log(f"running command {name}")
        code = self.run_command(spec["cmd"], spec.get("env") or {}, self.outbox / f"{name}.out")
        rc = self.outbox / f"{name}.rc"
        tmp = rc.with_suffix(".rc.tmp")
        tmp.write_text(str(code))
        tmp.replace(rc)  # the runner polls for .rc: it appears whole, after the output
        log(f"command {name} exited with {code}")

    # ------------------------------------------------------------------ worker

    def start_worker_ray(self) -> bool:
        ray_env = {
            "RAY_HEAD_IP": self.env.get("RAY_HEAD_IP", ""),
            "RAY_CLOUD_INSTANCE_ID": self.node_id,
        }
        commands = json.loads(self.env.get("RAY_CML_SETUP_COMMANDS", "[]"))
        commands += json.loads(self.env.get("RAY_CML_START_COMMANDS", "[]"))
        log_path = self.node_dir / "setup.log"
        for command in commands:
            log(f"$ {command}")
            code = self.run_command(command, ray_env, log_path, watch_head=True)
            if code != 0:
                log(f"command failed with exit status {code}; see {log_path}")
                return False
        log("Ray started; watching the head")
        return True

    def head_reachable(self) -> bool:
        head_ip = self.env.get("RAY_HEAD_IP", "")
        port = int(self.env.get("RAY_HEAD_GCS_PORT", "6379"))
        try:
            with socket.create_connection((head_ip, port), timeout=2):
                return True
        except OSError:
            return False

    def delete_own_application(self) -> None:
        """Remove this worker's application, so a lost cluster leaves nothing billing."""
        api = self.env.get("CDSW_API_URL", "").rsplit("/api/", 1)[0] or (
            "https://" + self.env.get("CDSW_DOMAIN", "")
        )
        key = self.env.get("CDSW_APIV2_KEY", "")
        project = self.env.get("CDSW_PROJECT_ID", "")
        name = self.env.get("RAY_CML_APP_NAME", "")
        headers = {"Authorization": f"Bearer {key}", "Accept": "application/json"}
        base = f"{api}/api/v2/projects/{project}/applications"
        query = urllib.parse.urlencode({"search_filter": json.dumps({"name": name})})
        for _ in range(5):
            try:
                with urllib.request.urlopen(
                    urllib.request.Request(f"{base}?{query}", headers=headers), timeout=30
                ) as answer:
                    apps = json.load(answer).get("applications", [])
                for app in apps:
                    if app.get("name") == name:
                        log(f"deleting my application {app['id']}")
                        urllib.request.urlopen(
                            urllib.request.Request(
                                f"{base}/{app['id']}", headers=headers, method="DELETE"
                            ),
                            timeout=30,
                        ).close()
                return
            except OSError as exc:
                log(f"could not delete my application yet: {exc}")
                time.sleep(3)

    def serve_status_page(self) -> None:
        """Answer ``GET /`` on ``CDSW_APP_PORT`` in a thread: what CML's status poll and the
        worker's application URL see."""
        port = int(self.env.get("CDSW_APP_PORT") or 0)
        if not port:
            return
        launcher = self

        class StatusPage(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
                body = (
                    f"ray-cml {launcher.kind} node {launcher.node_id} of cluster "
                    f"{launcher.cluster}: {launcher.state}\n"
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass  # CML polls often: keep the application's log for what matters

        try:
            server = ThreadingHTTPServer((self.ip, port), StatusPage)
        except OSError as exc:
            log(f"no status page on port {port}: {exc}")
            return
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="status-page", daemon=True).start()

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        if self.previous_life():
            log(f"node {self.node_id} was restarted by CML after a failure: removing it")
            self.delete_own_application()
            return 0
        self.prepare()
        if self.kind == "worker":
            self.serve_status_page()
        try:
            if self.kind == "worker" and not self.start_worker_ray():
                stop_ray_of_this_node()
                return 1
            self.state = "running Ray"
            while True:
                self.serve_inbox_once()
                if self.kind == "worker" and self.head_gone_too_long():
                    raise HeadGone()
                time.sleep(POLL_S)
        except HeadGone:
            log(f"the head has been gone over {self.head_lost_timeout_s:.0f} s: leaving")
            stop_ray_of_this_node()
            self.delete_own_application()
            return 0


def _ancestors(pid: int) -> set[int]:
    chain = set()
    while pid > 1 and pid not in chain:
        chain.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat[stat.rfind(")") + 2 :].split()[1])
    return chain


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2 :].split()
            if fields[0] != "Z" and int(fields[2]) == pgid:
                members.append(int(entry.name))
    return members


def stop_ray_of_this_node(grace_s: float = 10.0) -> None:
    """``ray stop`` for one node: end the Ray processes of this launcher's process group.

    Ray's own ``ray stop`` kills every Ray process on the machine, which in the emulator
    means other nodes and other clusters. Here everything Ray started for this node shares
    the launcher's process group, so that group (minus the launcher and the caller) is it.
    """
    pgid = int(os.environ.get("RAY_CML_LAUNCHER_PGID", os.getpgrp()))
    keep = _ancestors(os.getpid()) | {int(os.environ.get("RAY_CML_LAUNCHER_PID", "0"))}
    targets = [pid for pid in _group_members(pgid) if pid not in keep]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 2)
        while time.monotonic() < deadline:
            targets = [pid for pid in _group_members(pgid) if pid in targets]
            if not targets:
                break
            time.sleep(0.1)
    print("Stopped Ray on this node." if not targets else f"Could not stop pids {targets}.")


def main(argv: list[str]) -> int:
    if argv[1:2] == ["stop-ray"]:
        stop_ray_of_this_node()
        return 0

    launcher = NodeLauncher(dict(os.environ))

    def leave(signum: int, _frame: object) -> None:
        # The temporary folder first: CML (or the emulator) may SIGKILL us any moment now.
        shutil.rmtree(launcher.tmp_dir, ignore_errors=True)
        stop_ray_of_this_node(grace_s=1)
        shutil.rmtree(launcher.tmp_dir, ignore_errors=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, leave)
    code = launcher.run()
    shutil.rmtree(launcher.tmp_dir, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
