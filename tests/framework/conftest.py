from pathlib import Path

import numpy as np
import pytest


def write_image_folder(root: Path, n_per_class: int = 6, classes=("a", "b", "c"), size: int = 36,
                       seed: int = 0) -> Path:
    """A small ImageFolder of random RGB PNGs (lossless, so pixels are exact)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i:03d}.png")
    return root


@pytest.fixture
def make_image_folder():
    """The :func:`write_image_folder` function."""
    return write_image_folder


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """``<tmp>/imgs/{train,test}/<class>/<png>``: 3 classes, 6 train and 3 test images each, 36 px."""
    base = tmp_path / "imgs"
    write_image_folder(base / "train", 6)
    write_image_folder(base / "test", 3, seed=1)
    return base
