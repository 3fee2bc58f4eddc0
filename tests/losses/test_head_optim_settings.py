"""Head.optim_settings / param_groups: the declared recipes, and WCDAS's scale learning with them."""

import pytest
import torch

import lossbench
from lossbench.losses import L2SVMHead, LinearHead, WCDASHead
from ood.calibration import expected_calibration_error


def _by_name(groups):
    return {n: g for g in groups for n in g["names"]}


def test_default_groups_follow_timm_rule():
    head = LinearHead(8, 3, torch.nn.CrossEntropyLoss())
    assert head.optim_settings() == {}
    g = _by_name(head.param_groups(1e-3, 0.05))
    assert g["fc.weight"]["weight_decay"] == 0.05 and g["fc.bias"]["weight_decay"] == 0.0
    assert g["fc.weight"]["lr"] == 1e-3 and g["fc.bias"]["lr"] == 1e-3


def test_wcdas_declares_scale_lr_and_no_decay():
    head = WCDASHead(8, 3)
    g = _by_name(head.param_groups(2e-3, 0.05))
    assert g["s_raw"]["lr"] == pytest.approx(1.0)
    assert g["s_raw"]["weight_decay"] == 0.0 and g["g"]["weight_decay"] == 0.0 and g["g"]["lr"] == 2e-3
    assert g["weight"]["weight_decay"] == 0.05
    official = _by_name(WCDASHead(8, 3, scale_lr=None).param_groups(0.2, 5e-4))
    assert official["s_raw"]["lr"] == pytest.approx(0.2)
    assert "s_raw" not in _by_name(WCDASHead(8, 3, s_trainable=False).param_groups(0.1, 0.0))


@pytest.mark.parametrize("cls", [L2SVMHead, lossbench.L1SVMHead])
def test_svm_heads_get_no_optimiser_decay(cls):
    g = _by_name(cls(8, 3).param_groups(1e-3, 0.05))
    assert g["fc.weight"]["weight_decay"] == 0.0


def test_bad_settings_raise():
    class Bad(WCDASHead):
        def optim_settings(self):
            return {"nope": {"lr": 1.0}}

    with pytest.raises(ValueError, match="nope"):
        Bad(4, 3).param_groups(1e-3, 0.0)

    class BadKey(WCDASHead):
        def optim_settings(self):
            return {"g": {"momentum": 0.5}}

    with pytest.raises(ValueError, match="momentum"):
        BadKey(4, 3).param_groups(1e-3, 0.0)


def _head_only_run(groups_fn, steps=150):
    """WCDAS on fixed Gaussian-cluster features, AdamW at 2e-3, like the digits benchmark's ~150 steps."""
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(6, 32, generator=g) * 0.5
    y = torch.arange(1200) % 6
    x = mu[y] + torch.randn(1200, 32, generator=g)
    torch.manual_seed(1)
    head = WCDASHead(32, 6)
    opt = torch.optim.AdamW(groups_fn(head), lr=2e-3)
    for _ in range(steps):
        i = torch.randint(0, 600, (64,))
        loss = head(x[i], y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(head.scale), expected_calibration_error(head.logits(x[600:]), y[600:])


def test_wcdas_scale_grows_with_declared_recipe():
    s_plain, ece_plain = _head_only_run(lambda h: h.parameters())
    s_declared, ece_declared = _head_only_run(lambda h: h.param_groups(2e-3, 0.05))
    assert s_plain < 3.0  # moves ~lr per step: stuck near 1 + log 2
    assert s_declared > 30 * s_plain / 3
    assert ece_declared < ece_plain - 0.2
