"""TF32 for the backbone of fp32 runs on CUDA.

On Ampere and later GPUs an fp32 GEMM or convolution with TF32 keeps fp32 range and storage but
rounds the operands' mantissa to 10 bits inside the tensor cores, ~8x the fp32 throughput (NVIDIA
A100 whitepaper); PyTorch leaves matmuls in IEEE fp32 by default. arcscale's fp32 runs on CUDA
ask for TF32 in both matmuls (ViT) and cuDNN convolutions (IResNet, MobileFaceNet), through
torch's current switches (``fp32_precision``; mixing them with the legacy ``allow_tf32`` flags
makes torch 2.14 raise). fp16/bf16 engines are left alone: their GEMMs are not fp32. The head's
logits GEMM has its own setting (``head.logits_dtype``, ``heads/cosine_kernel.py``).
"""

from __future__ import annotations

import torch

__all__ = ["enable_backbone_tf32"]


def enable_backbone_tf32(device: torch.device, precision: str) -> bool:
    """Switch CUDA fp32 matmuls and cuDNN convolutions to TF32 for an fp32 engine on CUDA.

    Args:
        device: the run's device; nothing happens off CUDA.
        precision: the engine precision (``fp32``, ``fp16``, ``bf16``); only ``fp32`` is changed.
    Returns:
        True when the switches were set (the caller logs it).
    """
    if device.type != "cuda" or precision != "fp32":
        return False
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"  # type: ignore[attr-defined]
    return True
