"""Focal loss and the FLSD-53 schedule against float64 formulas; gamma = 0 is cross-entropy."""

import math

import pytest
import torch
import torch.nn.functional as F

import lossbench
from lossbench.losses import FocalLoss, flsd53_gamma


def _reference(z, y, gamma=None):
    out = []
    for zi, yi in zip(z.tolist(), y.tolist()):
        m = max(zi)
        lse = m + math.log(sum(math.exp(v - m) for v in zi))
        p = math.exp(zi[yi] - lse)
        g = gamma if gamma is not None else (5.0 if p < 0.2 else 3.0)
        out.append(-((1 - p) ** g) * math.log(p))
    return torch.tensor(out, dtype=torch.float64)


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(12, 4, generator=g, dtype=torch.float64) * 2.5
    return z, torch.arange(12) % 4


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0, 3.0])
def test_fixed_gamma_matches_formula(gamma):
    z, y = _data()
    torch.testing.assert_close(FocalLoss(gamma, reduction="none")(z, y), _reference(z, y, gamma),
                               rtol=1e-12, atol=1e-12)


def test_flsd53_matches_formula_and_covers_both_branches():
    z, y = _data(1)
    p = torch.softmax(z, 1).gather(1, y[:, None]).squeeze(1)
    assert bool((p < 0.2).any()) and bool((p >= 0.2).any())
    torch.testing.assert_close(FocalLoss(schedule="flsd53", reduction="none")(z, y), _reference(z, y),
                               rtol=1e-12, atol=1e-12)
    assert flsd53_gamma(torch.tensor([0.1, 0.2, 0.49, 0.5, 0.9])).tolist() == [5.0, 3.0, 3.0, 3.0, 3.0]


def test_gamma_zero_is_cross_entropy_and_gradcheck():
    z, y = _data(2)
    torch.testing.assert_close(FocalLoss(0.0)(z, y), F.cross_entropy(z, y))
    zz = z[:4].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: FocalLoss(2.0)(t, y[:4]), (zz,))
    assert torch.autograd.gradcheck(lambda t: FocalLoss(schedule="flsd53")(t, y[:4]), (zz,))


def test_registered_and_errors():
    assert isinstance(lossbench.create_loss("focal", num_classes=4, gamma=3.0), FocalLoss)
    with pytest.raises(ValueError, match="schedule"):
        FocalLoss(schedule="flsd")
    with pytest.raises(ValueError, match="gamma"):
        FocalLoss(gamma=-1.0)
    with pytest.raises(ValueError, match="logits contains"):
        FocalLoss()(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]))
