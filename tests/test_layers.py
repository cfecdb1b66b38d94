"""The package's floors: each module imports only from its own floor or below, and no two
modules import each other, directly or round about (imports inside functions count).

    0  version, the node side (node_bootstrap, node_env, node_api: standard library; then
       node_launcher and node_gateway, in the node's environment), the
       CML client (cml), the emulator, llm's constants and Serve config helpers
    1  provider          Ray semantics on CML applications
    2  cluster, llm.preflight   a cluster seen from outside, as a library
    3  ops, api          the commands and the Python API: arguments and rendering
    4  demo              the demos and the local-cluster harness
    5  cli, the package facade (ray_cml_provider/__init__.py)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "ray_cml_provider"

FLOORS = [  # (module prefix, floor): the longest matching prefix wins
    ("ray_cml_provider.version", 0),
    ("ray_cml_provider.node_bootstrap", 0),
    ("ray_cml_provider.node_processes", 0),
    ("ray_cml_provider.node_watchdog", 0),
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
# The bootstrap stage: it runs before anything is installed.
STDLIB_ONLY = ("node_bootstrap", "node_env", "node_api", "node_processes")


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


def top_level_imports(path: Path, everywhere: bool) -> set[str]:
    """The first names of what ``path`` imports (only at module level unless ``everywhere``)."""
    tree = ast.parse(path.read_text())
    nodes = ast.walk(tree) if everywhere else tree.body
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Try) and not everywhere:
            found |= top_level_imports_of(node.body)
    return found


def top_level_imports_of(body: list[ast.stmt]) -> set[str]:
    return {
        alias.name.split(".")[0]
        for node in body
        if isinstance(node, ast.Import)
        for alias in node.names
    }


def test_the_bootstrap_stage_imports_only_the_standard_library_and_itself(graph):
    stage = {f"ray_cml_provider.{other}" for other in STDLIB_ONLY}
    for name in STDLIB_ONLY:
        module = f"ray_cml_provider.{name}"
        deps = graph[module] - stage
        assert not deps, f"{module} imports {deps}: it runs before anything is installed"
        outside = (
            top_level_imports(PACKAGE_ROOT / f"{name}.py", everywhere=True)
            - set(sys.stdlib_module_names)
            - {"ray_cml_provider", "__future__", *STDLIB_ONLY}
        )
        assert not outside, f"{module} imports {outside}: it runs before anything is installed"


def test_the_launcher_starts_without_the_nodes_environment():
    """It reports a failed environment, so only the gateway (aiohttp) waits for one."""
    at_start = top_level_imports(PACKAGE_ROOT / "node_launcher.py", everywhere=False)
    assert at_start <= set(sys.stdlib_module_names) | {"ray_cml_provider", "__future__"}
    gateway = top_level_imports(PACKAGE_ROOT / "node_gateway.py", everywhere=False)
    assert "aiohttp" in gateway
