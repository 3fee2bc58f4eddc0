"""DICE: energy of logits from a sparsified classifier (weights with the largest contributions kept)."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor

from ..registry import register_score
from .feature_base import Classifier, FeatureScore, percentile


@register_score("dice")
class DICE(FeatureScore):
    """DICE score ``s(x) = logsumexp((M * W) h + b)``, ``M = 1[m_j W_cj > percentile_p(m * W)]``.

    Sun & Li, "DICE: Leveraging Sparsification for Out-of-Distribution Detection", ECCV 2022
    (official code deeplearning-wisc/dice ``models/route.py``; OpenOOD ``dice_postprocessor.py``).
    ``m`` = mean training feature; the contribution matrix ``V = m * W`` (``V_cj = m_j W_cj``); the
    percentile is over all ``C x D`` entries (``numpy.percentile``); ``p`` is the sparsity (90 keeps
    10 % of the weights).

    Inputs: features of the scored set, the linear classifier ``W``, ``b``, the training mean
    feature. A head with no linear classifier raises :class:`ScoreNotApplicable`.
    Defaults: ``p = 90`` (official CIFAR, OpenOOD); the official ImageNet ResNet-50 uses 70.
    OpenOOD's sweep is ``p in (90,)`` with APS off (``GRID``).
    """

    name = "dice"
    requires_linear = True
    GRID = {"p": (90,)}

    def __init__(self, p: float = 90.0):
        if not 0.0 <= float(p) < 100.0:
            raise ValueError(f"p must lie in [0, 100), got {p}")
        self.p = float(p)

    def fit_features(self, train_features: Tensor, train_logits: Tensor, train_labels: Optional[Tensor],
                     classifier: Optional[Classifier], **kw: Any) -> "DICE":
        h, _ = self._check_train(train_features, train_logits)
        clf = self._need_classifier(classifier)
        contrib = h.mean(dim=0)[None, :] * clf.weight
        self.threshold_ = percentile(contrib, self.p)
        self.masked_weight_ = clf.weight * (contrib > self.threshold_)
        self.bias_, self.width_ = clf.bias, int(h.shape[1])
        self.fitted_ = True
        return self

    def _score_features(self, features: Tensor, logits: Tensor) -> Tensor:
        self._check_width(features)
        return torch.logsumexp(features @ self.masked_weight_.T + self.bias_, dim=1)

    def info(self) -> Dict[str, Any]:
        out = super().info()
        if getattr(self, "fitted_", False):
            out["kept_fraction"] = float((self.masked_weight_ != 0).double().mean())
        return out
