"""ReAct, ASH-P/B/S, SCALE, DICE, GradNorm, GEN, KL-matching against independent float64 formulas."""

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import entropy

from ood import Classifier, create_score
from ood.scores.ash import keep_count


def _rand(n=40, d=12, c=5, seed=0):
    rng = np.random.default_rng(seed)
    h = np.abs(rng.normal(size=(n, d))) * rng.uniform(0.5, 2, size=(n, 1))  # post-ReLU-like
    w, b = rng.normal(size=(c, d)), rng.normal(size=c)
    return h, w, b


def _t(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


def _fit_score(name, h_train, h, w, b, **kw):
    clf = Classifier.from_linear(_t(w), _t(b))
    s = create_score(name, **kw).fit_features(_t(h_train), _t(h_train @ w.T + b), None, clf)
    return s.score_features(_t(h), _t(h @ w.T + b)).numpy()


# ---- ReAct ---------------------------------------------------------------------------------------
def test_react_random_val_and_train_percentile():
    h_tr, w, b = _rand(seed=1)
    h_val, _, _ = _rand(30, seed=2)
    h, _, _ = _rand(25, seed=3)
    clf = Classifier.from_linear(_t(w), _t(b))
    s = create_score("react", percentile=85).fit_features(_t(h_tr), _t(h_tr @ w.T + b), None, clf,
                                                           val_features=_t(h_val), val_logits=_t(h_val @ w.T + b))
    c = np.percentile(h_val.ravel(), 85)
    assert s.threshold_ == pytest.approx(c) and s.info()["threshold_from"] == "val"
    ref = logsumexp(np.minimum(h, c) @ w.T + b, axis=1)
    np.testing.assert_allclose(s.score_features(_t(h), _t(h @ w.T + b)).numpy(), ref, rtol=1e-12)
    c_tr = np.percentile(h_tr.ravel(), 90)
    np.testing.assert_allclose(_fit_score("react", h_tr, h, w, b, source="train"),
                               logsumexp(np.minimum(h, c_tr) @ w.T + b, axis=1), rtol=1e-12)


def test_react_hand_case():
    w, b = np.eye(3), np.zeros(3)
    out = _fit_score("react", np.ones((2, 3)), np.array([[1.0, 2.0, 3.0]]), w, b, threshold=2.0)
    assert out[0] == pytest.approx(math.log(math.e + 2 * math.e ** 2), rel=1e-12)


# ---- ASH / SCALE ---------------------------------------------------------------------------------
def _ash_ref(h, p, mode):
    out = np.zeros_like(h)
    n = h.shape[1]
    k = n - round(n * p / 100)  # Python round: half to even, as numpy.round
    for i, row in enumerate(h):
        keep = np.argsort(-row)[:k]
        s1, s2 = row.sum(), row[keep].sum()
        if mode == "p":
            out[i, keep] = row[keep]
        elif mode == "b":
            out[i, keep] = s1 / k
        elif mode == "s":
            out[i, keep] = row[keep] * np.exp(s1 / s2)
        else:  # scale
            out[i] = row * np.exp(s1 / s2)
    return out


@pytest.mark.parametrize("name, mode", [("ash_p", "p"), ("ash_b", "b"), ("ash_s", "s"), ("scale", "scale")])
@pytest.mark.parametrize("p", [65, 85, 90])
def test_ash_and_scale_random(name, mode, p):
    h_tr, w, b = _rand(seed=4)
    h, _, _ = _rand(30, seed=5)
    ref = logsumexp(_ash_ref(h, p, mode) @ w.T + b, axis=1)
    np.testing.assert_allclose(_fit_score(name, h_tr, h, w, b, percentile=p), ref, rtol=1e-12)


def test_ash_hand_case_and_rounding():
    h = np.array([[1.0, 2.0, 3.0, 4.0]])
    w, b = np.eye(4), np.zeros(4)
    r = math.exp(10 / 7)
    cases = {"ash_p": [0, 0, 3, 4], "ash_b": [0, 0, 5, 5], "ash_s": [0, 0, 3 * r, 4 * r], "scale": [r, 2 * r, 3 * r, 4 * r]}
    for name, shaped in cases.items():
        expected = math.log(sum(math.exp(v) for v in shaped))
        assert _fit_score(name, h, h, w, b, percentile=50)[0] == pytest.approx(expected, rel=1e-12), name
    assert keep_count(5, 50) == 3 and keep_count(3, 50) == 1 and keep_count(512, 90) == 51  # 2.5 -> 2, 1.5 -> 2
    with pytest.raises(ValueError, match="prunes all"):
        keep_count(4, 99)
    with pytest.raises(ValueError, match="percentile"):
        create_score("ash_b", percentile=100)


# ---- DICE ----------------------------------------------------------------------------------------
def test_dice_random_and_hand():
    h_tr, w, b = _rand(seed=6)
    h, _, _ = _rand(20, seed=7)
    v = h_tr.mean(0)[None, :] * w
    mask = v > np.percentile(v.ravel(), 70)
    np.testing.assert_allclose(_fit_score("dice", h_tr, h, w, b, p=70), logsumexp(h @ (w * mask).T + b, axis=1), rtol=1e-12)
    w2 = np.array([[1.0, 2.0], [3.0, -1.0]])
    out = _fit_score("dice", np.ones((3, 2)), np.array([[1.0, 1.0]]), w2, np.zeros(2), p=50)  # keeps 2 and 3
    assert out[0] == pytest.approx(math.log(math.exp(2) + math.exp(3)), rel=1e-12)


# ---- GradNorm ------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_gradnorm_matches_per_sample_autograd(temperature):
    h_tr, w, b = _rand(seed=8)
    h, _, _ = _rand(10, seed=9)
    fc = torch.nn.Linear(w.shape[1], w.shape[0]).double()
    with torch.no_grad():
        fc.weight.copy_(_t(w)), fc.bias.copy_(_t(b))
    ref = []
    for row in _t(h):  # the official per-sample loop: target of ones, gradient w.r.t. W only
        fc.zero_grad()
        loss = torch.sum(-torch.log_softmax(fc(row[None]) / temperature, dim=1))
        loss.backward()
        ref.append(float(fc.weight.grad.abs().sum()))
    np.testing.assert_allclose(_fit_score("gradnorm", h_tr, h, w, b, temperature=temperature), ref, rtol=1e-10)


def test_gradnorm_hand_case():
    s = create_score("gradnorm").fit_features(torch.ones(2, 2), torch.zeros(2, 2), None,
                                               Classifier.from_linear(torch.eye(2)))
    out = s.score_features(torch.tensor([[1.0, -2.0], [1.0, 1.0]]), torch.tensor([[math.log(3), 0.0], [0.0, 0.0]]))
    np.testing.assert_allclose(out.numpy(), [3.0, 0.0], atol=1e-12)  # p = (.75, .25): |1.5-1| + |0.5-1| = 1


# ---- GEN -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma, M", [(0.1, 100), (0.5, 3), (2.0, 1)])
def test_gen_random(gamma, M):
    z = np.random.default_rng(10).normal(scale=3, size=(50, 7))
    p = np.exp(z - logsumexp(z, axis=1, keepdims=True))
    top = np.sort(p, axis=1)[:, ::-1][:, :M]
    ref = -np.sum(top ** gamma * (1 - top) ** gamma, axis=1)
    out = create_score("gen", gamma=gamma, M=M).score_logits(_t(z)).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-10)


def test_gen_near_one_hot_keeps_the_top_class_term():
    z = torch.tensor([[60.0, 0.0]], dtype=torch.float64)
    sig = math.exp(60) / (1 + math.exp(60)) ** 2  # p1 (1 - p1) = p2 (1 - p2), exactly
    expected = -2 * sig ** 0.1
    assert create_score("gen").score_logits(z)[0].item() == pytest.approx(expected, rel=1e-12)
    p = torch.softmax(z, 1)
    naive = -((p ** 0.1) * (1 - p) ** 0.1).sum().item()  # the official form loses the top term
    assert naive == pytest.approx(expected / 2, rel=1e-6)


# ---- KL matching ---------------------------------------------------------------------------------
def test_kl_matching_random_against_scipy():
    rng = np.random.default_rng(11)
    z_ref, z = rng.normal(scale=2, size=(60, 4)), rng.normal(scale=2, size=(15, 4))
    sm = lambda a: np.exp(a - logsumexp(a, axis=1, keepdims=True))
    p_ref, p = sm(z_ref), sm(z)
    pred = p_ref.argmax(1)
    templates = [p_ref[pred == k].mean(0) if (pred == k).any() else np.eye(4)[k] for k in range(4)]
    ref = [-min(entropy(row, d) for d in templates) for row in p]
    s = create_score("kl_matching", source="train").fit_features(_t(np.zeros((60, 2))), _t(z_ref), None, None)
    np.testing.assert_allclose(s.score_features(_t(np.zeros((15, 2))), _t(z)).numpy(), ref, rtol=1e-10)


def test_kl_matching_hand_case_val_reference_and_one_hot_fallback():
    s = create_score("kl_matching").fit_features(torch.zeros(2, 1), torch.zeros(2, 2), None, None,
                                                 val_features=torch.zeros(1, 1), val_logits=torch.zeros(1, 2))
    assert s.info()["reference_from"] == "val"
    torch.testing.assert_close(s.templates_, torch.tensor([[0.5, 0.5], [0.0, 1.0]], dtype=torch.float64))
    out = s.score_features(torch.zeros(1, 1), torch.tensor([[math.log(0.8), math.log(0.2)]]))
    assert out[0].item() == pytest.approx(-(0.8 * math.log(1.6) + 0.2 * math.log(0.4)), rel=1e-6)
