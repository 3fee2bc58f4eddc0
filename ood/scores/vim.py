"""ViM: energy minus the scaled norm of the feature's residual off the principal subspace."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor

from ..registry import register_score
from .feature_base import Classifier, FeatureScore, ScoreNotApplicable, energy


def official_dim(width: int) -> int:
    """The official subspace dimension rule: 1000 if width >= 2048, 512 if width >= 768, else width // 2."""
    return 1000 if width >= 2048 else 512 if width >= 768 else width // 2


@register_score("vim")
class ViM(FeatureScore):
    """ViM score ``s(x) = logsumexp(z) - alpha ||(h - u) R||``.

    Wang, Li, Feng & Zhang, "ViM: Out-Of-Distribution with Virtual-logit Matching", CVPR 2022
    (official code haoqiwang/vim ``benchmark.py``; OpenOOD ``vim_postprocessor.py``).
    ``u = -pinv(W) b`` (the origin); ``P`` = the top-``dim`` eigenvectors of the second moment
    ``(X - u)^T (X - u) / N`` of the training features (``EmpiricalCovariance(assume_centered=True)``);
    ``R`` = the remaining eigenvectors; ``alpha = mean_train(max_c z_c) / mean_train(||(x - u) R||)``.

    Inputs: features and logits of the scored set, the linear classifier ``W``, ``b``, training
    features and logits (no labels). A head with no linear classifier raises
    :class:`ScoreNotApplicable`.

    Defaults: ``dim=None`` applies the official rule (:func:`official_dim`: 256 for a 512-wide
    ResNet-18, also OpenOOD's ``dim: 256``). OpenOOD's APS grid ``dim in (256, 1000)`` is ``GRID``;
    ``dim >= width`` leaves no residual (alpha = x/0, NaN scores in OpenOOD for 1000 on 512-d) and
    is an error here (:class:`ScoreNotApplicable` naming both numbers), as is training data whose
    residual eigenvalues are round-off (fewer independent samples than ``dim``: alpha would be noise). The eigen-decomposition is
    ``torch.linalg.eigh`` in float64 (OpenOOD's ``np.linalg.eig`` on a symmetric matrix can return
    complex round-off).
    """

    name = "vim"
    requires_linear = True
    GRID = {"dim": (256, 1000)}

    def __init__(self, dim: Optional[int] = None):
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise ValueError(f"dim must be a positive int or None (official rule), got {dim!r}")
        self.dim = dim

    def fit_features(self, train_features: Tensor, train_logits: Tensor, train_labels: Optional[Tensor],
                     classifier: Optional[Classifier], **kw: Any) -> "ViM":
        h, z = self._check_train(train_features, train_logits)
        clf = self._need_classifier(classifier)
        width = h.shape[1]
        d = official_dim(width) if self.dim is None else self.dim
        if d >= width:
            raise ScoreNotApplicable(f"vim: dim={d} must be smaller than the feature width {width} "
                                     "(no residual space is left otherwise)")
        if d < 1:
            raise ScoreNotApplicable(f"vim: the feature width {width} is too small for a principal subspace")
        self.origin_ = -(torch.linalg.pinv(clf.weight) @ clf.bias)
        x = h - self.origin_
        vals, vecs = torch.linalg.eigh(x.T @ x / x.shape[0])
        order = torch.argsort(vals, descending=True)
        self.residual_basis_ = vecs[:, order[d:]]
        v_train = (x @ self.residual_basis_).norm(dim=1)
        if float(vals[order[d:]].max()) <= width * torch.finfo(torch.float64).eps * float(vals.max()):
            raise ScoreNotApplicable(
                f"vim: the {x.shape[0]} training features have (numerically) no residual off the top-{d} "
                "subspace, so alpha would be round-off; it needs training data spanning more than dim directions")
        self.alpha_ = float(z.amax(dim=1).mean() / v_train.mean())
        self.dim_, self.width_ = d, width
        self.fitted_ = True
        return self

    def _score_features(self, features: Tensor, logits: Tensor) -> Tensor:
        self._check_width(features)
        residual = ((features - self.origin_) @ self.residual_basis_).norm(dim=1)
        return energy(logits) - self.alpha_ * residual

    def info(self) -> Dict[str, Any]:
        out = super().info()
        if getattr(self, "fitted_", False):
            out.update(dim_used=self.dim_, alpha=self.alpha_)
        return out
