"""``ray-cml doctor CONFIG``: is the workspace ready for this cluster, before anything runs?

One line per check, ``ok``, ``problem`` (with what to do), ``warning`` (works, but you
should know) or ``skip``; the exit status is 1 when any check found a problem. Checks, in
order (a failed one skips those that need it):

1. the cluster YAML is valid, and whether Ray's token authentication is on (offline);
2. the host answers HTTP;
3. the API key is accepted;
4. the project exists;
5. the project's files are writable (a probe file is written and deleted);
6. every node type's runtime is a runtime of the workspace;
7. the project's shared memory (``/dev/shm``) holds each node's Ray object store;
8. the GPUs the cluster may hold fit the quota you name (``--gpu-quota``; CML's API does
   not publish quotas), counting GPUs other applications of the project hold now;
9. the provider module imports here (``ray up`` ships this very code to the head), no
   setup command installs ray-cml-provider or another Ray; then, for each node type, the
   packages its nodes install and whether the project already has that environment built
   (or its last build failed, with pip's last lines);
10. whether a head of this cluster already runs (``ray up`` would reuse it).
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

import requests

from ray_cml_provider.cluster.workspace import OperatorError, client_for, key_env_of
from ray_cml_provider.cml import ApplicationStatus, CMLClient, CMLError, CMLNotFoundError
from ray_cml_provider.contract import CLUSTERS_DIR, HEAD, parse_application
from ray_cml_provider.node.environment import ENVS_DIR
from ray_cml_provider.provider.config import ClusterConfigError, load_cluster_config
from ray_cml_provider.provider.lookup import cluster_applications
from ray_cml_provider.provider.packages import local_ray_version, node_type_packages
from ray_cml_provider.provider.ray_auth import DISABLED_WARNING, TOKEN, configured_mode
from ray_cml_provider.provider.workspace_check import explain

OK, PROBLEM, WARNING, SKIP = "ok", "problem", "warning", "skip"
RAY_OBJECT_STORE_SHARE = 0.3  # Ray's default: 30% of the node's memory


@dataclass
class Check:
    name: str
    outcome: str
    detail: str

    def line(self) -> str:
        return f"{self.outcome:<7}  {self.name}: {self.detail}"


class Doctor:
    def __init__(self, config: dict[str, Any], client: CMLClient, gpu_quota: int | None):
        self.config = config
        self.provider = config["provider"]
        self.client = client
        self.gpu_quota = gpu_quota
        self.checks: list[Check] = []
        self.project: dict[str, Any] = {}

    def add(self, name: str, outcome: str, detail: str) -> bool:
        self.checks.append(Check(name, outcome, detail))
        return outcome == OK

    def run(self) -> list[Check]:
        self.add("config", OK, f"cluster {self.config['cluster_name']!r} is a valid CML config")
        self.ray_auth()
        reachable = self.host_answers() and self.key_accepted() and self.project_exists()
        if reachable:
            self.project_writable()
            self.runtimes_exist()
            self.shared_memory()
            self.gpu_quota_fits()
            self.existing_head()
        else:
            for name in ("project files", "runtimes", "shared memory", "GPU quota", "cluster"):
                self.add(name, SKIP, "needs the checks above")
        if self.provider_imports_on_head():
            if reachable:
                self.node_environments()
            else:
                self.add("node environment", SKIP, "needs the checks above")
        return self.checks

    def ray_auth(self) -> None:
        if configured_mode(self.provider) == TOKEN:
            self.add(
                "Ray authentication",
                OK,
                "token: every Ray port of the cluster asks for the cluster's token "
                "(ray up makes it; ray-cml status says where a session finds it)",
            )
        else:
            self.add("Ray authentication", WARNING, DISABLED_WARNING)

    # ------------------------------------------------------------------ workspace

    def host_answers(self) -> bool:
        host = self.client.settings.host
        try:
            answer = requests.get(f"{host}/api/v2/runtimes", timeout=10)
        except requests.RequestException as exc:
            reason = type(exc).__name__
            return self.add(
                "host",
                PROBLEM,
                f"{host} does not answer ({reason}); check provider.host (or CML_HOST), "
                "the URL's scheme, and your network or VPN",
            )
        return self.add("host", OK, f"{host} answers (HTTP {answer.status_code})")

    def key_accepted(self) -> bool:
        try:
            self.client.list_runtimes({"status": "ENABLED"})
        except CMLError as exc:
            return self.add("API key", PROBLEM, explain(exc, key_env_of(self.provider)))
        return self.add("API key", OK, f"accepted (from ${key_env_of(self.provider)})")

    def project_exists(self) -> bool:
        try:
            self.project = self.client.get_project()
        except CMLError as exc:
            return self.add("project", PROBLEM, explain(exc, key_env_of(self.provider)))
        name = self.project.get("name") or self.client.settings.project_id
        return self.add("project", OK, f"{name!r} ({self.client.settings.project_id})")

    def project_writable(self) -> None:
        probe = f"{CLUSTERS_DIR}/.doctor-{secrets.token_hex(4)}"
        try:
            self.client.upload_file(probe, b"ray-cml doctor probe")
            self.client.delete_file(probe, missing_ok=True)
        except CMLError as exc:
            self.add(
                "project files",
                PROBLEM,
                f"cannot write {probe} ({explain(exc)}); the key's user must be able to "
                "write the project's files (collaborator with write access)",
            )
            return
        self.add("project files", OK, f"writable ({CLUSTERS_DIR}/ holds the cluster's files)")

    def runtimes_exist(self) -> None:
        try:
            known = {r.get("image_identifier") for r in self.client.list_runtimes()}
        except CMLError as exc:
            self.add("runtimes", PROBLEM, explain(exc))
            return
        missing = [
            f"available_node_types.{name}.node_config.runtime_identifier ({runtime})"
            for name, node_type in self.config["available_node_types"].items()
            if (runtime := node_type["node_config"]["runtime_identifier"]) not in known
        ]
        if missing:
            self.add(
                "runtimes",
                PROBLEM,
                f"not a runtime of this workspace: {'; '.join(missing)}; pick an "
                "image_identifier from GET /api/v2/runtimes (or Site Administration > Runtimes)",
            )
        else:
            self.add("runtimes", OK, f"all {len(self.config['available_node_types'])} found")

    def shared_memory(self) -> None:
        limit_mb = _number(self.project.get("shared_memory_limit"))
        if not limit_mb:
            self.add("shared memory", SKIP, "the project does not report shared_memory_limit")
            return
        needs = {
            name: object_store_mb(self.config, name) for name in self.config["available_node_types"]
        }
        too_big = {name: mb for name, mb in needs.items() if mb > limit_mb}
        if too_big:
            largest = max(too_big.values())
            self.add(
                "shared memory",
                PROBLEM,
                f"the project's shared memory is {limit_mb:g} MB but Ray's object store needs "
                + ", ".join(f"{mb:g} MB on {name}" for name, mb in too_big.items())
                + f" (Ray would fall back to slow /tmp); raise the project's Shared Memory "
                f"Limit (Project Settings > Advanced) to at least {largest:g} MB, or pass a "
                "smaller --object-store-memory in the start commands",
            )
        else:
            self.add(
                "shared memory",
                OK,
                f"{limit_mb:g} MB holds every node's object store "
                f"(largest {max(needs.values()):g} MB)",
            )

    def gpu_quota_fits(self) -> None:
        types = self.config["available_node_types"]
        by_type = sum(
            int(t["node_config"].get("nvidia_gpu", 0)) * int(t.get("max_workers", 0))
            for name, t in types.items()
            if name != self.config["head_node_type"]
        )
        per_node = max(int(t["node_config"].get("nvidia_gpu", 0)) for t in types.values())
        cluster_max = self.config.get("max_workers")
        most = min(by_type, per_node * cluster_max) if isinstance(cluster_max, int) else by_type
        if self.gpu_quota is None:
            self.add(
                "GPU quota",
                SKIP,
                f"the cluster may hold up to {most} GPU(s); pass --gpu-quota N (your quota, "
                "from CML's Quota settings) to check it",
            )
            return
        try:
            apps = self.client.list_applications()
        except CMLError as exc:
            self.add("GPU quota", PROBLEM, explain(exc))
            return
        cluster = self.config["cluster_name"]
        in_use = 0
        for app in apps:
            parsed = parse_application(app.name, app.description)
            if app.status in ApplicationStatus.LIVE and (
                parsed is None or parsed[0].cluster != cluster
            ):
                in_use += app.nvidia_gpu
        free = self.gpu_quota - in_use
        detail = (
            f"the cluster may hold up to {most} GPU(s); quota {self.gpu_quota}, "
            f"{in_use} held by other applications of the project"
        )
        if most > free:
            self.add(
                "GPU quota",
                PROBLEM,
                f"{detail}: only {free} free, so launches past that wait in STARTING and are "
                "deleted after launch_timeout_s; lower max_workers or free GPUs",
            )
        else:
            self.add("GPU quota", OK, detail)

    def existing_head(self) -> None:
        cluster = self.config["cluster_name"]
        try:
            head = cluster_applications(self.client, cluster, HEAD).live_head
        except CMLError as exc:
            self.add("cluster", PROBLEM, explain(exc))
            return
        if head:
            self.add("cluster", OK, f"{head.app.name} already runs: `ray up` reuses it")
        else:
            self.add("cluster", OK, f"no head of {cluster!r} runs yet")

    # ------------------------------------------------------------------ head software

    def provider_imports_on_head(self) -> bool:
        """The provider imports here (``ray up`` ships this code to the head), and what the
        nodes install is consistent; then the node environments already in the project."""
        module = self.provider["module"]
        path, _, attr = module.rpartition(".")
        try:
            provider_class = getattr(importlib.import_module(path), attr)
        except Exception as exc:
            return self.add("provider module", PROBLEM, f"{module} does not import here: {exc}")
        from ray.autoscaler.node_provider import NodeProvider

        if not (isinstance(provider_class, type) and issubclass(provider_class, NodeProvider)):
            return self.add("provider module", PROBLEM, f"{module} is not a Ray NodeProvider")
        problems = setup_command_problems(self.config, local_ray_version())
        if problems:
            return self.add("provider module", PROBLEM, "; ".join(problems))
        return self.add(
            "provider module",
            OK,
            f"{module} imports here; ray up ships this code to the head (nothing to install)",
        )

    def node_environments(self) -> None:
        """What each node type installs, and whether the project already has it built."""
        wanted = {
            name: node_type_packages(self.config, name)
            for name in self.config["available_node_types"]
        }
        try:
            listing = self.client.list_files(ENVS_DIR)
        except CMLNotFoundError:
            listing = []
        except CMLError as exc:
            self.add("node environment", PROBLEM, f"cannot list {ENVS_DIR}: {explain(exc)}")
            return
        built, failures = [], []
        for entry in listing:
            name = entry.path.rsplit("/", 1)[-1]
            try:
                if entry.is_dir and "." not in name:
                    built.append(json.loads(self.client.download_file(f"{entry.path}/env.json")))
                elif name.endswith(".failed.json"):
                    failures.append(json.loads(self.client.download_file(entry.path)))
            except (CMLError, ValueError):
                continue  # being built, or half-gone: nothing to say
        for failure in failures:
            if failure.get("packages") in wanted.values():
                tail = " | ".join(failure.get("pip_tail", [])[-3:])
                self.add(
                    "node environment",
                    PROBLEM,
                    f"the last build of {' '.join(failure['packages'])} failed on node "
                    f"{failure.get('node')}: {failure.get('problem')} ({tail}); a new node "
                    "tries again: fix the package list or the index",
                )
                return
        for name, packages in wanted.items():
            runtime = self.config["available_node_types"][name]["node_config"]["runtime_identifier"]
            ready = any(
                b.get("packages") == packages and b.get("runtime") == runtime for b in built
            )
            self.add(
                "node environment",
                OK,
                f"{name}: {' '.join(packages)} "
                + (
                    "is built in the project: nodes start without pip"
                    if ready
                    else "is not built in the project yet: the first node of a runtime that "
                    "lacks it builds it once (pip: minutes for large packages), later nodes "
                    "reuse it"
                ),
            )


def setup_command_problems(config: dict[str, Any], ray_version: str) -> list[str]:
    """Setup commands that would undo what the provider does for the nodes: installing
    ray-cml-provider (no index carries it; ``ray up`` ships it) or another Ray."""
    commands = " ".join(
        list(config.get("setup_commands") or [])
        + list(config.get("head_setup_commands") or [])
        + list(config.get("worker_setup_commands") or [])
    )
    problems = []
    if re.search(r"pip[^;&|]*\bray-cml-provider\b", commands):
        problems.append(
            "a setup command pip-installs ray-cml-provider, which no package index carries: "
            "remove it, ray up ships the provider to the head"
        )
    unquoted = commands.replace('"', "").replace("'", "")
    pins = re.findall(r"\bray(?:\[[^\]]*\])?==([0-9][\w.]*)", unquoted)
    if any(pin != ray_version for pin in pins):
        problems.append(
            f"setup_commands install Ray {', '.join(sorted(set(pins)))} but this machine runs "
            f"{ray_version}; Ray needs the same version everywhere: list ray in pip_packages "
            "without a version instead"
        )
    return problems


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def object_store_mb(config: dict[str, Any], node_type: str) -> float:
    """The object store a node of this type asks for: ``--object-store-memory`` in its start
    commands, else Ray's default share of the application's memory."""
    is_head = node_type == config["head_node_type"]
    key = "head_start_ray_commands" if is_head else "worker_start_ray_commands"
    commands = " ".join(config.get(key) or [])
    match = re.search(r"--object-store-memory[= ](\d+)", commands)
    if match:
        return int(match.group(1)) / 1e6
    memory_gb = _number(config["available_node_types"][node_type]["node_config"]["memory"])
    return memory_gb * 1000 * RAY_OBJECT_STORE_SHARE


def main(argv: list[str] | None = None) -> int:
    """``ray-cml doctor CONFIG``: check the workspace before spending anything."""
    parser = argparse.ArgumentParser(
        prog="ray-cml doctor", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("config", help="the cluster YAML")
    parser.add_argument(
        "--gpu-quota", type=int, help="GPUs your CML quota allows (CML's API does not say)"
    )
    args = parser.parse_args(argv)
    try:
        config = load_cluster_config(args.config)
    except ClusterConfigError as exc:
        print(Check("config", PROBLEM, str(exc)).line())
        return 1
    try:
        with client_for(config["provider"]) as client:
            checks = Doctor(config, client, args.gpu_quota).run()
    except OperatorError as exc:
        print(Check("settings", PROBLEM, str(exc)).line())
        return 1
    for check in checks:
        print(check.line())
    problems = sum(c.outcome == PROBLEM for c in checks)
    print(f"{problems} problem(s)" if problems else "ready: ray up can start this cluster")
    return 1 if problems else 0
