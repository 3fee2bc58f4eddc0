"""Repeated passes over a labelled fit loader whose samples are chosen by label first (GRAM's split, NAC's subset).

The labels are read once (no model), a per-class selection is drawn from them, and the model
passes then check that the loader yields the same labels in the same order, so that a sample's
position identifies it (a shuffling loader is an error, not a silently different selection).
"""

from __future__ import annotations

from typing import Iterable, Iterator, List, Tuple

import torch
from torch import Tensor

from .base import batches


def loader_labels(loader: Iterable, what: str) -> List[Tensor]:
    """The integer label tensor ``(batch,)`` of every batch of ``loader`` (CPU, int64)."""
    out = []
    for i, batch in enumerate(loader):
        y = batch[1] if isinstance(batch, (tuple, list)) and len(batch) > 1 else None
        if not isinstance(y, Tensor) or y.is_floating_point() or y.is_complex() or y.dim() != 1:
            desc = f"{y.dtype} tensor of shape {tuple(y.shape)}" if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"{what}: loader batch {i} must have integer labels of shape (batch,), got {desc}")
        out.append(y.detach().cpu().long())
    if not out:
        raise ValueError(f"{what}: the loader yielded no samples; expected a non-empty data set")
    return out


def ordered_batches(loader: Iterable, labels: List[Tensor], device: torch.device,
                    what: str) -> Iterator[Tuple[int, Tensor, Tensor]]:
    """``(batch index, x, labels)`` of each batch, checking that the labels match the first read."""
    for i, (x, y) in enumerate(batches(loader, device)):
        if i >= len(labels) or not isinstance(y, Tensor) or not torch.equal(y.detach().cpu().long(), labels[i]):
            raise ValueError(f"{what}: the fit loader must yield the same samples in the same order on every pass "
                             "(shuffle=False)")
        yield i, x, labels[i]


def balanced_subset(labels: Tensor, total: int, seed: int) -> Tensor:
    """Boolean mask: ``min(int(total / K), smallest class)`` random samples of each of the K classes present."""
    classes = torch.unique(labels)
    per_class = min(int(total / classes.numel()), min(int((labels == c).sum()) for c in classes))
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(labels.numel(), dtype=torch.bool)
    for c in classes:
        idx = torch.nonzero(labels == c).flatten()
        mask[idx[torch.randperm(idx.numel(), generator=gen)[:per_class]]] = True
    return mask
