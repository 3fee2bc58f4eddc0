import os

import numpy as np
import torch
from torchvision.datasets import ImageFolder

from lossbench.framework.data import ImageSpec
from lossbench.framework.image_cache import decode_image_folder

SPEC = ImageSpec(3, 32, (0.5,) * 3, (0.25,) * 3)


def _decode(root, cache):
    return decode_image_folder(ImageFolder(str(root)), 32, 3, SPEC.pil_steps(), str(cache))


def _cache_files(cache):
    return sorted(os.listdir(cache))


def test_cache_is_reused_and_matches_the_decoded_pixels(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "f", 4)
    a = _decode(root, tmp_path / "cache")
    assert not a.cache_hit and len(_cache_files(tmp_path / "cache")) == 1
    b = _decode(root, tmp_path / "cache")
    assert b.cache_hit and torch.equal(a.images, b.images) and a.targets == b.targets
    ref = SPEC.pil_steps()(ImageFolder(str(root))[5][0])
    assert torch.equal(a.images[5], torch.from_numpy(np.array(ref)).permute(2, 0, 1))
    mem = decode_image_folder(ImageFolder(str(root)), 32, 3, SPEC.pil_steps(), None)
    assert not mem.cache_hit and torch.equal(mem.images, a.images)


def test_cache_invalidated_when_a_file_changes(tmp_path, make_image_folder):
    from PIL import Image

    root = make_image_folder(tmp_path / "f", 4)
    a = _decode(root, tmp_path / "cache")
    target = root / "b" / "001.png"
    idx = ImageFolder(str(root)).samples.index((str(target), 1))
    Image.fromarray(np.zeros((36, 36, 3), dtype=np.uint8)).save(target)
    b = _decode(root, tmp_path / "cache")
    assert not b.cache_hit and int(b.images[idx].max()) == 0 and not torch.equal(a.images[idx], b.images[idx])
    assert len(_cache_files(tmp_path / "cache")) == 2
    st = os.stat(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: same bytes, new mtime
    assert not _decode(root, tmp_path / "cache").cache_hit
    make_image_folder(tmp_path / "f", 5, classes=("a",), seed=3)  # a file added
    c = _decode(root, tmp_path / "cache")
    assert not c.cache_hit and len(c) == len(a) + 1
    assert _decode(root, tmp_path / "cache").cache_hit


def test_other_image_size_is_another_cache_entry(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "f", 2)
    _decode(root, tmp_path / "cache")
    small = ImageSpec(3, 16, (0.5,) * 3, (0.25,) * 3)
    d = decode_image_folder(ImageFolder(str(root)), 16, 3, small.pil_steps(), str(tmp_path / "cache"))
    assert not d.cache_hit and d.images.shape[-1] == 16 and len(_cache_files(tmp_path / "cache")) == 2
