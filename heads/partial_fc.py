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
With ``num_subcenters`` S > 1 (Sub-center ArcFace, ``heads/subcenter.py``) each class has S
consecutive rows: classes are sharded and sampled, their rows gathered, and each class's cosine
is the max over its rows.

Gradient convention: head gradients are the exact single-process rows (times whatever the caller
scaled the loss by: the fp16 loss scale, 1/gradient_accumulation_steps); the embedding gradient is
W times the exact one so that averaging over W ranks restores it (``heads/comm.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from heads.comm import (
    Topology,
    all_gather_rows,
    all_gather_sizes,
    gather_embeddings,
    resolve_group,
    shard_range,
)
from heads.dist_softmax import margin_softmax_cross_entropy
from heads.fused import radial_coef
from heads.margin import CombinedMarginLoss, Margin
from heads.subcenter import check_num_subcenters, expand_classes, subcenter_max

__all__ = [
    "PartialFC",
    "sample_classes",
    "normalize_rows",
    "init_centers",
    "cosine_logits",
    "LOGITS_DTYPES",
    "resolve_logits_dtype",
]

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
    def forward(ctx: Any, x: torch.Tensor, eps: float) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(eps)
        y: torch.Tensor = x / norm
        ctx.save_for_backward(y, norm)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
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
    out: torch.Tensor = _NormalizeRows.apply(x, eps)
    return out


LOGITS_DTYPES = ("fp32", "tf32", "bf16")


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as fp32: bf16 operands accumulate in fp32 (CUDA returns fp32 directly; other
    devices round the product to bf16 first, then widen)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()


class _CosineLinear(torch.autograd.Function):
    """``cos[i, j] = e_i . w_j / |w_j|`` for unit rows ``e`` without materializing the
    normalized centers: the ``(K, D)`` division is replaced by scaling the ``(N, K)`` product,
    and the backward projects out the radial part with one dot product per center.
    With ``dtype`` bf16 the three GEMMs take bf16 operands and return fp32."""

    @staticmethod
    def forward(
        ctx: Any,
        emb_n: torch.Tensor,
        rows: torch.Tensor,
        eps: float,
        mode: str,
        workspace: _Workspace | None,
    ) -> torch.Tensor:
        inv = torch.linalg.vector_norm(rows, dim=1).clamp_min_(eps).reciprocal_()
        dtype = torch.bfloat16 if mode == "bf16" else torch.float32
        e_op, w_op = emb_n.to(dtype), rows.to(dtype)
        with _tf32(mode == "tf32"):
            if workspace is not None and dtype == torch.float32:
                # A kept (N, K) buffer: a fresh one is page-faulted in on every step (~1/3 of
                # the forward GEMM's time on CPU). The CE turns it into the gradient, consumed
                # by this backward before the next forward writes it again.
                out = workspace.buffer("cos", (e_op.shape[0], w_op.shape[0]), e_op)
                cos = torch.mm(e_op, w_op.t(), out=out).mul_(inv)
            else:
                cos = _mm(e_op, w_op.t()).mul_(inv)
        ctx.save_for_backward(e_op, w_op, rows, inv)
        ctx.mode = mode
        ctx.workspace = workspace
        return cos

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        e_op, w_op, rows, inv = ctx.saved_tensors
        # g = G / |w| per column, so grad_e = g @ w and a = g^T e need no normalized centers.
        # The CE hands over its own buffer: scale it in place (no third (N, K) tensor).
        g = grad.mul_(inv).to(e_op.dtype)
        grad_e = grad_w = None
        with _tf32(ctx.mode == "tf32"):
            if ctx.needs_input_grad[0]:
                grad_e = _mm(g, w_op)
            if ctx.needs_input_grad[1]:
                ws = ctx.workspace
                if ws is not None and g.dtype == torch.float32:
                    grad_w = torch.mm(g.t(), e_op, out=ws.get("grad", rows))
                else:
                    grad_w = _mm(g.t(), e_op)
        if grad_w is not None:
            # dL/dw_j = a_j - (a_j . w_j) w_j / |w_j|^2: drop the radial part of a_j.
            ws = ctx.workspace
            if ws is not None and ws.fused:  # one read of each array, no (K, D) product
                coef, probe = radial_coef(grad_w, rows, inv)
            else:  # (vecdot would allocate a (K, D) product each call: reuse a scratch buffer)
                prod = torch.mul(grad_w, rows, out=None if ws is None else ws.get("scratch", rows))
                coef = prod.sum(dim=1).mul_(inv).mul_(inv)
                probe = None
            if ctx.workspace is None:
                grad_w.addcmul_(rows, coef.unsqueeze(1), value=-1.0)
            else:  # hand the gradient to the head, not to autograd
                # Kept as (a, coef): the optimizer folds "- coef * w" into its own pass over
                # the rows; PartialFC.sparse_grad applies it for every other reader.
                ws = ctx.workspace
                ws.leaf.grad, ws.coef = grad_w, coef
                # Non-finite iff some grad_w entry was (each enters a product with finite w):
                # the optimizer's finiteness check reads K values instead of K * D.
                ws.probe = coef.sum() if probe is None else probe
                grad_w = None
        return grad_e, grad_w, None, None, None


def resolve_logits_dtype(name: str, device: torch.device, precision: str) -> str:
    """The head's GEMM precision for a config value (``head.logits_dtype``).

    ``auto``: on CUDA ``bf16`` when the engine trains in bf16, ``tf32`` otherwise (fast either
    way; the softmax stays fp32); ``fp32`` elsewhere (CPUs gain nothing from bf16 GEMMs here).
    Other values are returned as given.

    Raises:
        ValueError: a name outside ``auto`` and ``LOGITS_DTYPES``.
    """
    if name == "auto":
        if torch.device(device).type != "cuda":
            return "fp32"
        return "bf16" if precision == "bf16" else "tf32"
    if name not in LOGITS_DTYPES:
        raise ValueError(
            f"heads/partial_fc.py: logits dtype must be auto or one of {LOGITS_DTYPES}, got "
            f"{name!r}"
        )
    return name


class _tf32:
    """Let CUDA fp32 GEMMs use TF32 inside the block (restores the global setting after)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self) -> None:
        if self.enabled:
            self.saved = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            torch.backends.cuda.matmul.allow_tf32 = self.saved


class _Workspace:
    """Buffers of one recorded forward, kept across steps so that large CPU tensors are not
    re-allocated (and page-faulted) every step; ``leaf`` receives the centers' gradient."""

    def __init__(self, fused: bool = False) -> None:
        self.fused = fused  # compiled kernels (heads/fused.py) for the backward's row pass
        self.buffers: dict[str, torch.Tensor] = {}
        self.leaf: torch.Tensor | None = None
        self.probe: torch.Tensor | None = None
        self.coef: torch.Tensor | None = None  # radial part still to remove from leaf.grad

    def materialize(self) -> None:
        """Apply the pending radial correction: ``leaf.grad -= coef * leaf`` (once)."""
        if self.coef is not None and self.leaf is not None and self.leaf.grad is not None:
            self.leaf.grad.addcmul_(self.leaf.detach(), self.coef.unsqueeze(1), value=-1.0)
        self.coef = None

    def get(self, name: str, like: torch.Tensor) -> torch.Tensor:
        return self.buffer(name, tuple(like.shape), like)

    def buffer(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """The kept buffer ``name`` of ``shape`` with ``like``'s dtype and device."""
        t = self.buffers.get(name)
        if t is None or t.shape != shape or t.dtype != like.dtype or t.device != like.device:
            t = self.buffers[name] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return t


def cosine_logits(
    emb_n: torch.Tensor,
    rows: torch.Tensor,
    mode: str = "fp32",
    workspace: _Workspace | None = None,
) -> torch.Tensor:
    """Cosines of unit embeddings with (unnormalized) centers: ``emb_n @ (rows / |rows|)^T``.

    Args:
        emb_n: ``(N, D)`` fp32 unit rows (``normalize_rows`` output).
        rows: ``(K, D)`` fp32 centers.
        mode: GEMM precision, one of ``LOGITS_DTYPES``: ``fp32``; ``tf32`` (TF32 tensor cores
            on CUDA, plain fp32 elsewhere); ``bf16`` (bf16 operands, fp32 accumulation, fp32
            result; the backward GEMMs likewise).

    Returns:
        ``(N, K)`` fp32, equal to ``F.linear(emb_n, normalize_rows(rows))`` up to rounding.
        With a ``workspace`` (``PartialFC``'s), the centers' gradient is stored in
        ``workspace.leaf.grad`` (a reused buffer) instead of flowing through autograd.
    """
    if mode not in LOGITS_DTYPES:
        raise ValueError(f"heads/partial_fc.py: logits dtype must be one of {LOGITS_DTYPES}")
    out: torch.Tensor = _CosineLinear.apply(emb_n, rows, 1e-12, mode, workspace)
    return out


def sample_classes(
    labels: torch.Tensor,
    start: int,
    count: int,
    num_sample: int,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial FC sampling of one rank's class shard, with shapes that depend on sizes only.

    Every class of ``[start, start + count)`` that appears in ``labels`` is kept; the other
    kept classes are negatives drawn uniformly without replacement, so exactly
    ``min(num_sample, count)`` classes are kept. No ``unique``, boolean-mask indexing or
    data-dependent shape: nothing here waits for the device (random scores with the positives
    forced above every draw, then ``topk``).

    Args:
        labels: ``(N,)`` int64 global class ids of the gathered batch.
        start, count: this rank's shard.
        num_sample: number of kept classes; ``>= count`` keeps the whole shard. It must be at
            least the number of distinct positives in the shard (``PartialFC`` uses
            ``max(int(sample_rate * count), N)``), else some positives are dropped.
        generator: RNG for the negatives (on ``labels.device``).

    Returns:
        ``(index, local_labels)``: ``index`` ``(K,)`` int64 sorted shard-local rows kept;
        ``local_labels`` ``(N,)`` int64 position in ``index`` of each row's class, -1 when the
        class is not in this shard.
    """
    local = labels - start
    in_shard = (local >= 0) & (local < count)
    device = labels.device
    minus_one = torch.full_like(local, -1)
    if num_sample >= count:
        index = torch.arange(count, device=device)
        return index, torch.where(in_shard, local, minus_one)
    # Slot ``count`` is a sink for labels of other shards, so the scatter needs no mask.
    slot = torch.where(in_shard, local, count)
    score = torch.rand(count + 1, generator=generator, device=device)
    score.index_fill_(0, slot, 2.0)  # above every uniform draw: positives always kept
    index = torch.topk(score[:count], num_sample, sorted=False).indices
    # Sorted rows gather faster; float64 holds these ids exactly and sorts ~4x faster than int64
    # on CPU (same cost class on CUDA).
    index = index.double().sort().values.long()
    pos = torch.searchsorted(index, slot.clamp_max(count - 1))
    return index, torch.where(in_shard, pos, minus_one)


class PartialFC(nn.Module):
    """Sharded class centers with Partial FC sampling and a distributed margin softmax CE.

    Args:
        embedding_size: D.
        num_classes: C, total over all ranks.
        sample_rate: in ``(0, 1]``; 1 is exact model-parallel full softmax.
        margin_loss: a ``heads.margin.Margin`` (``CombinedMarginLoss`` when ``None``; others
            from ``heads.losses.build_margin``). Norm-aware margins get the norms of the gathered
            un-normalized embeddings; their state (EMA, t, RNG) is updated by training forwards.
        process_group: group to shard over; ``None`` = default group if ``torch.distributed``
            is initialized, else a single process.
        seed: seeds the initial centers (``init_centers``: the same for any world size) and the
            sampling; rank r's sampling generator is seeded with ``seed * 1_000_003 + r`` so the
            sampled negatives are reproducible run to run.
        logits_dtype: precision of the three logits GEMMs, one of ``LOGITS_DTYPES`` (see
            ``cosine_logits``); the softmax and the loss are fp32 in every mode.
        fused: run the memory-bound row passes of the step (the backward's radial correction,
            ``HeadOptimizer``'s SGD update) as ``torch.compile`` kernels (``heads/fused.py``;
            ``resolve_fused`` picks it from ``head.kernels``). Same math, fewer memory passes.
        num_subcenters: S sub-centers per class (Sub-center ArcFace, Deng et al., ECCV 2020;
            ``heads/subcenter.py``): a class's cosine is the max over its S rows, then the
            margin and the CE as usual. 1 (default) is the plain head.

    Attributes:
        weight: ``(n_r S, D)`` fp32 ``nn.Parameter`` with ``requires_grad=False`` (centers,
            N(0, 0.01) from ``init_centers`` over the ``C S`` rows; class c's rows are
            ``[c S, (c + 1) S)`` of the global order); updated only by
            ``heads.optim.HeadOptimizer``.
        class_start, num_local: this rank's shard ``[class_start, class_start + num_local)``
            (classes; rows ``[class_start S, (class_start + num_local) S)``).
        sampled_index: ``(K S,)`` int64 sorted shard-local rows kept by the latest forward
            (the S rows of each of the K sampled classes);
            ``K = min(n_r, max(int(sample_rate * n_r), N))`` for a global batch of N rows (at
            least N, so every positive fits: a fixed size, known without reading the labels).
        fixed_batch: per-rank batch size agreed by ``fix_batch_size`` (``None``: sizes are
            exchanged at every forward).

    Raises:
        ValueError: bad sizes, sample_rate, margin type or num_subcenters (not an int >= 1).
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        sample_rate: float = 1.0,
        margin_loss: Margin | None = None,
        process_group: Any = None,
        seed: int = 0,
        logits_dtype: str = "fp32",
        fused: bool = False,
        num_subcenters: int = 1,
    ) -> None:
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
        if not isinstance(margin_loss, Margin):
            raise ValueError(
                "heads/partial_fc.py: margin_loss must be a heads.margin.Margin, got "
                f"{type(margin_loss).__name__}"
            )
        if logits_dtype not in LOGITS_DTYPES:
            raise ValueError(
                f"heads/partial_fc.py: logits_dtype must be one of {LOGITS_DTYPES}, got "
                f"{logits_dtype!r}"
            )
        self.logits_dtype = logits_dtype
        self.fused = bool(fused)
        self.num_subcenters = check_num_subcenters(num_subcenters)
        self.fixed_batch: int | None = None
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
        k = self.num_subcenters  # class c's rows are [c k, (c + 1) k): whole classes shard
        self.weight = nn.Parameter(
            init_centers(
                self.num_classes * k,
                self.class_start * k,
                self.num_local * k,
                self.embedding_size,
                self.seed,
            ),
            requires_grad=False,
        )
        self._generator: torch.Generator | None = None
        self.sampled_index: torch.Tensor | None = None
        # Called with the sampled rows before they are read (HeadOptimizer's dense decay).
        self.before_gather: Callable[[torch.Tensor], None] | None = None
        # (index (K,), leaf (K, D)) of every training forward since the last zero_grad().
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._workspaces: list[_Workspace] = []

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

    # -- forward ---------------------------------------------------------------------------
    def fix_batch_size(self, batch_size: int) -> None:
        """Agree once that every rank feeds ``batch_size`` rows to every forward.

        A collective (all ranks call it; one exchange, read on the host). Afterwards forwards
        skip the per-step size exchange, and a forward with another local size raises on the
        rank that has it.

        Raises:
            ValueError: the ranks disagree (the message lists every rank's size).
        """
        sizes = all_gather_sizes(int(batch_size), self.topo, self.weight.device)
        if len(set(sizes)) != 1:
            raise ValueError(
                f"heads/partial_fc.py: per-rank batch sizes differ: {sizes}; the training "
                "loader must give every rank the same batch size (drop_last)"
            )
        self.fixed_batch = int(batch_size)

    def forward(
        self, local_embeddings: torch.Tensor, local_labels: torch.Tensor, validate: bool = True
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Loss of the global batch.

        Args:
            local_embeddings: ``(B, D)`` fp32/fp16/bf16 on the centers' device; cast to fp32.
                ``B`` may differ between ranks (0 is allowed) unless ``fix_batch_size`` was
                called.
            local_labels: ``(B,)`` int64 global class ids in ``[0, C)``.
            validate: check the label range on the host (two device reads). ``False`` skips
                it (the data layer checks labels): an out-of-range label then makes the loss
                NaN on every rank instead of raising, which a trainer's finite-loss check sees.

        Returns:
            ``(loss, stats)``: fp32 scalar, the mean over the ``N = sum_r B_r`` gathered rows,
            identical on all ranks; ``stats``: ``num_sampled`` (K classes, local, python int),
            ``num_positive`` (distinct positive classes in this shard, 0-dim int64 tensor on
            the device: read it when logging), ``global_batch`` (N, python int).
            In training mode with grad enabled, the sampled rows' gradient is recorded for
            ``HeadOptimizer``. Without ``fix_batch_size`` the per-rank sizes are exchanged
            (W device reads); otherwise nothing here reads the device.

        Raises:
            ValueError: shape, dtype, device, batch size or (``validate``) label range errors.
        """
        emb, labels = self._check_inputs(local_embeddings, local_labels, validate)
        sizes = None if self.fixed_batch is None else [self.fixed_batch] * self.topo.world_size
        emb, sizes = gather_embeddings(emb.float(), self.topo, sizes)
        labels = all_gather_rows(labels, sizes, self.topo)
        n = labels.shape[0]
        k = min(self.num_local, max(self.num_sample, n))
        index, local_labels_k = sample_classes(
            labels, self.class_start, self.num_local, k, self.generator()
        )
        row_index = expand_classes(index, self.num_subcenters)  # index itself when K = 1
        self.sampled_index = row_index
        if self.before_gather is not None:
            self.before_gather(row_index)
        track = self.training and torch.is_grad_enabled()
        rows, ws = self._sampled_rows(row_index, track)
        cos = cosine_logits(normalize_rows(emb), rows, self.logits_dtype, ws)
        cos = subcenter_max(cos, self.num_subcenters)  # (N, k K) -> (N, k); cos when K = 1
        margin = self.margin_loss
        norms = torch.linalg.vector_norm(emb, dim=1) if margin.needs_norms else None
        loss = margin_softmax_cross_entropy(
            cos, local_labels_k, margin, self.topo, False, norms, track
        )
        if norms is not None and (reg := margin.regularizer(norms)) is not None:
            # Every rank holds all N norms: each backpropagates 1/W of the term, so the sum
            # over ranks in the embeddings' all-gather backward is the exact gradient once.
            w = self.topo.world_size
            loss = loss + reg / w + (reg - reg / w).detach()
        if not validate:
            bad = ((labels < 0) | (labels >= self.num_classes)).any()
            loss = torch.where(bad, float("nan"), loss)
        # Distinct positives: mark the kept columns hit by some row (fixed shapes, no unique).
        hit = torch.zeros(index.numel() + 1, dtype=torch.int64, device=index.device)
        hit.index_fill_(0, torch.where(local_labels_k >= 0, local_labels_k, index.numel()), 1)
        stats = {
            "num_sampled": int(index.numel()),
            "num_positive": hit[:-1].sum(),
            "global_batch": int(n),
        }
        return loss, stats

    def _sampled_rows(
        self, index: torch.Tensor, track: bool
    ) -> tuple[torch.Tensor, _Workspace | None]:
        """The centers of ``index`` ``(K, D)`` and, when ``track``, the workspace of this forward
        (the rows become the leaf whose gradient ``HeadOptimizer`` reads)."""
        ws = None
        if track:  # one workspace per outstanding forward (gradient accumulation)
            while len(self._workspaces) <= len(self._pending):
                self._workspaces.append(_Workspace(self.fused))
            ws = self._workspaces[len(self._pending)]
        if index.numel() == self.weight.shape[0]:  # the full shard shares storage, no copy
            rows = self.weight.detach()
        elif ws is not None:
            buf = ws.get("rows", self.weight[: index.numel()])
            rows = torch.index_select(self.weight.detach(), 0, index, out=buf)
        else:
            rows = self.weight.detach().index_select(0, index)
        if ws is not None:
            rows = rows.detach().requires_grad_(True)
            ws.leaf = rows
            self._pending.append((index, rows))
        return rows, ws

    def _check_inputs(
        self, emb: torch.Tensor, labels: torch.Tensor, validate: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
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
        if self.fixed_batch is not None and emb.shape[0] != self.fixed_batch:
            raise ValueError(
                f"heads/partial_fc.py: this rank's batch has {emb.shape[0]} rows but "
                f"fix_batch_size agreed on {self.fixed_batch} for every rank"
            )
        if (
            validate
            and labels.numel()
            and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes)
        ):
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
        for ws in self._workspaces[: len(self._pending)]:
            ws.materialize()
        grads = [leaf.grad for _, leaf in self._pending]
        assert all(g is not None for g in grads)  # checked above
        if len(self._pending) == 1:
            return self._pending[0][0], self._pending[0][1].grad  # type: ignore[return-value]
        rows = torch.unique(torch.cat([index for index, _ in self._pending]))
        grad = torch.zeros(rows.numel(), self.embedding_size, device=device)
        for (index, _), g in zip(self._pending, grads):
            grad.index_add_(0, torch.searchsorted(rows, index), g)  # type: ignore[arg-type]
        return rows, grad

    def sparse_grad_parts(
        self,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The gradient of a single recorded forward as ``(rows, a, coef, w)`` with
        ``grad = a - coef[:, None] * w`` not yet formed, so an optimizer can fold the
        correction into its own pass (``w`` the forward's gathered rows, still current);
        ``None`` when not available (several forwards, already materialized, no backward).
        ``a`` and ``coef`` are the head's buffers: the caller may edit them in place."""
        if len(self._pending) != 1 or not self._workspaces:
            return None
        ws = self._workspaces[0]
        index, leaf = self._pending[0]
        if ws.coef is None or leaf.grad is None or ws.leaf is not leaf:
            return None
        coef, ws.coef = ws.coef, None  # handed over: the caller applies it
        return index, leaf.grad, coef, leaf.detach()

    def recorded_rows(self, rows: torch.Tensor) -> torch.Tensor | None:
        """The current weights of ``rows`` (from ``sparse_grad``) without a second gather.

        Returns the single recorded forward's gathered copy (the centers have not changed
        since: only ``HeadOptimizer.step`` writes them, after this), or ``None`` when it
        cannot (several forwards, or the full shard); callers then gather ``weight[rows]``.
        """
        if len(self._pending) != 1 or self._pending[0][0] is not rows:
            return None
        leaf = self._pending[0][1]
        if leaf.data_ptr() == self.weight.data_ptr():
            return None
        return leaf.detach()

    def grad_probe(self) -> torch.Tensor | None:
        """0-dim fp32 tensor that is finite iff the recorded gradient is (up to overflow of
        a finite sum), computed in the backward from K values; ``None`` when unknown."""
        probes = [ws.probe for ws in self._workspaces[: len(self._pending)]]
        if not probes or any(p is None for p in probes):
            return None
        known = [p for p in probes if p is not None]
        return torch.stack(known).sum() if len(known) > 1 else known[0]

    @property
    def num_recorded(self) -> int:
        """Training forwards recorded for the optimizer since the last ``zero_grad``."""
        return len(self._pending)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the recorded forwards and their gradients (``set_to_none`` is accepted for
        ``nn.Module`` compatibility; sparse gradients are always dropped)."""
        self._pending = []
        for ws in self._workspaces:
            ws.probe = ws.leaf = ws.coef = None
