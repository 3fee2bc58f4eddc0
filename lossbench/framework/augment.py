"""Training-time augmentation: torchvision v2 transforms per image, a batched crop/flip for the device.

Modes (``--augment``):

- ``cifar``: the standard small-image recipe -- random crop of the image size after zero padding of
  ``padding`` pixels on each side (4 in the ResNet paper, He et al. 2016, Sec. 4.2, and in OpenOOD's
  CIFAR pipeline) plus a horizontal flip with probability 0.5;
- ``crop``: the random crop alone (digits and glyphs must not be mirrored);
- ``flip``: the horizontal flip alone;
- ``none``: no augmentation;
- ``auto`` (the default): ``cifar`` for 3-channel data, ``none`` for 1-channel data (the digit sets).

Optional, on top: ``--auto-augment randaugment`` (``v2.RandAugment``, torchvision's defaults: 2 ops,
magnitude 9; Cubuk et al. 2020) or ``trivialaugment`` (``v2.TrivialAugmentWide``; Mueller & Hutter
2021), and ``--reprob P`` random erasing (``v2.RandomErasing``, Zhong et al. 2020, on the normalised
tensor with value 0, i.e. the data set mean). Mixup / CutMix live in :mod:`.mixup`.

Evaluation splits and the training split used to fit OOD statistics are never augmented: only
``DataBundle.train`` gets these transforms (see :mod:`.data`).

On a GPU the crop and flip can run on the device over a whole uint8 batch (:class:`BatchAugment`),
each sample with its own offsets and flip; the per-sample draw is the same as torchvision's
(``RandomCrop.get_params`` draws the offsets uniformly, the flip is a Bernoulli(0.5)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

AUGMENT_MODES = ("auto", "none", "cifar", "crop", "flip")
AUTO_AUGMENTS = ("none", "randaugment", "trivialaugment")
FLIP_MODES = ("random", "alternating")
PAD_MODES = ("constant", "reflect")


@dataclass(frozen=True)
class AugmentSpec:
    """What the training split gets: ``mode`` (resolved, never ``auto``), crop ``padding``,
    ``auto_augment`` policy and random-erasing probability ``reprob``."""

    mode: str = "none"
    padding: int = 4
    auto_augment: str = "none"
    reprob: float = 0.0
    #: ``random``: each sample flipped with probability 0.5 every epoch; ``alternating``: airbench's
    #: derandomised flip -- a fixed random half of the samples is flipped in even epochs, the other
    #: half in odd epochs (``legacy/airbench94.py``, ``CifarLoader.__iter__``). Batched path only.
    flip_mode: str = "random"
    #: Padding of the random crop: ``constant`` (zeros, the ResNet recipe) or ``reflect`` (airbench).
    pad_mode: str = "constant"

    def __post_init__(self) -> None:
        if self.mode not in AUGMENT_MODES or self.mode == "auto":
            raise ValueError(f"augment mode must be one of {AUGMENT_MODES[1:]} (resolve 'auto' first), got {self.mode!r}")
        if self.auto_augment not in AUTO_AUGMENTS:
            raise ValueError(f"auto_augment must be one of {AUTO_AUGMENTS}, got {self.auto_augment!r}")
        if not 0.0 <= float(self.reprob) <= 1.0:
            raise ValueError(f"reprob must lie in [0, 1], got {self.reprob}")
        if int(self.padding) < 0:
            raise ValueError(f"crop padding must be >= 0, got {self.padding}")
        if self.flip_mode not in FLIP_MODES:
            raise ValueError(f"flip_mode must be one of {FLIP_MODES}, got {self.flip_mode!r}")
        if self.pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {self.pad_mode!r}")

    @property
    def active(self) -> bool:
        return self.mode != "none" or self.auto_augment != "none" or self.reprob > 0

    @property
    def crop(self) -> bool:
        return self.mode in ("cifar", "crop")

    @property
    def flip(self) -> bool:
        return self.mode in ("cifar", "flip")

    @property
    def batchable(self) -> bool:
        """Whether :class:`BatchAugment` can do all of it (crop and flip only)."""
        return self.auto_augment == "none" and self.reprob == 0

    @property
    def batch_only(self) -> bool:
        """Whether only :class:`BatchAugment` can do it (alternating flips, reflect padding)."""
        return (self.flip and self.flip_mode != "random") or (self.crop and self.pad_mode != "constant")


NO_AUGMENT = AugmentSpec()


def resolve_augment_mode(mode: str, channels: int) -> str:
    """``auto`` -> ``cifar`` for 3-channel data, ``none`` for 1-channel data; other modes unchanged."""
    if mode not in AUGMENT_MODES:
        raise ValueError(f"augment must be one of {AUGMENT_MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    return "cifar" if channels == 3 else "none"


def geometric_ops(aug: AugmentSpec, size: int, fill: Sequence[float] = (0.0,)) -> List[Callable]:
    """Random crop (zero padding, or ``fill`` per channel; or reflect padding) and horizontal flip as v2
    transforms. Alternating flips exist only in :class:`BatchAugment` (a per-image transform does not know
    the epoch); here the flip is random."""
    from torchvision.transforms import v2

    ops: List[Callable] = []
    if aug.crop:
        fill_value = list(fill) if len(fill) > 1 else fill[0]
        ops.append(v2.RandomCrop(size, padding=int(aug.padding), fill=fill_value, padding_mode=aug.pad_mode))
    if aug.flip:
        ops.append(v2.RandomHorizontalFlip(0.5))
    return ops


def auto_augment_ops(aug: AugmentSpec) -> List[Callable]:
    """RandAugment / TrivialAugmentWide (uint8 tensors or PIL images), torchvision's defaults."""
    from torchvision.transforms import v2

    if aug.auto_augment == "randaugment":
        return [v2.RandAugment()]
    if aug.auto_augment == "trivialaugment":
        return [v2.TrivialAugmentWide()]
    return []


def erasing_ops(aug: AugmentSpec) -> List[Callable]:
    """Random erasing of the normalised tensor (value 0 = the mean), if ``reprob`` > 0."""
    from torchvision.transforms import v2

    return [v2.RandomErasing(p=float(aug.reprob), value=0)] if aug.reprob > 0 else []


def uint8_to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 image(s) -> float32 in [0, 1], exactly as ``ToTensor`` divides (``x.float() / 255``)."""
    return x.to(torch.float32).div(255)


def _reflect(idx: torch.Tensor, size: int) -> torch.Tensor:
    """Indices into a dimension of ``size`` after reflect padding (no edge repeat, as ``F.pad(mode='reflect')``)."""
    idx = torch.where(idx < 0, -idx, idx)
    return torch.where(idx >= size, 2 * (size - 1) - idx, idx)


def crop_flip_batch(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor,
                    padding: int, pad_mode: str = "constant") -> torch.Tensor:
    """Per-sample crop of the padded batch at (``top``, ``left``), then flip where ``flip``.

    ``x`` (N, C, H, W); ``top``/``left`` (N,) integer offsets in [0, 2 * padding]; ``flip`` (N,) bool.
    ``pad_mode='constant'``: equal to ``v2.functional.crop(v2.functional.pad(x_i, padding), top_i,
    left_i, H, W)`` followed by ``horizontal_flip`` for each sample (tested against exactly that);
    ``'reflect'``: the same on ``F.pad(x, ..., mode='reflect')`` (any dtype: indices are reflected).
    """
    n, _, h, w = x.shape
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
    if pad_mode == "reflect" and padding >= min(h, w):
        raise ValueError(f"reflect padding {padding} must be smaller than the image size {min(h, w)}")
    rows = (top.view(n, 1) + torch.arange(h, device=x.device).view(1, h)).long()   # (N, H)
    cols = (left.view(n, 1) + torch.arange(w, device=x.device).view(1, w)).long()  # (N, W)
    cols = torch.where(flip.view(n, 1), cols.flip(1), cols)
    if pad_mode == "reflect":
        xp, rows, cols = x, _reflect(rows - padding, h), _reflect(cols - padding, w)
    else:
        xp = F.pad(x, (padding, padding, padding, padding)) if padding else x
    idx_n = torch.arange(n, device=x.device).view(n, 1, 1)
    out = xp.permute(0, 2, 3, 1)[idx_n, rows.view(n, h, 1), cols.view(n, 1, w)]    # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


class BatchAugment(nn.Module):
    """Crop / flip (per sample) and normalisation of a uint8 batch, on whatever device it lives.

    ``forward(x_uint8, index=None, epoch=0)`` -> normalised float32 batch. With ``aug`` inactive it
    only normalises. Random draws use ``torch``'s global generator of the batch's device (saved with
    every checkpoint). ``flip_mode='alternating'`` needs each sample's dataset ``index`` and the
    ``epoch``: sample ``i`` is flipped iff ``base[i] xor (epoch odd)``, with ``base`` a fixed
    Bernoulli(0.5) draw of ``n_samples`` values from a generator seeded with ``seed``.
    """

    def __init__(self, aug: AugmentSpec, mean: Sequence[float], std: Sequence[float],
                 n_samples: Optional[int] = None, seed: int = 0):
        super().__init__()
        if not aug.batchable:
            raise ValueError("device-side augmentation supports crop and flip only; auto_augment and reprob "
                             "need the per-image (data loader) path: pass --device-augment off")
        self.aug = aug
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.alternating = aug.flip and aug.flip_mode == "alternating"
        if self.alternating:
            if n_samples is None or int(n_samples) <= 0:
                raise ValueError("flip_mode 'alternating' needs n_samples, the size of the training split")
            g = torch.Generator().manual_seed(int(seed))
            base = torch.rand(int(n_samples), generator=g) < 0.5
        else:
            base = torch.zeros(0, dtype=torch.bool)
        self.register_buffer("base_flip", base, persistent=False)

    def draw(self, n: int, device: torch.device, index: Optional[torch.Tensor] = None,
             epoch: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = int(self.aug.padding) if self.aug.crop else 0
        if self.aug.crop:
            top = torch.randint(0, 2 * p + 1, (n,), device=device)
            left = torch.randint(0, 2 * p + 1, (n,), device=device)
        else:
            top = left = torch.zeros(n, dtype=torch.long, device=device)
        if not self.aug.flip:
            flip = torch.zeros(n, dtype=torch.bool, device=device)
        elif self.alternating:
            if index is None or index.shape != (n,):
                raise ValueError(f"flip_mode 'alternating' needs the samples' dataset index (shape ({n},))")
            if int(index.min()) < 0 or int(index.max()) >= self.base_flip.numel():
                raise ValueError(f"index must lie in [0, {self.base_flip.numel()}), the training split's size")
            flip = self.base_flip[index.to(self.base_flip.device).long()].to(device) ^ bool(int(epoch) % 2)
        else:
            flip = torch.rand(n, device=device) < 0.5
        return top, left, flip

    def forward(self, x: torch.Tensor, train: bool = True, index: Optional[torch.Tensor] = None,
                epoch: int = 0) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise TypeError(f"BatchAugment expects a uint8 batch (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
        if train and (self.aug.crop or self.aug.flip):
            top, left, flip = self.draw(x.shape[0], x.device, index, epoch)
            x = crop_flip_batch(x, top, left, flip, int(self.aug.padding) if self.aug.crop else 0, self.aug.pad_mode)
        return (uint8_to_float(x) - self.mean) / self.std


def describe(aug: Optional[AugmentSpec]) -> str:
    if aug is None or not aug.active:
        return "none"
    parts = [aug.mode] if aug.mode != "none" else []
    if aug.flip and aug.flip_mode != "random":
        parts.append(f"{aug.flip_mode} flips")
    if aug.crop and aug.pad_mode != "constant":
        parts.append(f"{aug.pad_mode} padding {aug.padding}")
    if aug.auto_augment != "none":
        parts.append(aug.auto_augment)
    if aug.reprob > 0:
        parts.append(f"erasing p={aug.reprob}")
    return " + ".join(parts)
