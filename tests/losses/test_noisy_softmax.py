import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

import lossbench
from lossbench import NoisySoftmaxHead
from lossbench.losses.noisy_softmax import noisy_target_logits


def _data(n=6, d=5, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64),
            torch.randn(c, d, generator=g, dtype=torch.float64),
            torch.randint(0, c, (n,), generator=g))


def _naive_loss(x, w, y, xi, alpha):
    """Per-sample CE with f'_y = f_y - alpha ||W_y|| ||x|| (1 - cos theta_y) |xi| (paper, Sec. 3)."""
    out = []
    for i in range(x.shape[0]):
        f = [float(x[i] @ w[j]) for j in range(w.shape[0])]
        yi = int(y[i])
        nw, nx = float(w[yi].norm()), float(x[i].norm())
        cos = f[yi] / (nw * nx)
        f[yi] = f[yi] - alpha * nw * nx * (1 - cos) * abs(float(xi[i]))
        lse = math.log(sum(math.exp(v) for v in f))
        out.append(lse - f[yi])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("alpha", [0.05, 0.1, 1.0])
def test_noisy_logits_match_naive(alpha):
    x, w, y = _data()
    xi = torch.randn(6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    logits = noisy_target_logits(x, w, y, xi, alpha)
    torch.testing.assert_close(F.cross_entropy(logits, y, reduction="none"), _naive_loss(x, w, y, xi, alpha))
    # only the target logit moves, and only downwards
    clean = x @ w.t()
    mask = F.one_hot(y, 4).bool()
    torch.testing.assert_close(logits[~mask], clean[~mask])
    assert (logits[mask] <= clean[mask] + 1e-12).all()


def test_head_uses_generator_draws_and_is_deterministic():
    x, w, y = _data()
    head = NoisySoftmaxHead(5, 4, alpha=0.3, sigma=2.0, reduction="none").double()
    with torch.no_grad():
        head.weight.copy_(w)
    head.generator = torch.Generator().manual_seed(11)
    out1 = head(x, y)
    head.generator = torch.Generator().manual_seed(11)
    out2 = head(x, y)
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)
    xi = torch.randn(6, generator=torch.Generator().manual_seed(11)) * 2.0  # same draws, float32
    torch.testing.assert_close(out1, _naive_loss(x, w, y, xi.double(), 0.3))
    head.generator = torch.Generator().manual_seed(12)
    assert not torch.allclose(head(x, y), out1)


def test_global_rng_determinism():
    x, w, y = _data()
    head = NoisySoftmaxHead(5, 4).double()
    torch.manual_seed(5)
    a = head(x, y)
    torch.manual_seed(5)
    b = head(x, y)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_noise_only_in_training_and_never_helps():
    x, w, y = _data(n=64)
    head = NoisySoftmaxHead(5, 4, alpha=0.5, reduction="none").double()
    with torch.no_grad():
        head.weight.copy_(w)
    clean = F.cross_entropy(x @ w.t(), y, reduction="none")
    torch.manual_seed(0)
    noisy = head(x, y)
    assert (noisy >= clean - 1e-12).all() and (noisy > clean + 1e-6).any()
    head.eval()
    torch.testing.assert_close(head(x, y), clean)
    torch.testing.assert_close(head.logits(x), x @ w.t())


def test_alpha_zero_is_plain_softmax():
    x, w, y = _data()
    head = NoisySoftmaxHead(5, 4, alpha=0.0).double()
    with torch.no_grad():
        head.weight.copy_(w)
    torch.testing.assert_close(head(x, y), F.cross_entropy(x @ w.t(), y))


def test_grad_through_noise_switch():
    x, w, y = _data()
    xi = torch.full((6,), 1.5, dtype=torch.float64)
    grads = []
    for flag in (True, False):
        wp = w.clone().requires_grad_()
        F.cross_entropy(noisy_target_logits(x, wp, y, xi, 0.5, flag), y).backward()
        grads.append(wp.grad)
    assert not torch.allclose(grads[0], grads[1])
    # detached: the gradient is that of CE on (clean logits + constant shift)
    shift = noisy_target_logits(x, w, y, xi, 0.5) - x @ w.t()
    wp = w.clone().requires_grad_()
    F.cross_entropy(x @ wp.t() + shift, y).backward()
    torch.testing.assert_close(grads[1], wp.grad)


def test_gradcheck_core():
    # grad_through_noise=True is the exact derivative; the detached variant is checked above.
    x, w, y = _data(n=3, d=3, c=3)
    xi = torch.tensor([0.7, -1.2, 2.0], dtype=torch.float64)
    fn = lambda a, b: F.cross_entropy(noisy_target_logits(a, b, y, xi, 0.4, True), y)
    assert gradcheck(fn, (x.requires_grad_(), w.requires_grad_()))


def test_gradcheck_head_with_reseeded_generator():
    x, _, y = _data(n=3, d=3, c=3)
    head = NoisySoftmaxHead(3, 3, alpha=0.4).double()

    def fn(feat):
        head.generator = torch.Generator().manual_seed(7)
        return head(feat, y)

    assert gradcheck(fn, (x.requires_grad_(),))


def test_norms_in_float32_under_autocast():
    x, w, y = _data(n=32, d=16, c=4)
    head = NoisySoftmaxHead(16, 4)
    head.generator = torch.Generator().manual_seed(0)
    ref = head(x.float(), y)
    head.generator = torch.Generator().manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(x.float(), y)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)


def test_create_by_name():
    head = lossbench.create_loss("noisy_softmax", num_classes=4, in_features=5, alpha=0.2, sigma=0.5,
                                 grad_through_noise=False)
    assert isinstance(head, NoisySoftmaxHead) and head.alpha == 0.2 and not head.grad_through_noise
    assert head.logits(torch.randn(2, 5)).shape == (2, 4)
    with pytest.raises(ValueError, match="alpha"):
        NoisySoftmaxHead(5, 4, alpha=-1.0)
