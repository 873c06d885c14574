"""Paths every test helper and conftest shares: the checkout, the real LFW data, the test cache."""

from __future__ import annotations

import os

from data.lfw import DEFAULT_LFW

# tests/helpers/paths.py -> the checkout's root
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LFW_ROOT = DEFAULT_LFW
# Built data that several test runs reuse (the LFW demo split, ~40 s to build): outside the
# checkout, whose work_dirs/ belong to the user's own runs (README's command 1).
TEST_CACHE = os.environ.get("ARCSCALE_TEST_CACHE", os.path.expanduser("~/.cache/arcscale/tests"))
# JIT-built DeepSpeed ops (cpu_adam, shm_comm), where tools/setup_env.sh puts them: under
# ARCSCALE_CACHE, so two checkouts with their own cache (and venv) never rebuild each other's.
TORCH_EXTENSIONS = os.path.join(
    os.environ.get("ARCSCALE_CACHE", os.path.expanduser("~/.cache/arcscale")), "torch_extensions"
)
# Checked-in data files (mxnet golden .rec/.idx).
FIXTURES = os.path.join(REPO, "tests", "fixtures")
