"""SHE: inner product of the feature with the stored pattern of its predicted class."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..registry import register_score
from .feature_base import Classifier, FeatureScore, ScoreNotApplicable


@register_score("she")
class SHE(FeatureScore):
    """SHE score ``s(x) = <h, m_yhat>``, ``yhat = argmax z``, ``m_k`` = the stored pattern of class k.

    Zhang, Fu, Liu, Chen, Zhang & Wang, "Out-of-distribution Detection based on In-distribution
    Data Patterns Memorization with Modern Hopfield Energy", ICLR 2023 (official code
    zjs975584714/SHE_ood_detection ``generate_stored_pattern.py``; OpenOOD ``she_postprocessor.py``).
    ``m_k`` = mean penultimate feature of the training samples with label k that the model
    classifies **correctly**. OpenOOD's ``metric: inner_product``; with one averaged pattern per
    class the official Hopfield-energy form reduces to the same inner product.

    Inputs: features and logits of the scored set; training features, logits and labels. A class
    with no correctly classified training sample raises :class:`ScoreNotApplicable`. No
    hyper-parameters (OpenOOD: APS off), ``GRID = {}``.
    """

    name = "she"
    requires_labels = True
    GRID: dict = {}

    def fit_features(self, train_features: Tensor, train_logits: Tensor, train_labels: Optional[Tensor],
                     classifier: Optional[Classifier], **kw: Any) -> "SHE":
        h, z = self._check_train(train_features, train_logits)
        y = self._need_labels(train_labels, h.shape[0])
        c = z.shape[1]
        ok = z.argmax(dim=1) == y
        counts = torch.bincount(y[ok], minlength=c)
        missing = torch.nonzero(counts == 0).flatten().tolist()
        if missing:
            raise ScoreNotApplicable(f"she: classes {missing[:10]} have no correctly classified training sample")
        self.patterns_ = torch.zeros(c, h.shape[1], dtype=torch.float64).index_add_(0, y[ok], h[ok]) / counts[:, None]
        self.width_ = int(h.shape[1])
        self.fitted_ = True
        return self

    def _score_features(self, features: Tensor, logits: Tensor) -> Tensor:
        self._check_width(features)
        return (features * self.patterns_[logits.argmax(dim=1)]).sum(dim=1)
