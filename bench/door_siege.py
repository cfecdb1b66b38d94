"""The head's door under attack, class by class, on a real cluster on the emulator: how fast
the owner is answered meanwhile, and what the head holds. Prints numbers; asserts nothing.

    .venv/bin/python bench/door_siege.py [--seconds 10] [--classes pivot,pools,...]

``ray up`` (behind CML's login, the default), the echo Serve application (its replica on
the head), then each attack for ``--seconds`` from a process of its own, as another engine
of the workspace dialling the head engine's address and application port directly:

- ``pivot``: ``CONNECT``, absolute URLs and ``@host`` targets aimed at the head's loopback;
- ``pools``: 48 callers without a credential fetching the dashboard's biggest page and never
  reading it, and 300 keyed callers trickling /v1 bodies a byte a second;
- ``heads``: request heads that never end, 16 kB fields one after another;
- ``cap``: silent connections past the gateway's cap (the head's is set to 512 here);
- ``websocket``: websocket handshakes without a key, with Ray's token;
- ``flood``: the cap held, and hundreds of connections a second opened and closed past it;
- ``metrics``: four scrapers of ``/metrics`` back to back, with the metrics key.

First no attack (``none``: what this machine gives the owner now), then each class.
Meanwhile the owner asks, every half second, what ``ray-cml status`` asks (CML's listing
and the head's GCS), a keyed ``/v1`` call of the echo app, and now and then submits a Ray
job through the head's port with Ray's token. Per class: the attack's rate, how many
attacks were let through (``relayed``), the owner's answer times (p50 / max, s), and the
gateway process's memory (before, peak). ``tests/test_door_under_attack.py`` runs this
with a real cluster and holds every answer under 2 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests

CLASSES = ("pivot", "pools", "heads", "cap", "websocket", "flood", "metrics")
BASELINE = "none"  # the owner's answers with no attack: what this machine gives now
CAP = 512  # the head's gateway cap during the siege (RAY_CML_GATEWAY_MAX_CONNECTIONS)


@dataclass(frozen=True)
class Door:
    """The head's application port, as a workspace engine dials it, and what each caller
    holds (the attacker: only the model callers' key; the owner: Ray's token too)."""

    host: str
    port: int
    endpoint_key: str
    ray_token: str
    metrics_key: str
    pid: int = 0  # the head's launcher (its application's process group leader: the
    # bootstrap execs it), which runs the gateway: its memory is measured

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


# ------------------------------------------------------------------------ the attacker


class Attack:
    """One class of attack, until ``until``; ``sent`` and ``relayed`` are its figures."""

    def __init__(self, door: Door, until: float) -> None:
        self.door, self.until = door, until
        self.sent = 0
        self.relayed = 0  # answers that show the attack got past the door

    def running(self) -> bool:
        return time.monotonic() < self.until

    def connect(self, timeout: float = 5.0) -> socket.socket | None:
        try:
            return socket.create_connection((self.door.host, self.door.port), timeout=timeout)
        except OSError:
            return None

    def ask(self, data: bytes, wait_s: float = 3.0) -> bytes:
        sock = self.connect()
        if sock is None:
            return b""
        with sock:
            self.sent += 1
            try:
                sock.sendall(data)
                sock.settimeout(wait_s)
                received = b""
                while len(received) < 4096 and (chunk := sock.recv(4096)):
                    received += chunk
                return received
            except OSError:
                return b""

    def pace(self, per_s: float) -> None:
        time.sleep(1 / per_s)


def status_of(answer: bytes) -> str:
    parts = answer.split(b" ", 2)
    return parts[1].decode(errors="replace") if len(parts) > 1 else ""


def pivot(attack: Attack) -> None:
    token = f"Authorization: Bearer {attack.door.ray_token}\r\n".encode()
    targets = [b"127.0.0.1:6379", b"http://127.0.0.1:22/", b"@127.0.0.1:8265/api/jobs/", b"*"]
    i = 0
    while attack.running():
        target = targets[i % len(targets)]
        method = b"CONNECT" if i % 2 == 0 else b"GET"
        answer = attack.ask(method + b" " + target + b" HTTP/1.1\r\nHost: x\r\n" + token + b"\r\n")
        if status_of(answer) not in ("", "400", "401"):
            attack.relayed += 1
        i += 1
        attack.pace(20)


def biggest_page(door: Door) -> str:
    """The dashboard's biggest static file (its JavaScript bundle, ~6.6 MB), from its index."""
    with contextlib.suppress(requests.RequestException):
        index = requests.get(f"{door.url}/", timeout=10).text
        scripts = re.findall(r'src="\.?(/?static/js/[^"]+\.js)"', index)
        if scripts:
            return "/" + scripts[0].lstrip("/")
    return "/"


def pools(attack: Attack) -> None:
    """48 callers without a credential that never read; 300 keyed callers trickling bodies
    (more than the 256 connections to Ray that every caller once shared)."""
    page = biggest_page(attack.door).encode()
    key = attack.door.endpoint_key.encode()
    readers: list[socket.socket] = []
    tricklers: list[socket.socket] = []
    while attack.running():
        readers = [s for s in readers if s.fileno() >= 0]
        while len(readers) < 48:
            sock = attack.connect()
            if sock is None:
                break
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            with contextlib.suppress(OSError):
                sock.sendall(b"GET " + page + b" HTTP/1.1\r\nHost: x\r\n\r\n")
                attack.sent += 1
            readers.append(sock)
        while len(tricklers) < 300:
            sock = attack.connect()
            if sock is None:
                break
            with contextlib.suppress(OSError):
                sock.sendall(
                    b"POST /v1/echo HTTP/1.1\r\nHost: x\r\nX-Endpoint-Key: %s\r\n"
                    b"Content-Length: 1000000\r\n\r\n" % key
                )
                attack.sent += 1
            tricklers.append(sock)
        kept = []
        for sock in tricklers:
            try:
                sock.send(b"a")
                kept.append(sock)
            except OSError:
                sock.close()  # cut by the door: another takes its place
        tricklers = kept
        time.sleep(1.0)
    for sock in readers + tricklers:
        sock.close()


def heads(attack: Attack) -> None:
    """Heads of 16 kB fields that never end (98 of them: aiohttp's own caps allow that), on
    up to 300 connections, 50 new ones a second at most; ``relayed``: heads the door let grow
    to their end (1.6 MB each)."""
    field_line = b"X-Pad: " + b"a" * 16000 + b"\r\n"
    open_heads: dict[socket.socket, int] = {}
    while attack.running():
        for _ in range(min(10, 300 - len(open_heads))):
            sock = attack.connect()
            if sock is None:
                break
            sock.settimeout(1.0)
            with contextlib.suppress(OSError):
                sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
            open_heads[sock] = 0
            attack.sent += 1
        answered, _, _ = select.select(list(open_heads), [], [], 0)
        for sock in answered:  # an answer (431, 400) or the close: cut by the door
            sock.close()
            del open_heads[sock]
        for sock, fields in list(open_heads.items()):
            if fields == 98:
                attack.relayed += 1
                sock.close()
                del open_heads[sock]
                continue
            try:
                sock.sendall(field_line)
                open_heads[sock] = fields + 1
            except OSError:
                sock.close()
                del open_heads[sock]
        time.sleep(0.2)
    for sock in open_heads:
        sock.close()


def hold_silent(attack: Attack, most: int, per_s: float) -> list[socket.socket]:
    """Keep ``most`` silent connections open, reopening those the door closes."""
    held: list[socket.socket] = []
    last = time.monotonic()
    while attack.running():
        alive = []
        for sock in held:
            try:
                sock.setblocking(False)
                if sock.recv(1) == b"":
                    sock.close()
                    continue
            except BlockingIOError:
                pass
            except OSError:
                sock.close()
                continue
            alive.append(sock)
        held = alive
        budget = int((time.monotonic() - last) * per_s) or 1
        last = time.monotonic()
        for _ in range(min(budget, most - len(held))):
            sock = attack.connect(timeout=2)
            if sock is not None:
                held.append(sock)
                attack.sent += 1
        yield held
        time.sleep(0.1)
    for sock in held:
        sock.close()


def cap(attack: Attack) -> None:
    for _ in hold_silent(attack, CAP + 100, per_s=400):
        pass


def flood(attack: Attack) -> None:
    """The cap held, and connections opened and closed past it as fast as 300 a second."""
    churn_started = time.monotonic()
    churned = 0
    for _ in hold_silent(attack, CAP + 100, per_s=400):
        due = int((time.monotonic() - churn_started) * 300) - churned
        for _ in range(max(0, min(due, 100))):
            sock = attack.connect(timeout=2)
            if sock is not None:
                sock.close()
                attack.sent += 1
            churned += 1


def websocket(attack: Attack) -> None:
    token = f"Authorization: Bearer {attack.door.ray_token}\r\n".encode()
    while attack.running():
        answer = attack.ask(
            b"GET /api/v0/logs/stream HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n" + token + b"\r\n"
        )
        if status_of(answer) == "101":
            attack.relayed += 1
        attack.pace(50)


def metrics(attack: Attack) -> None:
    headers = {"Authorization": f"Bearer {attack.door.metrics_key}"}

    def scrape() -> None:
        with requests.Session() as session:
            while attack.running():
                with contextlib.suppress(requests.RequestException):
                    session.get(f"{attack.door.url}/metrics", headers=headers, timeout=10)
                    attack.sent += 1

    scrapers = [threading.Thread(target=scrape) for _ in range(4)]
    for thread in scrapers:
        thread.start()
    for thread in scrapers:
        thread.join()


def none(attack: Attack) -> None:
    while attack.running():
        attack.sent += 1
        time.sleep(0.1)


ATTACKS = {
    BASELINE: none,
    "pivot": pivot,
    "pools": pools,
    "heads": heads,
    "cap": cap,
    "websocket": websocket,
    "flood": flood,
    "metrics": metrics,
}


def attack_main(name: str, door_file: Path, seconds: float) -> None:
    """The attacker's process: one class for ``seconds``, its figures as JSON on stdout."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    door = Door(**json.loads(door_file.read_text()))
    attack = Attack(door, time.monotonic() + seconds)
    ATTACKS[name](attack)
    print(json.dumps({"sent": attack.sent, "relayed": attack.relayed}), flush=True)


# ------------------------------------------------------------------------ the owner


@dataclass
class Figures:
    attack: str
    seconds: float
    sent: int = 0
    relayed: int = 0
    answers: dict[str, list[float]] = field(default_factory=dict)  # probe -> seconds each
    failures: dict[str, list[str]] = field(default_factory=dict)
    rss_before_mb: float = 0.0
    rss_peak_mb: float = 0.0

    def worst(self) -> float:
        return max((max(times) for times in self.answers.values() if times), default=0.0)

    def line(self) -> str:
        probes = "  ".join(
            f"{name} {statistics.median(times):.2f}/{max(times):.2f}"
            for name, times in sorted(self.answers.items())
            if times
        )
        failed = sum(len(v) for v in self.failures.values())
        return (
            f"{self.attack:9s} {self.sent / self.seconds:7.0f}/s relayed {self.relayed}  "
            f"owner p50/max s: {probes}  failed {failed}  "
            f"gateway memory {self.rss_before_mb:.0f} -> peak {self.rss_peak_mb:.0f} MB"
        )


def rss_mb(pid: int | None) -> float:
    if pid is None:
        return 0.0
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Owner:
    """What the cluster's owner asks while the door is attacked, each answer timed."""

    def __init__(self, door: Door, status: Callable[[], None], echo_path: str = "/v1/echo") -> None:
        self.door = door
        self.status = status  # () -> None: what `ray-cml status` asks
        self.echo_path = echo_path

    def v1(self) -> None:
        answer = requests.get(
            f"{self.door.url}{self.echo_path}?say=owner",
            headers={"X-Endpoint-Key": self.door.endpoint_key},
            timeout=10,
        )
        assert answer.status_code == 200, (answer.status_code, answer.text[:200])

    def job_submit(self) -> None:
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(
            self.door.url, headers={"Authorization": f"Bearer {self.door.ray_token}"}
        )
        client.submit_job(entrypoint="true")

    def probe(self, figures: Figures, name: str, call) -> None:
        started = time.monotonic()
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - a failed answer is a figure too
            figures.failures.setdefault(name, []).append(f"{type(exc).__name__}: {exc}"[:300])
        figures.answers.setdefault(name, []).append(time.monotonic() - started)


def siege(door: Door, status, name: str, seconds: float) -> Figures:
    """One attack class from a process of its own while the owner asks; its figures."""
    figures = Figures(name, seconds)
    owner = Owner(door, status)
    pid = door.pid or None
    figures.rss_before_mb = figures.rss_peak_mb = rss_mb(pid)
    with tempfile.TemporaryDirectory(prefix="siege-") as work:
        door_file = Path(work) / "door.json"
        door_file.write_text(json.dumps(door.__dict__))
        door_file.chmod(0o600)
        attacker = subprocess.Popen(
            [sys.executable, __file__, "--attack", name, "--door-file", str(door_file)]
            + ["--seconds", str(seconds)],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            time.sleep(min(2.0, seconds / 4))  # the attack under way first
            started = time.monotonic()
            jobs_due = [started + 0.5, started + seconds / 2]
            while attacker.poll() is None and time.monotonic() - started < seconds + 30:
                owner.probe(figures, "status", owner.status)
                owner.probe(figures, "v1", owner.v1)
                if jobs_due and time.monotonic() >= jobs_due[0]:
                    jobs_due.pop(0)
                    owner.probe(figures, "job_submit", owner.job_submit)
                figures.rss_peak_mb = max(figures.rss_peak_mb, rss_mb(pid))
                time.sleep(0.5)
            out, _ = attacker.communicate(timeout=60)
            result = json.loads(out.strip().splitlines()[-1])
            figures.sent, figures.relayed = result["sent"], result["relayed"]
        finally:
            if attacker.poll() is None:
                os.killpg(attacker.pid, 9)
                attacker.wait()
    return figures


# ------------------------------------------------------------------------ the cluster


def siege_config(serve_port: int):
    """The cluster's config edit: Serve's port of this run, the siege's cap."""

    def edit(config: dict) -> None:
        head = config["available_node_types"]["head"]["node_config"]
        head["environment"]["RAY_CML_SERVE_PORT"] = str(serve_port)
        head["environment"]["RAY_CML_GATEWAY_MAX_CONNECTIONS"] = str(CAP)

    return edit


def door_of(cluster, emulator) -> Door:
    """The head engine's address and port, and the cluster's keys (read as its owner)."""
    from ray_cml_provider.provider.metrics_key import read_metrics_key

    [head] = cluster.nodes("head")
    engine = next(p for p in emulator.processes() if p["id"] == head.id)
    key = cluster.ray_cml("endpoint-key", str(cluster.config_path)).stdout.strip()
    return Door(
        host=engine["ip_address"],
        port=int(engine["app_port"]),
        endpoint_key=key,
        ray_token=cluster.ray_token() or "",
        metrics_key=read_metrics_key(cluster.client, cluster.cluster_name) or "",
        pid=int(engine.get("pgid") or 0),
    )


def status_probe(cluster):
    """What ``ray-cml status CONFIG`` asks: CML's listing and Ray's view from the GCS."""
    from ray_cml_provider.cluster.status import collect_status
    from ray_cml_provider.provider.config import load_cluster_config

    config = load_cluster_config(cluster.config_path)

    def ask() -> None:
        report = collect_status(config, cluster.client, "auto")
        assert report.head is not None and report.ray_view == "direct", report.ray_view_note

    return ask


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--classes", default=",".join(CLASSES))
    parser.add_argument("--each", action="store_true", help="print every answer's time too")
    parser.add_argument("--attack", choices=list(ATTACKS), help=argparse.SUPPRESS)
    parser.add_argument("--door-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.attack:
        attack_main(args.attack, args.door_file, args.seconds)
        return 0

    from ray_cml_provider.demo.echo_app import serve_config
    from ray_cml_provider.demo.local_cluster import LocalCluster
    from ray_cml_provider.emulator.harness import RunningEmulator

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        serve_port = sock.getsockname()[1]
    with (
        tempfile.TemporaryDirectory(prefix="siege-") as work,
        RunningEmulator(extra_args=["--stop-grace-s", "1"]) as emulator,
    ):
        cluster = LocalCluster(
            emulator, Path(work), cluster_name="siege", config_overrides=siege_config(serve_port)
        )
        try:
            if cluster.up().returncode != 0:
                print("ray up failed")
                return 1
            echo = serve_config(port=serve_port, gpus=0)
            if cluster.serve_deploy(echo, "echo.yaml").returncode:
                print("serve deploy failed")
                return 1
            cluster.wait_for_serve_app("echo", 300)
            door = door_of(cluster, emulator)
            print(f"door {door.host}:{door.port}; {args.seconds:.0f} s per class", flush=True)
            for name in [BASELINE, *args.classes.split(",")]:
                figures = siege(door, status_probe(cluster), name, args.seconds)
                print(figures.line(), flush=True)
                if args.each:
                    for probe, times in sorted(figures.answers.items()):
                        print(f"  {probe}: " + " ".join(f"{t:.2f}" for t in times), flush=True)
        finally:
            cluster.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
