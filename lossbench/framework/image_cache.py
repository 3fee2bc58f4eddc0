"""Decode an image folder once: every JPEG/PNG -> one uint8 tensor (N, C, H, W), in memory or on disk.

The pixels are exactly those of the per-image path (``ImageFolder``'s loader, then the same
``Grayscale``/RGB conversion and ``Resize`` on the PIL image, then ``ToTensor``'s byte layout), so
the cached and uncached data sets give identical tensors; augmentation then runs on the tensors.

A disk cache (``cache_dir``) is one ``.pt`` file per folder and image form, named by a key that
hashes the sorted file list with each file's size and modification time, the image size and the
channels: adding, removing, replacing or touching a file changes the key, so a stale cache is
never read (it is simply not found, and the folder is decoded again).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from .io import atomic_write_bytes

CACHE_VERSION = 1


class DecodedImages(Dataset):
    """An image folder decoded to ``images`` (uint8, N x C x H x W) with ``targets`` and ``classes``.

    ``ds[i]`` -> (uint8 image tensor (C, H, W), class index). ``cache_hit`` says whether it was read
    from a disk cache. ``key`` (:func:`cache_key` of the files it was decoded from) is what
    :meth:`cache_key` gives other caches (e.g. ``ood``'s feature cache) in place of hashing every pixel.
    """

    def __init__(self, images: torch.Tensor, targets: Sequence[int], classes: List[str], root: str = "",
                 cache_hit: bool = False, key: Optional[str] = None):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise TypeError(f"images must be a uint8 tensor (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(targets) != images.shape[0]:
            raise ValueError(f"targets has {len(targets)} entries for {images.shape[0]} images")
        self.images = images
        self.targets = [int(t) for t in targets]
        self.classes = list(classes)
        self.root = root
        self.cache_hit = cache_hit
        self.key = key

    def cache_key(self) -> Optional[str]:
        """A string that changes whenever the decoded files or the image form change; ``None`` if unknown."""
        return None if self.key is None else f"decoded-image-folder:{os.path.abspath(self.root)}:{self.key}"

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        return self.images[i], self.targets[i]


def cache_key(samples: Sequence[Tuple[str, int]], root: str, size: int, channels: int) -> str:
    """sha256 over (relative path, class, byte size, mtime in ns) of every file + image size + channels."""
    entries = []
    for path, target in samples:
        st = os.stat(path)
        entries.append([os.path.relpath(path, root), int(target), st.st_size, st.st_mtime_ns])
    blob = json.dumps({"v": CACHE_VERSION, "size": int(size), "channels": int(channels), "files": entries})
    return hashlib.sha256(blob.encode()).hexdigest()


def _decode_all(paths: Sequence[str], loader: Callable, pil_steps: Callable, channels: int,
                size: int) -> torch.Tensor:
    out = np.empty((len(paths), size, size, channels), dtype=np.uint8)

    def one(i: int) -> None:
        arr = np.asarray(pil_steps(loader(paths[i])), dtype=np.uint8)
        out[i] = arr.reshape(size, size, channels)

    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL releases the GIL while decoding
        list(pool.map(one, range(len(paths))))
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def decode_image_folder(folder, size: int, channels: int, pil_steps: Callable,
                        cache_dir: Optional[str] = None) -> DecodedImages:
    """Decode the torchvision ``ImageFolder`` ``folder`` once; with ``cache_dir``, reuse / write a cache file.

    ``pil_steps`` maps a loaded PIL image to the final PIL image of ``size`` x ``size`` and ``channels``
    (``ImageSpec.pil_steps()``).
    """
    root = str(folder.root)
    samples = list(folder.samples)
    path = None
    key = cache_key(samples, root, size, channels)  # taken before decoding: a file changed meanwhile misses next time
    if cache_dir is not None:
        name = os.path.basename(os.path.normpath(root)) or "images"
        parent = os.path.basename(os.path.dirname(os.path.normpath(root)))
        path = os.path.join(cache_dir, f"{parent}-{name}-{size}px-{channels}ch-{key[:20]}.pt")
        if os.path.isfile(path):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                if state.get("key") == key:
                    return DecodedImages(state["images"], state["targets"], list(folder.classes), root, True, key)
            except Exception:  # unreadable cache: decode again and overwrite it
                pass
    images = _decode_all([p for p, _ in samples], folder.loader, pil_steps, channels, size)
    targets = [int(t) for _, t in samples]
    if path is not None:
        os.makedirs(cache_dir, exist_ok=True)
        state = {"key": key, "images": images, "targets": torch.tensor(targets)}
        atomic_write_bytes(path, lambda f: torch.save(state, f))
    return DecodedImages(images, targets, list(folder.classes), root, False, key)
