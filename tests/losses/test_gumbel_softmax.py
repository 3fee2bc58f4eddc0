import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

import lossbench
from lossbench import GumbelSoftmaxLoss, GumbelTemperatureSchedule, gumbel_softmax
from lossbench.losses.gumbel_softmax import gumbel_softmax_from_noise, sample_gumbel


def _torch_noise(logits, seed):
    """The Gumbel noise F.gumbel_softmax draws for ``logits`` after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return -torch.empty_like(logits, memory_format=torch.legacy_contiguous_format).exponential_().log()


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("tau", [0.3, 1.0, 2.5])
def test_matches_torch_gumbel_softmax_with_same_noise(hard, tau):
    logits = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    g = _torch_noise(logits, 123)
    torch.manual_seed(123)
    ref = F.gumbel_softmax(logits, tau=tau, hard=hard)
    torch.testing.assert_close(gumbel_softmax_from_noise(logits, g, tau, hard), ref)


def test_naive_formula_float64():
    logits = torch.randn(3, 4, dtype=torch.float64)
    g = sample_gumbel((3, 4), torch.float64, generator=torch.Generator().manual_seed(1))
    u_ref = torch.rand(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(g, -torch.log(-torch.log(u_ref)))
    y = gumbel_softmax_from_noise(logits, g, tau=0.7)
    num = torch.exp((logits + g) / 0.7)
    torch.testing.assert_close(y, num / num.sum(1, keepdim=True))


def test_sampler_is_finite_when_uniform_hits_0_or_1(monkeypatch):
    for value in (0.0, 1.0):
        monkeypatch.setattr(torch, "rand", lambda *s, value=value, **k: torch.full(tuple(s[0]), value))
        g = sample_gumbel((4, 3))
        assert torch.isfinite(g).all()
        y = gumbel_softmax(torch.zeros(4, 3), tau=0.1)
        assert torch.isfinite(y).all()


def test_gumbel_max_frequencies_and_mean():
    logits = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    gen = torch.Generator().manual_seed(0)
    g = sample_gumbel((40000, 4), generator=gen)
    assert abs(float(g.mean()) - 0.5772156649) < 0.01  # Euler-Mascheroni constant
    y = gumbel_softmax(logits.expand(40000, 4), tau=0.5, hard=True, generator=gen)
    freq = y.mean(0)
    torch.testing.assert_close(freq, logits.exp(), atol=0.01, rtol=0)


def test_minus_inf_logits_are_masked_without_nan():
    logits = torch.tensor([[0.0, float("-inf"), 1.0], [float("-inf"), 2.0, float("-inf")]], requires_grad=True)
    for hard in (False, True):
        y = gumbel_softmax(logits, tau=0.5, hard=hard, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(y).all()
        assert y[0, 1] == 0 and y[1, 0] == 0 and y[1, 2] == 0
        (y * torch.arange(3.0)).sum().backward()
        assert torch.isfinite(logits.grad).all()
        logits.grad = None


def test_invalid_logits_rejected():
    with pytest.raises(ValueError, match="every category is -inf"):
        gumbel_softmax(torch.full((2, 3), float("-inf")))
    with pytest.raises(ValueError, match="NaN"):
        gumbel_softmax(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="tau"):
        gumbel_softmax(torch.zeros(2, 3), tau=0.0)


def test_straight_through_forward_one_hot_backward_soft():
    logits = torch.randn(5, 4, dtype=torch.float64)
    g = sample_gumbel((5, 4), torch.float64, generator=torch.Generator().manual_seed(2))
    w = torch.randn(5, 4, dtype=torch.float64)
    l1 = logits.clone().requires_grad_()
    y_hard = gumbel_softmax_from_noise(l1, g, 0.5, hard=True)
    assert ((y_hard == 0) | (y_hard == 1)).all() and (y_hard.sum(1) == 1).all()
    (y_hard * w).sum().backward()
    l2 = logits.clone().requires_grad_()
    (gumbel_softmax_from_noise(l2, g, 0.5) * w).sum().backward()
    torch.testing.assert_close(l1.grad, l2.grad)


@pytest.mark.parametrize("step", [0, 1, 499, 999, 1000, 2500, 10_000, 10**6])
@pytest.mark.parametrize("rate,every", [(1e-4, 1000), (1e-5, 500), (3e-5, 2000)])
def test_schedule_formula(step, rate, every):
    sched = GumbelTemperatureSchedule(rate=rate, every=every)
    expected = max(0.5, math.exp(-rate * every * (step // every)))
    assert sched(step) == pytest.approx(expected, rel=1e-12)


def test_loss_on_step_anneals_tau():
    loss = GumbelSoftmaxLoss(anneal_rate=1e-3, anneal_every=10)
    loss.on_step(5)
    assert loss.tau == 1.0
    loss.on_step(10)
    assert loss.tau == pytest.approx(math.exp(-0.01))
    loss.on_step(10**6)
    assert loss.tau == 0.5
    fixed = GumbelSoftmaxLoss(tau=2.0, anneal=False)
    fixed.on_step(10**6)
    assert fixed.tau == 2.0


def _loss_data(n=6, c=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=gen, dtype=torch.float64), torch.randint(0, c, (n,), generator=gen)


def test_relaxed_loss_matches_naive_float64():
    logits, target = _loss_data()
    loss = GumbelSoftmaxLoss(tau=0.7, reduction="none", generator=torch.Generator().manual_seed(4))
    out = loss(logits, target)
    g = sample_gumbel(logits.shape, torch.float64, generator=torch.Generator().manual_seed(4))
    y = gumbel_softmax_from_noise(logits, g, 0.7)
    torch.testing.assert_close(out, -torch.log(y[torch.arange(6), target]))


def test_hard_loss_is_sample_error_with_soft_gradient():
    logits, target = _loss_data()
    loss = GumbelSoftmaxLoss(tau=0.7, hard=True, reduction="none", generator=torch.Generator().manual_seed(4))
    out = loss(logits, target)
    g = sample_gumbel(logits.shape, torch.float64, generator=torch.Generator().manual_seed(4))
    wrong = ((logits + g).argmax(1) != target).double()
    torch.testing.assert_close(out, wrong)


def test_eval_mode_is_noise_free_and_seeded_training_is_deterministic():
    logits, target = _loss_data()
    loss = GumbelSoftmaxLoss(tau=0.5)
    torch.manual_seed(0)
    a = loss(logits, target)
    torch.manual_seed(0)
    torch.testing.assert_close(loss(logits, target), a, rtol=0, atol=0)
    loss.eval()
    torch.testing.assert_close(loss(logits, target), F.cross_entropy(logits / 0.5, target))


@pytest.mark.parametrize("hard", [False, True])
def test_gradcheck(hard):
    logits, target = _loss_data(n=3, c=4)
    g = sample_gumbel((3, 4), torch.float64, generator=torch.Generator().manual_seed(0))
    if not hard:
        assert gradcheck(lambda x: gumbel_softmax_from_noise(x, g, 0.6), (logits.clone().requires_grad_(),))
    loss = GumbelSoftmaxLoss(tau=0.6, hard=hard)

    def fn(x):
        loss.generator = torch.Generator().manual_seed(9)
        return loss(x, target)

    if hard:  # the straight-through gradient is by design not the forward's derivative: check it is the soft one
        x = logits.clone().requires_grad_()
        fn(x).backward()
        x2 = logits.clone().requires_grad_()
        y = gumbel_softmax_from_noise(x2, sample_gumbel((3, 4), torch.float64,
                                                        generator=torch.Generator().manual_seed(9)), 0.6)
        (-y[torch.arange(3), target].mean()).backward()
        torch.testing.assert_close(x.grad, x2.grad)
    else:
        assert gradcheck(fn, (logits.clone().requires_grad_(),))


def test_create_by_name():
    loss = lossbench.create_loss("gumbel_softmax", num_classes=5, in_features=3, tau=2.0,
                                 anneal_rate=1e-5, anneal_every=500)
    assert isinstance(loss, GumbelSoftmaxLoss) and loss.tau == 2.0 and loss.schedule.every == 500
