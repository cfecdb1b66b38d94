"""The node launcher's Ray authentication settings, in-process (no application, no Ray)."""

from __future__ import annotations

import stat

import pytest

from ray_cml_provider import node_launcher
from ray_cml_provider.node_launcher import NodeLauncher, NoToken

TOKEN_FILE = ".ray-cml/c1/auth/token"


def launcher(project, monkeypatch, **env) -> NodeLauncher:
    monkeypatch.chdir(project)
    base = {
        "RAY_CML_CLUSTER": "c1",
        "RAY_CML_NODE_ID": "0123abcd",
        "RAY_CML_NODE_KIND": "worker",
        "RAY_CML_DIR": ".ray-cml/c1",
        "CDSW_IP_ADDRESS": "127.0.0.1",
        "PATH": "/usr/bin",
    }
    return NodeLauncher({**base, **env})


def test_commands_get_the_token_file_and_nothing_else_decides(tmp_path, monkeypatch):
    token = tmp_path / TOKEN_FILE
    token.parent.mkdir(parents=True)
    token.write_text("0" * 64)
    token.chmod(0o644)
    node = launcher(
        tmp_path,
        monkeypatch,
        RAY_CML_AUTH_TOKEN_FILE=TOKEN_FILE,
        # What a node_config could try (validation refuses it; the launcher ignores it too).
        RAY_AUTH_MODE="disabled",
        RAY_AUTH_TOKEN="guess",
    )
    node.secure_token()
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert stat.S_IMODE(token.parent.stat().st_mode) == 0o700
    env = node.command_env({"RAY_AUTH_MODE": "disabled"})
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == str(token)
    assert "RAY_AUTH_TOKEN" not in env


def test_without_a_token_file_env_ray_is_told_auth_is_off(tmp_path, monkeypatch):
    node = launcher(tmp_path, monkeypatch, RAY_AUTH_TOKEN_PATH="/elsewhere")
    node.secure_token()  # nothing to wait for
    env = node.command_env()
    assert env["RAY_AUTH_MODE"] == "disabled" and "RAY_AUTH_TOKEN_PATH" not in env


def test_a_token_that_never_shows_fails_the_node_with_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setattr(node_launcher, "TOKEN_WAIT_S", 0.2)
    node = launcher(tmp_path, monkeypatch, RAY_CML_AUTH_TOKEN_FILE=TOKEN_FILE)
    with pytest.raises(NoToken, match=r"the cluster's Ray token .* is not in the project after"):
        node.secure_token()
