"""The contract between the provider side and the node side (``contract.py``): each record
makes one JSON round-trip and refuses anything else, the variables read back what was
written, and nothing else in the package spells the contract's names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ray_cml_provider import contract
from ray_cml_provider.contract import (
    AutoscalerRecord,
    AutostopRecord,
    CommandVar,
    Handoff,
    NodeFolder,
    NodeInfo,
    NodeSpec,
    RecoveryRecord,
    Request,
    Result,
)

PACKAGE = Path(contract.__file__).parent


@pytest.mark.parametrize(
    "record",
    [
        NodeInfo("0123abcd", "head", "10.0.0.7", 6379, client_port=10001, life=2),
        Request(cmd="ray start --head", env={"A": "1"}, files=[{"path": "~/x", "data": ""}]),
        Request(report=Request.ENVIRONMENT_REPORT),
        RecoveryRecord("ray start --head --port=6379", {"RAY_X": "1"}),
        AutostopRecord("2026-12-03T10:00:00Z", 5.5, 5.0, "0123abcd"),
        AutoscalerRecord(2, 1796290000.5, 61.2, "Thread 0x1 ..."),
    ],
)
def test_each_record_makes_one_round_trip(record):
    assert type(record).from_json(record.to_json()) == record


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"[]",
        b'"x"',
        b"{",
        b'{"node_id": "a"}',
        b'{"node_id": 1, "kind": "head", "ip": "", "gcs_port": 1}',
        b'{"node_id": "a", "kind": "head", "ip": "x", "gcs_port": "6379"}',
    ],
)
def test_a_node_record_that_is_not_one_is_refused(data):
    with pytest.raises(ValueError):
        NodeInfo.from_json(data)


def test_a_newer_writers_fields_are_left_out():
    info = NodeInfo.from_json(
        b'{"node_id": "a", "kind": "worker", "ip": "x", "gcs_port": 1, "from_the_future": true}'
    )
    assert info == NodeInfo("a", "worker", "x", 1)


def test_a_request_knows_a_head_start_and_a_ray_stop():
    assert Request(cmd="ray stop").is_ray_stop and not Request(cmd="ray stop; rm -rf /").is_ray_stop
    assert Request(cmd="ray start --head --port=$RAY_CML_GCS_PORT").starts_head
    assert not Request(cmd="ray start --address=h:6379").starts_head


def test_a_result_is_one_file_that_knows_when_it_is_whole():
    whole = Result(3, b"line\nanother\n").to_bytes()
    assert Result.from_bytes(whole) == Result(3, b"line\nanother\n")
    assert Result.from_bytes(Result(0).to_bytes()) == Result(0, b"")
    for partial in (whole[:-1], whole[:10], b"", b"ray-cml-result 3", b"junk\n", whole + b"x"):
        assert Result.from_bytes(partial) is None, partial


def test_the_node_spec_reads_back_what_the_provider_wrote():
    spec = NodeSpec(
        cluster="c-1",
        node_id="0123abcd",
        kind="worker",
        cluster_dir=".ray-cml/c-1",
        pip_packages=["ray[default]==2.60.0"],
        setup_commands=["echo a"],
        start_commands=["ray start --address=$RAY_HEAD_IP:$RAY_HEAD_GCS_PORT"],
        head_recovery=True,
        head_ip="10.0.0.2",
        head_gcs_port=6380,
        head_lost_timeout_s=12.5,
    )
    env = spec.to_env()
    assert NodeSpec.from_env(env) == spec
    assert env["RAY_HEAD_IP"] == "10.0.0.2" and env["RAY_CML_HEAD_RECOVERY"] == "1"
    assert "RAY_CML_AUTOSTOP_MINUTES" not in env  # defaults are not written
    assert NodeSpec.from_env({}).kind == "worker" and not NodeSpec.from_env({}).is_head
    with pytest.raises(ValueError, match="RAY_CML_HEAD_GCS_PORT|RAY_HEAD_GCS_PORT"):
        NodeSpec.from_env({"RAY_HEAD_GCS_PORT": "six"})
    handoff = Handoff(site="/s", summary="reused", error="", runtime_pythonpath="/p")
    assert Handoff.from_env(handoff.to_env()) == handoff


def test_a_node_folder_names_its_files():
    folder = NodeFolder.of("c", "0123abcd")
    assert folder.info == ".ray-cml/c/nodes/0123abcd/node.json"
    assert folder.request("17-ab") == ".ray-cml/c/nodes/0123abcd/inbox/17-ab.json"
    assert folder.result("17-ab").endswith("/outbox/17-ab.result")
    assert NodeFolder.request_names(["17-ab.json", ".17-ab.json.tmp", "x.result"]) == {"17-ab"}


# A user's workload reads what its node's variables say, as any user's code would.
WORKLOADS = ("gpu_task.py",)


def _package_sources():
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name != "contract.py" and path.name not in WORKLOADS:
            yield path, path.read_text()


CONTRACT_FILES = (
    "node.json",
    "failure.txt",
    "recovery.json",
    "autostopped.json",
    "autoscaler.json",
    "inbox",
    "outbox",
)
# Variables that are not the contract's: what a user exports, what a test harness reads.
NOT_CONTRACT = {"RAY_CML_ENDPOINT_KEY", "RAY_CML_PLAIN_PYTHON", "RAY_CML_JOB_FOLLOW_S"}


def test_nothing_else_spells_the_contracts_names():
    """A name of the contract as a whole string literal anywhere else in the package would
    be a second place to change (docstrings and shell lines may mention them)."""
    names = set(NodeSpec.variables()) | set(Handoff.variables()) | set(CommandVar.ALL)
    literal = re.compile(r"""["']([A-Za-z_./]+)["']""")
    for path, source in _package_sources():
        for found in literal.findall(source):
            assert found not in names, f"{path.name} spells {found}"
            assert found.rsplit("/", 1)[-1] not in CONTRACT_FILES, f"{path.name} spells {found}"
        for found in re.findall(r"""["'](RAY_CML_[A-Z_]+)["']""", source):
            assert found in NOT_CONTRACT, f"{path.name} spells {found}"
