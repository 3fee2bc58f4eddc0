import pytest
import timm
import torch

from lossbench.framework.models import create_model
from lossbench.framework.stems import use_small_stem
from ood.features import FeatureExtractor


def _stage_outputs(backbone, x):
    outs, handles = {}, []
    for info in backbone.feature_info:
        m = backbone.get_submodule(info["module"])
        handles.append(m.register_forward_hook(lambda _m, _i, o, n=info["module"]: outs.__setitem__(n, o)))
    backbone.forward_features(x)
    for h in handles:
        h.remove()
    return outs


@pytest.mark.parametrize("name", ["resnet18", "resnet10t", "resnet26d"])
def test_small_stem_shapes_and_feature_info(name):
    x = torch.randn(2, 3, 32, 32)
    big = timm.create_model(name, num_classes=0).eval()
    small = use_small_stem(timm.create_model(name, num_classes=0)).eval()
    assert small.maxpool.__class__.__name__ == "Identity"
    first = small.conv1 if isinstance(small.conv1, torch.nn.Conv2d) else small.conv1[0]
    assert first.kernel_size == (3, 3) and first.stride == (1, 1)
    assert big.forward_features(x).shape[-1] == 1 and small.forward_features(x).shape[-1] == 4
    assert small(x).shape == big(x).shape == (2, big.num_features)
    outs = _stage_outputs(small, x)
    for info in small.feature_info:  # feature_info strides and widths describe the real outputs
        o = outs[info["module"]]
        assert o.shape[1] == info["num_chs"] and o.shape[-1] == 32 // info["reduction"]
    assert [i["reduction"] for i in small.feature_info] == [1, 1, 2, 4, 8]


def test_multi_layer_mahalanobis_taps_follow_the_small_stem():
    model = create_model("resnet18", 10, "ce", in_chans=3, small_stem=True).eval()
    ext = FeatureExtractor(model, layers="all")
    feats = ext(torch.randn(3, 3, 32, 32))
    widths = [i["num_chs"] for i in model.backbone.feature_info]
    assert [f.shape for f in feats] == [torch.Size([3, w]) for w in widths[:-1]] + [torch.Size([3, 512])]
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(ext(x)[-1], model.features(x))
    assert ext.names[:-1] == ["act1", "layer1", "layer2", "layer3"]


def test_small_stem_one_channel_and_refused_elsewhere():
    m = create_model("resnet18", 4, "ce", in_chans=1, small_stem=True)
    assert m.backbone.conv1.in_channels == 1 and m(torch.randn(2, 1, 16, 16)).shape == (2, 4)
    with pytest.raises(ValueError, match="small_stem is supported for timm ResNet"):
        create_model("vit_tiny_patch16_224", 4, "ce", small_stem=True, img_size=32)
