"""The package's import graph has no cycle, and the core import stays light."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import transduce

PACKAGE = Path(transduce.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at the top or inside a function (a lazy import is
    still a dependency: a cycle through one only moves the failure to run time)."""
    modules = {module_name(f): f for f in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(here[: len(here) - node.level + 1] + [node.module or ""]).strip(".") \
                    if node.level else node.module
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    graph = import_graph()
    assert "transduce.registry" in graph and len(graph) > 30
    assert cycles(graph) == []


def test_cycle_detection_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_config_is_a_leaf():
    graph = import_graph()
    assert graph["transduce.config"] == set()
    # schemas and data never import models, tasks or the composition root
    for module, deps in graph.items():
        if module == "transduce.config" or module.startswith("transduce.data"):
            assert not {d for d in deps if d.startswith(("transduce.models", "transduce.tasks", "transduce.registry",
                                                         "transduce.runs", "transduce.training"))}, module


def test_core_import_is_light():
    """`import transduce.cli` (what every command pays) loads neither torch nor any optional extra."""
    code = ("import sys, transduce.cli; heavy = {'torch', 'transformers', 'ctranslate2', 'fastapi', 'matplotlib', "
            "'sacrebleu'} & set(sys.modules); print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
