"""Failure detection metrics (AURC, E-AURC, AUGRC, working points) against a brute-force transcription,
reference values from FD-Shifts and torch-uncertainty, and hand-checked cases."""

import math

import numpy as np
import pytest
import torch

import ood
from ood.failure import aurc_optimal, risk_coverage_curve


# -- float64 transcription of the definitions, one threshold at a time --------------------------------

def brute_points(conf, correct, ties):
    """(coverage, selective risk, generalized risk) per threshold, by increasing coverage."""
    conf, err = np.asarray(conf, float), 1.0 - np.asarray(correct, float)
    n = len(conf)
    pts = []
    if ties == "group":
        for t in sorted(set(conf.tolist()), reverse=True):
            acc = conf >= t
            k = int(acc.sum())
            pts.append((k / n, err[acc].sum() / k, err[acc].sum() / n))
    else:
        order = sorted(range(n), key=lambda i: (-conf[i], i))  # stable: earlier input first among ties
        e = 0.0
        for k, i in enumerate(order, start=1):
            e += err[i]
            pts.append((k / n, e / k, e / n))
    return pts


def trapezoid(xs, ys):
    return sum((xs[i + 1] - xs[i]) * (ys[i + 1] + ys[i]) / 2 for i in range(len(xs) - 1))


def brute_areas(conf, correct, ties):
    pts = brute_points(conf, correct, ties)
    c = [p[0] for p in pts]
    r = [p[1] for p in pts]
    g = [p[2] for p in pts]
    if ties == "group":  # FD-Shifts closes the curve at coverage 0
        return trapezoid([0.0] + c, [r[0]] + r), trapezoid([0.0] + c, [0.0] + g)
    n = len(c)
    return trapezoid(c, r) / (1 - 1 / n), trapezoid(c, g) / (1 - 1 / n)


def brute_risk_at(conf, correct, coverage, ties):
    pts = brute_points(conf, correct, ties)
    if ties == "group":
        return min(r for c, r, _ in pts if c >= coverage)
    return next(r for c, r, _ in pts if c >= coverage)


def brute_cov_at(conf, correct, risk, ties):
    return max([c for c, r, _ in pts] if (pts := [p for p in brute_points(conf, correct, ties) if p[1] <= risk])
               else [0.0])


def _random(seed, with_ties):
    rs = np.random.RandomState(seed)
    n = int(rs.randint(2, 200))
    conf = rs.rand(n)
    if with_ties:
        conf = np.round(conf * 6) / 6
    correct = (rs.rand(n) < 0.1 + 0.85 * conf).astype(np.int64)
    return conf, correct


@pytest.mark.parametrize("ties", ["group", "sort"])
@pytest.mark.parametrize("seed, with_ties", [(0, False), (1, True), (2, False), (3, True), (4, True)])
def test_against_brute_force(ties, seed, with_ties):
    conf, correct = _random(seed, with_ties)
    a, g = brute_areas(conf, correct, ties)
    assert ood.aurc(conf, correct, ties=ties) == pytest.approx(a, abs=1e-12)
    assert ood.augrc(conf, correct, ties=ties) == pytest.approx(g, abs=1e-12)
    for cov in (0.1, 0.5, 0.8, 1.0):
        assert ood.risk_at_coverage(conf, correct, cov, ties=ties) == pytest.approx(
            brute_risk_at(conf, correct, cov, ties), abs=1e-12)
    for risk in (0.0, 0.05, 0.2, 0.5):
        assert ood.coverage_at_risk(conf, correct, risk, ties=ties) == pytest.approx(
            brute_cov_at(conf, correct, risk, ties), abs=1e-12)
    curve = risk_coverage_curve(conf, correct, ties)
    pts = brute_points(conf, correct, ties)
    np.testing.assert_allclose(curve["coverage"], [p[0] for p in pts], atol=1e-12)
    np.testing.assert_allclose(curve["risk"], [p[1] for p in pts], atol=1e-12)


# -- reference values from the two libraries ---------------------------------------------------------

# Twelve predictions, all confidences distinct and >= 0.5 (so a two-column probability row carries each
# as its maximum, the input torch-uncertainty's metrics take).
CONF = [0.95, 0.62, 0.88, 0.51, 0.77, 0.99, 0.70, 0.58, 0.83, 0.66, 0.91, 0.55]
CORRECT = [1, 0, 1, 0, 1, 1, 0, 1, 0, 1, 1, 0]
# The same predictions with confidences rounded to one decimal: tie groups of 2-3.
CONF_TIED = [0.9, 0.6, 0.9, 0.5, 0.7, 1.0, 0.7, 0.6, 0.9, 0.6, 1.0, 0.5]


def test_torch_uncertainty_reference_values():
    """torch-uncertainty 0.13.0 (PyPI wheel), metrics/classification/risk_coverage.py, on
    probs = [[c, 1 - c]] and targets = 0 where correct else 1; values printed by that version (its
    coverages are float32, hence the 1e-7 tolerance)."""
    kw = dict(ties="sort")
    assert ood.aurc(CONF, CORRECT, **kw) == pytest.approx(0.19160763405993528, abs=1e-7)  # AURC
    assert ood.augrc(CONF, CORRECT, **kw) == pytest.approx(0.14015151411822727, abs=1e-7)  # AUGRC
    assert ood.coverage_at_risk(CONF, CORRECT, 0.2, **kw) == pytest.approx(0.5, abs=1e-7)  # CovAtxRisk(0.2)
    assert ood.coverage_at_risk(CONF, CORRECT, 0.05, **kw) == pytest.approx(0.3333333432674408, abs=1e-7)  # CovAt5Risk
    assert ood.risk_at_coverage(CONF, CORRECT, 0.8, **kw) == pytest.approx(0.3, abs=1e-12)  # RiskAt80Cov
    assert ood.risk_at_coverage(CONF, CORRECT, 0.5, **kw) == pytest.approx(1 / 6, abs=1e-12)  # RiskAtxCov(0.5)


@pytest.mark.parametrize("conf, ref", [
    (CONF, dict(aurc=175.6403318903319, augrc=128.4722222222222, eaurc=73.38829065106579,
                risk_at={0.5: 1 / 6, 0.8: 0.3}, cov_at={0.05: 1 / 3, 0.2: 0.5})),
    (CONF_TIED, dict(aurc=198.41269841269838, augrc=138.88888888888886, eaurc=96.16065717343226,
                     risk_at={0.5: 2 / 7, 0.8: 0.3}, cov_at={0.05: 1 / 6, 0.2: 5 / 12})),
])
def test_fd_shifts_reference_values(conf, ref):
    """FD-Shifts @ c4467aec (fd_shifts/analysis/rc_stats.py, RiskCoverageStats(confids, residuals = 1 -
    correct)): aurc / augrc / eaurc (x 1000, its display scale; its e-AURC subtracts the analytic optimum)
    and get_working_point(risk='selective-risk', target_cov=... / target_risk=...), run with np.trapz
    aliased to np.trapezoid (NumPy 2.4 has no np.trapz)."""
    assert 1000 * ood.aurc(conf, CORRECT) == pytest.approx(ref["aurc"], abs=1e-9)
    assert 1000 * ood.augrc(conf, CORRECT) == pytest.approx(ref["augrc"], abs=1e-9)
    assert 1000 * ood.eaurc(conf, CORRECT, optimum="analytic") == pytest.approx(ref["eaurc"], abs=1e-9)
    for cov, r in ref["risk_at"].items():
        assert ood.risk_at_coverage(conf, CORRECT, cov) == pytest.approx(r, abs=1e-12)
    for risk, c in ref["cov_at"].items():
        assert ood.coverage_at_risk(conf, CORRECT, risk) == pytest.approx(c, abs=1e-12)


def test_three_sample_case_of_both_libraries():
    """probs [[.7,.3],[.6,.4],[.8,.2]], y = [0, 1, 0]: torch-uncertainty's AURC docstring prints 0.0833;
    FD-Shifts gives aurc = augrc = 55.56 and e-aurc = -7.47 (x 1000). By hand: errors [0, 1, 0]; by
    decreasing confidence (.8, .7, .6) the risks are 0, 0, 1/3, so the group curve (0,0)-(1/3,0)-(2/3,0)-
    (1,1/3) has area 1/18, and the sort curve over [1/3, 1] has area 1/18, / (2/3) = 1/12."""
    conf, correct = [0.7, 0.6, 0.8], [1, 0, 1]
    assert ood.aurc(conf, correct) == pytest.approx(1 / 18, abs=1e-15)
    assert ood.augrc(conf, correct) == pytest.approx(1 / 18, abs=1e-15)
    assert ood.aurc(conf, correct, ties="sort") == pytest.approx(1 / 12, abs=1e-15)
    e = 1 / 3
    assert ood.eaurc(conf, correct, optimum="analytic") == pytest.approx(1 / 18 - (e + (1 - e) * math.log(1 - e)))
    assert 1000 * ood.eaurc(conf, correct, optimum="analytic") == pytest.approx(-7.47, abs=5e-3)
    assert ood.eaurc(conf, correct) == pytest.approx(0.0, abs=1e-15)  # the ranking is already perfect


# -- hand-checked properties ---------------------------------------------------------------------------

@pytest.mark.parametrize("ties", ["group", "sort"])
def test_perfect_ranking_reaches_the_optimum(ties):
    rs = np.random.RandomState(5)
    correct = (rs.rand(500) < 0.8).astype(int)
    conf = rs.rand(500) + correct  # every correct prediction above every error, all distinct
    a = ood.aurc(conf, correct, ties=ties)
    assert a == pytest.approx(aurc_optimal(correct, ties), abs=1e-15)
    assert ood.eaurc(conf, correct, ties=ties) == pytest.approx(0.0, abs=1e-15)
    # the large-N formula is close; the group trapezoid lies below it (the curve 1 - K/k is concave)
    e = 1 - correct.mean()
    analytic = e + (1 - e) * math.log(1 - e)
    assert abs(analytic - a) < 2e-3
    if ties == "group":
        assert analytic > a and ood.eaurc(conf, correct, ties=ties, optimum="analytic") < 0
    # AUGRC optimum: the errors come last, G(c) = max(0, c - (1 - e)), area e^2 / 2 (Traub et al.)
    assert ood.augrc(conf, correct, ties=ties) == pytest.approx(e * e / 2, abs=2e-3)
    # the worst ranking (errors first) is the maximum
    worst = ood.aurc(-conf, correct, ties=ties)
    assert worst > a and worst > ood.aurc(rs.rand(500), correct, ties=ties)


@pytest.mark.parametrize("ties", ["group", "sort"])
def test_oracle_eaurc_is_nonnegative_on_random_scores_and_invariant_to_monotone_maps(ties):
    for seed in range(5):
        conf, correct = _random(seed + 10, with_ties=False)
        assert ood.eaurc(conf, correct, ties=ties) >= -1e-15
        m = ood.failure_metrics(conf, correct, ties=ties)
        m2 = ood.failure_metrics(np.exp(3 * conf) - 7, correct, ties=ties)
        assert all(m[k] == pytest.approx(m2[k], abs=1e-12) for k in ("aurc", "augrc", "eaurc", "risk_at_coverage"))


def test_all_correct_and_all_wrong():
    conf = [0.3, 0.9, 0.5, 0.5]
    for ties in ("group", "sort"):
        m = ood.failure_metrics(conf, [1, 1, 1, 1], ties=ties)
        assert (m["aurc"], m["augrc"], m["eaurc"], m["error_rate"]) == (0.0, 0.0, 0.0, 0.0)
        assert m["coverage_at_risk"] == 1.0 and m["risk_at_coverage"] == 0.0
        w = ood.failure_metrics(conf, [0, 0, 0, 0], ties=ties)
        assert w["aurc"] == pytest.approx(1.0) and w["eaurc"] == pytest.approx(0.0) and w["coverage_at_risk"] == 0.0
    # all wrong: G(c) = c; the group curve closes at (0, 0): area 1/2
    assert ood.augrc(conf, [0, 0, 0, 0]) == pytest.approx(0.5)
    assert aurc_optimal([0, 0, 0], optimum="analytic") == 1.0 and aurc_optimal([1, 1], optimum="analytic") == 0.0


def test_tie_rules_differ_on_ties_only():
    # one tie group holding everything: 'group' has a single point, risk = the error rate everywhere
    conf, correct = [0.5] * 4, [1, 0, 1, 1]
    assert ood.aurc(conf, correct) == pytest.approx(0.25) and ood.augrc(conf, correct) == pytest.approx(0.125)
    assert ood.risk_at_coverage(conf, correct, 0.1) == 0.25 and ood.coverage_at_risk(conf, correct, 0.2) == 0.0
    # 'sort' splits the group in input order: the error second -> risks 0, 1/2, 1/3, 1/4 over k/4
    assert ood.aurc(conf, correct, ties="sort") == pytest.approx(
        trapezoid([.25, .5, .75, 1.], [0, .5, 1 / 3, .25]) / .75)
    assert ood.aurc(conf, correct[::-1], ties="sort") != ood.aurc(conf, correct, ties="sort")  # order matters
    # 'group' never depends on the input order
    c, y = _random(7, with_ties=True)
    perm = np.random.RandomState(0).permutation(len(c))
    assert ood.failure_metrics(c[perm], y[perm]) == ood.failure_metrics(c, y)
    # without ties the two rules trace the same points (sort only rescales the area by 1 / (1 - 1/N))
    c, y = _random(8, with_ties=False)
    g, s = risk_coverage_curve(c, y, "group"), risk_coverage_curve(c, y, "sort")
    np.testing.assert_array_equal(g["risk"], s["risk"])


def test_two_level_ties_can_beat_the_distinct_value_oracle():
    """The group curve interpolates linearly across a tie group, below the concave oracle curve: the
    documented reason why E-AURC (oracle) can be slightly negative with ties='group'."""
    correct = [1] * 6 + [0] * 4
    conf = [1.0] * 6 + [0.0] * 4
    # points (0, 0), (0.6, 0), (1, 0.4): area 0.4 * 0.4 / 2
    assert ood.aurc(conf, correct) == pytest.approx(0.08)
    assert ood.eaurc(conf, correct) < 0
    assert ood.eaurc(conf, correct, ties="sort") >= 0


def test_inputs_accepted_as_tensors_lists_and_bools():
    conf, correct = _random(3, with_ties=False)
    ref = ood.failure_metrics(conf, correct)
    assert ood.failure_metrics(torch.tensor(conf, dtype=torch.float32).double(), torch.tensor(correct == 1)) == ref
    assert ood.failure_metrics(conf.tolist(), correct.astype(float).tolist()) == ref
    assert ood.failure_metrics(conf, correct.astype(bool)) == ref
    assert set(ref) == {"aurc", "eaurc", "aurc_optimal", "augrc", "risk_at_coverage", "coverage_at_risk",
                        "coverage", "risk", "error_rate", "n", "ties"}


@pytest.mark.parametrize("call, exc, match", [
    (lambda: ood.aurc([], []), ValueError, "confidence is empty"),
    (lambda: ood.aurc([0.5, float("nan")], [1, 0]), ValueError, "confidence contains 1 NaN"),
    (lambda: ood.aurc([[0.5, 0.2]], [1, 0]), ValueError, "confidence must be 1-D"),
    (lambda: ood.aurc([0.5, 0.2], [[1, 0]]), ValueError, "correct must be 1-D"),
    (lambda: ood.aurc([0.5, 0.2], [1, 0, 1]), ValueError, "correct has 3 entries but confidence has 2"),
    (lambda: ood.aurc([0.5, 0.2], [1, 2]), ValueError, "correct must hold booleans or 0/1"),
    (lambda: ood.aurc([0.5, 0.2], [1.0, 0.5]), ValueError, "correct must hold booleans or 0/1"),
    (lambda: ood.aurc([0.5, 0.2], ["yes", "no"]), TypeError, "correct must hold booleans"),
    (lambda: ood.aurc(["a", "b"], [1, 0]), TypeError, "confidence"),
    (lambda: ood.aurc([0.5, 0.2], [1, 0], ties="stable"), ValueError, "ties must be one of"),
    (lambda: ood.aurc([0.5], [1], ties="sort"), ValueError, "ties='sort'.*at least 2"),
    (lambda: ood.eaurc([0.5, 0.2], [1, 0], optimum="paper"), ValueError, "optimum must be one of"),
    (lambda: ood.risk_at_coverage([0.5, 0.2], [1, 0], 0.0), ValueError, r"coverage must lie in \(0, 1\]"),
    (lambda: ood.risk_at_coverage([0.5, 0.2], [1, 0], 1.5), ValueError, "coverage must lie in"),
    (lambda: ood.coverage_at_risk([0.5, 0.2], [1, 0], -0.1), ValueError, r"risk must lie in \[0, 1\]"),
    (lambda: ood.coverage_at_risk([0.5, 0.2], [1, 0], float("nan")), ValueError, "risk must lie in"),
    (lambda: ood.failure_metrics([0.5, 0.2], [1, 0], coverage="high"), TypeError, "coverage must be a number"),
    (lambda: aurc_optimal([]), ValueError, "correct is empty"),
])
def test_bad_input_names_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_single_prediction_with_grouped_ties():
    assert ood.aurc([0.3], [0]) == 1.0 and ood.aurc([0.3], [1]) == 0.0 and ood.eaurc([0.3], [0]) == 0.0
