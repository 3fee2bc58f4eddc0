"""Metrics against hand-worked cases, naive threshold scans, invariances and bad input."""

import numpy as np
import pytest
import torch

from ood import ood_metrics

KEYS = ("auroc", "aupr_in", "aupr_out", "fpr95", "detection_error")


def naive_auroc(a, b):
    return np.mean([1.0 if x > y else 0.5 if x == y else 0.0 for x in a for y in b])


def naive_points(pos, neg):
    """(threshold, TPR, FPR) for every distinct threshold t (accept score >= t), high to low."""
    ts = np.unique(np.r_[pos, neg])[::-1]
    return [(t, np.mean(pos >= t), np.mean(neg >= t)) for t in ts]


def naive_fpr_nearest(id_s, ood_s, r=0.95):
    pts = naive_points(id_s, ood_s)
    last = next(i for i, (_, tpr, _) in enumerate(pts) if tpr == 1.0)
    best = None
    for i in range(last + 1):  # ties: keep the later (lower-threshold) point
        d = abs(pts[i][1] - r)
        if best is None or d <= best[0]:
            best = (d, pts[i][2])
    return best[1]


def thinned(points):
    """sklearn's ``drop_intermediate``: drop an inner point whose FP and TP count steps in and out are equal.

    Rates are counts over fixed totals, so equal rate steps are equal count steps.
    """
    keep = [points[0]]
    for prev, cur, nxt in zip(points, points[1:], points[2:]):
        if not (np.isclose(cur[1] - prev[1], nxt[1] - cur[1]) and np.isclose(cur[2] - prev[2], nxt[2] - cur[2])):
            keep.append(cur)
    return keep + points[-1:] if len(points) > 1 else keep


def naive_fpr_first(id_s, ood_s, r=0.95, drop=True):
    # OOD positive, scored by -s: first threshold (high to low) whose TPR on OOD >= r
    pts = naive_points(-ood_s, -id_s)
    for _, tpr, fpr in (thinned(pts) if drop else pts):
        if tpr >= r:
            return fpr


def naive_fpr_first_id_positive(id_s, ood_s, r=0.95):
    # OpenOOD v1.5's fpr_recall: ID positive, first threshold of the thinned curve keeping >= r of ID
    for _, tpr, fpr in thinned(naive_points(id_s, ood_s)):
        if tpr >= r:
            return fpr


def naive_ap(pos, neg):
    ap, prev_r = 0.0, 0.0
    for t, r, _ in naive_points(pos, neg):
        n_pos = np.sum(pos >= t)
        prec = n_pos / (n_pos + np.sum(neg >= t))
        ap += (r - prev_r) * prec
        prev_r = r
    return ap


def naive_pr_trapezoid(pos, neg):
    pts = [(0.0, 1.0)]
    for t, r, _ in naive_points(pos, neg):
        n_pos = np.sum(pos >= t)
        pts.append((r, n_pos / (n_pos + np.sum(neg >= t))))
        if r == 1.0:
            break
    return sum((r2 - r1) * (p1 + p2) / 2 for (r1, p1), (r2, p2) in zip(pts, pts[1:]))


def naive_det_error(id_s, ood_s):
    return min([0.5] + [0.5 * (1 - tpr) + 0.5 * fpr for _, tpr, fpr in naive_points(id_s, ood_s)])


@pytest.mark.parametrize("conv", ["paper", "openood", "openood_v1.5"])
def test_perfect_separation(conv):
    m = ood_metrics([3.0, 4.0], [1.0, 2.0], conv)
    assert m == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0,
                 "detection_error": 0.0, "convention": conv}


def test_perfectly_wrong():
    m = ood_metrics([1.0, 2.0], [3.0, 4.0])
    assert m["auroc"] == 0.0 and m["fpr95"] == 1.0 and m["detection_error"] == 0.5


def test_identical_sets_differ_by_convention():
    p = ood_metrics([1.0] * 4, [1.0] * 4, "paper")
    o = ood_metrics([1.0] * 4, [1.0] * 4, "openood")
    assert p["auroc"] == o["auroc"] == 0.5
    assert p["fpr95"] == o["fpr95"] == 1.0
    assert p["detection_error"] == o["detection_error"] == 0.5
    # average precision = the base rate; the trapezoid from (0, 1) to (1, 0.5) = 0.75
    assert p["aupr_in"] == p["aupr_out"] == 0.5
    assert o["aupr_in"] == o["aupr_out"] == 0.75


def test_hand_worked_ties():
    # pairs: 2>1, 2>0, 1=1 (1/2), 1>0 -> 3.5/4
    m = ood_metrics([2.0, 1.0], [1.0, 0.0])
    assert m["auroc"] == pytest.approx(0.875)
    assert m["aupr_in"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)  # AP: P=1 at R=.5, P=2/3 at R=1
    assert m["fpr95"] == pytest.approx(0.5)
    assert m["detection_error"] == pytest.approx(0.25)
    o = ood_metrics([2.0, 1.0], [1.0, 0.0], "openood")
    assert o["auroc"] == pytest.approx(0.875) and o["fpr95"] == pytest.approx(0.5)


def test_hand_worked_fpr95_conventions():
    """20 ID scores 1..20, OOD {0.5, 1.5, 2.5, 25}.

    paper: TPR = 0.95 holds at thresholds 2 (FPR 2/4) and 1.5 (FPR 3/4); the seed code's argmin
    over the reversed curve takes the lower threshold -> 0.75. openood: catching >= 95% of 4 OOD
    needs all 4, i.e. the threshold at 0.5 -> every ID flagged -> 1.0.
    """
    id_s, ood_s = np.arange(1.0, 21.0), np.array([0.5, 1.5, 2.5, 25.0])
    assert ood_metrics(id_s, ood_s, "paper")["fpr95"] == pytest.approx(0.75)
    assert ood_metrics(id_s, ood_s, "openood")["fpr95"] == pytest.approx(1.0)
    # detection error: threshold 3 -> 0.5*(2/20) + 0.5*(1/4) = 0.175
    assert ood_metrics(id_s, ood_s)["detection_error"] == pytest.approx(0.175)


def test_openood_fpr95_on_tied_integer_scores_uses_sklearns_thinned_curve():
    """Hand-worked. ID confidences: 1 at 1, 1 at 2, 8 at 3; OOD: 18 at 0, 1 at 1, 1 at 2.

    OOD positive on -conf, thresholds conf <= 0, 1, 2, 3: cumulative (FP on ID, TP on OOD) =
    (0, 18), (1, 19), (2, 20), (10, 20). The point (1, 19) -- TPR 0.95, FPR 0.1 -- has equal steps
    (+1, +1) in and out, so sklearn's default ``roc_curve`` (OpenOOD's call) drops it; the first kept
    point with TPR >= 0.95 is (2, 20): FPR 2/10 = 0.2 (on the full curve it would be 0.1).
    """
    id_s = np.array([1.0] + [2.0] + [3.0] * 8)
    ood_s = np.array([0.0] * 18 + [1.0, 2.0])
    assert ood_metrics(id_s, ood_s, "openood")["fpr95"] == pytest.approx(0.2)
    assert naive_fpr_first(id_s, ood_s, drop=False) == pytest.approx(0.1)
    # v1.5 (ID positive, conf >= 3, 2, 1, 0): (TP, FP) = (8, 0), (9, 1), (10, 2), (10, 20); (9, 1) is
    # dropped likewise (TPR 0.9 < 0.95 anyway), the first point keeping 95 % of ID is (10, 2): 2/20
    assert ood_metrics(id_s, ood_s, "openood_v1.5")["fpr95"] == pytest.approx(0.1)


def test_openood_v15_fpr95_is_id_positive():
    """The hand-worked case above it: ID 1..20, OOD {0.5, 1.5, 2.5, 25}. ID positive, thresholds high
    to low: 19 of 20 ID (TPR 0.95) are first kept at threshold 2, where OOD 2.5 and 25 pass -> 2/4."""
    id_s, ood_s = np.arange(1.0, 21.0), np.array([0.5, 1.5, 2.5, 25.0])
    m = ood_metrics(id_s, ood_s, "openood_v1.5")
    assert m["fpr95"] == pytest.approx(0.5)
    assert m["auroc"] == pytest.approx(ood_metrics(id_s, ood_s, "openood")["auroc"], abs=1e-12)


def _random_sets(seed, ties):
    rng = np.random.default_rng(seed)
    n1, n2 = rng.integers(5, 80, 2)
    if ties:
        return rng.integers(0, 8, n1).astype(float), rng.integers(-2, 6, n2).astype(float)
    return rng.normal(size=n1), rng.normal(size=n2) - 0.7


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_against_naive_scans(seed, ties):
    a, b = _random_sets(seed, ties)
    p = ood_metrics(a, b, "paper")
    o = ood_metrics(a, b, "openood")
    v = ood_metrics(a, b, "openood_v1.5")
    assert p["auroc"] == pytest.approx(naive_auroc(a, b), abs=1e-12)
    assert o["auroc"] == pytest.approx(naive_auroc(a, b), abs=1e-12)
    assert v["auroc"] == pytest.approx(naive_auroc(a, b), abs=1e-12)
    assert p["fpr95"] == pytest.approx(naive_fpr_nearest(a, b), abs=1e-12)
    assert o["fpr95"] == pytest.approx(naive_fpr_first(a, b), abs=1e-12)
    assert v["fpr95"] == pytest.approx(naive_fpr_first_id_positive(a, b), abs=1e-12)
    assert v["aupr_in"] == pytest.approx(naive_pr_trapezoid(a, b), abs=1e-12)
    assert v["aupr_out"] == pytest.approx(naive_pr_trapezoid(1 - b, 1 - a), abs=1e-12)
    assert p["aupr_in"] == pytest.approx(naive_ap(a, b), abs=1e-12)
    assert p["aupr_out"] == pytest.approx(naive_ap(-b, -a), abs=1e-12)
    assert o["aupr_in"] == pytest.approx(naive_pr_trapezoid(a, b), abs=1e-12)
    assert o["aupr_out"] == pytest.approx(naive_pr_trapezoid(-b, -a), abs=1e-12)
    assert p["detection_error"] == pytest.approx(naive_det_error(a, b), abs=1e-12)
    assert o["detection_error"] == p["detection_error"]


@pytest.mark.parametrize("conv", ["paper", "openood"])
@pytest.mark.parametrize("ties", [False, True])
def test_monotone_transforms_leave_metrics_unchanged(conv, ties):
    a, b = _random_sets(3, ties)
    ref = ood_metrics(a, b, conv)
    for f in (lambda s: 3.0 * s - 7.0, lambda s: s ** 3, np.tanh, lambda s: np.exp(s / 4)):
        m = ood_metrics(f(a), f(b), conv)
        for k in KEYS:
            assert m[k] == pytest.approx(ref[k], abs=1e-12), k


@pytest.mark.parametrize("conv", ["paper", "openood"])
def test_swapping_id_and_ood(conv):
    a, b = _random_sets(5, True)
    m = ood_metrics(a, b, conv)
    swapped = ood_metrics(b, a, conv)
    assert swapped["auroc"] == pytest.approx(1 - m["auroc"], abs=1e-12)
    # swap the roles and negate the scores: the same detector seen from the other side
    mirror = ood_metrics(-b, -a, conv)
    assert mirror["auroc"] == pytest.approx(m["auroc"], abs=1e-12)
    assert mirror["aupr_in"] == pytest.approx(m["aupr_out"], abs=1e-12)
    assert mirror["aupr_out"] == pytest.approx(m["aupr_in"], abs=1e-12)
    assert mirror["detection_error"] == pytest.approx(m["detection_error"], abs=1e-12)


def test_conventions_differ_on_the_same_scores():
    rng = np.random.default_rng(0)
    id_s = rng.normal(size=2000)
    ood_s = np.r_[rng.normal(size=1000) - 3.0, rng.normal(size=1000) + 0.2]  # half easy, half hard
    p, o = ood_metrics(id_s, ood_s, "paper"), ood_metrics(id_s, ood_s, "openood")
    assert p["auroc"] == pytest.approx(o["auroc"], abs=1e-12)
    assert o["fpr95"] - p["fpr95"] > 0.3


def test_accepts_tensors_and_lists():
    a = torch.tensor([3.0, 4.0, 1.5], dtype=torch.float32)
    assert ood_metrics(a, [1.0, 2.0])["auroc"] == pytest.approx(naive_auroc([3, 4, 1.5], [1, 2]))


@pytest.mark.parametrize("id_s, ood_s, msg", [
    ([], [1.0], "id_scores is empty"),
    ([1.0], [], "ood_scores is empty"),
    ([1.0, float("nan")], [0.0], "id_scores contains 1 NaN"),
    ([1.0], [0.0, float("inf")], "ood_scores contains 1 NaN/inf"),
    ([[1.0, 2.0]], [0.0], "id_scores must be 1-D"),
])
def test_bad_input(id_s, ood_s, msg):
    with pytest.raises(ValueError, match=msg):
        ood_metrics(id_s, ood_s)


def test_bad_convention_and_type():
    with pytest.raises(ValueError, match="convention"):
        ood_metrics([1.0], [0.0], "sklearn")
    with pytest.raises(TypeError, match="id_scores"):
        ood_metrics(["a"], [0.0])


@pytest.mark.parametrize("make", [
    lambda v: torch.tensor(v, dtype=torch.complex64),
    lambda v: np.asarray(v, dtype=np.complex128),
    lambda v: [complex(x) for x in v],
], ids=["tensor", "numpy", "list"])
def test_complex_scores_are_refused_not_cut_to_their_real_part(make):
    """A float64 cast keeps the real part only (torch warns, numpy's asarray does it silently)."""
    good = [0.0, 1.0]
    with pytest.raises(TypeError, match="id_scores must hold real scores, got complex"):
        ood_metrics(make([1.0 + 5j, 2.0]), good)
    with pytest.raises(TypeError, match="ood_scores must hold real scores, got complex"):
        ood_metrics(good, make([1.0 + 0j, 2.0]))  # even a zero imaginary part: the dtype is complex


def test_every_convention_has_a_table_caption():
    from lossbench.experiments.report import CONVENTION_NOTES, markdown_table
    from ood import CONVENTIONS

    assert set(CONVENTION_NOTES) == set(CONVENTIONS)
    for conv in CONVENTIONS:
        table = markdown_table({"msp": {"x": ood_metrics([2.0, 3.0], [1.0], conv)}}, conv)
        assert f"`{conv}`" in table
