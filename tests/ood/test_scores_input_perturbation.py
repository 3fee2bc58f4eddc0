"""Model-level scores (AdaSCALE-A/-L, i-ODIN, RankFeat, GRAM, NAC) against float64 transcriptions.

For the input-gradient scores the model is ``h = ReLU(x A^T)``, ``z = W h + b``, so every input
gradient has a closed form; RankFeat runs on a tiny timm ResNet, transcribed stage by stage, and
GRAM on the same ResNet with its conv / ReLU outputs captured by the test's own hooks, NAC with
an explicit stage-by-stage forward and backward.
"""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy.special import logsumexp, softmax

from ood import ScoreNotApplicable, create_score
from ood.registry import get_score_class
from ood.scores.adascale import ADASCALE_OFFICIAL_GRID

from conftest import loader


class ReluNet(nn.Module):
    def __init__(self, d_in=48, d=100, c=5, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A = nn.Parameter(torch.randn(d, d_in, generator=g, dtype=torch.float64) / d_in ** 0.5)
        self.fc = nn.Linear(d, c).double()
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(c, d, generator=g, dtype=torch.float64))
            self.fc.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64))

    def features(self, x):
        return torch.relu(x.flatten(1) @ self.A.T)

    def forward(self, x):
        return self.fc(self.features(x))


def _np(model):
    return (model.A.detach().numpy(), model.fc.weight.detach().numpy(), model.fc.bias.detach().numpy())


def _x(n, seed):
    return torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- AdaSCALE ---------------------------------------------------------------------------------------
def _features_and_perturbed(params, x, eps, o):
    a, w, b = params
    xf = x.reshape(len(x), -1)
    pre = xf @ a.T
    h = np.maximum(pre, 0)
    yhat = np.argmax(h @ w.T + b, axis=1)
    g = (w[yhat] * (pre > 0)) @ a  # d z_yhat / d x
    m = int(xf.shape[1] * o)
    mask = np.zeros_like(xf)
    for i, row in enumerate(np.abs(g)):
        mask[i, np.argsort(row, kind="stable")[:m]] = 1.0
    xt = xf + eps * np.sign(g) * mask
    return h, np.maximum(xt @ a.T, 0)


def _q(h, ht, k1, k2, lam):
    d = h.shape[1]
    ka, kb = max(1, int(d * k1 / 100)), max(1, int(d * k2 / 100))
    out = []
    for hi, hti in zip(h, ht):
        order = np.argsort(-hi, kind="stable")
        out.append(np.maximum(hti[order[:ka]], 0).sum() + lam * np.abs(hi - hti)[order[:kb]].sum())
    return np.array(out)


def _adascale_ref(params, x_ref, x, variant, p=(75, 85), k1=5, k2=1, lam=10.0, eps=0.5, o=0.05):
    a, w, b = params
    h_ref, ht_ref = _features_and_perturbed(params, x_ref, eps, o)
    ref = np.sort(_q(h_ref, ht_ref, k1, k2, lam))
    h, ht = _features_and_perturbed(params, x, eps, o)
    cdf = np.array([(ref <= q).sum() / len(ref) for q in _q(h, ht, k1, k2, lam)])
    pct = p[0] + (1 - cdf) * (p[1] - p[0])
    d = h.shape[1]
    k = d - np.round(d * pct / 100.0).astype(int)
    act = np.maximum(h, 0)
    r = act.sum(1) / np.array([np.sort(row)[::-1][:ki].sum() for row, ki in zip(act, k)])
    logits = (h * np.exp(r)[:, None]) @ w.T + b if variant == "a" else (h @ w.T + b) * r[:, None] ** 2
    return logsumexp(logits, axis=1)


@pytest.mark.parametrize("variant", ["a", "l"])
@pytest.mark.parametrize("kw", [{}, {"percentile": (60, 95), "o": 0.25, "eps": 0.3, "lmbda": 2.0}])
def test_adascale_matches_the_transcription(variant, kw):
    model = ReluNet().eval()
    x_tr, x_val, x = _x(40, 1), _x(60, 2), torch.cat([_x(20, 3), 3 * _x(10, 4)])
    s = create_score(f"adascale_{variant}", **kw).fit(model, loader(x_tr, batch_size=16),
                                                      val_loader=loader(x_val, batch_size=16))
    assert s.info()["fitted_on"] == "val"
    params = _np(model)
    ref_kw = {("p" if k == "percentile" else "lam" if k == "lmbda" else k): v for k, v in kw.items()}
    want = _adascale_ref(params, x_val.numpy(), x.numpy(), variant, **ref_kw)
    np.testing.assert_allclose(s.score(model, loader(x, batch_size=7)).numpy(), want, rtol=1e-10)
    # without validation data the ECDF comes from the fit loader
    s_tr = create_score(f"adascale_{variant}", **kw).fit(model, loader(x_tr, batch_size=16))
    assert s_tr.info()["fitted_on"] == "train"
    want = _adascale_ref(params, x_tr.numpy(), x.numpy(), variant, **ref_kw)
    np.testing.assert_allclose(s_tr.score(model, loader(x, batch_size=7)).numpy(), want, rtol=1e-10)


def test_adascale_ecdf_is_right_continuous_and_maps_to_the_percentile_range():
    s = create_score("adascale_a", percentile=(60, 80))
    d = 100
    h = np.zeros((4, d))
    h[:, :5] = np.arange(1, 5)[:, None] / 5.0  # top-5 sums 1, 2, 3, 4 (k1 = 5 % of 100)
    s.fit_shift(torch.from_numpy(h), torch.from_numpy(h))  # no shift: Q' = sum of the top-5 ReLU(h)
    q = np.zeros((3, d))
    q[:, :5] = np.array([2.0, 0.5, 9.0])[:, None] / 5.0
    p = s.percentiles(torch.from_numpy(q), torch.from_numpy(q)).numpy()
    # F(2) = 2/4 (ties count), F(0.5) = 0, F(9) = 1
    np.testing.assert_allclose(p, [70.0, 80.0, 60.0], rtol=1e-12)


def test_adascale_subsamples_the_reference_with_a_seed():
    rng = np.random.default_rng(0)
    h, ht = torch.from_numpy(rng.random((50, 100))), torch.from_numpy(rng.random((50, 100)))
    a = create_score("adascale_a", num_samples=10, seed=3).fit_shift(h, ht)
    b = create_score("adascale_a", num_samples=10, seed=3).fit_shift(h, ht)
    full = create_score("adascale_a").fit_shift(h, ht)
    assert a.reference_.numel() == 10 and torch.equal(a.reference_, b.reference_)
    assert set(a.reference_.tolist()) <= set(full.reference_.tolist())


def test_adascale_settings_and_grids():
    pairs = get_score_class("adascale_a").GRID["percentile"]
    assert len(pairs) == 36 and pairs[0] == (60, 65) and pairs[-1] == (95, 99) and all(a < b for a, b in pairs)
    assert get_score_class("adascale_l").GRID == get_score_class("adascale_a").GRID
    assert ADASCALE_OFFICIAL_GRID["percentile"] == tuple((60, b) for b in (65, 70, 75, 80, 85, 90, 95, 99))
    for bad in ({"percentile": (85, 75)}, {"percentile": (0, 50)}, {"percentile": 80}, {"k1": 0},
                {"o": 1.5}, {"num_samples": 0}, {"source": "test"}):
        with pytest.raises((ValueError, TypeError), match=next(iter(bad))):
            create_score("adascale_a", **bad)


# ---- i-ODIN --------------------------------------------------------------------------------------
def _iodin_ref(params, x, temperature, eps, std=None):
    a, w, b = params
    xf = x.reshape(len(x), -1)
    pre = xf @ a.T
    z = np.maximum(pre, 0) @ w.T + b
    yhat = np.argmax(z, axis=1)
    dz = (softmax(z / temperature, axis=1) - np.eye(w.shape[0])[yhat]) / temperature  # d CE / d z
    g = ((dz @ w) * (pre > 0)) @ a
    xp = xf.copy()
    for i, row in enumerate(g):
        j = int(np.argmax(np.abs(row)))
        step = eps * (1.0 if row[j] >= 0 else -1.0)
        xp[i, j] -= step / (std[j // 16] if std is not None else 1.0)  # 16 entries per channel (4 x 4)
    zp = np.maximum(xp @ a.T, 0) @ w.T + b
    return softmax(zp / temperature, axis=1).max(axis=1)


@pytest.mark.parametrize("temperature, eps, std", [(1000.0, 0.0014, None), (1.0, 0.05, None),
                                                   (10.0, 0.02, (0.2, 0.5, 0.25))])
def test_iodin_matches_the_transcription(temperature, eps, std):
    model = ReluNet(c=4).eval()
    x = torch.cat([_x(12, 5), 2 * _x(6, 6)])
    s = create_score("iodin", temperature=temperature, eps=eps, input_std=std)
    got = s.score(model, loader(x, batch_size=5)).numpy()
    np.testing.assert_allclose(got, _iodin_ref(_np(model), x.numpy(), temperature, eps, std), rtol=1e-10)


def test_iodin_moves_one_entry_where_odin_moves_all():
    model = ReluNet(c=4).eval()
    x = _x(5, 7)
    moved = (create_score("iodin", temperature=1.0, eps=0.1).preprocess(model, x) != x).flatten(1).sum(1)
    assert moved.tolist() == [1] * 5
    moved_odin = (create_score("odin", temperature=1.0, eps=0.1).preprocess(model, x) != x).flatten(1).sum(1)
    assert (moved_odin > 1).all()
    assert get_score_class("iodin").GRID == {"temperature": (1.0, 10.0, 100.0, 1000.0), "eps": (0.0014, 0.0028)}


@pytest.mark.parametrize("name", ["odin", "iodin"])
def test_odin_grid_points_share_the_step_directions_of_a_temperature(name, monkeypatch):
    """In an evaluation (pass_memo set) one backward per batch and temperature serves every eps: the
    scores equal those computed inline, bit for bit, against the transcription for i-ODIN."""
    import ood.scores.odin as odin_module

    model = ReluNet(c=4).eval()
    x = torch.cat([_x(12, 5), 2 * _x(6, 6)])
    data = loader(x, batch_size=5)
    cls = get_score_class(name)
    backwards = []
    real = cls.input_gradient
    monkeypatch.setattr(cls, "input_gradient", lambda self, m, xb: backwards.append(len(xb)) or real(self, m, xb))
    memo: dict = {}
    for temperature in (1.0, 10.0):
        for eps in (0.0014, 0.02, 0.05):
            inline = create_score(name, temperature=temperature, eps=eps).score(model, data)
            shared = create_score(name, temperature=temperature, eps=eps)
            shared.pass_memo = memo
            got = shared.score(model, data)
            assert torch.equal(got, inline)
            if name == "iodin":
                np.testing.assert_allclose(got.numpy(), _iodin_ref(_np(model), x.numpy(), temperature, eps, None),
                                           rtol=1e-10)
    # inline: 6 points x 18 samples; shared: 18 samples per temperature
    assert sum(backwards) == 6 * 18 + 2 * 18

    class Reshuffled:  # the same loader object yielding other batches the next time
        def __init__(self):
            self.calls = 0

        def __iter__(self):
            self.calls += 1
            return iter(loader(x if self.calls == 1 else x.flip(0), batch_size=5))

    other = create_score(name, temperature=1.0, eps=0.05)
    other.pass_memo = memo
    backwards.clear()  # its directions pass sees x, the scoring pass x reversed: computed inline
    assert torch.equal(other.score(model, Reshuffled()),
                       create_score(name, temperature=1.0, eps=0.05).score(model, loader(x.flip(0), batch_size=5)))
    assert sum(backwards) == 18 + 18 + 18
    # over the budget: the directions pass stops after its first batch, then every point is inline
    monkeypatch.setattr(odin_module, "DIRECTION_MEMO_BYTES", 10)
    small_memo: dict = {}
    for eps in (0.02, 0.05):
        big = create_score(name, temperature=100.0, eps=eps)
        big.pass_memo = small_memo
        backwards.clear()
        got = big.score(model, data)
        assert sum(backwards) == (5 if eps == 0.02 else 0) + 18
        assert torch.equal(got, create_score(name, temperature=100.0, eps=eps).score(model, data))


# ---- RankFeat ------------------------------------------------------------------------------------
def _rank1_removed(f):
    out = np.empty_like(f)
    for i, fm in enumerate(f):
        m = fm.reshape(fm.shape[0], -1)
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        out[i] = (m - s[0] * np.outer(u[:, 0], vt[0])).reshape(fm.shape)
    return out


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_rankfeat_matches_the_stage_by_stage_transcription(resnet_model, temperature):
    model = copy.deepcopy(resnet_model).double().eval()
    x = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    s = create_score("rankfeat", temperature=temperature).fit(model, loader(x))
    got = s.score(model, loader(x, batch_size=2)).numpy()
    bb = model.backbone
    with torch.no_grad():  # timm ResNet: stem, layer1..4, global average pool; then the head
        f3 = bb.layer3(bb.layer2(bb.layer1(bb.maxpool(bb.act1(bb.bn1(bb.conv1(x)))))))
        f4 = bb.layer4(f3)
        assert f4.shape[2] * f4.shape[3] > 1 and f3.shape[2] * f3.shape[3] > 1

        def head(f):
            return model.head.logits(torch.as_tensor(f).mean(dim=(2, 3))).numpy()

        z4 = head(_rank1_removed(f4.numpy()))
        z3 = head(bb.layer4(torch.from_numpy(_rank1_removed(f3.numpy()))))
    want = temperature * logsumexp((z4 + z3) / 2 / temperature, axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-9)


def test_rankfeat_refuses_one_by_one_stage_maps(resnet_model):
    """At 16 px a ResNet's last stage is 1 x 1: the removal zeroed it and half the score was a constant."""
    model = copy.deepcopy(resnet_model).double().eval()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    with pytest.raises(ScoreNotApplicable, match="1 x 1 maps"):
        create_score("rankfeat").fit(model, loader(x))


def test_rankfeat_needs_backbone_stages():
    with pytest.raises(ScoreNotApplicable, match="feature_info"):
        create_score("rankfeat").fit(ReluNet(), loader(_x(4, 0)))
    assert get_score_class("rankfeat").GRID == {}


# ---- GRAM ----------------------------------------------------------------------------------------
def _taps(model, x):
    """Logits and every nn.Conv2d / nn.ReLU output (a copy, in call order) of one forward pass."""
    outs = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: outs.append(o.detach().clone().numpy()))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ReLU))]
    try:
        with torch.no_grad():
            logits = model(x).numpy()
    finally:
        for h in hooks:
            h.remove()
    return logits, outs


def _gram(f, p):
    out = []
    for fm in f.reshape(f.shape[0], f.shape[1], -1):
        s = ((fm ** p) @ (fm ** p).T).sum(axis=1)
        out.append(np.sign(s) * np.abs(s) ** (1.0 / p))
    return np.array(out)


def _dev(g, lo, hi):
    return (np.maximum(lo - g, 0) / np.abs(lo + 1e-6) + np.maximum(g - hi, 0) / np.abs(hi + 1e-6)).sum(axis=-1)


@pytest.mark.parametrize("held_out_bytes", [None, 0])  # held-out row sums kept / a third pass
def test_gram_matches_the_transcription(resnet_model, held_out_bytes):
    model = copy.deepcopy(resnet_model).double().eval()
    g = torch.Generator().manual_seed(9)
    y = torch.arange(80) % 4
    x_tr = torch.randn(80, 3, 32, 32, generator=g, dtype=torch.float64) + 0.5 * y[:, None, None, None]
    x = torch.cat([torch.randn(6, 3, 32, 32, generator=g, dtype=torch.float64),
                   3 * torch.rand(4, 3, 32, 32, generator=g, dtype=torch.float64)])
    powers = (1, 2, 3)
    kw = {} if held_out_bytes is None else {"held_out_bytes": held_out_bytes}
    s = create_score("gram", powers=powers, seed=2, **kw).fit(model, loader(x_tr, y, batch_size=16))
    held = s.heldout_.numpy()
    assert [int(held[y.numpy() == c].sum()) for c in range(4)] == [2] * 4  # int(0.1 * 20) per class
    _, tr = _taps(model, x_tr)
    yy = y.numpy()
    lows, highs, norms = [], [], []
    for f in tr:
        gp = np.stack([_gram(f, p) for p in powers], axis=1)  # (N, P, C)
        lo = np.stack([gp[(yy == c) & ~held].min(axis=0) for c in range(4)])
        hi = np.stack([gp[(yy == c) & ~held].max(axis=0) for c in range(4)])
        norms.append(np.mean([_dev(gp[i], lo[yy[i]], hi[yy[i]]).sum() for i in np.nonzero(held)[0]]))
        lows.append(lo)
        highs.append(hi)
    logits, te = _taps(model, x)
    pred = logits.argmax(axis=1)
    total = np.zeros(len(x))
    for f, lo, hi, n in zip(te, lows, highs, norms):
        gp = np.stack([_gram(f, p) for p in powers], axis=1)
        total += np.array([_dev(gp[i], lo[pred[i]], hi[pred[i]]).sum() for i in range(len(x))]) / n
    want = -total / softmax(logits, axis=1).max(axis=1)
    np.testing.assert_allclose(s.score(model, loader(x, batch_size=4)).numpy(), want, rtol=1e-9)
    assert len(tr) == s.num_layers_ > 10


def test_gram_keeps_the_held_out_row_sums_instead_of_a_third_pass(resnet_model):
    model = copy.deepcopy(resnet_model).eval()
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    g = torch.Generator().manual_seed(3)
    y = torch.arange(60) % 4
    x_tr = torch.randn(60, 3, 32, 32, generator=g) + 0.5 * y[:, None, None, None]
    kept = create_score("gram", powers=(1, 2), seed=1).fit(model, loader(x_tr, y, batch_size=16))
    assert sum(calls) == 60  # the ranges pass only (labels come from the loader)
    calls.clear()
    passes = create_score("gram", powers=(1, 2), seed=1, held_out_bytes=0).fit(model, loader(x_tr, y, batch_size=16))
    assert sum(calls) == 120  # over the budget: a second model pass for the held-out deviations
    assert torch.equal(kept.norms_, passes.norms_)  # the same rows summed in the same order
    with pytest.raises(ValueError, match="held_out_bytes"):
        create_score("gram", held_out_bytes=-1)


def test_gram_refuses_unusable_models_and_data(resnet_model):
    with pytest.raises(ScoreNotApplicable, match="Conv2d"):
        create_score("gram").fit(nn.Sequential(nn.Flatten(), nn.Linear(48, 4)), loader(_x(4, 0)))
    x = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ScoreNotApplicable, match="held out"):  # 3 samples per class: int(0.3) = 0
        create_score("gram").fit(resnet_model, loader(x, torch.arange(12) % 4))
    with pytest.raises(ValueError, match="powers"):
        create_score("gram", powers=(0, 1))


# ---- bad inputs for the scores the harness's tiny model cannot run (they need conv / stage modules) --
@pytest.mark.parametrize("name", ["rankfeat", "gram", "nac"])
def test_stage_scores_bad_inputs_and_float32_against_float64(resnet_model, name):
    g = torch.Generator().manual_seed(10)
    y = torch.arange(80) % 4
    px = 64 if name == "rankfeat" else 32  # RankFeat refuses the 1 x 1 last-stage maps of 32 px inputs
    x_tr = torch.randn(80, 3, px, px, generator=g) + 0.5 * y[:, None, None, None]
    s = create_score(name).fit(resnet_model, loader(x_tr, y, batch_size=16))
    x = torch.randn(5, 3, px, px, generator=g)
    for value in (float("nan"), float("inf")):
        bad = x.clone()
        bad[1, 0, 0, 0] = value
        with pytest.raises(ValueError, match=": x "):
            s.score(resnet_model, loader(bad))
    with pytest.raises(ValueError, match="no samples"):
        s.score(resnet_model, [])
    got = s.score(resnet_model, loader(x, batch_size=2))
    assert got.dtype == torch.float64 and torch.isfinite(got).all()
    if name == "nac":  # a coverage of discrete bins: float32 rounding may move a state across an edge
        return
    m64 = copy.deepcopy(resnet_model).double()
    ref = create_score(name).fit(m64, loader(x_tr.double(), y, batch_size=16)).score(m64, loader(x.double()))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("labels, match", [(lambda y: y + 4, "labels"), (lambda y: y - 1, "labels"),
                                           (lambda y: y.float(), "labels"), (lambda y: y * 0, "classes")])
def test_gram_fit_labels_are_checked(resnet_model, labels, match):
    y = torch.arange(80) % 4
    x_tr = torch.randn(80, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    with pytest.raises(ValueError, match=match):
        create_score("gram").fit(resnet_model, loader(x_tr, labels(y), batch_size=16))


# ---- NAC -----------------------------------------------------------------------------------------
def _nac_edges(m):  # the official coverage.py logspace(1e3, M)
    x = np.linspace(1, np.sqrt(1e3), num=m // 2)
    x_l = np.emath.logn(1e3, x)
    x = np.concatenate([x_l[:-1], (1 - x_l)[::-1]])
    x[-1] += 1e-2
    return np.append(x, 1.2)


def _nac_layer(states_fit, states, o, m, alpha):
    """Coverage of one layer: fit histogram (official Estimator.update) and per-sample mean (ood_test)."""
    e = _nac_edges(m)
    sig_fit, sig = 1 / (1 + np.exp(-alpha * states_fit)), 1 / (1 + np.exp(-alpha * states))
    act_fit = (sig_fit[:, None, :] >= e[None, :-1, None]) & (sig_fit[:, None, :] < e[None, 1:, None])
    cov = np.minimum(act_fit.sum(axis=0) / o, 1.0)  # (M - 1, D)
    act = (sig[:, None, :] >= e[None, :-1, None]) & (sig[:, None, :] < e[None, 1:, None])
    return (act * cov[None]).sum(axis=1).mean(axis=1)


def test_nac_edges_are_the_official_construction():
    from ood.scores.nac import nac_edges

    for m in (4, 50, 500, 1000):
        e = nac_edges(m).numpy()
        np.testing.assert_allclose(e, _nac_edges(m), rtol=1e-15)
        assert len(e) == m and e[0] == 0 and e[-1] == 1.2
    np.testing.assert_allclose(_nac_edges(50)[:4], [0, 0.119, 0.183, 0.228], atol=5e-4)  # the reference's values


def test_nac_avgpool_matches_the_closed_form_gradient():
    model = ReluNet(d=30, c=4).eval()
    model.head = SimpleNamespace(logits=model.fc)  # NAC differentiates through head.logits(h)
    y = torch.arange(60) % 4
    x_tr, x = _x(60, 12) + 0.3 * y[:, None, None, None], torch.cat([_x(8, 13), 4 * _x(4, 14)])
    s = create_score("nac", layers=("avgpool",), avgpool_O=3, avgpool_M=20, avgpool_sig_alpha=2.0, valid_num=32)
    s.fit(model, loader(x_tr, y, batch_size=16))
    sub = s.subset_.numpy()
    assert [int(sub[y.numpy() == c].sum()) for c in range(4)] == [8] * 4  # int(32 / 4) per class
    a, w, b = _np(model)

    def state(xx):  # o * g, g = dL/dh = W^T (p - 1/K) for L = sum_k -(1/K) log p_k
        h = np.maximum(xx.reshape(len(xx), -1) @ a.T, 0)
        p = softmax(h @ w.T + b, axis=1)
        return h * ((p - 1.0 / w.shape[0]) @ w)

    want = _nac_layer(state(x_tr.numpy()[sub]), state(x.numpy()), 3.0, 20, 2.0)
    np.testing.assert_allclose(s.score(model, loader(x, batch_size=5)).numpy(), want, rtol=1e-12)


def _nac_reference_states(h, maps, z):
    """NAC's states transcribed: ``h * dL/dh`` for the pooled features, then ``(sum a)(sum dL/da)`` over
    the positions of each map, ``L = sum -(1/K) log softmax(z)``."""
    loss = -(torch.log_softmax(z, dim=1) / z.shape[1]).sum()
    grads = torch.autograd.grad(loss, [h, *maps])
    out = [(h * grads[0]).detach().numpy()]
    for t, gt in zip(maps, grads[1:]):
        out.append((t.sum(dim=(2, 3)) * gt.sum(dim=(2, 3))).detach().numpy())
    return out


def test_nac_four_layers_match_the_transcription(resnet_model):
    model = copy.deepcopy(resnet_model).double().eval()
    g = torch.Generator().manual_seed(15)
    y = torch.arange(80) % 4
    x_tr = torch.randn(80, 3, 32, 32, generator=g, dtype=torch.float64) + 0.5 * y[:, None, None, None]
    x = torch.cat([torch.randn(5, 3, 32, 32, generator=g, dtype=torch.float64),
                   3 * torch.rand(3, 3, 32, 32, generator=g, dtype=torch.float64)])
    kw = dict(avgpool_O=2, avgpool_M=50, avgpool_sig_alpha=100, layer3_O=3, layer3_M=50, layer3_sig_alpha=10,
              layer2_O=2, layer2_M=50, layer2_sig_alpha=0.5, layer1_O=4, layer1_M=20, layer1_sig_alpha=0.05)
    s = create_score("nac", valid_num=40, **kw).fit(model, loader(x_tr, y, batch_size=16))
    bb = model.backbone

    def states(xx):  # explicit stage-by-stage forward; sums over positions, then the product
        a1 = bb.layer1(bb.maxpool(bb.act1(bb.bn1(bb.conv1(xx)))))
        a2 = bb.layer2(a1)
        a3 = bb.layer3(a2)
        h = bb.layer4(a3).mean(dim=(2, 3))
        return _nac_reference_states(h, [a3, a2, a1], model.head.logits(h))

    fit_states, test_states = states(x_tr[s.subset_]), states(x)
    want = np.mean([_nac_layer(f, t, kw[f"{ln}_O"], kw[f"{ln}_M"], kw[f"{ln}_sig_alpha"])
                    for f, t, ln in zip(fit_states, test_states, ("avgpool", "layer3", "layer2", "layer1"))], axis=0)
    np.testing.assert_allclose(s.score(model, loader(x, batch_size=3)).numpy(), want, rtol=1e-12)


def test_nac_settings_grid_and_models():
    grid = get_score_class("nac").GRID
    assert np.prod([len(v) for v in grid.values()]) == 256  # the official CIFAR-10 sweep
    for bad in ({"layer1_M": 51}, {"avgpool_O": 0}, {"layers": ("layer4",)}, {"valid_num": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            create_score("nac", **bad)
    with pytest.raises(ScoreNotApplicable, match="head.logits"):  # the gradient at h
        create_score("nac", layers=("avgpool",)).fit(ReluNet(), loader(_x(8, 0), torch.arange(8) % 4))
    with pytest.raises(ScoreNotApplicable, match="feature_info"):  # layer1..3 need timm stages
        create_score("nac", layers=("layer1",)).fit(ReluNet(), loader(_x(8, 0), torch.arange(8) % 4))


def test_nac_search_runs_the_model_once_per_loader(resnet_model, monkeypatch):
    """The states do not depend on the searched O / M / sig_alpha: the grid points of a search share
    them (``pass_memo``), so the model runs once per loader, and every grid point's AUROC, the choice
    and the test scores equal those of the search that recomputes them at every point."""
    from ood import evaluate_ood
    from ood.scores.nac import NAC

    g = torch.Generator().manual_seed(3)
    y = torch.arange(48) % 4
    mk = lambda n, s: torch.randn(n, 3, 32, 32, generator=g) * s  # noqa: E731
    fit, val, test = loader(mk(48, 1.0), y), loader(mk(16, 1.0), y[:16]), loader(mk(16, 1.0), y[:16])
    vood, tood = loader(mk(16, 3.0)), loader(mk(16, 3.0))
    fixed = {k: v[0] for k, v in NAC.GRID.items() if k not in ("layer1_O", "layer3_M")}  # 4 x 2 = 8 points
    fixed["valid_num"] = 40
    calls = []
    real_states = NAC.states
    monkeypatch.setattr(NAC, "states", lambda self, m, x, **kw: calls.append(len(x)) or real_states(self, m, x, **kw))

    def run():
        calls.clear()
        out = evaluate_ood(resnet_model, fit, test, {"far": tood}, scores=["nac"], score_kwargs={"nac": fixed},
                           val_loader=val, val_ood_loader=vood, search=True)
        return out, sum(calls)

    shared, n_shared = run()
    assert n_shared == 40 + 16 + 16 + 16 + 16  # the fit subset, validation ID / OOD, test ID / OOD: once each
    monkeypatch.setattr(NAC, "memoised", lambda self, key, loader, compute: compute())  # nothing kept
    alone, n_alone = run()
    assert n_alone == 8 * (40 + 16 + 16) + 40 + 16 + 16
    assert shared["search"] == alone["search"] and len(shared["search"]["nac"]["grid"]) == 8
    np.testing.assert_array_equal(shared["scores"]["nac"]["far"]["id"], alone["scores"]["nac"]["far"]["id"])
    np.testing.assert_array_equal(shared["scores"]["nac"]["far"]["ood"], alone["scores"]["nac"]["far"]["ood"])
    assert "pass_memo" not in shared["info"]["nac"]


def test_adascale_search_shares_its_perturbation_passes(monkeypatch):
    """AdaSCALE's (h, h~, z) depend on eps and o, not on the searched percentiles: AdaSCALE-A and -L
    and their 36 grid points share one pass per loader, with the results of recomputing each time."""
    from ood import evaluate_ood
    from ood.scores.adascale import _AdaSCALE

    model = ReluNet().eval()
    fit, val, test = (loader(_x(24, s), torch.arange(24) % 5) for s in (1, 2, 3))
    vood, tood = loader(3 * _x(24, 4)), loader(3 * _x(24, 5))
    calls = []
    real = _AdaSCALE._passes
    monkeypatch.setattr(_AdaSCALE, "_passes", lambda self, m, x, i: calls.append(len(x)) or real(self, m, x, i))

    def run():
        calls.clear()
        out = evaluate_ood(model, fit, test, {"far": tood}, scores=["adascale_a", "adascale_l"],
                           val_loader=val, val_ood_loader=vood, search=True)
        return out, sum(calls)

    shared, n_shared = run()
    assert n_shared == 4 * 24  # validation ID (fit and search), validation OOD, test ID, test OOD: once each
    monkeypatch.setattr(_AdaSCALE, "memoised", lambda self, key, loader, compute: compute())
    alone, n_alone = run()
    assert n_alone > 36 * n_shared
    assert shared["search"] == alone["search"]
    for n in ("adascale_a", "adascale_l"):
        np.testing.assert_array_equal(shared["scores"][n]["far"]["id"], alone["scores"][n]["far"]["id"])
        np.testing.assert_array_equal(shared["scores"][n]["far"]["ood"], alone["scores"][n]["far"]["ood"])
