import math

import pytest
import torch
import torch.nn as nn

from lossbench import LinearHead
from ood import MSP, ODIN, Energy, MaxLogit, create_score, list_scores
from ood.scores.base import LogitScore

from conftest import LinearFeatureModel, loader

LOGITS = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [-3.0, 5.0, 4.5], [100.0, -100.0, 99.0]])


def naive_msp(l, t=1.0):
    out = []
    for row in l.tolist():
        z = [v / t for v in row]
        m = max(z)
        e = [math.exp(v - m) for v in z]
        out.append(max(e) / sum(e))
    return torch.tensor(out, dtype=torch.float64)


def naive_energy(l, t=1.0):
    out = []
    for row in l.tolist():
        z = [v / t for v in row]
        m = max(z)
        out.append(t * (m + math.log(sum(math.exp(v - m) for v in z))))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("t", [1.0, 2.0, 1000.0])
def test_msp_matches_formula(t):
    s = MSP(temperature=t).score_logits(LOGITS)
    assert s.dtype == torch.float64 and s.shape == (4,)
    torch.testing.assert_close(s, naive_msp(LOGITS, t))
    torch.testing.assert_close(s[1], torch.tensor(1 / 3, dtype=torch.float64))


@pytest.mark.parametrize("t", [1.0, 0.5, 10.0])
def test_energy_matches_formula(t):
    s = Energy(temperature=t).score_logits(LOGITS)
    torch.testing.assert_close(s, naive_energy(LOGITS, t))
    # constant logits c over C classes: T log C + c
    torch.testing.assert_close(s[1], torch.tensor(t * math.log(3), dtype=torch.float64))


def test_energy_is_stable_and_not_softmax_invariant():
    big = torch.tensor([[1000.0, 999.0], [1.0, 0.0]])
    s = Energy().score_logits(big)
    assert torch.isfinite(s).all()
    torch.testing.assert_close(s[0] - s[1], torch.tensor(999.0, dtype=torch.float64))
    m = MSP().score_logits(big)
    torch.testing.assert_close(m[0], m[1])  # MSP ignores a shift, energy does not


def test_maxlogit():
    torch.testing.assert_close(MaxLogit().score_logits(LOGITS),
                               torch.tensor([2.0, 0.0, 5.0, 100.0], dtype=torch.float64))


@pytest.mark.parametrize("cls", [MSP, Energy, MaxLogit])
def test_model_and_head_paths_agree_with_logits(cls):
    torch.manual_seed(0)
    head = LinearHead(6, 3, nn.CrossEntropyLoss())
    feats = torch.randn(10, 6)
    score = cls()
    expected = score.score_logits(head.logits(feats).detach())
    torch.testing.assert_close(score.score_head(head, feats), expected)
    model = LinearFeatureModel(5, 6, 3)
    x = torch.randn(20, 5, dtype=torch.float64)
    torch.testing.assert_close(score.score(model, loader(x, batch_size=7)),
                               score.score_logits(model(x).detach()))


@pytest.mark.parametrize("bad, err", [
    (torch.tensor([1.0, 2.0]), ValueError),
    (torch.tensor([[1, 2]]), TypeError),
    (torch.tensor([[1.0, float("nan")]]), ValueError),
    (torch.tensor([[1.0, float("inf")]]), ValueError),
    ([[1.0, 2.0]], TypeError),
])
@pytest.mark.parametrize("cls", [MSP, Energy, MaxLogit, ODIN])
def test_bad_logits(cls, bad, err):
    with pytest.raises(err, match="logits"):
        cls().score_logits(bad)


def test_empty_loader_raises():
    model = LinearFeatureModel(5, 6, 3)
    with pytest.raises(ValueError, match="no samples"):
        Energy().score(model, [])


@pytest.mark.parametrize("kw", [{"temperature": 0.0}, {"temperature": -1.0}])
def test_bad_temperature(kw):
    with pytest.raises(ValueError, match="temperature"):
        MSP(**kw)
    with pytest.raises(ValueError, match="temperature"):
        Energy(**kw)


def test_registry():
    assert {"msp", "energy", "maxlogit", "odin", "mahalanobis"} <= set(list_scores())
    assert isinstance(create_score("energy", temperature=2.0), Energy)
    assert create_score("ENERGY").temperature == 1.0
    with pytest.raises(ValueError, match="unknown OOD score name .nope'.*energy"):
        create_score("nope")
    with pytest.raises(TypeError, match="'tau'.*temperature"):
        create_score("msp", tau=2.0)


def test_odin_no_preprocessing_is_tempered_msp():
    torch.testing.assert_close(ODIN(temperature=1000.0).score_logits(LOGITS), naive_msp(LOGITS, 1000.0))


@pytest.mark.parametrize("eps", [0.0, 0.0014, 0.01])
def test_odin_preprocessing_step_in_closed_form(eps):
    """x' = x - eps * sign(-grad log S_y(x; T)) with grad = (W_y - sum_c p_c W_c) A / T for a linear model."""
    torch.manual_seed(1)
    model = LinearFeatureModel(5, 4, 3)
    x = torch.randn(12, 5, dtype=torch.float64)
    t = 1000.0
    W = model.fc.weight.detach() @ model.A.detach()  # logits = x W^T + b
    b = model.fc.bias.detach()
    logits = x @ W.T + b
    p = torch.softmax(logits / t, dim=1)
    y = logits.argmax(1)
    grad_log_s = (W[y] - p @ W) / t
    sign = torch.where(grad_log_s > 0, 1.0, -1.0).double()  # no exact zeros here
    x_ref = x + eps * sign
    ref = torch.softmax((x_ref @ W.T + b) / t, dim=1).amax(1)
    odin = ODIN(temperature=t, eps=eps)
    torch.testing.assert_close(odin.preprocess(model, x), x_ref)
    torch.testing.assert_close(odin.score(model, loader(x, batch_size=5)), ref)
    if eps > 0:  # the step raises the score
        assert (ref >= odin.score_logits(logits) - 1e-15).all()


def test_odin_input_std_scales_step():
    model = LinearFeatureModel(3, 4, 3)
    x = torch.randn(4, 3, dtype=torch.float64)
    a = ODIN(eps=0.01).preprocess(model, x) - x
    b = ODIN(eps=0.01, input_std=(0.5, 0.25, 1.0)).preprocess(model, x) - x
    torch.testing.assert_close(b, a / torch.tensor([0.5, 0.25, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="input_std"):
        ODIN(input_std=(0.0,))
    with pytest.raises(ValueError, match="eps"):
        ODIN(eps=-0.1)


def test_base_class_is_abstract():
    with pytest.raises(TypeError):
        LogitScore()
