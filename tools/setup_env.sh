#!/usr/bin/env bash
# Sets up ./.venv for arcscale on a fresh machine (CPU or GPU): installs requirements/lock.txt (every
# package at an exact version, checked against its sha256 hashes; made from pyproject.toml by
# tools/lock_deps.sh) into a venv cached under the lock's hash, and the project itself, editable.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
CACHE=${ARCSCALE_CACHE:-$HOME/.cache/arcscale}
lock=requirements/lock.txt
key=$(cat "$lock" tools/setup_env.sh | sha256sum | cut -c1-16)
venv="$CACHE/venvs/$key"

# One lock entry per package: a "name==version \" line and its indented hash lines.
lock_entries() {  # $1: keep (deepspeed only) or drop (everything but deepspeed)
    awk -v want="$1" '/^[A-Za-z0-9]/ { ds = ($0 ~ /^deepspeed==/) }
        /^[A-Za-z0-9]/ || /^ +--hash/ { if ((want == "keep") == ds) print }' "$lock"
}

if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
    echo "[setup] creating $venv (cold install, a few minutes)"
    rm -rf "$venv"
    mkdir -p "$CACHE/venvs"
    "$PY" -m venv "$venv"
    tmp=$(mktemp -d)
    lock_entries drop >"$tmp/main.txt"
    lock_entries keep >"$tmp/deepspeed.txt"
    # --no-deps: the lock is complete, so nothing outside it (another torch) can be pulled in.
    "$venv/bin/python" -m pip install -q --require-hashes --no-deps -r "$tmp/main.txt"
    # DeepSpeed builds from its sdist against the torch installed above.
    "$venv/bin/python" -m pip install -q --require-hashes --no-deps --no-build-isolation \
        -r "$tmp/deepspeed.txt"
    rm -rf "$tmp"
    "$venv/bin/python" -m pip check  # the lock is consistent: every requirement is met
    touch "$venv/.complete"
else
    echo "[setup] reusing cached venv $venv"
fi

# .venv is a link to the cached environment (a real folder from an older set-up is replaced).
if [ -L .venv ] || [ ! -e .venv ]; then
    ln -sfn "$venv" .venv
elif [ "$(readlink -f .venv)" != "$(readlink -f "$venv")" ]; then
    rm -rf .venv && ln -sfn "$venv" .venv
fi

# The project itself, editable (scripts import trainer/, data/, ... with no sys.path edits). Also
# when a cached venv still points at another checkout that made it.
# Again when pyproject.toml changed (a new top-level package must be found by `python tools/x.py`).
where='import os, trainer; print(os.path.dirname(os.path.dirname(os.path.realpath(trainer.__file__))))'
project="$venv/.project-$(sha256sum pyproject.toml | cut -c1-16)"
if [ "$(cd / && "$venv/bin/python" -c "$where" 2>/dev/null)" != "$(pwd -P)" ] || [ ! -f "$project" ]; then
    "$venv/bin/pip" install -q --no-deps --no-build-isolation -e .
    rm -f "$venv"/.project-* && touch "$project"
fi

# One venv for every process, however it was started: `.venv/bin/python` (README's test command) and
# console scripts (their shebang names the cache path) would import deepspeed and torch by two paths,
# and only processes with the venv's bin/ on PATH would run the locked ninja (others a system one,
# whose build log hashes commands differently). DeepSpeed's JIT ops (shm_comm, cpu_adam) would then
# rebuild (~30 s) each time the two kinds of process take turns. Site-packages' .pth lines run at
# start-up: real paths on sys.path, the venv's bin/ first on PATH (as `activate` does).
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cat >"$site/arcscale_venv_paths.py" <<'PY'
"""One venv for every process (written by arcscale's tools/setup_env.sh, run by zz_arcscale_venv.pth)."""

import os
import sys

sys.path[:] = list(dict.fromkeys(os.path.realpath(p) if os.path.isabs(p) else p for p in sys.path))
_bin = os.path.join(os.path.realpath(sys.prefix), "bin")
_path = os.environ.get("PATH", "")
if _path.split(os.pathsep)[0] != _bin:
    os.environ["PATH"] = _bin + os.pathsep + _path if _path else _bin
PY
echo "import arcscale_venv_paths" >"$site/zz_arcscale_venv.pth"

# DeepSpeed JIT-builds its CPU ops (shm_comm, cpu_adam) on first use: keep them in a cached folder.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$CACHE/torch_extensions}
# DeepSpeed must agree with torch about CUDA (trainer/engine.py resolve_device): CPU only then.
if ! .venv/bin/python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    export DS_ACCELERATOR=cpu
fi
.venv/bin/python - <<'PY'
import torch, deepspeed, accelerate, timm
print(f"[setup] torch {torch.__version__} deepspeed {deepspeed.__version__} "
      f"accelerate {accelerate.__version__} timm {timm.__version__} cuda={torch.cuda.is_available()}")
PY
