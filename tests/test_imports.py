"""The package graph has no cycle: no two of openr2's parts (subpackages and top-level modules) import each
other, directly or through others, counting imports inside functions (grimp, import-linter's own graph).
The layers and forbidden imports themselves are pyproject.toml's [tool.importlinter], run by make test."""

from __future__ import annotations

import pytest

grimp = pytest.importorskip("grimp")


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def test_no_import_cycle_between_parts():
    graph = grimp.build_graph("openr2", cache_dir=None)
    edges: dict[str, set[str]] = {}
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            if _part(module) != _part(imported) and "openr2" not in (_part(module), _part(imported)):
                edges.setdefault(_part(module), set()).add(_part(imported))
    # depth-first search for a back edge: a cycle, reported as the path that closes it
    state: dict[str, str] = {}

    def visit(part: str, path: list[str]) -> list[str] | None:
        state[part] = "open"
        for nxt in sorted(edges.get(part, ())):
            if state.get(nxt) == "open":
                return path + [part, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [part])):
                return cycle
        state[part] = "done"
        return None

    for part in sorted(edges):
        if part not in state:
            cycle = visit(part, [])
            assert cycle is None, "import cycle: " + " -> ".join(cycle)
    assert {"engine", "model", "tasks"} <= set(edges)  # the graph was really read
