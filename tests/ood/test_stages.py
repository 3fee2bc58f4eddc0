"""Stage modules of non-timm classifiers (ood.stages.find_stages) and the scores that hook them, RankFeat
and NAC, on torchvision's ResNet-18: the stages are the official layer1..layer4, the hooked outputs are
torchvision's own feature-extraction outputs, and the scores equal float64 transcriptions."""

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy.special import logsumexp

torchvision = pytest.importorskip("torchvision")
from torchvision import models as tvm  # noqa: E402
from torchvision.models.feature_extraction import create_feature_extractor  # noqa: E402

from ood import ScoreNotApplicable, adapt_classifier, create_score  # noqa: E402
from ood.stages import find_stages  # noqa: E402

from conftest import loader  # noqa: E402
from test_scores_input_perturbation import _nac_layer, _nac_reference_states, _rank1_removed  # noqa: E402


def _resnet18(seed=0):
    torch.manual_seed(seed)
    model = tvm.resnet18(num_classes=4).double().eval()
    with torch.no_grad():  # trained-like BatchNorm statistics, so that the maps are not all alike
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _x(n, px, seed):
    return torch.randn(n, 3, px, px, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("adapted", [False, True])
def test_resnet_stages_are_layer1_to_layer4_with_torchvisions_outputs(adapted):
    model = _resnet18()
    x = _x(3, 64, 1)
    stages = find_stages(adapt_classifier(model) if adapted else model, x)
    assert stages.names == ("relu", "layer1", "layer2", "layer3", "layer4") and set(stages.layouts) == {"NCHW"}
    got = {}
    handles = [stages.module(n).register_forward_hook(lambda _m, _i, out, n=n: got.__setitem__(n, out.clone()))
               for n in ("layer3", "layer4")]
    with torch.no_grad():
        logits = stages.forward(x)
    for h in handles:
        h.remove()
    with torch.no_grad():
        want = create_feature_extractor(model, return_nodes=["layer3", "layer4"])(x)
        torch.testing.assert_close(logits, model(x), rtol=0, atol=0)
    for n in ("layer3", "layer4"):
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=0)


def test_stages_of_other_families_and_errors():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    seq = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)).eval()
    assert find_stages(seq, x).names == ("1", "4")  # the last module at each resolution; pooling is no stage
    dense = tvm.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=5).eval()
    assert find_stages(dense, x).names == ("features.relu0", "features.denseblock1", "features.norm5")
    mobile = tvm.mobilenet_v3_small(num_classes=5).eval()  # a strided block is one unit of its new resolution
    assert find_stages(mobile, x).names == ("features.0", "features.1", "features.3", "features.8", "features.12")
    vit = tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=16,
                                num_classes=5).eval()
    with pytest.raises(ScoreNotApplicable, match="twice the input size.*token"):
        find_stages(vit, x)
    with pytest.raises(ScoreNotApplicable, match="image batches"):
        find_stages(seq, torch.randn(2, 3 * 32 * 32))


def test_swin_stages_are_channels_last():
    torch.manual_seed(0)
    swin = tvm.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1, 1], num_heads=[1, 2, 2],
                               window_size=[2, 2], num_classes=5).eval()
    stages = find_stages(swin, torch.randn(2, 3, 64, 64))
    assert stages.names == ("features.1", "features.3", "permute")
    assert stages.layouts == ("NHWC", "NHWC", "NCHW")


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_rankfeat_on_torchvision_resnet_matches_the_transcription(temperature):
    """Before ood.stages, RankFeat raised ScoreNotApplicable on any torchvision model."""
    model = _resnet18()
    x = _x(5, 64, 2)
    s = create_score("rankfeat", temperature=temperature).fit(model, loader(x))
    got = s.score(model, loader(x, batch_size=2)).numpy()
    with torch.no_grad():
        maps = create_feature_extractor(model, return_nodes=["layer3", "layer4"])(x)
        f3, f4 = maps["layer3"], maps["layer4"]
        assert f4.shape[2:] == (2, 2)

        def head(f):
            return model.fc(torch.as_tensor(f).mean(dim=(2, 3))).numpy()

        z4 = head(_rank1_removed(f4.numpy()))
        z3 = head(model.layer4(torch.from_numpy(_rank1_removed(f3.numpy()))))
    want = temperature * logsumexp((z4 + z3) / 2 / temperature, axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-9)
    adapted = adapt_classifier(model)  # the adapted view: the same stages, the same score
    np.testing.assert_allclose(create_score("rankfeat", temperature=temperature).fit(adapted, loader(x))
                               .score(adapted, loader(x)).numpy(), want, rtol=1e-9)


def test_rankfeat_refuses_token_models_and_single_stage_nets():
    torch.manual_seed(0)
    vit = tvm.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=16,
                                num_classes=5).eval()
    with pytest.raises(ScoreNotApplicable, match="rankfeat.*token"):
        create_score("rankfeat").fit(vit, loader(torch.randn(4, 3, 32, 32)))
    seq = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
    with pytest.raises(ScoreNotApplicable, match=r"two stages.*\['1'\]"):
        create_score("rankfeat").fit(seq, loader(torch.randn(4, 3, 32, 32)))


@pytest.mark.slow
def test_nac_on_torchvision_resnet_matches_the_transcription():
    """Before, NAC raised ScoreNotApplicable (no timm stages, no head.logits) on torchvision models."""
    model = _resnet18(1)
    y = torch.arange(48) % 4
    x_tr = _x(48, 32, 3) + 0.5 * y[:, None, None, None]
    x = torch.cat([_x(4, 32, 4), 3 * torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(5),
                                                dtype=torch.float64)])
    kw = dict(avgpool_O=2, avgpool_M=50, avgpool_sig_alpha=100, layer3_O=3, layer3_M=50, layer3_sig_alpha=10,
              layer2_O=2, layer2_M=50, layer2_sig_alpha=0.5, layer1_O=4, layer1_M=20, layer1_sig_alpha=0.05)
    s = create_score("nac", valid_num=24, **kw).fit(model, loader(x_tr, y, batch_size=16))

    def states(xx):  # the official ResNet taps: avgpool (pooled features), layer3, layer2, layer1
        stem = model.maxpool(model.relu(model.bn1(model.conv1(xx))))
        a1 = model.layer1(stem)
        a2 = model.layer2(a1)
        a3 = model.layer3(a2)
        h = model.avgpool(model.layer4(a3)).flatten(1)
        return _nac_reference_states(h, [a3, a2, a1], model.fc(h))

    fit_states, test_states = states(x_tr[s.subset_]), states(x)
    want = np.mean([_nac_layer(f, t, kw[f"{ln}_O"], kw[f"{ln}_M"], kw[f"{ln}_sig_alpha"])
                    for f, t, ln in zip(fit_states, test_states, ("avgpool", "layer3", "layer2", "layer1"))], axis=0)
    got = s.score(model, loader(x, batch_size=3)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert np.isfinite(got).all() and len(set(got.round(12))) > 1  # ID and noise are told apart by something


def test_nac_penultimate_layer_through_the_adapted_head():
    """layers=('avgpool',) needs only the final layer: any adapted classifier, even one without stage maps."""
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    y = torch.arange(32) % 4
    s = create_score("nac", layers=("avgpool",), valid_num=16).fit(seq, loader(torch.randn(32, 3, 16, 16), y))
    got = s.score(seq, loader(torch.cat([torch.randn(4, 3, 16, 16), 3 * torch.rand(4, 3, 16, 16)])))
    assert got.shape == (8,) and torch.isfinite(got).all()
    with pytest.raises(ScoreNotApplicable, match=r"stage -3 from the end; found 1 stages \['1'\]"):
        create_score("nac", layers=("avgpool", "layer2")).fit(seq, loader(torch.randn(32, 3, 16, 16), y))


def test_a_stage_hidden_at_small_inputs_is_an_error_not_a_shift():
    """At 16 px a stride-32 ResNet's layer4 is 1 x 1 at the input size and at twice it, like a global
    pool; the 4x pass shows it grows, so the stages are refused instead of shifted to relu..layer3."""
    import torchvision

    from ood import ScoreNotApplicable
    from ood.stages import find_stages

    model = torchvision.models.resnet18(num_classes=10).eval()
    assert find_stages(model, torch.randn(1, 3, 32, 32)).names == ("relu", "layer1", "layer2", "layer3", "layer4")
    with pytest.raises(ScoreNotApplicable, match=r"layer4.*larger input size"):
        find_stages(model, torch.randn(1, 3, 16, 16))


def test_nac_avgpool_on_a_plain_timm_classifier_uses_its_final_layer():
    """Before, NAC's avgpool layer refused a timm classifier without a lossbench head (no head.logits)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=4).double().eval()
    y = torch.arange(32) % 4
    x_tr, x = _x(32, 32, 6) + 0.5 * y[:, None, None, None], _x(6, 32, 7)
    kw = dict(avgpool_O=2, avgpool_M=50, avgpool_sig_alpha=100)
    s = create_score("nac", layers=("avgpool",), valid_num=16, **kw).fit(model, loader(x_tr, y, batch_size=16))

    def states(xx):
        h = model.forward_head(model.forward_features(xx), pre_logits=True)
        return _nac_reference_states(h, [], model.get_classifier()(h))

    want = _nac_layer(states(x_tr[s.subset_])[0], states(x)[0], 2, 50, 100)
    got = s.score(model, loader(x, batch_size=4)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_nac_refuses_a_timm_model_whose_final_layer_is_not_its_head():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=4).eval()
    real = model.forward_head
    model.forward_head = lambda t, pre_logits=False: real(t, pre_logits) if pre_logits else 2 * real(t)
    with pytest.raises(ScoreNotApplicable, match="get_classifier.*does not give the model's logits"):
        create_score("nac", layers=("avgpool",), valid_num=8).fit(model, loader(torch.randn(16, 3, 32, 32),
                                                                               torch.arange(16) % 4))
    headless = timm.create_model("resnet10t", num_classes=0).eval()
    with pytest.raises(ScoreNotApplicable, match="avgpool layer needs"):
        create_score("nac", layers=("avgpool",)).fit(headless, loader(torch.randn(8, 3, 32, 32)))
