"""The CML client against the real emulator over HTTP: every endpoint, CML's shapes."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from ray_cml_provider.cml import (
    ApplicationStatus,
    CMLAuthenticationError,
    CMLClient,
    CMLInvalidRequestError,
    CMLNotFoundError,
)
from tests.conftest import FAST_RETRY

# These engines run no Ray: a short start still passes through STARTING, and keeps it quick.
EMULATOR_ARGS = ["--start-delay-s", "0.5"]

PROJECT = "/api/v2/projects/{project_id}"


def raw_get(emulator, path: str, **params) -> requests.Response:
    return requests.get(
        emulator.url + path,
        params=params,
        timeout=10,
        headers={"Authorization": f"Bearer {emulator.api_key}"},
    )


def test_wrong_key_gets_401_in_cmls_error_shape(emulator):
    answer = requests.get(
        f"{emulator.url}/api/v2/runtimes", timeout=10, headers={"Authorization": "Bearer wrong"}
    )
    assert answer.status_code == 401
    assert set(answer.json()) == {"error", "code", "message", "details"}
    assert answer.json()["code"] == 16
    bad = CMLClient(host=emulator.url, project_id=emulator.project_id, api_key="wrong")
    with pytest.raises(CMLAuthenticationError, match="GET /api/v2/projects/.* 401"):
        bad.get_project()


def test_project_and_runtimes(client, emulator):
    project = client.get_project()
    assert project["id"] == emulator.project_id
    assert project["shared_memory_limit"] > 0
    runtimes = client.list_runtimes()
    assert runtimes and all("image_identifier" in r for r in runtimes)
    cuda = client.list_runtimes({"edition": "gpu"})
    assert cuda and all("cuda" in r["image_identifier"] for r in cuda)
    missing = CMLClient(host=emulator.url, project_id="nope-nope", api_key=emulator.api_key)
    with pytest.raises(CMLNotFoundError, match="project 'nope-nope' not found"):
        missing.get_project()


def test_create_and_get_use_cmls_shapes(client, emulator, make_app):
    app = make_app(
        "shape-1",
        environment={"RAY_NODE": "worker"},
        accelerator_label_id="7",
        nvidia_gpu=0,
        description="a test",
    )
    assert app.status == ApplicationStatus.STARTING
    raw = raw_get(emulator, f"/api/v2/projects/{emulator.project_id}/applications/{app.id}")
    body = raw.json()
    assert isinstance(body["environment"], str), "environment comes back as a JSON string"
    assert json.loads(body["environment"]) == {"MODE": "sleep", "RAY_NODE": "worker"}
    assert body["accelerator_label_id"] == "7"
    assert body["creator"]["username"]
    for stamp in ("created_at", "updated_at", "starting_at"):
        assert body[stamp].endswith("Z")
    fetched = client.get_application(app.id)
    assert fetched.environment["RAY_NODE"] == "worker"
    assert fetched.description == "a test"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"runtime_identifier": ""}, "runtime_identifier is required"),
        ({"runtime_identifier": "no/such:runtime"}, "not an enabled runtime"),
        ({"subdomain": "Bad_Sub"}, "subdomain 'Bad_Sub' is invalid"),
        ({"subdomain": "x" * 64}, "at most 63"),
        ({"cpu": -1}, "cpu must be a positive number"),
        ({"nvidia_gpu": 1.5}, "nvidia_gpu must be a non-negative integer"),
        ({"environment": {"A": 1}}, "environment must be a map of strings"),
        ({"script": "/etc/passwd"}, "relative to the project root"),
        ({"colour": "blue"}, "unknown field(s): colour"),
    ],
)
def test_invalid_creates_are_400_with_the_servers_message(client, make_app, override, message):
    with pytest.raises(CMLInvalidRequestError) as info:
        make_app("invalid-1", **override)
    assert message in str(info.value)
    assert "POST /api/v2/projects/" in str(info.value)
    assert client.list_applications() == []


def test_subdomains_are_unique(client, make_app):
    make_app("same-sub")
    with pytest.raises(CMLInvalidRequestError, match="already in use"):
        make_app("other-name", subdomain="same-sub")


def test_paging_search_and_sort(client, emulator, make_app):
    for name in ("worker-1", "worker-10", "worker-2", "head-1", "worker-3"):
        make_app(name, mode="exit")
    path = f"/api/v2/projects/{emulator.project_id}/applications"

    first = raw_get(emulator, path, page_size=2).json()
    assert len(first["applications"]) == 2 and first["next_page_token"]
    default = raw_get(emulator, path).json()
    assert default["next_page_token"] == "", "last page says so with an empty token"

    emulator.reset_stats()
    names = [a.name for a in client.list_applications(page_size=2)]
    assert names == ["worker-1", "worker-10", "worker-2", "head-1", "worker-3"]
    list_calls = emulator.stats()["requests"]["GET " + PROJECT + "/applications"]
    assert list_calls == 3

    substring = [a.name for a in client.list_applications({"name": "worker-1"})]
    assert substring == ["worker-1", "worker-10"], "CML matches names as substrings"
    assert [a.name for a in client.find_applications_by_name("worker-1")] == ["worker-1"]

    assert [a.name for a in client.list_applications(sort="-name")][:2] == ["worker-3", "worker-2"]
    with pytest.raises(CMLInvalidRequestError, match="unknown field 'colour'"):
        client.list_applications(sort="colour")
    with pytest.raises(CMLInvalidRequestError, match="unknown key"):
        client.list_applications({"colour": "x"})


def test_status_filter_takes_lower_case(client, make_app):
    running = make_app("runner")
    from tests.conftest import wait_until

    wait_until(lambda: client.get_application(running.id).status == ApplicationStatus.RUNNING)
    assert [a.id for a in client.list_applications({"status": "running"})] == [running.id]
    assert client.list_applications({"status": "APPLICATION_RUNNING"}) == []


def test_update_stop_restart_delete_endpoints(client, emulator, make_app):
    app = make_app("lifecycle-endpoints")
    updated = client.update_application(app.id, {"description": "patched", "cpu": 2})
    assert updated.description == "patched" and updated.cpu == 2
    client.stop_application(app.id)
    client.restart_application(app.id)
    client.delete_application(app.id)
    with pytest.raises(CMLNotFoundError, match=f"application '{app.id}' not found"):
        client.get_application(app.id)
    counts = emulator.stats()["requests"]
    app_path = PROJECT + "/applications/{application_id}"
    for key in (
        f"PATCH {app_path}",
        f"POST {app_path}:stop",
        f"POST {app_path}:restart",
        f"DELETE {app_path}",
        f"GET {app_path}",
    ):
        assert counts[key] == 1, key


def test_project_files(client, emulator):
    client.upload_file("ray/cluster.yaml", b"first\n")
    client.upload_file("ray/cluster.yaml", b"second\n")  # CML never overwrites
    assert sorted(f.path for f in client.list_files("ray")) == [
        "ray/cluster(1).yaml",
        "ray/cluster.yaml",
    ]
    assert client.download_file("ray/cluster.yaml") == b"first\n"
    assert client.download_file("ray/cluster(1).yaml") == b"second\n"
    assert (emulator.project_dir / "ray" / "cluster(1).yaml").read_bytes() == b"second\n"

    client.upload_file("ray/cluster.yaml", b"third\n", overwrite=True)
    assert client.download_file("ray/cluster.yaml") == b"third\n"

    root = {f.path: f for f in client.list_files()}
    assert root["ray"].is_dir and root["engine.py"].file_size > 0

    binary = bytes(range(256)) * 4
    client.upload_file("data/blob.bin", binary)
    assert client.download_file("data/blob.bin") == binary

    client.delete_file("ray/cluster(1).yaml")
    with pytest.raises(CMLNotFoundError):
        client.download_file("ray/cluster(1).yaml")
    client.delete_file("ray")
    with pytest.raises(CMLNotFoundError):
        client.list_files("ray")
    client.delete_file("ray", missing_ok=True)
    escape = requests.post(
        f"{emulator.url}/api/v2/projects/{emulator.project_id}/files/..%2F..%2Fetc%2Fpasswd"
        ":download",
        headers={"Authorization": f"Bearer {emulator.api_key}"},
        timeout=10,
    )
    assert escape.status_code == 400 and "outside the project" in escape.json()["message"]
    with pytest.raises(CMLInvalidRequestError, match="is a directory"):
        client.download_file("data")


def test_request_counts_by_path_template(client, emulator):
    emulator.reset_stats()
    client.get_project()
    client.get_project()
    client.list_runtimes()
    stats = emulator.stats()
    assert stats["requests"] == {f"GET {PROJECT}": 2, "GET /api/v2/runtimes": 1}
    assert stats["total"] == 3 and stats["statuses"] == {"200": 3}
    assert "trace" not in stats
    # The trace says when each ran, for how long (latency included) and with whose key.
    emulator.set_faults(latency_ms=50)
    try:
        client.get_project()
    finally:
        emulator.set_faults(latency_ms=0)
    [*_, (started, seconds, request, caller)] = emulator.stats(trace=True)["trace"]
    assert (request, caller) == (f"GET {PROJECT}", "operator")
    assert seconds >= 0.05 and abs(started - time.time()) < 30


def test_injected_faults_are_retried_by_the_client(start_emulator):
    emulator = start_emulator("--fault-rate", "0.4", "--fault-seed", "3", "--latency-ms", "5")
    with CMLClient(**emulator.client_settings(), retry=FAST_RETRY) as client:
        for _ in range(25):
            assert client.get_project()["id"] == emulator.project_id
    stats = emulator.stats()
    assert stats["faults_injected"] > 0
    assert set(stats["statuses"]) <= {"200", "429", "503"}
    assert stats["statuses"]["200"] == 25
    assert (
        stats["statuses"].get("429", 0) + stats["statuses"].get("503", 0)
        == stats["faults_injected"]
    )

    emulator.set_faults(fault_rate=1.0)
    with pytest.raises(Exception, match="injected by the emulator"):
        client.get_project()
    emulator.set_faults(fault_rate=0.0)
    assert client.get_project()


def test_lost_answers_never_duplicate_an_application(start_emulator, runtime):
    emulator = start_emulator("--drop-rate", "0.5", "--fault-seed", "11")
    with CMLClient(**emulator.client_settings(), retry=FAST_RETRY) as client:
        names = [f"lost-{n}" for n in range(12)]
        for name in names:
            client.create_application_once(
                {
                    "name": name,
                    "subdomain": name,
                    "script": "engine.py",
                    "runtime_identifier": runtime,
                    "environment": {"MODE": "exit"},
                }
            )
        emulator.set_faults(drop_rate=0.0)
        created = [a.name for a in client.list_applications()]
        assert sorted(created) == sorted(names), "exactly one application per create"
        emulator.set_faults(drop_rate=0.5)
        for app in client.list_applications():
            client.delete_application(app.id)  # a lost answer is retried; the 404 means done
        emulator.set_faults(drop_rate=0.0)
        assert client.list_applications() == []
    assert emulator.stats()["answers_dropped"] > 0


def test_32_concurrent_clients_create_1000_applications_without_a_reset(start_emulator, runtime):
    """Each create on a new connection, 32 at a time: the burst the provider's threads and
    several ``ray up`` make. A connection reset (the listen backlog overflowing) fails it;
    nothing retries here."""
    emulator = start_emulator("--schedule-delay-s", "3600")  # STARTING with no process
    url = f"{emulator.url}{PROJECT.format(project_id=emulator.project_id)}/applications"
    headers = {"Authorization": f"Bearer {emulator.api_key}", "Connection": "close"}

    def create(n: int) -> int:
        body = {"name": f"burst-{n}", "subdomain": f"burst-{n}", "script": "engine.py"}
        answer = requests.post(url, json={**body, "runtime_identifier": runtime}, headers=headers)
        return answer.status_code

    with ThreadPoolExecutor(32) as pool:
        statuses = list(pool.map(create, range(1000)))
    assert statuses == [200] * 1000
    listed = raw_get(emulator, url.removeprefix(emulator.url), page_size=1000).json()
    assert len(listed["applications"]) == 1000
