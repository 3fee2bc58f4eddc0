"""LogitNorm against a float64 formula written out per sample."""

import math

import pytest
import torch

import lossbench
from lossbench.losses import LogitNormLoss, logit_norm


def _reference(z, y, tau, eps):
    out = []
    for zi, yi in zip(z.tolist(), y.tolist()):
        norm = math.sqrt(sum(v * v for v in zi)) + eps
        u = [v / (tau * norm) for v in zi]
        m = max(u)
        out.append(m + math.log(sum(math.exp(v - m) for v in u)) - u[yi])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("tau", [0.04, 0.01, 1.0])
def test_matches_float64_formula(tau):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 5, generator=g, dtype=torch.float64) * 3
    y = torch.tensor([0, 1, 2, 3, 4, 0, 2])
    ref = _reference(z, y, tau, 1e-7)
    torch.testing.assert_close(LogitNormLoss(tau=tau, reduction="none")(z, y), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(LogitNormLoss(tau=tau)(z, y), ref.mean(), rtol=1e-12, atol=1e-12)


def test_scale_invariant_and_gradcheck():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 1])
    loss = LogitNormLoss(eps=0.0)
    torch.testing.assert_close(loss(z * 100, y), loss(z, y))
    assert torch.autograd.gradcheck(lambda t: LogitNormLoss()(t, y), (z,))
    assert torch.allclose(logit_norm(z, 0.04, 0.0).norm(dim=1), torch.full((4,), 25.0, dtype=torch.float64))


def test_registered_defaults_and_errors():
    loss = lossbench.create_loss("logitnorm", num_classes=5)
    assert isinstance(loss, LogitNormLoss) and loss.tau == 0.04 and loss.eps == 1e-7
    with pytest.raises(ValueError, match="tau"):
        LogitNormLoss(tau=0.0)
    with pytest.raises(ValueError, match="target"):
        LogitNormLoss()(torch.zeros(2, 3), torch.tensor([0, 5]))
