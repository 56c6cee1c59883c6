"""The package's import graph: no cycles between modules of ``stride_jax``, and nothing in it
imports the CLI (``stride_jax.cli`` sits on top; the library must work without it).

Imports are read from the source (every ``import``, at module level or inside a function), so a
lazy import that closes a cycle counts too. ``from pkg import name`` depends on ``pkg`` (and on
``pkg.name`` when that is a module); importing a submodule does not count as depending on its
parent package's ``__init__``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import stride_jax

ROOT = Path(stride_jax.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The stride_jax modules ``name`` imports (anywhere in its source)."""
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES)
    # A submodule's import of its own package (or an ancestor) is Python's doing, not a choice.
    return {m for m in found if m != name and not name.startswith(m + ".")}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    assert "stride_jax.attributor" in GRAPH["stride_jax.cli"]
    assert "stride_jax.errors" in GRAPH["stride_jax.config"]


def test_no_module_imports_the_cli():
    importers = sorted(m for m, deps in GRAPH.items() if "stride_jax.cli" in deps)
    assert importers == [], f"modules importing stride_jax.cli: {importers}"


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_a_cycle_would_be_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("module", ["stride_jax.errors"])
def test_leaf_modules_import_nothing_of_stride_jax(module):
    assert GRAPH[module] == set()
