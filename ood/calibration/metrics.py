"""Calibration metrics of a classifier: the ECE family, Brier score, NLL and accuracy.

Every function takes ``logits`` ``(N, C)`` (softmax taken in float64) -- or probabilities with
``from_probs=True`` -- and labels ``target`` ``(N,)``, and returns a Python float. Confidence is
the top softmax probability, correct = ``1[argmax = y]``. Equal-width bins are ``((b-1)/B, b/B]``
(the convention of Guo et al.'s ``_ECELoss``, gpleiss/temperature_scaling, and of the LogitNorm
code); a confidence of exactly 0 goes into the first bin.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor

from ._inputs import check_n_bins, to_probs

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


def _confidence(logits: Tensor, target: Tensor, from_probs: bool):
    probs, y = to_probs(logits, target, from_probs)
    conf, pred = probs.max(dim=1)
    return probs, y, conf, (pred == y).double()


def reliability_bins(logits: Tensor, target: Tensor, n_bins: int = 15, from_probs: bool = False) -> Dict[str, list]:
    """The reliability diagram's data: per equal-width confidence bin, its edges, count, accuracy, confidence.

    Returns lists of length ``n_bins``: ``lower``, ``upper``, ``count``, ``accuracy`` and
    ``confidence`` (the mean over the bin's samples; NaN for an empty bin).
    """
    check_n_bins(n_bins)
    _, _, conf, hit = _confidence(logits, target, from_probs)
    b = _equal_width_bins(conf, hit, n_bins)
    n = b["count"]
    nan = torch.full_like(n, float("nan"))
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)
    return {"lower": edges[:-1].tolist(), "upper": edges[1:].tolist(), "count": n.long().tolist(),
            "accuracy": torch.where(n > 0, b["sum_acc"] / n.clamp_min(1), nan).tolist(),
            "confidence": torch.where(n > 0, b["sum_conf"] / n.clamp_min(1), nan).tolist()}


def expected_calibration_error(logits: Tensor, target: Tensor, n_bins: int = 15, from_probs: bool = False) -> float:
    """Expected calibration error with ``n_bins`` equal-width confidence bins (Guo et al., ICML 2017).

    ECE = sum_b |B_b|/N * |acc(B_b) - conf(B_b)|, bins ``((b-1)/B, b/B]``, 15 by default (Guo et
    al.'s code). torchmetrics' ``MulticlassCalibrationError(norm='l1')`` uses ``[lo, hi)`` bins:
    the two differ only for confidences exactly on a bin edge. Fewer samples than bins is allowed
    (empty bins weigh 0).
    """
    check_n_bins(n_bins)
    _, _, conf, hit = _confidence(logits, target, from_probs)
    b = _equal_width_bins(conf, hit, n_bins)
    return float((b["sum_acc"] - b["sum_conf"]).abs().sum() / conf.numel())


def maximum_calibration_error(logits: Tensor, target: Tensor, n_bins: int = 15, from_probs: bool = False) -> float:
    """Maximum calibration error: ``max_b |acc(B_b) - conf(B_b)|`` over the non-empty equal-width bins.

    Naeini, Cooper & Hauskrecht, AAAI 2015; same bins as :func:`expected_calibration_error`
    (torchmetrics: ``norm='max'``).
    """
    check_n_bins(n_bins)
    _, _, conf, hit = _confidence(logits, target, from_probs)
    b = _equal_width_bins(conf, hit, n_bins)
    keep = b["count"] > 0
    return float(((b["sum_acc"] - b["sum_conf"])[keep] / b["count"][keep]).abs().max())


def adaptive_calibration_error(logits: Tensor, target: Tensor, n_bins: int = 15, from_probs: bool = False) -> float:
    """Adaptive (equal-mass) ECE: the ECE over ``n_bins`` bins holding (nearly) equal numbers of samples.

    Nixon et al., "Measuring Calibration in Deep Learning", CVPR-W 2019. Confidences are sorted
    (stable sort, so ties keep their input order) and split into ``n_bins`` contiguous chunks of
    sizes differing by at most one (``torch.tensor_split``, as torch-uncertainty's
    ``AdaptiveCalibrationError``); each chunk weighs its share of the samples, L1 norm. Needs at
    least ``n_bins`` samples (``ValueError`` otherwise: a bin would be empty).
    """
    check_n_bins(n_bins)
    _, _, conf, hit = _confidence(logits, target, from_probs)
    if conf.numel() < n_bins:
        raise ValueError(f"adaptive ECE needs at least n_bins={n_bins} samples, got {conf.numel()} "
                         f"(logits has {conf.numel()} rows); lower n_bins")
    order = torch.sort(conf, stable=True).indices
    total = conf.new_zeros(())
    for chunk in torch.tensor_split(order, n_bins):
        total = total + (hit[chunk].sum() - conf[chunk].sum()).abs()
    return float(total / conf.numel())


def classwise_calibration_error(logits: Tensor, target: Tensor, n_bins: int = 15, from_probs: bool = False) -> float:
    """Classwise ECE: the mean over classes k of the equal-width ECE of ``p_k`` against ``1[y = k]``.

    Kull et al., NeurIPS 2019 (the class-wise ECE, averaged over the K classes; PyCalib's
    ``classwise_ECE`` sums over classes instead, i.e. K times this). Every sample counts for every
    class; bins as in :func:`expected_calibration_error`.
    """
    check_n_bins(n_bins)
    probs, y, _, _ = _confidence(logits, target, from_probs)
    n, k = probs.shape
    onehot = torch.nn.functional.one_hot(y, k).double()
    total = 0.0
    for c in range(k):
        b = _equal_width_bins(probs[:, c], onehot[:, c], n_bins)
        total += float((b["sum_acc"] - b["sum_conf"]).abs().sum() / n)
    return total / k


def brier_score(logits: Tensor, target: Tensor, from_probs: bool = False) -> float:
    """Multi-class Brier score ``mean_i sum_c (p_ic - 1[y_i = c])^2`` (Brier 1950), in [0, 2], not divided by C."""
    probs, y = to_probs(logits, target, from_probs)
    onehot = torch.nn.functional.one_hot(y, probs.shape[1]).double()
    return float((probs - onehot).square().sum(dim=1).mean())


def negative_log_likelihood(logits: Tensor, target: Tensor, from_probs: bool = False) -> float:
    """Mean negative log-likelihood ``-mean_i log p_{i, y_i}`` (float64 log-softmax of the logits).

    From probabilities, ``-log p`` of the true class: a zero probability gives ``inf`` (scikit-learn's
    ``log_loss`` clips p at the float64 machine epsilon instead).
    """
    if from_probs:
        probs, y = to_probs(logits, target, True)
        return float(-probs.gather(1, y[:, None]).log().mean())
    to_probs(logits, target, False)  # checks
    x = logits.detach().to(torch.float64).cpu()
    return float(torch.nn.functional.cross_entropy(x, target.detach().cpu().long()))


def accuracy(logits: Tensor, target: Tensor, from_probs: bool = False) -> float:
    """Top-1 accuracy ``mean_i 1[argmax_c p_ic = y_i]`` (ties: the lowest class index, as ``argmax``)."""
    probs, y = to_probs(logits, target, from_probs)
    return float((probs.argmax(dim=1) == y).double().mean())


def calibration_metrics(logits: Tensor, target: Tensor, n_bins: int = 15, from_probs: bool = False) -> Dict[str, float]:
    """Every metric of this module in one dict: ``acc``, ``ece``, ``adaptive_ece``, ``classwise_ece``,
    ``mce``, ``brier``, ``nll`` (and ``n``, ``n_bins``). Adaptive ECE is NaN when N < ``n_bins``."""
    out = {"acc": accuracy(logits, target, from_probs),
           "ece": expected_calibration_error(logits, target, n_bins, from_probs),
           "adaptive_ece": float("nan"),
           "classwise_ece": classwise_calibration_error(logits, target, n_bins, from_probs),
           "mce": maximum_calibration_error(logits, target, n_bins, from_probs),
           "brier": brier_score(logits, target, from_probs),
           "nll": negative_log_likelihood(logits, target, from_probs),
           "n": int(target.shape[0]), "n_bins": n_bins}
    if target.shape[0] >= n_bins:
        out["adaptive_ece"] = adaptive_calibration_error(logits, target, n_bins, from_probs)
    return out
