"""Verification metrics (evaluation/verification.py) and the eval callback
(evaluation/callback.py)."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from evaluation.callback import VerificationCallback
from evaluation.embedders import Embedder, embed_images, embed_views
from evaluation.sharded import slice_bounds
from evaluation.verification import (
    evaluate,
    evaluate_views,
    format_results,
    plot_roc,
)
from tests.helpers.tiny_eval import TINY_IRESNET, tiny_iresnet, tiny_net, write_tiny_bin


def pairs_with_sq_distances(d: np.ndarray, rng: np.random.Generator, scale: float = 1.0):
    """(2P, 3) embeddings whose pair i has squared L2 distance d[i] after normalization."""
    cos = 1.0 - d / 2.0
    sin = np.sqrt(1.0 - cos**2)
    a = np.stack([np.ones_like(d), np.zeros_like(d), np.zeros_like(d)], 1)
    b = np.stack([cos, sin, np.zeros_like(d)], 1)
    out = np.empty((2 * len(d), 3))
    for i in range(len(d)):  # random rotation per pair: the metric must only see the distance
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        out[2 * i], out[2 * i + 1] = q @ a[i], q @ b[i]
    return out * scale


def test_separable_embeddings_score_perfectly():
    rng = np.random.default_rng(0)
    p, d = 400, 64
    issame = rng.random(p) < 0.5
    first = rng.normal(size=(p, d))
    second = np.where(
        issame[:, None], first + 0.05 * rng.normal(size=(p, d)), rng.normal(size=(p, d))
    )
    emb = np.empty((2 * p, d))
    emb[0::2], emb[1::2] = first, second
    res = evaluate(emb, issame)
    assert res["accuracy_mean"] == 1.0 and res["accuracy_std"] == 0.0
    assert res["tar_at_far"] == 1.0 and res["auc"] == 1.0
    assert res["num_pairs"] == p


def test_random_embeddings_score_chance():
    rng = np.random.default_rng(1)
    p = 3000
    res = evaluate(rng.normal(size=(2 * p, 32)), rng.random(p) < 0.5)
    assert 0.45 < res["accuracy_mean"] < 0.56
    assert abs(res["auc"] - 0.5) < 0.04
    assert res["tar_at_far"] < 0.02


def test_known_threshold_and_accuracy():
    # 50 positives at 0.3, 5 positives at 1.2, 40 negatives at 0.9, 5 negatives at 0.6:
    # the best threshold keeps the easy positives and both negative groups out -> the first grid
    # value above 0.3, misclassifying only the 5 far positives: accuracy 95/100 in every split.
    rng = np.random.default_rng(2)
    d = np.array([0.3] * 50 + [1.2] * 5 + [0.9] * 40 + [0.6] * 5)
    same = np.array([True] * 55 + [False] * 45)
    order = rng.permutation(100)
    emb = pairs_with_sq_distances(d[order], rng, scale=3.0)
    res = evaluate(emb, same[order])
    assert res["best_threshold"] == pytest.approx(0.31)
    assert res["accuracy_mean"] == pytest.approx(0.95)
    assert res["xnorm"] == pytest.approx(3.0)
    # Scaling the embeddings changes nothing but XNorm.
    res2 = evaluate(emb / 3.0, same[order])
    assert res2["accuracy_mean"] == res["accuracy_mean"] and res2["xnorm"] == pytest.approx(1.0)


def test_single_class_fold_warns():
    # LFW-style order (all matched, then all mismatched): 10 contiguous folds are one-class,
    # 2 folds (the protocol folds here) are not.
    rng = np.random.default_rng(7)
    same = np.array(([True] * 30 + [False] * 30) * 2)
    emb = _emb_for(rng, same)
    # folds of 12 pairs: only folds 2 (pairs 24-35) and 7 (84-95) straddle a class boundary
    with pytest.warns(UserWarning, match=r"folds \[0, 1, 3, 4, 5, 6, 8, 9\] of 10 hold one class"):
        evaluate(emb, same, nrof_folds=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate(emb, same, nrof_folds=2)


def _direct_tar(pos_d: np.ndarray, neg_d: np.ndarray, k: int) -> float:
    """TAR with at most k false accepts: accept every pair closer than the (k+1)-th negative."""
    return float(np.mean(pos_d < np.sort(neg_d)[k]))


def _emb_for(rng, same, n_dim=16, noise=0.9):
    a = rng.normal(size=(len(same), n_dim))
    b = np.where(same[:, None], a + noise * rng.normal(size=a.shape), rng.normal(size=a.shape))
    emb = np.empty((2 * len(same), n_dim))
    emb[0::2], emb[1::2] = a, b
    return emb


def _sq_dists(emb):
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    return np.sum((e[0::2] - e[1::2]) ** 2, axis=1)


def test_tar_at_far_matches_direct_count():
    rng = np.random.default_rng(3)
    same = rng.permutation(np.array([True] * 1500 + [False] * 2000))
    emb = _emb_for(rng, same)
    res = evaluate(emb, same, far_target=1e-3)  # 2 false accepts allowed among 2000
    dd = _sq_dists(emb)
    expected = _direct_tar(dd[same], dd[~same], k=2)
    assert 0.05 < expected < 0.95  # a case where the answer is not trivial
    assert res["tar_at_far"] == pytest.approx(expected, abs=1e-12)
    assert res["far_resolution"] == pytest.approx(1 / 2000)


def test_tar_below_far_resolution_is_zero_false_accepts():
    # 500 negatives: one false accept is FAR 2e-3 > 1e-3, so TAR@FAR=1e-3 is the zero-FA TAR.
    rng = np.random.default_rng(4)
    same = rng.permutation(np.array([True] * 400 + [False] * 500))
    emb = _emb_for(rng, same, noise=1.2)
    res = evaluate(emb, same, far_target=1e-3)
    dd = _sq_dists(emb)
    zero_fa = _direct_tar(dd[same], dd[~same], k=0)
    one_fa = _direct_tar(dd[same], dd[~same], k=1)
    assert zero_fa < one_fa
    assert res["tar_at_far"] == pytest.approx(zero_fa, abs=1e-12)
    assert res["far_resolution"] == pytest.approx(1 / 500)


def test_evaluate_rejects_bad_input():
    emb = np.zeros((20, 4)) + 1.0
    with pytest.raises(ValueError, match="issame"):
        evaluate(emb, np.array([True, False] * 4))
    with pytest.raises(ValueError, match="2P"):
        evaluate(np.ones((21, 4)), np.array([True, False] * 5))
    with pytest.raises(ValueError, match="both"):
        evaluate(emb, np.ones(10, dtype=bool))
    bad = emb.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluate(bad, np.array([True, False] * 5))


def test_embed_images_sums_plain_and_mirrored_views():
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, size=(7, 6, 5, 3), dtype=np.uint8)
    calls = []

    def embed_fn(x):  # first 4 pixels of row 0, channel 0: not flip-invariant
        calls.append(tuple(x.shape))
        return x[:, 0, 0, :4].clone()

    fixed = Embedder(embed_fn, batch_size=3, description="fixed batch", fixed_batch=True)
    got = embed_images(fixed, images, flip=True)
    norm = (images[..., 0].astype(np.float64) / 255 - 0.5) / 0.5  # (N, H, W)
    expected = norm[:, 0, :4] + norm[:, 0, ::-1][:, :4]
    assert got.dtype == np.float32 and got.shape == (7, 4)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert calls == [(3, 3, 6, 5)] * 6  # 2 views x ceil(7/3) batches, last one padded
    no_flip = embed_images(fixed, images, flip=False)
    np.testing.assert_allclose(no_flip, norm[:, 0, :4], atol=1e-6)
    plain, flipped = embed_views(embed_fn, images, batch_size=4)
    np.testing.assert_allclose(plain, norm[:, 0, :4], atol=1e-6)
    assert not np.allclose(plain, flipped)
    with pytest.raises(ValueError, match="uint8"):
        embed_views(embed_fn, images.astype(np.float32), 3)


def test_format_and_plot(tmp_path):
    rng = np.random.default_rng(6)
    same = rng.random(200) < 0.5
    res = evaluate_views(*np.split(_emb_for(rng, same), 2, axis=1), same)
    lines = format_results("lfw", 2000, res)
    assert re.fullmatch(r"\[lfw\]\[2000\]Accuracy-Flip: 0\.\d{5}\+-0\.\d{5}", lines[1])
    assert lines[0].startswith("[lfw][2000]XNorm: ")
    assert lines[2].startswith("[lfw][2000]TAR@FAR=1e-3: ")
    png = plot_roc({"a": res, "b": evaluate(_emb_for(rng, same), same)}, str(tmp_path / "roc.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert Image.open(png).size[0] > 100


def test_slice_bounds_cover_every_item_once():
    for n, w in [(26, 2), (26, 4), (2, 4), (7, 3), (1, 1)]:
        slices = [slice_bounds(n, r, w) for r in range(w)]
        per = slices[0][2]
        assert all(s[2] == per for s in slices) and per * w >= n
        covered = [i for start, stop, _ in slices for i in range(start, stop)]
        assert covered == list(range(n))


# ---- callback --------------------------------------------------------------------------------


class Recorder:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, float(value), step))


def test_callback_single_rank(tmp_path):
    bins = {"setA": str(tmp_path / "a.bin"), "setB": str(tmp_path / "b.bin")}
    write_tiny_bin(bins["setA"], 12, seed=0)
    write_tiny_bin(bins["setB"], 10, seed=1)
    lines, tb = [], Recorder()
    cb = VerificationCallback(
        bins,
        0,
        1,
        batch_size=5,
        log_fn=lines.append,
        tb_writer=tb,
        out_dir=str(tmp_path / "run"),
        nrof_folds=3,
    )
    good, bad = tiny_net(0), tiny_net(1)
    r1 = cb(100, good)
    r2 = cb(200, bad)
    for name, (images, issame) in cb.sets.items():
        direct = evaluate_views(*embed_views(good, images, 7), issame, nrof_folds=3)
        assert r1[name]["accuracy_mean"] == pytest.approx(direct["accuracy_mean"])
        assert r1[name]["xnorm"] == pytest.approx(direct["xnorm"], rel=1e-5)
        expect_high = max(r1[name]["accuracy_mean"], r2[name]["accuracy_mean"])
        assert cb.highest[name] == pytest.approx(expect_high)
        assert r2[name]["highest_accuracy"] == pytest.approx(expect_high)
    assert "[setA][100]Accuracy-Flip: " in "\n".join(lines)
    i = lines.index(next(x for x in lines if x.startswith("[setB][200]Accuracy-Flip: ")))
    assert lines[i + 1] == f"[setB][200]Accuracy-Highest: {expect_high:1.5f}"  # arcface_torch
    tags = {(t, s) for t, _, s in tb.scalars}
    assert ("val/setA/accuracy", 100) in tags and ("val/setB/xnorm", 200) in tags
    assert ("val/setB/tar_at_far", 100) in tags
    records = [json.loads(x) for x in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [(r["step"], r["target"]) for r in records] == [
        (100, "setA"),
        (100, "setB"),
        (200, "setA"),
        (200, "setB"),
    ]
    assert records[3]["accuracy_mean"] == pytest.approx(r2["setB"]["accuracy_mean"])


def test_callback_rejects_bad_bins(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        VerificationCallback({"x": str(tmp_path / "nope.bin")}, 0, 1)
    path = str(tmp_path / "small.bin")
    write_tiny_bin(path, 3, size=64)
    with pytest.raises(ValueError, match="small.bin"):
        VerificationCallback({"x": path}, 0, 1)


def _rank_main(rank, world_size, tmp, bin_path, state_path):
    torch.set_num_threads(1)  # 2-3 ranks share 2 cores
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world_size
    )
    try:
        net = tiny_iresnet()
        net.load_state_dict(torch.load(state_path))
        if rank > 0:  # data-parallel training: each rank's BN statistics follow its own batches
            for m in net.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.running_mean.add_(0.3)
                    m.running_var.mul_(1.5)
        shapes = []

        def forward(x):
            shapes.append(list(x.shape))
            return net(x)

        cb = VerificationCallback(
            {"t": bin_path}, rank, world_size, batch_size=4, nrof_folds=3, log_fn=lambda s: None
        )
        per_rank_bn = cb(6, forward)["t"]  # each rank embeds its slice with its own statistics
        shapes.clear()
        res = cb(7, forward, module=net)["t"]  # rank 0's statistics everywhere
        plain, flipped = cb.embed(cb.sets["t"][0], net)
        np.savez(f"{tmp}/rank{rank}.npz", plain=plain, flipped=flipped, fpr=res["roc"]["fpr"])
        with open(f"{tmp}/rank{rank}.json", "w") as f:
            json.dump(
                {
                    "shapes": shapes,
                    "acc": res["accuracy_mean"],
                    "xnorm": res["xnorm"],
                    "tar": res["tar_at_far"],
                    "xnorm_per_rank_bn": per_rank_bn["xnorm"],
                },
                f,
            )
        dist.barrier()  # no rank tears gloo down while another is still in a collective
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_callback_multi_rank_matches_single_and_the_eval_tools(tmp_path, world_size):
    """One evaluation code path: the in-training evaluation on several ranks, the PyTorch tool on
    the saved weights and the ONNX tool on their export give the same accuracy (within 0.05
    points) although the ranks' BN running statistics differ, as they do after real training."""
    from tools import eval_verification
    from tools.convert_to_onnx import export_onnx

    # 13 pairs = 26 images: with 3 ranks the slices are 9, 9, 8 (padded to 9) rows.
    bin_path = str(tmp_path / "t.bin")
    write_tiny_bin(bin_path, 13, seed=3)
    state_path = str(tmp_path / "net.pt")
    torch.save(tiny_iresnet().state_dict(), state_path)
    mp.spawn(
        _rank_main,
        args=(world_size, str(tmp_path), bin_path, state_path),
        nprocs=world_size,
        join=True,
    )

    single = VerificationCallback(
        {"t": bin_path}, 0, 1, batch_size=4, nrof_folds=3, log_fn=lambda s: None
    )
    net = tiny_iresnet()
    net.load_state_dict(torch.load(state_path))
    ref = single(7, net)["t"]
    ref_plain, ref_flipped = single.embed(single.sets["t"][0], net)
    outs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world_size)]
    arrays = [np.load(tmp_path / f"rank{r}.npz") for r in range(world_size)]
    per = -(-26 // world_size)
    for out, arr in zip(outs, arrays):
        # every rank: same number of forwards with the same shapes (ZeRO-3 needs it)
        assert out["shapes"] == outs[0]["shapes"]
        assert len(out["shapes"]) == 2 * -(-per // 4)
        # fp32 GEMM blocking differs with each rank's batch slice: a tolerance relative to the
        # embeddings' magnitude (an absolute 1e-5 failed by 1.1e-5 at 3 ranks).
        for got, want in ((arr["plain"], ref_plain), (arr["flipped"], ref_flipped)):
            scale = float(np.abs(want).max())
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)
        assert out["acc"] == pytest.approx(ref["accuracy_mean"])
        assert out["xnorm"] == pytest.approx(ref["xnorm"], rel=1e-5)
        # Without the module (old behaviour) the other ranks' statistics leak into the result.
        assert abs(out["xnorm_per_rank_bn"] / ref["xnorm"] - 1) > 1e-3
    # The saved weights (a step dir as the trainer writes it) through both eval tools.
    step = tmp_path / "step_7"
    step.mkdir()
    torch.save(net.state_dict(), step / "backbone.pt")
    (step / "meta.json").write_text(json.dumps(TINY_IRESNET))
    export_onnx(net, step / "backbone.onnx")
    for model in (str(step), str(step / "backbone.onnx")):
        argv = ["--model", model, "--bin", bin_path, "--nfolds", "3", "--out", str(tmp_path / "e")]
        got = eval_verification.main(argv)["t"]
        assert abs(got["accuracy_mean"] - outs[0]["acc"]) <= 0.0005, model
        assert got["xnorm"] == pytest.approx(outs[0]["xnorm"], rel=1e-4), model
