"""The package's floors: each module imports only from its own floor or below, and no two
modules import each other, directly or round about (imports inside functions count).

    0  version, errors, the contract between provider and node (contract), the figures'
       arithmetic (figures), the node side
       (node: the standard-library bootstrap stage, then the launcher's parts in the node's
       environment), the CML client (cml), the emulator, llm's constants and Serve config
       helpers
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

from ray_cml_provider.provider.shipping import LAUNCHER_FILES

PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "ray_cml_provider"

FLOORS = [  # (module prefix, floor): the longest matching prefix wins
    ("ray_cml_provider.version", 0),
    ("ray_cml_provider.errors", 0),
    ("ray_cml_provider.contract", 0),
    ("ray_cml_provider.figures", 0),
    ("ray_cml_provider.node", 0),
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
# The bootstrap stage: it runs before anything is installed, uploaded flat (shipping.py).
STDLIB_ONLY = {
    f"ray_cml_provider.{module[:-3].replace('/', '.')}": flat[:-3]
    for flat, module in LAUNCHER_FILES.items()
}


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
    """The first names of what ``path`` imports (only at module level unless ``everywhere``;
    module level includes both sides of an ``if``/``try`` there)."""
    tree = ast.parse(path.read_text())
    return _imports_in(list(ast.walk(tree)) if everywhere else tree.body, everywhere)


def _imports_in(nodes: list[ast.AST], everywhere: bool) -> set[str]:
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.If | ast.Try) and not everywhere:
            branches = node.body + node.orelse
            branches += [s for h in getattr(node, "handlers", []) for s in h.body]
            found |= _imports_in(branches, everywhere)
    return found


def module_path(module: str) -> Path:
    return PACKAGE_ROOT.parent / (module.replace(".", "/") + ".py")


def test_the_bootstrap_stage_imports_only_the_standard_library_and_itself(graph):
    for module in STDLIB_ONLY:
        deps = graph[module] - set(STDLIB_ONLY)
        assert not deps, f"{module} imports {deps}: it runs before anything is installed"
        outside = (
            top_level_imports(module_path(module), everywhere=True)
            - set(sys.stdlib_module_names)
            - {"ray_cml_provider", "__future__", *STDLIB_ONLY.values()}
        )
        assert not outside, f"{module} imports {outside}: it runs before anything is installed"


def test_the_launcher_starts_without_the_nodes_environment():
    """It reports a failed environment, so only the gateway and the cluster's metrics
    (aiohttp, prometheus_client) wait for one: they are imported when the door opens."""
    allowed = set(sys.stdlib_module_names) | {"ray_cml_provider", "__future__"}
    for path in sorted((PACKAGE_ROOT / "node").glob("*.py")):
        at_start = top_level_imports(path, everywhere=False)
        if path.name in ("gateway.py", "connections.py", "cluster_metrics.py", "door_figures.py"):
            assert at_start & {"aiohttp", "prometheus_client"}
        else:
            assert at_start <= allowed | set(STDLIB_ONLY.values()), path.name
