"""Calibration metrics."""

from __future__ import annotations

import torch
from torch import Tensor

from lossbench.validation import check_logits_target


def expected_calibration_error(logits: Tensor, target: Tensor, n_bins: int = 15) -> float:
    """Expected calibration error with ``n_bins`` equal-width confidence bins (Guo et al. 2017).

    ECE = sum_b |B_b|/N * |acc(B_b) - conf(B_b)|, confidence = max softmax probability, bins
    ``((b-1)/n_bins, b/n_bins]``. ``logits`` (N, C), ``target`` (N,).
    """
    if n_bins <= 0:
        raise ValueError(f"n_bins must be > 0, got {n_bins}")
    check_logits_target(logits, target)
    if logits.shape[0] == 0:
        raise ValueError("logits is empty; ECE needs at least one sample")
    probs = torch.softmax(logits.double(), dim=1)
    conf, pred = probs.max(dim=1)
    correct = (pred == target).double()
    # bin index b such that conf in ((b)/n, (b+1)/n]; conf > 0 always
    idx = (torch.ceil(conf * n_bins).long() - 1).clamp_(0, n_bins - 1)
    n = conf.numel()
    sum_conf = torch.bincount(idx, weights=conf, minlength=n_bins)
    sum_acc = torch.bincount(idx, weights=correct, minlength=n_bins)
    return float((sum_acc - sum_conf).abs().sum() / n)
