"""VRA: energy of penultimate activations rectified on both sides (low values cut, high values clipped)."""

from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import Tensor

from lossbench.validation import check_number

from ..registry import register_score
from .feature_base import Classifier, FeatureScore, ScoreNotApplicable, energy

SOURCES = ("auto", "val", "train")
RULES = ("clip", "vra")


def rectify(h: Tensor, low: Tensor, high: Tensor, rule: str = "clip", gamma: float = 0.0) -> Tensor:
    """The rectified features; ``low`` / ``high`` are scalars or ``(D,)`` per-dimension thresholds.

    ``'clip'`` (OpenOOD): ``min(max(h, low), high)``. ``'vra'`` (official code): 0 where
    ``h < low``, ``high`` where ``h > high``, ``h + gamma`` in between (boundaries included).
    """
    if rule == "clip":
        return torch.minimum(torch.maximum(h, low), high)
    kept = torch.where(h > high, high.expand_as(h), h + gamma)
    return torch.where(h < low, torch.zeros_like(h), kept)


@register_score("vra")
class VRA(FeatureScore):
    """VRA score ``s(x) = logsumexp(f(rect(h)))``: energy after rectifying ``h`` to ``[t_lo, t_hi]``.

    Xu, Lian, Liu & Tao, "VRA: Variational Rectified Activation for Out-of-distribution
    Detection", NeurIPS 2023 (arXiv 2302.11716); official code zeroQiaoba/VRA (``models/*.py``
    ``case == 'clip2'``, ``ood_eval.py``); OpenOOD ``vra_postprocessor.py`` (added 2025).
    ``f``: the head's logits (the paper's is ``W h + b``), energy at T = 1.

    The two sources differ; the default follows OpenOOD, the official form is an option:

    * ``rule='clip'`` (OpenOOD, default): ``rect(h) = clamp(h, t_lo, t_hi)``, values below
      ``t_lo`` are *raised* to it (a two-sided ReAct). ``rule='vra'`` (official): ``0`` below
      ``t_lo``, ``h + gamma`` on ``[t_lo, t_hi]``, ``t_hi`` above; ``gamma = 0`` is VRA,
      ``gamma > 0`` VRA+ (official ``--lamb``).
    * thresholds: ``t_lo`` / ``t_hi`` are the ``percentile_low`` / ``percentile_high``
      percentiles (``numpy.percentile``, linear) of *all entries* of the ID activations
      (OpenOOD; ``per_dimension=True``: one pair per feature dimension, the official CIFAR rule
      ``torch.quantile(train, q, dim=0)``), or absolute values ``low`` / ``high`` (the official
      ImageNet ResNet-50 settings: VRA ``0.5, 1.0``; VRA+ ``0.6, 0.7`` with ``gamma 0.3``).
    * data: ``source='auto'`` uses ID **validation** features when given (OpenOOD), else the
      training features (the official code's choice, ``'train'``); ``'val'`` / ``'train'`` force one.

    Official CIFAR-10 (DenseNet) settings: VRA ``q1 0.6, q2 0.9`` (``percentile_low=60,
    percentile_high=90, rule='vra', per_dimension=True, source='train'``); VRA+ ``0.6, 0.95,
    gamma 0.6``. VRA++ (an extra feature-norm penalty) is not implemented.

    Inputs: features of the scored set, the head, ID activations for the thresholds. Defaults
    (OpenOOD ``configs/postprocessors/vra.yml``): ``percentile_low = 10``, ``percentile_high = 90``;
    search grid: ``percentile_high in (85, 90, 95, 99)`` x ``percentile_low in (1, 5, 10, 15)``.
    """

    name = "vra"
    requires_classifier = True
    uses_val = True
    GRID = {"percentile_high": (85, 90, 95, 99), "percentile_low": (1, 5, 10, 15)}

    def __init__(self, percentile_low: float = 10.0, percentile_high: float = 90.0, rule: str = "clip",
                 gamma: float = 0.0, per_dimension: bool = False, source: str = "auto",
                 low: Optional[float] = None, high: Optional[float] = None):
        lo_p, hi_p = check_number(percentile_low, "percentile_low"), check_number(percentile_high, "percentile_high")
        if not 0.0 <= lo_p < hi_p <= 100.0:
            raise ValueError(f"percentile_low and percentile_high must satisfy 0 <= low < high <= 100, "
                             f"got {percentile_low} and {percentile_high}")
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        gamma = check_number(gamma, "gamma")
        if rule == "clip" and gamma != 0.0:
            raise ValueError(f"gamma (VRA+) applies to rule='vra' only; got gamma={gamma} with rule='clip'")
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        low = None if low is None else check_number(low, "low")
        high = None if high is None else check_number(high, "high")
        if low is not None and high is not None and low > high:
            raise ValueError(f"low must be <= high, got low={low}, high={high}")
        self.percentile_low, self.percentile_high = lo_p, hi_p
        self.rule, self.gamma = rule, gamma
        self.per_dimension = bool(per_dimension)
        self.source = source
        self.low, self.high = low, high

    def fit_features(self, train_features: Tensor, train_logits: Tensor, train_labels: Optional[Tensor],
                     classifier: Optional[Classifier], val_features: Optional[Tensor] = None,
                     val_logits: Optional[Tensor] = None, **kw: Any) -> "VRA":
        train_features, _ = self._check_train(train_features, train_logits)  # records width_, num_classes_
        self.classifier_ = self._need_classifier(classifier, train_features)
        val = self._check_val(val_features, val_logits)  # both or neither, non-empty, the training width
        if self.low is not None and self.high is not None:
            acts, self.threshold_source_ = None, "given"
        else:
            if self.source == "val" and val is None:
                raise ScoreNotApplicable("vra with source='val' needs ID validation data (val_loader, or "
                                         "val_features and val_logits)")
            use_val = val is not None and self.source in ("auto", "val")
            acts = val[0] if use_val else train_features
            self.threshold_source_ = "val" if use_val else "train"
        self.low_ = self._threshold(self.low, self.percentile_low, acts)
        self.high_ = self._threshold(self.high, self.percentile_high, acts)
        if bool((self.low_ > self.high_).any()):
            raise ScoreNotApplicable(f"vra: the lower threshold exceeds the upper one ({self.low_} > {self.high_})")
        self.fitted_ = True
        return self

    def _threshold(self, given: Optional[float], q: float, acts: Optional[Tensor]) -> Tensor:
        if given is not None:
            return torch.tensor(given, dtype=torch.float64)
        a = acts.detach().cpu().double().numpy()
        t = np.percentile(a, q, axis=0) if self.per_dimension else np.percentile(a.ravel(), q)
        return torch.as_tensor(np.asarray(t, dtype=np.float64))

    def _score_features(self, features: Tensor, logits: Tensor) -> Tensor:
        self._check_width(features)
        return energy(self.classifier_.logits(rectify(features, self.low_, self.high_, self.rule, self.gamma)))

    def info(self) -> Dict[str, Any]:
        out = super().info()
        if getattr(self, "fitted_", False):
            if self.low_.dim() == 0:
                out.update(threshold_low=float(self.low_), threshold_high=float(self.high_))
            else:
                out.update(threshold_low="per dimension", threshold_high="per dimension")
            out["threshold_from"] = self.threshold_source_
        return out
