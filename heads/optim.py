"""Row-sparse optimizer for the Partial FC head shard (SGD with momentum, AdamW).

Only the rows sampled by some forward since the last ``zero_grad`` are touched: their weights and
optimizer state are gathered, updated and scattered back; every other row keeps its weight and
state bit-identical (no weight decay, no momentum drift). For rows sampled at every step the
update equals ``torch.optim.SGD`` / ``torch.optim.AdamW``; AdamW keeps a per-row step count for
its bias correction, like ``torch.optim.SparseAdam`` ("lazy Adam").

Loss scaling: head gradients arrive multiplied by whatever scaled the loss (the fp16 loss scale
S; ``1/gradient_accumulation_steps`` is wanted and kept). ``unscale_(S)`` divides by S only: the
head's gradient convention has no world-size factor (``heads/comm.py``).
"""

from __future__ import annotations

from typing import Any, Literal, overload

import torch

from heads.comm import all_true, all_true_tensor
from heads.fused import sgd_rows
from heads.lazy_decay import LazyDenseDecay
from heads.partial_fc import PartialFC

__all__ = ["HeadOptimizer", "build_head_optimizer", "OPTIMIZERS"]

# Per-row state tensors of each optimizer, all shaped like the shard's first dimension.
OPTIMIZERS = {
    "sgd": ("momentum_buffer",),
    "adamw": ("exp_avg", "exp_avg_sq", "step"),
}


class HeadOptimizer:
    """Sparse-row SGD/AdamW over one ``PartialFC`` shard; not a ``torch.optim.Optimizer``.

    Args:
        head: the ``PartialFC`` whose ``weight`` is updated.
        name: ``"sgd"`` or ``"adamw"`` (see ``OPTIMIZERS``).
        lr: learning rate (>= 0).
        momentum: SGD momentum in ``[0, 1)`` (0: no buffer); dampening 0, no Nesterov.
        weight_decay: >= 0; SGD adds ``wd * w`` to the gradient (``torch.optim.SGD``), AdamW
            multiplies ``w`` by ``1 - lr * wd`` (decoupled), on sampled rows only.
        betas, eps: AdamW moments and denominator epsilon.
        dense_decay: SGD only. True gives every row of the shard arcface_torch's weight decay
            and momentum at every step, sampled or not (its ``weight[index]`` makes the
            gradient dense); the unsampled rows' steps are applied lazily, in closed form,
            when they are next sampled (``heads/lazy_decay.py``), so no dense ``(n_r, D)``
            gradient is formed. Installs ``head.before_gather``. False (default): only
            sampled rows decay and move.

    State tensors (``state``): ``momentum_buffer`` ``(n_r, D)`` fp32 (SGD with momentum);
    ``exp_avg``, ``exp_avg_sq`` ``(n_r, D)`` fp32 and ``step`` ``(n_r,)`` int64 (AdamW). They
    are created on the centers' device at the first ``step``/``state_dict``.

    Raises:
        ValueError: unknown name, hyper-parameter out of range, ``dense_decay`` with AdamW.
    """

    def __init__(
        self,
        head: PartialFC,
        name: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        dense_decay: bool = False,
    ):
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown head optimizer '{name}', choose from {sorted(OPTIMIZERS)}")
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or eps <= 0:
            raise ValueError(
                "head optimizer needs lr >= 0, 0 <= momentum < 1, weight_decay >= 0, eps > 0; "
                f"got lr={lr}, momentum={momentum}, weight_decay={weight_decay}, eps={eps}"
            )
        if not all(0 <= b < 1 for b in betas) or len(betas) != 2:
            raise ValueError(f"betas must be two values in [0, 1), got {betas}")
        self.head = head
        self.name = name
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.state: dict[str, torch.Tensor] = {}
        self._grad: tuple[torch.Tensor, torch.Tensor] | None = None  # unscaled (rows, grad)
        self._rows_buf: torch.Tensor | None = None  # gathered momentum rows, reused
        self._hyper: torch.Tensor | None = None  # (lr, momentum, wd) for heads/fused.py
        self._ok_true: torch.Tensor | None = None
        # (coef, w) when the unscaled gradient is a - coef * w, not yet formed (see step)
        self._lazy: tuple[torch.Tensor, torch.Tensor] | None = None
        if dense_decay and name != "sgd":
            raise ValueError(
                "dense_decay is SGD-only (AdamW's zero-gradient steps have no "
                "closed form; see heads/lazy_decay.py)"
            )
        self.dense_decay = bool(dense_decay)
        self._decay: LazyDenseDecay | None = None
        if self.dense_decay and head.sample_rate < 1.0:  # at 1.0 every row steps: nothing lags
            head.before_gather = self._catch_up

    def __repr__(self) -> str:
        return (
            f"HeadOptimizer(name={self.name}, lr={self.lr}, momentum={self.momentum}, "
            f"weight_decay={self.weight_decay}, betas={self.betas}, eps={self.eps}, "
            f"dense_decay={self.dense_decay})"
        )

    # -- state ---------------------------------------------------------------------------------
    def state_keys(self) -> tuple[str, ...]:
        """Names of the per-row state tensors this configuration keeps."""
        if self.name == "sgd" and self.momentum == 0:
            return ()
        return OPTIMIZERS[self.name]

    def _ensure_state(self) -> None:
        w = self.head.weight
        for key in self.state_keys():
            want = (w.shape[0],) if key == "step" else tuple(w.shape)
            t = self.state.get(key)
            if t is None:
                dtype = torch.int64 if key == "step" else torch.float32
                self.state[key] = torch.zeros(want, dtype=dtype, device=w.device)
            elif t.device != w.device:
                self.state[key] = t.to(w.device)

    def _lazy_decay(self) -> LazyDenseDecay:
        w = self.head.weight
        if self._decay is None or self._decay.slot.device != w.device:
            self._decay = LazyDenseDecay(w.shape[0], w.device)
        return self._decay

    def _catch_up(self, rows: torch.Tensor) -> None:
        self._ensure_state()
        buf = self.state.get("momentum_buffer")
        self._lazy_decay().catch_up(rows, self.head.weight.data, buf)

    def flush(self) -> None:
        """Bring every row's weight and momentum up to date (``dense_decay``; else a no-op).
        ``state_dict`` calls it, so read the centers after it when saving."""
        if self._decay is not None:
            self._decay.flush(self.head.weight.data, self.state.get("momentum_buffer"))

    def set_lr(self, lr: float) -> None:
        """Set the learning rate (the trainer's schedule drives it)."""
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        self.lr = float(lr)

    def state_dict(self) -> dict[str, Any]:
        """Hyper-parameters and the local shard's per-row state tensors (not copied); with
        ``dense_decay`` the lagging rows are brought up to date first (``flush``)."""
        self._ensure_state()
        self.flush()
        return {
            "name": self.name,
            "lr": self.lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "betas": self.betas,
            "eps": self.eps,
            "state": dict(self.state),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Load ``state_dict()`` output of the same optimizer over a same-sized shard.

        Raises:
            ValueError: different optimizer name, missing state key or wrong shape.
        """
        if sd.get("name") != self.name:
            raise ValueError(
                f"state_dict is for optimizer '{sd.get('name')}', this is '{self.name}'"
            )
        self._ensure_state()
        for key in self.state_keys():
            src = sd.get("state", {}).get(key)
            if src is None or src.shape != self.state[key].shape:
                raise ValueError(
                    f"state '{key}' missing or shaped "
                    f"{None if src is None else tuple(src.shape)}, want "
                    f"{tuple(self.state[key].shape)}"
                )
            self.state[key].copy_(src)
        self._decay = None  # the loaded state is current for every row
        self.lr = float(sd["lr"])
        self.momentum = float(sd["momentum"])
        self.weight_decay = float(sd["weight_decay"])
        self.betas = (float(sd["betas"][0]), float(sd["betas"][1]))
        self.eps = float(sd["eps"])

    # -- gradients -----------------------------------------------------------------------------
    @property
    def grad_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows (U,) int64, grad (U, D) fp32)`` after ``unscale_`` (or the raw sum before)."""
        if self._grad is None:
            return self.head.sparse_grad()
        self._materialize()
        return self._grad

    def _materialize(self) -> None:
        if self._lazy is not None and self._grad is not None:
            coef, w = self._lazy
            self._grad[1].addcmul_(w, coef.unsqueeze(1), value=-1.0)
            self._lazy = None

    @overload
    def unscale_(self, loss_scale: float = ..., blocking: Literal[True] = ...) -> bool: ...

    @overload
    def unscale_(self, loss_scale: float, blocking: Literal[False]) -> torch.Tensor: ...

    @overload
    def unscale_(self, loss_scale: float = ..., *, blocking: Literal[False]) -> torch.Tensor: ...

    def unscale_(self, loss_scale: float = 1.0, blocking: bool = True) -> bool | torch.Tensor:
        """Divide the accumulated head gradient by ``loss_scale``; report finiteness everywhere.

        Call once per optimizer step, after the last micro-batch's backward. A collective over
        the head's group: all ranks must call it.

        Args:
            loss_scale: the S the loss was multiplied by (> 0).
            blocking: True returns a python bool (reads the device: a host sync on CUDA);
                False returns a 0-dim bool tensor on the device, to pass to ``step(finite=)``
                and read later, batched with other logging values.

        Returns:
            True (or a true tensor) when every rank's head gradient is finite.

        Raises:
            RuntimeError: called twice without ``zero_grad``; a forward was not backpropagated.
            ValueError: ``loss_scale`` <= 0.
        """
        if self._grad is not None:
            raise RuntimeError("unscale_() called twice since zero_grad()")
        if not loss_scale > 0:
            raise ValueError(f"loss_scale must be > 0, got {loss_scale}")
        parts = self.head.sparse_grad_parts() if self.name == "sgd" else None
        if parts is not None:  # grad = a - coef * w: SGD forms it inside its update pass
            rows, grad, coef, w = parts
            if loss_scale != 1.0:
                coef.div_(loss_scale)
            self._lazy = (coef, w)
        else:
            rows, grad = self.head.sparse_grad()  # buffers owned by the head: safe to edit
        if loss_scale != 1.0:
            grad.div_(loss_scale)
        self._grad = (rows, grad)
        # One reduction instead of isfinite's full-size temporaries: inf/NaN anywhere -> sum too.
        device = self.head.weight.device
        probe = self.head.grad_probe()
        finite = (
            torch.isfinite(probe)
            if probe is not None
            else torch.isfinite(grad.sum())
            if grad.numel()
            else torch.ones((), dtype=torch.bool, device=device)
        )
        if not blocking:
            return all_true_tensor(finite, self.head.topo)
        return all_true(bool(finite), self.head.topo, device)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the head's recorded forwards and the unscaled gradient."""
        self._grad = self._lazy = None
        self.head.zero_grad()

    # -- update --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, finite: torch.Tensor | None = None) -> None:
        """Update the rows sampled since ``zero_grad``.

        Without a prior ``unscale_`` the gradient is used as is (loss scale 1). The gradient
        buffer is consumed (it becomes the update direction): read ``grad_rows`` before.

        Args:
            finite: optional 0-dim bool device tensor (``unscale_(blocking=False)``); when
                false the step changes no weight and no state, decided on the device without
                a host read (the update is computed and masked).
        """
        rows, grad = self._grad if self._grad is not None else self.head.sparse_grad()
        if rows.numel() == 0:
            return
        self._ensure_state()
        weight = self.head.weight
        which: torch.Tensor | None = rows
        if rows.numel() == weight.shape[0]:  # rows are unique: the whole shard, update in place
            which, w = None, weight.data
        else:
            recorded = self.head.recorded_rows(rows)  # the forward's gathered copy if it has one
            w = weight.index_select(0, rows) if recorded is None else recorded
        if self.name == "sgd":
            self._sgd_rows(which, w, grad, finite)
            if self.head.before_gather == self._catch_up:
                self._lazy_decay().advance(
                    which,
                    self.lr,
                    self.momentum,
                    self.weight_decay,
                    finite,
                    weight.data,
                    self.state.get("momentum_buffer"),
                )
        else:
            self._materialize()
            self._adamw_rows(which, w, grad, finite)

    @staticmethod
    def _get(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        return t if rows is None else t.index_select(0, rows)

    @staticmethod
    def _put(t: torch.Tensor, rows: torch.Tensor | None, value: torch.Tensor) -> None:
        if rows is not None:  # rows None: ``value`` is ``t`` itself, updated in place
            t.index_copy_(0, rows, value)

    def _sgd_rows(
        self,
        rows: torch.Tensor | None,
        w: torch.Tensor,
        grad: torch.Tensor,
        ok: torch.Tensor | None,
    ) -> None:
        # Fused passes over the (U, D) rows: d = g + wd*w; d += m*b; b <- d; W[rows] -= lr*d.
        if self.head.fused and rows is not None and self._lazy is not None and self.momentum:
            coef, _ = self._lazy
            self._lazy = None
            buf = self.state["momentum_buffer"]
            sgd_rows(
                self.head.weight.data,
                buf,
                rows,
                w,
                grad,
                coef,
                torch.index_select(buf, 0, rows, out=self._momentum_rows(grad)),
                self._hyper_tensor(w.device),
                self._true(w.device) if ok is None else ok,
            )
            return
        if self._lazy is not None:  # d = a + (wd - coef) * w in one pass
            coef, _ = self._lazy
            self._lazy = None
            d = grad.addcmul_(w, coef.neg_().add_(self.weight_decay).unsqueeze(1))
        elif self.weight_decay:
            d = grad.add_(w, alpha=self.weight_decay)
        else:
            d = grad
        if ok is not None:
            d.masked_fill_(~ok, 0.0)  # a skipped step: zero direction (and NaN-free)
        if self.momentum:
            buf = self.state["momentum_buffer"]
            if rows is None:
                b = buf
            else:  # into a kept buffer: no fresh (U, D) allocation per step
                b = torch.index_select(buf, 0, rows, out=self._momentum_rows(d))
            if ok is None:
                d.add_(b, alpha=self.momentum)
            else:  # skipped: d = 0 + 1 * b, so the buffer is written back unchanged
                d.addcmul_(b, torch.where(ok, self.momentum, 1.0))
            if rows is None:
                buf.copy_(d)
            else:
                buf.index_copy_(0, rows, d)
        # rows are unique and ``w`` holds their current weights: update the gathered copy and
        # write it back (index_copy_ is ~2x cheaper than index_add_'s read-modify-write).
        if ok is None:
            w.add_(d, alpha=-self.lr)
        else:
            w.addcmul_(d, torch.where(ok, -self.lr, 0.0))
        self._put(self.head.weight.data, rows, w)

    def _momentum_rows(self, like: torch.Tensor) -> torch.Tensor:
        """A kept ``(U, D)`` buffer for the gathered momentum rows (no fresh allocation, and
        no page faults, per step)."""
        if self._rows_buf is None or self._rows_buf.shape != like.shape:
            self._rows_buf = torch.empty_like(like)
        return self._rows_buf

    def _hyper_tensor(self, device: torch.device) -> torch.Tensor:
        """``(lr, momentum, weight_decay)`` as a device tensor, refilled in place (a fill with a
        Python scalar is a kernel argument, not a host-to-device copy)."""
        h = self._hyper
        if h is None or h.device != device:
            h = self._hyper = torch.empty(3, device=device)
        for i, v in enumerate((self.lr, self.momentum, self.weight_decay)):
            h[i].fill_(v)
        return h

    def _true(self, device: torch.device) -> torch.Tensor:
        t = self._ok_true
        if t is None or t.device != device:
            t = self._ok_true = torch.ones((), dtype=torch.bool, device=device)
        return t

    def _adamw_rows(
        self,
        rows: torch.Tensor | None,
        w: torch.Tensor,
        grad: torch.Tensor,
        ok: torch.Tensor | None,
    ) -> None:
        b1, b2 = self.betas
        st = self.state
        lr, wd = self.lr, self.weight_decay
        inc: int | torch.Tensor
        w1: float | torch.Tensor
        b2v: float | torch.Tensor
        decay: float | torch.Tensor
        lr_v: float | torch.Tensor
        if ok is None:
            inc, w1, b2v, decay, lr_v = 1, 1 - b1, b2, 1 - lr * wd, lr
        else:  # a skipped step: every coefficient turns into the identity, on the device
            grad.masked_fill_(~ok, 0.0)
            okf = ok.to(w.dtype)
            inc, w1, lr_v = ok.to(torch.int64), okf * (1 - b1), okf * lr
            b2v, decay = torch.where(ok, b2, 1.0), torch.where(ok, 1 - lr * wd, 1.0)
        step = self._get(st["step"], rows).add_(inc)
        m = self._get(st["exp_avg"], rows).lerp_(grad, w1)
        v = self._get(st["exp_avg_sq"], rows).mul_(b2v).addcmul_(grad, grad, value=1 - b2)
        if wd:
            w.mul_(decay)
        t = step.clamp_min(1).to(torch.float64).unsqueeze(1)  # a never-stepped row: no 0/0
        bc1 = (1 - b1**t).to(w.dtype)
        bc2_sqrt = (1 - b2**t).sqrt().to(w.dtype)
        denom = v.sqrt().div_(bc2_sqrt).add_(self.eps)
        w.sub_(m.div(denom).mul_(lr_v / bc1))
        self._put(st["step"], rows, step)
        self._put(st["exp_avg"], rows, m)
        self._put(st["exp_avg_sq"], rows, v)
        if rows is not None:
            self.head.weight.data.index_copy_(0, rows, w)


def build_head_optimizer(head: PartialFC, name: str = "sgd", **kwargs: Any) -> HeadOptimizer:
    """Build the sparse-row head optimizer by name (``"sgd"`` or ``"adamw"``); ``kwargs`` and
    errors as ``HeadOptimizer``."""
    return HeadOptimizer(head, name, **kwargs)
