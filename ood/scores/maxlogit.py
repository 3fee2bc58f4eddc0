"""Maximum logit ``max_c logits_c``."""

from __future__ import annotations

from torch import Tensor

from ..registry import register_score
from .base import LogitScore


@register_score("maxlogit")
class MaxLogit(LogitScore):
    """Maximum logit ``max_c f_c(x)`` (higher = in-distribution).

    Hendrycks et al., "Scaling Out-of-Distribution Detection for Real-World Settings", ICML 2022
    (the MaxLogit baseline). Logits ``(N, C)`` -> scores ``(N,)``.
    """

    name = "maxlogit"

    def _score_logits(self, logits: Tensor) -> Tensor:
        return logits.amax(dim=1)
