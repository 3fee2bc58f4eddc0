"""NNGuide: energy times the mean similarity to the nearest energy-scaled training features."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from ..registry import register_score
from .feature_base import Classifier, FeatureScore, ScoreNotApplicable, energy, l2_normalise

BANKS = ("random", "first")


def mean_top_k_similarity(queries: Tensor, bank: Tensor, k: int, chunk: int = 1024) -> Tensor:
    """Mean of the ``k`` largest inner products ``<q, bank_i>`` per query (exact, float64): ``(N,)``."""
    out = []
    for start in range(0, queries.shape[0], chunk):
        out.append(torch.topk(queries[start:start + chunk] @ bank.T, k, dim=1).values.mean(dim=1))
    return torch.cat(out)


@register_score("nnguide")
class NNGuide(FeatureScore):
    """NNGuide score ``s(x) = logsumexp(z) * mean_{top-K} <h^, h^_i logsumexp(z_i)>`` over a bank.

    Park, Jung & Teoh, "Nearest Neighbor Guidance for Out-of-Distribution Detection", ICCV 2023
    (official code roomo7time/nnguide ``ood_detectors/nnguide.py``; OpenOOD
    ``nnguide_postprocessor.py``). ``h^ = h / (||h|| + 1e-10)``; the bank holds normalised
    training features scaled by their energy, the guidance is the mean of the K largest inner
    products (faiss ``IndexFlatIP`` there; exact torch here).

    Inputs: features and logits of the scored set; training features and logits.
    Defaults follow OpenOOD (the benchmark we compare with): ``K = 100``, ``alpha = 0.01`` (the
    bank's fraction of the training set); the official ImageNet config is ``knn_k = 10`` with a
    1 % bank. The bank: ``bank='random'`` (default) a random ``alpha`` fraction (official
    ``bankset_ratio``, drawn with ``seed``); ``'first'`` the first ``alpha N`` samples, which is
    what OpenOOD's early stop of its unshuffled loader takes. OpenOOD: APS off, ``GRID = {}``.
    """

    name = "nnguide"
    GRID: dict = {}

    def __init__(self, K: int = 100, alpha: float = 0.01, bank: str = "random", seed: int = 0):
        if isinstance(K, bool) or not isinstance(K, int) or K < 1:
            raise ValueError(f"K must be a positive int, got {K!r}")
        if not 0.0 < float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if bank not in BANKS:
            raise ValueError(f"bank must be one of {BANKS}, got {bank!r}")
        self.K, self.alpha, self.bank, self.seed = K, float(alpha), bank, int(seed)

    def fit_features(self, train_features: Tensor, train_logits: Tensor, train_labels: Optional[Tensor],
                     classifier: Optional[Classifier], **kw: Any) -> "NNGuide":
        h, z = self._check_train(train_features, train_logits)
        n = max(1, int(round(self.alpha * h.shape[0])))
        if self.bank == "random":
            idx = torch.randperm(h.shape[0], generator=torch.Generator().manual_seed(self.seed))[:n]
        else:
            idx = torch.arange(n)
        if self.K > n:
            raise ScoreNotApplicable(f"nnguide: K={self.K} exceeds the bank of {n} samples "
                                     f"(alpha={self.alpha} of {h.shape[0]} training samples)")
        self.bank_ = l2_normalise(h[idx]) * energy(z[idx])[:, None]
        self.width_ = int(h.shape[1])
        self.fitted_ = True
        return self

    def _score_features(self, features: Tensor, logits: Tensor) -> Tensor:
        self._check_width(features)
        return energy(logits) * mean_top_k_similarity(l2_normalise(features), self.bank_, self.K)
