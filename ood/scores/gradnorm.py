"""GradNorm: the L1 norm of the last-layer weight gradient of the KL to uniform, in closed form."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from lossbench.validation import check_positive

from ..registry import register_score
from .feature_base import Classifier, FeatureScore


def gradnorm_closed_form(features: Tensor, logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``(1/T) sum_c |C p_c - 1| * sum_j |h_j|`` with ``p = softmax(z / T)``: ``(N,)``.

    The gradient of ``L = sum_c -log softmax_c(z / T)`` (the official all-ones target) with
    respect to ``W`` of ``z = W h + b`` is ``dL/dW_cj = (C p_c - 1) h_j / T``, an outer product,
    so its entry-wise L1 norm factorises. No per-sample backward pass.
    """
    c = logits.shape[1]
    p = torch.softmax(logits / temperature, dim=1)
    return (c * p - 1.0).abs().sum(dim=1) * features.abs().sum(dim=1) / temperature


@register_score("gradnorm")
class GradNorm(FeatureScore):
    """GradNorm score ``s(x) = || dL/dW ||_1``, ``L = sum_c -log softmax_c(z / T)``, in closed form.

    Huang, Geng & Li, "On the Importance of Gradients for Detecting Distributional Shifts in the
    Wild", NeurIPS 2021 (official code deeplearning-wisc/gradnorm_ood ``test_ood.py``; OpenOOD
    ``gradnorm_postprocessor.py``). Only ``W`` (not ``b``) of the last linear layer. The official
    code's target is a vector of **ones** (the loss is C times the paper's KL(u || p), same
    ranking); this follows the code. Computed from (h, z) by :func:`gradnorm_closed_form` --
    the official code (and OpenOOD) loops over samples with a backward pass each.

    Inputs: features and logits of the scored set; it needs the head to be linear (the
    closed form is the gradient of ``W h + b``), else :class:`ScoreNotApplicable`.
    Defaults: ``T = 1`` (official ``--temperature_gradnorm 1``; OpenOOD has no T). OpenOOD: APS
    off, ``GRID = {}``.
    """

    name = "gradnorm"
    requires_linear = True
    GRID: dict = {}

    def __init__(self, temperature: float = 1.0):
        check_positive(float(temperature), "temperature")
        self.temperature = float(temperature)

    def fit_features(self, train_features: Tensor, train_logits: Tensor, train_labels: Optional[Tensor],
                     classifier: Optional[Classifier], **kw: Any) -> "GradNorm":
        h, _ = self._check_train(train_features, train_logits)
        self._need_classifier(classifier)
        self.width_ = int(h.shape[1])
        self.fitted_ = True
        return self

    def _score_features(self, features: Tensor, logits: Tensor) -> Tensor:
        self._check_width(features)
        return gradnorm_closed_form(features, logits, self.temperature)
