"""The on-disk feature cache: a second evaluation of the same run does no forward pass."""

import numpy as np
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
