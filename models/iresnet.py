"""IResNet backbones (r18 ... r200) for 112x112 face crops.

Reference: Duta et al., "Improved Residual Networks for Image and Video Recognition" (ICPR 2020)
as adapted by Deng et al., "ArcFace" (CVPR 2019) and insightface's
`recognition/arcface_torch/backbones/iresnet.py`. Module names (conv1, bn1, prelu, layer1.0.bn1,
..., bn2, fc, features) are the insightface ones, so an arcface_torch `backbone.pth` loads here
with `strict=True`. Unlike insightface there is no fp16/autocast flag: precision is the
trainer's business.
"""

from __future__ import annotations

import torch
from torch import nn

from models.backbone import Backbone
from models.checkpointing import checkpoint_module

__all__ = ["IBasicBlock", "IResNet", "r18", "r34", "r50", "r100", "r200"]

# Spatial size of the last stage for a 112x112 input (four stride-2 stages: 112 -> 7).
_FINAL_HW = 7


class IBasicBlock(nn.Module):
    """Pre-activation residual block: BN-conv3x3-BN-PReLU-conv3x3(stride)-BN (+ shortcut).

    Args:
        in_ch: input channels.
        out_ch: output channels.
        stride: stride of the second conv (1 or 2).
        downsample: conv1x1(stride)-BN shortcut when shape changes, else None (identity).

    Shapes: (B, in_ch, H, W) -> (B, out_ch, H/stride, W/stride), dtype preserved.
    """

    def __init__(
        self, in_ch: int, out_ch: int, stride: int = 1, downsample: nn.Module | None = None
    ):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch, eps=1e-5)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch, eps=1e-5)
        self.prelu = nn.PReLU(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch, eps=1e-5)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


def _make_stage(in_ch: int, out_ch: int, num_blocks: int) -> nn.Sequential:
    """One stage: a stride-2 block with conv1x1-BN shortcut, then `num_blocks - 1` plain ones."""
    downsample = nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 1, stride=2, bias=False),
        nn.BatchNorm2d(out_ch, eps=1e-5),
    )
    blocks = [IBasicBlock(in_ch, out_ch, stride=2, downsample=downsample)]
    blocks += [IBasicBlock(out_ch, out_ch) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


class IResNet(Backbone):
    """IResNet face backbone: images (B, 3, 112, 112) -> embeddings (B, embedding_size).

    Args:
        layers: blocks per stage, four positive ints (r50: [3, 4, 14, 3]).
        embedding_size: D, the embedding width.
        base_width: channels of the stem and stage 1; stages use base_width * [1, 2, 4, 8]
            (64 reproduces insightface; smaller values give tiny test models).
        dropout: dropout probability before the final Linear (insightface default 0).

    Raises:
        ValueError: `layers` is not four positive ints, or a width/probability is out of range.

    The output dtype equals the input dtype; the input must be 112x112 (the head is a Linear over
    the 7x7 final map). `features.weight` (the last BatchNorm1d's scale) is frozen at 1, as in
    insightface, so it has `requires_grad=False`.
    """

    # arcface_torch: `self.fc(x.float() if self.fp16 else x)`, then `features`, outside autocast
    fp32_tail = ("fc", "features")
    # the four stages, set by name in __init__
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(
        self,
        layers: list[int] | tuple[int, ...],
        embedding_size: int = 512,
        base_width: int = 64,
        dropout: float = 0.0,
    ):
        super().__init__()
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive ints, got {layers}")
        if embedding_size < 1 or base_width < 1:
            raise ValueError(
                f"embedding_size ({embedding_size}) and base_width ({base_width}) must be positive"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        widths = [base_width * k for k in (1, 2, 4, 8)]
        self.embedding_size = embedding_size
        self.grad_checkpointing = False

        self.conv1 = nn.Conv2d(3, base_width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width, eps=1e-5)
        self.prelu = nn.PReLU(base_width)
        in_ch = base_width
        for i, (out_ch, n) in enumerate(zip(widths, layers), start=1):
            setattr(self, f"layer{i}", _make_stage(in_ch, out_ch, int(n)))
            in_ch = out_ch
        self.bn2 = nn.BatchNorm2d(in_ch, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_ch * _FINAL_HW * _FINAL_HW, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        self._init_weights()

    def _init_weights(self) -> None:
        # insightface: conv N(0, 0.1), BN (1, 0); Linear keeps PyTorch's default init.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each residual block's activations in the backward pass (saves memory)."""
        self.grad_checkpointing = bool(enable)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 112, 112) -> final feature map (B, 8 * base_width, 7, 7)."""
        x = self.prelu(self.bn1(self.conv1(x)))
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = checkpoint_module(block, x) if use_ckpt else block(x)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, 7, 7) feature map -> (B, embedding_size) embedding."""
        x = torch.flatten(self.bn2(x), 1)
        out: torch.Tensor = self.features(self.fc(self.dropout(x)))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """images (B, 3, 112, 112) float -> embeddings (B, embedding_size), same dtype."""
        return self.forward_head(self.forward_features(x))


def r18(embedding_size: int = 512, base_width: int = 64, dropout: float = 0.0) -> IResNet:
    """IResNet-18, stages [2, 2, 2, 2] (see `IResNet` for the arguments)."""
    return IResNet([2, 2, 2, 2], embedding_size, base_width, dropout)


def r34(embedding_size: int = 512, base_width: int = 64, dropout: float = 0.0) -> IResNet:
    """IResNet-34, stages [3, 4, 6, 3] (see `IResNet` for the arguments)."""
    return IResNet([3, 4, 6, 3], embedding_size, base_width, dropout)


def r50(embedding_size: int = 512, base_width: int = 64, dropout: float = 0.0) -> IResNet:
    """IResNet-50, stages [3, 4, 14, 3] (see `IResNet` for the arguments)."""
    return IResNet([3, 4, 14, 3], embedding_size, base_width, dropout)


def r100(embedding_size: int = 512, base_width: int = 64, dropout: float = 0.0) -> IResNet:
    """IResNet-100, stages [3, 13, 30, 3] (see `IResNet` for the arguments)."""
    return IResNet([3, 13, 30, 3], embedding_size, base_width, dropout)


def r200(embedding_size: int = 512, base_width: int = 64, dropout: float = 0.0) -> IResNet:
    """IResNet-200, stages [6, 26, 60, 6] (see `IResNet` for the arguments)."""
    return IResNet([6, 26, 60, 6], embedding_size, base_width, dropout)
