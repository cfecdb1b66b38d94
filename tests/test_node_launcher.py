"""The node launcher in-process (no application, no Ray): the places it writes, which the
provider reads by ``provider/naming.py`` (the launcher is standard library only and cannot
import it), and its Ray authentication settings."""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ray_cml_provider import node_bootstrap, node_launcher
from ray_cml_provider.node_launcher import NodeLauncher, NoToken
from ray_cml_provider.provider.naming import (
    APPLICATION_ENV,
    BOOTSTRAP_ENV,
    COMMAND_ENV,
    auth_token_path,
    cluster_dir,
    gcs_state_path,
    node_dir,
    node_failure_path,
    node_info_path,
)

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
    node.secure_token()
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert stat.S_IMODE(token.parent.stat().st_mode) == 0o700
    env = node.command_env({"RAY_AUTH_MODE": "disabled"})
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == str(token)
    assert "RAY_AUTH_TOKEN" not in env


def test_without_a_token_file_env_ray_is_told_auth_is_off(tmp_path, monkeypatch):
    node = launcher(tmp_path, monkeypatch, RAY_AUTH_TOKEN_PATH="/elsewhere")
    node.secure_token()  # nothing to wait for
    env = node.command_env()
    assert env["RAY_AUTH_MODE"] == "disabled" and "RAY_AUTH_TOKEN_PATH" not in env


def test_a_token_that_never_shows_fails_the_node_with_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setattr(node_launcher, "TOKEN_WAIT_S", 0.2)
    node = launcher(tmp_path, monkeypatch, RAY_CML_AUTH_TOKEN_FILE=TOKEN_FILE)
    with pytest.raises(NoToken, match=r"the cluster's Ray token .* is not in the project after"):
        node.secure_token()


def test_the_launcher_writes_where_the_provider_reads(tmp_path, monkeypatch):
    node = launcher(tmp_path, monkeypatch)  # no CML API here: it writes to the mount
    assert node.node_rel == node_dir("c1", "0123abcd")
    node.prepare()
    assert (tmp_path / node_info_path("c1", "0123abcd")).is_file()

    monkeypatch.setattr(node_launcher, "TOKEN_WAIT_S", 0.2)
    failing = launcher(
        tmp_path, monkeypatch, RAY_CML_NODE_ID="4567cdef", RAY_CML_AUTH_TOKEN_FILE=TOKEN_FILE
    )
    assert failing.run() == 1
    failure = (tmp_path / node_failure_path("c1", "4567cdef")).read_text()
    assert "the cluster's Ray token" in failure


def test_the_node_side_reads_and_sets_exactly_the_named_variables():
    source = "".join(Path(m.__file__).read_text() for m in (node_launcher, node_bootstrap))
    used = set(re.findall(r"RAY_CML_[A-Z_]+", source))
    assert used == set(APPLICATION_ENV) | set(COMMAND_ENV) | set(BOOTSTRAP_ENV)
    assert set(node_bootstrap.HANDOFF) == set(BOOTSTRAP_ENV)


def test_the_ray_shim_keeps_each_nodes_files_in_its_own_folder(tmp_path, monkeypatch):
    """A worker's `ray start` would use the head's temporary path; nodes sharing a host (the
    emulator) then race for the same socket names. The shim gives it the node's own."""
    node = launcher(tmp_path, monkeypatch)
    node.prepare()
    fake_bin = tmp_path / "fake-bin"
    fake_bin.mkdir()
    (fake_bin / "ray").write_text('#!/bin/bash\necho "ray $*"\n')
    (fake_bin / "ray").chmod(0o755)
    shim = node.node_dir / "bin" / "ray"
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
    first = node_launcher.PortReservation(claims)
    second = node_launcher.PortReservation(claims)
    port = first.take(0)
    assert second.take(port) != port
    with socket.socket() as ray, pytest.raises(OSError):
        ray.bind(("127.0.0.1", port))
    first.release()
    with socket.socket() as ray:
        ray.bind(("127.0.0.1", port))  # this node's Ray can bind it now ...
    assert node_launcher.PortReservation(claims).take(port) != port  # ... and nobody else
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
    (claims / str(port) / "pid").write_text(str(ended.pid))
    reservation = node_launcher.PortReservation(claims)
    assert reservation.take(port) == port
    assert (claims / str(port) / "pid").read_text() == str(os.getpid())
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
    first.prepare()
    start = 'echo "$RAY_gcs_storage $RAY_gcs_storage_path $MARK" > started.txt # ray start --head'
    first.remember_head_start({"cmd": "ray stop", "env": {}})  # not a start: not recorded
    first.remember_head_start({"cmd": start, "env": {"MARK": "from ray up"}})
    (first.inbox / "17-abc.json").write_text('{"cmd": "echo a job that was running"}')

    second = launcher(tmp_path, monkeypatch, **recovering, CDSW_IP_ADDRESS="127.0.0.9")
    assert second.previous_life()
    record = second.recorded_head_start()
    assert record == {"cmd": start, "env": {"MARK": "from ray up"}}
    second.begin_new_life()
    assert (second.outbox / "17-abc.rc").read_text() == "1"
    assert "restarted" in (second.outbox / "17-abc.out").read_text()
    assert "17-abc" in second.done  # never run again
    second.prepare()
    info = (tmp_path / node_info_path("c1", "0123abcd")).read_text()
    assert '"ip": "127.0.0.9"' in info and '"life": 2' in info
    assert second.restart_head_ray(record)
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
    monkeypatch.setattr(node_launcher, "stop_ray_of_this_node", lambda **kw: stops.append(kw))
    flaky = {"cmd": "test -f tried || { touch tried; exit 1; }", "env": {}}
    assert second.restart_head_ray(flaky) and len(stops) == 1
    never = {"cmd": "exit 3", "env": {}}
    assert not second.restart_head_ray(never) and len(stops) == 1 + 2
    assert "exit status 3" in (second.node_dir / "failure.txt").read_text()

    # Without recovery, commands get no GCS state (and a restarted node removes itself).
    plain = launcher(tmp_path, monkeypatch, RAY_CML_NODE_KIND="head")
    assert "RAY_gcs_storage" not in plain.command_env()


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
        node_launcher.stop_ray_of_this_node(grace_s=5, ray_tmp_dir=str(ray_tmp))
        assert group.wait(5) is not None and worker.wait(5) is not None
        assert other.poll() is None  # another node's (a longer name sharing the prefix)
        assert not (ray_tmp / "ray" / "ray_current_cluster").exists()
    finally:
        for process in (group, worker, other):
            process.kill()
            process.wait()
