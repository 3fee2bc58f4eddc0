"""Feature-based scores: one pass collects (penultimate features, logits, labels) per loader.

A :class:`FeatureScore` (``needs = 'features'``) is fitted from training tensors
(``fit_features(train_features, train_logits, train_labels, classifier)``) and scores tensors
(``score_features(features, logits) -> (N,)`` float64). ``fit(model, loader)`` and
``score(model, loader)`` run :func:`collect_features` once; :func:`ood.evaluate_ood` runs it once
per loader for every feature score and every logit score together.

``classifier`` (:class:`Classifier`) is what the head exposes: a function features -> logits
(``head.logits``) and, when the head is linear (``z = W h + b``, checked numerically on the
training pass), ``weight`` ``(C, D)`` and ``bias`` ``(C,)`` in float64. A score that needs
something the model does not expose raises :class:`ScoreNotApplicable` at fit; the evaluator
records the reason and reports the score as skipped.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from lossbench.validation import check_finite, check_float, check_target

from ..features import penultimate_features
from .base import OODScore, batches, check_logits, eval_mode, model_device, public_override


class ScoreNotApplicable(ValueError):
    """A score cannot run on this model or data (e.g. it needs a linear classifier the head lacks).

    The message states why; :func:`ood.evaluate_ood` catches it, reports the score as skipped with
    that reason, and goes on with the other scores.
    """


@dataclass
class FeatureData:
    """Penultimate features ``(N, D)``, logits ``(N, C)`` (both float32, CPU) and labels ``(N,)`` or None."""

    features: Tensor
    logits: Tensor
    labels: Optional[Tensor] = None

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def float64(self) -> "FeatureData":
        """The same data with float64 features and logits (converted once, then reused by every score)."""
        cached = self.__dict__.get("_float64")
        if cached is None:
            if self.features is None:
                cached = FeatureData(None, self.logits.double(), self.labels)
            else:
                cached = FeatureData(self.features.double(), self.logits.double(), self.labels)
            cached.__dict__["_float64"] = cached
            self.__dict__["_float64"] = cached
        return cached


@dataclass
class Classifier:
    """What the head exposes: ``logits_fn(features)`` and, for a linear head, ``weight``/``bias``.

    ``weight`` ``(C, D)`` and ``bias`` ``(C,)`` are float64 CPU tensors, or ``None`` when the
    logits are not ``W h + b`` (``reason`` then says why). Use :meth:`from_linear` for plain tensors.
    """

    logits_fn: Optional[Callable[[Tensor], Tensor]] = None
    weight: Optional[Tensor] = None
    bias: Optional[Tensor] = None
    source: str = ""
    reason: str = ""
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    @classmethod
    def from_linear(cls, weight: Tensor, bias: Optional[Tensor] = None, source: str = "linear") -> "Classifier":
        """A linear classifier ``z = h W^T + b`` from ``weight`` ``(C, D)`` and ``bias`` ``(C,)`` (zeros if None)."""
        check_float(weight, "weight", ndim=2)
        w = weight.detach().to("cpu", torch.float64)
        b = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.detach().to("cpu", torch.float64)
        if b.shape != (w.shape[0],):
            raise ValueError(f"bias must have shape ({w.shape[0]},) to match weight {tuple(w.shape)}, got {tuple(b.shape)}")
        return cls(logits_fn=None, weight=w, bias=b, source=source)

    @property
    def linear(self) -> bool:
        return self.weight is not None

    def logits(self, features: Tensor) -> Tensor:
        """Logits ``(N, C)`` float64 of (modified) features: ``h W^T + b`` if linear, else the head's function."""
        if self.linear:
            return features.double() @ self.weight.T + self.bias
        if self.logits_fn is None:
            raise ScoreNotApplicable(f"classifier {self.source or '?'} exposes no function from features to logits")
        with torch.no_grad():
            return self.logits_fn(features.to(self.device, self.dtype)).detach().to("cpu", torch.float64)


def _logits_fn(model: nn.Module) -> Tuple[Optional[Callable[[Tensor], Tensor]], str]:
    """The function features -> logits the model exposes (``model.head.logits``), else ``None``."""
    from ..adapter import as_adapted

    model = as_adapted(model)
    head = getattr(model, "head", None)
    if head is not None and callable(getattr(head, "logits", None)):
        return head.logits, type(head).__name__
    return None, type(model).__name__


def collect_features(model: nn.Module, loader: Iterable, what: str = "loader") -> FeatureData:
    """One no-grad pass over ``loader``: penultimate features, logits and labels (CPU, float32).

    Logits come from ``model.head.logits(features)`` when the model has a lossbench head (one
    forward per batch); otherwise from ``model(x)`` (the backbone then runs twice per batch).
    Under ``torchrun`` (an initialised process group of ``W > 1`` ranks) an ordered ``DataLoader``
    is shared out over the ranks and the results gathered, so that every rank gets the whole,
    single-process result (:mod:`ood.distributed`); every rank must then call this together.
    """
    from ..distributed import gather_feature_data, rank_share

    share = rank_share(loader)
    if share is None:
        part = _feature_pass(model, loader)
        if part is None:
            raise ValueError(f"{what}: the loader yielded no samples; expected a non-empty data set")
        return FeatureData(*part)
    part = _feature_pass(model, share)
    whole = gather_feature_data(*(part if part is not None else (None, None, None)))
    if whole is None:
        raise ValueError(f"{what}: the loader yielded no samples; expected a non-empty data set")
    return FeatureData(*whole)


def _feature_pass(model: nn.Module, loader: Iterable) -> Optional[Tuple[Tensor, Tensor, Optional[Tensor]]]:
    """(features, logits, labels or None) of one pass over ``loader``; ``None`` when it yields nothing."""
    fn, _ = _logits_fn(model)
    feats, logits, labels = [], [], []
    with eval_mode(model), torch.no_grad():
        for x, y in batches(loader, model_device(model)):
            h = penultimate_features(model, x)
            z = fn(h) if fn is not None else model(x)
            feats.append(h.detach().to("cpu", torch.float32))
            logits.append(z.detach().to("cpu", torch.float32))
            labels.append(y if isinstance(y, Tensor) else None)
    if not feats:
        return None
    lab = torch.cat([t.cpu() for t in labels]) if all(t is not None for t in labels) else None
    return torch.cat(feats), torch.cat(logits), lab


def _linear_candidate(model: nn.Module) -> Tuple[Optional[Tensor], Optional[Tensor], str]:
    """(weight, bias, where) the model seems to expose: ``head.fc``, ``head.weight``/``bias``, ``model.fc``."""
    from ..adapter import as_adapted

    model = as_adapted(model)
    head = getattr(model, "head", None)
    for owner, where in ((head, "head"), (model, "model")):
        if owner is None:
            continue
        fc = getattr(owner, "fc", None)
        if isinstance(fc, nn.Linear):
            return fc.weight, fc.bias, f"{type(owner).__name__}.fc"
        if owner is head and isinstance(getattr(owner, "weight", None), Tensor):
            return owner.weight, getattr(owner, "bias", None), f"{type(owner).__name__}.weight"
    if callable(getattr(model, "get_classifier", None)) and isinstance(model.get_classifier(), nn.Linear):
        fc = model.get_classifier()
        return fc.weight, fc.bias, f"{type(model).__name__}.get_classifier()"
    return None, None, ""


def resolve_classifier(model: nn.Module, train: FeatureData, check_rows: int = 2048) -> Classifier:
    """The model's :class:`Classifier`; linear only if ``W h + b`` reproduces the training logits.

    The candidate weights (``head.fc``, ``head.weight``/``head.bias``, ``model.fc`` or a timm
    ``get_classifier()``) are checked against the logits of the first ``check_rows`` training
    samples (relative error 1e-3), so a head whose logits are not linear in the features
    (WCDAS' wrapped Cauchy, a soft-capped CCE head) is never treated as linear.
    """
    fn, name = _logits_fn(model)
    param = next(iter(model.parameters()), None)
    place = {"device": model_device(model), "dtype": param.dtype if param is not None else torch.float32}
    w, b, where = _linear_candidate(model)
    if w is None:
        return Classifier(fn, source=name, reason=f"{name} exposes no linear weight (fc, weight/bias)", **place)
    h, z = train.features[:check_rows].double(), train.logits[:check_rows].double()
    w64 = w.detach().to("cpu", torch.float64)
    b64 = torch.zeros(w64.shape[0], dtype=torch.float64) if b is None else b.detach().to("cpu", torch.float64)
    if w64.dim() != 2 or w64.shape != (z.shape[1], h.shape[1]):
        return Classifier(fn, **place, source=name, reason=f"{where} has shape {tuple(w64.shape)}, not (classes, width)")
    err = float((h @ w64.T + b64 - z).abs().max())
    if err > 1e-3 * (1.0 + float(z.abs().max())):
        return Classifier(fn, **place, source=name, reason=f"the logits of {name} are not W h + b of {where} (max error {err:.3g})")
    return Classifier(fn, weight=w64, bias=b64, source=where, **place)


def energy(logits: Tensor) -> Tensor:
    """``logsumexp`` over classes (the negative free energy at T = 1), float64."""
    return torch.logsumexp(logits.double(), dim=1)


def l2_normalise(x: Tensor, eps: float = 1e-10) -> Tensor:
    """``x / (||x||_2 + eps)`` row-wise (knn-ood ``run_cifar.py``'s normaliser)."""
    return x / (x.norm(dim=1, keepdim=True) + eps)


def percentile(x: Tensor, q: float) -> float:
    """``numpy.percentile`` (linear interpolation) of all entries of ``x`` (no size limit, unlike torch.quantile)."""
    return float(np.percentile(x.detach().cpu().double().numpy().ravel(), q))


class FeatureScore(OODScore):
    """A score computed from (penultimate features, logits) and training statistics.

    Subclasses implement ``fit_features`` and ``_score_features``. Class attributes:
    ``requires_linear`` (needs ``classifier.weight``/``bias``), ``requires_classifier`` (needs
    some features -> logits function), ``requires_labels`` (training labels), ``uses_val`` (a
    statistic the protocol takes from ID validation data), ``GRID`` (the official search grid).
    """

    needs = "features"
    requires_linear: bool = False
    requires_classifier: bool = False
    requires_labels: bool = False
    uses_val: bool = False
    GRID: dict = {}

    def fit(self, model: nn.Module, loader: Iterable, val_loader: Optional[Iterable] = None) -> "FeatureScore":
        train = collect_features(model, loader, "fit loader")
        val = collect_features(model, val_loader, "val loader") if (val_loader is not None and self.uses_val) else None
        return self.fit_data(train, resolve_classifier(model, train), val)

    def fit_data(self, train: FeatureData, classifier: Optional[Classifier], val: Optional[FeatureData] = None) -> "FeatureScore":
        """``fit_features`` from collected :class:`FeatureData` (validation data only where ``uses_val``).

        The training feature width and number of classes are recorded (``width_``, ``num_classes_``),
        so scoring features or logits of another width is an error even for a score whose formula
        ignores them (a mismatched model).
        """
        kw: dict = {}
        train = train.float64()
        if self.uses_val and val is not None:
            val = val.float64()
            kw = {"val_features": val.features, "val_logits": val.logits}
        self.fit_features(train.features, train.logits, train.labels, classifier, **kw)
        self.width_, self.num_classes_ = int(train.features.shape[1]), int(train.logits.shape[1])
        return self

    @abc.abstractmethod
    def fit_features(self, train_features: Tensor, train_logits: Tensor, train_labels: Optional[Tensor],
                     classifier: Optional[Classifier], **kw: Any) -> "FeatureScore":
        """Fit the training statistics; returns ``self``."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        public_override(cls, FeatureScore, "score_features", "_score_features")

    @abc.abstractmethod
    def _score_features(self, features: Tensor, logits: Tensor) -> Tensor:
        """The formula on checked float64 tensors; returns ``(N,)``. A subclass may define it under the
        public name ``score_features`` instead (:func:`~ood.scores.base.public_override`)."""

    def score_features(self, features: Tensor, logits: Tensor) -> Tensor:
        """``(N,)`` float64 scores from features ``(N, D)`` and logits ``(N, C)``; higher = in-distribution."""
        self._check_fitted()
        features, logits = check_pair(features, logits)
        self._check_width(features)
        self._check_classes(logits)
        if features.shape[0] == 0:  # scoring no samples is well defined: an empty result
            return torch.empty(0, dtype=torch.float64)
        out = self._score_features(features, logits).detach().to("cpu", torch.float64)
        bad = int((~torch.isfinite(out)).sum())
        if bad:
            raise ScoreNotApplicable(f"{self.name} gave {bad} non-finite score(s) of {out.numel()} on this data")
        return out

    def score(self, model: nn.Module, loader: Iterable) -> Tensor:
        data = collect_features(model, loader, f"{self.name} score")
        return self.score_features(data.features, data.logits)

    # -- helpers for subclasses ------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not getattr(self, "fitted_", False):
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit or fit_features first")

    def _check_train(self, train_features: Tensor, train_logits: Tensor) -> Tuple[Tensor, Tensor]:
        """The training pair as float64 CPU tensors (:func:`check_pair`); records ``width_`` and ``num_classes_``.

        Every score's ``fit_features`` starts here. Zero training samples is a ``ValueError`` naming
        ``train_features``: a statistic of nothing is NaN, 0 or a default, and the score would
        silently be a constant (or fail later with an unrelated message).
        """
        h, z = check_pair(train_features, train_logits, "train")
        if h.shape[0] == 0:
            raise ValueError(f"{self.name}: train_features is empty (shape {tuple(h.shape)}); fitting needs "
                             "at least one in-distribution training sample")
        self.width_, self.num_classes_ = int(h.shape[1]), int(z.shape[1])
        return h, z

    def _check_val(self, val_features: Optional[Tensor], val_logits: Optional[Tensor]) -> Optional[Tuple[Tensor, Tensor]]:
        """ID validation data (for ``uses_val`` scores): ``None`` if neither is given, else the checked pair.

        Both or neither; at least one sample; the width and classes of the training pair (call
        :meth:`_check_train` first). Errors name ``val_features`` / ``val_logits``.
        """
        if val_features is None and val_logits is None:
            return None
        if val_features is None or val_logits is None:
            missing = "val_features" if val_features is None else "val_logits"
            raise ValueError(f"{self.name}: {missing} is None but the other validation tensor was given; "
                             "pass both val_features and val_logits, or neither")
        f, z = check_pair(val_features, val_logits, "val")
        if f.shape[0] == 0:
            raise ValueError(f"{self.name}: val_features is empty (shape {tuple(f.shape)}); pass at least one "
                             "ID validation sample, or no validation data")
        if f.shape[1] != self.width_:
            raise ValueError(f"val_features must have width {self.width_} (that of train_features), got shape {tuple(f.shape)}")
        if z.shape[1] != self.num_classes_:
            raise ValueError(f"val_logits must have {self.num_classes_} classes (those of train_logits), "
                             f"got shape {tuple(z.shape)}")
        return f, z

    def _need_classifier(self, classifier: Optional[Classifier], train_features: Optional[Tensor] = None) -> Classifier:
        """The classifier, or :class:`ScoreNotApplicable` naming what is missing.

        It must fit the training data (call :meth:`_check_train` first): a linear classifier's
        ``weight`` must be ``(num_classes_, width_)``; a non-linear one must map a training row
        (``train_features[:1]``, when given) to ``num_classes_`` logits. A classifier of another
        model is a ``ValueError`` naming ``classifier``.
        """
        if classifier is None or (not classifier.linear and classifier.logits_fn is None):
            raise ScoreNotApplicable(f"{self.name} needs the classifier (features -> logits); none was given")
        if self.requires_linear and not classifier.linear:
            raise ScoreNotApplicable(
                f"{self.name} needs a linear classifier z = W h + b; {classifier.reason or classifier.source}")
        d, c = getattr(self, "width_", None), getattr(self, "num_classes_", None)
        expected = f"({c}, {d}) = (classes of train_logits, width of train_features)"
        if classifier.linear:
            w, b = classifier.weight, classifier.bias
            if w.dim() != 2 or (c is not None and w.shape[0] != c) or (d is not None and w.shape[1] != d):
                raise ValueError(f"{self.name}: classifier weight has shape {tuple(w.shape)}, expected {expected}; "
                                 "is the classifier from another model?")
            if b is None or tuple(b.shape) != (w.shape[0],):
                raise ValueError(f"{self.name}: classifier bias must have shape ({w.shape[0]},), "
                                 f"got {None if b is None else tuple(b.shape)}")
        elif train_features is not None and c is not None and train_features.shape[0] > 0:
            out = classifier.logits(train_features[:1])
            if out.dim() != 2 or out.shape[1] != c:
                raise ValueError(f"{self.name}: the classifier maps a training row to logits of shape "
                                 f"{tuple(out.shape)}, expected (1, {c}) (the classes of train_logits); "
                                 "is the classifier from another model?")
        return classifier

    def _need_labels(self, labels: Optional[Tensor], n: int) -> Tensor:
        """Training labels ``(n,)`` in ``[0, num_classes_)`` (call :meth:`_check_train` first), as long CPU.

        An out-of-range label is a ``ValueError`` naming ``train_labels``: dropping those samples
        silently would fit class statistics on part of the data.
        """
        if labels is None:
            raise ScoreNotApplicable(f"{self.name} needs training labels; the fit loader gave none")
        if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.shape != (n,):
            raise ValueError(f"train_labels must be an integer tensor of shape ({n},), got {getattr(labels, 'shape', labels)}")
        c = getattr(self, "num_classes_", None)
        if c is not None:
            check_target(labels, c, n, "train_labels")
        return labels.long().cpu()

    def _check_width(self, features: Tensor) -> None:
        d = getattr(self, "width_", None)
        if d is not None and features.shape[1] != d:
            raise ValueError(f"features must have width {d} (the fitted width), got shape {tuple(features.shape)}")

    def _check_classes(self, logits: Tensor) -> None:
        c = getattr(self, "num_classes_", None)
        if c is not None and logits.shape[1] != c:
            raise ValueError(f"logits must have {c} classes (those of the fitted train_logits and classifier), "
                             f"got shape {tuple(logits.shape)}")


def check_pair(features: Tensor, logits: Tensor, name: str = "") -> Tuple[Tensor, Tensor]:
    """Features ``(N, D)`` and logits ``(N, C)``: float, finite, same N; returned as float64 CPU."""
    p = f"{name} " if name else ""
    check_float(features, p + "features", ndim=2)
    check_finite(features, p + "features")
    check_logits(logits, p + "logits")
    if features.shape[0] != logits.shape[0]:
        raise ValueError(f"{p}features ({features.shape[0]} rows) and {p}logits ({logits.shape[0]} rows) must have the same N")
    return features.detach().to("cpu", torch.float64), logits.detach().to("cpu", torch.float64)
