"""Focal loss (Lin et al. 2017) for multi-class logits, with the FLSD-53 schedule of Mukhoti et al. 2020."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import register_loss
from ..validation import check_logits_target, check_positive, compute_dtype
from .base import LogitLoss
from ._common import check_reduction, reduce_loss

__all__ = ["FocalLoss", "GAMMA_SCHEDULES", "flsd53_gamma", "focal_loss"]

#: Sample-dependent gamma schedules: ``None`` (fixed gamma) or ``'flsd53'``.
GAMMA_SCHEDULES = (None, "flsd53")


def flsd53_gamma(p_true: Tensor) -> Tensor:
    """FLSD-53 gamma per sample: 5 where ``p_y < 0.2``, else 3 (computed without gradient).

    Mukhoti et al., NeurIPS 2020, Sec. 5; official code torrvision/focal_calibration,
    ``Losses/focal_loss_adaptive_gamma.py`` (``gamma_dic = {0.2: 5.0, 0.5: 3.0}`` with
    ``gamma = 3`` for ``p_y >= 0.5``).
    """
    p = p_true.detach()
    return torch.where(p < 0.2, torch.full_like(p, 5.0), torch.full_like(p, 3.0))


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 2.0, schedule: Optional[str] = None,
               reduction: str = "mean") -> Tensor:
    """Multi-class focal loss ``-(1 - p_y)^gamma log p_y`` per sample, reduced.

    Lin, Goyal, Girshick, He & Dollar, "Focal Loss for Dense Object Detection", ICCV 2017, eq. (4)
    without the alpha weight, applied to the softmax (as Mukhoti et al. 2020 do). ``log p_y`` is
    the float32 log-softmax (float64 stays float64); the gradient flows through ``(1 - p_y)^gamma``
    too, as in both official codes. ``schedule='flsd53'`` replaces ``gamma`` by
    :func:`flsd53_gamma`. ``gamma = 0`` is cross-entropy.
    Shapes: logits ``(N, C)``, target ``(N,)`` -> scalar, or ``(N,)`` with ``'none'``.
    """
    check_reduction(reduction)
    target = check_logits_target(logits, target)
    if schedule not in GAMMA_SCHEDULES:
        raise ValueError(f"schedule must be one of {GAMMA_SCHEDULES}, got {schedule!r}")
    z = logits.to(compute_dtype(logits))
    with torch.autocast(z.device.type, enabled=False):
        logp = F.log_softmax(z, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
        p = logp.exp()
        g = flsd53_gamma(p) if schedule == "flsd53" else torch.full_like(p, float(gamma))
        # (1 - p)^g with g > 0; -expm1(logp) = 1 - p without cancellation near p = 1
        weight = torch.where(g > 0, (-torch.expm1(logp)).clamp_min(0).pow(g), torch.ones_like(p))
        return reduce_loss(-weight * logp, reduction)


@register_loss("focal", kind="logits")
class FocalLoss(LogitLoss):
    """Focal loss on logits: ``-(1 - p_y)^gamma log p_y``; see :func:`focal_loss`.

    Defaults: ``gamma = 2`` (Lin et al.'s value; Mukhoti et al. also train fixed gamma = 1, 2, 3)
    and no schedule; ``schedule='flsd53'`` is Mukhoti et al.'s FLSD-53 ("calibrated by training",
    gamma = 5 for p_y < 0.2, else 3; ``gamma`` is then unused). ``reduction='mean'``: the official
    calibration code sums over the batch (``size_average=False``), which equals the mean times
    the batch size, i.e. a larger learning rate.
    """

    def __init__(self, gamma: float = 2.0, schedule: Optional[str] = None, reduction: str = "mean") -> None:
        super().__init__()
        check_positive(float(gamma), "gamma", allow_zero=True)
        if schedule not in GAMMA_SCHEDULES:
            raise ValueError(f"schedule must be one of {GAMMA_SCHEDULES}, got {schedule!r}")
        self.gamma, self.schedule = float(gamma), schedule
        self.reduction = check_reduction(reduction)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return focal_loss(logits, target, self.gamma, self.schedule, self.reduction)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, schedule={self.schedule!r}, reduction={self.reduction!r}"
