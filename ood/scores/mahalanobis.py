"""Mahalanobis score (Lee et al. 2018), the full method: multi-layer, pre-processed, combined.

One file on purpose: the Gaussians, the pre-processing, the FGSM validation samples and the three
protocols are one algorithm whose parts share the fitted state.

Lee, Lee, Lee & Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
Adversarial Attacks", NeurIPS 2018; official code pokaxpoka/deep_Mahalanobis_detector
(``lib_generation.py``: ``sample_estimator``, ``get_Mahalanobis_score``; ``regression_Mahalanobis.py``).

Per layer l (spatially mean-pooled stage output f_l):
  class means mu_c and one tied covariance Sigma of the class-centred features (scikit-learn
  ``EmpiricalCovariance``, i.e. divided by N, whose ``precision_`` is the pseudo-inverse ``pinvh``
  -- the official estimator; or ``LedoitWolf`` shrinkage), precision P;
  score_l(x) = max_c -(f_l - mu_c)^T P (f_l - mu_c)   (higher = in-distribution);
  pre-processing x' = x - eps * sign(grad_x min_c d_c(x)), the step that raises the score
  (paper eq. (4); sign taken as ``ge(grad, 0)``, optionally divided by the input std), eps from
  ``MAHALANOBIS_EPS_GRID`` (the official grid).
The per-layer scores of x' are combined by a logistic regression (ID = 1), whose decision
function is the final score.

Protocols (``protocol=``):
  'simple'      one layer (penultimate by default), fixed eps (default 0), no regression -- the
                cheap variant and what ``'auto'`` picks when ``fit`` gets no ``val_loader``.
  'validation'  (``'auto'`` with a ``val_loader``) all layers; eps and the regression are chosen
                on in-distribution validation data against FGSM adversarial samples made from
                it (the paper's "validation on adversarial samples", Sec. 3.1 / Table 2), plus an
                optional outlier loader ``ood_val_loader``.
  'paper'       the paper's own protocol, *optimistic*: eps and the regression are fitted on
                ``paper_fit_size`` samples of the test ID and test OOD set themselves (half to fit
                the regression, half to pick eps, as ``regression_Mahalanobis.py``), and metrics
                use the remaining samples; see :meth:`Mahalanobis.fit_paper_scores`.

Distances for all classes come from one batched computation in float64,
``d = f P f^T - 2 f P mu^T + mu P mu^T`` (no loop over classes), chunked over samples.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.covariance import EmpiricalCovariance, LedoitWolf
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor

from lossbench.validation import check_features, check_finite, check_float, check_positive, check_target

from ..distributed import shared_pass
from ..features import FeatureExtractor, Layers, backbone_of
from ..metrics import ood_metrics
from ..registry import register_score
from .base import (
    OODScore, batches, check_input_std, eval_mode, gradient_sign, input_step, model_device,
)

#: The official pre-processing magnitudes (pokaxpoka/deep_Mahalanobis_detector, OOD_Generate_Mahalanobis.py).
MAHALANOBIS_EPS_GRID = (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01)
COVARIANCES = ("auto", "empirical", "ledoit_wolf")
PROTOCOLS = ("auto", "simple", "validation", "paper")
#: 'auto' covariance uses Ledoit-Wolf below this many samples per feature dimension.
AUTO_SAMPLES_PER_DIM = 10

FeatureSet = Union[Tensor, Sequence[Tensor]]


def _as_layers(features: FeatureSet, name: str = "features") -> List[Tensor]:
    if isinstance(features, Tensor):
        return [features]
    if not isinstance(features, (list, tuple)) or not features:
        raise TypeError(f"{name} must be a tensor (N, D) or a non-empty list of per-layer tensors")
    return list(features)


def fit_class_gaussian(features: Tensor, labels: Tensor, num_classes: int,
                       covariance: str = "auto") -> Tuple[Tensor, Tensor, str]:
    """Class means ``(C, D)`` and the tied precision ``(D, D)`` (float64) of one layer.

    ``num_classes`` is required: inferring it from ``labels.max() + 1`` would silently drop a
    highest class with no samples (every class in ``[0, num_classes)`` must have samples).

    Means by one ``index_add``; covariance of the class-centred features by scikit-learn
    (``'empirical'``: ``EmpiricalCovariance``, pseudo-inverse precision, the official choice;
    ``'ledoit_wolf'``: ``LedoitWolf`` shrinkage; ``'auto'``: Ledoit-Wolf when N < 10 D, where
    the empirical estimate is poor -- singular for N <= D). Returns ``(means, precision, used)``.
    Zero within-class scatter (all centred features 0 up to 1e-12 of the largest feature, so
    precision 0 and a constant score) is a ``ValueError`` naming the cause.
    """
    check_float(features, "features", ndim=2)
    check_finite(features, "features")
    n, d = features.shape
    if n == 0:
        raise ValueError("features is empty; expected at least one sample per class")
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor of class indices, got {type(labels).__name__}")
    num_classes = _check_num_classes(num_classes)
    check_target(labels, num_classes, n, "labels")
    if n < num_classes:
        raise ValueError(f"fewer samples ({n}) than classes ({num_classes}); every class needs samples")
    f = features.detach().to("cpu", torch.float64)
    y = labels.detach().to("cpu", torch.long)
    counts = torch.bincount(y, minlength=num_classes)
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        raise ValueError(f"labels: classes {empty[:10]}{'...' if len(empty) > 10 else ''} have no samples; "
                         f"every class in [0, num_classes={num_classes}) needs at least one")
    means = torch.zeros(num_classes, d, dtype=torch.float64).index_add_(0, y, f) / counts[:, None]
    centred_t = f - means[y]
    scale = float(f.abs().max())
    if float(centred_t.abs().max()) <= 1e-12 * max(scale, 1e-300):
        raise ValueError(
            "features have zero within-class scatter (every sample equals its class mean, e.g. a "
            "collapsed or constant layer): the tied covariance is 0, its precision 0, and every input "
            "would get the same score; use another layer or check the model's features")
    centred = centred_t.numpy()
    used = covariance
    if covariance == "auto":
        used = "ledoit_wolf" if n < AUTO_SAMPLES_PER_DIM * d else "empirical"
    est = LedoitWolf() if used == "ledoit_wolf" else EmpiricalCovariance()
    est.fit(centred)
    precision = torch.from_numpy(np.asarray(est.precision_, dtype=np.float64))
    precision = 0.5 * (precision + precision.T)
    return means, precision, used


def _check_num_classes(num_classes: Optional[int]) -> int:
    """``num_classes`` is an int >= 1; ``None`` is an error (labels alone cannot reveal an absent highest class)."""
    if num_classes is None:
        raise ValueError("num_classes is required (the classifier's number of classes): inferring it from "
                         "labels.max() + 1 would silently drop a highest class that has no samples")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return num_classes


def mahalanobis_distances(features: Tensor, means: Tensor, precision: Tensor,
                          chunk: int = 8192) -> Tensor:
    """Squared distances ``(N, C)``: ``(f - mu_c)^T P (f - mu_c)`` for all classes at once.

    Float64, ``d = <fP, f> - 2 fP mu^T + <mu P, mu>``, clamped at 0; differentiable in
    ``features``; chunked over N to bound memory at ``chunk x max(C, D)``.
    """
    p = precision.to(features.device, torch.float64)
    mu = means.to(features.device, torch.float64)
    mu_p = mu @ p
    mu_term = (mu_p * mu).sum(dim=1)
    out = []
    for start in range(0, features.shape[0], chunk):
        f = features[start:start + chunk].to(torch.float64)
        fp = f @ p
        d = (fp * f).sum(dim=1, keepdim=True) - 2.0 * (f @ mu_p.T) + mu_term[None, :]
        out.append(d.clamp_min(0.0))
    if not out:
        return features.new_zeros((0, mu.shape[0]), dtype=torch.float64)
    return torch.cat(out)


@register_score("mahalanobis")
class Mahalanobis(OODScore):
    """Mahalanobis OOD score; see the module docstring for the formula and the protocols.

    Args:
        protocol: 'auto' | 'simple' | 'validation' | 'paper' (optimistic).
        layers: 'auto' (penultimate for 'simple' or a backbone without timm ``feature_info``,
            all stages otherwise), 'penultimate', 'all',
            or a list of timm ``feature_info`` stage indices and/or 'penultimate'.
        covariance: 'auto' (Ledoit-Wolf when samples < 10x width, else empirical), 'empirical'
            (official, pseudo-inverse), 'ledoit_wolf'.
        eps: pre-processing magnitude; 'auto' chooses from ``eps_grid`` (0 for 'simple').
        eps_grid: candidate magnitudes (official grid by default).
        fgsm_eps: FGSM magnitude of the adversarial validation samples (0.05, the official
            ``ADV_Samples.py`` FGSM setting).
        input_std: per-channel std of the model's input normalisation; steps are divided by it
            as in the official code (None: steps in the model's input space).
        paper_fit_size: samples per side used to fit the 'paper' protocol (1000, official).
        num_classes: classes of the Gaussians (default: ``model.head.num_classes`` or labels).
        seed: seed of the random split in the 'paper' protocol.
    Shapes: features ``(N, D_l)`` per layer -> scores ``(N,)`` float64.
    """

    name = "mahalanobis"

    def __init__(self, protocol: str = "auto", layers: Layers = "auto", covariance: str = "auto",
                 eps: Union[float, str] = "auto", eps_grid: Sequence[float] = MAHALANOBIS_EPS_GRID,
                 fgsm_eps: float = 0.05, input_std: Optional[Sequence[float]] = None,
                 paper_fit_size: int = 1000, num_classes: Optional[int] = None, seed: int = 0):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if covariance not in COVARIANCES:
            raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
        if not (eps == "auto" or (isinstance(eps, (int, float)) and not isinstance(eps, bool)
                                  and math.isfinite(eps) and eps >= 0)):
            raise ValueError(f"eps must be 'auto' or a finite float >= 0, got {eps!r}")
        grid = tuple(float(e) for e in eps_grid)
        if not grid or not all(math.isfinite(e) and e >= 0 for e in grid):
            raise ValueError(f"eps_grid must be a non-empty sequence of finite floats >= 0, got {eps_grid!r}")
        check_positive(fgsm_eps, "fgsm_eps")
        if int(paper_fit_size) < 4:
            raise ValueError(f"paper_fit_size must be >= 4, got {paper_fit_size}")
        check_input_std(input_std)
        self.protocol = protocol
        self.layers = layers
        self.covariance = covariance
        self.eps = eps if eps == "auto" else float(eps)
        self.eps_grid = grid
        self.fgsm_eps = float(fgsm_eps)
        self.input_std = None if input_std is None else tuple(float(v) for v in input_std)
        self.paper_fit_size = int(paper_fit_size)
        self.num_classes = num_classes
        self.seed = int(seed)
        self.means_: Optional[List[Tensor]] = None
        self.precisions_: Optional[List[Tensor]] = None
        self.covariances_: List[str] = []
        self.combiner_ = None
        self.eps_: float = 0.0 if eps == "auto" else float(eps)
        self.protocol_: Optional[str] = None
        self.layer_names_: List[str] = []
        self.selection_: Dict[float, Dict[str, float]] = {}

    # ------------------------------------------------------------------ tensor level
    def fit_features(self, features: FeatureSet, labels: Tensor,
                     num_classes: Optional[int] = None) -> "Mahalanobis":
        """Fit class means and tied precision for each layer's features ``(N, D_l)``.

        ``num_classes`` (or the constructor's) is required: every class in ``[0, num_classes)``
        must have training samples, and labels alone cannot show that the highest one is absent.
        """
        layers = _as_layers(features)
        n = layers[0].shape[0] if layers[0].dim() else 0
        for i, f in enumerate(layers):
            check_float(f, f"features[{i}]", ndim=2)
            if f.shape[0] != n:
                raise ValueError(f"features[{i}] has {f.shape[0]} samples, features[0] has {n}")
        num_classes = _check_num_classes(num_classes if num_classes is not None else self.num_classes)
        fitted = [fit_class_gaussian(f, labels, num_classes, self.covariance) for f in layers]
        self.means_ = [m for m, _, _ in fitted]
        self.precisions_ = [p for _, p, _ in fitted]
        self.covariances_ = [c for _, _, c in fitted]
        self.combiner_ = None
        if self.protocol_ is None:
            self.protocol_ = "simple" if len(layers) == 1 else self.protocol
        if not self.layer_names_ or len(self.layer_names_) != len(layers):
            self.layer_names_ = [f"layer{i}" for i in range(len(layers))]
        return self

    def _check_fitted(self) -> None:
        if self.means_ is None:
            raise NotFittedError("Mahalanobis score is not fitted; call fit(...) or fit_features(...) first")

    def layer_distances(self, features: Tensor, layer: int = 0) -> Tensor:
        """Squared distances ``(N, C)`` of one layer's features to every class mean."""
        self._check_fitted()
        check_features(features, self.means_[layer].shape[1], f"features[{layer}]")
        return mahalanobis_distances(features, self.means_[layer], self.precisions_[layer])

    def layer_scores_features(self, features: FeatureSet) -> Tensor:
        """Per-layer scores ``(N, L)``: ``-min_c d_c`` for each layer (float64)."""
        self._check_fitted()
        layers = _as_layers(features)
        if len(layers) != len(self.means_):
            raise ValueError(f"expected features of {len(self.means_)} layer(s), got {len(layers)}")
        cols = [-self.layer_distances(f, i).amin(dim=1) for i, f in enumerate(layers)]
        return torch.stack(cols, dim=1)

    def combine(self, layer_scores: Tensor) -> Tensor:
        """Final scores ``(N,)`` from per-layer scores ``(N, L)``: the regression, or the one layer."""
        self._check_fitted()
        if layer_scores.dim() != 2 or layer_scores.shape[1] != len(self.means_):
            raise ValueError(f"layer_scores must be (N, {len(self.means_)}), got {tuple(layer_scores.shape)}")
        if self.combiner_ is not None:
            z = self.combiner_.decision_function(layer_scores.detach().cpu().numpy())
            return torch.from_numpy(np.asarray(z, dtype=np.float64))
        if layer_scores.shape[1] == 1:
            return layer_scores[:, 0].detach().to("cpu", torch.float64)
        raise NotFittedError(
            f"{layer_scores.shape[1]} layer scores need a fitted regression (protocol 'validation' "
            "or 'paper', or fit_combiner); pass a single layer for the simple score")

    def score_features(self, features: FeatureSet) -> Tensor:
        """Scores ``(N,)`` of features (one tensor, or one per layer); higher = in-distribution."""
        return self.combine(self.layer_scores_features(features))

    def fit_combiner(self, id_layer_scores: Tensor, ood_layer_scores: Tensor) -> "Mahalanobis":
        """Fit the logistic regression (ID = 1) on per-layer scores ``(N_in, L)``, ``(N_out, L)``."""
        self.combiner_ = _fit_regression(id_layer_scores, ood_layer_scores)
        return self

    # ------------------------------------------------------------------ model level
    def _resolved_layers(self, model: nn.Module, protocol: str) -> Layers:
        if self.layers != "auto":
            return self.layers
        has_stages = getattr(backbone_of(model), "feature_info", None) is not None
        return "all" if protocol != "simple" and has_stages else "penultimate"

    def _num_classes(self, model: nn.Module) -> Optional[int]:
        """``num_classes``, else the lossbench head's, else a timm model's ``num_classes`` (None: unknown)."""
        if self.num_classes is not None:
            return int(self.num_classes)
        for owner in (getattr(model, "head", None), model):
            n = getattr(owner, "num_classes", None)
            if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                return n
        return None

    def fit(self, model: nn.Module, loader: Iterable, val_loader: Optional[Iterable] = None,
            ood_val_loader: Optional[Iterable] = None) -> "Mahalanobis":
        """Fit the Gaussians on ``loader`` (ID training data) and, per protocol, eps + regression."""
        protocol = self.protocol
        if protocol == "auto":
            protocol = "validation" if val_loader is not None else "simple"
        if protocol == "validation" and val_loader is None:
            raise ValueError("protocol 'validation' needs a val_loader of in-distribution data")
        self.extractor_ = FeatureExtractor(model, self._resolved_layers(model, protocol))
        if protocol == "simple" and len(self.extractor_.layers) != 1:
            raise ValueError("protocol 'simple' scores one layer; pass layers='penultimate' or one index")
        num_classes = self._num_classes(model)
        feats, labels, width = shared_pass(
            lambda part: _collect_features(model, self.extractor_, part, logits_width=num_classes is None), loader,
            "mahalanobis fit")
        self.protocol_ = protocol
        self.layer_names_ = self.extractor_.names
        self.fit_features(feats, labels, num_classes if num_classes is not None else width)
        self.protocol_ = protocol
        self.eps_ = 0.0 if self.eps == "auto" else float(self.eps)
        if protocol == "validation":
            grid = self.eps_grid if self.eps == "auto" else (float(self.eps),)
            id_grid = self.shared_layer_scores(model, val_loader, grid)
            ood_grid = shared_pass(lambda part: self.layer_scores(
                model, _FGSMLoader(model, part, self.fgsm_eps, self.input_std), grid), val_loader, "mahalanobis FGSM")
            if ood_val_loader is not None:
                extra = self.shared_layer_scores(model, ood_val_loader, grid)
                ood_grid = {e: torch.cat([ood_grid[e], extra[e]]) for e in grid}
            self.eps_, self.combiner_, self.selection_ = _select_eps(id_grid, ood_grid, id_grid, ood_grid)
        return self

    def shared_layer_scores(self, model: nn.Module, loader: Iterable,
                            eps_list: Sequence[float]) -> Dict[float, Tensor]:
        """:meth:`layer_scores`, shared out over the ranks under ``torchrun`` (per sample, so the
        single-process scores on every rank: :func:`ood.distributed.shared_pass`)."""
        return shared_pass(lambda part: self.layer_scores(model, part, eps_list), loader, "mahalanobis layer scores")

    def layer_scores(self, model: nn.Module, loader: Iterable,
                     eps_list: Sequence[float]) -> Dict[float, Tensor]:
        """``{eps: (N, L)}`` per-layer scores of pre-processed inputs, for each eps at once.

        Each layer gets its own gradient step (official code); the gradient is computed once per
        batch and reused for every eps. ``model`` must be the very object given to ``fit`` (the
        Gaussians are of its features): another model is a ``ValueError``, never a silent score of
        the fitted one.
        """
        self._check_fitted()
        extractor = getattr(self, "extractor_", None)
        if extractor is None:
            raise NotFittedError("fit(model, loader) first: the model-level score needs its layers")
        if model is not extractor.model:
            raise ValueError(
                f"model ({type(model).__name__}) is not the model this Mahalanobis score was fitted on: its "
                "class Gaussians describe that model's features; call fit(model, loader) with this model first")
        eps_list = [float(e) for e in eps_list]
        out: Dict[float, List[Tensor]] = {e: [] for e in eps_list}
        n_layers = len(self.means_)
        with eval_mode(model):
            for x, _ in batches(loader, model_device(model)):
                need_grad = any(e > 0 for e in eps_list)
                x = x.detach().clone().requires_grad_(need_grad)
                with torch.set_grad_enabled(need_grad):
                    feats = extractor(x)
                    dmin = [self.layer_distances(f, i).amin(dim=1) for i, f in enumerate(feats)]
                base = torch.stack([-d.detach() for d in dmin], dim=1).cpu()
                grads = []
                if need_grad:
                    for i, d in enumerate(dmin):
                        (g,) = torch.autograd.grad(d.sum(), x, retain_graph=i < n_layers - 1)
                        grads.append(gradient_sign(g))
                del feats, dmin
                for e in eps_list:
                    if e == 0:
                        out[e].append(base)
                        continue
                    cols = []
                    with torch.no_grad():
                        for i in range(n_layers):
                            x_hat = input_step(x.detach(), -grads[i], e, self.input_std)
                            f_i = extractor(x_hat)[i]
                            cols.append(-self.layer_distances(f_i, i).amin(dim=1))
                    out[e].append(torch.stack(cols, dim=1).cpu())
        if not out[eps_list[0]]:
            raise ValueError("mahalanobis: the loader yielded no samples; expected a non-empty data set")
        return {e: torch.cat(v) for e, v in out.items()}

    def score(self, model: nn.Module, loader: Iterable) -> Tensor:
        self._check_fitted()
        if self.protocol_ == "paper" and self.combiner_ is None:
            raise NotFittedError("protocol 'paper' fits on the test sets: use evaluate_ood or fit_paper_scores")
        return self.combine(self.layer_scores(model, loader, [self.eps_])[self.eps_])

    def paper_grid(self) -> Tuple[float, ...]:
        """The eps values the 'paper' protocol searches."""
        return self.eps_grid if self.eps == "auto" else (float(self.eps),)

    def info(self) -> Dict[str, Any]:
        """The protocol in force, the tapped layers, each layer's covariance estimator and eps."""
        eps = getattr(self, "paper_eps_", None) if self.protocol_ == "paper" else None
        return {"protocol": self.protocol_, "layers": list(self.layer_names_),
                "covariance": list(self.covariances_), "eps": self.eps_ if eps is None else dict(eps)}

    def result_note(self) -> Optional[str]:
        """Under protocol 'paper', a warning that its metrics are optimistic."""
        return "paper (optimistic: fitted on the test OOD set)" if self.protocol_ == "paper" else None

    def evaluate(self, model: nn.Module, id_loader: Iterable,
                 ood_loaders: Mapping[str, Iterable]) -> Dict[str, Tuple[Tensor, Tensor]]:
        """``{ood_set: (id_scores, ood_scores)}``; under protocol 'paper' one fit per OOD set.

        The 'paper' protocol (optimistic) fits the regression and eps on part of each test pair
        (:meth:`fit_paper_scores`) and scores the rest, so its ID scores differ per OOD set;
        ``info()['eps']`` then maps each OOD set to its eps.
        """
        if self.protocol_ != "paper":
            return super().evaluate(model, id_loader, ood_loaders)
        grid = self.paper_grid()
        id_grid = self.shared_layer_scores(model, id_loader, grid)
        out: Dict[str, Tuple[Tensor, Tensor]] = {}
        eps: Dict[str, float] = {}
        for name, loader in ood_loaders.items():
            out[name] = self.fit_paper_scores(id_grid, self.shared_layer_scores(model, loader, grid))
            eps[name] = self.eps_
        self.paper_eps_ = eps
        return out

    def fit_paper_scores(self, id_grid: Dict[float, Tensor],
                         ood_grid: Dict[float, Tensor]) -> Tuple[Tensor, Tensor]:
        """The paper's (optimistic) protocol on per-layer test scores ``{eps: (N, L)}``.

        A random ``paper_fit_size`` of each side (at most half of it) is the tuning block: the
        regression is fitted on its first half and eps picked by FPR@95 on its second half
        (``regression_Mahalanobis.py``); returns the final scores of the *remaining* ID and OOD
        samples, on which metrics must be computed.
        """
        eps0 = next(iter(id_grid))
        n_in, n_out = id_grid[eps0].shape[0], ood_grid[eps0].shape[0]
        block = min(self.paper_fit_size, n_in // 2, n_out // 2)
        if block < 4:
            raise ValueError(f"protocol 'paper' needs >= 8 ID and OOD test samples, got {n_in} and {n_out}")
        gen = torch.Generator().manual_seed(self.seed)
        p_in, p_out = torch.randperm(n_in, generator=gen), torch.randperm(n_out, generator=gen)
        h = block // 2
        fit_i, sel_i, rest_i = p_in[:h], p_in[h:block], p_in[block:]
        fit_o, sel_o, rest_o = p_out[:h], p_out[h:block], p_out[block:]
        self.eps_, self.combiner_, self.selection_ = _select_eps(
            {e: v[fit_i] for e, v in id_grid.items()}, {e: v[fit_o] for e, v in ood_grid.items()},
            {e: v[sel_i] for e, v in id_grid.items()}, {e: v[sel_o] for e, v in ood_grid.items()})
        e = self.eps_
        return self.combine(id_grid[e][rest_i]), self.combine(ood_grid[e][rest_o])


def _fit_regression(id_scores: Tensor, ood_scores: Tensor):
    for name, t in (("id_layer_scores", id_scores), ("ood_layer_scores", ood_scores)):
        check_float(t, name, ndim=2)
        check_finite(t, name)
        if t.shape[0] == 0:
            raise ValueError(f"{name} is empty; the regression needs ID and OOD samples")
    if id_scores.shape[1] != ood_scores.shape[1]:
        raise ValueError(f"id/ood layer scores differ in width: {id_scores.shape[1]} vs {ood_scores.shape[1]}")
    x = torch.cat([id_scores, ood_scores]).detach().cpu().double().numpy()
    y = np.r_[np.ones(id_scores.shape[0]), np.zeros(ood_scores.shape[0])]
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x, y)


def _select_eps(fit_id: Dict[float, Tensor], fit_ood: Dict[float, Tensor],
                sel_id: Dict[float, Tensor], sel_ood: Dict[float, Tensor]):
    """Fit a regression per eps, keep the eps with the lowest FPR@95 (then highest AUROC)."""
    best = None
    table: Dict[float, Dict[str, float]] = {}
    for e in fit_id:
        reg = _fit_regression(fit_id[e], fit_ood[e])
        s_in = reg.decision_function(sel_id[e].double().numpy())
        s_out = reg.decision_function(sel_ood[e].double().numpy())
        m = ood_metrics(s_in, s_out, "paper")
        table[e] = {"fpr95": m["fpr95"], "auroc": m["auroc"]}
        key = (m["fpr95"], -m["auroc"], e)
        if best is None or key < best[0]:
            best = (key, e, reg)
    return best[1], best[2], table


def _collect_features(model: nn.Module, extractor: FeatureExtractor, loader: Iterable,
                      logits_width: bool = False) -> Tuple[List[Tensor], Tensor, Optional[int]]:
    """Per-layer features, labels and (``logits_width``: from ``model(x)`` of the first batch) the classes."""
    feats: List[List[Tensor]] = []
    labels = []
    width: Optional[int] = None
    with eval_mode(model), torch.no_grad():
        for i, (x, y) in enumerate(batches(loader, model_device(model))):
            if y is None or not isinstance(y, Tensor):
                raise TypeError(f"fit loader must yield (x, y) with integer label tensors; batch {i} has y={y!r}")
            out = extractor(x)
            if logits_width and width is None:
                width = int(model(x).shape[-1])
            feats.append([f.detach().cpu() for f in out])
            labels.append(y.detach().cpu().reshape(-1))
    if not feats:
        raise ValueError("mahalanobis fit: the loader yielded no samples; expected in-distribution data")
    per_layer = [torch.cat([b[i] for b in feats]) for i in range(len(feats[0]))]
    return per_layer, torch.cat(labels), width


class _FGSMLoader:
    """Iterates ``(x_adv, y)``: FGSM ``x + eps * sign(grad_x CE(f(x), y))`` clamped to the batch range.

    As the official ``ADV_Samples.py`` FGSM (labels: the loader's, or the prediction if absent).
    """

    def __init__(self, model: nn.Module, loader: Iterable, eps: float, input_std=None):
        self.model, self.loader, self.eps, self.input_std = model, loader, eps, input_std

    def __iter__(self):
        device = model_device(self.model)
        for x, y in batches(self.loader, device):
            x = x.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                logits = self.model(x)
                target = y.to(device).long().reshape(-1) if isinstance(y, Tensor) else logits.argmax(1)
                (g,) = torch.autograd.grad(F.cross_entropy(logits, target, reduction="sum"), x)
            x_adv = input_step(x.detach(), gradient_sign(g), self.eps, self.input_std)
            lo, hi = float(x.detach().min()), float(x.detach().max())
            yield x_adv.clamp(lo, hi), y
