"""Preflight: can a Serve config's replicas ever be placed on a cluster config's node types?

A Serve LLM replica that no node type can hold sits pending forever while the autoscaler
has nothing to launch. This check tells before deploying, and names the field to change.

The replica's resource shape follows Ray 2.60's ``LLMServer.get_deployment_options``: one
placement-group bundle per device (tensor x pipeline parallel): ``{GPU: 1,
accelerator_type:<X>: 0.001}`` on GPUs, ``{CPU: 1}`` on the CPU backend, or the config's
``placement_group_config``; the replica actor's own resources (1 CPU unless
``ray_actor_options`` says otherwise) are added to the first bundle. A test checks this
against Ray's own code where vLLM is installed (``ray.llm`` needs it to import).

    ray-cml preflight SERVE_CONFIG CLUSTER_CONFIG
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ray_cml_provider.provider.config import node_type_resources

OPENAI_APP = "ray.serve.llm:build_openai_app"


# Serve's default: a handle pushes its request counts to the controller this often.
SERVE_DEFAULT_METRICS_INTERVAL_S = 10.0


@dataclass(frozen=True)
class Finding:
    ok: bool
    message: str
    advice: bool = False  # ok, but a setting worth changing

    def __str__(self) -> str:
        return f"{'advice' if self.advice else 'ok' if self.ok else 'problem'}: {self.message}"


def replica_bundles(llm_config: dict[str, Any]) -> tuple[list[dict[str, float]], str]:
    """The placement-group bundles and strategy of one replica of ``llm_config``."""
    engine = llm_config.get("engine_kwargs") or {}
    devices = int(engine.get("tensor_parallel_size", 1)) * int(
        engine.get("pipeline_parallel_size", 1)
    )
    kind = (llm_config.get("accelerator_config") or {}).get("kind", "gpu")
    accelerator = llm_config.get("accelerator_type")
    accelerator_key = f"accelerator_type:{accelerator}" if accelerator else None
    group = llm_config.get("placement_group_config") or {}
    if group.get("bundle_per_worker") is not None:
        bundles = [dict(group["bundle_per_worker"]) for _ in range(devices)]
    elif group:
        bundles = [dict(b) for b in group.get("bundles") or []]
    elif kind == "cpu":
        bundles = [{"CPU": 1.0} for _ in range(devices)]
    else:
        bundles = [{"GPU": 1.0} for _ in range(devices)]
    if accelerator_key and kind != "cpu":
        for bundle in bundles:
            bundle.setdefault(accelerator_key, 0.001)
    actor = ((llm_config.get("deployment_config") or {}).get("ray_actor_options")) or {}
    replica_actor = {
        "CPU": float(actor.get("num_cpus", 1)),
        "GPU": float(actor.get("num_gpus", 0)),
        **{k: float(v) for k, v in (actor.get("resources") or {}).items()},
    }
    if not bundles:
        bundles = [replica_actor]
    else:
        first = bundles[0]
        bundles[0] = {
            k: first.get(k, 0) + replica_actor.get(k, 0) for k in {*first, *replica_actor}
        }
    cleaned = [{k: float(v) for k, v in b.items() if v} for b in bundles]
    return cleaned, group.get("strategy", "PACK")


def _fits(bundle: dict[str, float], offered: dict[str, float]) -> bool:
    return all(offered.get(key, 0) + 1e-9 >= amount for key, amount in bundle.items())


def _shortfall(bundle: dict[str, float], offered: dict[str, float]) -> str:
    return ", ".join(
        f"{key} {amount:g} (has {offered.get(key, 0):g})"
        for key, amount in bundle.items()
        if offered.get(key, 0) + 1e-9 < amount
    )


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def check(serve_config: dict[str, Any], cluster_config: dict[str, Any]) -> list[Finding]:
    findings: list[Finding] = []
    try:
        from ray.serve.schema import ServeDeploySchema

        ServeDeploySchema.parse_obj(serve_config)
    except Exception as exc:  # pydantic's error lists each bad field
        return [Finding(False, f"the Serve config is not valid: {exc}")]

    head_name = cluster_config["head_node_type"]
    types = cluster_config["available_node_types"]
    offered = {
        name: node_type_resources(node_type, is_head=name == head_name)
        for name, node_type in types.items()
    }
    workers = {name: res for name, res in offered.items() if name != head_name}

    for app_index, app in enumerate(serve_config.get("applications", [])):
        where = f"applications[{app_index}]"
        if app.get("import_path") != OPENAI_APP:
            findings.append(Finding(True, f"{where}: not {OPENAI_APP}; not checked"))
            continue
        args = app.get("args") or {}
        ingress = ((args.get("ingress_deployment_config") or {}).get("ray_actor_options")) or {}
        ingress_cpus = float(ingress.get("num_cpus", 1))
        head_cpus = offered[head_name].get("CPU", 0)
        if ingress_cpus > head_cpus:
            findings.append(
                Finding(
                    False,
                    (
                        f"{where}.args.ingress_deployment_config.ray_actor_options.num_cpus: the "
                        f"OpenAI ingress asks for {ingress_cpus:g} CPU but the head type "
                        f"'{head_name}' has CPU {head_cpus:g}; set it to 0, or the ingress keeps a "
                        "worker running forever"
                    ),
                )
            )
        else:
            findings.append(Finding(True, f"{where}: the ingress fits on the head"))

        for index, llm in enumerate(args.get("llm_configs") or []):
            findings.extend(_check_llm(f"{where}.args.llm_configs[{index}]", llm, workers, types))
    return findings


def _check_llm(
    where: str,
    llm: dict[str, Any],
    workers: dict[str, dict[str, float]],
    types: dict[str, Any],
) -> list[Finding]:
    model = (llm.get("model_loading_config") or {}).get("model_id", "?")
    bundles, strategy = replica_bundles(llm)
    shape = " + ".join(_fmt(b) for b in bundles)
    need: dict[str, float] = {}
    for bundle in bundles:
        for key, amount in bundle.items():
            need[key] = need.get(key, 0) + amount
    hosts = [name for name, res in workers.items() if _fits(need, res)]
    nodes_per_replica = 1
    found: list[Finding] = []
    if not hosts and strategy != "STRICT_PACK" and len(bundles) > 1:
        # PACK may spread the bundles over several nodes of a type that holds each one.
        hosts = [name for name, res in workers.items() if all(_fits(b, res) for b in bundles)]
        nodes_per_replica = len(bundles)
        if hosts:
            found.append(
                Finding(
                    False,
                    (
                        f"{where}.engine_kwargs.tensor_parallel_size: a replica's "
                        f"{len(bundles)} devices do not fit on one node of "
                        f"{', '.join(hosts)}, so each replica would span several nodes "
                        "(slow); raise the worker type's node_config.nvidia_gpu or lower "
                        "tensor_parallel_size"
                    ),
                )
            )
    if not hosts:
        return [Finding(False, _explain(where, model, need, workers, llm))]
    found.insert(
        0,
        Finding(
            True,
            f"{where} ({model}): a replica needs {shape}; worker "
            f"type(s) {', '.join(hosts)} can hold it",
        ),
    )
    autoscaling = (llm.get("deployment_config") or {}).get("autoscaling_config") or {}
    try:  # Serve's schema does not look inside an app's args: a number is not certain
        interval = float(autoscaling.get("metrics_interval_s", SERVE_DEFAULT_METRICS_INTERVAL_S))
    except (TypeError, ValueError):
        found.append(
            Finding(
                False,
                f"{where}.deployment_config.autoscaling_config.metrics_interval_s: "
                f"{autoscaling.get('metrics_interval_s')!r} is not a number of seconds",
            )
        )
        interval = SERVE_DEFAULT_METRICS_INTERVAL_S
    if autoscaling.get("min_replicas", 1) == 0 and interval > 1:
        # Ray 2.60: at zero replicas a handle pushes at once, but the samples it stored,
        # all 0 once it has served: a second scale from zero waits for the next push.
        found.append(
            Finding(
                True,
                (
                    f"{where}.deployment_config.autoscaling_config.metrics_interval_s: "
                    f"{interval:g} s; after its first time, scaling up from zero waits up to "
                    "that long for Serve's handles to report the request: set it to 1"
                ),
                advice=True,
            )
        )
    max_replicas = int(autoscaling.get("max_replicas", 1))
    capacity = sum(int(types[name].get("max_workers", 0)) for name in hosts)
    if max_replicas * nodes_per_replica > capacity:
        found.append(
            Finding(
                False,
                (
                    f"{where}.deployment_config.autoscaling_config.max_replicas: {max_replicas} "
                    f"replicas need {max_replicas * nodes_per_replica} nodes but "
                    f"{', '.join(hosts)} allow(s) max_workers {capacity}; lower max_replicas or "
                    "raise max_workers"
                ),
            )
        )
    return found


def _explain(
    where: str,
    model: str,
    need: dict[str, float],
    workers: dict[str, dict[str, float]],
    llm: dict[str, Any],
) -> str:
    lines = [
        f"{where} ({model}): a replica needs {_fmt(need)} on one node and no worker "
        "type can hold it"
    ]
    for name, res in workers.items():
        lines.append(f"{name} lacks {_shortfall(need, res)}")
    accelerator = llm.get("accelerator_type")
    key = f"accelerator_type:{accelerator}"
    if accelerator and not any(key in res for res in workers.values()):
        have = sorted(
            k.split(":", 1)[1]
            for r in workers.values()
            for k in r
            if k.startswith("accelerator_type:")
        )
        lines.append(
            f"change {where}.accelerator_type to one of {have or 'the types here'}, "
            f"or set node_config.accelerator_type: {accelerator} on a worker type"
        )
    elif need.get("GPU", 0) > max((r.get("GPU", 0) for r in workers.values()), default=0):
        lines.append(
            f"lower {where}.engine_kwargs.tensor_parallel_size, or raise a worker "
            "type's node_config.nvidia_gpu"
        )
    else:
        lines.append(
            "raise a worker type's node_config (cpu, nvidia_gpu) or lower the "
            "replica's ray_actor_options"
        )
    return "; ".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ray-cml preflight",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("serve_config", type=Path)
    parser.add_argument("cluster_config", type=Path)
    args = parser.parse_args(argv)
    try:
        serve_config = yaml.safe_load(args.serve_config.read_text())
        cluster_config = yaml.safe_load(args.cluster_config.read_text())
    except (OSError, yaml.YAMLError) as exc:
        print(f"ray-cml preflight: cannot read the configs: {exc}", file=sys.stderr)
        return 2
    findings = check(serve_config, cluster_config)
    for finding in findings:
        print(finding)
    return 0 if all(f.ok for f in findings) else 1
