"""Backbone matrix: one small timm model per family, trained 2 steps, scored by every OOD score.

For each family -- ResNet, ConvNeXt, EfficientNet, MobileNet, ViT, Swin (NHWC), Sequencer (NHWC)
and MambaOut (NHWC) -- the model is built by ``lossbench.framework.models.create_model`` with a lossbench
head, trained for 2 SGD steps at 32 x 32 px, and evaluated with every registered OOD score
(``ood.evaluate_ood``), Mahalanobis with all layers under the validation protocol. The pooled
width of every tapped layer must equal the backbone's declared channel count (timm
``feature_info``; ``num_features`` for the penultimate layer), and every score must be finite.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import ood
from lossbench.framework.models import create_model
from ood.features import FeatureExtractor, stage_info

#: (timm name, kwargs) -- small configurations that fit 32 px; the list the README cites.
BACKBONES = {
    "resnet": ("test_resnet", {}),
    "convnext": ("test_convnext", {}),
    "efficientnet": ("test_efficientnet", {}),
    "mobilenet": ("mobilenetv3_small_050", {}),
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, window_size=2, depths=(1, 1, 1, 1),
                                                  embed_dim=16, num_heads=(1, 1, 1, 1))),
    "sequencer": ("sequencer2d_s", dict(layers=(1, 1, 1, 1), embed_dims=(16, 32, 32, 32),
                                        hidden_sizes=(8, 16, 16, 16))),
    "mambaout": ("test_mambaout", {}),
}
FAMILIES = list(BACKBONES)
#: A short pre-processing grid keeps the validation protocol's passes few on a CPU.
SCORE_KWARGS = {"mahalanobis": {"eps_grid": (0.0, 0.001)}}
NUM_CLASSES = 3


def _loader(n, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g) + shift
    return DataLoader(TensorDataset(x, torch.arange(n) % NUM_CLASSES), batch_size=8)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_backbone_family(family):
    name, kwargs = BACKBONES[family]
    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES, loss="ce", **kwargs)
    train = _loader(16, 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for x, y in train:  # 2 steps
        loss, _ = model.loss(x, y)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()

    # Every stage, pooled in the backbone's declared layout, has its declared width.
    declared = [d["num_chs"] for d in stage_info(model)]
    ext = FeatureExtractor(model, list(range(len(declared))) + ["penultimate"])
    with torch.no_grad():
        feats = ext(torch.randn(2, 3, 32, 32))
    pen_width = getattr(model.backbone, "head_hidden_size", None) or model.backbone.num_features
    assert [f.shape[1] for f in feats] == declared + [pen_width]

    out = ood.evaluate_ood(model, train, _loader(16, 1), {"far": _loader(16, 2, shift=3.0)},
                           scores=ood.list_scores(), score_kwargs=SCORE_KWARGS, val_loader=_loader(16, 3))
    for score, per_set in out["scores"].items():
        for arrays in per_set.values():
            assert np.isfinite(arrays["id"]).all() and np.isfinite(arrays["ood"]).all(), score
    info = out["info"]["mahalanobis"]
    assert info["protocol"] == "validation"
    assert info["layers"] == [d["module"] for d in stage_info(model)][:-1] + ["penultimate"]
