"""The operator commands (``ray-cml init``, ``doctor``, ``status``, ``gc``) against the real
emulator, with real node launchers but no Ray processes (Ray's own view is covered by the
end-to-end tests)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import validate_config

from ray_cml_provider import cli
from ray_cml_provider.cml import Application, CMLClient
from ray_cml_provider.ops.doctor import setup_command_problems
from ray_cml_provider.provider.addresses import application_url
from ray_cml_provider.provider.config import validate_cluster_config
from ray_cml_provider.provider.node_provider import CMLNodeProvider
from tests.test_provider_contract import (
    GPU_CONFIG,
    HEAD_CONFIG,
    HEAD_TAGS,
    RUNTIME,
    launch,
    provider_on,
)

pytestmark = pytest.mark.engines

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "cluster-configs"

# These engines run no Ray: a short start still passes through STARTING, and keeps it quick.
EMULATOR_ARGS = ["--start-delay-s", "2"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what the test's own set-up printed
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cluster_yaml(tmp_path: Path, emulator, cluster: str = "c1", **changes) -> Path:
    """local-emulator.yaml pointed at ``emulator`` with the key in $TEST_CML_KEY."""
    config = yaml.safe_load((REPO_CONFIGS / "local-emulator.yaml").read_text())
    config["cluster_name"] = cluster
    config["provider"].update(
        host=emulator.url, project_id=emulator.project_id, api_key_env="TEST_CML_KEY"
    )
    for type_name, node_type in config["available_node_types"].items():
        node_type["node_config"]["runtime_identifier"] = RUNTIME
        if type_name in changes:
            node_type["node_config"].update(changes[type_name])
    path = tmp_path / f"{cluster}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def key_env(emulator, monkeypatch):
    monkeypatch.setenv("TEST_CML_KEY", emulator.api_key)


# ------------------------------------------------------------------------------ init


@pytest.mark.parametrize("target", ["cml", "emulator"])
def test_init_writes_a_config_that_ray_up_accepts(target, tmp_path, capsys):
    out = tmp_path / "cluster.yaml"
    code, stdout, _ = run_cli(
        capsys,
        "init",
        "--target",
        target,
        "--name",
        "team-a",
        "--head-cpu",
        "4",
        "--worker",
        "gpu_worker:cpu=8,memory=32,gpus=2,accelerator=H100,min=1,max=3",
        "--worker",
        "cpu_worker:cpu=4,memory=16,gpus=0,max=5",
        "-o",
        str(out),
    )
    assert code == 0 and "ray-cml doctor" in stdout
    text = out.read_text()
    assert text.startswith("# Ray cluster on")  # commented for the reader
    config = yaml.safe_load(text)
    validate_cluster_config(config)  # ours ...
    validate_config(CMLNodeProvider.fillout_available_node_types_resources(config))  # ... Ray's
    assert config["cluster_name"] == "team-a" and config["max_workers"] == 8
    types = config["available_node_types"]
    assert types["head"]["node_config"]["cpu"] == 4 and types["head"]["resources"]["GPU"] == 0
    gpu = types["gpu_worker"]
    assert (
        gpu["node_config"]["nvidia_gpu"] == 2 and gpu["node_config"]["accelerator_type"] == "H100"
    )
    assert (gpu["min_workers"], gpu["max_workers"]) == (1, 3)
    assert "nvidia_gpu" not in types["cpu_worker"]["node_config"]
    # Nothing to install by hand: the nodes' packages are pip_packages, the provider ships.
    assert config["setup_commands"] == []
    assert config["provider"]["pip_packages"] == ["ray[default,serve]"]

    code, _, err = run_cli(capsys, "init", "-o", str(out))
    assert code == 1 and "exists; pass --force" in err
    assert out.read_text() == text  # nothing lost


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--worker", "gpu:cpu=lots"], "cpu and memory are numbers"),
        (["--worker", "gpu:disk=1"], "'disk=1' is not KEY=VALUE"),
        (["--worker", "head:gpus=1"], "needs its own name"),
        (["--name", "Team_A"], "cluster_name: 'Team_A' cannot form a CML subdomain"),
        (["--worker", "gpu:min=3,max=1"], "min_workers: 3 is more than max_workers 1"),
    ],
)
def test_init_rejects_bad_flags_in_one_line(argv, message, capsys):
    code, stdout, err = run_cli(capsys, "init", *argv)
    assert code == 1 and stdout == ""
    assert message in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------ doctor


def test_doctor_passes_a_ready_workspace(emulator, key_env, tmp_path, capsys):
    code, out, _ = run_cli(
        capsys, "doctor", str(cluster_yaml(tmp_path, emulator)), "--gpu-quota", "4"
    )
    assert code == 0, out
    for check in (
        "config",
        "Ray authentication",
        "host",
        "API key",
        "project",
        "project files",
        "runtimes",
        "shared memory",
        "GPU quota",
        "cluster",
        "provider module",
        "node environment",
    ):
        assert re.search(rf"^ok\s+{check}: ", out, re.M), (check, out)
    assert out.strip().endswith("ready: ray up can start this cluster")
    assert list((emulator.project_dir / ".ray-cml").glob(".doctor-*")) == []  # probe removed


def test_doctor_names_each_problem_and_how_to_fix_it(start_emulator, tmp_path, capsys, monkeypatch):
    emulator = start_emulator("--shared-memory-mb", "64")
    monkeypatch.setenv("TEST_CML_KEY", emulator.api_key)
    # another project application holds a GPU: only 1 of a quota of 2 is free
    client = CMLClient(**emulator.client_settings())
    client.create_application(
        {
            "name": "notebook",
            "subdomain": "notebook",
            "script": "engine.py",
            "cpu": 1,
            "memory": 1,
            "nvidia_gpu": 1,
            "runtime_identifier": RUNTIME,
        }
    )
    path = cluster_yaml(tmp_path, emulator, llm_cpu_worker={"runtime_identifier": "no/such:1"})
    config = yaml.safe_load(path.read_text())
    config["provider"]["ray_auth_mode"] = "disabled"  # allowed, but said: not a problem
    path.write_text(yaml.safe_dump(config))
    code, out, _ = run_cli(capsys, "doctor", str(path), "--gpu-quota", "2")
    assert code == 1
    assert re.search(r"^warning\s+Ray authentication: .*'disabled'.*CML API key", out, re.M)
    assert re.search(
        r"^problem\s+runtimes: .*llm_cpu_worker\.node_config\.runtime_identifier", out, re.M
    )
    assert re.search(r"^problem\s+shared memory: .*64 MB.*Shared Memory Limit", out, re.M)
    assert re.search(
        r"^problem\s+GPU quota: .*up to 2 GPU.*1 held by other.*only 1 free", out, re.M
    )
    assert re.search(r"^ok\s+API key", out, re.M)
    assert out.strip().endswith("3 problem(s)")

    monkeypatch.setenv("TEST_CML_KEY", "wrong-key")
    code, out, _ = run_cli(capsys, "doctor", str(path))
    assert code == 1 and re.search(r"^problem\s+API key: CML refused the API key", out, re.M)
    assert re.search(r"^skip\s+runtimes: needs the checks above", out, re.M)

    unreachable = cluster_yaml(tmp_path, emulator, cluster="c2")
    config = yaml.safe_load(unreachable.read_text())
    config["provider"]["host"] = "http://127.0.0.1:9"  # discard port: nothing listens
    unreachable.write_text(yaml.safe_dump(config))
    code, out, _ = run_cli(capsys, "doctor", str(unreachable))
    assert code == 1 and re.search(
        r"^problem\s+host: http://127.0.0.1:9 does not answer", out, re.M
    )

    broken = tmp_path / "broken.yaml"
    broken.write_text("cluster_name: [unclosed\n")
    emulator.reset_stats()
    code, out, _ = run_cli(capsys, "doctor", str(broken))
    assert code == 1 and out.startswith("problem  config:") and "not valid YAML" in out
    assert emulator.stats()["total"] == 0  # a broken config fails before any API call


def test_doctor_reports_node_environments_built_and_failed(emulator, key_env, tmp_path, capsys):
    """What the nodes will install, whether the project has it built, and a failed build
    with pip's last lines: read through the files API, as the nodes left them."""
    path = cluster_yaml(tmp_path, emulator)
    packages = [f"ray[default]=={ray.__version__}"]
    client = CMLClient(**emulator.client_settings())
    code, out, _ = run_cli(capsys, "doctor", str(path))
    assert code == 0 and re.search(
        r"^ok\s+node environment: gpu_worker: .* is not built in the project yet",
        out,
        re.M,
    ), out
    client.upload_file(
        ".ray-cml/_envs/0123abcd.failed.json",
        json.dumps(
            {
                "at": time.time(),
                "node": "deadbeef",
                "packages": packages,
                "problem": "pip exited with status 1",
                "pip_tail": ["ERROR: No matching distribution found for ray==9.9"],
            }
        ),
    )
    code, out, _ = run_cli(capsys, "doctor", str(path))
    assert code == 1
    assert re.search(
        r"^problem\s+node environment: the last build of .* failed on node deadbeef: .*"
        r"No matching distribution",
        out,
        re.M,
    ), out


def test_doctor_flags_setup_commands_that_undo_the_shipped_provider():
    assert setup_command_problems({"setup_commands": ["pip install numpy"]}, "2.60.0") == []
    [installs] = setup_command_problems(
        {"setup_commands": ['pip install --user "ray[default]==2.60.0" ray-cml-provider']},
        "2.60.0",
    )
    assert "no package index carries" in installs and "ships the provider" in installs
    [other] = setup_command_problems(
        {"worker_setup_commands": ["pip install ray==2.9.0"]}, "2.60.0"
    )
    assert "install Ray 2.9.0 but this machine runs 2.60.0" in other


def test_status_table_and_json_from_cml_alone(emulator, key_env, monkeypatch, tmp_path, capsys):
    provider = provider_on(emulator, monkeypatch, "c1")
    [head] = launch(provider, tags=HEAD_TAGS, config=HEAD_CONFIG)
    workers = launch(provider, count=2)
    client = CMLClient(**emulator.client_settings())
    stray = client.create_application(
        {
            "name": "ray-c1-worker-0badc0de",
            "subdomain": "ray-c1-worker-0badc0de",
            "script": "engine.py",
            "cpu": 1,
            "memory": 1,
            "runtime_identifier": RUNTIME,
        }
    )
    path = cluster_yaml(tmp_path, emulator)

    code, out, _ = run_cli(capsys, "status", "--cml-only", str(path))
    assert code == 0, out
    assert f"cluster c1 in project {emulator.project_id}" in out
    assert "Ray's view: unavailable (not asked (--cml-only))" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("NODE"))
    assert lines[header + 1].split()[:3] == [head, "head", "RUNNING"]  # the head first
    for node_id in workers:
        row = next(line for line in lines if line.startswith(node_id))
        assert re.match(
            rf"{node_id}\s+gpu_worker\s+RUNNING\s+unknown\s+1\s+1G\s+1\s+\d+s\s+"
            rf"{emulator.url}/apps/ray-c1-worker-{node_id}$",
            row,
        )
    assert "0badc0de *" in out and "* stray ray-c1-worker-0badc0de" in out
    assert "GPUs held: 2" in out

    code, out, _ = run_cli(capsys, "status", "--json", "--cml-only", str(path))
    report = json.loads(out)
    assert report["head"] == head and report["gpus_held"] == 2 and report["strays"] == ["0badc0de"]
    assert {n["node_id"] for n in report["nodes"]} == {head, *workers, "0badc0de"}
    by_id = {n["node_id"]: n for n in report["nodes"]}
    engines = {p["id"]: p for p in emulator.processes()}
    for node_id in workers:
        node = by_id[node_id]
        assert node["ip"] == engines[node["application_id"]]["ip_address"]
        assert node["url"] == f"{emulator.url}/apps/{node['application']}"  # CML's proxy
    assert by_id["0badc0de"]["application_id"] == stray.id
    assert report["gcs_address"].startswith(by_id[head]["ip"] + ":")
    # Where a session finds the Ray token, never the token; `ray-cml token` prints it.
    token_file = emulator.project_dir / ".ray-cml" / "c1" / "auth" / "token"
    assert report["ray_auth"] == "token" and report["auth_token_path"] == str(token_file)
    assert token_file.read_text() not in out
    code, out, _ = run_cli(capsys, "token", str(path))
    assert code == 0 and out.strip() == token_file.read_text()

    # A deleted GPU worker's time stays in the cluster's GPU-hours (kept in whole seconds).
    time.sleep(2)
    provider.terminate_node(workers[0])
    code, out, _ = run_cli(capsys, "status", "--json", "--cml-only", str(path))
    report = json.loads(out)
    assert report["gpus_held"] == 1 and workers[0] not in {n["node_id"] for n in report["nodes"]}
    ledger = list((emulator.project_dir / ".ray-cml" / "c1" / "ledger").iterdir())
    assert [p.name.split("_")[:2] for p in ledger] == [[workers[0], "1"]]
    assert report["gpu_hours"] > 0


def test_status_of_a_cluster_that_is_down_and_of_a_bad_key(
    emulator, key_env, monkeypatch, tmp_path, capsys
):
    path = cluster_yaml(tmp_path, emulator, cluster="nothing-here")
    code, out, _ = run_cli(capsys, "status", str(path))
    assert code == 0 and "no applications: the cluster is down" in out
    code, out, err = run_cli(capsys, "token", str(path))
    assert code == 1 and out == "" and "has no Ray token: it is down" in err
    code, out, err = run_cli(capsys, "endpoint-key", str(path))
    assert code == 1 and out == "" and "has no endpoint key: it is down" in err
    monkeypatch.setenv("TEST_CML_KEY", "wrong")
    code, out, err = run_cli(capsys, "status", str(path))
    assert code == 1 and out == "" and err.startswith("ray-cml: CML refused the API key")
    assert "Traceback" not in err


# ------------------------------------------------------------------------------ gc


def test_gc_lists_then_deletes_only_clusters_whose_head_is_gone(
    emulator, key_env, monkeypatch, tmp_path, capsys
):
    alive = provider_on(emulator, monkeypatch, "alive")
    launch(alive, tags=HEAD_TAGS, config=HEAD_CONFIG)
    launch(alive)
    # a worker named ray-my-head-lab-worker-... must not pass for a head
    orphaned = provider_on(emulator, monkeypatch, "my-head-lab")
    [gone_head] = launch(orphaned, tags=HEAD_TAGS, config=HEAD_CONFIG)
    orphan_workers = launch(orphaned, count=2, config={**GPU_CONFIG})
    client = CMLClient(**emulator.client_settings())
    client.stop_application(orphaned.application(gone_head).id)  # e.g. stopped in CML's UI
    foreign = client.create_application(
        {
            "name": "ray-my-head-lab-notes",
            "subdomain": "notes",
            "script": "engine.py",
            "cpu": 1,
            "memory": 1,
            "runtime_identifier": RUNTIME,
        }
    )
    config = cluster_yaml(tmp_path, emulator, cluster="alive")

    code, out, _ = run_cli(capsys, "gc", str(config))
    assert code == 0
    summary = "cluster my-head-lab: no live head; would delete 3 application(s) holding 2 GPU(s)"
    assert summary in out
    assert "alive" not in out.replace("no live head", "") and "run again with --yes" in out
    assert len(client.list_applications()) == 6  # a dry run deletes nothing

    code, out, _ = run_cli(capsys, "gc", "--json", "--yes", str(config))
    report = json.loads(out)
    assert code == 0 and report["deleted"] and report["problems"] == []
    [group] = report["clusters"]
    assert group["cluster"] == "my-head-lab"
    assert {a["name"].rsplit("-", 1)[-1] for a in group["applications"]} == {
        gone_head,
        *orphan_workers,
    }
    left = {a.name for a in client.list_applications()}
    assert foreign.name in left and sum(n.startswith("ray-alive-") for n in left) == 2
    assert len(left) == 3
    assert not (emulator.project_dir / ".ray-cml" / "my-head-lab").exists()
    assert (emulator.project_dir / ".ray-cml" / "alive").exists()

    code, out, _ = run_cli(capsys, "gc", str(config))
    assert code == 0 and out.startswith("nothing to collect")


def test_application_urls_on_cml_and_on_the_emulator():
    app = Application(id="a1", name="ray-c1-head-1a2b3c4d", subdomain="ray-c1-head-1a2b3c4d")
    on_cml = application_url("https://ml-1234.example.cloudera.site", app)
    assert on_cml == "https://ray-c1-head-1a2b3c4d.ml-1234.example.cloudera.site"
    # The emulator has no DNS for subdomains: its ingress serves the URL under /apps/.
    local = application_url("http://127.0.0.1:8080/", app)
    assert local == "http://127.0.0.1:8080/apps/ray-c1-head-1a2b3c4d"
