"""A classifier head trained with cut cross-entropy (registered as ``'cce'``).

Wijmans et al. 2024, arXiv:2411.09009: the head owns ``weight`` (V x D) and ``bias`` (V) like
``nn.Linear``; ``forward(features, target)`` is :func:`~lossbench.cce.api.linear_cross_entropy`,
so the N x V logits are never held in training; ``logits(features)`` materialises them
(``softcap(features @ weight.T + bias)``) for inference and OOD scores.
Shapes: features (N, in_features), target (N,) -> scalar loss ((N,) with reduction='none').
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..losses.base import Head
from ..registry import register_loss
from .api import DEFAULT_CHUNK_SIZE, linear_cross_entropy


@register_loss("cce", kind="head")
class CutCrossEntropyHead(Head):
    """Linear head + cross-entropy computed by cut cross-entropy (no N x V logits in training)."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        bias: bool = True,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        class_weight: Optional[Union[Tensor, Sequence[float]]] = None,
        softcap: Optional[float] = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        filter_eps: Union[str, float, None] = "auto",
        impl: str = "auto",
    ) -> None:
        super().__init__(in_features, num_classes)
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.in_features))
        self.bias = nn.Parameter(torch.empty(self.num_classes)) if bias else None
        if class_weight is not None:
            cw = torch.as_tensor(class_weight, dtype=torch.float32)
            if cw.shape != (self.num_classes,):
                raise ValueError(f"class_weight must have shape ({self.num_classes},), "
                                 f"got {tuple(cw.shape)}")
            self.register_buffer("class_weight", cw)
        else:
            self.class_weight = None
        self.ignore_index = int(ignore_index)
        self.reduction = reduction
        self.label_smoothing = float(label_smoothing)
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.filter_eps = filter_eps
        self.impl = impl
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def logits(self, features: Tensor) -> Tensor:
        self.check_features(features)
        z = F.linear(features, self.weight, self.bias)
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z

    def forward(self, features: Tensor, target: Tensor) -> Tensor:
        """Training loss; an empty batch is a ``ValueError`` as for every lossbench loss
        (:func:`lossbench.linear_cross_entropy` itself follows ``F.cross_entropy``: NaN for ``'mean'``)."""
        self.check_features(features)
        if features.shape[0] == 0:
            raise ValueError("features is an empty batch (0 rows); expected at least one sample")
        if features.dtype != self.weight.dtype:
            # Under autocast the backbone hands over bf16/fp16 features while the head's weights stay
            # float32; the loss accumulates in float32 anyway, so compute it in the weights' dtype.
            features = features.to(self.weight.dtype)
        cw = self.class_weight
        if cw is not None and cw.dtype != features.dtype:
            cw = cw.to(features.dtype)
        return linear_cross_entropy(
            features, self.weight, target, self.bias,
            ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, class_weight=cw, softcap=self.softcap,
            chunk_size=self.chunk_size, filter_eps=self.filter_eps, impl=self.impl,
        )
