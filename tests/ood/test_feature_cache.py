"""The on-disk feature cache: a second evaluation of the same run does no forward pass."""

import os

import numpy as np
import pytest
import torch

from ood import FeatureCache, evaluate_ood

from conftest import loader
from test_feature_pass import _ce_model, _data, _loaders

SCORES = ("knn", "vim", "msp", "react")
KW = {"knn": {"k": 5}, "vim": {"dim": 4}}
KNN_KW = {"knn": {"k": 5}}


def test_second_evaluation_hits_the_cache(tmp_path):
    fit, id_l, val, oods = _loaders()
    model = _ce_model()
    first = evaluate_ood(model, fit, id_l, oods, scores=SCORES, score_kwargs=KW, val_loader=val,
                         feature_cache=FeatureCache(str(tmp_path), model))
    assert model.passes > 0 and first["feature_passes"] == 3 + len(oods)
    model.passes = 0
    cache = FeatureCache(str(tmp_path), model)
    second = evaluate_ood(model, fit, id_l, oods, scores=SCORES, score_kwargs=KW, val_loader=val, feature_cache=cache)
    assert model.passes == 0 and second["feature_passes"] == 0 and cache.hits == 3 + len(oods)
    for n in SCORES:
        for s in oods:
            np.testing.assert_array_equal(first["scores"][n][s]["ood"], second["scores"][n][s]["ood"])
            assert first["results"][n][s] == second["results"][n][s]


def test_changed_weights_or_data_miss_the_cache(tmp_path):
    fit, id_l, val, oods = _loaders()
    model = _ce_model()
    evaluate_ood(model, fit, id_l, oods, scores=("knn",), score_kwargs=KNN_KW, feature_cache=FeatureCache(str(tmp_path), model))
    with torch.no_grad():
        model.head.fc.bias.add_(0.1)
    model.passes = 0
    out = evaluate_ood(model, fit, id_l, oods, scores=("knn",), score_kwargs=KNN_KW,
                       feature_cache=FeatureCache(str(tmp_path), model))
    assert out["feature_passes"] == 2 + len(oods)  # new weights: every loader runs again
    x, y = _data(60, seed=1)
    changed = {"noise": loader(torch.randn(40, 6) * 2.0), "far": oods["far"]}  # one set with other data
    id_same = loader(x, y)  # a new loader object over the same data: a hit
    cache = FeatureCache(str(tmp_path), model)
    out = evaluate_ood(model, fit, id_same, changed, scores=("knn",), score_kwargs=KNN_KW, feature_cache=cache)
    assert out["feature_passes"] == 1 and cache.hits == 3


def test_cache_needs_model_or_key(tmp_path):
    import pytest
    with pytest.raises(ValueError, match="model_key"):
        FeatureCache(str(tmp_path))


def test_fingerprint_covers_zero_dim_buffers():
    """Regression: a BatchNorm's 0-dim ``num_batches_tracked`` made the fingerprint raise."""
    from ood.feature_cache import model_fingerprint

    bn = torch.nn.BatchNorm1d(4)
    before = model_fingerprint(bn)
    bn.num_batches_tracked += 1
    assert model_fingerprint(bn) != before


# -- the data key: files, not the first batch -----------------------------------------------------------

from pathlib import Path  # noqa: E402

from torch.utils.data import DataLoader, Dataset, Subset  # noqa: E402

from ood.evaluate import FeaturePasses  # noqa: E402
from test_feature_pass import HeadModel  # noqa: E402

PX = 4  # 4 x 4 RGB images: 48 inputs


def _flat(t):
    return t.reshape(-1)


def _write_png(path: Path, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(PX, PX, 3), dtype=np.uint8)).save(path, compress_level=0)


def _image_folder(root: Path, n_per_class: int = 6) -> Path:
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            _write_png(root / c / f"{i:02d}.png", seed=hash((c, i)) % 1000)
    return root


def _replace(path: Path, seed: int) -> None:
    """Another image of the same byte size in place of ``path``, written a second later (a new mtime)."""
    before = path.stat()
    _write_png(path, seed)
    assert path.stat().st_size == before.st_size  # uncompressed PNGs of one shape: only the pixels differ
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))


def _image_model():
    from lossbench import LinearHead

    return HeadModel(LinearHead(8, 2, torch.nn.CrossEntropyLoss()), in_dim=3 * PX * PX)


def _pass(model, cache_dir: Path, ld) -> tuple:
    """(features, whether the model ran) of one cached pass, as a fresh process would do it."""
    passes = FeaturePasses(model, FeatureCache(str(cache_dir), model))
    data = passes.get(ld, "loader")
    return data.features, passes.passes == 1


def test_replaced_image_beyond_the_first_batch_misses(tmp_path):
    """Regression: the key held only the first batch's bytes, so a replaced 9th image kept its old features."""
    from torchvision import datasets, transforms as T

    root = _image_folder(tmp_path / "imgs")
    tf = T.Compose([T.ToTensor(), _flat])
    model = _image_model()

    def loader_now():
        return DataLoader(datasets.ImageFolder(str(root), transform=tf), batch_size=4, shuffle=False)

    before, ran = _pass(model, tmp_path / "cache", loader_now())
    assert ran
    again, ran = _pass(model, tmp_path / "cache", loader_now())
    assert not ran and torch.equal(again, before)  # same files: a hit
    victim = sorted(root.rglob("*.png"))[9]  # in the third batch
    _replace(victim, seed=12345)
    after, ran = _pass(model, tmp_path / "cache", loader_now())
    assert ran, "a replaced image must miss the cache"
    fresh = FeaturePasses(model).get(loader_now(), "loader").features
    assert torch.equal(after, fresh)
    changed = (after != before).any(1)
    assert changed.tolist() == [i == 9 for i in range(len(after))]


def test_decoded_image_folder_keys_on_its_files(tmp_path):
    """The framework's decode-once data (uint8 tensor, wrapped in Subset and a transform) keys on its files."""
    from torchvision import datasets

    from lossbench.framework.image_cache import decode_image_folder
    from lossbench.framework.images import ImageSpec, LabeledTransform

    root = _image_folder(tmp_path / "imgs")
    spec = ImageSpec(3, PX, (0.5,) * 3, (0.25,) * 3)
    model = _image_model()

    def loader_now():
        decoded = decode_image_folder(datasets.ImageFolder(str(root)), PX, 3, spec.pil_steps())
        tf = lambda x, t=spec.tensor_transform(): _flat(t(x))  # noqa: E731
        return DataLoader(LabeledTransform(Subset(decoded, list(range(12))), tf), batch_size=4)

    before, ran = _pass(model, tmp_path / "cache", loader_now())
    assert ran
    assert _pass(model, tmp_path / "cache", loader_now())[1] is False
    _replace(sorted(root.rglob("*.png"))[10], seed=999)
    after, ran = _pass(model, tmp_path / "cache", loader_now())
    assert ran and (after != before).any(1).tolist() == [i == 10 for i in range(12)]


class _Opaque(Dataset):
    """Items the fingerprint cannot see into (no files, no known array attribute)."""

    def __init__(self, items):
        self._items = items

    def __len__(self):
        return len(self._items)

    def __getitem__(self, i):
        return self._items[i], 0


def test_unidentifiable_data_is_hashed_in_full(tmp_path):
    x, _ = _data(60, seed=3)
    model = _ce_model()
    before, ran = _pass(model, tmp_path, DataLoader(_Opaque(list(x)), batch_size=16))
    assert ran and _pass(model, tmp_path, DataLoader(_Opaque(list(x)), batch_size=16))[1] is False
    x2 = x.clone()
    x2[50] += 1.0  # beyond the first batch
    after, ran = _pass(model, tmp_path, DataLoader(_Opaque(list(x2)), batch_size=16))
    assert ran and (after != before).any(1).tolist() == [i == 50 for i in range(60)]


def test_transform_reprs_with_memory_addresses_still_hit(tmp_path):
    """A default ``repr`` holds the object's address, which differs in every process: it must not reach the key."""
    from ood.feature_cache import loader_fingerprint

    class Scale:
        def __call__(self, t):
            return t

    class Wrapped(Dataset):
        def __init__(self, base, transform):
            self.base, self.transform = base, transform

        def __len__(self):
            return len(self.base)

        def __getitem__(self, i):
            return self.base[i]

    x, y = _data(30)
    base = torch.utils.data.TensorDataset(x, y)
    a, b = Scale(), Scale()
    assert repr(a) != repr(b)
    assert loader_fingerprint(DataLoader(Wrapped(base, a), batch_size=8)) == \
        loader_fingerprint(DataLoader(Wrapped(base, b), batch_size=8))


# -- unreadable cache files --------------------------------------------------------------------------------

def _one_cache_file(tmp_path):
    fit, id_l, val, oods = _loaders()
    model = _ce_model()
    cache = FeatureCache(str(tmp_path), model)
    first = FeaturePasses(model, cache).get(id_l, "id")
    return model, id_l, cache.path(id_l), first


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_unreadable_cache_file_is_a_miss_and_is_rewritten(tmp_path, damage):
    """Regression: a truncated cache file made every later evaluation crash until it was deleted by hand."""
    model, id_l, path, first = _one_cache_file(tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        at = bytes(data).find(first.features.numpy().tobytes())
        assert at > 0
        data[at + 17] ^= 0x40
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    passes = FeaturePasses(model, FeatureCache(str(tmp_path), model))
    again = passes.get(id_l, "id")
    assert passes.passes == 1 and torch.equal(again.features, first.features)  # recomputed, not read
    hit = FeaturePasses(model, FeatureCache(str(tmp_path), model))
    assert torch.equal(hit.get(id_l, "id").features, first.features) and hit.passes == 0  # rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left
