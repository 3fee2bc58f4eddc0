"""The 'cce' head: registered, trains through linear_cross_entropy, logits() materialise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lossbench
from lossbench import build_head, create_loss, list_losses
from lossbench.cce import CutCrossEntropyHead


def test_registered_and_exported():
    assert "cce" in list_losses()
    assert lossbench.linear_cross_entropy is lossbench.cce.linear_cross_entropy
    for name in ("linear_logsumexp", "linear_max_softmax", "linear_topk"):
        assert hasattr(lossbench, name)
    head = build_head("cce", num_classes=13, in_features=6)
    assert isinstance(head, CutCrossEntropyHead)
    assert head.weight.shape == (13, 6) and head.bias.shape == (13,)


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_forward_matches_cross_entropy_on_logits(softcap, label_smoothing):
    torch.manual_seed(0)
    head = create_loss("cce", num_classes=40, in_features=7, softcap=softcap,
                       label_smoothing=label_smoothing, class_weight=torch.rand(40) + 0.5)
    x = torch.randn(9, 7)
    t = torch.randint(0, 40, (9,))
    loss = head(x, t)
    ref = F.cross_entropy(head.logits(x), t, weight=head.class_weight,
                          label_smoothing=label_smoothing)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    g = torch.autograd.grad(loss, [head.weight, head.bias])
    r = torch.autograd.grad(ref, [head.weight, head.bias])
    for a, b in zip(g, r):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_head_checks_features_and_hyperparameters():
    head = create_loss("cce", num_classes=5, in_features=3)
    with pytest.raises(ValueError, match="features"):
        head(torch.randn(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="temperature"):
        create_loss("cce", num_classes=5, in_features=3, temperature=2.0)
    with pytest.raises(ValueError, match="class_weight"):
        create_loss("cce", num_classes=5, in_features=3, class_weight=[1.0, 2.0])
