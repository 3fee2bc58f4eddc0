"""Data sets by name: the embedded digits default, torchvision sets, ImageFolder, and noise.

``get_data(name, ...)`` returns a :class:`DataBundle` with deterministic train/val/test splits and,
when some classes are held out, an out-of-distribution split of those classes. Every image is
brought to one :class:`ImageSpec` (channels, size, normalisation) so that OOD sets from other
sources can be fed to the same model.

Names: ``digits`` (scikit-learn's bundled ``load_digits``; nothing is downloaded), ``mnist``,
``fashionmnist``, ``cifar10``, ``cifar100``, ``svhn`` (torchvision's classes, ``download=False`` by
default), ``imagefolder:<path>`` (a folder with ``train/`` and ``test/`` sub-folders, or a single
folder of class folders that is split here), and for OOD only ``gaussian`` / ``uniform`` noise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset, Subset, TensorDataset

from ..errors import UnknownNameError, UserInputError
from .augment import NO_AUGMENT, AugmentSpec
from .image_cache import DecodedImages, decode_image_folder
from .images import ImageSpec, LabeledTransform, NoiseDataset
from .sources import TORCHVISION_SETS, DatasetNotFoundError, _image_folder, _targets, _torchvision_split

__all__ = ["DataBundle", "DatasetNotFoundError", "ImageSpec", "LabeledTransform", "NoiseDataset", "get_data",
           "native_channels", "default_data_root"]

DATASET_NAMES = ("digits",) + TORCHVISION_SETS + ("imagefolder:<path>",)

# Per-data-set normalisation (mean, std per channel) and native channels.
_STATS: Dict[str, Tuple[Tuple[float, ...], Tuple[float, ...], int]] = {
    "digits": ((0.3,), (0.33,), 1),
    "mnist": ((0.1307,), (0.3081,), 1),
    "fashionmnist": ((0.2860,), (0.3530,), 1),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 3),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 3),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), 3),
    "imagefolder": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 3),
}


@dataclass
class DataBundle:
    """Splits of one in-distribution data set, plus OOD sets that come with it (held-out classes)."""

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    classes: List[str]
    spec: ImageSpec
    ood: Dict[str, Dataset] = field(default_factory=dict)
    #: The training split without augmentation (same samples, eval transform): what OOD scores fit on.
    train_eval: Optional[Dataset] = None
    #: The training split as raw uint8 images (decoded image folders only), for device-side augmentation.
    train_raw: Optional[Dataset] = None
    #: The augmentation ``train`` applies (``None``: none).
    augment: Optional[AugmentSpec] = None

    def __post_init__(self) -> None:
        if self.train_eval is None:
            self.train_eval = self.train


def default_data_root() -> str:
    """``$LOSSBENCH_DATA`` if set, else ``./data``."""
    return os.environ.get("LOSSBENCH_DATA", "data")


def _stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> List[np.ndarray]:
    """Indices split by class proportion, deterministic in ``seed``; ``fractions`` are of the whole."""
    idx = np.arange(len(labels))
    out: List[np.ndarray] = []
    rest_idx, rest_y, remaining = idx, labels, 1.0
    for frac in fractions:
        take = frac / remaining
        rest_idx, part, rest_y, _ = train_test_split(
            rest_idx, rest_y, test_size=take, random_state=seed, stratify=rest_y
        )
        out.append(np.sort(part))
        remaining -= frac
    out.insert(0, np.sort(rest_idx))
    return out


def _digits(spec_size: int, seed: int, id_classes: Optional[Sequence[int]], val_fraction: float,
            test_fraction: float, aug: AugmentSpec = NO_AUGMENT, channels: Optional[int] = None,
            mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> DataBundle:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(spec_size, spec_size), mode="bilinear", align_corners=False).clamp_(0, 1)
    m0, s0, ch = _STATS["digits"]
    ch = channels or ch
    if ch == 3:  # grey replicated, as torchvision's Grayscale(3) does for a 3-channel model
        x = x.expand(-1, 3, -1, -1).contiguous()
    spec = ImageSpec(ch, spec_size, *resolve_stats(m0, s0, ch, mean, std))
    x = spec.normalize(x)
    y = np.asarray(d.target, dtype=np.int64)
    id_classes = list(range(6)) if id_classes is None else list(id_classes)
    _check_id_classes(id_classes, 10)
    label_map = {c: i for i, c in enumerate(id_classes)}
    in_mask = np.isin(y, id_classes)
    in_idx, out_idx = np.flatnonzero(in_mask), np.flatnonzero(~in_mask)
    tr, va, te = _stratified_split(y[in_idx], [val_fraction, test_fraction], seed)
    y_mapped = torch.tensor([label_map.get(int(c), -1) for c in y])

    def subset(ids: np.ndarray) -> TensorDataset:
        ids_t = torch.as_tensor(ids)
        return TensorDataset(x[ids_t], y_mapped[ids_t])

    ood = {"heldout": subset(out_idx)} if len(out_idx) else {}
    # Held-out test images of the OOD classes are kept apart from every in-distribution split.
    train = subset(in_idx[tr])
    train_aug = LabeledTransform(train, spec.normalized_transform(aug)) if aug.active else train
    return DataBundle("digits", train_aug, subset(in_idx[va]), subset(in_idx[te]),
                      len(id_classes), [str(c) for c in id_classes], spec, ood, train_eval=train,
                      augment=aug if aug.active else None)


def _labels_of(ds: Dataset) -> np.ndarray:
    """Labels of a split without decoding its images where the structure allows it."""
    if isinstance(ds, TensorDataset):
        return ds.tensors[1].numpy()
    if isinstance(ds, LabeledTransform) and isinstance(ds.base, TensorDataset) and ds.label_map is None:
        return ds.base.tensors[1].numpy()
    if isinstance(ds, LabeledTransform) and isinstance(ds.base, Subset):
        raw = _targets(ds.base.dataset)[np.asarray(ds.base.indices, dtype=np.int64)]
        if ds.label_map is None:
            return raw
        return np.asarray([ds.label_map.get(int(c), -1) for c in raw], dtype=np.int64)
    return np.asarray([int(ds[i][1]) for i in range(len(ds))], dtype=np.int64)


def _check_id_classes(id_classes: Sequence[int], n: int) -> None:
    if len(set(id_classes)) != len(id_classes) or len(id_classes) < 2:
        raise UserInputError(f"id_classes (--id-classes) must be >= 2 distinct class indices, got {list(id_classes)}")
    bad = [c for c in id_classes if not 0 <= int(c) < n]
    if bad:
        raise UserInputError(f"id_classes (--id-classes) must lie in [0, {n}) for this data set of {n} classes, "
                             f"got {bad}")


def _decoded(folder, spec: ImageSpec, cache_dir: Optional[str]) -> DecodedImages:
    return decode_image_folder(folder, spec.size, spec.channels, spec.pil_steps(), cache_dir)


def _split_bundle(name: str, train_base, test_base, classes: List[str], spec: ImageSpec, seed: int,
                  id_classes: Optional[Sequence[int]], val_fraction: float,
                  test_fraction: float, aug: AugmentSpec = NO_AUGMENT) -> DataBundle:
    decoded = isinstance(train_base, DecodedImages)
    tf = spec.tensor_transform() if decoded else spec.transform()
    tf_train = (spec.tensor_transform(aug) if decoded else spec.transform(aug)) if aug.active else tf
    y_train = _targets(train_base)
    n_all = len(classes)
    id_list = list(range(n_all)) if id_classes is None else [int(c) for c in id_classes]
    _check_id_classes(id_list, n_all)
    label_map = {c: i for i, c in enumerate(id_list)}
    in_idx = np.flatnonzero(np.isin(y_train, id_list))
    if test_base is None:
        tr, va, te = _stratified_split(y_train[in_idx], [val_fraction, test_fraction], seed)
        test_ds = Subset(train_base, in_idx[te].tolist())
        out_base, out_idx = train_base, None
    else:
        tr, va = _stratified_split(y_train[in_idx], [val_fraction], seed)
        y_test = _targets(test_base)
        test_ds = Subset(test_base, np.flatnonzero(np.isin(y_test, id_list)).tolist())
        out_base, out_idx = test_base, np.flatnonzero(~np.isin(y_test, id_list))
    ood: Dict[str, Dataset] = {}
    if id_classes is not None:
        if out_idx is None:
            all_out = np.flatnonzero(~np.isin(y_train, id_list))
            out_idx = all_out
        if len(out_idx):
            ood["heldout"] = LabeledTransform(Subset(out_base, out_idx.tolist()), tf, label_map)
    wrap = lambda ds, t=tf: LabeledTransform(ds, t, label_map)  # noqa: E731
    train_ids = Subset(train_base, in_idx[tr].tolist())
    return DataBundle(name, wrap(train_ids, tf_train),
                      wrap(Subset(train_base, in_idx[va].tolist())), wrap(test_ds),
                      len(id_list), [classes[c] for c in id_list], spec, ood, train_eval=wrap(train_ids),
                      train_raw=LabeledTransform(train_ids, None, label_map) if decoded else None,
                      augment=aug if aug.active else None)


def native_channels(name: str, channels: Optional[int] = None) -> int:
    """The channels images of data set ``name`` are brought to (``channels`` if given)."""
    if channels is not None:
        return int(channels)
    key = str(name).lower()
    key = "imagefolder" if key.startswith("imagefolder:") else key
    return _STATS[key][2] if key in _STATS else 3


def get_data(name: str = "digits", root: Optional[str] = None, img_size: int = 32,
             channels: Optional[int] = None, seed: int = 0, id_classes: Optional[Sequence[int]] = None,
             val_fraction: float = 0.1, test_fraction: float = 0.2, download: bool = False,
             max_train_samples: Optional[int] = None, augment: Optional[AugmentSpec] = None,
             test_folder: Optional[str] = None, decode_once: bool = True,
             cache_dir: Optional[str] = None, mean: Optional[Sequence[float]] = None,
             std: Optional[Sequence[float]] = None) -> DataBundle:
    """Load the in-distribution data set ``name`` with deterministic splits.

    ``digits`` keeps classes 0-5 in-distribution and returns 6-9 as the ``heldout`` OOD set unless
    ``id_classes`` says otherwise; other sets hold classes out only when ``id_classes`` is given.
    ``test_fraction`` is used only where the source has no test split of its own.
    ``max_train_samples`` keeps a deterministic, class-stratified subset of the training split.
    ``augment`` (an :class:`AugmentSpec`; default none) applies to ``bundle.train`` only; ``val``,
    ``test``, the OOD sets and ``bundle.train_eval`` (the same training samples, un-augmented) never
    get it. ``test_folder`` takes an image folder's test split from another folder (same classes).
    ``decode_once`` decodes an image folder once into a uint8 tensor (identical pixels), optionally
    cached on disk in ``cache_dir``. ``mean`` / ``std`` (both or neither; one value per channel, or
    one for all) replace the data set's own normalisation, e.g. by the one a pretrained model expects.
    """
    aug = augment or NO_AUGMENT
    bundle = _get_data(name, root, img_size, channels, seed, id_classes, val_fraction, test_fraction, download,
                       aug, test_folder, decode_once, cache_dir, mean, std)
    if max_train_samples is not None:
        if max_train_samples < bundle.num_classes:
            raise ValueError(f"max_train_samples must be >= the number of classes ({bundle.num_classes}), "
                             f"got {max_train_samples}")
        if max_train_samples < len(bundle.train):
            labels = _labels_of(bundle.train_eval)
            keep, _ = train_test_split(np.arange(len(labels)), train_size=max_train_samples,
                                       random_state=seed, stratify=labels)
            keep = np.sort(keep).tolist()
            same = bundle.train_eval is bundle.train
            bundle.train = Subset(bundle.train, keep)
            bundle.train_eval = bundle.train if same else Subset(bundle.train_eval, keep)
            if bundle.train_raw is not None:
                bundle.train_raw = Subset(bundle.train_raw, keep)
    return bundle


def _get_data(name, root, img_size, channels, seed, id_classes, val_fraction, test_fraction,
              download, aug=NO_AUGMENT, test_folder=None, decode_once=True, cache_dir=None, mean=None,
              std=None) -> DataBundle:
    if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(
            f"val_fraction and test_fraction must be in (0, 1) with sum < 1, got {val_fraction}, {test_fraction}"
        )
    key = str(name).lower()
    if test_folder is not None and not key.startswith("imagefolder:"):
        raise ValueError(f"test_folder applies to imagefolder:<path> data only, got data {name!r}")
    if key == "digits":
        if channels not in (None, 1, 3):
            raise ValueError(f"channels must be 1 or 3 (grey replicated) for digits, got {channels}")
        return _digits(img_size, seed, id_classes, val_fraction, test_fraction, aug, channels, mean, std)
    root = root or default_data_root()
    if key in TORCHVISION_SETS:
        m0, s0, ch = _STATS[key]
        ch = channels or ch
        spec = ImageSpec(ch, img_size, *resolve_stats(m0, s0, ch, mean, std))
        train_base = _torchvision_split(key, root, True, download)
        test_base = _torchvision_split(key, root, False, download)
        classes = _classes(train_base)
        return _split_bundle(key, train_base, test_base, classes, spec, seed, id_classes,
                             val_fraction, test_fraction, aug)
    if key.startswith("imagefolder:"):
        path = name.split(":", 1)[1]
        train_base, test_base = _image_folder(path, test_folder)
        m0, s0, ch = _STATS["imagefolder"]
        ch = channels or ch
        spec = ImageSpec(ch, img_size, *resolve_stats(m0, s0, ch, mean, std))
        classes = list(train_base.classes)
        if decode_once:
            train_base = _decoded(train_base, spec, cache_dir)
            test_base = _decoded(test_base, spec, cache_dir) if test_base is not None else None
        return _split_bundle(key, train_base, test_base, classes, spec, seed,
                             id_classes, val_fraction, test_fraction, aug)
    raise UnknownNameError(f"unknown dataset name {name!r}; expected one of {list(DATASET_NAMES)}")


def data_stats(name: str, channels: Optional[int] = None) -> Tuple[Tuple[float, ...], Tuple[float, ...], int]:
    """(mean, std, channels) :func:`get_data` normalises data set ``name`` with (no data is read)."""
    key = str(name).lower()
    key = "imagefolder" if key.startswith("imagefolder:") else key
    if key not in _STATS:
        raise UnknownNameError(f"unknown dataset name {name!r}; expected one of {list(DATASET_NAMES)}")
    mean, std, ch = _STATS[key]
    ch = int(channels or ch)
    return (*_fit_stats(mean, std, ch), ch)


def resolve_stats(default_mean: Sequence[float], default_std: Sequence[float], channels: int,
                  mean: Optional[Sequence[float]] = None,
                  std: Optional[Sequence[float]] = None) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The normalisation of ``channels``-channel images: ``mean`` / ``std`` when given (one value, or one
    per channel; finite, std > 0), else the data set's defaults fitted to ``channels``."""
    import math

    if mean is None and std is None:
        return _fit_stats(default_mean, default_std, channels)
    if mean is None or std is None:
        raise UserInputError("mean and std must be given together (one value per channel, or one for all)")
    out = []
    for what, values in (("mean", mean), ("std", std)):
        vals = [float(v) for v in values]
        if len(vals) == 1:
            vals = vals * channels
        if len(vals) != channels or not all(math.isfinite(v) for v in vals):
            raise UserInputError(f"{what} must hold 1 or {channels} finite values (one per channel), got {list(values)}")
        if what == "std" and not all(v > 0 for v in vals):
            raise UserInputError(f"std must be > 0 for every channel, got {list(values)}")
        out.append(tuple(vals))
    return out[0], out[1]


def _fit_stats(mean, std, ch):
    if len(mean) == ch:
        return tuple(mean), tuple(std)
    return (float(np.mean(mean)),) * ch, (float(np.mean(std)),) * ch


def _classes(ds) -> List[str]:
    if hasattr(ds, "classes"):
        return [str(c) for c in ds.classes]
    return [str(c) for c in sorted(set(_targets(ds).tolist()))]
