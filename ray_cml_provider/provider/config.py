"""Validation of the cluster YAML's CML parts, before any API call.

jsonschema checks the provider section and every node type's ``node_config``; a few rules
no schema can say (the head has no GPUs, min <= max workers, the cluster name must fit a CML
subdomain) follow. Every error is one sentence naming the field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from ray_cml_provider.errors import ConfigError
from ray_cml_provider.provider.packages import PackagesError, validate_packages

CLUSTER_NAME_PATTERN = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
MAX_CLUSTER_NAME = 40  # "ray-" + name + "-worker-" + 8 hex digits must fit 63 characters

PROVIDER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "module"],
    "additionalProperties": False,
    "patternProperties": {"^_": {}},  # Ray adds private keys such as _config_cache_path
    "properties": {
        "type": {"const": "external"},
        "module": {"type": "string"},
        "host": {"type": "string", "minLength": 1},
        "project_id": {"type": "string", "minLength": 1},
        "api_key_env": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
        "launch_timeout_s": {"type": "number", "exclusiveMinimum": 0},
        "head_lost_timeout_s": {"type": "number", "exclusiveMinimum": 0},
        "poll_interval_s": {"type": "number", "exclusiveMinimum": 0},
        "pip_packages": {"type": "array", "items": {"type": "string", "minLength": 1}},
        "ray_auth_mode": {"enum": ["token", "disabled"]},
        "autostop_minutes": {"type": "number", "exclusiveMinimum": 0},
        "head_recovery": {"type": "boolean"},
        # The Prometheus binary the head runs for Ray's dashboard: a path, auto, or off.
        "prometheus": {"type": "string", "minLength": 1},
        # Keys Ray itself reads from the provider section.
        "use_internal_ips": {"type": "boolean"},
        "disable_node_updaters": {"type": "boolean"},
        "disable_launch_config_check": {"type": "boolean"},
        "foreground_node_launch": {"type": "boolean"},
    },
}

NODE_CONFIG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["cpu", "memory", "runtime_identifier"],
    "additionalProperties": False,
    "properties": {
        "cpu": {"type": "number", "exclusiveMinimum": 0},
        "memory": {"type": "number", "exclusiveMinimum": 0},
        "nvidia_gpu": {"type": "integer", "minimum": 0},
        "runtime_identifier": {"type": "string", "minLength": 1},
        "accelerator_type": {"type": "string", "pattern": "^[A-Za-z0-9_.-]+$"},
        "accelerator_label_id": {"type": ["string", "integer"]},
        "resource_profile_id": {"type": ["string", "integer"]},
        "resource_group_id": {"type": ["string", "integer"]},
        "runtime_addon_identifiers": {"type": "array", "items": {"type": "string"}},
        "environment": {"type": "object", "additionalProperties": {"type": "string"}},
        "bypass_authentication": {"type": "boolean"},
        "kernel": {"type": "string"},
        "pip_packages": {"type": "array", "items": {"type": "string", "minLength": 1}},
    },
    "patternProperties": {"^_": {}},  # _ray_cml: added by bootstrap_config, not by users
}


class ClusterConfigError(ConfigError):
    """The cluster YAML cannot work; the message names the field."""


def _first_error(instance: Any, schema: dict[str, Any], where: str) -> None:
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    if not errors:
        return
    error = errors[0]
    path = ".".join([where, *[str(p) for p in error.absolute_path]])
    if error.validator == "additionalProperties":
        known = [k for k in error.schema["properties"] if not k.startswith("_")]
        extra = sorted(k for k in error.instance if k not in known and not k.startswith("_"))
        raise ClusterConfigError(
            f"{path}: unknown key {extra[0]!r} (known keys: {', '.join(known)})"
        )
    raise ClusterConfigError(f"{path}: {error.message}")


def validate_provider_config(provider_config: dict[str, Any]) -> None:
    _first_error(provider_config, PROVIDER_SCHEMA, "provider")


def validate_cluster_name(cluster_name: Any) -> None:
    if not isinstance(cluster_name, str) or not CLUSTER_NAME_PATTERN.match(cluster_name):
        raise ClusterConfigError(
            f"cluster_name: {cluster_name!r} cannot form a CML subdomain: use lower-case "
            "letters, digits and single hyphens"
        )
    if len(cluster_name) > MAX_CLUSTER_NAME:
        raise ClusterConfigError(
            f"cluster_name: {cluster_name!r} is longer than {MAX_CLUSTER_NAME} characters"
        )


def validate_cluster_config(config: dict[str, Any]) -> None:
    """Everything CML-specific in a cluster YAML; raises ``ClusterConfigError``."""
    validate_cluster_name(config.get("cluster_name"))
    validate_provider_config(config.get("provider") or {})
    node_types = config.get("available_node_types")
    if not isinstance(node_types, dict) or not node_types:
        raise ClusterConfigError("available_node_types: at least one node type is required")
    head_type = config.get("head_node_type")
    if head_type not in node_types:
        raise ClusterConfigError(
            f"head_node_type: {head_type!r} is not one of available_node_types "
            f"({', '.join(node_types)})"
        )
    for name, node_type in node_types.items():
        where = f"available_node_types.{name}"
        if not isinstance(node_type, dict):
            raise ClusterConfigError(f"{where}: must be a mapping")
        _first_error(node_type.get("node_config", {}), NODE_CONFIG_SCHEMA, f"{where}.node_config")
        for key in node_type.get("node_config", {}).get("environment") or {}:
            if key.startswith("RAY_AUTH_"):
                # A token there would sit in CML's record of the application, for anyone
                # who can list the project's applications; a mode there would split the
                # cluster (a node that cannot join).
                raise ClusterConfigError(
                    f"{where}.node_config.environment.{key}: "
                    "ray-cml sets Ray's authentication on every node itself "
                    "(provider.ray_auth_mode)"
                )
        low, high = node_type.get("min_workers", 0), node_type.get("max_workers", 0)
        if isinstance(low, int) and isinstance(high, int) and low > high:
            raise ClusterConfigError(f"{where}.min_workers: {low} is more than max_workers {high}")
        if node_type.get("node_config", {}).get("bypass_authentication") and name != head_type:
            raise ClusterConfigError(
                f"{where}.node_config.bypass_authentication: only the head's URL serves the "
                "cluster (the OpenAI API and the dashboard); a worker's stays behind CML's login"
            )
        if name == head_type:
            if node_type["node_config"].get("bypass_authentication") and (
                (config.get("provider") or {}).get("ray_auth_mode", "token") != "token"
            ):
                raise ClusterConfigError(
                    f"{where}.node_config.bypass_authentication: needs provider.ray_auth_mode: "
                    "token; with CML's login bypassed, Ray's token is what keeps the dashboard "
                    "and its job API (which run code) closed to the endpoint key's holders"
                )
            gpus = node_type["node_config"].get("nvidia_gpu", 0)
            declared = (node_type.get("resources") or {}).get("GPU", 0)
            if gpus or declared:
                raise ClusterConfigError(
                    f"{where}: the head coordinates only and gets no GPUs; set "
                    "node_config.nvidia_gpu and resources.GPU to 0 and put GPUs on a worker type"
                )
    for command in config.get("head_start_ray_commands") or []:
        if re.search(r"--dashboard-port[= ]+\$\{?CDSW_APP_PORT\b", str(command)):
            raise ClusterConfigError(
                "head_start_ray_commands: --dashboard-port=$CDSW_APP_PORT: the application's "
                "port is the head's gateway now (the dashboard and the OpenAI API at one URL); "
                "start the dashboard on --dashboard-port=$RAY_CML_DASHBOARD_PORT "
                "(docs/migration.md)"
            )
    try:
        validate_packages(config)
    except PackagesError as exc:
        raise ClusterConfigError(str(exc)) from None


def node_type_resources(node_type: dict[str, Any], is_head: bool) -> dict[str, float]:
    """The Ray resources a node type advertises: the user's, else derived from node_config.

    GPU comes from ``nvidia_gpu`` and, when the type names ``accelerator_type`` (A10G,
    H100, ...), the ``accelerator_type:<X>`` key that Ray Serve LLM replicas ask for.
    """
    node_config = node_type.get("node_config", {})
    resources = dict(node_type.get("resources") or {})
    resources.setdefault("CPU", int(node_config.get("cpu", 1)))
    resources.setdefault("GPU", 0 if is_head else int(node_config.get("nvidia_gpu", 0)))
    accelerator = node_config.get("accelerator_type")
    if accelerator and not is_head:
        resources.setdefault(f"accelerator_type:{accelerator}", 1)
    if is_head:
        resources["GPU"] = 0
    return resources


def load_cluster_config(path: str | Path) -> dict[str, Any]:
    """Read and validate a cluster YAML; every problem is one ``ClusterConfigError`` line."""
    try:
        with open(path) as handle:
            config = yaml.safe_load(handle)
    except OSError as exc:
        raise ClusterConfigError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where else ""
        raise ClusterConfigError(
            f"{path} is not valid YAML{line}: {getattr(exc, 'problem', None) or exc}"
        ) from None
    if not isinstance(config, dict):
        raise ClusterConfigError(
            f"{path} must hold a mapping (a cluster config), not {type(config).__name__}"
        )
    try:
        validate_cluster_config(config)
    except ClusterConfigError as exc:
        raise ClusterConfigError(f"invalid cluster config: {exc}") from None
    return config


def main(argv: list[str] | None = None) -> int:
    """``ray-cml validate CONFIG``: check a cluster YAML without calling any API."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="ray-cml validate", description=main.__doc__)
    parser.add_argument("config")
    args = parser.parse_args(argv)
    try:
        load_cluster_config(args.config)
    except ClusterConfigError as exc:
        print(f"ray-cml: {exc}", file=sys.stderr)
        return 1
    print(f"ok: {args.config} is a valid CML cluster config")
    return 0
