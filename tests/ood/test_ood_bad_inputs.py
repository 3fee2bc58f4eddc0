"""Regression tests for OOD paths that gave a wrong number without an error."""

import copy

import pytest
import timm
import torch
import torch.nn as nn

from ood import FeatureExtractor, Mahalanobis, create_score, fit_class_gaussian
from ood.scores.feature_base import Classifier

from conftest import TimmClassifier, loader


def _declared_widths(model):
    info = model.backbone.feature_info
    return [d["num_chs"] for d in (info.get_dicts() if hasattr(info, "get_dicts") else info)]


# -- 1. channels-last and token backbones -------------------------------------------------------
def _tiny_swin():
    torch.manual_seed(0)
    m = TimmClassifier(num_classes=3, arch="test_resnet")
    m.backbone = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, img_size=32, window_size=2,
        depths=(1, 1, 1, 1), embed_dim=8, num_heads=(1, 1, 1, 1))
    m.head = type(m.head)(m.backbone.num_features, 3, nn.CrossEntropyLoss())
    return m.eval()


def test_nhwc_stages_are_pooled_over_space_not_channels():
    model = _tiny_swin()
    assert model.backbone.output_fmt == "NHWC"
    x = torch.randn(2, 3, 32, 32)
    ext = FeatureExtractor(model, [0, 1, 2, 3])
    with torch.no_grad():
        feats = ext(x)
        ref = model.backbone.forward_intermediates(x, indices=[0, 1, 2, 3], intermediates_only=True)
    assert [f.shape[1] for f in feats] == _declared_widths(model) == [8, 16, 32, 64]
    for f, r in zip(feats, ref):  # timm's intermediates are NCHW
        torch.testing.assert_close(f, r.mean(dim=(2, 3)))


def test_vit_tokens_are_pooled_over_patch_tokens():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32,
                            patch_size=8, depth=2, embed_dim=16, num_heads=2)
    model = TimmClassifier(num_classes=3)
    model.backbone = vit
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = FeatureExtractor(model, [0, 1])(x)
        ref = vit.forward_intermediates(x, indices=[0, 1], intermediates_only=True)  # (N, D, h, w) patches
    assert [f.shape[1] for f in feats] == _declared_widths(model)
    for f, r in zip(feats, ref):
        torch.testing.assert_close(f, r.mean(dim=(2, 3)))


def test_a_pooled_width_that_differs_from_feature_info_is_an_error():
    model = _tiny_swin()
    model.backbone.output_fmt = "NCHW"  # a wrong declaration must not give silent (N, H) features
    with pytest.raises(ValueError, match="feature_info"):
        FeatureExtractor(model, [1])(torch.randn(2, 3, 32, 32))  # (N, 4, 4, 16): H != C


# -- 2. score(model, ...) must use the model it is given ----------------------------------------
def test_mahalanobis_refuses_a_model_it_was_not_fitted_on():
    torch.manual_seed(0)
    m1 = TimmClassifier(num_classes=3).eval()
    m2 = copy.deepcopy(m1)
    with torch.no_grad():
        for p in m2.parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(24, 3, 16, 16)
    y = torch.arange(24) % 3
    score = Mahalanobis(protocol="simple").fit(m1, loader(x, y))
    s1 = score.score(m1, loader(x))
    assert s1.shape == (24,)
    with pytest.raises(ValueError, match="model"):
        score.score(m2, loader(x))


# -- 3. degenerate fits -------------------------------------------------------------------------
def test_zero_within_class_scatter_is_an_error():
    means = torch.randn(3, 5, dtype=torch.float64)
    y = torch.arange(30) % 3
    f = means[y]  # every sample equals its class mean
    with pytest.raises(ValueError, match="scatter"):
        fit_class_gaussian(f, y, 3)
    with pytest.raises(ValueError, match="scatter"):
        Mahalanobis().fit_features(f, y, 3)


# -- 4. fit-time inputs of the feature scores (the family rules are in tests/test_harness.py) -----
def test_nnguide_with_k1_on_an_empty_fit_set_names_the_argument():
    """K = 1 passed the bank-size check (bank = max(1, 0)) and failed in torch.topk."""
    with pytest.raises(ValueError, match="train_features is empty"):
        create_score("nnguide", K=1).fit_features(torch.zeros(0, 3), torch.zeros(0, 2), None, None)


def test_react_with_empty_validation_data_names_the_argument():
    """An empty validation set used to reach numpy.percentile (IndexError)."""
    h = torch.rand(20, 3, dtype=torch.float64)
    clf = Classifier.from_linear(torch.eye(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="val_features is empty"):
        create_score("react").fit_features(h, h[:, :2], None, clf, val_features=h[:0], val_logits=h[:0, :2])
    with pytest.raises(ValueError, match="val_logits is None"):
        create_score("react").fit_features(h, h[:, :2], None, clf, val_features=h)
