"""The interface every registered backbone has: what ``models.create`` returns."""

from __future__ import annotations

from torch import nn

__all__ = ["Backbone"]


class Backbone(nn.Module):
    """A face backbone: ``forward(images (B, 3, 112, 112)) -> embeddings (B, embedding_size)``.

    Subclasses (IResNet, MobileFaceNet, FaceViT) set ``embedding_size`` and
    ``grad_checkpointing`` in ``__init__`` and choose the units ``set_grad_checkpointing``
    recomputes.

    ``fp32_tail`` names the model's last submodules, in forward order, that arcface_torch runs
    in fp32 when the rest of the network runs in half precision (IResNet's ``fc`` and
    ``features``). The model only names them; the trainer decides the precision
    (``trainer/precision.py`` ``keep_tail_fp32``).
    """

    embedding_size: int
    grad_checkpointing: bool
    fp32_tail: tuple[str, ...] = ()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass instead of keeping them (saves memory)."""
        raise NotImplementedError
