import math

import pytest
import torch
from torch.autograd import gradcheck

import lossbench
from lossbench import ZLoss, z_loss


def _naive(logits, target, a, b):
    out = []
    for o, y in zip(logits.tolist(), target.tolist()):
        d = len(o)
        mu = sum(o) / d
        sigma = math.sqrt(sum(v * v for v in o) / d - mu * mu)  # population std, as in the paper
        z = (o[y] - mu) / sigma
        out.append(math.log1p(math.exp(a * (b - z))) / a)
    return torch.tensor(out, dtype=torch.float64)


def _data(n=6, c=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g, dtype=torch.float64) * 2, torch.randint(0, c, (n,), generator=g)


@pytest.mark.parametrize("a,b", [(1.0, 0.0), (0.1, 10.0), (3.0, -1.0), (2.0, 2.5)])
def test_matches_naive_float64(a, b):
    logits, target = _data()
    ours = z_loss(logits, target, a=a, b=b, reduction="none")
    torch.testing.assert_close(ours, _naive(logits, target, a, b))
    torch.testing.assert_close(ZLoss(a, b)(logits, target), _naive(logits, target, a, b).mean())


@pytest.mark.parametrize("alpha", [1e-3, 0.5, 7.0, 1e3])
@pytest.mark.parametrize("beta", [-40.0, 0.0, 13.0])
def test_shift_and_scale_invariance(alpha, beta):
    logits, target = _data()
    loss = ZLoss(a=0.5, b=3.0, reduction="none")
    torch.testing.assert_close(loss(alpha * logits + beta, target), loss(logits, target))


def test_not_invariant_to_sign_flip():
    logits, target = _data()
    assert not torch.allclose(z_loss(-logits, target), z_loss(logits, target))


def test_constant_logits_are_guarded():
    logits = torch.full((3, 5), 4.0, requires_grad=True)
    loss = z_loss(logits, torch.tensor([0, 1, 2]), a=2.0, b=1.0)
    torch.testing.assert_close(loss, torch.tensor(math.log1p(math.exp(2.0)) / 2.0))
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_gradcheck():
    logits, target = _data(n=3, c=4)
    assert gradcheck(lambda x: z_loss(x, target, a=0.7, b=1.5), (logits.requires_grad_(),))


def test_registry_and_bad_args():
    loss = lossbench.create_loss("zloss", num_classes=7, in_features=3, a=2.0, b=1.0)
    assert isinstance(loss, ZLoss) and loss.a == 2.0 and loss.b == 1.0
    with pytest.raises(ValueError, match="a must be"):
        ZLoss(a=0.0)
    with pytest.raises(ValueError, match="at least 3 classes"):
        z_loss(torch.zeros(2, 1), torch.tensor([0, 0]))


@pytest.mark.parametrize("scale", [1.8e19, 1e30, 1e38])
def test_float32_logits_past_the_square_overflow_match_float64(scale):
    """sigma^2 overflows float32 once |o| > ~1.8e19: the loss was a constant (softplus(0) or the eps branch)."""
    logits, target = _data(seed=3)
    z32 = (logits / logits.abs().amax() * scale).float().requires_grad_()
    ref = z32.detach().double().requires_grad_()
    loss32, loss64 = z_loss(z32, target, a=2.0, b=0.5), z_loss(ref, target, a=2.0, b=0.5)
    torch.testing.assert_close(loss32.double(), loss64, rtol=1e-5, atol=1e-6)
    loss32.backward()
    loss64.backward()
    torch.testing.assert_close(z32.grad.double() * scale, ref.grad * scale, rtol=1e-4, atol=1e-5)
