"""Mixup / CutMix with soft targets (timm's ``Mixup``), and the losses that can take soft targets.

Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) replace each class index by a mixture of two
one-hot vectors, so the loss must accept a probability target ``(N, C)``. Of lossbench's losses only
cross-entropy has a standard soft-target form: ``-(q * log_softmax(z)).sum(1)``, which is what
``F.cross_entropy`` computes for probability targets (with its ``weight`` and ``label_smoothing``)
and what timm's ``SoftTargetCrossEntropy`` computes. The margin, SVM, sampled-softmax and
class-centre losses are defined on a single true class; they are refused at configuration time.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

#: Losses (registry names) whose training objective has a soft-target (probability) form.
SOFT_TARGET_LOSSES = ("ce",)


def check_soft_targets(loss: str, mixup: float, cutmix: float) -> None:
    """ValueError naming ``loss`` if mixup / cutmix is asked for with a loss that needs class indices."""
    if (float(mixup) > 0 or float(cutmix) > 0) and str(loss).lower() not in SOFT_TARGET_LOSSES:
        raise ValueError(
            f"mixup/cutmix produce soft (probability) targets, which loss {loss!r} cannot take: it is "
            f"defined on one true class per sample. Losses that accept soft targets: {list(SOFT_TARGET_LOSSES)}. "
            f"Set mixup and cutmix to 0 for {loss!r}."
        )


def build_mixup(mixup: float, cutmix: float, prob: float, switch_prob: float, num_classes: int):
    """timm's ``Mixup`` (batch mode, no label smoothing: the loss owns that), or ``None`` if both alphas are 0."""
    if float(mixup) <= 0 and float(cutmix) <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=float(mixup), cutmix_alpha=float(cutmix), prob=float(prob),
                 switch_prob=float(switch_prob), mode="batch", label_smoothing=0.0, num_classes=num_classes)


def mix_batch(mixer, x: Tensor, y: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Mixed images and soft targets; an odd-sized batch (timm needs pairs) gets one-hot targets unmixed."""
    if x.shape[0] % 2:
        return x, F.one_hot(y, num_classes).to(x.dtype if x.is_floating_point() else torch.float32)
    return mixer(x, y)


def soft_target_loss(head: nn.Module, logits: Tensor, target: Tensor) -> Tensor:
    """The soft-target form of ``head``'s loss (cross-entropy heads only), on probabilities ``target``.

    ``F.cross_entropy(logits, target, weight, label_smoothing)`` with the head's settings, plus its
    log-partition penalty when that is on.
    """
    criterion: Optional[nn.Module] = getattr(head, "criterion", None)
    from ..losses.cross_entropy import CrossEntropyLoss, log_partition_penalty

    if not isinstance(criterion, CrossEntropyLoss):
        raise TypeError(f"soft targets need a cross-entropy head; this head is {type(head).__name__} "
                        f"(losses that accept soft targets: {list(SOFT_TARGET_LOSSES)})")
    if target.shape != logits.shape:
        raise ValueError(f"soft target must have the logits' shape {tuple(logits.shape)}, got {tuple(target.shape)}")
    logits = logits.float()
    weight = criterion.weight.to(logits.dtype) if criterion.weight is not None else None
    loss = F.cross_entropy(logits, target.to(logits.dtype), weight=weight,
                           label_smoothing=criterion.label_smoothing, reduction=criterion.reduction)
    if criterion.log_partition_coef > 0:
        loss = loss + criterion.log_partition_coef * log_partition_penalty(logits, None, reduction=criterion.reduction)
    return loss
