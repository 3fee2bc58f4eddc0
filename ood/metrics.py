"""OOD detection metrics -- AUROC, AUPR-In, AUPR-Out, FPR@95 and detection error -- via scikit-learn.

Inputs are scores with **higher = more in-distribution** for the ID set and the OOD set. Two
conventions, which move FPR@95 by tens of points on the same scores; every result carries its
``convention`` so tables can be labelled.

``'paper'`` (default) -- the seed papers' evaluation code (Hendrycks & Gimpel 2017 / Liu et al.
2020, wetliu/energy_ood ``utils/display_results.py``: ``get_measures(-in, -out)`` with
``out_as_pos=False``):

* ID is the positive class; ``auroc = roc_auc_score`` (ties count 1/2).
* ``aupr_in = average_precision_score`` with ID positive on the scores; ``aupr_out`` the same
  with OOD positive on the negated scores (AUPR as average precision, a step sum).
* ``fpr95``: the share of OOD accepted on the ROC curve (every distinct threshold, cut after the
  first point reaching TPR = 1) at the point *nearest* to TPR = 0.95, no interpolation; among
  equally near points the one with the most false positives (lowest threshold) wins, as their
  ``fpr_and_fdr_at_recall`` does (``argmin`` over the reversed curve).

``'openood'`` -- OpenOOD's ``openood/evaluators/metrics.py`` as it has been since August 2023, after
its v1.5 tag (commit 873e8c2; ``compute_all_metrics`` -> ``auc_and_fpr_recall``), computed the same way:

* OOD is the positive class, scored by the negated scores: ``fpr, tpr = roc_curve(is_ood, -s)``
  with sklearn's default ``drop_intermediate=True``; ``auroc = auc(fpr, tpr)``.
* ``fpr95 = fpr[argmax(tpr >= 0.95)]``: the share of ID flagged at the first point of *that* curve
  with TPR (on OOD) >= 0.95, no interpolation. The curve has one point per distinct score, minus
  sklearn's dropped points: a point is dropped when the increments of both the false- and the
  true-positive counts into it equal those out of it (zero second differences of both cumulative
  counts; the first and last points stay). On tied integer scores such a run is common, and
  the dropped point can be the one that first reaches 95 %; the first point kept after it
  then has a higher FPR (a hand-worked case is in ``tests/ood/test_ood_metrics.py``).
  pytorch-ood (``OODMetrics``, ``fpr_at_tpr``) takes the same first point on the full curve.
* ``aupr_in`` / ``aupr_out``: trapezoid rule (``sklearn.metrics.auc``) over
  ``precision_recall_curve`` with ID / OOD positive.

``'openood_v1.5'`` -- the same file at OpenOOD's v1.5 tag (2023-06-26; ``fpr_recall`` and ``auc``), which
the early v1.5 leaderboard FPR figures used:

* ID is the positive class: ``fpr, tpr = roc_curve(is_id, s)`` (default ``drop_intermediate``);
  ``fpr95 = fpr[argmax(tpr >= 0.95)]``, the share of OOD accepted at the first point (same curve
  rule as above) keeping >= 95 % of ID -- the classic quantity, but on the thinned curve, where
  ``'paper'`` takes the *nearest* point of the full one.
* ``auroc = auc(fpr, tpr)``; ``aupr_in`` from ``precision_recall_curve(is_id, s)``, ``aupr_out`` from
  ``precision_recall_curve(is_ood, 1 - s)`` (its ``1 - conf``), both by the trapezoid rule.

Both: ``detection_error = min_t 0.5 * (1 - TPR(t)) + 0.5 * FPR(t)`` over all thresholds,
including "reject everything" (Liang et al. 2018 ODIN ``calMetric.py``; symmetric in the two
classes, so the same in both conventions). All values are fractions in [0, 1].
"""

from __future__ import annotations

from typing import Dict, Union

import numpy as np
import torch
from sklearn import metrics as skm

CONVENTIONS = ("paper", "openood", "openood_v1.5")
ArrayLike = Union[np.ndarray, torch.Tensor, list, tuple]


def as_scores(x: ArrayLike, name: str) -> np.ndarray:
    """1-D finite float64 numpy array from a tensor / array / list; clear errors otherwise.

    Complex values are refused (``TypeError`` naming ``name``): a cast to float64 would silently
    keep only the real part.
    """
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise TypeError(f"{name} must hold real scores, got complex dtype {x.dtype}")
        x = x.detach().to("cpu", torch.float64).numpy()
    try:
        raw = np.asarray(x)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a 1-D array of real scores, got {type(x).__name__}") from err
    if np.iscomplexobj(raw):
        raise TypeError(f"{name} must hold real scores, got complex dtype {raw.dtype}")
    try:
        arr = raw.astype(np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a 1-D array of real scores, got {type(x).__name__}") from err
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D of shape (N,), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty; expected at least one score")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains {int((~np.isfinite(arr)).sum())} NaN/inf value(s); expected finite scores")
    return arr


def fpr_at_tpr_nearest(labels: np.ndarray, scores: np.ndarray, recall: float = 0.95) -> float:
    """FPR at the ROC point nearest to ``recall`` (seed papers' ``fpr_and_fdr_at_recall``)."""
    fpr, tpr, _ = skm.roc_curve(labels, scores, drop_intermediate=False)
    fpr, tpr = fpr[1:], tpr[1:]  # drop sklearn's (0, 0) point at threshold +inf
    last = int(np.argmax(tpr >= tpr[-1]))  # first point that reaches TPR = 1
    dist = np.abs(tpr[: last + 1] - recall)
    rev = dist[::-1]
    idx = last - int(np.argmin(rev))  # ties: the largest index (lowest threshold)
    return float(fpr[idx])


def fpr_at_tpr_first(labels: np.ndarray, scores: np.ndarray, recall: float = 0.95,
                     drop_intermediate: bool = True) -> float:
    """FPR at the first ROC point with TPR >= ``recall`` on sklearn's ``roc_curve`` (OpenOOD).

    ``drop_intermediate=True`` is OpenOOD's call (sklearn's default curve, see the module
    docstring); ``False`` keeps a point per distinct score (pytorch-ood).
    """
    fpr, tpr, _ = skm.roc_curve(labels, scores, drop_intermediate=drop_intermediate)
    return float(fpr[int(np.argmax(tpr >= recall))])


def detection_error(labels: np.ndarray, scores: np.ndarray) -> float:
    """``min_t 0.5 * (1 - TPR) + 0.5 * FPR`` over all thresholds (ODIN's detection error)."""
    fpr, tpr, _ = skm.roc_curve(labels, scores, drop_intermediate=False)
    return float(np.min(0.5 * (1.0 - tpr) + 0.5 * fpr))


def ood_metrics(id_scores: ArrayLike, ood_scores: ArrayLike, convention: str = "paper",
                recall: float = 0.95) -> Dict[str, Union[float, str]]:
    """AUROC, AUPR-In, AUPR-Out, FPR at ``recall`` TPR and detection error of two score sets.

    ``id_scores`` ``(N_in,)`` and ``ood_scores`` ``(N_out,)``: higher = more in-distribution.
    Returns ``{'auroc', 'aupr_in', 'aupr_out', 'fpr95', 'detection_error', 'convention'}``
    (fractions). See the module docstring for what each convention computes and its source.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    if not 0.0 < float(recall) <= 1.0:
        raise ValueError(f"recall must lie in (0, 1], got {recall}")
    s_in = as_scores(id_scores, "id_scores")
    s_out = as_scores(ood_scores, "ood_scores")
    scores = np.concatenate([s_in, s_out])
    is_id = np.concatenate([np.ones(s_in.size, dtype=np.int64), np.zeros(s_out.size, dtype=np.int64)])
    is_ood = 1 - is_id

    if convention == "paper":
        auroc = skm.roc_auc_score(is_id, scores)
        aupr_in = skm.average_precision_score(is_id, scores)
        aupr_out = skm.average_precision_score(is_ood, -scores)
        fpr = fpr_at_tpr_nearest(is_id, scores, recall)
    elif convention == "openood":
        fpr_c, tpr_c, _ = skm.roc_curve(is_ood, -scores)
        auroc = skm.auc(fpr_c, tpr_c)
        fpr = fpr_c[int(np.argmax(tpr_c >= recall))]
        p_in, r_in, _ = skm.precision_recall_curve(is_id, scores)
        p_out, r_out, _ = skm.precision_recall_curve(is_ood, -scores)
        aupr_in = skm.auc(r_in, p_in)
        aupr_out = skm.auc(r_out, p_out)
    else:  # openood_v1.5
        fpr_c, tpr_c, _ = skm.roc_curve(is_id, scores)
        auroc = skm.auc(fpr_c, tpr_c)
        fpr = fpr_c[int(np.argmax(tpr_c >= recall))]
        p_in, r_in, _ = skm.precision_recall_curve(is_id, scores)
        p_out, r_out, _ = skm.precision_recall_curve(is_ood, 1.0 - scores)
        aupr_in = skm.auc(r_in, p_in)
        aupr_out = skm.auc(r_out, p_out)
    return {
        "auroc": float(auroc),
        "aupr_in": float(aupr_in),
        "aupr_out": float(aupr_out),
        "fpr95": float(fpr),
        "detection_error": detection_error(is_id, scores),
        "convention": convention,
    }
