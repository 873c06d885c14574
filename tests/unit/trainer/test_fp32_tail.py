"""The fp32 tail under half-precision engines (issue 28 item 5): IResNet's `fc` + `features`,
MobileFaceNet's `conv_sep` + `features` and ViT's `norm` + `feature` compute in fp32 while the
rest of the network runs in the engine dtype, as arcface_torch does; the embedding leaves in the
engine dtype and gradients reach the half parameters. Op dtypes are read from the aten calls."""

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import models
from tests.helpers.distributed import run_distributed
from trainer.engine import keep_batchnorm_stats_fp32
from trainer.precision import keep_tail_fp32

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "r18": {"embedding_size": 8, "base_width": 4},
    "mbf": {"embedding_size": 8, "scale": 1},
    "vit_t": {"embedding_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2},
}
# casts and views carry the half tensors into the tail: only compute ops are checked
_MOVES = {"_to_copy", "to", "copy_", "view", "_unsafe_view", "t", "detach", "reshape", "expand"}


class OpDtypes(TorchDispatchMode):
    """Records, per aten op, the dtypes of its floating tensor inputs, split by whether a
    module of `model.fp32_tail` was running (module hooks toggle `in_tail`)."""

    def __init__(self, model):
        super().__init__()
        self.in_tail = False
        self.tail: dict[str, set] = {}
        self.body: dict[str, set] = {}
        for name in model.fp32_tail:
            sub = model.get_submodule(name)
            sub.register_forward_pre_hook(lambda *_: setattr(self, "in_tail", True))
            sub.register_forward_hook(lambda *_: setattr(self, "in_tail", False))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in _MOVES:
            flat = torch.utils._pytree.tree_leaves((args, kwargs or {}))
            dtypes = {
                a.dtype for a in flat if isinstance(a, torch.Tensor) and a.is_floating_point()
            }
            if dtypes:
                (self.tail if self.in_tail else self.body).setdefault(name, set()).update(dtypes)
        return func(*args, **(kwargs or {}))


def _half_params(model, dtype):
    """As DeepSpeed leaves a module: parameters in the engine dtype, buffers fp32."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("network", sorted(TINY))
def test_tail_computes_in_fp32(network, dtype):
    torch.manual_seed(0)
    model = _half_params(models.create(network, **TINY[network]), dtype)
    keep_batchnorm_stats_fp32(model, torch.device("cpu"))
    assert keep_tail_fp32(model) == list(model.fp32_tail) and model.fp32_tail
    rec = OpDtypes(model)
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(1)).to(dtype)
    with rec:
        out = model(x)
    assert out.dtype == dtype and out.shape == (2, 8)
    assert rec.tail and all(d == {torch.float32} for d in rec.tail.values()), rec.tail
    assert any(dtype in d for d in rec.body.values())  # the body stays half: not all upcast
    out.float().pow(2).sum().backward()
    for name in model.fp32_tail:
        for p in model.get_submodule(name).parameters():
            assert p.dtype == dtype and (not p.requires_grad or p.grad.dtype == dtype)
            assert not p.requires_grad or torch.isfinite(p.grad).all()
    grads = [p.grad for p in model.get_submodule(model.fp32_tail[0]).parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_tail_keeps_weights_and_fp32_models_alone():
    """The policy changes no parameter or state-dict key, and names only real submodules."""
    net = models.create("r18", **TINY["r18"])
    keys = {k: v.clone() for k, v in net.state_dict().items()}
    keep_tail_fp32(net)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in keys.items())
    assert all(p.dtype == torch.float32 for p in net.parameters())
    bad = models.create("r18", **TINY["r18"])
    bad.fp32_tail = ("fc", "nope")
    with pytest.raises(ValueError, match="nope"):
        keep_tail_fp32(bad)


def _engine_worker(rank, world, stage, precision):
    os.environ.update(
        {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)},
        ACCELERATE_USE_DEEPSPEED="true",
    )
    from deepspeed.accelerator import get_accelerator

    from trainer.config import load_config
    from trainer.engine import (
        EngineSettings,
        build_ds_config,
        create_accelerator,
        prepare_backbone,
    )

    synth = ["data.kind=synthetic", "data.num_classes=10", "data.num_image=64"]
    cfg = load_config(None, [*synth, "data.batch_size=2", "model.embedding_size=8"])
    ds = build_ds_config(cfg, EngineSettings(stage, precision, "ds_configs/zero2_bf16.json"))
    if precision == "fp16":  # CPU oneDNN lacks fp16 kernels; torch's fp16 CPU ops still run
        get_accelerator().is_fp16_supported = lambda: True
    accelerator = create_accelerator(cfg, ds, precision)
    torch.manual_seed(0)
    engine = prepare_backbone(cfg, accelerator, models.create("r18", **TINY["r18"]), ds)
    import deepspeed

    rec = OpDtypes(engine.module)
    fc = engine.module.fc.weight
    with deepspeed.zero.GatheredParameters([fc], enabled=stage == 3):  # ZeRO-3: gather to read
        before = fc.detach().float().clone()
    dtype = next(engine.module.parameters()).dtype
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(rank)).to(dtype)
    with rec:
        out = engine(x)
    engine.backward(out.float().pow(2).mean())
    engine.step()
    with deepspeed.zero.GatheredParameters([fc], enabled=stage == 3):
        moved = float((fc.detach().float() - before).abs().max())
    return {"param": dtype, "out": out.dtype, "tail": rec.tail, "moved": moved}


@pytest.mark.parametrize(("stage", "precision"), [(2, "fp16"), (3, "bf16")])
def test_engine_tail_is_fp32(stage, precision):
    """Through `prepare_backbone` (DeepSpeed engine, ZeRO-3 gathering parameters per module)."""
    (r,) = run_distributed(_engine_worker, 1, args=(stage, precision), timeout=400)
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    assert r["param"] == half and r["out"] == half
    assert r["tail"] and all(d == {torch.float32} for d in r["tail"].values()), r["tail"]
    assert r["moved"] > 0  # the fc gradient reached the optimizer through the fp32 copy
