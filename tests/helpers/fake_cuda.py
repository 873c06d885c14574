"""A fake-CUDA dry run on a CPU-only (CUDA-built) torch: FakeTensorMode with ``device="cuda"``.

Fake tensors carry device and dtype, so a device or dtype mismatch raises as on a GPU, and a host
read (``.item()``, ``bool()``, ``tolist``, ``nonzero``, ``unique``, a boolean-mask index) raises
``DataDependentOutputException`` / ``DynamicOutputShapeException``: a sync detector. What needs a
driver is replaced here, at world size 1:

- autograd: torch's engine stashes the CUDA streams of every device before a backward and asks
  the CUDA hooks whether device 0 has a context, which raises without a driver (pytorch#92627's
  fix covers GPU machines only). ``PythonAutograd`` intercepts ``backward`` / ``autograd.grad``
  (including the head's nested one) and runs the graph's nodes itself, in topological order.
- generators: ``PartialFC`` and ``ElasticFace`` take a ``generator_factory``; ``cpu_generators``
  hands them CPU generators (fake mode does not check a generator's device).
- Accelerate/DeepSpeed: ``OneRankAccelerator`` / ``PlainEngine`` stand in at world size 1 for the
  calls ``trainer.step.train_step`` makes (accumulate, backward, was_step_applied).
"""

from __future__ import annotations

import contextlib
import os
import traceback

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

CUDA = torch.device("cuda:0")
_TORCH = os.sep + "torch" + os.sep
_HERE = os.path.abspath(__file__)


def _topological(roots):
    """Nodes reachable from ``roots``, every node after all nodes that feed it gradients."""
    order, seen, stack = [], set(), [(r, False) for r in roots]
    while stack:
        fn, done = stack.pop()
        if done:
            order.append(fn)
            continue
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        stack.append((fn, True))
        stack.extend((nxt, False) for nxt, _ in fn.next_functions if nxt is not None)
    return order[::-1]


def _edge(t):
    return torch.autograd.graph.get_gradient_edge(t)


def _call(fn, slots):
    """Run one node's backward on the gradients of its outputs (zeros where missing, as the
    engine hands custom Functions)."""
    meta = fn._input_metadata
    args = [slots.get(i) for i in range(len(meta))]
    if hasattr(fn, "_forward_cls"):  # a Python autograd.Function
        args = [
            a if a is not None else torch.zeros(m.shape, dtype=m.dtype, device=m.device)
            for a, m in zip(args, meta)
        ]
        out = fn.apply(*args)
    else:
        out = fn(*args)
    return (out,) if out is None or torch.is_tensor(out) else out


def _validate(g, meta, fn):
    """What the engine does to a gradient before the next node sees it: reduce a broadcast
    gradient to the input's shape and cast it to its dtype; a device change is an error."""
    if g.device != meta.device:
        raise RuntimeError(f"{fn.name()}: gradient on {g.device}, expected device {meta.device}")
    if tuple(g.shape) != tuple(meta.shape):
        g = g.sum_to_size(meta.shape)
    return g if g.dtype == meta.dtype else g.to(meta.dtype)


def run_backward(outputs, grad_outputs, inputs=None):
    """Backpropagate ``outputs`` (list of tensors) with ``grad_outputs``.

    ``inputs`` None: accumulate into the leaves' ``.grad`` (``Tensor.backward``); otherwise
    return the gradients of ``inputs`` (``torch.autograd.grad``; ``None`` when unreached) and
    run only the nodes that lead to them.
    """
    roots = [o.grad_fn for o in outputs if o.grad_fn is not None]
    order = _topological(roots)
    edges = [_edge(t) for t in inputs or ()]
    targets = {(e.node, e.output_nr): k for k, e in enumerate(edges)}
    needed = None
    if inputs is not None:  # only the nodes on a path to an input run
        wanted = {e.node for e in edges}
        needed = set()
        for fn in reversed(order):
            if fn in wanted or any(n in needed for n, _ in fn.next_functions if n is not None):
                needed.add(fn)
    grads = {}
    for o, g in zip(outputs, grad_outputs):
        if o.grad_fn is not None:
            slot = grads.setdefault(o.grad_fn, {})
            g = torch.ones_like(o) if g is None else g
            slot[o.output_nr] = g if o.output_nr not in slot else slot[o.output_nr] + g
    found = [None] * len(targets)
    with torch.no_grad():
        for fn in order:
            slots = grads.pop(fn, {})
            for i, g in slots.items():
                if (fn, i) in targets:
                    found[targets[(fn, i)]] = g
            if needed is not None and fn not in needed:
                continue
            if hasattr(fn, "variable"):  # AccumulateGrad of a leaf
                if inputs is None and 0 in slots:
                    v = fn.variable
                    v.grad = slots[0] if v.grad is None else v.grad + slots[0]
                continue
            for (nxt, idx), g in zip(fn.next_functions, _call(fn, slots)):
                if nxt is not None and g is not None:
                    g = _validate(g, nxt._input_metadata[idx], fn)
                    slot = grads.setdefault(nxt, {})
                    slot[idx] = g if idx not in slot else slot[idx] + g
    return tuple(found)


def _seq(x):
    if x is None:
        return None
    return [x] if torch.is_tensor(x) else list(x)


class PythonAutograd(TorchFunctionMode):
    """Routes ``Tensor.backward``, ``torch.autograd.backward`` and ``torch.autograd.grad`` to
    ``run_backward`` (no hooks, no ``create_graph``: enough for the training step)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.backward, torch.autograd.backward):
            outs = _seq(args[0] if args else kwargs.pop("tensors"))
            grads = _seq(
                args[1] if len(args) > 1 else kwargs.get("gradient", kwargs.get("grad_tensors"))
            )
            with self:  # the head's backward calls autograd.grad itself
                run_backward(outs, grads or [None] * len(outs))
            return None
        if func is torch.autograd.grad:
            outs = _seq(args[0] if args else kwargs["outputs"])
            ins = _seq(args[1] if len(args) > 1 else kwargs["inputs"])
            grads = _seq(args[2] if len(args) > 2 else kwargs.get("grad_outputs"))
            with self:
                return run_backward(outs, grads or [None] * len(outs), ins)
        return func(*args, **kwargs)


def _site():
    """Innermost caller outside torch and this file."""
    for frame in reversed(traceback.extract_stack()):
        if _TORCH not in frame.filename and os.path.abspath(frame.filename) != _HERE:
            return frame
    return None


class AllowedReads(TorchFunctionMode):
    """Answers ``True`` for the host reads made at ``allowed`` sites (``(path suffix, source
    text)`` pairs, e.g. the step's replicated finite-loss check) without touching the tensor, and
    records them in ``taken``; every other read goes on to FakeTensorMode, which raises."""

    READS = {"__bool__", "item"}

    def __init__(self, allowed):
        super().__init__()
        self.allowed = list(allowed)
        self.taken = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            site = _site()
            for path, text in self.allowed:
                if site is not None and site.filename.endswith(path) and text in (site.line or ""):
                    self.taken.append(f"{path}:{site.lineno}")
                    return True
        return func(*args, **(kwargs or {}))


def _clear_scratch():
    # The head's module-level scratch buffers would carry fake tensors from one mode to the next.
    from heads import dist_softmax, subcenter

    dist_softmax._SCRATCH.buffers.clear()
    subcenter._SCRATCH.buffers.clear()


@contextlib.contextmanager
def fake_cuda():
    """Fake mode (real tensors refused as inputs) with the Python autograd; yields the mode."""
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    _clear_scratch()
    try:
        with mode, PythonAutograd():
            yield mode
    finally:
        _clear_scratch()


def cpu_generators(head):
    """Give the head (and an ElasticFace margin) CPU generators: no CUDA driver needed."""
    head.generator_factory = lambda device: torch.Generator()
    if hasattr(head.margin_loss, "generator_factory"):
        head.margin_loss.generator_factory = lambda device: torch.Generator()


def cast_like_deepspeed(model, dtype):
    """DeepSpeed's bf16/fp16 engine cast: parameters to ``dtype``, buffers kept fp32."""
    for p in model.parameters():
        p.data = p.data.to(dtype)


class PlainEngine(torch.nn.Module):
    """The backbone where ``train_step`` expects a DeepSpeed engine (world size 1)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)

    def was_step_applied(self):
        return True


class OneRankAccelerator:
    """What ``train_step`` calls of an Accelerator, at world size 1 with ``gas`` micro-batches:
    ``accumulate`` (``sync_gradients`` true on the last), ``backward``."""

    def __init__(self, gas=1):
        self.gas, self.count, self.sync_gradients = gas, 0, False

    @contextlib.contextmanager
    def accumulate(self, engine):
        self.count += 1
        self.sync_gradients = self.count % self.gas == 0
        yield

    def backward(self, loss):
        loss.backward()
