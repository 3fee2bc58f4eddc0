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


@pytest.mark.parametrize("scale", [1.8e19, 1e30, 1e38])
def test_float32_logits_past_the_square_overflow_match_float64(scale):
    """||z||^2 overflows float32 once |z| > ~1.8e19: z / inf = 0 made the loss log C for every row."""
    g = torch.Generator().manual_seed(2)
    z64 = torch.randn(6, 5, generator=g, dtype=torch.float64)
    z64 = z64 / z64.abs().amax() * scale
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    z32 = z64.float().requires_grad_()
    ref = z32.detach().double().requires_grad_()  # the same float32 values, computed in float64
    loss32, loss64 = LogitNormLoss()(z32, y), LogitNormLoss()(ref, y)
    torch.testing.assert_close(loss32.double(), loss64, rtol=1e-5, atol=1e-6)
    loss32.backward()
    loss64.backward()
    # d loss / d z scales as 1 / scale: compare the gradients in units of the logits' scale
    torch.testing.assert_close(z32.grad.double() * scale, ref.grad * scale, rtol=1e-4, atol=1e-5)
    assert loss32.item() != pytest.approx(math.log(5))  # not the constant of a zeroed row
