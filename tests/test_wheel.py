"""The built wheel, installed in a fresh virtual environment with its dependencies, run from a
folder that is not this checkout: what a user who ran ``pip install ray-cml-provider`` gets.

The wheel must hold every file of the package (the node side ships the installed package's
code to the head: a module missing from the wheel would break only there) and the demo's
cluster YAMLs; the installed ``ray-cml`` runs the emulator's demo from the wheel alone. The
whole Ray flow from the same code is the e2e tests' (and ``make demo``'s)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.e2e

# The provider as Ray loads it (provider.module), and the Ray it was installed with.
IMPORTS = "import ray, ray_cml_provider as p; p.CMLNodeProvider; print(p.__file__, ray.__version__)"


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
    tracked = subprocess.run(
        ["git", "ls-files", "ray_cml_provider"], cwd=REPO, capture_output=True, text=True
    ).stdout.split()
    if tracked:  # a checkout: every file of the package is in the wheel
        assert not set(tracked) - set(names), sorted(set(tracked) - set(names))
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
        [str(venv / "bin" / "ray-cml"), "demo", "--lifecycle"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=800,
    )
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert str(REPO) not in demo.stdout  # nothing came from this checkout
    assert "RUNNING on 127.0.0." in demo.stdout and "no process left behind" in demo.stdout
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", IMPORTS],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert where.returncode == 0, where.stderr[-3000:]
    package, ray_version = where.stdout.split()
    assert package.startswith(str(venv)) and ray_version == "2.60.0"  # its dependencies too
