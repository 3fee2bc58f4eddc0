"""Cross-entropy exactly as ``F.cross_entropy``, plus the optional log-partition penalty."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import register_loss
from ..validation import check_float, check_logits_target, check_positive, compute_dtype
from .base import LogitLoss
from ._common import check_class_weight, check_reduction

__all__ = ["CrossEntropyLoss", "log_partition_penalty"]


def log_partition_penalty(
    logits: Tensor,
    target: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Squared log-partition ``logsumexp(logits)^2`` per sample, reduced.

    The auxiliary term of PaLM (Chowdhery et al. 2022, Sec. 5) and ST-MoE (Zoph et al. 2022,
    Sec. 3.1, where it is called "router z-loss"): it pulls ``log Z = logsumexp_c logits_c``
    towards 0. It is *not* the Z-loss of de Brebisson & Vincent (see ``ZLoss``). Samples whose
    ``target`` equals ``ignore_index`` are left out (``'mean'`` divides by the number kept).
    Computed in float32 (float64 stays float64).

    Shapes: logits ``(N, C)``, target ``(N,)`` or ``None`` -> scalar, or ``(N,)`` with ``'none'``.
    """
    check_reduction(reduction)
    check_float(logits, "logits", ndim=2)
    if target is not None:
        target = target.long()
    lse = torch.logsumexp(logits.to(compute_dtype(logits)), dim=1)
    per_sample = lse * lse
    if target is None:
        keep = torch.ones_like(per_sample, dtype=torch.bool)
    else:
        keep = target != ignore_index
        per_sample = torch.where(keep, per_sample, torch.zeros_like(per_sample))
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    return per_sample.sum() / keep.sum().clamp_min(1)


@register_loss("ce", kind="logits")
class CrossEntropyLoss(LogitLoss):
    """Softmax cross-entropy, identical to ``F.cross_entropy``, with an optional log-partition penalty.

    loss_i = CE(logits_i, y_i) + log_partition_coef * logsumexp(logits_i)^2

    The first term is ``F.cross_entropy`` with its ``weight``, ``ignore_index``,
    ``label_smoothing`` and ``reduction`` semantics unchanged (with class weights, ``'mean'``
    divides by the summed weights of the kept targets). The second is
    :func:`log_partition_penalty` (PaLM / ST-MoE, typical coef 1e-4; default 0 = off), averaged
    over the non-ignored samples for ``'mean'``; it is unweighted.

    Shapes: logits ``(N, C)`` float, target ``(N,)`` integer in ``[0, C)`` or ``ignore_index``
    (any integer dtype); weight ``(C,)`` (a tensor or a list, e.g. from a YAML config).
    Computed in float32 for bf16/fp16 logits (float64 stays float64), and returned in that
    dtype -- never cast back to fp16, whose range (65504) a squared log-partition can exceed.
    An empty batch is a ``ValueError`` (as in every lossbench loss), not NaN.
    """

    def __init__(
        self,
        weight: Optional[Union[Tensor, Sequence[float]]] = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        log_partition_coef: float = 0.0,
    ) -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)
        if not 0.0 <= float(label_smoothing) <= 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
        check_positive(float(log_partition_coef), "log_partition_coef", allow_zero=True)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        if weight is not None and not isinstance(weight, Tensor):
            weight = torch.tensor([float(w) for w in weight], dtype=torch.float32)
        if weight is not None:
            check_class_weight(weight, int(weight.numel()))
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.label_smoothing = float(label_smoothing)
        self.log_partition_coef = float(log_partition_coef)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        target = check_logits_target(logits, target, ignore_index=self.ignore_index)
        check_class_weight(self.weight, logits.shape[1])
        work = compute_dtype(logits)
        weight = None if self.weight is None else self.weight.to(work)
        loss = F.cross_entropy(
            logits.to(work), target, weight=weight, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing,
        )
        if self.log_partition_coef > 0:
            penalty = log_partition_penalty(logits, target, self.ignore_index, self.reduction)
            loss = loss + self.log_partition_coef * penalty
        return loss
