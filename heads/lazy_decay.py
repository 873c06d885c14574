"""Dense SGD weight decay and momentum on the head shard, applied lazily to unsampled rows.

arcface_torch (``PartialFC_V2``) gathers ``weight[index]`` from an ``nn.Parameter`` and steps it
with ``torch.optim.SGD``: every row of the shard gets a (zero) gradient each step, so rows that
were not sampled still decay and still move along their momentum buffer. For such a row, one SGD
step with learning rate ``lr``, momentum ``m`` and weight decay ``wd`` is linear in ``(w, b)``::

    b' = m * b + wd * w
    w' = w - lr * b' = (1 - lr * wd) * w - lr * m * b

i.e. ``(w', b') = A (w, b)`` with the 2 x 2 matrix ``A = [[1 - lr*wd, -lr*m], [wd, m]]``, the same
for every element of the row. So the skipped steps of a row compose into one 2 x 2 matrix, and a
row's state can be brought up to date exactly (up to fp rounding) when it is next sampled,
without ever forming a dense ``(n_r, D)`` gradient.

Book-keeping: ``slot[r]`` is the step (counted from the last flush) after which row ``r`` was
last current, and ``suffix[j]`` the product of the matrices of all steps after ``j``. Every step
multiplies the ``k + 1`` live suffix products by ``A`` (a ``(k+1, 2, 2)`` fp64 batched product);
after ``flush_every`` steps every row is brought up to date in chunks and the count restarts,
which bounds both that cost and the conditioning of the products.

AdamW has no such closed form: with a zero gradient its update ``m_hat / (sqrt(v_hat) + eps)``
is not linear in the state, and replaying it costs one pass per skipped step, as much as the
dense update itself; ``dense`` decay is therefore SGD-only.
"""

from __future__ import annotations

import torch

__all__ = ["LazyDenseDecay", "sgd_transition"]

# Rows per chunk when a flush brings the whole shard up to date (bounds its temporaries).
_FLUSH_CHUNK = 65536


def sgd_transition(
    lr: float, momentum: float, weight_decay: float, ok: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """The ``(2, 2)`` fp64 matrix of one SGD step on a row with zero gradient.

    Args:
        lr, momentum, weight_decay: the step's SGD hyper-parameters (dampening 0, no Nesterov).
        ok: optional 0-dim bool device tensor; when false the step was skipped (fp16 overflow)
            and the matrix is the identity, decided on the device without a host read.
        device: where to build it.

    Returns:
        ``A`` with ``(w', b') = A @ (w, b)`` (see the module docstring). Built by filling a
        device tensor entry by entry: a fill takes its Python number as a kernel argument, where
        ``torch.tensor(data, device=cuda)`` would be a blocking copy from pageable memory every
        step.
    """
    a = torch.empty((2, 2), dtype=torch.float64, device=device)
    entries = (1.0 - lr * weight_decay, -lr * momentum, weight_decay, momentum)
    for k, value in enumerate(entries):
        a[k // 2, k % 2].fill_(value)
    if ok is None:
        return a
    return torch.where(ok, a, torch.eye(2, dtype=torch.float64, device=device))


class LazyDenseDecay:
    """Catch-up book-keeping for dense SGD decay/momentum over one head shard.

    Args:
        num_rows: ``n_r``, rows of the shard.
        device: the centers' device.
        flush_every: steps between full catch-ups (>= 1).

    Raises:
        ValueError: ``num_rows`` < 0 or ``flush_every`` < 1.
    """

    def __init__(self, num_rows: int, device: torch.device, flush_every: int = 256):
        if num_rows < 0 or flush_every < 1:
            raise ValueError(
                f"num_rows must be >= 0 and flush_every >= 1, got num_rows={num_rows}, "
                f"flush_every={flush_every}"
            )
        self.flush_every = int(flush_every)
        self.slot = torch.zeros(num_rows, dtype=torch.int64, device=device)
        self.suffix = torch.eye(2, dtype=torch.float64, device=device).repeat(flush_every + 1, 1, 1)
        self.steps = 0  # steps since the last flush (a host counter: no device read)

    def _apply(
        self, rows: torch.Tensor | None, weight: torch.Tensor, buf: torch.Tensor | None
    ) -> None:
        t = self.suffix[self.slot if rows is None else self.slot[rows]].to(weight.dtype)
        w = weight if rows is None else weight.index_select(0, rows)
        new_w = w * t[:, 0, 0:1]
        if buf is not None:
            b = buf if rows is None else buf.index_select(0, rows)
            new_b = b * t[:, 1, 1:2]
            new_b.addcmul_(w, t[:, 1, 0:1])
            new_w.addcmul_(b, t[:, 0, 1:2])
            if rows is None:
                buf.copy_(new_b)
            else:
                buf.index_copy_(0, rows, new_b)
        if rows is None:
            weight.copy_(new_w)
        else:
            weight.index_copy_(0, rows, new_w)

    @torch.no_grad()
    def catch_up(self, rows: torch.Tensor, weight: torch.Tensor, buf: torch.Tensor | None) -> None:
        """Apply the skipped steps of ``rows`` to their weights and momentum, in place.

        Call before a forward reads ``weight[rows]``.

        Args:
            rows: ``(U,)`` int64 unique shard-local rows.
            weight: ``(n_r, D)`` fp32 centers.
            buf: ``(n_r, D)`` fp32 momentum buffer, or ``None`` (momentum 0).
        """
        if rows.numel() == 0:
            return
        self._apply(rows, weight, buf)
        self.slot.index_fill_(0, rows, self.steps)

    @torch.no_grad()
    def advance(
        self,
        stepped: torch.Tensor | None,
        lr: float,
        momentum: float,
        weight_decay: float,
        ok: torch.Tensor | None,
        weight: torch.Tensor,
        buf: torch.Tensor | None,
    ) -> None:
        """Record one optimizer step in which ``stepped`` rows got their explicit update.

        Args:
            stepped: ``(U,)`` int64 rows updated by the step, or ``None`` for all rows.
            lr, momentum, weight_decay: the step's SGD hyper-parameters.
            ok: optional 0-dim bool device tensor, false when the step was skipped.
            weight, buf: the shard's centers and momentum buffer (for a flush).
        """
        k = self.steps
        a = sgd_transition(lr, momentum, weight_decay, ok, self.suffix.device)
        self.suffix[: k + 1] = torch.matmul(a, self.suffix[: k + 1])
        self.suffix[k + 1] = torch.eye(2, dtype=torch.float64, device=self.suffix.device)
        self.steps = k + 1
        if stepped is None:
            self.slot.fill_(self.steps)
        else:
            self.slot.index_fill_(0, stepped, self.steps)
        if self.steps == self.flush_every:
            self.flush(weight, buf)

    @torch.no_grad()
    def flush(self, weight: torch.Tensor, buf: torch.Tensor | None) -> None:
        """Bring every row up to date (before a checkpoint; every ``flush_every`` steps)."""
        if self.steps == 0:  # every row is current already
            return
        n = weight.shape[0]
        for start in range(0, n, _FLUSH_CHUNK):
            end = min(n, start + _FLUSH_CHUNK)
            rows = torch.arange(start, end, device=weight.device)
            self._apply(rows, weight, buf)
        self.slot.zero_()
        self.suffix.copy_(torch.eye(2, dtype=torch.float64, device=self.suffix.device))
        self.steps = 0
