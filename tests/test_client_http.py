"""CML client behaviour against mocked HTTP (``responses``): retries, paging, errors, secrets."""

from __future__ import annotations

import json
import logging
import random
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses

from ray_cml_provider.cml import (
    CMLAuthenticationError,
    CMLClient,
    CMLConnectionError,
    CMLInvalidRequestError,
    CMLNotFoundError,
    CMLOutcomeUnknownError,
    CMLPermissionError,
    CMLRateLimitedError,
    CMLServerError,
    RetryPolicy,
)

HOST = "https://ml.example.com"
KEY = "very-secret-api-key"
APPS = f"{HOST}/api/v2/projects/proj-1/applications"
FILES = f"{HOST}/api/v2/projects/proj-1/files"


def app_body(app_id: str, name: str, **extra) -> dict:
    body = {
        "id": app_id,
        "name": name,
        "status": "APPLICATION_RUNNING",
        "cpu": 1,
        "memory": 2,
        "nvidia_gpu": "1",
        "environment": json.dumps({"A": "token-xyz"}),
        "created_at": f"2026-01-01T00:00:0{app_id[-1]}Z",
    }
    body.update(extra)
    return body


def cml_error(status: int, message: str) -> dict:
    return {"status": status, "json": {"error": message, "code": 3, "message": message}}


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def client(sleeps):
    c = CMLClient(
        host=HOST,
        project_id="proj-1",
        api_key=KEY,
        retry=RetryPolicy(max_attempts=4, backoff_base_s=1, backoff_cap_s=8),
        sleep=sleeps.append,
        rng=random.Random(7),
    )
    yield c
    c.close()


def query(call) -> dict:
    return {k: v[0] for k, v in parse_qs(urlsplit(call.request.url).query).items()}


# ----------------------------------------------------------------------------- requests


@responses.activate
def test_requests_carry_bearer_key_and_timeout(client):
    responses.get(f"{HOST}/api/v2/projects/proj-1", json={"id": "proj-1"})
    assert client.get_project() == {"id": "proj-1"}
    sent = responses.calls[0].request
    assert sent.headers["Authorization"] == f"Bearer {KEY}"
    assert sent.req_kwargs["timeout"] == (5.0, 30.0)


@responses.activate
def test_application_fields_are_parsed_tolerantly(client):
    responses.get(f"{APPS}/a1", json=app_body("a1", "n"))
    app = client.get_application("a1")
    assert app.environment == {"A": "token-xyz"}
    assert app.nvidia_gpu == 1 and app.cpu == 1.0
    assert "token-xyz" not in repr(app)  # environment stays out of reprs


# ----------------------------------------------------------------------------- paging


@responses.activate
def test_list_follows_every_page_and_resends_filter_and_sort(client):
    responses.get(APPS, json={"applications": [app_body("a1", "ray-1")], "next_page_token": "t1"})
    responses.get(APPS, json={"applications": [app_body("a2", "ray-2")], "next_page_token": "t2"})
    responses.get(APPS, json={"applications": [app_body("a3", "ray-3")], "next_page_token": ""})
    apps = client.list_applications({"name": "ray-"}, sort="-created_at")
    assert [a.id for a in apps] == ["a1", "a2", "a3"]
    queries = [query(call) for call in responses.calls]
    assert [q.get("page_token") for q in queries] == [None, "t1", "t2"]
    for q in queries:
        assert json.loads(q["search_filter"]) == {"name": "ray-"}
        assert q["sort"] == "-created_at"
        assert q["page_size"] == "100"


@responses.activate
def test_absent_next_page_token_ends_the_listing(client):
    responses.get(APPS, json={"applications": [app_body("a1", "x")]})
    assert len(client.list_applications()) == 1


@responses.activate
def test_a_repeating_page_token_is_an_error_not_an_endless_loop(client):
    responses.get(APPS, json={"applications": [], "next_page_token": "same"})
    with pytest.raises(CMLServerError, match="pagination loops"):
        client.list_applications()


@responses.activate
def test_find_by_name_rechecks_the_substring_filter_exactly(client):
    responses.get(
        APPS, json={"applications": [app_body("a1", "worker-1"), app_body("a2", "worker-10")]}
    )
    assert [a.id for a in client.find_applications_by_name("worker-1")] == ["a1"]


# ----------------------------------------------------------------------------- retries


@responses.activate
@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_transient_statuses_are_retried_with_growing_backoff(client, sleeps, status):
    for _ in range(3):
        responses.get(f"{APPS}/a1", **cml_error(status, "busy"))
    responses.get(f"{APPS}/a1", json=app_body("a1", "n"))
    assert client.get_application("a1").id == "a1"
    assert len(responses.calls) == 4
    assert len(sleeps) == 3
    for attempt, delay in enumerate(sleeps, start=1):
        ceiling = min(8, 2 ** (attempt - 1))
        assert ceiling / 2 <= delay <= ceiling


@responses.activate
def test_retry_after_is_honoured(client, sleeps):
    responses.get(
        f"{APPS}/a1", status=429, headers={"Retry-After": "3"}, json={"message": "slow down"}
    )
    responses.get(f"{APPS}/a1", json=app_body("a1", "n"))
    client.get_application("a1")
    assert sleeps == [3.0]


def test_backoff_never_exceeds_its_cap():
    policy = RetryPolicy(max_attempts=50, backoff_base_s=0.5, backoff_cap_s=4)
    rng = random.Random(1)
    delays = [policy.delay_s(n, None, rng) for n in range(1, 40)]
    assert max(delays) <= 4
    assert min(delays[5:]) >= 2  # late attempts stay near the cap, never back to zero
    assert policy.delay_s(1, 3600, rng) == 4  # a huge Retry-After is capped too


@responses.activate
def test_retries_stop_after_max_attempts_with_the_servers_message(client, sleeps):
    for _ in range(4):
        responses.get(f"{APPS}/a1", **cml_error(503, "maintenance window"))
    with pytest.raises(CMLServerError) as info:
        client.get_application("a1")
    assert len(responses.calls) == 4
    assert "maintenance window" in str(info.value)
    assert info.value.status == 503


@responses.activate
@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 500])
def test_other_errors_are_not_retried(client, sleeps, status):
    responses.get(f"{APPS}/a1", **cml_error(status, "nope"))
    with pytest.raises(Exception):  # noqa: B017 - the class is checked in the mapping test
        client.get_application("a1")
    assert len(responses.calls) == 1
    assert sleeps == []


@responses.activate
def test_connection_errors_are_retried_then_reported(client, sleeps):
    responses.get(f"{APPS}/a1", body=requests.ConnectionError("connection reset by peer"))
    responses.get(f"{APPS}/a1", json=app_body("a1", "n"))
    assert client.get_application("a1").id == "a1"
    assert len(sleeps) == 1

    responses.get(f"{APPS}/a2", body=requests.ConnectionError("connection refused"))
    with pytest.raises(CMLConnectionError, match="could not reach the CML API"):
        client.get_application("a2")


# ----------------------------------------------------------------------------- creates


SPEC = {"name": "ray-c1-worker-abc", "subdomain": "ray-c1-worker-abc", "script": "s.py"}


@responses.activate
def test_create_is_retried_when_the_server_refused_before_working(client, sleeps):
    responses.post(APPS, **cml_error(429, "slow down"))
    responses.post(APPS, **cml_error(503, "unavailable"))
    responses.post(APPS, json=app_body("a1", SPEC["name"]))
    assert client.create_application(SPEC).id == "a1"
    assert len(responses.calls) == 3


@responses.activate
@pytest.mark.parametrize(
    "failure",
    [
        {"body": requests.exceptions.ReadTimeout("read timed out")},
        {"body": requests.ConnectionError("connection reset")},
        cml_error(502, "bad gateway"),
        cml_error(504, "gateway timeout"),
    ],
)
def test_create_with_a_lost_answer_is_not_resent_blindly(client, failure):
    responses.post(APPS, **failure)
    with pytest.raises(CMLOutcomeUnknownError) as info:
        client.create_application(SPEC)
    assert len(responses.calls) == 1
    assert info.value.name == SPEC["name"]
    assert "Look it up by name" in str(info.value)


@responses.activate
def test_create_once_finds_the_application_a_lost_answer_created(client):
    responses.post(APPS, body=requests.exceptions.ReadTimeout("read timed out"))
    responses.get(APPS, json={"applications": [app_body("a9", SPEC["name"])]})
    app = client.create_application_once(SPEC)
    assert app.id == "a9"
    posts = [c for c in responses.calls if c.request.method == "POST"]
    assert len(posts) == 1
    list_call = [c for c in responses.calls if c.request.method == "GET"][0]
    assert json.loads(query(list_call)["search_filter"]) == {"name": SPEC["name"]}


@responses.activate
def test_create_once_sends_again_when_nothing_was_created(client):
    responses.post(APPS, body=requests.exceptions.ReadTimeout("read timed out"))
    responses.get(APPS, json={"applications": [app_body("a1", SPEC["name"] + "-other")]})
    responses.post(APPS, json=app_body("a2", SPEC["name"]))
    assert client.create_application_once(SPEC).id == "a2"
    assert [c.request.method for c in responses.calls] == ["POST", "GET", "POST"]


# ----------------------------------------------------------------------------- deletes


@responses.activate
def test_delete_whose_first_answer_was_lost_counts_404_as_done(client):
    responses.delete(f"{APPS}/a1", **cml_error(503, "unavailable"))
    responses.delete(f"{APPS}/a1", **cml_error(404, "application not found"))
    client.delete_application("a1")
    assert len(responses.calls) == 2


@responses.activate
def test_delete_of_a_missing_application(client):
    responses.delete(f"{APPS}/a1", **cml_error(404, "application not found"))
    with pytest.raises(CMLNotFoundError):
        client.delete_application("a1")
    client.delete_application("a1", missing_ok=True)


# ----------------------------------------------------------------------------- errors


@responses.activate
@pytest.mark.parametrize(
    ("status", "error_class"),
    [
        (400, CMLInvalidRequestError),
        (401, CMLAuthenticationError),
        (403, CMLPermissionError),
        (404, CMLNotFoundError),
        (409, CMLInvalidRequestError),
        (429, CMLRateLimitedError),
        (500, CMLServerError),
        (503, CMLServerError),
    ],
)
def test_errors_are_typed_and_name_method_path_and_message(client, status, error_class):
    for _ in range(4):
        responses.patch(f"{APPS}/a1", **cml_error(status, f"server says {status}"))
    with pytest.raises(error_class) as info:
        client.update_application("a1", {"description": "x"})
    text = str(info.value)
    assert text.startswith("PATCH /api/v2/projects/proj-1/applications/a1 failed with HTTP")
    assert f"server says {status}" in text
    assert info.value.status == status


@responses.activate
def test_non_json_error_bodies_still_give_a_message(client):
    responses.get(f"{APPS}/a1", status=400, body="<html>Bad things</html>")
    with pytest.raises(CMLInvalidRequestError, match="Bad things"):
        client.get_application("a1")


@responses.activate
def test_the_key_is_redacted_from_errors_and_logs(client, caplog):
    caplog.set_level(logging.DEBUG)
    responses.get(f"{APPS}/a1", **cml_error(503, f"token {KEY} is throttled"))
    responses.get(f"{APPS}/a1", **cml_error(401, f"key {KEY} is not valid"))
    with pytest.raises(CMLAuthenticationError) as info:
        client.get_application("a1")
    assert KEY not in str(info.value) and KEY not in repr(info.value)
    assert "***" in str(info.value)
    assert caplog.records, "the retry should have been logged"
    assert KEY not in caplog.text
    responses.get(f"{APPS}/a2", body=requests.ConnectionError(f"proxy rejected {KEY}"))
    with pytest.raises(CMLConnectionError) as info:
        client.get_application("a2")
    assert KEY not in str(info.value)


# ----------------------------------------------------------------------------- files


@responses.activate
def test_upload_with_overwrite_deletes_first_and_names_the_field_after_the_path(client):
    responses.delete(f"{FILES}/ray/cluster.yaml", **cml_error(404, "not found"))
    responses.post(FILES, json={})
    client.upload_file("/ray/cluster.yaml", b"a: 1\n", overwrite=True)
    post = responses.calls[1].request
    assert b'name="ray/cluster.yaml"' in post.body
    assert b"a: 1\n" in post.body


@responses.activate
def test_download_returns_raw_bytes(client):
    responses.post(f"{FILES}/data/blob.bin:download", body=b"\x00\x01binary")
    assert client.download_file("data/blob.bin") == b"\x00\x01binary"


@responses.activate
def test_list_files_parses_string_sizes(client):
    responses.get(
        f"{FILES}/data",
        json={
            "files": [
                {"path": "data/a", "is_dir": False, "file_size": "12"},
                {"path": "data/sub", "is_dir": True},
            ]
        },
    )
    files = client.list_files("data")
    assert [(f.path, f.is_dir, f.file_size) for f in files] == [
        ("data/a", False, 12),
        ("data/sub", True, 0),
    ]


@responses.activate
def test_upload_with_a_lost_answer_is_looked_up_not_duplicated(client):
    responses.post(FILES, body=requests.ConnectionError("connection reset"))
    responses.get(f"{FILES}/ray", json={"files": [{"path": "ray/a.txt", "is_dir": False}]})
    client.upload_file("ray/a.txt", b"x")
    assert [c.request.method for c in responses.calls] == ["POST", "GET"]


@responses.activate
def test_upload_with_a_lost_answer_is_sent_again_when_absent(client):
    responses.post(FILES, body=requests.ConnectionError("connection reset"))
    responses.get(f"{FILES}/ray", json={"files": []})
    responses.post(FILES, json={})
    client.upload_file("ray/a.txt", b"x")
    assert [c.request.method for c in responses.calls] == ["POST", "GET", "POST"]
