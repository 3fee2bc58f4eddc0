"""OOD sets for a model trained on a :class:`~lossbench.framework.data.DataBundle`: held-out classes,
noise, another data set's test split or an image folder, all brought to the bundle's image spec."""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch
from torch.utils.data import Dataset, Subset

from ..errors import UnknownNameError, UserInputError
from .data import DataBundle, default_data_root
from .images import NOISE_SETS, LabeledTransform, NoiseDataset
from .sources import TORCHVISION_SETS, _image_folder, _torchvision_split


def ood_set_kind(name: str) -> str:
    """``'heldout'``, ``'noise'``, ``'torchvision'`` or ``'imagefolder'``; an unknown name is an error listing the valid ones."""
    key = str(name).lower()
    if key == "heldout":
        return "heldout"
    if key in NOISE_SETS:
        return "noise"
    if key in TORCHVISION_SETS:
        return "torchvision"
    if key.startswith("imagefolder:") and name.split(":", 1)[1]:
        return "imagefolder"
    if key == "digits":
        raise UserInputError("'digits' as an OOD set is not supported; use heldout classes instead")
    raise UnknownNameError(
        f"unknown OOD set name {name!r}; expected 'heldout', 'gaussian', 'uniform', one of "
        f"{list(TORCHVISION_SETS)} or 'imagefolder:<path>'"
    )


def _heldout_error(data: str) -> UserInputError:
    return UserInputError(f"OOD set 'heldout' needs held-out classes; data set {data!r} has none "
                          f"(pass id_classes / --id-classes)")


def holds_classes_out(data: str, id_classes: Optional[Sequence[int]]) -> bool:
    """Whether training data ``data`` has a ``heldout`` OOD set (:func:`~lossbench.framework.data.get_data`:
    ``digits`` always, other data sets when ``id_classes`` is given)."""
    return str(data).lower() == "digits" or bool(id_classes)


def check_ood_sets(names: Iterable[str], root: Optional[str] = None, download: bool = False,
                   data: Optional[str] = None, has_heldout: Optional[bool] = None) -> None:
    """Check OOD set names before any training or evaluation: each name is known, a data set's files are
    where :func:`get_ood_dataset` will look (its test split is opened), an image folder exists, and
    ``heldout`` is asked for only where the training data ``data`` has held-out classes (``has_heldout``;
    ``None``: not checked). Raises the error :func:`get_ood_dataset` would raise later."""
    for name in names:
        kind = ood_set_kind(name)
        if kind == "heldout" and has_heldout is False:
            raise _heldout_error(data)
        if kind == "torchvision":
            _torchvision_split(str(name).lower(), root or default_data_root(), False, download)
        elif kind == "imagefolder":
            _image_folder(name.split(":", 1)[1])


def get_ood_dataset(name: str, bundle: DataBundle, root: Optional[str] = None, n_noise: int = 1000,
                    seed: int = 0, download: bool = False, max_samples: Optional[int] = None) -> Dataset:
    """An OOD set for a model trained on ``bundle``: ``heldout``, ``gaussian``, ``uniform``, or another
    data set by name (its test split, or all of an ImageFolder), brought to ``bundle.spec``.

    ``max_samples`` takes a deterministic random subset (seeded) of a large set.
    """
    key, kind = str(name).lower(), ood_set_kind(name)
    if kind == "heldout":
        if "heldout" not in bundle.ood:
            raise _heldout_error(bundle.name)
        ds = bundle.ood["heldout"]
    elif kind == "noise":
        ds = NoiseDataset(key, n_noise, bundle.spec, seed)
    elif kind == "torchvision":
        ds = LabeledTransform(_torchvision_split(key, root or default_data_root(), False, download),
                              bundle.spec.transform(), label_map={})
    else:
        train_base, test_base = _image_folder(name.split(":", 1)[1])
        ds = LabeledTransform(test_base if test_base is not None else train_base,
                              bundle.spec.transform(), label_map={})
    if max_samples is not None and len(ds) > max_samples:
        g = torch.Generator().manual_seed(seed)
        ds = Subset(ds, torch.randperm(len(ds), generator=g)[:max_samples].sort().values.tolist())
    return ds
