"""Every file's imports point one way: no import circles in ``cliplab`` or ``benchmarks``, and no module imports
another module's private (``_name``) helpers.

Read statically (``ast``), so imports inside functions and under ``TYPE_CHECKING`` count: a lazy import that only
hides a circle from Python still makes two files depend on each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO


def _modules() -> dict[str, Path]:
    mods = {}
    for p in sorted((REPO / "cliplab").rglob("*.py")):
        parts = p.relative_to(REPO).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    for p in sorted((REPO / "benchmarks").glob("*.py")):  # scripts: they import each other by file stem
        mods[p.stem] = p
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]):
    """``(line, target module, imported names)`` for every import of a module in ``mods``."""
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, ()
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = name.split(".") if is_pkg else name.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield node.lineno, (sub if sub in mods else base), (() if sub in mods else (alias.name,))


def _owner(target: str, mods: dict[str, Path]) -> str | None:
    while target and target not in mods:
        target = target.rpartition(".")[0]
    return target or None


def _graph():
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    private = []
    for name, path in mods.items():
        for line, target, names in _imports(name, path, mods):
            owner = _owner(target, mods)
            if owner is None or owner == name:
                continue
            graph[name].add(owner)
            private += [f"{path.relative_to(REPO)}:{line} imports {n} from {owner}"
                        for n in names if n.startswith("_") and not n.startswith("__")]
    return graph, private


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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


def test_no_import_circles():
    graph, _ = _graph()
    assert len(graph) > 100  # the walk found the package
    found = _cycles(graph)
    detail = ["  " + " <-> ".join(c) + ": " + "; ".join(f"{a} -> {b}" for a in c for b in sorted(graph[a] & set(c)))
              for c in found]
    assert not found, "import circles:\n" + "\n".join(detail)


def test_cycle_finder_finds_a_planted_circle():
    graph, _ = _graph()
    graph["cliplab.models.config"].add("cliplab.models.clip")  # clip imports config: a two-module circle
    assert any({"cliplab.models.clip", "cliplab.models.config"} <= set(c) for c in _cycles(graph))


def test_no_private_imports_across_modules():
    _, private = _graph()
    assert not private, "private helpers imported from another module (make them public, or move them down):\n" + \
        "\n".join(private)
