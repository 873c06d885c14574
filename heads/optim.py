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

import torch

from heads.comm import all_true
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

    State tensors (``state``): ``momentum_buffer`` ``(n_r, D)`` fp32 (SGD with momentum);
    ``exp_avg``, ``exp_avg_sq`` ``(n_r, D)`` fp32 and ``step`` ``(n_r,)`` int64 (AdamW). They
    are created on the centers' device at the first ``step``/``state_dict``.

    Raises:
        ValueError: unknown name or hyper-parameter out of range.
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
    ):
        if name not in OPTIMIZERS:
            raise ValueError(
                f"heads/optim.py: unknown head optimizer '{name}', choose from {sorted(OPTIMIZERS)}"
            )
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or eps <= 0:
            raise ValueError(
                f"heads/optim.py: bad hyper-parameters lr={lr}, momentum={momentum}, "
                f"weight_decay={weight_decay}, eps={eps}"
            )
        if not all(0 <= b < 1 for b in betas) or len(betas) != 2:
            raise ValueError(f"heads/optim.py: betas must be two values in [0, 1), got {betas}")
        self.head = head
        self.name = name
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.state: dict[str, torch.Tensor] = {}
        self._grad: tuple[torch.Tensor, torch.Tensor] | None = None  # unscaled (rows, grad)

    def __repr__(self) -> str:
        return (
            f"HeadOptimizer(name={self.name}, lr={self.lr}, momentum={self.momentum}, "
            f"weight_decay={self.weight_decay}, betas={self.betas}, eps={self.eps})"
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

    def set_lr(self, lr: float) -> None:
        """Set the learning rate (the trainer's schedule drives it)."""
        if lr < 0:
            raise ValueError(f"heads/optim.py: lr must be >= 0, got {lr}")
        self.lr = float(lr)

    def state_dict(self) -> dict:
        """Hyper-parameters and the local shard's per-row state tensors (not copied)."""
        self._ensure_state()
        return {
            "name": self.name,
            "lr": self.lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "betas": self.betas,
            "eps": self.eps,
            "state": dict(self.state),
        }

    def load_state_dict(self, sd: dict) -> None:
        """Load ``state_dict()`` output of the same optimizer over a same-sized shard.

        Raises:
            ValueError: different optimizer name, missing state key or wrong shape.
        """
        if sd.get("name") != self.name:
            raise ValueError(
                f"heads/optim.py: state_dict is for optimizer '{sd.get('name')}', this is "
                f"'{self.name}'"
            )
        self._ensure_state()
        for key in self.state_keys():
            src = sd.get("state", {}).get(key)
            if src is None or src.shape != self.state[key].shape:
                raise ValueError(
                    f"heads/optim.py: state '{key}' missing or shaped "
                    f"{None if src is None else tuple(src.shape)}, want "
                    f"{tuple(self.state[key].shape)}"
                )
            self.state[key].copy_(src)
        self.lr = float(sd["lr"])
        self.momentum = float(sd["momentum"])
        self.weight_decay = float(sd["weight_decay"])
        self.betas = tuple(float(b) for b in sd["betas"])
        self.eps = float(sd["eps"])

    # -- gradients -----------------------------------------------------------------------------
    @property
    def grad_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows (U,) int64, grad (U, D) fp32)`` after ``unscale_`` (or the raw sum before)."""
        return self._grad if self._grad is not None else self.head.sparse_grad()

    def unscale_(self, loss_scale: float = 1.0) -> bool:
        """Divide the accumulated head gradient by ``loss_scale``; report finiteness everywhere.

        Call once per optimizer step, after the last micro-batch's backward.

        Returns:
            True when every rank's head gradient is finite (a collective over the head's group:
            all ranks must call it).

        Raises:
            RuntimeError: called twice without ``zero_grad``; a forward was not backpropagated.
            ValueError: ``loss_scale`` <= 0.
        """
        if self._grad is not None:
            raise RuntimeError("heads/optim.py: unscale_() called twice since zero_grad()")
        if not loss_scale > 0:
            raise ValueError(f"heads/optim.py: loss_scale must be > 0, got {loss_scale}")
        rows, grad = self.head.sparse_grad()  # buffers owned by the head: safe to edit
        if loss_scale != 1.0:
            grad.div_(loss_scale)
        self._grad = (rows, grad)
        # One reduction instead of isfinite's full-size temporaries: inf/NaN anywhere -> sum too.
        finite = bool(torch.isfinite(grad.sum())) if grad.numel() else True
        return all_true(finite, self.head.topo, self.head.weight.device)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the head's recorded forwards and the unscaled gradient."""
        self._grad = None
        self.head.zero_grad()

    # -- update --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        """Update the rows sampled since ``zero_grad`` (gather, update, scatter).

        Without a prior ``unscale_`` the gradient is used as is (loss scale 1). The gradient
        buffer is consumed (SGD adds the weight decay into it): read ``grad_rows`` before.
        """
        rows, grad = self._grad if self._grad is not None else self.head.sparse_grad()
        if rows.numel() == 0:
            return
        self._ensure_state()
        weight = self.head.weight
        if rows.numel() == weight.shape[0]:  # rows are unique: the whole shard, update in place
            if self.name == "sgd":
                self._sgd_rows(None, weight.data, grad)
            else:
                self._adamw_rows(None, weight.data, grad)
            return
        w = weight.index_select(0, rows)
        if self.name == "sgd":
            self._sgd_rows(rows, w, grad)
        else:
            self._adamw_rows(rows, w, grad)
        weight.index_copy_(0, rows, w)

    @staticmethod
    def _get(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        return t if rows is None else t.index_select(0, rows)

    @staticmethod
    def _put(t: torch.Tensor, rows: torch.Tensor | None, value: torch.Tensor) -> None:
        if rows is not None:  # rows None: ``value`` is ``t`` itself, updated in place
            t.index_copy_(0, rows, value)

    def _sgd_rows(self, rows, w: torch.Tensor, grad: torch.Tensor) -> None:
        d = grad.add_(w, alpha=self.weight_decay) if self.weight_decay else grad
        if self.momentum:
            buf = self.state["momentum_buffer"]
            # A zero buffer gives m*0 + d = d at a row's first step, as torch.optim.SGD.
            b = self._get(buf, rows).mul_(self.momentum).add_(d)
            self._put(buf, rows, b)
            d = b
        w.add_(d, alpha=-self.lr)

    def _adamw_rows(self, rows, w: torch.Tensor, grad: torch.Tensor) -> None:
        b1, b2 = self.betas
        st = self.state
        step = self._get(st["step"], rows).add_(1)
        m = self._get(st["exp_avg"], rows).lerp_(grad, 1 - b1)
        v = self._get(st["exp_avg_sq"], rows).mul_(b2).addcmul_(grad, grad, value=1 - b2)
        if self.weight_decay:
            w.mul_(1 - self.lr * self.weight_decay)
        t = step.to(torch.float64).unsqueeze(1)
        bc1 = (1 - b1**t).to(w.dtype)
        bc2_sqrt = (1 - b2**t).sqrt().to(w.dtype)
        denom = v.sqrt().div_(bc2_sqrt).add_(self.eps)
        w.sub_(m.div(denom).mul_(self.lr / bc1))
        self._put(st["step"], rows, step)
        self._put(st["exp_avg"], rows, m)
        self._put(st["exp_avg_sq"], rows, v)


def build_head_optimizer(
    head: PartialFC,
    name: str = "sgd",
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> HeadOptimizer:
    """Build the sparse-row head optimizer by name (``"sgd"`` or ``"adamw"``); see
    ``HeadOptimizer`` for arguments and errors."""
    return HeadOptimizer(head, name, lr, momentum, weight_decay, betas, eps)
