"""The layout keeps its shape: stages import only the stages beneath them, and nothing imports in a circle.

The stages and their allowed arrows are those docs/architecture.md draws. Imports are read from the
source (inside functions too), so a lazy import cannot hide an arrow.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import polykv

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"polykv": ROOT / "polykv", "polykv_plugins": ROOT / "plugins"}

#: What every stage shares: contracts, records and plain values, at the package's root.
SHARED = {"errors", "arguments", "limits", "files", "values", "converters", "budget", "parameters", "choice",
          "serialization", "policy", "signals", "solver", "hooks", "registry"}  # fmt: skip
#: Stage -> the stages it may import (besides itself and the shared modules).
ALLOWED = {
    "model": set(),
    "language": set(),
    "cache": {"model"},
    "profile": {"model"},
    "tasks": set(),
    "resolution": {"language", "profile"},
    "plan": {"language", "resolution", "cache", "model", "profile"},
    "harness": {"plan", "cache", "model", "tasks"},
    "calibration": {"harness", "plan", "resolution", "profile", "cache", "model", "tasks"},
    "evaluation": {"harness", "plan", "language", "cache", "tasks"},
    "decoding": {"harness", "plan", "cache", "model"},
    "plugins": set(),
}
#: Entry points: they may import any stage.
TOP = {"cli", "testing", "__init__", "__main__", "grammar"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _owner(name: str) -> str | None:
    """The module (of MODULES) an imported name belongs to."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    tree = ast.parse(MODULES[module].read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {_owner(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(_owner(full) if full in MODULES else _owner(node.module))
    return {name for name in found if name and name != module}


GRAPH = {module: _imports(module) for module in MODULES}


def stage(module: str) -> str:
    """``cache`` for polykv.cache.layer, ``shared`` for polykv.budget, ``plugins`` for polykv_plugins.x."""
    parts = module.split(".")
    if parts[0] == "polykv_plugins":
        return "plugins"
    if len(parts) == 1:
        return "__init__"
    return "shared" if parts[1] in SHARED else parts[1]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_itself_through_others():
    assert _cycles(GRAPH) == []


def test_stages_import_only_the_stages_beneath_them():
    wrong = sorted(
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        for target in targets
        if stage(module) not in TOP
        and stage(target) not in {stage(module), "shared"}
        and stage(target) not in ALLOWED.get(stage(module), set())
    )
    assert wrong == []


def test_the_stages_form_no_circle():
    stages: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        stages.setdefault(stage(module), set()).update(stage(t) for t in targets if stage(t) != stage(module))
    assert _cycles(stages) == []


def test_every_stage_is_declared():
    assert {stage(module) for module in MODULES} <= set(ALLOWED) | TOP | {"shared"}


def test_the_cache_knows_nothing_of_the_language():
    assert not any(stage(t) == "language" for m in MODULES if stage(m) == "cache" for t in GRAPH[m])


@pytest.mark.parametrize("name", polykv.__all__)
def test_every_public_name_imports_from_where_the_list_says(name):
    value = getattr(polykv, name)
    module = importlib.import_module(polykv._EXPORTS[name])
    assert getattr(module, name) is value


def test_the_contracts_of_every_kind_of_plugin_are_public():
    assert {"Policy", "ScoringPolicy", "Signal", "Solver", "hookimpl", "Registry"} <= set(polykv.__all__)
