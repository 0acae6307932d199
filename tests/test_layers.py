"""The package's imports run down the layers of docs/architecture.md and form no cycle: every
``import`` of every module (function-local and type-checking ones included) is read with ``ast``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "codetr"
# Lowest first: a module may import its own layer and those below it, never one above.
LAYERS = [
    ("base", ["errors", "structures", "config", "config_parsing", "devices", "distributed", "files", "configs"]),
    ("ops", ["ops"]),
    ("data", ["data"]),
    ("models", ["models"]),
    ("inference", ["inference"]),
    ("training", ["training"]),
    ("tools", ["export", "convert", "benchmark", "zoo"]),
    ("front", ["api", "cli", "__init__", "__main__"]),  # codetr/__init__.py: the lazy ``from codetr import Detector``
]
LAYER_OF = {part: rank for rank, (_, parts) in enumerate(LAYERS) for part in parts}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int:
    """The layer rank of a codetr module (``codetr`` itself: the front, as its lazy facade)."""
    parts = module.split(".")
    return LAYER_OF["__init__"] if len(parts) == 1 else LAYER_OF[parts[1]]


def imported(module: str) -> set[str]:
    """The codetr modules ``module`` imports (``from codetr import x`` names module ``codetr.x`` when there is one)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names}
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: imported(module) for module in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
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
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer() -> None:
    assert all(layer(module) >= 0 for module in MODULES)


def test_imports_run_down_the_layers() -> None:
    upward = [f"{module} ({LAYERS[layer(module)][0]}) imports {target} ({LAYERS[layer(target)][0]})"
              for module, targets in GRAPH.items() for target in sorted(targets) if layer(target) > layer(module)]
    assert not upward, "\n".join(upward)


def test_no_import_cycle() -> None:
    assert not cycles(GRAPH)


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
])
def test_the_cycle_finder_finds_cycles(graph: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert cycles(graph) == expected


def test_the_import_reader_sees_function_local_imports() -> None:
    assert "codetr.models.build" in GRAPH["codetr.inference.loading"]  # imported inside build_detector
