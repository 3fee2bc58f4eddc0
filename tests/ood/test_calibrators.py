"""Calibrators beyond one temperature: vector scaling, matrix scaling with ODIR, histogram binning and
isotonic regression, against independent references (scipy / scikit-learn fits of the same model, a
hand-worked binning case) and their defining properties."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from ood.calibration import (
    HistogramBinning, IsotonicCalibration, MatrixScaling, TemperatureScaling, VectorScaling, odir_grid,
)


def _data(n, k, seed, scale=None, bias=None):
    """Logits z and labels drawn from softmax(scale * z + bias) (a known vector-scaling truth)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g, dtype=torch.float64) * 2
    s = torch.ones(k, dtype=torch.float64) if scale is None else torch.as_tensor(scale, dtype=torch.float64)
    b = torch.zeros(k, dtype=torch.float64) if bias is None else torch.as_tensor(bias, dtype=torch.float64)
    y = torch.multinomial(torch.softmax(z * s + b, 1), 1, generator=g).squeeze(1)
    return z, y


def _nll(s, y):
    s = s - s.max(axis=1, keepdims=True)
    return float(np.mean(np.log(np.exp(s).sum(axis=1)) - s[np.arange(len(y)), y]))


# -- vector scaling ----------------------------------------------------------------------------------------

def test_vector_scaling_with_equal_scales_is_temperature_scaling():
    z, y = _data(400, 4, 0)
    ts = TemperatureScaling().fit(z, y)
    vs = VectorScaling().fit(z, y)
    vs.scale = torch.full((4,), 1 / ts.temperature, dtype=torch.float64)
    vs.bias = torch.zeros(4, dtype=torch.float64)
    torch.testing.assert_close(vs.transform(z).softmax(1), ts.transform(z).softmax(1), rtol=0, atol=1e-15)


def test_vector_scaling_recovers_per_class_scales_and_beats_one_temperature():
    truth_v, truth_b = [0.5, 1.0, 2.0], [0.3, -0.2, -0.1]
    z, y = _data(20000, 3, 1, truth_v, truth_b)
    vs = VectorScaling().fit(z, y)
    assert vs.converged
    assert torch.allclose(vs.scale, torch.tensor(truth_v, dtype=torch.float64), atol=0.08)
    b = vs.bias - vs.bias.mean()  # b is defined up to a constant
    assert torch.allclose(b, torch.tensor(truth_b, dtype=torch.float64) - np.mean(truth_b), atol=0.06)
    assert vs.nll_after < TemperatureScaling().fit(z, y).nll_after < vs.nll_before


@pytest.mark.parametrize("bias", [True, False])
def test_vector_scaling_matches_an_independent_scipy_fit(bias):
    z, y = _data(300, 3, 2, [0.7, 1.4, 1.0])
    zn, yn = z.numpy(), y.numpy()

    def objective(p):  # written from the definition, numerical gradients (BFGS)
        return _nll(zn * p[:3] + (p[3:] if bias else 0.0), yn)

    ref = minimize(objective, np.r_[np.ones(3), np.zeros(3 if bias else 0)], method="BFGS", options={"gtol": 1e-9})
    vs = VectorScaling(bias=bias).fit(z, y)
    assert vs.nll_after == pytest.approx(ref.fun, abs=1e-8)
    p_ref = torch.softmax(torch.from_numpy(zn * ref.x[:3] + (ref.x[3:] if bias else 0.0)), 1)
    torch.testing.assert_close(vs.transform(z).softmax(1), p_ref, rtol=0, atol=1e-4)


# -- matrix scaling (ODIR) -----------------------------------------------------------------------------------

def test_unregularised_matrix_scaling_is_multinomial_logistic_regression():
    """lam = mu = 0: the MLE of softmax(W z + b), which scikit-learn's unpenalised multinomial
    LogisticRegression on the logits as features also computes (probabilities are unique)."""
    from sklearn.linear_model import LogisticRegression

    z, y = _data(600, 3, 3, [0.6, 1.5, 1.0])
    mix = z @ torch.tensor([[1.0, 0.3, 0.0], [0.0, 1.0, -0.4], [0.2, 0.0, 1.0]], dtype=torch.float64).T
    ms = MatrixScaling(lam=0.0, mu=0.0).fit(mix, y)
    lr = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10000).fit(mix.numpy(), y.numpy())
    z_test, _ = _data(200, 3, 4)
    torch.testing.assert_close(ms.transform(z_test).softmax(1), torch.from_numpy(lr.predict_proba(z_test.numpy())),
                               rtol=0, atol=2e-4)
    assert ms.converged and ms.nll_after <= VectorScaling().fit(mix, y).nll_after + 1e-9


def test_odir_solution_is_a_stationary_point_of_the_stated_objective():
    """NLL + lam / (K (K-1)) sum_{i != j} W_ij^2 + mu / K sum_j b_j^2, transcribed here and
    differentiated numerically: its gradient vanishes at the fitted (W, b)."""
    k, lam, mu = 4, 3.0, 0.5
    z, y = _data(500, k, 5)
    ms = MatrixScaling(lam=lam, mu=mu).fit(z, y)
    zn, yn = z.numpy(), y.numpy()

    def objective(p):
        w, b = p[: k * k].reshape(k, k), p[k * k:]
        off = w - np.diag(np.diag(w))
        return _nll(zn @ w.T + b, yn) + lam / (k * (k - 1)) * np.sum(off ** 2) + mu / k * np.sum(b ** 2)

    x = np.r_[ms.weight.numpy().ravel(), ms.bias.numpy()]
    h = 1e-6
    grad = np.array([(objective(x + h * e) - objective(x - h * e)) / (2 * h) for e in np.eye(x.size)])
    assert np.abs(grad).max() < 1e-5
    # a different penalty normalisation (e.g. lam without the 1/(K(K-1))) is not stationary there
    def other(p):
        w = p[: k * k].reshape(k, k)
        return objective(p) + (lam - lam / (k * (k - 1))) * np.sum((w - np.diag(np.diag(w))) ** 2)
    grad_other = np.array([(other(x + h * e) - other(x - h * e)) / (2 * h) for e in np.eye(x.size)])
    assert np.abs(grad_other).max() > 1e-3


def test_strong_odir_shrinks_to_vector_scaling_without_intercept():
    z, y = _data(800, 3, 6, [0.5, 1.5, 1.0])
    ms = MatrixScaling(lam=1e7, mu=1e7).fit(z, y)
    w = ms.weight
    assert (w - torch.diag(torch.diag(w))).abs().max() < 1e-3 and ms.bias.abs().max() < 1e-3
    vs = VectorScaling(bias=False).fit(z, y)
    torch.testing.assert_close(torch.diag(w), vs.scale, rtol=0, atol=5e-3)


def test_odir_cross_validation_chooses_from_the_grid():
    z, y = _data(300, 3, 7, [0.5, 1.5, 1.0])
    ms = MatrixScaling(grid=[1e-2, 1.0, 1e2]).fit(z, y)
    assert set(ms.cv_nll) == {1e-2, 1.0, 1e2} and ms.lam == ms.mu == min(ms.cv_nll, key=ms.cv_nll.get)
    # the refit on all the data is the fixed-lambda fit at the chosen value
    fixed = MatrixScaling(lam=ms.lam, mu=ms.mu).fit(z, y)
    torch.testing.assert_close(ms.weight, fixed.weight)
    assert odir_grid(10) == [10.0 ** i for i in range(-5, 7)] and odir_grid(100)[0] == 1e-2


# -- histogram binning ----------------------------------------------------------------------------------------

def test_histogram_binning_hand_worked_case():
    """Two classes, 4 bins ((0, .25], (.25, .5], (.5, .75], (.75, 1]). Fit probabilities of class 0:
    .1 .2 .6 .7 .9 (labels 1 0 0 0 0) -> class-0 bins: [.25, .75] holds .1, .2 (one is class 0)
    -> 1/2; (.25, .5] empty -> centre .375; (.5, .75] holds .6, .7 (both class 0) -> 1; (.75, 1] holds
    .9 -> 1. Class 1 sees 1 - p: .9 .8 .4 .3 .1 -> bins: (0, .25]: .1 (label 0 -> 0); (.25, .5]:
    .4, .3 -> 0; (.5, .75] empty -> .625; (.75, 1]: .9, .8 (one is class 1) -> 1/2."""
    p0 = torch.tensor([0.1, 0.2, 0.6, 0.7, 0.9], dtype=torch.float64)
    logits = torch.stack([p0.log(), (1 - p0).log()], 1)
    y = torch.tensor([1, 0, 0, 0, 0])
    hb = HistogramBinning(n_bins=4).fit(logits, y)
    np.testing.assert_allclose(hb.bin_values, [[0.5, 0.375, 1.0, 1.0], [0.0, 0.0, 0.625, 0.5]], atol=1e-15)
    np.testing.assert_array_equal(hb.bin_counts, [[2, 0, 2, 1], [1, 2, 0, 2]])
    # new rows: p0 = .4 -> class-0 bin 2 (.375), p1 = .6 -> class-1 bin 3 (.625); p0 = .8 -> 1, p1 = .2 -> 0,
    # floored at eps = 1e-6 before renormalising; p0 = .3 -> .375, p1 = .7 -> .625
    q0 = torch.tensor([0.4, 0.8, 0.3], dtype=torch.float64)
    test = torch.stack([q0.log(), (1 - q0).log()], 1)
    raw = np.array([[0.375, 0.625], [1.0, 1e-6], [0.375, 0.625]])
    expected = raw / raw.sum(1, keepdims=True)
    np.testing.assert_allclose(hb.predict_proba(test), expected, atol=1e-15)
    torch.testing.assert_close(hb.transform(test).softmax(1), torch.from_numpy(expected), rtol=0, atol=1e-15)


def test_histogram_binning_edges_are_right_closed_and_all_zero_rows_become_uniform():
    hb = HistogramBinning(n_bins=2)
    # exactly 0.5 goes into the first bin (0, .5], as the package's ECE bins
    half = torch.zeros(2, 2, dtype=torch.float64)
    hb.fit(torch.cat([half, torch.tensor([[4.0, -4.0]], dtype=torch.float64)]), torch.tensor([1, 1, 0]))
    # class 0: the two 0.5s (label 1) are in bin 1 -> 0, the 0.9997 in bin 2 -> 1; class 1: bin 1 holds
    # the two 0.5s (label 1) and the 0.0003 (label 0) -> 2/3
    np.testing.assert_allclose(hb.bin_values, [[0.0, 1.0], [2 / 3, 0.75]], atol=1e-15)
    out = hb.predict_proba(half)  # class 0 -> 0, floored at 1e-6; class 1 -> 2/3
    np.testing.assert_allclose(out, [[1e-6 / (2 / 3 + 1e-6), (2 / 3) / (2 / 3 + 1e-6)]] * 2, atol=1e-15)
    # a row whose maps all give 0 becomes uniform
    hb.bin_values[:] = 0.0
    np.testing.assert_allclose(hb.predict_proba(half), [[0.5, 0.5]] * 2, atol=1e-15)


# -- isotonic regression ----------------------------------------------------------------------------------------

def test_isotonic_matches_scikit_learn_calibrated_classifier():
    """One-vs-rest isotonic maps on the class probabilities, then renormalised: what scikit-learn's
    CalibratedClassifierCV(method='isotonic') does for a multiclass (K >= 3) frozen classifier."""
    from sklearn.base import BaseEstimator, ClassifierMixin
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.frozen import FrozenEstimator

    class FixedProbs(ClassifierMixin, BaseEstimator):
        """Returns the softmax of the rows it is given (the rows are the logits themselves)."""

        def fit(self, x, y):
            self.classes_ = np.arange(x.shape[1])
            return self

        def predict_proba(self, x):
            return torch.softmax(torch.from_numpy(x), 1).numpy()

        def predict(self, x):
            return x.argmax(1)

    z, y = _data(1500, 4, 8, [2.0, 2.5, 1.5, 3.0])
    z_test, _ = _data(500, 4, 9)
    ref = CalibratedClassifierCV(FrozenEstimator(FixedProbs().fit(z.numpy(), y.numpy())), method="isotonic")
    ref.fit(z.numpy(), y.numpy())
    iso = IsotonicCalibration().fit(z, y)
    np.testing.assert_allclose(iso.predict_proba(z_test), ref.predict_proba(z_test.numpy()), atol=1e-5)


def test_isotonic_maps_are_monotone_and_improve_the_fit_nll():
    z, y = _data(2000, 3, 10, [3.0, 3.0, 3.0])  # labels from sharper probabilities: under-confident logits
    iso = IsotonicCalibration().fit(z, y)
    grid = torch.linspace(-6, 6, 200, dtype=torch.float64)
    p = torch.softmax(torch.stack([grid, torch.zeros_like(grid), torch.zeros_like(grid)], 1), 1)[:, 0].numpy()
    mapped = iso.models[0].predict(p)
    assert np.all(np.diff(mapped) >= 0) and mapped.min() >= 0 and mapped.max() <= 1
    assert iso.nll_after < iso.nll_before


# -- shared interface ---------------------------------------------------------------------------------------------

CALIBRATORS = [lambda: VectorScaling(), lambda: MatrixScaling(lam=1.0, mu=1.0), lambda: HistogramBinning(),
               lambda: IsotonicCalibration()]


@pytest.mark.parametrize("make", CALIBRATORS)
def test_interface_and_errors(make):
    z, y = _data(200, 3, 11, [2.0, 2.0, 2.0])
    cal = make()
    with pytest.raises(RuntimeError, match="before fit"):
        cal.transform(z)
    out = cal.fit_transform(z.float(), y)
    assert out.dtype == torch.float32 and out.shape == z.shape and torch.isfinite(out).all()
    assert math.isfinite(cal.nll_after) and cal.nll_after <= cal.nll_before + 1e-9
    with pytest.raises(ValueError, match=r"logits must have shape \(N, 3\)"):
        cal.transform(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="logits contains 1 NaN"):
        cal.transform(torch.tensor([[0.0, float("nan"), 1.0]]))
    with pytest.raises(TypeError, match="logits must be a floating-point"):
        cal.transform(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="target values must lie in"):
        make().fit(z, torch.full((200,), 3))
    with pytest.raises(ValueError, match="logits is empty"):
        make().fit(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


def test_constructor_errors_name_the_argument():
    with pytest.raises(ValueError, match="give both or neither"):
        MatrixScaling(lam=1.0)
    with pytest.raises(ValueError, match="lam must be >= 0"):
        MatrixScaling(lam=-1.0, mu=0.0)
    with pytest.raises(ValueError, match="folds must be an int >= 2"):
        MatrixScaling(folds=1)
    with pytest.raises(ValueError, match="grid must be a non-empty list"):
        MatrixScaling(grid=[])
    with pytest.raises(ValueError, match="n_bins must be > 0"):
        HistogramBinning(n_bins=0)
    with pytest.raises(ValueError, match="eps must lie in"):
        IsotonicCalibration(eps=0.0)
    with pytest.raises(ValueError, match="fewer than folds"):
        MatrixScaling().fit(torch.zeros(3, 2, dtype=torch.float64), torch.tensor([0, 1, 0]))
