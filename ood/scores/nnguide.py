"""NNGuide: energy times the mean similarity to the nearest energy-scaled training features."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import Tensor

from ..registry import register_score
from .feature_base import Classifier, FeatureScore, ScoreNotApplicable, energy, l2_normalise

BANKS = ("random", "first", "openood")
#: OpenOOD v1.5's ``Evaluator`` builds every loader, the training one included, with ``batch_size=200``.
OPENOOD_BATCH_SIZE = 200


def openood_bank_size(n_train: int, alpha: float, batch_size: int) -> int:
    """Samples in OpenOOD's NNGuide bank: whole loader batches, the first ``m`` with ``m B > int(alpha N)``.

    OpenOOD ``nnguide_postprocessor.py`` ``setup`` appends the features of each batch of the
    unshuffled training loader and stops once ``len(batches) * batch_size > int(N * alpha)``, so it
    keeps ``m = int(alpha N) // B + 1`` batches (all of them when the loader has fewer), i.e.
    ``min(m B, N)`` samples: 512 for N = 50,000, alpha = 0.01, B = 128; 600 with B = 200.
    """
    return min((int(n_train * alpha) // batch_size + 1) * batch_size, n_train)


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

    Inputs: features and logits of the scored set; training features and logits (in loader order).
    Defaults follow OpenOOD (the benchmark we compare with): ``K = 100``, ``alpha = 0.01`` (the
    bank's fraction of the training set); the official ImageNet config is ``knn_k = 10`` with a
    1 % bank. OpenOOD: APS off, ``GRID = {}``.

    The bank, of the ``N`` training samples:

    * ``bank='random'`` (default): ``n = min(N, max(round(alpha N), K))`` samples drawn at random
      with ``seed`` (official ``bankset_ratio``: a random subset). ``n`` is ``round(alpha N)`` from
      ``N >= K / alpha`` on (10,000 at the defaults); below that the bank is enlarged to ``K``
      samples so that the mean over the ``K`` nearest neighbours is defined, and with ``N < K`` the
      score is not applicable (:class:`ScoreNotApplicable`: skipped, with the reason).
    * ``'first'``: the first ``n`` samples (same ``n``).
    * ``'openood'``: the samples of OpenOOD's bank, whole batches of its unshuffled training loader of
      ``bank_batch_size`` samples (default 200, the batch size of OpenOOD v1.5's ``Evaluator``):
      the first :func:`openood_bank_size` samples, e.g. 512 for N = 50,000 and batch 128, not 500.
      A bank smaller than ``K`` is not applicable (OpenOOD's faiss search would pad it).

    ``info()`` reports the bank size used (``bank_size``).
    """

    name = "nnguide"
    GRID: dict = {}

    def __init__(self, K: int = 100, alpha: float = 0.01, bank: str = "random", seed: int = 0,
                 bank_batch_size: Optional[int] = None):
        if isinstance(K, bool) or not isinstance(K, int) or K < 1:
            raise ValueError(f"K must be a positive int, got {K!r}")
        if not 0.0 < float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if bank not in BANKS:
            raise ValueError(f"bank must be one of {BANKS}, got {bank!r}")
        if bank_batch_size is not None:
            if bank != "openood":
                raise ValueError(f"bank_batch_size applies to bank='openood' only, got bank={bank!r} "
                                 f"with bank_batch_size={bank_batch_size!r}")
            if isinstance(bank_batch_size, bool) or not isinstance(bank_batch_size, int) or bank_batch_size < 1:
                raise ValueError(f"bank_batch_size must be a positive int, got {bank_batch_size!r}")
        elif bank == "openood":
            bank_batch_size = OPENOOD_BATCH_SIZE
        self.K, self.alpha, self.bank, self.seed = K, float(alpha), bank, int(seed)
        self.bank_batch_size = bank_batch_size

    def bank_size(self, n_train: int) -> int:
        """How many of ``n_train`` training samples the bank holds (see the class docstring)."""
        if self.bank == "openood":
            return openood_bank_size(n_train, self.alpha, self.bank_batch_size)
        return min(n_train, max(int(round(self.alpha * n_train)), self.K))

    def fit_features(self, train_features: Tensor, train_logits: Tensor, train_labels: Optional[Tensor],
                     classifier: Optional[Classifier], **kw: Any) -> "NNGuide":
        h, z = self._check_train(train_features, train_logits)
        n = self.bank_size(h.shape[0])
        if self.K > n and self.bank == "openood":
            raise ScoreNotApplicable(f"nnguide: K={self.K} exceeds OpenOOD's bank of {n} samples (whole batches of "
                                     f"{self.bank_batch_size}, alpha={self.alpha} of {h.shape[0]} training samples)")
        if self.K > n:
            raise ScoreNotApplicable(f"nnguide: K={self.K} exceeds the {h.shape[0]} training samples "
                                     f"(the bank needs at least K samples)")
        if self.bank == "random":
            idx = torch.randperm(h.shape[0], generator=torch.Generator().manual_seed(self.seed))[:n]
        else:
            idx = torch.arange(n)
        self.bank_ = l2_normalise(h[idx]) * energy(z[idx])[:, None]
        self.width_ = int(h.shape[1])
        self.fitted_ = True
        return self

    def info(self) -> Dict[str, Any]:
        out = super().info()
        if getattr(self, "fitted_", False):
            out["bank_size"] = int(self.bank_.shape[0])
        return out

    def _score_features(self, features: Tensor, logits: Tensor) -> Tensor:
        self._check_width(features)
        return energy(logits) * mean_top_k_similarity(l2_normalise(features), self.bank_, self.K)
