"""SCALE: energy of the unpruned penultimate features scaled by ASH-S's exp(s1/s2)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..registry import register_score
from .ash import shaping_ratio, top_k
from .feature_base import Classifier, FeatureScore, energy

#: The official SCALE repository's APS grid (kai422/SCALE configs/postprocessors/scale.yml).
SCALE_OFFICIAL_GRID = {"percentile": tuple(range(50, 100, 5))}


def scale_features(h: Tensor, percentile: float) -> Tensor:
    """``h * exp(s1 / s2)``: ``s1`` = row sum, ``s2`` = sum of the top ``k = n - round(n p / 100)`` entries."""
    v, _, _ = top_k(h, percentile)
    return h * torch.exp(shaping_ratio(h, v))[:, None]


@register_score("scale")
class SCALE(FeatureScore):
    """SCALE score ``s(x) = logsumexp(f(r h))`` with ``r = exp(s1 / s2)`` (no pruning of ``h``).

    Xu, Chen, Franchi & Yao, "Scaling for Training Time and Post-hoc Out-of-distribution
    Detection Enhancement", ICLR 2024 (official code kai422/SCALE ``openood/networks/scale_net.py``,
    identical in OpenOOD). ``s1`` = sum of the pooled penultimate activation ``h``, ``s2`` = sum of
    its top ``k = n - round(n p / 100)`` entries; ``f`` the head. With a bias,
    ``logsumexp(W (r h) + b)`` is not ``r`` times the energy: it is computed as written.

    Inputs: features of the scored set and the head; no training statistics. Defaults:
    ``percentile = 85`` (official and OpenOOD). Search grid: OpenOOD's ``GRID`` =
    ``(65, 70, ..., 95)``; the official repository's ``(50, 55, ..., 95)`` is
    ``SCALE_OFFICIAL_GRID``.
    """

    name = "scale"
    requires_classifier = True
    GRID = {"percentile": (65, 70, 75, 80, 85, 90, 95)}

    def __init__(self, percentile: float = 85.0):
        if not 0.0 <= float(percentile) < 100.0:
            raise ValueError(f"percentile must lie in [0, 100), got {percentile}")
        self.percentile = float(percentile)

    def fit_features(self, train_features: Tensor, train_logits: Tensor, train_labels: Optional[Tensor],
                     classifier: Optional[Classifier], **kw: Any) -> "SCALE":
        train_features, _ = self._check_train(train_features, train_logits)
        self.classifier_ = self._need_classifier(classifier, train_features)
        self.width_ = int(train_features.shape[1])
        self.fitted_ = True
        return self

    def _score_features(self, features: Tensor, logits: Tensor) -> Tensor:
        self._check_width(features)
        return energy(self.classifier_.logits(scale_features(features, self.percentile)))
