"""Malformed cluster configs: each stops with one sentence naming the field, before any API
call (checked with the emulator's request counts)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from ray_cml_provider.provider.config import main as validate_main
from ray_cml_provider.provider.node_provider import CMLNodeProvider

CONFIGS = Path(__file__).resolve().parent.parent / "cluster-configs"
BASE = yaml.safe_load((CONFIGS / "local-emulator.yaml").read_text())
PREFIX = "ray-cml: invalid cluster config: "


def provider(c):
    return c["provider"]


def node(c, name="gpu_worker"):
    return c["available_node_types"][name]["node_config"]


CASES = [
    (lambda c: provider(c).update(api_key="secret"), "provider: unknown key 'api_key'"),
    (lambda c: provider(c).update(type="aws"), "provider.type: 'external' was expected"),
    (lambda c: provider(c).update(module=5), "provider.module: 5 is not of type 'string'"),
    (lambda c: provider(c).pop("module"), "provider: 'module' is a required property"),
    (lambda c: provider(c).update(host=""), "provider.host: '' should be non-empty"),
    (lambda c: provider(c).update(project_id=123), "provider.project_id: 123 is not of type"),
    (lambda c: provider(c).update(api_key_env="1-BAD"), "provider.api_key_env: '1-BAD' does not"),
    (lambda c: provider(c).update(launch_timeout_s="soon"), "provider.launch_timeout_s: 'soon'"),
    (lambda c: provider(c).update(launch_timeout_s=-5), "provider.launch_timeout_s: -5 is less"),
    (lambda c: provider(c).update(head_lost_timeout_s=0), "provider.head_lost_timeout_s: 0 is"),
    (lambda c: provider(c).update(ray_auth_mode="off"), "provider.ray_auth_mode: 'off' is not one"),
    (
        lambda c: node(c).update(environment={"RAY_AUTH_TOKEN": "x"}),
        "available_node_types.gpu_worker.node_config.environment.RAY_AUTH_TOKEN: ray-cml sets",
    ),
    (
        lambda c: node(c).update(nvidia_gpu=-1),
        "available_node_types.gpu_worker.node_config.nvidia_gpu: -1 is less than the minimum",
    ),
    (
        lambda c: node(c).update(nvidia_gpu=0.5),
        "available_node_types.gpu_worker.node_config.nvidia_gpu: 0.5 is not of type 'integer'",
    ),
    (
        lambda c: node(c).pop("cpu"),
        "available_node_types.gpu_worker.node_config: 'cpu' is a required property",
    ),
    (
        lambda c: node(c).update(cpu="two"),
        "available_node_types.gpu_worker.node_config.cpu: 'two' is not of type 'number'",
    ),
    (
        lambda c: node(c).update(memory=0),
        "available_node_types.gpu_worker.node_config.memory: 0 is less than or equal to",
    ),
    (
        lambda c: node(c, "head").pop("runtime_identifier"),
        "available_node_types.head.node_config: 'runtime_identifier' is a required property",
    ),
    (
        lambda c: node(c).update(colour="red"),
        "available_node_types.gpu_worker.node_config: unknown key 'colour'",
    ),
    (
        lambda c: node(c).update(environment={"A": 1}),
        "available_node_types.gpu_worker.node_config.environment.A: 1 is not of type 'string'",
    ),
    (
        lambda c: node(c).update(accelerator_type="A10G!"),
        "available_node_types.gpu_worker.node_config.accelerator_type: 'A10G!' does not match",
    ),
    (
        lambda c: node(c).update(bypass_authentication="yes"),
        "available_node_types.gpu_worker.node_config.bypass_authentication: 'yes' is not of type",
    ),
    (
        lambda c: node(c).update(runtime_addon_identifiers="x"),
        "available_node_types.gpu_worker.node_config.runtime_addon_identifiers: 'x' is not of",
    ),
    (
        lambda c: node(c, "head").update(nvidia_gpu=1),
        "available_node_types.head: the head coordinates only and gets no GPUs",
    ),
    (
        lambda c: c["available_node_types"]["head"]["resources"].update(GPU=1),
        "available_node_types.head: the head coordinates only and gets no GPUs",
    ),
    (
        lambda c: node(c).update(bypass_authentication=True),
        "available_node_types.gpu_worker.node_config.bypass_authentication: only the head's URL",
    ),
    (
        lambda c: (
            node(c, "head").update(bypass_authentication=True),
            provider(c).update(ray_auth_mode="disabled"),
        ),
        "available_node_types.head.node_config.bypass_authentication: needs provider.ray_auth_mode",
    ),
    (
        lambda c: c.update(
            head_start_ray_commands=["ray start --head --dashboard-port=$CDSW_APP_PORT"]
        ),
        "head_start_ray_commands: --dashboard-port=$CDSW_APP_PORT: the application's port is",
    ),
    (
        lambda c: c["available_node_types"]["gpu_worker"].update(min_workers=3),
        "available_node_types.gpu_worker.min_workers: 3 is more than max_workers 2",
    ),
    (
        lambda c: c.update(cluster_name="My_Cluster"),
        "cluster_name: 'My_Cluster' cannot form a CML subdomain",
    ),
    (lambda c: c.update(cluster_name="-bad-"), "cluster_name: '-bad-' cannot form a CML"),
    (lambda c: c.update(cluster_name="x" * 50), "cluster_name: '" + "x" * 50 + "' is longer"),
    (lambda c: c.update(head_node_type="boss"), "head_node_type: 'boss' is not one of"),
    (
        lambda c: c.update(available_node_types={}),
        "available_node_types: at least one node type is required",
    ),
]


@pytest.fixture(scope="module")
def quiet_emulator(tmp_path_factory):
    from ray_cml_provider.emulator.harness import RunningEmulator
    from tests.conftest import ip_block_args

    with RunningEmulator(
        project_dir=tmp_path_factory.mktemp("p"),
        log_dir=tmp_path_factory.mktemp("l"),
        extra_args=ip_block_args(),
    ) as emulator:
        yield emulator


@pytest.mark.parametrize(("edit", "message"), CASES, ids=[m[:40] for _, m in CASES])
def test_malformed_config_is_one_sentence_naming_the_field_before_any_api_call(
    quiet_emulator, monkeypatch, edit, message
):
    monkeypatch.setenv("CML_API_KEY", quiet_emulator.api_key)
    config = copy.deepcopy(BASE)
    config["provider"].update(host=quiet_emulator.url, project_id=quiet_emulator.project_id)
    edit(config)
    quiet_emulator.reset_stats()
    with pytest.raises(SystemExit) as info:  # Ray's first hook in ray up/down/exec
        config = CMLNodeProvider.fillout_available_node_types_resources(config)
        CMLNodeProvider.bootstrap_config(config)
    text = str(info.value)
    assert text.startswith(PREFIX + message), text
    assert "\n" not in text
    assert quiet_emulator.stats()["total"] == 0, "no API call before the config is valid"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        ("cluster_name: [unclosed\n", "is not valid YAML (line 2)"),
        ("- a\n- b\n", "must hold a mapping (a cluster config), not list"),
        ("cluster_name: BAD\n", PREFIX + "cluster_name: 'BAD' cannot form"),
    ],
    ids=["missing-file", "yaml-syntax", "not-a-mapping", "bad-field"],
)
def test_validate_command_reads_unreadable_yaml_with_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "cluster.yaml"
    if content is not None:
        path.write_text(content)
    assert validate_main([str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_validate_command_accepts_the_shipped_configs(capsys):
    for name in ("local-emulator.yaml", "cml-cluster.yaml"):
        assert validate_main([str(CONFIGS / name)]) == 0
    assert capsys.readouterr().out.count("ok:") == 2
