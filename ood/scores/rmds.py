"""Relative Mahalanobis distance (RMDS): class distance minus the distance to a background Gaussian."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..registry import register_score
from .feature_base import Classifier, FeatureScore
from .mahalanobis import mahalanobis_distances
from .mds import fit_gaussians


@register_score("rmds")
class RMDS(FeatureScore):
    """RMDS score ``s(x) = MD_0(h) - min_k MD_k(h)`` = ``-min_k (MD_k - MD_0)``.

    Ren, Fort, Liu, Roy, Padhy & Lakshminarayanan, "A Simple Fix to Mahalanobis Distance for
    Improving Near-OOD Detection", arXiv 2106.09022 (2021); OpenOOD ``rmds_postprocessor.py``.
    ``MD_k = (h - mu_k)^T Sigma^+ (h - mu_k)`` with class means (training **labels**) and the tied
    covariance of the class-centred features; ``MD_0`` the same for one Gaussian ``N(mu_0,
    Sigma_0)`` fitted to all training features. Both maximum likelihood (/N) with pseudo-inverse
    precisions (scikit-learn ``EmpiricalCovariance``, as OpenOOD), float64 here.

    Inputs: features of the scored set; training features and labels. No hyper-parameters
    (OpenOOD: APS off; named ``rel_mds`` at its v1.5 tag), ``GRID = {}``.
    """

    name = "rmds"
    requires_labels = True
    GRID: dict = {}

    def fit_features(self, train_features: Tensor, train_logits: Tensor, train_labels: Optional[Tensor],
                     classifier: Optional[Classifier], **kw: Any) -> "RMDS":
        h, z = self._check_train(train_features, train_logits)
        y = self._need_labels(train_labels, h.shape[0])
        self.means_, self.precision_ = fit_gaussians(h, y, z.shape[1], self.name)
        zeros = torch.zeros(h.shape[0], dtype=torch.long)
        self.background_mean_, self.background_precision_ = fit_gaussians(h, zeros, 1, self.name)
        self.width_ = int(h.shape[1])
        self.fitted_ = True
        return self

    def _score_features(self, features: Tensor, logits: Tensor) -> Tensor:
        self._check_width(features)
        md = mahalanobis_distances(features, self.means_, self.precision_)
        md0 = mahalanobis_distances(features, self.background_mean_, self.background_precision_)[:, 0]
        return md0 - md.amin(dim=1)
