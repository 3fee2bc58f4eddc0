"""On-disk cache of the shared (features, logits, labels) pass, keyed by model weights and data.

:func:`ood.evaluate_ood` (``feature_cache=FeatureCache(directory, model)``) looks each loader up
before running the model over it and stores what it computed. The key is a SHA-256 of

* the model: every tensor of its ``state_dict`` (names, shapes, dtypes, bytes), or the
  ``model_key`` the caller gives (e.g. a checkpoint's hash);
* the data: the dataset's type and length, the ``repr`` of its ``transform`` /
  ``target_transform``, its ``root`` and ``samples`` list when it has them, the loader's batch
  size, and the bytes of the loader's first batch (so a changed pre-processing is caught even
  where its ``repr`` is not informative).

A changed checkpoint or transform therefore misses the cache; an unshuffled loader over the
same data hits it. Files are written atomically (temporary file, then rename).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.nn as nn
from torch import Tensor

from .scores.feature_base import FeatureData


def _update_tensor(h: "hashlib._Hash", name: str, t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim too (BatchNorm counters)


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of every tensor of ``model.state_dict()`` (names, shapes, dtypes and values)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if isinstance(t, Tensor):
            _update_tensor(h, name, t)
    return h.hexdigest()


def loader_fingerprint(loader: Iterable) -> str:
    """SHA-256 of what identifies a loader's data (see the module docstring)."""
    h = hashlib.sha256()
    ds = getattr(loader, "dataset", None)
    h.update(f"{type(ds).__name__}|{len(ds) if ds is not None else '?'}|{getattr(loader, 'batch_size', None)}".encode())
    for attr in ("transform", "target_transform", "root"):
        h.update(f"|{attr}={getattr(ds, attr, None)!r}".encode())
    samples = getattr(ds, "samples", None)
    if samples is not None:
        h.update(repr(list(samples)).encode())
    first = next(iter(loader), None)
    if isinstance(first, (tuple, list)):
        for i, part in enumerate(first):
            if isinstance(part, Tensor):
                _update_tensor(h, f"batch0.{i}", part)
    return h.hexdigest()


class FeatureCache:
    """``load(loader)`` / ``save(loader, data)`` of :class:`~ood.scores.feature_base.FeatureData` in ``directory``."""

    def __init__(self, directory: str, model: Optional[nn.Module] = None, model_key: Optional[str] = None):
        if model is None and model_key is None:
            raise ValueError("FeatureCache needs the model (its weights are hashed) or a model_key string")
        self.directory = Path(directory)
        self.model_key = model_key if model_key is not None else model_fingerprint(model)
        self.hits = 0

    def path(self, loader: Iterable) -> Path:
        key = hashlib.sha256(f"{self.model_key}|{loader_fingerprint(loader)}".encode()).hexdigest()[:32]
        return self.directory / f"features-{key}.pt"

    def load(self, loader: Iterable) -> Optional[FeatureData]:
        """The cached pass of ``loader``, or ``None`` when it is not cached."""
        p = self.path(loader)
        if not p.is_file():
            return None
        d = torch.load(p, map_location="cpu", weights_only=True)
        self.hits += 1
        return FeatureData(d["features"], d["logits"], d.get("labels"))

    def save(self, loader: Iterable, data: FeatureData) -> Path:
        """Store ``data`` for ``loader`` atomically; returns the file."""
        p = self.path(loader)
        self.directory.mkdir(parents=True, exist_ok=True)
        payload = {"features": data.features, "logits": data.logits}
        if data.labels is not None:
            payload["labels"] = data.labels
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        os.close(fd)
        try:
            torch.save(payload, tmp)
            os.replace(tmp, p)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return p
