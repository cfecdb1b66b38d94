"""The bundled Serve LLM configs: schema, and the preflight against the cluster configs."""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path

import pytest
from ray.serve.schema import ServeDeploySchema

from ray_cml_provider.llm.preflight import check, main, replica_bundles
from ray_cml_provider.llm.serve_configs import load

CONFIGS = Path(__file__).resolve().parent.parent / "cluster-configs"
VLLM_APP = load(CONFIGS / "vllm_app.yaml")
CPU_TWIN = load(CONFIGS / "vllm_app_cpu.yaml")
CML_CLUSTER = load(CONFIGS / "cml-cluster.yaml")
LOCAL_CLUSTER = load(CONFIGS / "local-emulator.yaml")


def llm_of(config: dict) -> dict:
    return config["applications"][0]["args"]["llm_configs"][0]


@pytest.mark.parametrize("config", [VLLM_APP, CPU_TWIN], ids=["gpu", "cpu-twin"])
def test_serve_configs_pass_ray_serves_own_schema(config):
    ServeDeploySchema.parse_obj(config)


def test_gpu_app_fits_the_cml_cluster_and_scales_from_zero():
    findings = check(VLLM_APP, CML_CLUSTER)
    assert all(f.ok for f in findings), [str(f) for f in findings]
    llm = llm_of(VLLM_APP)
    assert llm["accelerator_type"] == "A10G"
    gpu_worker = CML_CLUSTER["available_node_types"]["gpu_worker"]
    assert gpu_worker["node_config"]["accelerator_type"] == "A10G"
    scaling = llm["deployment_config"]["autoscaling_config"]
    assert scaling["min_replicas"] == 0
    assert scaling["max_replicas"] <= gpu_worker["max_workers"]
    assert replica_bundles(llm) == (
        [{"CPU": 1.0, "GPU": 1.0, "accelerator_type:A10G": 0.001}],
        "PACK",
    )


def test_cpu_twin_fits_the_local_cluster():
    findings = check(CPU_TWIN, LOCAL_CLUSTER)
    assert all(f.ok for f in findings), [str(f) for f in findings]
    assert "llm_cpu_worker can hold it" in str(findings[-1])


def test_a_model_that_scales_from_zero_is_advised_to_report_requests_each_second(capsys):
    """Serve's handles report requests every metrics_interval_s (10 s by default) and, in
    Ray 2.60, a second scale from zero waits for that report: the shipped configs set 1 s,
    a config of the user's that does not is told, without failing the preflight."""
    assert not [f for f in check(VLLM_APP, CML_CLUSTER) if f.advice]
    config = edited(
        lambda c: llm_of(c)["deployment_config"]["autoscaling_config"].pop("metrics_interval_s")
    )
    [advice] = [f for f in check(config, CML_CLUSTER) if f.advice]
    assert advice.ok
    assert str(advice).startswith(
        "advice: applications[0].args.llm_configs[0].deployment_config.autoscaling_config"
        ".metrics_interval_s: 10 s;"
    )
    broken = edited(
        lambda c: llm_of(c)["deployment_config"]["autoscaling_config"].update(
            metrics_interval_s="soon"
        )
    )
    assert (
        "problem: applications[0].args.llm_configs[0].deployment_config.autoscaling_config"
        ".metrics_interval_s: 'soon' is not a number of seconds"
    ) in [str(f) for f in check(broken, CML_CLUSTER)]
    kept_warm = edited(
        lambda c: llm_of(c)["deployment_config"]["autoscaling_config"].update(
            min_replicas=1, metrics_interval_s=10
        )
    )
    assert not [f for f in check(kept_warm, CML_CLUSTER) if f.advice]


def edited(edit) -> dict:
    config = copy.deepcopy(VLLM_APP)
    edit(config)
    return config


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda c: llm_of(c).update(accelerator_type="L4"),
            "change applications[0].args.llm_configs[0].accelerator_type to one of ['A10G']",
        ),
        (
            lambda c: llm_of(c)["engine_kwargs"].update(tensor_parallel_size=2),
            "applications[0].args.llm_configs[0].engine_kwargs.tensor_parallel_size: a "
            "replica's 2 devices do not fit on one node",
        ),
        (
            lambda c: c["applications"][0]["args"].pop("ingress_deployment_config"),
            "applications[0].args.ingress_deployment_config.ray_actor_options.num_cpus: the "
            "OpenAI ingress asks for 1 CPU but the head type 'head' has CPU 0",
        ),
        (
            lambda c: llm_of(c)["deployment_config"]["autoscaling_config"].update(max_replicas=9),
            "autoscaling_config.max_replicas: 9 replicas need 9 nodes but gpu_worker allow(s) "
            "max_workers 4",
        ),
        (lambda c: c["applications"][0].pop("import_path"), "the Serve config is not valid"),
    ],
)
def test_configs_that_can_never_fit_say_which_field_to_change(edit, expected):
    problems = [str(f) for f in check(edited(edit), CML_CLUSTER) if not f.ok]
    assert problems, "the preflight should have found a problem"
    assert any(expected in p for p in problems), problems


def test_preflight_command_exits_non_zero_on_a_problem(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps(edited(lambda c: llm_of(c).update(accelerator_type="L4"))))
    assert main([str(bad), str(CONFIGS / "cml-cluster.yaml")]) == 1
    assert "problem:" in capsys.readouterr().out
    assert main([str(CONFIGS / "vllm_app.yaml"), str(CONFIGS / "cml-cluster.yaml")]) == 0


CROSS_CHECK = r"""
import json, sys, yaml
from ray.llm._internal.serve.core.configs.llm_config import LLMConfig
from ray.llm._internal.serve.core.server.llm_server import (
    _merge_replica_actor_and_child_actor_bundles)
out = []
for path in sys.argv[1:]:
    for app in yaml.safe_load(open(path))["applications"]:
        for raw in app["args"]["llm_configs"]:
            engine = LLMConfig(**raw).get_engine_config()
            actor = raw.get("deployment_config", {}).get("ray_actor_options", {})
            merged = _merge_replica_actor_and_child_actor_bundles(
                engine.placement_bundles,
                {"CPU": actor.get("num_cpus", 1), "GPU": actor.get("num_gpus", 0)})
            out.append([[{k: float(v) for k, v in b.items() if v} for b in merged],
                        engine.placement_strategy])
print(json.dumps(out))
"""


@pytest.mark.llm
@pytest.mark.skipif(
    not os.environ.get("RAY_CML_VLLM_PYTHON"),
    reason="needs the vLLM environment (make test sets RAY_CML_VLLM_PYTHON)",
)
def test_replica_shape_matches_rays_own_computation():
    paths = [str(CONFIGS / "vllm_app.yaml"), str(CONFIGS / "vllm_app_cpu.yaml")]
    result = subprocess.run(
        [os.environ["RAY_CML_VLLM_PYTHON"], "-c", CROSS_CHECK, *paths],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rays = json.loads(result.stdout.strip().splitlines()[-1])
    ours = [list(replica_bundles(llm_of(load(Path(p))))) for p in paths]
    assert rays == ours
