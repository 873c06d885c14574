"""Memory layout of the input batches the backbone trains on.

`channels_last` (NHWC) makes CPU convolutions ~1.3-1.5x faster than NCHW in forward + backward
(r18 width 16, batch 64, one thread: 1.60 -> 1.18 s on AVX-512, 1.17 -> 0.77 s forward on AVX2),
so it is the default. One exception, measured with torch 2.14.1 (oneDNN 3.12) on an AVX-512 CPU:
the weight gradient of a 1x1 convolution with stride 2 and fewer than 16 input channels in
channels_last corrupts the heap (`free(): invalid next size`, then SIGSEGV) on the first
backward; NCHW input, `ONEDNN_MAX_CPU_ISA=AVX2` or >= 16 input channels avoid it. Narrow
IResNets (`base_width` < 16) have such a downsample, so `auto` trains them in NCHW on those CPUs.
"""

from __future__ import annotations

import torch
from torch import nn

CHOICES = ("auto", "channels_last", "contiguous")
FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def onednn_unsafe_convs(model: nn.Module) -> list[str]:
    """Names of the Conv2d layers that hit the oneDNN AVX-512 channels_last weight-gradient bug
    (see the module docstring): 1x1 kernel, stride > 1, fewer than 16 input channels."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
        and m.kernel_size == (1, 1)
        and max(m.stride) > 1
        and m.in_channels < 16
    ]


def cpu_has_avx512() -> bool:
    """True when torch's CPU kernels (and oneDNN) dispatch to AVX-512 on this machine."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def input_memory_format(
    model: nn.Module, device: torch.device, requested: str = "auto"
) -> tuple[torch.memory_format, str]:
    """The memory format for the training input batches, and why it was chosen.

    Args:
        model: the backbone (before any engine wraps it).
        device: where it trains; the bug is CPU-only.
        requested: `engine.memory_format`: "auto", "channels_last" or "contiguous".

    Returns:
        (torch.channels_last or torch.contiguous_format, a one-line reason for the log).

    Raises:
        ValueError: `requested` is not one of `CHOICES`.
    """
    if requested not in CHOICES:
        raise ValueError(f"memory_format must be one of {list(CHOICES)}, got {requested!r}")
    if requested != "auto":
        return FORMATS[requested], f"{requested} (engine.memory_format)"
    if device.type == "cpu" and cpu_has_avx512():
        unsafe = onednn_unsafe_convs(model)
        if unsafe:
            return torch.contiguous_format, (
                f"contiguous (NCHW): {unsafe[0]} is a 1x1 stride-2 conv with < 16 input "
                "channels, whose channels_last weight gradient crashes oneDNN on AVX-512"
            )
    return torch.channels_last, "channels_last"
