"""The project installs like a package: one locked dependency list, commands on PATH.

pyproject.toml is the one list of dependencies; requirements/lock.txt is its full resolution
(tools/lock_deps.sh) and tools/setup_env.sh installs exactly that, so the venv running these tests
must hold every locked package at its locked version and nothing else.
"""

import importlib
import inspect
import os
import re
import subprocess
import sys
import sysconfig
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers.paths import REPO

ROOT = Path(REPO)
LOCK = ROOT / "requirements" / "lock.txt"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _locked() -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", LOCK.read_text(), re.M)
    return {canonicalize_name(name): version for name, version in pins}


def _declared() -> list[Requirement]:
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in project["dependencies"] + extras["dev"] + extras["dali"]]


def test_every_lock_entry_is_pinned_and_hashed():
    entries = re.split(r"\n(?=[A-Za-z0-9])", LOCK.read_text().split("\n", 2)[2])
    assert len(entries) > 50
    for entry in entries:
        head = entry.splitlines()[0]
        assert re.match(r"^[A-Za-z0-9._-]+==\S+ \\$", head), head
        assert "--hash=sha256:" in entry, f"{head}: no hash"


def test_lock_satisfies_every_declared_requirement():
    locked = _locked()
    for req in _declared():
        name = canonicalize_name(req.name)
        assert name in locked, f"{req} is in pyproject.toml but not in requirements/lock.txt"
        assert req.specifier.contains(locked[name], prereleases=True), (req, locked[name])


def test_the_venv_holds_exactly_the_lock():
    locked = _locked()
    # The venv's own site-packages only: setuptools puts its vendored copies (wheel, zipp, ...)
    # on sys.path once imported.
    site = [sysconfig.get_paths()["purelib"]]
    installed = {
        canonicalize_name(d.metadata["Name"]): d.version
        for d in metadata.distributions(path=site)
        if canonicalize_name(d.metadata["Name"]) != "arcscale"
    }
    missing = {n: v for n, v in locked.items() if installed.get(n) != v}
    extra = sorted(set(installed) - set(locked))
    assert not missing, f"locked but not installed at that version: {missing}"
    assert not extra, f"installed but not locked (add them to pyproject.toml, re-lock): {extra}"


def test_python_floor_is_the_one_the_code_needs():
    # tomllib, typing.Self and ExceptionGroup are 3.11.
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"
    assert sys.version_info >= (3, 11)


def _scripts() -> dict[str, str]:
    return PYPROJECT["project"]["scripts"]


def test_every_tool_and_the_trainer_have_a_command_returning_an_exit_status():
    scripts = _scripts()
    targets = set(scripts.values())
    assert scripts["arcscale-train"] == "trainer.train:main"
    for tool in sorted((ROOT / "tools").glob("*.py")):
        module = importlib.import_module(f"tools.{tool.stem}")
        if not hasattr(module, "main"):
            continue
        assert f"tools.{tool.stem}:main" in targets or f"tools.{tool.stem}:cli" in targets, tool
    for name, target in scripts.items():
        module_name, func_name = target.split(":")
        func = getattr(importlib.import_module(module_name), func_name)
        # console scripts do sys.exit(func()): anything but an int (a dict of results) exits 1.
        assert inspect.signature(func).return_annotation in (int, "int"), (name, target)


def test_commands_are_on_path_in_the_venv():
    bindir = Path(sys.executable).parent
    missing = [name for name in _scripts() if not (bindir / name).exists()]
    assert not missing, f"not installed (re-run tools/setup_env.sh): {missing}"
    out = subprocess.run(
        [str(bindir / "arcscale-inspect-rec"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout


def test_every_process_imports_the_venv_by_one_path():
    # `.venv/bin/python` and the console scripts' shebang (the cache path) must import packages by
    # one path and run one ninja (whatever PATH they started with): DeepSpeed's JIT ops carry the
    # path in their compile flags, ninja versions hash commands differently; either rebuilds them.
    venv_python = ROOT / ".venv" / "bin" / "python"
    shebang = (Path(sys.executable).parent / "arcscale-train").read_text().splitlines()[0]
    assert shebang.startswith("#!"), shebang
    found = {}
    for python in (str(venv_python), shebang[2:].strip()):
        out = subprocess.run(
            [python, "-c", "import shutil, yaml; print(yaml.__file__, shutil.which('ninja'))"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
            env={**os.environ, "PATH": "/usr/local/bin:/usr/bin:/bin"},
        )
        assert out.returncode == 0, out.stderr
        found[python] = out.stdout.strip()
    assert len(set(found.values())) == 1, f"one venv, two import paths or ninjas: {found}"
    ninja = next(iter(found.values())).split()[1]
    assert os.path.realpath(ninja) == os.path.realpath(os.path.join(sys.prefix, "bin", "ninja"))
