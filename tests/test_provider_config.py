"""Cluster YAML validation and the config hooks Ray calls on the CLI side (no API calls)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import ray
import yaml

from ray_cml_provider.provider import node_provider
from ray_cml_provider.provider.config import validate_cluster_config
from ray_cml_provider.provider.node_provider import CMLNodeProvider

CONFIGS = Path(__file__).resolve().parent.parent / "cluster-configs"


def local_config() -> dict:
    return yaml.safe_load((CONFIGS / "local-emulator.yaml").read_text())


# The shipped configs are validated through `ray-cml validate` in test_bad_configs.py.


def broken(edit) -> dict:
    config = copy.deepcopy(local_config())
    edit(config)
    return config


# The table of malformed configs lives in test_bad_configs.py.


def test_resources_are_filled_from_node_config():
    filled = CMLNodeProvider.fillout_available_node_types_resources(local_config())
    types = filled["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 0, "GPU": 0}
    assert types["gpu_worker"]["resources"] == {"CPU": 1, "GPU": 1, "accelerator_type:A10G": 1}


def test_bootstrap_wires_workers_to_start_ray_themselves(monkeypatch):
    # The workspace check (key, project, runtimes) is tested against the emulator in
    # test_provider_contract.py; this test is about the config it returns.
    monkeypatch.setattr(node_provider, "check_workspace", lambda config: None)
    config = local_config()
    config["setup_commands"] = ["echo common"]
    config["worker_setup_commands"] = ["echo worker"]
    config["head_setup_commands"] = ["echo head"]
    boot = CMLNodeProvider.bootstrap_config(config)
    assert boot["provider"]["disable_node_updaters"] is True
    worker = boot["available_node_types"]["gpu_worker"]["node_config"]["_ray_cml"]
    assert worker["setup_commands"] == ["echo common", "echo worker"]
    assert worker["start_commands"] == config["worker_start_ray_commands"]
    head = boot["available_node_types"]["head"]["node_config"]["_ray_cml"]
    # `ray up` runs the head's itself; a head restarted by CML (head_recovery) runs them again.
    assert head["setup_commands"] == ["echo common", "echo head"]
    assert "start_commands" not in head  # recorded from `ray up`'s own `ray start --head`
    # Every node type installs Ray pinned to the laptop's version (the runtime has none).
    assert head["pip_packages"] == worker["pip_packages"] == [f"ray[default]=={ray.__version__}"]
    validate_cluster_config(boot)  # the bootstrapped config is still valid (head side)


def test_ray_cli_hook_stops_a_broken_config_with_one_sentence():
    config = broken(
        lambda c: c["available_node_types"]["gpu_worker"]["node_config"].update(nvidia_gpu=-1)
    )
    with pytest.raises(SystemExit) as info:
        CMLNodeProvider.fillout_available_node_types_resources(config)
    assert str(info.value) == (
        "ray-cml: invalid cluster config: available_node_types.gpu_worker.node_config."
        "nvidia_gpu: -1 is less than the minimum of 0"
    )


def test_the_autoscaler_does_not_warn_about_rays_own_legacy_fields_every_loop(caplog):
    """Ray's defaults for an external provider carry empty head_node/worker_nodes and it
    warned about each on every loop of the head's autoscaler (monitor.log)."""
    from ray.autoscaler._private.util import prepare_config

    with caplog.at_level("WARNING"):
        prepared = prepare_config(local_config())
    assert "head_node" not in prepared and "worker_nodes" not in prepared
    assert "legacy field" not in caplog.text
