"""TF32 switches: the head's logits GEMM and the backbone of fp32 CUDA runs use torch's current
API, so a user who set TF32 the new way (as on an H100) does not crash the first head forward."""

import pytest
import torch

from heads.cosine_kernel import cosine_logits
from trainer.tf32 import enable_backbone_tf32


@pytest.fixture
def restore_precision():
    saved = (
        torch.backends.fp32_precision,
        torch.backends.cuda.matmul.fp32_precision,
        torch.backends.cudnn.conv.fp32_precision,
    )
    yield
    torch.backends.fp32_precision = saved[0]
    torch.backends.cuda.matmul.fp32_precision = saved[1]
    torch.backends.cudnn.conv.fp32_precision = saved[2]


@pytest.mark.parametrize("user_setting", ["matmul", "global"])
def test_head_tf32_block_works_after_new_api_and_restores_it(user_setting, restore_precision):
    """Reading the legacy `allow_tf32` raised once TF32 was set through `fp32_precision`."""
    torch.backends.fp32_precision = "none"
    torch.backends.cuda.matmul.fp32_precision = "none"
    if user_setting == "matmul":  # how H100 users turn TF32 on today
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    else:
        torch.backends.fp32_precision = "tf32"
    before = torch.backends.cuda.matmul.fp32_precision
    emb = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    rows = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    out = cosine_logits(emb, rows, "tf32")  # the CPU GEMM ignores TF32; the switch is global
    assert out.shape == (4, 5) and out.dtype == torch.float32
    torch.testing.assert_close(out, emb @ rows.T)
    assert torch.backends.cuda.matmul.fp32_precision == before


def test_backbone_tf32_only_for_fp32_engines_on_cuda(restore_precision):
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    assert not enable_backbone_tf32(torch.device("cpu"), "fp32")
    assert not enable_backbone_tf32(torch.device("cuda", 0), "bf16")
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert enable_backbone_tf32(torch.device("cuda", 0), "fp32")
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"
