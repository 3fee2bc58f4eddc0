"""Linear SVM output layers (Tang 2013; Agarap 2017) and the Weston-Watkins / Crammer-Singer hinges."""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import register_loss
from ..validation import check_features, check_logits_target, check_positive, check_target, compute_dtype
from .base import LinearLayerHead, LogitLoss
from ._common import check_class_weight, check_reduction, linear, reduce_loss

__all__ = [
    "CrammerSingerLoss", "L1SVMHead", "L2SVMHead", "WestonWatkinsLoss",
    "crammer_singer_loss", "one_vs_rest_hinge", "weston_watkins_loss",
]


def _check_power(p: int) -> int:
    if p not in (1, 2):
        raise ValueError(f"p must be 1 (hinge) or 2 (squared hinge), got {p!r}")
    return p


def one_vs_rest_hinge(scores: Tensor, target: Tensor, p: int = 1, margin: float = 1.0) -> Tensor:
    """One-vs-rest hinge per sample and class: ``max(0, margin - t_ic s_ic)^p``, t in {-1, +1}.

    Tang 2013 (arXiv:1306.0239), Sec. 2.2-2.3: L1-SVM (p = 1) and L2-SVM (p = 2) with
    t_ic = +1 for the target class and -1 for the others. Computed in float32 (float64 stays).
    Shapes: scores ``(N, C)``, target ``(N,)`` -> ``(N, C)``.
    """
    s = scores.to(compute_dtype(scores))
    target = target.long()
    t = torch.full_like(s, -1.0).scatter_(1, target.unsqueeze(1), 1.0)
    h = F.relu(margin - t * s)
    return h * h if p == 2 else h


class _OneVsRestSVMHead(LinearLayerHead):
    """Linear layer ``s = W x + b`` trained with a one-vs-rest (squared) hinge plus a weight penalty.

    loss = weight_penalty * mean(W^2) + C * mean_{i,c} max(0, 1 - t_ic s_ic)^p

    the normalisation of Agarap's CNN-SVM code (AFAgarap/cnn-svm, ``model/cnn_svm.py``:
    ``reduce_mean(square(W)) + C * reduce_mean(square(max(0, 1 - y s)))``, C = 1), which is
    Tang 2013's 1/2||w||^2 + C sum hinge up to constant factors; ``reduction='sum'`` sums the
    hinge over the batch and classes instead of averaging. The bias is not penalised.
    Predict with ``argmax`` of :meth:`logits` -- the raw scores -- not of their sign.
    """

    p: int = 1

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        C: float = 1.0,
        weight_penalty: float = 1.0,
        margin: float = 1.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__(in_features, num_classes)
        check_positive(float(C), "C")
        check_positive(float(weight_penalty), "weight_penalty", allow_zero=True)
        check_positive(float(margin), "margin")
        self.C, self.weight_penalty, self.margin = float(C), float(weight_penalty), float(margin)
        self.reduction = check_reduction(reduction, ("mean", "sum"))

    def forward(self, features: Tensor, target: Tensor) -> Tensor:
        check_features(features, self.in_features, "features")
        target = check_target(target, self.num_classes, features.shape[0])
        scores = linear(features, self.fc.weight, self.fc.bias)
        hinge = one_vs_rest_hinge(scores, target, self.p, self.margin)
        data = hinge.mean() if self.reduction == "mean" else hinge.sum()
        w = self.fc.weight.to(data.dtype)
        return self.weight_penalty * (w * w).mean() + self.C * data

    def optim_settings(self) -> Dict[str, Dict[str, float]]:
        """No optimiser weight decay on ``fc.weight``: ``weight_penalty`` is its regulariser
        (Agarap's CNN-SVM trains with Adam and no weight decay)."""
        return {"fc.weight": {"weight_decay": 0.0}}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, C={self.C}, "
                f"weight_penalty={self.weight_penalty}, margin={self.margin}, p={self.p}")


@register_loss("svm_l1", kind="head")
class L1SVMHead(_OneVsRestSVMHead):
    """L1-SVM output layer (Tang 2013): one-vs-rest hinge ``max(0, 1 - t s)`` + weight penalty.

    See :class:`_OneVsRestSVMHead` for the loss and defaults (C = 1, weight_penalty = 1).
    Shapes: features ``(N, in_features)``, target ``(N,)``; ``logits`` -> raw scores ``(N, C)``.
    """

    p = 1


@register_loss("svm_l2", kind="head")
class L2SVMHead(_OneVsRestSVMHead):
    """L2-SVM output layer (Tang 2013; Agarap 2017): squared hinge ``max(0, 1 - t s)^2`` + penalty.

    See :class:`_OneVsRestSVMHead` for the loss and defaults (C = 1, weight_penalty = 1 as in
    the CNN-SVM code). Shapes: features ``(N, in_features)``, target ``(N,)``;
    ``logits`` -> raw scores ``(N, C)``.
    """

    p = 2


def weston_watkins_loss(
    logits: Tensor, target: Tensor, margin: float = 1.0, p: int = 1,
    weight: Optional[Tensor] = None, divide_by_classes: bool = False, reduction: str = "mean",
) -> Tensor:
    """Weston-Watkins multiclass hinge ``sum_{j != y} max(0, margin - s_y + s_j)^p``.

    Weston & Watkins 1999 (ESANN). With ``divide_by_classes=True`` the sum is divided by C,
    which is exactly ``nn.MultiMarginLoss(p, margin, weight)``; class ``weight`` multiplies
    sample i's loss by weight[y_i] (and 'mean' is then a plain mean, as in torch).
    Shapes: logits ``(N, C)``, target ``(N,)`` -> scalar, or ``(N,)`` with ``'none'``.
    """
    check_reduction(reduction)
    _check_power(p)
    target = check_logits_target(logits, target)
    s = logits.to(compute_dtype(logits))
    s_y = s.gather(1, target.unsqueeze(1))
    h = F.relu(margin - s_y + s).scatter(1, target.unsqueeze(1), 0.0)
    per_sample = (h * h if p == 2 else h).sum(dim=1)
    if divide_by_classes:
        per_sample = per_sample / s.shape[1]
    if weight is not None:
        check_class_weight(weight, s.shape[1])
        per_sample = per_sample * weight.to(s.dtype).index_select(0, target)
    return reduce_loss(per_sample, reduction)


def crammer_singer_loss(
    logits: Tensor, target: Tensor, margin: float = 1.0, p: int = 1, reduction: str = "mean"
) -> Tensor:
    """Crammer-Singer multiclass hinge ``max(0, margin + max_{j != y} s_j - s_y)^p``.

    Crammer & Singer 2001 (JMLR 2). Shapes: logits ``(N, C)`` with C >= 2, target ``(N,)``.
    """
    check_reduction(reduction)
    _check_power(p)
    target = check_logits_target(logits, target)
    if logits.shape[1] < 2:
        raise ValueError(f"logits must have at least 2 classes, got shape {tuple(logits.shape)}")
    s = logits.to(compute_dtype(logits))
    s_y = s.gather(1, target.unsqueeze(1)).squeeze(1)
    others = s.scatter(1, target.unsqueeze(1), float("-inf"))
    h = F.relu(margin + others.max(dim=1).values - s_y)
    return reduce_loss(h * h if p == 2 else h, reduction)


@register_loss("multimargin_ww", kind="logits")
class WestonWatkinsLoss(LogitLoss):
    """Weston-Watkins multiclass hinge on logits; see :func:`weston_watkins_loss`.

    loss_i = w_{y_i} * sum_{j != y_i} max(0, margin - s_{i,y_i} + s_{ij})^p  [/ C if divide_by_classes]

    Defaults margin = 1, p = 1, no division by C (the WW objective; ``nn.MultiMarginLoss`` is
    this with ``divide_by_classes=True``). No weight penalty here: use the optimizer's weight decay.
    Shapes: logits ``(N, C)``, target ``(N,)``.
    """

    def __init__(
        self, margin: float = 1.0, p: int = 1, weight: Optional[Union[Tensor, Sequence[float]]] = None,
        divide_by_classes: bool = False, reduction: str = "mean",
    ) -> None:
        super().__init__()
        check_positive(float(margin), "margin")
        self.margin, self.p = float(margin), _check_power(p)
        if weight is not None and not isinstance(weight, Tensor):
            weight = torch.tensor([float(w) for w in weight], dtype=torch.float32)
        if weight is not None:
            check_class_weight(weight, int(weight.numel()))
        self.register_buffer("weight", weight)
        self.divide_by_classes = bool(divide_by_classes)
        self.reduction = check_reduction(reduction)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return weston_watkins_loss(
            logits, target, self.margin, self.p, self.weight, self.divide_by_classes, self.reduction
        )


@register_loss("multimargin_cs", kind="logits")
class CrammerSingerLoss(LogitLoss):
    """Crammer-Singer multiclass hinge on logits; see :func:`crammer_singer_loss`.

    loss_i = max(0, margin + max_{j != y_i} s_ij - s_{i,y_i})^p, defaults margin = 1, p = 1.
    No weight penalty here: use the optimizer's weight decay. Shapes: logits ``(N, C)``, target ``(N,)``.
    """

    def __init__(self, margin: float = 1.0, p: int = 1, reduction: str = "mean") -> None:
        super().__init__()
        check_positive(float(margin), "margin")
        self.margin, self.p = float(margin), _check_power(p)
        self.reduction = check_reduction(reduction)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return crammer_singer_loss(logits, target, self.margin, self.p, self.reduction)
