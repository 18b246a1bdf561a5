"""The package's shape: no import cycles, registries at the bottom, modules and functions of a size
one can read. Imports are read from the source (ast), so a cycle hidden in a function body counts;
imports under ``if TYPE_CHECKING:`` do not (they never run)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gancleanse"
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def runtime_nodes(tree: ast.AST):
    """Every node except the bodies of ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imports_of(name: str) -> set[str]:
    """The package modules ``name`` imports (a package's name when the module is its __init__)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                found.add(full if full in MODULES else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert cycles(GRAPH) == []


def test_registries_and_config_are_at_the_bottom():
    leaves = {"gancleanse.errors", "gancleanse.options", "gancleanse.specs", "gancleanse.toml_writer",
              "gancleanse.validation"}
    assert GRAPH["gancleanse.errors"] == set()
    assert GRAPH["gancleanse.validation"] == {"gancleanse.errors"}
    assert GRAPH["gancleanse.options"] <= {"gancleanse.errors", "gancleanse.validation"}
    assert GRAPH["gancleanse.specs"] <= {"gancleanse.errors", "gancleanse.options"}
    assert GRAPH["gancleanse.toml_writer"] == set()
    assert GRAPH["gancleanse.config"] <= leaves


def test_training_does_not_import_the_scorers():
    for name, imported in GRAPH.items():
        if name.startswith("gancleanse.training"):
            assert not {m for m in imported if m.startswith("gancleanse.influence")}, name


def test_the_cli_uses_only_the_api_and_the_shared_registries():
    allowed = {"gancleanse.api", "gancleanse.cli_arguments", "gancleanse.config", "gancleanse.errors",
               "gancleanse.specs", "gancleanse.options", "gancleanse.validation", "gancleanse.version"}
    assert GRAPH["gancleanse.cli"] <= allowed
    assert GRAPH["gancleanse.cli_arguments"] <= allowed


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_and_function_sizes(name):
    tree = ast.parse(MODULES[name].read_text())
    assert len(MODULES[name].read_text().splitlines()) <= MAX_FILE_LINES
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []
