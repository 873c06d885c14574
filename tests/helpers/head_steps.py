"""Optimizer steps of a PartialFC head on random embeddings, shared by the head tests."""

from __future__ import annotations

import torch


def step_heads(pairs, emb, labels, lr=None):
    """One step of every ``(head, head optimizer)`` pair on the same embeddings and labels.

    Args:
        pairs: iterable of ``(PartialFC, head optimizer)``.
        emb: ``(N, D)`` float32 embeddings; labels: ``(N,)`` int64 global class ids.
        lr: learning rate set on each optimizer first; ``None`` keeps theirs.
    """
    for head, opt in pairs:
        if lr is not None:
            opt.set_lr(lr)
        head(emb, labels)[0].backward()
        opt.unscale_()
        opt.step()
        opt.zero_grad()


def train_steps(head, opt, steps, seed, num_classes, batch=8):
    """``steps`` steps on ``(batch, D)`` Gaussian embeddings with labels uniform in
    ``[0, num_classes)``, both drawn from a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(batch, head.weight.shape[1], generator=g)
        y = torch.randint(0, num_classes, (batch,), generator=g)
        step_heads([(head, opt)], x, y)
