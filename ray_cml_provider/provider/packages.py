"""What Python packages each node type needs: ``pip_packages`` in the cluster YAML.

A CML runtime has Python and pip but no Ray. The provider section's ``pip_packages`` (every
node) plus a node type's ``node_config.pip_packages`` (that type only) name what to install;
the node launcher installs them once per (runtime, Python, package set) into the project's
``.ray-cml/envs`` and every later node and cluster reuses that environment.

Ray is always part of it, pinned to the version running ``ray up``: a node with another Ray
could not join. ``ray`` listed without a version gets the pin (its extras kept); listed with
another version, it is a config error. ray-cml-provider itself is never installed: ``ray
up`` ships the code it runs into the cluster's folder.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from typing import Any

REQUIREMENT = re.compile(
    r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?P<extras>\[[^\]]*\])?(?P<rest>.*)$"
)
DEFAULT_PACKAGES = ["ray[default]"]


class PackagesError(ValueError):
    """A ``pip_packages`` entry that cannot work; the message names the field."""


def local_ray_version() -> str:
    """The Ray that runs ``ray up`` here: every node must run the same."""
    try:
        return version("ray")
    except PackageNotFoundError:
        return ""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pin_ray(packages: list[str], ray_version: str, where: str, add: bool = True) -> list[str]:
    """``packages`` with every ``ray`` requirement pinned to ``ray_version``; with ``add``,
    ``ray[default]`` is added when none is listed."""
    pinned, has_ray = [], False
    for requirement in packages:
        match = REQUIREMENT.match(requirement)
        if not match:
            raise PackagesError(f"{where}: {requirement!r} is not a pip requirement")
        if _canonical(match["name"]) != "ray" or not ray_version:
            pinned.append(requirement.strip())
            continue
        has_ray = True
        rest = match["rest"].replace(" ", "")
        if rest and rest != f"=={ray_version}":
            raise PackagesError(
                f"{where}: {requirement!r} asks for another Ray than the one running ray up "
                f"({ray_version}); leave the version out, it is pinned to {ray_version}"
            )
        pinned.append(f"ray{match['extras'] or ''}=={ray_version}")
    if add and not has_ray and ray_version:
        pinned.insert(0, f"ray[default]=={ray_version}")
    return pinned


def _listed(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise PackagesError(f"{where}: must be a list of pip requirements (strings)")
    return list(value)


def node_type_packages(
    config: dict[str, Any], node_type: str, ray_version: str | None = None
) -> list[str]:
    """What nodes of ``node_type`` install: the provider's list, then the type's own."""
    ray_version = local_ray_version() if ray_version is None else ray_version
    provider = config.get("provider") or {}
    node_config = (config.get("available_node_types") or {}).get(node_type, {}).get(
        "node_config"
    ) or {}
    common = _listed(provider.get("pip_packages", DEFAULT_PACKAGES), "provider.pip_packages")
    own_where = f"available_node_types.{node_type}.node_config.pip_packages"
    own = _listed(node_config.get("pip_packages"), own_where)
    packages = pin_ray(common, ray_version, "provider.pip_packages")
    packages += pin_ray(own, ray_version, own_where, add=False)
    return list(dict.fromkeys(packages))


def validate_packages(config: dict[str, Any]) -> None:
    for node_type in config.get("available_node_types") or {}:
        node_type_packages(config, node_type)
