"""The head-parity problem: our sharded ``PartialFC`` on 1-3 gloo ranks against a single-process
reference written from the papers' formulas (one-hot masks over the full ``(N, C)`` logits,
``F.cross_entropy``; nothing in the reference comes from heads/).

One problem for tests/unit/heads/test_partial_fc.py, test_margins_parity.py and
test_subcenter.py: ``make_problem`` (a linear backbone, labels with one class positive twice,
``C`` classes of ``K`` sub-centers), ``cases_for`` (uneven batches per rank, one rank may have
none), ``parity_worker`` (this rank's head on its batch slice) and ``reference`` (the same
problem in one process, restricted to the classes the heads kept). A ``Problem`` says what
varies between the tests: sub-centers per class, which centers are pulled towards their rows,
and whether the step runs under a loss scale through the head optimizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from heads import CombinedMarginLoss, PartialFC, build_head_optimizer, build_margin

C = 1003  # uneven over 2 and 3 ranks
D = 32
D_IN = 12
S = 64.0
MARGIN_SEED = 11  # ElasticFace's generator seed (the same on every rank)
HEAD_SEED = 7

# -- the margins by name ------------------------------------------------------------------------
# CombinedMarginLoss points: name -> (m1, m2, m3, interclass filtering threshold)
COMBINED = {
    "arcface": (1.0, 0.5, 0.0, 0.0),
    "cosface": (1.0, 0.0, 0.4, 0.0),
    "combined": (0.9, 0.4, 0.15, 0.0),
    "arcface_filtered": (1.0, 0.5, 0.0, 0.25),
}
# The registry's other losses: name -> (registry name, loss_kwargs, head options, initial state)
LOSSES = {
    "curricularface": ("curricularface", {}, {}, {"t": 0.3}),
    "elasticface_arc": ("elasticface_arc", {"std": 0.1}, {}, {}),
    "elasticface_cos": ("elasticface_cos", {"std": 0.1}, {}, {}),
    "elasticface_arc_plus": ("elasticface_arc_plus", {"std": 0.1}, {}, {}),
    "elasticface_cos_plus": ("elasticface_cos_plus", {"std": 0.1}, {}, {}),
    "adaface": ("adaface", {}, {}, {"batch_mean": 19.0, "batch_std": 3.0}),
    "magface": ("magface", {"l_a": 5.0, "u_a": 40.0}, {}, {}),
    "arcface_torch_gradient": ("arcface", {}, {"margin_gradient": "arcface_torch"}, {}),
    # s = 150 and m = 0.6 push some rows' target probability below 1e-30
    "arcface_torch_clamping": (
        "cosface",
        {"m": 0.6},
        {"clamping": "arcface_torch", "s": 150.0},
        {},
    ),
}
# ElasticFace's fixed arguments (heads/margins/registry.py), for the references
ELASTIC = {
    "elasticface_arc": {"kind": "arc", "m": 0.5, "plus": False},
    "elasticface_cos": {"kind": "cos", "m": 0.35, "plus": False},
    "elasticface_arc_plus": {"kind": "arc", "m": 0.5, "plus": True},
    "elasticface_cos_plus": {"kind": "cos", "m": 0.35, "plus": True},
}


def make_margin(name):
    """Our margin loss ``name`` (a key of ``COMBINED`` or ``LOSSES``), state set as listed."""
    if name in COMBINED:
        m1, m2, m3, thr = COMBINED[name]
        return CombinedMarginLoss(S, m1, m2, m3, thr)
    loss, kw, opts, state = LOSSES[name]
    opts = dict(opts)
    s = opts.pop("s", S)
    margin = build_margin(loss, s, seed=MARGIN_SEED, loss_kwargs=kw, **opts)
    for key, value in state.items():
        getattr(margin, key).fill_(value)
    return margin


def make_head(name, rate, subcenters=1):
    """``PartialFC(D, C)`` with margin ``name`` at sample rate ``rate``."""
    return PartialFC(D, C, rate, make_margin(name), seed=HEAD_SEED, num_subcenters=subcenters)


# -- the problem ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    """What varies between the parity tests.

    subcenters: K rows per class (``(C K, D)`` centers).
    pull: ``None``: random centers ~0.01; ``"even"``: the centers of the even rows' classes pulled
        towards those rows, so target angles spread instead of all lying near 90 degrees;
        ``"subcenters"``: odd row i pulls sub-center ``i % K`` of its class, so target arg-maxes
        differ by row and margins act at spread-out angles.
    loss_scale: ``None``: ``loss.backward()`` and ``head.sparse_grad()``; a number: the step as
        DeepSpeed runs it under an fp16 loss scale (backward of the scaled loss, backbone
        gradients all-reduced and averaged over ranks, the head optimizer unscales).
    """

    subcenters: int = 1
    pull: str | None = None
    loss_scale: float | None = None


def make_problem(seed, n_rows, problem=Problem()):
    """(inputs (n_rows, D_IN), labels (one class positive twice), centers (C K, D), backbone)."""
    k = problem.subcenters
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n_rows, D_IN, generator=g)
    y = torch.randint(0, C, (n_rows,), generator=g)
    y[1] = y[0]  # a class that is positive twice
    centers = torch.randn(C * k, D, generator=g) * 0.01
    backbone = torch.nn.Linear(D_IN, D)
    with torch.no_grad():
        backbone.weight.copy_(torch.randn(D, D_IN, generator=g))
        backbone.bias.copy_(torch.randn(D, generator=g))
        if problem.pull == "even":
            centers[y[::2]] += 0.02 * F.normalize(backbone(z[::2]))
        elif problem.pull == "subcenters":
            pull = F.normalize(backbone(z))
            for i in range(n_rows):
                centers[y[i] * k + i % k] += 0.02 * pull[i] * (i % 2)
        elif problem.pull is not None:
            raise ValueError(f"unknown pull {problem.pull!r}")
    return z, y, centers, backbone


def shard(rank, world):
    """(first class, classes) of ``rank``'s shard of ``C`` over ``world`` ranks."""
    base, extra = divmod(C, world)
    n = base + (rank < extra)
    return rank * base + min(rank, extra), n


SIZES = {1: [12], 2: [7, 5], 3: [5, 0, 7]}  # rows per rank; rank 1 of 3 has none


def cases_for(world, names, first_seed, rates=(1.0, 0.3), sizes=SIZES, skip=None):
    """``(name, rows per rank, seed, sample rate)`` for each rate, then each name (seeds
    ``first_seed``, ``first_seed + 1``, ... by name); ``skip(name, rate)`` leaves cases out."""
    return [
        (name, sizes[world], first_seed + i, rate)
        for rate in rates
        for i, name in enumerate(names)
        if not (skip and skip(name, rate))
    ]


def close(actual, expected, rel=1e-5, what=""):
    """Max abs error within ``rel`` times the reference's largest magnitude."""
    scale = max(float(expected.abs().max()), 1.0)
    err = float((actual.double() - expected.double()).abs().max())
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel} * {scale:.3g}"


# -- our sharded head ----------------------------------------------------------------------------
def parity_worker(rank, world, cases, problem=Problem()):
    """Per case, this rank's: loss, embedding gradient, backbone gradients, its head rows (global
    ids) and their gradients, margin state after the step, head stats, and (under a loss scale)
    whether the head optimizer found the gradients finite. Gradients are unscaled."""
    import torch.distributed as dist

    k = problem.subcenters
    scale = problem.loss_scale or 1.0
    out = []
    for name, sizes, seed, rate in cases:
        z, y, centers, backbone = make_problem(seed, sum(sizes), problem)
        head = make_head(name, rate, k)
        start, n = head.class_start, head.num_local
        assert (start, n) == shard(rank, world)
        assert head.weight.shape == (n * k, D)
        with torch.no_grad():
            head.weight.copy_(centers[start * k : (start + n) * k])
        opt = build_head_optimizer(head, "sgd", lr=0.1) if problem.loss_scale else None
        off = sum(sizes[:rank])
        emb = backbone(z[off : off + sizes[rank]])
        emb.retain_grad()
        loss, stats = head(emb, y[off : off + sizes[rank]])
        finite = None
        if opt is None:
            loss.backward()
            rows, grad = head.sparse_grad()
        else:
            (loss * scale).backward()  # what engine.backward does with an fp16 loss scale
            for p in backbone.parameters():  # DeepSpeed: all-reduce and average over ranks
                dist.all_reduce(p.grad)
                p.grad /= world
            finite = opt.unscale_(scale)
            rows, grad = opt.grad_rows
        out.append(
            {
                "loss": loss.detach(),
                "emb_grad": emb.grad / scale,
                "bb_grad": [p.grad / scale for p in backbone.parameters()],
                "rows": rows + start * k,
                "grad": grad,
                "finite": finite,
                "stats": stats,
                "state": {kk: v.clone() for kk, v in head.margin_loss.state_dict().items()},
            }
        )
    return out


# -- the reference: the papers' formulas on the full logits ------------------------------------
def combined_logits(cos, onehot, m1, m2, m3, thr):
    """arcface_torch's CombinedMarginLoss: ``s (cos(m1 theta + m2) - m3)`` on the target (``s
    (cos - m3)`` exactly when m1 = 1, m2 = 0), negatives above ``thr`` zeroed (``thr > 0``)."""
    if thr > 0:
        cos = cos.masked_fill((cos > thr) & ~onehot, 0.0)
    ct = cos[onehot]
    target = ct - m3 if (m1, m2) == (1.0, 0.0) else torch.cos(m1 * torch.arccos(ct) + m2) - m3
    logits = torch.where(onehot, 0.0, cos * S)
    return logits.masked_scatter(onehot, S * target)


def reference_loss(emb, y, centers, m1, m2, m3, thr):
    """Mean CombinedMarginLoss softmax cross-entropy of ``emb`` over all of ``centers``."""
    cos = F.linear(F.normalize(emb), F.normalize(centers))
    onehot = F.one_hot(y, centers.shape[0]).bool()
    return F.cross_entropy(combined_logits(cos, onehot, m1, m2, m3, thr), y)


def ref_curricular(cos, onehot, norms, state, kw):
    m = 0.5
    ct = cos[onehot]
    t = 0.99 * state["t"] + 0.01 * ct.detach().mean()  # EMA before use (the paper's Eq. 9)
    ct_m = torch.cos(torch.arccos(ct) + m)
    final = torch.where(ct > math.cos(math.pi - m), ct_m, ct - m * math.sin(m))
    hard = cos > ct_m.detach().unsqueeze(1)
    logits = torch.where(hard, cos * (t + cos), cos)
    logits = logits.masked_scatter(onehot, final)
    return S * logits, 0.0, {"t": t}


def ref_elastic(cos, onehot, norms, state, kw):
    kind, plus = kw["kind"], kw["plus"]
    n = cos.shape[0]
    g = torch.Generator().manual_seed(MARGIN_SEED)
    margins = torch.normal(kw["m"], kw["std"], (n,), generator=g)
    ct = cos[onehot]
    if plus:  # larger target cosine -> smaller margin
        rank = torch.empty(n, dtype=torch.long)
        rank[torch.argsort(ct.detach(), descending=True)] = torch.arange(n)
        margins = margins.sort().values[rank]
    final = torch.cos(torch.arccos(ct) + margins) if kind == "arc" else ct - margins
    return S * cos.masked_scatter(onehot, final), 0.0, {}


def ref_adaface(cos, onehot, norms, state, kw):
    m, h, eps = 0.4, 0.333, 1e-3
    safe = norms.detach().clamp(0.001, 100)
    mean = 0.01 * safe.mean() + 0.99 * state["batch_mean"]
    std = 0.01 * safe.std() + 0.99 * state["batch_std"]
    z = ((safe - mean) / (std + eps) * h).clamp(-1, 1)
    ct = cos[onehot].clamp(-1 + eps, 1 - eps)
    theta = (torch.arccos(ct) - m * z).clamp(eps, math.pi - eps)  # g_angle = -m z
    final = torch.cos(theta) - (m + m * z)  # g_add = m z + m
    return S * cos.masked_scatter(onehot, final), 0.0, {"batch_mean": mean, "batch_std": std}


def ref_magface(cos, onehot, norms, state, kw):
    l_a, u_a, l_m, u_m, lam = kw["l_a"], kw["u_a"], 0.45, 0.8, 35.0
    a = norms.clamp(l_a, u_a)
    m = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m
    ct = cos[onehot]
    ct_m = ct * torch.cos(m) - torch.sqrt(1 - ct * ct) * torch.sin(m)  # cos(theta + m(a))
    final = torch.where(ct > torch.cos(math.pi - m), ct_m, ct - torch.sin(math.pi - m) * m)
    reg = lam * (1 / a + a / u_a**2).mean()
    return S * cos.masked_scatter(onehot, final), reg, {}


def ref_arcface_torch_gradient(cos, onehot, norms, state, kw):
    # margin value on the target, but the slope of a plain s * cos everywhere
    ct = cos[onehot]
    value = torch.cos(torch.arccos(ct) + 0.5)
    plain = S * cos
    return plain + (S * cos.masked_scatter(onehot, value) - plain).detach(), 0.0, {}


def ref_arcface_torch_clamping(cos, onehot, norms, state, kw):
    s = 150.0
    cos = cos.clamp(-1, 1)
    return s * cos.masked_scatter(onehot, cos[onehot] - 0.6), "clamp_p", {}


REFERENCES = {
    "curricularface": ref_curricular,
    "elasticface_arc": ref_elastic,
    "elasticface_cos": ref_elastic,
    "elasticface_arc_plus": ref_elastic,
    "elasticface_cos_plus": ref_elastic,
    "adaface": ref_adaface,
    "magface": ref_magface,
    "arcface_torch_gradient": ref_arcface_torch_gradient,
    "arcface_torch_clamping": ref_arcface_torch_clamping,
}


def reference_logits(name, cos, onehot, norms):
    """(logits, extra loss term or "clamp_p", margin state after the step) of margin ``name``."""
    if name in COMBINED:
        return combined_logits(cos, onehot, *COMBINED[name]), 0.0, {}
    _, kw, _, state = LOSSES[name]
    kw = {**kw, **ELASTIC.get(name, {})}
    state = {k: torch.tensor(v) for k, v in state.items()}
    return REFERENCES[name](cos, onehot, norms, state, kw)


def reference(case, problem=Problem(), kept=None):
    """One process, the classes ``kept`` (sorted class ids, all K sub-centers each; default all):
    loss, embedding, center and backbone gradients, margin state after the step, and the
    sub-centers the targets picked (Sub-center ArcFace's Eq. 2: the closest sub-center stands
    for the class; autograd's max routes the gradient to it)."""
    name, sizes, seed, _ = case
    n_rows, k = sum(sizes), problem.subcenters
    z, y, centers, backbone = make_problem(seed, n_rows, problem)
    if kept is None:
        kept = torch.arange(C)
    w = centers.view(C, k, D)[kept].reshape(-1, D).clone().requires_grad_(True)
    labels = torch.searchsorted(kept, y)
    emb = backbone(z)
    emb.retain_grad()
    sub = F.linear(F.normalize(emb), F.normalize(w))  # (N, M K)
    cos, arg = sub.view(n_rows, kept.numel(), k).max(dim=2)
    onehot = F.one_hot(labels, kept.numel()).bool()
    logits, extra, after = reference_logits(name, cos, onehot, emb.norm(dim=1))
    rows = F.cross_entropy(logits, labels, reduction="none")
    if extra == "clamp_p":  # arcface_torch: value of -log(max(p, 1e-30)), gradient unclamped
        value = rows.clamp_max(-math.log(1e-30)).mean()
        assert (rows > -math.log(1e-30)).any(), "the clamping case must clamp some row"
        loss = rows.mean()
    else:
        loss = value = rows.mean() + extra
    loss.backward()
    return {
        "loss": value.detach(),
        "emb_grad": emb.grad,
        "center_grad": w.grad,
        "bb_grad": [p.grad for p in backbone.parameters()],
        "state": after,
        "target_subcenters": set(arg[onehot].tolist()),
    }
