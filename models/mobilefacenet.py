"""MobileFaceNet backbones (`mbf`, `mbf_large`) for 112x112 face crops.

Reference: Chen et al., "MobileFaceNets: Efficient CNNs for Accurate Real-Time Face Verification
on Mobile Devices" (CCBR 2018), in the variant of insightface's
`recognition/arcface_torch/backbones/mobilefacenet.py` (itself from cavaface). Module nesting
(`layers.<i>.layers...`, `conv_sep`, `features.layers...`) follows that file so arcface_torch
weights load with `strict=True`. No fp16 flag and no output normalisation: the trainer and the
head own precision and normalisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.backbone import Backbone
from models.checkpointing import checkpoint_module

__all__ = ["MobileFaceNet", "mbf", "mbf_large"]


class ConvBlock(nn.Module):
    """Conv2d (no bias) - BatchNorm2d - PReLU; (B, in_c, H, W) -> (B, out_c, H', W').
    ``activation=False`` drops the PReLU (the linear bottleneck output)."""

    def __init__(
        self,
        in_c: int,
        out_c: int,
        kernel: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        activation: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
        ]
        if activation:
            layers.append(nn.PReLU(out_c))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(x)
        return out


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand to `hidden` - 3x3 depthwise(stride) - 1x1 linear project.

    With `residual=True` (stride 1, in_c == out_c) the input is added to the output.
    """

    def __init__(self, in_c: int, out_c: int, hidden: int, stride: int, residual: bool = False):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_c, hidden),
            ConvBlock(hidden, hidden, kernel=3, stride=stride, padding=1, groups=hidden),
            ConvBlock(hidden, out_c, activation=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(x)
        return out + x if self.residual else out


class Residual(nn.Module):
    """`num_block` stride-1 residual `DepthWise` blocks at constant width `c`."""

    def __init__(self, c: int, num_block: int, hidden: int):
        super().__init__()
        self.layers = nn.Sequential(
            *[DepthWise(c, c, hidden, stride=1, residual=True) for _ in range(num_block)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(x)
        return out


class GDC(nn.Module):
    """Global depthwise conv 7x7 -> flatten -> Linear(512, D, no bias) -> BatchNorm1d(D)."""

    def __init__(self, embedding_size: int):
        super().__init__()
        self.layers = nn.Sequential(
            ConvBlock(512, 512, kernel=7, groups=512, activation=False),
            nn.Flatten(),
            nn.Linear(512, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(x)
        return out


class MobileFaceNet(Backbone):
    """MobileFaceNet: images (B, 3, 112, 112) -> embeddings (B, embedding_size), dtype preserved.

    Args:
        embedding_size: D.
        blocks: residual blocks in the four groups, e.g. (1, 4, 6, 2) for `mbf`.
        scale: width multiplier; stage widths are 64*scale and 128*scale.

    Raises:
        ValueError: `blocks` not four positive ints, or non-positive `scale`/`embedding_size`.
    """

    # arcface_torch: `self.conv_sep(x.float() if self.fp16 else x)`, then `features`
    fp32_tail = ("conv_sep", "features")

    def __init__(
        self, embedding_size: int = 512, blocks: Sequence[int] = (1, 4, 6, 2), scale: int = 2
    ) -> None:
        super().__init__()
        if len(blocks) != 4 or any(int(b) < 1 for b in blocks):
            raise ValueError(f"blocks must be 4 positive ints, got {blocks}")
        if int(scale) != scale or scale < 1 or embedding_size < 1:
            raise ValueError(
                f"scale ({scale}) and embedding_size ({embedding_size}) must be positive integers"
            )
        c1, c2 = 64 * int(scale), 128 * int(scale)
        self.embedding_size = embedding_size
        self.grad_checkpointing = False
        stage0: nn.Module
        if blocks[0] == 1:
            # a single grouped 3x3 conv (64 groups) instead of a residual group, as in arcface_torch
            stage0 = ConvBlock(c1, c1, kernel=3, stride=1, padding=1, groups=64)
        else:
            stage0 = Residual(c1, blocks[0], hidden=128)
        self.layers = nn.ModuleList(
            [
                ConvBlock(3, c1, kernel=3, stride=2, padding=1),
                stage0,
                DepthWise(c1, c1, hidden=128, stride=2),
                Residual(c1, blocks[1], hidden=128),
                DepthWise(c1, c2, hidden=256, stride=2),
                Residual(c2, blocks[2], hidden=256),
                DepthWise(c2, c2, hidden=512, stride=2),
                Residual(c2, blocks[3], hidden=256),
            ]
        )
        self.conv_sep = ConvBlock(c2, 512)
        self.features = GDC(embedding_size)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each top-level stage's activations in the backward pass."""
        self.grad_checkpointing = bool(enable)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 112, 112) -> (B, 512, 7, 7)."""
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for stage in self.layers:
            x = checkpoint_module(stage, x) if use_ckpt else stage(x)
        out: torch.Tensor = self.conv_sep(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """images (B, 3, 112, 112) float -> embeddings (B, embedding_size), same dtype."""
        out: torch.Tensor = self.features(self.forward_features(x))
        return out


def mbf(embedding_size: int = 512, scale: int = 2) -> MobileFaceNet:
    """MobileFaceNet as arcface_torch `mbf`: blocks (1, 4, 6, 2), scale 2."""
    return MobileFaceNet(embedding_size, blocks=(1, 4, 6, 2), scale=scale)


def mbf_large(embedding_size: int = 512, scale: int = 4) -> MobileFaceNet:
    """MobileFaceNet as arcface_torch `mbf_large`: blocks (2, 8, 12, 4), scale 4."""
    return MobileFaceNet(embedding_size, blocks=(2, 8, 12, 4), scale=scale)
