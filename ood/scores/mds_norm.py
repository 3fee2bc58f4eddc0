"""Mahalanobis++ and RMDS++: MDS / RMDS on l2-normalised penultimate features.

Mueller & Hein, "Mahalanobis++: Improving OOD Detection via Feature Normalization", ICML 2025
(arXiv 2505.18032); official code mueller-mp/maha-norm (``NINCO/detection_methods.py``:
``evaluate_Mahalanobis_norm``, ``evaluate_Relative_Mahalanobis_norm``; the authors' OpenOOD fork
names them ``mdsn`` / ``rmdsn``). Every feature, training and test alike, is divided by its l2
norm, ``h_hat = h / ||h||_2``; then plain MDS or RMDS runs on ``h_hat``: class means of the
normalised training features (training **labels**), one tied covariance of the class-centred
features (maximum likelihood, /N, pseudo-inverse precision: scikit-learn ``EmpiricalCovariance``),
and for RMDS++ a background Gaussian fitted to *all normalised* training features.

The official NINCO code computes in float64 (as here; the fork's OpenOOD postprocessors use
float32). One official path fits RMDS++'s background Gaussian to *unnormalised* features when the
class statistics come from its on-disk cache; the paper's method (and this module) always fits it
to ``h_hat``. No hyper-parameters (the fork's configs: APS off), ``GRID = {}``. The official
division has no guard: a zero feature vector (norm 0) is mapped to the zero vector here.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..registry import register_score
from .feature_base import Classifier, check_pair
from .mds import MDS
from .rmds import RMDS


def unit_rows(h: Tensor) -> Tensor:
    """``h / ||h||_2`` row-wise, exactly (no eps); a row of zeros stays zero."""
    norm = h.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, h / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(h))


class _UnitFeatures:
    """Mixin: normalise the features, at fit and at scoring, before the parent's formula."""

    def fit_features(self, train_features: Tensor, train_logits: Tensor, train_labels: Optional[Tensor],
                     classifier: Optional[Classifier], **kw: Any):
        h, z = check_pair(train_features, train_logits, "train")
        return super().fit_features(unit_rows(h), z, train_labels, classifier, **kw)

    def _score_features(self, features: Tensor, logits: Tensor) -> Tensor:
        self._check_width(features)
        return super()._score_features(unit_rows(features), logits)


@register_score("mds_norm")
class MDSNorm(_UnitFeatures, MDS):
    """Mahalanobis++ score ``s(x) = -min_k (h_hat - mu_k)^T Sigma^+ (h_hat - mu_k)``, ``h_hat = h / ||h||``.

    :class:`~ood.scores.mds.MDS` on l2-normalised features (see the module docstring for the
    paper, the official code and the fit). Inputs: features of the scored set; training features
    and labels. No hyper-parameters.
    """

    name = "mds_norm"


@register_score("rmds_norm")
class RMDSNorm(_UnitFeatures, RMDS):
    """RMDS++ score ``s(x) = MD_0(h_hat) - min_k MD_k(h_hat)``, ``h_hat = h / ||h||``.

    :class:`~ood.scores.rmds.RMDS` on l2-normalised features; the background Gaussian
    ``(mu_0, Sigma_0)`` is fitted to all normalised training features (see the module docstring).
    Inputs: features of the scored set; training features and labels. No hyper-parameters.
    """

    name = "rmds_norm"
