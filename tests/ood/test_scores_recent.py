"""Mahalanobis++ / RMDS++, NCI, VRA and WeiPer+KLD against independent float64 transcriptions of their formulas."""

import numpy as np
import pytest
import torch
from scipy.special import logsumexp, softmax

from ood import Classifier, ScoreNotApplicable, create_score
from ood.registry import get_score_class


def _t(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


def _data(n=90, d=6, c=3, seed=0, relu=False):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    centres = rng.normal(size=(c, d)) * 2
    h = centres[y] + rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, size=(n, 1))
    if relu:
        h = np.maximum(h, 0.0)
    w, b = rng.normal(size=(c, d)), rng.normal(size=c)
    return h, y, w, b


def _fit(name, h_tr, y, w, b, val=None, **kw):
    s = create_score(name, **kw)
    extra = {} if val is None else {"val_features": _t(val), "val_logits": _t(val @ w.T + b)}
    s.fit_features(_t(h_tr), _t(h_tr @ w.T + b), torch.as_tensor(y), Classifier.from_linear(_t(w), _t(b)), **extra)
    return s


def _score(s, h, w, b):
    return s.score_features(_t(h), _t(h @ w.T + b)).numpy()


# ---- Mahalanobis++ / RMDS++ ------------------------------------------------------------------------
def _gauss(f, y, c):
    """Class means and the pseudo-inverse of the tied MLE covariance of the class-centred rows."""
    means = np.stack([f[y == k].mean(0) for k in range(c)])
    centred = f - means[y]
    return means, np.linalg.pinv(centred.T @ centred / len(f))


def _md(f, means, prec):
    diff = f[:, None, :] - means[None, :, :]
    return np.einsum("nkd,de,nke->nk", diff, prec, diff)


def _unit(f):
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def test_mds_norm_and_rmds_norm_match_the_formula():
    h_tr, y, w, b = _data(seed=1)
    h, _, _, _ = _data(25, seed=2)
    hn_tr, hn = _unit(h_tr), _unit(h)
    means, prec = _gauss(hn_tr, y, 3)
    md = _md(hn, means, prec)
    mu0, prec0 = _gauss(hn_tr, np.zeros(len(hn_tr), dtype=int), 1)
    md0 = _md(hn, mu0, prec0)[:, 0]
    np.testing.assert_allclose(_score(_fit("mds_norm", h_tr, y, w, b), h, w, b), -md.min(1), rtol=1e-8)
    np.testing.assert_allclose(_score(_fit("rmds_norm", h_tr, y, w, b), h, w, b), md0 - md.min(1), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name, plain", [("mds_norm", "mds"), ("rmds_norm", "rmds")])
def test_normalised_scores_ignore_the_feature_scale_at_fit_and_test(name, plain):
    h_tr, y, w, b = _data(seed=3)
    h, _, _, _ = _data(20, seed=4)
    rng = np.random.default_rng(5)
    ref = _score(_fit(name, h_tr, y, w, b), h, w, b)
    scaled_tr = h_tr * rng.uniform(0.1, 10.0, size=(len(h_tr), 1))  # the background fit sees this too
    scaled = h * rng.uniform(0.1, 10.0, size=(len(h), 1))
    np.testing.assert_allclose(_score(_fit(name, scaled_tr, y, w, b), scaled, w, b), ref, rtol=1e-7, atol=1e-9)
    # the plain score is not scale invariant, so the normalisation is what makes the difference
    assert not np.allclose(_score(_fit(plain, scaled_tr, y, w, b), scaled, w, b), _score(_fit(plain, h_tr, y, w, b), h, w, b))


def test_mds_norm_zero_feature_is_finite():
    h_tr, y, w, b = _data(seed=6)
    out = _score(_fit("mds_norm", h_tr, y, w, b), np.zeros((2, 6)), w, b)
    means, prec = _gauss(_unit(h_tr), y, 3)
    np.testing.assert_allclose(out, -_md(np.zeros((2, 6)), means, prec).min(1), rtol=1e-10)


# ---- NCI ------------------------------------------------------------------------------------------
def _nci_ref(h, h_tr, w, b, alpha):
    mu = h_tr.mean(0)
    pred = np.argmax(h @ w.T + b, axis=1)
    c = h - mu
    return np.einsum("nd,nd->n", w[pred], c) / np.linalg.norm(c, axis=1) + alpha * np.abs(h).sum(1)


@pytest.mark.parametrize("alpha", [1e-4, 1e-1, 0.0])
def test_nci_matches_the_formula(alpha):
    h_tr, y, w, b = _data(seed=7, relu=True)
    h, _, _, _ = _data(30, seed=8, relu=True)
    out = _score(_fit("nci", h_tr, y, w, b, alpha=alpha), h, w, b)
    np.testing.assert_allclose(out, _nci_ref(h, h_tr, w, b, alpha), rtol=1e-10)


def test_nci_hand_case_and_the_train_mean():
    w, b = np.array([[2.0, 0.0], [0.0, 1.0]]), np.zeros(2)
    h_tr = np.array([[1.0, 1.0], [3.0, 1.0]])  # mean (2, 1)
    s = _fit("nci", h_tr, [0, 1], w, b, alpha=0.5)
    # h = (5, 1): class 0, h - mu = (3, 0): 2*3/3 + 0.5*6 = 5;  h = mu: 0/0 -> 0, + 0.5*3
    np.testing.assert_allclose(_score(s, np.array([[5.0, 1.0], [2.0, 1.0]]), w, b), [5.0, 1.5], rtol=1e-12)


def test_nci_grid_and_needs_a_linear_head():
    assert get_score_class("nci").GRID == {"alpha": (1e-4, 1e-3, 1e-2, 1e-1)}
    h_tr, y, _, _ = _data(seed=9)
    with pytest.raises(ScoreNotApplicable, match="linear"):
        create_score("nci").fit_features(_t(h_tr), _t(h_tr[:, :3]), None, Classifier(logits_fn=lambda f: f[:, :3]))
    with pytest.raises(ValueError, match="alpha"):
        create_score("nci", alpha=float("nan"))


# ---- VRA ------------------------------------------------------------------------------------------
def test_vra_openood_clip_from_val_percentiles():
    h_tr, y, w, b = _data(seed=10, relu=True)
    val, _, _, _ = _data(40, seed=11, relu=True)
    h, _, _, _ = _data(30, seed=12, relu=True)
    s = _fit("vra", h_tr, y, w, b, val=val, percentile_low=5, percentile_high=85)
    lo, hi = np.percentile(val.ravel(), 5), np.percentile(val.ravel(), 85)
    ref = logsumexp(np.clip(h, lo, hi) @ w.T + b, axis=1)
    np.testing.assert_allclose(_score(s, h, w, b), ref, rtol=1e-12)
    assert s.info()["threshold_from"] == "val" and s.info()["threshold_low"] == pytest.approx(lo)
    # without validation data the training features give the thresholds
    s_tr = _fit("vra", h_tr, y, w, b)
    lo, hi = np.percentile(h_tr.ravel(), 10), np.percentile(h_tr.ravel(), 90)
    np.testing.assert_allclose(_score(s_tr, h, w, b), logsumexp(np.clip(h, lo, hi) @ w.T + b, axis=1), rtol=1e-12)


@pytest.mark.parametrize("gamma", [0.0, 0.6])
def test_vra_official_rule_per_dimension_train_quantiles(gamma):
    h_tr, y, w, b = _data(seed=13, relu=True)
    val, _, _, _ = _data(40, seed=14, relu=True)
    h, _, _, _ = _data(30, seed=15, relu=True)
    s = _fit("vra", h_tr, y, w, b, val=val, percentile_low=60, percentile_high=90, rule="vra", gamma=gamma,
             per_dimension=True, source="train")
    lo, hi = np.quantile(h_tr, 0.6, axis=0), np.quantile(h_tr, 0.9, axis=0)
    rect = np.where(h < lo, 0.0, np.where(h > hi, hi, h + gamma))
    np.testing.assert_allclose(_score(s, h, w, b), logsumexp(rect @ w.T + b, axis=1), rtol=1e-12)


def test_vra_official_rule_hand_case_boundaries():
    w, b = np.eye(4), np.zeros(4)
    s = _fit("vra", np.ones((4, 4)), [0, 1, 2, 3], w, b, rule="vra", gamma=0.25, low=0.5, high=1.0)
    # 0.4 < low -> 0; 0.5 = low -> 0.75; 1.0 = high -> 1.25; 3 > high -> 1.0 (no gamma)
    got = _score(s, np.array([[0.4, 0.5, 1.0, 3.0]]), w, b)
    assert got[0] == pytest.approx(np.log(np.exp(0.0) + np.exp(0.75) + np.exp(1.25) + np.exp(1.0)), rel=1e-12)
    clip = _fit("vra", np.ones((4, 4)), [0, 1, 2, 3], w, b, low=0.5, high=1.0)  # OpenOOD: raised to low
    got = _score(clip, np.array([[0.4, 0.5, 1.0, 3.0]]), w, b)
    assert got[0] == pytest.approx(np.log(2 * np.exp(0.5) + 2 * np.exp(1.0)), rel=1e-12)


def test_vra_settings_are_checked():
    assert get_score_class("vra").GRID == {"percentile_high": (85, 90, 95, 99), "percentile_low": (1, 5, 10, 15)}
    with pytest.raises(ValueError, match="percentile_low"):
        create_score("vra", percentile_low=90, percentile_high=10)
    with pytest.raises(ValueError, match="gamma"):
        create_score("vra", gamma=0.5)  # VRA+ needs the official rule
    with pytest.raises(ValueError, match="rule"):
        create_score("vra", rule="relu")
    h_tr, y, w, b = _data(seed=16)
    with pytest.raises(ScoreNotApplicable, match="val"):
        _fit("vra", h_tr, y, w, b, source="val")


# ---- WeiPer + KLD ---------------------------------------------------------------------------------
def _smooth(row, size):
    left = (size - 1) // 2
    padded = np.pad(row, (left, size - 1 - left), mode="edge")
    return np.convolve(padded, np.ones(size) / size, mode="valid")


def _sym_kl(q, p, size, eps):
    q = (q + eps) / (q + eps).sum()
    p = _smooth(p, size) + eps
    p = p / p.sum()
    return (q * np.log(q / p)).sum() + (p * np.log(p / q)).sum()


def _weiper_ref(h_tr, h, w_tilde, b, n_bins=100, lambda_1=2.5, lambda_2=0.1, s1=4, s2=15, eps_h=0.01, eps_z=0.025):
    r, c, _ = w_tilde.shape

    def zt(f):  # block k holds W_k h + b
        return np.concatenate([f @ w_tilde[k].T + b for k in range(r)], axis=1)

    def hist(f, lo, hi):
        edges = np.linspace(lo, hi + 1e-8, n_bins + 1)
        return np.stack([np.histogram(row, bins=edges)[0] / len(row) for row in f])

    z_tr, z = zt(h_tr), zt(h)
    q_h = hist(h_tr, h_tr.min(), h_tr.max()).mean(0)
    q_z = hist(z_tr, z_tr.min(), z_tr.max()).mean(0)
    p_h, p_z = hist(h, h_tr.min(), h_tr.max()), hist(z, z_tr.min(), z_tr.max())
    d_h = np.array([_sym_kl(q_h, p, s1, eps_h) for p in p_h])
    d_z = np.array([_sym_kl(q_z, p, s2, eps_z) for p in p_z])
    msp = np.stack([softmax(z[:, k * c:(k + 1) * c], axis=1).max(1) for k in range(r)], axis=1).mean(1)
    return -(d_h + lambda_1 * d_z - lambda_2 * msp)


@pytest.mark.parametrize("kw", [{}, {"n_bins": 60, "lambda_1": 0.1, "lambda_2": 1.0, "s1": 12, "s2": 25, "delta": 2.4}])
def test_weiper_matches_the_transcription(kw):
    h_tr, y, w, b = _data(200, d=16, c=4, seed=20, relu=True)
    h, _, _, _ = _data(30, d=16, c=4, seed=21, relu=True)
    h = np.concatenate([h, 3 * h[:5], np.zeros((1, 16))])  # some values beyond the training range
    s = _fit("weiper", h_tr, y, w, b, repeats=7, **kw)
    w_tilde = s.weights_.numpy()
    ref_kw = {k: v for k, v in kw.items() if k != "delta"}
    np.testing.assert_allclose(_score(s, h, w, b), _weiper_ref(h_tr, h, w_tilde, b, **ref_kw), rtol=1e-9)


def test_weiper_perturbed_weights_are_seeded_with_the_stated_length():
    h_tr, y, w, b = _data(50, d=16, c=4, seed=22, relu=True)
    s = _fit("weiper", h_tr, y, w, b, repeats=5, delta=2.0, seed=3)
    noise = s.weights_.numpy() - w[None]
    np.testing.assert_allclose(np.linalg.norm(noise, axis=2), 2.0 * np.linalg.norm(w, axis=1)[None].repeat(5, 0),
                               rtol=1e-12)
    assert torch.equal(s.weights_, _fit("weiper", h_tr, y, w, b, repeats=5, delta=2.0, seed=3).weights_)
    assert not torch.equal(s.weights_, _fit("weiper", h_tr, y, w, b, repeats=5, delta=2.0, seed=4).weights_)


@pytest.mark.parametrize("size", [4, 5, 15])
def test_weiper_smoothing_is_the_official_same_padded_replicate_kernel(size):
    from ood.scores.weiper import moving_average

    p = torch.rand(3, 30, generator=torch.Generator().manual_seed(size), dtype=torch.float64)
    conv = torch.nn.Conv1d(3, 3, size, padding="same", padding_mode="replicate", bias=False).double()
    with torch.no_grad():  # the official UniformKernel: one 1/size filter per sample (channel)
        conv.weight.zero_()
        conv.weight[range(3), range(3)] = 1.0 / size
        want = conv(p[None])[0]
    torch.testing.assert_close(moving_average(p, size), want, rtol=1e-12, atol=1e-15)


def test_weiper_grid_is_the_authors_sweep():
    grid = get_score_class("weiper").GRID
    assert grid == {"lambda_1": (0.1, 1.0, 2.5, 4.0), "lambda_2": (0.1, 0.25, 1.0, 2.5, 5.0), "n_bins": (60, 80, 100),
                    "delta": (1.8, 2.0, 2.2, 2.4), "s1": (4, 8, 12, 20, 40), "s2": (15, 25, 40)}
    assert np.prod([len(v) for v in grid.values()]) == 3600


def test_weiper_search_fits_once_per_delta_and_bins(monkeypatch):
    """WeiPer's fit and densities depend on delta, n_bins, R and the seed, not on lambda_1, lambda_2,
    s1, s2: a search fits once per (delta, n_bins) and gives every grid point's AUROC, the choice and
    the test scores of the search that refits at every point."""
    from conftest import LinearFeatureModel, loader
    from ood import evaluate_ood
    from ood.scores.weiper import WeiPer

    g = torch.Generator().manual_seed(0)
    model = LinearFeatureModel(8, 16, 3).eval()
    mk = lambda n, s: torch.randn(n, 8, generator=g, dtype=torch.float64) * s  # noqa: E731
    y = torch.arange(60) % 3
    fit, val, test = loader(mk(60, 1.0), y), loader(mk(30, 1.0), y[:30]), loader(mk(30, 1.0), y[:30])
    vood, tood = loader(mk(30, 3.0)), loader(mk(30, 3.0))
    kw = {"weiper": {"repeats": 4, "lambda_1": 1.0, "s2": 15}}  # lambda_2 x n_bins x delta x s1: 5 x 3 x 4 x 5 = 300 points
    fits = []
    real = WeiPer._densities
    monkeypatch.setattr(WeiPer, "_densities", lambda self, h: fits.append(len(h)) or real(self, h))

    def run():
        fits.clear()
        out = evaluate_ood(model, fit, test, {"far": tood}, scores=["weiper"], score_kwargs=kw,
                           val_loader=val, val_ood_loader=vood, search=True)
        return out, len(fits)

    shared, n_shared = run()
    assert n_shared == 4 * 3 * 3 + 2  # per (delta, n_bins): train, val ID, val OOD; then test ID and OOD
    monkeypatch.setattr(WeiPer, "memoised", lambda self, key, source, compute: compute())
    alone, n_alone = run()
    assert n_alone == 300 * 3 + 1 + 2  # each point: train, val ID, val OOD; the chosen point's refit
    assert shared["search"] == alone["search"] and len(shared["search"]["weiper"]["grid"]) == 300
    for side in ("id", "ood"):
        np.testing.assert_array_equal(shared["scores"]["weiper"]["far"][side], alone["scores"]["weiper"]["far"][side])
