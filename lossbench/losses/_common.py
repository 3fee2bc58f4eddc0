"""Small helpers shared by the losses in this package: reductions and argument checks."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

REDUCTIONS: Tuple[str, ...] = ("mean", "sum", "none")


def check_reduction(reduction: str, allowed: Tuple[str, ...] = REDUCTIONS) -> str:
    """Return ``reduction`` if it is one of ``allowed``, else raise ``ValueError`` naming it."""
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {allowed}, got {reduction!r}")
    return reduction


def reduce_loss(per_sample: Tensor, reduction: str) -> Tensor:
    """Apply ``'mean'``/``'sum'``/``'none'`` to a per-sample loss ``(N,)``."""
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def check_class_weight(weight: Optional[Tensor], num_classes: int, name: str = "weight") -> None:
    """``weight`` is ``None`` or a finite float tensor of shape ``(num_classes,)``."""
    if weight is None:
        return
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of shape ({num_classes},) or None")
    if weight.shape != (num_classes,):
        raise ValueError(
            f"{name} must have shape ({num_classes},) (one weight per class), got {tuple(weight.shape)}"
        )
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{name} contains NaN/inf values; expected finite class weights")


def check_int(value: int, name: str, minimum: int = 1) -> int:
    """``value`` is an ``int`` (not bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


