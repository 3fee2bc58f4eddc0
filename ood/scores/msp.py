"""Maximum softmax probability (softmax confidence), optionally with a temperature."""

from __future__ import annotations

import torch
from torch import Tensor

from lossbench.validation import check_positive

from ..registry import register_score
from .base import LogitScore


@register_score("msp")
class MSP(LogitScore):
    """Maximum softmax probability: ``max_c softmax(logits / T)_c``.

    Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution Examples
    in Neural Networks", ICLR 2017 (T = 1 there, the default here; T > 1 is ODIN's scaling
    without its input pre-processing). Logits ``(N, C)`` -> scores ``(N,)`` in ``(1/C, 1]``.
    """

    name = "msp"

    def __init__(self, temperature: float = 1.0):
        check_positive(float(temperature), "temperature")
        self.temperature = float(temperature)

    def _score_logits(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits / self.temperature, dim=1).amax(dim=1)
