"""NCI: neural-collapse-inspired score, alignment with the predicted class's weight plus an l1 norm."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from lossbench.validation import check_positive

from ..registry import register_score
from .feature_base import Classifier, FeatureScore


@register_score("nci")
class NCI(FeatureScore):
    """NCI score ``s(x) = w_yhat^T (h - mu_G) / ||h - mu_G||_2 + alpha ||h||_1``.

    Liu & Qin, "Detecting Out-of-Distribution Through the Lens of Neural Collapse", CVPR 2025
    (arXiv 2311.01479); official code litianliu/NCI-OOD ``openood/postprocessors/nci_postprocessor.py``,
    byte-identical in OpenOOD. ``mu_G``: the mean penultimate feature of the ID **training** set;
    ``w_yhat``: the **raw** (unnormalised) classifier row of the predicted class
    ``yhat = argmax z`` (the bias is not used); ``||h||_1`` the l1 norm of the feature.

    Inputs: features and logits of the scored set, the linear classifier ``W`` (a head without one
    raises :class:`~ood.scores.feature_base.ScoreNotApplicable`), the training mean. Default
    ``alpha = 1e-4``; search grid ``alpha in (1e-4, 1e-3, 1e-2, 1e-1)`` (``configs/postprocessors/nci.yml``,
    the same in OpenOOD and the official code). The official code does not guard ``h = mu_G``
    (0/0); here the first term is 0 there.
    """

    name = "nci"
    requires_linear = True
    GRID = {"alpha": (1e-4, 1e-3, 1e-2, 1e-1)}

    def __init__(self, alpha: float = 1e-4):
        check_positive(alpha, "alpha", allow_zero=True)
        self.alpha = float(alpha)

    def fit_features(self, train_features: Tensor, train_logits: Tensor, train_labels: Optional[Tensor],
                     classifier: Optional[Classifier], **kw: Any) -> "NCI":
        h, _ = self._check_train(train_features, train_logits)  # also records width_ and num_classes_
        self.weight_ = self._need_classifier(classifier, h).weight  # (num_classes_, width_), else an error
        self.mean_ = h.mean(dim=0)
        self.fitted_ = True
        return self

    def _score_features(self, features: Tensor, logits: Tensor) -> Tensor:
        self._check_width(features)
        if logits.shape[1] != self.weight_.shape[0]:
            raise ValueError(f"logits must have {self.weight_.shape[0]} columns (the classifier's classes), "
                             f"got shape {tuple(logits.shape)}")
        centred = features - self.mean_
        dist = centred.norm(dim=1)
        align = (self.weight_[logits.argmax(dim=1)] * centred).sum(dim=1)
        align = torch.where(dist > 0, align / torch.where(dist > 0, dist, torch.ones_like(dist)), torch.zeros_like(dist))
        return align + self.alpha * features.abs().sum(dim=1)
