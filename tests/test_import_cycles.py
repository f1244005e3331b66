"""Import structure of kacq_hooks: no module-level import cycle, and no import inside a function that only
dodges one (it would hide the cycle until that function runs). Read from the source with ``ast``, so a
new cycle fails here before anything imports it; then every module is imported alone in a fresh process."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "kacq_hooks"

# Imports inside functions that break a cycle today: none may be added (the test fails on a new one, and on
# one listed here that is gone, so the list only shrinks).
KNOWN_DODGES: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _targets(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The kacq_hooks modules an import statement loads (a submodule named in ``from X import sub`` counts)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in known]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        name = ".".join(base + ([node.module] if node.module else []))
    else:
        name = node.module or ""
    if name not in known:
        return []
    subs = [f"{name}.{a.name}" for a in node.names if f"{name}.{a.name}" in known]
    return subs or [name]


def _imports(known: dict[str, Path]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module-level edges, edges from imports inside functions) between kacq_hooks modules."""
    top: dict[str, set[str]] = {m: set() for m in known}
    local: dict[str, set[str]] = {m: set() for m in known}
    for module, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        inside = {id(n) for f in functions for n in ast.walk(f) if n is not f}
        never = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                 and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}  # never run
        for node in ast.walk(tree):
            targets = [t for t in _targets(node, module, is_package, set(known)) if t != module]
            if targets and id(node) not in never:
                (local if id(node) in inside else top)[module].update(targets)
    return top, local


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each module that reaches itself (a path back to it, shortest first found)."""
    out, covered = [], set()
    for start in sorted(graph):
        if start in covered or start not in _reach(graph, start):
            continue
        parents, todo = {start: None}, [start]
        while todo:  # breadth first back to start
            node = todo.pop(0)
            if start in graph[node]:
                path = [start]
                while node is not None:
                    path.append(node)
                    node = parents[node]
                cycle = path[::-1]
                covered |= set(cycle)
                out.append(cycle)
                break
            for nxt in sorted(graph[node]):
                if nxt not in parents:
                    parents[nxt] = node
                    todo.append(nxt)
    return out


def test_no_module_level_import_cycle():
    top, _ = _imports(_modules())
    assert _cycles(top) == []


def _dodges(top: dict[str, set[str]], local: dict[str, set[str]]) -> set[tuple[str, str]]:
    """Function-local imports m -> t where t leads back to m, through module-level imports or other local ones
    (two modules that import each other inside functions dodge the same cycle)."""
    both = {m: top.get(m, set()) | local.get(m, set()) for m in set(top) | set(local)}
    return {(m, t) for m, targets in local.items() for t in targets if m in _reach(both, t) or m == t}


def test_no_import_inside_a_function_only_dodges_a_cycle():
    top, local = _imports(_modules())
    dodges = _dodges(top, local)
    assert dodges - KNOWN_DODGES == set(), "a function-local import hides an import cycle"
    assert KNOWN_DODGES - dodges == set(), "a known dodge is gone: remove it from KNOWN_DODGES"


def test_the_checker_sees_a_cycle_and_a_dodge():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _dodges({"a": {"b"}, "b": set()}, {"b": {"a"}}) == {("b", "a")}
    assert _dodges({"a": set(), "b": set()}, {"a": {"b"}, "b": {"a"}}) == {("a", "b"), ("b", "a")}  # both local
    assert _dodges({"a": set(), "b": set()}, {"a": {"b"}}) == set()  # a lazy import that closes no cycle
    tree = ast.parse("from .b import x\ndef f():\n    from . import c\n")
    node = tree.body[0]
    assert _targets(node, "p.a", False, {"p.a", "p.b", "p.c"}) == ["p.b"]
    assert _targets(tree.body[1].body[0], "p.a", False, {"p", "p.a", "p.b", "p.c"}) == ["p.c"]


@pytest.mark.parametrize("module", ["kacq_hooks.locate", "kacq_hooks.locate.moe", "kacq_hooks.experts",
                                    "kacq_hooks.locate.sites", "kacq_hooks.locate.roots",
                                    "kacq_hooks.frontends.nnsight", "kacq_hooks.saving",
                                    "kacq_hooks.sweep_exec", "kacq_hooks.sweep_worker"])
def test_model_discovery_and_the_taps_import_alone(module):
    code = f"import sys; sys.path.insert(0, {str(SRC)!r}); import {module}"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
