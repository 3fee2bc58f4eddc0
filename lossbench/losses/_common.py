"""Small helpers shared by the losses in this package: reductions, argument checks, safe normalisation."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..validation import compute_dtype

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



def row_scale(x: Tensor) -> Tensor:
    """``max_j |x_ij|`` per row ``(N, 1)``, detached, with 1 for all-zero rows.

    Dividing a row by it before squaring keeps ``sum x^2`` finite (float32 overflows once an entry
    passes ~1.8e19, its square 3.4e38) and away from underflow; being detached, it changes neither
    the value nor the gradient of a scale-free expression such as ``x / ||x||``.
    """
    m = x.detach().abs().amax(dim=1, keepdim=True)
    return torch.where(m > 0, m, torch.ones_like(m))


def safe_normalize(x: Tensor, eps: float) -> Tensor:
    """Rows of ``x`` scaled to unit L2 norm; rows with norm ``<= eps`` become 0 with zero gradient.

    ``F.normalize`` divides by ``max(||x||, eps)``, so at an exactly zero row its gradient is
    ``1/eps`` (1e8 .. 1e12): one dead feature vector would blow up a step. Here such a row is
    treated as having no direction (cosine 0 to everything) and passes no gradient back. The norm
    is taken of the row divided by :func:`row_scale` (no overflow for huge entries).
    """
    m = row_scale(x)
    y = x / m
    norm = y.norm(dim=1, keepdim=True)
    keep = norm * m > eps
    return torch.where(keep, y / torch.where(keep, norm, torch.ones_like(norm)), torch.zeros_like(x))


def clamped_normalize(x: Tensor, eps: float) -> Tensor:
    """``x / max(||x||_2, eps)`` per row (``F.normalize``'s form), without overflow for huge entries.

    The clamp bounds the gradient: ``|d x_hat / d x| <= 1 / max(||x||, eps)``, so a near-zero row
    gets at most ``1/eps`` times the incoming gradient instead of ``1/||x||``. Computed as
    ``y / max(||y||, eps / m)`` with ``y = x / m``, ``m`` = :func:`row_scale` (the same value).
    """
    m = row_scale(x)
    y = x / m
    return y / torch.maximum(y.norm(dim=1, keepdim=True), eps / m)


def linear(features: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear`` under the dtype rule: bf16/fp16 features and float32 weights compute in float32.

    Outside autocast, features and parameters are cast to ``promote(compute_dtype(features),
    weight.dtype)`` (float64 features give float64 logits); under autocast the call is left to
    autocast, which picks the GEMM dtype itself.
    """
    if torch.is_autocast_enabled(features.device.type):
        return F.linear(features, weight, bias)
    dtype = torch.promote_types(compute_dtype(features), weight.dtype)
    return F.linear(features.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
