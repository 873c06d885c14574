"""CombinedMarginLoss against the formulas written out here; safety at theta = 0 and pi."""

from __future__ import annotations

import math

import pytest
import torch

from heads import CombinedMarginLoss

S = 64.0


def formula(c: float, m1: float, m2: float, m3: float) -> float:
    return S * (math.cos(m1 * math.acos(c) + m2) - m3)


@pytest.mark.parametrize(
    "m", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.4), (0.9, 0.4, 0.15), (1.35, 0.0, 0.0)]
)
def test_target_logit_matches_formula_and_others_are_scaled(m):
    torch.manual_seed(0)
    cos = torch.rand(5, 7, dtype=torch.float64) * 1.8 - 0.9
    labels = torch.tensor([0, 3, -1, 6, 3])
    out = CombinedMarginLoss(S, *m)(cos, labels)
    for i, y in enumerate(labels.tolist()):
        for j in range(7):
            want = formula(float(cos[i, j]), *m) if j == y else S * float(cos[i, j])
            assert out[i, j].item() == pytest.approx(want, rel=1e-9, abs=1e-9)
    # the row whose target is elsewhere is only scaled
    assert torch.equal(out[2], cos[2] * S)


@pytest.mark.parametrize("m", [(1.0, 0.5, 0.0), (0.9, 0.4, 0.15)])
def test_target_gradient_matches_derivative_of_formula(m):
    m1, m2, m3 = m
    c = torch.tensor([-0.7, -0.1, 0.3, 0.85], dtype=torch.float64, requires_grad=True)
    CombinedMarginLoss(S, m1, m2, m3).target_logit(c).sum().backward()
    theta = torch.arccos(c.detach())
    # d/dc cos(m1*acos(c) + m2) = m1 * sin(m1*theta + m2) / sin(theta)
    want = S * m1 * torch.sin(m1 * theta + m2) / torch.sin(theta)
    torch.testing.assert_close(c.grad, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("m", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.4), (0.9, 0.4, 0.15)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_and_gradients_finite_at_theta_zero_and_pi(m, dtype):
    near = [1.0, 1.0 - 1e-7, 1.0 - 1e-12, -1.0, -1.0 + 1e-7, 0.0, 1.0 + 1e-7]
    c = torch.tensor(near, dtype=dtype, requires_grad=True)
    out = CombinedMarginLoss(S, *m).target_logit(c)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(c.grad).all()
    # at theta = 0 the value is the formula's limit s * (cos(m2) - m3)
    assert out[0].item() == pytest.approx(S * (math.cos(m[1]) - m[2]), abs=1e-3)
    # at theta = pi: s * (cos(m1 * pi + m2) - m3)
    assert out[3].item() == pytest.approx(S * (math.cos(m[0] * math.pi + m[1]) - m[2]), abs=1e-3)
    if dtype == torch.float64:  # the value stays the exact formula right next to theta = 0
        assert out[1].item() == pytest.approx(formula(1.0 - 1e-7, *m), rel=1e-12)


def test_cosface_gradient_is_exactly_s():
    c = torch.tensor([1.0, 0.2, -1.0], requires_grad=True)
    CombinedMarginLoss(S, 1.0, 0.0, 0.4).target_logit(c).sum().backward()
    assert torch.equal(c.grad, torch.full_like(c, S))


def test_interclass_filtering_zeroes_non_target_logits_above_threshold():
    cos = torch.tensor(
        [
            [0.9, 0.5, 0.1, -0.4],  # target 0 (above threshold, kept)
            [0.35, 0.2, 0.31, 0.6],  # target 3
            [0.7, 0.2, 0.29, 0.4],  # target elsewhere: every entry is non-target
        ],
        dtype=torch.float64,
        requires_grad=True,
    )
    labels = torch.tensor([0, 3, -1])
    margin = CombinedMarginLoss(S, 1.0, 0.0, 0.4, interclass_filtering_threshold=0.3)
    out = margin(cos, labels)
    c = cos.detach()
    want = torch.tensor(
        [
            [S * (0.9 - 0.4), 0.0, S * 0.1, S * -0.4],
            [0.0, S * 0.2, 0.0, S * (0.6 - 0.4)],
            [0.0, S * 0.2, S * 0.29, 0.0],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(out, want)
    out.sum().backward()
    filtered = torch.tensor([[0, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(cos.grad[filtered], torch.zeros(int(filtered.sum()), dtype=c.dtype))
    assert torch.equal(cos.grad[~filtered], torch.full((int((~filtered).sum()),), S, dtype=c.dtype))
    # threshold 0 disables filtering
    assert CombinedMarginLoss(S, 1.0, 0.0, 0.4).filter_mask(c, labels) is None


def test_bad_parameters_and_labels_raise_naming_the_field():
    with pytest.raises(ValueError, match="s must be > 0"):
        CombinedMarginLoss(s=0.0)
    with pytest.raises(ValueError, match="m2 and m3 must be >= 0"):
        CombinedMarginLoss(m2=-0.1)
    with pytest.raises(ValueError, match=r"interclass_filtering_threshold must be in \[0, 1\)"):
        CombinedMarginLoss(interclass_filtering_threshold=1.0)
    with pytest.raises(ValueError, match=r"labels must be in \[-1, 4\)"):
        CombinedMarginLoss()(torch.zeros(2, 4), torch.tensor([0, 4]))
