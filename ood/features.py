"""Multi-layer, globally average-pooled features of a timm backbone, for feature-based scores.

Stages come from timm's ``feature_info`` (module name per stage); forward hooks capture each
stage's output during one forward pass of ``model.features(x)`` (or of a plain timm
classifier's ``forward_features``), so the penultimate features come from the same pass.
Each stage output is averaged over its spatial positions (``(N, C, H, W) -> (N, C)``, tokens
``(N, L, D) -> (N, D)``), as Lee et al. 2018 do ("spatially mean-pooled" layer outputs).
Gradients flow, so input pre-processing can differentiate through the features.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Union

import torch.nn as nn
from torch import Tensor

PENULTIMATE = "penultimate"
Layers = Union[str, Sequence[Union[int, str]]]


def penultimate_features(model: nn.Module, x: Tensor) -> Tensor:
    """Penultimate features ``(N, D)``: ``model.features(x)``, or a timm classifier's pre-logits."""
    if callable(getattr(model, "features", None)):
        return model.features(x)
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        return model.forward_head(model.forward_features(x), pre_logits=True)
    raise TypeError(
        f"model ({type(model).__name__}) must provide features(x) or be a timm classifier with "
        "forward_features/forward_head to give penultimate features"
    )


def backbone_of(model: nn.Module) -> nn.Module:
    """The timm backbone: ``model.backbone`` if present, else ``model`` itself."""
    return getattr(model, "backbone", model)


def stage_modules(model: nn.Module) -> List[str]:
    """Module names of the backbone's stages, from timm's ``feature_info``."""
    backbone = backbone_of(model)
    info = getattr(backbone, "feature_info", None)
    if info is None:
        raise TypeError(
            f"backbone {type(backbone).__name__} has no timm feature_info; multi-layer features "
            "need a timm model (use layers='penultimate' otherwise)"
        )
    dicts = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
    return [d["module"] for d in dicts]


def pool(t: Tensor) -> Tensor:
    """Global average pool of one layer output to ``(N, D)``."""
    if t.dim() == 2:
        return t
    if t.dim() == 3:  # (N, tokens, D)
        return t.mean(dim=1)
    if t.dim() == 4:  # (N, C, H, W)
        return t.mean(dim=(2, 3))
    raise ValueError(f"cannot pool a layer output of shape {tuple(t.shape)}; expected 2-D to 4-D")


def resolve_layers(model: nn.Module, layers: Layers) -> List[Union[int, str]]:
    """Normalise ``layers`` to a list of stage indices and/or ``'penultimate'``.

    ``'penultimate'``: only the penultimate features. ``'all'``: every ``feature_info`` stage
    but the last, then the penultimate features (for a ResNet, whose head is a plain average
    pool, the pooled last stage *is* the penultimate layer -- the official Mahalanobis layer
    set). A list picks stage indices (negative allowed) and/or ``'penultimate'``.
    """
    if isinstance(layers, str):
        if layers == PENULTIMATE:
            return [PENULTIMATE]
        if layers == "all":
            n = len(stage_modules(model))
            return list(range(n - 1)) + [PENULTIMATE]
        raise ValueError(f"layers must be 'penultimate', 'all' or a list of stage indices, got {layers!r}")
    out: List[Union[int, str]] = []
    n = None
    for item in layers:
        if item == PENULTIMATE:
            out.append(PENULTIMATE)
            continue
        if isinstance(item, bool) or not isinstance(item, int):
            raise TypeError(f"layers entries must be stage indices (int) or 'penultimate', got {item!r}")
        n = len(stage_modules(model)) if n is None else n
        if not -n <= item < n:
            raise ValueError(f"layer index {item} out of range for a backbone with {n} stages")
        out.append(item % n)
    if not out:
        raise ValueError("layers must name at least one layer")
    return out


class FeatureExtractor:
    """Callable ``extractor(x) -> [ (N, D_l) for each layer ]`` over one forward pass.

    >>> ext = FeatureExtractor(model, layers="all")
    >>> feats = ext(x)          # list of pooled (N, D_l) tensors, in layer order
    """

    def __init__(self, model: nn.Module, layers: Layers = "all"):
        self.model = model
        self.layers = resolve_layers(model, layers)
        stage_idx = [i for i in self.layers if i != PENULTIMATE]
        self._names: Dict[int, str] = {}
        if stage_idx:
            names = stage_modules(model)
            self._names = {i: names[i] for i in stage_idx}

    def __call__(self, x: Tensor) -> List[Tensor]:
        captured: Dict[int, Tensor] = {}
        handles = []
        backbone = backbone_of(self.model)
        for i, name in self._names.items():
            module = backbone.get_submodule(name)

            def hook(_m, _inp, out, i=i):
                captured[i] = out[0] if isinstance(out, (tuple, list)) else out

            handles.append(module.register_forward_hook(hook))
        try:
            if PENULTIMATE in self.layers:
                pen = penultimate_features(self.model, x)
            else:
                pen = None
                if hasattr(backbone, "forward_features"):
                    backbone.forward_features(x)
                else:
                    backbone(x)
        finally:
            for h in handles:
                h.remove()
        out = []
        for layer in self.layers:
            if layer == PENULTIMATE:
                out.append(pen)
            else:
                if layer not in captured:
                    raise RuntimeError(f"stage {self._names[layer]!r} did not run in the forward pass")
                out.append(pool(captured[layer]))
        return out

    @property
    def names(self) -> List[str]:
        """Human-readable layer names (timm module names or 'penultimate')."""
        return [PENULTIMATE if l == PENULTIMATE else self._names[l] for l in self.layers]
