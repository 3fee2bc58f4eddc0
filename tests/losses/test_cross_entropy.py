import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

import lossbench
from lossbench import CrossEntropyLoss, log_partition_penalty


def _data(n=7, c=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=dtype) * 3
    target = torch.randint(0, c, (n,), generator=g)
    return logits, target


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("use_ignore", [False, True])
def test_matches_torch_cross_entropy_exactly(reduction, label_smoothing, use_weight, use_ignore):
    logits, target = _data(dtype=torch.float32)
    weight = torch.rand(5, generator=torch.Generator().manual_seed(1)) + 0.5 if use_weight else None
    ignore_index = -100
    if use_ignore:
        ignore_index = 3
        target[:2] = 3
    ours = CrossEntropyLoss(weight, ignore_index, reduction, label_smoothing)(logits, target)
    ref = F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index,
                          reduction=reduction, label_smoothing=label_smoothing)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_weighted_mean_divides_by_summed_target_weights():
    logits, target = _data()
    weight = torch.arange(1.0, 6.0, dtype=torch.float64)
    per = -torch.log_softmax(logits, 1)[torch.arange(7), target] * weight[target]
    ours = CrossEntropyLoss(weight=weight)(logits, target)
    torch.testing.assert_close(ours, per.sum() / weight[target].sum())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_log_partition_penalty_naive_float64(reduction):
    logits, target = _data()
    target[0] = -100
    coef = 1e-2
    ours = CrossEntropyLoss(reduction=reduction, log_partition_coef=coef)(logits, target)
    rows = []
    for i in range(7):
        if int(target[i]) == -100:
            rows.append((0.0, 0.0, False))
            continue
        lse = torch.log(torch.exp(logits[i]).sum())
        ce = lse - logits[i, target[i]]
        rows.append((float(ce), float(coef * lse ** 2), True))
    per = torch.tensor([ce + pen for ce, pen, _ in rows], dtype=torch.float64)
    kept = sum(k for *_, k in rows)
    expected = {"none": per, "sum": per.sum(), "mean": per.sum() / kept}[reduction]
    torch.testing.assert_close(ours, expected)


def test_penalty_is_zero_at_zero_log_partition_and_not_called_z_loss():
    logits = torch.log(torch.full((3, 4), 0.25, dtype=torch.float64))  # logsumexp = 0
    torch.testing.assert_close(log_partition_penalty(logits), torch.zeros((), dtype=torch.float64))
    assert "zloss" in lossbench.list_losses() and lossbench.create_loss("zloss").__class__ is not CrossEntropyLoss


def test_gradcheck_with_penalty_and_smoothing():
    logits, target = _data(n=4, c=3)
    loss = CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64),
                            label_smoothing=0.1, log_partition_coef=0.3)
    assert gradcheck(lambda x: loss(x, target), (logits.requires_grad_(),))


def test_create_by_name_with_list_weight():
    loss = lossbench.create_loss("ce", num_classes=5, weight=[1, 2, 3, 4, 5], log_partition_coef=1e-4)
    logits, target = _data(dtype=torch.float32)
    w = torch.tensor([1.0, 2, 3, 4, 5])
    ref = F.cross_entropy(logits, target, weight=w) + 1e-4 * (torch.logsumexp(logits, 1) ** 2).mean()
    torch.testing.assert_close(loss(logits, target), ref)


def test_bad_weight_and_options():
    with pytest.raises(ValueError, match="weight"):
        CrossEntropyLoss(weight=torch.ones(3))(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="reduction"):
        CrossEntropyLoss(reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        CrossEntropyLoss(label_smoothing=1.5)
    with pytest.raises(ValueError, match="log_partition_coef"):
        CrossEntropyLoss(log_partition_coef=-1.0)
