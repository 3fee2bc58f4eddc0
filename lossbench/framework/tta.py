"""Test-time augmentation: the logits of a model averaged over flipped and translated views.

Levels (airbench's ``tta_level``, ``legacy/airbench94.py``, ``infer``):

- 0: the image alone;
- 1: the mean of the image and its horizontal mirror (weights 1/2, 1/2);
- 2: level 1 with weight 1/2, plus level 1 of the image translated by one pixel up-left and by one
  pixel down-right (reflect padding of 1, crops at offsets (0, 0) and (2, 2)), each with weight 1/4:
  six views in all.

Logits are averaged (not probabilities), as airbench does. OOD scores use the model without TTA
(OpenOOD's convention); :func:`tta_logits` is for accuracy and calibration figures.
"""

from __future__ import annotations

from typing import Callable, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

TTA_LEVELS = (0, 1, 2)


def tta_views(x: Tensor, level: int) -> List[Tuple[float, Tensor]]:
    """``(weight, view)`` pairs of batch ``x`` (N, C, H, W) for TTA ``level``; the weights sum to 1."""
    if level not in TTA_LEVELS:
        raise ValueError(f"tta level must be one of {TTA_LEVELS}, got {level!r}")
    if x.dim() != 4:
        raise ValueError(f"x must be a batch (N, C, H, W), got shape {tuple(x.shape)}")
    if level == 0:
        return [(1.0, x)]
    views = [(0.5, x), (0.5, x.flip(-1))]
    if level == 1:
        return views
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    out = [(wt / 2, v) for wt, v in views]
    for t in (padded[:, :, 0:h, 0:w], padded[:, :, 2:h + 2, 2:w + 2]):
        out += [(0.125, t), (0.125, t.flip(-1))]
    return out


@torch.no_grad()
def tta_logits(model: Callable[[Tensor], Tensor], x: Tensor, level: int) -> Tensor:
    """The weighted mean of ``model``'s logits over :func:`tta_views` (float32)."""
    total = None
    for weight, view in tta_views(x, level):
        out = model(view).float() * weight
        total = out if total is None else total + out
    return total
