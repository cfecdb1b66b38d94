"""The package's floors: each module imports only from its own floor or below, and no two
modules import each other, directly or round about (imports inside functions count).

    0  version, the stdlib node side (node_launcher, node_env, node_api, node_gateway), the
       CML client (cml), the emulator, llm's constants and Serve config helpers
    1  provider          Ray semantics on CML applications
    2  cluster, llm.preflight   a cluster seen from outside, as a library
    3  ops, api          the commands and the Python API: arguments and rendering
    4  demo              the demos and the local-cluster harness
    5  cli, the package facade (ray_cml_provider/__init__.py)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "ray_cml_provider"

FLOORS = [  # (module prefix, floor): the longest matching prefix wins
    ("ray_cml_provider.version", 0),
    ("ray_cml_provider.node_launcher", 0),
    ("ray_cml_provider.node_env", 0),
    ("ray_cml_provider.node_api", 0),
    ("ray_cml_provider.node_gateway", 0),
    ("ray_cml_provider.cml", 0),
    ("ray_cml_provider.emulator", 0),
    ("ray_cml_provider.llm", 0),
    ("ray_cml_provider.provider", 1),
    ("ray_cml_provider.llm.preflight", 2),
    ("ray_cml_provider.cluster", 2),
    ("ray_cml_provider.ops", 3),
    ("ray_cml_provider.api", 3),
    ("ray_cml_provider.demo", 4),
    ("ray_cml_provider.cli", 5),
    ("ray_cml_provider", 5),
]
# They run before anything is installed.
STDLIB_ONLY = ("node_launcher", "node_env", "node_api", "node_gateway")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE_ROOT.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``path`` imports (``from pkg import submodule`` resolved)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name in known}


def floor_of(module: str) -> int:
    prefix, floor = max(
        ((p, f) for p, f in FLOORS if module == p or module.startswith(p + ".")),
        key=lambda pf: len(pf[0]),
    )
    return floor


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(path, set(found)) - {name} for name, path in found.items()}


def test_every_module_has_a_floor(graph):
    for module in graph:
        assert floor_of(module) in range(6), module


def test_no_module_imports_from_a_floor_above_it(graph):
    upward = [
        f"{module} (floor {floor_of(module)}) imports {dep} (floor {floor_of(dep)})"
        for module, deps in graph.items()
        for dep in sorted(deps)
        if floor_of(dep) > floor_of(module)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_circle(graph):
    visiting: list[str] = []
    done: set[str] = set()
    circles: list[str] = []

    def visit(module: str) -> None:
        if module in done:
            return
        if module in visiting:
            circles.append(" -> ".join(visiting[visiting.index(module) :] + [module]))
            return
        visiting.append(module)
        for dep in sorted(graph[module]):
            visit(dep)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    assert not circles, "\n".join(circles)


def test_the_node_side_imports_only_the_standard_library_and_itself(graph):
    for name in STDLIB_ONLY:
        module = f"ray_cml_provider.{name}"
        deps = graph[module] - {f"ray_cml_provider.{other}" for other in STDLIB_ONLY}
        assert not deps, f"{module} imports {deps}: it runs before anything is installed"
