"""KNN, ViM, MDS, RMDS, SHE, fDBD, NNGuide, Relation against independent float64 formulas."""

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from sklearn.covariance import EmpiricalCovariance
from sklearn.neighbors import NearestNeighbors

from ood import Classifier, ScoreNotApplicable, create_score


def _t(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


def _rand(n=80, d=6, c=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    h = rng.normal(size=(n, d)) + 3 * np.eye(c, d)[y]
    w, b = rng.normal(size=(c, d)), rng.normal(size=c)
    return h, y, w, b


def _fit(name, h_tr, y_tr, w, b, z_tr=None, **kw):
    z_tr = h_tr @ w.T + b if z_tr is None else z_tr
    clf = Classifier.from_linear(_t(w), _t(b))
    return create_score(name, **kw).fit_features(_t(h_tr), _t(z_tr), None if y_tr is None else torch.as_tensor(y_tr), clf)


def _score(s, h, w, b, z=None):
    return s.score_features(_t(h), _t(h @ w.T + b if z is None else z)).numpy()


# ---- KNN -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("k, normalise", [(1, True), (7, True), (5, False)])
def test_knn_random_against_sklearn(k, normalise):
    h_tr, y, w, b = _rand(seed=1)
    h, *_ = _rand(30, seed=2)
    prep = (lambda a: a / (np.linalg.norm(a, axis=1, keepdims=True) + 1e-10)) if normalise else (lambda a: a)
    dist, _ = NearestNeighbors(n_neighbors=k).fit(prep(h_tr)).kneighbors(prep(h))
    s = _fit("knn", h_tr, None, w, b, k=k, normalise=normalise, chunk=7)
    np.testing.assert_allclose(_score(s, h, w, b), -dist[:, -1], rtol=1e-9, atol=1e-12)


def test_knn_hand_case_and_bank_fraction():
    bank = np.array([[1.0, 0.0], [0.0, 3.0], [-2.0, 0.0]])
    w, b = np.eye(2), np.zeros(2)
    s = _fit("knn", bank, None, w, b, k=2)
    assert _score(s, np.array([[2.0, 0.0]]), w, b)[0] == pytest.approx(-math.sqrt(2), rel=1e-9)
    assert _fit("knn", bank, None, w, b, k=1, bank_fraction=0.34).bank_.shape == (1, 2)
    with pytest.raises(ScoreNotApplicable, match="k=4 exceeds"):
        _fit("knn", bank, None, w, b, k=4)


# ---- ViM -----------------------------------------------------------------------------------------
def test_vim_random_against_numpy():
    h_tr, y, w, b = _rand(120, d=8, seed=3)
    h, *_ = _rand(25, d=8, seed=4)
    dim = 3
    u = -np.linalg.pinv(w) @ b
    cov = EmpiricalCovariance(assume_centered=True).fit(h_tr - u).covariance_
    vals, vecs = np.linalg.eigh(cov)
    ns = vecs[:, np.argsort(-vals)[dim:]]
    z_tr = h_tr @ w.T + b
    alpha = z_tr.max(1).mean() / np.linalg.norm((h_tr - u) @ ns, axis=1).mean()
    z = h @ w.T + b
    ref = logsumexp(z, axis=1) - alpha * np.linalg.norm((h - u) @ ns, axis=1)
    s = _fit("vim", h_tr, None, w, b, dim=dim)
    assert s.info()["alpha"] == pytest.approx(alpha, rel=1e-10)
    np.testing.assert_allclose(_score(s, h, w, b), ref, rtol=1e-9)


def test_vim_hand_case_official_dim_and_errors():
    x = np.array([[2.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    w, b = np.eye(2), np.zeros(2)
    s = _fit("vim", x, None, w, b)  # official rule: width 2 -> dim 1; alpha = 0.75 / 0.5
    assert s.info()["dim_used"] == 1 and s.alpha_ == pytest.approx(1.5)
    assert _score(s, np.array([[1.0, 1.0]]), w, b)[0] == pytest.approx(1 + math.log(2) - 1.5, rel=1e-12)
    with pytest.raises(ScoreNotApplicable, match="dim=2 must be smaller than the feature width 2"):
        _fit("vim", x, None, w, b, dim=2)
    h_tr, *_ = _rand(60, d=8, seed=5)
    with pytest.raises(ScoreNotApplicable, match="no residual"):  # 3 samples span 3 directions < dim 4
        _fit("vim", h_tr[:3], None, np.ones((3, 8)), np.zeros(3), dim=4)
    with pytest.raises(ScoreNotApplicable, match="dim=1000"):
        _fit("vim", h_tr, None, np.ones((3, 8)), np.zeros(3), dim=1000)


# ---- MDS / RMDS ----------------------------------------------------------------------------------
def _gauss_ref(h_tr, y, c):
    means = np.stack([h_tr[y == k].mean(0) for k in range(c)])
    prec = EmpiricalCovariance().fit(h_tr - means[y]).precision_
    return means, prec


def _md(h, mu, prec):
    return np.stack([np.einsum("nd,de,ne->n", h - m, prec, h - m) for m in mu], axis=1)


def test_mds_and_rmds_random_against_sklearn():
    h_tr, y, w, b = _rand(90, seed=6)
    h, *_ = _rand(20, seed=7)
    means, prec = _gauss_ref(h_tr, y, 3)
    md = _md(h, means, prec)
    bg = EmpiricalCovariance().fit(h_tr)
    md0 = _md(h, bg.location_[None], bg.precision_)[:, 0]
    np.testing.assert_allclose(_score(_fit("mds", h_tr, y, w, b), h, w, b), -md.min(1), rtol=1e-8)
    np.testing.assert_allclose(_score(_fit("rmds", h_tr, y, w, b), h, w, b), md0 - md.min(1), rtol=1e-8, atol=1e-10)


def test_mds_rmds_hand_case():
    h_tr, y = np.array([[0.0], [2.0], [10.0], [12.0]]), np.array([0, 0, 1, 1])
    w, b = np.ones((2, 1)), np.zeros(2)
    q = np.array([[3.0]])
    assert _score(_fit("mds", h_tr, y, w, b), q, w, b)[0] == pytest.approx(-4.0)
    assert _score(_fit("rmds", h_tr, y, w, b), q, w, b)[0] == pytest.approx(9 / 26 - 4.0)
    with pytest.raises(ScoreNotApplicable, match="no samples"):
        _fit("mds", h_tr, np.array([0, 0, 0, 0]), np.ones((3, 1)), np.zeros(3))


# ---- SHE -----------------------------------------------------------------------------------------
def test_she_random_and_hand():
    h_tr, y, w, b = _rand(90, seed=8)
    z_tr = h_tr @ w.T + b
    pred = z_tr.argmax(1)
    # make every class have a correctly classified sample: relabel by prediction for a third
    y = np.where(np.arange(90) % 3 == 0, pred, y)
    ok = pred == y
    pats = np.stack([h_tr[ok & (y == k)].mean(0) for k in range(3)])
    h, *_ = _rand(20, seed=9)
    z = h @ w.T + b
    ref = np.sum(h * pats[z.argmax(1)], axis=1)
    np.testing.assert_allclose(_score(_fit("she", h_tr, y, w, b), h, w, b), ref, rtol=1e-12)
    ht = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    zt = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # the last is misclassified
    s = _fit("she", ht, np.array([0, 0, 1, 1]), np.eye(2), np.zeros(2), z_tr=zt)
    assert s.score_features(_t([[1.0, 1.0]]), _t([[0.0, 1.0]]))[0].item() == pytest.approx(2.0)
    with pytest.raises(ScoreNotApplicable, match="no correctly classified"):
        _fit("she", ht, np.array([1, 1, 0, 0]), np.eye(2), np.zeros(2), z_tr=zt)


# ---- fDBD ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dist", [True, False])
def test_fdbd_random_against_loop(dist):
    h_tr, y, w, b = _rand(60, seed=10)
    h, *_ = _rand(15, seed=11)
    mu = h_tr.mean(0)
    z = h @ w.T + b
    ref = []
    for hi, zi in zip(h, z):
        k = zi.argmax()
        total = sum(abs(zi[k] - zi[c]) / np.linalg.norm(w[k] - w[c]) for c in range(3) if c != k)
        ref.append(total / np.linalg.norm(hi - mu if dist else hi))
    np.testing.assert_allclose(_score(_fit("fdbd", h_tr, None, w, b, distance_as_normalizer=dist), h, w, b), ref, rtol=1e-12)


def test_fdbd_hand_case():
    s = _fit("fdbd", np.array([[1.0, 1.0], [-1.0, -1.0]]), None, np.eye(2), np.zeros(2))
    assert _score(s, np.array([[3.0, 1.0]]), np.eye(2), np.zeros(2))[0] == pytest.approx(1 / math.sqrt(5), rel=1e-12)
    with pytest.raises(ScoreNotApplicable, match="1 non-finite"):  # a query at the training mean: x / 0
        _score(s, np.array([[3.0, 1.0], [0.0, 0.0]]), np.eye(2), np.zeros(2))


# ---- NNGuide -------------------------------------------------------------------------------------
def test_nnguide_random_and_hand():
    h_tr, y, w, b = _rand(100, seed=12)
    h, *_ = _rand(20, seed=13)
    z_tr, z = h_tr @ w.T + b, h @ w.T + b
    nrm = lambda a: a / (np.linalg.norm(a, axis=1, keepdims=True) + 1e-10)
    s = _fit("nnguide", h_tr, None, w, b, K=4, alpha=0.5, seed=3)
    idx = torch.randperm(100, generator=torch.Generator().manual_seed(3))[:50].numpy()
    bank = nrm(h_tr[idx]) * logsumexp(z_tr[idx], axis=1)[:, None]
    sims = np.sort(nrm(h) @ bank.T, axis=1)[:, ::-1][:, :4].mean(1)
    np.testing.assert_allclose(_score(s, h, w, b), logsumexp(z, axis=1) * sims, rtol=1e-10)
    first = _fit("nnguide", h_tr, None, w, b, K=2, alpha=0.1, bank="first")
    bank_f = nrm(h_tr[:10]) * logsumexp(z_tr[:10], axis=1)[:, None]
    np.testing.assert_allclose(first.bank_.numpy(), bank_f, rtol=1e-12)
    # hand: bank [[1, 0], [0, 2]] (energies 1 and 2 of one-class logits), query (1, 1) with energy 3
    hand = create_score("nnguide", K=2, alpha=1.0).fit_features(_t([[2.0, 0.0], [0.0, 3.0]]), _t([[1.0], [2.0]]), None, None)
    out = hand.score_features(_t([[1.0, 1.0]]), _t([[3.0]]))[0].item()
    assert out == pytest.approx(3 * (1 + 2) / 2 / math.sqrt(2), rel=1e-9)
    with pytest.raises(ScoreNotApplicable, match="K=100 exceeds the 99 training samples"):
        _fit("nnguide", h_tr[:99], None, w, b)


def test_nnguide_default_bank_is_at_least_k_samples_on_small_training_sets():
    h_tr, y, w, b = _rand(100, seed=12)
    # 1 % of 100 is 1 sample, fewer than K = 100: the bank is enlarged to K (here every sample)
    s = _fit("nnguide", h_tr, None, w, b)
    assert s.info()["bank_size"] == 100
    # alpha N = 2 < K = 4: the first 4 of the seeded permutation
    s = _fit("nnguide", h_tr[:20], None, w, b, K=4, alpha=0.1, seed=5)
    idx = torch.randperm(20, generator=torch.Generator().manual_seed(5))[:4].numpy()
    z_tr = h_tr[:20] @ w.T + b
    ref = h_tr[idx] / (np.linalg.norm(h_tr[idx], axis=1, keepdims=True) + 1e-10) * logsumexp(z_tr[idx], axis=1)[:, None]
    np.testing.assert_allclose(s.bank_.numpy(), ref, rtol=1e-12)
    first = _fit("nnguide", h_tr[:20], None, w, b, K=4, alpha=0.1, bank="first")
    assert first.info()["bank_size"] == 4
    # from N >= K / alpha on, the bank is round(alpha N)
    assert create_score("nnguide", K=4, alpha=0.1).bank_size(40) == 4
    assert create_score("nnguide", K=4, alpha=0.1).bank_size(45) == 4  # round(4.5) = 4
    assert create_score("nnguide").bank_size(50_000) == 500
    assert create_score("nnguide").bank_size(9_000) == 100  # OpenOOD runs here; this used to refuse


def test_nnguide_openood_bank_is_whole_loader_batches():
    from ood.scores.nnguide import openood_bank_size

    assert openood_bank_size(50_000, 0.01, 128) == 512  # 4 batches of 128: 3 x 128 = 384 <= 500
    assert openood_bank_size(50_000, 0.01, 200) == 600  # OpenOOD's Evaluator batch: 2 x 200 = 400 <= 500
    assert openood_bank_size(9_000, 0.01, 128) == 128   # int(90) // 128 + 1 = 1 batch
    assert openood_bank_size(100, 0.08, 4) == 12        # 8 samples asked: the stop is strict (2 x 4 = 8 is not > 8)
    assert openood_bank_size(10, 1.0, 4) == 10          # the loader runs out first
    assert create_score("nnguide", bank="openood").bank_size(50_000) == 600
    assert create_score("nnguide", bank="openood", bank_batch_size=128).bank_size(50_000) == 512
    h_tr, y, w, b = _rand(100, seed=12)
    z_tr = h_tr @ w.T + b
    s = _fit("nnguide", h_tr, None, w, b, K=2, alpha=0.1, bank="openood", bank_batch_size=4)
    ref = h_tr[:12] / (np.linalg.norm(h_tr[:12], axis=1, keepdims=True) + 1e-10) * logsumexp(z_tr[:12], axis=1)[:, None]
    np.testing.assert_allclose(s.bank_.numpy(), ref, rtol=1e-12)
    assert s.info()["bank_size"] == 12 and s.info()["bank_batch_size"] == 4
    with pytest.raises(ScoreNotApplicable, match="OpenOOD's bank of 4 samples"):
        _fit("nnguide", h_tr, None, w, b, K=5, alpha=0.01, bank="openood", bank_batch_size=4)
    with pytest.raises(ValueError, match="bank_batch_size applies to bank='openood' only"):
        create_score("nnguide", bank_batch_size=128)
    with pytest.raises(ValueError, match="bank_batch_size must be a positive int"):
        create_score("nnguide", bank="openood", bank_batch_size=0)


# ---- Relation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("pw", [1, 2])
def test_relation_random_against_loop(pw):
    h_tr, y, w, b = _rand(50, seed=14)
    h, *_ = _rand(10, seed=15)
    sm = lambda a: np.exp(a - logsumexp(a, axis=1, keepdims=True))
    nrm = lambda a: a / np.sqrt((a ** 2).sum(1, keepdims=True) + 1e-10)
    ft, pt, f, p = nrm(h_tr), sm(h_tr @ w.T + b), nrm(h), sm(h @ w.T + b)
    ref = []
    for fi, pi in zip(f, p):
        r = np.maximum(ft @ fi, 0) * (pt @ pi)
        r = r[np.abs(r) > 0.03]
        ref.append(np.sum(np.sign(r) * np.abs(r) ** pw))
    np.testing.assert_allclose(_score(_fit("relation", h_tr, None, w, b, pow=pw, chunk=3), h, w, b), ref, rtol=1e-10)


def test_relation_hand_case():
    s = create_score("relation", pow=2).fit_features(_t([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), _t([[0.0]] * 3), None, None)
    # one class: p . p' = 1; edges 1/sqrt2, 1/sqrt2 and max(0, -1/sqrt2) = 0 (dropped)
    assert s.score_features(_t([[1.0, 1.0]]), _t([[0.0]]))[0].item() == pytest.approx(1.0, rel=1e-9)
