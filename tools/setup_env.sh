#!/usr/bin/env bash
# Sets up ./.venv for arcscale on a fresh machine (CPU or GPU), reusing a cached venv when the
# requirements have not changed. torch/torchvision go in first from requirements/torch.txt and every
# later install is constrained by requirements/constraints.txt, so nothing pulls another torch.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
CACHE=${ARCSCALE_CACHE:-$HOME/.cache/arcscale}
key=$(cat requirements/*.txt tools/setup_env.sh | sha256sum | cut -c1-16)
venv="$CACHE/venvs/$key"

if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
    echo "[setup] creating $venv (cold install, a few minutes)"
    rm -rf "$venv"
    mkdir -p "$CACHE/venvs"
    "$PY" -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip wheel setuptools -c requirements/constraints.txt
    "$venv/bin/pip" install -q -r requirements/torch.txt -c requirements/constraints.txt
    # DeepSpeed builds from its sdist against the torch installed above.
    "$venv/bin/pip" install -q --no-build-isolation -r requirements/dev.txt \
        -c requirements/constraints.txt
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
