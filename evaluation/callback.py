"""Verification during training, with the forward passes spread over every rank.

Under ZeRO-3 each rank holds a slice of the backbone parameters and every forward gathers them
collectively, so all ranks must run forwards, and the same number of them. Each rank embeds one
contiguous slice of the images, padded to the common slice length, and the embeddings are
all-gathered (``evaluation.sharded.embed_sharded``, also used by ``tools/eval_ijb.py``). Protocol
and log lines follow insightface's ``CallBackVerification``
(``recognition/arcface_torch/utils/utils_callbacks.py``); metrics are in
``evaluation.verification``, model loading and embedding in ``evaluation.embedders``.

One evaluation for one set of weights: data-parallel training keeps one copy of the BatchNorm
running statistics per rank, each updated from that rank's batches (DeepSpeed broadcasts the
parameters once at start, never the buffers), and a checkpoint saves rank 0's. Each rank used to
embed its slice with its own statistics, so the in-training accuracy was not that of the saved
weights (the LFW demo: 82.67 % in training, 82.06 % from the exported model). Given the module,
the callback first copies rank 0's buffers to every rank (``broadcast_buffers``), as DDP's default
``broadcast_buffers=True`` does in arcface_torch; BN statistics are not used by training forwards.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from evaluation.embedders import embed_views
from evaluation.sharded import broadcast_buffers, embed_sharded
from evaluation.verification import NROF_FOLDS, evaluate_views, format_results

BinLoader = Callable[[str], tuple[np.ndarray, np.ndarray]]


def _default_loader(path: str) -> tuple[np.ndarray, np.ndarray]:
    from data.verification_bin import load_bin  # data/ is optional for metric-only users

    return load_bin(path)


class VerificationCallback:
    """Evaluate ``.bin`` verification sets at a training step, on every rank together.

    Args:
        bin_paths: target name -> path of an insightface ``.bin`` (pickle of JPEG bytes + issame).
            Loaded once at construction and kept in memory as uint8.
        rank, world_size: this process's position; ``world_size == 1`` needs no process group.
        process_group: group for the all-gather (None = default group when ``world_size > 1``).
        batch_size: images per forward call.
        log_fn: receives each log line (str); called on rank 0 only.
        tb_writer: optional TensorBoard ``SummaryWriter`` (rank 0 only) for ``val/<name>/accuracy``,
            ``val/<name>/tar_at_far`` and ``val/<name>/xnorm``.
        out_dir: if given, rank 0 appends one JSON line per target to ``out_dir/eval.jsonl``.
        loader: path -> ``(images uint8 (2P, H, W, 3), issame bool (P,))``; default
            ``data.verification_bin.load_bin``.
        image_size: expected ``(H, W)`` of the images.
        far_target: FAR of the reported TAR.
        nrof_folds: folds of the accuracy cross-validation (10 as insightface; see
            ``evaluation.verification.kfold_accuracy`` for sets whose pairs are sorted by class).

    Raises:
        ValueError: empty ``bin_paths``, a bad rank, or a ``.bin`` whose images are not
            ``image_size`` or whose pair count does not match its images (names the file).
        FileNotFoundError: a missing ``.bin``.

    Attributes:
        highest: target name -> best ``accuracy_mean`` seen so far (same value on every rank).
    """

    def __init__(
        self,
        bin_paths: dict[str, str],
        rank: int,
        world_size: int,
        process_group: Any = None,
        batch_size: int = 64,
        log_fn: Callable[[str], None] = print,
        tb_writer: Any = None,
        out_dir: str | None = None,
        loader: BinLoader | None = None,
        image_size: tuple[int, int] = (112, 112),
        far_target: float = 1e-3,
        nrof_folds: int = NROF_FOLDS,
    ):
        if not bin_paths:
            raise ValueError("VerificationCallback: bin_paths is empty")
        if not 0 <= rank < world_size:
            raise ValueError(f"VerificationCallback: rank {rank} not in [0, {world_size})")
        if batch_size < 1:
            raise ValueError(f"VerificationCallback: batch_size must be >= 1, got {batch_size}")
        self.rank, self.world_size, self.group = rank, world_size, process_group
        self.batch_size, self.far_target, self.nrof_folds = batch_size, far_target, nrof_folds
        self.log_fn, self.tb_writer, self.out_dir = log_fn, tb_writer, out_dir
        load = loader or _default_loader
        self.sets: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name, path in bin_paths.items():
            if not os.path.isfile(path):
                raise FileNotFoundError(f"verification target {name!r}: no file {path}")
            images, issame = load(path)
            images, issame = np.asarray(images), np.asarray(issame, dtype=bool)
            if images.ndim != 4 or tuple(images.shape[1:3]) != tuple(image_size):
                raise ValueError(f"{path}: images {images.shape}, expected (N, *{image_size}, 3)")
            if images.shape[0] != 2 * issame.shape[0]:
                raise ValueError(f"{path}: {images.shape[0]} images for {issame.shape[0]} pairs")
            self.sets[name] = (images, issame)
        self.highest = {name: 0.0 for name in self.sets}
        if out_dir and rank == 0:
            os.makedirs(out_dir, exist_ok=True)

    def embed(
        self, images: np.ndarray, model_forward: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Plain and mirrored embeddings (N, D) float32 of all ``images``, on every rank.

        Each rank embeds its slice padded to ``ceil(N / world_size)`` rows (repeating its last
        image, or image 0 when its slice is empty), so every rank makes the same number of
        ``model_forward`` calls with the same batch shapes.
        """

        def embed_rows(start: int, stop: int, per: int) -> np.ndarray:
            mine = images[start:stop] if stop > start else images[:1]
            if mine.shape[0] < per:
                mine = np.concatenate([mine, np.repeat(mine[-1:], per - mine.shape[0], axis=0)])
            plain, flipped = embed_views(model_forward, mine, self.batch_size)
            return np.concatenate([plain, flipped], axis=1)

        both = embed_sharded(images.shape[0], embed_rows, self.rank, self.world_size, self.group)
        d = both.shape[1] // 2
        return both[:, :d], both[:, d:]

    def __call__(
        self,
        step: int,
        model_forward: Callable[[torch.Tensor], torch.Tensor],
        module: torch.nn.Module | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Evaluate every target at ``step``; must be called on all ranks together.

        Args:
            step: global training step (for logs and TensorBoard).
            model_forward: float32 (B, 3, 112, 112) CPU tensor in [-1, 1] -> (B, D) embeddings.
                It owns device placement, dtype casts and train/eval mode: this callback knows
                nothing of DeepSpeed. Forwards run under ``torch.no_grad()``.
            module: the backbone behind ``model_forward``; when given, rank 0's buffers are
                copied to every rank first (``broadcast_buffers``), so the result is that of the
                weights a checkpoint saves.
        Returns:
            target name -> ``evaluation.verification.evaluate`` dict plus ``highest_accuracy``, on
            every rank (metrics are computed from the same gathered embeddings everywhere, so
            decisions such as "save best" agree across ranks).
        """
        if module is not None and self.world_size > 1:
            broadcast_buffers(module, self.group)
        out = {}
        for name, (images, issame) in self.sets.items():
            t0 = time.perf_counter()
            plain, flipped = self.embed(images, model_forward)
            res = evaluate_views(
                plain, flipped, issame, nrof_folds=self.nrof_folds, far_target=self.far_target
            )
            self.highest[name] = max(self.highest[name], res["accuracy_mean"])
            res["highest_accuracy"] = self.highest[name]
            res["time_s"] = time.perf_counter() - t0
            out[name] = res
            if self.rank == 0:
                self._report(step, name, res)
        return out

    def _report(self, step: int, name: str, res: dict[str, Any]) -> None:
        lines = format_results(name, step, res)
        # arcface_torch's line after Accuracy-Flip (utils/utils_callbacks.py), what users grep for
        lines.insert(2, f"[{name}][{step}]Accuracy-Highest: {res['highest_accuracy']:1.5f}")
        for line in lines:
            self.log_fn(line)
        if self.tb_writer is not None:
            for key, tag in (
                ("accuracy_mean", "accuracy"),
                ("tar_at_far", "tar_at_far"),
                ("xnorm", "xnorm"),
            ):
                self.tb_writer.add_scalar(f"val/{name}/{tag}", res[key], step)
        if self.out_dir:
            record = {"step": step, "target": name}
            record.update({k: v for k, v in res.items() if k != "roc"})
            with open(os.path.join(self.out_dir, "eval.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
