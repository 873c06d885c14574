"""Small inputs for the evaluation tests: tiny networks (a plain conv net, a registry IResNet
with BatchNorm statistics), their ONNX export, and verification `.bin` files of random images."""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image

from data.verification_bin import write_bin

TINY_IRESNET = {"network": "r18", "embedding_size": 16, "model_kwargs": {"base_width": 8}}


def tiny_net(seed=0):
    """(n, 3, 112, 112) -> (n, 16): one strided conv, ReLU, pooling, a linear layer."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 4, stride=4),  # 28x28: ONNX-exportable pooling
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 16),
    ).eval()


def tiny_iresnet(seed=0):
    """A registry IResNet (BatchNorm everywhere) with seeded, non-trivial BN running statistics."""
    import models

    torch.manual_seed(seed)
    net = models.create(
        TINY_IRESNET["network"],
        embedding_size=TINY_IRESNET["embedding_size"],
        **TINY_IRESNET["model_kwargs"],
    )
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def export_onnx(net, path, batch=None):
    """Export with input name ``data``; dynamic batch unless ``batch`` is given."""
    x = torch.randn(batch or 2, 3, 112, 112)
    dyn = None if batch else {"data": {0: "n"}, "fc1": {0: "n"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated but 30x faster
        torch.onnx.export(
            net,
            (x,),
            path,
            input_names=["data"],
            output_names=["fc1"],
            dynamic_axes=dyn,
            dynamo=False,
        )


def write_tiny_bin(path, num_pairs, seed=0, size=112):
    """insightface .bin (pickle of 2P JPEG bytes + P bools) of blocky random images."""
    rng = np.random.default_rng(seed)
    jpegs = []
    for _ in range(2 * num_pairs):
        arr = rng.integers(0, 256, size=(size // 8, size // 8, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).resize((size, size)).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
    write_bin(path, jpegs, [bool(i % 2) for i in range(num_pairs)])
