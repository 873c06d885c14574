"""Host syncs attributed to call sites, and the compiled head kernels' state (the GPU check).

``SyncProbe`` runs steps under ``torch.cuda.set_sync_debug_mode("warn")`` and, for every
synchronizing call, takes the Python stack of the thread that made it (a ``warnings``
hook, called synchronously in that thread). The autograd engine runs a CUDA backward on its own
thread: a Python ``autograd.Function.backward`` (the head's: ``heads/dist_softmax.py``,
``heads/cosine_kernel.py``, ``heads/comm.py``) has its frames there, so its syncs are
attributed to its own lines; syncs of C++ autograd nodes surface at the ``backward()`` call and
are counted as ``backward_cpp`` (no Python line to blame).

Attribution (``attribute``): ``site`` is the innermost frame inside the project; ``owner`` is who
made the call that synchronized, the innermost frame outside torch: ``ours`` (the project's
packages), ``deepspeed``, ``accelerate``, another library, or ``backward_cpp``. Torch's own
Python frames (``torch/nn/functional.py`` ...) count for whoever called them.
"""

from __future__ import annotations

import os
import traceback
import warnings
from collections import Counter
from collections.abc import Iterable
from typing import Any

__all__ = ["PROJECT_PACKAGES", "SyncProbe", "attribute", "summarize", "kernel_verdict"]

PROJECT_PACKAGES = ("data", "models", "heads", "evaluation", "trainer", "perf", "benchmarks")
_BACKWARD_FRAMES = ("torch/autograd/__init__.py", "torch/_tensor.py")

Frame = tuple[str, int, str]  # (file, line, function)


def _library(path: str) -> str | None:
    """``deepspeed``, ``torch`` ... for a file under site-packages (or a python install)."""
    parts = path.replace(os.sep, "/").split("/")
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            i = parts.index(marker)
            return parts[i + 1] if i + 1 < len(parts) else None
    return None


def attribute(frames: Iterable[Frame], repo: str) -> tuple[str, str]:
    """``(owner, site)`` of one sync from the stack of the thread that made it (outermost first).

    ``site``: ``"heads/x.py:12 (fn)"`` of the innermost project frame, or ``"-"`` when none.
    """
    repo = os.path.abspath(repo) + os.sep
    owner, site = "", "-"
    for path, line, fn in reversed(list(frames)):
        path = os.path.abspath(path)
        rel = path[len(repo) :] if path.startswith(repo) else None
        ours = (
            rel is not None
            and rel.split(os.sep)[0] in PROJECT_PACKAGES
            and "site-packages" not in rel
        )
        if ours and site == "-":
            site = f"{rel}:{line} ({fn})"
        if owner:
            continue
        lib = _library(path)
        if ours:
            owner = "ours"
        elif lib == "torch":
            if path.replace(os.sep, "/").endswith(_BACKWARD_FRAMES) and "backward" in fn:
                owner = "backward_cpp"
        elif lib is not None:
            owner = lib
    return owner or "torch", site


def summarize(records: list[tuple[str, str]], steps: int, allowed: float) -> dict[str, Any]:
    """Per-step counts by owner, the sites, and ``status`` FAIL when ours > ``allowed``."""
    owners = Counter(owner for owner, _ in records)
    sites = Counter(f"{owner}: {site}" for owner, site in records)
    ours = owners.get("ours", 0) / max(1, steps)
    return {
        "status": "ok" if ours <= allowed else "FAIL",
        "ours_per_step": ours,
        "allowed_per_step": allowed,
        "per_step_by_owner": {k: v / max(1, steps) for k, v in sorted(owners.items())},
        "sites": dict(sites.most_common()),
        "steps": steps,
    }


class SyncProbe:
    """Context manager: CUDA sync debug mode "warn"; ``records`` gets ``attribute`` of each
    sync. Other warnings are passed on unchanged. ``set_mode`` replaces
    ``torch.cuda.set_sync_debug_mode`` (a CPU test drives the hook with its own warnings)."""

    def __init__(self, repo: str, set_mode: Any = None) -> None:
        self.repo = repo
        self.set_mode = set_mode
        self.records: list[tuple[str, str]] = []
        self._catch: Any = None
        self._previous: Any = None

    def _show(self, message: Any, category: Any, filename: str, lineno: int, *rest: Any) -> None:
        if "synchroniz" not in str(message):
            self._previous(message, category, filename, lineno, *rest)
            return
        here = os.path.abspath(__file__)
        frames = [
            (f.filename, f.lineno or 0, f.name)
            for f in traceback.extract_stack()
            if os.path.abspath(f.filename) != here and not f.filename.endswith("warnings.py")
        ]
        self.records.append(attribute(frames, self.repo))

    def __enter__(self) -> SyncProbe:
        if self.set_mode is None:
            import torch

            self.set_mode = torch.cuda.set_sync_debug_mode
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("always")
        self._previous = warnings.showwarning
        warnings.showwarning = self._show
        self.set_mode("warn")
        return self

    def __exit__(self, *exc: object) -> None:
        self.set_mode(0)
        self._catch.__exit__(*exc)


def kernel_verdict(
    fused: bool, kernels: dict[str, tuple[bool, bool]], fallbacks: list[str]
) -> dict[str, Any]:
    """State of the head's compiled row kernels (``heads/fused.py``) after some steps on CUDA.

    Args:
        fused: the head was built with compiled kernels (``head.kernels: auto`` on CUDA).
        kernels: name -> (compiled: a compiled callable exists, failed: it fell back to eager).
        fallbacks: messages of ``torch.compile of ... failed`` warnings seen during the steps.

    Returns:
        ``{"status": "ok" | "FAIL", "why"?, ...}``: FAIL when the head runs eager on CUDA, a
        kernel was never compiled, or one fell back to its eager path.
    """
    out: dict[str, Any] = {"fused": fused, "kernels": {k: list(v) for k, v in kernels.items()}}
    if not fused:
        return {**out, "status": "FAIL", "why": "head built without compiled kernels on CUDA"}
    eager = [name for name, (compiled, failed) in kernels.items() if failed or not compiled]
    if eager or fallbacks:
        why = f"eager fallback: {eager or ''} {' | '.join(fallbacks)}".strip()
        return {**out, "status": "FAIL", "why": why[:500]}
    return {**out, "status": "ok"}
