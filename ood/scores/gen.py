"""GEN: the generalised entropy of the top-M softmax probabilities, negated."""

from __future__ import annotations

import torch
from torch import Tensor

from lossbench.validation import check_positive

from ..registry import register_score
from .base import LogitScore


def log_one_minus_softmax(logits: Tensor) -> Tensor:
    """``log(1 - p_c)`` ``(N, C)`` without cancellation.

    ``log1p(-p)`` is exact where ``p <= 1/2``; only the top class can exceed 1/2, and there
    ``1 - p_top = sum_{c != top} p_c = exp(logsumexp(z_others) - logsumexp(z))``.
    """
    p = torch.softmax(logits, dim=1)
    out = torch.log1p(-p)
    top = logits.argmax(dim=1, keepdim=True)
    others = logits.scatter(1, top, float("-inf"))
    log_rest = torch.logsumexp(others, dim=1, keepdim=True) - torch.logsumexp(logits, dim=1, keepdim=True)
    return out.scatter(1, top, log_rest)


@register_score("gen")
class GEN(LogitScore):
    """GEN score ``s(x) = -sum_{j in top-M} p_j^gamma (1 - p_j)^gamma`` (higher = in-distribution).

    Liu, Lochman & Zach, "GEN: Pushing the Limits of Softmax-Based Out-of-Distribution
    Detection", CVPR 2023 (official code XixiLiu95/GEN ``benchmark.py::generalized_entropy``;
    OpenOOD ``gen_postprocessor.py``). ``p = softmax(z)``; top-M = the M largest probabilities.
    Inputs: logits only.

    Defaults: ``gamma = 0.1``, ``M = 100`` (official argparse and OpenOOD). Search grid (OpenOOD
    APS): ``gamma in (0.01, 0.1, 0.5, 1, 2, 5, 10)``, ``M in (10, 50, 100, 200, 500, 1000)``; with
    ``M >= C`` all classes are kept (for CIFAR-10 the M grid collapses).

    Deviation from the official code, on purpose: it computes ``1 - p`` directly, which rounds to
    0 for a near-one-hot softmax and drops the top-class term (z = [60, 0], gamma = 0.1 gives
    -e^-6 instead of -2 e^-6). Here ``(1 - p)`` and ``p`` are combined in log space
    (:func:`log_one_minus_softmax`), in float64.
    """

    name = "gen"
    GRID = {"gamma": (0.01, 0.1, 0.5, 1, 2, 5, 10), "M": (10, 50, 100, 200, 500, 1000)}

    def __init__(self, gamma: float = 0.1, M: int = 100):
        check_positive(float(gamma), "gamma")
        if isinstance(M, bool) or not isinstance(M, int) or M < 1:
            raise ValueError(f"M must be a positive int, got {M!r}")
        self.gamma, self.M = float(gamma), M

    def _score_logits(self, logits: Tensor) -> Tensor:
        log_p = torch.log_softmax(logits, dim=1)
        terms = torch.exp(self.gamma * (log_p + log_one_minus_softmax(logits)))
        m = min(self.M, logits.shape[1])
        idx = torch.topk(log_p, m, dim=1).indices
        return -terms.gather(1, idx).sum(dim=1)
