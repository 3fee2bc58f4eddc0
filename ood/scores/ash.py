"""Activation shaping (ASH) of pooled penultimate features: the shared pruning rules and score base.

The three registered scores live in ``ash_p.py``, ``ash_b.py`` and ``ash_s.py``.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .feature_base import Classifier, FeatureScore, ScoreNotApplicable, energy

#: OpenOOD's APS grid for ASH (configs/postprocessors/ash.yml).
ASH_GRID = {"percentile": (65, 70, 75, 80, 85, 90, 95)}


def keep_count(n: int, percentile: float) -> int:
    """``k = n - round(n * p / 100)`` activations kept (``numpy.round``: half to even, as the official code)."""
    k = n - int(np.round(n * percentile / 100.0))
    if k < 1:
        raise ScoreNotApplicable(f"percentile {percentile} prunes all {n} activations; expected k = n - round(n p / 100) >= 1")
    return k


def top_k(h: Tensor, percentile: float) -> Tuple[Tensor, Tensor, int]:
    """(values, indices, k) of the ``k`` largest activations per row (ties: ``torch.topk``'s order)."""
    k = keep_count(h.shape[1], percentile)
    v, i = torch.topk(h, k, dim=1)
    return v, i, k


def ash_p(h: Tensor, percentile: float) -> Tensor:
    """ASH-P: keep the top-k activations of each row, zero the rest."""
    v, i, _ = top_k(h, percentile)
    return torch.zeros_like(h).scatter_(1, i, v)


def ash_b(h: Tensor, percentile: float) -> Tensor:
    """ASH-B: the top-k positions set to ``s1 / k`` (``s1`` = row sum before pruning), the rest 0."""
    _, i, k = top_k(h, percentile)
    fill = (h.sum(dim=1, keepdim=True) / k).expand(-1, k)
    return torch.zeros_like(h).scatter_(1, i, fill)


def shaping_ratio(h: Tensor, v: Tensor) -> Tensor:
    """``s1 / s2`` per row (``s1`` = sum of all, ``s2`` = sum of kept); 0 where both are 0 (all-zero rows)."""
    s1, s2 = h.sum(dim=1), v.sum(dim=1)
    both_zero = (s1 == 0) & (s2 == 0)
    return torch.where(both_zero, torch.zeros_like(s1), s1 / torch.where(both_zero, torch.ones_like(s2), s2))


def ash_s(h: Tensor, percentile: float) -> Tensor:
    """ASH-S: ASH-P, then the kept values multiplied by ``exp(s1 / s2)``."""
    v, i, _ = top_k(h, percentile)
    r = torch.exp(shaping_ratio(h, v))
    return torch.zeros_like(h).scatter_(1, i, v * r[:, None])


class _ASH(FeatureScore):
    """Shared fit/score of the ASH variants (see the module's classes)."""

    requires_classifier = True
    GRID = ASH_GRID
    _shape = staticmethod(ash_p)

    def __init__(self, percentile: float = 90.0):
        if not 0.0 <= float(percentile) < 100.0:
            raise ValueError(f"percentile must lie in [0, 100), got {percentile}")
        self.percentile = float(percentile)

    def fit_features(self, train_features: Tensor, train_logits: Tensor, train_labels: Optional[Tensor],
                     classifier: Optional[Classifier], **kw: Any) -> "_ASH":
        train_features, _ = self._check_train(train_features, train_logits)
        self.classifier_ = self._need_classifier(classifier, train_features)
        self.width_ = int(train_features.shape[1])
        keep_count(self.width_, self.percentile)
        self.fitted_ = True
        return self

    def _score_features(self, features: Tensor, logits: Tensor) -> Tensor:
        self._check_width(features)
        return energy(self.classifier_.logits(type(self)._shape(features, self.percentile)))


ASH_DOC = """{what}

    Djurisic, Bozanic, Ashok & Liu, "Extremely Simple Activation Shaping for Out-of-Distribution
    Detection", ICLR 2023 (official code andrijazz/ash, ``ash.py``). Applied per sample to the
    globally average-pooled penultimate activation ``h`` (``n`` entries), as the official
    ResNet/DenseNet code does (avgpool -> ash -> fc): keep the top ``k = n - round(n p / 100)``
    entries, {rule}; the score is ``logsumexp(f(h'))`` through the head ``f``.

    Inputs: features of the scored set and the head (any ``logits``; the paper's is linear); no
    training statistics. Defaults: ``percentile = 90`` ({default_src}). Search grid (OpenOOD APS):
    ``percentile in (65, 70, ..., 95)``. {note} Ties in the top-k are broken by ``torch.topk``.
    """


