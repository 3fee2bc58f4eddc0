import numpy as np
import pytest
import torch

from lossbench.framework.data import DatasetNotFoundError, get_data
from lossbench.framework.ood_sets import get_ood_dataset


def _rows(ds):
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    return {tuple(r.round(decimals=4).flatten().tolist()) for r in x}


def test_digits_split_sizes_disjoint_and_deterministic():
    from sklearn.datasets import load_digits

    y = load_digits().target
    b = get_data("digits", img_size=16)
    n_in = int(np.isin(y, range(6)).sum())
    assert len(b.train) + len(b.val) + len(b.test) == n_in
    assert len(b.ood["heldout"]) == len(y) - n_in
    assert abs(len(b.val) / n_in - 0.1) < 0.01 and abs(len(b.test) / n_in - 0.2) < 0.01
    assert b.num_classes == 6 and b.train[0][0].shape == (1, 16, 16)
    labels = b.train.tensors[1]
    assert set(labels.tolist()) == set(range(6))
    assert set(b.ood["heldout"].tensors[1].tolist()) == {-1}
    tr, va, te, od = (_rows(d) for d in (b.train, b.val, b.test, b.ood["heldout"]))
    # load_digits has a handful of exact duplicate images; splits are by index, so overlap of
    # distinct rows must be at most those few.
    assert len(tr & te) <= 3 and len(tr & va) <= 3 and len(te & od) == 0
    b2 = get_data("digits", img_size=16)
    assert torch.equal(b.train.tensors[0], b2.train.tensors[0])
    assert torch.equal(b.test.tensors[1], b2.test.tensors[1])
    b3 = get_data("digits", img_size=16, seed=1)
    assert not torch.equal(b.train.tensors[1], b3.train.tensors[1])


def test_digits_custom_id_classes_remap_labels():
    b = get_data("digits", img_size=8, id_classes=[3, 7])
    assert b.num_classes == 2 and b.classes == ["3", "7"]
    assert set(b.train.tensors[1].tolist()) == {0, 1}


@pytest.mark.parametrize("bad", [[0], [0, 0], [0, 11]])
def test_bad_id_classes(bad):
    with pytest.raises(ValueError, match="id_classes"):
        get_data("digits", id_classes=bad)


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="unknown dataset name 'nope'"):
        get_data("nope")


@pytest.mark.parametrize("name,needle", [("cifar10", "cifar-10-batches-py"), ("svhn", "32x32.mat"),
                                         ("mnist", "MNIST/raw")])
def test_missing_dataset_error_names_files(tmp_path, name, needle):
    with pytest.raises(DatasetNotFoundError) as err:
        get_data(name, root=str(tmp_path))
    msg = str(err.value)
    assert str(tmp_path) in msg and needle in msg and "--download" in msg


def test_noise_sets_deterministic_and_shaped():
    b = get_data("digits", img_size=16)
    g1 = get_ood_dataset("gaussian", b, n_noise=10, seed=3)
    g2 = get_ood_dataset("gaussian", b, n_noise=10, seed=3)
    u = get_ood_dataset("uniform", b, n_noise=10)
    assert len(g1) == 10 and g1[0][0].shape == (1, 16, 16) and g1[0][1] == -1
    assert torch.equal(g1.x, g2.x) and not torch.equal(g1.x, u.x)
    with pytest.raises(ValueError, match="unknown OOD set name"):
        get_ood_dataset("bogus", b)


def test_real_mnist_through_torchvision(shared_data):
    b = get_data("mnist", root=str(shared_data), img_size=16, id_classes=[0, 1, 2, 3, 4])
    x, y = b.train[0]
    assert x.shape == (1, 16, 16) and 0 <= y < 5
    assert len(b.test) > 4000 and len(b.ood["heldout"]) > 4000
    f = get_ood_dataset("fashionmnist", b, root=str(shared_data), max_samples=50)
    assert len(f) == 50 and f[0][0].shape == (1, 16, 16)


def test_real_imagefolder(shared_data):
    b = get_data(f"imagefolder:{shared_data / 'cifar10-jpeg-subset'}", img_size=16)
    assert b.num_classes == 10 and b.train[0][0].shape == (3, 16, 16)
    assert len(b.train) + len(b.val) == 10000 and len(b.test) == 2000
    letters = get_ood_dataset(f"imagefolder:{shared_data / 'notMNIST'}", b, max_samples=20)
    assert letters[0][0].shape == (3, 16, 16)


def test_max_train_samples_stratified_and_deterministic():
    full = get_data("digits", img_size=8)
    b = get_data("digits", img_size=8, max_train_samples=120)
    b2 = get_data("digits", img_size=8, max_train_samples=120)
    idx = [b.train.indices[i] for i in range(len(b.train))]
    assert len(b.train) == 120 and idx == [b2.train.indices[i] for i in range(len(b2.train))]
    labels = full.train.tensors[1][idx]
    counts = torch.bincount(labels, minlength=6)
    assert counts.min() >= 19 and counts.max() <= 21  # 120 / 6 classes, stratified
    assert len(b.val) == len(full.val) and len(b.test) == len(full.test)  # only training is cut
    with pytest.raises(ValueError, match="max_train_samples"):
        get_data("digits", max_train_samples=3)


def test_labels_of_matches_decoding(shared_data):
    from lossbench.framework.data import _labels_of

    b = get_data("mnist", root=str(shared_data), img_size=8, id_classes=[2, 5, 7])
    fast = _labels_of(b.val)
    slow = np.asarray([int(b.val[i][1]) for i in range(len(b.val))])
    assert (fast == slow).all() and set(fast.tolist()) == {0, 1, 2}
