"""Relation: the sum of relation-graph edges between a sample and the training set."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..registry import register_score
from .feature_base import Classifier, FeatureScore


def relation_normalise(h: Tensor) -> Tensor:
    """``h / sqrt(||h||^2 + 1e-10)`` (the official / OpenOOD normaliser)."""
    return h / torch.sqrt((h * h).sum(dim=1, keepdim=True) + 1e-10)


@register_score("relation")
class Relation(FeatureScore):
    """Relation score ``s(x) = sum_i sign(r_i) |r_i|^pow 1[|r_i| > thres]``, ``r_i = max(0, <h^, h^_i>) <p, p_i>``.

    Kim, Yun, Oh & Song, "Neural Relation Graph: A Unified Framework for Identifying Label Noise
    and Outlier Data", NeurIPS 2023 (official code snu-mllab/Neural-Relation-Graph; OpenOOD
    ``relation_postprocessor.py``). ``h^``: normalised penultimate features, ``p``: softmax; the
    sum runs over every training sample ``i``. Inputs: features and logits of the scored set and
    of the training set.

    Defaults (OpenOOD): ``pow = 1``, ``thres = 0.03``; search grid ``pow in (1, 2, 4, 6, 8)``
    (``GRID``). The official ``detect_ood.py`` reports ``1 / (graph score + 1e-6)`` as an OOD
    score (higher = OOD) and warns when pow != 1; here the graph score itself (higher = ID),
    OpenOOD's form and the same ranking. Cost: one ``N x N_train`` product, chunked over queries.
    """

    name = "relation"
    GRID = {"pow": (1, 2, 4, 6, 8)}

    def __init__(self, pow: float = 1.0, thres: float = 0.03, chunk: int = 256):
        if float(pow) <= 0:
            raise ValueError(f"pow must be > 0, got {pow}")
        if float(thres) < 0:
            raise ValueError(f"thres must be >= 0, got {thres}")
        self.pow, self.thres, self.chunk = float(pow), float(thres), int(chunk)

    def fit_features(self, train_features: Tensor, train_logits: Tensor, train_labels: Optional[Tensor],
                     classifier: Optional[Classifier], **kw: Any) -> "Relation":
        h, z = self._check_train(train_features, train_logits)
        self.train_features_, self.train_probs_ = relation_normalise(h), torch.softmax(z, dim=1)
        self.width_ = int(h.shape[1])
        self.fitted_ = True
        return self

    def _score_features(self, features: Tensor, logits: Tensor) -> Tensor:
        self._check_width(features)
        f, p = relation_normalise(features), torch.softmax(logits, dim=1)
        out = []
        for s in range(0, f.shape[0], self.chunk):
            r = (f[s:s + self.chunk] @ self.train_features_.T).clamp_min_(0).mul_(p[s:s + self.chunk] @ self.train_probs_.T)
            # r >= 0 (a clamped cosine times an inner product of probabilities): sign(r)|r|^pow = r^pow
            kept = r.masked_fill_(r <= self.thres, 0.0)
            out.append((kept if self.pow == 1.0 else kept.pow_(self.pow)).sum(dim=1))
        return torch.cat(out)
