"""The node launcher's parts in-process (no application, no Ray): the places they write,
which the provider reads through ``contract.py``, the commands' environment, the ports, head
recovery, and ``ray stop``."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ray_cml_provider.contract import (
    NodeFolder,
    NodeInfo,
    RecoveryRecord,
    Request,
    Result,
    auth_token_path,
    cluster_dir,
    gcs_state_path,
)
from ray_cml_provider.node import preparation, processes, recovery
from ray_cml_provider.node.launcher import NodeLauncher
from ray_cml_provider.node.ports import PortReservation
from ray_cml_provider.node.preparation import NoToken, prepare, previous_life, secure_secrets
from tests.conftest import wait_until

TOKEN_FILE = auth_token_path("c1")


def launcher(project, monkeypatch, **env) -> NodeLauncher:
    monkeypatch.chdir(project)
    base = {
        "RAY_CML_CLUSTER": "c1",
        "RAY_CML_NODE_ID": "0123abcd",
        "RAY_CML_NODE_KIND": "worker",
        "RAY_CML_DIR": cluster_dir("c1"),
        "CDSW_IP_ADDRESS": "127.0.0.1",
        "PATH": "/usr/bin",
    }
    return NodeLauncher({**base, **env})


def test_commands_get_the_token_file_and_nothing_else_decides(tmp_path, monkeypatch):
    token = tmp_path / TOKEN_FILE
    token.parent.mkdir(parents=True)
    token.write_text("0" * 64)
    token.chmod(0o644)
    node = launcher(
        tmp_path,
        monkeypatch,
        RAY_CML_AUTH_TOKEN_FILE=TOKEN_FILE,
        # What a node_config could try (validation refuses it; the launcher ignores it too).
        RAY_AUTH_MODE="disabled",
        RAY_AUTH_TOKEN="guess",
    )
    secure_secrets(node.ctx)
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert stat.S_IMODE(token.parent.stat().st_mode) == 0o700
    env = node.commands.env({"RAY_AUTH_MODE": "disabled"})
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == str(token)
    assert "RAY_AUTH_TOKEN" not in env


def test_without_a_token_file_env_ray_is_told_auth_is_off(tmp_path, monkeypatch):
    node = launcher(tmp_path, monkeypatch, RAY_AUTH_TOKEN_PATH="/elsewhere")
    secure_secrets(node.ctx)  # nothing to wait for
    env = node.commands.env()
    assert env["RAY_AUTH_MODE"] == "disabled" and "RAY_AUTH_TOKEN_PATH" not in env


def test_a_token_that_never_shows_fails_the_node_with_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setattr(preparation, "TOKEN_WAIT_S", 0.2)
    node = launcher(tmp_path, monkeypatch, RAY_CML_AUTH_TOKEN_FILE=TOKEN_FILE)
    with pytest.raises(NoToken, match=r"the cluster's Ray token .* is not in the project after"):
        secure_secrets(node.ctx)


def test_the_launcher_writes_where_the_provider_reads(tmp_path, monkeypatch):
    node = launcher(tmp_path, monkeypatch)  # no CML API here: it writes to the mount
    assert node.ctx.folder == NodeFolder.of("c1", "0123abcd")
    prepare(node.ctx, node.ports)
    info = NodeInfo.from_json((tmp_path / NodeFolder.of("c1", "0123abcd").info).read_bytes())
    assert (info.ip, info.gcs_port, info.kind) == ("127.0.0.1", node.ports.gcs, "worker")

    monkeypatch.setattr(preparation, "TOKEN_WAIT_S", 0.2)
    failing = launcher(
        tmp_path, monkeypatch, RAY_CML_NODE_ID="4567cdef", RAY_CML_AUTH_TOKEN_FILE=TOKEN_FILE
    )
    assert failing.run() == 1
    failure = (tmp_path / NodeFolder.of("c1", "4567cdef").failure).read_text()
    assert "the cluster's Ray token" in failure


def test_the_ray_shim_keeps_each_nodes_files_in_its_own_folder(tmp_path, monkeypatch):
    """A worker's `ray start` would use the head's temporary path; nodes sharing a host (the
    emulator) then race for the same socket names. The shim gives it the node's own."""
    node = launcher(tmp_path, monkeypatch)
    prepare(node.ctx, node.ports)
    fake_bin = tmp_path / "fake-bin"
    fake_bin.mkdir()
    (fake_bin / "ray").write_text('#!/bin/bash\necho "ray $*"\n')
    (fake_bin / "ray").chmod(0o755)
    shim = node.ctx.mount(node.ctx.folder.bin) / "ray"
    env = {"PATH": f"{shim.parent}:{fake_bin}:/usr/bin:/bin", "RAY_TMPDIR": "/tmp/rcml-x"}

    def shim_says(*args: str) -> str:
        return subprocess.run(
            [str(shim), *args], env=env, capture_output=True, text=True, check=True
        ).stdout.strip()

    assert shim_says("start", "--address=h:6379") == (
        "ray start --temp-dir=/tmp/rcml-x/ray --address=h:6379"
    )
    assert shim_says("start", "--head", "--temp-dir=/mine") == "ray start --head --temp-dir=/mine"
    assert shim_says("status", "--address", "h") == "ray status --address h"


def test_a_chosen_port_is_held_then_claimed_while_the_node_lives(tmp_path):
    """Two nodes on one machine (the emulator) never choose the same port: the first holds
    it until its own ``ray start``, and claims it for as long as it lives, so the moment
    between releasing it and Ray binding it is no window for the second."""
    claims = tmp_path / "ports"
    first = PortReservation(claims)
    second = PortReservation(claims)
    port = first.take(0)
    assert second.take(port) != port
    with socket.socket() as ray, pytest.raises(OSError):
        ray.bind(("127.0.0.1", port))
    first.release()
    with socket.socket() as ray:
        ray.bind(("127.0.0.1", port))  # this node's Ray can bind it now ...
    assert PortReservation(claims).take(port) != port  # ... and nobody else
    second.release()


def test_a_claim_of_a_node_that_ended_is_taken_over(tmp_path):
    claims = tmp_path / "ports"
    ended = subprocess.Popen(["true"])
    ended.wait()  # its pid no longer runs
    probe = socket.socket()
    probe.bind(("0.0.0.0", 0))
    port = probe.getsockname()[1]
    probe.close()
    (claims / str(port)).mkdir(parents=True)
    (claims / str(port) / "owner.json").write_text(f'{{"pid": {ended.pid}}}')
    reservation = PortReservation(claims)
    assert reservation.take(port) == port
    assert f'"pid": {os.getpid()}' in (claims / str(port) / "owner.json").read_text()
    reservation.release()


def test_a_restarted_head_with_recovery_answers_its_old_lifes_commands_and_starts_ray_again(
    tmp_path, monkeypatch
):
    """provider.head_recovery: the head records the `ray start --head` that worked; its next
    life (CML restarted it) answers what the old life was running instead of running it
    again, publishes its new address, and runs the recorded start with the GCS state's
    folder in the environment."""
    recovering = {"RAY_CML_NODE_KIND": "head", "RAY_CML_HEAD_RECOVERY": "1"}
    first = launcher(tmp_path, monkeypatch, **recovering)
    assert previous_life(first.ctx) is None
    prepare(first.ctx, first.ports)
    start = 'echo "$RAY_gcs_storage $RAY_gcs_storage_path $MARK" > started.txt # ray start --head'
    first.recovery.remember(Request(cmd="ray stop"), 0)  # not a start: not recorded
    first.recovery.remember(Request(cmd=start, env={"MARK": "from ray up"}), 1)  # failed
    assert first.recovery.recorded_start() is None
    first.recovery.remember(Request(cmd=start, env={"MARK": "from ray up"}), 0)
    inbox = first.ctx.mount(first.ctx.folder.inbox)
    (inbox / "17-abc.json").write_text('{"cmd": "echo a job that was running"}')

    second = launcher(tmp_path, monkeypatch, **recovering, CDSW_IP_ADDRESS="127.0.0.9")
    previous = previous_life(second.ctx)
    assert previous is not None and previous.life == 1
    record = second.recovery.recorded_start()
    assert record == RecoveryRecord(start, {"MARK": "from ray up"})
    second.recovery.begin_new_life(previous, second.mailbox)
    folder = second.ctx.folder
    answer = Result.from_bytes((tmp_path / folder.result("17-abc")).read_bytes())
    assert answer is not None and answer.exit_status == 1
    assert b"restarted" in answer.output
    assert "17-abc" in second.mailbox.done  # never run again
    prepare(second.ctx, second.ports)
    info = NodeInfo.from_json((tmp_path / folder.info).read_bytes())
    assert (info.ip, info.life) == ("127.0.0.9", 2)
    assert second.recovery.restart_ray(record)
    gcs_dir = tmp_path / gcs_state_path("c1")  # where the provider deletes a new head's
    assert (tmp_path / "started.txt").read_text().split() == [
        "rocksdb",
        str(gcs_dir),
        "from",
        "ray",
        "up",
    ]

    # A recorded start that fails (Ray gives its raylet 30 s to register; a recovering GCS on
    # a busy machine can take longer) is tried again after Ray's processes are stopped.
    stops = []
    monkeypatch.setattr(recovery, "stop_ray_of_this_node", lambda **kw: stops.append(kw))
    flaky = RecoveryRecord("test -f tried || { touch tried; exit 1; }")
    assert second.recovery.restart_ray(flaky) and len(stops) == 1
    assert not second.recovery.restart_ray(RecoveryRecord("exit 3")) and len(stops) == 1 + 2
    assert "exit status 3" in (tmp_path / folder.failure).read_text()

    # Without recovery, commands get no GCS state, and nothing is recorded.
    plain = launcher(tmp_path, monkeypatch, RAY_CML_NODE_KIND="head", RAY_CML_NODE_ID="89abcdef")
    assert "RAY_gcs_storage" not in plain.commands.env()
    plain.recovery.remember(Request(cmd=start), 0)
    assert plain.recovery.recorded_start() is None


def test_ray_stop_ends_the_nodes_workers_in_their_own_groups_and_forgets_the_address(
    tmp_path, monkeypatch
):
    """Ray's workers (Serve's controller and replicas among them) run in process groups of
    their own: `ray stop` here finds them by the node's Ray folder in their command line,
    and forgets the node's last address as Ray's own `ray stop` does."""
    ray_tmp = tmp_path / "rcml-0123abcd"
    (ray_tmp / "ray").mkdir(parents=True)
    (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.2:6379")
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    group = subprocess.Popen(sleeper, start_new_session=True)  # plays the launcher's group
    worker = subprocess.Popen(
        [*sleeper, f"--session-dir={ray_tmp}/ray/session_1"], start_new_session=True
    )
    other = subprocess.Popen([*sleeper, f"{ray_tmp}-other/ray"], start_new_session=True)
    try:
        monkeypatch.setenv("RAY_CML_LAUNCHER_PGID", str(group.pid))
        processes.stop_ray_of_this_node(grace_s=5, ray_tmp_dir=str(ray_tmp))
        assert group.wait(5) is not None and worker.wait(5) is not None
        assert other.poll() is None  # another node's (a longer name sharing the prefix)
        assert not (ray_tmp / "ray" / "ray_current_cluster").exists()
    finally:
        for process in (group, worker, other):
            process.kill()
            process.wait()


class FakeGCS:
    """A port that answers like a head's GCS (accepts connections) until closed."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]

    def close(self):
        self.sock.close()


def test_ray_stop_outside_a_launcher_ends_no_process_of_the_callers_group(tmp_path, monkeypatch):
    """Without the launcher's group named, the caller's own group is not the node's: a test
    runner's workers share one (a worker thread left by a failed test once ended them)."""
    monkeypatch.delenv("RAY_CML_LAUNCHER_PGID", raising=False)
    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        processes.stop_ray_of_this_node(grace_s=1, ray_tmp_dir=str(tmp_path / "rcml-x"))
        assert sibling.poll() is None
    finally:
        sibling.kill()
        sibling.wait()


def test_a_worker_follows_its_restarted_head_to_its_new_address(tmp_path, monkeypatch):
    """Rejoin on its own (the end-to-end recovery test accepts a replaced worker too): a
    worker whose head went away starts its Ray again against the address the restarted head
    published, the same node with the same commands, and leaves once no head answers."""
    from ray_cml_provider.node import worker as worker_module
    from ray_cml_provider.node.worker import Worker

    first, second = FakeGCS(), FakeGCS()
    joined = tmp_path / "joined.txt"
    node = launcher(
        tmp_path,
        monkeypatch,
        RAY_CML_HEAD_RECOVERY="1",
        RAY_CML_HEAD_NODE_ID="feedbeef",
        RAY_HEAD_IP="127.0.0.1",
        RAY_HEAD_GCS_PORT=str(first.port),
        RAY_CML_HEAD_LOST_TIMEOUT_S="60",
        RAY_CML_START_COMMANDS=json.dumps([f'echo "$RAY_HEAD_IP:$RAY_HEAD_GCS_PORT" >> {joined}']),
    )
    stops, left = [], []
    monkeypatch.setattr(worker_module, "stop_ray_of_this_node", lambda **kw: stops.append(kw))
    monkeypatch.setattr(worker_module, "HEAD_CHECK_S", 0.1)
    monkeypatch.setattr(worker_module, "NEW_HEAD_CHECK_S", 0.1)
    monkeypatch.setattr(node.ctx, "delete_own_application", lambda: left.append(True))
    prepare(node.ctx, node.ports)
    worker = Worker(node.ctx, node.commands, node.mailbox)
    outcome: list[int] = []
    running = threading.Thread(target=lambda: outcome.append(worker.run()), daemon=True)
    running.start()
    wait_until(lambda: joined.exists() and joined.read_text(), 30, "the worker's first start")
    assert joined.read_text().split() == [f"127.0.0.1:{first.port}"]

    first.close()  # the head's engine is gone; CML restarts it on a new address
    wait_until(lambda: worker.head.lost_since is not None, 30, "the head noticed gone")
    head_info = NodeFolder.of("c1", "feedbeef").info
    (tmp_path / head_info).parent.mkdir(parents=True)
    (tmp_path / head_info).write_bytes(
        NodeInfo("feedbeef", "head", "127.0.0.1", second.port, life=2).to_json()
    )
    wait_until(lambda: len(joined.read_text().split()) == 2, 30, "the worker's rejoin")
    assert joined.read_text().split()[1] == f"127.0.0.1:{second.port}"
    wait_until(lambda: node.ctx.state == "running Ray", 30, "the worker running Ray again")
    assert len(stops) == 1 and not left

    node.ctx.spec.head_lost_timeout_s = 0.3
    second.close()  # and now no head answers anywhere: the worker leaves
    running.join(30)
    assert outcome == [0] and left == [True]


def test_a_head_is_its_own_application_port_too():
    """Ray's GCS listens on every address: on one machine another cluster's new head may
    take a dead head's GCS port. The head's application port is bound to its own address:
    when it does not answer, the head is gone, whoever answers on the GCS port."""
    from ray_cml_provider.node.worker import HeadAddress

    gcs, app = FakeGCS(), FakeGCS()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: refused
    try:
        assert HeadAddress("127.0.0.1", gcs.port, app.port).answers()
        assert HeadAddress("127.0.0.1", gcs.port).answers()  # not told the port: GCS only
        assert not HeadAddress("127.0.0.1", gcs.port, closed.getsockname()[1]).answers()
        assert not HeadAddress("127.0.0.1", closed.getsockname()[1], app.port).answers()
    finally:
        for sock in (gcs, app):
            sock.close()
        closed.close()


def test_a_worker_whose_head_goes_away_while_its_ray_starts_leaves(tmp_path, monkeypatch):
    """The head deleted while the worker's `ray start` waits on it: the start is ended and
    the worker deletes its application (it must not fail and stay, billing)."""
    from ray_cml_provider.node import worker as worker_module
    from ray_cml_provider.node.worker import Worker

    head = FakeGCS()
    node = launcher(
        tmp_path,
        monkeypatch,
        RAY_HEAD_IP="127.0.0.1",
        RAY_HEAD_GCS_PORT=str(head.port),
        RAY_CML_HEAD_LOST_TIMEOUT_S="0.3",
        RAY_CML_START_COMMANDS=json.dumps(["sleep 60  # a ray start waiting on its head"]),
    )
    left = []
    monkeypatch.setattr(worker_module, "stop_ray_of_this_node", lambda **kw: None)
    monkeypatch.setattr(worker_module, "HEAD_CHECK_S", 0.1)
    monkeypatch.setattr(node.ctx, "delete_own_application", lambda: left.append(True))
    prepare(node.ctx, node.ports)
    worker = Worker(node.ctx, node.commands, node.mailbox)
    outcome: list[int] = []
    running = threading.Thread(target=lambda: outcome.append(worker.run()), daemon=True)
    running.start()
    wait_until(lambda: node.ctx.state == "starting Ray", 30, "the worker's ray start")
    head.close()
    running.join(30)
    assert outcome == [0] and left == [True]


def test_a_head_runs_the_prometheus_it_is_given_on_rays_config_on_its_loopback(
    tmp_path, monkeypatch
):
    fake = tmp_path / "bin" / "prometheus"  # records how it was started
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/prometheus.args\nsleep 30\n')
    fake.chmod(0o755)
    head = {"RAY_CML_NODE_KIND": "head", "RAY_CML_NODE_ID": "0123abce"}
    off = launcher(tmp_path, monkeypatch, **head, RAY_CML_HEAD_PROMETHEUS="off")
    assert off.prometheus is None and off.ports.prometheus == 0
    assert "RAY_PROMETHEUS_HOST" not in off.commands.env()
    off.reservation.release()
    # auto: the prometheus on the runtime's PATH (here: the fake's folder).
    node = launcher(tmp_path, monkeypatch, **head, PATH=f"{fake.parent}:/usr/bin")
    try:
        assert node.prometheus is not None and node.prometheus.binary == str(fake)
        port = node.ports.prometheus
        assert port and node.commands.env()["RAY_PROMETHEUS_HOST"] == f"http://127.0.0.1:{port}"
        config = tmp_path / "rcml" / "ray/session_latest/metrics/prometheus/prometheus.yml"
        config.parent.mkdir(parents=True)
        config.write_text("scrape_configs: []\n")
        node.ctx.tmp_dir = str(tmp_path / "rcml")
        node.prometheus.start()
        args = wait_until(
            lambda: (
                (tmp_path / "prometheus.args").exists()
                and (tmp_path / "prometheus.args").read_text()
            ),
            10,
            "the head's Prometheus to start",
        )
        assert f"--config.file={config.resolve()}" in args
        assert f"--web.listen-address=127.0.0.1:{port}" in args
        assert "--storage.tsdb.retention.size=256MB" in args
    finally:
        node.reservation.release()
        if node.prometheus and node.prometheus.process:
            node.prometheus.process.kill()
            node.prometheus.process.wait()
    # A node_config that names its own Prometheus keeps it.
    own = launcher(
        tmp_path,
        monkeypatch,
        **head,
        PATH=f"{fake.parent}:/usr/bin",
        RAY_PROMETHEUS_HOST="http://prometheus.example:9090",
    )
    own.reservation.release()
    assert own.commands.env()["RAY_PROMETHEUS_HOST"] == "http://prometheus.example:9090"


def test_the_node_clears_its_mailbox_the_caller_deletes_nothing(tmp_path, monkeypatch):
    """A request is removed once its result is published; a result nobody fetched in
    RESULT_KEPT_S (its caller gave up) goes with the next answer."""
    node = launcher(tmp_path, monkeypatch, RAY_CML_NODE_ID="0123abcf")
    prepare(node.ctx, node.ports)
    folder = node.ctx.folder
    forgotten = tmp_path / folder.result("1-old")
    forgotten.parent.mkdir(parents=True, exist_ok=True)
    forgotten.write_bytes(Result(0, b"nobody came").to_bytes())
    long_ago = time.time() - NodeFolder.RESULT_KEPT_S - 60
    os.utime(forgotten, (long_ago, long_ago))
    recent = tmp_path / folder.result("2-recent")
    recent.write_bytes(Result(0).to_bytes())
    (tmp_path / folder.request("3-new")).write_text('{"cmd": "echo answered"}')
    node.mailbox.serve_once()
    result = wait_until(
        lambda: Result.from_bytes(_read(tmp_path / folder.result("3-new"))), what="the result"
    )
    assert result == Result(0, b"answered\n")
    wait_until(lambda: not (tmp_path / folder.request("3-new")).exists(), what="cleared")
    assert not forgotten.exists() and recent.exists()


def _read(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""
