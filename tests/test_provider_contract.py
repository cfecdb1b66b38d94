"""CMLNodeProvider against the real emulator, with real node launchers but no Ray processes.

The launchers run as the applications' scripts; nothing starts Ray (start commands are
empty), so these tests are fast while exercising the same API calls, files and processes.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
import requests
from ray.autoscaler._private.command_runner import ProcessRunnerError
from ray.autoscaler.node_launch_exception import NodeLaunchException
from ray.autoscaler.tags import (
    NODE_KIND_HEAD,
    NODE_KIND_WORKER,
    TAG_RAY_LAUNCH_REQUEST,
    TAG_RAY_NODE_KIND,
    TAG_RAY_NODE_STATUS,
    TAG_RAY_USER_NODE_TYPE,
)

from ray_cml_provider.cml import ApplicationStatus, CMLClient
from ray_cml_provider.contract import NodeSpec
from ray_cml_provider.provider import lookup, workspace_check
from ray_cml_provider.provider.launches import REQUEST_TIMEOUT_ENV
from ray_cml_provider.provider.node_provider import TEARDOWN_LOOK_AGAIN_S, CMLNodeProvider
from tests.conftest import wait_until

pytestmark = pytest.mark.engines

# These engines run no Ray: a short start still passes through STARTING, and keeps it quick.
EMULATOR_ARGS = ["--start-delay-s", "2"]

RUNTIME = (
    "docker.repository.cloudera.com/cloudera/cdsw/"
    "ml-runtime-pbj-workbench-python3.11-standard:2025.09.1-b5"
)
HEAD_CONFIG = {"cpu": 1, "memory": 1, "runtime_identifier": RUNTIME}
GPU_CONFIG = {
    "cpu": 1,
    "memory": 1,
    "nvidia_gpu": 1,
    "runtime_identifier": RUNTIME,
    "_ray_cml": {"setup_commands": [], "start_commands": []},
}
HEAD_TAGS = {TAG_RAY_NODE_KIND: NODE_KIND_HEAD, TAG_RAY_USER_NODE_TYPE: "head"}
WORKER_TAGS = {TAG_RAY_NODE_KIND: NODE_KIND_WORKER, TAG_RAY_USER_NODE_TYPE: "gpu_worker"}


def provider_on(emulator, monkeypatch, cluster: str = "c1", **options) -> CMLNodeProvider:
    """A provider of ``cluster`` on ``emulator``; ``options`` override provider keys."""
    monkeypatch.setenv("TEST_CML_KEY", emulator.api_key)
    config = {
        "type": "external",
        "module": "ray_cml_provider.CMLNodeProvider",
        "host": emulator.url,
        "project_id": emulator.project_id,
        "api_key_env": "TEST_CML_KEY",
        "launch_timeout_s": 30,
        "head_lost_timeout_s": 300,
        "poll_interval_s": 0.2,
        **options,
    }
    return CMLNodeProvider(config, cluster)


@pytest.fixture
def make_provider(emulator, monkeypatch):
    return lambda cluster="c1", **options: provider_on(emulator, monkeypatch, cluster, **options)


@pytest.fixture
def provider(make_provider) -> CMLNodeProvider:
    return make_provider()


def launch(provider, count=1, tags=WORKER_TAGS, config=GPU_CONFIG, resources=None):
    before = set(provider.non_terminated_nodes({}))
    provider.create_node_with_resources_and_labels(
        config, tags, count, resources or {"CPU": 1, "GPU": 1}, {"zone": "a"}
    )
    return sorted(set(provider.non_terminated_nodes({})) - before)


def test_head_node_lifecycle_and_tags_live_on_the_cml_side(provider, make_provider, emulator):
    [head] = launch(provider, tags=HEAD_TAGS, config=HEAD_CONFIG)
    assert len(head) == 8 and provider.is_running(head)
    app = provider.application(head)
    assert app.name == f"ray-c1-head-{head}" and app.nvidia_gpu == 0
    engine = next(p for p in emulator.processes() if p["id"] == app.id)
    assert provider.internal_ip(head) == engine["ip_address"]

    provider.set_node_tags(head, {TAG_RAY_NODE_STATUS: "up-to-date"})
    assert provider.node_tags(head)[TAG_RAY_NODE_STATUS] == "up-to-date"  # at once, here
    assert provider.non_terminated_nodes({TAG_RAY_NODE_STATUS: "up-to-date"}) == [head]
    other = make_provider()  # e.g. the head's own autoscaler: a different process
    assert other.non_terminated_nodes({TAG_RAY_NODE_KIND: NODE_KIND_HEAD}) == [head]
    wait_until(  # written in the background (a process ending waits for it)
        lambda: other.non_terminated_nodes({TAG_RAY_NODE_STATUS: "up-to-date"}) == [head]
    )
    assert other.node_tags(head)["ray-cluster-name"] == "c1"

    # The head's own autoscaler never deletes its head (v2 can ask, after Ray restarted on a
    # head whose GCS kept its state); `ray down`, from outside, does.
    with pytest.MonkeyPatch.context() as inside_the_head:
        inside_the_head.setenv("RAY_CML_NODE_KIND", NODE_KIND_HEAD)
        inside_the_head.setenv("RAY_CML_NODE_ID", head)
        other.terminate_nodes([head])
    assert other.non_terminated_nodes({}) == [head]

    provider.terminate_node(head)
    assert provider.non_terminated_nodes({}) == []
    assert other.nodes_for_teardown({}) == []
    # Only `ray down` asks for nodes_for_teardown: Ray's fixed 5 s wait after the deletes
    # is shortened in its process. A Ray that renamed the constant would fail here.
    from ray.autoscaler._private import commands

    assert commands.POLL_INTERVAL == TEARDOWN_LOOK_AGAIN_S


def test_workers_get_their_identity_and_exact_resources(provider, emulator):
    [head] = launch(provider, tags=HEAD_TAGS, config=HEAD_CONFIG)
    workers = launch(provider, count=3, resources={"CPU": 1, "GPU": 1, "accelerator_type:A10G": 1})
    assert len(workers) == 3
    client = CMLClient(**emulator.client_settings())
    for node_id in workers:
        app = client.get_application(provider.application(node_id).id)
        env = app.environment
        assert env["RAY_CLOUD_INSTANCE_ID"] == node_id
        assert env["RAY_NODE_TYPE_NAME"] == "gpu_worker"
        assert json.loads(env["RAY_OVERRIDE_RESOURCES"])["accelerator_type:A10G"] == 1
        assert json.loads(env["RAY_OVERRIDE_LABELS"]) == {"zone": "a"}
        assert env["RAY_HEAD_IP"].startswith("127.")
        assert env["RAY_CML_HEAD_NODE_ID"] == head  # whose node.json a worker follows
        assert emulator.api_key not in json.dumps(app.raw), "the user's key stays on the laptop"
        assert app.nvidia_gpu == 1
    assert sorted(provider.non_terminated_nodes({TAG_RAY_USER_NODE_TYPE: "gpu_worker"})) == workers
    # Each worker answers CML's status poll on its application's port (its URL shows it).
    engines = {p["id"]: p for p in emulator.processes()}
    engine = engines[provider.application(workers[0]).id]
    page = requests.get(f"http://{engine['ip_address']}:{engine['app_port']}/", timeout=5)
    assert page.status_code == 200
    assert page.text == f"ray-cml worker node {workers[0]} of cluster c1: running Ray\n"
    provider.terminate_nodes(workers)
    assert provider.non_terminated_nodes({TAG_RAY_NODE_KIND: NODE_KIND_WORKER}) == []


def test_nodes_are_told_where_the_ray_token_is_never_the_token(
    make_provider, emulator, monkeypatch
):
    provider = make_provider()
    [head] = launch(provider, tags=HEAD_TAGS, config=HEAD_CONFIG)
    [worker] = launch(provider)
    token_file = emulator.project_dir / ".ray-cml" / "c1" / "auth" / "token"
    token = token_file.read_text()
    client = CMLClient(**emulator.client_settings())
    for node_id in (head, worker):
        app = client.get_application(provider.application(node_id).id)
        assert app.environment["RAY_CML_AUTH_TOKEN_FILE"] == ".ray-cml/c1/auth/token"
        assert token not in json.dumps(app.raw)
        # Only variables the launcher knows (contract.NodeSpec).
        assert {k for k in app.environment if k.startswith("RAY_CML_")} <= set(NodeSpec.variables())
    info = json.loads(client.download_file(f".ray-cml/c1/nodes/{head}/node.json"))
    assert info["ray_auth"] == "token" and info["auth_token_path"] == str(token_file)
    # A new head of the same cluster (`ray up` after its head died) keeps the token.
    provider.terminate_nodes([head, worker])
    launch(provider, tags=HEAD_TAGS, config=HEAD_CONFIG)
    assert token_file.read_text() == token
    assert sorted(p.name for p in token_file.parent.iterdir()) == [
        "endpoint_key",
        "metrics_key",
        "token",
    ]

    # Turned off: no token, and the node is told nothing.
    [off] = launch(
        make_provider("c2", ray_auth_mode="disabled"), tags=HEAD_TAGS, config=HEAD_CONFIG
    )
    off_app = client.list_applications({"name": f"ray-c2-head-{off}"})[0]
    assert "RAY_CML_AUTH_TOKEN_FILE" not in off_app.environment
    off_secrets = emulator.project_dir / ".ray-cml" / "c2" / "auth"
    assert sorted(p.name for p in off_secrets.iterdir()) == ["endpoint_key", "metrics_key"]
    # The head's own autoscaler creates workers in its head's mode, whatever the config says.
    monkeypatch.setenv("RAY_CML_NODE_KIND", "head")
    assert make_provider("c2").ray_auth_mode == "disabled"
    monkeypatch.setenv("RAY_CML_AUTH_TOKEN_FILE", ".ray-cml/c1/auth/token")
    assert make_provider("c1", ray_auth_mode="disabled").ray_auth_mode == "token"


def count_calls(provider, monkeypatch, timed: bool = False) -> list[tuple]:
    """From now on, each CML call the provider makes: (method, last part of the path), with
    ``timed`` also (sent, answered) by the monotonic clock, recorded once answered."""
    transport = provider.client._transport
    calls: list[tuple] = []
    sent = transport.request

    def counted(method: str, path: str, **kwargs):
        call = (method, path.rsplit("/", 1)[-1])
        if not timed:
            calls.append(call)
            return sent(method, path, **kwargs)
        started = time.monotonic()
        try:
            return sent(method, path, **kwargs)
        finally:
            calls.append((*call, started, time.monotonic()))

    monkeypatch.setattr(transport, "request", counted)
    return calls


def test_one_list_call_per_update_at_steady_state(provider, monkeypatch):
    launch(provider, tags=HEAD_TAGS, config=HEAD_CONFIG)
    nodes = launch(provider, count=2)
    for node_id in provider.non_terminated_nodes({}):
        provider.internal_ip(node_id)  # cached once per node, as the autoscaler does
    # The provider's own calls (the emulator also counts the nodes' launchers, which poll
    # their mailboxes on their own time).
    calls = count_calls(provider, monkeypatch)
    updates = 5
    for _ in range(updates):
        for node_id in provider.non_terminated_nodes({}):
            provider.node_tags(node_id)
            provider.is_running(node_id)
            provider.internal_ip(node_id)
            provider.is_terminated(node_id)
    assert calls == [("GET", "applications")] * updates
    assert len(nodes) == 2


def test_two_clusters_in_one_project_never_see_each_other(make_provider):
    alpha, alpha_beta = make_provider("a"), make_provider("a-b")
    [head_a] = launch(alpha, tags=HEAD_TAGS, config=HEAD_CONFIG)
    [head_ab] = launch(alpha_beta, tags=HEAD_TAGS, config=HEAD_CONFIG)
    assert alpha.non_terminated_nodes({}) == [head_a]
    assert alpha_beta.non_terminated_nodes({}) == [head_ab]
    alpha.terminate_nodes(alpha.nodes_for_teardown({}))
    alpha.cleanup_cluster_resources()
    assert alpha_beta.non_terminated_nodes({}) == [head_ab]
    assert alpha_beta.is_running(head_ab)


def test_a_failed_node_is_dropped_and_deleted(provider, emulator):
    launch(provider, tags=HEAD_TAGS, config=HEAD_CONFIG)
    [worker] = launch(provider)
    emulator.crash(provider.application(worker).id)
    wait_until(lambda: worker not in provider.non_terminated_nodes({}), what="worker dropped")
    wait_until(lambda: worker not in provider.nodes_for_teardown({}), what="FAILED app deleted")


def test_over_quota_launch_times_out_is_deleted_and_reported(start_emulator, monkeypatch):
    # Starts faster than the launch timeout; only the quota holds the worker back.
    emulator = start_emulator("--max-gpus", "0", "--start-delay-s", "0.5")
    provider = provider_on(emulator, monkeypatch, "quota", launch_timeout_s=1.5)
    launch(provider, tags=HEAD_TAGS, config=HEAD_CONFIG)
    started = time.monotonic()
    with pytest.raises(NodeLaunchException) as info:
        launch(provider)
    assert "APPLICATION_STARTING after 2 s" in info.value.description
    assert "quota" in info.value.description
    assert time.monotonic() - started < 10
    assert provider.non_terminated_nodes({TAG_RAY_NODE_KIND: NODE_KIND_WORKER}) == []
    assert len(provider.nodes_for_teardown({})) == 1  # just the head


def test_a_create_cml_rejects_reports_cmls_message(provider):
    launch(provider, tags=HEAD_TAGS, config=HEAD_CONFIG)
    bad = {**GPU_CONFIG, "runtime_identifier": "no/such:runtime"}
    with pytest.raises(NodeLaunchException) as info:
        launch(provider, config=bad)
    assert "not an enabled runtime" in info.value.description
    assert "POST /api/v2/projects/" in info.value.description


def test_a_worker_whose_head_is_gone_deletes_itself(make_provider):
    # Longer than the start delay: the worker gives up on its head only once it is RUNNING.
    provider = make_provider(head_lost_timeout_s=5)
    [head] = launch(provider, tags=HEAD_TAGS, config=HEAD_CONFIG)  # no GCS ever listens
    [worker] = launch(provider)
    provider.terminate_node(head)
    wait_until(
        lambda: provider.nodes_for_teardown({}) == [],
        timeout_s=30,
        what=f"worker {worker} to delete its own application",
    )


@pytest.mark.parametrize("file_delay_s", [0, 600])
def test_command_runner_runs_commands_and_copies_files(
    provider, emulator, tmp_path, capsys, file_delay_s
):
    # With 600 s between a write and its sight on the other side (NFS's attribute cache,
    # far longer than the test's timeout), nothing here may wait for the mount: requests,
    # results, node.json and file mounts all travel through the files API.
    emulator.set_faults(file_delay_s=file_delay_s)
    [head] = launch(provider, tags=HEAD_TAGS, config=HEAD_CONFIG)
    runner = provider.get_command_runner("", head, {}, "c1", None, True)
    assert (
        runner.run(
            "echo hello $GREETING", with_output=True, environment_variables={"GREETING": "world"}
        ).strip()
        == "hello world"
    )
    runner.run("echo printed")
    assert "printed" in capsys.readouterr().out
    with pytest.raises(ProcessRunnerError) as info:
        runner.run("echo failing; exit 3")
    assert info.value.code == 3
    with pytest.raises(SystemExit) as exited:
        runner.run("exit 4", exit_on_fail=True)
    assert exited.value.code == 4

    (tmp_path / "one.txt").write_text("one")
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "two.txt").write_text("two")
    runner.run_rsync_up(str(tmp_path / "one.txt"), "~/ray_bootstrap_config.yaml")
    runner.run_rsync_up(str(tmp_path / "tree") + "/", "~/tree")
    assert (
        runner.run("cat ~/ray_bootstrap_config.yaml ~/tree/sub/two.txt", with_output=True)
        == "onetwo"
    )
    assert runner.run("echo $HOME", with_output=True).strip().endswith(".ray-cml/c1/home")
    # Every command asks Ray for token authentication, with the cluster's token file, which
    # the node saw at once though the laptop wrote it through the API (NFS delay or not).
    token_file = emulator.project_dir / ".ray-cml" / "c1" / "auth" / "token"
    assert runner.run("echo $RAY_AUTH_MODE $RAY_AUTH_TOKEN_PATH", with_output=True).split() == [
        "token",
        str(token_file),
    ]
    runner.run_rsync_down("~/tree/sub/two.txt", str(tmp_path / "back.txt"))
    assert (tmp_path / "back.txt").read_text() == "two"

    # `ray stop` through the runner ends only this node's Ray, never the launcher.
    assert "Stopped Ray on this node" in runner.run("ray stop", with_output=True)
    assert runner.run("echo still here", with_output=True).strip() == "still here"
    assert provider.application(head).status == ApplicationStatus.RUNNING


def test_a_command_costs_one_upload_and_its_polls_and_the_node_clears_its_mailbox(
    provider, emulator, monkeypatch
):
    """At CML's 100-300 ms a request, every round trip a command waits on is felt in
    `ray up`: the runner posts the request and polls for the one result file; it deletes
    nothing (the node clears the request once answered and keeps the result a while)."""
    [head] = launch(provider, tags=HEAD_TAGS, config=HEAD_CONFIG)
    runner = provider.get_command_runner("", head, {}, "c1", None, True)
    runner.run("true")  # the first contact: node.json says the environment is ready
    calls = count_calls(provider, monkeypatch)
    with pytest.raises(ProcessRunnerError) as failed:
        runner.run("echo one; exit 2")
    assert failed.value.code == 2
    assert calls[0] == ("POST", "files")
    assert {method for method, _ in calls[1:]} == {"POST"}
    assert all(name.endswith(".result:download") for _, name in calls[1:]), calls
    folder = emulator.project_dir / ".ray-cml" / "c1" / "nodes" / head
    wait_until(lambda: not list((folder / "inbox").glob("*.json")), what="the request cleared")
    # Kept a while for a late poll: `true` and the failing command; no environment report
    # was asked for (node.json said it).
    assert len(list((folder / "outbox").glob("*.result"))) == 2


def test_rays_ready_probe_costs_no_command_and_a_poll_waits_for_the_nodes_upload(
    provider, make_provider, emulator, monkeypatch, tmp_path
):
    """Two round trips `ray up` no longer waits on at CML's 100-300 ms a request: Ray's
    "is SSH up?" probe (`uptime`, run on the host) is answered by the launcher's node.json,
    and a command's first poll is sent only once the node could have uploaded its answer
    (one more round trip after the request's own upload)."""
    [head] = launch(provider, tags=HEAD_TAGS, config=HEAD_CONFIG)
    runner = provider.get_command_runner("", head, {}, "c1", None, True)
    calls = count_calls(provider, monkeypatch, timed=True)
    assert runner.run("uptime", timeout=10, run_env="host") == ""
    # node.json read (again while the launcher has not published it yet), no request posted
    assert {(method, name) for method, name, _, _ in calls} == {("POST", "node.json:download")}
    # `ray exec CONFIG uptime` is a command like any other: it runs on the node.
    assert "load average" in runner.run("uptime", with_output=True)

    emulator.set_faults(latency_ms=200)
    calls.clear()
    runner.run("true")
    [(_, _, sent, answered)] = [c for c in calls if c[:2] == ("POST", "files")]
    first_poll = min(c[2] for c in calls if c[1].endswith(".result:download"))
    assert first_poll - answered >= 0.9 * (answered - sent), calls

    # A file copy as a first contact (`ray submit`'s script) is posted while node.json is read.
    runner = make_provider().get_command_runner("", head, {}, "c1", None, True)
    calls = count_calls(runner.provider, monkeypatch, timed=True)
    source = tmp_path / "script.py"
    source.write_text("print('hi')")
    runner.run_rsync_up(str(source), "~/script.py")
    [(_, _, _, info_answered)] = [c for c in calls if c[1] == "node.json:download"]
    [(_, _, copy_sent, _)] = [c for c in calls if c[1] == "files" and c[0] == "POST"]
    assert copy_sent < info_answered, calls


def test_a_cml_outage_does_not_make_the_autoscaler_fail(provider, emulator):
    [head] = launch(provider, tags=HEAD_TAGS, config=HEAD_CONFIG)
    provider.client._transport.retry = type(provider.client._transport.retry)(
        max_attempts=2, backoff_base_s=0.01
    )
    emulator.set_faults(fault_rate=1.0)
    try:
        assert provider.non_terminated_nodes({}) == [head]  # the last listing, no exception
    finally:
        emulator.set_faults(fault_rate=0.0)
    assert provider.non_terminated_nodes({}) == [head]


def workspace_config(emulator, **provider) -> dict:
    import yaml

    config = yaml.safe_load(
        (Path(__file__).parent.parent / "cluster-configs" / "local-emulator.yaml").read_text()
    )
    config["provider"].update(host=emulator.url, project_id=emulator.project_id, **provider)
    return config


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda c, env: env.setenv("CML_API_KEY", "wrong-key"),
            "ray-cml: CML refused the API key (Unauthorized: missing or invalid API key); check "
            "the key in $CML_API_KEY",
        ),
        (
            lambda c, env: c["provider"].update(project_id="nope-nope"),
            "ray-cml: project 'nope-nope' not found; check provider.project_id",
        ),
        (
            lambda c, env: c["available_node_types"]["head"]["node_config"].update(
                runtime_identifier="no/such:runtime"
            ),
            "ray-cml: available_node_types.head.node_config.runtime_identifier: 'no/such:runtime' "
            "is not a runtime of this workspace",
        ),
    ],
)
def test_workspace_problems_stop_ray_up_with_one_line(emulator, monkeypatch, change, message):
    monkeypatch.setenv("CML_API_KEY", emulator.api_key)
    config = workspace_config(emulator)
    change(config, monkeypatch)
    emulator.reset_stats()
    with pytest.raises(SystemExit) as info:
        CMLNodeProvider.bootstrap_config(config)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)
    assert not any(
        k.startswith(("POST", "PATCH", "DELETE")) for k in emulator.stats()["requests"]
    ), "nothing was created or changed"


def test_the_first_listing_is_asked_beside_the_workspace_check(emulator, monkeypatch):
    """Every Ray command lists its cluster right after it bootstraps its config: the listing
    is asked beside the workspace check's two calls (one round trip less at CML's 100-300
    ms), and the provider's first listing takes it, once and only while fresh."""
    monkeypatch.setenv("CML_API_KEY", emulator.api_key)
    config = workspace_config(emulator)
    [head] = launch(provider_on(emulator, monkeypatch, config["cluster_name"]), tags=HEAD_TAGS)

    def first_listings(fresh_s: float) -> list[tuple[str, str]]:
        monkeypatch.setattr(workspace_check, "_fit", set())  # the check is once per process
        monkeypatch.setattr(lookup, "PREFETCH_FRESH_S", fresh_s)
        CMLNodeProvider.bootstrap_config(config)
        provider = CMLNodeProvider(config["provider"], config["cluster_name"])
        calls = count_calls(provider, monkeypatch)
        assert provider.non_terminated_nodes({}) == [head]
        listed_first = list(calls)
        assert provider.non_terminated_nodes({}) == [head]
        assert calls[len(listed_first) :] == [("GET", "applications")]  # then CML's own
        return listed_first

    assert first_listings(fresh_s=60.0) == []
    assert first_listings(fresh_s=0.0) == [("GET", "applications")]  # too old by then


def test_a_node_restarted_by_cml_removes_itself_instead_of_rejoining(start_emulator, monkeypatch):
    emulator = start_emulator("--restart-failed", "3", "--restart-delay-s", "0.2")
    provider = provider_on(emulator, monkeypatch, "zombie")
    [head] = launch(provider, tags=HEAD_TAGS, config=HEAD_CONFIG)
    [worker] = launch(provider)
    app_id = provider.application(worker).id
    emulator.crash(app_id)  # FAILED; CML restarts it before the provider looks again
    client = CMLClient(**emulator.client_settings())
    wait_until(
        lambda: app_id not in [a.id for a in client.list_applications()],
        what="the restarted node to delete its own application",
    )
    log = (emulator.log_dir / f"{app_id}.log").read_text()
    assert "was restarted by CML after a failure: removing it" in log
    assert provider.non_terminated_nodes({}) == [head]


def launch_in_background(provider, tags) -> threading.Thread:
    """``create_node`` as the autoscaler's launcher threads call it: it returns once the
    application runs, meanwhile the test looks at what the provider shows."""
    thread = threading.Thread(
        target=provider.create_node_with_resources_and_labels,
        args=(GPU_CONFIG, tags, 1, {"CPU": 1, "GPU": 1}, {}),
        daemon=True,
    )
    thread.start()
    return thread


CREATE = "POST /api/v2/projects/{project_id}/applications"


def test_a_slow_launch_asked_again_by_v2_creates_no_second_application(start_emulator, monkeypatch):
    emulator = start_emulator("--start-delay-s", "4")
    provider = provider_on(emulator, monkeypatch)
    launch(provider, tags=HEAD_TAGS, config=HEAD_CONFIG)
    emulator.reset_stats()
    tags = {**WORKER_TAGS, TAG_RAY_LAUNCH_REQUEST: "request-1"}
    first = launch_in_background(provider, tags)
    wait_until(lambda: emulator.stats()["requests"].get(CREATE), what="the first create")
    started = time.monotonic()
    # v2 re-launches a request it has waited on: the application still starting counts.
    provider.create_node_with_resources_and_labels(GPU_CONFIG, tags, 1, {}, {})
    assert time.monotonic() - started < 1, "the repeated launch must not wait"
    first.join(30)
    assert emulator.stats()["requests"][CREATE] == 1
    workers = provider.non_terminated_nodes({TAG_RAY_NODE_KIND: NODE_KIND_WORKER})
    assert len(workers) == 1
    # Another request of the same type is new work: it gets its own application.
    other = {**WORKER_TAGS, TAG_RAY_LAUNCH_REQUEST: "request-2"}
    provider.create_node_with_resources_and_labels(GPU_CONFIG, other, 1, {}, {})
    assert emulator.stats()["requests"][CREATE] == 2


def test_a_starting_node_is_hidden_only_until_v2_would_give_its_request_up(
    start_emulator, monkeypatch
):
    # v2 keeps a request open for about 4 request timeouts; shown after 3.5 (here 3.5 s).
    monkeypatch.setenv(REQUEST_TIMEOUT_ENV, "1")
    emulator = start_emulator()
    provider = provider_on(emulator, monkeypatch)
    launch(provider, tags=HEAD_TAGS, config=HEAD_CONFIG)
    emulator.set_faults(schedule_delay_s=8)  # from now on: 8 s with no process, then 2 s
    workers = {TAG_RAY_NODE_KIND: NODE_KIND_WORKER}
    started = time.monotonic()
    thread = launch_in_background(provider, WORKER_TAGS)
    wait_until(lambda: provider.nodes_for_teardown(workers), what="the worker application")
    assert provider.non_terminated_nodes(workers) == []  # STARTING, no process, Ray can't know
    [worker] = wait_until(lambda: provider.non_terminated_nodes(workers), what="shown")
    assert 3.5 <= time.monotonic() - started < 8  # before its process even started
    assert provider.node_tags(worker)[TAG_RAY_USER_NODE_TYPE] == "gpu_worker"
    assert not provider.is_running(worker)  # still STARTING: shown, not running
    thread.join(30)
    assert provider.is_running(worker)


def test_a_head_that_does_not_start_ends_ray_up_with_one_sentence(start_emulator, monkeypatch):
    emulator = start_emulator("--max-cpu", "0")  # nothing can start
    provider = provider_on(emulator, monkeypatch, launch_timeout_s=1)
    with pytest.raises(SystemExit) as info:
        launch(provider, tags=HEAD_TAGS, config=HEAD_CONFIG)
    message = str(info.value)
    assert message.startswith("ray-cml: the head did not start: ray-c1-head-")
    assert "is APPLICATION_STARTING after 1 s (over the workspace's quota?)" in message
    assert provider.nodes_for_teardown({}) == []  # the stuck application was deleted


def test_a_head_without_cmls_login_gets_an_endpoint_key_by_file_and_a_locked_url(
    provider, emulator
):
    # A Serve port of its own: a Serve proxy of another test on 0.0.0.0:8000 answers on every
    # loopback address of this machine (on CML each engine has an address of its own).
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        serve_port = str(sock.getsockname()[1])
    config = {
        **HEAD_CONFIG,
        "bypass_authentication": True,
        "environment": {"RAY_CML_SERVE_PORT": serve_port},
    }
    [head] = launch(provider, tags=HEAD_TAGS, config=config)
    app = provider.application(head)
    assert app.raw["bypass_authentication"] is True
    key_file = emulator.project_dir / ".ray-cml" / "c1" / "auth" / "endpoint_key"
    key = key_file.read_text().strip()
    assert len(key) >= 40
    record = json.dumps(provider.client.get_application(app.id).raw)
    assert key not in record and "RAY_CML_ENDPOINT_KEY_FILE" in record  # the file, never the key
    # Through CML's proxy (played by the emulator's ingress), with no login in front: the
    # head's gateway asks for the key itself, for the API and for the dashboard alike.
    url = f"{emulator.url}/apps/{app.subdomain}"
    wait_until(
        lambda: requests.get(f"{url}/v1/models", timeout=5).status_code == 401,
        30,
        "the head's gateway to answer on its URL",
    )
    job = {"entrypoint": "echo ran"}
    assert requests.post(f"{url}/api/jobs/", json=job, timeout=5).status_code == 401
    keyed = {"Authorization": f"Bearer {key}"}
    assert requests.post(f"{url}/api/jobs/", json=job, headers=keyed, timeout=5).status_code == 401
    answer = requests.get(f"{url}/v1/models", headers=keyed, timeout=5)
    assert answer.status_code == 502  # let in; no Serve runs on this Ray-less head
    assert "Ray Serve's HTTP proxy does not answer" in answer.json()["error"]
    [worker] = launch(provider)
    assert "RAY_CML_ENDPOINT_KEY_FILE" not in json.dumps(
        provider.client.get_application(provider.application(worker).id).raw
    )


def test_the_heads_door_holds_against_a_workspace_engine_that_dials_it_directly(provider, emulator):
    """Another engine of the workspace opens the head engine's address and application port
    itself (no CML proxy, no login) with only the model callers' key, and attacks the real
    head: its bootstrap, its launcher and its gateway, as `ray up` starts them. A recorder
    stands in for Serve's proxy on the head's loopback (Ray is not needed for the door)."""
    serve = RecordingServe()
    config = {
        **HEAD_CONFIG,
        "environment": {"RAY_CML_SERVE_PORT": str(serve.port), "RAY_CML_GATEWAY_IDLE_S": "3"},
    }
    [head] = launch(provider, tags=HEAD_TAGS, config=config)  # behind CML's login
    app = provider.application(head)
    engine = next(p for p in emulator.processes() if p["id"] == app.id)
    door = (engine["ip_address"], engine["app_port"])
    auth = emulator.project_dir / ".ray-cml" / "c1" / "auth"
    key, token = (auth / "endpoint_key").read_text().strip(), (auth / "token").read_text().strip()
    base = f"http://{door[0]}:{door[1]}"
    wait_until(
        lambda: requests.get(f"{base}/v1/models", timeout=5).status_code == 401,
        60,
        "the head's gateway on its engine's address",
    )
    keyed = {"Authorization": f"Bearer {key}"}
    try:
        # 1. Smuggling: a body the gateway would once have unframed onto a shared connection.
        hidden = b"GET /v1/SMUGGLED HTTP/1.1\r\nHost: x\r\n\r\n"
        attack = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + key.encode()
            + b"\r\nConnection: keep-alive, content-length\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(hidden)
            + hidden
        )
        for _ in range(3):
            assert send_raw(door, attack).split(b" ")[1] == b"400"
        mine = [requests.get(f"{base}/v1/mine-{i}", headers=keyed, timeout=10) for i in range(10)]
        assert [r.json()["path"] for r in mine] == [f"/v1/mine-{i}" for i in range(10)]
        assert not any("SMUGGLED" in path for path, _ in serve.seen)
        # 2. Neither key nor Ray's token reaches Serve, in any spelling the gateway accepts.
        for headers in (
            keyed,
            {"X-Endpoint-Key": key},
            {"Authorization": f"Bearer {token}"},
            {
                "X-Ray-Authorization": f"Bearer {token}",
                "Cookie": f"ray-authentication-token={token}",
            },
        ):
            assert requests.get(f"{base}/v1/models", headers=headers, timeout=10).ok
        assert not any(key in text or token in text for _, text in serve.seen)
        # 3. 400 stalled callers: an authorised one is served at once; they are all closed.
        stalled = [stall(door, i, key) for i in range(400)]
        started = time.monotonic()
        assert requests.get(f"{base}/v1/models", headers=keyed, timeout=10).ok
        assert time.monotonic() - started < 2
        for sock in stalled:
            sock.settimeout(max(0.5, started + 15 - time.monotonic()))
            assert read_to_close(sock), "a stalled caller was kept past the idle limit"
        assert time.monotonic() - started < 15  # idle_s 3 after they fell silent, and a bit
        # 4. Malformed bytes get an answer and leave no traceback in the head's log.
        for bad in (
            b"\r\n\r\n",
            b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
            b"POST /v1/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + key.encode()
            + b"\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nabc\r\n0\r\n\r\n",
            b"G\x1bET /v1 HTTP/1.1\r\n\r\n",
        ):
            send_raw(door, bad)
        log = Path(engine["log_path"]).read_text(errors="replace")
        assert "Traceback" not in log and "\x1b" not in log
        assert "gateway on port" in log  # the launcher, from the shipped code, opened it
    finally:
        for sock in locals().get("stalled", []):
            sock.close()
        serve.close()


class RecordingServe:
    """Serve's proxy, played on the head's loopback: it answers with the path it got and
    keeps (path, every header as text) of each request."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        seen = self.seen = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
                seen.append((self.path, str(self.headers)))
                body = json.dumps({"path": self.path}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def send_raw(address: tuple[str, int], data: bytes) -> bytes:
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(data)
        return read_to_close(sock, keep=True) or b""


def read_to_close(sock: socket.socket, keep: bool = False) -> bytes | bool:
    """Read until the peer closes: what came (``keep``), or True; False on a time-out."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        return received if keep else False
    return received if keep else True


def stall(address: tuple[str, int], i: int, key: str) -> socket.socket:
    """A caller that starts a request and falls silent: in its head, or in a body (with the
    key), or after a refused head that announces a body it never sends."""
    sock = socket.create_connection(address, timeout=10)
    opening = [
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\n",
        b"POST /v1/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
        b"Content-Length: 1000\r\n\r\nabc" % key.encode(),
        b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n",
    ][i % 3]
    sock.sendall(opening)
    return sock


def test_the_heads_autoscaler_gives_workers_the_code_it_runs_without_a_call(
    make_provider, monkeypatch
):
    """In the head's autoscaler the code to ship is the zip its own Ray was started with (named
    in its environment by `ray up`'s start command): its first scale-up does not list the
    cluster's lib folder to find it (a round trip at CML's 100-300 ms)."""
    shipped = ".ray-cml/c1/lib/ray_cml_provider-0123abcd.zip"
    monkeypatch.setenv(NodeSpec.var("kind"), "head")
    monkeypatch.setenv(NodeSpec.var("cluster"), "c1")
    monkeypatch.setenv(NodeSpec.var("provider_zip"), shipped)
    provider = make_provider()
    calls = count_calls(provider, monkeypatch)
    assert provider.ship_code() == shipped
    assert calls == []
    # A provider of another cluster made there (a job's `ray up`) ships its own code.
    other = make_provider("c2")
    assert other.ship_code().startswith(".ray-cml/c2/lib/")


def test_the_listing_never_waits_on_another_threads_call_to_cml(provider):
    """The head's autoscaler lists the nodes every update. A launch thread uploading the
    launcher or the code, or setting tags, through minutes of API retries must not hold it
    up: an update that waits is an autoscaler that stopped deciding (issue 24)."""
    [head] = launch(provider, tags=HEAD_TAGS, config=HEAD_CONFIG)
    provider._launcher_uploaded, provider._shipped_zip = False, None
    for call, work in (
        ("upload_file", provider._upload_launcher),
        ("list_files", provider.ship_code),
        ("update_application", lambda: provider.set_node_tags(head, {"x": "1"})),
    ):
        held, release = threading.Event(), threading.Event()
        real = getattr(provider.client, call)

        def stuck(*args, real=real, held=held, release=release, **kwargs):
            held.set()  # in CML's hands, as through minutes of retries
            release.wait(60)
            return real(*args, **kwargs)

        setattr(provider.client, call, stuck)
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        assert held.wait(10), call
        started = time.monotonic()
        assert provider.non_terminated_nodes({}) == [head]
        assert provider.node_tags(head)[TAG_RAY_NODE_KIND] == NODE_KIND_HEAD
        assert time.monotonic() - started < 5, call
        release.set()
        thread.join(30)
        setattr(provider.client, call, real)
    assert provider.node_tags(head)["x"] == "1"


def test_a_workspace_that_forbids_unauthenticated_apps_refuses_the_head_in_one_sentence(
    start_emulator, monkeypatch
):
    emulator = start_emulator("--forbid-unauthenticated-apps")
    provider = provider_on(emulator, monkeypatch)
    with pytest.raises(SystemExit) as stopped:
        launch(provider, tags=HEAD_TAGS, config={**HEAD_CONFIG, "bypass_authentication": True})
    message = str(stopped.value)
    assert message.startswith(
        "ray-cml: available_node_types.head.node_config.bypass_authentication: this workspace "
        "does not allow applications without CML's login"
    )
    assert "unauthenticated access to applications is disabled" in message  # CML's words
    assert provider.non_terminated_nodes({}) == []
