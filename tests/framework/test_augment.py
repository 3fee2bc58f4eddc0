import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from lossbench.framework.augment import AugmentSpec, BatchAugment, crop_flip_batch, resolve_augment_mode
from lossbench.framework.config import ConfigError, parse_args
from lossbench.framework.data import ImageSpec, get_data
from lossbench.framework.mixup import SOFT_TARGET_LOSSES, mix_batch, soft_target_loss
from lossbench.registry import list_losses

CIFAR = AugmentSpec("cifar", padding=4)


def _img(seed=0, size=32):
    return torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("aug", [CIFAR, AugmentSpec("crop"), AugmentSpec("cifar", auto_augment="randaugment"),
                                 AugmentSpec("flip", auto_augment="trivialaugment", reprob=0.5)])
def test_train_transform_deterministic_under_a_seed(aug):
    spec = ImageSpec(3, 32, (0.5,) * 3, (0.25,) * 3)
    tf, x = spec.tensor_transform(aug), _img()
    outs = []
    for seed in (0, 0, 1, 2, 3):
        torch.manual_seed(seed)
        outs.append(torch.stack([tf(x) for _ in range(4)]))
    assert torch.equal(outs[0], outs[1])
    assert any(not torch.equal(outs[0], o) for o in outs[2:])


def test_pil_and_tensor_paths_agree_for_crop_and_flip():
    from PIL import Image

    spec = ImageSpec(3, 32, (0.5,) * 3, (0.25,) * 3)
    x = _img(3)
    pil = Image.fromarray(x.permute(1, 2, 0).numpy())
    for seed in range(4):
        torch.manual_seed(seed)
        a = spec.transform(CIFAR)(pil)
        torch.manual_seed(seed)
        b = spec.tensor_transform(CIFAR)(x)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_auto_mode_resolution():
    assert resolve_augment_mode("auto", 3) == "cifar" and resolve_augment_mode("auto", 1) == "none"
    assert resolve_augment_mode("crop", 1) == "crop"
    assert parse_args([]).augment == "none"  # digits: 1 channel
    assert parse_args(["--data", "imagefolder:x"]).augment == "cifar"
    assert parse_args(["--data", "mnist"]).augment == "none"
    with pytest.raises(ValueError, match="augment must be one of"):
        resolve_augment_mode("flips", 3)


def test_digits_default_is_todays_data():
    b = get_data("digits", img_size=16)
    assert b.augment is None and b.train is b.train_eval and isinstance(b.train, torch.utils.data.TensorDataset)


def test_digits_augmented_train_only_and_black_padding():
    plain = get_data("digits", img_size=16)
    b = get_data("digits", img_size=16, augment=AugmentSpec("crop", padding=4))
    assert torch.equal(b.train_eval.tensors[0], plain.train.tensors[0])
    assert torch.equal(b.val.tensors[0], plain.val.tensors[0]) and torch.equal(b.test.tensors[0], plain.test.tensors[0])
    torch.manual_seed(0)
    x = torch.stack([b.train[i][0] for i in range(64)])
    black = -plain.spec.mean[0] / plain.spec.std[0]
    assert x.min() >= black - 1e-6 and not torch.equal(x, plain.train.tensors[0][:64])


def _all(ds):
    return torch.stack([ds[i][0] for i in range(len(ds))])


@pytest.mark.parametrize("decode_once", [True, False])
def test_eval_splits_and_ood_fit_split_never_augmented(image_folder, decode_once):
    kw = dict(img_size=32, id_classes=[0, 1], decode_once=decode_once)
    plain = get_data(f"imagefolder:{image_folder}", **kw)
    aug = AugmentSpec("cifar", auto_augment="randaugment", reprob=0.5)
    b = get_data(f"imagefolder:{image_folder}", augment=aug, **kw)
    for seed in (0, 1):
        torch.manual_seed(seed)
        for split in ("val", "test", "train_eval"):
            assert torch.equal(_all(getattr(b, split)), _all(getattr(plain, split if split != "train_eval" else "train")))
        assert torch.equal(_all(b.ood["heldout"]), _all(plain.ood["heldout"]))
    torch.manual_seed(0)
    assert not torch.equal(_all(b.train), _all(b.train_eval))
    assert b.augment == aug and plain.augment is None


def test_decode_once_gives_the_per_image_pixels(image_folder):
    a = get_data(f"imagefolder:{image_folder}", img_size=32, decode_once=True, val_fraction=0.2)
    b = get_data(f"imagefolder:{image_folder}", img_size=32, decode_once=False, val_fraction=0.2)
    for split in ("train", "val", "test"):
        assert torch.equal(_all(getattr(a, split)), _all(getattr(b, split)))
    assert a.train_raw is not None and a.train_raw[0][0].dtype == torch.uint8 and b.train_raw is None
    g = get_data(f"imagefolder:{image_folder}", img_size=32, channels=1, max_train_samples=6, val_fraction=0.2)
    assert g.train[0][0].shape == (1, 32, 32) and len(g.train) == len(g.train_eval) == len(g.train_raw) == 6


def test_test_folder_option(image_folder, tmp_path):
    b = get_data(f"imagefolder:{image_folder / 'train'}", img_size=32, test_folder=str(image_folder / "test"),
                 val_fraction=0.2)
    assert len(b.test) == 9 and len(b.train) + len(b.val) == 18
    with pytest.raises(ValueError, match="test_folder"):
        get_data("digits", test_folder=str(image_folder))


def test_crop_flip_batch_matches_torchvision_per_sample():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8, generator=g)
    top, left = torch.randint(0, 9, (6,), generator=g), torch.randint(0, 9, (6,), generator=g)
    flip = torch.tensor([True, False, True, True, False, False])
    out = crop_flip_batch(x, top, left, flip, padding=4)
    for i in range(6):
        ref = TF.crop(TF.pad(x[i], [4]), int(top[i]), int(left[i]), 8, 8)
        ref = TF.horizontal_flip(ref) if flip[i] else ref
        assert torch.equal(out[i], ref)


def test_batch_augment_normalises_like_the_eval_transform_and_draws_per_sample():
    spec = ImageSpec(3, 8, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    ba = BatchAugment(CIFAR, spec.mean, spec.std)
    ref = torch.stack([spec.tensor_transform()(xi) for xi in x])
    torch.testing.assert_close(ba(x, train=False), ref)
    torch.manual_seed(0)
    a = ba(x)
    torch.manual_seed(0)
    assert torch.equal(a, ba(x))
    top, left, flip = ba.draw(512, torch.device("cpu"))
    assert top.min() == 0 and top.max() == 8 and 0.4 < flip.float().mean() < 0.6 and len(set(left.tolist())) == 9
    with pytest.raises(ValueError, match="crop and flip only"):
        BatchAugment(AugmentSpec("cifar", reprob=0.2), spec.mean, spec.std)


@pytest.mark.parametrize("loss", [n for n in list_losses() if n not in SOFT_TARGET_LOSSES])
def test_mixup_refused_for_losses_without_soft_targets(loss):
    with pytest.raises(ConfigError, match=f"loss '{loss}' cannot take"):
        parse_args(["--loss", loss, "--mixup", "0.2"])
    with pytest.raises(ConfigError, match=f"'{loss}'"):
        parse_args(["--loss", loss, "--cutmix", "1.0"])
    parse_args(["--loss", loss])  # without mixing it is fine


def test_bad_augment_values_from_a_config_file(tmp_path):
    p = tmp_path / "c.yaml"
    for text, key in (("augment: flips\n", "augment"), ("auto_augment: rand\n", "auto_augment"),
                      ("reprob: 1.5\n", "reprob"), ("mixup: -1\n", "mixup")):
        p.write_text(text)
        with pytest.raises(ConfigError, match=key):
            parse_args(["-c", str(p)])


def test_soft_target_cross_entropy_against_float64_formula():
    from lossbench.registry import build_head

    head = build_head("ce", num_classes=5, in_features=4, label_smoothing=0.0).double()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 5, generator=g, dtype=torch.float64)
    q = torch.softmax(torch.randn(8, 5, generator=g, dtype=torch.float64), 1)
    ref = -(q * torch.log_softmax(logits, 1)).sum(1).mean()
    torch.testing.assert_close(soft_target_loss(head, logits, q).double(), ref, rtol=1e-6, atol=1e-6)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    torch.testing.assert_close(soft_target_loss(head, logits, torch.nn.functional.one_hot(y, 5).double()).double(),
                               torch.nn.functional.cross_entropy(logits, y), rtol=1e-6, atol=1e-6)
    svm = build_head("svm_l1", num_classes=5, in_features=4)
    with pytest.raises(TypeError, match="cross-entropy head"):
        soft_target_loss(svm, logits.float(), q.float())


def test_mix_batch_soft_targets_sum_to_one_and_odd_batches_stay_hard():
    from lossbench.framework.mixup import build_mixup

    mixer = build_mixup(0.2, 1.0, 1.0, 0.5, 4)
    assert build_mixup(0.0, 0.0, 1.0, 0.5, 4) is None
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8) % 4
    np.random.seed(0)
    xm, ym = mix_batch(mixer, x.clone(), y, 4)
    assert ym.shape == (8, 4) and torch.allclose(ym.sum(1), torch.ones(8))
    xo, yo = mix_batch(mixer, x[:7].clone(), y[:7], 4)
    assert torch.equal(xo, x[:7]) and torch.equal(yo.argmax(1), y[:7])
