"""The tensor form of images (:class:`ImageSpec`: channels, size, normalisation, transforms) and the
data-set wrappers that apply it (:class:`LabeledTransform`, :class:`NoiseDataset`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.utils.data import Dataset

from .augment import NO_AUGMENT, AugmentSpec, auto_augment_ops, erasing_ops, geometric_ops, uint8_to_float

NOISE_SETS = ("gaussian", "uniform")


@dataclass(frozen=True)
class ImageSpec:
    """The tensor form every image is brought to: ``channels`` x ``size`` x ``size``, normalised."""

    channels: int
    size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]

    def pil_steps(self) -> Callable:
        """PIL image -> PIL image of this spec's channels and size (no tensor conversion)."""
        from torchvision import transforms as T

        return T.Compose([
            T.Grayscale(num_output_channels=self.channels) if self.channels == 1 else T.Lambda(_to_rgb),
            T.Resize((self.size, self.size), antialias=True),
        ])

    def transform(self, aug: Optional[AugmentSpec] = None) -> Callable:
        """PIL image -> normalised tensor; with ``aug``, its random ops between resize and ``ToTensor``."""
        from torchvision import transforms as T

        aug = aug or NO_AUGMENT
        steps: List[Callable] = [
            T.Grayscale(num_output_channels=self.channels) if self.channels == 1 else T.Lambda(_to_rgb),
            T.Resize((self.size, self.size), antialias=True),
            *geometric_ops(aug, self.size), *auto_augment_ops(aug),
            T.ToTensor(),
            T.Normalize(self.mean, self.std),
            *erasing_ops(aug),
        ]
        return T.Compose(steps)

    def tensor_transform(self, aug: Optional[AugmentSpec] = None) -> Callable:
        """uint8 tensor already at this spec's size (a decoded image) -> normalised tensor, with ``aug``."""
        from torchvision import transforms as T

        aug = aug or NO_AUGMENT
        return T.Compose([*geometric_ops(aug, self.size), *auto_augment_ops(aug), uint8_to_float,
                          T.Normalize(self.mean, self.std), *erasing_ops(aug)])

    def normalized_transform(self, aug: AugmentSpec) -> Callable:
        """Augmentation of an already normalised tensor (the embedded digits): crop padding is black."""
        from torchvision import transforms as T

        if aug.auto_augment != "none":
            raise ValueError("auto_augment needs decoded images (uint8 or PIL); the embedded digits set is "
                             "stored normalised, so only --augment crop/flip and --reprob apply to it")
        black = tuple(-m / s for m, s in zip(self.mean, self.std))
        return T.Compose([*geometric_ops(aug, self.size, fill=black), *erasing_ops(aug)])

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """Normalise images in ``[0, 1]`` of shape (N, channels, size, size)."""
        mean = torch.tensor(self.mean, dtype=x01.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x01.dtype).view(1, -1, 1, 1)
        return (x01 - mean) / std


def _to_rgb(img):
    return img.convert("RGB")


class LabeledTransform(Dataset):
    """Apply ``transform`` to the images of ``base`` and map labels through ``label_map``."""

    def __init__(self, base: Dataset, transform: Optional[Callable] = None,
                 label_map: Optional[Dict[int, int]] = None):
        self.base, self.transform, self.label_map = base, transform, label_map

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        if self.transform is not None:
            x = self.transform(x)
        y = int(y)
        if self.label_map is not None:
            y = self.label_map.get(y, -1)
        return x, y


class NoiseDataset(Dataset):
    """Synthetic OOD images: ``gaussian`` N(0.5, 0.25^2) or ``uniform`` U(0, 1) pixels, clipped to [0, 1]
    and normalised with the in-distribution spec. Deterministic given ``seed``; labels are -1."""

    def __init__(self, kind: str, n: int, spec: ImageSpec, seed: int = 0):
        if kind not in NOISE_SETS:
            raise ValueError(f"noise kind must be one of {NOISE_SETS}, got {kind!r}")
        g = torch.Generator().manual_seed(seed)
        shape = (n, spec.channels, spec.size, spec.size)
        if kind == "gaussian":
            x = (0.5 + 0.25 * torch.randn(shape, generator=g)).clamp_(0, 1)
        else:
            x = torch.rand(shape, generator=g)
        self.x = spec.normalize(x)

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int):
        return self.x[i], -1
