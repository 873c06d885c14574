#!/usr/bin/env bash
# Regenerates requirements/lock.txt from pyproject.toml, the one list of dependencies: every
# package of `.[dev,dali]` at an exact version with its sha256 hashes, resolved for CPython 3.11 on
# x86_64 Linux. Run it after editing pyproject.toml's dependencies; tools/setup_env.sh installs the
# lock and nothing else (its cache key is the lock's hash). Needs network access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.10
tool=${TMPDIR:-/tmp}/arcscale-uv-$UV_VERSION
if [ ! -x "$tool/bin/uv" ]; then
    python3 -m venv "$tool"
    "$tool/bin/pip" install -q "uv==$UV_VERSION"
fi
"$tool/bin/uv" pip compile pyproject.toml --extra dev --extra dali \
    --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --generate-hashes --custom-compile-command "bash tools/lock_deps.sh" \
    -o requirements/lock.txt
echo "[lock] $(grep -c '^[A-Za-z0-9]' requirements/lock.txt) packages in requirements/lock.txt"
