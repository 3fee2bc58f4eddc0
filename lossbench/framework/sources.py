"""Where a named data set's files come from: torchvision's loaders and image folders, with clear
errors when the files are absent."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import UserInputError

TORCHVISION_SETS = ("mnist", "fashionmnist", "cifar10", "cifar100", "svhn")

# How to obtain each torchvision set when its files are absent.
_HOW_TO_GET = {
    "mnist": "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]",
    "fashionmnist": "FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]",
    "cifar10": "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}",
    "cifar100": "cifar-100-python/{train,test,meta}",
    "svhn": "{train,test}_32x32.mat",
}



class DatasetNotFoundError(UserInputError, FileNotFoundError):
    """A data set's files are not under the given root."""


def _torchvision_split(name: str, root: str, train: bool, download: bool):
    from torchvision import datasets as D

    try:
        if name == "mnist":
            return D.MNIST(root, train=train, download=download)
        if name == "fashionmnist":
            return D.FashionMNIST(root, train=train, download=download)
        if name == "cifar10":
            return D.CIFAR10(root, train=train, download=download)
        if name == "cifar100":
            return D.CIFAR100(root, train=train, download=download)
        return D.SVHN(root, split="train" if train else "test", download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found ..." / integrity errors
        raise DatasetNotFoundError(
            f"data set {name!r} was not found under data_root={str(root)!r}: looked for "
            f"{os.path.join(str(root), _HOW_TO_GET[name])}. Put the original files there, pass "
            f"--data-root to where they are, or add --download to fetch them with torchvision "
            f"(needs internet). ({err})"
        ) from None


def _targets(ds) -> np.ndarray:
    for attr in ("targets", "labels"):
        if hasattr(ds, attr):
            return np.asarray(getattr(ds, attr), dtype=np.int64)
    return np.asarray([int(ds[i][1]) for i in range(len(ds))], dtype=np.int64)


def _image_folder(path: str, test_folder: Optional[str] = None):
    from torchvision.datasets import ImageFolder

    p = Path(path)
    if not p.is_dir():
        raise DatasetNotFoundError(
            f"imagefolder path {path!r} is not a directory; expected <path>/<class>/<image> or "
            f"<path>/train/<class>/<image> and <path>/test/<class>/<image>"
        )
    if test_folder is not None and not Path(test_folder).is_dir():
        raise DatasetNotFoundError(f"test_folder {test_folder!r} is not a directory of <class>/<image> folders")
    if (p / "train").is_dir():
        train = ImageFolder(str(p / "train"))
        test = ImageFolder(str(p / "test")) if (p / "test").is_dir() else None
    else:
        train, test = ImageFolder(str(p)), None
    if test_folder is not None:
        test = ImageFolder(str(test_folder))
        if test.classes != train.classes:
            raise ValueError(f"test_folder {test_folder!r} has classes {test.classes}, the training folder "
                             f"{path!r} has {train.classes}; they must be the same")
    return train, test
