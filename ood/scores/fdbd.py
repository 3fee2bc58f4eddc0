"""fDBD: mean feature-space distance to the decision boundaries, normalised by the feature's spread."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..registry import register_score
from .feature_base import Classifier, FeatureScore, ScoreNotApplicable


@register_score("fdbd")
class FDBD(FeatureScore):
    """fDBD score ``s(x) = sum_{c != yhat} |z_yhat - z_c| / ||w_yhat - w_c||_2 / ||h - mu_train||_2``.

    Liu & Qin, "Fast Decision Boundary based Out-of-Distribution Detector", ICML 2024 (official
    code litianliu/fDBD-OOD ``run_cifar.py``; OpenOOD ``fdbd_postprocessor.py``). ``|z_yhat - z_c| /
    ||w_yhat - w_c||`` is the distance from ``h`` to the boundary between the predicted class and c;
    ``mu_train`` the mean training feature. The official code has no 1/(C-1) factor (nor here).

    Inputs: features and logits of the scored set, the linear classifier ``W`` (a head without
    one raises :class:`ScoreNotApplicable`), the training mean. Default
    ``distance_as_normalizer=True`` (paper, official code); ``False`` divides by ``||h||`` instead,
    OpenOOD's acknowledged deviation, which its APS searches over (``GRID``).
    """

    name = "fdbd"
    requires_linear = True
    GRID = {"distance_as_normalizer": (True, False)}

    def __init__(self, distance_as_normalizer: bool = True):
        self.distance_as_normalizer = bool(distance_as_normalizer)

    def fit_features(self, train_features: Tensor, train_logits: Tensor, train_labels: Optional[Tensor],
                     classifier: Optional[Classifier], **kw: Any) -> "FDBD":
        h, _ = self._check_train(train_features, train_logits)
        w = self._need_classifier(classifier).weight
        gaps = torch.cdist(w, w)
        off = ~torch.eye(w.shape[0], dtype=torch.bool)
        if bool((gaps[off] <= 0).any()):
            raise ScoreNotApplicable("fdbd: two classes have identical weight vectors (no decision boundary)")
        self.inv_gaps_ = torch.where(off, 1.0 / gaps.masked_fill(~off, 1.0), torch.zeros_like(gaps))
        self.mean_, self.width_ = h.mean(dim=0), int(h.shape[1])
        self.fitted_ = True
        return self

    def _score_features(self, features: Tensor, logits: Tensor) -> Tensor:
        self._check_width(features)
        pred = logits.argmax(dim=1)
        gap = (logits.gather(1, pred[:, None]) - logits).abs()
        boundary = (gap * self.inv_gaps_[pred]).sum(dim=1)
        norm = (features - self.mean_) if self.distance_as_normalizer else features
        return boundary / norm.norm(dim=1)
