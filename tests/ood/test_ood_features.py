import pytest
import timm
import torch

from ood import FeatureExtractor, penultimate_features
from ood.features import pool


def test_stages_match_forward_intermediates(resnet_model):
    x = torch.randn(3, 3, 16, 16)
    ext = FeatureExtractor(resnet_model, "all")
    assert ext.names == ["act1", "layer1", "layer2", "layer3", "penultimate"]
    with torch.no_grad():
        feats = ext(x)
        ref = resnet_model.backbone.forward_intermediates(x, indices=[0, 1, 2, 3], intermediates_only=True)
        pen = resnet_model.backbone(x)
    for f, r in zip(feats[:4], ref):
        torch.testing.assert_close(f, r.mean(dim=(2, 3)))
    torch.testing.assert_close(feats[4], pen)
    assert all(f.dim() == 2 and f.shape[0] == 3 for f in feats)


def test_layer_selection_and_gradients(resnet_model):
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    ext = FeatureExtractor(resnet_model, [-1, 2])
    assert ext.names == ["layer4", "layer2"]
    f = ext(x)
    assert [t.shape[1] for t in f] == [96, 48]
    f[0].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_plain_timm_classifier():
    m = timm.create_model("test_resnet", num_classes=3).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(penultimate_features(m, x), m.forward_head(m.forward_features(x), pre_logits=True))
        feats = FeatureExtractor(m, "all")(x)
    assert len(feats) == 5


def test_pool_shapes():
    torch.testing.assert_close(pool(torch.ones(2, 3, 4, 5)), torch.ones(2, 3))
    torch.testing.assert_close(pool(torch.arange(12.).view(1, 3, 4)), torch.tensor([[4.0, 5.0, 6.0, 7.0]]))
    with pytest.raises(ValueError, match="pool"):
        pool(torch.ones(1, 1, 1, 1, 1))


def test_bad_layers(resnet_model):
    with pytest.raises(ValueError, match="layers must be"):
        FeatureExtractor(resnet_model, "some")
    with pytest.raises(ValueError, match="out of range"):
        FeatureExtractor(resnet_model, [7])
    with pytest.raises(TypeError, match="stage indices"):
        FeatureExtractor(resnet_model, [1.5])
    with pytest.raises(TypeError, match="feature_info"):
        FeatureExtractor(torch.nn.Linear(2, 2), "all")
    with pytest.raises(TypeError, match="features"):
        penultimate_features(torch.nn.Linear(2, 2), torch.ones(1, 2))
