import math

import pytest
import torch

import lossbench
from lossbench import EnergyMarginLoss


def naive(l_in, l_out, m_in, m_out, w):
    def e(row):
        m = max(row)
        return -(m + math.log(sum(math.exp(v - m) for v in row)))
    a = sum(max(0.0, e(r) - m_in) ** 2 for r in l_in.tolist()) / len(l_in)
    b = sum(max(0.0, m_out - e(r)) ** 2 for r in l_out.tolist()) / len(l_out)
    return w * (a + b)


@pytest.mark.parametrize("m_in, m_out, w", [(-23.0, -5.0, 0.1), (-27.0, -5.0, 0.1), (-2.0, 1.0, 1.0)])
def test_matches_formula(m_in, m_out, w):
    g = torch.Generator().manual_seed(0)
    l_in = torch.randn(7, 10, generator=g, dtype=torch.float64) * 8
    l_out = torch.randn(5, 10, generator=g, dtype=torch.float64) * 8
    loss = EnergyMarginLoss(m_in, m_out, w)(l_in, l_out)
    torch.testing.assert_close(loss, torch.tensor(naive(l_in, l_out, m_in, m_out, w), dtype=torch.float64))


def test_defaults_and_zero_inside_margins():
    crit = EnergyMarginLoss()
    assert (crit.m_in, crit.m_out, crit.weight) == (-23.0, -5.0, 0.1)
    l_in = torch.full((3, 10), 30.0)   # E = -30 - log 10 < -23
    l_out = torch.zeros(4, 10)         # E = -log 10 > -5
    assert crit(l_in, l_out).item() == 0.0


def test_gradient_lowers_id_energy_and_raises_ood_energy():
    l_in = torch.zeros(2, 4, requires_grad=True)
    l_out = torch.full((2, 4), 10.0, requires_grad=True)
    EnergyMarginLoss()(l_in, l_out).backward()
    assert (l_in.grad < 0).all()   # descending raises ID logits -> lower energy
    assert (l_out.grad > 0).all()  # descending lowers outlier logits -> higher energy


def test_exported_not_registered():
    assert "EnergyMarginLoss" in lossbench.__all__
    assert not any("energy" in n for n in lossbench.list_losses())


def test_bad_input():
    crit = EnergyMarginLoss()
    with pytest.raises(ValueError, match="logits_in must be 2-D"):
        crit(torch.zeros(3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="logits_out contains"):
        crit(torch.zeros(2, 3), torch.tensor([[float("nan"), 0.0, 0.0]]))
    with pytest.raises(ValueError, match="same number of classes"):
        crit(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="logits_out is empty"):
        crit(torch.zeros(2, 3), torch.zeros(0, 3))
    with pytest.raises(ValueError, match="m_in"):
        EnergyMarginLoss(m_in=0.0, m_out=-5.0)
    with pytest.raises(ValueError, match="weight"):
        EnergyMarginLoss(weight=-1.0)
