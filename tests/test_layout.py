"""The package's shape stays what docs/ARCHITECTURE.md says: no import circles, kernels below passes,
the runtime apart from the compiler side. Walks every import, function-local ones included."""

from __future__ import annotations

import ast
from pathlib import Path

import shiftadd

ROOT = Path(shiftadd.__file__).parent


def _module(path: Path) -> str:
    parts = ["shiftadd", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """shiftadd module -> the shiftadd modules it imports (a package import counts as its __init__)."""
    files = {_module(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        edges = graph.setdefault(mod, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in files)
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")
                if node.level:
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target not in files:
                    continue
                subs = {f"{target}.{a.name}" for a in node.names} & files.keys()
                edges.update(subs)
                if len(subs) < len(node.names) or path.name != "__init__.py" or target != mod:
                    edges.add(target)
        edges.discard(mod)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _reaches(graph, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_the_walk_sees_known_imports():
    g = import_graph()
    assert "shiftadd.relax_passes.pipeline" in g["shiftadd.compiler"]
    assert "shiftadd.quant.bcq" in g["shiftadd.quant"]


def test_no_import_circles():
    assert _cycles(import_graph()) == []


def test_kernels_never_import_passes():
    g = import_graph()
    bad = {
        m: sorted(w for w in g[m] if w.startswith("shiftadd.relax_passes"))
        for m in g
        if m.startswith("shiftadd.schedules")
    }
    assert {m: w for m, w in bad.items() if w} == {}


def test_passes_never_import_tuning():
    """The pipeline takes tuned records from its caller (tuning.records), so tuning may build on it."""
    g = import_graph()
    assert {
        m: sorted(w for w in g[m] if w.startswith("shiftadd.tuning"))
        for m in g
        if m.startswith("shiftadd.relax_passes") and any(w.startswith("shiftadd.tuning") for w in g[m])
    } == {}


def test_quant_is_pure_math():
    g = import_graph()
    for m in g:
        if m.startswith("shiftadd.quant"):
            assert all(w.startswith("shiftadd.quant") for w in _reaches(g, m)), m


def test_runtime_stays_apart_from_the_compiler():
    g = import_graph()
    for m in g:
        if m.startswith("shiftadd.runtime"):
            assert all(w.startswith("shiftadd.runtime") for w in _reaches(g, m)), (m, _reaches(g, m))


def test_the_command_line_starts_without_torch_or_tvm():
    """``shiftadd run``/``--help`` parse their arguments before any heavy import (the compile side
    imports torch and TVM when it runs)."""
    import subprocess
    import sys

    code = "import sys, shiftadd.cli; print(sorted(m for m in ('torch', 'tvm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
