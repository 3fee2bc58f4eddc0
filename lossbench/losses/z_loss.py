"""Z-loss (de Brebisson & Vincent 2016): a shift- and scale-invariant spherical classification loss."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import register_loss
from ..validation import check_float, check_logits_target, check_number, check_positive, compute_dtype
from .base import LogitLoss
from ._common import check_reduction, reduce_loss, row_scale

__all__ = ["ZLoss", "z_loss", "z_normalize"]


def z_normalize(logits: Tensor, eps: float = 1e-12) -> Tensor:
    """Row-wise z-scores ``(o - mean(o)) / std(o)`` with the *population* std.

    de Brebisson & Vincent 2016 (arXiv:1604.08859, definition of the Z-loss): mu = (1/D) sum_k o_k,
    sigma^2 = (1/D) sum_k o_k^2 - mu^2, i.e. divided by D (not D - 1), which keeps the loss a
    function of (o_c, sum o, sum o^2) -- the spherical family. The authors' released example
    (pascal20100/factored_output_layer, ``example/timing_example.py``) also uses this sigma.
    Rows with sigma <= ``eps`` (constant logits) give z = 0 with zero gradient, not 0/0.
    Computed in float32 (float64 stays float64) on each row divided by its largest ``|o_k|``
    (detached; z-scores are scale-invariant, so value and gradient are unchanged), so the squares
    cannot overflow: in float32 ``sigma^2`` is ``inf`` once a logit passes ~1.8e19, which made the
    loss a constant. Shape ``(N, C)`` -> ``(N, C)``.
    """
    check_float(logits, "logits", ndim=2)
    o = logits.to(compute_dtype(logits))
    m = row_scale(o)
    o = o / m
    centred = o - o.mean(dim=1, keepdim=True)
    var = (centred * centred).mean(dim=1, keepdim=True)
    # Degenerate rows (sigma <= eps in the logits' units): z := 0 with zero gradient instead of a
    # ~1/eps blow-up (the variance is replaced by 1 there so that no inf/NaN reaches the backward).
    keep = var.detach().sqrt() * m > eps
    sigma = torch.where(keep, var, torch.ones_like(var)).sqrt()
    return torch.where(keep, centred / sigma, torch.zeros_like(centred))


def _check_z_classes(c: int, name: str) -> None:
    """The Z-loss needs C >= 3: with two classes z = +-1 always, so its gradient is identically 0."""
    if c < 3:
        why = ("the z-scores of two logits are always +-1, so the loss is constant and its gradient "
               "identically zero" if c == 2 else "it needs several logits to normalise")
        raise ValueError(f"{name}: the Z-loss needs at least 3 classes, got {c} ({c} classes: {why}); "
                         "use cross-entropy for binary problems")


def z_loss(
    logits: Tensor, target: Tensor, a: float = 1.0, b: float = 0.0,
    eps: float = 1e-12, reduction: str = "mean",
) -> Tensor:
    """Z-loss ``(1/a) * softplus(a * (b - z_y))`` with ``z`` the z-normalized logits.

    de Brebisson & Vincent 2016 (arXiv:1604.08859). ``a > 0`` sets the sharpness and
    ``b`` the location of the softplus; the loss is invariant to ``logits -> alpha*logits + beta``
    for ``alpha > 0``. Defaults a = 1, b = 0 are those of the authors' released example
    (``softplus((mu - o_c) / sigma)``); the paper tunes both per task.

    ``C = 2`` is refused (``ValueError``): z-normalised pairs are always (+1, -1), so the loss is
    constant and its gradient identically zero -- training would silently do nothing.
    Shapes: logits ``(N, C)`` with ``C >= 3``, target ``(N,)`` -> scalar, or ``(N,)`` with ``'none'``.
    """
    check_reduction(reduction)
    check_positive(float(a), "a")
    target = check_logits_target(logits, target)
    _check_z_classes(logits.shape[1], "logits")
    z = z_normalize(logits, eps)
    z_target = z.gather(1, target.unsqueeze(1)).squeeze(1)
    per_sample = F.softplus(a * (b - z_target)) / a
    return reduce_loss(per_sample, reduction)


@register_loss("zloss", kind="logits")
class ZLoss(LogitLoss):
    """Z-loss of de Brebisson & Vincent 2016 (arXiv:1604.08859) on logits; see :func:`z_loss`.

    loss_i = (1/a) * softplus(a * (b - z_{i,y_i})),  z_i = (o_i - mean(o_i)) / std(o_i)

    Defaults ``a=1, b=0`` follow the authors' released example; ``eps`` guards std -> 0.
    ``num_classes`` (optional; the registry passes it) is checked at construction: C <= 2 is
    refused, as in :func:`z_loss`.
    Not the log-partition penalty of PaLM/ST-MoE (see ``CrossEntropyLoss(log_partition_coef=)``).
    Shapes: logits ``(N, C)``, target ``(N,)``.
    """

    def __init__(self, a: float = 1.0, b: float = 0.0, eps: float = 1e-12, reduction: str = "mean",
                 num_classes: Optional[int] = None) -> None:
        super().__init__()
        if num_classes is not None:
            _check_z_classes(int(num_classes), "num_classes")
        check_positive(float(a), "a")
        check_number(b, "b")
        check_positive(float(eps), "eps")
        self.a, self.b, self.eps = float(a), float(b), float(eps)
        self.reduction = check_reduction(reduction)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return z_loss(logits, target, self.a, self.b, self.eps, self.reduction)

    def extra_repr(self) -> str:
        return f"a={self.a}, b={self.b}, eps={self.eps}, reduction={self.reduction!r}"
