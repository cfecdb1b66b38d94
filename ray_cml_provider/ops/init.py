"""``ray-cml init``: write a commented cluster YAML that ``ray up`` accepts as is.

    ray-cml init --name my-cluster --host https://ml-xyz.cloudera.site --project-id abcd \\
        --worker gpu_worker:cpu=8,memory=32,gpus=1,accelerator=A10G,max=4 -o cluster.yaml
    ray-cml init --target emulator -o local.yaml

Each ``--worker`` adds one worker type: ``NAME:key=value,...`` with the keys cpu, memory
(GB), gpus, accelerator, min, max and runtime. The file is checked by this project's
validation and by Ray's own schema before it is written.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from ray_cml_provider.provider.config import ClusterConfigError, validate_cluster_config

STANDARD_RUNTIME = (
    "docker.repository.cloudera.com/cloudera/cdsw/"
    "ml-runtime-pbj-workbench-python3.11-standard:2025.09.1-b5"
)
CUDA_RUNTIME = (
    "docker.repository.cloudera.com/cloudera/cdsw/"
    "ml-runtime-pbj-workbench-python3.11-cuda:2025.09.1-b5"
)
WORKER_KEYS = {"cpu", "memory", "gpus", "accelerator", "min", "max", "runtime"}


@dataclass
class WorkerType:
    name: str
    cpu: float
    memory: float
    gpus: int
    accelerator: str
    min_workers: int
    max_workers: int
    runtime: str


def parse_worker(spec: str, target: str, default_gpu_runtime: str, default_runtime: str):
    """``NAME:cpu=8,memory=32,gpus=1,accelerator=A10G,min=0,max=4`` -> ``WorkerType``."""
    name, _, settings = spec.partition(":")
    if not name.isidentifier():
        raise ValueError(f"--worker {spec!r}: the type name must be like gpu_worker")
    values: dict[str, str] = {}
    for item in filter(None, settings.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in WORKER_KEYS:
            raise ValueError(
                f"--worker {spec!r}: {item!r} is not KEY=VALUE with KEY one of "
                f"{', '.join(sorted(WORKER_KEYS))}"
            )
        values[key] = value
    small = target == "emulator"
    try:
        gpus = int(values.get("gpus", 1))
        worker = WorkerType(
            name=name,
            cpu=float(values.get("cpu", 1 if small else 8)),
            memory=float(values.get("memory", 2 if small else 32)),
            gpus=gpus,
            accelerator=values.get("accelerator", "A10G" if gpus else ""),
            min_workers=int(values.get("min", 0)),
            max_workers=int(values.get("max", 2 if small else 4)),
            runtime=values.get("runtime", default_gpu_runtime if gpus else default_runtime),
        )
    except ValueError:
        raise ValueError(
            f"--worker {spec!r}: cpu and memory are numbers, the rest integers"
        ) from None
    return worker


def _number(value: float) -> str:
    return f"{value:g}"


def render_config(args: argparse.Namespace, workers: list[WorkerType]) -> str:
    emulator = args.target == "emulator"
    total_max = sum(w.max_workers for w in workers)
    out = [
        f"# Ray cluster on {'the CML emulator' if emulator else 'Cloudera Machine Learning'}, "
        "written by `ray-cml init`.",
        f"#   ray-cml doctor {args.output or 'THIS_FILE'}   # check the workspace first",
        f"#   ray up {args.output or 'THIS_FILE'}  /  ray-cml status ...  /  ray down ...",
        "# Every key is described in docs/configuration.md.",
        f"cluster_name: {args.name}",
        "",
        f"max_workers: {total_max}              # all worker types together",
        "upscaling_speed: 1.0",
        f"idle_timeout_minutes: {_number(args.idle_timeout_minutes)}"
        "         # an idle worker's application is deleted after this",
        "",
        "provider:",
        "  type: external",
        "  module: ray_cml_provider.CMLNodeProvider",
    ]
    if args.host:
        out.append(f"  host: {args.host}")
    else:
        out.append("  # host: https://ml-xxxx.your-workspace.cloudera.site  (else $CML_HOST)")
    if args.project_id:
        out.append(f"  project_id: {args.project_id}")
    else:
        out.append("  # project_id: abcd-1234  (else $CML_PROJECT_ID; in a CML session: this one)")
    out += [
        f"  api_key_env: {args.api_key_env}"
        "          # the NAME of the variable holding your API v2 key",
        f"  launch_timeout_s: {120 if emulator else 900}"
        "           # an application not RUNNING after this is deleted and reported",
        f"  head_lost_timeout_s: {15 if emulator else 120}"
        "         # workers delete themselves when the head is gone this long",
    ]
    if emulator:
        out.append("  poll_interval_s: 0.5")
    out += [
        "  # Installed once per runtime into the project (.ray-cml/_envs) and reused by every",
        "  # node and cluster; Ray is pinned to the version running `ray up`, and `ray up`",
        "  # ships ray-cml-provider itself. A runtime that already has that Ray skips it.",
        '  pip_packages: ["ray[default,serve]"]',
        "  # Every Ray port asks for the cluster's token (`ray up` makes it; the line it prints",
        "  # lets a CML session of the project in). 'disabled': any engine of the workspace",
        "  # could run code on the cluster, with your CML key.",
        "  ray_auth_mode: token",
    ]
    out += [
        "",
        "auth:",
        "  ssh_user: cdsw                 # unused: CML applications have no SSH",
        "",
        "head_node_type: head",
        "available_node_types:",
        "  head:",
        "    # Coordination only: the head never gets GPUs, and CPU 0 keeps tasks off it.",
        "    node_config:",
        f"      cpu: {_number(args.head_cpu)}",
        f"      memory: {_number(args.head_memory)}",
        f"      runtime_identifier: {args.runtime}",
        "      environment:",
        "        # How often the head's autoscaler looks for demand (Ray's default 5 s; each",
        "        # look is one CML list call): a replica waiting for a worker waits at most this.",
        '        AUTOSCALER_UPDATE_INTERVAL_S: "2"',
        "    resources: {CPU: 0, GPU: 0}",
        "    min_workers: 0",
        "    max_workers: 0",
    ]
    for w in workers:
        resources = f"CPU: {_number(w.cpu)}, GPU: {w.gpus}" + (
            f', "accelerator_type:{w.accelerator}": 1' if w.accelerator else ""
        )
        out += [
            f"  {w.name}:",
            "    node_config:",
            f"      cpu: {_number(w.cpu)}",
            f"      memory: {_number(w.memory)}",
        ]
        if w.gpus:
            out.append(f"      nvidia_gpu: {w.gpus}")
        if w.accelerator:
            out.append(f"      accelerator_type: {w.accelerator}")
        out += [
            f"      runtime_identifier: {w.runtime}",
            f"    # resources are filled from node_config: {{{resources}}}",
            f"    min_workers: {w.min_workers}"
            + ("              # scale to zero when idle" if w.min_workers == 0 else ""),
            f"    max_workers: {w.max_workers}",
        ]
    out += [
        "",
        "file_mounts: {}",
        "cluster_synced_files: []",
        "file_mounts_sync_continuously: false",
        "rsync_exclude: []",
        "rsync_filter: []",
        "initialization_commands: []",
    ]
    out += [
        "# Other setup before Ray starts (packages belong in provider.pip_packages).",
        "setup_commands: []",
        "head_setup_commands: []",
        "worker_setup_commands: []",
        "",
        "# $CDSW_IP_ADDRESS is the engine's address; $RAY_CML_* ports are picked by the node",
        "# launcher. The head application's URL ($CDSW_APP_PORT) is the head's gateway: the",
        "# OpenAI API of a Serve app on /v1, the dashboard ($RAY_CML_DASHBOARD_PORT) on the",
        "# rest. `ray stop` here stops only this node.",
        "head_start_ray_commands:",
        "  - ray stop",
        "  - >-",
        "    ray start --head --node-ip-address=$CDSW_IP_ADDRESS --port=$RAY_CML_GCS_PORT",
        "    --ray-client-server-port=$RAY_CML_CLIENT_PORT"
        " --dashboard-agent-listen-port=$RAY_CML_AGENT_PORT",
        f"    --dashboard-host={'$CDSW_IP_ADDRESS' if emulator else '0.0.0.0'}"
        " --dashboard-port=$RAY_CML_DASHBOARD_PORT",
        f"    --object-store-memory={args.object_store_mb * 1_000_000} --disable-usage-stats",
        "    --autoscaling-config=~/ray_bootstrap_config.yaml",
        "# Run by each worker's own launcher, with the type's resources in",
        "# RAY_OVERRIDE_RESOURCES and the head's address in RAY_HEAD_IP/RAY_HEAD_GCS_PORT.",
        "worker_start_ray_commands:",
        "  - >-",
        "    ray start --address=$RAY_HEAD_IP:$RAY_HEAD_GCS_PORT"
        " --node-ip-address=$CDSW_IP_ADDRESS",
        "    --dashboard-agent-listen-port=$RAY_CML_AGENT_PORT"
        f" --object-store-memory={args.object_store_mb * 1_000_000}",
        "    --disable-usage-stats",
    ]
    return "\n".join(out) + "\n"


def check_with_ray(config: dict) -> None:
    """Ray's own schema check (what ``ray up`` runs after our hooks)."""
    from ray.autoscaler._private.util import validate_config

    from ray_cml_provider.provider.node_provider import CMLNodeProvider

    validate_config(CMLNodeProvider.fillout_available_node_types_resources(config))


def main(argv: list[str] | None = None) -> int:
    """``ray-cml init``: write a commented cluster YAML from a few flags."""
    parser = argparse.ArgumentParser(
        prog="ray-cml init", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--target", choices=("cml", "emulator"), default="cml")
    parser.add_argument("--name", default=None, help="cluster name (default ray-cml / local)")
    parser.add_argument("--host", help="workspace URL (else CML_HOST at ray up time)")
    parser.add_argument("--project-id", help="project id (else CML_PROJECT_ID at ray up time)")
    parser.add_argument("--api-key-env", default="CML_API_KEY")
    parser.add_argument("--head-cpu", type=float, default=None)
    parser.add_argument("--head-memory", type=float, default=None, help="GB")
    parser.add_argument("--runtime", default=STANDARD_RUNTIME, help="runtime of CPU nodes")
    parser.add_argument("--gpu-runtime", default=CUDA_RUNTIME, help="runtime of GPU workers")
    parser.add_argument(
        "--worker",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE,...",
        help="a worker type (repeatable); keys: cpu, memory, gpus, accelerator, min, max, "
        "runtime. Default: one GPU worker type, 0 to 4 (emulator: 0 to 2)",
    )
    parser.add_argument("--idle-timeout-minutes", type=float, default=None)
    parser.add_argument(
        "--object-store-mb",
        type=int,
        default=None,
        help="Ray's object store per node in MB; must fit the project's shared memory",
    )
    parser.add_argument("-o", "--output", help="file to write (default: print it)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")
    args = parser.parse_args(argv)
    emulator = args.target == "emulator"
    args.name = args.name or ("local" if emulator else "ray-cml")
    args.head_cpu = args.head_cpu or (1 if emulator else 2)
    args.head_memory = args.head_memory or (2 if emulator else 8)
    args.idle_timeout_minutes = args.idle_timeout_minutes or (0.25 if emulator else 10)
    args.object_store_mb = args.object_store_mb or (100 if emulator else 2000)
    try:
        workers = [
            parse_worker(spec, args.target, args.gpu_runtime, args.runtime)
            for spec in args.worker or ["gpu_worker:"]
        ]
        if len({w.name for w in workers} | {"head"}) != len(workers) + 1:
            raise ValueError("--worker: each worker type needs its own name (not 'head')")
        text = render_config(args, workers)
        config = yaml.safe_load(text)
        validate_cluster_config(config)
        check_with_ray(config)
    except (ValueError, ClusterConfigError) as exc:
        print(f"ray-cml: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # Ray's schema check raises jsonschema's ValidationError
        where = ".".join(str(p) for p in getattr(exc, "absolute_path", []))
        message = getattr(exc, "message", str(exc).splitlines()[0])
        print(f"ray-cml: the config fails Ray's schema: {where}: {message}", file=sys.stderr)
        return 1
    if not args.output:
        sys.stdout.write(text)
        return 0
    path = Path(args.output)
    if path.exists() and not args.force:
        print(f"ray-cml: {path} exists; pass --force to overwrite it", file=sys.stderr)
        return 1
    path.write_text(text)
    print(f"wrote {path}: check it with `ray-cml doctor {path}`, then `ray up {path}`")
    return 0
