"""KL matching: minus the smallest KL divergence from the softmax to a per-class template."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor

from ..registry import register_score
from .feature_base import Classifier, FeatureScore, ScoreNotApplicable

SOURCES = ("auto", "val", "train")


def kl_to_templates(p: Tensor, templates: Tensor) -> Tensor:
    """``KL(p_i || d_k)`` ``(N, K)`` in float64 (``scipy.stats.entropy(p, d)``: 0 log 0 = 0, p log(p/0) = inf)."""
    neg_entropy = torch.xlogy(p, p).sum(dim=1, keepdim=True)
    zero = templates <= 0
    log_d = torch.where(zero, torch.zeros_like(templates), torch.log(templates.clamp_min(1e-300)))
    cross = p @ log_d.T
    mass_on_zero = (p @ zero.to(p.dtype).T) > 0
    kl = neg_entropy - cross
    return torch.where(mass_on_zero, torch.full_like(kl, float("inf")), kl)


@register_score("kl_matching")
class KLMatching(FeatureScore):
    """KL-matching score ``s(x) = -min_k KL(p(x) || d_k)``, ``d_k`` = mean softmax of references predicted k.

    Hendrycks, Basart, Mazeika, Zou, Kwon, Mostajabi, Steinhardt & Song, "Scaling
    Out-of-Distribution Detection for Real-World Settings", ICML 2022. Inputs: logits of the
    scored set and of a reference ID set (no features, labels or head).

    Reference set: OpenOOD (``kl_matching_postprocessor.py``) uses **ID validation** data and a
    one-hot ``e_k`` for a class no reference sample is predicted as; ViM's ``benchmark.py`` uses the
    **training** softmax. ``source='auto'`` (default) takes ID validation when given, the training
    set otherwise; ``'val'`` / ``'train'`` force one; the one-hot fallback follows OpenOOD.
    No hyper-parameters (OpenOOD: APS off), ``GRID = {}``.
    """

    name = "kl_matching"
    uses_val = True
    GRID: dict = {}

    def __init__(self, source: str = "auto"):
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        self.source = source

    def fit_features(self, train_features: Tensor, train_logits: Tensor, train_labels: Optional[Tensor],
                     classifier: Optional[Classifier], val_features: Optional[Tensor] = None,
                     val_logits: Optional[Tensor] = None, **kw: Any) -> "KLMatching":
        _, z = self._check_train(train_features, train_logits)
        val = self._check_val(val_features, val_logits)
        if self.source == "val" and val is None:
            raise ScoreNotApplicable("kl_matching with source='val' needs ID validation data (val_loader, or "
                                     "val_features and val_logits)")
        use_val = val is not None and self.source in ("auto", "val")
        if use_val:
            z = val[1]
        p = torch.softmax(z, dim=1)
        c = p.shape[1]
        pred = p.argmax(dim=1)
        counts = torch.bincount(pred, minlength=c).double()
        sums = torch.zeros(c, c, dtype=torch.float64).index_add_(0, pred, p)
        templates = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], torch.eye(c, dtype=torch.float64))
        self.templates_, self.reference_, self.num_classes_ = templates, "val" if use_val else "train", c
        self.fitted_ = True
        return self

    def _score_features(self, features: Tensor, logits: Tensor) -> Tensor:
        if logits.shape[1] != self.num_classes_:
            raise ValueError(f"logits must have {self.num_classes_} classes, got shape {tuple(logits.shape)}")
        return -kl_to_templates(torch.softmax(logits, dim=1), self.templates_).amin(dim=1)

    def info(self) -> Dict[str, Any]:
        out = super().info()
        if getattr(self, "fitted_", False):
            out["reference_from"] = self.reference_
        return out
