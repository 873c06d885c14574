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

from heads.centers import init_centers
from heads.comm import (
    Topology,
    all_gather_sizes,
    gather_batch,
    resolve_group,
    shard_range,
)
from heads.cosine_kernel import LOGITS_DTYPES, CosineWorkspace, cosine_logits, normalize_rows
from heads.dist_softmax import margin_softmax_cross_entropy
from heads.margins import CombinedMarginLoss, Margin
from heads.sampling import sample_classes
from heads.subcenter import check_num_subcenters, expand_classes, subcenter_max

__all__ = ["PartialFC"]


def _device_generator(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device)


class PartialFC(nn.Module):
    """Sharded class centers with Partial FC sampling and a distributed margin softmax CE.

    Args:
        embedding_size: D.
        num_classes: C, total over all ranks.
        sample_rate: in ``(0, 1]``; 1 is exact model-parallel full softmax.
        margin_loss: a ``heads.margins.Margin`` (``CombinedMarginLoss`` when ``None``; others
            from ``heads.margins.build_margin``). Norm-aware margins get the norms of the gathered
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
        generator_factory: ``device -> torch.Generator`` building the sampling generator
            (``torch.Generator(device=device)``); replace it where no driver is present (the
            fake-CUDA dry run gives a CPU generator).

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
                f"embedding_size and num_classes must be >= 1, got {embedding_size}, {num_classes}"
            )
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if margin_loss is None:
            margin_loss = CombinedMarginLoss()
        if not isinstance(margin_loss, Margin):
            raise ValueError(
                f"margin_loss must be a heads.margins.Margin, got {type(margin_loss).__name__}"
            )
        if logits_dtype not in LOGITS_DTYPES:
            raise ValueError(f"logits_dtype must be one of {LOGITS_DTYPES}, got {logits_dtype!r}")
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
        self._generator_device: torch.device | None = None
        # Builds the sampling generator for a device; replaceable where no driver is present
        # (a fake-CUDA dry run hands out a CPU generator: tests/unit/trainer/test_fake_cuda.py).
        self.generator_factory: Callable[[torch.device], torch.Generator] = _device_generator
        self.sampled_index: torch.Tensor | None = None
        # Called with the sampled rows before they are read (HeadOptimizer's dense decay).
        self.before_gather: Callable[[torch.Tensor], None] | None = None
        # (index (K,), leaf (K, D)) of every training forward since the last zero_grad().
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._workspaces: list[CosineWorkspace] = []

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
        if self._generator is None or self._generator_device != device:
            self._generator = self.generator_factory(device)
            self._generator.manual_seed(self.seed * 1_000_003 + self.topo.rank)
            self._generator_device = device
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
                f"per-rank batch sizes differ: {sizes}; the training "
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
        # One collective; emb travels in its own dtype and comes back fp32 (heads/comm.py).
        emb, labels, sizes = gather_batch(emb, labels, self.topo, sizes)
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
    ) -> tuple[torch.Tensor, CosineWorkspace | None]:
        """The centers of ``index`` ``(K, D)`` and, when ``track``, the workspace of this forward
        (the rows become the leaf whose gradient ``HeadOptimizer`` reads)."""
        ws = None
        if track:  # one workspace per outstanding forward (gradient accumulation)
            while len(self._workspaces) <= len(self._pending):
                self._workspaces.append(CosineWorkspace(self.fused))
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
                f"local_embeddings must be (B, {self.embedding_size}), got {tuple(emb.shape)}"
            )
        if not emb.is_floating_point():
            raise ValueError(f"local_embeddings dtype {emb.dtype} not float")
        if labels.shape != (emb.shape[0],) or labels.dtype != torch.int64:
            raise ValueError(
                f"local_labels must be int64 ({emb.shape[0]},), got "
                f"{labels.dtype} {tuple(labels.shape)}"
            )
        if emb.device != self.weight.device or labels.device != self.weight.device:
            raise ValueError(
                f"inputs on {emb.device}/{labels.device} but centers on "
                f"{self.weight.device}; move the head with .to(device)"
            )
        if self.fixed_batch is not None and emb.shape[0] != self.fixed_batch:
            raise ValueError(
                f"this rank's batch has {emb.shape[0]} rows but "
                f"fix_batch_size agreed on {self.fixed_batch} for every rank"
            )
        if (
            validate
            and labels.numel()
            and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes)
        ):
            raise ValueError(
                f"local_labels must be in [0, {self.num_classes}), got "
                f"[{int(labels.min())}, {int(labels.max())}]"
            )
        return emb, labels

    # -- sparse gradients ----------------------------------------------------------------------
    def sparse_grad(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient of the recorded forwards, summed per row.

        With one forward (or every forward keeping the whole shard) ``rows`` are unique. With
        several (gradient accumulation) the union of their rows has a data-dependent size, and
        compacting it (``torch.unique``) would wait for the device; instead every forward's row
        keeps its slot, sorted, and each slot of a row carries that row's total gradient, so an
        update computed per slot writes the same value to every copy of a row (``index_copy_``
        with repeated, identical entries is deterministic). Nothing here reads the device.

        Returns:
            ``(rows, grad)``: ``rows`` ``(U,)`` int64 sorted shard-local rows sampled by any
            forward since ``zero_grad`` (``U`` = the summed sample sizes with several forwards:
            rows may repeat, never ``U == n_r`` unless they are the whole shard, each once);
            ``grad`` ``(U, D)`` fp32, rows never reached by a backward of a given forward
            contribute 0 from it.

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
                    f"training forward #{i} since zero_grad() has no "
                    "gradient; call backward on its loss, or run it in eval()/no_grad()"
                )
        for ws in self._workspaces[: len(self._pending)]:
            ws.materialize()
        grads = [leaf.grad for _, leaf in self._pending]
        assert all(g is not None for g in grads)  # checked above
        if len(self._pending) == 1:
            return self._pending[0][0], self._pending[0][1].grad  # type: ignore[return-value]
        n = self.weight.shape[0]
        if all(index.numel() == n for index, _ in self._pending):  # the whole shard each time
            whole = grads[0].clone()  # type: ignore[union-attr]
            for g in grads[1:]:
                whole.add_(g)  # type: ignore[arg-type]
            return self._pending[0][0], whole
        slots = [index for index, _ in self._pending]
        if sum(s.numel() for s in slots) == n:  # one more slot: U == n_r means "whole shard"
            slots.append(slots[0][:1])
            grads.append(torch.zeros_like(grads[0][:1]))  # type: ignore[index]
        rows, order = torch.sort(torch.cat(slots))
        first = torch.ones_like(rows, dtype=torch.bool)
        torch.ne(rows[1:], rows[:-1], out=first[1:])
        segment = torch.cumsum(first, 0) - 1  # (U,) which distinct row each slot holds
        flat = torch.cat(grads).index_select(0, order)  # type: ignore[arg-type]
        total = torch.zeros_like(flat).index_add_(0, segment, flat)
        return rows, total.index_select(0, segment)

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
        if rows.numel() == self.weight.shape[0]:  # the full shard: the leaf is the weight itself
            return None
        return self._pending[0][1].detach()

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
