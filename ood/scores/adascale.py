"""AdaSCALE-A / AdaSCALE-L: SCALE with a per-sample percentile set by the feature shift under a small input perturbation.

Regmi, "AdaSCALE: Adaptive Scaling for OOD Detection", arXiv 2503.08023 (2025); OpenOOD
``postprocessors/adascale_postprocessor.py`` and ``networks/adascale_net.py::ada_scale`` (the same
files in the official repository sudarshanregmi/AdaSCALE). Per batch: one backward pass to the
input and two forward passes.

1. ``g = grad_x z_yhat(x)`` (the maximum logit, eval mode). ``x~ = x + eps * sign(g) * m``, where
   ``m`` marks the ``floor(o * numel(x_i))`` entries of each sample with the **smallest** ``|g|``
   (``torch.sign``: an entry with ``g = 0`` does not move). ``h~`` = penultimate features of ``x~``.
2. ``Q'(x) = sum_{j in top-k_a(h)} ReLU(h~_j) + lambda * sum_{j in top-k_b(h)} |h_j - h~_j|``,
   ``k_a = floor(D k1 / 100)``, ``k_b = floor(D k2 / 100)`` (at least 1 here; OpenOOD's floor
   gives an empty sum below ``D = 100 / k``), top-k of the *unperturbed* ``h``.
3. ``F`` = the right-continuous empirical CDF of ``Q'`` on ID data (at most ``num_samples``,
   a seeded random subset; OpenOOD's is unseeded); ``p(x) = p_min + (1 - F(Q'(x))) (p_max - p_min)``.
4. ``r = sum_j ReLU(h_j) / sum_{top-k(x)} ReLU(h_j)``, ``k(x) = D - round(D p(x) / 100)`` (half to
   even, as ``torch.round``). AdaSCALE-A: ``z = f(h e^r)``; AdaSCALE-L: ``z = f(h) r^2``;
   ``s = logsumexp(z)``. An all-zero ``ReLU(h)`` (0/0 in the official code) gets ``r = 1``.

Defaults (OpenOOD ``configs/postprocessors/adascale_a.yml`` / ``_l.yml``): ``percentile (75, 85)``,
``k1 5``, ``k2 1``, ``lambda 10``, ``o 0.05``, ``eps 0.5`` (hard-coded there; model-input units),
``num_samples 5000``, statistics from **ID validation** data (``source='auto'`` falls back to the
training loader when no validation loader is given). ``GRID``: OpenOOD's sweep, all 36 pairs
``p_min < p_max`` from ``(60, 65, ..., 95, 99)`` (its comment: ResNet-50 is best at (80, 85)).
The official README tunes ``p_max`` alone with ``p_min = 60``: ``ADASCALE_OFFICIAL_GRID``.

k1/k2: the official repository's late commit 61e23f8 ("swap k1<=>k2") swapped the two only where
the ECDF is fitted, not where test samples are scored, so its HEAD fits with (top-5 %, top-1 %)
and scores with (top-1 %, top-5 %). This module follows OpenOOD (and the published results, which
predate that commit): ``C_o`` over the top ``k1 = 5 %``, the shift over the top ``k2 = 1 %``, the
same at fit and at scoring.
"""

from __future__ import annotations

import numbers
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from lossbench.validation import check_finite, check_float, check_number, check_positive

from ..distributed import shared_pass
from ..features import penultimate_features
from ..registry import register_score
from .base import OODScore, batches, concat_scores, eval_mode, model_device
from .feature_base import Classifier, FeatureData, ScoreNotApplicable, _logits_fn, energy, resolve_classifier

_P = (60, 65, 70, 75, 80, 85, 90, 95, 99)
#: OpenOOD's APS sweep (``percentile_list``, the other settings fixed), in its order.
ADASCALE_GRID = {"percentile": tuple((a, b) for a in _P for b in _P if a < b)}
#: The official README's search: ``p_min = 60``, ``p_max`` in (65, ..., 99).
ADASCALE_OFFICIAL_GRID = {"percentile": tuple((60, b) for b in _P[1:])}
SOURCES = ("auto", "val", "train")


def features_logits_and_gradient(model: nn.Module, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Penultimate features, logits and ``grad_x`` of the sum over the batch of each sample's maximum logit."""
    fn, _ = _logits_fn(model)
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        h = penultimate_features(model, x)
        z = fn(h) if fn is not None else model(x)
        top = z.gather(1, z.detach().argmax(dim=1, keepdim=True)).sum()
        (grad,) = torch.autograd.grad(top, x)
    return h.detach(), z.detach(), grad


def perturb_least_sensitive(x: Tensor, grad: Tensor, eps: float, fraction: float) -> Tensor:
    """``x + eps * sign(grad) * m``, ``m`` = the ``floor(fraction * numel(x_i))`` entries of smallest ``|grad|``."""
    n = x[0].numel()
    m = int(n * fraction)
    if m == 0:
        return x
    idx = torch.topk(grad.abs().reshape(x.shape[0], n), m, dim=1, largest=False).indices
    mask = torch.zeros(x.shape[0], n, dtype=x.dtype, device=x.device).scatter_(1, idx, 1.0).view_as(x)
    return x + eps * torch.sign(grad) * mask


def top_count(width: int, percent: float) -> int:
    """``max(1, floor(width * percent / 100))`` (OpenOOD's ``int(feature_dim * k / 100)``, at least one)."""
    return max(1, int(width * percent / 100))


def shift_statistic(h: Tensor, h_tilde: Tensor, k1: float, k2: float, lmbda: float) -> Tensor:
    """``Q' = sum_{top-k_a(h)} ReLU(h~) + lambda sum_{top-k_b(h)} |h - h~|`` per row, ``(N,)``."""
    d = h.shape[1]
    ia = torch.topk(h, top_count(d, k1), dim=1).indices
    ib = torch.topk(h, top_count(d, k2), dim=1).indices
    return torch.relu(h_tilde).gather(1, ia).sum(dim=1) + lmbda * (h - h_tilde).abs().gather(1, ib).sum(dim=1)


def scaling_ratio(h: Tensor, percentiles: Tensor) -> Tensor:
    """``r = sum ReLU(h) / sum of its top k``, ``k = D - round(D p / 100)`` per row; 1 for an all-zero row."""
    d = h.shape[1]
    k = d - torch.round(d * percentiles.double() / 100.0).long()
    a = torch.relu(h.double())
    top = torch.sort(a, dim=1, descending=True).values.cumsum(dim=1).gather(1, (k - 1).clamp(0, d - 1)[:, None])[:, 0]
    total = a.sum(dim=1)
    return torch.where(top > 0, total / torch.where(top > 0, top, torch.ones_like(top)), torch.ones_like(top))


class _AdaSCALE(OODScore):
    """Shared fit/score of AdaSCALE-A and -L (see the module docstring)."""

    needs = "model"  # input gradient and a second forward pass
    GRID = ADASCALE_GRID
    _logit_scaling = False

    def __init__(self, percentile: Sequence[float] = (75.0, 85.0), k1: float = 5.0, k2: float = 1.0,
                 lmbda: float = 10.0, o: float = 0.05, eps: float = 0.5, num_samples: int = 5000,
                 source: str = "auto", seed: int = 0):
        if isinstance(percentile, (str, bytes)) or not hasattr(percentile, "__len__") or len(percentile) != 2:
            raise ValueError(f"percentile must be a pair (p_min, p_max), got {percentile!r}")
        p_min, p_max = (check_number(p, "percentile") for p in percentile)
        if not 0.0 < p_min <= p_max < 100.0:
            raise ValueError(f"percentile must satisfy 0 < p_min <= p_max < 100, got {tuple(percentile)}")
        for value, name in ((k1, "k1"), (k2, "k2")):
            v = check_number(value, name)
            if not 0.0 < v <= 100.0:
                raise ValueError(f"{name} must be a percentage in (0, 100], got {value}")
        check_positive(lmbda, "lmbda", allow_zero=True)
        if not 0.0 <= check_number(o, "o") <= 1.0:
            raise ValueError(f"o must be a fraction in [0, 1], got {o}")
        check_positive(eps, "eps", allow_zero=True)
        if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        self.percentile = (p_min, p_max)
        self.k1, self.k2, self.lmbda = float(k1), float(k2), float(lmbda)
        self.o, self.eps = float(o), float(eps)
        self.num_samples, self.source, self.seed = int(num_samples), source, int(seed)

    # ------------------------------------------------------------------ tensor level
    def fit_shift(self, features: Tensor, perturbed: Tensor) -> "_AdaSCALE":
        """Fit the ECDF of ``Q'`` from ID features ``(N, D)`` and those of the perturbed inputs."""
        h, ht = self._check_shift_pair(features, perturbed, fitted=False)
        if h.shape[0] == 0:
            raise ValueError("features is empty; the ECDF needs in-distribution samples")
        d = int(h.shape[1])
        if d - round(d * self.percentile[1] / 100.0) < 1:
            raise ScoreNotApplicable(f"{self.name}: p_max = {self.percentile[1]} prunes all {d} activations; "
                                     "expected D - round(D p_max / 100) >= 1")
        if h.shape[0] > self.num_samples:
            keep = torch.randperm(h.shape[0], generator=torch.Generator().manual_seed(self.seed))[:self.num_samples]
            h, ht = h[keep], ht[keep]
        self.reference_ = torch.sort(shift_statistic(h, ht, self.k1, self.k2, self.lmbda)).values
        self.width_ = d
        return self

    def percentiles(self, features: Tensor, perturbed: Tensor) -> Tensor:
        """``p(x) = p_min + (1 - F(Q'(x))) (p_max - p_min)`` per row, float64."""
        h, ht = self._check_shift_pair(features, perturbed, fitted=True)
        q = shift_statistic(h, ht, self.k1, self.k2, self.lmbda)
        ref = self.reference_
        cdf = torch.searchsorted(ref, q.contiguous(), right=True).double() / ref.numel()
        p_min, p_max = self.percentile
        return p_min + (1.0 - cdf) * (p_max - p_min)

    def score_shift(self, features: Tensor, perturbed: Tensor, classifier: Classifier) -> Tensor:
        """``(N,)`` scores from features, perturbed-input features and the classifier (features -> logits)."""
        h, _ = self._check_shift_pair(features, perturbed, fitted=True)
        r = scaling_ratio(h, self.percentiles(features, perturbed))
        if self._logit_scaling:
            logits = classifier.logits(h) * (r ** 2)[:, None]
        else:
            logits = classifier.logits(h * torch.exp(r)[:, None])
        return energy(logits)

    def _check_shift_pair(self, features: Tensor, perturbed: Tensor, fitted: bool) -> Tuple[Tensor, Tensor]:
        if fitted and getattr(self, "reference_", None) is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit or fit_shift first")
        for t, name in ((features, "features"), (perturbed, "perturbed")):
            check_float(t, name, ndim=2)
            check_finite(t, name)
        if features.shape != perturbed.shape:
            raise ValueError(f"features {tuple(features.shape)} and perturbed {tuple(perturbed.shape)} must have "
                             "the same shape")
        d = getattr(self, "width_", None)
        if fitted and features.shape[1] != d:
            raise ValueError(f"features must have width {d} (the fitted width), got shape {tuple(features.shape)}")
        return features.detach().to("cpu", torch.float64), perturbed.detach().to("cpu", torch.float64)

    # ------------------------------------------------------------------ model level
    def _passes(self, model: nn.Module, x: Tensor, i: int) -> Tuple[Tensor, Tensor, Tensor]:
        """(h, h~, logits) of one batch."""
        if not x.is_floating_point():
            raise TypeError(f"loader batch {i}: x must be a floating-point tensor (the input gradient), got {x.dtype}")
        h, z, grad = features_logits_and_gradient(model, x)
        with torch.no_grad():
            ht = penultimate_features(model, perturb_least_sensitive(x, grad, self.eps, self.o)).detach()
        return h, ht, z

    def _memo_key(self) -> Tuple[str, float, float]:
        """The :meth:`~ood.scores.base.OODScore.memoised` key of the passes: they depend on ``eps`` and
        ``o``, not on the searched percentiles, so AdaSCALE-A and -L and every grid point share them."""
        return ("adascale", self.eps, self.o)

    def _rows(self, model: nn.Module, data: Iterable, what: str) -> Tuple[Tensor, Tensor, Tensor]:
        """(h, h~, float32 logits) of every sample of ``data``, on the CPU."""
        hs, hts, zs = [], [], []
        with eval_mode(model):
            for i, (x, _) in enumerate(batches(data, model_device(model))):
                h, ht, z = self._passes(model, x, i)
                hs.append(h.cpu())
                hts.append(ht.cpu())
                zs.append(z.to("cpu", torch.float32))
        if not hs:
            raise ValueError(f"{what}: the loader yielded no samples; expected a non-empty data set")
        return torch.cat(hs), torch.cat(hts), torch.cat(zs)

    def fit(self, model: nn.Module, loader: Iterable, val_loader: Optional[Iterable] = None) -> "_AdaSCALE":
        """ECDF of ``Q'`` on ID validation data (``source``), and the model's classifier."""
        if self.source == "val" and val_loader is None:
            raise ScoreNotApplicable(f"{self.name} with source='val' needs ID validation data (val_loader)")
        use_val = val_loader is not None and self.source in ("auto", "val")
        data, what = (val_loader, "val loader") if use_val else (loader, "fit loader")
        h, ht, z = self.memoised(self._memo_key(), data, lambda: shared_pass(
            lambda part: self._rows(model, part, what), data, f"{self.name} fit"))
        classifier = resolve_classifier(model, FeatureData(h.float(), z))
        if not classifier.linear and classifier.logits_fn is None:
            raise ScoreNotApplicable(f"{self.name} needs the classifier (features -> logits); {classifier.reason}")
        self.fit_shift(h, ht)
        self.classifier_, self.source_ = classifier, "val" if use_val else "train"
        return self

    def score(self, model: nn.Module, loader: Iterable) -> Tensor:
        classifier = getattr(self, "classifier_", None)
        if classifier is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit(model, loader) first")
        h, ht, _ = self.memoised(self._memo_key(), loader, lambda: self._rows(model, loader, f"{self.name} score"))
        return concat_scores([self.score_shift(h, ht, classifier)], f"{self.name} score")

    def info(self) -> Dict[str, Any]:
        out = super().info()
        if getattr(self, "source_", None) is not None:
            out["fitted_on"] = self.source_
        return out


@register_score("adascale_a")
class AdaSCALEA(_AdaSCALE):
    """AdaSCALE-A score ``s(x) = logsumexp(f(h e^r))`` with the adaptive ratio ``r`` (module docstring).

    Inputs: the model (input gradient, a forward pass of the perturbed input), the head ``f``
    (any ``logits``; the paper's is linear), ID validation data for the ECDF.
    """

    name = "adascale_a"


@register_score("adascale_l")
class AdaSCALEL(_AdaSCALE):
    """AdaSCALE-L score ``s(x) = logsumexp(f(h) r^2)`` with the adaptive ratio ``r`` (module docstring).

    Inputs: the model (input gradient, a forward pass of the perturbed input), the head ``f``,
    ID validation data for the ECDF.
    """

    name = "adascale_l"
    _logit_scaling = True
