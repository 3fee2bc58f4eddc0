"""Input checks shared by every loss, head and score: errors name the argument and what was expected."""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import Tensor

_ENABLED = True


def checks_enabled() -> bool:
    """Whether the (synchronising) value checks -- finiteness, label range -- are on."""
    return _ENABLED


@contextmanager
def skip_value_checks() -> Iterator[None]:
    """Turn off the value checks (NaN/inf, label range) inside the block; shape checks stay."""
    global _ENABLED
    old, _ENABLED = _ENABLED, False
    try:
        yield
    finally:
        _ENABLED = old


def check_not_meta(x: Tensor, name: str) -> None:
    """A tensor on the ``meta`` device has no values to compute with: ``ValueError`` naming it."""
    if x.device.type == "meta":
        raise ValueError(f"{name} is on meta (the 'meta' device holds shapes, no values); expected a real tensor")


def check_float(x: Tensor, name: str, ndim: Optional[int] = None) -> None:
    """``x`` is a floating-point tensor with values (not on ``meta``) and, if given, ``ndim`` dims."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    check_not_meta(x, name)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")


def check_finite(x: Tensor, name: str) -> None:
    """``ValueError`` naming ``x`` if it holds NaN or +-inf (skipped inside :func:`skip_value_checks`)."""
    if _ENABLED and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} contains {bad} NaN/inf value(s); expected finite values")


def check_target(
    target: Tensor,
    num_classes: int,
    batch: int,
    name: str = "target",
    ignore_index: Optional[int] = None,
) -> Tensor:
    """``target`` must be a 1-D integer tensor of ``batch >= 1`` class indices in ``[0, num_classes)``.

    Returns ``target`` as ``torch.long`` (any integer dtype is accepted, as ``F.cross_entropy``
    accepts it), so callers can index with it. An empty batch is an error: a loss over zero
    samples has no defined value (a mean over nothing is NaN), and lossbench never returns one.
    """
    if not isinstance(target, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices, got {type(target).__name__}")
    check_not_meta(target, name)
    if target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"{name} must hold integer class indices (torch.long), got dtype {target.dtype}")
    if target.dim() != 1:
        raise ValueError(f"{name} must be 1-D of shape (N,), got shape {tuple(target.shape)}")
    if target.shape[0] != batch:
        raise ValueError(f"{name} has {target.shape[0]} entries but the input has batch size {batch}")
    if batch == 0:
        raise ValueError(f"{name} and the input are empty (batch size 0); expected at least one sample")
    if _ENABLED and target.numel():
        valid = target if ignore_index is None else target[target != ignore_index]
        if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= num_classes):
            lo, hi = int(valid.min()), int(valid.max())
            extra = "" if ignore_index is None else f" (or ignore_index={ignore_index})"
            raise ValueError(
                f"{name} values must lie in [0, {num_classes}){extra}; got min {lo}, max {hi}"
            )
    return target.long()


def check_logits_target(
    logits: Tensor, target: Tensor, ignore_index: Optional[int] = None,
    logits_name: str = "logits", target_name: str = "target",
) -> Tensor:
    """Logits (N, C) float and finite; target (N,) integer in range, returned as ``torch.long``."""
    check_float(logits, logits_name, ndim=2)
    check_finite(logits, logits_name)
    return check_target(target, logits.shape[1], logits.shape[0], target_name, ignore_index)


def check_features(features: Tensor, in_features: int, name: str = "features") -> None:
    """Features (N, in_features), float, finite."""
    check_float(features, name, ndim=2)
    if features.shape[1] != in_features:
        raise ValueError(
            f"{name} must have width in_features={in_features}, got shape {tuple(features.shape)}"
        )
    check_finite(features, name)


def check_number(value: float, name: str) -> float:
    """``value`` is a finite real number (not NaN, not +-inf): ``ValueError`` naming it otherwise."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return v


def check_positive(value: float, name: str, allow_zero: bool = False) -> None:
    """``value`` is finite and ``> 0`` (``>= 0`` with ``allow_zero``); NaN and inf are refused."""
    v = check_number(value, name)
    ok = v >= 0 if allow_zero else v > 0
    if not ok:
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def compute_dtype(x) -> torch.dtype:
    """The one dtype rule of lossbench: float64 stays float64; every other float dtype computes in float32.

    ``x`` is a tensor or a dtype. bf16/fp16 inputs are promoted (their own GEMMs and reductions lose
    too much precision, and on CPU a bf16 GEMM is far slower than a float32 one).
    """
    dtype = x.dtype if isinstance(x, Tensor) else x
    return torch.float64 if dtype == torch.float64 else torch.float32
