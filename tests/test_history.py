"""A cluster's history: the head's ``Historian`` against the emulator's files API and a
stand-in for Ray's dashboard (jobs, logs, Serve, the gateway's /metrics), then what
``ray-cml history`` and ``ray-cml gc`` do with the records. The real head, Ray and ``ray
down`` are in ``test_ray_e2e.py``."""

from __future__ import annotations

import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ray_cml_provider import figures
from ray_cml_provider.cluster.history import close_open_runs, find_run, list_runs
from ray_cml_provider.cml import CMLClient, CMLNotFoundError
from ray_cml_provider.contract import (
    HistoryRecord,
    LedgerEntry,
    Request,
    auth_token_path,
    cluster_dir,
    history_dir,
    history_run_name,
    ledger_dir,
    metrics_key_path,
)
from ray_cml_provider.node import history
from ray_cml_provider.node.context import NodeContext
from ray_cml_provider.node.history import Historian, MonitorLog, close_open_run, decision
from ray_cml_provider.node.redaction import REDACTED, Redactor
from ray_cml_provider.ops import history as history_command
from tests.conftest import wait_until

EMULATOR_ARGS = ["--start-delay-s", "0.2"]
TOKEN = "t" * 64
METRICS_KEY = "m" * 43


class Dashboard:
    """Ray's dashboard as far as the history reads it, with counters of what was asked."""

    def __init__(self):
        self.jobs: list[dict] = []
        self.logs: dict[str, str] = {}
        self.log_reads: dict[str, int] = {}
        self.requests = 0  # the Serve counter /metrics shows: grows between scrapes
        self.authorized: list[str] = []
        self.log_delay_s = 0.0  # a dashboard that answers slowly
        self.serve_message = ""  # an application's and its deployment's
        dashboard = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                dashboard.authorized.append(self.headers.get("Authorization", ""))
                path = self.path.split("?")[0]
                if path == "/api/jobs/":
                    body = json.dumps(dashboard.jobs)
                elif path.startswith("/api/jobs/") and path.endswith("/logs"):
                    job = path.split("/")[3]
                    dashboard.log_reads[job] = dashboard.log_reads.get(job, 0) + 1
                    time.sleep(dashboard.log_delay_s)
                    body = json.dumps({"logs": dashboard.logs.get(job, "")})
                elif path == "/api/serve/applications/":
                    deployment = {"status": "HEALTHY", "replicas": [{"state": "RUNNING"}]}
                    deployment["message"] = dashboard.serve_message
                    app = {"status": "RUNNING", "deployments": {"Echo": deployment}}
                    app["message"] = dashboard.serve_message
                    body = json.dumps({"applications": {"echo": app}})
                elif path == "/metrics":
                    dashboard.requests += 30
                    body = (
                        "# TYPE ray_serve_deployment_request_counter counter\n"
                        'ray_serve_deployment_request_counter_total{application="echo",'
                        f'deployment="Echo"}} {dashboard.requests}\n'
                    )
                else:
                    self.send_error(404)
                    return
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def dashboard():
    fake = Dashboard()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def head_context(emulator, port: int) -> NodeContext:
    project = emulator.project_dir
    for path, secret in ((auth_token_path("c1"), TOKEN), (metrics_key_path("c1"), METRICS_KEY)):
        (project / path).parent.mkdir(parents=True, exist_ok=True)
        (project / path).write_text(secret)
    env = {
        "RAY_CML_CLUSTER": "c1",
        "RAY_CML_NODE_ID": "0123abcd",
        "RAY_CML_NODE_KIND": "head",
        "RAY_CML_DIR": cluster_dir("c1"),
        "RAY_CML_AUTH_TOKEN_FILE": auth_token_path("c1"),
        "RAY_CML_METRICS_KEY_FILE": metrics_key_path("c1"),
        "CDSW_IP_ADDRESS": "127.0.0.1",
        "CDSW_APP_PORT": str(port),  # the gateway's /metrics: the stand-in serves it
        "CDSW_API_URL": f"{emulator.url}/api/v1",
        "CDSW_PROJECT_ID": emulator.project_id,
        "CDSW_APIV2_KEY": emulator.api_key,
    }
    return NodeContext(env, project_dir=project)


def job(n: int, status: str = "SUCCEEDED", at: float | None = None) -> dict:
    """Ray's view of a job (times in ms): the n-th of this run, or one that ran ``at``."""
    start_ms = int(((at or time.time()) + n) * 1000)
    return {
        "type": "SUBMISSION",
        "submission_id": f"raysubmit_{n:03d}",
        "entrypoint": f"python step_{n}.py",
        "status": status,
        "start_time": start_ms,
        "end_time": start_ms + 500 if status != "RUNNING" else None,
    }


def stored(client: CMLClient, run: str) -> tuple[HistoryRecord, bytes] | None:
    try:
        data = client.download_file(f"{history_dir('c1')}/{run}.json")
    except CMLNotFoundError:
        return None
    return HistoryRecord.from_json(data), data


def test_a_run_is_kept_bounded_with_its_jobs_logs_nodes_and_figures_and_no_secret(
    emulator, client, dashboard, monkeypatch
):
    monkeypatch.setattr(figures, "MIN_WINDOW_S", 0.0)  # figures from snapshots a moment apart
    ctx = head_context(emulator, dashboard.port)
    # A run of an earlier head of this cluster, lost without its final snapshot.
    lost = HistoryRecord("c1", history_run_name(1_000_000, "99999999"), "99999999", 1_000_000.0)
    lost.updated_at = 1_000_060.0
    client.upload_file(f"{history_dir('c1')}/{lost.run}.json", lost.to_json())
    monitor = Path(ctx.tmp_dir) / "ray/session_latest/logs/monitor.log"
    monitor.parent.mkdir(parents=True, exist_ok=True)
    monitor.write_text(
        "2026-12-03 10:57:50,001\tINFO autoscaler.py:1 -- Fetched the cluster's state\n"
        "2026-12-03 10:57:52,850\tINFO event_logger.py:77 -- Adding 1 node(s) of type gpu.\n"
    )
    # 60 jobs of this run, and one a recovered head's GCS remembers from an earlier run.
    dashboard.jobs = [job(n) for n in range(59)] + [job(59, "RUNNING"), job(99, at=1e9)]
    dashboard.logs = {
        "raysubmit_058": "\n".join(f"line {i}" for i in range(500)),
        "raysubmit_059": f"working\nmy token is {TOKEN}\n",
        # The tail's cut falls inside the token: redacted before it is cut, none of it left.
        "raysubmit_057": TOKEN + "y" * (history.TAIL_BYTES - 40),
    }

    historian = Historian(ctx, dashboard.port)
    try:
        historian.begin()
        first = historian.record.run
        record, _ = wait_until(lambda: stored(client, first), 30, "the first snapshot")
        run = record.run
        # The earlier run left open is closed at its last snapshot.
        earlier, _ = stored(client, lost.run)
        assert earlier.ended_by == "head lost" and earlier.ended_at == 1_000_060.0

        with historian.lock:  # as if the run began two hours ago
            historian.record.started_at -= 7200
        with open(monitor, "a") as log:
            log.write("2026-12-03 10:59:02,100\tINFO event_logger.py:95 -- Removing 1 nodes of ")
            log.write("type gpu (idle).\n")
        now = historian.clock()
        for entry in (
            LedgerEntry("5555aaaa", 1, now - 3600, now, "gpu_worker"),  # an hour, in the run
            LedgerEntry("6666bbbb", 1, now - 9000, now - 3600),  # an hour of it in the run
            LedgerEntry("7777cccc", 1, now - 9000, now - 8000),  # before the run
        ):
            client.upload_file(f"{ledger_dir('c1')}/{entry.file_name}", b"")
        note = f"GPU task ran on 127.0.0.3; key {emulator.api_key}"
        historian.remember(
            Request(cmd="python gpu_task.py", history=True), 0, note.encode(), now - 5
        )
        historian.remember(Request(cmd="cat secret"), 0, b"", now)  # ray-cml's own
        historian.snapshot()
        historian.end("ray stop")
    finally:
        historian.record = None
    record, raw = stored(client, run)

    assert record.ended_by == "ray stop" and record.ended_at >= record.updated_at - 1
    assert len(record.jobs) == history.MAX_JOBS  # the newest 50 of 60
    assert record.jobs[-1]["id"] == "raysubmit_059" and record.jobs[0]["id"] == "raysubmit_010"
    by_id = {j["id"]: j for j in record.jobs}
    assert by_id["raysubmit_058"]["log_tail"].splitlines()[-1] == "line 499"
    assert len(by_id["raysubmit_058"]["log_tail"].splitlines()) == history.TAIL_LINES
    # A finished job's log is read once; a running one's only at the end.
    assert dashboard.log_reads["raysubmit_058"] == 1 and dashboard.log_reads["raysubmit_059"] == 1
    assert "raysubmit_000" not in dashboard.log_reads  # not kept: never read
    assert "raysubmit_099" not in by_id  # an earlier run's
    assert "my token is [redacted]" in by_id["raysubmit_059"]["log_tail"]
    assert TOKEN[-40:].encode() not in raw and emulator.api_key.encode() not in raw
    assert METRICS_KEY.encode() not in raw
    assert set(dashboard.authorized) == {f"Bearer {TOKEN}", f"Bearer {METRICS_KEY}"}
    [command] = record.commands  # ray-cml's own questions are not the user's work
    assert command["cmd"] == "python gpu_task.py" and "GPU task ran on" in command["output_tail"]
    assert "[redacted]" in command["output_tail"]
    assert record.serve["echo"]["deployments"]["Echo"]["replicas_running"] == 1
    assert [line[20:] for line in record.autoscaler] == [
        "Adding 1 node(s) of type gpu.",
        "Removing 1 nodes of type gpu (idle).",
    ]
    nodes = {n["node_id"]: n for n in record.nodes}
    assert set(nodes) == {"5555aaaa", "6666bbbb"}
    assert nodes["5555aaaa"]["node_type"] == "gpu_worker"
    assert nodes["5555aaaa"]["gpu_hours"] == pytest.approx(1.0, abs=0.01)
    assert nodes["6666bbbb"]["gpu_hours"] == pytest.approx(1.0, abs=0.01)  # its part only
    assert record.gpu_hours == pytest.approx(2.0, abs=0.02)
    [deployment] = record.top["deployments"]  # figures between the last two scrapes
    assert deployment["application"] == "echo" and deployment["requests_per_s"] > 0
    assert record.notes == []
    assert len(raw) < 1_000_000

    # Both runs are listed, this one is the latest, and it shows as a table.
    assert [r.run for r in list_runs(client, "c1")] == [lost.run, run]
    assert find_run(client, None, "latest").run == run
    shown = history_command.render_run(record)
    assert "raysubmit_059  RUNNING" in shown and "Removing 1 nodes of type gpu" in shown
    assert "5555aaaa  worker  gpu_worker  1" in shown


def test_a_run_whose_ray_stopped_unseen_keeps_its_own_jobs_when_ray_starts_again(
    emulator, client, dashboard
):
    now = [time.time()]
    historian = Historian(head_context(emulator, dashboard.port), dashboard.port, lambda: now[0])
    dashboard.jobs = [job(1)]
    historian.begin()
    first = historian.record.run
    wait_until(lambda: stored(client, first), 30, "the first snapshot")
    historian.snapshot()
    dashboard.jobs = []  # `ray stop --force; ray start --head`: another Ray, no jobs
    now[0] += 60  # a minute later
    historian.begin()
    second = historian.record.run
    historian.record = None
    closed, _ = stored(client, first)
    assert closed.ended_by == "Ray started again" and second != first
    assert [j["id"] for j in closed.jobs] == ["raysubmit_001"]


def test_the_last_snapshot_is_bounded_in_time_whatever_the_dashboard_does(
    emulator, client, dashboard, monkeypatch
):
    monkeypatch.setattr(history, "SNAPSHOT_BUDGET_S", 1.0)
    dashboard.log_delay_s = 0.4
    dashboard.jobs = [job(n) for n in range(10)]
    dashboard.logs = {f"raysubmit_{n:03d}": f"log {n}" for n in range(10)}
    historian = Historian(head_context(emulator, dashboard.port), dashboard.port)
    historian.record = HistoryRecord("c1", history_run_name(time.time(), "0123abcd"), "x", 1.0)
    run = historian.record.run
    started = time.monotonic()
    historian.end("ray stop")  # what `ray stop` waits for
    assert time.monotonic() - started < 5
    record, _ = stored(client, run)
    assert 0 < sum(1 for j in record.jobs if j["log_tail"] == "") < 10
    assert any("job log(s) not read (out of time)" in note for note in record.notes), record.notes


def test_the_command_lists_shows_and_refuses_in_one_line(emulator, client, capsys, monkeypatch):
    settings = emulator.client_settings()
    monkeypatch.setenv("CML_HOST", settings["host"])
    monkeypatch.setenv("CML_PROJECT_ID", settings["project_id"])
    monkeypatch.setenv("CML_API_KEY", emulator.api_key)
    assert history_command.main([]) == 0
    assert "no history in the project yet" in capsys.readouterr().out
    record = HistoryRecord("c1", history_run_name(1_700_000_000, "0123abcd"), "0123abcd", 1.7e9)
    record.ended_at, record.ended_by = 1.7e9 + 90, "ray stop"
    record.jobs = [{**job(1), "log_tail": "done"}]
    client.upload_file(f"{history_dir('c1')}/{record.run}.json", record.to_json())
    assert history_command.main([]) == 0
    listed = capsys.readouterr().out
    assert record.run in listed and "ray stop" in listed and "1m30s" in listed
    assert history_command.main(["--run", record.run[:10], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["jobs"][0]["log_tail"] == "done"
    assert history_command.main(["--run", "2020"]) == 1
    assert "ray-cml: no run named '2020'" in capsys.readouterr().err
    assert history_command.main(["--cluster", "other"]) == 0
    assert "no history of cluster other" in capsys.readouterr().out

    # A record that is not one (cut, or written by hand) hides no other, and is named.
    broken = history_run_name(1_700_000_500, "4567cdef")
    client.upload_file(f"{history_dir('c1')}/{broken}.json", b'{"cluster": "c1", "ru')
    assert history_command.main([]) == 0
    shown = capsys.readouterr()
    assert record.run in shown.out and broken in shown.out + shown.err
    assert history_command.main(["--run", broken]) == 1
    assert "is not a history record" in capsys.readouterr().err


def test_gc_closes_the_run_a_lost_head_left_open(client):
    open_run = HistoryRecord("c2", history_run_name(1_700_000_000, "0123abcd"), "0123abcd", 1.7e9)
    open_run.updated_at = 1.7e9 + 30
    client.upload_file(f"{history_dir('c2')}/{open_run.run}.json", open_run.to_json())
    assert close_open_runs(client, "c2", "head lost (collected by ray-cml gc)") == 1
    assert close_open_runs(client, "c2", "again") == 0  # an ended run stays as it is
    closed = HistoryRecord.from_json(
        client.download_file(f"{history_dir('c2')}/{open_run.run}.json")
    )
    assert closed.ended_at == 1.7e9 + 30 and closed.ended_by.startswith("head lost")


def test_decisions_are_read_as_monitor_log_grows_and_from_a_new_session(tmp_path):
    session_a, session_b = tmp_path / "session_a", tmp_path / "session_b"
    for session in (session_a, session_b):
        session.mkdir()
    latest = tmp_path / "session_latest"
    latest.symlink_to(session_a)
    log = MonitorLog(latest / "monitor.log")
    kept = Redactor([]).redact  # nothing to redact here
    assert log.new_decisions(kept) == []  # no file yet
    (session_a / "monitor.log").write_text("x -- Adding 2 node(s) of type gpu.\nx -- Resiz")
    assert log.new_decisions(kept) == ["x Adding 2 node(s) of type gpu."]
    with open(session_a / "monitor.log", "a") as out:
        out.write("ed to 4 CPUs, 1 GPUs.\n")  # the line that was being written
    assert log.new_decisions(kept) == ["x Resized to 4 CPUs, 1 GPUs."]
    (session_b / "monitor.log").write_text("y -- Removing 1 nodes of type gpu (idle).\n")
    latest.unlink()
    latest.symlink_to(session_b)
    assert log.new_decisions(kept) == ["y Removing 1 nodes of type gpu (idle)."]
    assert decision("2026-12-03 10:57:50,001\tINFO x.py:1 -- Fetched state", kept) is None


def test_a_record_that_is_not_one_is_left_alone():
    written = {}
    assert not close_open_run(lambda p: b"[1, 2]", written.__setitem__, "x", "lost")
    assert not close_open_run(lambda p: None, written.__setitem__, "x", "lost")
    assert written == {}


def test_a_secret_across_the_300_character_cut_is_redacted_before_it(emulator, client, dashboard):
    """Serve's messages and the autoscaler's lines are kept to 300 characters: cut first, a
    token across the cut kept most of itself, which the whole-token match then missed."""
    ctx = head_context(emulator, dashboard.port)
    token = secrets.token_hex(32)  # as Ray's token would be: random, 64 characters
    ctx.token_path.write_text(token)
    message = "x" * 260 + token + " (from the replica's environment)"
    dashboard.serve_message = message
    line = f"2026-12-03 10:57:52,850\tINFO event_logger.py:77 -- Adding {'x' * 240}{token}"
    # What the cut alone would have kept: 40 and 33 characters of the token.
    assert token[:40] in message[:300] and token[:33] in decision(line, str)[:300]
    monitor = Path(ctx.tmp_dir) / "ray/session_latest/logs/monitor.log"
    monitor.parent.mkdir(parents=True, exist_ok=True)
    monitor.write_text(line + "\n")
    historian = Historian(ctx, dashboard.port)
    record = HistoryRecord("c1", history_run_name(time.time(), "0123abcd"), "0123abcd", 1.0)

    historian.read_serve(record)
    historian.read_decisions(record)
    historian.publish(record)

    _, raw = stored(client, record.run)
    app = record.serve["echo"]
    [kept_line] = record.autoscaler
    kept = (app["message"], app["deployments"]["Echo"]["message"], kept_line, raw.decode())
    for text in kept:
        assert not any(token[i : i + 16] in text for i in range(len(token) - 15)), text
    assert app["message"] == "x" * 260 + REDACTED + message[324:][:30]
    assert kept_line == f"2026-12-03 10:57:52 Adding {'x' * 240}{REDACTED}"
