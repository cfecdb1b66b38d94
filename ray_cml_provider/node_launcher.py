"""What runs inside every CML application of a Ray cluster: the node launcher.

The application's script is ``node_bootstrap`` (standard library: it answers CML's poll and
makes the node's Python environment ready), which then ``exec``-s this module with the
provider code ``ray up`` shipped and that environment first on ``PYTHONPATH``. This module
imports only the standard library at the top, so it also runs (and reports) when the
environment could not be made; the head's gateway (``node_gateway``, aiohttp) is imported
once the environment is there. It

- publishes the node's address (``nodes/<id>/node.json`` in the cluster's folder of the
  shared project filesystem), so the provider can answer ``internal_ip``;
- makes the cluster's Ray token (``auth/token`` in the cluster's folder, created by ``ray
  up``) owner-only and points every command at it (``RAY_AUTH_MODE=token``,
  ``RAY_AUTH_TOKEN_PATH``): every Ray port of the cluster then asks for it;
- reports how the node's Python environment was made ready, or why not (the bootstrap made
  it; ``ray up`` again tries again);
- runs the commands the laptop's ``ray up``/``exec``/``submit``/``down`` post into
  ``nodes/<id>/inbox/`` and publishes their output and exit status in ``outbox/`` (CML has
  no SSH: the project files are the channel);
- on a worker, runs the cluster's setup and ``worker_start_ray_commands`` itself (the
  autoscaler's updaters are disabled) with the type's exact resources;
- keeps the application alive, and on a worker exits (deleting its own application) once
  the head has been unreachable for ``RAY_CML_HEAD_LOST_TIMEOUT_S``, so a dead head never
  leaves GPU applications running;
- with ``RAY_CML_HEAD_RECOVERY`` (``provider.head_recovery``): the head keeps its GCS state
  in the cluster's folder (RocksDB) and records the ``ray start --head`` that ``ray up`` ran;
  when CML restarts the failed head, the new life (on a new address) publishes that address
  and starts Ray again from the state, so Serve applications come back by themselves; a
  worker whose head went away watches the head's ``node.json`` and, when a new address
  answers, starts its Ray again against it (the same node, the same resources);
- on the head, with ``RAY_CML_AUTOSTOP_MINUTES``, stops the cluster once it has been idle that
  long (``cluster/idleness.py`` says what idle is): it leaves ``autostopped.json`` in the
  cluster's folder for ``ray-cml status`` and deletes every application of the cluster,
  itself last; ``ray up`` brings the cluster back;
- answers HTTP on the application's port (``CDSW_APP_PORT``), which the bootstrap answered
  until now: on the head the gateway (``/v1`` to Serve, the rest to the dashboard, keys
  checked); on a worker, and on a head whose environment failed, the bootstrap's status page
  (CML polls that port to learn the application is up).

Every command runs with ``HOME`` set to the cluster's own folder (so ``~/ray_bootstrap_config
.yaml`` of two clusters in one project never collide), its own ``RAY_TMPDIR``, and a ``ray``
shim first on PATH whose ``ray stop`` stops only this node's Ray processes and whose ``ray
start`` keeps the node's files in its ``RAY_TMPDIR`` (``--temp-dir``, unless given). CML's own
convention is kept: ``PYTHONUSERBASE`` stays the project's ``~/.local``, so what the
project's sessions ``pip install``-ed stays visible (the node environment, first on
``PYTHONPATH``, wins where both have a package). The provider code ``ray up`` shipped
(``RAY_CML_PROVIDER_ZIP``) comes before both.

The project filesystem is NFS on CML: a file written on one side may reach the other only
after the client's attribute cache expires (30 s and more). So what the provider must read
(``node.json``, command results) is published through CML's files API, which reads its own
writes at once, and the inbox is read both from the mount and, polled, through the API.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from ray_cml_provider import node_api, node_bootstrap, node_env, node_watchdog
from ray_cml_provider.node_processes import node_processes, stop_ray_of_this_node

POLL_S = 0.2
HEAD_CHECK_S = 2.0
# Polling the inbox through the API: quick while commands come, slower when idle.
API_POLL_BUSY_S = 0.5
API_POLL_IDLE_S = {"head": 5.0, "worker": 15.0}
BUSY_FOR_S = 60.0
# How long a node waits for the cluster's token to show on the project's mount (NFS).
TOKEN_WAIT_S = 120.0
# What the head leaves in the cluster's folder when it stopped an idle cluster.
AUTOSTOP_RECORD = "autostopped.json"
# Head recovery: the `ray start --head` request ray up ran, in the head's node folder; the
# GCS state's folder in the cluster's folder; how often a worker whose head is gone looks
# for the head's new address.
RECOVERY_RECORD = "recovery.json"
GCS_STATE_DIR = "gcs"
NEW_HEAD_CHECK_S = 3.0
RECOVERY_TRIES = 3  # of the recorded `ray start --head`
HEAD_START = re.compile(r"\bray start\b.*--head\b", re.S)
# `ray stop` (the shim runs this file, standard library only) needs no node environment:
# `ray down` must stop a node whose environment failed, without waiting for one.
RAY_STOP = re.compile(r"\s*ray stop\s*")


class HeadGone(Exception):
    """The worker's head has been unreachable for longer than the configured time."""


class NoToken(Exception):
    """The cluster asks for Ray's token authentication but its token file is not there."""


def log(message: str) -> None:
    print(f"[ray-cml launcher {time.strftime('%H:%M:%S')}] {message}", flush=True)


class PortReservation:
    """The ports this node gives Ray: chosen once, and never chosen by another node of the
    same machine while this node lives.

    On CML each engine has its own address and every port is free. On the emulator all
    engines share one machine, and Ray's GCS listens on every address: two heads starting
    at the same moment could both see 6379 free, and the second ``ray start`` would fail.
    So a chosen port is (1) bound here (not listening, no SO_REUSEADDR/SO_REUSEPORT: nobody
    else can bind it) until just before this node's ``ray start``, and (2) claimed in the
    machine's ``/tmp`` (``claims_dir``: a folder per port holding the claimer's pid, made
    atomically) for as long as this process lives, so the moment between releasing the
    socket and Ray binding it is not a window for another node. A claim whose process has
    ended is taken over. On CML, /tmp is the engine's own and nothing is ever contended.
    """

    def __init__(self, claims_dir: Path = Path("/tmp/ray-cml-ports")) -> None:
        self._held: list[socket.socket] = []
        self.claims_dir = claims_dir

    def take(self, preferred: int) -> int:
        """``preferred`` if nobody holds or claims it here, else a free port."""
        for port in (preferred, 0, 0, 0):
            sock = socket.socket()
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                sock.close()
                continue
            if self._claim(sock.getsockname()[1]):
                self._held.append(sock)
                return sock.getsockname()[1]
            sock.close()
        raise RuntimeError("no free port")

    def _claim(self, port: int) -> bool:
        claim = self.claims_dir / str(port)
        for _ in range(2):
            try:
                self.claims_dir.mkdir(parents=True, exist_ok=True)
                claim.mkdir()
            except FileExistsError:
                pid = _read_pid(claim / "pid")
                written_now = pid is None and time.time() - _mtime(claim) < 10
                if written_now or (pid is not None and _alive(pid)):
                    return False
                # Its node is gone: move the claim aside (one rename: of two nodes taking it
                # over at once one wins), unless what moved is a claim made a moment ago.
                aside = self.claims_dir / f"{port}.ended-{os.getpid()}"
                try:
                    claim.rename(aside)
                except OSError:
                    return False
                if _read_pid(aside / "pid") != pid:
                    with contextlib.suppress(OSError):
                        aside.rename(claim)  # a live claim: give it back
                    return False
                shutil.rmtree(aside, ignore_errors=True)
                continue
            except OSError:
                return True  # no claims folder here: the socket alone holds the port
            (claim / "pid").write_text(str(os.getpid()))
            return True
        return False

    def release(self) -> None:
        """Close the sockets (this node's Ray binds the ports now); the claims stay."""
        for sock in self._held:
            sock.close()
        self._held.clear()


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        self.ports = PortReservation()
        self.gcs_port = self.ports.take(int(env.get("RAY_CML_GCS_PORT_PREFERRED", "6379")))
        self.client_port = self.ports.take(10001)
        self.agent_port = self.ports.take(52365)
        # The head's dashboard: behind the gateway on the application's port (node_gateway).
        self.dashboard_port = self.ports.take(8265) if self.kind == "head" else 0
        self.serve_port = int(env.get("RAY_CML_SERVE_PORT", "8000"))
        self.head_lost_timeout_s = float(env.get("RAY_CML_HEAD_LOST_TIMEOUT_S", "60"))
        self.tmp_dir = f"/tmp/rcml-{self.node_id}"
        # Ray's token (provider/ray_auth.py): the file's path only; Ray's processes read it.
        token_file = env.get("RAY_CML_AUTH_TOKEN_FILE", "")
        self.token_path = self.project_dir / token_file if token_file else None
        # The key /v1 asks for; with the head's URL outside CML's login, everything else asks
        # for Ray's token too.
        key_file = env.get("RAY_CML_ENDPOINT_KEY_FILE", "")
        self.endpoint_key_path = self.project_dir / key_file if key_file else None
        self.login_bypassed = env.get("RAY_CML_LOGIN_BYPASSED") == "1"
        self.door = None  # the gateway or the status page on CDSW_APP_PORT (``open_door``)
        self.gateway_open = False
        minutes = env.get("RAY_CML_AUTOSTOP_MINUTES", "") if self.kind == "head" else ""
        self.autostop_s = float(minutes) * 60 if minutes else 0.0
        self.node_rel = f"{env['RAY_CML_DIR']}/nodes/{self.node_id}"  # for the files API
        self.api = node_api.ProjectAPI(env, log)
        self.done: set[str] = set()  # commands already run (each runs once)
        self.results = Path(self.tmp_dir) / "commands"  # output while a command runs
        self._next_api_poll = 0.0
        self._busy_until = time.monotonic() + BUSY_FOR_S  # `ray up` talks to a new head now
        self.packages: list[str] = json.loads(env.get("RAY_CML_PIP_PACKAGES", "[]"))
        # What the bootstrap made (node_bootstrap.HANDOFF); the node's commands get the
        # runtime's own PYTHONPATH back, with the shipped code and the environment in front.
        site = env.get("RAY_CML_NODE_SITE", "")
        self.environment_error = env.get("RAY_CML_ENVIRONMENT_ERROR", "")
        self.environment: node_env.Environment | None = (
            None
            if self.environment_error
            else node_env.Environment(
                Path(site) if site else None,
                env.get("RAY_CML_ENVIRONMENT_SUMMARY") or "no packages asked for",
            )
        )
        if "RAY_CML_RUNTIME_PYTHONPATH" in env:
            env["PYTHONPATH"] = env["RAY_CML_RUNTIME_PYTHONPATH"]
        for name in node_bootstrap.HANDOFF:
            env.pop(name, None)
        if not env.get("PYTHONPATH"):
            env.pop("PYTHONPATH", None)
        self._environment_lock = threading.Lock()
        self.state = "starting"  # what the status page on the application's port says
        self._head_lost_since: float | None = None
        self._next_head_check = 0.0
        self._next_new_head_check = 0.0
        # provider.head_recovery: the head recovers from its GCS state when CML restarts
        # it; a worker follows the head to its new address.
        self.recovers = env.get("RAY_CML_HEAD_RECOVERY") == "1"
        self.life = 1  # which start of this node's application this is (a restart: 2, ...)

    # ------------------------------------------------------------------ set-up

    def previous_life(self) -> bool:
        """True when this node already ran once: CML restarted its FAILED application.

        A node's identity is single-use. Ray and the provider have already written the old
        life off, so a restarted node must not rejoin as a zombie: it removes itself.
        """
        return (self.node_dir / "node.json").exists()

    def recorded_head_start(self) -> dict | None:
        """The ``ray start --head`` request this head ran last (``remember_head_start``):
        through the API first, which reads its own writes; the mount may lag."""
        for read in (
            lambda: self.api.download(f"{self.node_rel}/{RECOVERY_RECORD}"),
            lambda: (self.node_dir / RECOVERY_RECORD).read_bytes(),
        ):
            try:
                record = json.loads(read())
            except (OSError, ValueError):
                continue
            if isinstance(record, dict) and record.get("cmd"):
                return record
        return None

    def begin_new_life(self) -> None:
        """A restarted head: count the life, and answer what the old life was running when
        it died (its caller waits for an answer; running it again could repeat a job)."""
        with contextlib.suppress(OSError, ValueError):
            self.life = int(json.loads((self.node_dir / "node.json").read_text()).get("life", 1))
        self.life += 1
        # On CML a restarted application is a new pod with an empty /tmp; on one machine
        # (the emulator) the old life's Ray files are still there: start clean.
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        stale = {path.stem for path in self.inbox.glob("*.json")}
        with contextlib.suppress(OSError):
            stale |= self.inbox_names_through_api()
        answered = {path.stem for path in self.outbox.glob("*.rc")}
        for name in sorted(stale - answered):
            self.publish(
                f"outbox/{name}.out",
                b"ray-cml: the head restarted while this command ran; it was not run again\n",
            )
            self.publish(f"outbox/{name}.rc", b"1")
        self.done |= stale
        log(f"head {self.node_id} restarted by CML (life {self.life}): recovering the cluster")

    def secure_token(self) -> None:
        """Wait for the cluster's token (and, on a head without CML's login, its endpoint key)
        to show on the mount (``ray up`` wrote them through the API before creating the head),
        then make them owner-only. Raises ``NoToken``."""
        secrets_files = [path for path in (self.token_path, self.endpoint_key_path) if path]
        if not secrets_files:
            return
        started = time.monotonic()
        next_note = started + 15
        while not all(path.is_file() for path in secrets_files):
            missing = next(path for path in secrets_files if not path.is_file())
            waited = time.monotonic() - started
            if waited > TOKEN_WAIT_S:
                what = "Ray token" if missing == self.token_path else "endpoint key"
                raise NoToken(
                    f"ray-cml: the cluster's {what} ({missing}) "
                    f"is not in the project after {waited:.0f} s; "
                    "`ray down` and `ray up` make a new one"
                )
            if time.monotonic() > next_note:
                next_note = time.monotonic() + 15
                log(f"waiting for {missing.name} to show here ({waited:.0f} s)")
            time.sleep(1.0)
        with contextlib.suppress(OSError):  # another node may be doing the same now
            secrets_files[0].parent.chmod(0o700)
            for path in secrets_files:
                path.chmod(0o600)

    def prepare(self) -> None:
        self.secure_token()
        for folder in (self.inbox, self.outbox, self.home, self.node_dir / "bin"):
            folder.mkdir(parents=True, exist_ok=True)
        shim_dir = self.node_dir / "bin"
        shim = shim_dir / "ray"
        shim.write_text(
            "#!/bin/bash\n"
            "# ray-cml: 'ray stop' stops only this node's Ray, never other processes here.\n"
            'if [ "$1" = "stop" ]; then\n'
            f'  exec "{sys.executable}" "{self.bootstrap_script()}" stop-ray\n'
            "fi\n"
            f'PATH="${{PATH#{shim_dir}:}}"\n'
            "# ray-cml: 'ray start' keeps the node's files in its own RAY_TMPDIR. Ray would put a\n"
            "# worker's in the head's path, where nodes sharing a host (the emulator) race for\n"
            "# the same socket names.\n"
            'if [ "$1" = "start" ] && [[ " $* " != *" --temp-dir"* ]]; then\n'
            "  shift\n"
            '  exec ray start --temp-dir="$RAY_TMPDIR/ray" "$@"\n'
            "fi\n"
            'exec ray "$@"\n'
        )
        shim.chmod(0o755)
        info = {
            "node_id": self.node_id,
            "kind": self.kind,
            "ip": self.ip,
            "gcs_port": self.gcs_port,
            "client_port": self.client_port,
            # The one port CML's proxy exposes (the application's URL): on the head, the
            # gateway to the dashboard and the OpenAI API (/v1) of Serve on serve_port.
            "app_port": int(self.env.get("CDSW_APP_PORT") or 0),
            "dashboard_port": self.dashboard_port,
            "serve_port": self.serve_port if self.kind == "head" else 0,
            "endpoint_locked": self.endpoint_key_path is not None,
            # Whether Ray asks for the token, and the file a session of the project uses.
            "ray_auth": "token" if self.token_path else "disabled",
            "auth_token_path": str(self.token_path or ""),
            "pid": os.getpid(),
            "started_at": time.time(),
            "life": self.life,
        }
        self.publish("node.json", json.dumps(info).encode(), overwrite=self.life > 1)
        log(f"{self.kind} node {self.node_id} of cluster {self.cluster} on {self.ip}")

    def bootstrap_script(self) -> Path:
        """The application's script (``node_bootstrap``, next to the modules it imports in the
        cluster's folder): the ``ray`` shim's ``ray stop`` runs it, standard library only."""
        uploaded = self.cluster_dir / "bootstrap.py"
        return uploaded if uploaded.exists() else Path(node_bootstrap.__file__).resolve()

    def publish(self, name: str, data: bytes, overwrite: bool = False) -> None:
        """Write ``nodes/<id>/<name>`` for the provider to read: through the files API, which
        the provider reads back at once (the NFS mount may show it much later); on the mount
        when the API cannot be reached. CML never overwrites a file: ``overwrite`` deletes
        the old one first."""
        if self.api.available:
            for attempt in range(3):
                try:
                    if overwrite:
                        self.api.delete(f"{self.node_rel}/{name}")
                    self.api.upload(f"{self.node_rel}/{name}", data)
                    return
                except OSError as exc:
                    log(f"could not publish {name} through the API ({exc})")
                    time.sleep(1 + attempt)
        target = self.node_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(target)

    # ------------------------------------------------------------------ environment

    def retry_environment(self) -> bool:
        """The bootstrap could not make the node's packages ready: try again (``ray up``
        again asks for it; ``node_env`` says when a failed build may be tried again). Once it
        works, this process imports from it too (the gateway needs aiohttp), and the head's
        door opens. False, with the reason in ``environment_error``, while it fails."""
        with self._environment_lock:
            if not self.environment_error:
                return True
            environment, error = node_bootstrap.prepare_environment(self.env, self.project_dir)
            log(error or environment.summary)
            self.environment_error = error
            if error:
                return False
            self.environment = environment
            if environment.site and str(environment.site) not in sys.path:
                sys.path.insert(0, str(environment.site))
        if self.kind == "head":
            self.open_door()
        return True

    def environment_report(self) -> tuple[int, str]:
        """What a ``{"report": "environment"}`` request answers: the summary and the Ray
        version commands see, or the failure."""
        if not self.retry_environment():
            return 1, self.environment_error + "\n"
        ray_version = node_env.ray_pin(self.packages)
        return 0, f"{self.environment.summary}\nRAY_VERSION={ray_version}\n"

    def shipped_code(self, relative: str) -> str:
        """Where a command imports the provider code ``ray up`` shipped from (a newer ``ray
        up`` ships newer code): the project's copy, or one fetched through the API while NFS
        does not show it here yet (``node_bootstrap.shipped_code``)."""
        try:
            tmp = Path(self.tmp_dir)
            return str(node_bootstrap.shipped_code(relative, self.project_dir, tmp, self.api, 0))
        except RuntimeError:
            return str(self.project_dir / relative)

    def command_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(self.env)
        extra = extra or {}
        site = self.environment.site if self.environment else None
        # The provider code `ray up` shipped (the request's: a newer `ray up` ships newer
        # code), then the node environment, then what was there.
        shipped = extra.get("RAY_CML_PROVIDER_ZIP") or env.get("RAY_CML_PROVIDER_ZIP", "")
        python_path = [self.shipped_code(shipped)] if shipped else []
        python_path += [str(site)] if site else []
        python_path += [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []
        bin_dirs = [str(self.node_dir / "bin")]  # the shim first
        bin_dirs += [str(site / "bin")] if site else []
        # Ray Client's proxier forks one server per client; with gRPC's fork handlers on,
        # that server often dies at birth ("Starting Ray client server failed"; Ray issue
        # 63202, seen here in 2 of 5 connections). Without them it starts every time. A
        # node_config environment that sets the variable keeps its own value.
        env.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
        env.update(
            {
                "HOME": str(self.home),
                # CML's convention: what sessions `pip install`-ed lives in ~/.local of the
                # project; moving HOME must not hide it.
                "PYTHONUSERBASE": self.env.get("PYTHONUSERBASE")
                or str(self.project_dir / ".local"),
                "RAY_TMPDIR": self.tmp_dir,
                "RAY_CML_GCS_PORT": str(self.gcs_port),
                "RAY_CML_CLIENT_PORT": str(self.client_port),
                "RAY_CML_AGENT_PORT": str(self.agent_port),
                "RAY_CML_DASHBOARD_PORT": str(self.dashboard_port),
                "RAY_CML_PROJECT_DIR": str(self.project_dir),
                "RAY_CML_PYTHON": sys.executable,  # the runtime's: what `ray` runs with
                "RAY_CML_LAUNCHER_PGID": str(os.getpgrp()),
                "RAY_CML_LAUNCHER_PID": str(os.getpid()),
                **self.gcs_storage_env(),
                "PATH": os.pathsep.join(
                    [*bin_dirs, str(self.project_dir / ".local" / "bin"), self.env.get("PATH", "")]
                ),
            }
        )
        env.update(extra)
        for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            env.pop(name, None)  # only the cluster's own setting counts (set last)
        env.update(self.ray_auth_env())
        if python_path:
            env["PYTHONPATH"] = os.pathsep.join(python_path)
        return env

    def gcs_storage_env(self) -> dict[str, str]:
        """On a head with recovery, Ray's GCS keeps its state in the cluster's folder of the
        project filesystem (RocksDB, no Redis): a restarted head's GCS starts from it."""
        if not (self.recovers and self.kind == "head"):
            return {}
        return {
            "RAY_gcs_storage": "rocksdb",
            "RAY_gcs_storage_path": str(self.cluster_dir / GCS_STATE_DIR),
        }

    def ray_auth_env(self) -> dict[str, str]:
        """Ray's authentication for every command: the token's file, or explicitly none (so
        that no ``~/.ray/auth_token`` lying around decides it)."""
        if self.token_path is None:
            return {"RAY_AUTH_MODE": "disabled"}
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}

    # ------------------------------------------------------------------ commands

    def run_command(
        self, command: str, extra_env: dict[str, str], output: Path, watch_head: bool = False
    ) -> int:
        """Run ``command`` in bash. With ``watch_head``, give up once the head is gone: a
        worker's ``ray start`` against a dead head could otherwise wait a long time."""
        if "ray start" in command:
            self.ports.release()  # this node's Ray binds them now
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
        a GPU) must not hold up the next (a `ray exec 'ray status'`).

        The mount is looked at every round; the API now and then (every half second while
        commands come, more slowly when idle), since NFS may show a new request late."""
        names = {path.stem for path in self.inbox.glob("*.json")}
        now = time.monotonic()
        if self.api.available and now >= self._next_api_poll:
            idle_s = API_POLL_IDLE_S.get(self.kind, 15.0)
            self._next_api_poll = now + (API_POLL_BUSY_S if now < self._busy_until else idle_s)
            try:
                names |= self.inbox_names_through_api()
            except OSError as exc:
                log(f"could not list the inbox through the API: {exc}")
        for name in sorted(names - self.done):
            spec = self.read_request(name)
            if spec is None:
                continue  # still being written
            self.done.add(name)
            self._busy_until = time.monotonic() + BUSY_FOR_S
            threading.Thread(target=self.run_request, args=(name, spec), daemon=True).start()

    def inbox_names_through_api(self) -> set[str]:
        """The requests in this node's inbox as CML's files API lists them (no ``.json``)."""
        return {
            n[: -len(".json")]
            for n in self.api.list_names(f"{self.node_rel}/inbox")
            if n.endswith(".json")
        }

    def read_request(self, name: str) -> dict | None:
        for read in (
            lambda: (self.inbox / f"{name}.json").read_bytes(),
            lambda: self.api.download(f"{self.node_rel}/inbox/{name}.json"),
        ):
            try:
                spec = json.loads(read())
            except (OSError, ValueError):
                continue
            if isinstance(spec, dict):
                return spec
        return None

    def run_request(self, name: str, spec: dict) -> None:
        """Run one request and publish ``outbox/<name>.out`` then ``.rc`` (the runner polls
        for ``.rc``, so the output is there when it looks). A request may carry files to
        write first (``ray up``'s file mounts) or ask for the environment's report."""
        log(f"running command {name}")
        self.results.mkdir(parents=True, exist_ok=True)
        output = self.results / f"{name}.out"
        output.write_bytes(b"")
        code = 1
        try:
            code = self.answer_request(spec, output)
        except Exception as exc:  # the runner waits for an .rc: it must always get one
            with open(output, "a") as out:
                out.write(f"ray-cml launcher: the request failed: {exc!r}\n")
        finally:
            if code == 0:
                self.remember_head_start(spec)
            self.publish(f"outbox/{name}.out", output.read_bytes())
            self.publish(f"outbox/{name}.rc", str(code).encode())
            output.unlink(missing_ok=True)
            log(f"command {name} exited with {code}")

    def remember_head_start(self, spec: dict) -> None:
        """On a head with recovery, keep the ``ray start --head`` that just worked (its
        command and the environment Ray's updater gave it): what a restarted head runs."""
        if self.recovers and self.kind == "head" and HEAD_START.search(spec.get("cmd") or ""):
            record = {"cmd": spec["cmd"], "env": spec.get("env") or {}}
            self.publish(RECOVERY_RECORD, json.dumps(record).encode(), overwrite=True)

    def restart_head_ray(self, record: dict) -> bool:
        """A restarted head: the cluster's setup commands, then the recorded ``ray start
        --head`` on this new address; the GCS finds the cluster's state in its folder."""
        self.state = "recovering: preparing its Python environment"
        if not self.retry_environment():
            self.publish("failure.txt", self.environment_error.encode(), overwrite=True)
            return False
        self.state = "recovering: starting Ray from the cluster's saved state"
        commands = json.loads(self.env.get("RAY_CML_SETUP_COMMANDS", "[]"))
        log_path = self.node_dir / "recovery.log"
        steps = [*((c, {}, 1) for c in commands), (record["cmd"], record["env"], RECOVERY_TRIES)]
        for command, extra, tries in steps:
            for attempt in range(1, tries + 1):
                log(f"$ {command}")
                code = self.run_command(command, extra, log_path)
                if code == 0:
                    break
                log(f"recovery: `{command}` failed with exit status {code}: see {log_path}")
                if attempt == tries:
                    failure = "recovery: " + command_failure(command, code, log_path)
                    self.publish("failure.txt", failure.encode(), overwrite=True)
                    return False
                # Ray gives its raylet 30 s to register with the GCS; a recovering GCS on a
                # busy machine can take longer. Stop what started and try again.
                stop_ray_of_this_node(grace_s=5, ray_tmp_dir=self.tmp_dir)
        log("recovered: Ray runs again from the cluster's saved state")
        return True

    def answer_request(self, spec: dict, output: Path) -> int:
        if spec.get("report") == "environment":
            code, text = self.environment_report()
            output.write_text(text)
        elif not RAY_STOP.fullmatch(spec.get("cmd") or "") and self.environment_error:
            code = 1
            output.write_text(self.environment_error + "\n")
        else:
            code = self.write_files(spec.get("files") or [], output)
            if code == 0 and spec.get("cmd"):
                code = self.run_command(spec["cmd"], spec.get("env") or {}, output)
        return code

    def write_files(self, files: list[dict], output: Path) -> int:
        """Write the files a request carries (``~`` is the cluster's HOME): how file mounts
        reach a node without waiting for NFS to show a staged copy."""
        try:
            for item in files:
                path = item["path"]
                if path == "~" or path.startswith("~/"):
                    path = str(self.home) + path[1:]
                target = Path(path) if path.startswith("/") else self.home / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(base64.b64decode(item["data"]))
                if item.get("mode"):
                    target.chmod(int(item["mode"]) & 0o777)
            return 0
        except (OSError, KeyError, ValueError) as exc:
            with open(output, "a") as out:
                out.write(f"ray-cml: could not write the files of the request: {exc}\n")
            return 1

    # ------------------------------------------------------------------ worker

    def start_worker_ray(self) -> bool:
        if self.environment_error:
            # The provider reads this to say why the node failed (`ray status`, monitor.log).
            self.publish("failure.txt", self.environment_error.encode())
            return False
        commands = json.loads(self.env.get("RAY_CML_SETUP_COMMANDS", "[]"))
        commands += json.loads(self.env.get("RAY_CML_START_COMMANDS", "[]"))
        self.state = "starting Ray"
        if not self.run_worker_commands(commands):
            return False
        log("Ray started; watching the head")
        return True

    def run_worker_commands(self, commands: list[str]) -> bool:
        ray_env = {
            "RAY_HEAD_IP": self.env.get("RAY_HEAD_IP", ""),
            "RAY_CLOUD_INSTANCE_ID": self.node_id,
        }
        log_path = self.node_dir / "setup.log"
        for command in commands:
            log(f"$ {command}")
            code = self.run_command(command, ray_env, log_path, watch_head=True)
            if code != 0:
                log(f"command failed with exit status {code}; see {log_path}")
                failure = command_failure(command, code, log_path)
                self.publish("failure.txt", failure.encode(), overwrite=True)
                return False
        return True

    def new_head_address(self) -> tuple[str, int] | None:
        """With head recovery, while the head is unreachable: the address its restarted
        application published, once its GCS answers there (every few seconds, one API
        call); None while there is none."""
        head_id = self.env.get("RAY_CML_HEAD_NODE_ID", "")
        now = time.monotonic()
        if not (self.recovers and head_id) or now < self._next_new_head_check:
            return None
        self._next_new_head_check = now + NEW_HEAD_CHECK_S
        try:
            info = json.loads(
                self.api.download(f"{self.env['RAY_CML_DIR']}/nodes/{head_id}/node.json")
            )
            address = (str(info["ip"]), int(info["gcs_port"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        current = (self.env.get("RAY_HEAD_IP", ""), int(self.env.get("RAY_HEAD_GCS_PORT", "0")))
        if address == current or not self.reachable(*address):
            return None
        return address

    def rejoin(self, ip: str, port: int) -> None:
        """Start this worker's Ray again against the restarted head: the same node (cloud
        instance id) with the same resources. Raises ``HeadGone`` when that fails."""
        log(f"the head is back at {ip}:{port}: starting Ray again against it")
        self.state = "rejoining the restarted head"
        stop_ray_of_this_node(grace_s=5, ray_tmp_dir=self.tmp_dir)
        self.env.update({"RAY_HEAD_IP": ip, "RAY_HEAD_GCS_PORT": str(port)})
        self._head_lost_since = None
        if not self.run_worker_commands(json.loads(self.env.get("RAY_CML_START_COMMANDS", "[]"))):
            raise HeadGone()
        self.state = "running Ray"
        log("Ray started again; watching the head")

    def head_reachable(self) -> bool:
        return self.reachable(
            self.env.get("RAY_HEAD_IP", ""), int(self.env.get("RAY_HEAD_GCS_PORT", "6379"))
        )

    @staticmethod
    def reachable(ip: str, port: int) -> bool:
        try:
            with socket.create_connection((ip, port), timeout=2):
                return True
        except OSError:
            return False

    def delete_own_application(self) -> None:
        """Remove this worker's application, so a lost cluster leaves nothing billing."""
        for _ in range(5):
            try:
                self.api.delete_application_named(self.env.get("RAY_CML_APP_NAME", ""))
                return
            except OSError as exc:
                log(f"could not delete my application yet: {exc}")
                time.sleep(3)

    def open_door(self) -> None:
        """What answers on ``CDSW_APP_PORT`` from now on (the bootstrap's page answered until
        the launcher started): on a head whose environment is ready, the gateway to the
        dashboard and the OpenAI API (``node_gateway``); otherwise the status page."""
        port = int(self.env.get("CDSW_APP_PORT") or 0)
        if not port:
            return
        with self._environment_lock:
            if self.gateway_open:
                return
            if self.door is not None:
                self.door.close()
                self.door = None
            if self.kind == "head" and not self.environment_error:
                self.door = self.open_gateway(port)
                self.gateway_open = self.door is not None
            if self.door is None:
                self.door = node_bootstrap.open_status_page(self.env, self.describe)

    def describe(self) -> str:
        """The status page's line."""
        state = "its Python environment failed" if self.environment_error else self.state
        return node_bootstrap.status_line(self.env, state)

    def open_gateway(self, port: int):
        """The gateway (aiohttp, from the node's environment) on ``port``; None, with one
        line in the log, when it cannot start."""
        try:
            from ray_cml_provider import node_gateway  # aiohttp: only in the environment
        except ImportError as exc:
            log(f"no gateway: {exc}; the node's environment needs ray[default]")
            return None
        limits = node_gateway.Limits(
            idle_s=float(self.env.get("RAY_CML_GATEWAY_IDLE_S") or node_gateway.Limits.idle_s)
        )
        gateway = node_gateway.Gateway(
            # Serve's proxy listens on the head's loopback only (the shipped Serve configs).
            serve=node_gateway.Upstream("127.0.0.1", self.serve_port, "Ray Serve's HTTP proxy"),
            dashboard=node_gateway.Upstream(self.ip, self.dashboard_port, "the Ray dashboard"),
            keys=node_gateway.Keys(self.endpoint_key_path, self.token_path, self.login_bypassed),
            log=log,
            limits=limits,
        )
        try:
            running = node_gateway.RunningGateway(gateway, self.ip, port)
        except OSError as exc:
            log(f"no gateway on port {port}: {exc}")
            return None
        outside = "without CML's login" if self.login_bypassed else "behind CML's login"
        log(
            f"gateway on port {port} ({outside}): /v1 -> Serve 127.0.0.1:{self.serve_port} "
            f"(endpoint key), the rest -> dashboard :{self.dashboard_port}, "
            f"at most {running.max_connections} connections"
        )
        return running

    # ------------------------------------------------------------------ watchdog

    def watch_the_autoscaler(self) -> None:
        """In a thread on the head: restart an autoscaler that stopped updating
        (``node_watchdog``), and publish what was done for ``ray-cml status``."""
        stuck_s = float(self.env.get("RAY_CML_AUTOSCALER_STUCK_S") or node_watchdog.DEFAULT_STUCK_S)
        watchdog = node_watchdog.AutoscalerWatchdog(
            self.tmp_dir, os.getpgrp(), stuck_s, log, node_processes
        )
        while True:
            time.sleep(min(5.0, stuck_s / 4))
            try:
                restart = watchdog.check()
            except Exception as exc:  # the watchdog must outlive anything it meets
                log(f"watchdog: {exc!r}")
                continue
            if restart is None:
                continue
            record = {
                "restarts": watchdog.restarts,
                "last_restart_at": restart.at,
                "stalled_s": round(restart.stalled_s, 1),
                "stacks": "\n".join(restart.stacks.splitlines()[:60]),
            }
            self.publish("autoscaler.json", json.dumps(record).encode(), overwrite=True)

    # ------------------------------------------------------------------ autostop

    def watch_idleness(self) -> None:
        """In a thread: ask ``cluster.idleness`` every few seconds; once the cluster has been
        idle for ``autostop_s``, stop it (``autostop``). Any answer but "idle" (busy, or Ray
        not answering) starts the count again."""
        check_s = max(2.0, min(30.0, self.autostop_s / 4))
        dashboard = f"http://{self.ip}:{self.dashboard_port}"
        idle_since: float | None = None
        log(f"autostop: the cluster stops after {self.autostop_s / 60:g} idle minute(s)")
        while True:
            time.sleep(check_s)
            if self.environment_error:
                continue
            try:
                probe = subprocess.run(
                    [sys.executable, "-m", "ray_cml_provider.cluster.idleness"]
                    + ["--dashboard", dashboard],
                    env=self.command_env(),
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                answer = json.loads(probe.stdout.strip().splitlines()[-1])
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                answer = {"idle": False, "busy": ["the idleness probe failed"]}
            now = time.monotonic()
            if not answer.get("idle"):
                if idle_since is not None:
                    log(f"autostop: busy again ({'; '.join(answer.get('busy') or [])})")
                idle_since = None
                continue
            if idle_since is None:
                idle_since = now
                log("autostop: the cluster is idle")
            if now - idle_since >= self.autostop_s:
                self.autostop(now - idle_since)
                return

    def autostop(self, idle_s: float) -> None:
        """Record why, stop Ray here (its autoscaler would replace workers), then delete every
        application of the cluster, this head last."""
        log(f"autostop: idle for {idle_s:.0f} s: stopping the cluster")
        record = {
            "stopped_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "idle_minutes": round(idle_s / 60, 2),
            "autostop_minutes": self.autostop_s / 60,
            "head": self.node_id,
        }
        rel_dir = self.env["RAY_CML_DIR"]
        try:
            self.api.upload(f"{rel_dir}/{AUTOSTOP_RECORD}", json.dumps(record).encode())
        except OSError as exc:
            log(f"autostop: could not leave the record: {exc}")
        # Ray first: its autoscaler would replace the workers deleted below.
        stop_ray_of_this_node(grace_s=5, ray_tmp_dir=self.tmp_dir)
        own = self.env.get("RAY_CML_APP_NAME", "")
        pattern = re.compile(rf"ray-{re.escape(self.cluster)}-(head|worker)-[0-9a-f]+")
        try:
            others = [n for n in self.api.application_names() if pattern.fullmatch(n)]
        except OSError as exc:
            log(f"autostop: could not list the cluster's applications: {exc}")
            others = []
        for name in sorted(others, key=lambda n: "-head-" in n):  # workers first
            if name != own:
                with contextlib.suppress(OSError):
                    self.api.delete_application_named(name)
        self.delete_own_application()

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        recovery = None
        if self.previous_life():
            recovery = self.recorded_head_start() if self.kind == "head" and self.recovers else None
            if recovery is None:
                log(f"node {self.node_id} was restarted by CML after a failure: removing it")
                self.delete_own_application()
                return 0
            self.begin_new_life()
        try:
            self.prepare()
        except NoToken as exc:
            log(str(exc))
            self.publish("failure.txt", str(exc).encode(), overwrite=True)
            return 1
        self.open_door()
        if self.kind == "head":
            threading.Thread(
                target=self.watch_the_autoscaler, name="autoscaler-watchdog", daemon=True
            ).start()
            if self.autostop_s:
                threading.Thread(target=self.watch_idleness, name="autostop", daemon=True).start()
            if recovery is not None and not self.restart_head_ray(recovery):
                stop_ray_of_this_node(ray_tmp_dir=self.tmp_dir)
                return 1  # FAILED: CML restarts it again, or `ray down` removes it
        try:
            if self.kind == "worker" and not self.start_worker_ray():
                stop_ray_of_this_node(ray_tmp_dir=self.tmp_dir)
                return 1
            self.state = "running Ray"
            while True:
                self.serve_inbox_once()
                if self.kind == "worker" and self.head_gone_too_long():
                    raise HeadGone()
                if self.kind == "worker" and self._head_lost_since is not None:
                    moved = self.new_head_address()
                    if moved:
                        self.rejoin(*moved)
                time.sleep(POLL_S)
        except HeadGone:
            log(f"the head has been gone over {self.head_lost_timeout_s:.0f} s: leaving")
            stop_ray_of_this_node(ray_tmp_dir=self.tmp_dir)
            self.delete_own_application()
            return 0


def command_failure(command: str, code: int, log_path: Path) -> str:
    """What ``failure.txt`` says of a command that failed: the command, its exit status and
    the last lines of its log (the provider shows it in ``ray status`` and ``ray up``)."""
    tail = log_path.read_text(errors="replace").splitlines()[-15:]
    return f"`{command}` failed with exit status {code}:\n" + "\n".join(tail)


def main(argv: list[str]) -> int:
    launcher = NodeLauncher(dict(os.environ))

    def leave(signum: int, _frame: object) -> None:
        # The temporary folder first: CML (or the emulator) may SIGKILL us any moment now.
        shutil.rmtree(launcher.tmp_dir, ignore_errors=True)
        stop_ray_of_this_node(grace_s=1, ray_tmp_dir=launcher.tmp_dir)
        shutil.rmtree(launcher.tmp_dir, ignore_errors=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, leave)
    code = launcher.run()
    shutil.rmtree(launcher.tmp_dir, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
