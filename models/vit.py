"""Vision Transformer face backbones (`vit_t` ... `vit_h`) built from timm's layers.

Reference: Dosovitskiy et al., "An Image is Worth 16x16 Words" (ICLR 2021), in the face variant of
insightface's `recognition/arcface_torch/backbones/vit.py`: 112x112 input, 9x9 patches (a 12x12
grid of 144 tokens; the last 4 pixel rows/columns are not covered, as in arcface_torch), no class
token, learned position embedding, ReLU6 MLPs, a flatten-Linear-BN feature head, and optional
random token masking in training (the dropped tokens skip the transformer blocks and reach the
head as a learned mask token). Attention, MLP, LayerNorm and drop-path are timm's
(`timm.models.vision_transformer.Block`, `timm.layers.PatchEmbed`); parameter names match
arcface_torch's vit.py.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass
from typing import Any

import torch
from timm.layers.patch_embed import PatchEmbed
from timm.layers.weight_init import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn

from models.backbone import Backbone
from models.checkpointing import checkpoint_module

__all__ = ["VARIANTS", "FaceViT", "ViTBuilder", "vit_t", "vit_s", "vit_b", "vit_l", "vit_h"]

_IMG_SIZE = 112
_PATCH = 9


class FaceViT(Backbone):
    """ViT backbone: images (B, 3, 112, 112) -> embeddings (B, embedding_size), dtype preserved.

    Args:
        embedding_size: D.
        embed_dim: token width; must be divisible by `num_heads`.
        depth: number of transformer blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / embed_dim.
        drop_path_rate: stochastic-depth rate, linearly increasing from 0 over the blocks.
        mask_ratio: fraction of the 144 tokens dropped at random per sample in training
            (`int(144 * (1 - mask_ratio))` kept); 0 disables masking and freezes `mask_token`.

    Raises:
        ValueError: a size is not positive, `embed_dim % num_heads != 0`, or a rate is outside
            [0, 1).
    """

    # arcface_torch: `self.norm(x.float())` and `feature` outside the blocks' autocast
    fp32_tail = ("norm", "feature")

    def __init__(
        self,
        embedding_size: int = 512,
        embed_dim: int = 256,
        depth: int = 12,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        mask_ratio: float = 0.0,
    ):
        super().__init__()
        if min(embedding_size, embed_dim, depth, num_heads) < 1 or embed_dim % num_heads:
            raise ValueError(
                f"sizes must be positive and embed_dim a multiple of num_heads, got "
                f"embedding_size={embedding_size} embed_dim={embed_dim} depth={depth} "
                f"num_heads={num_heads}"
            )
        for key, rate in (("drop_path_rate", drop_path_rate), ("mask_ratio", mask_ratio)):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {rate}")
        self.embedding_size = embedding_size
        self.embed_dim = embed_dim
        self.mask_ratio = float(mask_ratio)
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(
            img_size=_IMG_SIZE, patch_size=_PATCH, in_chans=3, embed_dim=embed_dim
        )
        self.num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
        # linear stochastic-depth schedule 0 -> drop_path_rate (plain Python: works on `meta`)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=False,
                drop_path=rate,
                act_layer=nn.ReLU6,
                norm_layer=nn.LayerNorm,  # eps 1e-5, as arcface_torch
            )
            for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.feature = nn.Sequential(
            nn.Linear(embed_dim * self.num_patches, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim, eps=2e-5),
            nn.Linear(embed_dim, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=2e-5),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Unused without masking: frozen so that optimizers/ZeRO never wait for its gradient.
        self.mask_token.requires_grad = self.mask_ratio > 0
        self._init_weights()

    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names conventionally excluded from weight decay."""
        return {"pos_embed", "mask_token"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each transformer block's activations in the backward pass."""
        self.grad_checkpointing = bool(enable)

    def _drop_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep a random subset of tokens per sample: (B, L, C) -> ((B, K, C), kept ids (B, K))."""
        b, length, c = x.shape
        keep = int(length * (1.0 - self.mask_ratio))
        noise = torch.rand(b, length, device=x.device)
        ids_keep = torch.argsort(noise, dim=1)[:, :keep]
        return torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, c)), ids_keep

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 112, 112) -> normalised tokens flattened to (B, 144 * embed_dim)."""
        x = self.patch_embed(x) + self.pos_embed
        masking = self.training and self.mask_ratio > 0
        if masking:
            x, ids_keep = self._drop_tokens(x)
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint_module(block, x) if use_ckpt else block(x)
        x = self.norm(x)
        if masking:
            b, _, c = x.shape
            full = self.mask_token.to(x.dtype).expand(b, self.num_patches, c)
            x = full.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, c), x)
        return x.reshape(x.shape[0], self.num_patches * self.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """images (B, 3, 112, 112) float -> embeddings (B, embedding_size), same dtype."""
        out: torch.Tensor = self.feature(self.forward_features(x))
        return out


@dataclass(frozen=True)
class ViTVariant:
    """A registered ViT: its default sizes and the line that documents it."""

    embed_dim: int
    depth: int
    num_heads: int
    description: str
    drop_path_rate: float = 0.1  # arcface_torch's defaults
    mask_ratio: float = 0.1


VARIANTS: dict[str, ViTVariant] = {
    "vit_t": ViTVariant(256, 12, 8, "ViT-Tiny face backbone, 256/12/8"),
    "vit_s": ViTVariant(512, 12, 8, "ViT-Small face backbone, 512/12/8"),
    "vit_b": ViTVariant(512, 24, 8, "ViT-Base face backbone, 512/24/8 (arcface_torch's vit_b)"),
    "vit_l": ViTVariant(768, 24, 8, "ViT-Large face backbone, 768/24/8"),
    "vit_h": ViTVariant(1024, 48, 8, "ViT-Huge face backbone, 1024/48/8"),
}


class ViTBuilder:
    """The builder of ``VARIANTS[name]``: call it like a function of ``embedding_size`` (512),
    ``embed_dim``, ``depth``, ``num_heads``, ``drop_path_rate`` and ``mask_ratio``, whose defaults
    are the variant's; ``inspect.signature`` shows them (``models.model_kwargs``)."""

    def __init__(self, name: str) -> None:
        variant = VARIANTS[name]
        self.__name__ = name
        self.__doc__ = f"{variant.description} (see `FaceViT` for the arguments)."
        defaults = {
            "embedding_size": 512,
            **{k: v for k, v in asdict(variant).items() if k != "description"},
        }
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        self.__signature__ = inspect.Signature(
            [inspect.Parameter(k, kind, default=v, annotation=type(v).__name__)
             for k, v in defaults.items()],
            return_annotation="FaceViT",
        )  # fmt: skip

    def __call__(self, *args: Any, **kwargs: Any) -> FaceViT:
        bound = self.__signature__.bind(*args, **kwargs)  # TypeError for an unknown argument
        bound.apply_defaults()
        return FaceViT(**bound.arguments)

    def __repr__(self) -> str:
        return f"<ViT builder {self.__name__}{self.__signature__}>"


vit_t = ViTBuilder("vit_t")
vit_s = ViTBuilder("vit_s")
vit_b = ViTBuilder("vit_b")
vit_l = ViTBuilder("vit_l")
vit_h = ViTBuilder("vit_h")
