"""Regression tests for losses that gave a wrong number, or an obscure error, without saying why."""

import math

import pytest
import torch
import torch.nn.functional as F

import lossbench
from lossbench import (
    CrossEntropyLoss, EnergyMarginLoss, GumbelSoftmaxLoss, NBCSoftmaxHead, WCDASHead, ZLoss,
    build_head, create_loss, list_losses,
)

C, D = 4, 6


def _features(n=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g).to(dtype), torch.arange(n) % C


# -- 4. empty batch: every loss and head raises one clear ValueError ---------------------------
@pytest.mark.parametrize("name", list_losses())
def test_empty_batch_is_a_clear_error_for_every_head(name):
    head = build_head(name, num_classes=C, in_features=D)
    with pytest.raises(ValueError, match="empty"):
        head(torch.zeros(0, D), torch.zeros(0, dtype=torch.long))


@pytest.mark.parametrize("name", [n for n in list_losses() if lossbench.registry.get_loss_entry(n).kind == "logits"])
def test_empty_batch_is_a_clear_error_for_every_logit_loss(name):
    loss = create_loss(name, num_classes=C)
    with pytest.raises(ValueError, match="empty"):
        loss(torch.zeros(0, C), torch.zeros(0, dtype=torch.long))


# -- 5. fp16 overflow of the log-partition penalty ---------------------------------------------
def test_log_partition_penalty_does_not_overflow_in_fp16():
    logits = torch.full((2, C), 255.0)
    logits[:, 0] = 256.0
    target = torch.tensor([0, 1])
    crit = CrossEntropyLoss(log_partition_coef=1e-4)
    ref = crit(logits.double(), target)
    got = crit(logits.half(), target)
    assert torch.isfinite(got)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_energy_margin_does_not_overflow_in_fp16():
    loss = EnergyMarginLoss()
    li = torch.full((2, C), -1000.0)  # E_in = +998.6: (E_in - m_in)^2 ~ 1e6
    lo = torch.full((2, C), -30.0)
    ref = loss(li.double(), lo.double())
    got = loss(li.half(), lo.half())
    assert torch.isfinite(got) and float(ref) > 65504  # beyond fp16's range, so it must not be cast there
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0)


# -- 6. silent parameter changes ----------------------------------------------------------------
def test_gumbel_tau_below_the_schedule_floor_is_refused():
    with pytest.raises(ValueError, match="tau_min"):
        GumbelSoftmaxLoss(tau=0.3)
    loss = GumbelSoftmaxLoss(tau=0.3, anneal=False)  # a fixed temperature stays what was asked
    loss.on_step(0)
    assert loss.tau == 0.3
    loss = GumbelSoftmaxLoss(tau=0.3, tau_min=0.1)
    loss.on_step(0)
    assert loss.tau == 0.3


def test_energy_margin_float64_is_computed_in_float64():
    li = torch.full((1, 3), 1.0, dtype=torch.float64) + 1e-12 * torch.arange(3, dtype=torch.float64)
    lo = torch.zeros(1, 3, dtype=torch.float64)
    loss = EnergyMarginLoss(m_in=-30.0, m_out=30.0, weight=1.0)
    e_in = -torch.logsumexp(li, 1)
    e_out = -torch.logsumexp(lo, 1)
    ref = F.relu(e_in + 30.0).pow(2).mean() + F.relu(30.0 - e_out).pow(2).mean()
    got = loss(li, lo)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-14, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_hyper_parameters_are_refused(bad):
    from ood import MSP, ODIN, Energy, Mahalanobis

    for ctor, kw in [(MSP, "temperature"), (Energy, "temperature"), (ODIN, "temperature"),
                     (Mahalanobis, "fgsm_eps"), (EnergyMarginLoss, "m_in"), (ZLoss, "b"),
                     (GumbelSoftmaxLoss, "tau"), (CrossEntropyLoss, "log_partition_coef")]:
        with pytest.raises(ValueError, match=kw):
            ctor(**{kw: bad})
    with pytest.raises(ValueError, match="eps_grid"):
        Mahalanobis(eps_grid=(0.0, bad))
    for score in (ODIN, Mahalanobis):
        with pytest.raises(ValueError, match="input_std"):
            score(input_std=(0.2, bad, 0.2))
    with pytest.raises(ValueError, match="g_init"):
        WCDASHead(D, C, g_init=bad)


# -- 7. Z-loss with two classes has an identically zero gradient --------------------------------
def test_z_loss_refuses_two_classes():
    with pytest.raises(ValueError, match="2 classes"):
        create_loss("zloss", num_classes=2)
    with pytest.raises(ValueError, match="2 classes"):
        ZLoss()(torch.randn(3, 2), torch.tensor([0, 1, 0]))
    ZLoss(num_classes=3)(torch.randn(3, 3), torch.tensor([0, 1, 2]))


# -- 8. bounded gradients at exact zeros --------------------------------------------------------
def test_wcdas_gradient_is_bounded_at_a_zero_feature_row():
    torch.manual_seed(0)
    head = WCDASHead(D, C)
    f, y = _features()
    f[0] = 0.0
    f.requires_grad_(True)
    head(f, y).backward()
    assert torch.isfinite(f.grad).all()
    assert f.grad.abs().max() < 100.0, f.grad.abs().max()


def test_nbc_gradient_is_bounded_at_a_zero_class_centre():
    torch.manual_seed(0)
    head = NBCSoftmaxHead(D, C, r=1.0)
    f, y = _features(n=8)
    f[y == 0] = 0.0  # class 0's centre is exactly zero
    f.requires_grad_(True)
    head(f, y).backward()
    assert torch.isfinite(f.grad).all()
    assert f.grad.abs().max() < 100.0, f.grad.abs().max()


# -- 9. one dtype rule everywhere: int targets converted, low-precision inputs in float32 -------
@pytest.mark.parametrize("name", list_losses())
@pytest.mark.parametrize("tdtype", [torch.int32, torch.int16, torch.uint8])
def test_any_integer_target_dtype_matches_long(name, tdtype):
    torch.manual_seed(0)
    head = build_head(name, num_classes=C, in_features=D).eval()
    f, y = _features()
    torch.testing.assert_close(head(f, y.to(tdtype)), head(f, y))


@pytest.mark.parametrize("name", list_losses())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_features_outside_autocast(name, dtype):
    torch.manual_seed(0)
    head = build_head(name, num_classes=C, in_features=D).eval()
    f, y = _features(dtype=dtype)
    ref = head.double()(f.double(), y)
    got = head.float()(f, y)
    assert torch.isfinite(got)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_class_weighted_ce_with_low_precision_logits(dtype):
    w = torch.tensor([1.0, 2.0, 0.5, 1.0])
    logits = torch.randn(5, C).to(dtype)
    y = torch.tensor([0, 1, 2, 3, 1])
    ref = F.cross_entropy(logits.double(), y, weight=w.double())
    torch.testing.assert_close(CrossEntropyLoss(weight=w)(logits, y).double(), ref, rtol=1e-5, atol=1e-6)


def test_nan_number_helper_names_the_argument():
    from lossbench.validation import check_number

    assert check_number(2, "x") == 2.0
    with pytest.raises(ValueError, match="alpha"):
        check_number(math.nan, "alpha")
    with pytest.raises(TypeError, match="alpha"):
        check_number("a", "alpha")
