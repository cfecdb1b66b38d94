"""End to end with real Ray processes on the emulator: what a user does with Ray's own CLI.

Two purposeful runs (Ray is heavy on a 2-core machine): the main flow on autoscaler v2, and
failure handling on autoscaler v1.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
from pathlib import Path

import pytest

from ray_cml_provider.cml import ApplicationStatus
from ray_cml_provider.contract import CommandVar
from ray_cml_provider.demo.local_cluster import LocalCluster
from ray_cml_provider.demo.ray_demo import GPU_TASK
from ray_cml_provider.emulator.processes import live_group_members
from tests.conftest import wait_until

pytestmark = pytest.mark.e2e

SET_GPU_DEMAND = Path(__file__).resolve().parent.parent / "bench" / "set_gpu_demand.py"
RUNNING = ApplicationStatus.RUNNING


def autoscaler_pid(pgid: int) -> int:
    """The head's autoscaler (Ray's monitor.py) among the head engine's processes."""
    for pid in live_group_members(pgid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"/monitor.py") for a in argv):
            return pid
    raise AssertionError("no autoscaler among the head's processes")


def engine(emulator, app_id: str) -> dict:
    return next(p for p in emulator.processes() if p["id"] == app_id)


def assert_secrets_nowhere(
    cluster: LocalCluster, outputs: list[str], token: str, nodes_alive: bool = True
) -> None:
    """The user's API key is in no application, project file, engine log, Ray log of a live
    node, or CLI output; nor are the cluster's Ray token and its metrics key, outside their
    own files."""
    auth = cluster.emulator.project_dir / ".ray-cml" / cluster.cluster_name / "auth"
    secrets = {"key": cluster.emulator.api_key, "Ray token": token}
    if (auth / "metrics_key").exists():
        secrets["metrics key"] = (auth / "metrics_key").read_text().strip()
    own_files = {auth / "token", auth / "metrics_key"}
    for app in cluster.applications():
        for what, secret in secrets.items():
            assert secret not in json.dumps(app.raw), f"{what} in application {app.name}"
    places = [cluster.emulator.project_dir, cluster.emulator.log_dir]
    places += [Path(f"/tmp/rcml-{a.name.rsplit('-', 1)[-1]}") for a in cluster.applications()]
    checked = 0
    for place in places:
        for path in (p for p in place.rglob("*") if p.is_file() and not p.is_symlink()):
            checked += 1
            data = path.read_bytes()
            for what, secret in secrets.items():
                if path not in own_files:
                    assert secret.encode() not in data, f"{what} in {path}"
    if nodes_alive:
        assert checked > 10, f"the sweep should have read the nodes' logs: {places}"
    for output in outputs:
        for what, secret in secrets.items():
            assert secret not in output, f"{what} in a command's output"


def status_json(cluster: LocalCluster, *options: str) -> dict:
    result = cluster.ray_cml("status", "--json", *options, str(cluster.config_path))
    assert result.returncode == 0, result.stdout
    return json.loads(result.stdout[result.stdout.index("{") :])


def submit_job(cluster: LocalCluster, python_code: str) -> subprocess.CompletedProcess:
    """``ray job submit -- python -c CODE`` on the head, waiting for its end; tried again
    while Ray's job server has no agent yet ("No available agent to submit job")."""
    address = f'"http://$CDSW_IP_ADDRESS:${CommandVar.DASHBOARD_PORT}"'
    command = f"ray job submit --address {address} -- python -c {shlex.quote(python_code)}"

    def submitted() -> subprocess.CompletedProcess | None:
        result = cluster.exec(command)
        return None if "No available agent to submit job" in result.stdout else result

    return wait_until(submitted, 120, "Ray's job server to have an agent")


def assert_nothing_left(cluster: LocalCluster, pgids: set[int]) -> None:
    assert cluster.applications() == []
    cluster.wait_for(lambda: cluster.emulator.processes() == [], 30, "engines to end")
    leftovers = {pgid: live_group_members(pgid) for pgid in pgids}
    assert not any(leftovers.values()), f"processes left after ray down: {leftovers}"


@pytest.mark.timeout(600)
def test_up_gpu_task_scales_a_worker_up_and_to_zero_then_down(start_emulator, tmp_path):
    emulator = start_emulator()

    def idle_for_a_minute(config: dict) -> None:
        # The checks below want the GPU worker still there, idle: a minute covers them even
        # on a machine busy with other tests (the shipped 15 s is tight there).
        config["idle_timeout_minutes"] = 1
        # The autoscaler is frozen below: the head's watchdog restarts it after 10 s.
        head = config["available_node_types"]["head"]["node_config"]
        head.setdefault("environment", {})["RAY_CML_AUTOSCALER_STUCK_S"] = "10"
        head["environment"]["RAY_CML_HISTORY_EVERY_S"] = "10"  # the history's snapshots

    cluster = LocalCluster(
        emulator, tmp_path / "work", cluster_name="e2e", config_overrides=idle_for_a_minute
    )
    pgids: set[int] = set()

    up = cluster.up()
    assert up.returncode == 0, up.stdout[-3000:]
    token = cluster.ray_token()  # Ray's token authentication is on by default
    assert token
    [head] = cluster.applications()
    assert head.name.startswith("ray-e2e-head-") and head.status == RUNNING
    # ray up shows what it waits for, then where the dashboard is and how to connect.
    assert re.search(rf"ray-cml: head application {head.name} is RUNNING \(\d+\.\d s\)", up.stdout)
    assert "the head's Ray started on" in up.stdout and "Ray Jobs:" in up.stdout
    assert head.nvidia_gpu == 0
    head_engine = engine(emulator, head.id)
    pgids.add(head_engine["pgid"])

    head_ip = cluster.ray("get-head-ip", str(cluster.config_path))
    assert head_ip.stdout.strip().splitlines()[-1] == head_engine["ip_address"]

    exec_result = cluster.exec("echo from-head $CDSW_IP_ADDRESS; exit 5")
    assert exec_result.returncode == 5
    assert f"from-head {head_engine['ip_address']}" in exec_result.stdout

    attach = cluster.ray("attach", str(cluster.config_path))
    assert attach.returncode != 0 and "ray attach is not available on CML" in attach.stdout

    # A frozen autoscaler (as one stuck in a call) is found by the head and started again;
    # the GPU task below then gets its worker from the new one.
    frozen = autoscaler_pid(head_engine["pgid"])
    os.kill(frozen, signal.SIGSTOP)
    restarts = wait_until(
        lambda: status_json(cluster, "--cml-only").get("autoscaler_restarts"),
        90,
        "the head to restart its frozen autoscaler",
    )
    assert restarts["restarts"] == 1 and restarts["stalled_s"] >= 10
    assert not Path(f"/proc/{frozen}").exists()  # the stuck one is gone, not left running
    assert autoscaler_pid(head_engine["pgid"]) != frozen
    submitted = cluster.submit(GPU_TASK)
    assert submitted.returncode == 0, submitted.stdout[-3000:]
    [worker] = cluster.workers()
    # Ray ran the task as soon as the worker's raylet joined, maybe while CML still said
    # STARTING (the emulator's start takes 8 s); CML reports it RUNNING soon after.
    assert worker.status in ApplicationStatus.LIVE and worker.nvidia_gpu == 1
    cluster.wait_for(
        lambda: [w.status for w in cluster.workers()] == [RUNNING], 30, "the worker RUNNING"
    )
    worker_engine = engine(emulator, worker.id)
    pgids.add(worker_engine["pgid"])
    ran_on = re.search(r"GPU task ran on \{'node_ip': '([\d.]+)'", submitted.stdout)
    assert ran_on and ran_on.group(1) == worker_engine["ip_address"]

    status = cluster.exec("ray status")
    assert status.returncode == 0 and "gpu_worker" in status.stdout

    # ray-cml status joins CML's view and Ray's, read from the head's GCS directly ...
    report = status_json(cluster)
    assert report["ray_view"] == "direct" and report["strays"] == []
    rows = {n["node_id"]: n for n in report["nodes"]}
    worker_id, head_id = worker.name.rsplit("-", 1)[-1], head.name.rsplit("-", 1)[-1]
    assert set(rows) == {head_id, worker_id} and report["head"] == head_id
    assert rows[worker_id]["node_type"] == "gpu_worker" and rows[worker_id]["gpus"] == 1
    assert rows[worker_id]["cml_status"] == "RUNNING"
    assert rows[worker_id]["ray_state"] in ("alive", "idle")
    assert rows[worker_id]["ip"] == worker_engine["ip_address"]
    assert report["gpus_held"] == 1
    assert report["dashboard_url"].endswith(f"/apps/{head.name}")  # CML's proxy, played
    assert report["dashboard_address"].startswith(f"http://{head_engine['ip_address']}:")
    # ... and through the head's mailbox, as from a laptop that cannot reach the GCS.
    table = cluster.ray_cml("status", "--ray-view", "head", str(cluster.config_path))
    assert table.returncode == 0, table.stdout
    assert "Ray's view asked of the head" in table.stdout
    assert "autoscaler: restarted 1 time(s) by the head" in table.stdout
    assert re.search(rf"{worker_id}\s+gpu_worker\s+RUNNING\s+(alive|idle)", table.stdout)
    outputs = [
        up.stdout,
        head_ip.stdout,
        exec_result.stdout,
        attach.stdout,
        submitted.stdout,
        status.stdout,
        table.stdout,
    ]
    assert_secrets_nowhere(cluster, outputs, token)  # head and GPU worker both alive here

    cluster.wait_for(lambda: not cluster.workers(), 180, "the idle worker to be deleted")
    assert [a.id for a in cluster.applications()] == [head.id]
    after = status_json(cluster)
    assert after["gpus_held"] == 0 and after["gpu_hours"] > 0  # the worker's time is kept

    assert_secrets_nowhere(cluster, outputs, token)  # after scale-down

    # A Ray job that prints a marker and, by mistake, the cluster's token.
    token_file = emulator.project_dir / ".ray-cml" / "e2e" / "auth" / "token"
    job = submit_job(cluster, f"print('history-marker'); print(open('{token_file}').read())")
    assert job.returncode == 0, job.stdout[-2000:]

    down = cluster.down()
    assert down.returncode == 0, down.stdout[-3000:]
    assert_nothing_left(cluster, pgids)
    assert not (emulator.project_dir / ".ray-cml" / "e2e").exists()

    # The run's history stays: the job and its log (the token redacted), the GPU task's
    # output, the autoscaler's scale-up and scale-down, the worker's GPU-hours.
    shown = cluster.ray_cml("history", "--json", "--run", "latest", str(cluster.config_path))
    assert shown.returncode == 0, shown.stdout + shown.stderr
    record = json.loads(shown.stdout)
    assert record["ended_by"] == "ray stop" and record["head"] == head_id
    [job_row] = [j for j in record["jobs"] if j["type"] == "SUBMISSION"]
    assert job_row["status"] == "SUCCEEDED" and "history-marker" in job_row["log_tail"]
    assert "[redacted]" in job_row["log_tail"]
    assert any("GPU task ran on" in c["output_tail"] for c in record["commands"])
    events = "\n".join(record["autoscaler"])
    assert "Adding 1 node(s) of type gpu_worker" in events, events
    assert "Removing 1 nodes of type gpu_worker (idle)" in events, events
    nodes = {n["node_id"]: n for n in record["nodes"]}
    assert nodes[worker_id]["node_type"] == "gpu_worker" and nodes[worker_id]["gpus"] == 1
    assert nodes[worker_id]["ended_at"] > nodes[worker_id]["started_at"] > 0
    assert record["gpu_hours"] == pytest.approx(after["gpu_hours"], rel=0.2)
    listed = cluster.ray_cml("history", str(cluster.config_path))
    assert listed.returncode == 0 and record["run"] in listed.stdout, listed.stdout
    table = cluster.ray_cml("history", "--run", "latest", str(cluster.config_path))
    assert "history-marker" in table.stdout and "Removing 1 nodes" in table.stdout
    history_outputs = [shown.stdout, listed.stdout, table.stdout]
    assert_secrets_nowhere(cluster, [down.stdout, *history_outputs], token, nodes_alive=False)


@pytest.mark.timeout(600)
def test_v1_replaces_a_crashed_worker_and_workers_outlive_no_head(start_emulator, tmp_path):
    emulator = start_emulator()
    cluster = LocalCluster(
        emulator,
        tmp_path / "work",
        cluster_name="e2e-v1",
        extra_env={"RAY_UP_enable_autoscaler_v2": "0"},
    )
    up = cluster.up()
    assert up.returncode == 0, up.stdout[-3000:]
    [head] = cluster.applications()
    monitor_log = cluster.exec("cat $RAY_TMPDIR/ray/session_latest/logs/monitor.log | head -50")
    assert "Autoscaler v2" not in monitor_log.stdout  # v1 runs

    pinned = cluster.submit(SET_GPU_DEMAND, "1")
    assert pinned.returncode == 0, pinned.stdout[-3000:]
    cluster.wait_for(
        lambda: [w.status for w in cluster.workers()] == [RUNNING], 120, "the pinned GPU worker"
    )
    [first] = cluster.workers()
    pgids = {engine(emulator, head.id)["pgid"], engine(emulator, first.id)["pgid"]}

    emulator.crash(first.id)
    cluster.wait_for(
        lambda: [(w.name != first.name, w.status) for w in cluster.workers()] == [(True, RUNNING)],
        180,
        "a replacement worker",
    )
    [second] = cluster.workers()
    pgids.add(engine(emulator, second.id)["pgid"])

    cluster.client.delete_application(head.id)  # the head dies under a running worker
    waited = cluster.wait_for(lambda: not cluster.workers(), 90, "workers to delete themselves")
    assert waited < 90

    down = cluster.down()
    assert down.returncode == 0, down.stdout[-3000:]
    assert_nothing_left(cluster, pgids)
