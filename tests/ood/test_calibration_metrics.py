"""The calibration metrics against independent references: float64 numpy loops, torchmetrics, scikit-learn."""

import math

import numpy as np
import pytest
import torch

from ood.calibration import (
    accuracy, adaptive_calibration_error, brier_score, calibration_metrics, classwise_calibration_error,
    expected_calibration_error, maximum_calibration_error, negative_log_likelihood, reliability_bins,
)


def _data(n=500, c=6, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64) * scale
    # labels drawn from a sharpened softmax: a classifier that is over-confident, not random
    y = torch.multinomial(torch.softmax(logits * 0.6, 1), 1, generator=g).squeeze(1)
    return logits, y


def _np_bins(conf, n_bins):
    """Reference bin index by explicit comparison: lo < conf <= hi (conf = 0 -> bin 0)."""
    edges = np.linspace(0, 1, n_bins + 1)
    idx = np.zeros(conf.size, dtype=int)
    for b in range(n_bins):
        idx[(conf > edges[b]) & (conf <= edges[b + 1])] = b
    return idx


def _np_ece(p, y, n_bins, reduce="sum"):
    conf, hit = p.max(1), (p.argmax(1) == y).astype(float)
    idx = _np_bins(conf, n_bins)
    gaps = []
    for b in range(n_bins):
        m = idx == b
        if m.any():
            gaps.append((m.mean(), abs(hit[m].mean() - conf[m].mean())))
    return sum(w * g for w, g in gaps) if reduce == "sum" else max(g for _, g in gaps)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_ece_and_mce_match_numpy_loop(seed, n_bins):
    logits, y = _data(seed=seed)
    p = torch.softmax(logits, 1).numpy()
    assert math.isclose(expected_calibration_error(logits, y, n_bins), _np_ece(p, y.numpy(), n_bins), rel_tol=1e-10)
    assert math.isclose(maximum_calibration_error(logits, y, n_bins), _np_ece(p, y.numpy(), n_bins, "max"),
                        rel_tol=1e-10)


@pytest.mark.parametrize("norm,fn", [("l1", expected_calibration_error), ("max", maximum_calibration_error)])
def test_ece_and_mce_match_torchmetrics(norm, fn):
    tm = pytest.importorskip("torchmetrics.classification")
    logits, y = _data(n=2000, seed=3)
    metric = tm.MulticlassCalibrationError(num_classes=6, n_bins=15, norm=norm)
    ref = float(metric(torch.softmax(logits, 1).float(), y))
    # torchmetrics bins [lo, hi) and works in float32: equal up to float32 rounding on continuous data
    assert math.isclose(fn(logits, y, 15), ref, rel_tol=1e-4, abs_tol=1e-6)


def test_adaptive_ece_matches_numpy_equal_mass():
    logits, y = _data(n=503, seed=4)  # 503 = 15 * 33 + 8: chunks of 34 and 33
    p = torch.softmax(logits, 1).numpy()
    conf, hit = p.max(1), (p.argmax(1) == y.numpy()).astype(float)
    order = np.argsort(conf, kind="stable")
    ref = sum(abs(hit[c].sum() - conf[c].sum()) for c in np.array_split(order, 15)) / conf.size
    assert math.isclose(adaptive_calibration_error(logits, y, 15), ref, rel_tol=1e-10)
    # one bin: |accuracy - mean confidence|
    assert math.isclose(adaptive_calibration_error(logits, y, 1), abs(hit.mean() - conf.mean()), rel_tol=1e-10)


def test_classwise_ece_matches_numpy_loop():
    logits, y = _data(n=400, c=4, seed=5)
    p = torch.softmax(logits, 1).numpy()
    total = 0.0
    for k in range(4):
        pk, hk = p[:, k], (y.numpy() == k).astype(float)
        idx = _np_bins(pk, 15)
        total += sum((idx == b).mean() * abs(hk[idx == b].mean() - pk[idx == b].mean())
                     for b in range(15) if (idx == b).any())
    assert math.isclose(classwise_calibration_error(logits, y, 15), total / 4, rel_tol=1e-10)


def test_brier_hand_cases_and_formula():
    # torch-uncertainty BrierScore docstring cases
    p1 = torch.tensor([[0.8, 0.2], [0.3, 0.7]], dtype=torch.float64)
    assert math.isclose(brier_score(p1, torch.tensor([0, 1]), from_probs=True), 0.13, rel_tol=1e-12)
    p2 = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]], dtype=torch.float64)
    assert math.isclose(brier_score(p2, torch.tensor([0, 2]), from_probs=True), 0.52, rel_tol=1e-12)
    logits, y = _data(seed=6)
    p = torch.softmax(logits, 1).numpy()
    ref = np.mean(np.sum((p - np.eye(6)[y.numpy()]) ** 2, axis=1))
    assert math.isclose(brier_score(logits, y), ref, rel_tol=1e-12)


def test_nll_and_accuracy_match_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    logits, y = _data(seed=7)
    p = torch.softmax(logits, 1).numpy()
    assert math.isclose(negative_log_likelihood(logits, y), metrics.log_loss(y.numpy(), p, labels=range(6)),
                        rel_tol=1e-9)
    assert math.isclose(negative_log_likelihood(torch.from_numpy(p), y, from_probs=True),
                        metrics.log_loss(y.numpy(), p, labels=range(6)), rel_tol=1e-9)
    assert math.isclose(accuracy(logits, y), metrics.accuracy_score(y.numpy(), p.argmax(1)), rel_tol=1e-12)


def test_logits_and_probs_give_the_same_numbers():
    logits, y = _data(seed=8)
    a = calibration_metrics(logits, y)
    b = calibration_metrics(torch.softmax(logits, 1), y, from_probs=True)
    for k in ("acc", "ece", "adaptive_ece", "classwise_ece", "mce", "brier", "nll"):
        assert math.isclose(a[k], b[k], rel_tol=1e-9, abs_tol=1e-12), k


def test_perfectly_calibrated_has_small_ece_and_overconfident_large():
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(20000, 5, generator=g, dtype=torch.float64) * 2
    y = torch.multinomial(torch.softmax(logits, 1), 1, generator=g).squeeze(1)  # labels ~ the model itself
    assert expected_calibration_error(logits, y) < 0.02
    assert expected_calibration_error(logits * 4, y) > 0.15


def test_reliability_bins_consistent_with_ece():
    logits, y = _data(seed=10)
    b = reliability_bins(logits, y, 15)
    assert sum(b["count"]) == y.numel() and len(b["lower"]) == 15
    ece = sum(n / y.numel() * abs(a - c) for n, a, c in zip(b["count"], b["accuracy"], b["confidence"]) if n)
    assert math.isclose(ece, expected_calibration_error(logits, y), rel_tol=1e-10)


@pytest.mark.parametrize("call,match", [
    (lambda: expected_calibration_error(torch.tensor([[0.5, 0.6]]), torch.tensor([0]), from_probs=True),
     "probs rows must sum to 1"),
    (lambda: brier_score(torch.tensor([[1.2, -0.2]]), torch.tensor([0]), from_probs=True), r"probs must lie in \[0, 1\]"),
    (lambda: expected_calibration_error(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0])), "logits contains"),
    (lambda: negative_log_likelihood(torch.zeros(2, 3), torch.tensor([0, 3])), "target values must lie"),
    (lambda: brier_score(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)), "logits is empty"),
    (lambda: adaptive_calibration_error(torch.zeros(5, 3), torch.zeros(5, dtype=torch.long), n_bins=15),
     "at least n_bins=15 samples"),
    (lambda: expected_calibration_error(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), n_bins=0), "n_bins"),
    (lambda: accuracy(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long)), "target has 3 entries"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_float_labels_rejected():
    with pytest.raises(TypeError, match="target"):
        expected_calibration_error(torch.zeros(2, 3), torch.zeros(2))


def test_probs_keyword_and_probabilities_passed_as_logits():
    """Probabilities given as logits were softmaxed again (a flatter distribution: a wrong ECE)."""
    logits, y = _data(seed=11)
    p = torch.softmax(logits, 1)
    want = calibration_metrics(logits, y)
    got = calibration_metrics(probs=p, target=y)
    for k in ("acc", "ece", "adaptive_ece", "classwise_ece", "mce", "brier", "nll"):
        assert math.isclose(got[k], want[k], rel_tol=1e-9, abs_tol=1e-12), k
    assert math.isclose(expected_calibration_error(probs=p, target=y), want["ece"], rel_tol=1e-9)
    for fn in (calibration_metrics, expected_calibration_error, adaptive_calibration_error, brier_score,
               negative_log_likelihood, accuracy, reliability_bins):
        with pytest.raises(ValueError, match=r"logits look like probabilities.*probs="):
            fn(p, y)
    with pytest.raises(ValueError, match="not both"):
        calibration_metrics(logits, y, probs=p)
    with pytest.raises(TypeError, match="target is required"):
        calibration_metrics(probs=p)
    with pytest.raises(TypeError, match="probs="):
        calibration_metrics(target=y)
    # non-negative logits whose rows do not sum to 1 are still logits (softmax is shift invariant)
    assert math.isclose(calibration_metrics(logits - logits.min(), y)["ece"], want["ece"], rel_tol=1e-9)


def test_adaptive_ece_with_tied_confidences_does_not_depend_on_row_order():
    """Tied samples count with their group's mean correctness (a chunk boundary splits the group evenly)."""
    p = torch.tensor([[0.6, 0.4]] * 4, dtype=torch.float64)
    hit_first, alternating = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    # per chunk of two: |1 - 1.2| (half of the group's two correct samples each) -> (0.2 + 0.2) / 4
    for y in (hit_first, alternating):
        assert math.isclose(adaptive_calibration_error(probs=p, target=y, n_bins=2), 0.1, rel_tol=1e-12)
    g = torch.Generator().manual_seed(12)
    templates = torch.randn(5, 4, generator=g, dtype=torch.float64) * 2
    rows = torch.randint(0, 5, (300,), generator=g)
    logits = torch.cat([templates[rows], torch.randn(40, 4, generator=g, dtype=torch.float64)])  # ties + singles
    y = torch.randint(0, 4, (340,), generator=g)
    ref = adaptive_calibration_error(logits, y, 15)
    for _ in range(20):
        perm = torch.randperm(340, generator=g)
        assert adaptive_calibration_error(logits[perm], y[perm], 15) == ref
