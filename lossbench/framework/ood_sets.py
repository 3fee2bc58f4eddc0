"""OOD sets for a model trained on a :class:`~lossbench.framework.data.DataBundle`: held-out classes,
noise, another data set's test split or an image folder, all brought to the bundle's image spec."""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.data import Dataset, Subset

from ..errors import UnknownNameError
from .data import DataBundle, default_data_root
from .images import NOISE_SETS, LabeledTransform, NoiseDataset
from .sources import TORCHVISION_SETS, _image_folder, _torchvision_split


def get_ood_dataset(name: str, bundle: DataBundle, root: Optional[str] = None, n_noise: int = 1000,
                    seed: int = 0, download: bool = False, max_samples: Optional[int] = None) -> Dataset:
    """An OOD set for a model trained on ``bundle``: ``heldout``, ``gaussian``, ``uniform``, or another
    data set by name (its test split, or all of an ImageFolder), brought to ``bundle.spec``.

    ``max_samples`` takes a deterministic random subset (seeded) of a large set.
    """
    key = str(name).lower()
    if key == "heldout":
        if "heldout" not in bundle.ood:
            raise ValueError(
                f"OOD set 'heldout' needs held-out classes; data set {bundle.name!r} has none "
                f"(pass id_classes / --id-classes)"
            )
        ds = bundle.ood["heldout"]
    elif key in NOISE_SETS:
        ds = NoiseDataset(key, n_noise, bundle.spec, seed)
    elif key in TORCHVISION_SETS:
        ds = LabeledTransform(_torchvision_split(key, root or default_data_root(), False, download),
                              bundle.spec.transform(), label_map={})
    elif key.startswith("imagefolder:"):
        train_base, test_base = _image_folder(name.split(":", 1)[1])
        ds = LabeledTransform(test_base if test_base is not None else train_base,
                              bundle.spec.transform(), label_map={})
    elif key == "digits":
        raise ValueError("'digits' as an OOD set is not supported; use heldout classes instead")
    else:
        raise UnknownNameError(
            f"unknown OOD set name {name!r}; expected 'heldout', 'gaussian', 'uniform', one of "
            f"{list(TORCHVISION_SETS)} or 'imagefolder:<path>'"
        )
    if max_samples is not None and len(ds) > max_samples:
        g = torch.Generator().manual_seed(seed)
        ds = Subset(ds, torch.randperm(len(ds), generator=g)[:max_samples].sort().values.tolist())
    return ds
