"""Backbone contract tests over the whole registry, insightface key compatibility (the model stats
tool: tests/unit/tools/test_model_stats.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import models
import models.checkpointing

ALL_NAMES = ["r18", "r34", "r50", "r100", "r200", "mbf", "mbf_large"]
ALL_NAMES += ["vit_t", "vit_s", "vit_b", "vit_l", "vit_h"]

# Full size where cheap on CPU, narrow otherwise (depths stay the real ones).
CONFIGS = {
    "r18": {},
    "r34": {"base_width": 8, "dropout": 0.2},
    "r50": {"base_width": 8},
    "r100": {"base_width": 4},
    "r200": {"base_width": 4},
    "mbf": {},
    "mbf_large": {"scale": 1},
    "vit_t": {},
    "vit_s": {"embed_dim": 32, "num_heads": 4},
    "vit_b": {"embed_dim": 32, "num_heads": 4},
    "vit_l": {"embed_dim": 32, "num_heads": 4},
    "vit_h": {"embed_dim": 16, "num_heads": 2},
}
# Narrower still, for the tests that need no full-size model.
TINY = {
    **CONFIGS,
    "r18": {"base_width": 8},
    "mbf": {"scale": 1},
    "vit_t": {"embed_dim": 32, "num_heads": 4, "depth": 2},
}
EMB = 64
BATCH = 2


pytestmark = pytest.mark.usefixtures("one_thread")


def _images(batch: int = BATCH, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 112, 112, generator=gen).to(dtype)


def _build(name: str, configs=CONFIGS) -> nn.Module:
    torch.manual_seed(0)
    return models.create(name, embedding_size=EMB, **configs[name])


def _loss(out: torch.Tensor) -> torch.Tensor:
    # a fixed random projection: a plain sum would give zero gradients through the last BatchNorm
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return (out.float() * weights).sum()


# --- registry --------------------------------------------------------------------------------


def test_registry_lists_every_variant():
    assert models.list_models() == ALL_NAMES
    assert sorted(CONFIGS) == sorted(ALL_NAMES)


def test_unknown_name_lists_valid_names():
    for exc_type in (KeyError, ValueError):
        with pytest.raises(exc_type) as info:
            models.create("resnet50")
        message = str(info.value)
        assert "unknown network 'resnet50'" in message
        assert all(name in message for name in ALL_NAMES)


def test_unknown_keyword_is_an_error():
    with pytest.raises(TypeError, match="base_width"):
        models.create("vit_t", base_width=8)
    with pytest.raises(TypeError, match="embed_dim"):
        models.create("r18", embed_dim=8)


@pytest.mark.parametrize(
    ("name", "kwargs", "field"),
    [
        ("r18", {"dropout": 1.0}, "dropout"),
        ("r18", {"base_width": 0}, "base_width"),
        ("vit_t", {"embed_dim": 30, "num_heads": 8}, "num_heads"),
        ("vit_t", {"mask_ratio": 1.0}, "mask_ratio"),
        ("vit_t", {"drop_path_rate": -0.1}, "drop_path_rate"),
        ("mbf", {"scale": 0}, "scale"),
    ],
)
def test_out_of_range_values_raise(name, kwargs, field):
    with pytest.raises(ValueError, match=field):
        models.create(name, **kwargs)


# --- contract, parametrized over the registry ------------------------------------------------


@pytest.mark.parametrize("name", ALL_NAMES)
def test_forward_backward_contract(name):
    model = _build(name).train()
    assert model.embedding_size == EMB
    out = model(_images())
    assert out.shape == (BATCH, EMB) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    _loss(out).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_grad = [n for n, p in trainable if p.grad is None]
    assert not no_grad, f"{name}: parameters without gradient: {no_grad}"
    assert all(torch.isfinite(p.grad).all() for _, p in trainable)
    nonzero = sum(bool(p.grad.abs().sum() > 0) for _, p in trainable)
    assert nonzero >= 0.9 * len(trainable)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_checkpointing_changes_nothing(name, monkeypatch):
    """Same outputs, gradients and BatchNorm buffers with activation checkpointing on and off.

    Dropout (r34), drop-path and token masking (ViTs) stay on: both runs start from the same seed
    and checkpoint recomputation must replay the same random numbers.
    """
    plain = _build(name, TINY).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    calls = []
    real = models.checkpointing.checkpoint
    monkeypatch.setattr(
        models.checkpointing, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(123)
        out = model(_images())
        _loss(out).backward()
        results.append(out)
    assert calls, "set_grad_checkpointing(True) did not checkpoint anything"
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-6)
    grads = dict(plain.named_parameters())
    for n, p in ckpt.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n].grad, rtol=1e-5, atol=1e-6, msg=n)
    buffers = dict(plain.named_buffers())
    for n, b in ckpt.named_buffers():
        torch.testing.assert_close(b, buffers[n], rtol=1e-6, atol=1e-7, msg=n)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_eval_is_deterministic_and_per_sample(name):
    model = _build(name, TINY)
    with torch.no_grad():  # one train step so BN running stats are not the (0, 1) defaults
        model.train()(_images(4, seed=3))
    model.eval()
    x = _images()
    with torch.no_grad():
        first, second, single = model(x), model(x), model(x[:1])
    assert torch.equal(first, second)
    torch.testing.assert_close(single, first[:1], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_output_dtype_follows_input(name):
    model = _build(name, TINY).eval().to(torch.bfloat16)
    with torch.no_grad():
        out = model(_images(dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (BATCH, EMB)
    assert torch.isfinite(out.float()).all()


# --- family specifics -------------------------------------------------------------------------


def _bn(prefix: str) -> list[str]:
    return [f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var")] + [
        f"{prefix}.num_batches_tracked"
    ]


def _insightface_iresnet_keys(layers: list[int]) -> dict[str, tuple[int, ...] | None]:
    """State-dict keys (-> shape, None for BN buffers/params) of insightface's iresnet.py."""
    keys: dict[str, tuple[int, ...] | None] = {"conv1.weight": (64, 3, 3, 3), "prelu.weight": (64,)}
    keys.update(dict.fromkeys(_bn("bn1")))
    in_ch = 64
    for stage, (width, n) in enumerate(zip((64, 128, 256, 512), layers), start=1):
        for i in range(n):
            p = f"layer{stage}.{i}"
            keys.update(dict.fromkeys(_bn(f"{p}.bn1") + _bn(f"{p}.bn2") + _bn(f"{p}.bn3")))
            keys[f"{p}.conv1.weight"] = (width, in_ch if i == 0 else width, 3, 3)
            keys[f"{p}.prelu.weight"] = (width,)
            keys[f"{p}.conv2.weight"] = (width, width, 3, 3)
            if i == 0:
                keys[f"{p}.downsample.0.weight"] = (width, in_ch, 1, 1)
                keys.update(dict.fromkeys(_bn(f"{p}.downsample.1")))
        in_ch = width
    keys.update(dict.fromkeys(_bn("bn2") + _bn("features")))
    keys["fc.weight"] = (512, 512 * 7 * 7)
    keys["fc.bias"] = (512,)
    return keys


@pytest.mark.parametrize(
    ("name", "layers"), [("r18", [2, 2, 2, 2]), ("r50", [3, 4, 14, 3]), ("r200", [6, 26, 60, 6])]
)
def test_iresnet_state_dict_matches_insightface(name, layers):
    expected = _insightface_iresnet_keys(layers)
    with torch.device("meta"):
        state = models.create(name).state_dict()
    assert set(state) == set(expected)
    for key, shape in expected.items():
        if shape is not None:
            assert tuple(state[key].shape) == shape, key


def test_iresnet_loads_an_insightface_style_checkpoint_strictly():
    expected = _insightface_iresnet_keys([2, 2, 2, 2])
    reference = models.create("r18").state_dict()
    gen = torch.Generator().manual_seed(0)
    foreign = {k: torch.randn(reference[k].shape, generator=gen) for k in expected}
    for k in foreign:
        if k.endswith("num_batches_tracked"):
            foreign[k] = torch.tensor(7)
    model = models.create("r18")
    model.load_state_dict(foreign, strict=True)
    assert torch.equal(model.fc.weight, foreign["fc.weight"])
    assert not model.features.weight.requires_grad
    assert torch.equal(models.create("r18").features.weight, torch.ones(512))


def test_mobilefacenet_keys_follow_arcface_torch():
    state = models.create("mbf").state_dict()
    for key in (
        "layers.0.layers.0.weight",  # stem conv
        "layers.1.layers.2.weight",  # grouped 3x3 ConvBlock PReLU
        "layers.2.layers.1.layers.0.weight",  # DepthWise -> depthwise ConvBlock -> conv
        "layers.3.layers.3.layers.2.layers.1.running_var",  # Residual -> 4th DepthWise -> BN
        "conv_sep.layers.0.weight",
        "features.layers.0.layers.0.weight",  # GDC 7x7 depthwise
        "features.layers.2.weight",  # Linear(512, D)
        "features.layers.3.running_mean",
    ):
        assert key in state, key
    assert state["features.layers.0.layers.0.weight"].shape == (512, 1, 7, 7)
    assert "features.layers.2.bias" not in state


def test_vit_keys_follow_arcface_torch():
    model = models.create("vit_t", embed_dim=32, depth=2, num_heads=4)
    per_block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight"]
    per_block += ["attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight"]
    per_block += ["mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    expected = {"patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed", "mask_token"}
    expected |= {f"blocks.{i}.{k}" for i in range(2) for k in per_block}
    expected |= {"norm.weight", "norm.bias", "feature.0.weight", "feature.2.weight"}
    expected |= set(_bn("feature.1") + _bn("feature.3"))
    assert set(model.state_dict()) == expected
    assert model.pos_embed.shape == (1, 144, 32)


def test_vit_masking_only_in_training():
    masked = models.create("vit_t", embed_dim=32, depth=2, num_heads=4, mask_ratio=0.5)
    unmasked = models.create("vit_t", embed_dim=32, depth=2, num_heads=4, mask_ratio=0.0)
    unmasked.load_state_dict(masked.state_dict())
    assert masked.mask_token.requires_grad and not unmasked.mask_token.requires_grad
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(masked.eval()(x), unmasked.eval()(x))
    masked.train()
    torch.manual_seed(0)
    out_a = masked(x)
    torch.manual_seed(1)
    out_b = masked(x)
    assert not torch.allclose(out_a, out_b)  # different tokens dropped
    _loss(out_a).backward()
    assert masked.mask_token.grad is not None and masked.mask_token.grad.abs().sum() > 0
