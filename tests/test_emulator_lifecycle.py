"""Applications as real process groups: start, fail, stop, restart, delete, quota, crash."""

from __future__ import annotations

import os
import time

import pytest

from ray_cml_provider.cml import (
    ApplicationStatus,
    CMLAuthenticationError,
    CMLClient,
    CMLNotFoundError,
)
from ray_cml_provider.emulator.harness import plain_python
from ray_cml_provider.emulator.processes import live_group_members
from tests.conftest import FAST_RETRY, engine_app, engine_dump, wait_until

pytestmark = pytest.mark.engines

# These engines run no Ray: a short start still passes through STARTING, and keeps it quick.
EMULATOR_ARGS = ["--start-delay-s", "0.5"]

RUNNING = ApplicationStatus.RUNNING
STARTING = ApplicationStatus.STARTING
STOPPED = ApplicationStatus.STOPPED
FAILED = ApplicationStatus.FAILED


def status_of(client: CMLClient, app_id: str) -> str:
    return client.get_application(app_id).status


def wait_status(client: CMLClient, app_id: str, status: str, timeout_s: float = 20) -> None:
    wait_until(lambda: status_of(client, app_id) == status, timeout_s, f"{app_id} {status}")


def engine_of(emulator, app_id: str) -> dict:
    return next(p for p in emulator.processes() if p["id"] == app_id)


def group_gone(pgid: int) -> bool:
    return not live_group_members(pgid)


def test_running_application_gets_cmls_environment(client, emulator, make_app, monkeypatch):
    first = make_app("env-1", environment={"USER_VAR": "hello"})
    second = make_app("env-2")
    for app in (first, second):
        wait_status(client, app.id, RUNNING)
    dump = wait_until(lambda: engine_dump(emulator.project_dir, first.id), what="engine dump")
    env = dump["env"]
    assert dump["cwd"] == str(emulator.project_dir)
    assert env["HOME"] == str(emulator.project_dir)
    assert env["USER_VAR"] == "hello"
    assert env["CDSW_PROJECT_ID"] == emulator.project_id
    assert env["CDSW_APP_ID"] == first.id
    assert env["CDSW_API_URL"] == emulator.url + "/api/v1"
    assert env["CDSW_DOMAIN"] == emulator.url.removeprefix("http://")
    assert env["CDSW_CPU_MILLICORES"] == "1000" and env["CDSW_MEMORY_MB"] == "1024"
    assert int(env["CDSW_APP_PORT"]) > 0 and env["CDSW_ENGINE_ID"]
    second_env = wait_until(lambda: engine_dump(emulator.project_dir, second.id))["env"]
    ips = {env["CDSW_IP_ADDRESS"], second_env["CDSW_IP_ADDRESS"]}
    assert len(ips) == 2 and all(ip.startswith("127.") and ip != "127.0.0.1" for ip in ips)
    assert engine_of(emulator, first.id)["ip_address"] == env["CDSW_IP_ADDRESS"]


def test_engine_key_is_its_own_and_dies_with_the_application(client, emulator, make_app):
    app = make_app("key-1")
    wait_status(client, app.id, RUNNING)
    env = wait_until(lambda: engine_dump(emulator.project_dir, app.id))["env"]
    engine_key = env["CDSW_APIV2_KEY"]
    assert engine_key != emulator.api_key
    assert emulator.api_key not in str(env), "the user's key never reaches an engine"
    # Inside the engine the CDSW_* variables alone are enough to use the API.
    inside = CMLClient(
        host=env["CDSW_API_URL"], project_id=env["CDSW_PROJECT_ID"], api_key=engine_key
    )
    assert [a.id for a in inside.list_applications()] == [app.id]
    client.delete_application(app.id)
    with pytest.raises(CMLAuthenticationError):
        inside.get_project()


def test_start_delay_keeps_a_live_process_in_starting(start_emulator, make_app, runtime):
    emulator = start_emulator("--start-delay-s", "1.5")
    client = CMLClient(**emulator.client_settings())
    app = client.create_application(
        {"name": "slow", "subdomain": "slow", "script": "engine.py", "runtime_identifier": runtime}
    )
    pgid = wait_until(lambda: engine_of(emulator, app.id)["pgid"], what="a process")
    assert status_of(client, app.id) == STARTING and not group_gone(pgid)
    started = time.monotonic()
    wait_status(client, app.id, RUNNING)
    assert time.monotonic() - started > 0.5


def test_schedule_delay_keeps_an_application_starting_with_no_process(start_emulator, runtime):
    emulator = start_emulator("--schedule-delay-s", "1.5", "--start-delay-s", "1")
    client = CMLClient(**emulator.client_settings())
    spec = {"script": "engine.py", "runtime_identifier": runtime}
    created = time.monotonic()
    app = client.create_application({"name": "queued", "subdomain": "queued", **spec})
    wait_until(lambda: engine_of(emulator, app.id)["pgid"], what="the process after the delay")
    assert time.monotonic() - created >= 1.4, "the process started before the schedule delay"
    assert status_of(client, app.id) == STARTING  # the script runs, CML still says STARTING
    wait_status(client, app.id, RUNNING)
    # Both delays change at run time (the test-control faults endpoint).
    emulator.set_faults(schedule_delay_s=0, start_delay_s=0)
    quick = client.create_application({"name": "quick", "subdomain": "quick", **spec})
    wait_status(client, quick.id, RUNNING)


def test_non_zero_exit_fails_and_zero_exit_stops(client, emulator, make_app):
    failing = make_app("fails", mode="exit", environment={"EXIT_CODE": "3"})
    clean = make_app("finishes", mode="exit", environment={"EXIT_CODE": "0"})
    wait_status(client, failing.id, FAILED)
    wait_status(client, clean.id, STOPPED)
    log = (emulator.log_dir / f"{failing.id}.log").read_text()
    assert f"engine {failing.id} up in mode exit" in log
    assert engine_of(emulator, failing.id)["pgid"] is None


def test_missing_script_fails(client, make_app):
    app = make_app("no-script", script="does/not/exist.py")
    wait_status(client, app.id, FAILED)


def test_stop_ends_the_whole_group_including_grandchildren(client, emulator, make_app):
    app = make_app("parent", mode="spawn_child")
    wait_status(client, app.id, RUNNING)
    child_file = emulator.project_dir / f"child-{app.id}.pid"
    child_pid = int(wait_until(lambda: child_file.exists() and child_file.read_text()))
    pgid = engine_of(emulator, app.id)["pgid"]
    assert child_pid in live_group_members(pgid)
    client.stop_application(app.id)
    assert status_of(client, app.id) in (ApplicationStatus.STOPPING, STOPPED)
    wait_status(client, app.id, STOPPED)
    assert group_gone(pgid)


def test_stop_kills_what_ignores_sigterm_after_the_grace(client, emulator, make_app):
    app = make_app("stubborn", mode="ignore_term")
    wait_status(client, app.id, RUNNING)
    wait_until(lambda: engine_dump(emulator.project_dir, app.id))  # handler installed by now
    time.sleep(0.2)
    pgid = engine_of(emulator, app.id)["pgid"]
    started = time.monotonic()
    client.stop_application(app.id)
    wait_status(client, app.id, STOPPED)
    assert time.monotonic() - started >= 0.9, "SIGKILL waited for the 1 s grace"
    assert group_gone(pgid)


def test_restart_starts_a_fresh_engine(client, emulator, make_app):
    app = make_app("restarts")
    wait_status(client, app.id, RUNNING)
    before = engine_of(emulator, app.id)
    client.restart_application(app.id)
    wait_until(lambda: engine_of(emulator, app.id)["pgid"] not in (None, before["pgid"]))
    wait_status(client, app.id, RUNNING)
    after = engine_of(emulator, app.id)
    assert after["ip_address"] != before["ip_address"]
    assert group_gone(before["pgid"])
    client.stop_application(app.id)
    wait_status(client, app.id, STOPPED)
    client.restart_application(app.id)  # a stopped application starts again
    wait_status(client, app.id, RUNNING)


def test_delete_forgets_at_once_and_kills_the_group(client, emulator, make_app):
    app = make_app("doomed")
    wait_status(client, app.id, RUNNING)
    pgid = engine_of(emulator, app.id)["pgid"]
    client.delete_application(app.id)
    assert client.list_applications() == []
    wait_until(lambda: group_gone(pgid), what="the group to die")
    wait_until(lambda: emulator.processes() == [], what="the emulator to forget it")


def test_over_quota_waits_in_starting_without_a_process(start_emulator, runtime):
    emulator = start_emulator("--max-gpus", "1", "--max-cpu", "8")
    client = CMLClient(**emulator.client_settings())

    def gpu_app(name):
        return client.create_application(
            {
                "name": name,
                "subdomain": name,
                "script": "engine.py",
                "runtime_identifier": runtime,
                "cpu": 1,
                "memory": 1,
                "nvidia_gpu": 1,
            }
        )

    first, second = gpu_app("gpu-1"), gpu_app("gpu-2")
    wait_status(client, first.id, RUNNING)
    wait_until(lambda: engine_of(emulator, second.id)["waiting_for"] == "quota", what="quota")
    assert status_of(client, second.id) == STARTING
    assert engine_of(emulator, second.id)["pgid"] is None, "no process while over quota"
    too_big = client.create_application(
        {
            "name": "cpu-9",
            "subdomain": "cpu-9",
            "script": "engine.py",
            "runtime_identifier": runtime,
            "cpu": 9,
            "memory": 1,
        }
    )
    client.delete_application(first.id)
    wait_status(client, second.id, RUNNING)
    assert status_of(client, too_big.id) == STARTING


def test_crash_kills_the_engine_and_fails_the_application(client, emulator, make_app):
    app = make_app("crashes", mode="spawn_child")
    wait_status(client, app.id, RUNNING)
    pgid = engine_of(emulator, app.id)["pgid"]
    emulator.crash(app.id)
    wait_status(client, app.id, FAILED)
    assert group_gone(pgid)


def test_emulator_exit_ends_every_application(start_emulator, runtime):
    emulator = start_emulator()
    client = CMLClient(**emulator.client_settings())
    for name in ("left-1", "left-2"):
        client.create_application(
            {
                "name": name,
                "subdomain": name,
                "script": "engine.py",
                "runtime_identifier": runtime,
                "environment": {"MODE": "spawn_child"},
            }
        )
    pgids = wait_until(
        lambda: (
            [p["pgid"] for p in emulator.processes() if p["pgid"]]
            if all(p["pgid"] for p in emulator.processes())
            else None
        )
    )
    assert len(pgids) == 2
    assert emulator.stop() == []
    assert all(group_gone(pgid) for pgid in pgids)
    assert emulator.process.returncode is not None
    with pytest.raises(OSError):
        os.kill(emulator.process.pid, 0)


def test_failed_applications_are_restarted_like_cml_does(start_emulator, runtime):
    emulator = start_emulator("--restart-failed", "2", "--restart-delay-s", "0.3")
    client = CMLClient(**emulator.client_settings())
    app = client.create_application(
        {
            "name": "flaky",
            "subdomain": "flaky",
            "script": "engine.py",
            "runtime_identifier": runtime,
            "environment": {"MODE": "exit", "EXIT_CODE": "3"},
        }
    )
    dumps = lambda: list(emulator.project_dir.glob(f"engine-{app.id}-*.json"))  # noqa: E731
    wait_until(lambda: len(dumps()) == 3, what="the first run and 2 restarts")
    wait_until(lambda: engine_of(emulator, app.id)["restarts"] == 2, what="2 restarts counted")
    wait_until(lambda: status_of(client, app.id) == FAILED, what="FAILED after the last run")
    assert not engine_of(emulator, app.id)["restart_pending"], "no restart after the second"
    assert len(dumps()) == 3


def test_a_runtime_given_an_interpreter_runs_its_engines_with_it(start_emulator):
    """A CML runtime is an image with its own Python: ``--runtime ID=PYTHON`` plays one,
    and a runtime not named keeps the emulator's own interpreter."""
    bare = os.path.abspath(plain_python())
    emulator = start_emulator("--runtime", f"example.com/custom/bare-python:1={bare}")
    client = CMLClient(**emulator.client_settings(), retry=FAST_RETRY)
    listed = {r["image_identifier"] for r in client.list_runtimes()}
    assert "example.com/custom/bare-python:1" in listed
    standard = sorted(listed - {"example.com/custom/bare-python:1"})[0]
    apps = {}
    for name, runtime in (("bare", "example.com/custom/bare-python:1"), ("std", standard)):
        apps[name] = client.create_application(engine_app(name, runtime)).id
    dumps = {
        n: wait_until(lambda i=i: engine_dump(emulator.project_dir, i), 20) for n, i in apps.items()
    }
    assert dumps["bare"]["executable"] == bare
    assert dumps["std"]["executable"] != bare
    assert dumps["bare"]["env"]["PATH"].startswith(os.path.dirname(bare))


def test_files_reach_the_other_side_of_the_project_filesystem_late(start_emulator):
    """``--file-delay-s`` plays NFS's attribute cache: the API reads its own writes at once,
    running engines see them late, the API sees what engines wrote late; an engine that
    starts sees everything (a fresh mount)."""
    emulator = start_emulator("--file-delay-s", "2")
    client = CMLClient(**emulator.client_settings(), retry=FAST_RETRY)
    project = emulator.project_dir
    client.upload_file("mail/request.json", b"{}")
    uploaded = time.monotonic()
    assert client.download_file("mail/request.json") == b"{}"
    assert [f.path for f in client.list_files("mail")] == ["mail/request.json"]
    assert not (project / "mail" / "request.json").exists()
    wait_until(lambda: (project / "mail" / "request.json").exists(), 10)
    assert time.monotonic() - uploaded >= 1.5

    (project / "mail" / "answer.rc").write_text("0")  # an engine writes
    with pytest.raises(CMLNotFoundError):
        client.download_file("mail/answer.rc")
    assert [f.path for f in client.list_files("mail")] == ["mail/request.json"]
    wait_until(
        lambda: (
            [f.path for f in client.list_files("mail")] == ["mail/answer.rc", "mail/request.json"]
        ),
        10,
    )

    emulator.set_faults(file_delay_s=60)
    client.upload_file("engine-reads-me.txt", b"x")
    runtime = client.list_runtimes()[0]["image_identifier"]
    app = client.create_application(engine_app("fresh", runtime))
    wait_until(lambda: engine_dump(project, app.id), 20)
    assert (project / "engine-reads-me.txt").read_bytes() == b"x"
