"""trainer/sync_bn.py on 1-3 gloo ranks against one BatchNorm over the concatenated batch."""

import pytest
import torch
from torch import nn

from tests.helpers.distributed import run_distributed
from trainer.sync_bn import SyncBatchNorm, convert_sync_batchnorm

SPLITS = {1: [12], 2: [5, 7], 3: [4, 4, 4]}  # unequal per-rank batches on purpose


def _data(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (12, 6, 5, 3) if kind == "2d" else (12, 6)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1.5
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    return x.float(), dy.float()


def _bn(kind, momentum=0.1):
    bn = (nn.BatchNorm2d if kind == "2d" else nn.BatchNorm1d)(6, momentum=momentum)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, 6))
        bn.bias.copy_(torch.linspace(-1, 1, 6))
    return bn


def _run(bn, x, dy, steps=2):
    """Two train-mode steps (running stats move twice); returns y, dx, dw, db of the last."""
    for _ in range(steps):
        xs = x.detach().clone().requires_grad_(True)
        bn.zero_grad()
        y = bn(xs)
        (y * dy).sum().backward()
    return y.detach(), xs.grad, bn.weight.grad, bn.bias.grad


def _worker(rank, world, kind, momentum):
    x, dy = _data(kind)
    lo = sum(SPLITS[world][:rank])
    hi = lo + SPLITS[world][rank]
    model = convert_sync_batchnorm(nn.Sequential(_bn(kind, momentum)))
    bn = model[0]
    assert type(bn) is SyncBatchNorm
    y, dx, dw, db = _run(bn, x[lo:hi], dy[lo:hi])
    return {
        "y": y,
        "dx": dx,
        "dw": dw,
        "db": db,
        "mean": bn.running_mean,
        "var": bn.running_var,
        "n": int(bn.num_batches_tracked),
    }


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("kind,momentum", [("2d", 0.1), ("1d", 0.1), ("1d", None)])
def test_sync_bn_equals_batchnorm_over_the_global_batch(world, kind, momentum):
    x, dy = _data(kind)
    ref_bn = _bn(kind, momentum)
    y, dx, dw, db = _run(ref_bn, x, dy)
    out = run_distributed(_worker, world, args=(kind, momentum))
    # per-rank outputs and input grads are the slices of the full-batch ones
    torch.testing.assert_close(torch.cat([o["y"] for o in out]), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([o["dx"] for o in out]), dx, rtol=1e-5, atol=1e-5)
    # parameter grads are per-rank contributions: their sum is the full-batch gradient
    torch.testing.assert_close(sum(o["dw"] for o in out), dw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sum(o["db"] for o in out), db, rtol=1e-5, atol=1e-5)
    for o in out:  # every rank holds the global running statistics
        torch.testing.assert_close(o["mean"], ref_bn.running_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(o["var"], ref_bn.running_var, rtol=1e-6, atol=1e-6)
        assert o["n"] == int(ref_bn.num_batches_tracked) == 2


def test_convert_keeps_weights_keys_and_frozen_params():
    import models

    model = models.create("r18", embedding_size=32, base_width=8)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    converted = convert_sync_batchnorm(model)
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in converted.modules())
    assert n_bn > 0 and n_bn == sum(isinstance(m, SyncBatchNorm) for m in converted.modules())
    after = converted.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {n for n, p in converted.named_parameters() if not p.requires_grad} == frozen
    # no process group: behaves as plain BatchNorm, outputs unchanged
    x = torch.randn(4, 3, 112, 112)
    converted.eval()
    plain = models.create("r18", embedding_size=32, base_width=8)
    plain.load_state_dict(before)
    plain.eval()
    torch.testing.assert_close(converted(x), plain(x))
