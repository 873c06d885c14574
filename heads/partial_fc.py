"""Model-parallel Partial FC head: sharded class centers, sampled softmax, margin CE.

Reference: An et al., "Partial FC: Training 10 Million Identities on a Single Machine", ICCVW
2021, and "Killing Two Birds with One Stone: Efficient and Robust Training of Face Recognition
CNNs by Partial FC", CVPR 2022; insightface arcface_torch ``partial_fc_v2.PartialFC_V2``.

Rank r of W owns classes ``[start_r, start_r + n_r)``, ``n_r = C//W + (r < C%W)``. A forward
all-gathers embeddings and labels, keeps every center that is a positive of the global batch plus
uniformly sampled negatives up to ``int(sample_rate * n_r)``, and returns the distributed margin
softmax CE. The centers are not an autograd leaf: each forward makes a leaf of the sampled rows
only, so the gradient is ``(K, D)``, never ``(n_r, D)``; ``heads/optim.py`` reads these sparse
gradients (summed over gradient-accumulation micro-batches) and updates the sampled rows only.

Gradient convention: head gradients are the exact single-process rows (times whatever the caller
scaled the loss by: the fp16 loss scale, 1/gradient_accumulation_steps); the embedding gradient is
W times the exact one so that averaging over W ranks restores it (``heads/comm.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from heads.comm import Topology, all_gather_rows, gather_embeddings, resolve_group, shard_range
from heads.dist_softmax import margin_softmax_cross_entropy
from heads.margin import CombinedMarginLoss

__all__ = ["PartialFC", "sample_classes", "normalize_rows", "init_centers"]

INIT_BLOCK = 65536  # classes per independently seeded block of initial centers


def init_centers(
    num_classes: int, start: int, count: int, dim: int, seed: int, block: int = INIT_BLOCK
) -> torch.Tensor:
    """Initial centers of classes ``[start, start + count)``, N(0, 0.01) as arcface_torch.

    Class c's row depends only on ``(seed, num_classes, c)``, never on the world size: rows are
    drawn in blocks of ``block`` classes, each from its own seeded generator, and a rank draws
    only the blocks its range touches. (arcface_torch draws every shard from the global RNG,
    which gives identical centers to classes ``c`` and ``c + n_r`` when ranks share a seed.)

    Returns:
        ``(count, dim)`` fp32 CPU tensor.
    """
    out = torch.empty(count, dim)
    if count == 0:
        return out
    g = torch.Generator()
    for b in range(start // block, (start + count - 1) // block + 1):
        lo, hi = b * block, min((b + 1) * block, num_classes)
        # torch's CPU generator keeps only 32 seed bits: mix seed and block into them (the odd
        # multiplier makes blocks of one seed distinct).
        g.manual_seed(((seed * 1_000_003) ^ (b * 2_654_435_761) ^ 0x5EED) & 0xFFFFFFFF)
        rows = torch.normal(0.0, 0.01, (hi - lo, dim), generator=g)
        a, z = max(lo, start), min(hi, start + count)
        out[a - start : z - start] = rows[a - lo : z - lo]
    return out


class _NormalizeRows(torch.autograd.Function):
    """``x / ||x||`` per row with a fused backward (autograd's ``F.normalize`` graph makes ~5
    temporaries of the input's size; this makes one)."""

    @staticmethod
    def forward(ctx, x, eps):
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(eps)
        y = x / norm
        ctx.save_for_backward(y, norm)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, norm = ctx.saved_tensors
        # d(x/|x|) = (g - y <y, g>) / |x|
        dot = torch.linalg.vecdot(y, grad, dim=1).unsqueeze(1)
        return torch.addcmul(grad, y, dot, value=-1.0).div_(norm), None


def normalize_rows(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Row-wise L2 normalization, same values as ``F.normalize(x, dim=1, eps=eps)``.

    Args:
        x: ``(R, D)`` float tensor.
        eps: lower bound of the norm (the gradient assumes norms above it).

    Returns:
        ``(R, D)`` unit rows, same dtype.
    """
    return _NormalizeRows.apply(x, eps)


def sample_classes(
    labels: torch.Tensor,
    start: int,
    count: int,
    num_sample: int,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial FC sampling of one rank's class shard.

    Every class of ``[start, start + count)`` that appears in ``labels`` is kept; negatives are
    drawn uniformly without replacement until ``num_sample`` classes are kept (when the positives
    alone reach ``num_sample``, all of them and nothing else are kept).

    Args:
        labels: ``(N,)`` int64 global class ids of the gathered batch.
        start, count: this rank's shard.
        num_sample: target number of kept classes; ``>= count`` keeps the whole shard.
        generator: RNG for the negatives (on ``labels.device``).

    Returns:
        ``(index, local_labels)``: ``index`` ``(K,)`` int64 sorted shard-local rows kept;
        ``local_labels`` ``(N,)`` int64 position in ``index`` of each row's class, -1 when the
        class is not in this shard.
    """
    local = labels - start
    in_shard = (local >= 0) & (local < count)
    device = labels.device
    if num_sample >= count:
        index = torch.arange(count, device=device)
        return index, torch.where(in_shard, local, torch.full_like(local, -1))
    positives = torch.unique(local[in_shard])  # sorted
    if positives.numel() >= num_sample:
        index = positives
    else:
        score = torch.rand(count, generator=generator, device=device)
        score[positives] = 2.0  # above every uniform draw: always kept
        index = torch.topk(score, num_sample, sorted=False).indices.sort().values
    remapped = torch.full_like(local, -1)
    remapped[in_shard] = torch.searchsorted(index, local[in_shard])
    return index, remapped


class PartialFC(nn.Module):
    """Sharded class centers with Partial FC sampling and a distributed margin softmax CE.

    Args:
        embedding_size: D.
        num_classes: C, total over all ranks.
        sample_rate: in ``(0, 1]``; 1 is exact model-parallel full softmax.
        margin_loss: a ``CombinedMarginLoss``.
        process_group: group to shard over; ``None`` = default group if ``torch.distributed``
            is initialized, else a single process.
        seed: seeds the initial centers (``init_centers``: the same for any world size) and the
            sampling; rank r's sampling generator is seeded with ``seed * 1_000_003 + r`` so the
            sampled negatives are reproducible run to run.

    Attributes:
        weight: ``(n_r, D)`` fp32 ``nn.Parameter`` with ``requires_grad=False`` (centers,
            N(0, 0.01) from ``init_centers``); updated only by ``heads.optim.HeadOptimizer``.
        class_start, num_local: this rank's shard ``[class_start, class_start + num_local)``.
        sampled_index: ``(K,)`` int64 sorted shard-local rows kept by the latest forward.

    Raises:
        ValueError: bad sizes, sample_rate or margin type.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        sample_rate: float = 1.0,
        margin_loss: CombinedMarginLoss | None = None,
        process_group=None,
        seed: int = 0,
    ):
        super().__init__()
        if embedding_size < 1 or num_classes < 1:
            raise ValueError(
                f"heads/partial_fc.py: embedding_size and num_classes must be >= 1, got "
                f"{embedding_size}, {num_classes}"
            )
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(
                f"heads/partial_fc.py: sample_rate must be in (0, 1], got {sample_rate}"
            )
        if margin_loss is None:
            margin_loss = CombinedMarginLoss()
        if not isinstance(margin_loss, CombinedMarginLoss):
            raise ValueError(
                "heads/partial_fc.py: margin_loss must be a CombinedMarginLoss, got "
                f"{type(margin_loss).__name__}"
            )
        self.topo: Topology = resolve_group(process_group)
        self.embedding_size = int(embedding_size)
        self.num_classes = int(num_classes)
        self.sample_rate = float(sample_rate)
        self.margin_loss = margin_loss
        self.seed = int(seed)
        self.class_start, self.num_local = shard_range(
            self.num_classes, self.topo.rank, self.topo.world_size
        )
        self.num_sample = int(self.sample_rate * self.num_local)
        self.weight = nn.Parameter(
            init_centers(
                self.num_classes, self.class_start, self.num_local, self.embedding_size, self.seed
            ),
            requires_grad=False,
        )
        self._generator: torch.Generator | None = None
        self.sampled_index: torch.Tensor | None = None
        # (index (K,), leaf (K, D)) of every training forward since the last zero_grad().
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
            f"sample_rate={self.sample_rate}, shard=[{self.class_start}, "
            f"{self.class_start + self.num_local}), world_size={self.topo.world_size}"
        )

    # -- sampling RNG ------------------------------------------------------------------------
    def generator(self) -> torch.Generator:
        """The sampling generator on the centers' device (created and seeded on first use)."""
        device = self.weight.device
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed * 1_000_003 + self.topo.rank)
        return self._generator

    def get_rng_state(self) -> torch.Tensor:
        """Sampling RNG state (uint8 CPU tensor), saved with the head for exact resumes."""
        return self.generator().get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        """Restore a state from ``get_rng_state`` (same device type)."""
        self.generator().set_state(state)

    # -- forward -----------------------------------------------------------------------------
    def forward(
        self, local_embeddings: torch.Tensor, local_labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict]:
        """Loss of the global batch.

        Args:
            local_embeddings: ``(B, D)`` fp32/fp16/bf16 on the centers' device; cast to fp32.
                ``B`` may differ between ranks (0 is allowed).
            local_labels: ``(B,)`` int64 global class ids in ``[0, C)``.

        Returns:
            ``(loss, stats)``: fp32 scalar, the mean over the ``N = sum_r B_r`` gathered rows,
            identical on all ranks; ``stats`` python numbers ``num_sampled`` (K, local),
            ``num_positive`` (distinct positive classes in this shard), ``global_batch`` (N).
            In training mode with grad enabled, the sampled rows' gradient is recorded for
            ``HeadOptimizer``.

        Raises:
            ValueError: shape, dtype, device or label range errors.
        """
        emb, labels = self._check_inputs(local_embeddings, local_labels)
        emb, sizes = gather_embeddings(emb.float(), self.topo)
        labels = all_gather_rows(labels, sizes, self.topo)
        index, local_labels_k = sample_classes(
            labels, self.class_start, self.num_local, self.num_sample, self.generator()
        )
        self.sampled_index = index
        track = self.training and torch.is_grad_enabled()
        full = index.numel() == self.num_local
        # A leaf over the sampled rows only; the full shard shares storage instead of copying.
        rows = self.weight.detach() if full else self.weight.detach()[index]
        if track:
            rows.requires_grad_(True)
            self._pending.append((index, rows))
        cos = F.linear(normalize_rows(emb), normalize_rows(rows))
        loss = margin_softmax_cross_entropy(cos, local_labels_k, self.margin_loss, self.topo)
        stats = {
            "num_sampled": int(index.numel()),
            "num_positive": int(torch.unique(local_labels_k[local_labels_k >= 0]).numel()),
            "global_batch": int(labels.shape[0]),
        }
        return loss, stats

    def _check_inputs(self, emb: torch.Tensor, labels: torch.Tensor):
        if emb.dim() != 2 or emb.shape[1] != self.embedding_size:
            raise ValueError(
                f"heads/partial_fc.py: local_embeddings must be (B, {self.embedding_size}), got "
                f"{tuple(emb.shape)}"
            )
        if not emb.is_floating_point():
            raise ValueError(f"heads/partial_fc.py: local_embeddings dtype {emb.dtype} not float")
        if labels.shape != (emb.shape[0],) or labels.dtype != torch.int64:
            raise ValueError(
                f"heads/partial_fc.py: local_labels must be int64 ({emb.shape[0]},), got "
                f"{labels.dtype} {tuple(labels.shape)}"
            )
        if emb.device != self.weight.device or labels.device != self.weight.device:
            raise ValueError(
                f"heads/partial_fc.py: inputs on {emb.device}/{labels.device} but centers on "
                f"{self.weight.device}; move the head with .to(device)"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(
                f"heads/partial_fc.py: local_labels must be in [0, {self.num_classes}), got "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        return emb, labels

    # -- sparse gradients ----------------------------------------------------------------------
    def sparse_grad(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient of the recorded forwards, summed per row.

        Returns:
            ``(rows, grad)``: ``rows`` ``(U,)`` int64 sorted shard-local rows sampled by any
            forward since ``zero_grad``; ``grad`` ``(U, D)`` fp32, rows never reached by a
            backward of a given forward contribute 0 from it.

        Raises:
            RuntimeError: a recorded forward was never backpropagated (its grad is None).
        """
        device = self.weight.device
        if not self._pending:
            empty = torch.empty(0, dtype=torch.int64, device=device)
            return empty, torch.empty(0, self.embedding_size, device=device)
        for i, (_, leaf) in enumerate(self._pending):
            if leaf.grad is None:
                raise RuntimeError(
                    f"heads/partial_fc.py: training forward #{i} since zero_grad() has no "
                    "gradient; call backward on its loss, or run it in eval()/no_grad()"
                )
        if len(self._pending) == 1:
            index, leaf = self._pending[0]
            return index, leaf.grad
        rows = torch.unique(torch.cat([index for index, _ in self._pending]))
        grad = torch.zeros(rows.numel(), self.embedding_size, device=device)
        for index, leaf in self._pending:
            grad.index_add_(0, torch.searchsorted(rows, index), leaf.grad)
        return rows, grad

    @property
    def num_recorded(self) -> int:
        """Training forwards recorded for the optimizer since the last ``zero_grad``."""
        return len(self._pending)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the recorded forwards and their gradients (``set_to_none`` is accepted for
        ``nn.Module`` compatibility; sparse gradients are always dropped)."""
        self._pending = []
