"""Mahalanobis: float64 reference distance, sign, class structure, pre-processing, protocols, errors."""

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError

from ood import MAHALANOBIS_EPS_GRID, Mahalanobis, fit_class_gaussian, mahalanobis_distances, ood_metrics

from conftest import LinearFeatureModel, loader


def gaussian_data(n_per=200, c=4, d=8, sep=6.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    mus = torch.randn(c, d, generator=g, dtype=torch.float64) * sep
    a = torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
    cov = a @ a.T + 0.5 * torch.eye(d, dtype=torch.float64)
    chol = torch.linalg.cholesky(cov)
    y = torch.arange(c).repeat_interleave(n_per)
    x = mus[y] + torch.randn(len(y), d, generator=g, dtype=torch.float64) @ chol.T
    return x, y, mus, cov


def reference_distances(f, x_fit, y_fit, c):
    """Naive float64: class means, covariance / N of the centred data, numpy pinv, per-class loop."""
    f, x_fit, y_fit = f.numpy(), x_fit.numpy(), y_fit.numpy()
    mus = np.stack([x_fit[y_fit == k].mean(0) for k in range(c)])
    z = x_fit - mus[y_fit]
    z = z - z.mean(0)
    prec = np.linalg.pinv(z.T @ z / len(z))
    return np.stack([np.einsum("nd,de,ne->n", f - mus[k], prec, f - mus[k]) for k in range(c)], 1)


@pytest.mark.parametrize("c, d", [(3, 5), (10, 16)])
def test_distance_matches_float64_reference(c, d):
    x, y, _, _ = gaussian_data(n_per=40, c=c, d=d)
    means, prec, used = fit_class_gaussian(x, y, c, covariance="empirical")
    assert used == "empirical"
    test = torch.randn(25, d, dtype=torch.float64) * 3
    ref = reference_distances(test, x, y, c)
    torch.testing.assert_close(mahalanobis_distances(test, means, prec), torch.from_numpy(ref),
                               rtol=1e-9, atol=1e-9)
    # float32 features give the same (computed in float64)
    torch.testing.assert_close(mahalanobis_distances(test.float(), means, prec),
                               torch.from_numpy(ref), rtol=1e-5, atol=1e-4)
    m = Mahalanobis(covariance="empirical").fit_features(x, y, c)
    torch.testing.assert_close(m.score_features(test), -torch.from_numpy(ref).amin(1), rtol=1e-9, atol=1e-9)


def test_chunking_is_invisible():
    x, y, _, _ = gaussian_data(n_per=30, c=3, d=6)
    means, prec, _ = fit_class_gaussian(x, y, 3)
    test = torch.randn(50, 6, dtype=torch.float64)
    torch.testing.assert_close(mahalanobis_distances(test, means, prec, chunk=7),
                               mahalanobis_distances(test, means, prec))


def test_sign_higher_is_in_distribution():
    x, y, mus, _ = gaussian_data()
    m = Mahalanobis().fit_features(x, y, 4)
    s = m.score_features(torch.cat([mus, mus + 100.0]))
    assert (s[:4] > s[4:]).all()
    assert (s[:4] <= 0).all()
    torch.testing.assert_close(m.score_features(m.means_[0]), torch.zeros(4, dtype=torch.float64),
                               atol=1e-9, rtol=0)


def test_recovers_class_structure_on_gaussians():
    x, y, mus, cov = gaussian_data(n_per=300, c=4, d=8, seed=1)
    m = Mahalanobis(covariance="empirical").fit_features(x, y, 4)
    torch.testing.assert_close(m.means_[0], mus, atol=0.35, rtol=0)
    torch.testing.assert_close(torch.linalg.inv(m.precisions_[0]), cov, atol=0.25, rtol=0)
    xt, yt, _, _ = gaussian_data(n_per=100, c=4, d=8, seed=2)
    xt = xt - gaussian_data(c=4, d=8, seed=2)[2][yt] + mus[yt]  # test samples around the true means
    pred = m.layer_distances(xt).argmin(1)
    assert (pred == yt).double().mean() > 0.97
    far = torch.randn(400, 8, dtype=torch.float64) * 12
    assert ood_metrics(m.score_features(xt), m.score_features(far))["auroc"] > 0.97


@pytest.mark.parametrize("cov", ["empirical", "ledoit_wolf", "auto"])
def test_singular_covariance_never_crashes(cov):
    x, y, _, _ = gaussian_data(n_per=3, c=4, d=30)  # 12 samples, width 30
    x[:, 5] = x[:, 4]  # exactly collinear column too
    m = Mahalanobis(covariance=cov).fit_features(x, y, 4)
    s = m.score_features(torch.randn(7, 30, dtype=torch.float64))
    assert torch.isfinite(s).all()
    assert m.covariances_[0] == ("ledoit_wolf" if cov == "auto" else cov)


def test_auto_covariance_switches_at_10x_width():
    x, y, _, _ = gaussian_data(n_per=25, c=4, d=8)  # 100 samples, 80 = 10 x 8
    assert fit_class_gaussian(x, y, 4)[2] == "empirical"
    assert fit_class_gaussian(x[:60], y[:60], num_classes=3)[2] == "ledoit_wolf"


def test_ledoit_wolf_helps_when_samples_are_few():
    x, y, _, _ = gaussian_data(n_per=8, c=4, d=48, sep=1.0, seed=3)
    xt, yt, _, _ = gaussian_data(n_per=100, c=4, d=48, sep=1.0, seed=3)
    far = xt + 1.5 * torch.randn_like(xt)
    auc = {}
    for cov in ("empirical", "ledoit_wolf"):
        m = Mahalanobis(covariance=cov, num_classes=4).fit_features(x, y)
        auc[cov] = ood_metrics(m.score_features(xt), m.score_features(far))["auroc"]
    assert auc["ledoit_wolf"] > auc["empirical"]


def test_multi_layer_and_combiner():
    x, y, _, _ = gaussian_data(n_per=50, c=3, d=6)
    x2 = torch.cat([x, x ** 2], 1)
    m = Mahalanobis().fit_features([x, x2], y, 3)
    ls = m.layer_scores_features([x, x2])
    assert ls.shape == (150, 2)
    torch.testing.assert_close(ls[:, 0], Mahalanobis().fit_features(x, y, 3).score_features(x))
    with pytest.raises(NotFittedError, match="regression"):
        m.score_features([x, x2])
    xf = x + 20.0
    far = [xf, torch.cat([xf, xf ** 2], 1)]
    m.fit_combiner(ls, m.layer_scores_features(far))
    s_in, s_out = m.score_features([x, x2]), m.score_features(far)
    assert s_in.shape == (150,) and s_in.dtype == torch.float64
    assert ood_metrics(s_in, s_out)["auroc"] > 0.99


def test_bad_input():
    x, y, _, _ = gaussian_data(n_per=10, c=3, d=5)
    with pytest.raises(NotFittedError, match="fit"):
        Mahalanobis().score_features(x)
    assert issubclass(NotFittedError, ValueError)
    m = Mahalanobis().fit_features(x, y, 3)
    with pytest.raises(ValueError, match="width in_features=5"):
        m.score_features(torch.randn(4, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        m.score_features(torch.tensor([[float("nan")] * 5], dtype=torch.float64))
    with pytest.raises(ValueError, match="fewer samples \\(2\\) than classes \\(3\\)"):
        Mahalanobis().fit_features(x[:2], y[:2], num_classes=3)
    with pytest.raises(ValueError, match="NaN"):
        bad = x.clone()
        bad[0, 0] = float("nan")
        Mahalanobis().fit_features(bad, y, 3)
    with pytest.raises(ValueError, match="empty"):
        Mahalanobis().fit_features(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="classes \\[1\\] have no samples"):
        Mahalanobis().fit_features(x[y != 1], y[y != 1], num_classes=3)
    with pytest.raises(TypeError, match="labels must hold integer"):
        Mahalanobis().fit_features(x, y.double(), 3)
    with pytest.raises(ValueError, match="labels values must lie in \\[0, 2\\)"):
        Mahalanobis().fit_features(x, y, num_classes=2)
    for kw, name in [({"protocol": "magic"}, "protocol"), ({"covariance": "oas"}, "covariance"),
                     ({"eps": -1.0}, "eps"), ({"eps_grid": ()}, "eps_grid")]:
        with pytest.raises(ValueError, match=name):
            Mahalanobis(**kw)


def _linear_setup(seed=0):
    torch.manual_seed(seed)
    model = LinearFeatureModel(in_dim=6, feat_dim=4, num_classes=3, seed=seed)
    y = torch.arange(3).repeat_interleave(30)
    x = torch.randn(90, 6, dtype=torch.float64) + 2.0 * torch.nn.functional.one_hot(y, 6).double()
    return model, x, y


@pytest.mark.parametrize("eps", [0.0005, 0.01])
def test_preprocessing_step_in_closed_form(eps):
    """x' = x - eps * sign(2 A^T P (Ax - mu_c*)), c* the closest class; then score = -min_c d(Ax')."""
    model, x, y = _linear_setup()
    m = Mahalanobis(protocol="simple", eps=eps).fit(model, loader(x, y))
    A = model.A.detach()
    mu, P = m.means_[0], m.precisions_[0]
    f = x @ A.T
    d = mahalanobis_distances(f, mu, P)
    c = d.argmin(1)
    grad = 2 * (f - mu[c]) @ P @ A
    x_hat = x - eps * torch.where(grad >= 0, 1.0, -1.0).double()
    ref = -mahalanobis_distances(x_hat @ A.T, mu, P).amin(1)
    out = m.score(model, loader(x, y, batch_size=13))
    torch.testing.assert_close(out, ref)
    assert (out >= -d.amin(1) - 1e-12).all()  # the step raises the score
    grid = m.layer_scores(model, loader(x, y), [0.0, eps])
    torch.testing.assert_close(grid[0.0][:, 0], -d.amin(1))
    torch.testing.assert_close(grid[eps][:, 0], ref)


def test_model_level_simple_matches_features_level():
    model, x, y = _linear_setup(1)
    m = Mahalanobis().fit(model, loader(x, y))
    assert m.protocol_ == "simple" and m.eps_ == 0.0 and m.layer_names_ == ["penultimate"]
    f = model.features(x).detach()
    torch.testing.assert_close(m.score(model, loader(x, y)), m.score_features(f))
    with pytest.raises(ValueError, match="val_loader"):
        Mahalanobis(protocol="validation").fit(model, loader(x, y))
    with pytest.raises(NotFittedError):
        Mahalanobis().score(model, loader(x, y))


def test_full_method_on_a_timm_backbone(resnet_model):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 16, 16)
    y = torch.arange(4).repeat(4)
    xv, yv = torch.randn(8, 3, 16, 16), torch.arange(4).repeat(2)
    m = Mahalanobis(eps_grid=(0.0, 0.002)).fit(resnet_model, loader(x, y, 16), val_loader=loader(xv, yv, 8))
    assert m.protocol_ == "validation"
    assert m.layer_names_ == ["act1", "layer1", "layer2", "layer3", "penultimate"]
    assert [mu.shape[1] for mu in m.means_] == [32, 32, 48, 192, 96]
    assert m.covariances_ == ["ledoit_wolf"] * 5  # 16 samples << 10 x width
    assert m.eps_ in (0.0, 0.002) and set(m.selection_) == {0.0, 0.002}
    assert m.combiner_ is not None
    s = m.score(resnet_model, loader(torch.randn(10, 3, 16, 16), batch_size=10))
    assert s.shape == (10,) and s.dtype == torch.float64 and torch.isfinite(s).all()
    assert not resnet_model.training


def test_paper_protocol_holds_out_its_fitting_samples():
    g = torch.Generator().manual_seed(0)
    id_grid = {0.0: torch.randn(40, 2, generator=g, dtype=torch.float64)}
    ood_grid = {0.0: torch.randn(30, 2, generator=g, dtype=torch.float64) - 3}
    m = Mahalanobis(protocol="paper", paper_fit_size=1000)
    m.means_ = [torch.zeros(2, 1), torch.zeros(2, 1)]  # fitted Gaussians are not used here
    s_in, s_out = m.fit_paper_scores(id_grid, ood_grid)
    assert s_in.shape == (40 - 15,) and s_out.shape == (30 - 15,)  # block = min(1000, 20, 15)
    assert ood_metrics(s_in, s_out)["auroc"] > 0.95
    with pytest.raises(ValueError, match="paper"):
        m.fit_paper_scores({0.0: id_grid[0.0][:5]}, {0.0: ood_grid[0.0][:5]})


def test_official_grid():
    assert MAHALANOBIS_EPS_GRID == (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01)


def test_an_absent_highest_class_is_an_error_not_a_dropped_class():
    """Labels 0, 1 of a 3-class problem: inferring C = max + 1 = 2 used to drop class 2 silently."""
    x, y, _, _ = gaussian_data(n_per=20, c=3, d=4)
    keep = y != 2
    with pytest.raises(ValueError, match="num_classes is required"):
        Mahalanobis().fit_features(x[keep], y[keep])
    with pytest.raises(TypeError, match="num_classes"):
        fit_class_gaussian(x[keep], y[keep])
    with pytest.raises(ValueError, match=r"labels: classes \[2\] have no samples.*num_classes=3"):
        Mahalanobis(num_classes=3).fit_features(x[keep], y[keep])
    # model level: a model without a head's num_classes takes C from its logits (3 here)
    model, xm, ym = _linear_setup()
    with pytest.raises(ValueError, match=r"labels: classes \[2\] have no samples"):
        Mahalanobis().fit(model, loader(xm[ym != 2], ym[ym != 2]))
    assert Mahalanobis().fit(model, loader(xm, ym)).means_[0].shape[0] == 3
