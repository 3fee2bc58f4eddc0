"""Failure detection (selective classification) metrics: AURC, E-AURC, AUGRC, risk at a coverage, coverage at a risk.

Inputs: a ``confidence`` per prediction (higher = more trusted; any real score: MSP, max logit,
negative energy, ...) and ``correct`` (bool, or 0/1: 1 = the prediction was right). Accepting the
predictions whose confidence is at least a threshold gives

* coverage ``c = k / N`` (``k`` predictions accepted out of ``N``),
* selective risk ``R = (errors among the k) / k``,
* generalized risk ``G = (errors among the k) / N = c * R``.

Sweeping the threshold traces the risk-coverage curve. AURC = area under R(c) (Geifman, Uziel &
El-Yaniv, ICLR 2019); AUGRC = area under G(c) (Traub et al., "Overcoming common flaws in the
evaluation of selective classification systems", NeurIPS 2024), the average risk of the failures
that go undetected. Every value is a fraction in [0, 1] (FD-Shifts prints them x 1000;
torch-uncertainty's tables print them in %); lower is better, except for the coverage at a risk.

**Ties** decide how the curve is traced; ``ties`` selects one of two published conventions, each
reproduced in full:

``'group'`` (default) -- FD-Shifts (IML-DKFZ/fd-shifts ``fd_shifts/analysis/rc_stats.py``,
``RiskCoverageStats``, and ``rc_stats_utils.py``): one point per *distinct* confidence value ``t``,
accepting every prediction with confidence >= ``t`` -- tied predictions are accepted or rejected
together, so the result does not depend on the order of the input. The curve runs from coverage 1
down to the most confident group, then closes at coverage 0 with R equal to that group's risk and
G = 0; areas by the trapezoid rule over [0, 1].

``'sort'`` -- torch-uncertainty 0.13.0 (``torch_uncertainty/metrics/classification/risk_coverage.py``,
``AURC``, ``AUGRC``, ``CovAtxRisk``, ``RiskAtxCov``): predictions sorted by decreasing confidence,
one point per prediction at ``c = k/N``, ``k = 1..N``. Tied confidences are split by their position
in the sort; torch-uncertainty's ``argsort`` is not stable (the order among ties is arbitrary), here
the sort is stable: among equal confidences the one earlier in the input is accepted first. Areas by
the trapezoid rule over [1/N, 1], divided by ``1 - 1/N`` (torch-uncertainty's normalisation; N >= 2).

The two agree as N grows when confidences are distinct; with many ties (MSP saturating at 1.0 in
float32) they differ, and ``'sort'`` then depends on the input order.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch

from .metrics import ArrayLike, as_scores

__all__ = [
    "TIES", "OPTIMA", "risk_coverage_curve", "aurc", "augrc", "eaurc", "aurc_optimal", "risk_at_coverage",
    "coverage_at_risk", "failure_metrics",
]

#: Tie rules: ``'group'`` (FD-Shifts) and ``'sort'`` (torch-uncertainty); see the module docstring.
TIES = ("group", "sort")
#: Optimum subtracted by E-AURC: ``'oracle'`` (same N, same tie rule) or ``'analytic'`` (the large-N formula).
OPTIMA = ("oracle", "analytic")


def _check_optimum(optimum: str) -> str:
    if optimum not in OPTIMA:
        raise ValueError(f"optimum must be one of {OPTIMA}, got {optimum!r}")
    return optimum


def _check_ties(ties: str) -> str:
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}")
    return ties


def as_correct(correct: ArrayLike, n: Optional[int] = None, name: str = "correct") -> np.ndarray:
    """``correct`` as a 1-D float64 array of 0/1 (of length ``n`` when given): bool, or integers /
    floats equal to 0 or 1; ``TypeError`` / ``ValueError`` naming ``name`` otherwise."""
    if isinstance(correct, torch.Tensor):
        correct = correct.detach().cpu().numpy()
    arr = np.asarray(correct)
    if arr.dtype != bool and not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"{name} must hold booleans or 0/1 values (1 = correct prediction), got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D of shape (N,), got shape {arr.shape}")
    if n is not None and arr.size != n:
        raise ValueError(f"{name} has {arr.size} entries but confidence has {n}; expected one per prediction")
    if arr.size == 0:
        raise ValueError(f"{name} is empty; expected at least one prediction")
    if arr.dtype != bool:
        bad = ~((arr == 0) | (arr == 1))
        if bad.any():
            raise ValueError(f"{name} must hold booleans or 0/1 values (1 = correct prediction); got "
                             f"{int(bad.sum())} other value(s), e.g. {arr[bad][0]!r}")
    return arr.astype(np.float64)


def _inputs(confidence: ArrayLike, correct: ArrayLike, ties: str) -> Tuple[np.ndarray, np.ndarray]:
    """(confidence, error indicator) as float64 arrays after checking both and ``ties``."""
    _check_ties(ties)
    conf = as_scores(confidence, "confidence")
    err = 1.0 - as_correct(correct, conf.size)
    if ties == "sort" and conf.size < 2:
        raise ValueError(f"confidence has {conf.size} prediction; ties='sort' (torch-uncertainty's curve, "
                         "normalised by 1 - 1/N) needs at least 2")
    return conf, err


def _curve(conf: np.ndarray, err: np.ndarray, ties: str) -> Dict[str, np.ndarray]:
    """The risk-coverage points in order of increasing coverage (no closing point at coverage 0)."""
    n = conf.size
    order = np.argsort(-conf, kind="stable")  # decreasing confidence; ties in input order
    c_sorted, cum = conf[order], np.cumsum(err[order])
    if ties == "group":
        last = np.flatnonzero(np.r_[c_sorted[1:] != c_sorted[:-1], True])  # last member of each tie group
    else:
        last = np.arange(n)
    k = (last + 1).astype(np.float64)
    return {"coverage": k / n, "risk": cum[last] / k, "generalized_risk": cum[last] / n,
            "threshold": c_sorted[last], "accepted": (last + 1).astype(np.int64)}


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0)


def _area(curve: Dict[str, np.ndarray], key: str, ties: str) -> float:
    cov, y = curve["coverage"], curve[key]
    if ties == "group":  # close at coverage 0: R keeps the most confident group's value, G falls to 0
        start = y[0] if key == "risk" else 0.0
        return _trapezoid(np.r_[0.0, cov], np.r_[start, y])
    n = cov.size
    return _trapezoid(cov, y) / (1.0 - 1.0 / n)


def risk_coverage_curve(confidence: ArrayLike, correct: ArrayLike, ties: str = "group") -> Dict[str, np.ndarray]:
    """The risk-coverage curve: arrays ``coverage``, ``risk`` (selective), ``generalized_risk``,
    ``threshold`` (the lowest accepted confidence) and ``accepted`` (count), by increasing coverage.

    ``ties='group'``: one point per distinct confidence; ``'sort'``: one per prediction (module
    docstring). The closing point at coverage 0 that ``'group'`` integrates over is not included.
    """
    conf, err = _inputs(confidence, correct, ties)
    return _curve(conf, err, ties)


def aurc(confidence: ArrayLike, correct: ArrayLike, ties: str = "group") -> float:
    """Area under the selective-risk / coverage curve, in [0, 1] (Geifman, Uziel & El-Yaniv, ICLR 2019).

    ``ties='group'``: FD-Shifts' ``aurc`` / 1000 -- one point per distinct confidence (ties accepted
    together), trapezoid over [0, 1], the curve closed at coverage 0 with the most confident group's
    risk. ``ties='sort'``: torch-uncertainty's ``AURC`` -- one point per prediction after a stable
    sort by decreasing confidence (ties: input order), trapezoid over [1/N, 1] divided by 1 - 1/N.
    """
    conf, err = _inputs(confidence, correct, ties)
    return _area(_curve(conf, err, ties), "risk", ties)


def augrc(confidence: ArrayLike, correct: ArrayLike, ties: str = "group") -> float:
    """Area under the generalized-risk / coverage curve, in [0, 1] (Traub et al., NeurIPS 2024).

    G(c) = c * R(c) = (undetected errors) / N. ``ties='group'``: FD-Shifts' ``augrc`` / 1000 (one
    point per distinct confidence, the curve closed at (0, 0), trapezoid); ``ties='sort'``:
    torch-uncertainty's ``AUGRC`` (one point per prediction, stable sort, trapezoid over [1/N, 1]
    divided by 1 - 1/N). Its optimum for an error rate e is about e^2 / 2.
    """
    conf, err = _inputs(confidence, correct, ties)
    return _area(_curve(conf, err, ties), "generalized_risk", ties)


def _oracle_aurc(err: np.ndarray, ties: str) -> float:
    """AURC of a confidence ranking every correct prediction above every error, all values distinct."""
    ordered = np.sort(err)  # correct (0) first
    conf = np.linspace(1.0, 0.0, ordered.size) if ordered.size > 1 else np.ones(1)
    return _area(_curve(conf, ordered, ties), "risk", ties)


def aurc_optimal(correct: ArrayLike, ties: str = "group", optimum: str = "oracle") -> float:
    """The lowest AURC for these predictions (what E-AURC subtracts); see :func:`eaurc` for ``optimum``."""
    _check_ties(ties)
    _check_optimum(optimum)
    err = 1.0 - as_correct(correct)
    if optimum == "analytic":
        e = float(err.mean())
        return e + (1.0 - e) * math.log1p(-e) if e < 1.0 else 1.0
    if ties == "sort" and err.size < 2:
        raise ValueError(f"correct has {err.size} prediction; ties='sort' needs at least 2")
    return _oracle_aurc(err, ties)


def eaurc(confidence: ArrayLike, correct: ArrayLike, ties: str = "group", optimum: str = "oracle") -> float:
    """Excess AURC: ``aurc - AURC*``, the part of the AURC due to the ranking, not the error rate.

    ``optimum='oracle'`` (default): AURC* is the AURC, with the same ``ties`` rule and the same N, of
    an oracle confidence that puts every correct prediction above every error, all values distinct
    (FD-Shifts' sorted-residual oracle, ``confids = linspace(1, 0, N)``). A perfect ranking with
    distinct confidences then gives exactly 0, and with ``ties='sort'`` E-AURC is never negative; with
    ``ties='group'`` a confidence with ties (e.g. two levels, all correct predictions on the upper one)
    can go slightly below the distinct-value oracle, so E-AURC can be slightly negative.
    ``optimum='analytic'``: AURC* = e + (1 - e) ln(1 - e) for the error rate e, the large-N value
    (Geifman, Uziel & El-Yaniv 2019; FD-Shifts' binary ``aurc_optimal``); with ``ties='group'`` a
    perfect ranking's trapezoid lies below it (the oracle curve is concave), so E-AURC is negative at
    small N (FD-Shifts' 3-sample example gives -7.47 / 1000).
    """
    _check_optimum(optimum)
    conf, err = _inputs(confidence, correct, ties)
    return _area(_curve(conf, err, ties), "risk", ties) - aurc_optimal(1.0 - err, ties, optimum)


def _check_fraction(value: float, name: str, open_low: bool) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number in {'(0, 1]' if open_low else '[0, 1]'}, "
                        f"got {type(value).__name__}") from None
    ok = (0.0 < v <= 1.0) if open_low else (0.0 <= v <= 1.0)
    if not ok:
        raise ValueError(f"{name} must lie in {'(0, 1]' if open_low else '[0, 1]'}, got {value}")
    return v


def _risk_at(curve: Dict[str, np.ndarray], coverage: float, ties: str) -> float:
    at_least = curve["coverage"] >= coverage  # exact: k / N and a coverage equal to it round alike
    if ties == "group":
        return float(curve["risk"][at_least].min())
    return float(curve["risk"][int(np.argmax(at_least))])


def _coverage_at(curve: Dict[str, np.ndarray], risk: float) -> float:
    ok = curve["risk"] <= risk
    return float(curve["coverage"][ok].max()) if ok.any() else 0.0


def risk_at_coverage(confidence: ArrayLike, correct: ArrayLike, coverage: float = 0.8, ties: str = "group") -> float:
    """Selective risk when at least ``coverage`` (in (0, 1]) of the predictions are accepted.

    ``ties='group'``: FD-Shifts' ``get_working_point(target_cov=...)`` -- the lowest selective risk
    over the thresholds (distinct confidences) that accept a share >= ``coverage``; a tie group is
    never split. ``ties='sort'``: torch-uncertainty's ``RiskAtxCov`` -- the risk of the ``k`` most
    confident predictions (stable sort, ties in input order) for the smallest ``k`` with
    ``k / N >= coverage`` (torch-uncertainty takes ``ceil(N * coverage)`` in floating point, one
    more when the product rounds up, e.g. N = 10, coverage = 0.7).
    """
    cov = _check_fraction(coverage, "coverage", open_low=True)
    conf, err = _inputs(confidence, correct, ties)
    return _risk_at(_curve(conf, err, ties), cov, ties)


def coverage_at_risk(confidence: ArrayLike, correct: ArrayLike, risk: float = 0.05, ties: str = "group") -> float:
    """The largest coverage whose selective risk is at most ``risk`` (in [0, 1]); 0.0 if none.

    ``ties='group'``: FD-Shifts' ``get_working_point(target_risk=...)``, over the distinct
    confidences (FD-Shifts raises when no threshold qualifies). ``ties='sort'``: torch-uncertainty's
    ``CovAtxRisk``, the largest ``k / N`` with the risk of the ``k`` most confident <= ``risk``
    (torch-uncertainty returns NaN when none does). Here no qualifying threshold gives 0.0: only
    rejecting every prediction keeps the risk that low.
    """
    r = _check_fraction(risk, "risk", open_low=False)
    conf, err = _inputs(confidence, correct, ties)
    return _coverage_at(_curve(conf, err, ties), r)


def failure_metrics(confidence: ArrayLike, correct: ArrayLike, ties: str = "group", coverage: float = 0.8,
                    risk: float = 0.05) -> Dict[str, Union[float, int, str]]:
    """Every metric of this module in one dict (fractions in [0, 1]).

    ``{'aurc', 'eaurc', 'aurc_optimal', 'augrc', 'risk_at_coverage', 'coverage_at_risk', 'coverage',
    'risk', 'error_rate', 'n', 'ties'}``; ``coverage`` / ``risk`` are the working points asked for
    (defaults 0.8 and 0.05: torch-uncertainty's ``RiskAt80Cov`` and ``CovAt5Risk``), E-AURC against
    the oracle optimum (:func:`eaurc`).
    """
    cov = _check_fraction(coverage, "coverage", open_low=True)
    r = _check_fraction(risk, "risk", open_low=False)
    conf, err = _inputs(confidence, correct, ties)
    curve = _curve(conf, err, ties)
    a = _area(curve, "risk", ties)
    opt = _oracle_aurc(err, ties)
    return {"aurc": a, "eaurc": a - opt, "aurc_optimal": opt, "augrc": _area(curve, "generalized_risk", ties),
            "risk_at_coverage": _risk_at(curve, cov, ties), "coverage_at_risk": _coverage_at(curve, r),
            "coverage": cov, "risk": r, "error_rate": float(err.mean()), "n": int(conf.size), "ties": ties}
