import pytest
import torch
import torch.nn as nn
from torch.autograd import gradcheck

import lossbench
from lossbench import CrammerSingerLoss, L1SVMHead, L2SVMHead, WestonWatkinsLoss


def _data(n=7, c=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=gen, dtype=torch.float64) * 2, torch.randint(0, c, (n,), generator=gen)


def _naive_ww(s, y, margin, p):
    out = []
    for i in range(s.shape[0]):
        yi = int(y[i])
        out.append(sum(max(0.0, margin - float(s[i, yi]) + float(s[i, j])) ** p
                       for j in range(s.shape[1]) if j != yi))
    return torch.tensor(out, dtype=torch.float64)


def _naive_cs(s, y, margin, p):
    out = []
    for i in range(s.shape[0]):
        yi = int(y[i])
        best = max(float(s[i, j]) for j in range(s.shape[1]) if j != yi)
        out.append(max(0.0, margin + best - float(s[i, yi])) ** p)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("margin", [1.0, 0.5])
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_weston_watkins_equals_multimargin_divided_by_c(p, margin, use_weight, reduction):
    s, y = _data()
    weight = torch.rand(5, dtype=torch.float64) + 0.5 if use_weight else None
    ref = nn.MultiMarginLoss(p=p, margin=margin, weight=weight, reduction=reduction)(s, y)
    ours = WestonWatkinsLoss(margin, p, weight, divide_by_classes=True, reduction=reduction)(s, y)
    torch.testing.assert_close(ours, ref)
    plain = WestonWatkinsLoss(margin, p, weight, reduction=reduction)(s, y)
    torch.testing.assert_close(plain, ref * 5)


@pytest.mark.parametrize("p", [1, 2])
def test_weston_watkins_and_crammer_singer_naive(p):
    s, y = _data()
    torch.testing.assert_close(WestonWatkinsLoss(p=p, reduction="none")(s, y), _naive_ww(s, y, 1.0, p))
    torch.testing.assert_close(CrammerSingerLoss(margin=0.7, p=p, reduction="none")(s, y), _naive_cs(s, y, 0.7, p))


def test_crammer_singer_is_at_most_weston_watkins():
    s, y = _data(n=50)
    assert (CrammerSingerLoss(reduction="none")(s, y) <= WestonWatkinsLoss(reduction="none")(s, y) + 1e-12).all()


@pytest.mark.parametrize("cls,p", [(L1SVMHead, 1), (L2SVMHead, 2)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_one_vs_rest_heads_match_naive(cls, p, reduction):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (6,), generator=gen)
    head = cls(3, 4, C=0.5, weight_penalty=0.1, reduction=reduction).double()
    w, b = head.fc.weight.detach(), head.fc.bias.detach()
    hinge = 0.0
    for i in range(6):
        for c in range(4):
            t = 1.0 if c == int(y[i]) else -1.0
            score = float(x[i] @ w[c] + b[c])
            hinge += max(0.0, 1 - t * score) ** p
    if reduction == "mean":
        hinge /= 24
    expected = 0.1 * float((w ** 2).sum()) / 12 + 0.5 * hinge  # mean(W^2) + C * hinge (CNN-SVM code)
    torch.testing.assert_close(head(x, y), torch.tensor(expected, dtype=torch.float64))


def test_svm_logits_are_raw_scores_for_argmax():
    head = L2SVMHead(3, 4)
    x = torch.randn(5, 3)
    torch.testing.assert_close(head.logits(x), head.fc(x))


@pytest.mark.parametrize("name", ["svm_l1", "svm_l2"])
def test_gradcheck_heads(name):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (4,), generator=gen)
    head = lossbench.create_loss(name, num_classes=3, in_features=3).double()
    # fixed seed: no hinge kink lies within the finite-difference step
    assert gradcheck(lambda t: head(t, y), (x.requires_grad_(),), atol=1e-5)


@pytest.mark.parametrize("cls", [WestonWatkinsLoss, CrammerSingerLoss])
@pytest.mark.parametrize("p", [1, 2])
def test_gradcheck_multiclass(cls, p):
    s, y = _data(n=4, c=3, seed=3)
    loss = cls(p=p)
    assert gradcheck(lambda t: loss(t, y), (s.requires_grad_(),))


def test_bad_power_and_registry():
    with pytest.raises(ValueError, match="p must be"):
        WestonWatkinsLoss(p=3)
    with pytest.raises(ValueError, match="reduction"):
        L1SVMHead(3, 4, reduction="none")
    assert isinstance(lossbench.create_loss("multimargin_ww", num_classes=3, in_features=2), WestonWatkinsLoss)
    assert isinstance(lossbench.create_loss("multimargin_cs", num_classes=3), CrammerSingerLoss)
