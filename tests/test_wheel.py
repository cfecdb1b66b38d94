"""``ray-cml demo`` from the built wheel, installed in a fresh virtual environment, run from a
folder that is not this checkout: what a user who ran ``pip install ray-cml-provider`` gets.
The demo's cluster YAML must come from inside the package."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(900)
def test_ray_cml_demo_runs_from_a_wheel_in_a_fresh_venv(tmp_path):
    dist = tmp_path / "dist"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dist), str(REPO)],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    [wheel] = dist.glob("ray_cml_provider-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "ray_cml_provider/demo/configs/local-emulator.yaml" in names
    assert not [n for n in names if n.startswith(("tests/", "bench/", "cluster-configs/"))]

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)],
        capture_output=True,
        text=True,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", "")])
    demo = subprocess.run(
        [str(venv / "bin" / "ray-cml"), "demo"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=800,
    )
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert str(REPO) not in demo.stdout  # nothing came from this checkout
    assert "GPU task ran on" in demo.stdout
    assert "worker application deleted" in demo.stdout
    assert "no process left behind" in demo.stdout
