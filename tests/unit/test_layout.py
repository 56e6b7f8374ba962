"""The layout ARCHITECTURE.md describes holds: imports point one way, no circles.

Read from the source (ast), not by importing: a module imported lazily inside a
function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every module of pgleader/ and service/ -> the modules of ours it imports."""
    paths = [*(ROOT / "pgleader").rglob("*.py"), *(ROOT / "service").rglob("*.py")]
    modules = {_module_name(path): path for path in paths}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names]
                # `from pgleader import __version__` reads a constant set before the
                # package imports its modules: not an edge of behaviour.
                if not all(a.name.startswith("__") for a in node.names):
                    targets.append(node.module)
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def test_the_library_never_imports_the_gateway():
    for module, imports in import_graph().items():
        if module.startswith("pgleader"):
            assert not [i for i in imports if i.startswith("service")], module


def test_the_web_layer_gets_a_surface_not_the_gateway_or_its_wiring():
    for module, imports in import_graph().items():
        if module.startswith("service.web"):
            assert not imports & {"service.gateway", "service.process"}, module


def test_only_the_wiring_and_the_cli_reach_the_web_layer():
    for module, imports in import_graph().items():
        if not module.startswith("service.web") and module not in ("service.process",):
            assert not [i for i in imports if i.startswith("service.web")], module


def test_there_is_no_import_circle():
    graph = import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not circles, circles
