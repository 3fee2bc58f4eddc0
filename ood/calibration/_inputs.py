"""Input checks of the calibration metrics: logits or probabilities ``(N, C)`` and labels ``(N,)``."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from lossbench.validation import check_finite, check_float, check_target

#: Tolerance on ``|sum_c p_ic - 1|`` for probabilities given directly.
PROB_SUM_ATOL = 1e-4


def check_n_bins(n_bins: int) -> int:
    """``n_bins`` is an int >= 1."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, int):
        raise TypeError(f"n_bins must be an int, got {type(n_bins).__name__}")
    if n_bins <= 0:
        raise ValueError(f"n_bins must be > 0, got {n_bins}")
    return n_bins


def resolve_scores(logits: Optional[Tensor], probs: Optional[Tensor], from_probs: bool) -> Tuple[Tensor, bool]:
    """``(scores, from_probs)`` from a metric's ``logits`` / ``probs=`` arguments: exactly one of the two."""
    if probs is not None:
        if logits is not None:
            raise ValueError("pass either logits or probs=, not both")
        return probs, True
    if logits is None:
        raise TypeError("pass logits (N, C), or probabilities as probs= (N, C)")
    return logits, bool(from_probs)


def looks_like_probs(x: Tensor) -> bool:
    """Whether every row of ``x`` is a distribution: non-negative and summing to 1 within :data:`PROB_SUM_ATOL`."""
    return bool((x >= 0).all()) and bool(((x.sum(dim=1) - 1.0).abs() <= PROB_SUM_ATOL).all())


def to_probs(scores: Tensor, target: Optional[Tensor], from_probs: bool = False,
             scores_name: str = "logits", target_name: str = "target") -> Tuple[Tensor, Tensor]:
    """Float64 probabilities ``(N, C)`` and labels ``(N,)`` after checking both.

    ``scores`` are logits (softmax taken in float64) or, with ``from_probs=True``, probabilities
    that must lie in [0, 1] and sum to 1 per row (within :data:`PROB_SUM_ATOL`). An empty split,
    NaN/inf values and labels outside ``[0, C)`` raise ``ValueError`` naming the argument.
    Logits whose every row is already a distribution (non-negative, summing to 1) are refused:
    a softmax of probabilities is a different, much flatter distribution (pass them as ``probs=``).
    """
    name = "probs" if from_probs and scores_name == "logits" else scores_name
    check_float(scores, name, ndim=2)
    if scores.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(scores.shape)}); calibration needs at least one sample")
    if scores.shape[1] < 2:
        raise ValueError(f"{name} must have at least 2 classes, got shape {tuple(scores.shape)}")
    check_finite(scores, name)
    if target is None:
        raise TypeError(f"{target_name} is required: the labels (N,) of the {scores.shape[0]} samples")
    check_target(target, scores.shape[1], scores.shape[0], target_name)
    x = scores.detach().to(torch.float64).cpu()
    if not from_probs:
        if looks_like_probs(x):
            raise ValueError(
                f"{name} look like probabilities (every row non-negative and summing to 1 within "
                f"{PROB_SUM_ATOL:g}); a softmax of them would be wrong. Pass them as probs=... "
                "(or from_probs=True), or pass the logits")
        return torch.softmax(x, dim=1), target.detach().cpu().long()
    if bool((x < 0).any()) or bool((x > 1).any()):
        raise ValueError(f"{name} must lie in [0, 1]; got min {float(x.min()):.4g}, max {float(x.max()):.4g}")
    err = (x.sum(dim=1) - 1.0).abs()
    if bool((err > PROB_SUM_ATOL).any()):
        i = int(err.argmax())
        raise ValueError(f"{name} rows must sum to 1 (within {PROB_SUM_ATOL:g}); row {i} sums to "
                         f"{float(x[i].sum()):.6g}. Pass logits with from_probs=False, or normalise first")
    return x, target.detach().cpu().long()


def check_fitted_logits(logits: Tensor, k: int, who: str) -> None:
    """Logits handed to a fitted calibrator: a floating-point ``(N, k)`` tensor of finite values, or an
    error naming ``logits`` and the ``k`` classes ``who`` was fitted on."""
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError("logits must be a floating-point tensor")
    if logits.dim() != 2 or logits.shape[1] != k:
        raise ValueError(f"logits must have shape (N, {k}) (the {who} was fitted on {k} classes), "
                         f"got {tuple(logits.shape)}")
    check_finite(logits, "logits")
