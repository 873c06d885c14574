"""The import graph of the project's packages follows the layers of docs/design.md, with no
circle among modules. Every import counts: top-level, inside functions, and under TYPE_CHECKING.
"""

import ast
import os

from tests.helpers.paths import REPO

# Lower number = lower layer. A module may import its own package or a lower layer, never up.
LAYERS = {
    "data": 0,
    "models": 0,
    "heads": 1,
    "evaluation": 2,
    "trainer": 3,
    "perf": 4,
    "tools": 5,
    "benchmarks": 5,
}
# Command-line scripts are leaves: they import the library, never each other.
LEAVES = {"tools", "benchmarks"}


def module_name(path):
    rel = os.path.relpath(path, REPO)[: -len(".py")].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def project_modules():
    """{module name: file path} of every .py file in the layered packages."""
    out = {}
    for package in LAYERS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(REPO, package)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for name in filenames:
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    out[module_name(path)] = path
    return out


def imports_of(path, name, known):
    """Project modules that the file imports (resolved to the longest known module name)."""
    with open(path) as f:
        return imports_in(f.read(), name, path.endswith("__init__.py"), known)


def imports_in(source, name, is_package, known):
    """Project modules that `source` (module `name`) imports, wherever the import statement is."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            # `from pkg import sub` imports pkg.sub; `from pkg import name` imports pkg itself
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph():
    known = project_modules()
    return {name: imports_of(path, name, known) for name, path in known.items()}


def find_cycle(graph):
    """One cycle as a list of modules [a, b, ..., a], or None (iterative DFS)."""
    state = {}
    for root in sorted(graph):
        if root in state:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path, state[root] = [root], "open"
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = "done"
                stack.pop()
                path.pop()
            elif state.get(child) == "open":
                return path[path.index(child) :] + [child]
            elif child not in state:
                state[child] = "open"
                path.append(child)
                stack.append((child, iter(sorted(graph.get(child, ())))))
    return None


def layer_violations(graph):
    bad = []
    for src, targets in graph.items():
        top = src.split(".")[0]
        for dst in targets:
            dst_top = dst.split(".")[0]
            if top == dst_top:
                if top in LEAVES:
                    bad.append(f"{src} -> {dst} (scripts import no other script)")
            elif LAYERS[dst_top] >= LAYERS[top]:
                bad.append(f"{src} -> {dst} ({dst_top} is not below {top})")
    return sorted(bad)


def test_no_import_cycle_among_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_run_down_the_layers():
    assert layer_violations(import_graph()) == []


def test_the_checks_see_a_planted_cycle_and_upward_edge():
    graph = {"trainer.a": {"trainer.b"}, "trainer.b": {"trainer.a"}, "models.m": {"trainer.a"}}
    assert find_cycle(graph) == ["trainer.a", "trainer.b", "trainer.a"]
    assert layer_violations(graph) == ["models.m -> trainer.a (trainer is not below models)"]
    assert layer_violations({"tools.x": {"tools.y"}}) == [
        "tools.x -> tools.y (scripts import no other script)"
    ]
    # a lazy import inside a function and one under TYPE_CHECKING are edges too
    src = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import trainer.run\n"
    src += "def f():\n    from .checkpoint import Checkpointer\n"
    known = {"trainer.run", "trainer.checkpoint"}
    assert imports_in(src, "trainer.x", False, known) == known
