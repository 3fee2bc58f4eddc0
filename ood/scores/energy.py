"""Negative free energy ``T * logsumexp(logits / T)``."""

from __future__ import annotations

import torch
from torch import Tensor

from lossbench.validation import check_positive

from ..registry import register_score
from .base import LogitScore


@register_score("energy")
class Energy(LogitScore):
    """Energy score ``-E(x) = T * logsumexp(logits / T)`` (higher = in-distribution).

    Liu, Wang, Owens & Li, "Energy-based Out-of-distribution Detection", NeurIPS 2020, eq. (1)
    and Sec. 3; T = 1 is the paper's default (official code wetliu/energy_ood, ``test.py --T``).
    Logits ``(N, C)`` -> scores ``(N,)``.
    """

    name = "energy"

    def __init__(self, temperature: float = 1.0):
        check_positive(float(temperature), "temperature")
        self.temperature = float(temperature)

    def _score_logits(self, logits: Tensor) -> Tensor:
        t = self.temperature
        return t * torch.logsumexp(logits / t, dim=1)
