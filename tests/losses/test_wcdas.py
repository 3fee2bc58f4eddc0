import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

import lossbench
from lossbench import WCDASHead
from lossbench.losses.wcdas import wrapped_cauchy_logits


def _naive_logits(x, w, g, s):
    """The paper's / official form: s (1 - rho^2) / (2 pi (1 + rho^2 - 2 rho cos)), rho = sigmoid(g)."""
    out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float64)
    for i in range(x.shape[0]):
        for c in range(w.shape[0]):
            cos = float(x[i] @ w[c]) / (float(x[i].norm()) * float(w[c].norm()))
            rho = 1 / (1 + math.exp(-float(g[c])))
            out[i, c] = s * (1 - rho ** 2) / (2 * math.pi * (1 + rho ** 2 - 2 * rho * cos))
    return out


def _data(n=6, d=5, c=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float64), torch.randint(0, c, (n,), generator=gen)


@pytest.mark.parametrize("g_init", [-1.0, 0.0, 1.0, 3.0])
@pytest.mark.parametrize("s_trainable", [True, False])
def test_logits_and_loss_match_naive_float64(g_init, s_trainable):
    x, y = _data()
    head = WCDASHead(5, 4, g_init=g_init, s_trainable=s_trainable).double()
    with torch.no_grad():
        head.g.add_(torch.linspace(-0.5, 0.5, 4, dtype=torch.float64))
    s = 1.0 + math.log(2.0) if s_trainable else 250.0
    ref = _naive_logits(x, head.weight.detach(), head.g.detach(), s)
    torch.testing.assert_close(head.logits(x), ref)
    torch.testing.assert_close(head(x, y), F.cross_entropy(ref, y))


def test_parameterisation_matches_official_code():
    head = WCDASHead(5, 4)
    assert float(head.scale.detach()) == pytest.approx(1.0 + math.log(2.0))  # softplus(0) + 1 ~ 1.69
    torch.testing.assert_close(head.rho, torch.full((4,), 0.5))  # g = 0 (CIFAR-LT config)
    names = {n for n, _ in head.named_parameters()}
    assert names == {"weight", "g", "s_raw"}
    fixed = WCDASHead(5, 4, s_trainable=False, s=250.0)
    assert {n for n, _ in fixed.named_parameters()} == {"weight", "g"} and float(fixed.scale) == 250.0


def test_rho_stays_below_one_and_is_stable():
    x, y = _data()
    head = WCDASHead(5, 4, g_init=60.0, s_trainable=False)
    assert (head.rho < 1).all()
    xf = x.float().requires_grad_()
    loss = head(xf, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(xf.grad).all() and torch.isfinite(head.weight.grad).all()
    # aligned feature and weight: cos = 1 exactly, the peak of the kernel stays finite
    aligned = head.weight.detach()[:2].clone()
    assert torch.isfinite(head.logits(aligned)).all()


def test_float32_under_bf16_autocast():
    x, y = _data(n=16, d=8)
    head = WCDASHead(8, 4, g_init=2.0)
    ref = head.logits(x.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head.logits(x.float().bfloat16())
        loss = head(x.float(), y)
    assert out.dtype == torch.float32 and loss.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)


def test_gradcheck():
    x, _ = _data(n=3, d=3, c=3)
    w = torch.randn(3, 3, dtype=torch.float64)
    g = torch.tensor([-1.0, 0.2, 1.5], dtype=torch.float64)
    s = torch.tensor(2.0, dtype=torch.float64)
    assert gradcheck(wrapped_cauchy_logits, (x.requires_grad_(), w.requires_grad_(), g.requires_grad_(),
                                             s.requires_grad_()))


def test_scale_and_concentration_are_trained():
    x, y = _data()
    head = WCDASHead(5, 4).double()
    head(x, y).backward()
    assert head.g.grad is not None and head.g.grad.abs().sum() > 0
    assert head.s_raw.grad is not None and head.s_raw.grad.abs() > 0


def test_create_by_name():
    head = lossbench.create_loss("wcdas", num_classes=4, in_features=5, g_init=-1.0)
    assert isinstance(head, WCDASHead)
    torch.testing.assert_close(head.g.detach(), torch.full((4,), -1.0))
    with pytest.raises(ValueError, match="rho_eps"):
        WCDASHead(5, 4, rho_eps=0.0)


@pytest.mark.parametrize("scale", [1e19, 1e30, 1e38])
def test_float32_features_past_the_square_overflow_match_float64(scale):
    """||x||^2 overflows float32 once |x| > ~1.8e19: x / inf = 0 gave cos theta = 0 to every class."""
    x, y = _data(n=8, d=5)
    head = WCDASHead(5, 4, g_init=1.0)
    x32 = (x / x.abs().amax() * scale).float()
    ref = head.logits(x32 / scale)  # cosines are scale-free: the logits of the same directions
    torch.testing.assert_close(head.logits(x32), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head(x32, y).double(), copy.deepcopy(head).double()(x32.double(), y),
                               rtol=1e-5, atol=1e-6)


def test_near_zero_feature_rows_get_a_bounded_gradient():
    """The norm is clamped at norm_eps (F.normalize's form): below it the gradient stops growing as 1/||x||.

    With the 1e-12 floor a row of norm 1e-9 got a gradient ~1e7 times that of a unit row."""
    head = WCDASHead(5, 4, g_init=1.0).double()
    x, y = _data(n=4, d=5, seed=1)
    unit = x / x.norm(dim=1, keepdim=True)
    grads = {}
    for norm in (1.0, 1e-7, 1e-9):
        xx = unit.clone()
        xx[0] *= norm
        xx.requires_grad_()
        head(xx, y).backward()
        grads[norm] = xx.grad[0].norm().item()
    assert head.norm_eps == 1e-3
    assert grads[1e-9] == pytest.approx(grads[1e-7], rel=1e-3)  # linear regime x / norm_eps: no 1/||x||
    assert grads[1e-9] <= grads[1.0] / head.norm_eps * 10
    assert grads[1e-9] < 1e4
    with pytest.raises(ValueError, match="norm_eps"):
        WCDASHead(5, 4, norm_eps=0.0)
