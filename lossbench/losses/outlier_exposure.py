"""Outlier Exposure, MSP variant (Hendrycks, Mazeika & Dietterich, ICLR 2019): CE to uniform on outliers."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ..validation import check_finite, check_float, check_positive, compute_dtype

__all__ = ["OutlierExposureLoss", "uniform_cross_entropy"]


def uniform_cross_entropy(logits: Tensor) -> Tensor:
    """Cross-entropy from softmax(logits) to the uniform distribution per row: ``logsumexp(z) - mean_c z``.

    ``= -(1/C) sum_c log softmax_c(z)``, ``(N, C)`` -> ``(N,)``; its minimum, log C, is reached
    at equal logits. Computed in float32 (float64 stays float64).
    """
    z = logits.to(compute_dtype(logits))
    return torch.logsumexp(z, dim=1) - z.mean(dim=1)


class OutlierExposureLoss(nn.Module):
    """The Outlier Exposure term ``weight * mean_outliers[logsumexp(z_out) - mean_c z_out]``.

    Hendrycks, Mazeika & Dietterich, "Deep Anomaly Detection with Outlier Exposure", ICLR 2019,
    MSP variant: cross-entropy from the outliers' softmax to the uniform distribution, added to
    the classification loss; the official code writes it
    ``0.5 * -(x_out.mean(1) - torch.logsumexp(x_out, dim=1)).mean()`` (hendrycks/outlier-exposure,
    ``CIFAR/oe_scratch.py`` and ``oe_tune.py``): weight (lambda) = 0.5 is their default and ours.
    An auxiliary term like :class:`~lossbench.losses.energy_margin.EnergyMarginLoss` (same call:
    ``(logits_in, logits_out)``; ``logits_in`` is only checked), not a registered loss.
    The value follows the library's dtype rule (:func:`lossbench.validation.compute_dtype`):
    float32 for bf16/fp16/float32 logits, float64 if either is float64 -- never cast back to fp16,
    where a loss of 6e4 or more would be ``inf``.
    """

    def __init__(self, weight: float = 0.5) -> None:
        super().__init__()
        check_positive(float(weight), "weight", allow_zero=True)
        self.weight = float(weight)

    def on_step(self, step: int) -> None:
        """No schedule (kept for the trainer's uniform hook)."""

    def forward(self, logits_in: Tensor, logits_out: Tensor) -> Tensor:
        for name, t in (("logits_in", logits_in), ("logits_out", logits_out)):
            check_float(t, name, ndim=2)
            check_finite(t, name)
        if logits_out.shape[0] == 0:
            raise ValueError("logits_out is empty; expected at least one outlier")
        if logits_in.shape[1] != logits_out.shape[1]:
            raise ValueError(
                f"logits_in and logits_out must have the same number of classes, got "
                f"{logits_in.shape[1]} and {logits_out.shape[1]}")
        work = torch.promote_types(compute_dtype(logits_in), compute_dtype(logits_out))  # as EnergyMarginLoss
        return self.weight * uniform_cross_entropy(logits_out.to(work)).mean()

    def extra_repr(self) -> str:
        return f"weight={self.weight}"
