"""Ray's token authentication, tried as an outsider would, then as a CML session would.

The outsider is this test's own process with no token: it knows the head's address (what
``ray-cml status`` prints) and reaches every port, as any engine of the workspace does on
CML. It tries Ray's three ways in: ``ray.init`` to the GCS, a job posted to the dashboard's
job API, and a Ray Client connection. Then a CML session of the project (the same process,
following the one line ``ray up`` printed) does each. (A new head of a cluster keeping its
token is a provider contract test.)
"""

from __future__ import annotations

import json
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from ray_cml_provider.demo.local_cluster import LocalCluster
from ray_cml_provider.emulator.processes import signal_group
from ray_cml_provider.provider.ray_auth import client_env
from tests.conftest import wait_until

pytestmark = pytest.mark.e2e

# A driver that connects and runs one thing on the cluster.
DRIVER = "import ray; ray.init({address!r}); print('RAN', ray.get(ray.put(41)) + 1)"
SESSION_LINE = re.compile(r"^\s*(export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=(\S+))\s*$", re.M)


def start_python(code: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(process: subprocess.Popen, timeout_s: float = 120) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        signal_group(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return -9, output
    return process.returncode, output


def status_json(cluster: LocalCluster) -> dict:
    result = cluster.ray_cml("status", "--json", str(cluster.config_path))
    assert result.returncode == 0, result.stdout
    return json.loads(result.stdout[result.stdout.index("{") :])


@pytest.mark.timeout(600)
def test_outsiders_are_refused_at_every_ray_port_and_the_project_gets_in(start_emulator, tmp_path):
    emulator = start_emulator()
    cluster = LocalCluster(emulator, tmp_path / "work", cluster_name="auth")
    up = cluster.up()
    assert up.returncode == 0, up.stdout[-3000:]

    token = cluster.ray_token()
    token_file = emulator.project_dir / ".ray-cml" / "auth" / "auth" / "token"
    assert token and re.fullmatch(r"[0-9a-f]{64}", token)
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
    # ray up says where the token is and how a session uses it, never the token itself.
    printed = SESSION_LINE.search(up.stdout)
    assert printed and Path(printed.group(2)) == token_file, up.stdout[-2000:]
    table = cluster.ray_cml("status", str(cluster.config_path))
    assert printed.group(1) in table.stdout and token not in up.stdout + table.stdout
    report = status_json(cluster)  # Ray's view read directly, with the token
    assert report["ray_view"] == "direct" and report["ray_auth"] == "token"
    dashboard = report["dashboard_address"]  # as every engine of the workspace can reach it

    # The outsider: no token anywhere in its environment. (Ray Client retries a refused
    # connection for 30 s by default; shorter tries keep the test short, and the session
    # below connects with the defaults.)
    outsider = client_env(None)
    gcs_try = start_python(DRIVER.format(address=report["gcs_address"]), outsider)
    client_try = start_python(
        DRIVER.format(address=report["client_address"]),
        {
            **outsider,
            "RAY_CLIENT_INITIAL_CONNECTION_TIMEOUT_S": "2",
            "RAY_CLIENT_MAX_CONNECTION_TIMEOUT_S": "5",
        },
    )
    marker = tmp_path / "ran-on-the-head"
    job = {"entrypoint": f"touch {marker}"}
    assert requests.post(f"{dashboard}/api/jobs/", json=job, timeout=10).status_code == 401
    wrong = {"Authorization": "Bearer " + "0" * 64}
    answer = requests.post(f"{dashboard}/api/jobs/", json=job, headers=wrong, timeout=10)
    assert answer.status_code == 403
    code, output = finish(gcs_try)
    assert code != 0 and "RAN" not in output and "InvalidAuthToken" in output, output[-2000:]
    code, output = finish(client_try)
    assert code != 0 and "RAN" not in output, output[-2000:]
    assert not marker.exists()

    # A CML session of the project, after the line ray up printed: each way in works.
    session = {
        **outsider,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": printed.group(2),
        "PATH": f"{Path(sys.executable).parent}:{outsider.get('PATH', '')}",
    }
    gcs_try = start_python(DRIVER.format(address=report["gcs_address"]), session)
    client_try = start_python(DRIVER.format(address=report["client_address"]), session)

    def submit_job() -> subprocess.CompletedProcess | None:
        """``ray job submit``; None while Ray's job server has no agent yet: on a busy
        machine the head's dashboard agent registers seconds after ``ray up`` returns, and
        Ray answers "No available agent to submit job, please try again later"."""
        submitted = subprocess.run(
            ["ray", "job", "submit", "--address", dashboard, "--", "touch", str(marker)],
            env=session,
            capture_output=True,
            text=True,
            timeout=180,
        )
        waiting = "No available agent to submit job" in submitted.stdout + submitted.stderr
        return None if waiting else submitted

    submitted = wait_until(submit_job, 120, "Ray's job server to have an agent")
    assert submitted.returncode == 0, submitted.stdout[-2000:] + submitted.stderr[-2000:]
    assert marker.exists()
    for attempt in (gcs_try, client_try):
        code, output = finish(attempt)
        if code != 0:  # the head's side of it, for the failure message
            logs = "$RAY_TMPDIR/ray/session_latest/logs"
            output += cluster.exec(f"tail -n 30 {logs}/ray_client_server*").stdout
        assert code == 0 and "RAN 42" in output, output[-4000:]

    down = cluster.down()
    assert down.returncode == 0, down.stdout[-3000:]
    assert not token_file.exists() and cluster.applications() == []
