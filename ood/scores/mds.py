"""Single-layer Mahalanobis distance score as OpenOOD runs it (MDS): no input pre-processing."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..registry import register_score
from .feature_base import Classifier, FeatureScore, ScoreNotApplicable
from .mahalanobis import fit_class_gaussian, mahalanobis_distances


def fit_gaussians(h: Tensor, labels: Tensor, num_classes: int, what: str):
    """Class means and tied pseudo-inverse precision (empirical, /N); :class:`ScoreNotApplicable` on empty classes."""
    try:
        means, precision, _ = fit_class_gaussian(h, labels, num_classes, "empirical")
    except ValueError as err:
        raise ScoreNotApplicable(f"{what}: {err}") from err
    return means, precision


@register_score("mds")
class MDS(FeatureScore):
    """MDS score ``s(x) = -min_k (h - mu_k)^T Sigma^+ (h - mu_k)`` on the penultimate features.

    Lee, Lee, Lee & Shin, NeurIPS 2018, as OpenOOD v1.5 runs it (``mds_postprocessor.py``):
    one layer (the penultimate features), no input pre-processing, no layer ensemble. ``mu_k``:
    class means of the training features (training **labels**); ``Sigma``: the tied covariance of
    the class-centred training features, maximum likelihood (/N), precision the pseudo-inverse
    (scikit-learn ``EmpiricalCovariance``). Computed in float64 (OpenOOD: float32).

    Inputs: features of the scored set; training features and labels. No hyper-parameters
    (OpenOOD: APS off), ``GRID = {}``. The full method (layers, pre-processing, regression) is
    the ``'mahalanobis'`` score.
    """

    name = "mds"
    requires_labels = True
    GRID: dict = {}

    def fit_features(self, train_features: Tensor, train_logits: Tensor, train_labels: Optional[Tensor],
                     classifier: Optional[Classifier], **kw: Any) -> "MDS":
        h, z = self._check_train(train_features, train_logits)
        y = self._need_labels(train_labels, h.shape[0])
        self.means_, self.precision_ = fit_gaussians(h, y, z.shape[1], self.name)
        self.width_ = int(h.shape[1])
        self.fitted_ = True
        return self

    def _score_features(self, features: Tensor, logits: Tensor) -> Tensor:
        self._check_width(features)
        return -mahalanobis_distances(features, self.means_, self.precision_).amin(dim=1)
