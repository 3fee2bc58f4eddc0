"""The airbench network registered with timm, and the trainer parts the fast recipe uses."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm

from lossbench import list_losses
from lossbench.framework.augment import AugmentSpec, BatchAugment, crop_flip_batch
from lossbench.framework.averaging import WeightAverager
from lossbench.framework.builders import LinearSchedule, scaled_param_groups, total_steps
from lossbench.framework.models import create_model
from lossbench.framework.nets.airbench import AirbenchNet, image_patches, whitening_filters
from lossbench.framework.runtime import amp_dtype, cpu_has_native_bf16
from lossbench.framework.tta import tta_logits, tta_views


def _net(**kw) -> AirbenchNet:
    torch.manual_seed(0)
    return timm.create_model("lossbench_airbench94", num_classes=0, **kw)


def test_registered_with_timm_and_builds_like_any_backbone():
    import lossbench.framework.nets  # noqa: F401

    assert timm.is_model("lossbench_airbench94") and timm.is_model("lossbench_airbench95")
    net = _net()
    x = torch.randn(3, 3, 32, 32)
    assert net(x).shape == (3, 256) and net.num_features == 256
    assert net.forward_features(x).shape == (3, 256, 3, 3)
    wide = timm.create_model("lossbench_airbench95", num_classes=7)
    assert wide(x).shape == (3, 7) and wide.num_features == 384
    with pytest.raises(ValueError, match="pretrained"):
        timm.create_model("lossbench_airbench94", pretrained=True)


def test_head_pools_as_the_references_maxpool_ties_included():
    """forward_head = airbench's MaxPool2d(3) on the 3x3 map, flattened, times 1/9: the same values and,
    on tied maxima (frequent in bf16), the same backward (the whole gradient to one position)."""
    net = _net()
    fmap = torch.randint(0, 3, (4, 256, 3, 3)).float()  # many ties
    mine, ref = fmap.clone().requires_grad_(True), fmap.clone().requires_grad_(True)
    out = net.forward_head(mine, pre_logits=True)
    expected = nn.MaxPool2d(3)(ref).flatten(1) / 9
    torch.testing.assert_close(out, expected)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (expected * w).sum().backward()
    torch.testing.assert_close(mine.grad, ref.grad)
    assert int((mine.grad != 0).sum()) == 4 * 256  # one position per channel, ties or not


def test_architecture_numbers_of_the_reference():
    net = _net()
    assert net.stem.kernel_size == (2, 2) and net.stem.out_channels == 24 and net.stem.padding == (0, 0)
    assert not net.stem.weight.requires_grad and net.stem.bias.requires_grad
    assert torch.equal(net.stem.bias, torch.zeros(24))
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 6
    for bn in bns:
        assert bn.eps == 1e-12 and bn.momentum == pytest.approx(0.4)
        assert not bn.weight.requires_grad and torch.equal(bn.weight, torch.ones_like(bn.weight))
    convs = [m for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and n != "stem"]
    assert [c.out_channels for c in convs] == [64, 64, 256, 256, 256, 256]
    assert all(c.bias is None and c.kernel_size == (3, 3) for c in convs)
    head = timm.create_model("lossbench_airbench94", num_classes=10).get_classifier()
    assert head.bias is None and net.scaling_factor == pytest.approx(1 / 9)


def test_dirac_init_passes_the_input_through_the_first_filters():
    net = _net()
    conv = net.layer2.conv1  # 64 -> 256
    x = torch.randn(2, 64, 7, 7)
    with torch.no_grad():
        y = conv(x)
    torch.testing.assert_close(y[:, :64], x)
    assert not torch.allclose(y[:, 64:], torch.zeros_like(y[:, 64:]))


def test_whitening_filters_whiten_known_patches():
    g = torch.Generator().manual_seed(0)
    # images with strongly correlated channels: patch covariance far from identity
    base = torch.randn(64, 1, 8, 8, generator=g)
    images = torch.cat([base, 0.5 * base + 0.1 * torch.randn(64, 1, 8, 8, generator=g),
                        torch.randn(64, 1, 8, 8, generator=g) * 3], 1)
    eps = 5e-4
    w = whitening_filters(images, 2, eps)
    assert w.shape == (24, 3, 2, 2)
    torch.testing.assert_close(w[12:], -w[:12])
    # independent reference: float64 numpy covariance of every 2x2 patch
    x = images.double().numpy()
    rows = np.array([x[n, :, i:i + 2, j:j + 2].ravel() for n in range(x.shape[0])
                     for i in range(7) for j in range(7)])
    cov = rows.T @ rows / len(rows)
    evals = np.sort(np.linalg.eigvalsh(cov))[::-1]
    half = w[:12].double().reshape(12, -1).numpy()
    white = half @ cov @ half.T
    np.testing.assert_allclose(white, np.diag(evals / (evals + eps)), atol=1e-4)
    # and the conv of the images with the stem gives the same second moments
    net = AirbenchNet(in_chans=3)
    net.init_from_data(images)
    with torch.no_grad():
        out = F.conv2d(images, net.stem.weight[:12])
    m2 = out.double().permute(1, 0, 2, 3).reshape(12, -1)
    np.testing.assert_allclose((m2 @ m2.T / m2.shape[1]).numpy(), np.diag(evals / (evals + eps)), atol=1e-4)
    assert image_patches(images, 2).shape == (64 * 49, 12)


def test_whitening_bias_trains_for_the_first_epochs_only():
    net = _net()
    for epoch, expected in ((0, True), (2, True), (3, False), (9, False)):
        net.on_train_epoch(epoch)
        assert net.stem.bias.requires_grad is expected


def test_feature_info_matches_the_layers_outputs():
    net = _net()
    seen = {}
    for info in net.feature_info:
        net.get_submodule(info["module"]).register_forward_hook(
            lambda m, i, o, name=info["module"]: seen.__setitem__(name, o.shape))
    net(torch.randn(2, 3, 32, 32))
    for info in net.feature_info:
        assert seen[info["module"]][1] == info["num_chs"]
    from ood.features import stage_info

    assert [d["module"] for d in stage_info(net)] == ["stem_act", "layer1", "layer2", "layer3"]


@pytest.mark.parametrize("loss", list_losses())
def test_every_head_trains_on_it(loss):
    torch.manual_seed(0)
    model = create_model("lossbench_airbench94", 10, loss)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 10
    out, logits = model.loss(x, y)
    out.backward()
    assert torch.isfinite(out) and logits.shape == (8, 10)
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_weight_averaging_against_a_hand_computed_average():
    lin = nn.Linear(2, 1, bias=False)
    ws = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0]]), torch.tensor([[0.0, 4.0]])]
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.0, 0.0]]))
    avg = WeightAverager(lin, "ema", total_steps=4, every=1, decay=0.5, power=1.0)
    expected = torch.tensor([[0.0, 0.0]])
    for t, w in enumerate(ws, start=1):
        with torch.no_grad():
            lin.weight.copy_(w)
        avg.after_step(lin, t)
        d = 0.5 * t / 4
        expected = d * expected + (1 - d) * w
        torch.testing.assert_close(avg.average["weight"], expected)
        torch.testing.assert_close(lin.weight.data, w)  # ema: weights untouched
    # lookahead copies the average back every update; at the last step the weights are the average
    lin2 = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin2.weight.zero_()
    look = WeightAverager(lin2, "lookahead", total_steps=2, every=1, decay=0.5, power=0.0)
    with torch.no_grad():
        lin2.weight.copy_(ws[0])
    look.after_step(lin2, 1)
    torch.testing.assert_close(lin2.weight.data, 0.5 * ws[0])
    with torch.no_grad():
        lin2.weight.add_(1.0)
    look.after_step(lin2, 2)
    torch.testing.assert_close(lin2.weight.data, 0.5 * (0.5 * ws[0]) + 0.5 * (0.5 * ws[0] + 1.0))
    assert look.finished


def test_airbench_decay_schedule():
    avg = WeightAverager(nn.Linear(1, 1), "lookahead", total_steps=466)
    assert avg.decay_at(466) == pytest.approx(0.95 ** 5)
    assert avg.decay_at(233) == pytest.approx(0.95 ** 5 * 0.125)


def test_tta_is_the_weighted_mean_of_its_views():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5))
    x = torch.randn(2, 3, 8, 8)
    model(x)
    xn = x.numpy()
    padded = np.pad(xn, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    views = [xn, xn[..., ::-1], padded[:, :, :8, :8], padded[:, :, :8, :8][..., ::-1],
             padded[:, :, 2:, 2:], padded[:, :, 2:, 2:][..., ::-1]]
    weights = [0.25, 0.25, 0.125, 0.125, 0.125, 0.125]
    with torch.no_grad():
        expected = sum(w * model(torch.tensor(v.copy())) for w, v in zip(weights, views))
        torch.testing.assert_close(tta_logits(model, x, 2), expected)
        torch.testing.assert_close(tta_logits(model, x, 1), 0.5 * model(x) + 0.5 * model(x.flip(-1)))
        torch.testing.assert_close(tta_logits(model, x, 0), model(x))
    assert sum(w for w, _ in tta_views(x, 2)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="tta level"):
        tta_views(x, 3)


def test_alternating_flips_and_reflect_translations():
    aug = AugmentSpec("cifar", padding=2, flip_mode="alternating", pad_mode="reflect")
    ba = BatchAugment(AugmentSpec("flip", flip_mode="alternating"), (0.0,) * 3, (1.0,) * 3, n_samples=10, seed=3)
    x = torch.randint(0, 255, (10, 3, 4, 4), dtype=torch.uint8)
    idx = torch.arange(10)
    e0 = ba(x, index=idx, epoch=0)
    e1 = ba(x, index=idx, epoch=1)
    flipped0 = torch.tensor([torch.equal(e0[i], x[i].float().div(255).flip(-1)) for i in range(10)])
    flipped1 = torch.tensor([torch.equal(e1[i], x[i].float().div(255).flip(-1)) for i in range(10)])
    assert torch.equal(flipped0, ~flipped1) and 0 < int(flipped0.sum()) < 10
    torch.testing.assert_close(ba(x, index=idx, epoch=2), e0)
    with pytest.raises(ValueError, match="index"):
        ba(x)
    # reflect crop equals F.pad(mode='reflect') followed by the crop
    xf = torch.randn(4, 3, 6, 6)
    top, left = torch.tensor([0, 1, 2, 4]), torch.tensor([4, 0, 3, 2])
    flip = torch.tensor([False, True, False, True])
    out = crop_flip_batch(xf, top, left, flip, 2, "reflect")
    ref = F.pad(xf, (2, 2, 2, 2), mode="reflect")
    for i in range(4):
        crop = ref[i, :, top[i]:top[i] + 6, left[i]:left[i] + 6]
        torch.testing.assert_close(out[i], crop.flip(-1) if flip[i] else crop)
    assert aug.batch_only


def test_linear_schedule_is_airbenchs():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 2.0}])
    total = 466
    warm = int(total * 0.23)
    sched = LinearSchedule(opt, total, warm, 0.2, 0.07)

    def ref(step):  # legacy/airbench94.py get_lr
        if step < warm:
            frac = step / warm
            return 0.2 * (1 - frac) + 1.0 * frac
        frac = (step - warm) / (total - warm)
        return 1.0 * (1 - frac) + 0.07 * frac

    for step in (0, 1, 50, warm, 300, total):
        sched.step_update(step)
        assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * ref(step))
    args = argparse.Namespace(epochs=9.9, max_steps=None)
    assert total_steps(args, 47) == math.ceil(9.9 * 47)


def test_lr_scale_keeps_the_decay_per_step():
    model = create_model("lossbench_airbench94", 10, "ce")
    groups = scaled_param_groups(model, 1.5, 0.01, {"norm_bias": 64}, decay_1d=True)
    by_name = {n: g for g in groups for n in g["names"]}
    bn_bias = by_name["backbone.layer1.norm1.bias"]
    assert bn_bias["lr"] == pytest.approx(96.0) and bn_bias["weight_decay"] == pytest.approx(0.01 / 64)
    conv = by_name["backbone.layer1.conv1.weight"]
    assert conv["lr"] == pytest.approx(1.5) and conv["weight_decay"] == pytest.approx(0.01)
    assert by_name["backbone.stem.bias"]["weight_decay"] == pytest.approx(0.01)  # decay_1d
    assert "backbone.stem.weight" not in by_name and "backbone.layer1.norm1.weight" not in by_name  # frozen
    plain = {n: g for g in scaled_param_groups(model, 1.5, 0.01, {"norm_bias": 64}) for n in g["names"]}
    assert plain["backbone.stem.bias"]["weight_decay"] == 0.0  # timm's rule without decay_1d
    with pytest.raises(ValueError, match="match no parameter"):
        scaled_param_groups(model, 1.5, 0.01, {"nothing_like_this": 2})


def test_amp_auto_follows_the_cpu_flag(monkeypatch, tmp_path):
    import builtins

    real_open = builtins.open

    def fake(flags):
        def _open(path, *a, **k):
            if path == "/proc/cpuinfo":
                f = tmp_path / "cpuinfo"
                f.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
                return real_open(f, *a, **k)
            return real_open(path, *a, **k)
        return _open

    args = argparse.Namespace(amp="auto", amp_dtype="float16")
    monkeypatch.setattr(builtins, "open", fake("fpu avx512f avx512_bf16"))
    assert cpu_has_native_bf16() and amp_dtype(args, torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(builtins, "open", fake("fpu avx512f"))
    assert not cpu_has_native_bf16() and amp_dtype(args, torch.device("cpu")) is None
    assert amp_dtype(argparse.Namespace(amp=True, amp_dtype="float16"), torch.device("cpu")) == torch.bfloat16
    assert amp_dtype(argparse.Namespace(amp=False, amp_dtype="float16"), torch.device("cpu")) is None
