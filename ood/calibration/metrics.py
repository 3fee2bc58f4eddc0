"""Calibration metrics of a classifier: the ECE family, Brier score, NLL and accuracy.

Every function takes ``logits`` ``(N, C)`` (softmax taken in float64) -- or probabilities as the
keyword ``probs=`` (equivalently ``from_probs=True``) -- and labels ``target`` ``(N,)``, and returns a
Python float. Logits whose every row is already a distribution are refused (pass them as ``probs=``). Confidence is
the top softmax probability, correct = ``1[argmax = y]``. Equal-width bins are ``((b-1)/B, b/B]``
(the convention of Guo et al.'s ``_ECELoss``, gpleiss/temperature_scaling, and of the LogitNorm
code); a confidence of exactly 0 goes into the first bin.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor

from ._inputs import check_n_bins, resolve_scores, to_probs

__all__ = [
    "accuracy", "adaptive_calibration_error", "brier_score", "calibration_metrics", "classwise_calibration_error",
    "expected_calibration_error", "maximum_calibration_error", "negative_log_likelihood", "reliability_bins",
]


def _equal_width_bins(conf: Tensor, hit: Tensor, n_bins: int) -> Dict[str, Tensor]:
    """Per equal-width bin ``((b-1)/B, b/B]``: sample count, summed confidence, summed correctness."""
    idx = (torch.ceil(conf * n_bins).long() - 1).clamp_(0, n_bins - 1)
    return {"count": torch.bincount(idx, minlength=n_bins).double(),
            "sum_conf": torch.bincount(idx, weights=conf, minlength=n_bins),
            "sum_acc": torch.bincount(idx, weights=hit, minlength=n_bins)}


def _probs(logits: Optional[Tensor], target: Optional[Tensor], from_probs: bool, probs: Optional[Tensor]):
    """Checked float64 probabilities and labels from a metric's arguments (``logits`` or ``probs=``)."""
    scores, from_probs = resolve_scores(logits, probs, from_probs)
    return to_probs(scores, target, from_probs)


def _confidence(logits: Optional[Tensor], target: Optional[Tensor], from_probs: bool, probs: Optional[Tensor]):
    p, y = _probs(logits, target, from_probs, probs)
    conf, pred = p.max(dim=1)
    return p, y, conf, (pred == y).double()


def reliability_bins(logits: Optional[Tensor] = None, target: Optional[Tensor] = None, n_bins: int = 15,
                     from_probs: bool = False, *, probs: Optional[Tensor] = None) -> Dict[str, list]:
    """The reliability diagram's data: per equal-width confidence bin, its edges, count, accuracy, confidence.

    Returns lists of length ``n_bins``: ``lower``, ``upper``, ``count``, ``accuracy`` and
    ``confidence`` (the mean over the bin's samples; NaN for an empty bin).
    """
    check_n_bins(n_bins)
    _, _, conf, hit = _confidence(logits, target, from_probs, probs)
    b = _equal_width_bins(conf, hit, n_bins)
    n = b["count"]
    nan = torch.full_like(n, float("nan"))
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)
    return {"lower": edges[:-1].tolist(), "upper": edges[1:].tolist(), "count": n.long().tolist(),
            "accuracy": torch.where(n > 0, b["sum_acc"] / n.clamp_min(1), nan).tolist(),
            "confidence": torch.where(n > 0, b["sum_conf"] / n.clamp_min(1), nan).tolist()}


def expected_calibration_error(logits: Optional[Tensor] = None, target: Optional[Tensor] = None, n_bins: int = 15,
                               from_probs: bool = False, *, probs: Optional[Tensor] = None) -> float:
    r"""Expected calibration error with ``n_bins`` equal-width confidence bins (Guo et al., ICML 2017).

    :math:`\mathrm{ECE} = \sum_b \frac{|B_b|}{N} \, |\mathrm{acc}(B_b) - \mathrm{conf}(B_b)|`,
    bins ``((b-1)/B, b/B]``, 15 by default (Guo et al.'s code). torchmetrics'
    ``MulticlassCalibrationError(norm='l1')`` uses ``[lo, hi)`` bins: the two differ only for
    confidences exactly on a bin edge. Fewer samples than bins is allowed (empty bins weigh 0).
    """
    check_n_bins(n_bins)
    _, _, conf, hit = _confidence(logits, target, from_probs, probs)
    b = _equal_width_bins(conf, hit, n_bins)
    return float((b["sum_acc"] - b["sum_conf"]).abs().sum() / conf.numel())


def maximum_calibration_error(logits: Optional[Tensor] = None, target: Optional[Tensor] = None, n_bins: int = 15,
                              from_probs: bool = False, *, probs: Optional[Tensor] = None) -> float:
    """Maximum calibration error: ``max_b |acc(B_b) - conf(B_b)|`` over the non-empty equal-width bins.

    Naeini, Cooper & Hauskrecht, AAAI 2015; same bins as :func:`expected_calibration_error`
    (torchmetrics: ``norm='max'``).
    """
    check_n_bins(n_bins)
    _, _, conf, hit = _confidence(logits, target, from_probs, probs)
    b = _equal_width_bins(conf, hit, n_bins)
    keep = b["count"] > 0
    return float(((b["sum_acc"] - b["sum_conf"])[keep] / b["count"][keep]).abs().max())


def _tie_averaged(conf: Tensor, hit: Tensor) -> Tensor:
    """``hit`` with every group of equal confidences replaced by the group's mean correctness."""
    _, group = torch.unique(conf, return_inverse=True)
    mean = torch.bincount(group, weights=hit) / torch.bincount(group).double()
    return mean[group]


def adaptive_calibration_error(logits: Optional[Tensor] = None, target: Optional[Tensor] = None, n_bins: int = 15,
                               from_probs: bool = False, *, probs: Optional[Tensor] = None) -> float:
    """Adaptive (equal-mass) ECE: the top-label ECE over ``n_bins`` bins holding (nearly) equal numbers of samples.

    The top-label adaptive ECE of Mukhoti et al., "Calibrating Deep Neural Networks using Focal
    Loss", NeurIPS 2020, as torch-uncertainty's ``AdaptiveCalibrationError`` computes it (Nixon et
    al. 2019's ACE is a different quantity: adaptive ranges over *every* class's probability,
    averaged over classes). Confidences (top softmax probability) are sorted and split into
    ``n_bins`` contiguous chunks of sizes differing by at most one (``torch.tensor_split``); each
    chunk weighs its share of the samples, ``|sum correct - sum confidence|``, L1 norm.

    Ties: samples with equal confidence cannot be ordered by it, and a chunk boundary inside a tied
    group would otherwise make the result depend on the input row order. Rule here: each sample of
    a tied group counts with the group's mean correctness, so a boundary splits the group
    proportionally and the result does not depend on row order (without ties it is the plain
    sorted split). Needs at least ``n_bins`` samples (``ValueError`` otherwise: a bin would be empty).
    """
    check_n_bins(n_bins)
    _, _, conf, hit = _confidence(logits, target, from_probs, probs)
    if conf.numel() < n_bins:
        raise ValueError(f"adaptive ECE needs at least n_bins={n_bins} samples, got {conf.numel()} "
                         f"(logits has {conf.numel()} rows); lower n_bins")
    hit = _tie_averaged(conf, hit)
    order = torch.sort(conf, stable=True).indices
    total = conf.new_zeros(())
    for chunk in torch.tensor_split(order, n_bins):
        total = total + (hit[chunk].sum() - conf[chunk].sum()).abs()
    return float(total / conf.numel())


def classwise_calibration_error(logits: Optional[Tensor] = None, target: Optional[Tensor] = None, n_bins: int = 15,
                                from_probs: bool = False, *, probs: Optional[Tensor] = None) -> float:
    """Classwise ECE: the mean over classes k of the equal-width ECE of ``p_k`` against ``1[y = k]``.

    Kull et al., NeurIPS 2019 (the class-wise ECE, averaged over the K classes; PyCalib's
    ``classwise_ECE`` sums over classes instead, i.e. K times this). Every sample counts for every
    class; bins as in :func:`expected_calibration_error`.
    """
    check_n_bins(n_bins)
    p, y, _, _ = _confidence(logits, target, from_probs, probs)
    n, k = p.shape
    onehot = torch.nn.functional.one_hot(y, k).double()
    total = 0.0
    for c in range(k):
        b = _equal_width_bins(p[:, c], onehot[:, c], n_bins)
        total += float((b["sum_acc"] - b["sum_conf"]).abs().sum() / n)
    return total / k


def brier_score(logits: Optional[Tensor] = None, target: Optional[Tensor] = None, from_probs: bool = False,
                *, probs: Optional[Tensor] = None) -> float:
    """Multi-class Brier score ``mean_i sum_c (p_ic - 1[y_i = c])^2`` (Brier 1950), in [0, 2], not divided by C."""
    p, y = _probs(logits, target, from_probs, probs)
    onehot = torch.nn.functional.one_hot(y, p.shape[1]).double()
    return float((p - onehot).square().sum(dim=1).mean())


def negative_log_likelihood(logits: Optional[Tensor] = None, target: Optional[Tensor] = None, from_probs: bool = False,
                            *, probs: Optional[Tensor] = None) -> float:
    """Mean negative log-likelihood ``-mean_i log p_{i, y_i}`` (float64 log-softmax of the logits).

    From probabilities, ``-log p`` of the true class: a zero probability gives ``inf`` (scikit-learn's
    ``log_loss`` clips p at the float64 machine epsilon instead).
    """
    scores, from_probs = resolve_scores(logits, probs, from_probs)
    p, y = to_probs(scores, target, from_probs)  # checks both
    if from_probs:
        return float(-p.gather(1, y[:, None]).log().mean())
    x = scores.detach().to(torch.float64).cpu()
    return float(torch.nn.functional.cross_entropy(x, y))


def accuracy(logits: Optional[Tensor] = None, target: Optional[Tensor] = None, from_probs: bool = False,
             *, probs: Optional[Tensor] = None) -> float:
    """Top-1 accuracy ``mean_i 1[argmax_c p_ic = y_i]`` (ties: the lowest class index, as ``argmax``)."""
    p, y = _probs(logits, target, from_probs, probs)
    return float((p.argmax(dim=1) == y).double().mean())


def calibration_metrics(logits: Optional[Tensor] = None, target: Optional[Tensor] = None, n_bins: int = 15,
                        from_probs: bool = False, *, probs: Optional[Tensor] = None) -> Dict[str, float]:
    """Every metric of this module in one dict: ``acc``, ``ece``, ``adaptive_ece``, ``classwise_ece``,
    ``mce``, ``brier``, ``nll`` (and ``n``, ``n_bins``). Adaptive ECE is NaN when N < ``n_bins``.

    ``calibration_metrics(logits, target)`` or ``calibration_metrics(probs=p, target=y)``: logits
    whose every row is already a distribution are refused with a ``ValueError`` saying to pass ``probs=``.
    """
    scores, from_probs = resolve_scores(logits, probs, from_probs)
    to_probs(scores, target, from_probs)  # checks once, with the error naming logits / probs / target
    args = (scores, target)
    out = {"acc": accuracy(*args, from_probs),
           "ece": expected_calibration_error(*args, n_bins, from_probs),
           "adaptive_ece": float("nan"),
           "classwise_ece": classwise_calibration_error(*args, n_bins, from_probs),
           "mce": maximum_calibration_error(*args, n_bins, from_probs),
           "brier": brier_score(*args, from_probs),
           "nll": negative_log_likelihood(*args, from_probs),
           "n": int(target.shape[0]), "n_bins": n_bins}
    if target.shape[0] >= n_bins:
        out["adaptive_ece"] = adaptive_calibration_error(*args, n_bins, from_probs)
    return out
