"""data.augment: parameter draws (fractions, ranges, determinism) and the CPU and DALI loaders
augmenting real LFW faces alike (DALI's CPU pipeline)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from data.augment import AugmentSpec, sample_params
from data.datasets import RecordDataset
from data.loader import build_cpu_loader
from tests.helpers.lfw_rec import lfw_faces, write_lfw_rec
from trainer.config import ConfigError, load_config

# arcface_torch's DALI probabilities plus the low-resolution step
RECIPE = AugmentSpec(crop_p=0.1, lowres_p=0.2, blur_p=0.2, hsv_p=0.2, gray_p=0.1)


def _within(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


def test_draws_have_the_recipe_fractions_and_ranges():
    n = 20_000
    p = sample_params(RECIPE, np.arange(n), seed=7, epoch=3)
    for step in ("crop", "lowres", "blur", "hsv", "gray"):
        assert _within(int(p[step].sum()), n, getattr(RECIPE, f"{step}_p")), step
    assert _within(int((p["crop"] & p["blur"]).sum()), n, 0.1 * 0.2)  # independent draws
    side = p["roi"][:, 2] - p["roi"][:, 0]
    assert np.array_equal(side, p["roi"][:, 3] - p["roi"][:, 1])  # square crops
    assert (p["roi"][:, :2] >= 0).all() and (p["roi"][:, 2:] <= 112).all()
    crop = p["crop"]
    assert side[~crop].tolist() == [112] * int((~crop).sum())
    assert side[crop].min() >= round(112 * 0.8) and side[crop].max() <= 112
    assert side[crop].min() <= 92 and p["roi"][crop, 0].max() > 15  # the range is used
    low = p["side"][p["lowres"]]
    assert low.min() == 56 and low.max() == 90 and (p["side"][~p["lowres"]] == 112).all()
    sigma, window = p["sigma"][p["blur"]], p["window"][p["blur"]]
    assert 0.5 <= sigma.min() < 0.55 and 1.45 < sigma.max() <= 1.5
    assert window.tolist() == (2 * np.ceil(3 * sigma) + 1).astype(int).tolist()
    assert (p["window"][~p["blur"]] == 1).all() and (p["sigma"][~p["blur"]] == 0).all()
    hue = p["hue"][p["hsv"]]
    assert -20 <= hue.min() < -19 and 19 < hue.max() <= 20 and (p["hue"][~p["hsv"]] == 0).all()
    sat = p["saturation"][p["hsv"] & ~p["gray"]]
    assert 0.8 <= sat.min() < 0.81 and 1.19 < sat.max() <= 1.2
    assert (p["saturation"][p["gray"]] == 0).all()
    again = sample_params(RECIPE, np.arange(n), seed=7, epoch=3)
    other = sample_params(RECIPE, np.arange(n), seed=7, epoch=4)
    assert np.array_equal(again["roi"], p["roi"]) and not np.array_equal(other["hsv"], p["hsv"])
    assert not AugmentSpec().enabled and RECIPE.enabled


def test_config_section_and_bad_values():
    base = ["data.kind=synthetic", "data.num_classes=3", "data.num_image=9"]
    cfg = load_config(None, [*base, "data.augment={blur_p: 0.2, lowres_side: [40, 80]}"])
    assert cfg.data.augment == AugmentSpec(blur_p=0.2, lowres_side=(40, 80))
    assert load_config(None, base).data.augment == AugmentSpec()  # off by default
    for bad, field in [
        ("data.augment.gray_p=1.5", "data.augment.gray_p: must be in [0, 1]"),
        ("data.augment.hue=[20, -20]", "data.augment.hue: must be [low, high]"),
        ("data.augment.lowres_side=[8, 200]", "data.augment.lowres_side"),
        ("data.augment.bogus=1", "unknown key 'data.augment.bogus'"),
    ]:
        with pytest.raises(ConfigError, match=field.replace("[", r"\[")):
            load_config(None, [*base, bad])


@pytest.fixture(scope="module")
def lfw64(lfw_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("aug")
    write_lfw_rec(str(folder), lfw_faces(lfw_root, 16, 4))
    return str(folder)


def _cpu_epochs(rec, spec, epochs, seed):
    loader = build_cpu_loader(
        RecordDataset(rec), 16, 0, 1, seed, num_workers=0, flip=False, augment=spec
    )
    out, ids = [], []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        ids.append(np.array(list(loader.sampler)))
        out.append(torch.cat([x for x, _ in loader]).float())
    return torch.cat(out), np.concatenate(ids)


def test_cpu_and_dali_loaders_augment_alike(lfw64):
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI not installed (extra 'dali')")
    from data.dali_loader import build_dali_loader

    rec, epochs, seed = f"{lfw64}/train.rec", 2, 11
    spec = AugmentSpec(crop_p=0.3, lowres_p=0.3, blur_p=0.3, hsv_p=0.3, gray_p=0.2)
    ref, ids = _cpu_epochs(rec, None, epochs, seed)
    cpu, cpu_ids = _cpu_epochs(rec, spec, epochs, seed)
    dali = build_dali_loader(rec, None, 16, 0, 1, seed, flip=False, augment=spec,
                             cache_dir=f"{lfw64}/cache")  # fmt: skip
    batches = []
    for epoch in range(epochs):
        dali.set_epoch(epoch)
        batches += [x.float() for x, _ in dali]  # uint8 HWC, as the CPU loader
    gpu_like = torch.cat(batches)
    n = len(ids)
    assert np.array_equal(ids, cpu_ids) and gpu_like.shape == cpu.shape == (n, 112, 112, 3)

    drawn = np.zeros(n, bool)
    params = [sample_params(spec, ids[e * 64 : (e + 1) * 64], seed, e) for e in range(epochs)]
    for step in ("crop", "lowres", "blur", "hsv", "gray"):
        flags = np.concatenate([p[step] for p in params])
        drawn |= flags
        assert _within(int(flags.sum()), n, getattr(spec, f"{step}_p")), step

    def changed(x):
        return ((x - ref).abs().mean(dim=(1, 2, 3)) > 0.5).numpy()

    def gray(x):
        return ((x - x.mean(dim=3, keepdim=True)).abs().amax(dim=(1, 2, 3)) <= 2).numpy()

    # same samples augmented, and to the same pixels (parameters shared; decoders differ a bit)
    assert changed(cpu).sum() == pytest.approx(changed(gpu_like).sum(), abs=2)
    assert (changed(cpu) & ~drawn).sum() == 0 and (changed(gpu_like) & ~drawn).sum() == 0
    assert changed(cpu).sum() >= 0.9 * drawn.sum()
    gray_drawn = np.concatenate([p["gray"] for p in params])
    assert np.array_equal(gray(cpu), gray_drawn) and np.array_equal(gray(gpu_like), gray_drawn)
    diff = (cpu - gpu_like).abs().mean(dim=(1, 2, 3))
    assert diff.max() < 1.5, diff.max()
