"""Embedding quality of penultimate features: precision@1 and MAP@R (pytorch-metric-learning)."""

from __future__ import annotations

from typing import Dict, Iterable, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from lossbench.validation import check_finite, check_float, check_target
from ood.features import penultimate_features

EMBEDDING_DISTANCES = ("cosine", "euclidean")


def embedding_quality(features: Tensor, labels: Tensor, distance: str = "cosine",
                      batch_size: int = 2048) -> Dict[str, float]:
    """Precision@1 and MAP@R of ``features`` retrieving samples of their own class.

    pytorch-metric-learning's ``AccuracyCalculator`` (Musgrave, Belongie & Lim, "A Metric Learning
    Reality Check", ECCV 2020, Sec. 3.2): query = reference = the given set, each query excluded
    from its own neighbours (``get_accuracy(query, labels)`` with no reference); for a query of
    class y with R other samples of class y, P@1 = [label of the nearest neighbour = y] and
    MAP@R = (1/R) sum_{i<=R} P(i) [neighbour i has class y], P(i) the precision at rank i. k is
    the largest class size (``k='max_bin_count'``), which MAP@R needs. Neighbours by cosine
    similarity (default, the angular view of NBC-softmax / angular heads and of Musgrave et al.'s
    normalised embeddings) or Euclidean distance; exact search (``CustomKNN``) in ``batch_size``
    row blocks, no faiss needed. ``features`` (N, D) float, ``labels`` (N,) int -> fractions.
    """
    from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    check_float(features, "features", ndim=2)
    check_finite(features, "features")
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        check_target(labels, 1, features.shape[0], "labels")  # raises the TypeError naming labels
    check_target(labels, int(labels.max()) + 1 if labels.numel() else 1, features.shape[0], "labels")
    if distance not in EMBEDDING_DISTANCES:
        raise ValueError(f"distance must be one of {EMBEDDING_DISTANCES}, got {distance!r}")
    if torch.bincount(labels).max() < 2:
        raise ValueError("labels: every class has a single sample; retrieval needs >= 2 samples of a class")
    dist = CosineSimilarity() if distance == "cosine" else LpDistance(normalize_embeddings=False)
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), k="max_bin_count",
                              knn_func=CustomKNN(dist, batch_size=batch_size), device=torch.device("cpu"))
    res = calc.get_accuracy(features.detach().float().cpu(), labels.detach().cpu())
    return {"p_at_1": float(res["precision_at_1"]), "map_at_r": float(res["mean_average_precision_at_r"])}


@torch.no_grad()
def predict_with_features(model: nn.Module, loader: Iterable, device: torch.device) -> Tuple[Tensor, Tensor, Tensor]:
    """Logits ``(N, C)``, penultimate features ``(N, D)`` and labels ``(N,)`` from one forward pass.

    A lossbench :class:`~lossbench.framework.models.Classifier` (``features`` + ``head.logits``)
    runs its backbone once per batch; another model runs ``model(x)`` and its features separately.
    """
    was_training = model.training
    model.eval()
    logits, feats, labels = [], [], []
    try:
        for x, y in loader:
            x = x.to(device)
            f = penultimate_features(model, x)
            head = getattr(model, "head", None)
            out = head.logits(f) if callable(getattr(head, "logits", None)) else model(x)
            logits.append(out.float().cpu())
            feats.append(f.float().cpu())
            labels.append(torch.as_tensor(y))
    finally:
        model.train(was_training)
    if not logits:
        raise ValueError("the loader yielded no samples")
    return torch.cat(logits), torch.cat(feats), torch.cat(labels)
