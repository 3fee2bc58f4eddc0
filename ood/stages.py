"""The ordered stage modules of a classifier, for the scores that hook stage outputs (RankFeat, NAC).

Two sources, never a guess by attribute names:

* **timm** backbones (``backbone_of(model).feature_info``): the stages timm declares, in its order
  (for a ResNet ``act1, layer1 .. layer4``), in the layout the backbone declares (``output_fmt``).
* any other classifier :func:`ood.adapter.as_adapted` can adapt (torchvision's families, an
  ``nn.Sequential``; the final linear layer found in the traced graph, or user-given ``features=`` /
  ``head=``): the stages are read off one forward pass of one sample of the batch at its size and
  at twice its size (nearest-neighbour upsampling), with a forward hook on every module:

  1. a module's output is a *map* when it is a 4-D tensor whose size follows the input's: the dims
     that change between the two passes are the spatial ones (``(2, 3)``: ``NCHW``; ``(1, 2)``:
     ``NHWC``, e.g. torchvision's Swin); a map's *resolution* is its spatial size in the larger
     pass. Global pooling gives the same size at both and is therefore not a map.
  2. the *trunk* is the module holding every map: the model, or its only child holding maps, and so
     on down (torchvision's ``features``); its children are the *units*, except that a child along
     whose maps (call order) the resolution changes more than once is split into its children, and
     so on (a child changing it once is one downsampling block: a strided block, a transition);
  3. units in call order, grouped by resolution; a stage output is the **last unit of each
     resolution** (units must be called once, before the final layer).

  torchvision ResNet: ``relu`` (stem), ``layer1``, ``layer2``, ``layer3``, ``layer4`` -- the
  modules the official RankFeat / NAC code reads on ResNet. MobileNet / EfficientNet: the last
  ``features.i`` block of each resolution; VGG: the last ``features.i`` (ReLU, or the final
  max-pool) of each resolution; DenseNet: ``features.relu0``, ``features.denseblock{i}``,
  ``features.norm5``; ConvNeXt: the ``features.{2i+1}`` stages; Swin: ``features.{2i+1}`` (``NHWC``),
  the last one as the ``permute`` to ``NCHW`` after the final norm. Token models (ViT) have no maps
  after the patch embedding, and a model that does not run at twice the input size has no stages
  found: both raise :class:`~ood.scores.feature_base.ScoreNotApplicable` naming what was found. A
  stage already 1 x 1 at both sizes cannot be told from global pooling, so a third pass at four
  times the size checks that no further module's output grows there; if one does, that is an error
  naming it (evaluate at a larger input size), never stages silently shifted by one.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .adapter import AdaptedClassifier, as_adapted
from .features import backbone_layout, backbone_of
from .scores.feature_base import ScoreNotApplicable

__all__ = ["Stages", "find_stages"]


@dataclass(frozen=True)
class Stages:
    """Stage modules of a model, first to last.

    ``root.get_submodule(name)`` is the module whose forward output is stage ``name``; ``forward(x)``
    gives the logits and runs those modules (hooks on them fire once per call); ``head`` (traced and
    adapted models) is the final layer module, whose input is the penultimate features.
    """

    names: Tuple[str, ...]
    layouts: Tuple[str, ...]
    root: nn.Module
    forward: Callable[[Tensor], Tensor]
    head: Optional[nn.Module]
    source: str

    def module(self, name: str) -> nn.Module:
        return self.root.get_submodule(name)


_CACHE: "weakref.WeakKeyDictionary[nn.Module, Dict[tuple, Tuple[Tuple[str, ...], Tuple[str, ...]]]]" = (
    weakref.WeakKeyDictionary())


def find_stages(model: nn.Module, x: Tensor, what: str = "stages") -> Stages:
    """The stages of ``model`` (see the module docstring); ``x``: a batch of its inputs (one sample is
    used). ``what`` names the caller in errors. Raises ScoreNotApplicable when none can be found."""
    backbone = backbone_of(model)
    if getattr(backbone, "feature_info", None) is not None:
        info = backbone.feature_info
        dicts = info.get_dicts() if hasattr(info, "get_dicts") else list(info)
        fmt = backbone_layout(model)[0]
        names = tuple(d["module"] for d in dicts)
        return Stages(names, (fmt,) * len(names), backbone, model, None, "timm feature_info")
    try:
        adapted = as_adapted(model)
    except (TypeError, ValueError) as err:
        raise ScoreNotApplicable(f"{what}: {type(model).__name__} has no timm feature_info stages and cannot be "
                                 f"adapted ({err})") from err
    if not isinstance(adapted, AdaptedClassifier):
        raise ScoreNotApplicable(
            f"{what} needs stage modules: a timm backbone with feature_info stages, or a classifier that "
            f"ood.adapt_classifier traces (final nn.Linear layer); {type(backbone).__name__} has neither")
    root = adapted.model
    run = root if adapted.traced else adapted  # a traced adapter's own forward inlines the containers
    head = adapted.head
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ScoreNotApplicable(f"{what}: finding the stages of {type(root).__name__} needs image batches "
                                 f"(N, C, H, W), got {tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    key = (tuple(x.shape[1:]), x.dtype, x.device.type, run is root)
    per_model = _CACHE.setdefault(root, {})
    if key not in per_model:
        per_model[key] = _discover(root, run, head, x[:1], what)
    names, layouts = per_model[key]
    return Stages(names, layouts, root, run, head, f"{type(root).__name__} stages found by hooks")


def _probe(root: nn.Module, run: Callable[[Tensor], Tensor], head: nn.Module, x: Tensor
           ) -> Dict[str, List[Optional[Tuple[int, ...]]]]:
    """Output shapes (None: not a tensor) of every call of every submodule of ``root`` completed before
    ``head`` is called, in call order: ``{name: [shape, ...]}`` (dict order = first completion)."""
    calls: Dict[str, List[Optional[Tuple[int, ...]]]] = {}
    state = {"head": False}
    handles = []

    def on_head(_m, _inp):
        state["head"] = True

    for name, mod in root.named_modules():
        if not name or mod is head:
            continue

        def hook(_m, _inp, out, name=name):
            if not state["head"]:
                calls.setdefault(name, []).append(tuple(out.shape) if isinstance(out, Tensor) else None)

        handles.append(mod.register_forward_hook(hook))
    handles.append(head.register_forward_pre_hook(on_head))
    try:
        with torch.no_grad():
            run(x)
    finally:
        for h in handles:
            h.remove()
    if not state["head"]:
        raise ScoreNotApplicable(f"the forward pass of {type(root).__name__} never called its final layer "
                                 f"{type(head).__name__}")
    return calls


def _maps(root: nn.Module, small: Dict[str, List[Optional[Tuple[int, ...]]]],
          big: Dict[str, List[Optional[Tuple[int, ...]]]], what: str) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """Module -> (resolution in the larger pass, layout) of every output that is a map (module docstring)."""
    maps: Dict[str, Tuple[Tuple[int, ...], str]] = {}  # module -> (resolution, layout)
    for name, shapes in small.items():
        other = big.get(name)
        if len(shapes) != 1 or other is None or len(other) != 1 or shapes[0] is None or other[0] is None:
            continue
        a, b = shapes[0], other[0]
        if len(a) != 4 or len(b) != 4:
            continue
        changed = tuple(d for d in range(1, 4) if a[d] != b[d])
        if not changed:
            continue  # pooled: its size does not follow the input's
        if changed in ((2, 3), (3,)):
            maps[name] = ((b[2], b[3]), "NCHW")
        elif changed in ((1, 2), (1,)):
            maps[name] = ((b[1], b[2]), "NHWC")
        else:
            raise ScoreNotApplicable(f"{what}: {type(root).__name__}.{name} gives {a} at the input size and {b} at "
                                     "twice it; not an NCHW / NHWC map whose spatial size follows the input's")
    return maps


def _discover(root: nn.Module, run: Callable[[Tensor], Tensor], head: nn.Module, x1: Tensor, what: str
              ) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    small = _probe(root, run, head, x1)
    try:
        big = _probe(root, run, head, F.interpolate(x1, scale_factor=2.0, mode="nearest"))
    except ScoreNotApplicable:
        raise
    except Exception as err:  # e.g. a ViT's fixed image size
        tokens = [n for n, s in small.items() if len(s) == 1 and s[0] is not None and len(s[0]) == 3]
        why = (f"; its last modules give 3-D (token) outputs ({tokens[-1]}: {small[tokens[-1]][0]}): a token "
               "model has no stage maps after its patch embedding" if tokens else "")
        raise ScoreNotApplicable(
            f"{what}: {type(root).__name__} does not run at twice the input size ({type(err).__name__}: {err}), "
            f"which finding its stage maps needs{why}") from None
    maps = _maps(root, small, big, what)
    try:  # a stage already 1 x 1 at both sizes looks like global pooling: it must show up at 4x the size
        bigger = _probe(root, run, head, F.interpolate(x1, scale_factor=4.0, mode="nearest"))
    except ScoreNotApplicable:
        raise
    except Exception as err:
        raise ScoreNotApplicable(f"{what}: {type(root).__name__} does not run at 4x the input size ({type(err).__name__}: "
                                 f"{err}), which checking its stage maps needs") from None
    hidden = [n for n in _maps(root, big, bigger, what) if n not in maps]
    if hidden:
        raise ScoreNotApplicable(
            f"{what}: at {tuple(x1.shape[2:])} px the outputs of {hidden[:5]} are 1 x 1 at the input size and at twice "
            f"it, so their stages cannot be told from global pooling (they grow only at 4x); evaluate at a larger "
            f"input size")
    order = {name: i for i, name in enumerate(big)}

    def changes(prefix: str) -> int:
        """How often the resolution changes along the maps of ``prefix`` and its submodules (call order);
        -1 when there are none."""
        inside = sorted((n for n in maps if n == prefix or n.startswith(prefix + ".")), key=order.__getitem__)
        return sum(maps[a][0] != maps[b][0] for a, b in zip(inside, inside[1:])) if inside else -1

    units: List[str] = []

    def collect(module: nn.Module, prefix: str) -> None:
        for cname, child in module.named_children():
            full = f"{prefix}.{cname}" if prefix else cname
            if child is head:
                continue
            k = changes(full)
            if k < 0:
                continue
            if full in maps and k <= 1:  # one resolution, or a downsampling block (A ... A B ... B)
                units.append(full)
            else:
                collect(child, full)

    trunk, prefix = root, ""  # the container of the stages: go down while a single child holds every map
    while True:
        holders = [(c, f"{prefix}.{n}" if prefix else n) for n, c in trunk.named_children()
                   if c is not head and changes(f"{prefix}.{n}" if prefix else n) >= 0]
        if len(holders) != 1:
            break
        trunk, prefix = holders[0]
    collect(trunk, prefix)
    units.sort(key=lambda n: order[n])
    names: List[str] = []
    layouts: List[str] = []
    seen: List[Tuple[int, ...]] = []
    for n in units:
        res, fmt = maps[n]
        if seen and seen[-1] == res:
            names[-1], layouts[-1] = n, fmt
            continue
        if res in seen:
            raise ScoreNotApplicable(f"{what}: {type(root).__name__}'s maps return to resolution {res} at {n!r} after "
                                     f"{names}; its stages are not a chain")
        seen.append(res)
        names.append(n)
        layouts.append(fmt)
    if not names:
        raise ScoreNotApplicable(f"{what}: {type(root).__name__} has no module whose output is a 4-D map following "
                                 "the input's size before its final layer (a token or fully connected model)")
    return tuple(names), tuple(layouts)
