"""The package's shape: who imports whom (no cycles), who talks to MLflow (only tracking.py), and
how long a module may grow. Read from the source with `ast`, so nothing is imported or run."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from .conftest import ROOT

PACKAGE = ROOT / "resnet_ablate"
MAX_LINES = 700


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """Every module of the package that `name` imports: at the top, inside functions, or only
    for type checking (any of them can close a cycle)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from . import tracking` names a module
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as a path that returns to its start, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    graph = {name: imports_of(name) for name in MODULES}
    assert graph["resnet_ablate.engine"] >= {"resnet_ablate.tracking", "resnet_ablate.train"}
    assert "resnet_ablate.tune.studies" in graph["resnet_ablate.report.tuning"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_check_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def mlflow_users(name: str) -> list[str]:
    """What in a module reaches MLflow's client: `.client`, `MlflowClient`, `import mlflow`."""
    uses = []
    for node in ast.walk(ast.parse(MODULES[name].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and node.attr == "client":
            uses.append(f"line {node.lineno}: .client")
        elif isinstance(node, ast.Name) and node.id == "MlflowClient":
            uses.append(f"line {node.lineno}: MlflowClient")
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names]
            module = getattr(node, "module", None) or ""
            if "mlflow" in names or module in ("mlflow", "mlflow.tracking", "mlflow.client"):
                uses.append(f"line {node.lineno}: imports {module or names}")
    return uses


def test_only_tracking_talks_to_the_mlflow_client():
    users = {name: mlflow_users(name) for name in MODULES}
    assert users["resnet_ablate.tracking"], "the check must see tracking.py's own client use"
    others = {name: uses for name, uses in users.items() if uses and not name.endswith("tracking")}
    assert not others, others


@pytest.mark.parametrize("name", sorted(MODULES), ids=str)
def test_no_module_is_too_long(name):
    path = MODULES[name]
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines; split it by concept"
