"""Multi-layer, globally average-pooled features of a timm backbone, for feature-based scores.

Stages come from timm's ``feature_info`` (module name and channel count per stage); forward
hooks capture each stage's output during one forward pass of ``model.features(x)`` (or of a
plain timm classifier's ``forward_features``), so the penultimate features come from the same
pass. Each stage output is averaged over its spatial positions, as Lee et al. 2018 do
("spatially mean-pooled" layer outputs), in the layout the backbone declares:

* ``(N, C, H, W)`` -- timm's default ``NCHW``: mean over (H, W);
* ``(N, H, W, C)`` -- backbones whose ``output_fmt`` is ``'NHWC'`` (Swin, MambaOut, Hiera,
  Sequencer, ...): mean over (H, W);
* ``(N, L, D)`` tokens (ViT-style): mean over the patch tokens, leaving out the backbone's
  ``num_prefix_tokens`` class/register tokens (the token analogue of the spatial mean; the
  class token alone is not used).

Every pooled width is checked against the stage's ``feature_info['num_chs']``; a mismatch (an
undeclared layout) is a ``ValueError``, never features of the wrong axis.
Gradients flow, so input pre-processing can differentiate through the features.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

import torch.nn as nn
from torch import Tensor

PENULTIMATE = "penultimate"
Layers = Union[str, Sequence[Union[int, str]]]


def penultimate_features(model: nn.Module, x: Tensor) -> Tensor:
    """Penultimate features ``(N, D)``: ``model.features(x)``, a timm classifier's pre-logits, or for any
    other classifier the input of its final linear layer (:func:`ood.adapter.as_adapted`)."""
    from .adapter import as_adapted

    model = as_adapted(model)
    if callable(getattr(model, "features", None)) and not isinstance(model.features, nn.Module):
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
    return [d["module"] for d in stage_info(model)]


def stage_info(model: nn.Module) -> List[dict]:
    """timm's ``feature_info`` dicts of the backbone's stages (``module``, ``num_chs``, ...)."""
    backbone = backbone_of(model)
    info = getattr(backbone, "feature_info", None)
    if info is None:
        raise TypeError(
            f"backbone {type(backbone).__name__} has no timm feature_info; multi-layer features "
            "need a timm model (use layers='penultimate' otherwise)"
        )
    return info.get_dicts() if hasattr(info, "get_dicts") else list(info)


def pool(t: Tensor, fmt: str = "NCHW", prefix_tokens: int = 0) -> Tensor:
    """Global average pool of one layer output to ``(N, D)``.

    2-D: as is; 3-D ``(N, L, D)`` tokens: mean over tokens ``prefix_tokens:`` (all tokens when
    no patch token is left); 4-D: mean over (H, W) of ``(N, C, H, W)`` (``fmt='NCHW'``) or
    ``(N, H, W, C)`` (``fmt='NHWC'``).
    """
    if fmt not in ("NCHW", "NHWC"):
        raise ValueError(f"fmt must be 'NCHW' or 'NHWC', got {fmt!r}")
    if t.dim() == 2:
        return t
    if t.dim() == 3:  # (N, tokens, D)
        return (t[:, prefix_tokens:] if t.shape[1] > prefix_tokens else t).mean(dim=1)
    if t.dim() == 4:
        return t.mean(dim=(1, 2) if fmt == "NHWC" else (2, 3))
    raise ValueError(f"cannot pool a layer output of shape {tuple(t.shape)}; expected 2-D to 4-D")


def backbone_layout(model: nn.Module) -> tuple:
    """``(fmt, prefix_tokens)`` the backbone declares: timm's ``output_fmt`` and ``num_prefix_tokens``."""
    backbone = backbone_of(model)
    fmt = str(getattr(backbone, "output_fmt", "NCHW") or "NCHW")
    fmt = getattr(fmt, "value", fmt)
    prefix = getattr(backbone, "num_prefix_tokens", 0)
    return ("NHWC" if "NHWC" in fmt else "NCHW"), int(prefix) if isinstance(prefix, int) else 0


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
        self._widths: Dict[int, Optional[int]] = {}
        self._fmt, self._prefix = backbone_layout(model)
        if stage_idx:
            info = stage_info(model)
            self._names = {i: info[i]["module"] for i in stage_idx}
            self._widths = {i: info[i].get("num_chs") for i in stage_idx}

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
                out.append(self._pool(layer, captured[layer]))
        return out

    def _pool(self, layer: int, t: Tensor) -> Tensor:
        pooled = pool(t, self._fmt, self._prefix)
        want = self._widths.get(layer)
        if want is not None and pooled.shape[1] != want:
            raise ValueError(
                f"stage {self._names[layer]!r}: pooled width {pooled.shape[1]} (output shape {tuple(t.shape)}, "
                f"layout {self._fmt}) differs from the backbone's feature_info num_chs={want}; the backbone's "
                "output layout is not the one it declares (output_fmt)")
        return pooled

    @property
    def names(self) -> List[str]:
        """Human-readable layer names (timm module names or 'penultimate')."""
        return [PENULTIMATE if l == PENULTIMATE else self._names[l] for l in self.layers]
