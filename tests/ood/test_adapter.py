"""Any classifier in: the adapter finds the penultimate features and final linear layer of torchvision's
families and of nn.Sequential, and every registered score runs on each (ID vs noise)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

torchvision = pytest.importorskip("torchvision")
from torchvision import models as tvm  # noqa: E402

from ood import adapt_classifier, evaluate_ood, list_scores  # noqa: E402
from ood.features import penultimate_features  # noqa: E402
from ood.scores.feature_base import collect_features, resolve_classifier  # noqa: E402


def _small(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "resnet":
        return tvm.resnet18(num_classes=5)
    if name == "mobilenet_v3":
        return tvm.mobilenet_v3_small(num_classes=5)
    if name == "efficientnet":
        return tvm.efficientnet_b0(num_classes=5)
    if name == "convnext":
        from torchvision.models.convnext import CNBlockConfig

        return tvm.ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=5)
    if name == "vit":
        vit = tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                    mlp_dim=64, num_classes=5)
        nn.init.normal_(vit.heads.head.weight, std=0.02)  # torchvision starts the head at zero: no boundary yet
        return vit
    if name == "swin":
        return tvm.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                   window_size=[2, 2], num_classes=5)
    if name == "densenet":
        return tvm.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=5)
    if name == "vgg":
        return tvm.VGG(tvm.vgg.make_layers([8, "M", 512, "M"]), num_classes=5, init_weights=False)
    if name == "sequential":
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    raise KeyError(name)


FAMILIES = ["resnet", "mobilenet_v3", "efficientnet", "convnext", "vit", "swin", "densenet", "vgg", "sequential"]
LAYER = {"resnet": "fc", "mobilenet_v3": "classifier.3", "efficientnet": "classifier.1", "convnext": "classifier.2",
         "vit": "heads.head", "swin": "head", "densenet": "classifier", "vgg": "classifier.6", "sequential": "4"}


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_finds_the_final_linear_layer(family):
    model = _small(family).eval()
    adapted = adapt_classifier(model)
    x = torch.randn(3, 3, 32, 32)
    h = adapted.features(x)
    layer = dict(model.named_modules())[LAYER[family]]
    assert adapted.get_classifier() is layer and h.shape == (3, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), model(x))
        torch.testing.assert_close(layer(h), model(x))
    torch.testing.assert_close(penultimate_features(model, x), h)  # raw models are adapted on the fly
    assert LAYER[family] in adapted.source


@pytest.mark.parametrize("family", ["resnet", "vit", "densenet"])
def test_adapted_in_training_mode_then_evaluated(family):
    """Regression: a model adapted while in training mode (as built) and then put in eval mode gave
    ``KeyError: 'features'``: only the extractor's training-mode graph had been rewritten."""
    model = _small(family)
    assert model.training
    adapted = adapt_classifier(model)
    adapted.eval()
    x = torch.randn(3, 3, 32, 32)
    layer = dict(model.named_modules())[LAYER[family]]
    with torch.no_grad():
        h = adapted.features(x)
        torch.testing.assert_close(layer(h), model(x))
        torch.testing.assert_close(adapted(x), model(x))
    adapted.train()  # and back: the training-mode graph ends in the same layer
    assert adapted.features(x).shape == h.shape


#: Why RankFeat / NAC (official layers: penultimate + stages -2..-4) skip a family at 32 px; None: they run.
ONE_BY_ONE, TOKENS, FEW = "1 x 1 maps", "twice the input size.*token", "from the end; found [123] stages"
STAGED_SKIPS = {
    "rankfeat": {"resnet": ONE_BY_ONE, "mobilenet_v3": ONE_BY_ONE, "efficientnet": ONE_BY_ONE, "convnext": None,
                 "vit": TOKENS, "swin": "at least two stages", "densenet": None, "vgg": None,
                 "sequential": "at least two stages"},
    "nac": {"resnet": None, "mobilenet_v3": None, "efficientnet": None, "convnext": FEW, "vit": TOKENS, "swin": FEW,
            "densenet": FEW, "vgg": FEW, "sequential": FEW},
}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_every_score_runs_on_every_family(family):
    model = _small(family).eval()
    torch.manual_seed(1)
    x = torch.randn(40, 3, 32, 32)
    y = torch.arange(40) % 5  # every class present
    fit = DataLoader(TensorDataset(x, y), batch_size=16)
    val = DataLoader(TensorDataset(x[:20], y[:20]), batch_size=16)
    id_l = DataLoader(TensorDataset(torch.randn(16, 3, 32, 32), torch.zeros(16, dtype=torch.long)), batch_size=16)
    oods = {"noise": DataLoader(TensorDataset(3 * torch.rand(16, 3, 32, 32), torch.zeros(16, dtype=torch.long)),
                                batch_size=16)}
    kw = {"knn": {"k": 3}, "nnguide": {"K": 2, "alpha": 0.5}, "vim": {"dim": 2},
          "mahalanobis": {"layers": "penultimate"}, "gram": {"holdout": 0.25}}  # gram: 8 per class, hold 2 out
    out = evaluate_ood(model, fit, id_l, oods, scores=list_scores(), score_kwargs=kw, val_loader=val)
    assert set(out["results"]) | set(out["skipped"]) == set(list_scores())
    # RankFeat and NAC hook the stage maps ood.stages finds; where a family has too few of them at 32 px
    # (or none: a token model), the skip says so. None: the score runs.
    staged = {"rankfeat", "nac"}
    for name in staged:
        want = STAGED_SKIPS[name][family]
        if want is None:
            assert name in out["results"], out["skipped"].get(name)
        else:
            assert re.search(want, out["skipped"].get(name, "")), (name, out["skipped"].get(name))
    # class-conditional scores may lack classes on 40 random images; nothing else may be skipped
    allowed = {"she", "mds", "rmds", "mahalanobis", "kl_matching", "ash_p", "ash_b", "ash_s", "scale"} | staged
    assert set(out["skipped"]) <= allowed, out["skipped"]
    for per in out["results"].values():
        assert 0.0 <= per["noise"]["auroc"] <= 1.0


def test_classifier_is_the_adapted_linear_layer():
    model = _small("mobilenet_v3").eval()
    data = collect_features(model, DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.zeros(8)), batch_size=4))
    clf = resolve_classifier(model, data)
    assert clf.linear and data.features.shape[1] == 1024  # MobileNetV3-small's pre-logits, not its conv trunk


def test_user_given_callables_and_clear_errors():
    model = _small("resnet").eval()
    def trunk(x):
        x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        return model.avgpool(model.layer4(model.layer3(model.layer2(model.layer1(x))))).flatten(1)

    adapted = adapt_classifier(model, features=trunk, head=model.fc)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), model(x))

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x.flatten(1)[:, :4]) * 2.0

    with pytest.raises(ValueError, match="mul.*not by an nn.Linear"):
        adapt_classifier(Scaled())
    with pytest.raises(ValueError, match="both"):
        adapt_classifier(model, features=lambda x: x)
