"""The ``ray-cml`` command: the emulator's entry points and the demo (the main job)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from ray_cml_provider.emulator.harness import READY_PREFIX


def ray_cml() -> str:
    script = Path(sys.executable).with_name("ray-cml")
    return str(script) if script.exists() else shutil.which("ray-cml") or "ray-cml"


@pytest.mark.parametrize(
    "command",
    [[ray_cml(), "emulator"], [sys.executable, "-m", "ray_cml_provider.emulator"]],
    ids=["console-script", "python-m"],
)
def test_emulator_prints_its_address_first_and_stops_on_sigterm(tmp_path, command):
    process = subprocess.Popen(
        [
            *command,
            "--port",
            "0",
            "--api-key",
            "k",
            "--project-dir",
            str(tmp_path / "p"),
            "--log-dir",
            str(tmp_path / "l"),
        ],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        first_line = process.stdout.readline().strip()
        assert first_line.startswith(READY_PREFIX + "http://127.0.0.1:")
        url = first_line.removeprefix(READY_PREFIX)
        answer = requests.get(
            f"{url}/api/v2/runtimes", headers={"Authorization": "Bearer k"}, timeout=10
        )
        assert answer.status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.stdout.close()


def test_emulator_rejects_a_bad_fault_rate():
    result = subprocess.run(
        [ray_cml(), "emulator", "--fault-rate", "2"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "--fault-rate must be between 0 and 1" in result.stderr


def test_demo_shows_an_application_created_running_stopped(tmp_path):
    result = subprocess.run(
        [ray_cml(), "demo", "--lifecycle"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "TMPDIR": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for expected in (
        "creating the application",
        "status APPLICATION_STARTING",
        "RUNNING on 127.0.0.",
        '"hello_from": "127.0.0.',
        "APPLICATION_STOPPED",
        "0 applications left",
        "no process left behind",
    ):
        assert expected in out, expected
    assert list(tmp_path.iterdir()) == [], "the demo removes its temporary folders"


def test_the_engines_interpreter_is_resolved_once_to_an_absolute_path(tmp_path, monkeypatch):
    """Engines run in the project folder: a relative --python (what the Makefile passes for
    the vLLM environment) must already be absolute there, and a venv's symlink kept."""
    from ray_cml_provider.emulator.main import interpreter

    venv_python = tmp_path / "venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.symlink_to(sys.executable)
    monkeypatch.chdir(tmp_path)
    assert interpreter("venv/bin/python") == str(venv_python)  # absolute, symlink not followed
    assert interpreter("python3") == shutil.which("python3")


def test_a_commands_error_is_one_sentence_and_its_exit_status(monkeypatch, capsys):
    """Library code raises; the command line turns our errors and CML's into one line."""
    import types

    from ray_cml_provider import cli
    from ray_cml_provider.cml import CMLConnectionError
    from ray_cml_provider.errors import NodeNotReady

    failing = types.ModuleType("failing_command")
    monkeypatch.setitem(sys.modules, "failing_command", failing)
    monkeypatch.setitem(cli.SUBCOMMANDS, "failing", ("failing_command", "fails"))
    for error, code, said in (
        (NodeNotReady("node 0123abcd runs Ray 2.1"), 86, "ray-cml: node 0123abcd runs Ray 2.1"),
        (CMLConnectionError("GET", "/api/v2/projects/p", "refused"), 1, "ray-cml: cannot reach"),
    ):

        def main(argv, error=error):
            raise error

        failing.main = main
        assert cli.main(["failing"]) == code
        err = capsys.readouterr().err
        assert err.startswith(said) and err.count("\n") == 1 and "Traceback" not in err
