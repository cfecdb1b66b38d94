"""The head's door attacked on a real cluster on the emulator, class by class, from a process
of its own that dials the head engine's address and port directly (another engine of the
workspace): the owner's ``ray-cml status``, ``ray job submit`` through the head's port and
a keyed ``/v1`` call of a real Serve app are each answered in under 2 s during every
attack, nothing is relayed where it must not be, the gateway's memory stays bounded, and
the head's log holds no traceback. The attacks and the figures are
``bench/door_siege.py``'s; this is its smoke run too."""

from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path

import pytest

from ray_cml_provider.demo.echo_app import serve_config
from ray_cml_provider.demo.local_cluster import LocalCluster

pytestmark = pytest.mark.e2e

BENCH = Path(__file__).resolve().parent.parent / "bench" / "door_siege.py"
SECONDS = 3.0  # per class (the owner asks 2-3 times in each)
OWNER_ANSWERS_WITHIN_S = 2.0
HEADS_MOST_GROWTH_MB = 40.0  # the old door grew ~19 MB a second under it (46 -> 140 MB in 5 s)


def load_siege():
    spec = importlib.util.spec_from_file_location("door_siege", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(900)
def test_the_owner_is_answered_in_under_2_s_during_every_attack_on_the_door(
    start_emulator, tmp_path
):
    siege = load_siege()
    emulator = start_emulator()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        serve_port = sock.getsockname()[1]
    cluster = LocalCluster(
        emulator,
        tmp_path / "work",
        cluster_name="siege",
        config_overrides=siege.siege_config(serve_port),
    )
    up = cluster.up()
    assert up.returncode == 0, up.stdout[-3000:]
    try:
        # The replica on the head: the door is the head's, and no worker needs to start.
        deployed = cluster.serve_deploy(serve_config(port=serve_port, gpus=0), "echo.yaml")
        assert deployed.returncode == 0, deployed.stdout[-3000:]
        cluster.wait_for_serve_app("echo", 300)
        door = siege.door_of(cluster, emulator)
        status = siege.status_probe(cluster)
        baseline = siege.siege(door, status, siege.BASELINE, SECONDS)
        print(baseline.line())
        # 2 s, or three times what this machine gives the owner with no attack when it is
        # busier than that: CI runs other clusters beside this one, and here the attacker,
        # the head and the owner share two cores (on CML each is an engine of its own). A
        # lockout (a wait for a pool, a connection refused) still fails.
        within = {
            probe: max(OWNER_ANSWERS_WITHIN_S, 3 * max(times))
            for probe, times in baseline.answers.items()
        }
        results = {}
        for name in siege.CLASSES:
            figures = siege.siege(door, status, name, SECONDS)
            print(figures.line())
            results[name] = figures
        for name, figures in results.items():
            assert figures.failures == {}, (name, figures.failures)
            assert set(figures.answers) == {"status", "v1", "job_submit"}, name
            for probe, times in figures.answers.items():
                assert max(times) < within[probe], (probe, times, figures.line())
            assert figures.relayed == 0, figures.line()
            assert figures.sent > 0, figures.line()
        heads = results["heads"]
        assert heads.rss_peak_mb - heads.rss_before_mb < HEADS_MOST_GROWTH_MB, heads.line()
        [head] = cluster.nodes("head")
        engine = next(p for p in emulator.processes() if p["id"] == head.id)
        log = Path(engine["log_path"]).read_text(errors="replace")
        assert "Traceback" not in log
        gateway_lines = [line for line in log.splitlines() if "gateway:" in line]
        assert len(gateway_lines) < 100, gateway_lines[-20:]
    finally:
        down = cluster.down()
        assert down.returncode == 0, down.stdout[-3000:]
