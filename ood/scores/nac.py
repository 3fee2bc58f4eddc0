"""NAC-UE: neuron activation coverage of sigmoid(output x KL-gradient) states, against a training histogram."""

from __future__ import annotations

import numbers
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from lossbench.validation import check_positive

from ..adapter import AdaptedClassifier, as_adapted
from ..features import penultimate_features
from ..registry import register_score
from ..stages import Stages, find_stages
from .base import OODScore, batches, concat_scores, eval_mode, model_device
from .feature_base import ScoreNotApplicable, _logits_fn
from .labelled_passes import balanced_subset, loader_labels, ordered_batches

#: The four NAC layers of a ResNet and where they are here: the pooled penultimate features and
#: the outputs of the last-but-one, -two and -three stages (:func:`ood.stages.find_stages`; layer3, layer2, layer1).
LAYERS: Dict[str, Any] = {"avgpool": "penultimate", "layer3": -2, "layer2": -3, "layer1": -4}
#: The official ImageNet ResNet-50 settings (``configs/postprocessors/nac/resnet/nac_imagenet.yml``).
NAC_IMAGENET_RESNET50 = {
    "avgpool_O": 10, "avgpool_M": 50, "avgpool_sig_alpha": 3000, "layer3_O": 500, "layer3_M": 50,
    "layer3_sig_alpha": 300, "layer2_O": 50, "layer2_M": 500, "layer2_sig_alpha": 0.01,
    "layer1_O": 5000, "layer1_M": 1000, "layer1_sig_alpha": 1,
}
#: The official ImageNet sweep (the same file), 144 points.
NAC_IMAGENET_GRID = {
    "avgpool_O": (10, 50, 500), "avgpool_M": (50, 500), "avgpool_sig_alpha": (3000,),
    "layer3_O": (100, 500), "layer3_M": (50, 500), "layer3_sig_alpha": (50, 100, 300),
    "layer2_O": (50, 500), "layer2_M": (500,), "layer2_sig_alpha": (0.01,),
    "layer1_O": (5000,), "layer1_M": (500, 1000), "layer1_sig_alpha": (0.1, 1),
}


def nac_edges(m: int) -> Tensor:
    """The official ``logspace(1e3, M)``: M bin edges on [0, 1.2], symmetric about 0.5 and densest near it."""
    x = np.linspace(1.0, np.sqrt(1e3), m // 2)
    left = np.log(x) / np.log(1e3)  # 0 ... 0.5
    edges = np.concatenate([left[:-1], (1.0 - left)[::-1]])
    edges[-1] += 1e-2
    return torch.from_numpy(np.append(edges, 1.2))


def bin_index(states: Tensor, edges: Tensor) -> Tensor:
    """Interval ``[e_i, e_{i+1})`` of each state; ``len(edges) - 1`` (no interval) outside ``[e_0, e_last)``."""
    idx = torch.bucketize(states.contiguous(), edges, right=True) - 1
    n = edges.numel() - 1
    return torch.where((idx >= 0) & (idx < n), idx, torch.full_like(idx, n))


def _timm_classifier(model: nn.Module) -> Optional[nn.Module]:
    """A timm classifier's final layer, ``get_classifier()``, whose input is ``forward_head(...,
    pre_logits=True)`` (the penultimate features); ``None`` for other models or without one."""
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        return None
    get = getattr(model, "get_classifier", None)
    clf = get() if callable(get) else None
    if isinstance(clf, nn.Module) and not isinstance(clf, nn.Identity):
        return clf
    return None


def _check_timm_logits(model: nn.Module, x: Tensor, z: Tensor) -> None:
    """Refuse a timm model whose ``get_classifier()`` of the penultimate features is not its output
    (a head that does more than its final layer, e.g. a distilled or pooled-twice head)."""
    with torch.no_grad():
        out = model(x)
    if out.shape != z.shape or not torch.allclose(out.float(), z.detach().float(), rtol=1e-3, atol=1e-3):
        raise ScoreNotApplicable(f"nac: {type(model).__name__}.get_classifier() of the penultimate features does not "
                                 "give the model's logits; pass a model with head.logits or adapt it "
                                 "(ood.adapt_classifier)")


def _sum_pool(t: Tensor, fmt: str) -> Tensor:
    """Sum over the spatial positions (NAC pools by a sum, not a mean) or over the tokens of a 3-D output."""
    if t.dim() == 2:
        return t
    if t.dim() == 3:
        return t.sum(dim=1)
    if t.dim() == 4:
        return t.sum(dim=(1, 2) if fmt == "NHWC" else (2, 3))
    raise ValueError(f"cannot pool a layer output of shape {tuple(t.shape)}; expected 2-D to 4-D")


@register_score("nac")
class NAC(OODScore):
    """NAC-UE score: the mean over layers and neurons of the training coverage of each neuron's state bin.

    Liu, Tian, Li, Ma & Wang, "Neuron Activation Coverage: Rethinking Out-of-distribution
    Detection and Generalization", ICLR 2024 (arXiv 2306.02879); official code BierOne/ood_coverage
    (``openood/postprocessors/nac_postprocessor.py``, ``nac/coverage.py`` ``KMNC``/``Estimator``,
    ``nac/instr_state.py::kl_grad``, ``nac/utils.py``).

    * State of neuron j of a layer with output ``a``: ``s_j = sigmoid(alpha * o_j * g_j)``, ``o`` = the
      output summed over its spatial positions (a **sum**, taken before the product), ``g`` = the
      same sum of ``dL/da`` with ``L = sum_batch sum_k -(1/K) log softmax_k(z)`` (KL(u || p) + log K).
    * Histogram: ``M`` edges :func:`nac_edges` (``M - 1`` intervals); ``n_ij`` = subset samples whose
      state j falls in interval i; coverage ``c_ij = min(n_ij / O, 1)``.
    * Score: per layer the mean over neurons of ``c_{bin(s_j), j}`` (0 outside the edges), then the
      mean over layers.

    Layers (``layers``): the official ResNet set ``avgpool`` (the pooled penultimate features),
    ``layer3``, ``layer2``, ``layer1``, here the penultimate features and the last-but-one, -two and
    -three stages of :func:`ood.stages.find_stages` (:data:`LAYERS`): timm ``feature_info`` stages, or
    the stage maps of a classifier adapted by :func:`ood.adapt_classifier` (torchvision's ResNet:
    exactly ``layer3``, ``layer2``, ``layer1``). Training data: a class-balanced subset of
    the fit loader, ``min(int(valid_num / K), smallest class)`` per class (``valid_num = 1000``:
    100 per class on CIFAR-10; official ``TrainSubset``, seeded here by ``seed``), correct and
    wrong predictions alike. Per-layer defaults ``(O, M, sig_alpha)``: the official CIFAR-10 ResNet-18
    file (``configs/postprocessors/nac/resnet/nac_cifar10.yml``): avgpool (50, 50, 100), layer3
    (100, 500, 1000), layer2 (5, 50, 0.001), layer1 (100, 500, 0.001); ImageNet ResNet-50:
    ``NAC_IMAGENET_RESNET50``. ``GRID``: the official CIFAR-10 sweep (256 points; the published runs
    use it, selecting by AUROC on the validation OOD set); ImageNet: ``NAC_IMAGENET_GRID``.

    States are computed in float64 (the official float32 sigmoid saturates to exactly 0 / 1 for
    large ``sig_alpha``). ``M`` must be even (the official edge construction). A model without the
    requested stages, or without a function from the penultimate features to the logits (a
    lossbench ``head.logits``, or an adapted classifier's final layer, whose input is then taken by a
    hook during the model's own forward pass), raises
    :class:`~ood.scores.feature_base.ScoreNotApplicable` naming what was found. One
    backward pass per batch; the fit reads the labels once, then forwards the subset.
    """

    name = "nac"
    needs = "model"  # gradients of the layer outputs
    GRID = {
        "avgpool_O": (10, 50), "avgpool_M": (50,), "avgpool_sig_alpha": (100,),
        "layer3_O": (100,), "layer3_M": (50, 500), "layer3_sig_alpha": (1000, 5000),
        "layer2_O": (5, 10), "layer2_M": (50,), "layer2_sig_alpha": (0.001,),
        "layer1_O": (5, 10, 50, 100), "layer1_M": (50, 500), "layer1_sig_alpha": (0.001, 0.005),
    }

    def __init__(self, layers: Sequence[str] = ("avgpool", "layer3", "layer2", "layer1"),
                 avgpool_O: float = 50, avgpool_M: int = 50, avgpool_sig_alpha: float = 100,
                 layer3_O: float = 100, layer3_M: int = 500, layer3_sig_alpha: float = 1000,
                 layer2_O: float = 5, layer2_M: int = 50, layer2_sig_alpha: float = 0.001,
                 layer1_O: float = 100, layer1_M: int = 500, layer1_sig_alpha: float = 0.001,
                 valid_num: int = 1000, seed: int = 1):
        if isinstance(layers, str) or not layers or any(l not in LAYERS for l in layers) or len(set(layers)) != len(layers):
            raise ValueError(f"layers must be a non-empty sequence of distinct names from {tuple(LAYERS)}, got {layers!r}")
        settings = {"avgpool": (avgpool_O, avgpool_M, avgpool_sig_alpha), "layer3": (layer3_O, layer3_M, layer3_sig_alpha),
                    "layer2": (layer2_O, layer2_M, layer2_sig_alpha), "layer1": (layer1_O, layer1_M, layer1_sig_alpha)}
        for ln, (o, m, a) in settings.items():
            check_positive(o, f"{ln}_O")
            check_positive(a, f"{ln}_sig_alpha")
            if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 4 or m % 2:
                raise ValueError(f"{ln}_M must be an even integer >= 4 (the number of bin edges), got {m!r}")
        if isinstance(valid_num, bool) or not isinstance(valid_num, numbers.Integral) or valid_num < 1:
            raise ValueError(f"valid_num must be an integer >= 1, got {valid_num!r}")
        self.layers = tuple(layers)
        self.avgpool_O, self.avgpool_M, self.avgpool_sig_alpha = float(avgpool_O), int(avgpool_M), float(avgpool_sig_alpha)
        self.layer3_O, self.layer3_M, self.layer3_sig_alpha = float(layer3_O), int(layer3_M), float(layer3_sig_alpha)
        self.layer2_O, self.layer2_M, self.layer2_sig_alpha = float(layer2_O), int(layer2_M), float(layer2_sig_alpha)
        self.layer1_O, self.layer1_M, self.layer1_sig_alpha = float(layer1_O), int(layer1_M), float(layer1_sig_alpha)
        self.valid_num, self.seed = int(valid_num), int(seed)

    def _setting(self, ln: str) -> Tuple[float, int, float]:
        return getattr(self, f"{ln}_O"), getattr(self, f"{ln}_M"), getattr(self, f"{ln}_sig_alpha")

    # ------------------------------------------------------------------ states
    def _logits_fn(self, model: nn.Module) -> Optional[Callable[[Tensor], Tensor]]:
        """Features -> logits: the lossbench ``head.logits``, else a timm classifier's ``get_classifier()``
        (checked in :meth:`states`), else an adapted classifier's final layer (:func:`ood.adapt_classifier`);
        None for none of them (the avgpool layer then raises)."""
        fn = _logits_fn(model)[0]
        if fn is None:
            fn = _timm_classifier(model)
        if fn is None:
            try:
                adapted = as_adapted(model)
            except (TypeError, ValueError):
                adapted = None
            if isinstance(adapted, AdaptedClassifier):
                fn = adapted.get_classifier()
        if fn is None and "avgpool" in self.layers:
            raise ScoreNotApplicable("nac: the avgpool layer needs the function from the penultimate features to "
                                     "the logits (model.head.logits, a timm classifier's get_classifier(), or the "
                                     f"final layer of a classifier ood.adapt_classifier adapts); "
                                     f"{type(model).__name__} has none")
        return fn

    def _resolve(self, model: nn.Module, x: Tensor) -> Tuple[Optional[Stages], Dict[str, Optional[str]]]:
        """The stages (None when only the penultimate features are used) and layer name -> stage module
        name (None for the penultimate features)."""
        out: Dict[str, Optional[str]] = {}
        stages = None
        for ln in self.layers:
            ref = LAYERS[ln]
            if ref == "penultimate":
                out[ln] = None
                continue
            if stages is None:
                try:
                    stages = find_stages(model, x, f"nac layer {ln}")
                except ScoreNotApplicable as err:
                    raise ScoreNotApplicable(f"{err} (layers=('avgpool',) uses the penultimate features alone)") from err
            if len(stages.names) < -ref:
                raise ScoreNotApplicable(f"nac layer {ln} is stage {ref} from the end; found {len(stages.names)} "
                                         f"stages {list(stages.names)} ({stages.source})")
            out[ln] = stages.names[ref]
        return stages, out

    def states(self, model: nn.Module, x: Tensor, check: bool = True) -> Dict[str, Tensor]:
        """``{layer: o * g}`` ``(N, D_l)`` float64 of one batch (before the sigmoid). ``check``: on a timm
        classifier, compare ``get_classifier()`` of the penultimate features with the model's output
        (one more forward; :meth:`_pass` does it on its first batch only)."""
        fn = self._logits_fn(model)
        stages, modules = self._resolve(model, x)
        captured: Dict[str, Tensor] = {}
        fired: Dict[str, int] = {}
        fmts: Dict[str, str] = {}
        handles = []
        for ln, name in modules.items():
            if name is None:
                continue
            fmts[ln] = stages.layouts[stages.names.index(name)]

            def hook(_m, _inp, out, ln=ln):
                fired[ln] = fired.get(ln, 0) + 1
                t = out[0] if isinstance(out, (tuple, list)) else out
                captured[ln] = t
                return t.clone() if not isinstance(out, (tuple, list)) else out  # later in-place ops hit the copy

            handles.append(stages.module(name).register_forward_hook(hook))
        # an adapted classifier's traced forward inlines its containers: run the model itself and take
        # the penultimate features as the input of its final layer
        via_head = stages is not None and stages.head is not None
        if via_head and "avgpool" in modules:
            def pre(_m, inp):
                fired["avgpool"] = fired.get("avgpool", 0) + 1
                captured["avgpool"] = inp[0]

            handles.append(stages.head.register_forward_pre_hook(pre))
        try:
            with torch.enable_grad():
                x = x.detach().requires_grad_(x.is_floating_point())  # a graph even with frozen parameters
                if via_head:
                    z = stages.forward(x)
                else:
                    h = penultimate_features(model, x)
                    if "avgpool" in modules:
                        captured["avgpool"] = h
                    z = fn(h) if fn is not None else model(x)
                    if check and fn is not None and fn is _timm_classifier(model):
                        _check_timm_logits(model, x, z)
                missing = [ln for ln in modules if ln not in captured]
                if missing:
                    raise ScoreNotApplicable(f"nac: layers {missing} did not run in the forward pass")
                twice = {ln: k for ln, k in fired.items() if k != 1}
                if twice:
                    raise ScoreNotApplicable(f"nac: layers {twice} ran more than once in one forward pass; expected once")
                loss = (-torch.log_softmax(z, dim=1)).mean(dim=1).sum()  # sum_batch sum_k -(1/K) log p_k
                names = list(modules)
                grads = torch.autograd.grad(loss, [captured[ln] for ln in names])
        finally:
            for hd in handles:
                hd.remove()
        return {ln: _sum_pool(captured[ln].detach().double(), fmts.get(ln, "NCHW"))
                * _sum_pool(g.detach().double(), fmts.get(ln, "NCHW")) for ln, g in zip(names, grads)}

    def _pass(self, model: nn.Module, loader: Iterable, subset: Optional[Tensor] = None,
              labels: Optional[List[Tensor]] = None) -> Dict[str, Tensor]:
        """``{layer: o * g}`` ``(N, D_l)`` of every sample of ``loader`` (of the ``subset`` rows only, for the
        fit, with the loader's ``labels`` per batch as read first), in loader order. The states do not
        depend on ``O``, ``M`` or ``sig_alpha``, the parameters searched, so an evaluation's search keeps
        them in :attr:`pass_memo` and runs the model once per loader, not once per grid point."""
        parts: Dict[str, List[Tensor]] = {}
        with eval_mode(model):
            if subset is None:
                for x, _ in batches(loader, model_device(model)):
                    for ln, st in self.states(model, x, check=not parts).items():
                        parts.setdefault(ln, []).append(st)
            else:
                offsets = np.cumsum([0] + [t.numel() for t in labels])
                for i, x, _ in ordered_batches(loader, labels, model_device(model), "nac fit"):
                    sel = subset[offsets[i]:offsets[i + 1]]
                    if sel.any():
                        for ln, st in self.states(model, x[sel.to(x.device)], check=not parts).items():
                            parts.setdefault(ln, []).append(st)
        if not parts:
            raise ValueError("nac: the loader yielded no samples; expected a non-empty data set")
        return {ln: torch.cat(p) for ln, p in parts.items()}

    # ------------------------------------------------------------------ fit / score
    def fit(self, model: nn.Module, loader: Iterable, val_loader: Optional[Iterable] = None) -> "NAC":
        """Coverage of each layer's states on a class-balanced subset of ``loader`` (training data)."""
        self._logits_fn(model)

        def fit_pass() -> Tuple[Dict[str, Tensor], Tensor]:
            labels = loader_labels(loader, "nac fit")
            subset = balanced_subset(torch.cat(labels), self.valid_num, self.seed)
            if not subset.any():
                raise ScoreNotApplicable(f"nac: valid_num = {self.valid_num} leaves no training sample per class "
                                         f"({torch.unique(torch.cat(labels)).numel()} classes)")
            return self._pass(model, loader, subset, labels), subset

        states, subset = self.memoised(("nac fit", self.layers, self.valid_num, self.seed), loader, fit_pass)
        self.edges_ = {ln: nac_edges(self._setting(ln)[1]) for ln in self.layers}
        self.coverage_ = {}
        for ln in self.layers:
            o, m, alpha = self._setting(ln)
            st = states[ln]
            idx = bin_index(torch.sigmoid(alpha * st), self.edges_[ln])
            counts = torch.zeros(m, st.shape[1], dtype=torch.float64).scatter_add_(0, idx, torch.ones_like(st))
            cov = torch.clamp(counts / o, max=1.0)  # row m - 1: outside the edges
            cov[m - 1] = 0.0  # a state outside the edges covers nothing
            self.coverage_[ln] = cov
        self.subset_ = subset
        self.widths_ = {ln: int(c.shape[1]) for ln, c in self.coverage_.items()}
        return self

    def score(self, model: nn.Module, loader: Iterable) -> Tensor:
        if getattr(self, "coverage_", None) is None:
            raise RuntimeError("NAC is not fitted; call fit(model, loader) first")
        states = self.memoised(("nac", self.layers), loader, lambda: self._pass(model, loader))
        total = None
        for ln, st in states.items():
            if st.shape[1] != self.widths_[ln]:
                raise ValueError(f"nac layer {ln} has width {st.shape[1]}, the fit saw {self.widths_[ln]}; "
                                 "score with the model it was fitted on")
            _, _, alpha = self._setting(ln)
            idx = bin_index(torch.sigmoid(alpha * st), self.edges_[ln])
            part = self.coverage_[ln].gather(0, idx).mean(dim=1)
            total = part if total is None else total + part
        return concat_scores([total / len(self.layers)], "nac score")
