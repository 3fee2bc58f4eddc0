"""i-ODIN: ODIN whose input pre-processing moves only the single most sensitive input entry."""

from __future__ import annotations

import torch
from torch import Tensor

from ..registry import register_score
from .base import gradient_sign
from .odin import ODIN

#: The ASCOOD repository's sweep of eps (``0.0014 * (1, ..., 7)``) at OpenOOD's temperatures.
IODIN_ASCOOD_GRID = {"temperature": (1.0, 10.0, 100.0, 1000.0), "eps": tuple(round(0.0014 * i, 4) for i in range(1, 8))}


def largest_entry_mask(grad: Tensor) -> Tensor:
    """1 at the entry of largest ``|grad|`` of each sample (over all of ``x_i``'s entries), 0 elsewhere."""
    flat = grad.abs().reshape(grad.shape[0], -1)
    mask = torch.zeros_like(flat).scatter_(1, flat.argmax(dim=1, keepdim=True), 1.0)
    return mask.view_as(grad)


@register_score("iodin")
class IODIN(ODIN):
    """i-ODIN score ``max_c softmax(f(x') / T)_c``, ``x'`` = ``x`` with one entry moved by ODIN's step.

    Regmi, ASCOOD paper, arXiv 2411.10794; OpenOOD ``iodin_postprocessor.py`` (the same logic as
    sudarshanregmi/ASCOOD ``openood/postprocessors/iodin_postprocessor.py``). As :class:`ODIN`
    (gradient of the cross-entropy of ``f(x) / T`` with the predicted class, sign as
    ``ge(grad, 0)``, divided by ``input_std`` when given, step that raises the softmax score),
    except that only the **single** entry (over the whole ``C x H x W`` input of a sample) with
    the largest ``|grad|`` is moved: ``x' = x - eps * sign(grad) / std`` there, ``x`` elsewhere.

    Defaults (OpenOOD ``configs/postprocessors/iodin.yml``): T = 1000, eps = 0.0014; ``GRID``:
    T in (1, 10, 100, 1000) x eps in (0.0014, 0.0028) (OpenOOD); the ASCOOD repository sweeps eps
    over 0.0014 ... 0.0098 (``IODIN_ASCOOD_GRID``). OpenOOD divides by its dataset's
    normalisation std (``[0.5] * 3`` when unknown); ``input_std=None`` steps in the model's
    input space. ``score_logits`` is the variant without pre-processing (temperature scaling).
    """

    name = "iodin"
    GRID = {"temperature": (1.0, 10.0, 100.0, 1000.0), "eps": (0.0014, 0.0028)}

    def step_direction(self, grad: Tensor) -> Tensor:
        """i-ODIN moves only the entry of largest ``|grad|`` per sample (ODIN's pre-processing otherwise)."""
        return -gradient_sign(grad) * largest_entry_mask(grad)
