"""Host syncs counted on CPU: the calls that would make the host wait for a CUDA device.

On CPU nothing waits, so the calls themselves are counted with a `TorchFunctionMode`: reading a
value (`item`, `tolist`, `bool`/`int`/`float`/`format` of a tensor, `cpu`, `numpy`, `equal`),
data-dependent shapes (`nonzero`, `unique`, `masked_select`, boolean-mask indexing), tensors
built from Python data (`torch.tensor`/`as_tensor`: a pageable copy on CUDA) and blocking copies
between the host and a device (`to`/`cuda`/`copy_` without `non_blocking`, recorded as "h2d" /
"d2h": these only occur with device tensors, e.g. the fake-CUDA dry run). Shared by
tests/unit/trainer/test_host_syncs.py and the fake-CUDA dry run (test_fake_cuda.py).
"""

from __future__ import annotations

import os
import traceback

import torch
from torch.overrides import TorchFunctionMode

_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__format__"}
_READS |= {"cpu", "numpy", "equal", "allclose", "nonzero", "masked_select", "unique"}
_READS |= {"unique_consecutive", "_unique", "_unique2", "tensor", "as_tensor"}
_TORCH = os.sep + "torch" + os.sep
_TESTS = os.sep + "tests" + os.sep + "helpers" + os.sep


def _is_mask_index(args) -> bool:
    idx = args[1] if len(args) > 1 else None
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(torch.is_tensor(i) and i.dtype == torch.bool and i.dim() > 0 for i in items)


def _site() -> str:
    """Innermost caller outside torch and tests/helpers: who asked for the sync."""
    for frame in reversed(traceback.extract_stack()):
        if _TORCH not in frame.filename and _TESTS not in frame.filename:
            return f"{frame.filename.split('site-packages' + os.sep)[-1]}:{frame.lineno}"
    return "?"


def _device_of(x):
    if torch.is_tensor(x):
        return x.device
    if isinstance(x, (torch.device, str)):
        return torch.device(x)
    return None


def _blocking_copy(name, args, kwargs):
    """ "h2d"/"d2h" for a host<->device copy that waits (no ``non_blocking``), else None."""
    if name not in ("to", "cuda", "copy_") or not args or not torch.is_tensor(args[0]):
        return None
    if kwargs.get("non_blocking") or any(a is True for a in args[1:]):
        return None
    if name == "copy_":
        src, dst = _device_of(args[1] if len(args) > 1 else kwargs.get("src")), args[0].device
    else:
        src = args[0].device
        wanted = [_device_of(a) for a in (*args[1:], kwargs.get("device"))]
        dst = torch.device("cuda") if name == "cuda" else next((d for d in wanted if d), src)
    if src is None or (src.type == "cpu") == (dst.type == "cpu"):
        return None
    return "h2d" if src.type == "cpu" else "d2h"


class HostSyncCounter(TorchFunctionMode):
    """Records ``(function name, call site)`` of every call that would sync on CUDA."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        kwargs = kwargs or {}
        if name in _READS or (name in ("__getitem__", "__setitem__") and _is_mask_index(args)):
            self.calls.append((name, _site()))
        elif copy := _blocking_copy(name, args, kwargs):
            self.calls.append((copy, _site()))
        return func(*args, **kwargs)
