"""bench/train.py's bare airbench loop crops as the recipe does: each image at its own offset."""

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

from lossbench.framework.augment import crop_flip_batch

ROOT = Path(__file__).resolve().parents[1]


def _bench_train():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "bench" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_shift_each_crops_every_image_at_its_own_offset():
    shift_each = _bench_train().shift_each
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    out = shift_each(F.pad(x, (2, 2, 2, 2), mode="reflect"), 2)
    torch.manual_seed(1)
    offsets = torch.randint(0, 5, (64, 2))  # the draw shift_each makes
    assert len({tuple(o) for o in offsets.tolist()}) > 1  # several offsets in one batch
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    by_hand = torch.stack([padded[i, :, t:t + 32, l:l + 32] for i, (t, l) in enumerate(offsets.tolist())])
    assert torch.equal(out, by_hand)  # each image sliced at its own offset
    ref = crop_flip_batch(x, offsets[:, 0], offsets[:, 1], torch.zeros(64, dtype=torch.bool), 2, "reflect")
    assert torch.equal(out, ref)  # and the trainer's crop for the same offsets
