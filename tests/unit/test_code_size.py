"""Files with one job: no module over 500 lines and no function over 80 outside tests
(docs/design.md "Layers"; an exception would be argued there and listed here)."""

import ast
import os

from tests.helpers.paths import REPO

PACKAGES = ("data", "models", "heads", "evaluation", "trainer", "perf", "tools", "benchmarks")
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 500, 80


def oversized(source, path):
    """'path: N lines' / 'path:LINE name: N lines' for a module or function over the limits."""
    out = []
    lines = source.count("\n")
    if lines > MAX_MODULE_LINES:
        out.append(f"{path}: {lines} lines")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                out.append(f"{path}:{node.lineno} {node.name}: {length} lines")
    return out


def test_no_module_or_function_over_the_limits():
    found = []
    for package in PACKAGES:
        for dirpath, dirnames, filenames in os.walk(os.path.join(REPO, package)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for name in sorted(filenames):
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    with open(path) as f:
                        found += oversized(f.read(), os.path.relpath(path, REPO))
    assert found == []


def test_the_check_sees_a_long_function_and_module():
    body = "".join(f"    x{i} = {i}\n" for i in range(85))
    assert oversized(f"def f():\n{body}", "m.py") == ["m.py:1 f: 86 lines"]
    assert oversized("x = 1\n" * 501, "big.py") == ["big.py: 501 lines"]
