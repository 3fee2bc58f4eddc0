"""On-disk cache of the shared (features, logits, labels) pass, keyed by model weights and data.

:func:`ood.evaluate_ood` (``feature_cache=FeatureCache(directory, model)``) looks each loader up
before running the model over it and stores what it computed. The key is a SHA-256 of

* the model: every tensor of its ``state_dict`` (names, shapes, dtypes, bytes), or the
  ``model_key`` the caller gives (e.g. a checkpoint's hash);
* the data (:func:`loader_fingerprint`): the loader's batch size and the bytes of its first batch
  (so a changed pre-processing is caught even where its ``repr`` is not informative), and the
  dataset's *content*, found by walking it (duck typing, nothing here knows a dataset class):

  - a ``cache_key()`` method that returns a string: that string (the data set vouches for it);
  - a ``files()`` method, or a ``samples`` / ``imgs`` list of ``(path, target)`` (torchvision's
    ``ImageFolder``): every file's path, target, byte size and modification time in ns, the rule
    the decode-once image cache uses, so replacing, adding, removing or touching an image misses;
  - in-memory data (``tensors`` of a ``TensorDataset``, or ``data`` / ``images`` / ``x`` arrays with
    their ``targets`` / ``labels``): every byte of it;
  - a wrapper (``Subset``'s ``dataset`` and ``indices``, ``ConcatDataset``'s ``datasets``, any
    ``dataset`` or ``base`` attribute): its type, length and indices, then the data set inside it;
  - at every level, the ``repr`` of ``transform`` / ``target_transform`` / ``label_map`` (memory
    addresses removed, so a new process over the same data hits).

  When the walk cannot identify the data (a data set of another kind, or a loader without a
  ``dataset``), every batch the loader yields is hashed instead: one pass over the data without
  the model, so a hit still never serves features of other data.

A changed checkpoint, transform or image therefore misses the cache; an unshuffled loader over the
same data hits it. Files are written atomically (temporary file, fsync, rename); a cache file that
cannot be read back (truncated, a CRC-32 mismatch, not a cache file) counts as a miss and is
overwritten by the recomputed pass.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from lossbench.integrity import zip_damage

from .scores.feature_base import FeatureData

#: Attributes whose ``repr`` is part of a data set's identity (how its items are produced).
_PROCESSING_ATTRS = ("transform", "target_transform", "label_map")
#: In-memory arrays that hold a data set's items, and those that hold its labels.
_DATA_ATTRS = ("tensors", "data", "images", "x")
_LABEL_ATTRS = ("targets", "labels", "y")
_MAX_DEPTH = 32
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _update_tensor(h: "hashlib._Hash", name: str, t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")  # 0-dim too (BatchNorm counters)


def _update_array(h: "hashlib._Hash", name: str, a: Any) -> bool:
    """Hash a tensor, numpy array or list of numbers in full; ``False`` for anything else."""
    if isinstance(a, Tensor):
        _update_tensor(h, name, a)
        return True
    if isinstance(a, (list, tuple)) and all(isinstance(v, (int, float, np.integer, np.floating)) for v in a):
        a = np.asarray(a)
    if isinstance(a, np.ndarray) and a.dtype != object:
        a = np.ascontiguousarray(a)
        h.update(f"{name}|{a.shape}|{a.dtype.str}|".encode())
        h.update(a.reshape(-1).view(np.uint8))
        return True
    return False


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of every tensor of ``model.state_dict()`` (names, shapes, dtypes and values)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if isinstance(t, Tensor):
            _update_tensor(h, name, t)
    return h.hexdigest()


def _stable_repr(obj: Any) -> str:
    """``repr(obj)`` without the memory addresses of default reprs (``<function f at 0x7f...>``), which
    change from process to process and would make every new process miss."""
    return _ADDRESS.sub("", repr(obj))


def _file_entries(items: Iterable[Any]) -> Optional[List[Any]]:
    """``[path, target, size, mtime_ns]`` per file of ``items`` (paths or ``(path, target, ...)``), else ``None``."""
    out: List[Any] = []
    for item in items:
        path, target = (item[0], item[1] if len(item) > 1 else None) if isinstance(item, (tuple, list)) else (item, None)
        if not isinstance(path, (str, os.PathLike)):
            return None
        try:
            st = os.stat(path)
            out.append([os.fspath(path), repr(target), st.st_size, st.st_mtime_ns])
        except OSError:  # a file that is gone: its own entry (reading the data will report it)
            out.append([os.fspath(path), repr(target), None, None])
    return out


def _describe(h: "hashlib._Hash", ds: Any, depth: int = 0) -> bool:
    """Feed what identifies ``ds``'s content into ``h`` (rules: module docstring); ``False`` if it cannot."""
    if depth > _MAX_DEPTH:
        return False
    try:
        n = len(ds)
    except TypeError:
        n = "?"
    h.update(f"<{type(ds).__module__}.{type(ds).__qualname__}|{n}".encode())
    for attr in _PROCESSING_ATTRS:
        if getattr(ds, attr, None) is not None:
            h.update(f"|{attr}={_stable_repr(getattr(ds, attr))}".encode())
    key = ds.cache_key() if callable(getattr(ds, "cache_key", None)) else None
    if isinstance(key, str):
        h.update(f"|key={key}>".encode())
        return True
    files = None
    if callable(getattr(ds, "files", None)):
        files = _file_entries(ds.files())
    for attr in ("samples", "imgs"):
        if files is None and isinstance(getattr(ds, attr, None), (list, tuple)):
            files = _file_entries(getattr(ds, attr))
    if files is not None:
        h.update(f"|files={files!r}>".encode())
        return True
    inner = getattr(ds, "dataset", None)
    if inner is not None and getattr(ds, "indices", None) is not None:  # Subset
        if not _update_array(h, "indices", [int(i) for i in ds.indices]):
            return False
        return _describe(h, inner, depth + 1)
    parts = getattr(ds, "datasets", None)
    if isinstance(parts, (list, tuple)) and parts:  # ConcatDataset
        return all(_describe(h, part, depth + 1) for part in parts)
    for attr in ("dataset", "base"):
        if getattr(ds, attr, None) is not None:
            return _describe(h, getattr(ds, attr), depth + 1)
    for attr in _DATA_ATTRS:
        data = getattr(ds, attr, None)
        if data is None:
            continue
        arrays = list(data) if attr == "tensors" and isinstance(data, (list, tuple)) else [data]
        if not all(_update_array(h, f"{attr}{i}", a) for i, a in enumerate(arrays)):
            return False
        for lab in _LABEL_ATTRS:
            if getattr(ds, lab, None) is not None and not _update_array(h, lab, getattr(ds, lab)):
                return False
        return True
    return False


def _update_batch(h: "hashlib._Hash", name: str, batch: Any) -> None:
    parts = batch if isinstance(batch, (tuple, list)) else [batch]
    for i, part in enumerate(parts):
        if isinstance(part, Tensor):
            _update_tensor(h, f"{name}.{i}", part)
        elif not _update_array(h, f"{name}.{i}", part):
            h.update(f"{name}.{i}={part!r}".encode())


def loader_fingerprint(loader: Iterable) -> str:
    """SHA-256 of what identifies a loader's data (the rules are in the module docstring)."""
    h = hashlib.sha256()
    ds = getattr(loader, "dataset", None)
    h.update(f"batch_size={getattr(loader, 'batch_size', None)}|".encode())
    if ds is not None and _describe(h, ds):
        first = next(iter(loader), None)
        if first is not None:
            _update_batch(h, "batch0", first)
        return h.hexdigest()
    h.update(b"|every batch|")  # the data could not be identified: hash all of it
    for i, batch in enumerate(loader):
        _update_batch(h, f"batch{i}", batch)
    return h.hexdigest()


class FeatureCache:
    """``load(loader)`` / ``save(loader, data)`` of :class:`~ood.scores.feature_base.FeatureData` in ``directory``."""

    def __init__(self, directory: str, model: Optional[nn.Module] = None, model_key: Optional[str] = None):
        if model is None and model_key is None:
            raise ValueError("FeatureCache needs the model (its weights are hashed) or a model_key string")
        self.directory = Path(directory)
        self.model_key = model_key if model_key is not None else model_fingerprint(model)
        self.hits = 0
        self._last: Optional[Tuple[Any, Path]] = None  # (loader, path) of the last load: save reuses it

    def path(self, loader: Iterable) -> Path:
        key = hashlib.sha256(f"{self.model_key}|{loader_fingerprint(loader)}".encode()).hexdigest()[:32]
        return self.directory / f"features-{key}.pt"

    def _path_for(self, loader: Iterable) -> Path:
        if self._last is not None and self._last[0] is loader:
            return self._last[1]
        p = self.path(loader)
        self._last = (loader, p)
        return p

    def load(self, loader: Iterable) -> Optional[FeatureData]:
        """The cached pass of ``loader``, or ``None`` when it is not cached or its file cannot be read back."""
        p = self._path_for(loader)
        if not p.is_file() or zip_damage(p) is not None:
            return None
        try:
            d = torch.load(p, map_location="cpu", weights_only=True)
            data = FeatureData(d["features"], d["logits"], d.get("labels"))
        except Exception:  # truncated or foreign file: a miss; save() overwrites it
            return None
        self.hits += 1
        return data

    def save(self, loader: Iterable, data: FeatureData) -> Path:
        """Store ``data`` for ``loader`` atomically (temp file, fsync, rename); returns the file."""
        p = self._path_for(loader)
        self.directory.mkdir(parents=True, exist_ok=True)
        payload = {"features": data.features, "logits": data.logits}
        if data.labels is not None:
            payload["labels"] = data.labels
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{p.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return p
