"""tests/ mirrors the code (tests/README.md): every test file sits under `unit/<package>/` or
`integration/`, and no test module imports another test module (shared fixtures live in a
conftest.py, shared code in tests/helpers/)."""

import ast
import os

from tests.helpers.paths import REPO

TESTS = os.path.join(REPO, "tests")
PACKAGES = {"data", "models", "heads", "evaluation", "trainer", "tools", "perf"}


def _python_files():
    for dirpath, dirnames, filenames in os.walk(TESTS):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in filenames:
            if name.endswith(".py"):
                yield os.path.join(dirpath, name)


def _module(path):
    rel = os.path.relpath(path, REPO)[: -len(".py")].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def imported_modules(source, name, is_package):
    """Every module an `import` or `from ... import` in `source` names (module `name`), wherever
    the statement is; `from m import x` counts `m` and `m.x`."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def _is_test_module(module):
    parts = module.split(".")
    return parts[0] == "tests" and any(p.startswith("test_") or p == "conftest" for p in parts)


def test_no_test_module_imports_another_test_module():
    bad = []
    for path in _python_files():
        with open(path) as f:
            source = f.read()
        name = _module(path)
        for target in imported_modules(source, name, path.endswith("__init__.py")):
            if _is_test_module(target):
                bad.append(f"{os.path.relpath(path, REPO)} imports {target}")
    assert bad == [], "\n".join(bad)
    planted = "from tests.unit.heads.test_partial_fc import C\n"
    planted += "def f():\n    from . import conftest\n"
    found = imported_modules(planted, "tests.unit.data.test_x", False)
    assert {m for m in found if _is_test_module(m)} == {
        "tests.unit.heads.test_partial_fc",
        "tests.unit.heads.test_partial_fc.C",
        "tests.unit.data.conftest",
    }


def test_every_test_file_sits_under_a_package_folder():
    misplaced = []
    for path in _python_files():
        if not os.path.basename(path).startswith("test_"):
            continue
        parts = os.path.relpath(path, TESTS).split(os.sep)
        ok = (
            (parts[0] == "integration" and len(parts) == 2)
            or (parts[0] == "unit" and len(parts) == 2)
            or (parts[0] == "unit" and len(parts) == 3 and parts[1] in PACKAGES)
        )
        if not ok:
            misplaced.append(os.path.relpath(path, REPO))
    assert misplaced == [], misplaced
    for package in PACKAGES:  # each folder mirrors a code package
        assert os.path.isfile(os.path.join(REPO, package, "__init__.py")), package
        assert os.path.isdir(os.path.join(TESTS, "unit", package)), package
